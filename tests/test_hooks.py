"""The hook layer as plugin authors use it: wrappers, blame, tracing, names, the lab.

Everything here goes through real pluggy and, where bytes move, through real
libp2p hosts, a real relay and real TCP sockets (``peerup.harness.plugin_lab``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream
from pydantic import Field

from peerup.core.errors import ConfigError, PeerNotFound, PeerTimeout, PluginError
from peerup.core.hookcall import Answer
from peerup.core.hookspecs import hookimpl
from peerup.core.node import PeerRecord
from peerup.core.plugins import PluginHost
from peerup.core.settings import PluginSettings, ServiceSettings, Settings
from peerup.harness import flat_errors, plugin_host, plugin_lab

pytestmark = pytest.mark.anyio


class Answers:
    """A discovery plugin with a fixed answer, recording that it was asked."""

    def __init__(self, source: str | None, asked: list[str]) -> None:
        self.source, self.asked = source, asked

    @hookimpl
    async def discover_peer(self, node: object, peer_id: str, settings: Settings) -> PeerRecord | None:
        self.asked.append(f"{self.source}:{peer_id}")
        return None if self.source is None else PeerRecord(peer_id, (), source=self.source)


async def _discover(host: PluginHost, peer_id: str = "p") -> PeerRecord | None:
    return await host.discover_peer(None, peer_id, None)  # type: ignore[arg-type]


async def test_a_wrapper_sees_the_answer_of_the_plugins_inside_it_and_may_change_it() -> None:
    asked: list[str] = []
    seen: list[str] = []

    class Audit:
        @hookimpl(wrapper=True)
        def discover_peer(self, node: object, peer_id: str, settings: Settings) -> Generator[None, Any, Any]:
            inner = yield
            assert isinstance(inner, Answer)

            async def audited() -> PeerRecord | None:
                record = await inner
                seen.append(record.source if record else "none")
                return None if record is None else PeerRecord(record.peer_id, record.addrs, source="audited")

            return audited()

    host = PluginHost.from_objects([("builtin", Answers("dht", asked)), ("audit", Audit())])
    record = await _discover(host)
    assert record is not None and record.source == "audited"
    assert seen == ["dht"] and asked == ["dht:p"]


async def test_a_wrapper_can_call_the_rest_of_the_chain_with_other_arguments() -> None:
    asked: list[str] = []

    class Rename:
        @hookimpl(wrapper=True)
        def discover_peer(self, node: object, peer_id: str, settings: Settings) -> Generator[None, Any, Any]:
            rest = yield
            return rest.call(peer_id=peer_id.upper())

    host = PluginHost.from_objects([("builtin", Answers("dht", asked)), ("rename", Rename())])
    record = await _discover(host, "abc")
    assert record is not None and record.peer_id == "ABC"
    assert asked == ["dht:ABC"]  # the original call's coroutine never ran


async def test_an_async_wrapper_is_refused_at_load_with_the_plugin_named() -> None:
    class Wrong:
        @hookimpl(wrapper=True)
        async def dial(self, node: object, peer: object, protocol: str, settings: Settings) -> None:
            return None

    with pytest.raises(PluginError, match=r"^plugin wrong: .*generator"):
        PluginHost.from_objects([("wrong", Wrong())])


async def test_pluggy_monitoring_and_tracing_see_async_and_sync_hook_calls(home: Path) -> None:
    calls: list[str] = []
    host = PluginHost.from_objects([("builtin", Answers("dht", []))])
    host.pm.add_hookcall_monitoring(lambda name, impls, kwargs: calls.append(name), lambda *a: None)
    await _discover(host)
    host.retry_policy(Settings(home=home), None)
    assert calls == ["discover_peer", "retry_policy"]


async def test_a_failing_sync_hook_is_blamed_on_its_plugin(home: Path) -> None:
    class Broken:
        @hookimpl
        def retry_policy(self, settings: Settings, service: ServiceSettings | None) -> None:
            raise ZeroDivisionError("delay / 0")

    host = PluginHost.from_objects([("ok", Answers("dht", [])), ("broken", Broken())])
    with pytest.raises(PluginError, match=r"^plugin broken failed in retry_policy: ZeroDivisionError: delay / 0$"):
        host.retry_policy(Settings(home=home), None)


async def test_a_failure_inside_a_wrapper_coroutine_is_blamed_on_the_wrapper() -> None:
    class Clumsy:
        @hookimpl(wrapper=True)
        def discover_peer(self, node: object, peer_id: str, settings: Settings) -> Generator[None, Any, Any]:
            inner = yield

            async def later() -> None:
                await inner
                raise KeyError("lost it")

            return later()

    host = PluginHost.from_objects([("builtin", Answers("dht", [])), ("clumsy", Clumsy())])
    with pytest.raises(PluginError, match=r"^plugin clumsy failed in discover_peer: KeyError: 'lost it'$"):
        await _discover(host)


async def test_a_plugins_timeout_is_a_peer_timeout_so_it_is_retried() -> None:
    class Slow:
        @hookimpl
        async def discover_peer(self, node: object, peer_id: str, settings: Settings) -> None:
            raise TimeoutError("directory did not answer")

    host = PluginHost.from_objects([("slow", Slow())])
    with pytest.raises(PeerTimeout, match=r"^plugin slow timed out in discover_peer: directory did not answer$"):
        await _discover(host)


async def test_a_user_error_from_inside_a_plugins_task_group_arrives_as_itself() -> None:
    class Grouped:
        @hookimpl
        async def discover_peer(self, node: object, peer_id: str, settings: Settings) -> None:
            async def look() -> None:
                raise PeerNotFound(f"peer {peer_id} is not in the directory")

            async with anyio.create_task_group() as outer:
                outer.start_soon(look)

    host = PluginHost.from_objects([("grouped", Grouped())])
    with pytest.raises(PeerNotFound, match=r"^peer p is not in the directory$"):
        await _discover(host)


async def test_a_wrong_result_type_is_a_plugin_error_not_a_crash_later() -> None:
    class Sloppy:
        @hookimpl
        async def discover_peer(self, node: object, peer_id: str, settings: Settings) -> Any:
            return ["/ip4/1.2.3.4/tcp/1"]

    host = PluginHost.from_objects([("sloppy", Sloppy())])
    with pytest.raises(PluginError, match=r"^discover_peer answered with a list, not a PeerRecord$"):
        await _discover(host)


class Directory:
    """A name service plugin: ``resolve_name`` from its own table."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    @hookimpl
    def resolve_name(self, name: str, settings: Settings) -> str | None:
        return self.table.get(name)


