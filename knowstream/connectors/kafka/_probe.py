"""Is a broker there? A plain TCP connect, before any Kafka client is made.

kafka-python retries an absent broker for tens of seconds and logs each try; a
command that needs the broker asks here first and fails in seconds, in one line.
"""

from __future__ import annotations

import socket

from knowstream.errors import BrokerUnreachable
from knowstream.settings import Settings

PROBE_TIMEOUT_S = 5.0


def require_broker(settings: Settings, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Return when one bootstrap server accepts a connection; else ``BrokerUnreachable``."""
    servers = [s.strip() for s in settings.bootstrap_servers.split(",") if s.strip()]
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
                return
        except (OSError, ValueError):
            continue
    raise BrokerUnreachable(
        f"no Kafka broker answers at {settings.bootstrap_servers}: start the local one with "
        "`knowstream up`, or point --bootstrap-servers at yours"
    )
