"""The CLI's side of the control API: one request, one answer, errors as one line."""

from __future__ import annotations

import json
from typing import Any

import httpx

from peerup.core.errors import PeerupError
from peerup.core.settings import Settings


class DaemonNotRunning(PeerupError):
    exit_code = 3


class DaemonError(PeerupError):
    """The daemon answered with an error; ``str()`` is its one line."""


def request(settings: Settings, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    sock = settings.control_socket
    hint = f"no peerup daemon is running for {settings.home} (no control socket at {sock}); start one: `peerup daemon`"
    if not sock.exists():
        raise DaemonNotRunning(hint)
    try:
        cookie = settings.control_cookie.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise DaemonNotRunning(hint) from None
    except OSError as exc:
        raise DaemonError(f"cannot read the daemon's cookie {settings.control_cookie}: {exc.strerror}") from None
    transport = httpx.HTTPTransport(uds=str(sock))
    try:
        with httpx.Client(transport=transport, base_url="http://peerup", timeout=30.0) as client:
            response = client.request(method, path, json=body, headers={"Authorization": f"Bearer {cookie}"})
    except httpx.ConnectError:
        raise DaemonNotRunning(hint) from None
    except httpx.HTTPError as exc:
        raise DaemonError(f"control API at {sock}: {exc}") from None
    try:
        answer = response.json()
    except json.JSONDecodeError:
        raise DaemonError(f"control API at {sock} answered {response.status_code} without JSON") from None
    if response.is_error:
        message = answer.get("error") if isinstance(answer, dict) else None
        raise DaemonError(str(message or f"control API answered {response.status_code}"))
    return answer
