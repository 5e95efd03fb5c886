"""Payments tables: the hot balance projection and the saga state, in RocksDB.

* `payments.balances`, keyed by account id, written from `payments.ledger`: posted,
  reserved and available per account, as of the newest `ledger.balance` version seen.
  PostgreSQL is the journal of record; this is a projection of it that can always be
  rebuilt: every change of a balance reaches it with a strictly growing version, and a
  worker that starts publishes every balance again (agents/payments.py), so it converges
  to PostgreSQL after duplicates, reordering, lost Kafka data or a lost data dir.
* `payments.sagas`, keyed by payer wallet, written from `payments.events`: the open risk
  steps of the wallet's payments (what is waiting for a fraud decision and until when,
  what is under review) and its recent failures. PostgreSQL decides every transition;
  this state is what the worker needs between messages: budgets and dedupe.

The fold functions are pure so they can be tested without Faust.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import faust
import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.streams import _current_event  # private: see write_in_partition_of
from faust.types import EventT

from streams.app import FintideApp, state_table
from streams.events import State
from streams.payments import LEDGER, PAYMENTS, BalanceAfter
from streams.topics import bootstrap_servers

log = logging.getLogger("fintide.tables.payments")

BROKER_CHECK_TIMEOUT_S: Final = 15.0
BALANCES_TABLE: Final = "payments.balances"
SAGAS_TABLE: Final = "payments.sagas"
# Bounds per payer wallet. Past them a payment is still decided by PostgreSQL, but its
# budget is not tracked here: its hold's expiry (15 min) ends it instead.
MAX_AWAITING_PER_WALLET: Final = 20_000
MAX_REVIEW_PER_WALLET: Final = 5_000
# failed_attempts for the fraud step: this wallet's failed payments within the window.
FAILURE_WINDOW_MS: Final = 3_600_000
MAX_FAILURES_KEPT: Final = 20


class WalletBalance(State):
    """An account's balance in the hot projection."""

    account_id: str
    currency: str
    posted_minor: int
    reserved_minor: int
    last_seq: int
    version_us: int

    @property
    def available_minor(self) -> int:
        return self.posted_minor - self.reserved_minor


class AwaitingRisk(msgspec.Struct, frozen=True):
    amount_minor: int
    deadline_ms: int  # when the fraud budget runs out


class WalletSaga(State):
    wallet_id: str
    awaiting_risk: dict[str, AwaitingRisk] = {}
    under_review: list[str] = []
    failures_ms: list[int] = []



def balances_table(app: FintideApp) -> faust.Table:
    return state_table(app, BALANCES_TABLE, WalletBalance, source=LEDGER,
                       help="hot balance projection per account (posted, reserved, available)")


def sagas_table(app: FintideApp) -> faust.Table:
    return state_table(app, SAGAS_TABLE, WalletSaga, source=PAYMENTS,
                       help="open risk steps and recent failures per payer wallet")


# ----------------------------------------------------------------------------------- folds

def newer_balance(previous: WalletBalance | None, b: BalanceAfter) -> WalletBalance | None:
    """The projection after seeing `b`, or None when `b` is not newer (a duplicate, a
    reordered or replayed event): versions only grow, so old news never wins."""
    if previous is not None and previous.version_us >= b.version_us:
        return None
    return WalletBalance(account_id=str(b.account_id), currency=b.currency, posted_minor=b.posted_minor,
                         reserved_minor=b.reserved_minor, last_seq=b.last_seq, version_us=b.version_us)


