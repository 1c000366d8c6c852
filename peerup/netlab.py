"""A small, disposable internet in Linux network namespaces, for NAT traversal tests and benchmarks.

Why it exists: hole punching, UPnP/NAT-PMP port mapping and the fallback to a relay
only mean something against real NAT behaviour: the kernel's conntrack and
MASQUERADE, silent drops rather than refusals, ports that are or are not preserved.
Loopback tests cannot show any of it. This module builds that world from
``ip netns``, veth pairs, a bridge and iptables, as root, in well under a second,
and takes it down again without leaving anything behind.

Topology (one :class:`NetLab`)::

    netns <lab>-inet: bridge br0 = "the internet", PUBLIC_NET (11.0.0.0/24), no default route
      ├── public hosts   eth0 11.0.0.101, .102 ...   (no NAT: reachable by anyone)
      └── home routers   wan  11.0.0.11, .12 ...     (each in its own netns)
              lan (a bridge) 192.168.<i>.1/24
                └── hosts  eth0 192.168.<i>.2, .3 ...  default route via 192.168.<i>.1

Every address "on the internet" is on-link, as if all of it were one switch; a
destination outside PUBLIC_NET (say, another home's 192.168.x.y) has no route and
fails at once with "Network is unreachable", the way the internet does not carry
RFC 1918 addresses. The root namespace is never touched: no interface, route,
sysctl or firewall rule of the machine changes, and the lab cannot reach, or be
reached from, the real network.

Routers (see :func:`router_rules`): ``ip_forward=1``; ``MASQUERADE`` out of ``wan``;
FORWARD allows established/related, LAN to WAN and port-forwarded (DNAT) flows and
drops the rest; INPUT drops every new inbound packet on ``wan``, as home routers
do. That last rule decides whether TCP hole punching works. Without it, the first
punch SYN to arrive at the far router, before that side's own SYN has left, is
answered by the router's kernel with a RST; the sender's ``connect()`` fails with
ECONNREFUSED and, since "the only reply is a RST", conntrack on the sender's
router deletes the entry at once (nf_conntrack_proto_tcp.c), so the hole the
peer's SYN needed is gone too. Punches then succeed only when both SYNs happen to
be in flight together: 3 of 10 here, against 100 of 100 with the rule.

NAT kinds:

``cone``
    plain ``MASQUERADE``. Linux keeps the source port whenever the resulting tuple
    is free, so in practice a flow's public port equals its private port, whatever
    the destination: endpoint-independent *mapping*. Filtering is still
    address-and-port dependent (conntrack lets in only replies to a known tuple),
    i.e. a "port-restricted cone" with port preservation: the common Linux home
    router. TCP simultaneous open works through two of them.
``symmetric``
    ``MASQUERADE --random-fully``: a new random public port for every new flow, so
    the port a rendezvous server observes is not the one a peer would need to hit.

Optional miniupnpd in a router speaks UPnP IGD and NAT-PMP/PCP on the LAN side
(:class:`MiniUpnpd`). Debian 12's ``miniupnpd`` package installs the **nftables**
build (``miniupnpd-nftables``; ``miniupnpd-iptables`` is the alternative, and the
two conflict); both work here: the lab prepares the table and chains the running
build expects, and its own FORWARD chain accepts any DNAT-ed flow so the port
forwards pass whichever netfilter front end miniupnpd writes to. miniupnpd 2.3.1
(Debian 12) refuses to forward anything when the WAN address is in a reserved
range: private, CGNAT, TEST-NET and 198.18.0.0/15 included (``addr_is_reserved``
in getifaddr.c; NAT-PMP answers "network failure" and external address 0.0.0.0).
py-libp2p's UPnP manager likewise rejects an external address that Python's
``ipaddress`` calls private, which 198.18/15 is. Hence PUBLIC_NET defaults to a
globally routable looking prefix, 11.0.0.0/24: harmless, as nothing in the lab can
reach the real network.

Tools to run inside namespaces (stdlib only, so they start fast):
``python -m peerup.netlab echo|probe|observe|rendezvous|punch|session|natpmp|upnp``;
each prints JSON. See :func:`main`.

Pitfalls met while building it (each handled here):

- ``br_netfilter`` (built in here) makes bridged frames traverse iptables with
  ``bridge-nf-call-iptables=1`` by default, in every namespace: traffic between two
  hosts on a home's LAN bridge would hit the router's FORWARD DROP, and the
  "internet" bridge would run conntrack on every frame. Set to 0 in each namespace.
- A new namespace starts with the kernel's built-in sysctls (``rp_filter=0``,
  ``ip_forward=0``) unless ``net.core.devconf_inherit_init_net`` says to copy the
  host's; the lab sets what it relies on explicitly.
- ``iptables`` is ``iptables-nft`` on Debian 12 while miniupnpd's iptables build
  links libiptc, which only speaks the legacy interface: its chains must be made
  with ``iptables-legacy``. Legacy iptables also takes a machine-wide lock
  (``/run/xtables.lock``) shared by all namespaces: always pass ``-w``.
- Conntrack is loaded on first use in each namespace (module autoload on modular
  kernels; built in on this one); ``conntrack -F`` needs the conntrack tool.
- ``nf_conntrack_tcp_loose=1`` (default) lets a router pick up a flow mid-stream
  after ``conntrack -F``: a cone router re-maps it to the same port and the TCP
  connection survives a flush; a symmetric one picks a new port and the peer
  answers RST. Use :meth:`Router.cut` for a silent outage.
- IPv6 is disabled in the lab so that no link-local path bypasses the NATs.
- ARP: the first packet to a neighbour on the bridge waits for one ARP exchange;
  the bridges have STP off and forward_delay 0, so ports forward the moment they
  are up (with STP on, a new port spends 2 x 15 s listening and learning).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import hashlib
import importlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar, Literal

NatKind = Literal["cone", "symmetric"]
NAT_KINDS: tuple[NatKind, ...] = ("cone", "symmetric")

#: The public segment. Not 198.18.0.0/15 on purpose: see the module docstring.
PUBLIC_NET = "11.0.0.0/24"
#: Namespace names are ``netlab-<pid>-<tag>-<node>``: the pid lets :func:`sweep_stale`
#: remove what a killed run left behind without touching a live run's namespaces.
NS_PREFIX = "netlab"
_NS_RE = re.compile(rf"^{NS_PREFIX}-(\d+)-([0-9a-f]{{4}})-")
_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
NATPMP_PORT = 5351
TOOL = [sys.executable, "-m", "peerup.netlab"]


class NetLabUnavailable(RuntimeError):
    """This machine cannot build the lab (not root, no ``ip``, no namespaces...); tests skip with the message."""


class NetLabError(RuntimeError):
    """A lab command failed; the message has the command, its exit status and stderr."""


# -- running commands --------------------------------------------------------------------


def _run(
    args: Sequence[str], *, input: str | None = None, timeout: float = 30.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(list(args), input=input, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise NetLabUnavailable(f"`{args[0]}` is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetLabError(f"{' '.join(args)}: no answer within {timeout:g} s") from exc
    if check and result.returncode != 0:
        raise NetLabError(f"{' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def _ip_batch(commands: Sequence[str], netns: str | None = None) -> None:
    """Many ``ip`` commands in one process (``ip -batch``): building a home costs a few forks, not dozens."""
    _run(["ip", *(["-n", netns] if netns else []), "-batch", "-"], input="".join(f"{c}\n" for c in commands))


def unavailable_reason() -> str | None:
    """Why the lab cannot run here, or None. Cheap: checks the platform, root and the tools, creates nothing."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "the network lab needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN for `ip netns`)"
    for tool, package in (("ip", "iproute2"), ("iptables-restore", "iptables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed: apt-get install -y {package}"
    return None


def netns_list() -> list[str]:
    """Names of the named network namespaces (``ip netns list``, whose lines may end in ``(id: N)``)."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(netns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(pid) for pid in out.split() if pid.isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespaces(names: Sequence[str]) -> list[str]:
    """Kill what still runs inside ``names`` (processes the lab started there), delete them; return survivors.

    A process inside a namespace keeps it alive after ``ip netns del`` (only the
    name goes), with its veths, so processes go first.
    """
    if not names:
        return []
    for name in names:
        for pid in _netns_pids(name):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    _run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {n}\n" for n in names), check=False)
    left = set(netns_list())
    return [n for n in names if n in left]


def sweep_stale() -> list[str]:
    """Delete lab namespaces (and temporary directories) whose creating process is gone; return the namespaces.

    That is what a run killed with SIGKILL, or by a SIGTERM with Python's default
    handler, leaves: neither ``with`` nor :mod:`atexit` cleanup runs then.

    Only names of the form ``netlab-<pid>-<tag>-...`` whose ``pid`` is not alive are
    touched: another live lab on the same machine is left alone.
    """

    def dead(name: str) -> bool:
        match = _NS_RE.match(name)
        if match is None:
            return False
        pid = int(match.group(1))
        return pid != os.getpid() and not _pid_alive(pid)

    stale = [name for name in netns_list() if dead(name)]
    _delete_namespaces(stale)
    for workdir in Path(tempfile.gettempdir()).glob(f"{NS_PREFIX}-*"):
        if workdir.is_dir() and dead(workdir.name):
            shutil.rmtree(workdir, ignore_errors=True)  # the temporary directory of that run (configs, leases)
    return stale


def _backend_of(binary: str) -> str:
    """``nf_tables`` or ``legacy`` for an iptables binary; ``nftables`` or ``iptables`` for miniupnpd."""
    out = _run([binary, "--version"], check=False)
    text = out.stdout + out.stderr
    for word in ("nf_tables", "legacy", "nftables", "iptables"):
        if word in text:
            return word
    return "unknown"


# -- processes inside namespaces ------------------------------------------------------


class Process:
    """A process started in a namespace; its stdout and stderr lines are collected as they arrive.

    Threads read both pipes so the child never blocks on a full pipe and the test can
    wait, bounded, for a line (:meth:`wait_for`) or talk line by line (:meth:`ask`).
    """

    def __init__(self, name: str, popen: subprocess.Popen[str]) -> None:
        self.name = name
        self.popen = popen
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._readers = [
            threading.Thread(target=self._collect, args=(stream, sink), daemon=True)
            for stream, sink in ((popen.stdout, self.lines), (popen.stderr, self.errors))
            if stream is not None
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _collect(stream: IO[str], sink: list[str]) -> None:
        with contextlib.suppress(ValueError, OSError), stream:
            for line in stream:
                sink.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 10.0, stderr: bool = False) -> re.Match[str]:
        """The first line matching ``pattern``; AssertionError with the output after ``timeout`` or an exit."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.errors if stderr else self.lines):
                match = regex.search(line)
                if match:
                    return match
            if self.popen.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        raise AssertionError(
            f"{self.name}: no line /{pattern}/ within {timeout:g} s (exit {self.popen.poll()})\n"
            f"stdout: {self.lines[-10:]}\nstderr: {self.errors[-20:]}"
        )

    def ask(self, line: str, timeout: float = 10.0) -> str:
        """Write ``line`` to stdin and return the next stdout line (for request/response tools like ``session``)."""
        assert self.popen.stdin is not None, f"{self.name} was started without stdin=PIPE"
        index = len(self.lines)
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()
        deadline = time.monotonic() + timeout
        while len(self.lines) <= index:
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no answer to {line!r} within {timeout:g} s: {self.errors[-10:]}")
            time.sleep(0.005)
        return self.lines[index]

    def json(self, timeout: float = 30.0) -> Any:
        """Wait for the process to exit and return the JSON of its last stdout line."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{self.name} still running after {timeout:g} s: {self.errors[-10:]}") from exc
        for reader in self._readers:
            reader.join(5)
        if not self.lines:
            raise AssertionError(f"{self.name} printed nothing (exit {self.popen.returncode}): {self.errors[-10:]}")
        return json.loads(self.lines[-1])

    def stop(self, grace: float = 3.0) -> int:
        """SIGTERM to the process group, SIGKILL after ``grace`` seconds; close the pipes."""
        _stop_popen(self.popen, grace)
        for reader in self._readers:
            reader.join(2)
        return self.popen.returncode


def _stop_popen(popen: subprocess.Popen[Any], grace: float = 3.0) -> None:
    _stop_all([popen], grace)


def _stop_all(popens: Sequence[subprocess.Popen[Any]], grace: float) -> None:
    """SIGTERM every process group at once, SIGKILL what is left after ``grace`` seconds, reap, close pipes.

    Each was started with start_new_session=True, so its pid is also its process
    group: children it forked (a shell's, say) get the signal too.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        running = [p for p in popens if p.poll() is None]
        for popen in running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, sig)
        deadline = time.monotonic() + wait
        for popen in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(max(0.0, deadline - time.monotonic()))
    for popen in popens:
        for stream in (popen.stdin, popen.stdout, popen.stderr):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()


# -- nodes -------------------------------------------------------------------------------


class Node:
    """One network namespace of the lab: a public host, a home router or a host behind one."""

    def __init__(self, lab: NetLab, name: str, ip: str) -> None:
        self.lab = lab
        self.name = name
        self.netns = f"{lab.prefix}-{name}"
        #: This node's own interface address (for a NATed host, its LAN address).
        self.ip = ip

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.ip} netns={self.netns}>"

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a program in this namespace."""
        return ["ip", "netns", "exec", self.netns]

    def run(
        self, args: Sequence[str], *, input: str | None = None, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` to completion in this namespace (bounded by ``timeout``)."""
        return _run([*self.prefix, *args], input=input, timeout=timeout, check=check)

    def python(self, code: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """``python -c code args...`` in this namespace; never raises on a non-zero exit (look at returncode)."""
        return self.run([sys.executable, "-c", code, *args], timeout=timeout, check=False)

    def popen(
        self, args: Sequence[str], *, stdin: int | None = subprocess.DEVNULL, **kwargs: Any
    ) -> subprocess.Popen[str]:
        """A raw :class:`subprocess.Popen` in this namespace (text mode, pipes for stdout and stderr by default).

        The lab kills it, and everything else left inside its namespaces, on exit.
        """
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        popen: subprocess.Popen[str] = subprocess.Popen(
            [*self.prefix, *args], stdin=stdin, text=True, start_new_session=True, **kwargs
        )
        self.lab._popens.append(popen)
        return popen

    def spawn(
        self, args: Sequence[str], *, ready: str | None = None, timeout: float = 10.0, stdin: bool = False
    ) -> Process:
        """Start ``args`` here as a :class:`Process`; with ``ready``, wait for a stdout line matching it."""
        proc = Process(
            f"{' '.join(args[:4])} @{self.name}",
            self.popen(args, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, bufsize=1),
        )
        if ready is not None:
            proc.wait_for(ready, timeout)
        return proc

    def tool(self, *args: str, ready: str | None = None, stdin: bool = False, timeout: float = 10.0) -> Process:
        """Start one of this module's tools here: ``python -m peerup.netlab <args>`` (see :func:`main`)."""
        return self.spawn([*TOOL, *args], ready=ready, stdin=stdin, timeout=timeout)

    def tool_json(self, *args: str, timeout: float = 30.0) -> Any:
        """Run a tool here to completion and return its JSON result."""
        return self.tool(*args).json(timeout)

    def pids(self) -> list[int]:
        """Processes currently inside this namespace."""
        return _netns_pids(self.netns)


class Host(Node):
    """An end host: public (``home`` is None) or on a home's LAN (default route via its router)."""

    def __init__(self, lab: NetLab, name: str, ip: str, home: Home | None = None, gateway: str | None = None) -> None:
        super().__init__(lab, name, ip)
        self.home = home
        self.gateway = gateway

    @property
    def public_ip(self) -> str:
        """The source address the internet sees for this host: its own, or its router's WAN address."""
        return self.home.public_ip if self.home is not None else self.ip


class Router(Node):
    """A home's NAT router: ``wan`` on the public bridge, ``lan`` a bridge for the home's hosts."""

    def __init__(self, lab: NetLab, name: str, wan_ip: str, lan_net: ipaddress.IPv4Network, nat: NatKind) -> None:
        super().__init__(lab, name, wan_ip)
        self.wan_ip = wan_ip
        self.lan_net = lan_net
        self.lan_ip = str(lan_net[1])
        self.nat: NatKind = nat
        self._cut = False

    def iptables(self, *args: str) -> str:
        """``iptables -w ARGS`` in this router's namespace; returns stdout."""
        return self.run(["iptables", "-w", *args]).stdout

    def set_nat(self, nat: NatKind) -> None:
        """Switch the NAT kind for *new* flows (replaces the MASQUERADE rule; existing conntrack entries keep
        their mapping until :meth:`flush_conntrack`)."""
        if nat not in NAT_KINDS:
            raise ValueError(f"nat must be one of {NAT_KINDS}, not {nat!r}")
        self.iptables("-t", "nat", "-R", "POSTROUTING", "1", *_masquerade(nat))
        self.nat = nat

    def _conntrack(self, *args: str) -> subprocess.CompletedProcess[str]:
        if shutil.which("conntrack") is None:
            raise NetLabUnavailable("`conntrack` is not installed: apt-get install -y conntrack")
        return self.run(["conntrack", *args], check=False)

    def flush_conntrack(self) -> None:
        """``conntrack -F``: the router forgets every mapping, like a NAT reboot or a conntrack timeout.

        What survives depends on the NAT kind (module docstring, ``nf_conntrack_tcp_loose``).
        """
        result = self._conntrack("-F")
        if result.returncode != 0:
            raise NetLabError(f"conntrack -F in {self.name}: {result.stderr.strip()}")

    def conntrack_entries(self) -> list[str]:
        """The router's conntrack table, one ``conntrack -L`` line per flow."""
        return [line for line in self._conntrack("-L").stdout.splitlines() if line.strip()]

    _CUT_RULES = ("INPUT 1 -i wan -j DROP", "FORWARD 1 -j DROP", "OUTPUT 1 -o wan -j DROP")

    def cut(self) -> None:
        """Pull the WAN cable, silently: every packet through ``wan`` is dropped, nothing sends RST or ICMP.

        Conntrack entries stay, so :meth:`restore` brings live connections back
        (TCP retransmits) as long as the outage was short.
        """
        if not self._cut:
            rules = "".join(f"-I {rule}\n" for rule in self._CUT_RULES)
            self.run(["iptables-restore", "-w", "--noflush"], input=f"*filter\n{rules}COMMIT\n")
            self._cut = True

    def restore(self) -> None:
        """Undo :meth:`cut`."""
        if self._cut:
            for rule in self._CUT_RULES:
                chain, _, spec = rule.split(" ", 2)
                self.iptables("-D", chain, *spec.split())
            self._cut = False


def _masquerade(nat: NatKind) -> list[str]:
    return ["-o", "wan", "-j", "MASQUERADE", *(["--random-fully"] if nat == "symmetric" else [])]


def router_rules(nat: NatKind) -> str:
    """The router's ruleset, for ``iptables-restore``.

    FORWARD accepts ``--ctstate DNAT`` from wan so port forwards made by miniupnpd
    pass whichever netfilter front end (iptables-legacy, nftables) it writes to.
    INPUT drops new inbound on wan: see the module docstring for why punching needs it.
    """
    return "\n".join(
        [
            "*nat",
            ":PREROUTING ACCEPT [0:0]",
            ":INPUT ACCEPT [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            ":POSTROUTING ACCEPT [0:0]",
            f"-A POSTROUTING {' '.join(_masquerade(nat))}",
            "COMMIT",
            "*filter",
            ":INPUT ACCEPT [0:0]",
            ":FORWARD DROP [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            "-A INPUT -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            "-A INPUT -i wan -j DROP",
            "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            "-A FORWARD -i lan -o wan -j ACCEPT",
            "-A FORWARD -i wan -o lan -m conntrack --ctstate DNAT -j ACCEPT",
            "COMMIT",
            "",
        ]
    )


class MiniUpnpd:
    """miniupnpd in a router: UPnP IGD and NAT-PMP/PCP on ``lan``, port forwards on ``wan``.

    Config and lease file live in the lab's temporary directory; the pid file too
    (a second instance would otherwise refuse to start, seeing /var/run/miniupnpd.pid).
    Runs in the foreground (``-d``), which also makes it log to stderr: :attr:`log`.
    """

    #: One inet table for both the filter and the nat chains (as Debian's nft_init.sh builds it).
    NFT_TABLE = "netlab_upnp"

    def __init__(self, home: Home) -> None:
        self.home = home
        router = home.router
        binary = shutil.which("miniupnpd")
        if binary is None:
            raise NetLabUnavailable("`miniupnpd` is not installed: apt-get install -y miniupnpd")
        self.backend = _backend_of(binary)
        workdir = home.lab.workdir / home.name
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "miniupnpd.conf"
        lines = [
            "ext_ifname=wan",
            "listening_ip=lan",
            "http_port=0",
            "enable_natpmp=yes",
            "enable_upnp=yes",
            "secure_mode=yes",
            "system_uptime=yes",
            f"uuid={uuid.uuid4()}",
            f"lease_file={workdir / 'leases'}",
            f"allow 1024-65535 {router.lan_net} 1024-65535",
            "deny 0-65535 0.0.0.0/0 0-65535",
        ]
        if self.backend == "nftables":
            if shutil.which("nft") is None:
                raise NetLabUnavailable("miniupnpd's nftables build needs `nft`: apt-get install -y nftables")
            lines += [f"upnp_table_name={self.NFT_TABLE}", f"upnp_nat_table_name={self.NFT_TABLE}"]
            router.run(["nft", "-f", "-"], input=self._nft_chains())
        elif self.backend == "iptables":
            # libiptc (what miniupnpd-iptables links) only speaks the legacy interface.
            restore = shutil.which("iptables-legacy-restore") or "iptables-restore"
            router.run([restore, "-w", "--noflush"], input=self._legacy_chains())
        else:
            raise NetLabUnavailable(f"cannot tell which netfilter backend {binary} was built for")
        self.conf.write_text("\n".join(lines) + "\n")
        self.process = router.spawn(["miniupnpd", "-f", str(self.conf), "-d", "-P", str(workdir / "miniupnpd.pid")])
        try:
            self.process.wait_for(r"Listening for NAT-PMP", timeout=10, stderr=True)
            self.process.wait_for(r"HTTP listening on port", timeout=10, stderr=True)
        except AssertionError as exc:
            raise NetLabError(f"miniupnpd did not start in {router.name}: {exc}") from exc

    @property
    def log(self) -> list[str]:
        return self.process.errors

    def _nft_chains(self) -> str:
        t = self.NFT_TABLE
        return (
            f"table inet {t} {{\n"
            "  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }\n"
            "  chain miniupnpd { }\n"
            "  chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }\n"
            "  chain postrouting { type nat hook postrouting priority 100; policy accept;"
            " jump postrouting_miniupnpd; }\n"
            "  chain prerouting_miniupnpd { }\n"
            "  chain postrouting_miniupnpd { }\n"
            "}\n"
        )

    @staticmethod
    def _legacy_chains() -> str:
        return (
            "*nat\n:MINIUPNPD - [0:0]\n:MINIUPNPD-POSTROUTING - [0:0]\n"
            "-A PREROUTING -i wan -j MINIUPNPD\n-A POSTROUTING -o wan -j MINIUPNPD-POSTROUTING\nCOMMIT\n"
            "*filter\n:MINIUPNPD - [0:0]\n-A FORWARD -i wan ! -o wan -j MINIUPNPD\nCOMMIT\n"
        )

    def forwards(self) -> str:
        """The port forwards miniupnpd has installed, as its backend lists them (for diagnostics)."""
        router = self.home.router
        if self.backend == "nftables":
            return router.run(["nft", "list", "chain", "inet", self.NFT_TABLE, "prerouting_miniupnpd"]).stdout
        legacy = shutil.which("iptables-legacy") or "iptables"
        return router.run([legacy, "-w", "-t", "nat", "-S", "MINIUPNPD"]).stdout


class Home:
    """A home: a NAT router and the hosts behind it."""

    def __init__(self, lab: NetLab, name: str, router: Router) -> None:
        self.lab = lab
        self.name = name
        self.router = router
        self.hosts: list[Host] = []
        self.upnp: MiniUpnpd | None = None

    def __repr__(self) -> str:
        return f"<Home {self.name} {self.nat} {self.public_ip} lan={self.router.lan_net} hosts={len(self.hosts)}>"

    @property
    def host(self) -> Host:
        """The first host behind the router."""
        return self.hosts[0]

    @property
    def nat(self) -> NatKind:
        return self.router.nat

    @property
    def public_ip(self) -> str:
        return self.router.wan_ip


# -- the lab -----------------------------------------------------------------------------


class NetLab:
    """A disposable small internet. Use as a context manager; everything is gone after the ``with`` block.

    >>> with NetLab() as lab:                                       # doctest: +SKIP
    ...     relay = lab.public_host("relay")
    ...     a = lab.home("a", nat="cone", upnp=True)
    ...     b = lab.home("b", nat="symmetric")
    ...     relay.tool("echo", "--port", "7000", ready="^ready")
    ...     a.host.tool_json("probe", "--to", f"{lab.addr_of(relay)}:7000")
    [{'target': '11.0.0.101:7000', 'ok': True, 'seconds': 0.003}]
    """

    def __init__(self, public_net: str = PUBLIC_NET, *, workdir: Path | None = None) -> None:
        self.tag = secrets.token_hex(2)
        self.prefix = f"{NS_PREFIX}-{os.getpid()}-{self.tag}"
        self.public_net = ipaddress.IPv4Network(public_net)
        if self.public_net.prefixlen > 24:
            raise ValueError("public_net needs room for routers (.11+) and public hosts (.101+): use a /24 or larger")
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.gettempdir())
        self.nodes: dict[str, Node] = {}
        self.homes: dict[str, Home] = {}
        self.namespaces: list[str] = []
        self._popens: list[subprocess.Popen[Any]] = []
        self._next_router, self._next_public = 11, 101
        self._inet = f"{self.prefix}-inet"
        self._started = self._closed = False
        self._iptables_checked = False
        #: Seconds: "start" (the internet), "home:<name>", "public:<name>", "close".
        self.timings: dict[str, float] = {}
        self.iptables_backend = ""

    # lifecycle

    def __enter__(self) -> NetLab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(raise_errors=exc_info[0] is None)

    def start(self) -> None:
        """Check the machine, sweep stale labs, and create the internet (a namespace with the bridge)."""
        reason = unavailable_reason()
        if reason:
            raise NetLabUnavailable(reason)
        started = time.monotonic()
        sweep_stale()
        if self._own_workdir:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        atexit.register(self.close)
        self._started = True
        self.namespaces.append(self._inet)
        try:
            _run(["ip", "netns", "add", self._inet])
        except NetLabError as exc:
            raise NetLabUnavailable(f"cannot create network namespaces here: {exc}") from exc
        try:
            _ip_batch(["link set lo up", "link add br0 type bridge stp_state 0 forward_delay 0", "link set br0 up"],
                      self._inet)  # fmt: skip
        except NetLabError as exc:
            raise NetLabUnavailable(f"cannot create a bridge in a namespace here: {exc}") from exc
        self._sysctl(
            self._inet, {"net/bridge/bridge-nf-call-iptables": "0", "net/bridge/bridge-nf-call-arptables": "0"}
        )
        self.iptables_backend = _backend_of("iptables")
        self.timings["start"] = time.monotonic() - started

    def close(self, raise_errors: bool = False) -> None:
        """Stop every process the lab started, delete every namespace, remove the temporary directory.

        Idempotent; also registered with :mod:`atexit`, and :func:`sweep_stale` covers
        a run that was killed before getting here.
        """
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        started = time.monotonic()
        atexit.unregister(self.close)
        _stop_all(self._popens, grace=2.0)
        left = _delete_namespaces(self.namespaces)
        if left:
            left = _delete_namespaces(left)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.timings["close"] = time.monotonic() - started
        if left and raise_errors:
            raise NetLabError(f"could not delete network namespaces {left}")

    # building

    def _check_name(self, name: str) -> None:
        if not self._started or self._closed:
            raise NetLabError("use the lab inside its `with` block")
        if not _NAME_RE.match(name):
            raise ValueError(f"lab names are 1-12 lowercase letters/digits, starting with a letter: {name!r}")
        if name in self.homes or name in self.nodes:
            raise ValueError(f"{name!r} already exists in this lab")

    def _public_address(self, number: int) -> str:
        address = self.public_net.network_address + number
        if address not in self.public_net or address == self.public_net.broadcast_address:
            raise NetLabError(f"no address left in {self.public_net}")
        return str(address)

    @staticmethod
    def _sysctl(netns: str, values: dict[str, str]) -> None:
        """Write /proc/sys values inside ``netns`` in one shell (no dependency on procps' ``sysctl``).

        Keys missing in this kernel (say, net/bridge without br_netfilter) are skipped.
        """
        script = "".join(f"if [ -e /proc/sys/{k} ]; then echo {v} > /proc/sys/{k}; fi\n" for k, v in values.items())
        _run(["ip", "netns", "exec", netns, "sh", "-ec", script])

    _NO_IPV6: ClassVar[dict[str, str]] = {
        "net/ipv6/conf/all/disable_ipv6": "1",
        "net/ipv6/conf/default/disable_ipv6": "1",
    }

    def _attach(self, node: Node, ifname: str, address: str, extra: Sequence[str] = ()) -> None:
        """Create ``node``'s namespace with a veth ``ifname`` plugged into the internet bridge."""
        port = f"port{len(self.namespaces)}"  # unique in the internet namespace, within IFNAMSIZ
        self.namespaces.append(node.netns)
        _ip_batch([f"netns add {node.netns}",
                   f"link add {port} netns {self._inet} type veth peer name {ifname} netns {node.netns}"])  # fmt: skip
        _ip_batch([f"link set {port} master br0", f"link set {port} up"], self._inet)
        _ip_batch(
            ["link set lo up", f"link set {ifname} up", f"addr add {address}/{self.public_net.prefixlen} dev {ifname}",
             *extra],
            node.netns,
        )  # fmt: skip

    def public_host(self, name: str) -> Host:
        """A host directly on the internet, no NAT (a relay, a rendezvous server, a "VPS")."""
        self._check_name(name)
        started = time.monotonic()
        host = Host(self, name, self._public_address(self._next_public))
        self._next_public += 1
        self.nodes[name] = host
        self._attach(host, "eth0", host.ip)
        self._sysctl(host.netns, self._NO_IPV6)
        self.timings[f"public:{name}"] = time.monotonic() - started
        return host

    def home(
        self, name: str, nat: NatKind = "cone", *, upnp: bool = False, hosts: int = 1, lan: str | None = None
    ) -> Home:
        """A home: a NAT router of kind ``nat`` with ``hosts`` hosts behind it, optionally running miniupnpd.

        The LAN is 192.168.<n>.0/24 for the n-th home unless ``lan`` says otherwise
        (two homes may share a LAN prefix, as real ones do).
        """
        self._check_name(name)
        if nat not in NAT_KINDS:
            raise ValueError(f"nat must be one of {NAT_KINDS}, not {nat!r}")
        if not 1 <= hosts <= 50:
            raise ValueError("hosts: 1 to 50")
        started = time.monotonic()
        index = len(self.homes) + 1
        lan_net = ipaddress.IPv4Network(lan or f"192.168.{index}.0/24")
        if lan is None and index > 254:
            raise NetLabError("more than 254 homes need explicit lan= prefixes")
        router = Router(self, f"{name}-router", self._public_address(self._next_router), lan_net, nat)
        self._next_router += 1
        home = Home(self, name, router)
        self.homes[name] = home
        self.nodes[router.name] = router
        self._attach(router, "wan", router.wan_ip, [
            "link add lan type bridge stp_state 0 forward_delay 0", "link set lan up",
            f"addr add {router.lan_ip}/{lan_net.prefixlen} dev lan",
        ])  # fmt: skip
        for number in range(1, hosts + 1):
            host = Host(self, f"{name}-h{number}", str(lan_net[number + 1]), home, router.lan_ip)
            self.nodes[host.name] = host
            home.hosts.append(host)
            self.namespaces.append(host.netns)
            port = f"lan{number}"
            veth = f"link add {port} netns {router.netns} type veth peer name eth0 netns {host.netns}"
            _ip_batch([f"netns add {host.netns}", veth])
            _ip_batch([f"link set {port} master lan", f"link set {port} up"], router.netns)
            _ip_batch(["link set lo up", "link set eth0 up", f"addr add {host.ip}/{lan_net.prefixlen} dev eth0",
                       f"route add default via {router.lan_ip}"], host.netns)  # fmt: skip
            self._sysctl(host.netns, self._NO_IPV6)
        self._sysctl(router.netns, {
            "net/ipv4/ip_forward": "1", "net/ipv4/conf/all/rp_filter": "0", "net/ipv4/conf/default/rp_filter": "0",
            "net/bridge/bridge-nf-call-iptables": "0", "net/bridge/bridge-nf-call-arptables": "0", **self._NO_IPV6,
        })  # fmt: skip
        try:
            router.run(["iptables-restore", "-w"], input=router_rules(nat))
        except NetLabError as exc:
            if self._iptables_checked:
                raise
            raise NetLabUnavailable(f"iptables (NAT) does not work inside a namespace here: {exc}") from exc
        self._iptables_checked = True
        if upnp:
            home.upnp = MiniUpnpd(home)
        self.timings[f"home:{name}"] = time.monotonic() - started
        return home

    # looking things up

    def addr_of(self, thing: Node | Home) -> str:
        """The address ``thing`` has on the internet: a public host's own, a home's (or its hosts') router WAN."""
        if isinstance(thing, Home):
            return thing.public_ip
        if isinstance(thing, Router):
            return thing.wan_ip
        if isinstance(thing, Host):
            return thing.public_ip
        return thing.ip

    def describe(self) -> str:
        """The topology, one line per node (for logs and failure messages)."""
        lines = [f"internet {self.public_net} (netns {self._inet}, iptables {self.iptables_backend})"]
        for node in self.nodes.values():
            if isinstance(node, Host) and node.home is None:
                lines.append(f"  public {node.name}: {node.ip}")
        for home in self.homes.values():
            upnp = f" miniupnpd({home.upnp.backend})" if home.upnp else ""
            lines.append(
                f"  home {home.name}: router wan {home.public_ip} nat={home.nat} lan={home.router.lan_net}{upnp}"
            )
            lines += [f"    host {host.name}: {host.ip}" for host in home.hosts]
        return "\n".join(lines)


# -- the tools: plain sockets, run inside namespaces with `python -m peerup.netlab ...` ---


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _reusable_socket(port: int = 0) -> socket.socket:
    """A TCP socket bound to ``port`` with SO_REUSEADDR and SO_REUSEPORT: several sockets can share the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("0.0.0.0", port))
    return sock


class _Lines:
    """Line reader over a socket with an overall deadline (``makefile`` cannot take a deadline)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no complete line in time")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed before a complete line")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()


