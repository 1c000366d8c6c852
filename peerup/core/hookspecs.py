"""The hook contract plugin authors code against.

Every arrow of the data path is one hook::

    name -> discover_peer -> dial (wrapped by retry_policy) -> stream -> proxy_stream <-> TCP

plus ``open_node``, which starts the transport those hooks use, and
``configure``, which lets each plugin check its own settings at start-up.

How async hooks are called
--------------------------
pluggy calls hook implementations synchronously, and its ``firstresult`` stops at
the first non-``None`` return, which for an ``async def`` is always the coroutine
object itself. So the async hooks here are *not* declared ``firstresult``. The
core (:mod:`peerup.core.plugins`) calls the hook, gets one result per
implementation in pluggy's order (plugins registered later run first; honour
``tryfirst``/``trylast``), then awaits them one at a time and **stops at the first
result that is not None**. Coroutines after the winner are closed unstarted, so
an implementation that loses does no work. An implementation may also be a plain
``def`` returning a value (or ``None``); the core treats it the same way.

Selected plugins (``peerup run --plugin NAME``) are registered after the
built-ins, so they are asked first and win over a built-in that answers the same
hook. Returning ``None`` means "not mine, ask the next plugin".

Errors
------
A hook implementation raises a :class:`peerup.core.errors.PeerupError` subclass
for a failure the user should see (peer not found, refused, ...). Any other
exception is reported as a bug in that plugin, named, in one line.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from anyio.abc import ByteStream

    from peerup.core.node import Node, PeerRecord
    from peerup.core.retry import RetryPolicy
    from peerup.core.settings import ServiceSettings, Settings

PROJECT = "peerup"

#: Marks the specs below; pluggy's markers are typed, so signatures survive decoration.
hookspec = pluggy.HookspecMarker(PROJECT)
#: What plugin authors decorate implementations with; accepts ``tryfirst``/``trylast``.
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def configure(settings: Settings) -> None:
    """Check this plugin's settings once, at start-up, before any node runs.

    Called on every active plugin after loading, in pluggy order. Validate your
    ``[plugin.NAME]`` section here (:func:`peerup.core.settings.plugin_section`)
    and raise :class:`~peerup.core.errors.ConfigError` on a bad value, so
    ``peerup run`` stops with one line instead of failing at the first
    connection. The return value is ignored.
    """


@hookspec(firstresult=True)
def open_node(settings: Settings, role: str, retry_policy: RetryPolicy) -> AbstractAsyncContextManager[Node] | None:
    """Return an async context manager that runs this process's transport node.

    :param settings: the resolved settings (identity home, listen and relay addresses).
    :param role: ``"relay"`` for ``peerup relay serve`` (a relay and DHT bootstrap
        node), ``"node"`` for everything else (serve, proxy, ping, run).
    :param retry_policy: the active ``retry_policy``; a transport spaces its own
        reconnects (to a relay that went away) with it, repeating the last delay
        once the policy's delays run out, since a node never gives up on its relay.
    :returns: a context manager whose ``__aenter__`` yields a started
        :class:`~peerup.core.node.Node` and whose ``__aexit__`` stops it and frees
        its ports, or ``None`` if this plugin provides no transport.

    Synchronous and first-result: the first non-None answer is used.
    """


@hookspec
async def discover_peer(node: Node, peer_id: str, settings: Settings) -> PeerRecord | None:
    """Find how to reach ``peer_id``; called before every proxy connection and ping.

    Expected order of work (the seed's ConnectToPeer): an existing connection is
    reported at once (``connected=True``, no lookup); else known addresses; else a
    lookup (DHT, static table, mDNS ...); when only relayed reach exists, the
    relay circuit address is part of the answer.

    :returns: a :class:`~peerup.core.node.PeerRecord`, or ``None`` when this plugin
        knows nothing about the peer (the next plugin is asked). The core raises
        :class:`~peerup.core.errors.PeerNotFound` when every plugin says ``None``.

    Async; the first non-None result wins.
    """


@hookspec
async def dial(node: Node, peer: PeerRecord, protocol: str, settings: Settings) -> ByteStream | None:
    """Open a stream to ``peer`` speaking ``protocol``.

    The caller scopes the time: the core cancels the call after the service
    stream timeout (30 s by default), so an implementation takes no timeout and
    must be cancellation-safe. Direct addresses should be tried before relayed
    ones, and an existing connection reused.

    :returns: an :class:`anyio.abc.ByteStream` whose ``send_eof`` half-closes and
        which answers :class:`~peerup.core.node.PeerAttribute` ``path``; or
        ``None`` when this plugin cannot dial such a peer.
    :raises PeerUnreachable: addresses were tried and none worked.

    Async; the first non-None result wins.
    """


@hookspec
async def proxy_stream(
    local: ByteStream, remote: ByteStream, settings: Settings, service: ServiceSettings | None
) -> bool | None:
    """Carry bytes between a local TCP connection and a peer stream until both end.

    Called on both sides of a tunnel: by ``peerup proxy`` for each accepted local
    connection, and by the serving node once it reached its local service. The
    implementation owns both streams and must close them before returning.

    :param service: the service settings on the serving side (per-service
        timeouts), ``None`` on the client side.
    :returns: ``True`` once the connection was carried, ``None`` to let the next
        plugin do it.

    Async; the first non-None result wins.
    """


@hookspec(firstresult=True)
def retry_policy(settings: Settings, service: ServiceSettings | None) -> RetryPolicy | None:
    """Return the policy that spaces attempts to reach a peer's service.

    The core calls ``policy.delays()`` once per operation and sleeps for each
    value between failed attempts (retryable failures only: not found,
    unreachable, timed out). The built-in policy is exponential backoff from the
    settings: 1 s, 2 s, 4 s ... capped at 60 s, 3 retries.

    Synchronous and first-result: the first non-None answer is used.
    """
