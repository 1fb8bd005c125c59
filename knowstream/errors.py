"""Failures a user can act on. Each message is one line: the cause, then the fix.

The CLI prints them as they are (exit code 1, no traceback unless ``--debug``);
the HTTP API maps each type to a status. Anything else is a bug and is reported
as one.
"""

from __future__ import annotations


class KnowstreamError(Exception):
    """An expected failure; ``str()`` names the cause and the fix."""


class VersionNotFound(KnowstreamError, LookupError):
    """No memory version with this number (HTTP 404)."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"memory version {version} does not exist: `knowstream snapshots` lists the versions"
        )
        self.version = version


class VersionNotServable(KnowstreamError, LookupError):
    """The version exists but cannot be read or go live (pending, abandoned), or no
    version is live yet (HTTP 404 for reads, 409 for moving ``live``)."""


class AmortizerMismatch(KnowstreamError, LookupError):
    """The configured amortizer did not build the served version's entries (HTTP 409)."""


class AmortizerNotFound(KnowstreamError, LookupError):
    """The amortizer spec names a registry model, alias or version that does not exist."""


class BrokerUnreachable(KnowstreamError, ConnectionError):
    """No Kafka broker answers at the bootstrap servers."""


class BadInput(KnowstreamError, ValueError):
    """A command-line value that cannot be used (a malformed offset, time, count, path)."""
