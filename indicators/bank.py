"""Incremental indicator bank: every configured indicator for many symbols.

Each symbol's state is ONE float64 row of ``IndicatorBank.state`` (shape
``[n_symbols, row_width]``), so the market agent can keep it in a table,
serialize it (:meth:`IndicatorBank.state_to_bytes`) and restore it on a
rebalance.  One Numba call (:func:`indicators._bank_kernels.bank_update`)
advances a whole batch of bars of many symbols, in event order, and returns
every bar's values -- the signal rules see each bar, not only the last one.

After every bar the values equal TA-Lib's batch functions over that symbol's
whole history up to that bar, bit for bit, whatever the batch boundaries (the
kernels repeat TA-Lib's arithmetic in TA-Lib's order; see the kernel module).
VWAP has no TA-Lib counterpart: it is the session's volume-weighted typical
price, with compensated sums.

Surface (the NautilusTrader indicator shape, per symbol)::

    bank = IndicatorBank(BankConfig(), n_symbols=1000)
    out = bank.update(sym_idx, open_, high, low, close, volume)  # [n_bars, n_outputs]
    bank.values(sym)        # {"sma_30": ..., "rsi": ..., ...}, the latest values
    bank.initialized(sym)   # every warm-up is over
    bank.reset(sym)
    sym = bank.add_symbol() # grow when a new symbol appears

Outputs (the columns of ``update``'s result, ``output_names``): ``sma_<p>`` for
each SMA period, ``ema_<p>`` for each EMA period, then ``rsi``, ``macd``,
``macd_signal``, ``macd_hist``, ``bb_upper``, ``bb_middle``, ``bb_lower``,
``atr``, ``adx``, ``plus_di``, ``minus_di``, ``stoch_k``, ``stoch_d``, ``cci``,
``willr``, ``mfi``, ``obv``, ``roc``, ``mom``, ``vwap`` (NaN while the session
has traded no volume).

Serialized row: a 20-byte little-endian header -- magic ``FTIB``, layout
version (u16), reserved (u16), row width (u32), a 64-bit fingerprint of the
layout version and the config (u64) -- then the row's float64 bits.  Loading
checks all of them and the row's structural invariants.

Row layout (computed once from the config by :class:`BankLayout`; offsets in
``BankLayout.offsets``; ``LAYOUT_VERSION`` changes whenever this changes):

=================  ===================================================  ==========================
block              slots                                                width
=================  ===================================================  ==========================
header             bars seen, previous high, low, close, close-ring     5
                   cursor
values             latest value of every output, NaN while warming up  n_outputs
close_ring         closes, bar n at ``n % ring_len``                    max(SMA, BB, ROC+1, MOM+1)
sma_<p>            running total (TA-Lib's own)                         1 each
ema_<p>            seed sum, then the EMA                               1 each
rsi                average gain, average loss                          2
macd               fast EMA, slow EMA, signal EMA                       3
bbands             SMA total, shift, shifted sum, shifted sum of        5
                   squares, bars until the next reseed
atr                seed sum, then the ATR                               1
adx                +DM, -DM, TR (Wilder sums), DX sum then the ADX     4
stoch              max deque, min deque (2 + 2*fastk each), %K and      4*fastk + 8 + slowk + slowd
                   %D running totals, two ring cursors, fast %K ring,
                   slow %K ring
cci                ring cursor, typical-price ring (TA-Lib's slot       1 + period
                   order)
willr              max deque, min deque                                 4*period + 4
mfi                +flow sum, -flow sum, empty-bar run, previous        5 + 2*period
                   typical price, ring cursor, +flow ring, -flow ring
obv                OBV                                                  1
vwap               price*volume and volume sums with their              4
                   compensation terms
=================  ===================================================  ==========================

Rings advance by cursors stored in the row (no integer division per bar); a
cursor always equals the number of values its ring has received modulo its
length, which :meth:`IndicatorBank.check_row` verifies on every load.

Warm-up (NaN) lengths are TA-Lib's lookbacks: SMA/EMA/BBANDS/CCI/WILLR
``p-1``, RSI/ATR/PLUS_DI/MINUS_DI/MFI/ROC/MOM ``p``, ADX ``2p-1``, MACD
``slow+signal-2``, STOCH ``fastk+slowk+slowd-3``, OBV and VWAP 0.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, fields

import numpy as np

from indicators import _bank_kernels as k

# Bump whenever the row layout or the meaning of a slot changes: a row saved
# under another version cannot be read back.
LAYOUT_VERSION = 1

# Limits (TigerBeetle style: every buffer has a bound, decided up front).
MAX_PERIOD = 100_000  # TA-Lib's own upper bound on periods
MAX_ROW_WIDTH = 1 << 20  # slots; a row of 8 MiB is certainly a config mistake
MAX_BATCH_BARS = 1 << 22  # bars per update call (~4M, ~0.7 GB of output at 20 columns)
MAX_SYMBOLS = 1 << 24

_HEADER = struct.Struct("<4sHHIQ")  # magic, layout version, reserved, row width, layout id
_MAGIC = b"FTIB"

_FIXED_OUTPUT_NAMES = (
    "rsi", "macd", "macd_signal", "macd_hist", "bb_upper", "bb_middle", "bb_lower", "atr", "adx",
    "plus_di", "minus_di", "stoch_k", "stoch_d", "cci", "willr", "mfi", "obv", "roc", "mom", "vwap",
)
assert len(_FIXED_OUTPUT_NAMES) == k.N_FIXED_OUTPUTS


class StateLayoutError(ValueError):
    """A serialized or supplied state row does not fit this bank's layout."""


