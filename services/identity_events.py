"""Identity events: written to the outbox inside the caller's transaction, relayed to Kafka.

`record` runs in the same transaction as the change it describes, so no committed change
is lost between PostgreSQL and Kafka. `relay` publishes what is still unpublished (oldest
first, a bounded batch) through a streams EventPublisher and marks it published. In the
API it runs after each commit when `resources.publisher` is set; `run_relay` is the
standalone loop for a process that owns a publisher (e.g. `fintide up`). Delivery is
at-least-once: a crash between publish and mark re-publishes; consumers dedupe by `id`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import msgspec

from db import identity as db
from db.identity import Queryable
from services.identity_common import IdentityContext
from streams import identity as events

log = logging.getLogger("fintide.identity.events")
RELAY_BATCH = 100
RELAY_IDLE_S = 1.0
# Any constant unique among Fintide's advisory locks; every identity relay uses it.
RELAY_LOCK_ID = 0x49444F42


def new_meta(user_id: uuid.UUID) -> dict[str, Any]:
    # The streams Event header (id, ts_ms, version) is filled in by the Event itself.
    return {"user_id": user_id}


async def record(conn: Queryable, event: events.IdentityEvent) -> None:
    await db.insert_outbox(conn, event_id=uuid.UUID(event.id), type_=type(event).__struct_config__.tag,  # type: ignore[arg-type]
                           key=str(event.user_id), payload=msgspec.to_builtins(event))


async def relay(ctx: IdentityContext, publisher: Any = None) -> int:
    """Publish one batch of pending events; return how many were published.

    With no publisher the rows simply wait in the outbox (Kafka down or not wired).
    Kafka trouble never fails the caller's request: it logs and stops; the next relay retries.
    One relay at a time (the API after a commit, the worker's timer): a transaction-scoped
    advisory lock keeps rows from being published twice and keeps each user's events in order;
    a relay that finds the lock taken publishes nothing and leaves the rows to the holder.
    """
    publisher = publisher if publisher is not None else ctx.publisher
    if publisher is None:
        return 0
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RELAY_LOCK_ID):
            return 0
        rows = await db.unpublished(conn, RELAY_BATCH)
        published: list[int] = []
        try:
            for row in rows:
                event = events.EVENTS.decode(msgspec.json.encode(row["payload"]))
                await publisher.publish(events.TOPIC, row["key"], event)
                published.append(row["seq"])
        except Exception:  # noqa: BLE001 - see docstring
            log.warning("identity event relay stopped early", exc_info=True)
        if published:
            await db.mark_published(conn, published)
    return len(published)


async def run_relay(ctx: IdentityContext, publisher: Any, stop: asyncio.Event) -> None:
    """Drain the outbox until `stop` is set: batches back to back, then idle polling."""
    while not stop.is_set():
        if await relay(ctx, publisher) == 0:
            try:
                await asyncio.wait_for(stop.wait(), RELAY_IDLE_S)
            except asyncio.TimeoutError:
                pass
