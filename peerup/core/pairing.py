"""Pairing without copying peer IDs: the invite code, the names, the verification string.

The code a person reads aloud or scans carries everything the joiner needs and
nothing a relay operator could use: the inviter's peer ID (the joiner dials
exactly that peer, authenticated by the transport, so the code is bound to its
inviter), the relay the inviter holds a slot on, and a one-time secret that
never crosses the network (it is the password of a PAKE, see
:mod:`peerup.core.handshake` and docs/adr/0013-pairing-with-a-pake.md).

It is Crockford base32 (digits and capitals without I, L, O and U; ``i``/``l``
read as 1 and ``o`` as 0, case and dashes ignored), in groups of five, with a
checksum: a mistyped code is caught here, before any network contact, and the
error says so. Peer IDs and relay addresses are packed as bytes rather than
text (an Ed25519 peer ID is 32 bytes of key after a fixed prefix), which
halves the length. Transport-neutral: peer IDs and addresses are treated as
the base58 and multiaddr-shaped strings they are, without importing libp2p.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import tomlkit

from peerup.core import auth
from peerup.core.errors import ConfigError, PeerupError
from peerup.core.files import edit_toml
from peerup.core.settings import Settings

VERSION = 1
SECRET_BYTES = 8
_CHECK_BYTES = 2
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {char: value for value, char in enumerate(_ALPHABET)} | {"I": 1, "L": 1, "O": 0}
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
#: An Ed25519 peer ID: identity multihash (0x00, 36 bytes) of the protobuf key (type 1, 32 bytes).
_ED25519_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
_RELAY_IP4 = re.compile(r"/ip4/([0-9.]+)/tcp/(\d+)/p2p/(\w+)")
#: The longest code accepted, in characters; more is not a code (or a paste of something else).
MAX_CODE_CHARS = 400

#: The one line for a wrong, expired or used code: the joiner must not learn which it was.
REFUSED = "invite code not accepted: it is wrong, expired or already used; ask the inviter for a new one"


class InviteRefused(PeerupError):
    """The inviter did not accept the code (or is no longer waiting for it)."""

    def __init__(self) -> None:
        super().__init__(REFUSED)


class InviteCodeError(ConfigError):
    """The text is not an invite code: mistyped, cut short, or from another program."""


@dataclass(frozen=True)
class InviteCode:
    inviter: str
    relay: str
    secret: bytes

    def __str__(self) -> str:
        payload = bytes([VERSION]) + self.secret + _pack_peer(self.inviter) + _pack_relay(self.relay)
        text = _b32encode(payload + hashlib.sha256(payload).digest()[:_CHECK_BYTES])
        return "-".join(text[i : i + 5] for i in range(0, len(text), 5))

    @classmethod
    def parse(cls, text: str) -> InviteCode:
        """The code in ``text`` (spaces, dashes and case ignored); :class:`InviteCodeError` otherwise."""
        compact = re.sub(r"[\s-]+", "", text).upper()
        if not compact:
            raise InviteCodeError("no invite code given (pass it as an argument, on stdin, or in PEERUP_INVITE_CODE)")
        if len(compact) > MAX_CODE_CHARS:
            raise InviteCodeError(f"that is not an invite code: {len(compact)} characters, codes are much shorter")
        bad = sorted({char for char in compact if char not in _DECODE})
        if bad:
            raise InviteCodeError(f"invite code has characters no code contains: {''.join(bad)!r}; check for typos")
        raw = _b32decode(compact)
        payload, check = raw[:-_CHECK_BYTES], raw[-_CHECK_BYTES:]
        if len(raw) < 1 + SECRET_BYTES + _CHECK_BYTES or hashlib.sha256(payload).digest()[:_CHECK_BYTES] != check:
            raise InviteCodeError("invite code does not check out: a character is mistyped, missing or extra")
        if payload[0] != VERSION:
            raise InviteCodeError(f"invite code version {payload[0]} is not supported by this peerup (upgrade it)")
        try:
            secret, rest = payload[1 : 1 + SECRET_BYTES], payload[1 + SECRET_BYTES :]
            inviter, rest = _unpack_peer(rest)
            relay, rest = _unpack_relay(rest)
            if rest:
                raise ValueError("trailing bytes")
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise InviteCodeError(f"invite code is damaged ({exc}); ask for a new one") from None
        return cls(inviter, relay, secret)


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, flag: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h``, ``7d`` in seconds; one-line :class:`ConfigError` otherwise."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{flag} {text!r}: expected a duration like 90s, 10m, 2h or 7d")
    return float(match.group(1)) * _UNIT[match.group(2)]


# -- the verification string (`peerup verify`) -------------------------------------------


def verification_string(peer_a: str, peer_b: str, paired: str | None = None) -> str:
    """Six groups of five digits, the same on both sides, from both peer IDs (and the pairing transcript).

    About 99 bits: a man in the middle of a manual ``auth add`` chooses both
    substituted keys and so needs only a collision, about 2**50 key
    generations, not a second preimage; Signal's safety numbers are this size
    for the same reason.
    """
    first, second = sorted((peer_a, peer_b))
    digest = hashlib.sha256(f"peerup-verify-v1\n{first}\n{second}\n{paired or ''}".encode()).digest()
    number = int.from_bytes(digest[:16], "big") % 10**30
    text = f"{number:030d}"
    return " ".join(text[i : i + 5] for i in range(0, 30, 5))


# -- names -----------------------------------------------------------------------------


def proposed_name() -> str:
    """What this machine offers to be called: its host name, made a valid name."""
    return clean_name(socket.gethostname().split(".")[0]) or "peer"


def clean_name(text: str) -> str:
    """``text`` reduced to a valid peer name (lowercase), or "" when nothing is left.

    A name proposed by the other side is hostile input: it ends up in a config
    file and in log lines.
    """
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()[:200]).strip("-._")[:63]
    return name if auth.NAME.fullmatch(name) else ""


def check_name(text: str, flag: str = "--name") -> str:
    if not auth.NAME.fullmatch(text):
        raise ConfigError(f"{flag} {text!r}: letters, digits, '.', '_' or '-' (1-63, starting with a letter or digit)")
    return text


def choose_name(settings: Settings, peer_id: str, wanted: str | None, proposed: str) -> str:
    """The name to record ``peer_id`` under.

    ``wanted`` (the local ``--name``) wins; else a name it already has; else the
    one the peer proposed, with ``-2``, ``-3`` ... when another peer holds it.
    """
    if wanted:
        return wanted
    for name, known in settings.peers.items():
        if known == peer_id:
            return name
    base = clean_name(proposed) or f"peer-{peer_id[-6:].lower()}"
    name, n = base, 1
    while settings.peers.get(name, peer_id) != peer_id:
        n += 1
        name = f"{base[:58]}-{n}"
    return name


def check_name_free(settings: Settings, name: str) -> None:
    """``--name`` may not take a name another peer already has; checked before any network contact."""
    if name in settings.peers:
        raise ConfigError(
            f"--name {name!r} already names peer {settings.peers[name]} in {settings.config_file}; choose another"
        )


# -- recording a pairing in the home ---------------------------------------------------


@dataclass(frozen=True)
class Paired:
    """The outcome both sides record: who, under which name, and the transcript hash."""

    peer_id: str
    name: str
    transcript: str
    #: Services the inviter granted (``--service``), as the joiner was told.
    services: tuple[str, ...] = ()


def record(
    settings: Settings,
    paired: Paired,
    parse_peer_id: auth.PeerIdParser,
    *,
    relay: str | None = None,
    services: tuple[str, ...] = (),
    expires: datetime | None = None,
) -> None:
    """Write a pairing into the home: authorized_keys, ``[peers]``, service allowlists, the relay.

    authorized_keys first: if the config edit then fails, the peer is
    authorized under its ID, which the user can name by hand; the other order
    would leave a name for a peer that cannot connect.
    """
    keys = settings.authorized_keys_file
    current = auth.AuthorizedKeys(keys, parse_peer_id).entry(paired.peer_id)
    entry = auth.Entry(
        paired.peer_id,
        current.comment if current else f"paired {auth.format_time(datetime.now().astimezone())}",
        0,
        name=paired.name,
        expires=expires,
        verified=current.verified if current and current.paired == paired.transcript else None,
        paired=paired.transcript,
    )
    auth.put(keys, entry, parse_peer_id)

    def change(document: Any) -> None:
        if "peers" not in document:
            document["peers"] = tomlkit.table()
        document["peers"][paired.name] = paired.peer_id
        for service in services:
            allow = document["services"][service].get("allow")
            if allow is not None and paired.name not in allow and paired.peer_id not in allow:
                allow.append(paired.name)
        if relay is not None:
            if "relays" not in document:
                document["relays"] = tomlkit.array()
            if relay not in document["relays"]:
                document["relays"].append(relay)

    edit_toml(settings.config_file, change)


def check_services(settings: Settings, services: list[str]) -> tuple[str, ...]:
    """``--service`` names must be services in the config file (their allowlist is edited there)."""
    for name in services:
        if name not in settings.services:
            known = ", ".join(sorted(settings.services)) or "none configured"
            raise ConfigError(f"--service {name!r}: no such service in {settings.config_file} (known: {known})")
        if not _in_file(settings.config_file, name):
            raise ConfigError(f"--service {name!r}: add it to {settings.config_file} first ([services.{name}])")
    return tuple(services)


@dataclass(frozen=True)
class InviteTerms:
    """What an invite grants, checked: the name to give the joiner, services, when the entry expires."""

    name: str | None
    services: tuple[str, ...]
    expires: datetime | None


def check_invite(
    settings: Settings, name: str | None, services: list[str], expires: str | None, relay_hint: str = ""
) -> InviteTerms:
    """Every check an invite needs before any network contact, for ``peerup invite`` and the daemon alike.

    ``relay_hint`` is how this caller can be given a relay (``--relay MULTIADDR or ``).
    """
    checked = check_name(name) if name else None
    if checked:
        check_name_free(settings, checked)
    terms = InviteTerms(checked, check_services(settings, services), parse_expiry(expires))
    if not settings.relays:
        raise ConfigError(f"invite needs a relay both machines can reach: add {relay_hint}`relays` to the config")
    return terms


def _in_file(path: Path, service: str) -> bool:
    import tomllib

    try:
        with path.open("rb") as fh:
            return service in tomllib.load(fh).get("services", {})
    except (OSError, tomllib.TOMLDecodeError):
        return False


# -- byte packing -----------------------------------------------------------------------


def _b32encode(data: bytes) -> str:
    bits = len(data) * 8
    number = int.from_bytes(data, "big") << (-bits % 5)
    count = (bits + 4) // 5
    return "".join(_ALPHABET[(number >> (5 * (count - 1 - i))) & 31] for i in range(count))


def _b32decode(text: str) -> bytes:
    number = 0
    for char in text:
        number = (number << 5) | _DECODE[char]
    bits = len(text) * 5
    size = bits // 8
    return (number >> (bits - size * 8)).to_bytes(size, "big")


def _b58decode(text: str) -> bytes:
    number = 0
    for char in text:
        index = _B58.find(char)
        if index < 0:
            raise ValueError(f"{text!r} is not base58")
        number = number * 58 + index
    zeros = len(text) - len(text.lstrip("1"))
    return b"\x00" * zeros + number.to_bytes((number.bit_length() + 7) // 8, "big")


def _b58encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    out = ""
    while number:
        number, digit = divmod(number, 58)
        out = _B58[digit] + out
    return "1" * (len(data) - len(data.lstrip(b"\x00"))) + out


def _pack_peer(peer_id: str) -> bytes:
    raw = _b58decode(peer_id)
    if raw.startswith(_ED25519_PREFIX) and len(raw) == len(_ED25519_PREFIX) + 32:
        return b"\x01" + raw[len(_ED25519_PREFIX) :]
    if len(raw) > 255:
        raise ValueError("peer ID too long for an invite code")
    return b"\x00" + bytes([len(raw)]) + raw


def _unpack_peer(data: bytes) -> tuple[str, bytes]:
    if data[0] == 1:
        key, rest = data[1:33], data[33:]
        if len(key) != 32:
            raise ValueError("short peer ID")
        return _b58encode(_ED25519_PREFIX + key), rest
    if data[0] == 0:
        size = data[1]
        raw, rest = data[2 : 2 + size], data[2 + size :]
        if len(raw) != size:
            raise ValueError("short peer ID")
        return _b58encode(raw), rest
    raise ValueError("unknown peer ID form")


def _pack_relay(addr: str) -> bytes:
    match = _RELAY_IP4.fullmatch(addr)
    if match and int(match.group(2)) < 65536:
        with_ip = ipaddress.IPv4Address(match.group(1)).packed + int(match.group(2)).to_bytes(2, "big")
        return b"\x01" + with_ip + _pack_peer(match.group(3))
    raw = addr.encode()
    if len(raw) > 255:
        raise ValueError("relay address too long for an invite code")
    return b"\x00" + bytes([len(raw)]) + raw


def _unpack_relay(data: bytes) -> tuple[str, bytes]:
    if data[0] == 1:
        if len(data) < 7:
            raise ValueError("short relay address")
        ip, port = ipaddress.IPv4Address(data[1:5]), int.from_bytes(data[5:7], "big")
        relay_id, rest = _unpack_peer(data[7:])
        return f"/ip4/{ip}/tcp/{port}/p2p/{relay_id}", rest
    if data[0] == 0:
        size = data[1]
        raw, rest = data[2 : 2 + size], data[2 + size :]
        if len(raw) != size:
            raise ValueError("short relay address")
        return raw.decode(), rest
    raise ValueError("unknown relay address form")


def parse_expiry(text: str | None, flag: str = "--expires") -> datetime | None:
    if text is None:
        return None
    try:
        return auth.parse_time(text)
    except ValueError:
        return datetime.now(UTC) + timedelta(seconds=parse_duration(text, flag))
