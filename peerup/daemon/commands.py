"""The CLI commands of issue #14, kept out of cli.py: ``daemon`` and those that ask it."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from peerup.core.config_edit import add_service, remove_service
from peerup.core.errors import ConfigError
from peerup.core.plugins import PluginHost
from peerup.core.settings import Settings, default_home
from peerup.daemon import client, render
from peerup.daemon.client import DaemonNotRunning

Out = Callable[[str], None]


def daemon(settings: Settings, plugins: PluginHost, flags: dict[str, Any], out: Out) -> int:
    from peerup.daemon.process import Daemon

    anyio.run(Daemon(settings, plugins, flags, out).run, backend="trio")
    return 0


def run(command: str, args: argparse.Namespace, settings: Settings, out: Out) -> int:
    if command == "service":
        return _service(args, settings, out)
    if command in {"status", "peers", "tunnels"}:
        answer = client.request(settings, "GET", f"/v1/{command}")
        if args.json:
            out(json.dumps(answer, indent=2))
        else:
            for line in getattr(render, command)(answer):
                out(line)
        return 0
    if command == "connect":
        body = {"peer": args.peer, "service": args.service, "port": args.port, "bind": args.bind}
        tunnel = client.request(settings, "POST", "/v1/tunnels", body)
        if args.json:
            out(json.dumps(tunnel))
        else:
            out(f"tunnel {tunnel['id']}: {tunnel['bind']}:{tunnel['port']} -> {tunnel['service']} on {tunnel['peer']}")
        return 0
    assert command == "disconnect"
    client.request(settings, "DELETE", f"/v1/tunnels/{args.id}")
    out(f"closed {args.id}")
    return 0


def _service(args: argparse.Namespace, settings: Settings, out: Out) -> int:
    path = settings.config_file
    if args.service_command == "list":
        for name, service in sorted(settings.services.items()):
            allow = f"  (only {', '.join(service.allow)})" if service.allow is not None else ""
            out(f"{name}  {service.address}{allow}")
        if not settings.services:
            print(f"no services in {path}", file=sys.stderr)
        return 0
    if args.service_command == "add":
        added = add_service(path, args.name, args.address, args.allow)
        out(f"{'added' if added else 'changed'} service {args.name} -> {args.address} in {path}")
    elif remove_service(path, args.name):
        out(f"removed service {args.name} from {path}")
    else:
        print(f"peerup: error: no service {args.name!r} in {path}", file=sys.stderr)
        return 1
    try:
        client.request(settings, "POST", "/v1/reload")
        out("the running daemon reloaded its config")
    except DaemonNotRunning:
        out("no daemon is running: the change applies when it starts")
    return 0


def settings_for_client(home: Path | None, load: Callable[[], Settings]) -> Settings:
    """The settings, or only the home's defaults when config.toml does not load.

    ``status`` and ``tunnels`` ask the daemon, which still runs the last good
    config; a file broken by an edit in progress must not hide the answer.
    (A control.socket moved in the broken file is then not found: the one-line
    error names the default path it tried.)
    """
    try:
        return load()
    except ConfigError:
        return Settings.model_construct(home=(home or default_home()).expanduser().absolute())
