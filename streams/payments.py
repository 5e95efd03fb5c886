"""Payments events and topics: the saga on `payments.events`, the journal on `payments.ledger`.

* `payments.events`, keyed by the payer wallet (`payer_wallet_id`): `payment.requested`
  (a payment asked for over Kafka; its `payment_id` is the idempotency key) and one event
  per saga step — `payment.initiated`, `.funds_reserved`, `.risk_assessed`,
  `.under_review`, `.posted`, `.completed`, `.failed` (with `failure_reason`) — plus
  `payment.refunded`.
* `payments.ledger`, keyed by account (`account_id`): every posted journal transaction
  (keyed by its debited account) and hold change (keyed by the holding account), each
  carrying the balances of the accounts it touched *after* the write (`BalanceAfter`),
  and `ledger.balance`: one account's balance, what the hot projection consumes.

Batches. A Faust agent spends ~70-200 µs per Kafka message whatever it holds (measured
on this machine, docs/PAYMENTS.md), so the hot path carries many events per message, like
`market.ticks`: `payment.batch` / `ledger.batch` hold the events of payer wallets (or
accounts) that all hash to one partition, keyed by the first one, in order. A consumer
reads a batch exactly as the same events one by one (`items_of`). Every topic also takes
single events, so a producer that does not batch is still right, just slower.

Balances are versioned: `version_us` grows strictly with every change of an account
(the ledger sets it under the balance row lock), so a consumer keeps the highest version
it has seen and duplicates, reordering and replays cannot move a balance backwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Union
from uuid import UUID

import msgspec

from streams.events import Event, check_batch_size
from streams.topics import TopicSpec, register

# ~450 bytes of JSON per payment event: 1,000 stay well under Kafka's default 1 MiB message.
MAX_BATCH_EVENTS: Final = 1_000


# ------------------------------------------------------------------------- payments.events

class PaymentRequested(Event, tag="payment.requested", kw_only=True, frozen=True):
    """Kafka in: move `amount_minor` from the payer's wallet to the payee's.

    `payment_id` is chosen by the caller and is the idempotency key: the same id again is
    the same payment. The fraud step reads the device, IP and country."""

    payment_id: UUID
    payer_user_id: UUID
    payer_wallet_id: UUID
    payee_wallet_id: UUID
    amount_minor: int
    currency: str
    description: str = ""
    device_id: str = ""
    ip: str = ""
    country: str = ""


class PaymentStep(Event, kw_only=True, frozen=True):
    """A payment reached `status` (the tag says which); the fields are the payment's."""

    payment_id: UUID
    payer_user_id: UUID
    payer_wallet_id: UUID
    payee_wallet_id: UUID
    currency: str
    amount_minor: int
    status: str
    failure_reason: str | None = None
    hold_id: UUID | None = None
    captured_minor: int = 0
    refunded_minor: int = 0
    # What the client sent with the request (for the fraud step); empty when unknown.
    device_id: str = ""
    ip: str = ""
    country: str = ""
    # When the payment was initiated (its row's created_at), so a step's age is known
    # without a read (the saga's latency metric); 0 in events written before it existed.
    initiated_ms: int = 0


class PaymentInitiated(PaymentStep, tag="payment.initiated", kw_only=True, frozen=True):
    pass


class PaymentFundsReserved(PaymentStep, tag="payment.funds_reserved", kw_only=True, frozen=True):
    pass


class PaymentRiskAssessed(PaymentStep, tag="payment.risk_assessed", kw_only=True, frozen=True):
    pass


class PaymentUnderReview(PaymentStep, tag="payment.under_review", kw_only=True, frozen=True):
    pass


class PaymentPosted(PaymentStep, tag="payment.posted", kw_only=True, frozen=True):
    pass


class PaymentCompleted(PaymentStep, tag="payment.completed", kw_only=True, frozen=True):
    pass


class PaymentFailed(PaymentStep, tag="payment.failed", kw_only=True, frozen=True):
    pass


class PaymentRefunded(PaymentStep, tag="payment.refunded", kw_only=True, frozen=True):
    refund_id: UUID
    refund_minor: int


