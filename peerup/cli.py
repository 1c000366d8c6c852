"""The ``peerup`` command: parse flags, resolve settings, load plugins, call the runtime.

Kept thin (httpie's shape): :func:`main` maps errors to exit codes and one-line
messages; the commands below only translate flags into settings and runtime
calls. Only flags the user actually gave are passed to the settings, so an absent
flag never hides the config file or the environment.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import anyio
from pydantic import ValidationError

from peerup import __version__, pairing_commands
from peerup.core import names, pairing
from peerup.core.errors import ConfigError, PeerupError
from peerup.core.plugins import PluginHost, describe_plugins, load_plugins
from peerup.core.runtime import Runtime, short, stop_on_signals
from peerup.core.settings import ProxySettings, ServiceSettings, Settings, load_settings, parse_service_flag

log = logging.getLogger("peerup")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"peerup: error: {message} (see `{self.prog} --help`)\n")


def _common(parser: argparse.ArgumentParser, node: bool = True) -> None:
    group = parser.add_argument_group("node options")
    if node:
        group.add_argument(
            "--relay",
            action="append",
            dest="relays",
            metavar="MULTIADDR",
            help="relay address .../tcp/PORT/p2p/ID (repeatable; replaces `relays` from the config)",
        )
        group.add_argument(
            "--listen",
            action="append",
            metavar="MULTIADDR",
            help="address to listen on (repeatable; default /ip4/0.0.0.0/tcp/0)",
        )
    group.add_argument(
        "--plugin",
        action="append",
        dest="plugins",
        metavar="NAME",
        help="activate an installed plugin by entry-point name (repeatable)",
    )
    group.add_argument(
        "--disable-plugin",
        action="append",
        dest="disable_plugins",
        metavar="NAME",
        help="turn off a built-in plugin (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="peerup",
        description="Reach TCP services behind NAT, peer to peer, over libp2p.",
        epilog="Settings: defaults < HOME/config.toml < PEERUP_* environment < flags. "
        "`peerup config show` prints what is in effect.",
    )
    parser.add_argument("--version", action="version", version=f"peerup {__version__}")
    parser.add_argument(
        "--home", type=Path, help="peerup home with config.toml and the key (default $PEERUP_HOME or ~/.config/peerup)"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging (-v info, -vv debug); also shows tracebacks on errors",
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    sub.add_parser("init", help="create this node's identity key in the peerup home")
    sub.add_parser("whoami", help="print this node's peer ID")

    relay = sub.add_parser("relay", help="run a relay (and DHT bootstrap node)")
    relay_sub = relay.add_subparsers(dest="relay_command", metavar="COMMAND", parser_class=_Parser)
    relay_serve = relay_sub.add_parser("serve", help="run a circuit relay v2 + private DHT bootstrap node")
    relay_serve.add_argument(
        "--listen",
        action="append",
        dest="relay_listen",
        metavar="MULTIADDR",
        help="listen address (repeatable; default /ip4/0.0.0.0/tcp/7777)",
    )
    _common(relay_serve, node=False)

    serve = sub.add_parser("serve", help="expose local services to authorized peers")
    serve.add_argument(
        "--service",
        action="append",
        default=[],
        dest="expose",
        metavar="NAME=HOST:PORT",
        help="expose a local TCP service (repeatable; adds to [services] in the config)",
    )
    _common(serve)

    proxy = sub.add_parser("proxy", help="forward a local port to a peer's service")
    proxy.add_argument("peer", help="peer ID or a name from [peers]")
    proxy.add_argument("service", help="service name on that peer")
    proxy.add_argument("port", type=_port, metavar="LOCAL_PORT", help="local port; 0 picks a free one and prints it")
    proxy.add_argument("--bind", default="127.0.0.1", metavar="ADDR", help="local address (default 127.0.0.1)")
    _common(proxy)

    ping = sub.add_parser("ping", help="check the path to a peer")
    ping.add_argument("peer", help="peer ID or a name from [peers]")
    ping.add_argument("-c", "--count", type=_positive_int, default=4, help="number of pings (default 4)")
    ping.add_argument(
        "--interval", type=_positive_float, default=1.0, metavar="S", help="seconds between pings (default 1)"
    )
    ping.add_argument("--json", action="store_true", help="print one JSON object at the end (docs/operations.md)")
    _common(ping)

    run = sub.add_parser("run", help="run a whole node from settings: services and proxies")
    run.add_argument(
        "--service",
        action="append",
        default=[],
        dest="expose",
        metavar="NAME=HOST:PORT",
        help="expose a local TCP service (repeatable)",
    )
    run.add_argument(
        "--proxy",
        action="append",
        default=[],
        dest="forward",
        metavar="PEER:SERVICE:PORT",
        help="forward 127.0.0.1:PORT to SERVICE on PEER (repeatable)",
    )
    _common(run)

    auth = sub.add_parser("auth", help="manage the peers allowed to use this node's services")
    auth_sub = auth.add_subparsers(dest="auth_command", metavar="COMMAND", parser_class=_Parser)
    auth_add = auth_sub.add_parser("add", help="authorize a peer (takes effect on a running node)")
    auth_add.add_argument("peer", help="peer ID, or a name from [peers]")
    auth_add.add_argument("--comment", default="", help="a note kept after the ID, e.g. the machine's name")
    auth_add.add_argument("--expires", metavar="WHEN", help="refuse the peer from then on: 7d, 12h, or 2026-12-31")
    auth_sub.add_parser("list", help="list authorized peers")
    auth_remove = auth_sub.add_parser("remove", help="revoke a peer (a running node also closes its open tunnels)")
    auth_remove.add_argument("peer", help="peer ID, or a name from [peers]")

    plugins = sub.add_parser("plugins", help="list installed plugins and whether they are active")
    _common(plugins, node=False)

    config = sub.add_parser("config", help="inspect settings")
    config_sub = config.add_subparsers(dest="config_command", metavar="COMMAND", parser_class=_Parser)
    show = config_sub.add_parser(
        "show", help="print the resolved settings as TOML, with each active plugin's [plugin.NAME] and its defaults"
    )
    _common(show, node=False)
    config_sub.add_parser("path", help="print the config file path")
    validate = config_sub.add_parser("validate", help="check a config file; list every error with its key")
    validate.add_argument("file", nargs="?", type=Path, help="the file to check (default: HOME/config.toml)")
    _daemon_commands(sub)
    pairing_commands.add_parsers(sub, _common)
    return parser


#: Commands that only talk to a running daemon: they work while config.toml is being fixed.
_ASKS_DAEMON = {"status", "peers", "tunnels", "connect", "disconnect"}


def _daemon_commands(sub: Any) -> None:
    """``peerup daemon`` and the commands that ask a running one (docs/operations.md)."""
    daemon = sub.add_parser("daemon", help="run this node as a service: config, [tunnels], control API, reload")
    _common(daemon)
    for name, text in (
        ("status", "this node: peer ID, addresses, relay slots, reachability, uptime"),
        ("peers", "connected peers: path, round trip, since when"),
        ("tunnels", "open tunnels and connections: bytes each way, age"),
    ):
        command = sub.add_parser(name, help=f"{text} (asks the daemon)")
        command.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    connect = sub.add_parser("connect", help="open a tunnel in the running daemon: LOCAL_PORT -> SERVICE on PEER")
    connect.add_argument("peer", help="peer ID or a name from [peers]")
    connect.add_argument("service", help="service name on that peer")
    connect.add_argument("port", type=_port, metavar="LOCAL_PORT", help="local port; 0 picks a free one")
    connect.add_argument("--bind", default="127.0.0.1", metavar="ADDR", help="local address (default 127.0.0.1)")
    connect.add_argument("--json", action="store_true", help="print the new tunnel as JSON")
    disconnect = sub.add_parser("disconnect", help="close a tunnel or connection of the running daemon by ID")
    disconnect.add_argument("id", help="an ID from `peerup tunnels`")
    service = sub.add_parser("service", help="edit [services] in the config; a running daemon picks it up")
    service_sub = service.add_subparsers(dest="service_command", metavar="COMMAND", parser_class=_Parser)
    add = service_sub.add_parser("add", help="expose (or change) a local service")
    add.add_argument("name", help="service name (lowercase letters, digits, - and _)")
    add.add_argument("address", metavar="HOST:PORT", help="where the local service listens")
    add.add_argument("--allow", action="append", metavar="PEER", help="only these peers (repeatable)")
    remove = service_sub.add_parser("remove", help="stop exposing a service (its open tunnels close)")
    remove.add_argument("name")
    service_sub.add_parser("list", help="list the services in the config")


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """Settings overrides from the flags that were given, and only those."""
    flags: dict[str, Any] = {}
    for name in ("relays", "listen", "plugins", "disable_plugins"):
        value = getattr(args, name, None)
        if value:
            flags[name] = value
    if args.log_level:
        flags["log_level"] = args.log_level
    if getattr(args, "relay_listen", None):
        flags["relay"] = {"listen": args.relay_listen}
    return flags


def _settings(args: argparse.Namespace) -> Settings:
    # pydantic-settings deep-merges its sources: a flag for one nested field
    # (relay.listen) keeps the file's and environment's other relay settings.
    settings = load_settings(args.home, **_flags(args))
    for text in getattr(args, "expose", []):
        name, address = parse_service_flag(text)
        try:
            settings.services[name] = ServiceSettings(name=name, address=address)
        except ValidationError as exc:
            raise ConfigError(f"--service {text!r}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from exc
    for text in getattr(args, "forward", []):
        peer, service, port = [*text.rsplit(":", 2), "", ""][:3]
        if not peer or not service or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"--proxy {text!r}: expected PEER:SERVICE:PORT, e.g. home:ssh:2222")
        settings.proxies.append(_proxy_settings(f"--proxy {text!r}", peer=peer, service=service, port=int(port)))
    return settings


def _proxy_settings(where: str, **values: Any) -> ProxySettings:
    """A proxy from flags, held to the config file's rules (service name, port); bad input is one line."""
    try:
        return ProxySettings(**values)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from exc


