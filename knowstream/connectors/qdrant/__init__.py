"""Qdrant: the versioned store of chunks, documents, triples and modulations."""

from knowstream.connectors.qdrant._client import (
    Filter,
    Record,
    Store,
    StoreHeld,
    close_clients,
    open_store,
    visible,
)
from knowstream.connectors.qdrant._source import Hit, VersionView
from knowstream.connectors.qdrant._target import (
    fold_version,
    free_version,
    purge_version,
    write_version,
)

__all__ = [
    "Filter",
    "Hit",
    "Record",
    "Store",
    "StoreHeld",
    "VersionView",
    "close_clients",
    "fold_version",
    "free_version",
    "open_store",
    "purge_version",
    "visible",
    "write_version",
]
