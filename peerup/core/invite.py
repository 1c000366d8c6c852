"""``peerup invite`` and ``peerup join`` on a running node: the protocol of
:mod:`peerup.core.handshake` wired to discovery, dialing and the home's files.

What a not-yet-authorized joiner can reach on the inviter: the pairing protocol
(and the ping echo every node answers). Service streams are checked against
authorized_keys by their own handler (:meth:`Runtime._serve_stream`), which the
pairing handler never calls; the joiner becomes authorized only by the file
write at the end of a successful pairing, and ``invite`` exposes no service at
all while it waits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

import anyio

from peerup.core.errors import ConfigError, PeerNotFound, PeerTimeout, PeerUnreachable, ProtocolNotSupported
from peerup.core.handshake import PROTOCOL, Info, Invitation, Joined, join_stream
from peerup.core.node import Introspectable, Node
from peerup.core.pairing import InviteCode, InviteRefused, Paired, choose_name, new_secret, proposed_name, record
from peerup.core.runtime import Runtime, short
from peerup.core.settings import Settings

log = logging.getLogger("peerup.pairing")

#: How long ``invite`` and ``join`` wait for their relay slot before going ahead anyway.
RELAY_WAIT = 10.0


async def invite(
    runtime: Runtime,
    node: Node,
    *,
    relay: str,
    ttl: float,
    show: Callable[[InviteCode], None],
    name: str | None = None,
    services: tuple[str, ...] = (),
    expires: datetime | None = None,
    failure_delay: float = 1.0,
    max_failures: int = 10,
) -> Paired:
    """Show a new code, wait for one joiner (or the end of ``ttl``), record it; return who joined."""
    settings = runtime.settings
    code = InviteCode(node.peer_id, relay, new_secret())
    result: list[Paired] = []

    def on_paired(peer_id: str, proposed: str, transcript: str) -> None:
        paired = Paired(peer_id, choose_name(settings, peer_id, name, proposed), transcript, services)
        record(settings, paired, node.parse_peer_id, services=services, expires=expires)
        result.append(paired)

    invitation = Invitation(
        node.peer_id,
        code.secret,
        ttl,
        Info(proposed_name(), services),
        on_paired,
        failure_delay=failure_delay,
        max_failures=max_failures,
    )
    node.set_stream_handler(PROTOCOL, invitation.handle)
    show(code)
    await invitation.wait()
    return result[0]


async def pick_relay(settings: Settings, node: Node) -> str:
    """The relay to put in a code: one this node holds a slot on (waiting a little), else the first configured."""
    relay = settings.relays[0]
    if isinstance(node, Introspectable):
        with anyio.move_on_after(RELAY_WAIT):
            await node.wait_relay_slot()
        held = [slot.addr for slot in node.relay_slots() if slot.reserved]
        if not held:
            log.warning("no slot on any relay yet: a joiner cannot reach this node until there is one")
        relay = held[0] if held else relay
    return relay


async def join(runtime: Runtime, node: Node, code: InviteCode, *, name: str | None = None) -> tuple[Paired, Joined]:
    """Pair with the inviter in ``code``; both homes are written before this returns."""
    settings = runtime.settings
    if code.inviter == node.peer_id:
        raise ConfigError("this invite code was made by this node itself; run `peerup join` on the other machine")
    recorded: list[Paired] = []

    def on_accepted(info: Info, transcript: str) -> None:
        paired = Paired(code.inviter, choose_name(settings, code.inviter, name, info.name), transcript, info.services)
        record(settings, paired, node.parse_peer_id, relay=code.relay)
        recorded.append(paired)

    timeout = settings.service_stream_timeout(None)
    relay_works = await _relay_slot(node, code.relay)
    try:
        with anyio.fail_after(timeout):
            stream, _ = await runtime.open_stream(node, code.inviter, PROTOCOL)
    except (PeerNotFound, ProtocolNotSupported):
        # No one waits for this code (expired, used, never made): the same line as a wrong code.
        raise InviteRefused from None
    except PeerUnreachable as exc:
        if relay_works:  # we hold a slot on the code's relay, the inviter is not there: same line again
            raise InviteRefused from None
        raise PeerUnreachable(f"cannot reach the relay in the invite code ({code.relay}): {exc}") from None
    except TimeoutError:
        raise PeerTimeout(f"the inviter {short(code.inviter)} did not answer within {timeout:g} s") from None
    async with stream:
        joined = await join_stream(stream, code.secret, node.peer_id, code.inviter, Info(proposed_name()), on_accepted)
    return recorded[0], joined


async def _relay_slot(node: Node, relay: str) -> bool | None:
    """Do we hold a slot on ``relay`` (waiting a little for it)? ``None`` when the transport cannot say."""
    if not isinstance(node, Introspectable):
        return None
    with anyio.move_on_after(RELAY_WAIT):
        await node.wait_relay_slot()
    return any(slot.reserved and slot.addr == relay for slot in node.relay_slots())
