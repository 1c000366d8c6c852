"""Pairing (issue #15): invite codes, the PAKE handshake over a real relay, the files it writes.

Every failure case checks that both homes' authorized_keys and config.toml are
byte-for-byte what they were before, and that the joiner's error is one line:
the same line for a wrong, an expired and a used code.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from peerup.core import auth
from peerup.core.errors import PeerupError, ServiceError
from peerup.core.handshake import HELLO, MAX_FRAME, PROTOCOL, send_frame
from peerup.core.invite import invite, join
from peerup.core.node import Node
from peerup.core.pairing import (
    REFUSED,
    InviteCode,
    InviteCodeError,
    InviteRefused,
    Paired,
    choose_name,
    verification_string,
)
from peerup.core.runtime import Runtime
from peerup.core.settings import Settings, load_settings
from peerup.plugins.libp2p.node import parse_peer_id
from peerup.pytest_fixtures import netlab_or_skip
from peerup.testing import (
    PEERUP_CMD,
    RELAYED_ONLY_TOML,
    CliTunnel,
    clean_env,
    client_node,
    echo_handler,
    exchange,
    init_home,
    pattern_bytes,
    peerup_run,
    read_all,
    relay,
    serving_node,
)

anyio_mark = pytest.mark.anyio

RELAY = "/ip4/11.0.0.101/tcp/7777/p2p/12D3KooWGzxzKZYveHXtpG6AsrUJBcWxHBFS2HsEoGTxrMLvKXtN"
HOME = "12D3KooWLwXbxDXcXL4yMZpQ8LUnAHfhbhTB2r9Mc5wbHRqXX7iq"


# -- the code and the file format (no network) ------------------------------------------


def test_a_code_survives_reading_aloud_and_catches_typos() -> None:
    code = InviteCode(HOME, RELAY, bytes(range(8)))
    text = str(code)
    assert set(text) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ-")
    assert all(len(group) == 5 for group in text.split("-")[:-1])
    # Typed in lowercase with spaces, O for 0 and l for 1: still the same code.
    typed = text.replace("-", " ").lower().replace("0", "o").replace("1", "l")
    assert InviteCode.parse(typed) == code
    other = "0" if text[12] != "0" else "1"
    with pytest.raises(InviteCodeError, match="mistyped"):
        InviteCode.parse(text[:12] + other + text[13:])
    with pytest.raises(InviteCodeError, match="mistyped"):
        InviteCode.parse(text[:-3])
    with pytest.raises(InviteCodeError, match="characters no code contains"):
        InviteCode.parse(text + "!")
    # Any relay address fits, not only /ip4.
    dns = InviteCode(HOME, f"/dns4/relay.example.org/tcp/443/wss/p2p/{HOME}", b"\xff" * 8)
    assert InviteCode.parse(str(dns)) == dns


def test_verification_string_is_symmetric_and_peer_specific() -> None:
    other = "12D3KooWGzxzKZYveHXtpG6AsrUJBcWxHBFS2HsEoGTxrMLvKXtN"
    third = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    assert verification_string(HOME, other) == verification_string(other, HOME)
    assert verification_string(HOME, other) != verification_string(HOME, third)
    assert verification_string(HOME, other, "ab" * 16) != verification_string(HOME, other)


def test_a_proposed_name_is_cleaned_and_never_takes_another_peers_name(tmp_path: Path) -> None:
    other = "12D3KooWGzxzKZYveHXtpG6AsrUJBcWxHBFS2HsEoGTxrMLvKXtN"
    settings = Settings(home=tmp_path, peers={"laptop": other})
    assert choose_name(settings, HOME, None, "Laptop") == "laptop-2"  # taken by another peer
    assert choose_name(settings, other, None, "anything") == "laptop"  # a known peer keeps its name
    assert choose_name(settings, HOME, "mine", "laptop") == "mine"  # --name wins
    assert choose_name(settings, HOME, None, "../../etc\nname=evil") == "etc-name-evil"
    assert choose_name(settings, HOME, None, "\u00e9\u00e9") == f"peer-{HOME[-6:].lower()}"


def test_authorized_keys_attributes_keep_old_files_valid(tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    other = "12D3KooWGzxzKZYveHXtpG6AsrUJBcWxHBFS2HsEoGTxrMLvKXtN"
    old = f"# my peers\n{HOME} the old laptop\n\n{other}\n"
    path.write_text(old)
    entries, problems = auth.parse(old, parse_peer_id)
    assert [(e.peer_id, e.comment, e.name) for e in entries] == [(HOME, "the old laptop", None), (other, "", None)]
    assert not problems

    later = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert auth.update(path, HOME, parse_peer_id, name="laptop", expires=later) is not None
    text = path.read_text()
    assert text == (
        f"# my peers\nname=laptop,expires=2030-01-02T03:04:05Z {HOME} the old laptop\n\n{other}\n"
    )  # every other line, comments and blank lines included, as it was
    entry = auth.AuthorizedKeys(path, parse_peer_id).entry(HOME)
    assert entry is not None and entry.name == "laptop" and entry.expires == later
    assert oct(path.stat().st_mode & 0o777) == "0o600"

    # An attribute peerup does not know might be a restriction: the line is skipped, not half-trusted.
    entries, problems = auth.parse(f"from=10.0.0.1 {HOME}\n", parse_peer_id)
    assert not entries and "unknown attribute 'from'" in problems[0].reason


CRASHING_WRITER = """
import os, signal, sys
from pathlib import Path
from peerup.core import auth
from peerup.plugins.libp2p.node import parse_peer_id