STEP_BY_STATUS: Final[dict[str, type[PaymentStep]]] = {
    "initiated": PaymentInitiated, "funds_reserved": PaymentFundsReserved,
    "risk_assessed": PaymentRiskAssessed, "under_review": PaymentUnderReview,
    "posted": PaymentPosted, "completed": PaymentCompleted, "failed": PaymentFailed,
}
TERMINAL_STATUSES: Final = frozenset({"completed", "failed"})

PaymentItem = Union[
    PaymentRequested, PaymentInitiated, PaymentFundsReserved, PaymentRiskAssessed, PaymentUnderReview,
    PaymentPosted, PaymentCompleted, PaymentFailed, PaymentRefunded]


class PaymentEventBatch(Event, tag="payment.batch", kw_only=True, frozen=True):
    """Payment events of payer wallets that all hash to one partition, in order."""

    payer_wallet_id: UUID  # the first event's: the message key
    events: list[PaymentItem]

    def __post_init__(self) -> None:
        super().__post_init__()
        check_batch_size(len(self.events), "payment.batch", MAX_BATCH_EVENTS)


PaymentsValue = Union[PaymentItem, PaymentEventBatch]

PAYMENTS: TopicSpec[PaymentsValue] = register(TopicSpec(
    "payments.events", PaymentsValue, key_field="payer_wallet_id",
    doc="payment requests and saga steps, keyed by payer wallet (batches: one partition each)"))


# ------------------------------------------------------------------------- payments.ledger

class PostedLeg(msgspec.Struct, frozen=True):
    account_id: UUID
    amount_minor: int  # > 0 credits the account, < 0 debits it


class BalanceAfter(msgspec.Struct, frozen=True, kw_only=True):
    """An account's balance right after a change; `version_us` orders the changes."""

    account_id: UUID
    currency: str
    posted_minor: int
    reserved_minor: int
    last_seq: int
    version_us: int

    @property
    def available_minor(self) -> int:
        return self.posted_minor - self.reserved_minor


class TransactionPosted(Event, tag="ledger.transaction_posted", kw_only=True, frozen=True):
    account_id: UUID  # the debited account: the message key
    transaction_id: UUID
    kind: str
    currency: str
    legs: list[PostedLeg]
    reference_id: UUID | None = None
    corrects_id: UUID | None = None
    balances: list[BalanceAfter] = []


class HoldReserved(Event, tag="ledger.hold_reserved", kw_only=True, frozen=True):
    account_id: UUID
    hold_id: UUID
    currency: str
    amount_minor: int
    reference_id: UUID | None
    expires_at_ms: int
    balances: list[BalanceAfter] = []


class HoldResolved(Event, tag="ledger.hold_resolved", kw_only=True, frozen=True):
    account_id: UUID
    hold_id: UUID
    currency: str
    amount_minor: int
    status: str  # posted | voided | expired
    posted_minor: int | None
    transaction_id: UUID | None
    balances: list[BalanceAfter] = []


class LedgerBalance(Event, tag="ledger.balance", kw_only=True, frozen=True):
    """One account's balance as of `balance.version_us`, keyed by that account."""

    account_id: UUID
    balance: BalanceAfter


LedgerItem = Union[TransactionPosted, HoldReserved, HoldResolved, LedgerBalance]


class LedgerEventBatch(Event, tag="ledger.batch", kw_only=True, frozen=True):
    """Ledger events of accounts that all hash to one partition, in order."""

    account_id: UUID  # the first event's: the message key
    events: list[LedgerItem]

    def __post_init__(self) -> None:
        super().__post_init__()
        check_batch_size(len(self.events), "ledger.batch", MAX_BATCH_EVENTS)


LedgerValue = Union[LedgerItem, LedgerEventBatch]

LEDGER: TopicSpec[LedgerValue] = register(TopicSpec(
    "payments.ledger", LedgerValue, key_field="account_id",
    doc="journal transactions, hold changes and account balances, keyed by account"))


def items_of(value: PaymentsValue | LedgerValue) -> Sequence[PaymentItem | LedgerItem]:
    """The events a message carries: a batch's events, or the event itself."""
    if isinstance(value, PaymentEventBatch | LedgerEventBatch):
        return value.events
    return (value,)
