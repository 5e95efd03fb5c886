"""Fraud features: Numba kernels over per-wallet float64 state rows.

Two kinds of row, each kept in a RocksDB-backed Faust table (tables/fraud.py):

* the **payer row** (key: payer wallet) holds sliding windows of the wallet's outgoing
  payments, an exponentially weighted mean/variance of its log amounts, the last payment
  time, bounded LRU sets of recent payees / devices / IPs / countries and a ring of
  recent payment ids (redelivery detection);
* the **payee row** (key: payee wallet) holds the wallet's incoming-payment window, the
  last-seen time of its most recent distinct payers (fan-in) and its own dedupe ring.

One call of :func:`payer_update` (or :func:`payee_update`) walks a whole batch of
payments in order; each payment updates its row in place and leaves its feature values
in ``out``. Nothing allocates per payment and nothing touches a Python object.

Definitions (the unit tests recompute each one from the raw events in plain Python):

* **Effective time.** A row's clock never goes back: a payment stamped before the row's
  last payment counts at the last payment's time (``t = max(ts, last_ts)``). Payments of
  one wallet arrive in order on one partition; only clocks of different publishers skew.
* **Windows** (1 min, 1 h, 24 h) are ring-bucketed: 12 x 5 s, 12 x 5 min, 24 x 1 h. A
  payment at effective time ``u`` is inside the window of time ``t`` when
  ``floor(t/b) - floor(u/b) < n_buckets`` (``b`` the bucket width), so the oldest bucket
  slides out whole. Per payment the cost is O(1): the ring advances by the buckets that
  elapsed (at most ``n_buckets`` cleared, each subtracted from a running total).
  Counts and sums are integers held in float64: exact below 2**53.
* Every window value **includes** the payment being scored.
* **amount_z**: ``(ln(amount) - mean) / max(std, 0.25)`` against the exponentially
  weighted (alpha 0.1 per payment) mean and variance of the wallet's *previous* log
  amounts; 0 until the wallet has ``MIN_HISTORY`` payments. Log scale because amounts
  are heavy-tailed: on the raw scale one large payment dominates the variance for weeks.
* **new_payee / new_device / new_ip / new_country**: 1 when the value is not among the
  wallet's ``K`` most recently used distinct values (an LRU set; K = 32 payees, 8 of each
  other kind), else 0; an empty value (not sent) is never new.
* **secs_since_last**: seconds since the wallet's previous payment, ``SECS_CAP`` (30 days)
  for its first.
* **small_count_1h**: payments of at most ``SMALL_AMOUNT_MINOR`` in the 1 h window;
  **small_then_large**: ``small_count_1h`` when this payment is at least
  ``LARGE_AMOUNT_MINOR``, else 0 (the card-testing pattern: probe with small amounts,
  then cash out).
* **failed_1h / failed_24h**: sum of the requests' ``failed_attempts`` in the window.
* **payee_fanin_1h / _24h**: distinct payers whose latest payment into the wallet is
  less than the window old (exact timestamps, not buckets), capped at ``FANIN_K`` = 64: the
  row keeps the last-seen time of the 64 most recent distinct payers, so below the cap
  the count is exact and above it reads 64.

Hashes: strings (payee ids, devices, ...) enter the kernels as 52-bit integers
(:func:`services.fraud.stable_hash`) so that they fit a float64 slot exactly; 0 means
"no value".

A redelivered payment (its id is in the row's ring of the last ``DEDUPE_K`` payment
ids) is scored on a scratch copy of the row and leaves the row unchanged, so features
never count a payment twice. The ring is bounded: a redelivery more than ``DEDUPE_K``
payments of the same wallet later would count again (Faust redelivers at most the
messages after the last committed offset, a few seconds' worth).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Bump whenever a layout or the meaning of a slot changes; rows of another version are
# refused when loaded (tables/fraud.py), never misread.
LAYOUT_VERSION = 1

# ---------------------------------------------------------------------------- constants
WINDOW_NAMES = ("1m", "1h", "24h")
BUCKET_MS = np.array([5_000, 300_000, 3_600_000], dtype=np.int64)
N_BUCKETS = np.array([12, 12, 24], dtype=np.int64)
WINDOW_MS = BUCKET_MS * N_BUCKETS  # 60 s, 1 h, 24 h

SMALL_AMOUNT_MINOR = 500
LARGE_AMOUNT_MINOR = 20_000
EW_ALPHA = 0.1
MIN_HISTORY = 5
STD_FLOOR = 0.25
SECS_CAP = 30.0 * 86_400.0

PAYEE_K = 32
DEVICE_K = 8
IP_K = 8
COUNTRY_K = 8
DEDUPE_K = 32
FANIN_K = 64
FANIN_WINDOWS_MS = (3_600_000, 86_400_000)

# ---------------------------------------------------------------------------- payer row
# Quantities per payer window bucket.
Q_COUNT, Q_SUM, Q_SMALL, Q_FAILED = 0, 1, 2, 3
PAYER_Q = 4

P_VERSION = 0
P_LAST_TS = 1  # effective time of the last payment, epoch ms (0: none yet)
P_SEEN = 2  # payments counted
P_EW_MEAN = 3
P_EW_VAR = 4
P_DEDUPE_NEXT = 5  # next slot of the dedupe ring (a cursor)
P_CLOCK = 6  # LRU clock: +1 per payment
P_HEADER = 8


def _window_offsets(header: int, q: int) -> tuple[int, ...]:
    """Where each window block starts after a row's `header` slots, and where they end.
    Each block: [current bucket number, totals[q], buckets[n * q]]."""
    offsets, at = [], header
    for n in N_BUCKETS:
        offsets.append(at)
        at += 1 + q + int(n) * q
    return (*offsets, at)


_PW = _window_offsets(P_HEADER, PAYER_Q)
PW0, PW1, PW2 = _PW[0], _PW[1], _PW[2]
P_PAYEES = _PW[3]  # [hash K][stamp K]
P_DEVICES = P_PAYEES + 2 * PAYEE_K
P_IPS = P_DEVICES + 2 * DEVICE_K
P_COUNTRIES = P_IPS + 2 * IP_K
P_DEDUPE = P_COUNTRIES + 2 * COUNTRY_K
PAYER_WIDTH = P_DEDUPE + DEDUPE_K

# Payer feature columns (out[:, j]); names in PAYER_FEATURES.
PAYER_FEATURES = (
    "amount_minor", "failed_attempts",
    "payer_count_1m", "payer_count_1h", "payer_count_24h",
    "payer_sum_1m", "payer_sum_1h", "payer_sum_24h",
    "small_count_1h", "failed_1h", "failed_24h",
    "amount_z", "secs_since_last", "payments_seen",
    "new_payee", "new_device", "new_ip", "new_country",
    "small_then_large",
)
N_PAYER_FEATURES = len(PAYER_FEATURES)

# ---------------------------------------------------------------------------- payee row
PE_VERSION = 0
PE_LAST_TS = 1
PE_SEEN = 2
PE_DEDUPE_NEXT = 3
PE_HEADER = 4
PAYEE_Q = 2  # count, sum
PE_WINDOW = PE_HEADER  # one window (1 h): [current bucket, totals[2], buckets[12 * 2]]
PE_FANIN = PE_WINDOW + 1 + PAYEE_Q + int(N_BUCKETS[1]) * PAYEE_Q  # [payer hash K][last seen K]
PE_DEDUPE = PE_FANIN + 2 * FANIN_K
PAYEE_WIDTH = PE_DEDUPE + DEDUPE_K

PAYEE_FEATURES = ("payee_fanin_1h", "payee_fanin_24h", "payee_count_1h", "payee_sum_1h")
N_PAYEE_FEATURES = len(PAYEE_FEATURES)


def _new_rows(n: int, width: int, version_slot: int) -> np.ndarray:
    """n empty rows of `width` slots, stamped with the layout version."""
    rows = np.zeros((n, width), dtype=np.float64)
    rows[:, version_slot] = LAYOUT_VERSION
    return rows


def new_payer_rows(n: int) -> np.ndarray:
    return _new_rows(n, PAYER_WIDTH, P_VERSION)


def new_payee_rows(n: int) -> np.ndarray:
    return _new_rows(n, PAYEE_WIDTH, PE_VERSION)


# ---------------------------------------------------------------------------- helpers
@njit(cache=True, inline="always")
def _advance(row: np.ndarray, base: int, q: int, n_buckets: int, bucket: int) -> None:
    """Slide the window block at `base` so that `bucket` is current (never backwards)."""
    cur = int(row[base])
    if bucket <= cur:
        return
    steps = min(bucket - cur, n_buckets)
    for s in range(1, steps + 1):
        slot = base + 1 + q + ((cur + s) % n_buckets) * q
        for j in range(q):
            row[base + 1 + j] -= row[slot + j]
            row[slot + j] = 0.0
    row[base] = bucket


@njit(cache=True, inline="always")
def _add(row: np.ndarray, base: int, q: int, n_buckets: int, j: int, value: float) -> None:
    """Add `value` to quantity `j` of the current bucket and the running total."""
    slot = base + 1 + q + (int(row[base]) % n_buckets) * q
    row[slot + j] += value
    row[base + 1 + j] += value


@njit(cache=True, inline="always")
def _lru_touch(row: np.ndarray, base: int, k: int, h: int, clock: float) -> float:
    """1.0 if `h` is not among the set's values (then it replaces the least recently
    used), else 0.0; either way `h` becomes the most recently used. h == 0: no value."""
    if h == 0:
        return 0.0
    value = float(h)
    victim = 0
    oldest = np.inf
    for i in range(k):
        stored = row[base + i]
        if stored == value:
            row[base + k + i] = clock
            return 0.0
        if stored == 0.0:
            if oldest > -1.0:  # the first empty slot wins over any used one
                victim, oldest = i, -1.0
        elif row[base + k + i] < oldest:
            victim, oldest = i, row[base + k + i]
    row[base + victim] = value
    row[base + k + victim] = clock
    return 1.0


@njit(cache=True, inline="always")
def _seen(row: np.ndarray, base: int, k: int, h: int) -> bool:
    value = float(h)
    for i in range(k):
        if row[base + i] == value:
            return True
    return False


@njit(cache=True, inline="always")
def _remember(row: np.ndarray, base: int, k: int, cursor_slot: int, h: int) -> None:
    at = int(row[cursor_slot])
    row[base + at] = float(h)
    row[cursor_slot] = (at + 1) % k


# ---------------------------------------------------------------------------- payer
@njit(cache=True, inline="always")
def _payer_step(row: np.ndarray, ts_ms: int, amount: int, failed: int, payee_h: int, device_h: int,
                ip_h: int, country_h: int, out: np.ndarray) -> None:
    last = row[P_LAST_TS]
    seen = row[P_SEEN]
    t = max(float(ts_ms), last)
    t_int = int(t)
    x = np.log(float(amount))
    # Scores use the history before this payment.
    if seen >= MIN_HISTORY:
        std = max(np.sqrt(row[P_EW_VAR]), STD_FLOOR)
        out[11] = (x - row[P_EW_MEAN]) / std
    else:
        out[11] = 0.0
    out[12] = min((t - last) / 1000.0, SECS_CAP) if seen > 0 else SECS_CAP
    if seen == 0:
        row[P_EW_MEAN] = x
        row[P_EW_VAR] = 0.0
    else:
        diff = x - row[P_EW_MEAN]
        incr = EW_ALPHA * diff
        row[P_EW_MEAN] += incr
        row[P_EW_VAR] = (1.0 - EW_ALPHA) * (row[P_EW_VAR] + diff * incr)
    small = 1.0 if amount <= SMALL_AMOUNT_MINOR else 0.0
    bases = (PW0, PW1, PW2)
    for w in range(3):
        base = bases[w]
        n_b = int(N_BUCKETS[w])
        _advance(row, base, PAYER_Q, n_b, t_int // int(BUCKET_MS[w]))
        _add(row, base, PAYER_Q, n_b, Q_COUNT, 1.0)
        _add(row, base, PAYER_Q, n_b, Q_SUM, float(amount))
        _add(row, base, PAYER_Q, n_b, Q_SMALL, small)
        _add(row, base, PAYER_Q, n_b, Q_FAILED, float(failed))
    out[0] = float(amount)
    out[1] = float(failed)
    out[2] = row[PW0 + 1 + Q_COUNT]
    out[3] = row[PW1 + 1 + Q_COUNT]
    out[4] = row[PW2 + 1 + Q_COUNT]
    out[5] = row[PW0 + 1 + Q_SUM]
    out[6] = row[PW1 + 1 + Q_SUM]
    out[7] = row[PW2 + 1 + Q_SUM]
    out[8] = row[PW1 + 1 + Q_SMALL]
    out[9] = row[PW1 + 1 + Q_FAILED]
    out[10] = row[PW2 + 1 + Q_FAILED]
    row[P_SEEN] = seen + 1.0
    out[13] = seen + 1.0
    clock = row[P_CLOCK] + 1.0
    row[P_CLOCK] = clock
    out[14] = _lru_touch(row, P_PAYEES, PAYEE_K, payee_h, clock)
    out[15] = _lru_touch(row, P_DEVICES, DEVICE_K, device_h, clock)
    out[16] = _lru_touch(row, P_IPS, IP_K, ip_h, clock)
    out[17] = _lru_touch(row, P_COUNTRIES, COUNTRY_K, country_h, clock)
    out[18] = out[8] if amount >= LARGE_AMOUNT_MINOR else 0.0
    row[P_LAST_TS] = t


@njit(cache=True)
def payer_update(rows: np.ndarray, row_idx: np.ndarray, ts_ms: np.ndarray, amount: np.ndarray,
                 failed: np.ndarray, payee_h: np.ndarray, device_h: np.ndarray, ip_h: np.ndarray,
                 country_h: np.ndarray, payment_h: np.ndarray, out: np.ndarray, dup: np.ndarray) -> None:
    """Apply payments i = 0..n-1 in order to rows[row_idx[i]]; features to out[i]."""
    scratch = np.empty(rows.shape[1], dtype=np.float64)
    for i in range(row_idx.shape[0]):
        row = rows[row_idx[i]]
        if _seen(row, P_DEDUPE, DEDUPE_K, payment_h[i]):
            dup[i] = True
            scratch[:] = row
            _payer_step(scratch, ts_ms[i], amount[i], failed[i], payee_h[i], device_h[i], ip_h[i],
                        country_h[i], out[i])
            continue
        dup[i] = False
        _payer_step(row, ts_ms[i], amount[i], failed[i], payee_h[i], device_h[i], ip_h[i],
                    country_h[i], out[i])
        _remember(row, P_DEDUPE, DEDUPE_K, P_DEDUPE_NEXT, payment_h[i])


# ---------------------------------------------------------------------------- payee
@njit(cache=True, inline="always")
def _payee_step(row: np.ndarray, ts_ms: int, amount: int, payer_h: int, out: np.ndarray) -> None:
    t = max(float(ts_ms), row[PE_LAST_TS])
    n_b = int(N_BUCKETS[1])
    _advance(row, PE_WINDOW, PAYEE_Q, n_b, int(t) // int(BUCKET_MS[1]))
    _add(row, PE_WINDOW, PAYEE_Q, n_b, 0, 1.0)
    _add(row, PE_WINDOW, PAYEE_Q, n_b, 1, float(amount))
    # Fan-in: refresh this payer's last-seen time, or take the slot of the payer seen
    # longest ago (empty slots first).
    value = float(payer_h)
    slot = -1
    victim = 0
    oldest = np.inf
    for i in range(FANIN_K):
        stored = row[PE_FANIN + i]
        if stored == value:
            slot = i
            break
        if stored == 0.0:
            if oldest > -1.0:
                victim, oldest = i, -1.0
        elif row[PE_FANIN + FANIN_K + i] < oldest:
            victim, oldest = i, row[PE_FANIN + FANIN_K + i]
    if slot < 0:
        slot = victim
        row[PE_FANIN + slot] = value
    row[PE_FANIN + FANIN_K + slot] = t
    n1 = 0.0
    n24 = 0.0
    for i in range(FANIN_K):
        if row[PE_FANIN + i] != 0.0:
            age = t - row[PE_FANIN + FANIN_K + i]
            if age < FANIN_WINDOWS_MS[0]:
                n1 += 1.0
            if age < FANIN_WINDOWS_MS[1]:
                n24 += 1.0
    out[0] = n1
    out[1] = n24
    out[2] = row[PE_WINDOW + 1]
    out[3] = row[PE_WINDOW + 2]
    row[PE_SEEN] += 1.0
    row[PE_LAST_TS] = t


@njit(cache=True)
def payee_update(rows: np.ndarray, row_idx: np.ndarray, ts_ms: np.ndarray, amount: np.ndarray,
                 payer_h: np.ndarray, payment_h: np.ndarray, out: np.ndarray, dup: np.ndarray) -> None:
    """Apply payments i = 0..n-1 in order to payee rows[row_idx[i]]; features to out[i]."""
    scratch = np.empty(rows.shape[1], dtype=np.float64)
    for i in range(row_idx.shape[0]):
        row = rows[row_idx[i]]
        if _seen(row, PE_DEDUPE, DEDUPE_K, payment_h[i]):
            dup[i] = True
            scratch[:] = row
            _payee_step(scratch, ts_ms[i], amount[i], payer_h[i], out[i])
            continue
        dup[i] = False
        _payee_step(row, ts_ms[i], amount[i], payer_h[i], out[i])
        _remember(row, PE_DEDUPE, DEDUPE_K, PE_DEDUPE_NEXT, payment_h[i])


# ---------------------------------------------------------------------------- views
@njit(cache=True)
def payer_windows_at(row: np.ndarray, now_ms: int, out: np.ndarray) -> None:
    """Window totals of a payer row as of `now_ms` (the row is not changed):
    out[w * PAYER_Q + q] for window w, quantity q."""
    scratch = row.copy()
    t = max(now_ms, int(scratch[P_LAST_TS]))
    bases = (PW0, PW1, PW2)
    for w in range(3):
        base = bases[w]
        _advance(scratch, base, PAYER_Q, int(N_BUCKETS[w]), t // int(BUCKET_MS[w]))
        for q in range(PAYER_Q):
            out[w * PAYER_Q + q] = scratch[base + 1 + q]


@njit(cache=True)
def payee_windows_at(row: np.ndarray, now_ms: int, out: np.ndarray) -> None:
    """out = [fanin_1h, fanin_24h, count_1h, sum_1h] of a payee row as of `now_ms`."""
    scratch = row.copy()
    t = max(float(now_ms), scratch[PE_LAST_TS])
    _advance(scratch, PE_WINDOW, PAYEE_Q, int(N_BUCKETS[1]), int(t) // int(BUCKET_MS[1]))
    n1 = 0.0
    n24 = 0.0
    for i in range(FANIN_K):
        if scratch[PE_FANIN + i] != 0.0:
            age = t - scratch[PE_FANIN + FANIN_K + i]
            if age < FANIN_WINDOWS_MS[0]:
                n1 += 1.0
            if age < FANIN_WINDOWS_MS[1]:
                n24 += 1.0
    out[0] = n1
    out[1] = n24
    out[2] = scratch[PE_WINDOW + 1]
    out[3] = scratch[PE_WINDOW + 2]


def check_payer_row(row: np.ndarray) -> None:
    """Refuse a row of another layout or with broken cursors (asserted at load)."""
    assert row.shape == (PAYER_WIDTH,), f"payer row has {row.shape}, expected ({PAYER_WIDTH},)"
    assert row[P_VERSION] == LAYOUT_VERSION, f"payer row layout {row[P_VERSION]} != {LAYOUT_VERSION}"
    assert 0 <= row[P_DEDUPE_NEXT] < DEDUPE_K and row[P_SEEN] >= 0


def check_payee_row(row: np.ndarray) -> None:
    assert row.shape == (PAYEE_WIDTH,), f"payee row has {row.shape}, expected ({PAYEE_WIDTH},)"
    assert row[PE_VERSION] == LAYOUT_VERSION, f"payee row layout {row[PE_VERSION]} != {LAYOUT_VERSION}"
    assert 0 <= row[PE_DEDUPE_NEXT] < DEDUPE_K and row[PE_SEEN] >= 0


# ---------------------------------------------------------------------------- entity rows
# One layout for the paying user, the device and the IP (tables/fraud.py keeps them in one
# table under "user:<id>", "device:<id>", "ip:<id>"): the three windows of the payer row
# (count, sum, failed attempts), the last-seen time of the most recent distinct "others"
# (for a user: its wallets; for a device or an IP: the users on it) and a dedupe ring.
#
# * user_* : the user's payments across all of its wallets (a takeover spread over
#   wallets, a user cycling wallets: user_wallets_1h);
# * device_* / ip_* : every payment from the device / IP, whoever made it, and
#   device_users_1h/_24h, ip_users_1h/_24h: distinct users whose latest payment from it is
#   less than the window old (exact times, capped at DISTINCT_K) -- the shared-device /
#   account-takeover signal (one attacker device hitting several accounts).
ENTITY_KINDS = ("user", "device", "ip")
ENTITY_OTHER = ("wallets", "users", "users")  # what the distinct count counts, per kind
DISTINCT_K = 32
E_Q = 3  # count, sum, failed per window bucket
EQ_COUNT, EQ_SUM, EQ_FAILED = 0, 1, 2
E_VERSION = 0
E_LAST_TS = 1
E_SEEN = 2
E_DEDUPE_NEXT = 3
E_HEADER = 4


_EW = _window_offsets(E_HEADER, E_Q)
EW0, EW1, EW2 = _EW[0], _EW[1], _EW[2]
E_DISTINCT = _EW[3]  # [other hash K][last seen K]
E_DEDUPE = E_DISTINCT + 2 * DISTINCT_K
ENTITY_WIDTH = E_DEDUPE + DEDUPE_K

# Columns of one entity kind's features (entity_update's out[:, j]); the feature names are
# "<kind>_<suffix>", with the distinct count named after what it counts.
ENTITY_SUFFIXES = ("count_1m", "count_1h", "count_24h", "sum_1m", "sum_1h", "sum_24h",
                   "failed_1h", "failed_24h", "{other}_1h", "{other}_24h")
N_ENTITY_FEATURES = len(ENTITY_SUFFIXES)
ENTITY_FEATURES = tuple(f"{kind}_{suffix.format(other=other)}"
                        for kind, other in zip(ENTITY_KINDS, ENTITY_OTHER, strict=True)
                        for suffix in ENTITY_SUFFIXES)


def new_entity_rows(n: int) -> np.ndarray:
    return _new_rows(n, ENTITY_WIDTH, E_VERSION)


@njit(cache=True, inline="always")
def _distinct_touch(row: np.ndarray, base: int, k: int, h: int, t: float) -> None:
    """Refresh `h`'s last-seen time, or give it the slot seen longest ago (empty first)."""
    if h == 0:
        return
    value = float(h)
    victim = 0
    oldest = np.inf
    for i in range(k):
        stored = row[base + i]
        if stored == value:
            row[base + k + i] = t
            return
        if stored == 0.0:
            if oldest > -1.0:
                victim, oldest = i, -1.0
        elif row[base + k + i] < oldest:
            victim, oldest = i, row[base + k + i]
    row[base + victim] = value
    row[base + k + victim] = t


