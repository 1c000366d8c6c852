"""``peerup invite``, ``join`` and ``verify``: flags in, one node run, lines out.

Kept out of :mod:`peerup.cli` so that stays a thin dispatcher; the protocol is
in :mod:`peerup.core.handshake`, the code and the files in
:mod:`peerup.core.pairing`, the wiring to a node in :mod:`peerup.core.invite`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import anyio

from peerup.core import auth, names
from peerup.core.errors import ConfigError, IdentityError, PeerupError
from peerup.core.pairing import (
    InviteCode,
    check_invite,
    check_name,
    check_name_free,
    parse_duration,
    verification_string,
)
from peerup.core.plugins import PluginHost, load_plugins
from peerup.core.runtime import Runtime
from peerup.core.settings import Settings

log = logging.getLogger("peerup.pairing")

Out = Callable[[str], None]
#: Where ``peerup join`` reads the code when no argument is given and stdin is not a terminal... or from here.
CODE_ENV = "PEERUP_INVITE_CODE"
COMMANDS = ("invite", "join", "verify")


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    invite_p = sub.add_parser("invite", help="print a one-time code (and QR code) another machine joins with")
    invite_p.add_argument("--name", help="what to call the joiner here (default: the name it proposes, its host name)")
    invite_p.add_argument("--ttl", default="10m", help="how long the code is valid (default 10m; e.g. 90s, 1h)")
    invite_p.add_argument(
        "--service",
        action="append",
        default=[],
        dest="grant",
        metavar="NAME",
        help="also add the joiner to this service's allowlist (repeatable; the service must be in the config)",
    )
    invite_p.add_argument("--expires", metavar="WHEN", help="the joiner's access ends then: 7d, 12h, or 2026-12-31")
    invite_p.add_argument("--no-qr", action="store_true", help="do not draw the QR code")
    common(invite_p)
    join_p = sub.add_parser("join", help="pair with the machine that printed an invite code")
    join_p.add_argument("code", nargs="?", help=f"the invite code (default: stdin, or ${CODE_ENV})")
    join_p.add_argument("--name", help="what to call the inviter here (default: the name it proposes)")
    common(join_p)
    verify_p = sub.add_parser("verify", help="compare a short string with a peer's owner, then mark it verified")
    verify_p.add_argument("peer", help="peer ID or a name from [peers]")
    verify_p.add_argument(
        "--confirm", action="store_true", help="the strings matched (already compared): mark without asking"
    )


def run(command: str, args: argparse.Namespace, settings: Settings, out: Out) -> int:
    if command == "invite":
        return _invite(args, settings, out)
    if command == "join":
        return _join(args, settings, out)
    return _verify(args, settings, out)


def _ensure_identity(settings: Settings, out: Out) -> PluginHost:
    """One command on each side: a fresh machine gets its key on first ``invite``/``join``.

    Returns the plugin host it loaded, for the node the command then runs.
    """
    plugins = load_plugins(settings.plugins, settings.disable_plugins)
    try:
        plugins.identity(settings.home, "load")
    except IdentityError as missing:
        try:
            peer_id = plugins.identity(settings.home, "create")
        except IdentityError:
            raise missing from None  # there is a key, and what is wrong with it is the news
        out(f"created identity {peer_id} in {settings.home}")
    return plugins


def _invite(args: argparse.Namespace, settings: Settings, out: Out) -> int:
    ttl = parse_duration(args.ttl, "--ttl")
    terms = check_invite(settings, args.name, args.grant, args.expires, relay_hint="--relay MULTIADDR or ")
    name, services, expires = terms.name, terms.services, terms.expires
    plugins = _ensure_identity(settings, out)
    tty = sys.stdout.isatty()

    def show(code: InviteCode) -> None:
        if tty and not args.no_qr:
            import segno

            segno.make(str(code), error="m").terminal(compact=True)
        out(f"invite code (valid {args.ttl}, one use):")
        out(f"  {code}")
        out("on the other machine: peerup join CODE")

    if _daemon_runs(settings):
        return _invite_through_daemon(args, settings, out, show, ttl, name, services)

    from peerup.core.invite import invite, pick_relay

    async def main() -> int:
        runtime = Runtime(settings, plugins)
        async with runtime.node() as node:
            relay = await pick_relay(settings, node)
            paired = await invite(
                runtime,
                node,
                relay=relay,
                ttl=ttl,
                show=show,
                name=name,
                services=services,
                expires=expires,
            )
        out(f"paired with {paired.name} ({paired.peer_id})")
        out(f"compare with the other side: peerup verify {paired.name}")
        return 0

    result: int = anyio.run(main, backend="trio")
    return result


def _daemon_runs(settings: Settings) -> bool:
    """A daemon holds this home's identity: the invite must be its, not a second node with the same ID."""
    from peerup.daemon.client import DaemonNotRunning, request

    try:
        request(settings, "GET", "/v1/status")
    except DaemonNotRunning:
        return False
    return True


