"""The Noise/yamux fast path (peerup/plugins/libp2p/fastpath.py) keeps every byte in order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from libp2p.custom_types import TProtocol

from peerup.core.settings import load_settings
from peerup.plugins.libp2p import fastpath
from peerup.plugins.libp2p.node import open_libp2p_node

pytestmark = pytest.mark.anyio
PROTOCOL = TProtocol("/peerup-test/fastpath/1.0.0")


def test_fastpath_is_applied_with_the_plugin() -> None:
    import peerup.plugins.libp2p.plugin  # noqa: F401 - applies the global workarounds

    assert fastpath.applied()


def _home(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "peerup", "--home", str(path), "init"], check=True, capture_output=True)
    return path


async def test_odd_sized_writes_arrive_intact(tmp_path: Path) -> None:
    """Writes of many sizes (1 B to 1 MiB + 7: several frames, batches and Noise chunks) arrive in order."""
    sizes = [1, 12, 65523, 65524, 65525, 65536, 131049, 262144, 262145, (1 << 20) + 7, 3]
    payload = [os.urandom(n) for n in sizes]
    expected = b"".join(payload)
    a_settings = load_settings(_home(tmp_path / "a"), listen=["/ip4/127.0.0.1/tcp/0"])
    b_settings = load_settings(_home(tmp_path / "b"), listen=["/ip4/127.0.0.1/tcp/0"])
    async with open_libp2p_node(a_settings, "node") as a, open_libp2p_node(b_settings, "node") as b:

        async def handler(stream) -> None:  # type: ignore[no-untyped-def]
            for chunk in payload:
                await stream.write(chunk)
            await stream.close()

        a.host.set_stream_handler(PROTOCOL, handler)
        assert await b._connect_direct(a.host.get_id(), a.direct_addrs()[0]) is None
        stream = await b.host.new_stream(a.host.get_id(), [PROTOCOL])
        got = bytearray()
        with trio.fail_after(30):
            while True:
                try:
                    got += await stream.read(70000)
                except EOFError:
                    break
        assert bytes(got) == expected
