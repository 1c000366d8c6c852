"""A real OpenSSH session through the tunnel: relay, ``peerup serve`` and ``peerup proxy``
as separate processes, a throwaway sshd on 127.0.0.1 as the service.

The set-up makes a host key and a user key in a temporary directory and runs
``sshd -D`` (no daemon, logs on stderr) with its own config: key login only, for
the current user, ``StrictModes no``. Needs the ``openssh-server`` and
``openssh-client`` packages; skipped with the reason when their binaries are absent.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerup.testing import CliTunnel, free_port, stop_process

pytestmark = [pytest.mark.system]

MiB = 1024 * 1024
SIZE = 50 * MiB


def _binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (f"{d}/{name}" for d in ("/usr/sbin", "/usr/local/sbin", "/sbin") if os.access(f"{d}/{name}", os.X_OK)), None
    )


SSHD, SSH, SCP, KEYGEN = (_binary(n) for n in ("sshd", "ssh", "scp", "ssh-keygen"))
missing = [n for n, b in (("sshd", SSHD), ("ssh", SSH), ("scp", SCP), ("ssh-keygen", KEYGEN)) if b is None]
if missing:
    pytestmark = [
        pytest.mark.system,
        pytest.mark.skip(
            reason=f"OpenSSH binaries not found: {', '.join(missing)} "
            "(apt-get install -y openssh-server openssh-client)"
        ),
    ]


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"sshd exited with {proc.returncode}: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"sshd did not listen on 127.0.0.1:{port} within {timeout:g} s")


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A throwaway sshd on 127.0.0.1; yields (port, user private key)."""
    assert SSHD and KEYGEN
    keys = tmp_path / "ssh"
    keys.mkdir()
    host_key, user_key = keys / "host_ed25519", keys / "user_ed25519"
    for key in (host_key, user_key):
        subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    (keys / "authorized_keys").write_text((keys / "user_ed25519.pub").read_text())
    port = free_port()
    user = getpass.getuser()
    config = keys / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile none\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nAllowUsers {user}\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPrintMotd no\n"
        "Subsystem sftp internal-sftp\nLogLevel ERROR\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_port(port, proc)
        yield port, user_key
    finally:
        stop_process(proc)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("path", ["relayed", "direct"])
def test_ssh_session_and_50_mib_both_ways_through_a_tunnel(tmp_path: Path, sshd: tuple[int, Path], path: str) -> None:
    """OpenSSH through the tunnel, on the relayed path and on the direct one.

    Relayed: the home node neither confirms nor punches (on 127.0.0.1 it could).
    Direct: the defaults; the proxy starts once the home node's address is
    confirmed, so its first lookup already finds the direct address.
    """
    assert SSH and SCP
    ssh_port, user_key = sshd
    cli = CliTunnel(tmp_path)
    try:
        stack = cli.start_stack("ssh", f"127.0.0.1:{ssh_port}", path)
        port = stack.port

        options = [
            "-F", "/dev/null", "-i", str(user_key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=60",
        ]  # fmt: skip
        target = f"{getpass.getuser()}@127.0.0.1"
        ssh = [SSH, *options, "-p", str(port), target]

        # Remote commands, one connection each.
        result = subprocess.run([*ssh, "echo hello from; echo $((6 * 7))"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr + cli.logs()
        assert result.stdout.split() == ["hello", "from", "42"]
        stack.proxy.wait_for(rf"connection from .* {path} path", stderr=True)

        # An interactive session on a pty: a shell reads our typing line by line.
        session = subprocess.run(
            [*ssh, "-tt"], input="cd /tmp && pwd\necho marker-$((6 * 7))\nexit 3\n", capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert session.returncode == 3, session.stderr + cli.logs()
        assert "marker-42" in session.stdout

        # 50 MiB up and 50 MiB down with scp, checked by SHA-256 at both ends.
        work = tmp_path / "files"
        work.mkdir()
        upload, remote, download = (work / n for n in ("up.bin", "remote.bin", "down.bin"))
        with upload.open("wb") as fh:
            for _ in range(SIZE // MiB):
                fh.write(os.urandom(MiB))
        scp = [SCP, *options, "-P", str(port)]
        started = time.monotonic()
        result = subprocess.run([*scp, str(upload), f"{target}:{remote}"], capture_output=True, text=True, timeout=300)
        up_s = time.monotonic() - started
        assert result.returncode == 0, result.stderr + cli.logs()
        remote_sum = subprocess.run([*ssh, f"sha256sum {remote}"], capture_output=True, text=True, timeout=120)
        assert remote_sum.stdout.split()[0] == _sha256(upload)

        other = work / "other.bin"
        with other.open("wb") as fh:
            for _ in range(SIZE // MiB):
                fh.write(os.urandom(MiB))
        started = time.monotonic()
        result = subprocess.run([*scp, f"{target}:{other}", str(download)], capture_output=True, text=True, timeout=300)
        down_s = time.monotonic() - started
        assert result.returncode == 0, result.stderr + cli.logs()
        assert download.stat().st_size == SIZE
        assert _sha256(download) == _sha256(other)

        print(f"\nscp 50 MiB up {up_s:.1f} s ({SIZE / MiB / up_s:.1f} MiB/s), down {down_s:.1f} s")
    finally:
        cli.stop()
    for proc in cli.procs:
        assert proc.popen.returncode == 0, f"{proc.name} exited with {proc.popen.returncode}\n" + cli.logs()
