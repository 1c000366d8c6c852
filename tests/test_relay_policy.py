"""A relay restricted to chosen peers, its limits, and whom it reserves for."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import multiaddr
import pytest
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import Reservation
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from peerup.core.errors import RetriesExhausted
from peerup.plugins.libp2p import workarounds
from peerup.plugins.libp2p.identity import create_identity
from peerup.plugins.libp2p.node import Libp2pNode
from peerup.plugins.libp2p.relay_policy import RelayPolicy, policy_of
from peerup.testing import (
    RELAYED_ONLY,
    client_node,
    echo_handler,
    exchange,
    read_all,
    relay,
    relay_node,
    serving_node,
    tcp_service,
)

pytestmark = pytest.mark.anyio


async def test_relay_allowlist_refuses_reservations_and_circuits_of_others(tmp_path: Path) -> None:
    server_id = create_identity(tmp_path / "server")
    client_id = create_identity(tmp_path / "client")
    create_identity(tmp_path / "intruder")
    allowed = [server_id, client_id]
    async with tcp_service(echo_handler) as addr, relay(tmp_path, allow=allowed) as relay_addr:  # noqa: SIM117
        async with (
            # Relayed only: on 127.0.0.1 the stranger could otherwise dial the server directly.
            serving_node(tmp_path, relay_addr, {"svc": addr}, nat=RELAYED_ONLY) as (_, server),
            serving_node(tmp_path, relay_addr, {"svc": addr}, name="intruder") as (_, intruder),
        ):
            assert isinstance(server, Libp2pNode) and isinstance(intruder, Libp2pNode)
            assert server.relays[0].reserved
            assert not intruder.relays[0].reserved  # refused: not in relay.allow
            async with client_node(tmp_path, relay_addr) as (rt, client):
                with anyio.fail_after(20):
                    stream = await rt.open_service_stream(client, server.peer_id, "svc")
                    assert await exchange(stream, b"allowed") == b"allowed"
            async with client_node(tmp_path, relay_addr, "stranger") as (rt, stranger):
                # 202: PERMISSION_DENIED, the relay's answer to a CONNECT from outside relay.allow
                with anyio.fail_after(20), pytest.raises(RetriesExhausted, match="failed with status 202"):
                    await rt.open_service_stream(stranger, server.peer_id, "svc")


async def test_relay_circuit_cap_refuses_beyond_the_limit(tmp_path: Path) -> None:
    async with (
        tcp_service(echo_handler) as addr,
        relay(tmp_path, max_circuits=1) as relay_addr,
        serving_node(tmp_path, relay_addr, {"svc": addr}) as (_, server),
        client_node(tmp_path, relay_addr, "one") as (rt1, one),
        client_node(tmp_path, relay_addr, "two") as (rt2, two),
    ):
        with anyio.fail_after(30):
            first = await rt1.open_service_stream(one, server.peer_id, "svc")  # holds the only circuit
            # 201: RESOURCE_LIMIT_EXCEEDED
            with pytest.raises(RetriesExhausted, match="failed with status 201"):
                await rt2.open_service_stream(two, server.peer_id, "svc")
            assert await exchange(first, b"first") == b"first"


async def test_an_idle_circuit_ends_at_its_duration(tmp_path: Path) -> None:
    """relay.circuit_duration holds for a quiet circuit too (upstream checked it per byte)."""
    async with (
        tcp_service(echo_handler) as addr,
        relay(tmp_path, circuit_duration=1) as relay_addr,
        serving_node(tmp_path, relay_addr, {"svc": addr}) as (_, server),
        client_node(tmp_path, relay_addr) as (rt, client),
    ):
        with anyio.fail_after(20):
            stream = await rt.open_service_stream(client, server.peer_id, "svc")
            await stream.send(b"hi")
            assert await stream.receive() == b"hi"
            started = anyio.current_time()
            assert await read_all(stream) == b""  # nothing more is sent: the relay ends the circuit
            ended = anyio.current_time() - started
            await stream.aclose()
    assert ended < 3


# -- whom a reservation is for, and the limits' refusals (issue #11, items 6 and 7) ---------


@asynccontextmanager
async def bare_host() -> AsyncIterator[IHost]:
    """A libp2p host with nothing of peerup on it: a client that writes its own relay messages."""
    host = new_host(key_pair=create_new_key_pair(), muxer_preference="YAMUX")
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        try:
            yield host
        finally:
            await workarounds.close_host(host)


async def reserve(host: IHost, relay_info: PeerInfo, naming: ID | None = None) -> StatusCode:
    """Send one RESERVE (its ``peer`` field set to ``naming`` when given); the relay's status."""
    with anyio.fail_after(10):
        if not host.get_network().get_connections(relay_info.peer_id):
            await host.connect(relay_info)
        stream = await host.new_stream(relay_info.peer_id, [HOP_PROTOCOL])
        try:
            message = HopMessage(type=HopMessage.RESERVE)
            if naming is not None:
                message.peer.CopyFrom(PeerId(id=naming.to_bytes()))
            await write_delimited_msg(stream, message)
            reply = await read_delimited_msg(stream, HopMessage)
        finally:
            await stream.close()
    return StatusCode(reply.status)


