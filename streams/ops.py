"""Ops stream: heartbeats that prove the path publisher -> Kafka -> agent -> table works.

Any process can publish a `Heartbeat` keyed by its `source`; the worker's heartbeat agent
(agents/ops.py) keeps the latest one per source in the `ops.heartbeats` table, served at
`/ops/heartbeats/{source}` on the worker that owns the key.
"""

from __future__ import annotations

from streams.events import Event
from streams.topics import TopicSpec, register


class Heartbeat(Event, tag="ops.heartbeat"):
    # Who sent it, e.g. "api-1" or "ready-check"; also the message key.
    source: str
    # Sender's counter; lets a reader see gaps.
    seq: int = 0


HEARTBEATS: TopicSpec[Heartbeat] = register(TopicSpec(
    "ops.heartbeat", Heartbeat, key_field="source", doc="liveness pings, keyed by source"))
