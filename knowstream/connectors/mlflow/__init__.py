"""MLflow: the registry of memory versions and the `live` pointer.

``Registry`` and ``VersionInfo`` load MLflow on first use: ``_alias`` moves ``live``
on the embedded registry without it (``knowstream promote``/``rollback``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knowstream.connectors.mlflow._alias import LIVE

if TYPE_CHECKING:
    from knowstream.connectors.mlflow._registry import Registry, VersionInfo

__all__ = ["LIVE", "Registry", "VersionInfo"]


def __getattr__(name: str) -> Any:
    if name in ("Registry", "VersionInfo"):
        from knowstream.connectors.mlflow import _registry

        return getattr(_registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