@dataclass(slots=True)
class SagaDraft:
    """A wallet's saga state while a batch changes it: mutable, so folding many payments
    into one wallet costs one copy, not one per payment; `state()` freezes it again."""

    wallet_id: str
    awaiting_risk: dict[str, AwaitingRisk]
    under_review: dict[str, None]  # insertion-ordered set
    failures_ms: list[int]
    changed: bool = False

    @classmethod
    def of(cls, wallet_id: str, state: WalletSaga | None) -> SagaDraft:
        if state is None:
            return cls(wallet_id, {}, {}, [])
        return cls(wallet_id, dict(state.awaiting_risk), dict.fromkeys(state.under_review), list(state.failures_ms))

    def await_risk(self, payment_id: str, amount_minor: int, deadline_ms: int) -> None:
        if payment_id not in self.awaiting_risk and len(self.awaiting_risk) < MAX_AWAITING_PER_WALLET:
            self.awaiting_risk[payment_id] = AwaitingRisk(amount_minor, deadline_ms)
            self.changed = True

    def to_review(self, payment_id: str) -> None:
        self.settle(payment_id)
        if payment_id not in self.under_review and len(self.under_review) < MAX_REVIEW_PER_WALLET:
            self.under_review[payment_id] = None
            self.changed = True

    def settle(self, payment_id: str) -> None:
        """The payment left its risk step (decided, posted, completed or failed)."""
        if self.awaiting_risk.pop(payment_id, None) is not None:
            self.changed = True
        if payment_id in self.under_review:
            del self.under_review[payment_id]
            self.changed = True

    def fail(self, payment_id: str, at_ms: int) -> None:
        self.settle(payment_id)
        recent = [t for t in self.failures_ms if at_ms - t < FAILURE_WINDOW_MS]
        self.failures_ms = [*recent, at_ms][-MAX_FAILURES_KEPT:]
        self.changed = True

    def failed_attempts(self, now_ms: int) -> int:
        return sum(1 for t in self.failures_ms if now_ms - t < FAILURE_WINDOW_MS)

    def knows(self, payment_id: str) -> bool:
        return payment_id in self.awaiting_risk or payment_id in self.under_review

    def state(self) -> WalletSaga | None:
        """The frozen state to store; None when there is nothing left to keep."""
        if not (self.awaiting_risk or self.under_review or self.failures_ms):
            return None
        return WalletSaga(wallet_id=self.wallet_id, awaiting_risk=self.awaiting_risk,
                          under_review=list(self.under_review), failures_ms=self.failures_ms)


# ------------------------------------------------------------------------ batched writes

@contextmanager
def write_in_partition_of(event: EventT[Any]) -> Iterator[None]:
    """Make `event` Faust's current event for table writes.

    Faust stores a table write in the partition of the current event, which it sets while
    iterating a stream one event at a time, but not in the body of `stream.take_events()`
    (verified: `current_event()` is None there, and writes fail). Batching agents set it
    per write to the message the key came from; callers check that the key belongs to that
    partition (streams.payments.partition_for_key), so routing and recovery agree.
    """
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


# -------------------------------------------------------------------- a broker that forgot

def forget_tables_of_a_lost_broker(app: FintideApp, tables: Sequence[faust.Table]) -> list[str]:
    """Remove this worker's RocksDB files of `tables` when their changelogs are gone.

    The embedded broker keeps everything in memory: after a restart the changelog topics
    are missing (or empty) while the RocksDB files remember offsets far past their end,
    and Faust refuses to start (ConsistencyError: persisted offset higher than highwater).
    Those files describe a Kafka that no longer exists; PostgreSQL does not forget, and
    the payments worker republishes every balance and open saga from it when it starts.
    Runs at install time, before the worker's event loop exists; returns what it removed.
    """
    files = {t: sorted(Path(app.conf.tabledir).glob(f"{t.name}-*")) for t in tables}
    present = [t for t, found in files.items() if found]
    try:
        asyncio.get_running_loop()
        return []  # built inside a running loop (not a worker): nothing to protect here
    except RuntimeError:
        pass
    if not present:
        return []
    changelogs = {t.changelog_topic.get_topic_name(): t for t in present}
    try:
        live = asyncio.run(asyncio.wait_for(_changelogs_with_data(app, list(changelogs)), BROKER_CHECK_TIMEOUT_S))
    except Exception as exc:  # noqa: BLE001 - unsure: keep the files (Faust decides)
        log.warning("could not check changelogs on the broker: %r", exc)
        return []
    removed: list[str] = []
    for topic, table in changelogs.items():
        if topic not in live:
            for path in files[table]:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(table.name)
    if removed:
        log.warning("changelogs gone from the broker: local tables removed, rebuilt from PostgreSQL",
                    extra={"tables": removed})
    return removed


async def _changelogs_with_data(app: FintideApp, topics: list[str]) -> set[str]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers(app.settings), enable_auto_commit=False)
    await consumer.start()
    try:
        existing = await consumer.topics()
        partitions = [TopicPartition(t, p) for t in topics if t in existing
                      for p in consumer.partitions_for_topic(t) or ()]
        ends = await consumer.end_offsets(partitions) if partitions else {}
    finally:
        await consumer.stop()
    return {tp.topic for tp, end in ends.items() if end > 0}
