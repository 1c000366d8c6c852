"""What every benchmark section shares: child processes, /proc meters, the machine record.

Why one module: each section starts processes, waits for ports and reads /proc
the same way, and a section must be able to run alone (``run.py --only``) or
from a test (``<section>.smoke``); none of that may depend on run.py's order.
Every child is started in its own session and stopped with its whole process
group (socat forks one child per connection), and an ``atexit`` hook stops what
a failing caller left running.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peerup.testing import OutputLines

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PY = sys.executable
PEERUP = [PY, "-m", "peerup"]
STATIC = [PY, "-m", "benchmarks.static_peer"]
BARE = [PY, "-m", "benchmarks.bare_libp2p"]
MB = 1_000_000
MiB = 1 << 20
LOOPBACK_ANY = "/ip4/127.0.0.1/tcp/0"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: Children not stopped yet; the atexit hook stops them if a caller's ``finally`` did not run.
_LIVE: set[Proc] = set()


def log(text: str) -> None:
    print(text, flush=True)


def child_env(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment for a child, without PEERUP_HOME; ``None`` values remove a variable."""
    env = {k: v for k, v in os.environ.items() if k != "PEERUP_HOME"}
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class Proc:
    """A child process whose stdout/stderr lines are collected as they arrive."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            cwd=ROOT,
            env=dict(env) if env is not None else None,
            start_new_session=True,  # its own process group: stop() reaches socat's forked children
        )
        _LIVE.add(self)
        self.output = OutputLines(self.popen)
        self.lines = self.output.lines
        self.errors = self.output.errors

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first stdout line matching ``pattern``; raises with the stderr tail if it never comes."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = regex.search(line)
                if match:
                    return match
            if self.popen.poll() is not None:
                break
            time.sleep(0.02)
        tail = "\n".join(self.errors[-8:])
        raise RuntimeError(f"{self.name} did not print /{pattern}/ (exit {self.popen.poll()}): {tail}")

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after 10 s."""
        _LIVE.discard(self)
        if self.popen.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(10)
        with contextlib.suppress(OSError):  # forked children that outlived their parent
            os.killpg(self.pid, signal.SIGKILL)
        self.output.join(5)


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_LIVE):
        proc.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def percentile(sorted_values: list[float], q: float) -> float:
    """The value at quantile ``q`` of an already sorted, non-empty list (nearest rank, as before)."""
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


# -- memory -------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of ``pid`` in bytes (Linux /proc)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class RssMeter:
    """Peak VmRSS of some processes during a ``with`` block (sampled every 20 ms)."""

    def __init__(self, procs: Mapping[str, Proc]) -> None:
        self.procs = procs
        self.before: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.established: dict[str, int] = {}
        self._stop = threading.Event()

    def mark_established(self) -> None:
        """RSS now: all connections are up and idle, before any of them transfers."""
        self.established = {n: proc_status(p.pid).get("VmRSS", 0) for n, p in self.procs.items()}

    def __enter__(self) -> RssMeter:
        self.before = {n: proc_status(p.pid).get("VmRSS", 0) for n, p in self.procs.items()}
        self.peak = dict(self.before)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            for n, p in self.procs.items():
                self.peak[n] = max(self.peak[n], proc_status(p.pid).get("VmRSS", 0))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, connections: int) -> dict[str, Any]:
        out = {}
        for n in self.procs:
            grown = max(self.peak[n] - self.before[n], 0)
            held = max(self.established.get(n, 0) - self.before[n], 0) if self.established else None
            out[n] = {
                "rss_before_mib": round(self.before[n] / MiB, 1),
                "rss_peak_mib": round(self.peak[n] / MiB, 1),
                # peak during the phase, which includes every connection's 64 KiB in flight at once
                "per_connection_kib": round(grown / connections / 1024, 1) if connections else None,
                # with all connections established and idle (what holding a tunnel costs)
                "held_per_connection_kib": round(held / connections / 1024, 1)
                if connections and held is not None
                else None,
            }
        return out


# -- CPU ----------------------------------------------------------------------------


def _stat_times(pid: int) -> tuple[int, int, int] | None:
    """(ppid, utime + stime, cutime + cstime) of ``pid`` in clock ticks, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    # fields[0] is field 3 (state): ppid = 4, utime = 14, stime = 15, cutime = 16, cstime = 17
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def cpu_ticks(pid: int) -> int:
    """CPU ticks used by ``pid``, its reaped children and its live children (socat forks one per connection)."""
    own = _stat_times(pid)
    if own is None:
        return 0
    total = own[1] + own[2]
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != pid:
                child = _stat_times(int(entry))
                if child is not None and child[0] == pid:
                    total += child[1]
    return total


class CpuMeter:
    """CPU seconds each process used during a ``with`` block (utime + stime deltas from /proc/PID/stat).

    The exit waits ``settle`` seconds first, so the work of closing the
    measured connections (and socat reaping its children) is counted too.
    """

    def __init__(self, procs: Mapping[str, Proc], settle: float = 0.3) -> None:
        self.procs = procs
        self.settle = settle
        self.before: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self.before = {n: cpu_ticks(p.pid) for n, p in self.procs.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(self.settle)
        self.seconds = {n: (cpu_ticks(p.pid) - self.before[n]) / CLOCK_TICKS for n, p in self.procs.items()}

    def per(self, units: float, scale: float = 1.0, digits: int = 3) -> dict[str, float | None]:
        """Seconds per ``units / scale`` units of work (e.g. per 10,000 requests: ``per(n, 10_000)``)."""
        return {n: round(s / units * scale, digits) if units else None for n, s in self.seconds.items()}


# -- the machine --------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        mem = int(fh.readline().split()[1]) * 1024
    from importlib.metadata import version

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / (1 << 30), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libp2p": version("libp2p"),
        "trio": version("trio"),
        "socat": _socat_version(),
        "loadavg_at_start": os.getloadavg(),
        "nproc": command_output(["nproc"]),
        "lscpu_head": command_output(["lscpu"]).splitlines()[:10],
        "git": git_head(),
    }


def git_head() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
    ).stdout.strip()


def command_output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _socat_version() -> str | None:
    socat = shutil.which("socat")
    if not socat:
        return None
    done = subprocess.run([socat, "-V"], capture_output=True, text=True, check=False)
    match = re.search(r"socat version (\S+)", done.stdout)
    return match.group(1) if match else "unknown"
