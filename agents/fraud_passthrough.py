"""The pass-through fraud scorer: answers every `fraud.score_requested` with allow, score 0.

It stands in for the fraud service's model until that lands, with the same contract
(streams/fraud.py): a `fraud.risk_decided` on `fraud.decisions`, keyed by the payer
wallet, `source="model"`, `model_version="passthrough"`. It is installed only when
`settings.fraud_scorer == "passthrough"` (FINTIDE_FRAUD_SCORER), so switching the setting
to `model` hands `fraud.requests` to the real scorer without touching the saga.
"""

from __future__ import annotations

import functools
from typing import Any, Final

from agents.payments import (
    Item,
    Runtime,
    decode_items,
    process_batch,
    retrying,
    runtime_of,
)
from services.payments_events import event_id
from streams.app import FintideApp, event_topic
from streams.fraud import DECISIONS, REQUESTS, RiskDecided, ScoreRequested, decision_batches, fraud_items_of

AGENT_NAME: Final = "fraud.passthrough"
MODEL_VERSION: Final = "passthrough"


def decision_for(request: ScoreRequested) -> RiskDecided:
    """Allow, score 0; the id is derived from the request's, so a redelivered request
    yields the same decision (consumers dedupe by id and by payment)."""
    return RiskDecided(id=event_id("passthrough", request.id), payment_id=request.payment_id,
                       payer_wallet_id=request.payer_wallet_id, score=0, decision="allow", source="model",
                       model_version=MODEL_VERSION)


def install(app: FintideApp) -> None:
    settings = app.settings
    if settings.fraud_scorer != "passthrough":
        return
    rt = runtime_of(app)

    @app.agent(event_topic(app, REQUESTS), name=AGENT_NAME)
    async def passthrough(stream: Any) -> None:
        async for batch in stream.take_events(settings.payments_batch_max,
                                              within=settings.payments_batch_wait_ms / 1000):
            items = await decode_items(app, REQUESTS, batch, AGENT_NAME, fraud_items_of)
            await process_batch(app, REQUESTS, batch, AGENT_NAME, functools.partial(answer, rt, items))


async def answer(rt: Runtime, items: list[Item[ScoreRequested]]) -> int:
    decisions = [decision_for(item.value) for item in items]
    if decisions:
        # One message per payer-wallet partition, as the saga sends its requests.
        batches = decision_batches(decisions, DECISIONS.partition_count(rt.settings))
        await retrying(functools.partial(rt.publish_many, DECISIONS, batches))
    return len(items)
