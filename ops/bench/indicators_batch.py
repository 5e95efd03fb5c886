"""Benchmark Fintide's batch indicators (``indicators.ta``) against TA-Lib.

    .venv/bin/python -m ops.bench.indicators_batch [--bars 1000000] [--repeat 7]

Every indicator runs on the same random-walk OHLCV series (positive prices,
high >= max(open, close), low <= min(open, close)) with its default parameters. Each
side gets one warm-up call on the full series, so JIT compilation (or loading the Numba
cache) is excluded from the table; that one-off cost is measured first and printed on
its own line. The table shows median time over ``--repeat`` runs and the ratio
talib/fintide (> 1 means Fintide is faster). Nothing is asserted about time.

``--clock wall`` (default) measures elapsed time; ``--clock cpu`` measures this
thread's CPU time, which leaves out the time the OS gave to other processes and so is
steadier on a shared 2-core machine (both sides still share caches and frequency).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Bars = dict[str, np.ndarray]


@dataclass(frozen=True)
class Case:
    """One indicator: how to call it in Fintide and in TA-Lib on the same bars."""

    name: str
    fintide: Callable[[Bars], object]
    talib: Callable[[Bars], object]


def make_bars(n: int, seed: int) -> Bars:
    """A random-walk OHLCV series around 100 with realistic intrabar ranges."""
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, n)))
    open_ = np.concatenate([close[:1], close[:-1]])
    wick = close * np.abs(rng.normal(0.0, 0.004, (2, n)))
    return {
        "open": open_,
        "high": np.maximum(open_, close) + wick[0],
        "low": np.minimum(open_, close) - wick[1],
        "close": close,
        "volume": rng.integers(1, 10_000, n).astype(np.float64),
        "session": np.arange(n, dtype=np.int64) // 390,
    }


def cases() -> list[Case]:
    """Every indicator of ``indicators.ta`` with its TA-Lib counterpart."""
    import talib

    from indicators import ta

    def hlc(f: Callable[..., object]) -> Callable[[Bars], object]:
        return lambda b: f(b["high"], b["low"], b["close"])

    def hlcv(f: Callable[..., object]) -> Callable[[Bars], object]:
        return lambda b: f(b["high"], b["low"], b["close"], b["volume"])

    def real(f: Callable[..., object]) -> Callable[[Bars], object]:
        return lambda b: f(b["close"])

    table = [Case(name, real(getattr(ta, name)), real(getattr(talib, name)))
             for name in ("SMA", "EMA", "WMA", "DEMA", "TEMA", "RSI", "MACD", "BBANDS",
                          "STDDEV", "ROC", "MOM")]
    table += [Case(name, hlc(getattr(ta, name)), hlc(getattr(talib, name)))
              for name in ("TRANGE", "ATR", "NATR", "PLUS_DI", "MINUS_DI", "ADX", "STOCH",
                           "STOCHF", "CCI", "WILLR")]
    table += [Case(name, hlcv(getattr(ta, name)), hlcv(getattr(talib, name)))
              for name in ("MFI", "AD")]
    table += [
        Case("OBV", lambda b: ta.OBV(b["close"], b["volume"]),
             lambda b: talib.OBV(b["close"], b["volume"])),
        Case("SAR", lambda b: ta.SAR(b["high"], b["low"]),
             lambda b: talib.SAR(b["high"], b["low"])),
        Case("VWAP", lambda b: ta.VWAP(b["high"], b["low"], b["close"], b["volume"],
                                       b["session"]), lambda b: None),
    ]
    return table


CLOCKS: dict[str, Callable[[], int]] = {
    "wall": time.perf_counter_ns,
    "cpu": time.thread_time_ns,
}


def elapsed_ms(call: Callable[[], object], clock: Callable[[], int]) -> float:
    """Time of one call in milliseconds on ``clock``."""
    start = clock()
    call()
    return (clock() - start) / 1e6


def median_ms(case: Case, data: Bars, repeat: int,
              clock: Callable[[], int]) -> tuple[float, float | None]:
    """Median ms of (fintide, talib) with the two sides interleaved run by run.

    Interleaving makes both sides share whatever else the 2-core machine is doing at
    that moment, so the ratio is steadier than the absolute times.
    """
    has_talib = case.talib(data) is not None
    case.fintide(data)
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(repeat):
        ours.append(elapsed_ms(lambda: case.fintide(data), clock))
        if has_talib:
            theirs.append(elapsed_ms(lambda: case.talib(data), clock))
    return statistics.median(ours), statistics.median(theirs) if has_talib else None


def warm_up_s(table: list[Case]) -> float:
    """Seconds to import and first-call every kernel: JIT compile or cache load."""
    start = time.perf_counter()
    tiny = make_bars(64, seed=1)
    for case in table:
        case.fintide(tiny)
    return time.perf_counter() - start


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's best guess)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> str:
    """python / numpy / numba / talib versions, one line."""
    import numba
    import talib

    return (f"python {platform.python_version()}, numpy {np.__version__}, "
            f"numba {numba.__version__}, talib {talib.__version__} "
            f"(TA-Lib C {talib.__ta_version__.decode().split()[0]})")


def run(bars: int, repeat: int, seed: int, only: set[str] | None, clock: str) -> None:
    """Print machine info, the one-off warm-up cost and the timing table."""
    start = time.perf_counter()
    table = [c for c in cases() if only is None or c.name in only]
    import_s = time.perf_counter() - start
    compile_s = warm_up_s(table)
    print(f"machine: {os.cpu_count()} cpus, {cpu_model()}")
    print(f"versions: {versions()}")
    print(f"bars: {bars:,}, repeat: {repeat}, seed: {seed}, clock: {clock}, "
          f"load average before: {os.getloadavg()[0]:.2f} (1 min)")
    print(f"one-off: import {import_s:.2f} s, first call of {len(table)} kernels "
          f"(JIT compile or cache load) {compile_s:.2f} s")
    print()
    print("| indicator | fintide median ms | talib median ms | ratio talib/fintide |")
    print("|---|---:|---:|---:|")
    data = make_bars(bars, seed)
    for case in table:
        ours, theirs = median_ms(case, data, repeat, CLOCKS[clock])
        if theirs is None:
            print(f"| {case.name} | {ours:.2f} | n/a | n/a |")
        else:
            print(f"| {case.name} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f} |")
    print()
    print(f"load average after the run: {os.getloadavg()[0]:.2f} (1 min)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--only", help="comma-separated indicator names")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = parser.parse_args(argv)
    only = set(args.only.upper().split(",")) if args.only else None
    run(args.bars, args.repeat, args.seed, only, args.clock)


if __name__ == "__main__":
    main()
