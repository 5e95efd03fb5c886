"""The batch forms of fraud.requests and fraud.decisions (streams/fraud.py): grouped by the
partition of the payer wallet, order kept, bounded; read exactly as the same events one by
one; single events still accepted; an empty or oversized batch refused when decoded."""

from __future__ import annotations

import msgspec
import pytest

from streams.codec import encode
from streams.fraud import (
    DECISIONS,
    MAX_FRAUD_BATCH,
    REQUESTS,
    DecisionBatch,
    RiskDecided,
    ScoreBatch,
    ScoreRequested,
    decision_batches,
    decisions_of,
    fraud_items_of,
    requests_of,
    score_batches,
)
from streams.topics import partition_for_key


def _request(i: int, wallet: str) -> ScoreRequested:
    return ScoreRequested(payment_id=f"p{i}", payer_user_id="u", payer_wallet_id=wallet, payee_wallet_id="x",
                          amount_minor=100 + i, currency="INR")


def test_batches_group_by_payer_partition_in_order_and_are_bounded() -> None:
    wallets = [f"w{k}" for k in range(9)]
    requests = [_request(i, wallets[i % len(wallets)]) for i in range(2_500)]
    batches = score_batches(requests, 4)
    assert all(1 <= len(b.requests) <= MAX_FRAUD_BATCH for b in batches)
    for b in batches:
        # The message key (first wallet) lands where every member's wallet hashes.
        assert {partition_for_key(r.payer_wallet_id, 4) for r in b.requests} == {partition_for_key(b.payer_wallet_id, 4)}
        assert b.payer_wallet_id == b.requests[0].payer_wallet_id
    unpacked = [r for b in batches for r in requests_of(b)]
    assert sorted(r.payment_id for r in unpacked) == sorted(r.payment_id for r in requests)
    for wallet in wallets:  # each wallet's requests keep their order
        assert [r.payment_id for r in unpacked if r.payer_wallet_id == wallet] == \
               [r.payment_id for r in requests if r.payer_wallet_id == wallet]


def test_a_batch_reads_as_its_events_and_single_events_still_decode() -> None:
    requests = [_request(i, "w1") for i in range(3)]
    batch = REQUESTS.decode(encode(score_batches(requests, 4)[0]))
    assert isinstance(batch, ScoreBatch) and list(requests_of(batch)) == requests
    assert list(fraud_items_of(batch)) == requests
    single = REQUESTS.decode(encode(requests[0]))
    assert list(requests_of(single)) == [requests[0]] == list(fraud_items_of(single))
    decisions = [RiskDecided(payment_id=r.payment_id, payer_wallet_id="w1", score=1, decision="allow",
                             source="model") for r in requests]
    decoded = DECISIONS.decode(encode(decision_batches(decisions, 4)[0]))
    assert isinstance(decoded, DecisionBatch) and list(decisions_of(decoded)) == decisions
    assert list(decisions_of(DECISIONS.decode(encode(decisions[0])))) == [decisions[0]]


@pytest.mark.parametrize("count", [0, MAX_FRAUD_BATCH + 1])
def test_empty_or_oversized_batches_are_refused_when_decoded(count: int) -> None:
    body = msgspec.json.decode(encode(ScoreBatch(payer_wallet_id="w1", requests=[_request(0, "w1")])))
    body["requests"] = [msgspec.to_builtins(_request(i, "w1")) for i in range(count)]
    with pytest.raises(msgspec.ValidationError, match=f"holds {count} events"):
        REQUESTS.decode(msgspec.json.encode(body))