def _check_peer(plugins: PluginHost, settings: Settings, text: str) -> None:
    """Refuse a peer that is neither a ``[peers]`` name nor a peer ID, before any node starts.

    The runtime checks it again once its node is up; checking here spares the
    user seconds of node start-up and its log lines before the one line that
    matters. Names and IDs are checked by the active plugins' ``resolve_name``
    and ``parse_peer_id``, exactly as the runtime will.
    """
    names.peer_id(plugins, settings, text)


def _setup_logging(settings: Settings | None, verbose: int, explicit: str | None) -> None:
    level = explicit or (settings.log_level if settings else "warning")
    if verbose:
        level = "debug" if verbose > 1 else "info"
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def _plugins(settings: Settings) -> PluginHost:
    return load_plugins(settings.plugins, settings.disable_plugins)


def _out(line: str) -> None:
    print(line, flush=True)


# -- commands --------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    peer_id = _plugins(settings).identity(settings.home, "create")
    _out(f"created identity in {settings.home}")
    _out(peer_id)
    return 0


def cmd_whoami(args: argparse.Namespace, settings: Settings) -> int:
    _out(_plugins(settings).identity(settings.home, "load"))
    return 0


def cmd_auth(args: argparse.Namespace, settings: Settings) -> int:
    from peerup.core import auth

    plugins = _plugins(settings)
    parse_peer_id = partial(names.parse_peer_id, plugins)
    path = settings.authorized_keys_file
    if args.auth_command == "list":
        keys = auth.AuthorizedKeys(path, parse_peer_id)
        keys.refresh()  # logs each malformed line with its number
        labels = {peer_id: name for name, peer_id in settings.peers.items()}
        for entry in keys.entries:
            label = f"  ({labels[entry.peer_id]})" if entry.peer_id in labels else ""
            _out(f"{entry.peer_id}  {entry.comment}{label}{pairing_commands.describe(entry)}".rstrip())
        if not keys.entries:
            print(f"no authorized peers in {path}", file=sys.stderr)
        return 0
    peer_id = names.peer_id(plugins, settings, args.peer)
    if args.auth_command == "add":
        if auth.add(path, peer_id, args.comment, parse_peer_id, pairing.parse_expiry(args.expires)):
            _out(f"authorized {peer_id}")
        else:
            _out(f"{peer_id} was already authorized")
        return 0
    if auth.remove(path, peer_id, parse_peer_id):
        _out(f"removed {peer_id}")
        return 0
    print(f"peerup: {peer_id} was not in {path}", file=sys.stderr)
    return 1


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    import tomli_w

    if args.config_command == "path":
        _out(str(settings.config_file))
        return 0
    data = _drop_none(settings.model_dump(mode="json"))
    plugins = _plugins(settings)
    plugins.check_settings(settings)
    for _name, model in plugins.declared_settings():  # every active plugin's section, defaults filled in
        section = settings.plugin_settings(model).model_dump(mode="json")
        data.setdefault("plugin", {})[model.section] = _drop_none(section)
    _out(f"# resolved: defaults < {settings.config_file} < PEERUP_* < flags; unset timeouts mean 'none'")
    sys.stdout.write(tomli_w.dumps(data))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Runs before settings are loaded: the point is to report a file that would not load."""
    from peerup.core.settings import CONFIG_NAME, default_home
    from peerup.core.validate import problems

    path = args.file or (args.home or default_home()).expanduser() / CONFIG_NAME
    found = problems(path)
    for line in found:
        print(f"{path}: {line}", file=sys.stderr)
    if found:
        print(f"peerup: error: {path}: {len(found)} error(s)", file=sys.stderr)
        return 2
    _out(f"{path}: valid")
    return 0


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def cmd_plugins(args: argparse.Namespace, settings: Settings) -> int:
    rows = describe_plugins(settings.plugins, settings.disable_plugins)
    header = ("NAME", "DISTRIBUTION", "ACTIVE", "HOOKS")
    table = [header] + [
        (row.name, f"{row.distribution} {row.version}", "yes" if row.active else "no", ", ".join(row.hooks))
        for row in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for row in table:
        _out("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
    return 0


async def _relay(settings: Settings) -> None:
    runtime = Runtime(settings, _plugins(settings))
    with anyio.CancelScope() as scope:
        async with stop_on_signals(scope), runtime.node("relay") as node:
            _out(f"relay {node.peer_id} listening on:")
            for addr in node.listen_addrs():
                _out(f"  {addr}")
            from peerup.daemon.relay import serve_relay_extras

            await serve_relay_extras(runtime, node, _out)  # metrics, /healthz, sd_notify; until cancelled


async def _run(settings: Settings, plugins: PluginHost, services: bool, proxies: list[ProxySettings]) -> None:
    """Serve and/or proxy until SIGINT/SIGTERM, then drain open tunnels for a bounded time.

    The first signal cancels only ``accepting`` (listeners close, no new
    connections); the node and open tunnels live on for ``timeouts.drain``.
    """
    runtime = Runtime(settings, plugins)
    accepting = anyio.CancelScope()
    async with stop_on_signals(accepting), runtime.node() as node, anyio.create_task_group() as tunnels:
        with accepting:
            _out(f"peer {node.peer_id}")
            if services:
                if not settings.services and not proxies:
                    log.warning("nothing to do: add --service NAME=HOST:PORT, [services] or [[proxies]] to the config")
                runtime.expose(node, settings.services)
                tunnels.start_soon(runtime.watch_authorized_keys)
                for service in settings.services.values():
                    _out(f"serving {service.name} -> {service.address}")
            for addr in node.listen_addrs():
                _out(f"  reachable at {addr}")
            async with anyio.create_task_group() as listeners:
                for proxy in proxies:
                    port = await listeners.start(runtime.serve_proxy, node, proxy, tunnels)
                    _out(f"forwarding {proxy.bind}:{port} -> {proxy.service} on {proxy.peer}")
                await anyio.sleep_forever()
        if runtime.open_tunnels:
            log.warning("waiting up to %g s for %d open connections", settings.timeouts.drain, runtime.open_tunnels)
            if not await runtime.drain(settings.timeouts.drain):
                log.warning("closing %d connections still open", runtime.open_tunnels)
        tunnels.cancel_scope.cancel()


async def _ping(
    settings: Settings, plugins: PluginHost, peer: str, count: int, interval: float, as_json: bool = False
) -> int:
    runtime = Runtime(settings, plugins)
    if as_json:
        return await _ping_json(runtime, peer, count, interval)
    async with runtime.node() as node:
        last: list[str] = []

        def reply(seq: int, rtt: float | None, path: str) -> None:
            if last and path != last[-1]:
                _out(f"path changed: {last[-1]} -> {path}")
            last.append(path)
            _out(f"seq={seq} time={rtt * 1000:.2f} ms path={path}" if rtt is not None else f"seq={seq} timed out")

        peer_id = runtime.peer_id(node, peer)
        _out(f"PING {peer} ({short(peer_id)})")
        stats = await runtime.ping(node, peer, count, interval, reply)
        changed = f", first {stats.first_path}" if stats.first_path != stats.path else ""
        _out(f"--- {peer} via {stats.path} path (found: {stats.source}{changed}) ---")
        _out(stats.summary())
        return 0 if stats.received else 1


async def _ping_json(runtime: Runtime, peer: str, count: int, interval: float) -> int:
    import json

    async with runtime.node() as node:
        stats = await runtime.ping(node, peer, count, interval)
    _out(json.dumps(stats.as_json(peer)))
    return 0 if stats.received else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(None, args.verbose, args.log_level)
    try:
        if args.command == "config" and args.config_command == "validate":
            return cmd_validate(args)
        if args.command in _ASKS_DAEMON:
            from peerup.daemon.commands import settings_for_client

            settings = settings_for_client(args.home, lambda: _settings(args))
        else:
            settings = _settings(args)
        _setup_logging(settings, args.verbose, args.log_level)
        return _dispatch(parser, args, settings)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        error = _user_error(exc)
        if error is None:
            raise
        print(f"peerup: error: {error}", file=sys.stderr)
        if args.verbose:
            traceback.print_exception(exc)
        return error.exit_code


def _user_error(exc: BaseException) -> PeerupError | None:
    """The first PeerupError, also from inside a task group's ExceptionGroup."""
    if isinstance(exc, PeerupError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _user_error(inner)
            if found is not None:
                return found
    return None


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace, settings: Settings) -> int:
    command = args.command
    if command == "init":
        return cmd_init(args, settings)
    if command == "whoami":
        return cmd_whoami(args, settings)
    if command == "config":
        if args.config_command is None:
            parser.parse_args(["config", "--help"])
        return cmd_config(args, settings)
    if command == "plugins":
        return cmd_plugins(args, settings)
    if command == "auth":
        if args.auth_command is None:
            parser.parse_args(["auth", "--help"])
        return cmd_auth(args, settings)
    if command == "relay":
        if args.relay_command is None:
            parser.parse_args(["relay", "--help"])
        anyio.run(_relay, settings, backend="trio")
        return 0
    if command == "serve":
        anyio.run(_run, settings, _plugins(settings), True, [], backend="trio")
        return 0
    if command == "run":
        plugins = _plugins(settings)  # loaded once: the peer checks and the node use the same host
        for forward in settings.proxies:
            _check_peer(plugins, settings, forward.peer)
        anyio.run(_run, settings, plugins, True, list(settings.proxies), backend="trio")
        return 0
    if command == "proxy":
        plugins = _plugins(settings)
        _check_peer(plugins, settings, args.peer)
        proxy = _proxy_settings("proxy SERVICE", peer=args.peer, service=args.service, port=args.port, bind=args.bind)
        anyio.run(_run, settings, plugins, False, [proxy], backend="trio")
        return 0
    if command == "ping":
        plugins = _plugins(settings)
        _check_peer(plugins, settings, args.peer)
        code: int = anyio.run(_ping, settings, plugins, args.peer, args.count, args.interval, args.json, backend="trio")
        return code
    if command in pairing_commands.COMMANDS:
        return pairing_commands.run(command, args, settings, _out)
    if command in {"daemon", "status", "peers", "tunnels", "connect", "disconnect", "service"}:
        from peerup.daemon import commands

        if command == "service" and args.service_command is None:
            parser.parse_args(["service", "--help"])
        if command == "daemon":
            return commands.daemon(settings, _plugins(settings), _flags(args), _out)
        return commands.run(command, args, settings, _out)
    parser.error(f"unknown command {command!r}")


def entry() -> NoReturn:
    sys.exit(main())
