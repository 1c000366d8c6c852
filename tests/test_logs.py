"""Refusals are logged once a minute per peer and reason: a flood must not flood the log."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest

from peerup.core.errors import ServiceError
from peerup.core.logs import OncePer
from peerup.testing import client_node, echo_handler, relay, serving_node, tcp_service


@pytest.mark.anyio
async def test_twenty_refused_streams_from_a_peer_are_one_warning_and_each_peer_gets_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="peerup.runtime")
    async with (
        tcp_service(echo_handler) as addr,
        relay(tmp_path) as relay_addr,
        serving_node(tmp_path, relay_addr, {"svc": addr}, authorized=[]) as (_, server),
        client_node(tmp_path, relay_addr, name="one") as (first, first_node),
        client_node(tmp_path, relay_addr, name="two") as (second, second_node),
    ):
        for runtime, node, tries in ((first, first_node, 20), (second, second_node, 3)):
            for _ in range(tries):
                with anyio.fail_after(30), pytest.raises(ServiceError, match="not authorized"):
                    await runtime.open_service_stream(node, server.peer_id, "svc")
    refusals = [r for r in caplog.records if r.name == "peerup.runtime" and "not authorized" in r.getMessage()]
    warnings = [r.getMessage() for r in refusals if r.levelno == logging.WARNING]
    assert len(refusals) == 23  # every refusal is still recorded, at DEBUG after the first
    assert len(warnings) == 2
    assert first_node.peer_id in warnings[0] and second_node.peer_id in warnings[1]


def test_a_flood_of_distinct_keys_keeps_memory_bounded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="peerup.test-once")
    once = OncePer(logging.getLogger("peerup.test-once"), every=60.0, max_keys=100)
    for key in range(5_000):
        assert once.warning(key, "refused %s", key)
    assert len(once._last) <= 100
    assert len(caplog.records) == 5_000  # distinct keys are each news
    assert not once.warning(4_999, "refused again")  # the latest keys are still remembered
