"""Multi-symbol market simulator: geometric Brownian motion with Markov regime switching.

Each symbol's log price follows GBM whose drift and volatility depend on a regime (calm,
bull, bear, storm). Regimes switch as a continuous-time Markov chain: a symbol leaves its
regime at rate 1/mean_duration and picks the next from `TRANSITIONS`. A weak pull towards
the starting price (half-life 30 min) keeps hours-long runs at believable levels; over
the seconds-to-minutes scale the signals work on it is invisible.

Tick arrivals: Poisson, `ticks_per_s` in total over all symbols, each tick's symbol drawn
uniformly; event times are spread uniformly inside each `step_ms` step and sorted.

Liveliness (why these numbers): volatility is ~0.06-0.2 % per sqrt(second) and regimes
last 15-40 s, so on 1 s bars trends, reversals and breakouts happen every few tens of
seconds. With the defaults (5 symbols, 200 ticks/s) every symbol gets ~40 ticks/s, so
every symbol has a bar every second and, once the indicators have warmed up (~35 bars),
signals appear within the first minute (tests/integration/test_feed.py checks it).

Determinism: given a seed and a start time, the ticks are a pure function of the step
sequence (numpy Generator for every random draw; the Numba kernel only applies them).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from numba import njit

from ops.feeds.pipeline import TickChunk

log = logging.getLogger("fintide.feed.sim")

REGIMES = ("calm", "bull", "bear", "storm")
# Per second: drift of log price, volatility per sqrt(second), mean regime duration.
DRIFT_PER_S = np.array([0.0, 0.0006, -0.0006, 0.0])
VOL_PER_SQRT_S = np.array([0.0006, 0.0008, 0.0008, 0.002])
MEAN_DURATION_S = np.array([40.0, 25.0, 25.0, 15.0])
# Row: from regime; column: to regime (diagonal 0: leaving means changing).
TRANSITIONS = np.array([
    [0.0, 0.35, 0.35, 0.30],
    [0.50, 0.0, 0.30, 0.20],
    [0.50, 0.30, 0.0, 0.20],
    [0.60, 0.20, 0.20, 0.0],
])
ANCHOR_HALF_LIFE_S = 1_800.0
START_PRICES = {"BTCUSD": 60_000.0, "BTCUSDT": 60_000.0, "ETHUSD": 3_000.0, "ETHUSDT": 3_000.0,
                "AAPL": 190.0, "MSFT": 420.0, "EURUSD": 1.08}
DEFAULT_START_PRICE = 100.0
# Bounds: a step never generates more than this many ticks (rate x step is capped).
MAX_TICKS_PER_STEP = 65_536
MAX_RATE = 50_000_000
MAX_SYMBOLS = 10_000


@dataclass(frozen=True, slots=True)
class SimConfig:
    symbols: tuple[str, ...]
    ticks_per_s: float = 200.0
    seed: int | None = None
    step_ms: int = 10
    # Event time runs `speed` x wall time; 0 = as fast as possible (no sleeping).
    speed: float = 1.0
    # Stop after this many ticks (0 = never).
    max_ticks: int = 0

    def __post_init__(self) -> None:
        if not 1 <= len(self.symbols) <= MAX_SYMBOLS:
            raise ValueError(f"1..{MAX_SYMBOLS} symbols, got {len(self.symbols)}")
        if len(set(self.symbols)) != len(self.symbols):
            raise ValueError("duplicate symbols")
        if not 0 < self.ticks_per_s <= MAX_RATE:
            raise ValueError(f"rate must be in (0, {MAX_RATE}] ticks/s")
        if not 1 <= self.step_ms <= 1_000 or self.speed < 0 or self.max_ticks < 0:
            raise ValueError("step_ms in [1, 1000], speed >= 0, max_ticks >= 0")
        if self.ticks_per_s * self.step_ms / 1000.0 * 4 > MAX_TICKS_PER_STEP:
            raise ValueError(f"rate x step too large: lower step_ms (bound {MAX_TICKS_PER_STEP} ticks per step)")


@njit(cache=True)
def _apply_ticks(log_price: np.ndarray, last_ts: np.ndarray, regime: np.ndarray, anchor: np.ndarray,
                 drift: np.ndarray, vol: np.ndarray, kappa: float, sym: np.ndarray, ts: np.ndarray,
                 z: np.ndarray, price: np.ndarray) -> None:
    """Advance each tick's symbol by the time since its previous tick (exact GBM step)."""
    for i in range(sym.shape[0]):
        s = sym[i]
        # Same-millisecond ticks still move a little: 1 ms is the clock's resolution.
        dt = max(ts[i] - last_ts[s], 1) / 1000.0
        mu = drift[regime[s]] - kappa * (log_price[s] - anchor[s])
        sigma = vol[regime[s]]
        log_price[s] += (mu - 0.5 * sigma * sigma) * dt + sigma * np.sqrt(dt) * z[i]
        last_ts[s] = ts[i]
        price[i] = np.exp(log_price[s])


