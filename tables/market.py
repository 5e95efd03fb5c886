"""Market state tables: what the market agent keeps per symbol, per stream and per partition.

Every table is a RocksDB-backed `state_table` co-partitioned with `market.ticks` and
written only by the tick agent while it processes a tick batch of that partition
(docs/MARKET.md, "State"). The kernels' float64 rows travel as raw little-endian bytes
(the indicator bank's with its own checked header, `IndicatorBank.state_to_bytes`).

| table | key | value | written when |
|---|---|---|---|
| `market.symbols` | symbol | `SymbolState`: open bars row, fan-out sequence, dedupe marks | a bar of the symbol closed, or the partition row's hot set overflowed |
| `market.stream_1s` ... `market.stream_1h` | symbol | `StreamState`: bank, rules, pending outcomes, performance rows | a bar of that interval closed |
| `market.last_signal` | symbol | `LastSignal` | the symbol fired a signal |
| `market.partitions` | the partition's anchor key | `PartitionState`: watermark, confidence models, hot symbol states | every batch |

A Faust table write costs ~100 us (serialisation, changelog record, RocksDB puts), so a
batch writes one partition row rather than one row per symbol it touched: the
`SymbolState`s that changed since their own row was last written ride in the partition
row (`hot`), and a symbol's own row is written when one of its bars closes (its stream
rows are written then anyway) or when more than `MAX_HOT_SYMBOLS` are hot. A symbol's
current state is the newer (`version`) of its row and its hot entry (`latest_symbol`).

Partition state needs a key that Faust's router sends to that partition: the anchor key
of partition p is the first of `~p<p>-0`, `~p<p>-1`, ... that murmur2 hashes to p
(`partition_anchor_key`). Views (`install_views`) decode the rows into readable JSON and
are routed to the worker that owns the key, so analysts and ops can read any of them from
any worker.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import faust
import msgspec
import numpy as np
from faust.web import Request, Response, View

from indicators.bank import IndicatorBank, StateLayoutError
from indicators.bars import ACCEPTED, BAR_WIDTH, HEADER_WIDTH, LATE
from indicators.confidence import BIAS, STEPS, WEIGHTS
from indicators.confidence import ROW_WIDTH as MODEL_WIDTH
from indicators.outcomes import ACTIVE, OVERFLOW, PERF_WIDTH
from indicators.signals import MODEL_FEATURES, N_STRATEGIES, STRATEGIES
from streams.app import FintideApp, routed_table_view, state_table
from streams.events import State
from streams.market import INTERVALS_MS, TICKS, Signal, partition_for_symbol

SYMBOLS_TABLE = "market.symbols"
LAST_SIGNAL_TABLE = "market.last_signal"
PARTITIONS_TABLE = "market.partitions"
# One stream table per bar interval: a 1 s bar closes every second, a 1 h bar once an
# hour, so splitting them keeps each write (and changelog record) to the rows that moved.
STREAM_TABLES = {name: f"market.stream_{name}" for name in INTERVALS_MS}
# Feed sources remembered per symbol for dedupe; a feed restart is a new source.
MAX_SOURCES = 8
ROW_DTYPE = np.dtype("<f8")
MAX_ANCHOR_TRIES = 1_000_000
# Hot symbol states a partition row holds at most; past it every hot symbol is written to
# its own row (bounds the partition row's size when a partition has many active symbols).
MAX_HOT_SYMBOLS = 64


class SymbolState(State):
    """A symbol's bar aggregation row and bookkeeping."""

    symbol: str
    partition: int
    # BarAggregator row (indicators/bars.py), float64 little-endian.
    bars: bytes
    # Last fan-out sequence number given to an update of this symbol.
    seq: int
    # feed source -> last applied TickBatch.seq: a re-delivered batch is skipped.
    applied: dict[str, int]
    # The partition's highest tick event time when this row was written (the partition row
    # carries it too; restore takes the maximum).
    partition_max_ms: int
    # Batches that changed this state: the newer of a symbol's row and its hot entry in the
    # partition row wins on restore, whichever of the two writes reached the changelog.
    version: int = 0


class StreamState(State):
    """One (symbol, interval) stream: indicator bank, signal rules, pending outcomes, performance."""

    symbol: str
    interval: str
    bank: bytes  # IndicatorBank.state_to_bytes (checked header + row)
    rules: bytes  # SignalRules row
    pending: bytes  # OutcomeTracker pending row
    perf: bytes  # OutcomeTracker performance row
    # Open time of the stream's last bar: VWAP restarts when a bar opens on a new UTC day.
    last_open_ts_ms: int


