"""Opt-in Prometheus metrics (``[metrics] enabled``) and ``/healthz``, for the daemon and the relay.

The numbers come from the runtime's :class:`~peerup.core.tunnels.TunnelRegistry`
at scrape time (a custom collector), so the data path carries no metrics code
of its own; only the duration histogram is observed as each tunnel ends. Each
process builds its own ``CollectorRegistry``: nothing global, so several nodes
in one test process do not collide. Names are listed in docs/operations.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from anyio.abc import TaskGroup
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from peerup import __version__
from peerup.core.errors import ConfigError
from peerup.core.node import Introspectable, Measured, Node, Sample
from peerup.core.runtime import Runtime
from peerup.core.tunnels import Connection, TunnelRegistry
from peerup.daemon.http import serve_app

#: Seconds: an HTTP request, a file copy, an SSH session of hours.
DURATION_BUCKETS = (0.1, 1, 10, 60, 600, 3600, 6 * 3600, 24 * 3600)


class _TunnelCollector(Collector):
    def __init__(self, registry: TunnelRegistry, node: Callable[[], Node | None], role: str) -> None:
        self.registry = registry
        self.node = node
        self.role = role

    def collect(self) -> Iterator[Metric]:
        events = self.registry.events
        info = GaugeMetricFamily("peerup_info", "This process: version and role", labels=["version", "role"])
        info.add_metric([__version__, self.role], 1)
        yield info
        opened = CounterMetricFamily("peerup_tunnels_opened", "Tunnel connections opened", labels=["service", "kind"])
        for (service, kind), count in sorted(events.opened.items()):
            opened.add_metric([service, kind], count)
        yield opened
        active = GaugeMetricFamily("peerup_tunnels_active", "Tunnel connections open now", labels=["service", "kind"])
        counts: dict[tuple[str, str], int] = {}
        for conn in self.registry.connections.values():
            counts[(conn.service, conn.kind)] = counts.get((conn.service, conn.kind), 0) + 1
        for (service, kind), count in sorted(counts.items()):
            active.add_metric([service, kind], count)
        yield active
        failed = CounterMetricFamily(
            "peerup_tunnels_failed", "Tunnels refused or cut, by reason", labels=["service", "reason"]
        )
        for (service, reason), count in sorted(events.failed.items()):
            failed.add_metric([service, reason], count)
        yield failed
        up, down = self.registry.live_bytes()
        moved = CounterMetricFamily(
            "peerup_tunnel_bytes", "Bytes carried; up = local side to the peer", labels=["service", "kind", "direction"]
        )
        for (service, kind), count in sorted(up.items()):
            moved.add_metric([service, kind, "up"], count)
        for (service, kind), count in sorted(down.items()):
            moved.add_metric([service, kind, "down"], count)
        yield moved
        dials = CounterMetricFamily("peerup_dials", "Peer streams opened", labels=["path", "result"])
        for (path, result), count in sorted(events.dials.items()):
            dials.add_metric([path, result], count)
        yield dials
        auth = CounterMetricFamily("peerup_auth_decisions", "Inbound service streams allowed/denied", labels=["result"])
        for result, count in sorted(events.auth.items()):
            auth.add_metric([result], count)
        yield auth
        node = self.node()
        if isinstance(node, Measured):
            yield from _families(node.samples())
        if isinstance(node, Introspectable):
            slots = GaugeMetricFamily("peerup_relay_reservation", "1 while a slot is held on it", labels=["relay"])
            for slot in node.relay_slots():
                slots.add_metric([slot.addr], 1 if slot.reserved else 0)
            yield slots


def _families(samples: list[Sample]) -> Iterator[Metric]:
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
    for sample in samples:
        family = families.get(sample.name)
        if family is None:
            kind = GaugeMetricFamily if sample.kind == "gauge" else CounterMetricFamily
            family = kind(sample.name, sample.help, labels=sorted(sample.labels))
            families[sample.name] = family
        family.add_metric([sample.labels[key] for key in sorted(sample.labels)], sample.value)
    yield from families.values()


class Metrics:
    """One process's registry; :attr:`app` serves ``/metrics`` and ``/healthz``."""

    def __init__(
        self, registry: TunnelRegistry, node: Callable[[], Node | None], role: str, health: Callable[[], dict[str, Any]]
    ) -> None:
        self.prometheus = CollectorRegistry()
        self.prometheus.register(_TunnelCollector(registry, node, role))
        self.duration = Histogram(
            "peerup_tunnel_duration_seconds",
            "How long tunnel connections stayed open",
            ["service", "kind"],
            buckets=DURATION_BUCKETS,
            registry=self.prometheus,
        )
        self.health = health
        registry.on_close.append(self._closed)

    def _closed(self, conn: Connection, seconds: float) -> None:
        self.duration.labels(conn.service, conn.kind).observe(seconds)

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/metrics":
            status, body, kind = 200, generate_latest(self.prometheus), b"text/plain; version=0.0.4; charset=utf-8"
        elif path == "/healthz":
            state = self.health()
            status = 200 if state.get("ok") else 503
            body, kind = json.dumps(state).encode() + b"\n", b"application/json"
        else:
            status, body, kind = 404, b"not found: try /metrics or /healthz\n", b"text/plain"
        headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def serve_relay_metrics(tasks: TaskGroup, runtime: Runtime, node: Node) -> str:
    """``/metrics`` and ``/healthz`` for ``peerup relay serve``; the bound base URL."""
    settings = runtime.settings

    def health() -> dict[str, Any]:
        addrs = node.listen_addrs()
        return {"ok": bool(addrs), "role": "relay", "peer_id": node.peer_id, "listening": addrs}

    metrics = Metrics(runtime.registry, lambda: node, "relay", health)
    try:
        binds: list[str] = await tasks.start(serve_app, metrics.app, settings.metrics.listen)
    except OSError as exc:
        raise ConfigError(f"metrics.listen {settings.metrics.listen}: {exc.strerror or exc}") from exc
    return binds[0]
