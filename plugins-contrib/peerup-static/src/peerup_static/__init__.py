"""``discover_peer`` from a static peer table: peer -> addresses, read from a TOML file.

Why: the built-in discovery finds peers through the private DHT whose bootstrap
node is the relay. On a LAN, a lab or a VPN where peers can reach each other
directly and nobody runs a relay, there is no DHT to ask; an address book is
enough. Select it with ``peerup run --plugin static``: it is asked before the
libp2p plugin, answers for the peers it lists, and passes (``None``) on the
others, so DHT discovery still works for them.

The table (``peers.toml`` in the peerup home unless ``[plugin.static] file``
says otherwise)::

    [peers]
    home = ["/ip4/192.168.1.20/tcp/4001"]          # a name from [peers] ...
    "12D3KooW..." = "/ip4/10.0.0.7/tcp/4001"        # ... or a peer ID; one address or a list
    nas = "/ip4/192.168.1.9/tcp/4001/p2p/12D3KooW..." # ... or a new name: addresses end in the ID

A key of the third kind is also served as a peer name (``resolve_name``), so
``peerup proxy nas ssh 2222`` works without a ``[peers]`` entry.

It is re-read when it changes, so adding a peer needs no restart.
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from peerup.core.errors import ConfigError
from peerup.core.hookspecs import hookimpl
from peerup.core.node import Node, PeerRecord
from peerup.core.settings import PluginSettings, Settings
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

__all__ = ["StaticPlugin", "StaticSettings"]

log = logging.getLogger("peerup.static")

SECTION = "static"
DEFAULT_FILE = "peers.toml"


def _addr_list(value: object) -> object:
    """One address may be written without a list around it."""
    return [value] if isinstance(value, str) else value


def _check_addrs(addrs: list[str]) -> list[str]:
    for addr in addrs:
        if not addr.startswith("/"):
            raise ValueError(f"{addr!r} is not a multiaddr (expected /ip4/HOST/tcp/PORT ...)")
    return addrs


#: One address or a list of them, each a multiaddr.
Addrs = Annotated[list[str], BeforeValidator(_addr_list), AfterValidator(_check_addrs)]


class StaticSettings(PluginSettings):
    """``[plugin.static]``: where the table is, plus peers written inline."""

    section = SECTION

    file: Path | None = Field(None, description="the table; relative to the peerup home; default peers.toml")
    peers: dict[str, Addrs] = Field({}, description="inline entries, same shape as the file's [peers]")


class _TableFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    peers: dict[str, Addrs] = {}


@dataclass(frozen=True)
class _Loaded:
    path: Path
    stamp: tuple[int, int] | None  # (mtime_ns, size); None: no file
    entries: dict[str, list[str]]


class StaticPlugin:
    """The ``static`` entry point; keeps the parsed table and re-reads it when the file changes."""

    settings_model = StaticSettings

    def __init__(self) -> None:
        self._loaded: _Loaded | None = None

    def table(self, settings: Settings) -> dict[str, list[str]]:
        """Raw entries (keys as written), inline ones first overridden by the file's."""
        section = settings.plugin_settings(StaticSettings)
        explicit = section.file is not None
        path = settings.home / (section.file or DEFAULT_FILE)
        try:
            info = os.stat(path)
            stamp: tuple[int, int] | None = (info.st_mtime_ns, info.st_size)
        except FileNotFoundError:
            if explicit:
                raise ConfigError(f"[plugin.static] file: {path} does not exist") from None
            stamp = None
        loaded = self._loaded
        if loaded is None or loaded.path != path or loaded.stamp != stamp:
            loaded = self._loaded = _Loaded(path, stamp, _read(path) if stamp is not None else {})
            if stamp is not None:
                log.info("static peer table %s: %d peer(s)", path, len(loaded.entries))
        return {**section.peers, **loaded.entries}

    def lookup(self, settings: Settings, node: Node, peer_id: str) -> list[str]:
        """Addresses for ``peer_id``, each ending in ``/p2p/<peer_id>`` as dialers expect."""
        for key, addrs in self.table(settings).items():
            try:
                listed = node.parse_peer_id(settings.resolve_peer(key))
            except ValueError as exc:
                named = _peer_in(addrs)
                if named is None:
                    raise ConfigError(
                        f"static peer table: {key!r} is neither a name in [peers], nor a peer ID, "
                        f"nor a name whose addresses end in /p2p/PEER_ID ({exc})"
                    ) from exc
                listed = node.parse_peer_id(named)
            if listed == peer_id:
                suffix = f"/p2p/{peer_id}"
                return [a if a.endswith(suffix) else a.rstrip("/") + suffix for a in addrs]
        return []

    @hookimpl
    def resolve_name(self, name: str, settings: Settings) -> str | None:
        """A table key whose addresses all name one peer (``.../p2p/ID``) is a name for it.

        So a hosts-file style table needs no ``[peers]`` entry as well:
        ``nas = "/ip4/192.168.1.9/tcp/4001/p2p/12D3KooW..."`` makes
        ``peerup proxy nas ssh 2222`` work.
        """
        addrs = self.table(settings).get(name)
        return None if addrs is None else _peer_in(addrs)

    @hookimpl
    def configure(self, settings: Settings) -> None:
        """Read the table at startup so a bad file fails fast, in one line."""
        self.table(settings)

    @hookimpl
    async def discover_peer(self, node: Node, peer_id: str, settings: Settings) -> PeerRecord | None:
        addrs = self.lookup(settings, node, peer_id)
        if not addrs:
            return None  # not ours: the next plugin (the DHT) is asked
        log.info("peer %s: %d address(es) from the static table", peer_id, len(addrs))
        return PeerRecord(peer_id, tuple(addrs), source="static")


def _peer_in(addrs: list[str]) -> str | None:
    """The peer ID every address ends with, if they all name the same one."""
    ids = {addr.rstrip("/").rpartition("/p2p/")[2] if "/p2p/" in addr else "" for addr in addrs}
    return ids.pop() if len(ids) == 1 and "" not in ids else None


def _read(path: Path) -> dict[str, list[str]]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        return _TableFile.model_validate(data).peers
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{path}: {field}: {first['msg'].removeprefix('Value error, ')}") from exc
