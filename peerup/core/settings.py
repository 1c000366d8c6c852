"""Settings: defaults < config file < environment < command-line flags.

The config file is ``config.toml`` in the peerup home (``~/.config/peerup``
unless ``--home`` or ``PEERUP_HOME`` says otherwise), so several nodes can live
on one machine, each with its own home. Environment variables are ``PEERUP_*``
with ``__`` between nested names (``PEERUP_TIMEOUTS__LOCAL_DIAL=5``).

Timeouts are in seconds; ``None`` means "no timeout". The defaults are the
seed's (docs/adr/0003-timeouts-and-retries.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from peerup.core.errors import ConfigError

CONFIG_NAME = "config.toml"
#: Matched with fullmatch: ``$`` would also accept a name ending in a newline.
_SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def default_home() -> Path:
    env = os.environ.get("PEERUP_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "peerup"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PluginSettings(BaseModel):
    """Base for a plugin's own settings, its ``[plugin.SECTION]`` of config.toml.

    A plugin declares its model as ``settings_model = MySettings`` (a class or
    module attribute); peerup validates the section once when the plugin is
    activated, so a typo stops ``peerup run`` with one line naming the file and
    key, and ``peerup config show`` prints the section with its defaults. The
    plugin reads the typed object with ``settings.plugin_settings(MySettings)``.
    Unknown keys are refused, like in peerup's own sections.
    """

    model_config = ConfigDict(extra="forbid")

    #: The ``NAME`` of ``[plugin.NAME]``; by convention the plugin's entry-point name.
    section: ClassVar[str]


class Timeouts(_Strict):
    """The seed's timeouts (ADR-A01). ``idle`` is off: SSH sessions live long."""

    local_dial: float = Field(10.0, gt=0, description="connect to the local service")
    service_stream: float = Field(30.0, gt=0, description="discover + dial + open a peer stream")
    idle: float | None = Field(None, gt=0, description="close a tunnel idle this long; unset = never")
    drain: float = Field(10.0, ge=0, description="on shutdown, wait this long for open tunnels")
    keepalive: float | None = Field(15.0, gt=0, description="ping each connected peer this often; unset = never")
    keepalive_timeout: float = Field(10.0, gt=0, description="a peer that does not answer in time is disconnected")


class Retry(_Strict):
    """Exponential backoff (ADR-A02): initial, initial*2, ... capped at max_delay."""

    retries: int = Field(3, ge=0, le=1000)
    initial: float = Field(1.0, ge=0)
    multiplier: float = Field(2.0, ge=1)
    max_delay: float = Field(60.0, ge=0)


class ServiceSettings(_Strict):
    """A named local TCP service; unset timeouts fall back to the global ones."""

    name: str = ""
    address: str
    local_dial_timeout: float | None = Field(None, gt=0)
    service_stream_timeout: float | None = Field(
        None, gt=0, description="no effect: the client waits, so set proxies[].service_stream_timeout there"
    )
    idle_timeout: float | None = Field(None, gt=0)
    allow: list[str] | None = Field(
        None, description="peers (IDs or [peers] names) allowed to use this service; unset = all authorized peers"
    )

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @field_validator("service_stream_timeout")
    @classmethod
    def _client_side_only(cls, value: float | None) -> float | None:
        # Accepted so that old configs still start, but said: it never did anything here.
        if value is not None:
            logging.getLogger("peerup.settings").warning(
                "services.*.service_stream_timeout has no effect on the serving node; "
                "set service_stream_timeout on the client's [[proxies]] entry (or [timeouts] service_stream)"
            )
        return value

    @property
    def host(self) -> str:
        return parse_host_port(self.address)[0]

    @property
    def port(self) -> int:
        return parse_host_port(self.address)[1]

    @property
    def protocol(self) -> str:
        return service_protocol(self.name)


