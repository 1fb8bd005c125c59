"""Backfills and windowed ingest as deployments on a Prefect process work pool: a real
``prefect server`` and two ``prefect worker`` processes (what ``knowstream up
--with-prefect-server --workers 2`` starts). Live stays where ingest put it until
``promote``; an ingest window publishes on top of it and ends on its own."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from knowstream.cli import app
from knowstream.connectors.kafka import produce_file
from knowstream.connectors.mlflow import Registry
from knowstream.connectors.qdrant import close_clients
from knowstream.flows.deploy import (
    INGEST_DEPLOYMENT,
    POOL_DEPLOYMENT,
    deploy_backfill,
    deploy_ingest,
)
from knowstream.flows.ingest import ingest_flow
from knowstream.infra.services import (
    WORK_POOL,
    start_prefect_server,
    start_prefect_workers,
    stop_prefect_server,
)
from knowstream.memory import Memory
from tests.fixtures_broker import free_port

SAMPLE = Path(__file__).parent.parent / "data" / "sample" / "stream.jsonl"


async def _wait_final(run_ids: list, timeout_s: float = 400.0) -> list:
    async with get_client() as client:
        deadline = time.monotonic() + timeout_s
        while True:
            runs = [await client.read_flow_run(i) for i in run_ids]
            if all(r.state.is_final() for r in runs) or time.monotonic() > deadline:
                return runs
            await asyncio.sleep(2)


def _cli(settings, *args: str):
    shown = CliRunner().invoke(
        app,
        ["--home", str(settings.home), "--bootstrap-servers", settings.bootstrap_servers]
        + ["--topic", settings.topic, *args],
    )
    assert shown.exit_code == 0, shown.output
    return shown


def test_backfills_and_an_ingest_window_run_on_workers_and_live_waits_for_promote(
    memory_settings, tmp_path, monkeypatch
):
    settings = memory_settings
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "INFO")  # workers log each run they submit
    lines = SAMPLE.read_text().splitlines()
    (tmp_path / "first.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (tmp_path / "later.jsonl").write_text(lines[2] + "\n")
    produce_file(settings, tmp_path / "first.jsonl")
    assert [r.version for r in ingest_flow(settings, once=True)] == [1]
    close_clients()  # the embedded store admits one process: the flow runs' from here on
    registry = Registry(settings)  # MLflow only: reading it does not take the store

    url = start_prefect_server(settings, port=free_port())
    try:
        workers = start_prefect_workers(settings, url, 2)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            deploy_backfill(WORK_POOL, one_at_a_time=True)
            deploy_ingest(WORK_POOL, cron="0 0 1 1 *")  # its schedule does not fire here
            backfills = [
                run_deployment(
                    f"backfill/{POOL_DEPLOYMENT}", parameters={"base": "none"}, timeout=0
                )
                for _ in range(2)
            ]
            backfills = asyncio.run(_wait_final([r.id for r in backfills]))
            live_after_backfills = registry.live()
            _cli(settings, "promote", "3")
            produce_file(settings, tmp_path / "later.jsonl")
            window = run_deployment(
                f"ingest/{INGEST_DEPLOYMENT}", parameters={"max_duration_s": 5.0}, timeout=0
            )
            (window,) = asyncio.run(_wait_final([window.id]))
        logs = {
            w: (settings.run_dir / f"prefect-worker-{i}.log").read_text()
            for i, w in enumerate(workers)
        }
    finally:
        stop_prefect_server(settings)  # its workers first, with SIGINT
    runs = [*backfills, window]
    assert [r.state.type.value for r in runs] == ["COMPLETED"] * 3, logs
    assert all(r.work_pool_name == WORK_POOL for r in runs)
    for run in runs:  # each one was submitted by exactly one of our workers
        # Both workers may pick a run up; the server lets one move it to pending and the
        # other logs "Aborted submission" for it.
        ran_on = [
            w
            for w, log in logs.items()
            if log.count(f"submitting flow run '{run.id}'")
            > log.count(f"Aborted submission of flow run '{run.id}'")
        ]
        assert len(ran_on) == 1, logs
    assert not list(settings.run_dir.glob("prefect-worker-*.pid"))  # SIGINT stopped them

    assert live_after_backfills == 1  # the backfills left live alone
    memory = Memory(settings)
    rows = [(r["version"], r["kind"], r["state"], r["parent"]) for r in memory.history()]
    assert rows == [
        (1, "ingest", "published", None),
        (2, "backfill", "published", None),
        (3, "backfill", "published", None),
        (4, "ingest", "published", 3),  # the window built on the promoted version
    ]
    assert memory.registry.live() == 4
    # Built on the workers, and in this (long-lived, multi-threaded) test process.
    assert memory.view(1).digest() == memory.view(2).digest() == memory.view(3).digest()
    assert sorted(memory.view(4).docs()) == sorted(json.loads(x)["doc_id"] for x in lines[:3])
    close_clients()
