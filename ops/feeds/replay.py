"""CSV replay of ticks or OHLCV bars, paced by event time with a speed factor.

Columns are found by header name (case-insensitive):

    time    ts | timestamp | time | datetime | date | open_time      (required)
    symbol  symbol | ticker | pair | instrument                      (else --symbol)
    ticks   price, and size | qty | quantity | volume | amount (size optional, default 0)
    bars    open, high, low, close, and volume (volume optional, default 0)

A file with open/high/low/close columns is a bar file, otherwise a tick file. Times may
be epoch milliseconds (integers >= 1e11), epoch seconds (smaller numbers, fractions
allowed) or ISO 8601 (UTC when no zone is given).

A bar becomes four ticks at t, t+1, t+2, t+3 ms: open; low then high for an up bar (high
then low for a down bar); close carrying the whole volume. So the 1 s bars aggregated from
a replayed bar file (with bar times on whole seconds) reproduce its OHLCV exactly, and
coarser intervals aggregate them.

Pacing: a row is pushed when (row time - first row time) / speed has elapsed on the wall
clock; speed 0 replays as fast as the pipeline takes it. `rebase` shifts every event time
by a whole number of minutes so the file starts within the current minute (minute
bars stay aligned). Rows are read one at a time (bounded memory, any file size); a row
that does not parse stops the replay with its line number.
"""

from __future__ import annotations

import asyncio
import csv
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ops.feeds.pipeline import TickChunk

TIME_COLUMNS = ("ts", "timestamp", "time", "datetime", "date", "open_time")
SYMBOL_COLUMNS = ("symbol", "ticker", "pair", "instrument")
SIZE_COLUMNS = ("size", "qty", "quantity", "volume", "amount")
BAR_COLUMNS = ("open", "high", "low", "close")
# Bounds: ticks per pushed chunk; the longest sleep between rows (a gap in the file
# longer than this, after speed, is shortened so the replay never looks hung).
MAX_CHUNK_TICKS = 4_096
MAX_SLEEP_S = 5.0
MINUTE_MS = 60_000


class ReplayError(ValueError):
    """The CSV cannot be replayed (missing columns, a row that does not parse)."""


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    path: Path
    speed: float = 1.0
    symbol: str | None = None
    rebase: bool = False

    def __post_init__(self) -> None:
        if self.speed < 0 or not math.isfinite(self.speed):
            raise ValueError("speed must be >= 0 (0 = as fast as possible)")


def parse_time_ms(text: str) -> int:
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return int(round(moment.timestamp() * 1000))
    if not math.isfinite(value):
        raise ValueError(f"time {text!r} is not finite")
    return int(value) if abs(value) >= 1e11 else int(round(value * 1000))


class CsvReplay:
    """Reads a CSV of ticks or bars and pushes its ticks, paced."""

    def __init__(self, config: ReplayConfig, symbol_id: Callable[[str], int]) -> None:
        self.config = config
        self.symbol_id = symbol_id
        self.rows_read = 0
        self.ticks_out = 0

    def ticks(self) -> Iterator[tuple[str, int, float, float]]:
        """(symbol, time ms, price, size) per tick, in file order."""
        with open(self.config.path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                return
            cols = _columns(header, self.config.symbol)
            for line, row in enumerate(reader, start=2):
                if not row or all(not cell.strip() for cell in row):
                    continue
                try:
                    yield from _row_ticks(row, cols, self.config.symbol)
                except (ValueError, IndexError) as exc:
                    raise ReplayError(f"{self.config.path}:{line}: {exc}") from None
                self.rows_read += 1

    async def run(self, push: Callable[[TickChunk], Awaitable[None]], stop: asyncio.Event) -> None:
        speed = self.config.speed
        wall0 = time.monotonic()
        first_ms: int | None = None
        offset_ms = 0
        chunk: list[tuple[int, int, float, float]] = []
        for symbol, t, price, size in self.ticks():
            if stop.is_set():
                break
            if first_ms is None:
                first_ms = t
                if self.config.rebase:
                    offset_ms = (int(time.time() * 1000) - t) // MINUTE_MS * MINUTE_MS
            if speed > 0:
                due_s = (t - first_ms) / 1000.0 / speed - (time.monotonic() - wall0)
                if due_s > 0.0005:
                    await self._push(push, chunk)
                    if due_s > MAX_SLEEP_S:
                        wall0 -= due_s - MAX_SLEEP_S  # skip the rest of a long gap
                        due_s = MAX_SLEEP_S
                    await _sleep_or_stop(stop, due_s)
            chunk.append((self.symbol_id(symbol), t + offset_ms, price, size))
            if len(chunk) >= MAX_CHUNK_TICKS:
                await self._push(push, chunk)
        await self._push(push, chunk)

    async def _push(self, push: Callable[[TickChunk], Awaitable[None]],
                    chunk: list[tuple[int, int, float, float]]) -> None:
        if not chunk:
            return
        sym, ts, price, size = zip(*chunk)
        chunk.clear()
        self.ticks_out += len(sym)
        await push(TickChunk(np.array(sym, np.int32), np.array(ts, np.int64), np.array(price, np.float64),
                             np.array(size, np.float64)))


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


@dataclass(frozen=True, slots=True)
class _Cols:
    time: int
    symbol: int | None
    bars: tuple[int, int, int, int] | None
    price: int | None
    size: int | None


def _columns(header: list[str], default_symbol: str | None) -> _Cols:
    names = [h.strip().lower() for h in header]

    def find(options: tuple[str, ...]) -> int | None:
        return next((names.index(o) for o in options if o in names), None)

    t = find(TIME_COLUMNS)
    if t is None:
        raise ReplayError(f"no time column: expected one of {TIME_COLUMNS}, header {header}")
    sym = find(SYMBOL_COLUMNS)
    if sym is None and not default_symbol:
        raise ReplayError(f"no symbol column ({SYMBOL_COLUMNS}): pass --symbol")
    if all(b in names for b in BAR_COLUMNS):
        bars = tuple(names.index(b) for b in BAR_COLUMNS)
        return _Cols(t, sym, bars, None, find(("volume", "vol", "qty", "quantity", "size")))  # type: ignore[arg-type]
    if "price" not in names:
        raise ReplayError(f"neither a tick file (price column) nor a bar file (open/high/low/close): {header}")
    return _Cols(t, sym, None, names.index("price"), find(SIZE_COLUMNS))


def _row_ticks(row: list[str], cols: _Cols, default_symbol: str | None) -> Iterator[tuple[str, int, float, float]]:
    symbol = row[cols.symbol].strip() if cols.symbol is not None else default_symbol
    if not symbol:
        raise ValueError("empty symbol")
    t = parse_time_ms(row[cols.time])
    size = _number(row[cols.size], "size", 0.0) if cols.size is not None and row[cols.size].strip() else 0.0
    if cols.bars is None:
        assert cols.price is not None
        yield symbol, t, _number(row[cols.price], "price"), size
        return
    o, h, lo, c = (_number(row[i], name) for i, name in zip(cols.bars, BAR_COLUMNS))
    if not (lo <= min(o, c) and max(o, c) <= h):
        raise ValueError(f"bar is inconsistent: open {o} high {h} low {lo} close {c}")
    first, second = (lo, h) if c >= o else (h, lo)
    yield symbol, t, o, 0.0
    yield symbol, t + 1, first, 0.0
    yield symbol, t + 2, second, 0.0
    yield symbol, t + 3, c, size


def _number(text: str, name: str, minimum: float = math.ulp(0.0)) -> float:
    value = float(text)
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} {text!r} must be a finite number >= {minimum:g}")
    return value
