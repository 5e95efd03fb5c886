"""Identity's outbox relay: events committed with identity changes reach `identity.events`.

Identity writes its events to an outbox table in the same transaction as the change
(services/identity_events.py). This timer runs on the Faust leader only, so with several
workers exactly one relays, and drains the outbox in bounded batches.
"""

from __future__ import annotations

import logging
from typing import Any

from mode import Service

from db.engine import create_pool, dsn_for
from services import identity_events
from services.identity_common import IdentityContext
from streams.app import FintideApp
from streams.publisher import EventPublisher

log = logging.getLogger("fintide.agents.identity")
RELAY_INTERVAL_S = 0.5
# At most this many relay batches per tick, so one tick cannot hold the worker's loop.
MAX_BATCHES_PER_TICK = 20


def install(app: FintideApp) -> None:
    state: dict[str, Any] = {}

    @app.timer(RELAY_INTERVAL_S, on_leader=True)
    async def relay_identity_events() -> None:
        ctx = state.get("ctx") or await _open(app, state)
        for _ in range(MAX_BATCHES_PER_TICK):
            if await identity_events.relay(ctx) < identity_events.RELAY_BATCH:
                break

    @app.service
    class IdentityRelayCloser(Service):  # closes what the first tick opened, when the worker stops
        async def on_stop(self) -> None:
            if "ctx" in state:
                await state["publisher"].stop()
                await state["ctx"].pool.close()


async def _open(app: FintideApp, state: dict[str, Any]) -> IdentityContext:
    from redis.asyncio import Redis

    settings = app.settings
    publisher = EventPublisher(settings)
    await publisher.start()
    pool = await create_pool(dsn_for(settings.database_url, "identity"), max_size=2)
    state["publisher"] = publisher
    state["ctx"] = IdentityContext(settings=settings, pool=pool, redis=Redis.from_url(settings.redis_url),
                                   publisher=publisher)
    return state["ctx"]