def relay_parts(node: object) -> tuple[PeerInfo, RelayPolicy, dict[ID, Reservation]]:
    """The relay's address info, its policy and its reservations (from the real relay node)."""
    assert isinstance(node, Libp2pNode)
    protocol = node.circuit.protocol
    policy = policy_of(protocol)
    assert policy is not None
    info = info_from_p2p_addr(multiaddr.Multiaddr(node.listen_addrs()[0]))
    return info, policy, protocol.resource_manager._reservations


async def test_a_reservation_is_for_the_peer_that_asks_whatever_the_message_names(tmp_path: Path) -> None:
    """Upstream reserved for the RESERVE message's peer field: made-up IDs filled the relay for an hour.

    (It also answered the liar with an error, having taken the slot anyway: the
    reservation was made, then not found for a peer that is not connected.)
    """
    async with relay_node(tmp_path, max_reservations=2) as (relay_addr, node), bare_host() as liar:
        info, _, reservations = relay_parts(node)
        made_up = [ID.from_pubkey(create_new_key_pair().public_key) for _ in range(3)]
        answers = [await reserve(liar, info, naming=peer) for peer in made_up]
        assert set(reservations) == {liar.get_id()}  # one slot, under the connection's own peer
        assert answers == [StatusCode.OK] * 3  # each a refresh of that one slot
        async with client_node(tmp_path, relay_addr, "honest") as (_, honest):
            assert isinstance(honest, Libp2pNode) and honest.relays[0].reserved
            assert set(reservations) == {liar.get_id(), ID.from_base58(honest.peer_id)}


async def test_a_full_relay_logs_a_refused_peer_once_and_counts_every_refusal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="peerup.relay")
    async with relay_node(tmp_path, max_reservations=1) as (_, node), bare_host() as first, bare_host() as second:
        info, policy, _ = relay_parts(node)
        assert await reserve(first, info) == StatusCode.OK
        for _ in range(3):
            assert await reserve(second, info) == StatusCode.RESOURCE_LIMIT_EXCEEDED
        assert await reserve(first, info) == StatusCode.OK  # refreshing a held slot is not a new one
        assert policy.refusals == Counter({"reservations": 3})
    lines = [r.getMessage() for r in caplog.records if r.name == "peerup.relay" and r.levelno == logging.WARNING]
    full = "reservation (relay full: 1 reservations, relay.max_reservations)"
    assert lines == [f"relay refused {second.get_id()}: {full}"]


async def test_a_peer_at_its_circuit_limit_is_refused_as_a_limit_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Upstream answered NO_RESERVATION, which the client reported as "peer not found", and logged nothing."""
    caplog.set_level(logging.WARNING, logger="peerup.relay")
    async with (
        tcp_service(echo_handler) as addr,
        relay_node(tmp_path, max_circuits_per_peer=1) as (relay_addr, node),
        serving_node(tmp_path, relay_addr, {"svc": addr}) as (_, server),
        client_node(tmp_path, relay_addr, "one") as (rt1, one),
        client_node(tmp_path, relay_addr, "two") as (rt2, two),
    ):
        _, policy, _ = relay_parts(node)
        with anyio.fail_after(30):
            first = await rt1.open_service_stream(one, server.peer_id, "svc")  # the server's only circuit
            with pytest.raises(RetriesExhausted, match="failed with status 201") as refused:  # RESOURCE_LIMIT_EXCEEDED
                await rt2.open_service_stream(two, server.peer_id, "svc")
            assert "not found" not in str(refused.value)
            assert await exchange(first, b"first") == b"first"
        assert policy.refusals["peer-circuits"] >= 1 and set(policy.refusals) == {"peer-circuits"}
    lines = [r.getMessage() for r in caplog.records if r.name == "peerup.relay" and r.levelno == logging.WARNING]
    assert len(lines) == 1, lines  # retries are counted, not logged again
    assert f"circuit to {server.peer_id} (it has 1 circuits, relay.max_circuits_per_peer)" in lines[0]
