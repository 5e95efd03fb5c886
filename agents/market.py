"""Market agents: tick batches -> bars, indicators, signals, confidence, outcomes.

`market.ticks` agent (one message = one TickBatch of one partition, up to 16k ticks; the
agent takes what has arrived, up to TICK_TAKE_MAX messages, and handles it partition by
partition, each partition's messages in offset order):

1. decode the columns (malformed -> dead letter), map the batch's symbols to state rows
   (loading a partition's rows from the tables on its first batch after an assignment),
   drop symbols that already applied this (source, seq): a redelivered batch is a no-op;
2. ONE Numba call per message, `process_ticks`: bars (+ watermark flush of quiet symbols)
   -> indicator bank -> signal rules -> confidence -> outcomes -> online learning, over
   every tick and bar of the batch, with no Python per tick or per bar;
3. emit closed bars to `market.bars` (one BarBatch), signals and outcomes to
   `market.signals`, hand the live updates to the Redis fan-out (bounded, never blocks);
4. write back to the RocksDB tables (tables/market.py), once per partition per take: one
   partition row (watermark, models, the hot states of symbols that changed), plus the own
   rows of symbols whose bars closed and their stream rows.

Why a write-back per take and not per message: the state write (serialisation, RocksDB,
a changelog record) cost as much as the kernels, per message; with one per take, a worker
that falls behind catches up, because the more messages wait, the fewer writes each pays
(docs/benchmarks/market.md). Faust stores a table write in the partition of the *current*
message and a take mixes partitions, so each partition's write-back runs as one of its
own messages (`streams.app.acting_for`). The kernels still run once per message, so the
values do not depend on how messages are grouped.

`market.signals` and `market.bars` agents persist signals, outcomes, 1m+ bars and
instruments to PostgreSQL with `take_events(N, within=T)`: the offsets are committed only
after the batch is written, and every insert is idempotent (ON CONFLICT DO NOTHING).

Determinism: every value depends only on the messages of its partition in offset order
(no wall clock, no cross-partition state), so a rebalance or restart that resumes from
the committed offsets and the tables reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
import numpy as np
from mode import Service
from numba import njit
from prometheus_client import Counter, Histogram

from db import market as db
from db.engine import TRANSIENT_ERRORS, create_pool, dsn_for
from indicators import bars as bars_k
from indicators import confidence as conf_k
from indicators import outcomes as out_k
from indicators import signals as sig_k
from indicators._bank_kernels import bank_update
from indicators.bank import BankConfig, IndicatorBank, StateLayoutError
from indicators.bars import BarAggregator
from indicators.confidence import ConfidenceConfig, ConfidenceModel
from indicators.outcomes import EXITS, OutcomeTracker
from indicators.signals import (
    FEATURES,
    N_STRATEGIES,
    STRATEGIES,
    FeatureMap,
    SignalConfig,
    SignalRules,
)
from services.market import (
    BarsUpdate,
    FanoutBatch,
    IndicatorsUpdate,
    OutcomeUpdate,
    OutcomeView,
    RedisFanout,
    SignalUpdate,
    SignalView,
    Update,
)
from streams.app import (
    FintideApp,
    acting_for,
    dead_letter_topic,
    event_topic,
    send_event,
)
from streams.codec import DecodeFailure
from streams.codec import encode as encode_event
from streams.dlq import EmptyValue, dead_letter, dead_letter_event
from streams.market import (
    BARS,
    INTERVALS_MS,
    MAX_BATCH_BARS,
    MAX_BATCH_TICKS,
    SIGNALS,
    TICKS,
    Bar,
    BarBatch,
    MalformedBatch,
    Signal,
    SignalOutcome,
    TickBatch,
    TickColumns,
    bar_batch,
    interval_name,
    partition_for_symbol,
    tick_batch,
)
from streams.metrics import EVENTS_DLQ, EVENTS_PROCESSED
from tables.market import (
    MAX_HOT_SYMBOLS,
    MAX_SOURCES,
    LastSignal,
    MarketTables,
    PartitionState,
    StreamState,
    SymbolState,
    install_views,
    latest_symbol,
    partition_anchor_key,
    row_bytes,
    row_from_bytes,
)

log = logging.getLogger("fintide.agents.market")

TICKS_AGENT = "market.ticks"
DAY_MS = 86_400_000
NO_TIME = np.iinfo(np.int64).min

TICKS_IN = Counter("fintide_market_ticks_total", "Ticks processed by the market agent.")
BARS_OUT = Counter("fintide_market_bars_total", "Bars closed.", ["interval"])
SIGNALS_OUT = Counter("fintide_market_signals_total", "Signals fired.", ["strategy"])
OUTCOMES_OUT = Counter("fintide_market_outcomes_total", "Signal outcomes resolved.")
DEDUPED = Counter("fintide_market_ticks_deduped_total", "Ticks skipped because their batch was already applied.")
STATE_RESETS = Counter("fintide_market_state_resets_total", "Stored rows that did not fit the layout and were reset.")
# The tick agent takes up to this many messages at once (each up to MAX_BATCH_TICKS ticks)
# and waits at most this long for more: one state write-back per partition per take.
TICK_TAKE_MAX = 64
TICK_TAKE_WITHIN_S = 0.005
CONSUME_LAG = Histogram("fintide_market_consume_lag_seconds",
                        "From a tick message's Kafka timestamp to the tick agent taking it up.",
                        buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
BATCH_SECONDS = Histogram("fintide_market_batch_seconds",
                          "Time to process one partition's tick messages of a take (kernels + emit + state).",
                          buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))


# -- configuration -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class EngineConfig:
    intervals_ms: tuple[int, ...] = tuple(INTERVALS_MS.values())
    bank: BankConfig = field(default_factory=BankConfig)
    rules: SignalConfig = field(default_factory=SignalConfig)
    confidence: ConfidenceConfig = field(default_factory=ConfidenceConfig)
    horizons: tuple[int, ...] = (5, 15, 60)
    max_pending: int = 32
    # A quiet symbol's bar closes once the partition's event time is this far past its end.
    allowed_lateness_ms: int = 2_000
    # Outcomes at this horizon (index into horizons) train the confidence model.
    train_horizon: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.train_horizon < len(self.horizons):
            raise ValueError("train_horizon must index horizons")
        if self.allowed_lateness_ms < 0:
            raise ValueError("allowed_lateness_ms must be >= 0")


# -- the kernel ----------------------------------------------------------------------------------

@njit(cache=True)
def process_ticks(bar_state: np.ndarray, intervals_ms: np.ndarray, sym: np.ndarray, ts_ms: np.ndarray,
                  price: np.ndarray, size: np.ndarray, flush_rows: np.ndarray, watermark_ms: np.int64,
                  bank_state: np.ndarray, ispec: np.ndarray, fspec: np.ndarray, bank_cols: np.ndarray,
                  rules_state: np.ndarray, rules_params: np.ndarray,
                  models: np.ndarray, hyper: np.ndarray, model_base: np.int64,
                  pending: np.ndarray, perf: np.ndarray, horizons: np.ndarray, train_horizon: np.int64,
                  last_open: np.ndarray,
                  b_sym: np.ndarray, b_interval: np.ndarray, b_open: np.ndarray, b_ohlcv: np.ndarray,
                  b_n: np.ndarray, b_stream: np.ndarray, b_flags: np.ndarray, b_hlcv: np.ndarray,
                  bank_out: np.ndarray, feat: np.ndarray,
                  s_bar: np.ndarray, s_strategy: np.ndarray, s_side: np.ndarray, s_price: np.ndarray,
                  s_target: np.ndarray, s_stop: np.ndarray, s_x: np.ndarray, s_conf: np.ndarray,
                  s_model: np.ndarray, s_ts: np.ndarray,
                  o_i: np.ndarray, o_f: np.ndarray, o_x: np.ndarray):
    """Every stage of docs/MARKET.md's chain for one tick batch, in one compiled call.

    Ticks (rows of bar_state in `sym`) -> bars closed by event time, then bars of
    `flush_rows` that end at or before `watermark_ms` -> stream rows (symbol row x
    intervals + interval) -> bank values -> features -> rules -> confidence of each
    signal (model row model_base + strategy: every signal and outcome of a batch belongs to
    the batch's partition) -> outcome tracking -> one SGD step per outcome at `train_horizon`. Bar-sized buffers (b_*, bank_out, feat) are sized by the
    caller; signal and outcome buffers grow here when a batch needs more (returned, so the
    caller keeps the bigger ones). Returns (n_bars, n_signals, n_outcomes, signal buffers...,
    outcome buffers...).
    """
    n_int = intervals_ms.shape[0]
    nb = bars_k.aggregate(bar_state, intervals_ms, sym, ts_ms, price, size, b_sym, b_interval, b_open, b_ohlcv, b_n)
    for r in flush_rows:
        k = bars_k.flush(bar_state[r:r + 1], intervals_ms, watermark_ms, b_sym[nb:], b_interval[nb:], b_open[nb:],
                         b_ohlcv[nb:], b_n[nb:])
        for j in range(nb, nb + k):
            b_sym[j] = r  # flush() numbered the one-row view's row 0
        nb += k
    for j in range(nb):
        st = b_sym[j] * n_int + b_interval[j]
        b_stream[j] = st
        day = b_open[j] // DAY_MS
        # VWAP sessions are UTC days: restart when a stream's bar opens on a new day.
        b_flags[j] = 1 if last_open[st] != NO_TIME and last_open[st] // DAY_MS != day else 0
        last_open[st] = b_open[j]
        for c in range(4):
            b_hlcv[c, j] = b_ohlcv[j, c + 1]
    bank_update(bank_state, ispec, fspec, b_stream[:nb], b_hlcv[0, :nb], b_hlcv[1, :nb], b_hlcv[2, :nb],
                b_hlcv[3, :nb], b_flags[:nb], bank_out[:nb])
    for j in range(nb):
        feat[j, sig_k.F_CLOSE] = b_ohlcv[j, 3]
        feat[j, sig_k.F_HIGH] = b_ohlcv[j, 1]
        feat[j, sig_k.F_LOW] = b_ohlcv[j, 2]
        for f in range(bank_cols.shape[0]):
            feat[j, 3 + f] = bank_out[j, bank_cols[f]]
    if nb * sig_k.N_STRATEGIES > s_bar.shape[0]:
        cap = max(nb * sig_k.N_STRATEGIES, 2 * s_bar.shape[0])
        s_bar = np.empty(cap, np.int64)
        s_strategy = np.empty(cap, np.int32)
        s_side = np.empty(cap, np.int32)
        s_price = np.empty(cap)
        s_target = np.empty(cap)
        s_stop = np.empty(cap)
        s_x = np.empty((cap, sig_k.N_MODEL_FEATURES))
        s_conf = np.empty(cap)
        s_model = np.empty(cap, np.int64)
        s_ts = np.empty(cap, np.int64)
    ns = sig_k.evaluate(rules_state, rules_params, b_stream[:nb], feat[:nb], s_bar, s_strategy, s_side, s_price,
                        s_target, s_stop, s_x)
    for q in range(ns):
        s_model[q] = model_base + s_strategy[q]
        s_ts[q] = b_open[s_bar[q]]
    conf_k.score(models, hyper, s_model[:ns], s_x[:ns], s_conf[:ns])
    # Pending slots remember the strategy, not the model row: a partition's model block sits
    # at a different row on another worker, and every stored byte must be worker-independent.
    # Every pending or new signal resolves at most once per horizon: an exact bound.
    active = 0
    for r in range(pending.shape[0]):
        active += int(pending[r, out_k.ACTIVE])
    need = (active + ns) * horizons.shape[0]
    if need > o_i.shape[0]:
        cap = max(need, 2 * o_i.shape[0])
        o_i = np.empty((cap, 9), np.int64)
        o_f = np.empty(cap)
        o_x = np.empty((cap, sig_k.N_MODEL_FEATURES))
    no = out_k.track(pending, perf, horizons, b_stream[:nb], b_open[:nb], b_hlcv[0, :nb], b_hlcv[1, :nb],
                     b_hlcv[2, :nb], s_bar[:ns], s_ts[:ns], s_strategy[:ns], s_side[:ns], s_price[:ns],
                     s_target[:ns], s_stop[:ns], s_strategy[:ns], s_x[:ns], o_i, o_f, o_x)
    nt = 0
    for j in range(no):
        if o_i[j, 3] == train_horizon:
            nt += 1
    t_model = np.empty(nt, np.int64)
    t_x = np.empty((nt, sig_k.N_MODEL_FEATURES))
    t_y = np.empty(nt)
    q = 0
    for j in range(no):
        if o_i[j, 3] == train_horizon:
            t_model[q] = model_base + o_i[j, 2]
            t_x[q] = o_x[j]
            t_y[q] = float(o_i[j, 5])
            q += 1
    conf_k.learn(models, hyper, t_model, t_x, t_y)
    return (nb, ns, no, s_bar, s_strategy, s_side, s_price, s_target, s_stop, s_x, s_conf, s_model, s_ts,
            o_i, o_f, o_x)


# -- state store -----------------------------------------------------------------------------------

class StateStore(Protocol):
    """Where the engine reads and writes its rows: Faust tables in a worker, dicts in tests."""

    def get_symbol(self, symbol: str) -> SymbolState | None: ...
    def get_stream(self, interval: str, symbol: str) -> StreamState | None: ...
    def get_last_signal(self, symbol: str) -> LastSignal | None: ...
    def get_partition(self, partition: int) -> PartitionState | None: ...
    def symbols_of_partition(self, partition: int) -> list[str]: ...
    def put_symbol(self, state: SymbolState) -> None: ...
    def put_stream(self, state: StreamState) -> None: ...
    def put_last_signal(self, state: LastSignal) -> None: ...
    def put_partition(self, state: PartitionState) -> None: ...


class DictStore:
    """StateStore in plain dicts: the reference run in tests and benchmarks."""

    def __init__(self, n_partitions: int) -> None:
        self._partition_for = lambda s: partition_for_symbol(s, n_partitions)
        self.symbols: dict[str, SymbolState] = {}
        self.streams: dict[tuple[str, str], StreamState] = {}
        self.last_signals: dict[str, LastSignal] = {}
        self.partitions: dict[int, PartitionState] = {}

    def get_symbol(self, symbol: str) -> SymbolState | None:
        return self.symbols.get(symbol)

    def get_stream(self, interval: str, symbol: str) -> StreamState | None:
        return self.streams.get((interval, symbol))

    def get_last_signal(self, symbol: str) -> LastSignal | None:
        return self.last_signals.get(symbol)

    def get_partition(self, partition: int) -> PartitionState | None:
        return self.partitions.get(partition)

    def symbols_of_partition(self, partition: int) -> list[str]:
        return sorted(s for s in self.symbols if self._partition_for(s) == partition)

    def symbol_state(self, symbol: str) -> SymbolState | None:
        """The symbol's current state: its row, or its hot entry in the partition row."""
        hot = (part.hot.get(symbol) for part in self.partitions.values())
        return latest_symbol(self.symbols.get(symbol), next((h for h in hot if h is not None), None))

    def put_symbol(self, state: SymbolState) -> None:
        self.symbols[state.symbol] = state

    def put_stream(self, state: StreamState) -> None:
        self.streams[(state.interval, state.symbol)] = state

    def put_last_signal(self, state: LastSignal) -> None:
        self.last_signals[state.symbol] = state

    def put_partition(self, state: PartitionState) -> None:
        self.partitions[state.partition] = state


# -- the engine ------------------------------------------------------------------------------------

@dataclass
class BatchResult:
    """What one tick batch produced, ready to emit."""

    bars: list[BarBatch]
    signals: list[Signal]
    outcomes: list[SignalOutcome]
    fanout: FanoutBatch
    ticks: int
    skipped_ticks: int


@dataclass
class _Partition:
    slot: int  # model block: rows slot*N_STRATEGIES .. +N_STRATEGIES
    max_event_ms: int
    rows: list[int] = field(default_factory=list)
    rows_array: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    # Rows whose current SymbolState lives only in the partition row (`hot`), with the
    # state last written there (rebuilt only when the row changes).
    hot: dict[int, SymbolState] = field(default_factory=dict)
    # Applied since the last flush(): rows changed, rows with a closed bar, streams with a
    # bar, the last signal per row. flush() writes them and empties these.
    changed: set[int] = field(default_factory=set)
    closed: set[int] = field(default_factory=set)
    streams: set[int] = field(default_factory=set)
    signals: dict[int, LastSignal] = field(default_factory=dict)
    dirty: bool = False


class MarketEngine:
    """The market kernels' state for the symbols of the partitions this worker owns.

    Rows: symbol row r holds the symbol's bars; stream row r * n_intervals + k holds its
    interval k bank, rules and outcome rows. A partition's rows are loaded from the store
    on its first batch (after an assignment, so after Faust restored the tables) and
    forgotten on revocation (`release`). `apply` runs one batch in memory; `flush` writes
    the rows a partition's batches touched since the last flush, so the store equals the
    in-memory state after each flush (`process` = apply + flush). A symbol's state is
    written to the partition row (one write per flush) until one of its bars closes, when
    its own row is written with its stream rows (tables/market.py).
    """

    def __init__(self, store: StateStore, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        cfg = self.config
        self.store = store
        self.intervals_ms = np.asarray(cfg.intervals_ms, dtype=np.int64)
        self.interval_names = [interval_name(ms) for ms in cfg.intervals_ms]
        self.n_int = len(cfg.intervals_ms)
        self.bars = BarAggregator(0, cfg.intervals_ms, max_batch_ticks=MAX_BATCH_TICKS)
        self.bank = IndicatorBank(cfg.bank)
        self.rules = SignalRules(cfg.rules)
        self.tracker = OutcomeTracker(0, cfg.horizons, cfg.max_pending)
        self.models = ConfidenceModel(cfg.confidence)
        features = FeatureMap(self.bank.output_names)
        self.bank_cols = np.array([features.bank_index[f] for f in FEATURES[3:]], dtype=np.int64)
        self.output_names = self.bank.output_names
        self.last_open = np.empty(0, np.int64)
        # symbol bookkeeping (control plane: per symbol, not per tick)
        self.row_of: dict[str, int] = {}
        self.names: list[str | None] = []
        self.partition_of_row: list[int] = []
        self.seq: list[int] = []
        self.version: list[int] = []
        self.applied: list[dict[str, int]] = []
        self.signal_count: list[int] = []
        self.free_rows: list[int] = []
        self.partitions: dict[int, _Partition] = {}
        self.free_slots: list[int] = []
        self._announce: list[str] = []
        self._bar_cap = 0
        self._alloc_bar_buffers(4_096 * self.n_int)
        self._sig = self._signal_buffers(1_024)
        self._out = (np.empty((1_024, 9), np.int64), np.empty(1_024), np.empty((1_024, sig_k.N_MODEL_FEATURES)))

    # -- buffers ---------------------------------------------------------------------------------

    def _alloc_bar_buffers(self, cap: int) -> None:
        if cap <= self._bar_cap:
            return
        self._bar_cap = cap
        n_out = len(self.output_names)
        self._b = (np.empty(cap, np.int32), np.empty(cap, np.int32), np.empty(cap, np.int64),
                   np.empty((cap, 5)), np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty(cap, np.uint8),
                   np.empty((4, cap)), np.empty((cap, n_out)), np.empty((cap, sig_k.N_FEATURES)))

    @staticmethod
    def _signal_buffers(cap: int) -> tuple[np.ndarray, ...]:
        return (np.empty(cap, np.int64), np.empty(cap, np.int32), np.empty(cap, np.int32), np.empty(cap),
                np.empty(cap), np.empty(cap), np.empty((cap, sig_k.N_MODEL_FEATURES)), np.empty(cap),
                np.empty(cap, np.int64), np.empty(cap, np.int64))

    # -- rows --------------------------------------------------------------------------------------

    def _new_row(self) -> int:
        if self.free_rows:
            return self.free_rows.pop()
        row = len(self.names)
        n = row + 1
        self.bars.grow(n)
        self.bank.grow(n * self.n_int)
        self.rules.grow(n * self.n_int)
        self.tracker.grow(n * self.n_int)
        if self.last_open.shape[0] < n * self.n_int:
            grown = np.full(max(n * self.n_int, 2 * self.last_open.shape[0]), NO_TIME, np.int64)
            grown[: self.last_open.shape[0]] = self.last_open
            self.last_open = grown
        self.names.append(None)
        self.partition_of_row.append(-1)
        self.seq.append(0)
        self.version.append(0)
        self.applied.append({})
        self.signal_count.append(0)
        return row

    def _load_symbol(self, symbol: str, partition: int, hot: SymbolState | None = None) -> int:
        row = self._new_row()
        self.names[row] = symbol
        self.row_of[symbol] = row
        self.partition_of_row[row] = partition
        part = self.partitions[partition]
        part.rows.append(row)
        # (Re)announced on every load: adding to the Redis symbol set is idempotent.
        self._announce.append(symbol)
        state = latest_symbol(self.store.get_symbol(symbol), hot)
        # Kept when a stored state is reset below, so the fresh state outranks the stale one.
        self.version[row] = state.version if state is not None else 0
        if state is not None:
            part.max_event_ms = max(part.max_event_ms, state.partition_max_ms)
            if hot is not None and state is hot:
                # Its own row is older: the state must stay in the partition row until written.
                part.hot[row] = hot
        try:
            self._restore_symbol(row, state)
            for k, name in enumerate(self.interval_names):
                self._restore_stream(row * self.n_int + k, self.store.get_stream(name, symbol))
        except StateLayoutError as exc:
            log.warning("stored market state of %s does not fit this layout; starting it afresh: %s", symbol, exc)
            STATE_RESETS.inc()
            self._restore_symbol(row, None)
            for k in range(self.n_int):
                self._restore_stream(row * self.n_int + k, None)
        last = self.store.get_last_signal(symbol)
        self.signal_count[row] = last.count if last is not None else 0
        return row

    def _restore_symbol(self, row: int, state: SymbolState | None) -> None:
        bar_row = self.bars.state[row]
        if state is None:
            bars_k.init_rows(self.bars.state[row:row + 1])
            self.seq[row], self.applied[row] = 0, {}
            return
        bar_row[:] = row_from_bytes(state.bars, self.bars.row_width, "bars")
        self.seq[row], self.applied[row] = state.seq, dict(state.applied)

    def _restore_stream(self, stream: int, state: StreamState | None) -> None:
        if state is None:
            self.bank.reset(stream)
            sig_k.init_rows(self.rules.state[stream:stream + 1])
            self.tracker.pending[stream] = 0.0
            self.tracker.perf[stream] = 0.0
            self.last_open[stream] = NO_TIME
            return
        self.bank.state[stream] = self.bank.state_from_bytes(state.bank)
        self.rules.state[stream] = row_from_bytes(state.rules, sig_k.ROW_WIDTH, "rules")
        self.tracker.pending[stream] = row_from_bytes(state.pending, self.tracker.pending_width, "pending")
        self.tracker.perf[stream] = row_from_bytes(state.perf, self.tracker.perf_width, "performance")
        self.last_open[stream] = state.last_open_ts_ms

    def _partition(self, partition: int) -> _Partition:
        part = self.partitions.get(partition)
        if part is not None:
            return part
        slot = self.free_slots.pop() if self.free_slots else len(self.partitions) + len(self.free_slots)
        self.models.grow(max(self.models.n_models, (slot + 1) * N_STRATEGIES))
        block = self.models.state[slot * N_STRATEGIES:(slot + 1) * N_STRATEGIES]
        stored = self.store.get_partition(partition)
        block[:] = 0.0
        max_event = NO_TIME
        hot = stored.hot if stored is not None else {}
        if stored is not None:
            try:
                block[:] = row_from_bytes(stored.models, block.size, "models").reshape(block.shape)
                max_event = stored.max_event_ms
            except StateLayoutError as exc:
                log.warning("stored models of partition %d do not fit; starting afresh: %s", partition, exc)
                STATE_RESETS.inc()
        part = _Partition(slot=slot, max_event_ms=max_event)
        self.partitions[partition] = part
        # Every symbol the partition has ever seen (in its own row or only in the partition
        # row): quiet ones still need their bars flushed.
        for symbol in sorted({*self.store.symbols_of_partition(partition), *hot}):
            if symbol not in self.row_of:
                self._load_symbol(symbol, partition, hot.get(symbol))
        return part

    def release(self, partitions: Iterable[int]) -> None:
        """Forget the rows of revoked partitions (their owner now writes them)."""
        for p in partitions:
            part = self.partitions.pop(p, None)
            if part is None:
                continue
            self.free_slots.append(part.slot)
            for row in part.rows:
                name = self.names[row]
                assert name is not None
                del self.row_of[name]
                self.names[row] = None
                self.partition_of_row[row] = -1
                self.free_rows.append(row)
                # Idle rows must not count in the kernel's bound on pending outcomes.
                self.tracker.pending[row * self.n_int:(row + 1) * self.n_int] = 0.0

    @property
    def owned_partitions(self) -> list[int]:
        return sorted(self.partitions)

    # -- one batch -----------------------------------------------------------------------------------

    def process(self, partition: int, source: str, seq: int, cols: TickColumns) -> BatchResult:
        """Run one tick batch of `partition` and write back the rows it touched."""
        result = self.apply(partition, source, seq, cols)
        self.flush(partition)
        return result

    def apply(self, partition: int, source: str, seq: int, cols: TickColumns) -> BatchResult:
        """Run one tick batch of `partition` in memory; `flush(partition)` writes it back.

        Batches applied between two flushes give exactly the values they give one flush
        each: only how often the state is checkpointed differs."""
        part = self._partition(partition)
        local_rows = np.array([self._row(s, partition) for s in cols.symbols], dtype=np.int64)
        fresh = np.array([self.applied[r].get(source, -1) < seq for r in local_rows], dtype=bool)
        sym, ts, price, size = cols.sym, cols.ts_ms, cols.price, cols.size
        skipped = 0
        if not fresh.all():
            keep = fresh[sym]
            skipped = int(len(sym) - keep.sum())
            sym, ts, price, size = sym[keep], ts[keep], price[keep], size[keep]
            DEDUPED.inc(skipped)
            if not fresh.any():
                return BatchResult([], [], [], FanoutBatch(), 0, skipped)
        rows = local_rows[sym].astype(np.int32)
        if len(ts):
            part.max_event_ms = max(part.max_event_ms, int(ts.max()))
        watermark = part.max_event_ms - self.config.allowed_lateness_ms if part.max_event_ms != NO_TIME else NO_TIME
        out = self._run_kernel(part, rows, ts, price, size, watermark)
        result = self._emit(partition, sym, ts, local_rows, out)
        result.skipped_ticks = skipped
        self._note_applied(part, local_rows[fresh], source, seq, out, result)
        return result

    def _row(self, symbol: str, partition: int) -> int:
        row = self.row_of.get(symbol)
        return row if row is not None else self._load_symbol(symbol, partition)

    def _run_kernel(self, part: _Partition, rows: np.ndarray, ts: np.ndarray, price: np.ndarray, size: np.ndarray,
                    watermark: int) -> tuple[Any, ...]:
        if part.rows_array.shape[0] != len(part.rows):
            part.rows_array = np.asarray(part.rows, dtype=np.int64)
        # Bounds: a tick closes at most one bar per interval, a flush one per row and interval.
        self._alloc_bar_buffers((len(rows) + len(part.rows)) * self.n_int)
        b = self._b
        out = process_ticks(self.bars.state, self.intervals_ms, rows, ts, price, size, part.rows_array,
                            np.int64(watermark), self.bank.state, self.bank.layout.ispec, self.bank.layout.fspec,
                            self.bank_cols, self.rules.state, self.rules.params, self.models.state, self.models.hyper,
                            np.int64(part.slot * N_STRATEGIES), self.tracker.pending, self.tracker.perf,
                            self.tracker.horizons, np.int64(self.config.train_horizon), self.last_open,
                            *b, *self._sig, *self._out)
        self._sig = out[3:13]
        self._out = out[13:16]
        return out

    # -- outputs ---------------------------------------------------------------------------------------

    def _emit(self, partition: int, sym: np.ndarray, ts: np.ndarray, local_rows: np.ndarray,
              out: tuple[Any, ...]) -> BatchResult:
        nb, ns, no = int(out[0]), int(out[1]), int(out[2])
        b_sym, b_interval, b_open, b_ohlcv, b_n, b_stream = (a[:nb] for a in self._b[:6])
        bank_out = self._b[8][:nb]
        # Earliest tick per symbol row in this batch: the `event_ms` of its updates.
        first_ms = np.full(len(local_rows), np.iinfo(np.int64).max, np.int64)
        if len(ts):
            np.minimum.at(first_ms, sym, ts)
        event_ms = {int(r): int(t) for r, t in zip(local_rows, first_ms, strict=True)}
        fallback_ms = int(ts.max()) if len(ts) else 0
        signals = self._signals(ns, b_stream, b_open, bank_out)
        outcomes = self._outcomes(no)
        batches = self._bar_batches(partition, nb, b_sym, b_interval, b_open, b_ohlcv, b_n)
        updates = self._updates(nb, b_sym, b_interval, b_open, b_ohlcv, b_n, b_stream, bank_out, signals, outcomes,
                                event_ms, fallback_ms)
        self._count(nb, b_interval, signals, outcomes, len(ts))
        fanout = FanoutBatch(updates=updates, new_symbols=self._announce)
        self._announce = []
        return BatchResult(batches, signals, outcomes, fanout, len(ts), 0)

    def _stream_name(self, stream: int) -> tuple[str, str, int]:
        name = self.names[stream // self.n_int]
        assert name is not None
        k = stream % self.n_int
        return name, self.interval_names[k], int(self.intervals_ms[k])

    def _signals(self, ns: int, b_stream: np.ndarray, b_open: np.ndarray, bank_out: np.ndarray) -> list[Signal]:
        s_bar, s_strategy, s_side, s_price, s_target, s_stop, _x, s_conf = self._sig[:8]
        signals = []
        for q in range(ns):
            bar = int(s_bar[q])
            symbol, interval, width = self._stream_name(int(b_stream[bar]))
            strategy = STRATEGIES[int(s_strategy[q])]
            open_ts = int(b_open[bar])
            values = bank_out[bar].tolist()
            signals.append(Signal(
                signal_id=f"{symbol}:{interval}:{open_ts}:{strategy}", symbol=symbol, interval=interval,
                signal_ts_ms=open_ts + width, action="buy" if s_side[q] > 0 else "sell", price=float(s_price[q]),
                price_target=float(s_target[q]), stop_loss=float(s_stop[q]), confidence=float(s_conf[q]),
                strategy=strategy,
                indicators={n: v for n, v in zip(self.output_names, values, strict=True) if np.isfinite(v)}))
        return signals

    def _outcomes(self, no: int) -> list[SignalOutcome]:
        o_i, o_f, _ = self._out
        outcomes = []
        for j in range(no):
            row, signal_ts, strategy_id, h, side, hit, exit_id, resolved_open, _model = o_i[j].tolist()
            symbol, interval, width = self._stream_name(row)
            strategy = STRATEGIES[strategy_id]
            outcomes.append(SignalOutcome(
                signal_id=f"{symbol}:{interval}:{signal_ts}:{strategy}", symbol=symbol, interval=interval,
                strategy=strategy, action="buy" if side > 0 else "sell", horizon_bars=int(self.tracker.horizons[h]),
                realised_return=float(o_f[j]), hit=bool(hit), exit=EXITS[exit_id],  # type: ignore[arg-type]
                resolved_ts_ms=resolved_open + width))
        return outcomes

    def _bar_batches(self, partition: int, nb: int, b_sym: np.ndarray, b_interval: np.ndarray, b_open: np.ndarray,
                     b_ohlcv: np.ndarray, b_n: np.ndarray) -> list[BarBatch]:
        batches = []
        for lo in range(0, nb, MAX_BATCH_BARS):
            hi = min(nb, lo + MAX_BATCH_BARS)
            used, local = np.unique(b_sym[lo:hi], return_inverse=True)
            names = [self.names[r] for r in used.tolist()]
            # The symbol table in name order: the same bytes whatever rows this worker gave them.
            order = sorted(range(len(names)), key=names.__getitem__)
            rank = np.empty(len(order), np.int32)
            rank[order] = np.arange(len(order), dtype=np.int32)
            batches.append(bar_batch(partition=partition, symbols=[names[i] for i in order],  # type: ignore[misc]
                                     sym=rank[local], interval_ms=self.intervals_ms[b_interval[lo:hi]],
                                     open_ts_ms=b_open[lo:hi], ohlcv=b_ohlcv[lo:hi], n_ticks=b_n[lo:hi]))
        return batches

    def _updates(self, nb: int, b_sym: np.ndarray, b_interval: np.ndarray, b_open: np.ndarray, b_ohlcv: np.ndarray,
                 b_n: np.ndarray, b_stream: np.ndarray, bank_out: np.ndarray, signals: list[Signal],
                 outcomes: list[SignalOutcome], event_ms: dict[int, int], fallback_ms: int) -> list[Update]:
        """Live updates per symbol, numbered by the symbol's sequence: bars, indicators, signals, outcomes."""
        per_row: dict[int, list[Any]] = {}
        if nb:
            order = np.argsort(b_sym, kind="stable")
            bounds = np.flatnonzero(np.diff(b_sym[order])) + 1
            for group in np.split(order, bounds):
                row = int(b_sym[group[0]])
                symbol = self.names[row]
                bars = [Bar(symbol=symbol, interval=self.interval_names[k], open_ts_ms=t, open=o, high=h, low=lo,  # type: ignore[arg-type]
                            close=c, volume=v, n_ticks=n)
                        for k, t, (o, h, lo, c, v), n in zip(b_interval[group].tolist(), b_open[group].tolist(),
                                                            b_ohlcv[group].tolist(), b_n[group].tolist(), strict=True)]
                items: list[Any] = [("bars", bars)]
                last_of_stream: dict[int, int] = {}
                for j in group.tolist():
                    last_of_stream[int(b_stream[j])] = j
                for stream, j in sorted(last_of_stream.items()):
                    items.append(("indicators", (stream, j)))
                per_row[row] = items
        for s in signals:
            per_row.setdefault(self.row_of[s.symbol], []).append(("signal", s))
        for o in outcomes:
            per_row.setdefault(self.row_of[o.symbol], []).append(("outcome", o))
        updates: list[Update] = []
        # Symbols in name order: the output does not depend on this worker's row numbering.
        for row, items in sorted(per_row.items(), key=lambda item: self.names[item[0]] or ""):
            symbol = self.names[row]
            assert symbol is not None
            t = event_ms.get(row, fallback_ms)
            for kind, item in items:
                self.seq[row] += 1
                seq = self.seq[row]
                if kind == "bars":
                    updates.append(BarsUpdate(symbol=symbol, seq=seq, event_ms=t, bars=item))
                elif kind == "indicators":
                    stream, j = item
                    updates.append(self._indicators_update(symbol, seq, t, stream, j, b_open, bank_out))
                elif kind == "signal":
                    updates.append(SignalUpdate(symbol=symbol, seq=seq, event_ms=t, signal=SignalView.of(item)))
                else:
                    updates.append(OutcomeUpdate(symbol=symbol, seq=seq, event_ms=t, outcome=OutcomeView.of(item)))
        return updates

    def _indicators_update(self, symbol: str, seq: int, event_ms: int, stream: int, j: int, b_open: np.ndarray,
                           bank_out: np.ndarray) -> IndicatorsUpdate:
        bars_seen = self.bank.bar_count(stream)
        values = {n: (v if np.isfinite(v) else None)
                  for n, v in zip(self.output_names, bank_out[j].tolist(), strict=True)}
        return IndicatorsUpdate(symbol=symbol, seq=seq, event_ms=event_ms,
                                interval=self.interval_names[stream % self.n_int], bar_open_ts_ms=int(b_open[j]),
                                bars_seen=bars_seen, warmup_bars=self.bank.warmup_bars,
                                initialized=bars_seen >= self.bank.warmup_bars, values=values)

    def _count(self, nb: int, b_interval: np.ndarray, signals: list[Signal], outcomes: list[SignalOutcome],
               ticks: int) -> None:
        TICKS_IN.inc(ticks)
        if nb:
            for k, n in enumerate(np.bincount(b_interval, minlength=self.n_int).tolist()):
                if n:
                    BARS_OUT.labels(self.interval_names[k]).inc(n)
        for s in signals:
            SIGNALS_OUT.labels(s.strategy).inc()
        if outcomes:
            OUTCOMES_OUT.inc(len(outcomes))

    # -- write back --------------------------------------------------------------------------------------

    def _note_applied(self, part: _Partition, applied_rows: np.ndarray, source: str, seq: int,
                      out: tuple[Any, ...], result: BatchResult) -> None:
        nb = int(out[0])
        for r in applied_rows.tolist():
            marks = self.applied[r]
            marks.pop(source, None)
            marks[source] = seq
            while len(marks) > MAX_SOURCES:
                del marks[next(iter(marks))]
        # Rows with a closed bar (ticks or a watermark flush; signals and outcomes, which
        # bump seq, come from bars too) get their own row written with their stream rows.
        closed = set(np.unique(self._b[0][:nb]).tolist())
        part.closed |= closed
        part.changed |= set(applied_rows.tolist()) | closed
        part.streams.update(np.unique(self._b[5][:nb]).tolist())
        for s in result.signals:
            row = self.row_of[s.symbol]
            self.signal_count[row] += 1
            part.signals[row] = LastSignal(symbol=s.symbol, signal=s, count=self.signal_count[row])
        part.dirty = True

    def flush(self, partition: int) -> None:
        """Write what the partition's batches changed since the last flush (nothing if none,
        or if the partition was released meanwhile: its new owner replays those batches)."""
        part = self.partitions.get(partition)
        if part is None or not part.dirty:
            return
        closed, changed = part.closed, part.changed
        for row in changed:
            self.version[row] += 1
        for row in closed:
            part.hot.pop(row, None)
        for row in changed - closed:
            part.hot[row] = self._symbol_state(row, partition)
        if len(part.hot) > MAX_HOT_SYMBOLS:
            closed |= part.hot.keys()
            part.hot.clear()
        for row in sorted(closed):
            self.store.put_symbol(self._symbol_state(row, partition))
        for stream in sorted(part.streams):
            self.store.put_stream(self._stream_state(stream))
        for _, last in sorted(part.signals.items()):
            self.store.put_last_signal(last)
        # One write per flush carries the watermark, the models and every hot symbol state.
        block = self.models.state[part.slot * N_STRATEGIES:(part.slot + 1) * N_STRATEGIES]
        hot = sorted((state.symbol, state) for state in part.hot.values())
        self.store.put_partition(PartitionState(partition=partition, max_event_ms=part.max_event_ms,
                                                models=row_bytes(block), hot=dict(hot)))
        part.changed, part.closed, part.streams, part.signals = set(), set(), set(), {}
        part.dirty = False

    def _symbol_state(self, row: int, partition: int) -> SymbolState:
        name = self.names[row]
        assert name is not None
        return SymbolState(symbol=name, partition=partition, bars=row_bytes(self.bars.state[row]), seq=self.seq[row],
                           applied=dict(self.applied[row]),
                           partition_max_ms=int(self.partitions[partition].max_event_ms), version=self.version[row])

    def _stream_state(self, stream: int) -> StreamState:
        symbol, interval, _ = self._stream_name(stream)
        return StreamState(symbol=symbol, interval=interval, bank=self.bank.state_to_bytes(self.bank.state[stream]),
                           rules=row_bytes(self.rules.state[stream]), pending=row_bytes(self.tracker.pending[stream]),
                           perf=row_bytes(self.tracker.perf[stream]), last_open_ts_ms=int(self.last_open[stream]))


# -- Faust wiring ----------------------------------------------------------------------------------

PERSIST_SIGNALS_AGENT = "market.persist_signals"
PERSIST_BARS_AGENT = "market.persist_bars"
# Persistence flushes every PERSIST_MAX events or PERSIST_WITHIN_S, whichever comes first;
# Faust's bounded stream buffer is the queue in front of it (full: consumption pauses).
PERSIST_MAX = 2_000
PERSIST_WITHIN_S = 0.25
BARS_PERSIST_MAX = 200
# A write failing for a transient reason (db.engine.TRANSIENT_ERRORS) is retried with
# doubling waits for as long as it takes: the agent holds its take and Faust's bounded
# buffer pauses consumption. It must not raise: Faust's take_events acknowledges a take's
# messages when its generator closes, error or not, so a crashed take would be committed
# unwritten. A batch PostgreSQL rejects for its data goes to the dead letters instead.
PERSIST_FIRST_WAIT_S = 0.25
PERSIST_MAX_WAIT_S = 8.0

PERSISTED = Counter("fintide_market_persisted_total", "Rows written to PostgreSQL by the market agents.", ["table"])
PERSIST_RETRIES = Counter("fintide_market_persist_retries_total",
                          "Market persistence writes retried after a transient database failure.", ["what"])
FANOUT_DROPPED = Counter("fintide_market_fanout_dropped_total", "Fan-out batches dropped (queue full or Redis down).")


class TableStore:
    """StateStore on the Faust tables (written only inside the tick agent's body)."""

    def __init__(self, tables: Any, n_partitions: int) -> None:
        self.tables = tables
        self.n_partitions = n_partitions

    def get_symbol(self, symbol: str) -> SymbolState | None:
        return self.tables.symbols.get(symbol)

    def get_stream(self, interval: str, symbol: str) -> StreamState | None:
        return self.tables.streams[interval].get(symbol)

    def get_last_signal(self, symbol: str) -> LastSignal | None:
        return self.tables.last_signal.get(symbol)

    def get_partition(self, partition: int) -> PartitionState | None:
        return self.tables.partitions.get(partition_anchor_key(partition, self.n_partitions))

    def symbols_of_partition(self, partition: int) -> list[str]:
        keys = (k.decode() if isinstance(k, bytes) else k for k in self.tables.symbols)
        return sorted(k for k in keys if partition_for_symbol(k, self.n_partitions) == partition)

    def put_symbol(self, state: SymbolState) -> None:
        self.tables.symbols[state.symbol] = state

    def put_stream(self, state: StreamState) -> None:
        self.tables.streams[state.interval][state.symbol] = state

    def put_last_signal(self, state: LastSignal) -> None:
        self.tables.last_signal[state.symbol] = state

    def put_partition(self, state: PartitionState) -> None:
        self.tables.partitions[partition_anchor_key(state.partition, self.n_partitions)] = state


class MarketConnections(Service):
    """The worker's Redis client (live fan-out) and PostgreSQL pool (persistence).

    Opened when the app starts, closed when it stops. Without FINTIDE_REDIS_URL the
    fan-out is off; without FINTIDE_DATABASE_URL the persistence agents are not installed.
    """

    def __init__(self, app: FintideApp, **kwargs: Any) -> None:
        self.app_settings = app.settings
        self.redis: Any = None
        self.fanout: RedisFanout | None = None
        self._pool: Any = None
        self._pool_lock = asyncio.Lock()
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        if self.app_settings.redis_url:
            from redis.asyncio import Redis

            self.redis = Redis.from_url(self.app_settings.redis_url, socket_timeout=5.0)
            self.fanout = RedisFanout(self.redis)
            self.add_future(self.fanout.run())
        else:
            log.warning("FINTIDE_REDIS_URL is not set: market updates are not fanned out")

    def submit(self, batch: FanoutBatch) -> None:
        if self.fanout is None:
            return
        dropped = self.fanout.dropped_batches
        self.fanout.submit(batch)
        if self.fanout.dropped_batches != dropped:
            FANOUT_DROPPED.inc()

    async def pool(self) -> Any:
        async with self._pool_lock:
            if self._pool is None:
                self._pool = await create_pool(dsn_for(self.app_settings.database_url, "market"), max_size=4)
        return self._pool

    async def on_stop(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
        if self._pool is not None:
            await self._pool.close()


def install(app: FintideApp) -> None:
    """The tick agent, the persistence agents, the tables and their views."""
    tables = MarketTables(app)
    n_partitions = TICKS.partition_count(app.settings)
    engine = MarketEngine(TableStore(tables, n_partitions))
    warm_up(engine.config)
    conns = MarketConnections(app)
    app.service(conns)
    ticks_topic = event_topic(app, TICKS)

    @app.agent(ticks_topic, name=TICKS_AGENT)
    async def process_tick_batches(stream: Any) -> None:
        async for events in stream.take_events(TICK_TAKE_MAX, within=TICK_TAKE_WITHIN_S):
            for partition, group in by_partition(events):
                await run_group(app, engine, conns, partition, group)

    @app.on_partitions_revoked.connect
    async def forget_revoked(_app: Any, revoked: Any, **_: Any) -> None:
        engine.release({tp.partition for tp in revoked if tp.topic == ticks_topic.get_topic_name()})

    install_views(app, tables, engine.bank, engine.config.horizons)
    if app.settings.database_url:
        _install_persistence(app, conns)
    else:
        log.warning("FINTIDE_DATABASE_URL is not set: signals and bars are not persisted")


def by_partition(events: Sequence[Any]) -> list[tuple[int, list[Any]]]:
    """A take_events() batch split by partition, each part in offset order."""
    groups: dict[int, list[Any]] = {}
    for event in events:
        groups.setdefault(event.message.partition, []).append(event)
    return sorted(groups.items())


async def run_group(app: FintideApp, engine: MarketEngine, conns: MarketConnections, partition: int,
                    group: Sequence[Any]) -> None:
    """Apply one partition's tick messages in offset order, emit their bars, signals and
    live updates, then write the partition's state back once.

    One write-back per group instead of per message: under backlog the groups grow and the
    state writes (and their changelog records) shrink per message. Outputs are sent before
    the state is written and Faust acknowledges the group's messages only after this
    returns, so a process that dies anywhere in here has its group redelivered onto the
    state of the last flush: the per-(source, seq) marks make the replay apply (and emit)
    exactly what was not stored."""
    started = time.perf_counter()
    n_partitions = TICKS.partition_count(app.settings)
    batches = []
    taken = time.time()
    for event in group:
        if event.message.timestamp:  # seconds since the epoch (the producer's create time)
            CONSUME_LAG.observe(max(0.0, taken - event.message.timestamp))
        decoded = await tick_columns(app, event, partition, n_partitions)
        if decoded is not None:
            batches.append((event, *decoded))
    results, failed = apply_group(engine, partition, batches)
    try:
        # Live updates first, then one yield so the fan-out task hands them to Redis now
        # rather than after this group's sends and write-back and the take's other groups
        # (~5 ms at the median under load); the Kafka sends below are buffered anyway.
        for result in results:
            conns.submit(result.fanout)
        await asyncio.sleep(0)
        for result in results:
            await emit(app, result)
        for event, exc in failed:
            await dead_letter_event(app, TICKS, event, exc, TICKS_AGENT)
    finally:
        # Even when a send fails: Faust's take_events acknowledges a take's messages when
        # its generator closes, error or not, so the state must not stay behind them.
        with acting_for(group[-1]):
            engine.flush(partition)
    EVENTS_PROCESSED.labels(TICKS.name, TICKS_AGENT).inc(len(results))
    BATCH_SECONDS.observe(time.perf_counter() - started)


def apply_group(engine: MarketEngine, partition: int,
                batches: Sequence[tuple[Any, TickBatch, TickColumns]]) -> tuple[list[BatchResult], list[tuple[Any, Exception]]]:
    """`engine.apply` each batch; the results, and the batches the kernels refused.

    A refused batch (e.g. more than a bound allows) must not crash the worker into a
    redelivery loop: it is dead-lettered. Its partition's rows may be half-updated in
    memory, so they are dropped, reloaded from the last flush and the group's earlier
    batches applied again (their results are already in hand)."""
    results: list[BatchResult] = []
    failed: list[tuple[Any, Exception]] = []
    applied: list[tuple[TickBatch, TickColumns]] = []
    for event, batch, cols in batches:
        try:
            results.append(engine.apply(partition, batch.source, batch.seq, cols))
        except Exception as exc:  # decided: dead-letter the batch, keep the worker up
            log.exception("market batch failed; dead-lettered", extra={"partition": partition})
            engine.release([partition])
            for earlier, earlier_cols in applied:
                engine.apply(partition, earlier.source, earlier.seq, earlier_cols)
            failed.append((event, exc))
            continue
        applied.append((batch, cols))
    return results, failed


async def tick_columns(app: FintideApp, event: Any, partition: int,
                       n_partitions: int) -> tuple[TickBatch, TickColumns] | None:
    """A message's tick batch and its columns; None (dead-lettered) when malformed."""
    try:
        if not event.message.value:
            raise EmptyValue("message has no value")
        batch = TICKS.decode(event.message.value)
        columns = batch.columns()
        check_partition(batch, partition, n_partitions)
    except (*DecodeFailure, EmptyValue, MalformedBatch) as exc:
        await dead_letter_event(app, TICKS, event, exc, TICKS_AGENT)
        return None
    return batch, columns


def check_partition(batch: Any, partition: int, n_partitions: int) -> None:
    """Every symbol of a batch must hash to the partition it arrived on: its state is
    written to that partition's table rows, where the table router will look for it."""
    if batch.partition != partition:
        raise MalformedBatch(f"batch for partition {batch.partition} arrived on partition {partition}")
    misplaced = [s for s in batch.symbols if partition_for_symbol(s, n_partitions) != partition]
    if misplaced:
        raise MalformedBatch(f"symbols {misplaced[:5]} do not belong to partition {partition}")


async def emit(app: FintideApp, result: BatchResult) -> None:
    """Send a batch's bars, signals and outcomes, attached to the tick message (at-least-once)."""
    for bars in result.bars:
        await send_event(app, BARS, bars, key=bars.key)
    for signal in result.signals:
        await send_event(app, SIGNALS, signal)
    for outcome in result.outcomes:
        await send_event(app, SIGNALS, outcome)


def _install_persistence(app: FintideApp, conns: MarketConnections) -> None:
    @app.agent(event_topic(app, SIGNALS), name=PERSIST_SIGNALS_AGENT)
    async def persist_signals(stream: Any) -> None:
        async for events in stream.take_events(PERSIST_MAX, within=PERSIST_WITHIN_S):
            decoded = await decode_batch(app, SIGNALS, events, PERSIST_SIGNALS_AGENT)
            signals = [value for _, value in decoded if isinstance(value, Signal)]
            outcomes = [value for _, value in decoded if isinstance(value, SignalOutcome)]
            write = functools.partial(write_signals, await conns.pool(), signals, outcomes)
            await write_until_done(write, "signals", functools.partial(
                dead_letter_all, app, SIGNALS, [event for event, _ in decoded], PERSIST_SIGNALS_AGENT))

    @app.agent(event_topic(app, BARS), name=PERSIST_BARS_AGENT)
    async def persist_bars(stream: Any) -> None:
        async for events in stream.take_events(BARS_PERSIST_MAX, within=PERSIST_WITHIN_S):
            columns, written = [], []
            for event, batch in await decode_batch(app, BARS, events, PERSIST_BARS_AGENT):
                try:
                    columns.append(batch.columns())
                    written.append(event)
                except MalformedBatch as exc:
                    await dead_letter_event(app, BARS, event, exc, PERSIST_BARS_AGENT)
            write = functools.partial(write_bars, await conns.pool(), columns)
            await write_until_done(write, "bars", functools.partial(
                dead_letter_all, app, BARS, written, PERSIST_BARS_AGENT))


async def write_signals(pool: asyncpg.Pool, signals: list[Signal], outcomes: list[SignalOutcome]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        PERSISTED.labels("signals").inc(await db.insert_signals(conn, signals))
        PERSISTED.labels("signal_outcomes").inc(await db.insert_outcomes(conn, outcomes))


async def write_bars(pool: asyncpg.Pool, columns: list[Any]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        PERSISTED.labels("bars").inc(await db.insert_bars(conn, columns))
        await db.upsert_instruments(conn, columns)


async def decode_batch(app: FintideApp, spec: Any, events: Sequence[Any], agent: str) -> list[tuple[Any, Any]]:
    """Decode a take_events() batch into (event, value) pairs; undecodable messages go to
    the topic's dead letters."""
    decoded = []
    for event in events:
        message = event.message
        try:
            if not message.value:
                raise ValueError("message has no value")
            decoded.append((event, spec.decode(message.value)))
        except (*DecodeFailure, ValueError) as exc:
            record = dead_letter(spec.name, message.partition, message.offset, message.key, message.value, exc, agent)
            await dead_letter_topic(app, spec).send(key=message.key, value=encode_event(record))
            EVENTS_DLQ.labels(spec.name).inc()
    EVENTS_PROCESSED.labels(spec.name, agent).inc(len(decoded))
    return decoded


async def write_until_done(write: Callable[[], Awaitable[None]], what: str,
                           rejected: Callable[[Exception], Awaitable[None]],
                           first_wait_s: float = PERSIST_FIRST_WAIT_S) -> None:
    """Run `write` until it succeeds, waiting out transient database failures (see
    PERSIST_FIRST_WAIT_S); a write PostgreSQL refuses for its data goes to `rejected` once."""
    wait_s = first_wait_s
    while True:
        try:
            await write()
            return
        except TRANSIENT_ERRORS as exc:
            PERSIST_RETRIES.labels(what).inc()
            log.warning("writing market %s failed, retrying in %.2f s: %r", what, wait_s, exc)
            await asyncio.sleep(wait_s)
            wait_s = min(PERSIST_MAX_WAIT_S, wait_s * 2)
        except asyncpg.PostgresError as exc:
            log.error("PostgreSQL rejected a market %s batch; its messages are dead-lettered: %r", what, exc)
            await rejected(exc)
            return


async def dead_letter_all(app: FintideApp, spec: Any, events: Sequence[Any], agent: str, exc: Exception) -> None:
    for event in events:
        await dead_letter_event(app, spec, event, exc, agent)


def warm_up(config: EngineConfig) -> None:
    """Compile (or load from Numba's cache) the kernel before the worker joins its group:
    a first compile inside an agent would block the loop past the session timeout.

    Numba compiles one version per argument type, and read-only arrays are a type of their
    own: decoded columns are read-only views of the message, while a batch whose symbols
    were partly applied already is filtered into fresh writable arrays. Both run here."""
    started = time.perf_counter()
    engine = MarketEngine(DictStore(1), config)
    t = np.arange(4, dtype=np.int64) * 700 + 1_000_000
    price, size = np.array([1.0, 1.1, 0.9, 1.0]), np.ones(4)
    first = tick_batch(partition=0, source="warm-up", seq=0, symbols=["A"], sym=np.zeros(4, np.int32), ts_ms=t,
                       price=price, size=size)
    again = tick_batch(partition=0, source="warm-up", seq=0, symbols=["A", "B"], sym=np.array([0, 1, 0, 1], np.int32),
                       ts_ms=t + 3_000, price=price, size=size)
    engine.process(0, first.source, first.seq, first.columns())  # read-only columns
    engine.process(0, again.source, again.seq, again.columns())  # "A" applied: filtered copies
    log.info("market kernel ready", extra={"seconds": round(time.perf_counter() - started, 2)})