class ProxySettings(_Strict):
    """A local port that ``peerup run`` forwards to a peer's service."""

    peer: str
    service: str
    port: int = Field(ge=0, le=65535)
    bind: str = "127.0.0.1"
    service_stream_timeout: float | None = Field(
        None, gt=0, description="seconds per attempt to reach the service; unset = timeouts.service_stream"
    )

    @field_validator("service")
    @classmethod
    def _service_name(cls, value: str) -> str:
        return check_service_name(value)


class ControlSettings(_Strict):
    """The daemon's local control API (docs/operations.md, docs/adr/0014-control-api.md)."""

    socket: Path | None = Field(None, description="Unix socket of the control API; unset = HOME/control.sock")


class MetricsSettings(_Strict):
    """Opt-in Prometheus endpoint of ``peerup daemon`` and ``peerup relay serve`` (docs/operations.md)."""

    enabled: bool = Field(False, description="serve /metrics and /healthz over HTTP")
    listen: str = Field("127.0.0.1:9464", description="HOST:PORT of the metrics endpoint (port 0 picks one)")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{value!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
        return value


class LimitsSettings(_Strict):
    """What one node gives strangers before and after they prove who they are (docs/security.md).

    The defaults hold on a 2-core relay with a few hundred peers; the worst
    case memory they allow is worked out in docs/security.md ("Sizing a relay").
    """

    max_connections: int = Field(2048, ge=1, description="open connections, inbound and outbound together")
    max_pending: int = Field(256, ge=1, description="inbound connections still in their handshake; the oldest yields")
    max_pending_per_ip: int = Field(16, ge=1, description="handshakes in progress from one source address")
    handshake_timeout: float = Field(5.0, gt=0, description="seconds for a new connection's Noise + yamux handshake")
    max_streams_per_connection: int = Field(
        4096, ge=1, description="streams a peer may hold open on one connection (all tunnels of a peer pair share it)"
    )
    max_stream_window: int = Field(16 * 1024 * 1024, ge=256 * 1024, description="largest receive window of a stream")
    window_growth_per_connection: int = Field(
        64 * 1024 * 1024, ge=0, description="receive-window growth beyond 256 KiB, all streams of a connection"
    )
    max_buffered: int = Field(
        512 * 1024 * 1024, ge=1024 * 1024, description="unread bytes in all connections before the largest is closed"
    )


class NatSettings(_Strict):
    """How a node behind NAT tries to get a direct path (docs/nat.md)."""

    hole_punching: bool = Field(True, description="upgrade relayed connections with DCUtR hole punching")
    port_mapping: bool = Field(
        True, description="ask the router (NAT-PMP, then UPnP IGD) to forward the TCP listen port"
    )
    address_discovery: bool = Field(
        True, description="learn the address the outside sees and confirm it with a dial-back before advertising it"
    )


class AuthSettings(_Strict):
    """Who may open service streams (docs/security.md)."""

    allow_all: bool = Field(False, description="DANGER: serve any peer, ignoring authorized_keys")
    max_streams_per_peer: int = Field(256, ge=1, description="open service streams one peer may hold")


class RelaySettings(_Strict):
    """Limits for ``peerup relay serve``; defaults suit long SSH sessions and many peers."""

    listen: list[str] = ["/ip4/0.0.0.0/tcp/7777"]
    allow: list[str] = Field([], description="peer IDs allowed to reserve and open circuits; empty = anyone")
    max_circuits: int = Field(1024, ge=1, description="relayed connections at once, all peers together")
    max_reservations: int = Field(1024, ge=1)
    max_circuits_per_peer: int = Field(64, ge=1)
    reservation_ttl: float = Field(3600.0, gt=0)
    circuit_duration: float = Field(24 * 3600.0, gt=0)
    circuit_data: int | None = Field(None, gt=0, description="bytes per circuit; unset = no cap")


def _tunnel_name(name: str) -> str:
    """A tunnel's name is its ID in ``peerup tunnels`` and ``disconnect``: the service-name rule."""
    try:
        return check_service_name(name)
    except ValueError as exc:
        raise ValueError(str(exc).replace("service name", "tunnel name", 1)) from None


#: Checked as a key, apart from the entry, so a bad name and a bad entry are both reported.
TunnelName = Annotated[str, AfterValidator(_tunnel_name)]

#: Transports a host can dial and listen with (peerup/plugins/libp2p/transports.py).
Transport = Literal["tcp", "ws"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PEERUP_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    home: Path = Field(default_factory=default_home)
    log_level: str = "warning"
    listen: list[str] = ["/ip4/0.0.0.0/tcp/0"]
    relays: list[str] = []
    plugins: list[str] = Field([], description="extra plugins to activate, by entry-point name")
    disable_plugins: list[str] = Field([], description="built-in plugins to turn off")
    peers: dict[str, str] = Field({}, description="friendly name -> peer ID")
    services: dict[str, ServiceSettings] = {}
    proxies: list[ProxySettings] = []
    tunnels: dict[TunnelName, ProxySettings] = Field(
        {}, description="persistent tunnels [tunnels.NAME] the daemon opens at start and keeps across reloads"
    )
    control: ControlSettings = ControlSettings()
    metrics: MetricsSettings = MetricsSettings()
    timeouts: Timeouts = Timeouts()
    retry: Retry = Retry()
    relay: RelaySettings = RelaySettings()
    plugin: dict[str, dict[str, Any]] = Field(
        {}, description="per-plugin sections, [plugin.NAME]; each plugin declares its model (PluginSettings)"
    )
    _plugin_objects: dict[type[BaseModel], BaseModel] = PrivateAttr(default_factory=dict)
    auth: AuthSettings = AuthSettings()
    limits: LimitsSettings = LimitsSettings()
    transports: list[Transport] = Field(
        ["tcp"], min_length=1, description="transports to dial and listen with: tcp, ws (WebSocket)"
    )
    nat: NatSettings = NatSettings()

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.lower()
        if value not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError("expected one of debug, info, warning, error, critical")
        return value

    @field_validator("services")
    @classmethod
    def _names(cls, value: dict[str, ServiceSettings]) -> dict[str, ServiceSettings]:
        for name, service in value.items():
            service.name = check_service_name(name)
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: flags (init kwargs) > environment > config file > defaults.
        toml_path = _CONFIG_FILE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, _EnvSource(settings_cls)]
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    @property
    def config_file(self) -> Path:
        return self.home / CONFIG_NAME

    @property
    def authorized_keys_file(self) -> Path:
        return self.home / "authorized_keys"

    @property
    def control_socket(self) -> Path:
        return self.control.socket or self.home / "control.sock"

    @property
    def control_cookie(self) -> Path:
        """The daemon's secret for API clients; a new one each start, readable by its user only."""
        return self.control_socket.with_name(self.control_socket.name + ".cookie")

    def service(self, name: str) -> ServiceSettings:
        return self.services[name]

    def local_dial_timeout(self, service: ServiceSettings | None) -> float:
        if service is not None and service.local_dial_timeout is not None:
            return service.local_dial_timeout
        return self.timeouts.local_dial

    def service_stream_timeout(self, service: ServiceSettings | None) -> float:
        if service is not None and service.service_stream_timeout is not None:
            return service.service_stream_timeout
        return self.timeouts.service_stream

    def idle_timeout(self, service: ServiceSettings | None) -> float | None:
        if service is not None and service.idle_timeout is not None:
            return service.idle_timeout
        return self.timeouts.idle

    def plugin_settings(self, model: type[P]) -> P:
        """The plugin's ``[plugin.SECTION]`` as its typed model, validated once per Settings.

        peerup validates every active plugin's declared section at start-up
        (:meth:`peerup.core.plugins.PluginHost.check_settings`); later calls
        return the same object, so a hook may call this on every connection.
        """
        cached = self._plugin_objects.get(model)
        if cached is None:
            cached = self._plugin_objects[model] = plugin_section(self, model.section, model)
        assert isinstance(cached, model)
        return cached

    def resolve_peer(self, name_or_id: str) -> str:
        """A friendly name from ``[peers]``, else the text itself (validated by the node)."""
        return self.peers.get(name_or_id, name_or_id)


# The TOML source needs the path before the model exists; load_settings sets it.
_CONFIG_FILE: dict[str, Path | None] = {"path": None}

#: What to copy into a PEERUP_* variable whose setting is a list or a table.
_JSON_EXAMPLES = {
    "relays": '["/ip4/203.0.113.7/tcp/7777/p2p/12D3KooW..."]',
    "listen": '["/ip4/0.0.0.0/tcp/4001"]',
    "relay.listen": '["/ip4/0.0.0.0/tcp/7777"]',
    "relay.allow": '["12D3KooW..."]',
    "peers": '{"home": "12D3KooW..."}',
    "plugins": '["jitter-retry"]',
    "disable_plugins": '["proxy"]',
    "proxies": '[{"peer": "home", "service": "ssh", "port": 2222}]',
    "services": '{"ssh": {"address": "127.0.0.1:22"}}',
    "transports": '["tcp", "ws"]',
}


class _NotJson(ValueError):
    """A PEERUP_* variable for a list or table setting did not hold JSON; ``str()`` is the user's line.

    A ValueError, so pydantic-settings still falls back to the raw text where it
    allows that (``list[str] | None`` fields), and the model then says what it expected.
    """


class _EnvSource(EnvSettingsSource):
    """PEERUP_* variables, where a list or table that is not JSON is one line naming the variable.

    pydantic-settings decodes those settings as JSON and, when that fails, raises
    a SettingsError that names only the top-level field ("relay" for
    PEERUP_RELAY__LISTEN) with the JSON error as its cause: a traceback for the
    user, and no hint that JSON was wanted.
    """

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError as exc:
            name = self._variable(field_name, value)
            setting = name.removeprefix("PEERUP_").lower().replace("__", ".")
            example = f"{name}='{_JSON_EXAMPLES[setting]}'" if setting in _JSON_EXAMPLES else self._example(name, field)
            raise _NotJson(f"environment variable {name}: expects JSON, e.g. {example}; got {value!r}") from exc

    @staticmethod
    def _example(name: str, field: FieldInfo | None) -> str:
        """For settings without an entry in _JSON_EXAMPLES: a list, or a table (also settable key by key)."""
        annotation = field.annotation if field is not None else None
        if get_origin(annotation) is list:
            return f"{name}='[\"...\"]'"
        return f'{name}=\'{{"key": "value"}}\' (or one key at a time: {name}__KEY=value)'

    def _variable(self, key: str, value: Any) -> str:
        """The variable that held ``value`` for ``key`` (a field, or the last part of a nested name)."""
        key = key.lower()
        for name, text in self.env_vars.items():
            if text == value and (name == f"{self.env_prefix}{key}".lower() or name.lower().endswith(f"__{key}")):
                return name.upper()
        return f"{self.env_prefix}{key}".upper()


def service_protocol(name: str) -> str:
    return f"/peerup/service/{name}/1.0.0"


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: expected HOST:PORT with a port from 1 to 65535")
    return host, int(port_text)


def check_service_name(name: str) -> str:
    """``name`` if it may name a service, else ``ValueError`` with a one-line reason.

    The one rule for the config file, the environment and every flag that names
    a service (``--service``, ``--proxy``, ``proxy``'s SERVICE): the name goes
    into a libp2p protocol ID (:func:`service_protocol`) and into log lines, where
    a space, a slash or a newline would break them or forge a line.
    """
    if not _SERVICE_NAME.fullmatch(name):
        raise ValueError(
            f"service name {name!r}: expected lowercase letters, digits, '-' or '_' "
            "(1-63 of them, starting with a letter or digit)"
        )
    return name


def parse_service_flag(text: str) -> tuple[str, str]:
    """``NAME=HOST:PORT`` from ``--service``, checked before it reaches the model.

    The name is checked here because the CLI adds the service to settings that
    are already validated, so the model's validator would not see it.
    """
    name, sep, address = text.partition("=")
    if not sep or not name:
        raise ConfigError(f"--service {text!r}: expected NAME=HOST:PORT, e.g. ssh=127.0.0.1:22")
    try:
        check_service_name(name)
    except ValueError as exc:
        raise ConfigError(f"--service {text!r}: {exc}") from exc
    return name, address


def load_settings(home: Path | None = None, **flags: Any) -> Settings:
    """Resolve settings from every layer; a bad value is one :class:`ConfigError` line.

    ``flags`` are only the command-line flags the user gave (as uvicorn does), so
    an absent flag never masks the file or the environment.
    """
    home = (home or default_home()).expanduser().absolute()
    path = home / CONFIG_NAME
    if path.exists():
        try:
            with path.open("rb") as fh:
                tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        except UnicodeDecodeError as exc:  # tomllib decodes the whole file before parsing
            line = exc.object[: exc.start].count(b"\n") + 1
            raise ConfigError(
                f"{path}: not UTF-8 text (line {line}: byte {exc.object[exc.start]:#04x}); TOML files must be UTF-8"
            ) from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    _CONFIG_FILE["path"] = path if path.exists() else None
    try:
        return Settings(home=home, **flags)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, path, flags)) from exc
    except SettingsError as exc:  # a source failed before validation: so far only the environment's JSON
        cause = exc.__cause__
        raise ConfigError(str(cause) if isinstance(cause, _NotJson) else f"environment: {exc}") from exc
    finally:
        _CONFIG_FILE["path"] = None