async def test_a_plugin_serves_names_for_proxy_through_a_real_relay(tmp_path: Path) -> None:
    directory = Directory({})
    async with plugin_lab(tmp_path, client_plugins=[directory]) as lab:
        directory.table["workstation"] = lab.server_node.peer_id
        stream = await lab.client.open_service_stream(lab.client_node, "workstation", "svc")
        payload = os.urandom(100_000)
        async with stream:
            await stream.send(payload)
            await stream.send_eof()
            echoed = b""
            with anyio.fail_after(30):
                async for chunk in stream:
                    echoed += chunk
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        # A name the user wrote in [peers] wins over any plugin's.
        lab.client.settings.peers["workstation"] = lab.client_node.peer_id
        assert lab.client.peer_id(lab.client_node, "workstation") == lab.client_node.peer_id


def test_a_name_that_resolves_to_garbage_is_one_line_naming_the_plugin(home: Path) -> None:
    from peerup.core import names

    host = plugin_host([Directory({"nas": "not-a-peer-id"})])
    with pytest.raises(ConfigError, match=r"^peer 'nas' as resolved by a plugin: 'not-a-peer-id' is not a peer ID"):
        names.peer_id(host, Settings(home=home), "nas")
    with pytest.raises(ConfigError, match=r"^peer 'nope' is neither a name in \[peers\] \(none configured\)"):
        names.peer_id(host, Settings(home=home), "nope")


class Counted(ByteStream):
    """A stream that counts what is received through it."""

    def __init__(self, inner: ByteStream, total: list[int]) -> None:
        self.inner, self.total = inner, total

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self.inner.receive(max_bytes)
        self.total[0] += len(data)
        return data

    async def send(self, item: bytes) -> None:
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self.inner.extra_attributes


class ByteCounter:
    """Wraps the built-in proxy without importing it: the rest of the chain gets counted streams."""

    def __init__(self) -> None:
        self.up, self.down = [0], [0]

    @hookimpl(wrapper=True)
    def proxy_stream(
        self, local: ByteStream, remote: ByteStream, settings: Settings, service: ServiceSettings | None
    ) -> Generator[None, Any, Any]:
        rest = yield
        return rest.call(local=Counted(local, self.up), remote=Counted(remote, self.down))


async def test_a_wrapper_around_the_builtin_proxy_counts_every_byte_of_a_real_tunnel(tmp_path: Path) -> None:
    counter = ByteCounter()
    payload = os.urandom(3 * 1024 * 1024 + 17)
    async with plugin_lab(tmp_path, server_plugins=[], client_plugins=[counter]) as lab:
        with anyio.fail_after(60):
            echoed = await lab.roundtrip(payload)
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()
    # Client side: local -> peer is what the app sent, peer -> local what came back.
    assert counter.up[0] == len(payload)
    assert counter.down[0] == len(payload)