class LastSignal(State):
    symbol: str
    signal: Signal
    count: int  # signals of this symbol so far


class PartitionState(State):
    """Written by every batch of the partition: one table write instead of one per symbol."""

    partition: int
    # Highest tick event time seen on the partition (the flush watermark is this minus the
    # allowed lateness).
    max_event_ms: int
    # ConfidenceModel rows of the partition, one per strategy (STRATEGIES order).
    models: bytes
    # Symbols whose latest state is here, not (yet) in market.symbols, in name order.
    hot: dict[str, SymbolState] = msgspec.field(default_factory=dict)


def latest_symbol(row: SymbolState | None, hot: SymbolState | None) -> SymbolState | None:
    """A symbol's current state: its hot entry unless its own row is newer."""
    if hot is None or (row is not None and row.version > hot.version):
        return row
    return hot


def row_bytes(row: np.ndarray) -> bytes:
    return np.ascontiguousarray(row, dtype=ROW_DTYPE).tobytes()


def row_from_bytes(data: bytes, width: int, what: str) -> np.ndarray:
    """A float64 row of `width` slots; StateLayoutError when the stored layout differs."""
    if len(data) != width * ROW_DTYPE.itemsize:
        raise StateLayoutError(f"{what} row has {len(data)} bytes, this layout needs {width * ROW_DTYPE.itemsize}")
    return np.frombuffer(data, dtype=ROW_DTYPE).astype(np.float64)


@functools.cache
def partition_anchor_key(partition: int, n_partitions: int) -> str:
    """The first key `~p<partition>-<n>` that Kafka's partitioner sends to `partition`."""
    assert 0 <= partition < n_partitions, (partition, n_partitions)
    for n in range(MAX_ANCHOR_TRIES):
        key = f"~p{partition}-{n}"
        if partition_for_symbol(key, n_partitions) == partition:
            return key
    raise RuntimeError(f"no anchor key for partition {partition} of {n_partitions}")


class MarketTables:
    """The market tables of one app, declared once."""

    def __init__(self, app: FintideApp) -> None:
        self.symbols = state_table(app, SYMBOLS_TABLE, SymbolState, source=TICKS,
                                   help="per symbol: open bars, fan-out sequence, dedupe marks")
        self.streams = {name: state_table(app, table, StreamState, source=TICKS,
                                          help=f"per symbol: {name} indicators, rules, outcomes, performance")
                        for name, table in STREAM_TABLES.items()}
        self.last_signal = state_table(app, LAST_SIGNAL_TABLE, LastSignal, source=TICKS,
                                       help="per symbol: the latest signal")
        self.partitions = state_table(app, PARTITIONS_TABLE, PartitionState, source=TICKS,
                                      help="per partition (anchor key): watermark, confidence models")


# -- views -----------------------------------------------------------------------------------

def install_views(app: FintideApp, tables: MarketTables, bank: IndicatorBank, horizons: tuple[int, ...]) -> None:
    """Routed JSON views of every market table (see the module docstring)."""
    intervals = list(INTERVALS_MS)
    _symbol_view(app, tables, functools.partial(render_symbol, intervals=intervals))
    for name, table in tables.streams.items():
        routed_table_view(app, table, f"/market/streams/{name}/{{key}}",
                          render=functools.partial(render_stream, bank=bank, horizons=horizons))
    routed_table_view(app, tables.last_signal, "/market/last_signal/{key}")
    _partition_view(app, tables.partitions, render_partition)


def _symbol_view(app: FintideApp, tables: MarketTables, render: Callable[[Any], Any]) -> None:
    """`/market/symbols/{symbol}`: the symbol's current state (its row or its hot entry),
    routed to the worker owning the symbol's partition (which holds both)."""
    n_partitions = TICKS.partition_count(app.settings)

    @app.table_route(table=tables.symbols, match_info="key")
    async def get(view: View, request: Request, key: str) -> Response:
        anchor = partition_anchor_key(partition_for_symbol(key, n_partitions), n_partitions)
        partition = tables.partitions.get(anchor)
        value = latest_symbol(tables.symbols.get(key), partition.hot.get(key) if partition is not None else None)
        if value is None:
            raise view.NotFound("key not found", key=key, table=tables.symbols.name)
        return view.json(render(value))

    view_class = type("MarketSymbolView", (View,), {"get": get})
    app.page("/market/symbols/{key}", name=f"table-key:{tables.symbols.name}")(view_class)