@dataclass(frozen=True, slots=True)
class BankConfig:
    """Periods of every indicator in the bank; defaults are TA-Lib's defaults.

    Several SMAs and EMAs may be configured; every other indicator appears once.
    BBANDS always uses an SMA middle band and STOCH SMA smoothing (TA-Lib's
    default MA types).
    """

    sma_periods: tuple[int, ...] = (30,)
    ema_periods: tuple[int, ...] = (12, 26, 50)
    rsi_period: int = 14
    macd_fast: int = 12
    macd_slow: int = 26
    macd_signal: int = 9
    bb_period: int = 20
    bb_nbdev_up: float = 2.0
    bb_nbdev_dn: float = 2.0
    atr_period: int = 14
    adx_period: int = 14
    stoch_fastk: int = 5
    stoch_slowk: int = 3
    stoch_slowd: int = 3
    cci_period: int = 14
    willr_period: int = 14
    mfi_period: int = 14
    roc_period: int = 10
    mom_period: int = 10

    def __post_init__(self) -> None:
        # Minimums follow TA-Lib's accepted ranges, except SMA/EMA where a
        # period of 1 (TA-Lib: copy the input) is refused as pointless.
        minimums = {
            "rsi_period": 2, "macd_fast": 2, "macd_slow": 2, "macd_signal": 1, "bb_period": 2,
            "atr_period": 1, "adx_period": 2, "stoch_fastk": 1, "stoch_slowk": 1, "stoch_slowd": 1,
            "cci_period": 2, "willr_period": 2, "mfi_period": 2, "roc_period": 1, "mom_period": 1,
        }
        for name, low in minimums.items():
            _check_period(name, getattr(self, name), low)
        for name in ("sma_periods", "ema_periods"):
            periods = getattr(self, name)
            if not isinstance(periods, tuple):  # a list would make the frozen config unhashable
                raise TypeError(f"{name} must be a tuple, got {type(periods).__name__}")
            if len(set(periods)) != len(periods):
                raise ValueError(f"{name} has duplicates: {periods}")
            for p in periods:
                _check_period(name, p, 2)
        if self.macd_fast > self.macd_slow:
            # TA-Lib swaps them silently; a config should say what it means.
            raise ValueError(f"macd_fast {self.macd_fast} > macd_slow {self.macd_slow}")
        for name in ("bb_nbdev_up", "bb_nbdev_dn"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and -3e37 <= value <= 3e37):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

    def output_names(self) -> tuple[str, ...]:
        """Column names of ``update``'s output, in order."""
        return (
            tuple(f"sma_{p}" for p in self.sma_periods)
            + tuple(f"ema_{p}" for p in self.ema_periods)
            + _FIXED_OUTPUT_NAMES
        )

    def warmup_bars(self) -> int:
        """Bars a symbol needs before every output is defined (max lookback + 1)."""
        lookbacks = [
            *(p - 1 for p in self.sma_periods), *(p - 1 for p in self.ema_periods),
            self.rsi_period, self.macd_slow + self.macd_signal - 2, self.bb_period - 1,
            self.atr_period, 2 * self.adx_period - 1,
            self.stoch_fastk + self.stoch_slowk + self.stoch_slowd - 3,
            self.cci_period - 1, self.willr_period - 1, self.mfi_period, self.roc_period,
            self.mom_period,
        ]
        return max(lookbacks) + 1


