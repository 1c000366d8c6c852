"""The hook contract plugin authors code against.

Every arrow of the data path is one hook::

    name -> discover_peer -> dial (wrapped by retry_policy) -> stream -> proxy_stream <-> TCP

plus ``open_node``, which starts the transport those hooks use, and
``configure``, which lets each plugin check its own settings at start-up.

How hooks are called
--------------------
The core calls every hook through pluggy (so ``pm.trace`` and
``add_hookcall_monitoring`` see each call), one typed method per hook on
:class:`peerup.core.plugins.PluginHost`. Plugins registered later are asked
first: selected plugins (``--plugin NAME``, ``plugins = [...]``) are registered
after the built-ins and so win over a built-in that answers the same hook.
``tryfirst``/``trylast`` reorder as in any pluggy project; no built-in uses them
except ``peers`` (the ``[peers]`` table), whose ``resolve_name`` is ``tryfirst``
because a name the user wrote in the config is the user's own word.

The synchronous hooks (``configure``, ``open_node``, ``retry_policy``,
``resolve_name``, ``parse_peer_id``) are ordinary pluggy hooks. The async ones
(``discover_peer``, ``dial``, ``proxy_stream``) cannot be pluggy
``firstresult`` hooks, because an ``async def`` returns a coroutine, which is
never ``None``. So the core awaits their results in pluggy's order and stops at
the first that is not ``None``; the coroutines after the winner are closed
unstarted, so a plugin that loses does no work. Returning ``None`` means "not
mine, ask the next plugin". A plain ``def`` returning a value works too.

Wrappers work for every hook, with pluggy's ``@hookimpl(wrapper=True)`` (a
generator, as in pytest). Around an async hook, the value the ``yield`` gives
back is a :class:`peerup.core.hookcall.Answer`: what the plugins inside the
wrapper will answer, not awaited yet. Return it, return ``answer.call(**changed)``
(the same chain with some arguments replaced, for example a stream that counts
bytes), or return a coroutine of your own that awaits it. An ``async def``
marked ``wrapper=True`` is refused when the plugin is loaded.

Errors
------
A hook implementation raises a :class:`peerup.core.errors.PeerupError` subclass
for a failure the user should see (peer not found, refused, ...); it reaches the
user as it is, even from inside task groups. A ``TimeoutError`` becomes a
:class:`~peerup.core.errors.PeerTimeout`, retried like the core's own timeouts.
Any other exception is reported as a bug in the plugin whose code raised it,
named with its distribution, in one line.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Literal

import pluggy

#: What ``identity`` is asked to do with the home's key.
IdentityMode = Literal["load", "create"]

if TYPE_CHECKING:
    from pathlib import Path

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

    Called on every active plugin after loading, in pluggy order, and after
    peerup validated each declared ``settings_model`` (a
    :class:`~peerup.core.settings.PluginSettings`; read it with
    ``settings.plugin_settings(Model)``). Check here what a model cannot (a
    file that must exist, a combination of values) and raise
    :class:`~peerup.core.errors.ConfigError`, so ``peerup run`` stops with one
    line instead of failing at the first connection. The return value is ignored.
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
def identity(home: Path, mode: IdentityMode) -> str | None:
    """This home's identity as the transport keeps it; returns its peer ID.

    :param mode: ``"load"`` reads the existing key (``peerup whoami``);
        ``"create"`` makes a new one and refuses to overwrite (``peerup init``, and
        ``invite``/``join`` on a fresh machine).
    :raises IdentityError: missing (``load``), already there (``create``),
        unreadable, or readable by others.
    :returns: the peer ID, or ``None`` from a plugin that keeps no identity.

    The built-in ``libp2p`` plugin answers (an Ed25519 key in ``HOME/identity.key``).
    Synchronous and first-result. It lets the CLI and tools manage identities
    without importing the transport.
    """


@hookspec(firstresult=True)
def resolve_name(name: str, settings: Settings) -> str | None:
    """Turn a friendly peer name (``home``, ``laptop``) into a peer ID.

    Asked for every peer the user names (``proxy``, ``ping``, ``proxies``,
    ``services.NAME.allow``) before the text is tried as a peer ID, so a
    discovery plugin can serve names from its own table, DNS TXT records, a
    directory. The built-in ``peers`` plugin answers from the ``[peers]`` table.

    :returns: the peer ID text (the core validates it with ``parse_peer_id`` and
        names this hook in the error if it is not one), or ``None`` when the name
        is not yours.

    Synchronous and first-result: keep it quick (it runs before each proxied
    connection); read a file when it changed, not on every call.
    """


@hookspec(firstresult=True)
def parse_peer_id(text: str) -> str | None:
    """The transport's canonical form of a peer ID, so peer IDs are checked without a running node.

    :raises ValueError: with a one-line reason when ``text`` is not a peer ID.
    :returns: the canonical text, or ``None`` from a plugin that provides no transport.

    The built-in ``libp2p`` plugin answers (base58 multihash). Synchronous and
    first-result.
    """


@hookspec(firstresult=True)
def retry_policy(settings: Settings, service: ServiceSettings | None, service_name: str | None) -> RetryPolicy | None:
    """Return the policy that spaces attempts to reach a peer's service.

    :param service: this node's own settings for the service, when it has them
        (a ``[services.NAME]`` entry); ``None`` on a client, which knows only the
        name, and for the node's own reconnects to its relay.
    :param service_name: the service the operation reaches (``ssh`` for
        ``peerup proxy home ssh 2222``); ``None`` for relay reconnects. Take it
        to space retries per service (pluggy lets an implementation accept only
        the arguments it needs).

    The core calls ``policy.delays()`` once per operation and sleeps for each
    value between failed attempts (retryable failures only: not found,
    unreachable, timed out). The built-in policy is exponential backoff from the
    settings: 1 s, 2 s, 4 s ... capped at 60 s, 3 retries.

    Synchronous and first-result: the first non-None answer is used.
    """
