"""Heartbeat agent: keeps the latest heartbeat per source in the `ops.heartbeats` table.

It is the smallest complete example of the pattern every service follows: a typed stream
with dead letters, a check the schema cannot express (rejected the same way), a
co-partitioned RocksDB table, and a view routed to the key's owner.
"""

from __future__ import annotations

from typing import Any

from streams.app import FintideApp, event_topic, routed_table_view
from streams.dlq import reject, typed_stream
from streams.events import now_ms
from streams.ops import HEARTBEATS, Heartbeat
from tables.ops import HeartbeatState, heartbeat_table

AGENT_NAME = "ops.heartbeats"
# A heartbeat stamped further ahead than this would keep its source looking alive after
# it stops; it is rejected rather than stored.
MAX_FUTURE_SKEW_MS = 5 * 60 * 1000


def install(app: FintideApp) -> None:
    table = heartbeat_table(app)

    @app.agent(event_topic(app, HEARTBEATS), name=AGENT_NAME)
    async def record_heartbeats(stream: Any) -> None:
        async for heartbeat in typed_stream(stream, HEARTBEATS):
            skew_ms = heartbeat.ts_ms - now_ms()
            if skew_ms > MAX_FUTURE_SKEW_MS:
                await reject(stream, HEARTBEATS, ValueError(f"ts_ms is {skew_ms} ms in the future"))
                continue
            previous = table.get(heartbeat.source)
            updated = next_state(previous, heartbeat)
            if updated is not previous:
                table[heartbeat.source] = updated

    routed_table_view(app, table, "/ops/heartbeats/{key}")


def next_state(previous: HeartbeatState | None, heartbeat: Heartbeat) -> HeartbeatState:
    """Fold one heartbeat into the state; a redelivered heartbeat (same id) changes nothing."""
    if previous is not None and previous.last_id == heartbeat.id:
        return previous
    count = previous.count + 1 if previous is not None else 1
    return HeartbeatState(source=heartbeat.source, count=count, last_id=heartbeat.id,
                          last_seq=heartbeat.seq, last_ts_ms=heartbeat.ts_ms)
