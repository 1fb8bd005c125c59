"""Which failures ingest retries without end (outages) and which stop it, from real
failures: clients against a port nobody listens on, a registry without the model,
a stop request raised inside a real Beam stage."""

from __future__ import annotations

import signal

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from kafka import KafkaAdminClient

from knowstream.connectors.mlflow._registry import resolve_amortizer
from knowstream.flows.retries import is_transient, retryable
from knowstream.flows.stopping import Stopped, stop_signal
from knowstream.settings import Settings
from tests.fixtures_broker import free_port


def failure(call) -> BaseException:
    try:
        call()
    except BaseException as e:  # noqa: BLE001 - the point is to look at it
        return e
    raise AssertionError("expected a failure")


def test_outages_are_transient(tmp_path, monkeypatch):
    closed = f"127.0.0.1:{free_port()}"
    broker = failure(lambda: KafkaAdminClient(bootstrap_servers=closed, request_timeout_ms=2000))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    registry_down = Settings(
        home=tmp_path, mlflow_uri=f"http://{closed}", amortizer="models:/amortizer@live"
    )
    registry = failure(lambda: resolve_amortizer(registry_down))
    for error in (broker, registry, ConnectionRefusedError(111, "refused")):
        assert is_transient(error) and retryable(error), repr(error)


def test_bugs_and_missing_things_are_not_transient(tmp_path):
    missing = Settings(home=tmp_path, amortizer="models:/no-such-model@live")
    lookup = failure(lambda: resolve_amortizer(missing))
    assert isinstance(lookup, LookupError)
    for error in (lookup, failure(lambda: {}["key"]), failure(lambda: int("x"))):
        assert not is_transient(error), repr(error)
        assert retryable(error)  # a few tries, then the worker stops


class Interrupted(beam.DoFn):
    def process(self, element):
        raise Stopped(signal.SIGINT)  # what the signal handler raises mid-stage


def test_a_stop_inside_a_beam_stage_is_a_stop_not_an_error():
    """Beam re-raises what a DoFn raised as a RuntimeError: a stop that lands in a
    stage must still stop the worker, not be retried as a failed batch."""
    p = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    _ = p | beam.Create([1]) | beam.ParDo(Interrupted())
    with pytest.raises(BaseException) as raised:  # noqa: PT011
        p.run().wait_until_finish()
    assert not isinstance(raised.value, Stopped)  # wrapped by Beam
    assert stop_signal(raised.value) == signal.SIGINT
    assert not retryable(raised.value)
