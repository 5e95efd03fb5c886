"""Signal rules on the indicator bank's output, one Numba call per batch of bars.

Input per bar: the row it belongs to (a symbol x interval stream, chosen by the caller) and
a feature row with the columns `FEATURES` (bar close/high/low plus bank outputs; see
`FeatureMap`, which gathers them from `IndicatorBank.update`'s output).

Strategies (ids are stable; names in `STRATEGIES`):

0 trend_ema      EMA fast crosses EMA slow (up: buy, down: sell) while ADX > adx_min
1 trend_macd     MACD crosses its signal line, same ADX filter
2 rsi_reversion  RSI leaves oversold (crosses up through rsi_low: buy) or overbought
                 (crosses down through rsi_high: sell)
3 bb_reversion   close re-enters the Bollinger bands: previous close below the previous
                 lower band and this close at or above the lower band (buy); mirrored
                 at the upper band (sell)
4 breakout       close above the highest high of the previous `breakout_bars` bars by more
                 than breakout_atr x ATR (buy); below the lowest low by as much (sell)

Every signal carries price = the bar's close, price_target = price +/- target_atr x ATR and
stop_loss = price -/+ stop_atr x ATR (multiples per strategy), and a feature vector
(`MODEL_FEATURES`) for the confidence model, signed by direction so one model per strategy
serves buys and sells.

Warm-up: a rule fires only when every value it reads is finite on this bar and, for
crosses, on the previous bar of the same row; ATR must be finite and > 0 (targets need
it); breakout needs `breakout_bars` earlier bars. The bank's outputs are NaN while it
warms up, so no rule fires during warm-up. Cooldown: after a strategy fires on a row it
is silent for the next cooldown_bars - 1 bars of that row (at least cooldown_bars bars
between two of its signals).

State: one float64 row per stream row (`SignalRules.state`):

    [0] BARS                bars seen
    [1..8]                  previous close, ema_fast, ema_slow, macd, macd_signal, rsi,
                            bb_upper, bb_lower (NaN until seen)
    [9..13] COOLDOWN        bars left per strategy
    [14] RING_POS, [15] RING_COUNT
    [16 .. 16+R)            highs of the last R bars (ring), R = MAX_BREAKOUT_BARS
    [16+R .. 16+2R)         lows of the last R bars

The breakout window scan is O(breakout_bars) per bar, bounded by MAX_BREAKOUT_BARS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from indicators.bars import grow_rows

FEATURES = ("close", "high", "low", "ema_fast", "ema_slow", "macd", "macd_signal", "adx", "rsi",
            "bb_upper", "bb_middle", "bb_lower", "atr")
F_CLOSE, F_HIGH, F_LOW, F_EMA_FAST, F_EMA_SLOW, F_MACD, F_MACD_SIGNAL, F_ADX, F_RSI, F_BB_UPPER, \
    F_BB_MIDDLE, F_BB_LOWER, F_ATR = range(len(FEATURES))
N_FEATURES = len(FEATURES)

STRATEGIES = ("trend_ema", "trend_macd", "rsi_reversion", "bb_reversion", "breakout")
TREND_EMA, TREND_MACD, RSI_REVERSION, BB_REVERSION, BREAKOUT = range(len(STRATEGIES))
N_STRATEGIES = len(STRATEGIES)

# Scale-free inputs of the confidence model, each signed by the signal's direction.
MODEL_FEATURES = ("ema_gap_atr", "macd_gap_atr", "adx", "rsi_centered", "bb_position", "natr",
                  "range_position_atr", "bar_move_atr")
N_MODEL_FEATURES = len(MODEL_FEATURES)

# params vector positions
P_ADX_MIN = 0
P_RSI_LOW = 1
P_RSI_HIGH = 2
P_BREAKOUT_BARS = 3
P_BREAKOUT_ATR = 4
P_COOLDOWN = 5
P_TARGET_ATR = 6
P_STOP_ATR = P_TARGET_ATR + N_STRATEGIES
P_ENABLED = P_STOP_ATR + N_STRATEGIES
N_PARAMS = P_ENABLED + N_STRATEGIES

# state row positions
BARS = 0
PREV_CLOSE, PREV_EMA_FAST, PREV_EMA_SLOW, PREV_MACD, PREV_MACD_SIGNAL, PREV_RSI, PREV_BB_UPPER, \
    PREV_BB_LOWER = range(1, 9)
COOLDOWN = 9
RING_POS = COOLDOWN + N_STRATEGIES
RING_COUNT = RING_POS + 1
RING_HIGH = RING_COUNT + 1
MAX_BREAKOUT_BARS = 128
RING_LOW = RING_HIGH + MAX_BREAKOUT_BARS
ROW_WIDTH = RING_LOW + MAX_BREAKOUT_BARS

MAX_BATCH_BARS = 1 << 20
MAX_ROWS = 1 << 24

# Where each feature comes from in IndicatorBank's output (indicators/bank.py default
# config names); close/high/low come from the bars themselves.
DEFAULT_BANK_COLUMNS = {"ema_fast": "ema_12", "ema_slow": "ema_26", "macd": "macd",
                        "macd_signal": "macd_signal", "adx": "adx", "rsi": "rsi", "bb_upper": "bb_upper",
                        "bb_middle": "bb_middle", "bb_lower": "bb_lower", "atr": "atr"}


@dataclass(frozen=True, slots=True)
class SignalConfig:
    adx_min: float = 20.0
    rsi_low: float = 30.0
    rsi_high: float = 70.0
    breakout_bars: int = 20
    breakout_atr: float = 0.1
    cooldown_bars: int = 5
    # Per strategy, in STRATEGIES order.
    target_atr: tuple[float, ...] = (2.0, 2.0, 1.5, 1.5, 2.5)
    stop_atr: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.25)
    enabled: tuple[bool, ...] = (True,) * N_STRATEGIES

    def __post_init__(self) -> None:
        for name in ("target_atr", "stop_atr", "enabled"):
            if len(getattr(self, name)) != N_STRATEGIES:
                raise ValueError(f"{name} needs one value per strategy {STRATEGIES}")
        if not 1 <= self.breakout_bars <= MAX_BREAKOUT_BARS:
            raise ValueError(f"breakout_bars must be in [1, {MAX_BREAKOUT_BARS}]")
        if not 0.0 <= self.rsi_low < self.rsi_high <= 100.0:
            raise ValueError("need 0 <= rsi_low < rsi_high <= 100")
        if self.cooldown_bars < 0 or self.breakout_atr < 0.0 or self.adx_min < 0.0:
            raise ValueError("cooldown_bars, breakout_atr and adx_min must be >= 0")
        if min(self.target_atr) <= 0.0 or min(self.stop_atr) <= 0.0:
            raise ValueError("target_atr and stop_atr must be > 0")

    def params(self) -> np.ndarray:
        p = np.zeros(N_PARAMS, dtype=np.float64)
        p[P_ADX_MIN] = self.adx_min
        p[P_RSI_LOW] = self.rsi_low
        p[P_RSI_HIGH] = self.rsi_high
        p[P_BREAKOUT_BARS] = self.breakout_bars
        p[P_BREAKOUT_ATR] = self.breakout_atr
        p[P_COOLDOWN] = self.cooldown_bars
        p[P_TARGET_ATR:P_TARGET_ATR + N_STRATEGIES] = self.target_atr
        p[P_STOP_ATR:P_STOP_ATR + N_STRATEGIES] = self.stop_atr
        p[P_ENABLED:P_ENABLED + N_STRATEGIES] = [1.0 if e else 0.0 for e in self.enabled]
        return p


@njit(cache=True)
def init_rows(state: np.ndarray) -> None:
    for r in range(state.shape[0]):
        state[r, :] = 0.0
        for j in range(PREV_CLOSE, PREV_BB_LOWER + 1):
            state[r, j] = np.nan


@njit(cache=True)
def _finite(*values: float) -> bool:
    for v in values:
        if not np.isfinite(v):
            return False
    return True


@njit(cache=True)
def _cross(prev_a: float, prev_b: float, a: float, b: float) -> int:
    """+1 when a crosses above b between the previous bar and this one, -1 below, else 0."""
    if not _finite(prev_a, prev_b, a, b):
        return 0
    if prev_a <= prev_b and a > b:
        return 1
    if prev_a >= prev_b and a < b:
        return -1
    return 0


@njit(cache=True)
def _window_extremes(row: np.ndarray, n: int) -> tuple[float, float]:
    """Highest high and lowest low of the last n pushed bars."""
    pos = int(row[RING_POS])
    hh = -np.inf
    ll = np.inf
    for j in range(n):
        slot = (pos - 1 - j) % MAX_BREAKOUT_BARS
        if row[RING_HIGH + slot] > hh:
            hh = row[RING_HIGH + slot]
        if row[RING_LOW + slot] < ll:
            ll = row[RING_LOW + slot]
    return hh, ll


@njit(cache=True)
def _sides(row: np.ndarray, f: np.ndarray, params: np.ndarray, sides: np.ndarray) -> tuple[float, float]:
    """Direction of every rule on this bar (into sides); returns the breakout window."""
    adx = f[F_ADX]
    trending = np.isfinite(adx) and adx > params[P_ADX_MIN]
    sides[:] = 0
    if trending:
        sides[TREND_EMA] = _cross(row[PREV_EMA_FAST], row[PREV_EMA_SLOW], f[F_EMA_FAST], f[F_EMA_SLOW])
        sides[TREND_MACD] = _cross(row[PREV_MACD], row[PREV_MACD_SIGNAL], f[F_MACD], f[F_MACD_SIGNAL])
    rsi, prev_rsi = f[F_RSI], row[PREV_RSI]
    if _finite(rsi, prev_rsi):
        if prev_rsi < params[P_RSI_LOW] <= rsi:
            sides[RSI_REVERSION] = 1
        elif prev_rsi > params[P_RSI_HIGH] >= rsi:
            sides[RSI_REVERSION] = -1
    c, pc = f[F_CLOSE], row[PREV_CLOSE]
    if _finite(c, pc, f[F_BB_LOWER], f[F_BB_UPPER], row[PREV_BB_LOWER], row[PREV_BB_UPPER]):
        if pc < row[PREV_BB_LOWER] and c >= f[F_BB_LOWER]:
            sides[BB_REVERSION] = 1
        elif pc > row[PREV_BB_UPPER] and c <= f[F_BB_UPPER]:
            sides[BB_REVERSION] = -1
    n = int(params[P_BREAKOUT_BARS])
    hh, ll = np.nan, np.nan
    if row[RING_COUNT] >= n:
        hh, ll = _window_extremes(row, n)
        margin = params[P_BREAKOUT_ATR] * f[F_ATR]
        if _finite(c, margin):
            if c > hh + margin:
                sides[BREAKOUT] = 1
            elif c < ll - margin:
                sides[BREAKOUT] = -1
    return hh, ll


@njit(cache=True)
def _safe(v: float) -> float:
    return v if np.isfinite(v) else 0.0


@njit(cache=True)
def _model_features(f: np.ndarray, prev_close: float, side: float, hh: float, ll: float,
                    x: np.ndarray) -> None:
    atr = f[F_ATR]
    c = f[F_CLOSE]
    half_band = f[F_BB_UPPER] - f[F_BB_MIDDLE]
    x[0] = _safe(side * (f[F_EMA_FAST] - f[F_EMA_SLOW]) / atr)
    x[1] = _safe(side * (f[F_MACD] - f[F_MACD_SIGNAL]) / atr)
    x[2] = _safe(f[F_ADX] / 100.0)
    x[3] = _safe(side * (f[F_RSI] - 50.0) / 50.0)
    x[4] = _safe(side * (c - f[F_BB_MIDDLE]) / half_band) if half_band > 0.0 else 0.0
    x[5] = _safe(atr / c)
    x[6] = _safe(side * (c - 0.5 * (hh + ll)) / atr)
    x[7] = _safe(side * (c - prev_close) / atr)


@njit(cache=True)
def _remember(row: np.ndarray, f: np.ndarray) -> None:
    row[PREV_CLOSE] = f[F_CLOSE]
    row[PREV_EMA_FAST] = f[F_EMA_FAST]
    row[PREV_EMA_SLOW] = f[F_EMA_SLOW]
    row[PREV_MACD] = f[F_MACD]
    row[PREV_MACD_SIGNAL] = f[F_MACD_SIGNAL]
    row[PREV_RSI] = f[F_RSI]
    row[PREV_BB_UPPER] = f[F_BB_UPPER]
    row[PREV_BB_LOWER] = f[F_BB_LOWER]
    if np.isfinite(f[F_HIGH]) and np.isfinite(f[F_LOW]):
        pos = int(row[RING_POS])
        row[RING_HIGH + pos] = f[F_HIGH]
        row[RING_LOW + pos] = f[F_LOW]
        row[RING_POS] = (pos + 1) % MAX_BREAKOUT_BARS
        if row[RING_COUNT] < MAX_BREAKOUT_BARS:
            row[RING_COUNT] += 1.0


@njit(cache=True)
def evaluate(state: np.ndarray, params: np.ndarray, rows: np.ndarray, feat: np.ndarray,
             out_bar: np.ndarray, out_strategy: np.ndarray, out_side: np.ndarray, out_price: np.ndarray,
             out_target: np.ndarray, out_stop: np.ndarray, out_x: np.ndarray) -> int:
    """Run every rule on each bar in order; write signals to out_*; return their count.

    `out_bar[j]` is the index (into rows/feat) of the bar signal j fired on; signals come
    out in bar order. Capacity: len(rows) * N_STRATEGIES.
    """
    sides = np.zeros(N_STRATEGIES, dtype=np.int64)
    n_out = 0
    for i in range(rows.shape[0]):
        row = state[rows[i]]
        f = feat[i]
        row[BARS] += 1.0
        for s in range(N_STRATEGIES):
            if row[COOLDOWN + s] > 0.0:
                row[COOLDOWN + s] -= 1.0
        hh, ll = _sides(row, f, params, sides)
        atr, c = f[F_ATR], f[F_CLOSE]
        if _finite(atr, c) and atr > 0.0:
            for s in range(N_STRATEGIES):
                side = sides[s]
                if side == 0 or params[P_ENABLED + s] == 0.0 or row[COOLDOWN + s] > 0.0:
                    continue
                out_bar[n_out] = i
                out_strategy[n_out] = s
                out_side[n_out] = side
                out_price[n_out] = c
                out_target[n_out] = c + side * params[P_TARGET_ATR + s] * atr
                out_stop[n_out] = c - side * params[P_STOP_ATR + s] * atr
                _model_features(f, row[PREV_CLOSE], float(side), hh, ll, out_x[n_out])
                row[COOLDOWN + s] = params[P_COOLDOWN]
                n_out += 1
        _remember(row, f)
    return n_out


@dataclass(frozen=True, slots=True)
class SignalOutput:
    """Signals of one call (views valid until the next call)."""

    bar: np.ndarray  # int64, index of the bar in the call's input
    strategy: np.ndarray  # int32, index into STRATEGIES
    side: np.ndarray  # int32, +1 buy / -1 sell
    price: np.ndarray
    price_target: np.ndarray
    stop_loss: np.ndarray
    x: np.ndarray  # [n, N_MODEL_FEATURES]

    def __len__(self) -> int:
        return int(self.bar.shape[0])


class FeatureMap:
    """Gathers FEATURES columns from the bank's output and the bars, once per batch."""

    def __init__(self, bank_output_names: tuple[str, ...], columns: dict[str, str] | None = None) -> None:
        columns = columns or DEFAULT_BANK_COLUMNS
        missing = [name for name in columns.values() if name not in bank_output_names]
        if missing:
            raise ValueError(f"bank has no output(s) {missing}; configure it or map other columns")
        self.bank_index = {f: bank_output_names.index(columns[f]) for f in FEATURES[3:]}

    def build(self, bank_out: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray,
              out: np.ndarray | None = None) -> np.ndarray:
        n = bank_out.shape[0]
        assert high.shape == (n,) and low.shape == (n,) and close.shape == (n,), "bar columns differ in length"
        feat = np.empty((n, N_FEATURES), dtype=np.float64) if out is None else out[:n]
        feat[:, F_CLOSE] = close
        feat[:, F_HIGH] = high
        feat[:, F_LOW] = low
        for f, col in self.bank_index.items():
            feat[:, FEATURES.index(f)] = bank_out[:, col]
        return feat


