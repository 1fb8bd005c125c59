"""The scheduled backfill registers on a real Prefect server with its cron."""

from __future__ import annotations

import asyncio

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from knowstream.flows.deploy import DEPLOYMENT, backfill_deployment
from knowstream.infra.services import start_prefect_server, stop_prefect_server
from tests.fixtures_broker import free_port, local_settings


def test_backfill_deployment_registers_on_a_prefect_server(tmp_path):
    settings = local_settings(tmp_path / "home", topic="scheduled-docs")
    url = start_prefect_server(settings, port=free_port())
    # The server's state lives under --home, not in ~/.prefect.
    assert (tmp_path / "home" / "prefect" / "prefect.db").is_file()
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            deployment = backfill_deployment("0 3 * * *", settings=settings, base="none")
            deployment_id = deployment.apply()

            async def read():
                async with get_client() as client:
                    return await client.read_deployment(deployment_id)

            got = asyncio.run(read())
        assert got.name == DEPLOYMENT
        assert [s.schedule.cron for s in got.schedules] == ["0 3 * * *"]
        assert got.parameters["base"] == "none" and got.parameters["promote"] is False
        # The scheduled run gets the deploying command's home, broker and topic.
        given = got.parameters["settings"]
        assert given["home"] == str((tmp_path / "home").resolve())
        assert given["bootstrap_servers"] == settings.bootstrap_servers
        assert given["topic"] == "scheduled-docs"
    finally:
        stop_prefect_server(settings)