def _invite_through_daemon(
    args: argparse.Namespace,
    settings: Settings,
    out: Out,
    show: Callable[[InviteCode], None],
    ttl: float,
    name: str | None,
    services: tuple[str, ...],
) -> int:
    """The running daemon waits for the joiner on its own node; this command shows the code and the outcome."""
    from peerup.daemon.client import request

    body: dict[str, Any] = {"ttl": ttl, "name": name, "services": list(services), "expires": args.expires}
    started = request(settings, "POST", "/v1/invite", body)
    show(InviteCode.parse(started["code"]))
    out(f"held by the running daemon (invite {started['id']}); waiting for the joiner")
    path = f"/v1/invite/{started['id']}"
    try:
        for _ in range(int(ttl // 20) + 4):  # the daemon answers within 20 s of each question
            state = request(settings, "GET", path)
            if state["state"] != "waiting":
                break
        else:
            raise PeerupError("the daemon did not report an outcome for the invite; see `peerup status`")
    except KeyboardInterrupt:
        request(settings, "DELETE", path)
        raise
    if state["state"] != "paired":
        raise PeerupError(state.get("error") or "the invite ended without a joiner")
    out(f"paired with {state['name']} ({state['peer_id']})")
    out(f"compare with the other side: peerup verify {state['name']}")
    return 0


def _join(args: argparse.Namespace, settings: Settings, out: Out) -> int:
    text = args.code or os.environ.get(CODE_ENV)
    if text is None and not sys.stdin.isatty():
        text = sys.stdin.read(4096)
    code = InviteCode.parse(text or "")
    name = check_name(args.name) if args.name else None
    if name and settings.peers.get(name, code.inviter) != code.inviter:
        check_name_free(settings, name)
    plugins = _ensure_identity(settings, out)
    if code.relay not in settings.relays:
        settings.relays.append(code.relay)

    from peerup.core.invite import join

    async def main() -> int:
        runtime = Runtime(settings, plugins)
        async with runtime.node() as node:
            paired, joined = await join(runtime, node, code, name=name)
        out(f"paired with {paired.name} ({paired.peer_id})")
        if not joined.confirmed:
            out(f"warning: {paired.name} did not confirm it recorded this pairing; check there with `peerup auth list`")
        for service in paired.services:
            out(f"  service {service}: peerup proxy {paired.name} {service} LOCAL_PORT")
        out(f"compare with the other side: peerup verify {paired.name}")
        return 0

    result: int = anyio.run(main, backend="trio")
    return result


def _verify(args: argparse.Namespace, settings: Settings, out: Out) -> int:
    plugins = load_plugins(settings.plugins, settings.disable_plugins)
    peer_id = names.peer_id(plugins, settings, args.peer)
    own = plugins.identity(settings.home, "load")
    path = settings.authorized_keys_file
    parse = partial(names.parse_peer_id, plugins)
    entry = auth.AuthorizedKeys(path, parse).entry(peer_id)
    paired = entry.paired if entry else None
    out(f"verification string for {args.peer} ({'paired' if paired else 'no pairing transcript'}):")
    out(f"  {verification_string(own, peer_id, paired)}")
    out(f"run `peerup verify` for this machine on {args.peer}: the two strings must be the same")
    if entry is None:
        raise PeerupError(f"{peer_id} is not in {path}: nothing to mark verified")
    if not args.confirm:
        if not sys.stdin.isatty():
            raise ConfigError("not marked: pass --confirm once the strings matched (stdin is not a terminal)")
        answer = input("do both machines show the same string? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            raise PeerupError(
                f"not verified: if the strings differ, remove the peer (`peerup auth remove {args.peer}`)"
            )
    auth.update(path, peer_id, parse, verified=datetime.now(UTC))
    out(f"marked {args.peer} verified in {path}")
    return 0


def describe(entry: auth.Entry) -> str:
    """``auth list``'s attribute column: name, expiry (or EXPIRED), verified."""
    parts = []
    if entry.name:
        parts.append(f"name={entry.name}")
    if entry.expires:
        parts.append(("EXPIRED " if entry.expired() else "expires ") + auth.format_time(entry.expires))
    if entry.verified:
        parts.append(f"verified {auth.format_time(entry.verified)}")
    elif entry.paired:
        parts.append("paired, not verified")
    return f"  [{', '.join(parts)}]" if parts else ""