def _emit(result: Any) -> None:
    print(json.dumps(result), flush=True)


def serve_echo(port: int, lifetime: float = 600.0) -> None:
    """TCP echo server on 0.0.0.0:port (a thread per connection) until ``lifetime`` seconds pass."""
    listener = _reusable_socket(port)
    listener.listen(64)
    print(f"ready {listener.getsockname()[1]}", flush=True)

    def handle(conn: socket.socket, _addr: tuple[str, int]) -> None:
        with conn:
            conn.settimeout(60)
            with contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)

    _serve(listener, handle, lifetime)


def _serve(listener: socket.socket, handle: Callable[[socket.socket, Any], None], lifetime: float) -> None:
    """Accept until ``lifetime`` passes, a daemon thread per connection (an orphaned server still ends)."""
    deadline = time.monotonic() + lifetime
    with listener:
        while (remaining := deadline - time.monotonic()) > 0:
            listener.settimeout(min(remaining, 1.0))
            try:
                conn, addr = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(conn, addr), daemon=True).start()


def probe(targets: Sequence[tuple[str, int]], timeout: float = 1.0) -> list[dict[str, Any]]:
    """Try to connect to each target at once (a thread each) and check it echoes; one result per target.

    ``error`` tells the failures apart: "timeout" (silently dropped, as a NAT or
    firewall does), "refused" (RST), "unreachable" (no route: ICMP or none at all).
    """
    results: list[dict[str, Any]] = [{} for _ in targets]

    def one(index: int, target: tuple[str, int]) -> None:
        started = time.monotonic()
        result: dict[str, Any] = {"target": f"{target[0]}:{target[1]}", "ok": False}
        try:
            with socket.create_connection(target, timeout=timeout) as sock:
                sock.sendall(b"probe\n")
                result["ok"] = _Lines(sock).readline(timeout) == "probe"
        except TimeoutError:
            result["error"] = "timeout"
        except ConnectionRefusedError:
            result["error"] = "refused"
        except OSError as exc:
            unreachable = exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)
            result["error"] = "unreachable" if unreachable else f"{type(exc).__name__}: {exc}"
        result["seconds"] = round(time.monotonic() - started, 4)
        results[index] = result

    threads = [threading.Thread(target=one, args=(i, t), daemon=True) for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    return results


def serve_rendezvous(port: int, lifetime: float = 600.0, hold: float = 120.0) -> None:
    """A rendezvous server: tells each client its observed address and pairs clients by session.

    Protocol, one line each: the client sends ``HELLO <session>``; the server answers
    ``OBSERVED <ip> <port>`` at once and, for a session other than ``-``, ``PEER <ip>
    <port>`` to both clients as soon as the second one of the session arrives, so
    the two start punching within a millisecond of each other. The connection is
    then held open (up to ``hold`` seconds) so its NAT mapping stays alive.
    """
    sessions: dict[str, list[tuple[socket.socket, tuple[str, int]]]] = {}
    lock = threading.Lock()
    listener = _reusable_socket(port)
    listener.listen(128)
    print(f"ready {listener.getsockname()[1]}", flush=True)

    def handle(conn: socket.socket, addr: tuple[str, int]) -> None:
        with conn, contextlib.suppress(OSError):
            hello = _Lines(conn).readline(10).split()
            conn.sendall(f"OBSERVED {addr[0]} {addr[1]}\n".encode())
            if len(hello) == 2 and hello[0] == "HELLO" and hello[1] != "-":
                with lock:
                    waiting = sessions.setdefault(hello[1], [])
                    waiting.append((conn, addr))
                    if len(waiting) == 2:
                        (c1, a1), (c2, a2) = sessions.pop(hello[1])
                        for sock, other in ((c1, a2), (c2, a1)):
                            with contextlib.suppress(OSError):
                                sock.sendall(f"PEER {other[0]} {other[1]}\n".encode())
            deadline = time.monotonic() + hold
            while (remaining := deadline - time.monotonic()) > 0:
                conn.settimeout(remaining)
                if not conn.recv(4096):
                    break

    _serve(listener, handle, lifetime)


def observe(servers: Sequence[tuple[str, int]], port: int = 0, timeout: float = 5.0) -> dict[str, Any]:
    """From one local port, ask each rendezvous server which address it sees; return ``{local_port, observed}``.

    All the connections share the local port (SO_REUSEPORT), so a cone NAT shows the
    same public port to every server and a symmetric one a different port to each.
    """
    first = _reusable_socket(port)
    local_port = first.getsockname()[1]
    socks = [first] + [_reusable_socket(local_port) for _ in servers[1:]]
    observed = []
    try:
        for sock, server in zip(socks, servers, strict=True):
            sock.settimeout(timeout)
            sock.connect(server)
            sock.sendall(b"HELLO -\n")
            _, ip, seen_port = _Lines(sock).readline(timeout).split()
            observed.append([ip, int(seen_port)])
    finally:
        for sock in socks:
            sock.close()
    return {"local_port": local_port, "observed": observed}


def punch(
    rendezvous: tuple[str, int],
    session: str,
    *,
    window: float = 5.0,
    attempt_timeout: float = 1.0,
    payload: int = 1 << 20,
    rendezvous_timeout: float = 15.0,
) -> dict[str, Any]:
    """TCP hole punching by simultaneous open, with plain sockets; returns what happened (JSON-able).

    1. Connect to the rendezvous server from an ephemeral port P (SO_REUSEADDR +
       SO_REUSEPORT); learn our observed address, then the peer's.
    2. Keep that connection open (its mapping must live) and, from the same port P,
       ``connect()`` to the peer's observed address; the peer does the same at the
       same moment. The first SYN to leave dies at the far router (INPUT drops it,
       the far side has no mapping yet); the second finds the first one's mapping
       and reaches a socket in SYN-SENT: a simultaneous open. Failed attempts
       (timeout, RST) are retried with a fresh socket on P until ``window`` ends.
    3. Send ``payload`` random bytes both ways at once, half-close, and report the
       SHA-256 of what went out and what came in.
    """
    result: dict[str, Any] = {"ok": False, "session": session, "attempts": 0}
    started = time.monotonic()
    anchor = _reusable_socket()
    local_port = anchor.getsockname()[1]
    result["local_port"] = local_port
    conn: socket.socket | None = None
    try:
        anchor.settimeout(rendezvous_timeout)
        anchor.connect(rendezvous)
        anchor.sendall(f"HELLO {session}\n".encode())
        lines = _Lines(anchor)
        _, ip, port = lines.readline(rendezvous_timeout).split()
        result["observed"] = [ip, int(port)]
        _, peer_ip, peer_port = lines.readline(rendezvous_timeout).split()
        peer = (peer_ip, int(peer_port))
        result["peer"] = [peer_ip, int(peer_port)]
        result["rendezvous_s"] = round(time.monotonic() - started, 4)
        begin = time.monotonic()
        deadline = begin + window
        errors: list[str] = []
        while (remaining := deadline - time.monotonic()) > 0 and result["attempts"] < 100:
            result["attempts"] += 1
            sock = _reusable_socket(local_port)
            sock.settimeout(min(attempt_timeout, remaining))
            try:
                sock.connect(peer)
            except OSError as exc:
                sock.close()
                errors.append(type(exc).__name__)
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                continue
            conn = sock
            break
        result["errors"] = errors[-5:]
        if conn is None:
            result["error"] = f"no connection within {window:g} s ({result['attempts']} attempts)"
            return result
        result["punch_s"] = round(time.monotonic() - begin, 4)
        result["connected_to"] = list(conn.getpeername())
        transfer = time.monotonic()
        sent, received = _exchange(conn, os.urandom(payload), timeout=30.0)
        result.update(sent_sha256=sent, recv_sha256=received[0], recv_bytes=received[1],
                      transfer_s=round(time.monotonic() - transfer, 4), ok=received[1] == payload)  # fmt: skip
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if conn is not None:
            conn.close()
        anchor.close()
    return result


def _exchange(conn: socket.socket, data: bytes, timeout: float) -> tuple[str, tuple[str, int]]:
    """Send ``data`` (in a thread) while receiving to EOF; return (sha256 sent, (sha256 received, length))."""
    conn.settimeout(timeout)
    failure: list[BaseException] = []

    def send() -> None:
        try:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            failure.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    digest, length = hashlib.sha256(), 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (chunk := conn.recv(1 << 16)):
        digest.update(chunk)
        length += len(chunk)
    sender.join(timeout)
    if failure:
        raise failure[0]
    return hashlib.sha256(data).hexdigest(), (digest.hexdigest(), length)


def session(target: tuple[str, int], commands: IO[str], timeout: float = 5.0) -> None:
    """A long-lived connection driven from stdin, for "break the path mid-session" tests.

    Commands, one per line: ``send TEXT`` (writes TEXT and a newline), ``recv
    SECONDS`` (reads one line), ``quit``. Each prints one JSON line: ``{"ok": true,
    "line": ...}`` or ``{"ok": false, "error": "timeout"|"reset"|...}``.
    """
    try:
        conn = socket.create_connection(target, timeout=timeout)
    except OSError as exc:
        _emit({"ok": False, "error": f"connect: {exc}"})
        return
    lines = _Lines(conn)
    _emit({"ok": True, "local": list(conn.getsockname())})
    with conn:
        for raw in commands:
            verb, _, arg = raw.strip().partition(" ")
            try:
                if verb == "send":
                    conn.sendall(arg.encode() + b"\n")
                    _emit({"ok": True})
                elif verb == "recv":
                    _emit({"ok": True, "line": lines.readline(float(arg or timeout))})
                else:
                    _emit({"ok": True, "bye": True})
                    return
            except TimeoutError:
                _emit({"ok": False, "error": "timeout"})
            except ConnectionResetError:
                _emit({"ok": False, "error": "reset"})
            except OSError as exc:
                _emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


# NAT-PMP (RFC 6886): a 2-byte request for the public address, 12 bytes to map a port.


class NatPmpError(RuntimeError):
    """The gateway answered with a non-zero NAT-PMP result code (or not at all)."""

    CODES: ClassVar[dict[int, str]] = {1: "unsupported version", 2: "not authorized/refused", 3: "network failure",
             4: "out of resources", 5: "unsupported opcode"}  # fmt: skip


def natpmp_request(gateway: str, request: bytes, timeout: float = 3.0) -> bytes:
    """Send a NAT-PMP request to ``gateway``:5351 and return the answer.

    Retransmits after 250 ms, doubling (RFC 6886 section 3.1), until ``timeout``.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((gateway, NATPMP_PORT))
        deadline = time.monotonic() + timeout
        wait = 0.25
        while (remaining := deadline - time.monotonic()) > 0:
            sock.send(request)
            sock.settimeout(min(wait, remaining))
            wait *= 2
            try:
                answer = sock.recv(64)
            except TimeoutError:
                continue
            except ConnectionRefusedError as exc:
                raise NatPmpError(f"nothing answers NAT-PMP on {gateway}:{NATPMP_PORT}") from exc
            if len(answer) >= 8 and answer[1] == request[1] | 0x80:
                code = struct.unpack("!H", answer[2:4])[0]
                if code:
                    raise NatPmpError(f"NAT-PMP result {code}: {NatPmpError.CODES.get(code, 'unknown')}")
                return answer
        raise NatPmpError(f"no NAT-PMP answer from {gateway}:{NATPMP_PORT} within {timeout:g} s")


def natpmp_external_address(gateway: str, timeout: float = 3.0) -> str:
    """The gateway's public IPv4 address, by NAT-PMP."""
    return socket.inet_ntoa(natpmp_request(gateway, b"\x00\x00", timeout)[8:12])


def natpmp_map(
    gateway: str, internal_port: int, external_port: int = 0, lifetime: int = 3600, protocol: str = "tcp",
    timeout: float = 3.0,
) -> tuple[int, int]:  # fmt: skip
    """Ask ``gateway`` to forward ``external_port`` (0: its choice) to our ``internal_port``.

    Returns (mapped external port, granted lifetime). Lifetime 0 deletes the mapping.
    """
    opcode = {"udp": 1, "tcp": 2}[protocol.lower()]
    answer = natpmp_request(gateway, struct.pack("!BBHHHI", 0, opcode, 0, internal_port, external_port, lifetime),
                            timeout)  # fmt: skip
    _, _, _, _, _, mapped, granted = struct.unpack("!BBHIHHI", answer[:16])
    return mapped, granted


def upnp_map(internal_port: int, external_port: int | None = None, discover_ms: int = 200) -> dict[str, Any]:
    """Discover the IGD by SSDP and add a TCP port mapping with the ``miniupnpc`` module (what py-libp2p uses)."""
    miniupnpc = importlib.import_module("miniupnpc")
    upnp = miniupnpc.UPnP()
    upnp.discoverdelay = discover_ms
    devices = upnp.discover()
    upnp.selectigd()
    external = external_port or internal_port
    ok = upnp.addportmapping(external, "TCP", upnp.lanaddr, internal_port, "peerup netlab", "")
    return {"devices": devices, "lan_addr": upnp.lanaddr, "external_ip": upnp.externalipaddress(),
            "external_port": external, "ok": bool(ok)}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m peerup.netlab TOOL ...``: the socket tools, to run inside lab namespaces."""
    parser = argparse.ArgumentParser(
        prog="python -m peerup.netlab", description=__doc__.splitlines()[0] if __doc__ else None
    )
    tools = parser.add_subparsers(dest="tool", required=True)
    p = tools.add_parser("echo", help="TCP echo server; prints 'ready PORT'")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--lifetime", type=float, default=600.0)
    p = tools.add_parser("probe", help="connect to each HOST:PORT and check an echo")
    p.add_argument("--to", action="append", required=True)
    p.add_argument("--timeout", type=float, default=1.0)
    p = tools.add_parser("rendezvous", help="observed-address and pairing server; prints 'ready PORT'")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--lifetime", type=float, default=600.0)
    p = tools.add_parser("observe", help="observed address from one local port, per server")
    p.add_argument("--to", action="append", required=True)
    p.add_argument("--port", type=int, default=0)
    p = tools.add_parser("punch", help="TCP simultaneous-open hole punch through a rendezvous server")
    p.add_argument("--rendezvous", required=True)
    p.add_argument("--session", required=True)
    p.add_argument("--window", type=float, default=5.0)
    p.add_argument("--attempt-timeout", type=float, default=1.0)
    p.add_argument("--bytes", type=int, default=1 << 20)
    p = tools.add_parser("session", help="a connection driven by stdin commands (send/recv/quit)")
    p.add_argument("--to", required=True)
    p = tools.add_parser("natpmp", help="NAT-PMP: the public address, or map --port")
    p.add_argument("--gateway", required=True)
    p.add_argument("--port", type=int, default=0, help="internal TCP port to map (0: only ask the address)")
    p.add_argument("--external", type=int, default=0)
    p.add_argument("--lifetime", type=int, default=3600)
    p = tools.add_parser("upnp", help="UPnP IGD (miniupnpc): map a TCP port")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--external", type=int, default=0)
    p.add_argument("--discover-ms", type=int, default=200)
    args = parser.parse_args(argv)

    if args.tool == "echo":
        serve_echo(args.port, args.lifetime)
    elif args.tool == "probe":
        _emit(probe([_hostport(t) for t in args.to], args.timeout))
    elif args.tool == "rendezvous":
        serve_rendezvous(args.port, args.lifetime)
    elif args.tool == "observe":
        _emit(observe([_hostport(t) for t in args.to], args.port))
    elif args.tool == "punch":
        _emit(punch(_hostport(args.rendezvous), args.session, window=args.window,
                    attempt_timeout=args.attempt_timeout, payload=args.bytes))  # fmt: skip
    elif args.tool == "session":
        session(_hostport(args.to), sys.stdin)
    elif args.tool == "natpmp":
        try:
            result: dict[str, Any] = {"ok": True, "external_ip": natpmp_external_address(args.gateway)}
            if args.port:
                result["external_port"], result["lifetime"] = natpmp_map(
                    args.gateway, args.port, args.external, args.lifetime
                )
        except NatPmpError as exc:
            result = {"ok": False, "error": str(exc)}
        _emit(result)
    elif args.tool == "upnp":
        try:
            _emit(upnp_map(args.port, args.external or None, args.discover_ms))
        except Exception as exc:  # noqa: BLE001 - miniupnpc raises bare Exception("...") for protocol errors
            _emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
