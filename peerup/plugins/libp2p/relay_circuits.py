"""The relay's byte pump, replaced: half-close, no cross-circuit teardown, no write deadline.

libp2p 0.8.1's ``CircuitV2Protocol._relay_data`` (relay/circuit_v2/protocol.py:810-931)
has faults a tunnel for long SSH sessions cannot live with:

1. **Teardown of another client's circuit** (measured:
   ``tests/test_faults.py::test_a_client_leaving_does_not_cut_another_clients_tunnel``
   fails without this module). Its ``finally`` closes whatever pair is stored in
   ``_active_relays[peer_id]`` (:926-931), keyed by the destination peer (:721).
   With two clients relayed to one server, the first to leave closes the
   second's circuit.
2. **A 15 s write deadline** (:915, ``write_timeout``, read from the code, not
   measured): a reader paused longer than that (a suspended terminal) would
   have its circuit cut.
3. **Circuit duration checked only when data arrives** (:838): an idle circuit
   outlives ``relay.circuit_duration`` until its next byte. Here the pump wakes
   at the deadline.
4. **EOF treated as an error**: a yamux EOF is not among the "closed"
   exceptions it knows (:278 lists mplex ones), so it is retried and logged as
   an error before the circuit is torn down.

The pump below forwards bytes one direction; EOF becomes ``close_write`` on the
other stream (a FIN) and the opposite direction keeps flowing; a reset or a
failed write resets both streams of *this* circuit only. The spec'd limits are
kept: the circuit duration and the circuit-wide data budget.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import weakref
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

log = logging.getLogger("peerup.relay")

#: Upstream reads 64 KiB - 1 (tools/constants.py:23); larger reads mean fewer
#: frames per byte through the relay, which is its hot loop.
READ_SIZE = 256 * 1024


#: The running directions of each circuit, under each of its two streams: an
#: abort in one direction must end the other too, since a reader blocked on a
#: stream we reset locally is not woken by yamux. Weak keys: a circuit's entry
#: goes with its streams, and a new stream can never inherit an old entry.
_directions: weakref.WeakKeyDictionary[INetStream, list[trio.CancelScope]] = weakref.WeakKeyDictionary()


async def _reset_both(a: INetStream, b: INetStream) -> None:
    for stream in (a, b):
        with contextlib.suppress(Exception):
            await stream.reset()
    for scope in [*_directions.get(a, ()), *_directions.get(b, ())]:
        scope.cancel()


async def relay_data(
    self: CircuitV2Protocol,
    src_stream: INetStream,
    dst_stream: INetStream,
    peer_id: Any,
    deadline: float | None = None,
    circuit_data_limit: list[int] | None = None,
) -> None:
    """Copy ``src_stream`` to ``dst_stream`` until EOF (then FIN) or a failure (then reset both)."""
    scope = trio.CancelScope()
    for stream in (src_stream, dst_stream):
        _directions.setdefault(stream, []).append(scope)
    try:
        with scope:
            await _pump(self, src_stream, dst_stream, peer_id, deadline, circuit_data_limit)
    finally:
        for stream in (src_stream, dst_stream):
            scopes = _directions.get(stream, [])
            if scope in scopes:
                scopes.remove(scope)
            if not scopes:
                _directions.pop(stream, None)
        # Forget this circuit only if the entry is ours (see fault 1). Upstream files
        # a circuit twice: (source stream, None) under the source peer (:670) and
        # (source, destination) under the destination peer (:721).
        entry = self._active_relays.get(peer_id)
        if entry is not None and all(s is None or s is src_stream or s is dst_stream for s in entry):
            del self._active_relays[peer_id]


async def _pump(
    self: CircuitV2Protocol,
    src_stream: INetStream,
    dst_stream: INetStream,
    peer_id: Any,
    deadline: float | None,
    circuit_data_limit: list[int] | None,
) -> None:
    """One direction of a circuit: EOF becomes a FIN onward, any failure resets both streams."""
    while True:
        if deadline is not None and time.monotonic() > deadline:
            log.info("circuit for %s reached its duration limit", peer_id)
            await self._send_status(src_stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "Circuit duration exceeded")
            await _reset_both(src_stream, dst_stream)
            return
        try:
            # The duration is enforced while idle too (upstream checks it only
            # when data arrives, protocol.py:838): wake up at the deadline.
            remaining = math.inf if deadline is None else max(0.0, deadline - time.monotonic())
            with trio.move_on_after(remaining):
                data = await src_stream.read(READ_SIZE)
                remaining = -1.0
            if remaining >= 0:
                continue  # the deadline passed without data: the check above ends the circuit
        except EOFError:  # StreamEOF and MuxedStreamEOF are EOFErrors
            data = b""
        except Exception:  # noqa: BLE001 - reset or broken connection: abort this circuit
            await _reset_both(src_stream, dst_stream)
            return
        if not data:
            with contextlib.suppress(Exception):
                await dst_stream.close_write()  # type: ignore[attr-defined]
            return
        if circuit_data_limit is not None:
            if len(data) > circuit_data_limit[0]:
                log.info("circuit for %s reached its data limit", peer_id)
                await self._send_status(src_stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "Data limit exceeded")
                await _reset_both(src_stream, dst_stream)
                return
            circuit_data_limit[0] -= len(data)
        try:
            await dst_stream.write(data)
        except Exception:  # noqa: BLE001 - the other end is gone: abort this circuit
            await _reset_both(src_stream, dst_stream)
            return
