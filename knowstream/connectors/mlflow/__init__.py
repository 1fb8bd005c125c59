"""MLflow: the registry of memory versions and the `live` pointer."""

from knowstream.connectors.mlflow._registry import LIVE, Registry, VersionInfo

__all__ = ["LIVE", "Registry", "VersionInfo"]