def _partition_view(app: FintideApp, table: faust.Table, render: Callable[[Any], Any]) -> None:
    """`/market/partitions/{partition}`: routed by the partition's anchor key."""
    n_partitions = TICKS.partition_count(app.settings)

    class PartitionView(View):
        async def get(self, request: Request, partition: str) -> Response:
            if not partition.isdigit() or int(partition) >= n_partitions:
                raise self.NotFound("no such partition", partition=partition)
            key = partition_anchor_key(int(partition), n_partitions)
            try:
                return await app.router.route_req(table.name, key, self.web, request)
            except faust.exceptions.SameNode:
                pass
            value = table.get(key)
            if value is None:
                raise self.NotFound("partition has no state yet", partition=partition)
            return self.json(render(value))

    app.page("/market/partitions/{partition}", name="market-partition")(PartitionView)


def render_symbol(state: SymbolState, *, intervals: list[str]) -> dict[str, Any]:
    row = row_from_bytes(state.bars, HEADER_WIDTH + BAR_WIDTH * len(intervals), "bars")
    open_bars = {}
    for k, name in enumerate(intervals):
        base = HEADER_WIDTH + k * BAR_WIDTH
        if row[base + 6] > 0:  # N_TICKS: a bar is open
            open_bars[name] = {"open_ts_ms": int(row[base]), "open": row[base + 1], "high": row[base + 2],
                               "low": row[base + 3], "close": row[base + 4], "volume": row[base + 5],
                               "n_ticks": int(row[base + 6])}
    return {"symbol": state.symbol, "partition": state.partition, "seq": state.seq, "applied": state.applied,
            "partition_max_ms": state.partition_max_ms, "version": state.version, "ticks_accepted": int(row[ACCEPTED]), "ticks_late": int(row[LATE]), "open_bars": open_bars}


def render_stream(state: StreamState, *, bank: IndicatorBank, horizons: tuple[int, ...]) -> dict[str, Any]:
    row = bank.state_from_bytes(state.bank)
    values = dict(zip(bank.output_names, row[bank.layout.offsets["values"]:][:len(bank.output_names)], strict=True))
    pending = np.frombuffer(state.pending, dtype=ROW_DTYPE)
    perf = np.frombuffer(state.perf, dtype=ROW_DTYPE).reshape(N_STRATEGIES, len(horizons), PERF_WIDTH)
    bars_seen = int(row[0])
    return {
        "symbol": state.symbol, "interval": state.interval, "bars_seen": bars_seen,
        "initialized": bars_seen >= bank.warmup_bars, "warmup_bars": bank.warmup_bars,
        "values": {k: _finite_or_none(v) for k, v in values.items()},
        "pending_signals": int(pending[ACTIVE]), "untracked_signals": int(pending[OVERFLOW]),
        "performance": performance_cells(perf, horizons),
    }


def render_partition(state: PartitionState) -> dict[str, Any]:
    models = np.frombuffer(state.models, dtype=ROW_DTYPE).reshape(N_STRATEGIES, MODEL_WIDTH)
    return {"partition": state.partition, "max_event_ms": state.max_event_ms, "hot_symbols": sorted(state.hot),
            "models": {name: {"steps": int(models[s, STEPS]),
                              "weights": dict(zip(MODEL_FEATURES, models[s, WEIGHTS:WEIGHTS + len(MODEL_FEATURES)].tolist(),
                                                  strict=True)),
                              "bias": float(models[s, BIAS])} for s, name in enumerate(STRATEGIES)}}


def performance_cells(perf: np.ndarray, horizons: tuple[int, ...]) -> dict[str, dict[str, dict[str, Any]]]:
    """{strategy: {horizon: metrics}} from a [strategies, horizons, PERF_WIDTH] block
    (the same formulas as OutcomeTracker.performance)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for s, name in enumerate(STRATEGIES):
        cells = {}
        for h, bars in enumerate(horizons):
            count, hits, total, gross_profit, gross_loss, mean, m2, cum, _peak, max_dd = perf[s, h].tolist()
            if count == 0:
                continue
            std = (m2 / (count - 1)) ** 0.5 if count >= 2 else 0.0
            cells[str(bars)] = {"count": int(count), "hit_rate": hits / count, "avg_return": total / count,
                                "gross_profit": gross_profit, "gross_loss": gross_loss,
                                "profit_factor": gross_profit / gross_loss if gross_loss > 0 else None,
                                "sharpe": mean / std if std > 0 else None, "max_drawdown": max_dd,
                                "cum_return": cum}
        if cells:
            out[name] = cells
    return out


def _finite_or_none(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None
