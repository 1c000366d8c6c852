"""``resolve_name`` from the ``[peers]`` table: the names a user wrote in config.toml.

A plugin like the others, so a deployment that keeps names elsewhere (a
directory, DNS) can turn it off (``--disable-plugin peers``) or answer names
this table does not know. It is asked first (``tryfirst``): a name the user
wrote in the config is the user's own word, and a plugin must not redirect it.
"""

from __future__ import annotations

from peerup.core.hookspecs import hookimpl
from peerup.core.settings import Settings


@hookimpl(tryfirst=True)
def resolve_name(name: str, settings: Settings) -> str | None:
    return settings.peers.get(name)
