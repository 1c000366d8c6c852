"""The processes a benchmark path goes through, started on 127.0.0.1: :class:`Bench`.

Paths (the same service reached six ways):

- ``raw``: straight to the service;
- ``socat``: through ``socat TCP-LISTEN,fork`` (a plain userspace forwarder);
- ``peerup-relayed`` / ``peerup-direct``: ``peerup proxy`` -> ``peerup serve``,
  through ``peerup relay serve`` or dialled directly (``benchmarks/static_peer.py``);
- ``bare-libp2p-relayed`` / ``bare-libp2p-direct``: the same libp2p hosts with a
  raw stream handler (``benchmarks/bare_libp2p.py``).

Services: ``bench`` (``benchmarks/service.py``) always; ``redis`` (a throwaway
``redis-server``) when asked. Each (path, service) gets its own forwarder (a
``peerup proxy`` serves one service), while the relay and the serving node are
shared, as they would be in use. Only the paths asked for are started, so a
smoke test starts four processes, not fifteen.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from benchmarks.runner import BARE, LOOPBACK_ANY, PEERUP, PY, ROOT, STATIC, Proc, child_env, free_port, wait_port

ALL_PATHS = ["raw", "socat", "bare-libp2p-direct", "peerup-direct", "bare-libp2p-relayed", "peerup-relayed"]
LIBP2P_PATHS = [p for p in ALL_PATHS if "libp2p" in p or p.startswith("peerup")]
#: Peer homes the latency section dials from (cold first byte, ping); authorized up front.
LATENCY_CLIENTS = ["cold", "cold-direct", "ping", "ping-direct"]


class Bench:
    """Start the processes for ``paths`` x ``services``; ``ports[path]`` (bench) / ``redis_ports[path]``."""

    def __init__(
        self,
        tmp: Path,
        quick: bool = False,
        *,
        paths: Iterable[str] = ALL_PATHS,
        redis: bool = False,
        env: Mapping[str, str | None] | None = None,
        clients: Iterable[str] = LATENCY_CLIENTS,
    ) -> None:
        self.tmp = tmp
        self.quick = quick
        self.paths = [p for p in ALL_PATHS if p in set(paths)]
        self.services = ["bench", "redis"] if redis else ["bench"]
        self.env = child_env(env)
        self.extra_clients = list(clients)
        self.procs: list[Proc] = []
        self.ids: dict[str, str] = {}
        self.notes: list[str] = []
        self.targets: dict[str, Proc] = {}
        self.target_ports: dict[str, int] = {}
        self.socats: dict[str, Proc] = {}
        self.forwarders: dict[tuple[str, str], Proc] = {}
        self.port_of: dict[str, dict[str, int | None]] = {s: {} for s in self.services}
        self.relay: Proc | None = None
        self.serve: Proc | None = None
        self.bare_serve: Proc | None = None
        self.relay_addr = self.peer = self.direct_addr = ""

    # -- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, self.env)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def home(self, name: str) -> str:
        home = self.tmp / name
        if not home.exists():
            done = subprocess.run(
                [*PEERUP, "--home", str(home), "init"],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
                env=self.env,
                timeout=60,
            )
            self.ids[name] = done.stdout.split()[-1]
        return str(home)

    def authorize(self, server: str, clients: list[str]) -> None:
        """``peerup auth add`` each client's peer ID on the serving node (only authorized peers get through)."""
        for client in clients:
            self.home(client)
            subprocess.run(
                [*PEERUP, "--home", self.home(server), "auth", "add", self.ids[client], "--comment", client],
                check=True,
                capture_output=True,
                cwd=ROOT,
                env=self.env,
                timeout=60,
            )

    # -- ports and processes per path ---------------------------------------------------

    @property
    def ports(self) -> dict[str, int | None]:
        """Ports of the bench service per path (None: not available)."""
        return self.port_of["bench"]

    @property
    def redis_ports(self) -> dict[str, int | None]:
        return self.port_of.get("redis", {})

    @property
    def svc(self) -> Proc:
        return self.targets["bench"]

    def roles(self, path: str, service: str = "bench") -> dict[str, Proc]:
        """The processes a request on ``path`` to ``service`` passes through, by role (for CPU and RSS)."""
        out: dict[str, Proc] = {}
        if path == "socat" and service in self.socats:
            out["socat"] = self.socats[service]
        if path.endswith("-relayed") and self.relay is not None:
            out["relay"] = self.relay
        serving = self.bare_serve if path.startswith("bare-") else self.serve
        if path not in ("raw", "socat") and serving is not None:
            out["serve"] = serving
        if (path, service) in self.forwarders:
            out["proxy"] = self.forwarders[(path, service)]
        out["redis" if service == "redis" else "service"] = self.targets[service]
        return out

    def forwarder(self, path: str, service: str = "bench") -> Proc | None:
        return self.forwarders.get((path, service))

    # -- set-up -------------------------------------------------------------------------

    def setup(self) -> dict[str, int | None]:
        self._start_targets()
        self._start_socat()
        if any(p.startswith("peerup-") for p in self.paths) or any(p.startswith("bare-") for p in self.paths):
            self._start_relay()
        if any(p.startswith("peerup-") for p in self.paths):
            self._start_peerup()
        if any(p.startswith("bare-") for p in self.paths):
            self._start_bare()
        for service in self.services:
            for path in self.paths:
                if path == "raw":
                    self.port_of[service][path] = self.target_ports[service]
                elif (path, service) in self.forwarders:
                    self.port_of[service][path] = self._forwarding(self.forwarders[(path, service)])
                else:
                    self.port_of[service].setdefault(path, None)
        return self.ports

    def _start_targets(self) -> None:
        svc = self.start("service", [PY, "-m", "benchmarks.service"])
        self.targets["bench"] = svc
        self.target_ports["bench"] = int(svc.wait_for(r"listening (\d+)").group(1))
        if "redis" in self.services:
            server = self.redis_server()
            if server is None:
                raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
            port = free_port()
            argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            self.targets["redis"] = self.start("redis", [*argv, "--maxclients", "10000"])
            wait_port(port)
            self.target_ports["redis"] = port

    def _start_socat(self) -> None:
        if "socat" not in self.paths:
            return
        socat = shutil.which("socat")
        if not socat:
            self.notes.append("socat not installed: the socat baseline is unavailable")
            return
        for service in self.services:
            port = free_port()
            self.socats[service] = self.start(
                "socat" if service == "bench" else f"socat-{service}",
                [
                    socat,
                    f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                    f"TCP:127.0.0.1:{self.target_ports[service]}",
                ],
            )
            wait_port(port)
            self.port_of[service]["socat"] = port

    def _start_relay(self) -> None:
        relay = self.start("relay", [*PEERUP, "--home", self.home("relay"), "relay", "serve", "--listen", LOOPBACK_ANY])
        self.relay = relay
        self.relay_addr = relay.wait_for(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\S+)").group(1)

    def _proxy_home(self, path: str, service: str) -> str:
        base = "proxy" if path == "peerup-relayed" else "proxy-direct"
        return base if service == "bench" else f"{base}-{service}"

    def _start_peerup(self) -> None:
        # The benchmark's 1000 simultaneous tunnels come from one peer: lift the
        # per-peer stream cap (auth.max_streams_per_peer, default 256) on the serving node.
        # Everything is on 127.0.0.1, where every node is reachable directly: the
        # relayed rows keep the serving node from advertising a confirmed address
        # and from hole punching, so "relayed" stays relayed (the direct rows dial
        # its address explicitly; benchmarks/nat.py measures the upgrade itself).
        (Path(self.home("serve")) / "config.toml").write_text(
            "[auth]\nmax_streams_per_peer = 4096\n\n[nat]\nhole_punching = false\naddress_discovery = false\n"
        )
        wanted = [p for p in ("peerup-relayed", "peerup-direct") if p in self.paths]
        clients = [self._proxy_home(p, s) for p in wanted for s in self.services]
        self.authorize("serve", clients + self.extra_clients)
        services = [f"--service={s}=127.0.0.1:{self.target_ports[s]}" for s in self.services]
        argv = [*PEERUP, "--home", self.home("serve"), "serve", *services, "--relay", self.relay_addr]
        serve = self.start("serve", [*argv, "--listen", LOOPBACK_ANY])
        self.serve = serve
        self.peer = serve.wait_for(r"^peer (\S+)").group(1)
        serve.wait_for(r"reachable at (\S+p2p-circuit\S+)")
        self.direct_addr = serve.wait_for(r"reachable at (/ip4/127\.0\.0\.1/tcp/\d+/p2p/[^/\s]+)$").group(1)
        for path in wanted:
            for service in self.services:
                home = ["--home", self.home(self._proxy_home(path, service))]
                tail = ["proxy", self.peer, service, "0", "--listen", LOOPBACK_ANY]
                if path == "peerup-relayed":
                    argv = [*PEERUP, *home, *tail, "--relay", self.relay_addr]
                else:
                    argv = [*STATIC, self.direct_addr, "--", *home, *tail]
                name = path.replace("peerup-", "proxy-") + ("" if service == "bench" else f"-{service}")
                self.forwarders[(path, service)] = self.start(name, argv)

    def _start_bare(self) -> None:
        targets = [f"--target={s}=127.0.0.1:{self.target_ports[s]}" for s in self.services]
        argv = [*BARE, "serve", "--home", self.home("bare-serve"), *targets, "--relay", self.relay_addr]
        bare_serve = self.start("bare-serve", argv)
        self.bare_serve = bare_serve
        bare_peer = bare_serve.wait_for(r"^peer (\S+)").group(1)
        circuit = f"{self.relay_addr}/p2p-circuit/p2p/{bare_peer}"
        direct = bare_serve.wait_for(r"reachable at (/ip4/127\.0\.0\.1/tcp/\d+/p2p/[^/\s]+)$").group(1)
        for path in ("bare-libp2p-relayed", "bare-libp2p-direct"):
            if path not in self.paths:
                continue
            kind = path.rsplit("-", 1)[1]
            for service in self.services:
                suffix = "" if service == "bench" else f"-{service}"
                home = self.home(("bare-proxy" if kind == "relayed" else "bare-proxy-direct") + suffix)
                argv = [*BARE, "proxy", "--home", home, "--service", service]
                if kind == "relayed":
                    argv += ["--relay", self.relay_addr, "--peer-addr", circuit]
                else:
                    argv += ["--peer-addr", direct]
                self.forwarders[(path, service)] = self.start(f"bare-proxy-{kind}{suffix}", argv)

    @staticmethod
    def redis_server() -> str | None:
        return shutil.which("redis-server")

    @staticmethod
    def _forwarding(proc: Proc) -> int:
        return int(proc.wait_for(r"forwarding 127\.0\.0\.1:(\d+)").group(1))

    def describe(self) -> dict[str, Any]:
        return {"ports": self.port_of, "pids": {p.name: p.pid for p in self.procs}}
