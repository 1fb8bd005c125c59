"""Qdrant: the versioned store of chunks, documents, triples and modulations."""

from knowstream.connectors.qdrant._client import close_clients, open_client, visible
from knowstream.connectors.qdrant._source import Hit, VersionView
from knowstream.connectors.qdrant._target import purge_version, write_version

__all__ = [
    "Hit",
    "VersionView",
    "close_clients",
    "open_client",
    "purge_version",
    "visible",
    "write_version",
]
