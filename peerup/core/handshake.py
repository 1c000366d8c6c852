"""The pairing protocol: a SPAKE2 exchange bound to the invite code's secret, over one stream.

Who talks: the joiner dials the inviter's peer ID from the code on
``/peerup/pair/1.0.0``; the transport has already authenticated both peer IDs
(Noise), so the PAKE's job is to prove, both ways, knowledge of the one-time
secret without revealing it, even to a party that guesses: each guess costs one
online attempt, which the inviter serialises and slows down (ADR 0013).

Frames: ``type`` (1 byte), ``length`` (2 bytes, big-endian), payload of at most
:data:`MAX_FRAME` bytes. Bytes from the network are hostile: a longer frame, an
unexpected type or a slow peer ends the attempt (and counts as a failed one)
before anything is allocated or written. Every step is under a deadline.

::

    joiner                                   inviter
    HELLO   version, SPAKE2 A message  ->
                                       <-    SPAKE    SPAKE2 B message
    CONFIRM AEAD(k_joiner, 0, info)    ->            (wrong code: REFUSE)
                                       <-    CONFIRM  AEAD(k_inviter, 0, info)
    (records the inviter)
    DONE    AEAD(k_joiner, 1, "done")  ->
                                             (records the joiner)
                                       <-    RECORDED AEAD(k_inviter, 1, "recorded")

Keys come from HKDF over the SPAKE2 key, salted with the transcript hash (both
peer IDs and both SPAKE2 messages); its third output is the pairing transcript
both sides store (``paired=`` in authorized_keys) for ``peerup verify``. The
inviter records only after DONE, so a joiner that vanishes mid-way leaves the
inviter's files as they were.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteStream
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B

from peerup.core.errors import PeerupError
from peerup.core.pairing import VERSION, InviteRefused
from peerup.core.settings import check_service_name

log = logging.getLogger("peerup.pairing")

PROTOCOL = "/peerup/pair/1.0.0"
MAX_FRAME = 1024
HELLO, SPAKE, CONFIRM, DONE, RECORDED, REFUSE = 1, 2, 3, 4, 5, 0x7F
#: One whole attempt, from the first byte to RECORDED.
HANDSHAKE_TIMEOUT = 20.0
#: A pairing message is 33 bytes (SPAKE2 on Ed25519) plus the side byte.
_SPAKE_BYTES = 33
_MAX_INFO = 512


class HandshakeFailed(Exception):
    """The attempt broke the protocol or did not know the secret; ``str()`` says how, for the inviter's log."""


