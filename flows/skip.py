"""``knowstream skip``: move a stuck consumer group past one message.

The last resort when a message keeps a batch failing (``ingest`` stopped as
``failed`` on it): the message is recorded on the dead-letter topic with the
reason "skipped by operator", then the group's offset is committed past it.
Only the message the group would read next can be skipped, so a typo cannot
skip a range. Stop the group's ingest workers first: a broker refuses commits
from outside a group that has members.
"""

from __future__ import annotations

import getpass
import socket

from knowstream.connectors.kafka import (
    commit_offset,
    group_position,
    read_range,
    send_dead_letters,
)
from knowstream.settings import Settings

REASON = "skipped by operator"


def skip_message(settings: Settings, partition: int, offset: int) -> None:
    """Dead-letter ``settings.topic[partition]@offset`` and commit ``offset + 1``."""
    topic, group = settings.topic, settings.group_id
    at = group_position(settings, group, partition)
    if at != offset:
        raise ValueError(
            f"group {group!r} reads {topic}[{partition}] at offset {at}, not {offset}: "
            "only the next message can be skipped"
        )
    records = read_range(settings, topic, start={partition: offset}, end={partition: offset + 1})
    if not records:
        raise LookupError(f"no message at {topic}[{partition}] offset {offset}")
    r = records[0]
    letter = {
        **{k: getattr(r, k) for k in ("topic", "partition", "offset", "key", "value")},
        "stage": "operator",
        "reason": REASON,
        "detail": f"knowstream skip by {getpass.getuser()}@{socket.gethostname()}",
    }
    send_dead_letters(settings, [letter], since_ms=r.timestamp_ms)
    commit_offset(settings, group, partition, offset + 1)
