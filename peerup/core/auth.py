"""Who may reach this node's services: ``authorized_keys`` in the peerup home.

One peer per line, like OpenSSH's file of the same name: optional attributes,
the peer ID, an optional comment; ``#`` comment lines and blank lines::

    12D3KooW...  a plain entry, as peerup always wrote them
    name=laptop,expires=2026-12-31T00:00:00Z,verified=2026-11-28T01:02:03Z,paired=5f0c... 12D3KooW...  comment

Attributes come first, comma-separated, as OpenSSH puts its options before the
key: a line that starts with a peer ID is an old-style line, so every file
written before attributes existed keeps its meaning, comments included. An
attribute peerup does not know makes the whole line a problem (skipped): it
might have been meant as a restriction, and an ignored restriction is a grant.

The file is re-read when it changes (its size, mtime or inode), checked on
every inbound stream, so ``peerup auth add`` takes effect on a running node
without a restart. ``expires=`` is enforced at every check: an expired peer is
refused like an unknown one, and :meth:`AuthorizedKeys.refresh` reports the
moment of expiry as a change, so a node's watcher closes its open tunnels the
way it does for a removed line. A line that is not a valid peer ID is reported
with its line number and skipped: never trusted, never fatal.

Every edit is a read-modify-write under an advisory lock (``fcntl.flock`` on a
lock file beside it, so ``invite`` and ``auth add`` running at once cannot lose
each other's line), written with :func:`peerup.core.files.atomic_write_text`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from peerup.core.errors import ConfigError
from peerup.core.files import atomic_write_text, locked_text

log = logging.getLogger("peerup.auth")

FILE_NAME = "authorized_keys"

#: Validates and normalises a peer ID; raises ValueError on garbage.
PeerIdParser = Callable[[str], str]

#: A peer's friendly name: what ``[peers]`` keys and the CLI accept without quoting.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_HEX = re.compile(r"[0-9a-f]{8,64}")
ATTRIBUTES = ("name", "expires", "verified", "paired")


@dataclass(frozen=True)
class Entry:
    peer_id: str
    comment: str
    line: int
    name: str | None = None
    #: After this moment the peer is refused (UTC).
    expires: datetime | None = None
    #: When two people compared ``peerup verify``'s string and said it matched.
    verified: datetime | None = None
    #: Hash of the pairing transcript when the entry came from ``invite``/``join``.
    paired: str | None = None

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and self.expires.timestamp() <= (time.time() if now is None else now)


@dataclass(frozen=True)
class Problem:
    line: int
    text: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """An ISO 8601 date or date-time; without a zone it is UTC. ``ValueError`` otherwise."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a date or time (expected e.g. 2026-12-31 or 2026-12-31T18:00:00Z)") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _attributes(token: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for part in token.split(","):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise ValueError(f"attribute {part!r}: expected KEY=VALUE")
        if key not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {key!r} (known: {', '.join(ATTRIBUTES)}); line ignored")
        if key in values:
            raise ValueError(f"attribute {key!r} given twice")
        values[key] = value
    return values


def _entry(number: int, line: str, parse_peer_id: PeerIdParser) -> Entry:
    token, _, rest = line.partition(" ")
    values: dict[str, str] = {}
    if "=" in token:  # base58 has no '=': this is an attribute list, the peer ID follows
        values = _attributes(token)
        token, _, rest = rest.strip().partition(" ")
        if not token:
            raise ValueError("attributes but no peer ID")
    peer_id = parse_peer_id(token)
    name = values.get("name")
    if name is not None and not NAME.fullmatch(name):
        raise ValueError(f"name={name!r}: letters, digits, '.', '_' or '-', at most 63")
    paired = values.get("paired")
    if paired is not None and not _HEX.fullmatch(paired):
        raise ValueError(f"paired={paired!r}: expected lowercase hex")
    expires = parse_time(values["expires"]) if "expires" in values else None
    verified = parse_time(values["verified"]) if "verified" in values else None
    return Entry(peer_id, rest.strip(), number, name, expires, verified, paired)


def parse(text: str, parse_peer_id: PeerIdParser) -> tuple[list[Entry], list[Problem]]:
    entries: list[Entry] = []
    problems: list[Problem] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entries.append(_entry(number, line, parse_peer_id))
        except ValueError as exc:
            problems.append(Problem(number, line, str(exc)))
    return entries, problems


def render(entry: Entry) -> str:
    """One line for ``entry``: attributes (if any), the peer ID, the comment."""
    values = {
        "name": entry.name,
        "expires": format_time(entry.expires) if entry.expires else None,
        "verified": format_time(entry.verified) if entry.verified else None,
        "paired": entry.paired,
    }
    options = ",".join(f"{key}={value}" for key, value in values.items() if value)
    return " ".join(part for part in (options, entry.peer_id, entry.comment) if part)


class AuthorizedKeys:
    """The parsed file, refreshed whenever it changed on disk."""

    def __init__(self, path: Path, parse_peer_id: PeerIdParser) -> None:
        self.path = path
        self._parse_peer_id = parse_peer_id
        self._stamp: tuple[int, int, int] | None = None
        self._peers: frozenset[str] = frozenset()
        self._by_id: dict[str, Entry] = {}
        self._next_expiry = float("inf")
        #: A change (file or expiry) that :meth:`refresh` has not reported yet.
        self._unreported = False
        self.entries: list[Entry] = []
        self.problems: list[Problem] = []

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def refresh(self) -> bool:
        """Re-read the file if it changed; ``True`` when the list may have changed since the last call.

        Also ``True`` once when an entry's ``expires=`` has passed. Checks on
        inbound streams re-read the file too, without taking the change from
        the caller of this method (the node's watcher, which closes tunnels).
        """
        self._reload()
        changed, self._unreported = self._unreported, False
        return changed

    def _reload(self) -> None:
        now = time.time()
        if now >= self._next_expiry:
            self._update(self.entries, now)
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return
        try:
            text = self.path.read_text(encoding="utf-8") if stamp is not None else ""
        except (OSError, UnicodeDecodeError) as exc:
            # Keep the last good list: a half-written or unreadable file must
            # neither lock everyone out mid-session nor let anyone in.
            log.error("%s: cannot read (%s); keeping the previous %d entries", self.path, exc, len(self._peers))
            return
        entries, self.problems = parse(text, self._parse_peer_id)
        for problem in self.problems:
            log.warning("%s: %s; line skipped", self.path, problem)
        self._update(entries, now)
        if self._stamp is not None:
            log.info("%s changed: %d authorized peers", self.path, len(self._peers))
        self._stamp = stamp

    def _update(self, entries: list[Entry], now: float) -> None:
        self.entries = entries
        live = [entry for entry in entries if not entry.expired(now)]
        for entry in entries:
            if entry.expired(now) and entry.peer_id in self._peers:
                log.warning("%s: peer %s expired at %s", self.path, entry.peer_id, format_time(entry.expires))  # type: ignore[arg-type]
        self._peers = frozenset(entry.peer_id for entry in live)
        self._by_id = {entry.peer_id: entry for entry in entries}
        pending = [entry.expires.timestamp() for entry in live if entry.expires is not None]
        self._next_expiry = min(pending, default=float("inf"))
        self._unreported = True

    def allows(self, peer_id: str) -> bool:
        self._reload()
        return peer_id in self._peers

    def entry(self, peer_id: str) -> Entry | None:
        """The line for ``peer_id`` (also when expired), or ``None``."""
        self._reload()
        return self._by_id.get(peer_id)

    def __len__(self) -> int:
        self._reload()
        return len(self._peers)


def add(path: Path, peer_id: str, comment: str, parse_peer_id: PeerIdParser, expires: datetime | None = None) -> bool:
    """Append ``peer_id``; ``False`` if it was already there. Written atomically."""
    if "\n" in comment:
        raise ConfigError("--comment: must be a single line")
    with locked_text(path) as text:
        entries, _ = parse(text, parse_peer_id)
        if any(entry.peer_id == peer_id for entry in entries):
            return False
        _append(path, text, render(Entry(peer_id, comment.strip(), 0, expires=expires)))
    return True


def put(path: Path, entry: Entry, parse_peer_id: PeerIdParser) -> None:
    """Make ``entry`` the line for its peer: replace the first line for that peer (dropping others), or append."""
    with locked_text(path) as text:
        _put(path, text, entry, parse_peer_id)


def update(path: Path, peer_id: str, parse_peer_id: PeerIdParser, **changes: Any) -> Entry | None:
    """Change attributes of ``peer_id``'s line, keeping every other line as it was; ``None`` if absent."""
    with locked_text(path) as text:
        entries, _ = parse(text, parse_peer_id)
        current = next((entry for entry in entries if entry.peer_id == peer_id), None)
        if current is None:
            return None
        changed = replace(current, **changes)
        _put(path, text, changed, parse_peer_id)
    return changed


def _put(path: Path, text: str, entry: Entry, parse_peer_id: PeerIdParser) -> None:
    out, found = [], False
    for raw in text.splitlines():
        if _line_peer(raw, parse_peer_id) == entry.peer_id:
            if not found:
                out.append(render(entry))
            found = True
        else:
            out.append(raw)
    if found:
        _write(path, "".join(line + "\n" for line in out))
    else:
        _append(path, text, render(entry))


def remove(path: Path, peer_id: str, parse_peer_id: PeerIdParser) -> bool:
    """Drop every line for ``peer_id``, keeping comments and other lines as they were."""
    if not path.exists():
        return False
    with locked_text(path) as text:
        kept, removed = [], False
        for raw in text.splitlines():
            if _line_peer(raw, parse_peer_id) == peer_id:
                removed = True
            else:
                kept.append(raw)
        if removed:
            _write(path, "".join(line + "\n" for line in kept))
    return removed


def _line_peer(raw: str, parse_peer_id: PeerIdParser) -> str | None:
    """The peer ID a line is about, also for lines with attributes we cannot parse."""
    line = raw.strip()
    if not line or line.startswith("#"):
        return None
    token, _, rest = line.partition(" ")
    if "=" in token:
        token = rest.strip().partition(" ")[0]
    try:
        return parse_peer_id(token) if token else None
    except ValueError:
        return None


def _append(path: Path, text: str, line: str) -> None:
    if text and not text.endswith("\n"):
        text += "\n"
    _write(path, text + line + "\n")


def _write(path: Path, text: str) -> None:
    atomic_write_text(path, text, 0o600)