@dataclass(frozen=True)
class Info:
    """What each side tells the other once the secret is proven: a proposed name, granted services."""

    name: str
    services: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return json.dumps({"name": self.name, "services": list(self.services)}).encode()

    @classmethod
    def decode(cls, data: bytes) -> Info:
        """Hostile input (from a peer that knew the secret, but still): checked field by field."""
        try:
            value = json.loads(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise HandshakeFailed("pairing info is not JSON") from None
        if not isinstance(value, dict):
            raise HandshakeFailed("pairing info is not an object")
        name, services = value.get("name", ""), value.get("services", [])
        if not isinstance(name, str) or not isinstance(services, list) or len(services) > 64:
            raise HandshakeFailed("pairing info has wrong types")
        try:
            checked = tuple(check_service_name(service) for service in services if isinstance(service, str))
        except ValueError:
            raise HandshakeFailed("pairing info names an invalid service") from None
        return cls(name[:200], checked)


class _Session:
    """Keys and transcript of one attempt, from the SPAKE2 key and what was said."""

    def __init__(self, key: bytes, joiner: str, inviter: str, msg_joiner: bytes, msg_inviter: bytes) -> None:
        parts = (b"peerup-pair-v1", joiner.encode(), inviter.encode(), msg_joiner, msg_inviter)
        self.hash = hashlib.sha256(b"".join(len(p).to_bytes(4, "big") + p for p in parts)).digest()
        okm = HKDF(hashes.SHA256(), 80, salt=self.hash, info=b"peerup pairing keys").derive(key)
        self.joiner_key, self.inviter_key = ChaCha20Poly1305(okm[:32]), ChaCha20Poly1305(okm[32:64])
        self.transcript = okm[64:80].hex()

    def seal(self, key: ChaCha20Poly1305, counter: int, data: bytes) -> bytes:
        return key.encrypt(counter.to_bytes(12, "big"), data, self.hash)

    def open(self, key: ChaCha20Poly1305, counter: int, data: bytes) -> bytes:
        try:
            return key.decrypt(counter.to_bytes(12, "big"), data, self.hash)
        except InvalidTag:
            raise HandshakeFailed("wrong code (key confirmation failed)") from None


async def send_frame(stream: ByteStream, kind: int, payload: bytes = b"") -> None:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"pairing frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    await stream.send(bytes([kind]) + len(payload).to_bytes(2, "big") + payload)


async def receive_frame(stream: BufferedByteStream, expected: int) -> bytes:
    """The next frame's payload if it is of type ``expected``; :class:`InviteRefused` for REFUSE."""
    try:
        header = await stream.receive_exactly(3)
        kind, size = header[0], int.from_bytes(header[1:], "big")
        if size > MAX_FRAME:
            raise HandshakeFailed(f"frame of {size} bytes announced (limit {MAX_FRAME})")
        payload = await stream.receive_exactly(size) if size else b""
    except (anyio.IncompleteRead, anyio.EndOfStream):
        raise HandshakeFailed("the other side closed the stream mid-handshake") from None
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        raise HandshakeFailed("the stream broke mid-handshake") from None
    if kind == REFUSE:
        raise InviteRefused
    if kind != expected:
        raise HandshakeFailed(f"frame type {kind} where {expected} was due")
    return payload


def _finish(side: SPAKE2_A | SPAKE2_B, message: bytes) -> bytes:
    try:
        key: bytes = side.finish(message)
    except Exception as exc:  # noqa: BLE001 - spake2 raises ValueError and its own SPAKEError for bad points
        raise HandshakeFailed(f"malformed SPAKE2 message ({exc.__class__.__name__})") from None
    return key


# -- the inviter ------------------------------------------------------------------------

#: Records a pairing on the inviter: (peer ID, the name it proposed, transcript). Raises to fail it.
OnPaired = Callable[[str, str, str], None]


class Invitation:
    """One invite: single use, expiring, one attempt at a time, failures slowed down and capped.

    Attempts are serialised by a lock, so of two joiners with the right code
    exactly one wins and the other is refused like a wrong code. A failed
    attempt keeps the lock for ``failure_delay`` seconds, so guesses are
    slow whoever sends them; after ``max_failures`` the invitation ends.
    """

    def __init__(
        self,
        own_id: str,
        secret: bytes,
        ttl: float,
        info: Info,
        on_paired: OnPaired,
        *,
        max_failures: int = 10,
        failure_delay: float = 1.0,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.own_id = own_id
        self.secret = secret
        self.deadline = anyio.current_time() + ttl
        self.info = info
        self.on_paired = on_paired
        self.max_failures = max_failures
        self.failure_delay = failure_delay
        self.handshake_timeout = handshake_timeout
        self.failures = 0
        self.paired_with: str | None = None
        #: Why the invitation ended without a pairing ("" while open or once paired).
        self.ended = ""
        self.finished = anyio.Event()
        self._lock = anyio.Lock()
        self._proven = False

    @property
    def open(self) -> bool:
        return self.paired_with is None and not self.ended and anyio.current_time() < self.deadline

    async def wait(self) -> str:
        """Until paired (returns the peer ID) or ended; :class:`PeerupError` saying why it ended."""
        with anyio.move_on_after(max(0.0, self.deadline - anyio.current_time())):
            await self.finished.wait()
        if not self.finished.is_set():
            # An attempt that started before the deadline may finish: wait for it, bounded.
            with anyio.move_on_after(self.handshake_timeout + self.failure_delay):
                async with self._lock:
                    pass
        if self.paired_with is not None:
            return self.paired_with
        if not self.ended:
            self.ended = "the invite code expired before anyone joined"
        raise PeerupError(f"{self.ended}; run `peerup invite` again for a new code")

    async def handle(self, stream: ByteStream, remote_peer: str) -> None:
        """The stream handler for :data:`PROTOCOL`."""
        buffered = BufferedByteStream(stream)
        if not self.open:
            await self._refuse(buffered)
            return
        acquired = False
        with anyio.move_on_after(max(0.0, self.deadline - anyio.current_time())):
            await self._lock.acquire()  # only the wait is bounded by the deadline, not the attempt
            acquired = True
        if acquired:
            try:
                if self.open:
                    await self._attempt(buffered, remote_peer)
                    return
            finally:
                self._lock.release()
        await self._refuse(buffered)

    async def _attempt(self, stream: BufferedByteStream, remote_peer: str) -> None:
        self._proven = False
        try:
            with anyio.fail_after(self.handshake_timeout):
                await self._handshake(stream, remote_peer)
            return
        except TimeoutError:
            reason = f"no progress within {self.handshake_timeout:g} s"
        except (HandshakeFailed, InviteRefused, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            reason = str(exc) or exc.__class__.__name__
        if self._proven:
            # It knew the secret (the real joiner) and went away before DONE: not a guess.
            log.warning("pairing with %s did not finish (%s); the code stays valid", remote_peer, reason)
            return
        self.failures += 1
        log.warning("pairing attempt from %s refused: %s (%d failed so far)", remote_peer, reason, self.failures)
        await self._refuse(stream)
        if self.failures >= self.max_failures:
            self.ended = f"{self.failures} failed pairing attempts; the invite code is no longer valid"
            self.finished.set()
        await anyio.sleep(self.failure_delay)

    async def _handshake(self, stream: BufferedByteStream, remote_peer: str) -> None:
        """Returns once recorded; raises on failure (``_proven`` says whether the secret was shown)."""
        hello = await receive_frame(stream, HELLO)
        if len(hello) != 1 + _SPAKE_BYTES or hello[0] != VERSION:
            raise HandshakeFailed(f"HELLO of {len(hello)} bytes, version {hello[:1].hex() or '-'}")
        side = SPAKE2_B(self.secret, idA=remote_peer.encode(), idB=self.own_id.encode())
        message = side.start()
        await send_frame(stream, SPAKE, message)
        session = _Session(_finish(side, hello[1:]), remote_peer, self.own_id, hello[1:], message)
        info = Info.decode(session.open(session.joiner_key, 0, await receive_frame(stream, CONFIRM)))
        self._proven = True
        await send_frame(stream, CONFIRM, session.seal(session.inviter_key, 0, self.info.encode()))
        if session.open(session.joiner_key, 1, await receive_frame(stream, DONE)) != b"done":
            raise HandshakeFailed("DONE says something else")
        try:
            self.on_paired(remote_peer, info.name, session.transcript)
        except Exception as exc:
            self.ended = f"pairing with {remote_peer} could not be recorded: {exc}"
            self.finished.set()
            raise
        self.paired_with = remote_peer
        self.finished.set()
        log.info("paired with %s (transcript %s)", remote_peer, session.transcript)
        try:
            await send_frame(stream, RECORDED, session.seal(session.inviter_key, 1, b"recorded"))
            await stream.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    async def _refuse(self, stream: BufferedByteStream) -> None:
        with anyio.move_on_after(2, shield=True):  # also when the handler is being cancelled, but bounded
            try:
                await send_frame(stream, REFUSE)
                await stream.send_eof()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass


# -- the joiner -------------------------------------------------------------------------

#: Records a pairing on the joiner: (inviter's Info, transcript). Raises to abandon it.
OnAccepted = Callable[[Info, str], None]


@dataclass(frozen=True)
class Joined:
    inviter: str
    info: Info
    transcript: str
    #: Did the inviter confirm it recorded us (RECORDED arrived)?
    confirmed: bool


async def join_stream(
    stream: ByteStream, secret: bytes, own_id: str, inviter: str, info: Info, on_accepted: OnAccepted
) -> Joined:
    """Run the joiner's side on ``stream``; :class:`InviteRefused` for a wrong, expired or used code."""
    buffered = BufferedByteStream(stream)
    side = SPAKE2_A(secret, idA=own_id.encode(), idB=inviter.encode())
    message = side.start()
    accepted: tuple[Info, str] | None = None
    try:
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            await send_frame(buffered, HELLO, bytes([VERSION]) + message)
            reply = await receive_frame(buffered, SPAKE)
            if len(reply) != _SPAKE_BYTES:
                raise HandshakeFailed(f"SPAKE of {len(reply)} bytes")
            session = _Session(_finish(side, reply), own_id, inviter, message, reply)
            await send_frame(buffered, CONFIRM, session.seal(session.joiner_key, 0, info.encode()))
            try:
                theirs = Info.decode(session.open(session.inviter_key, 0, await receive_frame(buffered, CONFIRM)))
            except HandshakeFailed:
                raise InviteRefused from None
            on_accepted(theirs, session.transcript)
            accepted = (theirs, session.transcript)
            await send_frame(buffered, DONE, session.seal(session.joiner_key, 1, b"done"))
            recorded = await receive_frame(buffered, RECORDED)
            return Joined(
                inviter, theirs, session.transcript, session.open(session.inviter_key, 1, recorded) == b"recorded"
            )
    except (HandshakeFailed, TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
        if accepted is not None:
            return Joined(inviter, *accepted, confirmed=False)
        why = str(exc) or "no answer in time"
        raise PeerupError(f"pairing with {inviter} failed: {why}") from None