class SignalRules:
    """The rules for `n_rows` stream rows (e.g. symbol x interval)."""

    def __init__(self, config: SignalConfig | None = None, n_rows: int = 0, max_batch_bars: int = 65_536) -> None:
        if not 1 <= max_batch_bars <= MAX_BATCH_BARS:
            raise ValueError(f"max_batch_bars must be in [1, {MAX_BATCH_BARS}]")
        self.config = config or SignalConfig()
        self.params = self.config.params()
        self.max_batch_bars = max_batch_bars
        self._buf = np.empty((0, ROW_WIDTH), dtype=np.float64)
        self._n_rows = 0
        cap = max_batch_bars * N_STRATEGIES
        self._out = (np.empty(cap, np.int64), np.empty(cap, np.int32), np.empty(cap, np.int32),
                     np.empty(cap), np.empty(cap), np.empty(cap), np.empty((cap, N_MODEL_FEATURES)))
        self.grow(n_rows)

    @property
    def n_rows(self) -> int:
        return self._n_rows

    @property
    def state(self) -> np.ndarray:
        """The [n_rows, ROW_WIDTH] state (a view: writes go to the rules)."""
        return self._buf[: self._n_rows]

    def grow(self, n_rows: int) -> None:
        if not 0 <= n_rows <= MAX_ROWS:
            raise ValueError(f"n_rows must be in [0, {MAX_ROWS}]")
        if n_rows > self._n_rows:
            self._buf = grow_rows(self._buf, self._n_rows, n_rows)
            init_rows(self._buf[self._n_rows:n_rows])
            self._n_rows = n_rows

    def process_batch(self, rows: np.ndarray, feat: np.ndarray) -> SignalOutput:
        n = int(rows.shape[0])
        assert n <= self.max_batch_bars, f"{n} bars exceed max_batch_bars={self.max_batch_bars}"
        assert feat.shape == (n, N_FEATURES), f"feat must be [{n}, {N_FEATURES}], got {feat.shape}"
        if n and (int(rows.min()) < 0 or int(rows.max()) >= self.n_rows):
            raise IndexError(f"rows outside [0, {self.n_rows}); grow() first")
        o = self._out
        count = evaluate(self.state, self.params, np.ascontiguousarray(rows, dtype=np.int64),
                         np.ascontiguousarray(feat, dtype=np.float64), *o)
        return SignalOutput(*(a[:count] for a in o))
