"""Benchmark: the incremental indicator bank versus talib.stream, per bar.

    .venv/bin/python -m ops.bench.indicators_incremental [--symbols 1000] [--bars 200] [--repeat 5]
        [--history 200] [--talib-symbols 50] [--clock wall|cpu]

Every symbol first gets ``--history`` bars (untimed), so every indicator is
past its warm-up, then ``--bars`` bars are timed:

* bank: one ``IndicatorBank.update`` call per step = one bar for each of the
  ``--symbols`` symbols (the market agent's batch shape); all 24 outputs.
* talib.stream, re-opened per bar: for each symbol and bar, every talib
  function of the bank is called through ``talib.stream.<FUNC>`` on the last
  ``--history`` bars.  That is the classic ``talib.stream`` usage (before
  ta-lib 0.8 the stream functions recomputed over the history arrays and
  returned the last value; in 0.8 the same call opens a handle on the history,
  whose ``.value`` is that last value) -- O(history) per call.
* talib.stream handles: ta-lib 0.8's O(1) streaming API, one handle per
  function and symbol, ``handle.update(bar)`` per bar.  The fair modern
  baseline.

The talib baselines cost the same per symbol whatever the symbol count, so
they run on the first ``--talib-symbols`` symbols and are reported per
symbol-bar like the bank.  They cover the 18 talib calls of the bank (SMA,
3 EMAs, RSI, MACD, BBANDS, ATR, ADX, PLUS_DI, MINUS_DI, STOCH, CCI, WILLR, MFI,
OBV, ROC, MOM); VWAP, which talib lacks, is only in the bank's figure.
Reported: median microseconds per symbol-bar over all timed steps and
repeats; the three methods run in turn within each repeat.  ``--clock cpu``
times with this thread's CPU clock, which leaves out time the OS gave to other
processes (steadier on a shared machine).  Nothing about time is asserted; the
values of the bank and of the handles are cross-checked at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numba
import numpy as np
import talib
from talib import stream

from indicators.bank import BankConfig, IndicatorBank

CLOCK: Callable[[], float] = time.perf_counter  # --clock cpu switches to time.thread_time


def make_bars(n_symbols: int, n_bars: int, seed: int) -> dict[str, np.ndarray]:
    """Random-walk OHLCV, shape [n_symbols, n_bars] per field."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(5.0, 500.0, (n_symbols, 1))
    close = base * np.exp(np.cumsum(0.01 * rng.standard_normal((n_symbols, n_bars)), axis=1))
    open_ = np.concatenate([close[:, :1], close[:, :-1]], axis=1)
    spread = np.abs(rng.standard_normal((n_symbols, n_bars))) * 0.01 * close
    high = np.maximum(open_, close) + spread * rng.random((n_symbols, n_bars))
    low = np.minimum(open_, close) - spread * rng.random((n_symbols, n_bars))
    volume = rng.integers(1, 10_000, (n_symbols, n_bars)).astype(np.float64)
    return {"open": open_, "high": high, "low": low, "close": close, "volume": volume}


