"""Errors a user can cause or meet, each rendered as one line by the CLI.

Plugins map their library's exceptions to these at their boundary (the way
httpcore maps socket errors), so the core and the CLI never need to know which
transport produced a failure.
"""

from __future__ import annotations


class PeerupError(Exception):
    """Base class: ``str(err)`` is the one-line message shown to the user."""

    exit_code = 1


class ConfigError(PeerupError):
    """A config file, environment variable or flag holds a value we cannot use."""

    exit_code = 2


class PluginError(PeerupError):
    """A plugin failed to import, load or run."""

    exit_code = 3


class IdentityError(PeerupError):
    """The node key is missing, unreadable or unsafe."""


class PeerNotFound(PeerupError):
    """No discovery plugin knows any address for the peer."""


class PeerUnreachable(PeerupError):
    """Addresses were known, but no connection could be made."""


class PeerTimeout(PeerupError):
    """The peer did not answer within the configured timeout."""


class ServiceError(PeerupError):
    """The serving node could not connect the stream to its local service.

    ``code`` is the machine-readable reason sent over the wire
    (``unknown-service``, ``refused``, ``timeout``, ``unauthorized``, ``error``).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RetriesExhausted(PeerupError):
    """Every attempt the retry policy allowed has failed."""


class ProtocolNotSupported(PeerupError):
    """The peer answered but does not speak the requested protocol (service not exposed)."""
