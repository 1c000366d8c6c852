"""peerup in a NetLab: a relay, a serving node and a proxy as real processes behind real NATs.

Shared by tests/test_nat.py and ``python -m benchmarks.nat``: both need the
same thing, the real CLI (``peerup relay serve``, ``peerup serve``, ``peerup
proxy``) placed on a public host or behind a cone or symmetric NAT router
(peerup/netlab.py), an echo service next to the serving node, and a client
application next to the proxy that moves bytes through the tunnel and checks
them (SHA-256 both ways) with the path each connection took read from the
proxy's log.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peerup.netlab import Host, NetLab
from peerup.testing import CliProc, init_home, peerup_run

Place = Literal["public", "cone", "symmetric"]
RELAY_PORT = 7777
SERVICE_PORT = 7000
PROXY_PORT = 9000

#: The client application: sends N random bytes, half-closes, reads the echo, reports.
#: Runs inside the client's namespace; a reset or a short echo is reported, never hidden.
_CLIENT_APP = r"""
import hashlib, json, os, socket, sys, threading, time
port, size = int(sys.argv[1]), int(sys.argv[2])
payload = os.urandom(size)
out = {"sent_sha": hashlib.sha256(payload).hexdigest(), "sent": size}
start = time.monotonic()
try:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.settimeout(60)
    send_error = []
    def send():
        try:
            view = memoryview(payload)
            while view:
                n = sock.send(view[:262144])
                view = view[n:]
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:  # the socket's error is reported once, to whichever call meets it first
            send_error.append(exc)
    t = threading.Thread(target=send, daemon=True)
    t.start()
    digest, got = hashlib.sha256(), 0
    while True:
        chunk = sock.recv(262144)
        if not chunk:
            break
        digest.update(chunk)
        got += len(chunk)
    t.join(60)
    ending = type(send_error[0]).__name__ if send_error else "eof"
    out.update(ending=ending, received=got, recv_sha=digest.hexdigest())
except OSError as exc:
    out.update(ending=type(exc).__name__, error=str(exc), received=locals().get("got", 0))