def talib_calls(cfg: BankConfig) -> list[tuple[str, Callable[..., object], tuple[str, ...], dict[str, object]]]:
    """(name, stream class, input fields, parameters) for every talib output group of the bank."""
    hlc = ("high", "low", "close")
    calls: list[tuple[str, Callable[..., object], tuple[str, ...], dict[str, object]]] = []
    calls += [(f"SMA{p}", stream.SMA, ("close",), {"timeperiod": p}) for p in cfg.sma_periods]
    calls += [(f"EMA{p}", stream.EMA, ("close",), {"timeperiod": p}) for p in cfg.ema_periods]
    calls += [
        ("RSI", stream.RSI, ("close",), {"timeperiod": cfg.rsi_period}),
        ("MACD", stream.MACD, ("close",), {"fastperiod": cfg.macd_fast, "slowperiod": cfg.macd_slow,
                                            "signalperiod": cfg.macd_signal}),
        ("BBANDS", stream.BBANDS, ("close",), {"timeperiod": cfg.bb_period, "nbdevup": cfg.bb_nbdev_up,
                                                "nbdevdn": cfg.bb_nbdev_dn, "matype": 0}),
        ("ATR", stream.ATR, hlc, {"timeperiod": cfg.atr_period}),
        ("ADX", stream.ADX, hlc, {"timeperiod": cfg.adx_period}),
        ("PLUS_DI", stream.PLUS_DI, hlc, {"timeperiod": cfg.adx_period}),
        ("MINUS_DI", stream.MINUS_DI, hlc, {"timeperiod": cfg.adx_period}),
        ("STOCH", stream.STOCH, hlc, {"fastk_period": cfg.stoch_fastk, "slowk_period": cfg.stoch_slowk,
                                      "slowk_matype": 0, "slowd_period": cfg.stoch_slowd, "slowd_matype": 0}),
        ("CCI", stream.CCI, hlc, {"timeperiod": cfg.cci_period}),
        ("WILLR", stream.WILLR, hlc, {"timeperiod": cfg.willr_period}),
        ("MFI", stream.MFI, (*hlc, "volume"), {"timeperiod": cfg.mfi_period}),
        ("OBV", stream.OBV, ("close", "volume"), {}),
        ("ROC", stream.ROC, ("close",), {"timeperiod": cfg.roc_period}),
        ("MOM", stream.MOM, ("close",), {"timeperiod": cfg.mom_period}),
    ]
    return calls


def time_bank(bars: dict[str, np.ndarray], history: int, n_timed: int) -> tuple[list[float], IndicatorBank]:
    """Seconds per timed step (one bar of every symbol) and the bank after them."""
    n_symbols = bars["close"].shape[0]
    bank = IndicatorBank(BankConfig(), n_symbols)
    sym_idx = np.arange(n_symbols, dtype=np.int64)
    fields = ("open", "high", "low", "close", "volume")
    columns = {f: np.ascontiguousarray(bars[f].T) for f in fields}  # [bar, symbol]: a step is contiguous
    out = np.empty((n_symbols, len(bank.output_names)))
    for b in range(history):
        bank.update(sym_idx, *(columns[f][b] for f in fields), out=out)
    steps = []
    for b in range(history, history + n_timed):
        args = [columns[f][b] for f in fields]
        t0 = CLOCK()
        bank.update(sym_idx, *args, out=out)
        steps.append(CLOCK() - t0)
    return steps, bank


def time_talib_reopen(bars: dict[str, np.ndarray], history: int, n_timed: int, n_symbols: int) -> list[float]:
    """Seconds per timed step when every call re-opens a stream on the last ``history`` bars."""
    calls = talib_calls(BankConfig())
    fields = ("high", "low", "close", "volume")
    steps = []
    for b in range(history, history + n_timed):
        lo = b + 1 - history
        t0 = CLOCK()
        for s in range(n_symbols):
            window = {f: bars[f][s, lo : b + 1] for f in fields}  # one view per field and symbol-bar
            for _, cls, inputs, params in calls:
                _ = cls(*[window[f] for f in inputs], **params).value  # the value a caller reads
        steps.append(CLOCK() - t0)
    return steps