def _check_period(name: str, value: object, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not low <= value <= MAX_PERIOD:
        raise ValueError(f"{name} must be an int in [{low}, {MAX_PERIOD}], got {value!r}")


@dataclass(frozen=True)
class BankLayout:
    """Where every indicator keeps its slots, derived once from a config."""

    config: BankConfig
    offsets: dict[str, int]
    row_width: int
    ispec: np.ndarray
    fspec: np.ndarray
    layout_id: int  # 64-bit fingerprint of (LAYOUT_VERSION, config), stored with rows

    @classmethod
    def build(cls, config: BankConfig) -> BankLayout:
        names = config.output_names()
        ring_len = max([*config.sma_periods, config.bb_period, config.roc_period + 1, config.mom_period + 1])
        widths: list[tuple[str, int]] = [("header", k.HEADER_WIDTH), ("values", len(names)),
                                          ("close_ring", ring_len)]
        widths += [(f"sma_{p}", 1) for p in config.sma_periods]
        widths += [(f"ema_{p}", 1) for p in config.ema_periods]
        widths += [
            ("rsi", k.RSI_WIDTH), ("macd", k.MACD_WIDTH), ("bbands", k.BB_WIDTH), ("atr", 1),
            ("adx", k.ADX_WIDTH),
            ("stoch", k.stoch_width(config.stoch_fastk, config.stoch_slowk, config.stoch_slowd)),
            ("cci", k.CCI_RING + config.cci_period), ("willr", 2 * k.deque_width(config.willr_period)),
            ("mfi", k.MFI_RINGS + 2 * config.mfi_period), ("obv", 1), ("vwap", k.VWAP_WIDTH),
        ]
        offsets: dict[str, int] = {}
        cursor = 0
        for name, width in widths:
            offsets[name] = cursor
            cursor += width
        if cursor > MAX_ROW_WIDTH:
            raise ValueError(f"row width {cursor} exceeds {MAX_ROW_WIDTH}: periods too large")
        assert offsets["header"] == 0, "H_* slots are absolute"
        ispec, fspec = _specs(config, offsets, ring_len, len(names))
        return cls(config, offsets, cursor, ispec, fspec, _layout_id(config))


def _specs(config: BankConfig, offsets: dict[str, int], ring_len: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's int and float spec arrays (positions: ``S_*`` / ``F_*``)."""
    n_sma, n_ema = len(config.sma_periods), len(config.ema_periods)
    ispec = np.zeros(k.S_FIXED_LEN + 2 * (n_sma + n_ema), dtype=np.int64)
    fixed = {
        k.S_N_OUT: n_out, k.S_OUT_BASE: offsets["values"], k.S_COL0: n_sma + n_ema,
        k.S_RING_BASE: offsets["close_ring"], k.S_RING_LEN: ring_len, k.S_N_SMA: n_sma, k.S_N_EMA: n_ema,
        k.S_RSI_P: config.rsi_period, k.S_RSI_OFF: offsets["rsi"],
        k.S_MACD_FAST: config.macd_fast, k.S_MACD_SLOW: config.macd_slow,
        k.S_MACD_SIGNAL: config.macd_signal, k.S_MACD_OFF: offsets["macd"],
        k.S_BB_P: config.bb_period, k.S_BB_OFF: offsets["bbands"],
        k.S_ATR_P: config.atr_period, k.S_ATR_OFF: offsets["atr"],
        k.S_ADX_P: config.adx_period, k.S_ADX_OFF: offsets["adx"],
        k.S_STOCH_FASTK: config.stoch_fastk, k.S_STOCH_SLOWK: config.stoch_slowk,
        k.S_STOCH_SLOWD: config.stoch_slowd, k.S_STOCH_OFF: offsets["stoch"],
        k.S_CCI_P: config.cci_period, k.S_CCI_OFF: offsets["cci"],
        k.S_WILLR_P: config.willr_period, k.S_WILLR_OFF: offsets["willr"],
        k.S_MFI_P: config.mfi_period, k.S_MFI_OFF: offsets["mfi"], k.S_OBV_OFF: offsets["obv"],
        k.S_ROC_P: config.roc_period, k.S_MOM_P: config.mom_period, k.S_VWAP_OFF: offsets["vwap"],
    }
    assert sorted(fixed) == list(range(k.S_FIXED_LEN)), "every fixed ispec position is set once"
    for pos, value in fixed.items():
        ispec[pos] = value
    pairs = [(p, offsets[f"sma_{p}"]) for p in config.sma_periods]
    pairs += [(p, offsets[f"ema_{p}"]) for p in config.ema_periods]
    for j, (period, slot) in enumerate(pairs):
        ispec[k.S_FIXED_LEN + 2 * j] = period
        ispec[k.S_FIXED_LEN + 2 * j + 1] = slot

    # Coefficients are computed here in double precision exactly as TA-Lib
    # spells them (2/(p+1); (p-1)/p then 1-that; 1/p): the kernels must be
    # handed the very same doubles.
    fspec = np.zeros(k.F_FIXED_LEN + n_ema, dtype=np.float64)
    atr_beta = float(config.atr_period - 1) / float(config.atr_period)
    fspec[k.F_RSI_INV] = 1.0 / float(config.rsi_period)
    fspec[k.F_MACD_KFAST] = 2.0 / float(config.macd_fast + 1)
    fspec[k.F_MACD_KSLOW] = 2.0 / float(config.macd_slow + 1)
    fspec[k.F_MACD_KSIGNAL] = 2.0 / float(config.macd_signal + 1)
    fspec[k.F_BB_INV] = 1.0 / float(config.bb_period)
    fspec[k.F_BB_NBDEV_UP] = float(config.bb_nbdev_up)
    fspec[k.F_BB_NBDEV_DN] = float(config.bb_nbdev_dn)
    fspec[k.F_ATR_BETA] = atr_beta
    fspec[k.F_ATR_ALPHA] = 1.0 - atr_beta
    for j, p in enumerate(config.ema_periods):
        fspec[k.F_FIXED_LEN + j] = 2.0 / float(p + 1)
    return ispec, fspec


def _layout_id(config: BankConfig) -> int:
    text = repr((LAYOUT_VERSION, [(f.name, getattr(config, f.name)) for f in fields(config)]))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class IndicatorBank:
    """The indicator bank of ``n_symbols`` symbols (rows ``0..n_symbols-1``)."""

    def __init__(self, config: BankConfig | None = None, n_symbols: int = 0) -> None:
        self.layout = BankLayout.build(config or BankConfig())
        self.config = self.layout.config
        self.output_names: tuple[str, ...] = self.config.output_names()
        self.row_width: int = self.layout.row_width
        self.warmup_bars: int = self.config.warmup_bars()
        self._n_symbols = 0
        self._buf = np.empty((0, self.row_width), dtype=np.float64)
        self.grow(n_symbols)

    # -- symbols -----------------------------------------------------------

    @property
    def n_symbols(self) -> int:
        return self._n_symbols

    @property
    def state(self) -> np.ndarray:
        """The ``[n_symbols, row_width]`` state (a view: writes go to the bank)."""
        return self._buf[: self._n_symbols]

    def grow(self, n_symbols: int) -> None:
        """Make room for ``n_symbols`` symbols; new rows start empty.

        Capacity doubles, so adding symbols one at a time costs amortised O(1)
        row copies per symbol.  Views previously taken of ``state`` keep
        pointing at the old buffer after a reallocation.
        """
        if not 0 <= n_symbols <= MAX_SYMBOLS:
            raise ValueError(f"n_symbols must be in [0, {MAX_SYMBOLS}], got {n_symbols}")
        if n_symbols <= self._n_symbols:
            return
        if n_symbols > self._buf.shape[0]:
            capacity = max(n_symbols, min(MAX_SYMBOLS, 2 * self._buf.shape[0]))
            buf = np.empty((capacity, self.row_width), dtype=np.float64)
            buf[: self._n_symbols] = self._buf[: self._n_symbols]
            self._buf = buf
        for sym in range(self._n_symbols, n_symbols):
            self._init_row(self._buf[sym])
        self._n_symbols = n_symbols

    def add_symbol(self) -> int:
        """Append one empty symbol row and return its index."""
        sym = self._n_symbols
        self.grow(sym + 1)
        return sym

    def reset(self, sym: int) -> None:
        """Forget everything about ``sym``: its next bar is its first."""
        self._init_row(self._row(sym))

    def _init_row(self, row: np.ndarray) -> None:
        row[:] = 0.0
        values = self.layout.offsets["values"]
        row[values : values + len(self.output_names)] = np.nan

    def _row(self, sym: int) -> np.ndarray:
        if not 0 <= sym < self._n_symbols:
            raise IndexError(f"symbol {sym} not in [0, {self._n_symbols})")
        return self._buf[sym]

    # -- data plane ------------------------------------------------------------

    def update(
        self,
        sym_idx: np.ndarray,
        open_: np.ndarray,
        high: np.ndarray,
        low: np.ndarray,
        close: np.ndarray,
        volume: np.ndarray,
        session_start: np.ndarray | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Feed a batch of bars (event order, any mix of symbols); return their values.

        Returns ``out[n_bars, n_outputs]``: row ``i`` holds every indicator of
        bar ``i``'s symbol right after bar ``i`` (columns ``output_names``; NaN
        while warming up).  ``session_start[i]`` true restarts that symbol's
        VWAP at bar ``i``.  ``open_`` is accepted for a uniform bar signature;
        no indicator in the bank reads it.  The batch is validated as a whole
        before any row changes: a bad bar rejects the batch, state untouched.
        """
        n_bars = len(sym_idx)
        if n_bars > MAX_BATCH_BARS:
            raise ValueError(f"batch of {n_bars} bars exceeds MAX_BATCH_BARS={MAX_BATCH_BARS}; split it")
        syms = np.ascontiguousarray(sym_idx, dtype=np.int64)
        cols = [np.ascontiguousarray(a, dtype=np.float64) for a in (open_, high, low, close, volume)]
        for name, col in zip(("open", "high", "low", "close", "volume"), cols, strict=True):
            if col.shape != (n_bars,):
                raise ValueError(f"{name} has shape {col.shape}, expected ({n_bars},)")
        _, h, lo, c, v = cols
        if n_bars:
            if syms.min() < 0 or syms.max() >= self._n_symbols:
                raise IndexError(f"sym_idx outside [0, {self._n_symbols}); grow the bank first")
            if not (np.isfinite(h).all() and np.isfinite(lo).all() and np.isfinite(c).all() and np.isfinite(v).all()):
                raise ValueError("high, low, close and volume must be finite")
            if (v < 0.0).any():
                raise ValueError("volume must be >= 0")
        flags = np.zeros(0, dtype=np.uint8)
        if session_start is not None:
            flags = np.ascontiguousarray(session_start, dtype=np.uint8)
            if flags.shape != (n_bars,):
                raise ValueError(f"session_start has shape {flags.shape}, expected ({n_bars},)")
        n_out = len(self.output_names)
        if out is None:
            out = np.empty((n_bars, n_out), dtype=np.float64)
        elif out.shape != (n_bars, n_out) or out.dtype != np.float64 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float64 array of shape ({n_bars}, {n_out})")
        if n_bars:
            k.bank_update(self._buf, self.layout.ispec, self.layout.fspec, syms, h, lo, c, v, flags, out)
        return out

    # -- per-symbol surface ----------------------------------------------------

    def values(self, sym: int) -> dict[str, float]:
        """The latest value of every output of ``sym`` (NaN while warming up)."""
        row = self._row(sym)
        base = self.layout.offsets["values"]
        return {name: float(row[base + j]) for j, name in enumerate(self.output_names)}

    def initialized(self, sym: int) -> bool:
        """True once every indicator's warm-up is over for ``sym``.

        VWAP needs no warm-up but is NaN while its session has seen no volume;
        that is a value, not a warm-up, and does not affect this flag.
        """
        return self.bar_count(sym) >= self.warmup_bars

    def bar_count(self, sym: int) -> int:
        """Bars fed to ``sym`` since it was created or reset."""
        return int(self._row(sym)[k.H_COUNT])

    # -- persistence -------------------------------------------------------------

    def state_to_bytes(self, row: np.ndarray) -> bytes:
        """Serialize one state row: a small header, then the row's float64 bits."""
        self.check_row(row)
        header = _HEADER.pack(_MAGIC, LAYOUT_VERSION, 0, self.row_width, self.layout.layout_id)
        return header + np.ascontiguousarray(row, dtype="<f8").tobytes()

    def state_from_bytes(self, data: bytes) -> np.ndarray:
        """Parse bytes written by :meth:`state_to_bytes` under the same layout.

        Raises :class:`StateLayoutError` when the bytes were written under
        another layout version, row width or config, or are malformed.
        """
        if len(data) < _HEADER.size:
            raise StateLayoutError(f"state of {len(data)} bytes is shorter than its {_HEADER.size}-byte header")
        magic, version, _reserved, width, layout_id = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise StateLayoutError(f"not an indicator-bank state (magic {magic!r})")
        if version != LAYOUT_VERSION:
            raise StateLayoutError(f"state has layout version {version}, this bank reads version {LAYOUT_VERSION}")
        if width != self.row_width:
            raise StateLayoutError(f"state row has {width} slots, this bank's layout has {self.row_width}")
        if layout_id != self.layout.layout_id:
            raise StateLayoutError("state was written under a different indicator config (layout id mismatch)")
        if len(data) != _HEADER.size + 8 * width:
            raise StateLayoutError(f"state has {len(data)} bytes, expected {_HEADER.size + 8 * width}")
        row = np.frombuffer(data, dtype="<f8", offset=_HEADER.size).astype(np.float64)
        self.check_row(row)
        return row

    def check_row(self, row: np.ndarray) -> None:
        """Validate a row's structural slots (counts, deque heads and sizes)."""
        if row.shape != (self.row_width,) or row.dtype != np.float64:
            raise StateLayoutError(f"row must be float64 of shape ({self.row_width},), got {row.dtype} {row.shape}")
        count = row[k.H_COUNT]
        if not (np.isfinite(count) and count >= 0 and count == np.floor(count) and count <= 2.0**53):
            raise StateLayoutError(f"bar count {count!r} is not a non-negative integer")
        cfg, off = self.config, self.layout.offsets
        deques = [
            (off["stoch"], cfg.stoch_fastk), (off["stoch"] + k.deque_width(cfg.stoch_fastk), cfg.stoch_fastk),
            (off["willr"], cfg.willr_period), (off["willr"] + k.deque_width(cfg.willr_period), cfg.willr_period),
        ]
        for base, window in deques:
            head, size = row[base], row[base + 1]
            if not (0 <= head < window and 0 <= size <= min(window, count) and head == int(head) and size == int(size)):
                raise StateLayoutError(f"deque at slot {base} has head {head!r} size {size!r} (window {window})")
            if count > 0 and size < 1:
                raise StateLayoutError(f"deque at slot {base} is empty after {int(count)} bars")
        n = int(count)
        fast_count = max(0, n - (cfg.stoch_fastk - 1))
        stoch_sums = off["stoch"] + 2 * k.deque_width(cfg.stoch_fastk)
        cursors = [
            ("close ring", k.H_RING_NEXT, n % self.layout.ispec[k.S_RING_LEN]),
            ("CCI ring", off["cci"] + k.CCI_NEXT, n % cfg.cci_period),
            ("MFI rings", off["mfi"] + k.MFI_NEXT, max(0, n - 1) % cfg.mfi_period),
            ("STOCH fast %K ring", stoch_sums + k.STOCH_FK_NEXT, fast_count % cfg.stoch_slowk),
            ("STOCH slow %K ring", stoch_sums + k.STOCH_SK_NEXT,
             max(0, fast_count - (cfg.stoch_slowk - 1)) % cfg.stoch_slowd),
        ]
        for name, slot, expected in cursors:
            if row[slot] != expected:
                raise StateLayoutError(f"{name} cursor is {row[slot]!r}, expected {expected} after {n} bars")
        null_run = row[off["mfi"] + k.MFI_NULL_RUN]
        if not 0 <= null_run <= cfg.mfi_period:
            raise StateLayoutError(f"MFI empty-bar run {null_run!r} outside [0, {cfg.mfi_period}]")
        since = row[off["bbands"] + k.BB_SINCE_RESEED]
        if not 0 <= since <= k.BB_RESEED_EVERY * cfg.bb_period:
            raise StateLayoutError(f"BBANDS reseed countdown {since!r} out of range")

