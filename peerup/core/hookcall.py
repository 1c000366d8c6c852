"""How the core calls hooks: through pluggy, with async answers and failures blamed.

pluggy calls implementations synchronously. For an ``async def`` that means
each call returns an unstarted coroutine, so the core calls the async hooks as
ordinary (not ``firstresult``) pluggy hooks and lets an innermost wrapper of its
own turn pluggy's list of results into one :class:`Answer`: an awaitable that
awaits the results in pluggy's order and stops at the first that is not
``None``, closing the losers unstarted. Going through pluggy's own call loop is
what lets pluggy's tracing and ``add_hookcall_monitoring`` see every call, and
lets a plugin *wrap* an async hook the way pytest plugins wrap theirs::

    @hookimpl(wrapper=True)
    def proxy_stream(local, remote, settings, service):
        rest = yield                     # an Answer: what the other plugins will do
        return rest.call(local=Counted(local))   # the same chain, with a wrapped stream

A wrapper receives the :class:`Answer` of the implementations inside it and
returns an awaitable (that Answer, one made with :meth:`Answer.call`, or a
coroutine of its own that awaits it). The core awaits what the outermost wrapper
returned.

Blame: a failure that is not a :class:`~peerup.core.errors.PeerupError` is a
bug in some plugin; :class:`Blame` finds which one from the traceback (the
innermost frame that belongs to an implementation) and names it with its
distribution in one line.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from peerup.core.errors import PeerTimeout, PeerupError, PluginError

T = TypeVar("T")


class Answer(Awaitable[T | None], Generic[T]):
    """The not-yet-awaited answer of an async hook's implementations, in call order.

    Awaiting it runs them one at a time and returns the first result that is
    not ``None`` (``None`` when all pass). It can be awaited once. Results after
    the winner are closed unstarted, so an implementation that loses does no work.
    """

    def __init__(
        self,
        hook: str,
        results: Iterable[Any],
        kwargs: dict[str, Any],
        again: Callable[[dict[str, Any]], Iterator[Any]],
    ) -> None:
        self.hook = hook
        self._results = iter(results)
        self._kwargs = kwargs
        self._again = again
        self._used = False

    def call(self, **changes: Any) -> Answer[T]:
        """The same implementations called again with some arguments replaced.

        This is how a wrapper hands the rest of the chain a stream of its own
        (a counter, a rate limiter) without importing the plugin it wraps. The
        results this Answer already holds are discarded unstarted.
        """
        unknown = set(changes) - set(self._kwargs)
        if unknown:
            raise TypeError(f"{self.hook} has no argument(s) {', '.join(sorted(unknown))}")
        self.close()
        kwargs = {**self._kwargs, **changes}
        return Answer(self.hook, self._again(kwargs), kwargs, self._again)

    def close(self) -> None:
        """Discard the results not yet awaited (their coroutines never start)."""
        self._used = True
        for result in self._results:
            _discard(result)

    def __await__(self) -> Generator[Any, None, T | None]:
        return self._first().__await__()

    async def _first(self) -> T | None:
        if self._used:
            raise RuntimeError(f"the answer of {self.hook} was already awaited or closed")
        self._used = True
        try:
            for result in self._results:
                value = await result if inspect.isawaitable(result) else result
                if value is not None:
                    return value  # type: ignore[no-any-return]
            return None
        finally:
            for result in self._results:
                _discard(result)


def _discard(result: Any) -> None:
    if isinstance(result, types.CoroutineType):
        result.close()


class Blame:
    """Which plugin a failure came from, by the code objects of its implementations."""

    def __init__(self) -> None:
        self._owner: dict[types.CodeType, str] = {}

    def add(self, function: Callable[..., Any], origin: str) -> None:
        code = getattr(inspect.unwrap(function), "__code__", None)
        if isinstance(code, types.CodeType):
            for inner in _nested(code):
                self._owner.setdefault(inner, origin)

    def culprit(self, exc: BaseException) -> str | None:
        """The plugin whose frame is innermost in the traceback, if any."""
        found = None
        tb = exc.__traceback__
        while tb is not None:
            found = self._owner.get(tb.tb_frame.f_code, found)
            tb = tb.tb_next
        return found

    @contextmanager
    def around(self, hook: str) -> Iterator[None]:
        """Turn a plugin's unexpected exception into one line that names the plugin.

        A :class:`PeerupError` passes through: it is the plugin telling the user
        something. So does a single PeerupError inside exception groups (a plugin
        that uses a task group), unwrapped so the user reads its message and not
        the nesting. A plugin's own ``TimeoutError`` is a :class:`PeerTimeout`, so
        the retry policy treats it like any other timeout.
        """
        try:
            yield
        except Exception as exc:
            leaf = _only_leaf(exc)
            if isinstance(leaf, PeerupError):
                if leaf is exc:
                    raise
                raise leaf from None  # its own traceback still shows where it came from
            where = self.culprit(leaf)
            who = f"plugin {where}" if where else "a plugin"
            if isinstance(leaf, TimeoutError):
                raise PeerTimeout(f"{who} timed out in {hook}: {leaf or 'no answer'}") from exc
            raise PluginError(f"{who} failed in {hook}: {type(leaf).__name__}: {leaf}") from exc


def _nested(code: types.CodeType) -> Iterator[types.CodeType]:
    """A function's code and every function, lambda and comprehension defined inside it."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _nested(const)


def _only_leaf(exc: BaseException) -> BaseException:
    """The one real exception inside nested groups; the group itself when there are several."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
