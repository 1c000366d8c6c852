"""Who may reach this node's services: ``authorized_keys`` in the peerup home.

One peer ID per line, an optional comment after it, ``#`` comment lines and
blank lines, like OpenSSH's file of the same name. The file is re-read when it
changes (its size, mtime or inode), checked on every inbound stream, so
``peerup auth add`` takes effect on a running node without a restart. A line
that is not a valid peer ID is reported with its line number and skipped:
never trusted, never fatal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peerup.core.errors import ConfigError

log = logging.getLogger("peerup.auth")

FILE_NAME = "authorized_keys"

#: Validates and normalises a peer ID; raises ValueError on garbage.
PeerIdParser = Callable[[str], str]


@dataclass(frozen=True)
class Entry:
    peer_id: str
    comment: str
    line: int


@dataclass(frozen=True)
class Problem:
    line: int
    text: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def parse(text: str, parse_peer_id: PeerIdParser) -> tuple[list[Entry], list[Problem]]:
    entries: list[Entry] = []
    problems: list[Problem] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        token, _, comment = line.partition(" ")
        try:
            peer_id = parse_peer_id(token)
        except ValueError as exc:
            problems.append(Problem(number, line, str(exc)))
            continue
        entries.append(Entry(peer_id, comment.strip(), number))
    return entries, problems


class AuthorizedKeys:
    """The parsed file, refreshed whenever it changed on disk."""

    def __init__(self, path: Path, parse_peer_id: PeerIdParser) -> None:
        self.path = path
        self._parse_peer_id = parse_peer_id
        self._stamp: tuple[int, int, int] | None = None
        self._peers: frozenset[str] = frozenset()
        self.entries: list[Entry] = []
        self.problems: list[Problem] = []

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def refresh(self) -> bool:
        """Re-read the file if it changed; ``True`` when the list may have changed."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return False
        try:
            text = self.path.read_text(encoding="utf-8") if stamp is not None else ""
        except (OSError, UnicodeDecodeError) as exc:
            # Keep the last good list: a half-written or unreadable file must
            # neither lock everyone out mid-session nor let anyone in.
            log.error("%s: cannot read (%s); keeping the previous %d entries", self.path, exc, len(self._peers))
            return False
        self.entries, self.problems = parse(text, self._parse_peer_id)
        for problem in self.problems:
            log.warning("%s: %s; line skipped", self.path, problem)
        self._peers = frozenset(entry.peer_id for entry in self.entries)
        if self._stamp is not None:
            log.info("%s changed: %d authorized peers", self.path, len(self._peers))
        self._stamp = stamp
        return True

    def allows(self, peer_id: str) -> bool:
        self.refresh()
        return peer_id in self._peers

    def __len__(self) -> int:
        self.refresh()
        return len(self._peers)


def add(path: Path, peer_id: str, comment: str, parse_peer_id: PeerIdParser) -> bool:
    """Append ``peer_id``; ``False`` if it was already there. Written atomically."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    entries, _ = parse(text, parse_peer_id)
    if any(entry.peer_id == peer_id for entry in entries):
        return False
    if "\n" in comment:
        raise ConfigError("--comment: must be a single line")
    line = f"{peer_id} {comment}".rstrip()
    if text and not text.endswith("\n"):
        text += "\n"
    _write(path, text + line + "\n")
    return True


def remove(path: Path, peer_id: str, parse_peer_id: PeerIdParser) -> bool:
    """Drop every line for ``peer_id``, keeping comments and other lines as they were."""
    if not path.exists():
        return False
    kept, removed = [], False
    for raw in path.read_text(encoding="utf-8").splitlines():
        token = raw.strip().partition(" ")[0]
        try:
            match = bool(token) and not token.startswith("#") and parse_peer_id(token) == peer_id
        except ValueError:
            match = False
        if match:
            removed = True
        else:
            kept.append(raw)
    if removed:
        _write(path, "".join(line + "\n" for line in kept))
    return removed


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
