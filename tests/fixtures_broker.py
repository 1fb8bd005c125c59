"""Pytest fixtures around a real tansu broker (no mocks).

Registered with ``pytest_plugins = ["tests.fixtures_broker"]``. One broker serves
the whole session (it starts in ~0.2 s, but per-test brokers would multiply group
joins and ports); each test gets its own topic and group so tests never see each
other's messages or offsets.
"""

from __future__ import annotations

import random
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from knowstream.infra.services import start_broker, stop_broker
from knowstream.settings import Settings


def free_port() -> int:
    """A loopback port nobody listens on right now.

    Drawn below Linux's ephemeral range (32768-60999): a port the OS hands out
    for binding port 0 is also one it may pick as the source port of any
    outgoing connection meanwhile, which made services fail to bind at random.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in 20000-32000")


def local_settings(home: Path, **overrides: object) -> Settings:
    """Settings for a broker of our own on a free loopback port under ``home``.

    Storage and timeouts are set explicitly so that ``KNOWSTREAM_*`` variables of
    the developer's shell cannot point the tests at their real setup.
    """
    values: dict[str, object] = {
        "home": home,
        "bootstrap_servers": f"127.0.0.1:{free_port()}",
        "broker_storage": "memory://tansu/",
        "session_timeout_ms": 6000,  # tansu joins take ~half of it
        "poll_timeout_ms": 1000,
        "partitions": 1,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings pointing at a running in-memory tansu broker."""
    settings = local_settings(tmp_path_factory.mktemp("knowstream-home"))
    start_broker(settings)
    yield settings
    stop_broker(settings)


@pytest.fixture
def kafka_settings(broker: Settings) -> Settings:
    """The session broker's settings with a fresh topic and consumer group."""
    suffix = uuid.uuid4().hex[:10]
    return broker.model_copy(update={"topic": f"test-{suffix}", "group_id": f"group-{suffix}"})
