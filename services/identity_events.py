"""Identity events: written to the outbox inside the caller's transaction, relayed to Kafka.

`record` runs in the same transaction as the change it describes. `relay` publishes what
is still unpublished (oldest first, bounded batch) and marks it; with no publisher wired
the rows stay in the outbox and are logged, so nothing is lost while Kafka is away.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import msgspec

from db import identity as db
from db.identity import Queryable
from services.identity_common import IdentityContext
from streams import identity as events

log = logging.getLogger("fintide.identity.events")
RELAY_BATCH = 100


def new_meta(user_id: uuid.UUID) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "ts_ms": time.time_ns() // 1_000_000, "user_id": user_id}


async def record(conn: Queryable, event: events.Event) -> None:
    await db.insert_outbox(conn, event_id=uuid.UUID(event.id), type_=events.event_type(event),
                           key=str(event.user_id), payload=msgspec.to_builtins(event))


def topic_name(ctx: IdentityContext) -> str:
    return ctx.settings.topic_prefix + events.TOPIC


async def relay(ctx: IdentityContext) -> int:
    """Publish one batch of pending events; return how many were published."""
    rows = await db.unpublished(ctx.pool, RELAY_BATCH)
    if not rows:
        return 0
    if ctx.publisher is None:
        for row in rows:
            log.info("identity event pending (no publisher)", extra={"event_type": row["type"],
                                                                    "event_id": str(row["event_id"])})
        return 0
    published: list[int] = []
    try:
        for row in rows:
            value = msgspec.json.encode(row["payload"])
            await ctx.publisher.publish_raw(topic_name(ctx), row["key"].encode(), value)
            published.append(row["seq"])
    except Exception:  # noqa: BLE001 - Kafka trouble must not fail the request; retried next relay
        log.warning("identity event relay stopped early", exc_info=True)
    if published:
        await db.mark_published(ctx.pool, published)
    return len(published)
