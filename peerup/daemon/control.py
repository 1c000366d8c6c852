"""The control API's door: a Unix socket only its user can open, and a cookie only its user can read.

Two checks, because either alone has a gap: the socket's mode keeps other
users out of the connect(), and the cookie (a new random secret each start, in
a 0600 file beside the socket) keeps out a process that reaches the socket some
other way, e.g. through a container's bind mount or a directory whose mode was
loosened later. A socket path that already exists with a mode or owner that
would let others in is refused at start rather than silently replaced: someone
made it that way, and the operator should know (docs/adr/0014-control-api.md).
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import socket
import stat
from pathlib import Path

from peerup.core.errors import ConfigError
from peerup.core.files import atomic_write_text

#: The header an API client proves itself with: ``Authorization: Bearer <cookie>``.
SCHEME = "Bearer "


def check_directory(directory: Path) -> None:
    """The socket's directory must not let others replace the socket (group- or world-writable)."""
    mode = os.stat(directory).st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
        raise ConfigError(
            f"control socket directory {directory} is writable by others (mode {stat.S_IMODE(mode):o}): "
            f"run `chmod go-w {directory}` or set control.socket elsewhere"
        )


def open_socket(path: Path) -> socket.socket:
    """A listening socket at ``path`` with mode 0600; a stale one of ours is replaced, others refused."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_directory(path.parent)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        _check_existing(path, info)
        os.unlink(path)
    if len(os.fsencode(path)) >= 108:
        raise ConfigError(f"control socket path {path} is too long for a Unix socket: set control.socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # never, not even for an instant, a socket others may connect to
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot create control socket {path}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


def _check_existing(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"control socket path {path} exists and is not a socket: remove it or set control.socket")
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.getuid() or mode & 0o077:
        raise ConfigError(
            f"control socket {path} has mode {mode:o} and owner uid {info.st_uid}: others could use it; "
            "refusing to start (remove it if it is stale)"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        return  # stale: nobody answers
    finally:
        probe.close()
    raise ConfigError(f"another peerup daemon is already running with control socket {path}")


def write_cookie(path: Path) -> str:
    cookie = secrets.token_hex(32)
    atomic_write_text(path, cookie + "\n", 0o600)
    return cookie


def remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def authorized(header: str | None, cookie: str) -> bool:
    if header is None or not header.startswith(SCHEME):
        return False
    return hmac.compare_digest(header[len(SCHEME) :].strip().encode(), cookie.encode())
