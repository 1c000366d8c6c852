"""From what a user typed (``home``, ``12D3KooW...``) to a checked peer ID.

One rule for every place a peer is named (``proxy``, ``ping``, ``proxies``,
``services.NAME.allow``, ``auth add``, the CLI's check before a node starts):
the ``resolve_name`` hook is asked first (the built-in ``peers`` plugin answers
from ``[peers]``), then the text is tried as a peer ID by the transport's
``parse_peer_id`` hook. So the same bad input gets the same one line wherever
it was typed, and a plugin that serves names serves them everywhere.
"""

from __future__ import annotations

from peerup.core.errors import ConfigError, PluginError
from peerup.core.plugins import PluginHost
from peerup.core.settings import Settings


def short(peer_id: str) -> str:
    """A peer ID shortened for log lines and messages: ``12D3KooW…x6nXTN``."""
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:8]}…{peer_id[-6:]}"


def parse_peer_id(plugins: PluginHost, text: str) -> str:
    """``text`` checked as a peer ID by the transport; ValueError with its reason otherwise."""
    parsed = plugins.parse_peer_id(text)
    if parsed is None:
        raise PluginError("no active plugin checks peer IDs (parse_peer_id); is the built-in 'libp2p' disabled?")
    return parsed


def peer_id(plugins: PluginHost, settings: Settings, text: str) -> str:
    """A friendly name or a peer ID, as a peer ID; one :class:`ConfigError` line otherwise."""
    resolved = plugins.resolve_name(text, settings)
    if resolved is not None:
        try:
            return parse_peer_id(plugins, resolved)
        except ValueError as exc:
            where = "in [peers]" if settings.peers.get(text) == resolved else "as resolved by a plugin"
            raise ConfigError(f"peer {text!r} {where}: {exc}") from exc
    try:
        return parse_peer_id(plugins, text)
    except ValueError as exc:
        known = ", ".join(sorted(settings.peers)) or "none configured"
        message = f"peer {text!r} is neither a name in [peers] ({known}) nor a valid peer ID: {exc}"
        raise ConfigError(message) from exc