@njit(cache=True, inline="always")
def _distinct_within(row: np.ndarray, base: int, k: int, t: float, window_ms: float) -> float:
    n = 0.0
    for i in range(k):
        if row[base + i] != 0.0 and t - row[base + k + i] < window_ms:
            n += 1.0
    return n


@njit(cache=True, inline="always")
def _entity_step(row: np.ndarray, ts_ms: int, amount: int, failed: int, other_h: int, out: np.ndarray) -> None:
    t = max(float(ts_ms), row[E_LAST_TS])
    t_int = int(t)
    bases = (EW0, EW1, EW2)
    for w in range(3):
        base = bases[w]
        n_b = int(N_BUCKETS[w])
        _advance(row, base, E_Q, n_b, t_int // int(BUCKET_MS[w]))
        _add(row, base, E_Q, n_b, EQ_COUNT, 1.0)
        _add(row, base, E_Q, n_b, EQ_SUM, float(amount))
        _add(row, base, E_Q, n_b, EQ_FAILED, float(failed))
    _distinct_touch(row, E_DISTINCT, DISTINCT_K, other_h, t)
    out[0] = row[EW0 + 1 + EQ_COUNT]
    out[1] = row[EW1 + 1 + EQ_COUNT]
    out[2] = row[EW2 + 1 + EQ_COUNT]
    out[3] = row[EW0 + 1 + EQ_SUM]
    out[4] = row[EW1 + 1 + EQ_SUM]
    out[5] = row[EW2 + 1 + EQ_SUM]
    out[6] = row[EW1 + 1 + EQ_FAILED]
    out[7] = row[EW2 + 1 + EQ_FAILED]
    out[8] = _distinct_within(row, E_DISTINCT, DISTINCT_K, t, FANIN_WINDOWS_MS[0])
    out[9] = _distinct_within(row, E_DISTINCT, DISTINCT_K, t, FANIN_WINDOWS_MS[1])
    row[E_SEEN] += 1.0
    row[E_LAST_TS] = t


@njit(cache=True)
def entity_update(rows: np.ndarray, row_idx: np.ndarray, ts_ms: np.ndarray, amount: np.ndarray,
                  failed: np.ndarray, other_h: np.ndarray, payment_h: np.ndarray, out: np.ndarray,
                  dup: np.ndarray) -> None:
    """Apply payments i = 0..n-1 in order to entity rows[row_idx[i]] (user, device or IP:
    one layout); features to out[i] (ENTITY_SUFFIXES order). `other_h` is what the
    distinct count counts: the payer wallet for a user row, the user for a device / IP row."""
    scratch = np.empty(rows.shape[1], dtype=np.float64)
    for i in range(row_idx.shape[0]):
        row = rows[row_idx[i]]
        if _seen(row, E_DEDUPE, DEDUPE_K, payment_h[i]):
            dup[i] = True
            scratch[:] = row
            _entity_step(scratch, ts_ms[i], amount[i], failed[i], other_h[i], out[i])
            continue
        dup[i] = False
        _entity_step(row, ts_ms[i], amount[i], failed[i], other_h[i], out[i])
        _remember(row, E_DEDUPE, DEDUPE_K, E_DEDUPE_NEXT, payment_h[i])


@njit(cache=True)
def entity_windows_at(row: np.ndarray, now_ms: int, out: np.ndarray) -> None:
    """An entity row's features (ENTITY_SUFFIXES order) as of `now_ms`, the row unchanged."""
    scratch = row.copy()
    t = max(float(now_ms), scratch[E_LAST_TS])
    bases = (EW0, EW1, EW2)
    for w in range(3):
        _advance(scratch, bases[w], E_Q, int(N_BUCKETS[w]), int(t) // int(BUCKET_MS[w]))
    out[0] = scratch[EW0 + 1 + EQ_COUNT]
    out[1] = scratch[EW1 + 1 + EQ_COUNT]
    out[2] = scratch[EW2 + 1 + EQ_COUNT]
    out[3] = scratch[EW0 + 1 + EQ_SUM]
    out[4] = scratch[EW1 + 1 + EQ_SUM]
    out[5] = scratch[EW2 + 1 + EQ_SUM]
    out[6] = scratch[EW1 + 1 + EQ_FAILED]
    out[7] = scratch[EW2 + 1 + EQ_FAILED]
    out[8] = _distinct_within(scratch, E_DISTINCT, DISTINCT_K, t, FANIN_WINDOWS_MS[0])
    out[9] = _distinct_within(scratch, E_DISTINCT, DISTINCT_K, t, FANIN_WINDOWS_MS[1])


def check_entity_row(row: np.ndarray) -> None:
    assert row.shape == (ENTITY_WIDTH,), f"entity row has {row.shape}, expected ({ENTITY_WIDTH},)"
    assert row[E_VERSION] == LAYOUT_VERSION, f"entity row layout {row[E_VERSION]} != {LAYOUT_VERSION}"
    assert 0 <= row[E_DEDUPE_NEXT] < DEDUPE_K and row[E_SEEN] >= 0
