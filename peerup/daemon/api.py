"""The control API as a small ASGI app: JSON in, JSON out, one error line per failure.

Routes (all under ``/v1``, field names documented in docs/operations.md)::

    GET    /v1/status          this node: ID, addresses, relay slots, reachability, uptime
    GET    /v1/peers           open connections: path, RTT, since when
    GET    /v1/tunnels         forwards and open connections with bytes each way
    POST   /v1/tunnels         {"peer", "service", "port", "bind"?} -> a new forward
    DELETE /v1/tunnels/ID      end a forward or one connection
    POST   /v1/reload          re-read config.toml and authorized_keys (as SIGHUP does)
    POST   /v1/invite          {"ttl"?, "name"?, "services"?, "expires"?} -> {"id", "code"}: wait for a joiner
    GET    /v1/invite/ID       its state ("waiting", "paired", "failed"), after waiting up to 20 s for a change
    DELETE /v1/invite/ID       stop waiting

Hand-written rather than a framework: nine routes, and the server (hypercorn)
already speaks HTTP; a router would be more code to audit than this.
Every error is ``{"error": "one line"}`` with a 4xx status; a handler's bug is
a 500 with the same shape, and the daemon keeps running.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from peerup.core.errors import PeerupError
from peerup.daemon import control

log = logging.getLogger("peerup.control")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: A request body larger than this is refused (the API's bodies are a few hundred bytes).
MAX_BODY = 64 * 1024


class ApiError(Exception):
    """An answer other than 2xx: ``str()`` is the one line the client prints."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Daemon(Protocol):
    """What the API asks of the running daemon (peerup/daemon/process.py)."""

    def status(self) -> dict[str, Any]: ...

    async def peers(self) -> list[dict[str, Any]]: ...

    def tunnels(self) -> list[dict[str, Any]]: ...

    async def connect(self, request: dict[str, Any]) -> dict[str, Any]: ...

    def disconnect(self, entry_id: str) -> None: ...

    async def reload(self) -> dict[str, Any]: ...

    async def invite(self, request: dict[str, Any]) -> dict[str, Any]: ...

    async def invitation(self, invite_id: str) -> dict[str, Any]: ...

    def cancel_invite(self, invite_id: str) -> None: ...


class ControlApp:
    def __init__(self, daemon: Daemon, cookie: str) -> None:
        self.daemon = daemon
        self.cookie = cookie

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            if not control.authorized(headers.get("authorization"), self.cookie):
                raise ApiError(401, "missing or wrong cookie: the API takes `Authorization: Bearer <cookie file>`")
            body = await _body(receive)
            status, payload = await self._route(scope["method"], scope["path"], body)
        except ApiError as exc:
            status, payload = exc.status, {"error": str(exc)}
        except PeerupError as exc:
            status, payload = 400, {"error": str(exc)}
        except Exception as exc:
            log.exception("control API: %s %s failed", scope.get("method"), scope.get("path"))
            status, payload = 500, {"error": f"internal error: {type(exc).__name__}: {exc}"}
        data = json.dumps(payload).encode() + b"\n"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": data})

    async def _route(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        parts = [part for part in path.split("/") if part]
        if parts[:1] != ["v1"] or len(parts) < 2:
            raise ApiError(404, f"no such endpoint: {path} (see docs/operations.md)")
        name, rest = parts[1], parts[2:]
        if name == "status" and not rest and method == "GET":
            return 200, self.daemon.status()
        if name == "peers" and not rest and method == "GET":
            return 200, await self.daemon.peers()
        if name == "tunnels" and not rest and method == "GET":
            return 200, self.daemon.tunnels()
        if name == "tunnels" and not rest and method == "POST":
            return 201, await self.daemon.connect(_json_object(body))
        if name == "tunnels" and len(rest) == 1 and method == "DELETE":
            self.daemon.disconnect(rest[0])
            return 200, {"closed": rest[0]}
        if name == "reload" and not rest and method == "POST":
            return 200, await self.daemon.reload()
        if name == "invite" and not rest and method == "POST":
            return 201, await self.daemon.invite(_json_object(body))
        if name == "invite" and len(rest) == 1 and method == "GET":
            return 200, await self.daemon.invitation(rest[0])
        if name == "invite" and len(rest) == 1 and method == "DELETE":
            self.daemon.cancel_invite(rest[0])
            return 200, {"cancelled": rest[0]}
        known = {"status", "peers", "tunnels", "reload", "invite"}
        raise ApiError(404 if name not in known else 405, f"no {method} {path}")


async def _body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(value).__name__}")
    return value


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