def time_talib_handles(bars: dict[str, np.ndarray], history: int, n_timed: int,
                       n_symbols: int) -> tuple[list[float], list[list[object]]]:
    """Seconds per timed step with ta-lib 0.8 handles updated once per bar; and the last values."""
    calls = talib_calls(BankConfig())
    handles = [[cls(*(bars[f][s, :history] for f in inputs), **params) for _, cls, inputs, params in calls]
               for s in range(n_symbols)]
    # Each call's arguments are prepared before timing (plain floats, one tuple
    # per call), so the loop below measures talib's update, not our harness.
    args = [[[tuple(float(bars[f][s, b]) for f in inputs) for _, _, inputs, _ in calls]
             for s in range(n_symbols)] for b in range(history, history + n_timed)]
    steps = []
    last: list[list[object]] = [[None] * len(calls) for _ in range(n_symbols)]
    for step_args in args:
        t0 = CLOCK()
        for s in range(n_symbols):
            for j, (handle, a) in enumerate(zip(handles[s], step_args[s], strict=True)):
                last[s][j] = handle.update(*a)
        steps.append(CLOCK() - t0)
    return steps, last


def cross_check(bank: IndicatorBank, last: list[list[object]]) -> float:
    """Largest relative difference between the bank's and the handles' final values."""
    names = [name for name, *_ in talib_calls(bank.config)]
    flat_names = {"MACD": ("macd", "macd_signal", "macd_hist"), "BBANDS": ("bb_upper", "bb_middle", "bb_lower"),
                  "STOCH": ("stoch_k", "stoch_d")}
    worst = 0.0
    for s, values in enumerate(last):
        mine = bank.values(s)
        for name, value in zip(names, values, strict=True):
            keys = flat_names.get(name) or (name.lower().replace("sma", "sma_").replace("ema", "ema_"),)
            got = value if isinstance(value, tuple) else (value,)
            for key, v in zip(keys, got, strict=True):
                worst = max(worst, abs(mine[key] - v) / max(abs(v), 1e-300))
    return worst


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--symbols", type=int, default=1000)
    parser.add_argument("--bars", type=int, default=200, help="timed bars per symbol")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--history", type=int, default=200, help="warm-up bars; also talib's window")
    parser.add_argument("--talib-symbols", type=int, default=50, help="symbols the talib baselines run on")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.thread_time
    assert args.history >= BankConfig().warmup_bars(), "history must cover every warm-up"
    n_talib = min(args.talib_symbols, args.symbols)
    bars = make_bars(args.symbols, args.history + args.bars, seed=1)

    time_bank(make_bars(2, args.history + 2, seed=2), args.history, 2)  # JIT compile / cache load
    bank_steps: list[float] = []
    reopen_steps: list[float] = []
    handle_steps: list[float] = []
    worst = 0.0
    for _ in range(args.repeat):
        steps, bank = time_bank(bars, args.history, args.bars)
        bank_steps += [t / args.symbols for t in steps]
        reopen_steps += [t / n_talib for t in time_talib_reopen(bars, args.history, args.bars, n_talib)]
        steps, last = time_talib_handles(bars, args.history, args.bars, n_talib)
        handle_steps += [t / n_talib for t in steps]
        worst = max(worst, cross_check(bank, last))

    bank_us = statistics.median(bank_steps) * 1e6
    reopen_us = statistics.median(reopen_steps) * 1e6
    handle_us = statistics.median(handle_steps) * 1e6
    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}, {platform.platform()}")
    print(f"versions: python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
          f"ta-lib {talib.__version__} (TA-Lib C {talib.__ta_version__.decode()})")
    print(f"symbols {args.symbols} (talib baselines on {n_talib}), timed bars {args.bars}, "
          f"history {args.history}, repeat {args.repeat}, clock {args.clock}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print("| method | median us per symbol-bar (all indicators) | bank speed-up |")
    print("|---|---:|---:|")
    print(f"| IndicatorBank.update, one call per {args.symbols} bars | {bank_us:.3f} | 1x |")
    print(f"| talib.stream.<FUNC>(last {args.history} bars) per call | {reopen_us:.2f} | {reopen_us / bank_us:.0f}x |")
    print(f"| talib.stream handles, .update(bar) per call | {handle_us:.2f} | {handle_us / bank_us:.1f}x |")
    print()
    print(f"cross-check: largest relative difference bank vs talib handles = {worst:.3g}")


if __name__ == "__main__":
    main()
