"""Scheduled backfills: a Prefect deployment of the backfill flow on a cron.

    knowstream up --with-prefect-server
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    knowstream deploy --cron "0 3 * * *" --base none

``deploy`` serves the deployment from this process (``prefect.serve``): the
process polls the server and runs each scheduled backfill. For work pools,
``infra/prefect.yaml`` declares the same deployment for ``prefect deploy``.
Schedules only run against a Prefect server, never the ephemeral local API.
"""

from __future__ import annotations

from prefect.deployments.runner import RunnerDeployment

from knowstream.flows.backfill import backfill_flow

DEPLOYMENT = "scheduled-backfill"


def backfill_deployment(
    cron: str, *, base: str = "none", amortizer: str | None = None, promote: bool = False
) -> RunnerDeployment:
    """The backfill flow on ``cron``: replays the whole topic into a new line of versions."""
    return backfill_flow.to_deployment(
        name=DEPLOYMENT,
        cron=cron,
        parameters={"base": base, "amortizer": amortizer, "promote": promote},
        description="Replay the document topic into a side line of memory versions.",
    )


def serve(deployment: RunnerDeployment) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(deployment)
