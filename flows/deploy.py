"""Backfills as Prefect deployments: on demand on a process work pool, or on a cron.

    knowstream up --with-prefect-server --workers 2   # server + 2 workers on pool "knowstream"
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    knowstream deploy --pool knowstream                # the "backfill" deployment on the pool
    prefect deployment run backfill/backfill -p base=none   # a worker runs it

With ``--pool`` the deployment runs on the pool's workers (``deploy_backfill``): each
run is a subprocess of a worker, built from this installation's ``flows/backfill.py``.
Without it, a cron deployment is served from this process:

    knowstream up --with-prefect-server
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    knowstream deploy --cron "0 3 * * *" --base none

``deploy`` serves the deployment from this process (``prefect.serve``): the
process polls the server and runs each scheduled backfill. For work pools,
``infra/prefect.yaml`` declares the same deployment for ``prefect deploy``.
Schedules only run against a Prefect server, never the ephemeral local API.
"""

from __future__ import annotations

from pathlib import Path

from prefect.deployments.runner import RunnerDeployment

from knowstream.flows.backfill import backfill_flow
from knowstream.flows.ingest import ingest_flow
from knowstream.settings import Settings

DEPLOYMENT = "scheduled-backfill"
POOL_DEPLOYMENT = "backfill"
INGEST_DEPLOYMENT = "ingest"


def deploy_ingest(pool: str, *, cron: str = "0 * * * *", window_s: float = 3540.0) -> str:
    """Continuous ingest as one flow run per window: deployment ``ingest`` on ``pool``
    starts a run on ``cron`` (hourly), which ingests continuously for ``window_s`` and
    ends after the batch in progress; the next run resumes from the committed offsets.

    Why windows: a week-long stream is ~168 flow runs, each with its batches as task runs
    and artifacts, where one run per micro-batch would be tens of thousands of flow runs
    and one endless run a single page of tens of thousands of task runs. A run that
    overruns its hour makes the next one wait (``concurrency_limit=1``): never two
    consumers of one memory.
    """
    source = Path(__file__).parent
    flow = ingest_flow.from_source(source=str(source), entrypoint="ingest.py:ingest_flow")
    return str(
        flow.deploy(
            name=INGEST_DEPLOYMENT,
            work_pool_name=pool,
            cron=cron,
            concurrency_limit=1,
            parameters={"once": False, "max_duration_s": window_s},
            description="Continuous ingest, one flow run per window.",
            print_next_steps=False,
        )
    )


def deploy_backfill(
    pool: str, *, one_at_a_time: bool, cron: str | None = None, parameters: dict | None = None
) -> str:
    """Register the backfill flow as deployment ``backfill`` on work pool ``pool``; returns
    its id. ``one_at_a_time``: runs wait for each other (the embedded Qdrant stores lock
    their folder to one process; a Qdrant server needs no such limit). ``parameters``:
    the backfill's defaults, which each run may override."""
    source = Path(__file__).parent  # the installed flows/ folder: workers run the same code
    flow = backfill_flow.from_source(source=str(source), entrypoint="backfill.py:backfill_flow")
    return str(
        flow.deploy(
            name=POOL_DEPLOYMENT,
            work_pool_name=pool,
            cron=cron,
            concurrency_limit=1 if one_at_a_time else None,
            parameters=parameters or {"base": "none", "promote": False},
            description="Replay a range of the document topic into a side line of versions.",
            print_next_steps=False,
        )
    )


def settings_parameter(settings: Settings) -> dict:
    """The settings a scheduled run needs, as a flow parameter: every value given by a
    CLI option or the environment (secrets stay in the worker's environment), and the
    home as an absolute path (the run may start in another folder)."""
    given = settings.model_dump(mode="json", include=settings.model_fields_set - {"api_token"})
    return {**given, "home": str(settings.home.resolve())}


def backfill_deployment(
    cron: str,
    *,
    settings: Settings | None = None,
    base: str = "none",
    amortizer: str | None = None,
    promote: bool = False,
) -> RunnerDeployment:
    """The backfill flow on ``cron``: replays the whole topic into a new line of versions,
    against ``settings`` (default: the worker's environment)."""
    parameters: dict = {"base": base, "amortizer": amortizer, "promote": promote}
    if settings is not None:
        parameters["settings"] = settings_parameter(settings)
    return backfill_flow.to_deployment(
        name=DEPLOYMENT,
        cron=cron,
        parameters=parameters,
        description="Replay the document topic into a side line of memory versions.",
    )


def serve(deployment: RunnerDeployment) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(deployment)