async def test_the_lab_reraises_a_plugins_error_flat() -> None:
    async def fail() -> None:
        raise ConfigError("[plugin.x] level: expected a number")

    with pytest.raises(ConfigError, match=r"^\[plugin.x\] level"), flat_errors():
        async with anyio.create_task_group() as tg, anyio.create_task_group() as inner:
            inner.start_soon(fail)
            tg.start_soon(anyio.sleep, 10)


async def test_retry_policy_is_told_which_service_a_proxied_connection_reaches(tmp_path: Path) -> None:
    from peerup.plugins.backoff import ExponentialBackoff

    asked: list[str | None] = []

    class PerService:
        @hookimpl
        def retry_policy(self, settings: Settings, service_name: str | None) -> ExponentialBackoff:
            asked.append(service_name)
            return ExponentialBackoff.from_settings(settings.retry)

    async with plugin_lab(tmp_path, client_plugins=[PerService()]) as lab:
        with anyio.fail_after(30):
            assert await lab.roundtrip(b"ping") == b"ping"
    # None: the node's own relay reconnects; "svc": the proxied connection.
    assert asked[0] is None and "svc" in asked


class Greeting(PluginSettings):
    section = "greeting"
    text: str = "hello"
    times: int = Field(1, ge=1)


class Greeter:
    settings_model = Greeting

    def __init__(self) -> None:
        self.seen: list[Greeting] = []

    @hookimpl
    def configure(self, settings: Settings) -> None:
        self.seen.append(settings.plugin_settings(Greeting))


def test_declared_settings_are_validated_once_at_start_and_handed_over_typed(home: Path) -> None:
    from peerup.core.runtime import Runtime

    greeter = Greeter()
    settings = Settings(home=home, plugin={"greeting": {"times": "3"}})
    Runtime(settings, PluginHost.from_objects([("greeter", greeter)]))
    assert greeter.seen == [Greeting(text="hello", times=3)]
    assert settings.plugin_settings(Greeting) is greeter.seen[0]  # validated once, the same object after

    with pytest.raises(ConfigError, match=r"^settings: \[plugin.greeting\] times: Input should be greater than or"):
        Runtime(Settings(home=home, plugin={"greeting": {"times": 0}}), PluginHost.from_objects([("g", Greeter())]))
    with pytest.raises(ConfigError, match=r"^settings: \[plugin.greeting\] colour: Extra inputs are not permitted"):
        Runtime(
            Settings(home=home, plugin={"greeting": {"colour": "red"}}), PluginHost.from_objects([("g", Greeter())])
        )


def test_a_settings_model_that_is_not_plugin_settings_is_refused_naming_the_plugin(home: Path) -> None:
    class Careless:
        settings_model = dict

    with pytest.raises(PluginError, match=r"^plugin careless: settings_model must be a PluginSettings subclass$"):
        PluginHost.from_objects([("careless", Careless())]).check_settings(Settings(home=home))


class Dials:
    """Counts ``dial`` calls that had to connect (the peer was not connected yet)."""

    def __init__(self) -> None:
        self.cold = 0

    @hookimpl(tryfirst=True)
    async def dial(self, node: object, peer: PeerRecord, protocol: str, settings: Settings) -> None:
        if not peer.connected:
            self.cold += 1


async def test_a_crowd_of_first_connections_shares_one_lookup_and_dial(tmp_path: Path) -> None:
    """200 local connections arrive at once on a proxy not yet connected to its peer: one connects, all get through.

    A browser or a connection pool opens many sockets together. Each running
    its own lookup and dial used to end with most of 1000 closed by the proxy;
    the first one connects while the others wait, then they reuse its
    connection. Every echo is checked.
    """
    dials = Dials()
    crowd = 200
    async with plugin_lab(
        tmp_path, client_plugins=[dials], server_settings={"auth": {"allow_all": True, "max_streams_per_peer": 1024}}
    ) as lab:
        answers: dict[int, bytes] = {}
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for index in range(crowd):

                    async def one(i: int = index) -> None:
                        answers[i] = await lab.roundtrip(b"hello %d" % i)

                    tg.start_soon(one)
    assert answers == {i: b"hello %d" % i for i in range(crowd)}
    assert dials.cold == 1, f"{dials.cold} dials without a connection for {crowd} simultaneous first connections"