class Simulator:
    """Generates ticks step by step; `run` paces them and pushes them to a sink."""

    def __init__(self, config: SimConfig, start_ms: int | None = None) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        n = len(config.symbols)
        start = [START_PRICES.get(s, DEFAULT_START_PRICE) for s in config.symbols]
        self.anchor = np.log(np.array(start, dtype=np.float64))
        self.log_price = self.anchor.copy()
        self.regime = self.rng.integers(0, len(REGIMES), n).astype(np.int64)
        step = config.step_ms
        t0 = int(time.time() * 1000) if start_ms is None else start_ms
        self.t_ms = t0 - t0 % step
        self.last_ts = np.full(n, self.t_ms, dtype=np.int64)
        self.kappa = math.log(2.0) / ANCHOR_HALF_LIFE_S
        self.ticks_out = 0

    def step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Ticks of the next step: (symbol index, event time ms, price, size)."""
        cfg, rng = self.config, self.rng
        self._switch_regimes(cfg.step_ms / 1000.0)
        n = min(int(rng.poisson(cfg.ticks_per_s * cfg.step_ms / 1000.0)), MAX_TICKS_PER_STEP)
        sym = rng.integers(0, len(cfg.symbols), n).astype(np.int32)
        ts = self.t_ms + np.sort(rng.integers(0, cfg.step_ms, n)).astype(np.int64)
        z = rng.standard_normal(n)
        size = np.round(rng.lognormal(0.0, 1.0, n), 6)
        price = np.empty(n, dtype=np.float64)
        _apply_ticks(self.log_price, self.last_ts, self.regime, self.anchor, DRIFT_PER_S, VOL_PER_SQRT_S,
                     self.kappa, sym, ts, z, price)
        self.t_ms += cfg.step_ms
        self.ticks_out += n
        return sym, ts, price, size

    def _switch_regimes(self, dt_s: float) -> None:
        leave = self.rng.random(self.regime.shape[0]) < 1.0 - np.exp(-dt_s / MEAN_DURATION_S[self.regime])
        for s in np.flatnonzero(leave):
            self.regime[s] = self.rng.choice(len(REGIMES), p=TRANSITIONS[self.regime[s]])

    async def run(self, push: Callable[[TickChunk], Awaitable[None]], ids: np.ndarray,
                  stop: asyncio.Event) -> None:
        """Push steps until `stop` (or max_ticks); ids maps symbol index -> feed symbol id."""
        cfg = self.config
        wall0, event0 = time.monotonic(), self.t_ms
        while not stop.is_set():
            sym, ts, price, size = self.step()
            if cfg.max_ticks and self.ticks_out >= cfg.max_ticks:
                keep = len(sym) - (self.ticks_out - cfg.max_ticks)
                self.ticks_out = cfg.max_ticks
                await push(TickChunk(ids[sym[:keep]], ts[:keep], price[:keep], size[:keep]))
                return
            await push(TickChunk(ids[sym], ts, price, size))
            if cfg.speed > 0:
                ahead_s = (self.t_ms - event0) / 1000.0 / cfg.speed - (time.monotonic() - wall0)
                if ahead_s > 0:
                    await asyncio.sleep(ahead_s)
            else:
                await asyncio.sleep(0)  # let the publisher and signal handlers run
