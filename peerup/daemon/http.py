"""Serving an ASGI app with hypercorn's trio worker inside the daemon's own task group."""

from __future__ import annotations

import logging
import socket
from typing import Any

import anyio
from anyio.abc import TaskStatus
from hypercorn.config import Config
from hypercorn.trio import serve

log = logging.getLogger("peerup.http")


def _config(bind: str) -> Config:
    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = log
    config.include_server_header = False
    config.graceful_timeout = 1.0
    return config


async def serve_app(
    app: Any, where: socket.socket | str, *, task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``app`` on an open listening socket (handed over) or on ``HOST:PORT``; until cancelled.

    ``task_status`` gets the bound addresses (``http://127.0.0.1:PORT``), so a
    port of 0 can be reported. A TCP address that cannot be bound raises
    ``OSError`` before ``started``.
    """
    bind = f"fd://{where.detach()}" if isinstance(where, socket.socket) else where

    async def never() -> None:
        await anyio.sleep_forever()

    await serve(app, _config(bind), shutdown_trigger=never, task_status=task_status)
