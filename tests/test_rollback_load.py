"""Rollback under load: flipping ``live`` while /ask requests run never fails a request
and never answers from a version that was not live during the request.

A request reads ``live`` once, at its start, from ``LiveVersion``, which a
background thread refreshes every ``POLL_S`` (and ``/admin/live`` refreshes at
once). So the version it answers from must have been live at some moment in
``[start - POLL_S - SLACK, end]``, SLACK covering the registry read of one poll.
Bounded: a fixed number of requests and flips, loopback only (FastAPI TestClient).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from knowstream.connectors.kafka import produce_file
from knowstream.connectors.qdrant import close_clients
from knowstream.flows.ingest import ingest_flow
from knowstream.serving.app import create_app
from tests.test_memory_e2e import UPDATE, fresh, sample_events, write_jsonl

POLL_S = 0.2
SLACK_S = 0.5  # one registry read of the poller (MLflow on SQLite)
REQUESTS, THREADS = 200, 4
FLIPS = [1, 2, 3, 1, 3, 2, 1, 3]  # each flip holds for FLIP_HOLD_S
FLIP_HOLD_S = 0.4
QUESTION = "What was the final score of Super Bowl 50?"

SECOND_UPDATE = {
    **UPDATE,
    "text": UPDATE["text"] + " The game was the 50th Super Bowl.",
    "published_at": "2016-08-01T00:00:00Z",
}


@pytest.fixture(scope="module")
def three_versions(broker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rollback-load")
    settings = fresh(broker, tmp)
    for i, events in enumerate([sample_events(5), [UPDATE], [SECOND_UPDATE]]):
        produce_file(settings, write_jsonl(tmp / f"{i}.jsonl", events))
        ingest_flow(settings, once=True)
    yield settings
    close_clients()


def live_at_some_moment(version, lo, hi, flips, initial) -> bool:
    """Whether ``version`` was live at some time in [lo, hi].

    ``flips`` are (sent, acknowledged, version): the alias moved somewhere in
    [sent, acknowledged], so a version counts as live from the ``sent`` of the flip
    to it until the ``acknowledged`` of the next flip (the generous reading).
    """
    intervals = []
    start, current = float("-inf"), initial
    for sent, acked, v in flips:
        intervals.append((start, acked, current))
        start, current = sent, v
    intervals.append((start, float("inf"), current))
    return any(v == version and a <= hi and lo <= b for a, b, v in intervals)


def test_flipping_live_under_load_fails_nothing_and_serves_only_live_versions(three_versions):
    settings = three_versions
    with TestClient(create_app(settings, poll_s=POLL_S)) as client:
        assert client.get("/healthz").json()["live"] == 3
        flips: list[tuple[float, float, int]] = []
        stop = threading.Event()

        def flipper() -> None:
            for v in FLIPS:
                if stop.wait(FLIP_HOLD_S):
                    return
                sent = time.monotonic()
                response = client.post("/admin/live", json={"version": v})
                acked = time.monotonic()
                assert response.status_code == 200 and response.json() == {"live": v}
                flips.append((sent, acked, v))

        def one(i: int) -> tuple[float, float, int, dict | None]:
            start = time.monotonic()
            response = client.post("/ask", json={"question": QUESTION, "k": 2})
            end = time.monotonic()
            body = response.json() if response.status_code == 200 else None
            return start, end, response.status_code, body

        flipping = threading.Thread(target=flipper, name="flipper")
        flipping.start()
        try:
            with ThreadPoolExecutor(THREADS) as pool:
                results = list(pool.map(one, range(REQUESTS), timeout=300))
        finally:
            stop.set()
            flipping.join(30)
        assert not flipping.is_alive()
        client.post("/admin/live", json={"version": 3})

    failed = [(status, body) for _, _, status, body in results if status != 200]
    assert failed == []
    assert len(flips) >= 3, "the load ended before live was flipped several times"
    wrong = [
        (round(start, 3), round(end, 3), body["version"])
        for start, end, _, body in results
        if not live_at_some_moment(body["version"], start - POLL_S - SLACK_S, end, flips, 3)
    ]
    assert wrong == [], (wrong, flips)
    served = {body["version"] for *_, body in results}
    assert len(served) >= 2, f"every request saw one version: {served}"
    # Each version's answer is its own: the score changed in version 2.
    for *_, body in results:
        text = " ".join(e["text"] for e in body["evidence"])
        if body["version"] == 1:
            assert "27–23" not in text