def crash(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs, as in a crash or power loss

class HalfWritten:
    def __init__(self, handle):
        self.handle = handle
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)
    def write(self, text):
        self.handle.write(text[: len(text) // 2])
        self.handle.flush()
        crash()

real_fdopen = os.fdopen
if sys.argv[3] == "mid-write":
    os.fdopen = lambda fd, *args, **kwargs: HalfWritten(real_fdopen(fd, *args, **kwargs))
else:  # the new text is complete in the temporary file; the rename never happens
    os.replace = crash
auth.update(Path(sys.argv[1]), sys.argv[2], parse_peer_id, name="new")
"""


@pytest.mark.parametrize("when", ["mid-write", "before-rename"])
def test_an_edit_killed_mid_write_leaves_the_file_as_it_was(tmp_path: Path, when: str) -> None:
    path = tmp_path / "authorized_keys"
    path.write_text(f"# my peers\nname=old {HOME} laptop\n")
    before = path.read_bytes()
    writer = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(path), HOME, when], capture_output=True, timeout=60, check=False
    )
    assert writer.returncode == -9, writer.stderr  # it died inside the edit
    assert path.read_bytes() == before
    assert len(list(tmp_path.glob(".authorized_keys.*.tmp"))) == 1  # what the crash left is not the file
    entry = auth.AuthorizedKeys(path, parse_peer_id).entry(HOME)
    assert entry is not None and entry.name == "old"
    assert auth.update(path, HOME, parse_peer_id, name="new") is not None  # and the next edit works
    assert path.read_text() == f"# my peers\nname=new {HOME} laptop\n"


def test_an_expired_entry_is_refused_and_reported_once(tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    past = auth.format_time(datetime.now(UTC) - timedelta(seconds=1))
    path.write_text(f"expires={past} {HOME}\n")
    keys = auth.AuthorizedKeys(path, parse_peer_id)
    assert not keys.allows(HOME)
    assert keys.entry(HOME) is not None  # still listed (`auth list` shows it EXPIRED)
    assert keys.refresh() is True  # the watcher hears of the change even after a check read the file
    assert keys.refresh() is False


# -- pairing over a real relay ------------------------------------------------------------


def snapshot(home: Path) -> dict[str, str | None]:
    """SHA-256 of the files pairing may write (None: absent)."""
    out: dict[str, str | None] = {}
    for name in ("authorized_keys", "config.toml"):
        path = home / name
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    return out


@dataclass
class Inviter:
    runtime: Runtime
    node: Node
    code: InviteCode | None = None
    shown: anyio.Event = field(default_factory=anyio.Event)
    result: Paired | None = None
    error: PeerupError | None = None
    done: anyio.Event = field(default_factory=anyio.Event)

    @property
    def home(self) -> Path:
        return self.runtime.settings.home

    async def run(self, ttl: float, **kwargs: Any) -> None:
        def show(code: InviteCode) -> None:
            self.code = code
            self.shown.set()

        try:
            self.result = await invite(
                self.runtime, self.node, relay=self.runtime.settings.relays[0], ttl=ttl, show=show, **kwargs
            )
        except PeerupError as exc:
            self.error = exc
        finally:
            self.done.set()


@asynccontextmanager
async def inviting(
    tmp_path: Path, relay_addr: str, ttl: float = 30.0, **kwargs: Any
) -> AsyncIterator[tuple[Inviter, InviteCode]]:
    async with client_node(tmp_path, relay_addr, "home") as (runtime, node), anyio.create_task_group() as tg:
        inviter = Inviter(runtime, node)
        tg.start_soon(lambda: inviter.run(ttl, failure_delay=0.05, **kwargs))
        await inviter.shown.wait()
        assert inviter.code is not None
        yield inviter, inviter.code
        tg.cancel_scope.cancel()


async def refused(runtime: Runtime, node: Node, code: InviteCode) -> str:
    with pytest.raises(InviteRefused) as info:
        await join(runtime, node, code)
    return str(info.value)


@asynccontextmanager
async def echo_service() -> AsyncIterator[str]:
    """peerup.testing.tcp_service, with its listener closed at the end (that one leaves it to the GC)."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo_handler)
        yield f"127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
        tg.cancel_scope.cancel()


@anyio_mark
async def test_invite_and_join_authorize_and_name_each_other(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with relay(tmp_path) as relay_addr, inviting(tmp_path, relay_addr, name="laptop") as (inviter, code):
            async with client_node(tmp_path, relay_addr, "laptop") as (rt, laptop):
                paired, joined = await join(rt, laptop, code, name="home")
                await inviter.done.wait()
            assert joined.confirmed
            assert inviter.result is not None and inviter.result.peer_id == laptop.peer_id
            assert paired.peer_id == inviter.node.peer_id
            home_dir, laptop_dir = inviter.home, rt.settings.home

    home_entry = auth.AuthorizedKeys(home_dir / "authorized_keys", parse_peer_id).entry(laptop.peer_id)
    laptop_entry = auth.AuthorizedKeys(laptop_dir / "authorized_keys", parse_peer_id).entry(paired.peer_id)
    assert home_entry is not None and home_entry.name == "laptop"
    assert laptop_entry is not None and laptop_entry.name == "home"
    assert home_entry.paired == laptop_entry.paired == joined.transcript
    assert load_settings(home_dir).peers == {"laptop": laptop.peer_id}
    laptop_settings = load_settings(laptop_dir)
    assert laptop_settings.peers == {"home": paired.peer_id}
    assert laptop_settings.relays == [relay_addr]  # the joiner keeps the relay from the code
    # verify: the same string on both sides, from what each side stored.
    on_home = verification_string(inviter.node.peer_id, laptop.peer_id, home_entry.paired)
    on_laptop = verification_string(laptop.peer_id, paired.peer_id, laptop_entry.paired)
    assert on_home == on_laptop


@anyio_mark
async def test_wrong_expired_and_used_codes_get_one_line_and_change_nothing(tmp_path: Path) -> None:
    with anyio.fail_after(90):
        async with (
            relay(tmp_path) as relay_addr,
            client_node(tmp_path, relay_addr, "mallory") as (mrt, mallory),
            client_node(tmp_path, relay_addr, "laptop") as (lrt, laptop),
        ):
            homes = [mrt.settings.home, lrt.settings.home]
            # Wrong: a well-formed code for the right inviter with another secret.
            async with inviting(tmp_path, relay_addr) as (inviter, code):
                before = [snapshot(h) for h in [inviter.home, *homes]]
                wrong = InviteCode(code.inviter, code.relay, bytes(b ^ 1 for b in code.secret))
                messages = [await refused(mrt, mallory, wrong)]
                assert [snapshot(h) for h in [inviter.home, *homes]] == before
                # The right code still works after a wrong one (a failure slows, it does not burn the code)...
                await join(lrt, laptop, code)
                await inviter.done.wait()
                assert inviter.result is not None and inviter.result.peer_id == laptop.peer_id
                # ... once: the same code again is refused, and changes nothing.
                after = [snapshot(h) for h in [inviter.home, *homes]]
                messages.append(await refused(mrt, mallory, code))
                assert [snapshot(h) for h in [inviter.home, *homes]] == after
            # Used, and the inviter gone (`peerup invite` exits once paired): still the same line.
            messages.append(await refused(mrt, mallory, code))
            assert [snapshot(h) for h in [inviter.home, *homes]] == after
            # Expired: the inviter's node is still up and answering, its invitation is over.
            async with inviting(tmp_path, relay_addr, ttl=0.5) as (inviter, code):
                await inviter.done.wait()
                assert inviter.error is not None and "expired" in str(inviter.error)
                before = [snapshot(h) for h in [inviter.home, *homes]]
                messages.append(await refused(mrt, mallory, code))
                assert [snapshot(h) for h in [inviter.home, *homes]] == before
    assert messages == [REFUSED] * 4
    assert "\n" not in REFUSED


@anyio_mark
async def test_failed_attempts_are_capped(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with (
            relay(tmp_path) as relay_addr,
            client_node(tmp_path, relay_addr, "mallory") as (mrt, mallory),
            inviting(tmp_path, relay_addr, max_failures=3) as (inviter, code),
        ):
            for n in range(3):
                guess = InviteCode(code.inviter, code.relay, n.to_bytes(8, "big"))
                assert await refused(mrt, mallory, guess) == REFUSED
            await inviter.done.wait()
            assert inviter.error is not None and "3 failed pairing attempts" in str(inviter.error)
            # Now even the right code is refused: a guesser cannot keep trying.
            assert await refused(mrt, mallory, code) == REFUSED
            assert snapshot(inviter.home) == {"authorized_keys": None, "config.toml": None}


@anyio_mark
async def test_two_joiners_with_the_right_code_exactly_one_wins(tmp_path: Path) -> None:
    outcomes: dict[str, str] = {}
    with anyio.fail_after(60):
        async with (
            relay(tmp_path) as relay_addr,
            client_node(tmp_path, relay_addr, "one") as (rt1, one),
            client_node(tmp_path, relay_addr, "two") as (rt2, two),
            inviting(tmp_path, relay_addr) as (inviter, code),
        ):
            before = {node.peer_id: snapshot(rt.settings.home) for rt, node in ((rt1, one), (rt2, two))}

            async def attempt(rt: Runtime, node: Node) -> None:
                try:
                    await join(rt, node, code)
                    outcomes[node.peer_id] = "paired"
                except InviteRefused as exc:
                    outcomes[node.peer_id] = str(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(attempt, rt1, one)
                tg.start_soon(attempt, rt2, two)
            await inviter.done.wait()
            assert inviter.result is not None
            winner = inviter.result.peer_id
            entries, _ = auth.parse((inviter.home / "authorized_keys").read_text(), parse_peer_id)
            assert [entry.peer_id for entry in entries] == [winner]
            loser_rt = rt2 if winner == one.peer_id else rt1
            loser = two if winner == one.peer_id else one
            assert snapshot(loser_rt.settings.home) == before[loser.peer_id]
    assert sorted(outcomes.values()) == sorted(["paired", REFUSED])
    assert outcomes[winner] == "paired"


@anyio_mark
async def test_hostile_bytes_and_a_vanishing_joiner_change_nothing(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with (
            relay(tmp_path) as relay_addr,
            client_node(tmp_path, relay_addr, "mallory") as (mrt, mallory),
            client_node(tmp_path, relay_addr, "laptop") as (lrt, laptop),
            inviting(tmp_path, relay_addr) as (inviter, code),
        ):
            before = snapshot(inviter.home)

            async def raw(payload: bytes, then_read: bool = True) -> bytes:
                stream, _ = await mrt.open_stream(mallory, code.inviter, PROTOCOL)
                async with stream:
                    await stream.send(payload)
                    if not then_read:
                        return b""  # vanish mid-handshake
                    await stream.send_eof()
                    return await read_all(stream)

            # A frame announcing more than the limit: refused before a byte of it is read.
            assert await raw(bytes([HELLO]) + (MAX_FRAME + 1).to_bytes(2, "big")) == b"\x7f\x00\x00"
            assert await raw(b"GET / HTTP/1.1\r\n\r\n") == b"\x7f\x00\x00"  # not our protocol at all
            assert await raw(bytes([HELLO, 0, 3]) + b"\x01\x02\x03") == b"\x7f\x00\x00"  # short SPAKE2 message
            # A joiner that sends HELLO and disappears.
            stream, _ = await mrt.open_stream(mallory, code.inviter, PROTOCOL)
            await send_frame(stream, HELLO, bytes([1]) + bytes(33))
            await stream.aclose()
            assert snapshot(inviter.home) == before
            assert inviter.error is None  # the invitation survives all of it
            await join(lrt, laptop, code)
            await inviter.done.wait()
            assert inviter.result is not None and inviter.result.peer_id == laptop.peer_id


@anyio_mark
async def test_pairing_on_a_serving_node_reaches_services_only_once_paired(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with (
            echo_service() as addr,
            relay(tmp_path) as relay_addr,
            client_node(tmp_path, relay_addr, "laptop") as (lrt, laptop),
            serving_node(tmp_path, relay_addr, {"echo": addr}, authorized=[]) as (srt, server),
            anyio.create_task_group() as tg,
        ):
            inviter = Inviter(srt, server)
            tg.start_soon(lambda: inviter.run(30.0, failure_delay=0.05))
            await inviter.shown.wait()
            assert inviter.code is not None
            wrong = InviteCode(inviter.code.inviter, inviter.code.relay, bytes(8))
            assert await refused(lrt, laptop, wrong) == REFUSED
            # Connected to the serving node for pairing, the stranger still reaches no service.
            with pytest.raises(ServiceError) as info:
                await lrt.open_service_stream(laptop, server.peer_id, "echo")
            assert info.value.code == "unauthorized"
            await join(lrt, laptop, inviter.code)
            await inviter.done.wait()
            # Paired: the running node picks up its authorized_keys without a restart.
            payload = pattern_bytes(256 * 1024, seed=1)
            reply = await exchange(await lrt.open_service_stream(laptop, server.peer_id, "echo"), payload)
            assert hashlib.sha256(reply).digest() == hashlib.sha256(payload).digest()
            tg.cancel_scope.cancel()


# -- expiry on a running node --------------------------------------------------------------


@anyio_mark
async def test_expiry_closes_an_open_tunnel_and_refuses_new_ones(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with (
            echo_service() as addr,
            relay(tmp_path) as relay_addr,
            client_node(tmp_path, relay_addr, "laptop") as (lrt, laptop),
            serving_node(tmp_path, relay_addr, {"echo": addr}, authorized=[]) as (srt, server),
            anyio.create_task_group() as tg,
        ):
            keys = srt.settings.authorized_keys_file
            expires = (datetime.now(UTC) + timedelta(seconds=4)).replace(microsecond=0)  # the file keeps seconds
            assert auth.add(keys, laptop.peer_id, "", parse_peer_id, expires)
            tg.start_soon(srt.watch_authorized_keys, 0.2)
            stream = await lrt.open_service_stream(laptop, server.peer_id, "echo")
            await stream.send(b"before expiry")
            assert await stream.receive() == b"before expiry"
            # Nothing but the clock changes; the open tunnel ends (reset or EOF), bounded by fail_after.
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, anyio.IncompleteRead)):
                while True:
                    await stream.receive()
            assert datetime.now(UTC) >= expires
            await stream.aclose()
            with pytest.raises(ServiceError) as info:
                await exchange(await lrt.open_service_stream(laptop, server.peer_id, "echo"), b"x")
            assert info.value.code == "unauthorized"
            tg.cancel_scope.cancel()


# -- the real CLI, two homes behind NAT that reach only the relay ---------------------------

FETCH_SHA = (
    "import hashlib, sys, urllib.request\n"
    "print(hashlib.sha256(urllib.request.urlopen(sys.argv[1], timeout=60).read()).hexdigest())\n"
)
TYPO = "invite code does not check out: a character is mistyped, missing or extra"
CODE_LINE = r"^\s+([0-9A-Z]{5}(?:-[0-9A-Z]{1,5})+)$"


@pytest.mark.system
@pytest.mark.slow
def test_cli_invite_and_join_across_nats_then_a_tunnel_by_names(tmp_path: Path) -> None:
    with netlab_or_skip() as lab:
        relay_host = lab.public_host("relay")
        home, laptop = lab.home("home", nat="symmetric"), lab.home("laptop", nat="symmetric")
        dirs = {name: tmp_path / name for name in ("relay", "home", "laptop", "stranger")}
        for path in dirs.values():
            path.mkdir()
        site = tmp_path / "site"
        site.mkdir()
        payload = pattern_bytes(1 << 20, seed=15)
        (site / "blob").write_bytes(payload)
        web_port = 8080
        home.host.popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(site), str(web_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        init_home(dirs["relay"])
        cli = CliTunnel(tmp_path)
        try:
            relay_proc = cli.start(
                "relay", ["--home", str(dirs["relay"]), "relay", "serve", "--listen", "/ip4/0.0.0.0/tcp/7777"],
                prefix=relay_host.prefix,
            )  # fmt: skip
            relay_id = relay_proc.wait_for(r"/p2p/(\S+)").group(1)
            relay_addr = f"/ip4/{relay_host.ip}/tcp/7777/p2p/{relay_id}"
            # Neither home has an identity yet; only the inviter knows the relay and its service.
            (dirs["home"] / "config.toml").write_text(
                f'relays = ["{relay_addr}"]\n\n# the web server\n[services.web]\naddress = "127.0.0.1:{web_port}"\n'
                f"allow = []\n\n{RELAYED_ONLY_TOML}"
            )
            (dirs["laptop"] / "config.toml").write_text(f"# my laptop\n{RELAYED_ONLY_TOML}")
            inviter = cli.start(
                "invite (home)",
                ["--home", str(dirs["home"]), "invite", "--name", "laptop", "--service", "web", "--ttl", "2m"],
                prefix=home.host.prefix,
            )
            code = inviter.wait_for(CODE_LINE, timeout=30).group(1)
            joined = peerup_run(["--home", str(dirs["laptop"]), "join", code, "--name", "home"], laptop.host.prefix)
            assert joined.returncode == 0, joined.stderr + cli.logs()
            assert "paired with home" in joined.stdout
            inviter.wait_for(r"^paired with laptop", timeout=20)
            assert inviter.popen.wait(20) == 0, cli.logs()
            config = (dirs["laptop"] / "config.toml").read_text()
            assert config.startswith("# my laptop\n") and relay_addr in config  # comments kept, relay learned
            assert 'allow = ["laptop"]' in (dirs["home"] / "config.toml").read_text()

            # Used: a stranger with the same code gets the one line, and no home changes.
            before = [snapshot(dirs[name]) for name in ("home", "laptop", "stranger")]
            again = peerup_run(["--home", str(dirs["stranger"]), "join", code], laptop.host.prefix)
            assert again.returncode == 1 and again.stderr.strip().splitlines()[-1] == f"peerup: error: {REFUSED}"
            assert [snapshot(dirs[name]) for name in ("home", "laptop", "stranger")][:2] == before[:2]
            assert snapshot(dirs["stranger"])["authorized_keys"] is None

            # A tunnel by names only: `serve` from the config, `proxy home web`.
            server = cli.start("serve (home)", ["--home", str(dirs["home"]), "serve"], prefix=home.host.prefix)
            server.wait_for(r"reachable at \S+p2p-circuit", timeout=30)
            proxy = cli.start(
                "proxy (laptop)",
                ["--home", str(dirs["laptop"]), "proxy", "home", "web", "0"],
                prefix=laptop.host.prefix,
            )
            port = int(proxy.wait_for(r"forwarding 127\.0\.0\.1:(\d+)").group(1))
            fetched = laptop.host.python(FETCH_SHA, f"http://127.0.0.1:{port}/blob", timeout=90)
            assert fetched.returncode == 0, fetched.stderr + cli.logs()
            assert fetched.stdout.strip() == hashlib.sha256(payload).hexdigest()

            # verify: the same string on both machines; --confirm marks the entry.
            strings = []
            for name, other, ns in (("home", "laptop", home.host), ("laptop", "home", laptop.host)):
                result = peerup_run(["--home", str(dirs[name]), "verify", other, "--confirm"], ns.prefix)
                assert result.returncode == 0, result.stderr
                strings.append(result.stdout.splitlines()[1].strip())
            assert strings[0] == strings[1] and len(strings[0].replace(" ", "")) == 30
            listed = peerup_run(["--home", str(dirs["home"]), "auth", "list"]).stdout
            assert "name=laptop" in listed and "verified" in listed
        finally:
            cli.stop()


def test_cli_join_errors_are_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = peerup_run(["--home", str(home), "join", "NOT-A-CODE"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"peerup: error: {TYPO}"]
    assert not home.exists()  # nothing created for a code that is not one


def test_cli_join_reads_the_code_from_stdin_or_the_environment(tmp_path: Path) -> None:
    code = str(InviteCode(HOME, RELAY, bytes(8)))
    typo = code[:-1] + ("0" if code[-1] != "0" else "1")
    args = [*PEERUP_CMD, "--home", str(tmp_path / "home"), "join"]
    from_stdin = subprocess.run(args, input=typo + "\n", capture_output=True, text=True, timeout=60, check=False)
    from_env = subprocess.run(
        args, env={**clean_env(), "PEERUP_INVITE_CODE": typo}, capture_output=True, text=True, timeout=60, check=False
    )
    nothing = subprocess.run(args, input="", capture_output=True, text=True, timeout=60, check=False)
    for result in (from_stdin, from_env):  # the code was read (and its typo caught) before any network contact
        assert result.stderr.splitlines() == [f"peerup: error: {TYPO}"]
    assert nothing.stderr.splitlines()[-1].startswith("peerup: error: no invite code given")