out["seconds"] = time.monotonic() - start
print(json.dumps(out))
"""


@dataclass
class Transfer:
    """One client connection through the tunnel and what came back."""

    sent: int
    received: int
    ending: str
    seconds: float
    intact: bool
    path: str = "unknown"
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return (self.sent + self.received) / 1e6 / self.seconds if self.seconds else 0.0


class PeerupWorld:
    """Relay on the public segment; serving node in ``server``; proxy in ``client``; all real processes."""

    def __init__(
        self,
        lab: NetLab,
        root: Path,
        server: Place,
        client: Place,
        *,
        server_config: str = "",
        client_config: str = "",
        relay_config: str = "",
        upnp: bool = False,
        verbose: bool = True,
    ) -> None:
        self.lab = lab
        self.root = root
        self.relay_host = lab.public_host("relay")
        self.server_host = self._place(lab, "srv", server, upnp)
        self.client_host = self._place(lab, "cli", client, False)
        self.homes = {name: root / name for name in ("relay", "server", "client")}
        self.configs = {"relay": relay_config, "server": server_config, "client": client_config}
        self.verbose = verbose
        self.procs: list[CliProc] = []
        self.relay_addr = ""
        self.server_id = ""
        self.client_id = ""
        self.relay: CliProc | None = None
        self.server: CliProc | None = None
        self.proxy: CliProc | None = None

    @staticmethod
    def _place(lab: NetLab, name: str, place: Place, upnp: bool) -> Host:
        if place == "public":
            return lab.public_host(name)
        return lab.home(name, nat=place, upnp=upnp).host

    def _args(self, home: str) -> list[str]:
        return ["--home", str(self.homes[home]), *(["-v"] if self.verbose else [])]

    def start(self, timeout: float = 30.0) -> PeerupWorld:
        for name, home in self.homes.items():
            init_home(home)
            if self.configs[name]:
                (home / "config.toml").write_text(self.configs[name])
        self.client_id = peerup_run(["--home", str(self.homes["client"]), "whoami"]).stdout.strip()
        added = peerup_run(["--home", str(self.homes["server"]), "auth", "add", self.client_id])
        assert added.returncode == 0, added.stderr
        self.server_host.tool("echo", "--port", str(SERVICE_PORT), ready="ready")
        self.relay = self._start(
            "relay", [*self._args("relay"), "relay", "serve", "--listen", f"/ip4/0.0.0.0/tcp/{RELAY_PORT}"],
            self.relay_host,
        )  # fmt: skip
        relay_id = self.relay.wait_for(r"/p2p/(\S+)", timeout).group(1)
        self.relay_addr = f"/ip4/{self.relay_host.ip}/tcp/{RELAY_PORT}/p2p/{relay_id}"
        self.server = self._start(
            "server",
            [*self._args("server"), "serve", "--service", f"echo=127.0.0.1:{SERVICE_PORT}", "--relay", self.relay_addr],
            self.server_host,
        )
        self.server_id = self.server.wait_for(r"^peer (\S+)", timeout).group(1)
        self.server.wait_for(r"reachable at \S+p2p-circuit", timeout)
        self.proxy = self._start(
            "proxy",
            [*self._args("client"), "proxy", self.server_id, "echo", str(PROXY_PORT), "--relay", self.relay_addr],
            self.client_host,
        )
        self.proxy.wait_for(r"forwarding 127\.0\.0\.1:\d+", timeout)
        return self

    def fresh_client(self, timeout: float = 30.0) -> None:
        """Replace the proxy with a new one under a new identity (a "fresh try" for benchmarks).

        The new identity is authorized on the running server, which picks up
        authorized_keys changes within about 2 s; the wait is bounded here.
        """
        assert self.proxy is not None
        self.proxy.stop()
        home = self.root / f"client{len(self.procs)}"
        init_home(home)
        client_id = peerup_run(["--home", str(home), "whoami"]).stdout.strip()
        added = peerup_run(["--home", str(self.homes["server"]), "auth", "add", client_id])
        assert added.returncode == 0, added.stderr
        self.homes["client"] = home
        self.client_id = client_id
        time.sleep(2.5)  # the server re-reads authorized_keys every 2 s
        self.proxy = self._start(
            "proxy",
            [*self._args("client"), "proxy", self.server_id, "echo", str(PROXY_PORT), "--relay", self.relay_addr],
            self.client_host,
        )
        self.proxy.wait_for(r"forwarding 127\.0\.0\.1:\d+", timeout)

    def _start(self, name: str, args: list[str], host: Host) -> CliProc:
        proc = CliProc(f"{name} @{host.name}", args, host.prefix)
        self.procs.append(proc)
        return proc

    def transfer(self, size: int, timeout: float = 90.0) -> Transfer:
        """One new connection through the proxy moving ``size`` bytes each way (echo)."""
        assert self.proxy is not None
        before = len(self.proxy.errors)
        result = self.client_host.python(_CLIENT_APP, str(PROXY_PORT), str(size), timeout=timeout)
        if result.returncode != 0 or not result.stdout.strip():
            raise AssertionError(f"client app failed: {result.stderr[-2000:]}")
        raw = json.loads(result.stdout.strip().splitlines()[-1])
        intact = raw.get("ending") == "eof" and raw.get("recv_sha") == raw["sent_sha"] and raw["received"] == size
        path = self._path_after(before)
        return Transfer(raw["sent"], raw.get("received", 0), raw.get("ending", "?"), raw["seconds"], intact, path, raw)

    def _path_after(self, index: int, wait: float = 2.0) -> str:
        assert self.proxy is not None
        regex = re.compile(r"connection from \S+ -> echo on \S+: (\w+) path")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            for line in self.proxy.errors[index:]:
                match = regex.search(line)
                if match:
                    return match.group(1)
            time.sleep(0.02)
        return "unknown"

    def wait_for_path(self, want: str, timeout: float, size: int = 1024) -> float | None:
        """Small transfers until one takes path ``want``; seconds from the first, or None."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.transfer(size).path == want:
                return time.monotonic() - started
            time.sleep(0.2)
        return None

    def ping(self, count: int = 4, interval: float = 0.3) -> str:
        """``peerup ping`` from a third identity next to the client; returns its stdout."""
        home = self.root / f"pinger{len(self.procs)}"
        init_home(home)
        result = peerup_run(
            ["--home", str(home), "ping", self.server_id, "-c", str(count), "--interval", str(interval),
             "--relay", self.relay_addr],
            self.client_host.prefix, timeout=90,
        )  # fmt: skip
        return str(result.stdout) + str(result.stderr)

    def logs(self) -> str:
        return "\n".join(f"-- {p.name} (exit {p.popen.poll()}):\n" + "\n".join(p.errors[-40:]) for p in self.procs)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


__all__ = ["PeerupWorld", "Place", "Transfer"]