def _one_line(exc: ValidationError, path: Path, flags: dict[str, Any]) -> str:
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"]]
    field = ".".join(loc) or "settings"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{_source_of(loc, path, flags)}: {field}: {_describe(first)}{more}"


def _describe(error: Any) -> str:
    """pydantic's message for one error, with the offending value when it is short."""
    got = error.get("input")
    shown = "" if isinstance(got, dict | list) or got is None else f", got {got!r}"
    return f"{error['msg'].removeprefix('Value error, ')}{shown}"


M = TypeVar("M", bound=BaseModel)
P = TypeVar("P", bound=PluginSettings)


def plugin_section(settings: Settings, name: str, model: type[M]) -> M:
    """Validate a plugin's own ``[plugin.NAME]`` section with the plugin's model.

    peerup keeps each section as plain data; the plugin owns the schema. A bad
    value is one :class:`ConfigError` line naming where it came from (file or
    ``PEERUP_PLUGIN__NAME__FIELD``), the section and the field, like peerup's
    own settings. Lists and tables given in the environment as JSON are decoded.
    """
    raw = {key: _json_or_text(value) for key, value in settings.plugin.get(name, {}).items()}
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(part) for part in first["loc"]]
        where = f"[plugin.{name}] {'.'.join(loc)}:" if loc else f"[plugin.{name}]"  # model-level checks: no field
        source = _source_of(["plugin", name, *loc], settings.config_file, {})
        raise ConfigError(f"{source}: {where} {_describe(first)}") from exc


def _json_or_text(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # left as text: the model says what it expected
    return value


def _source_of(loc: list[str], path: Path, flags: dict[str, Any]) -> str:
    """Name the layer that supplied the bad value, so the user knows what to edit."""
    if loc and loc[0] in flags:
        return f"command-line flag for {loc[0]}"
    for depth in range(len(loc), 0, -1):
        name = "PEERUP_" + "__".join(loc[:depth]).upper()
        if name in os.environ:
            return f"environment variable {name}"
    return str(path) if path.exists() else "settings"
