"""Edits to files in the peerup home that a crash cannot leave half-written.

Several commands change the home while a node may be reading it (``auth add``,
``invite``/``join``, ``service add``, the daemon's reload): each write goes to a
temporary file in the same directory, is flushed to disk, and replaces the old
file with one ``rename``, so a reader sees the old file or the new one, never a
prefix. ``config.toml`` is edited through tomlkit, which keeps the user's
comments and layout; rewriting it from a parsed dict would silently drop them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError

from peerup.core.errors import ConfigError


def atomic_write_text(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text`` in one rename; the file gets ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def locked_text(path: Path) -> Iterator[str]:
    """Hold ``path``'s edit lock and yield its current text ("" when absent).

    Two peerup commands editing one file at once (``auth add`` while ``join``
    records a peer, ``service add`` during a reload) would otherwise each write
    their own version and lose the other's change. The lock is a separate
    ``.NAME.lock`` file, so the atomic rename of the file itself stays possible.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = ""
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text ({exc.reason}); fix or remove it first") from None
        yield text
    finally:
        os.close(fd)


def edit_toml(path: Path, change: Callable[[Any], None], mode: int = 0o600) -> None:
    """Apply ``change`` to the parsed document at ``path`` (empty if absent) and write it back.

    ``change`` receives a tomlkit document, which behaves like a dict and keeps
    comments and ordering. A file that does not parse is refused with its name,
    and left untouched.
    """
    with locked_text(path) as text:
        try:
            document = tomlkit.parse(text)
        except TOMLKitError as exc:
            raise ConfigError(f"{path} is not valid TOML ({exc}); fix it before editing it with peerup") from None
        change(document)
        atomic_write_text(path, tomlkit.dumps(document), mode)


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
