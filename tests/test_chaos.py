"""Kill test, CI variant (issue 3): SIGKILL the ingest worker mid-run, restart it, and
the final live memory equals that of an uninterrupted run.

The harness is ``bench/chaos.py`` (the long run, with broker restarts on s3://
storage, is its command line); here a short stream on the session's in-memory
broker: 72 events (new documents, updates, deletes, exact duplicates) in batches
of 10, and 4 kills rotating over "during pipeline work", "during publish", "right
after the published log line" (between publish and offset commit) and "at a
random moment". Version numbers and point ids may differ between the runs by
design; the comparison is on content (digest, doc ids, content hashes, modulation
checksums, triples, chunk texts, tombstones).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import TARGETS, Worker, chaos_test
from knowstream.infra.services import start_prefect_server, stop_prefect_server
from tests.fixtures_broker import free_port

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "stream.jsonl"
EVENTS = 72
KILLS = 4
BATCH = 10


@pytest.fixture
def prefect_api(broker, tmp_path):
    """A Prefect server of its own (own PREFECT_HOME) that every worker start shares:
    an ephemeral API would cost each start ~17 s."""
    services = broker.model_copy(update={"home": tmp_path / "services"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
        url = start_prefect_server(services, port=free_port())
    yield url
    Worker.kill_all()  # workers left running by a failed test
    stop_prefect_server(services)


def test_killed_worker_loses_and_duplicates_nothing(broker, prefect_api, tmp_path):
    result = chaos_test(
        base=broker,
        data=SAMPLE,
        events=EVENTS,
        kills=KILLS,
        broker_restarts=0,
        batch=BATCH,
        max_chars=300,
        seed=3,
        work=tmp_path / "work",
        prefect_home=tmp_path / "prefect",
        prefect_api=prefect_api,
    )
    chaos = result["chaos"]
    assert chaos["kills"] == KILLS
    assert set(chaos["kills_by_target"]) == set(TARGETS)
    mix = result["event_mix"]
    assert mix["update"] and mix["delete"] and mix["duplicate"]
    assert result["reference"]["batches"] >= EVENTS // BATCH
    assert result["reference"]["docs"] > 0
    assert result["mismatches"] == [], result["mismatches"]
    assert chaos["digest"] == result["reference"]["digest"]
    assert chaos["versions"].get("pending", 0) == 0  # nothing left half-written
