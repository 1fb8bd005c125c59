"""Which batch failures are worth retrying, and for how long.

Transient: the broker, a store or the registry is unreachable, slow or busy
(connection refused or reset, timeouts, Kafka's retriable errors, HTTP 5xx from
MLflow or Qdrant, a Qdrant local path or SQLite file locked by another process).
Continuous ingestion retries those until the service is back. Anything else (a
bug, a corrupt checkpoint, a deleted amortizer version) fails the same way on
every try: it gets ``Settings.retry_attempts`` tries, then the worker stops as
``failed`` with the reason. ``ingest --once`` gives every error that many tries.
"""

from __future__ import annotations

from tenacity import RetryCallState

from knowstream.flows.stopping import error_chain, stop_signal
from knowstream.settings import Settings

# Messages of errors that carry no better type: Qdrant local mode's lock on its
# path (RuntimeError), SQLite's lock (OperationalError).
_TRANSIENT_MESSAGES = ("already accessed by another instance", "database is locked")


def is_transient(error: BaseException | None) -> bool:
    """Whether ``error`` (or an error it was raised from or during) is an outage.
    MLflow raises its HTTP errors during the ``requests`` error: found that way."""
    import requests.exceptions as rq
    from kafka.errors import KafkaError

    from knowstream.connectors.mlflow._registry import AmortizerRegistryError

    for e in error_chain(error):
        if isinstance(e, ConnectionError | TimeoutError | AmortizerRegistryError):
            return True
        if isinstance(e, rq.ConnectionError | rq.Timeout | rq.RetryError):
            return True
        if isinstance(e, KafkaError) and e.retriable:
            return True
        if _is_transport_error(e) or getattr(e, "status_code", None) in (502, 503, 504):
            return True
        if any(m in str(e) for m in _TRANSIENT_MESSAGES):
            return True
    return False


def _is_transport_error(e: BaseException) -> bool:
    try:
        import httpx  # the Qdrant server client's transport
    except ImportError:
        return False
    return isinstance(e, httpx.TransportError)


def stop_after(settings: Settings, once: bool):
    """Tenacity ``stop``: transient errors forever in continuous mode, otherwise
    ``settings.retry_attempts`` tries."""

    def stop(state: RetryCallState) -> bool:
        error = state.outcome.exception() if state.outcome else None
        if not once and is_transient(error):
            return False
        return state.attempt_number >= settings.retry_attempts

    return stop


def retryable(error: BaseException) -> bool:
    """Tenacity ``retry`` predicate: errors, never a stop request (SIGINT, SIGTERM),
    nor a store held by another process (it stays held: fail with its one line)."""
    from knowstream.connectors.qdrant import StoreHeld

    return (
        isinstance(error, Exception)
        and not isinstance(error, StoreHeld)
        and stop_signal(error) is None
    )
