"""Every fraud feature against a plain recomputation from the raw events.

The reference below keeps each wallet's whole history as a Python list and recomputes
each feature from its definition (indicators/fraud_features.py) by scanning it: no rings,
no running totals, no LRU slots. The kernels must agree on every payment of every
sequence Hypothesis draws: bursts within one bucket, gaps longer than every window,
timestamps that go backwards, more distinct payees/devices/payers than the bounded sets
hold, and redelivered payment ids.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indicators import fraud_features as ff
from indicators import risk_model as rm
from services.fraud import PayerColumns, Traffic, run_entity, run_payee, run_payer, stable_hash, traffic_features

T0 = 1_750_000_000_000


@dataclass(frozen=True)
class Ev:
    payer: int
    payee: int
    ts: int
    amount: int
    failed: int
    device: int
    ip: int
    country: int
    payment: int


# ----------------------------------------------------------------------------- reference

def _in_window(t_now: float, t_then: float, w: int) -> bool:
    b, n = int(ff.BUCKET_MS[w]), int(ff.N_BUCKETS[w])
    return int(t_now) // b - int(t_then) // b < n


def _lru_new(lru: OrderedDict[int, None], value: int, k: int) -> float:
    if value == 0:
        return 0.0
    if value in lru:
        lru.move_to_end(value)
        return 0.0
    lru[value] = None
    if len(lru) > k:
        lru.popitem(last=False)
    return 1.0


@dataclass
class PayerRef:
    # (effective time, amount, failed) of every counted payment
    history: list[tuple[float, int, int]] = field(default_factory=list)
    mean: float = 0.0
    var: float = 0.0
    lrus: tuple[OrderedDict[int, None], ...] = field(
        default_factory=lambda: tuple(OrderedDict() for _ in range(4)))
    remembered: deque[int] = field(default_factory=lambda: deque(maxlen=ff.DEDUPE_K))

    def step(self, e: Ev) -> tuple[list[float], bool]:
        dup = e.payment in self.remembered
        if dup:  # scored as if new, on a copy; this state stays as it is
            clone = PayerRef(list(self.history), self.mean, self.var,
                             tuple(OrderedDict(lru) for lru in self.lrus), deque(self.remembered, ff.DEDUPE_K))
            return clone._apply(e), True
        features = self._apply(e)
        self.remembered.append(e.payment)
        return features, False

    def _apply(self, e: Ev) -> list[float]:
        last = self.history[-1][0] if self.history else 0.0
        t = max(float(e.ts), last)
        seen = len(self.history)
        x = math.log(e.amount)
        z = (x - self.mean) / max(math.sqrt(self.var), ff.STD_FLOOR) if seen >= ff.MIN_HISTORY else 0.0
        since = min((t - last) / 1000.0, ff.SECS_CAP) if seen else ff.SECS_CAP
        if seen == 0:
            self.mean, self.var = x, 0.0
        else:
            diff = x - self.mean
            incr = ff.EW_ALPHA * diff
            self.mean += incr
            self.var = (1.0 - ff.EW_ALPHA) * (self.var + diff * incr)
        self.history.append((t, e.amount, e.failed))
        win = [[h for h in self.history if _in_window(t, h[0], w)] for w in range(3)]
        small_1h = float(sum(1 for h in win[1] if h[1] <= ff.SMALL_AMOUNT_MINOR))
        news = [_lru_new(lru, v, k) for lru, v, k in zip(
            self.lrus, (e.payee, e.device, e.ip, e.country), (ff.PAYEE_K, ff.DEVICE_K, ff.IP_K, ff.COUNTRY_K),
            strict=True)]
        return [float(e.amount), float(e.failed),
                *(float(len(win[w])) for w in range(3)),
                *(float(sum(h[1] for h in win[w])) for w in range(3)),
                small_1h, float(sum(h[2] for h in win[1])), float(sum(h[2] for h in win[2])),
                z, since, float(seen + 1), *news,
                small_1h if e.amount >= ff.LARGE_AMOUNT_MINOR else 0.0]


@dataclass
class PayeeRef:
    history: list[tuple[float, int, int]] = field(default_factory=list)  # (t, amount, payer)
    remembered: deque[int] = field(default_factory=lambda: deque(maxlen=ff.DEDUPE_K))

    def step(self, e: Ev) -> tuple[list[float], bool]:
        dup = e.payment in self.remembered
        history = list(self.history) if dup else self.history
        t = max(float(e.ts), history[-1][0] if history else 0.0)
        history.append((t, e.amount, e.payer))
        latest: dict[int, float] = {}
        for ht, _, payer in history:
            latest[payer] = ht
        fanin = [min(ff.FANIN_K, sum(1 for seen in latest.values() if t - seen < w)) for w in ff.FANIN_WINDOWS_MS]
        win = [h for h in history if _in_window(t, h[0], 1)]
        if not dup:
            self.remembered.append(e.payment)
        return [float(fanin[0]), float(fanin[1]), float(len(win)), float(sum(h[1] for h in win))], dup


def reference(events: list[Ev]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    payers: dict[int, PayerRef] = {}
    payees: dict[int, PayeeRef] = {}
    pf, pd, ef, ed = [], [], [], []
    for e in events:
        f, d = payers.setdefault(e.payer, PayerRef()).step(e)
        pf.append(f)
        pd.append(d)
        f, d = payees.setdefault(e.payee, PayeeRef()).step(e)
        ef.append(f)
        ed.append(d)
    return np.array(pf), np.array(pd), np.array(ef), np.array(ed)


# ----------------------------------------------------------------------------- kernels

def kernels(events: list[Ev], batch: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run the kernels over `events` in batches of `batch` (rows persist across batches,
    as they do in the tables between take() batches)."""
    n_payer = max(e.payer for e in events) + 1
    n_payee = max(e.payee for e in events) + 1
    payer_rows, payee_rows = ff.new_payer_rows(n_payer), ff.new_payee_rows(n_payee)
    step = batch or len(events)
    outs: list[tuple[np.ndarray, ...]] = []
    for lo in range(0, len(events), step):
        chunk = events[lo:lo + step]
        col = {name: np.array([getattr(e, name) for e in chunk], dtype=np.int64) for name in Ev.__dataclass_fields__}
        cols = PayerColumns(col["ts"], col["amount"], col["failed"], col["payee"], col["device"], col["ip"],
                            col["country"], col["payment"])
        pf, pd = run_payer(payer_rows, col["payer"], cols)
        # payer ids offset so they never collide with 0 ("no value") in the fan-in slots
        ef, ed = run_payee(payee_rows, col["payee"], col["ts"], col["amount"], col["payer"] + 1, col["payment"])
        outs.append((pf, pd, ef, ed))
    for row in payer_rows:
        ff.check_payer_row(row)
    for row in payee_rows:
        ff.check_payee_row(row)
    return tuple(np.concatenate([o[k] for o in outs]) for k in range(4))  # type: ignore[return-value]


def assert_agree(events: list[Ev], batch: int | None = None) -> None:
    # The fan-in reference counts payers by id; shift them like the kernel input does.
    ref_events = [Ev(e.payer + 1, e.payee, e.ts, e.amount, e.failed, e.device, e.ip, e.country, e.payment)
                  for e in events]
    rpf, rpd, ref_, red = reference(ref_events)
    kpf, kpd, kef, ked = kernels(events, batch)
    np.testing.assert_array_equal(kpd, rpd)
    np.testing.assert_array_equal(ked, red)
    z = ff.PAYER_FEATURES.index("amount_z")
    exact = [j for j in range(ff.N_PAYER_FEATURES) if j != z]
    for j in exact:
        np.testing.assert_array_equal(kpf[:, j], rpf[:, j], err_msg=ff.PAYER_FEATURES[j])
    np.testing.assert_allclose(kpf[:, z], rpf[:, z], rtol=1e-9, atol=1e-12, err_msg="amount_z")
    for j, name in enumerate(ff.PAYEE_FEATURES):
        np.testing.assert_array_equal(kef[:, j], ref_[:, j], err_msg=name)


# Gaps chosen to land inside a bucket, across buckets, across windows, and backwards.
GAPS_MS = st.sampled_from([0, 1, 900, 4_999, 5_000, 61_000, 299_999, 300_001, 3_599_999, 3_600_000,
                           86_399_999, 90_000_000, -1, -4_000, -400_000])
AMOUNTS = st.one_of(st.integers(1, ff.SMALL_AMOUNT_MINOR), st.integers(ff.SMALL_AMOUNT_MINOR + 1, 30_000),
                    st.integers(ff.LARGE_AMOUNT_MINOR, 5_000_000))


@st.composite
def event_lists(draw: st.DrawFn) -> list[Ev]:
    n = draw(st.integers(1, 120))
    n_payers = draw(st.integers(1, 3))
    n_payees = draw(st.integers(1, 3))
    ts = T0
    events = []
    for i in range(n):
        ts += draw(GAPS_MS)
        # Payment ids repeat now and then: redeliveries.
        payment = draw(st.integers(1, i + 1)) if draw(st.integers(0, 9)) == 0 else 10_000 + i
        events.append(Ev(payer=draw(st.integers(0, n_payers - 1)), payee=draw(st.integers(0, n_payees - 1)),
                         ts=ts, amount=draw(AMOUNTS), failed=draw(st.integers(0, 3)),
                         device=draw(st.integers(0, 12)), ip=draw(st.integers(0, 12)),
                         country=draw(st.integers(0, 10)), payment=payment))
    return events


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_lists(), st.sampled_from([None, 1, 7]))
def test_features_match_plain_recomputation(events: list[Ev], batch: int | None) -> None:
    assert_agree(events, batch)


def test_bounded_sets_and_fan_in_beyond_their_capacity() -> None:
    """Many more distinct payees, devices and payers than the sets hold, with returns."""
    rng = np.random.default_rng(3)
    events, ts = [], T0
    for i in range(3_000):
        ts += int(rng.choice([0, 700, 20_000, 400_000]))
        events.append(Ev(payer=int(rng.integers(0, 120)), payee=int(rng.integers(0, 2)), ts=ts,
                         amount=int(rng.integers(1, 50_000)), failed=int(rng.integers(0, 2)),
                         device=int(rng.integers(1, 15)), ip=int(rng.integers(1, 40)),
                         country=int(rng.integers(1, 12)), payment=i + 1))
    assert_agree(events, batch=256)
    _, _, payee_features, _ = kernels(events)
    assert payee_features[:, 1].max() == ff.FANIN_K  # the cap was reached and held


def test_windows_slide_out_whole_buckets() -> None:
    """Hand-checked edges: a payment 59 s later is inside the 1 min window only while the
    bucket it fell in is one of the last 12; a day later every window starts over."""
    def ev(ts: int, amount: int = 1000, pid: int = 0) -> Ev:
        return Ev(0, 0, ts, amount, 1, 0, 0, 0, pid)
    base = T0 - T0 % 5_000  # a bucket boundary
    events = [ev(base, pid=1), ev(base + 59_999, pid=2), ev(base + 60_000, pid=3), ev(base + 86_400_000, pid=4)]
    pf, _, _, _ = kernels(events)
    count_1m, count_24h = ff.PAYER_FEATURES.index("payer_count_1m"), ff.PAYER_FEATURES.index("payer_count_24h")
    assert pf[:, count_1m].tolist() == [1, 2, 2, 1]  # at +60 s the first bucket has slid out
    assert pf[:, count_24h].tolist() == [1, 2, 3, 1]
    failed_1h = ff.PAYER_FEATURES.index("failed_1h")
    assert pf[:, failed_1h].tolist() == [1, 2, 3, 1]
    assert_agree(events)


def test_card_testing_and_amount_z_by_hand() -> None:
    base = T0
    small = [Ev(0, i + 1, base + i * 30_000, 100, 0, 1, 1, 1, i + 1) for i in range(ff.MIN_HISTORY)]
    big = Ev(0, 99, base + 200_000, 90_000, 0, 1, 1, 1, 50)
    pf, _, _, _ = kernels([*small, big])
    stl = ff.PAYER_FEATURES.index("small_then_large")
    assert pf[:, stl].tolist() == [0] * ff.MIN_HISTORY + [ff.MIN_HISTORY]
    z = pf[-1, ff.PAYER_FEATURES.index("amount_z")]
    assert z == pytest.approx((math.log(90_000) - math.log(100)) / ff.STD_FLOOR)


def test_redelivered_payment_leaves_the_row_unchanged() -> None:
    rows = ff.new_payer_rows(1)
    cols = PayerColumns(*(np.array([v], dtype=np.int64) for v in (T0, 1200, 0, 5, 6, 7, 8, 42)))
    idx = np.zeros(1, dtype=np.int64)
    first, dup1 = run_payer(rows, idx, cols)
    snapshot = rows.copy()
    again, dup2 = run_payer(rows, idx, cols)
    assert not dup1[0] and dup2[0]
    np.testing.assert_array_equal(rows, snapshot)
    assert again[0, ff.PAYER_FEATURES.index("payments_seen")] == 2  # scored as if applied, not stored


def test_views_read_windows_as_of_now_without_changing_the_row() -> None:
    events = [Ev(0, 0, T0 + i * 1_000, 300 + i, 0, 0, 0, 0, i + 1) for i in range(10)]
    rows = ff.new_payer_rows(1)
    col = {name: np.array([getattr(e, name) for e in events], dtype=np.int64) for name in Ev.__dataclass_fields__}
    run_payer(rows, col["payer"], PayerColumns(col["ts"], col["amount"], col["failed"], col["payee"],
                                               col["device"], col["ip"], col["country"], col["payment"]))
    before = rows[0].copy()
    out = np.empty(3 * ff.PAYER_Q)
    ff.payer_windows_at(rows[0], T0 + 9_000, out)
    assert out[0] == 10 and out[1] == sum(300 + i for i in range(10))
    ff.payer_windows_at(rows[0], T0 + 3_600_000 * 2, out)
    assert out[0] == 0 and out[4] == 0 and out[8] == 10  # only the 24 h window still holds them
    np.testing.assert_array_equal(rows[0], before)


def test_stable_hash_is_52_bits_and_zero_only_for_empty() -> None:
    assert stable_hash("") == 0
    values = {stable_hash(f"wallet-{i}") for i in range(10_000)}
    assert len(values) == 10_000 and 0 not in values and max(values) < 2**52
    assert stable_hash("abc") == stable_hash("abc")


# ----------------------------------------------------------------------------- user / device / IP rows

@dataclass(frozen=True)
class EntityEv:
    key: int  # the user, device or IP (a row)
    ts: int
    amount: int
    failed: int
    other: int  # what the distinct count counts: the wallet (user rows), the user (device / IP rows); 0 = none
    payment: int


@dataclass
class EntityRef:
    history: list[tuple[float, int, int, int]] = field(default_factory=list)  # (t, amount, failed, other)
    remembered: deque[int] = field(default_factory=lambda: deque(maxlen=ff.DEDUPE_K))

    def step(self, e: EntityEv) -> tuple[list[float], bool]:
        dup = e.payment in self.remembered
        history = list(self.history) if dup else self.history
        t = max(float(e.ts), history[-1][0] if history else 0.0)
        history.append((t, e.amount, e.failed, e.other))
        win = [[h for h in history if _in_window(t, h[0], w)] for w in range(3)]
        latest: dict[int, float] = {}
        for ht, _, _, other in history:
            if other:
                latest[other] = ht
        # The row keeps the DISTINCT_K most recently seen others: the rest have been evicted.
        kept = sorted(latest.values(), reverse=True)[:ff.DISTINCT_K]
        distinct = [float(sum(1 for seen in kept if t - seen < w)) for w in ff.FANIN_WINDOWS_MS]
        if not dup:
            self.remembered.append(e.payment)
        return [*(float(len(win[w])) for w in range(3)), *(float(sum(h[1] for h in win[w])) for w in range(3)),
                float(sum(h[2] for h in win[1])), float(sum(h[2] for h in win[2])), *distinct], dup


def entity_reference(events: list[EntityEv]) -> tuple[np.ndarray, np.ndarray]:
    refs: dict[int, EntityRef] = {}
    out, dups = [], []
    for e in events:
        f, d = refs.setdefault(e.key, EntityRef()).step(e)
        out.append(f)
        dups.append(d)
    return np.array(out), np.array(dups)


def entity_kernel(events: list[EntityEv], batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rows = ff.new_entity_rows(max(e.key for e in events) + 1)
    step = batch or len(events)
    outs, dups = [], []
    for lo in range(0, len(events), step):
        chunk = events[lo:lo + step]
        col = {name: np.array([getattr(e, name) for e in chunk], dtype=np.int64)
               for name in EntityEv.__dataclass_fields__}
        out, dup = run_entity(rows, col["key"], col["ts"], col["amount"], col["failed"], col["other"],
                              col["payment"])
        outs.append(out)
        dups.append(dup)
    for row in rows:
        ff.check_entity_row(row)
    return np.concatenate(outs), np.concatenate(dups)


@st.composite
def entity_event_lists(draw: st.DrawFn) -> list[EntityEv]:
    n = draw(st.integers(1, 120))
    n_keys = draw(st.integers(1, 3))
    # Sometimes more distinct others than the row keeps.
    n_others = draw(st.sampled_from([3, ff.DISTINCT_K + 8]))
    ts = T0
    events = []
    for i in range(n):
        ts += draw(GAPS_MS)
        payment = draw(st.integers(1, i + 1)) if draw(st.integers(0, 9)) == 0 else 10_000 + i
        events.append(EntityEv(key=draw(st.integers(0, n_keys - 1)), ts=ts, amount=draw(AMOUNTS),
                               failed=draw(st.integers(0, 3)), other=draw(st.integers(0, n_others)),
                               payment=payment))
    return events


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entity_event_lists(), st.sampled_from([None, 1, 7]))
def test_user_device_ip_features_match_plain_recomputation(events: list[EntityEv], batch: int | None) -> None:
    ref, ref_dup = entity_reference(events)
    got, dup = entity_kernel(events, batch)
    np.testing.assert_array_equal(dup, ref_dup)
    for j, suffix in enumerate(ff.ENTITY_SUFFIXES):
        np.testing.assert_array_equal(got[:, j], ref[:, j], err_msg=suffix)


def test_traffic_features_key_users_devices_and_ips_by_their_own_history() -> None:
    """The offline path feeds each kind its own rows and 'others': a user's payments from
    two wallets add up, a device counts the distinct users on it, an IP likewise; the
    named columns equal the plain recomputation per kind."""
    rng = np.random.default_rng(8)
    n = 400
    ts = T0 + np.cumsum(rng.choice([0, 900, 40_000, 700_000], size=n)).astype(np.int64)
    user = rng.integers(0, 6, n)
    payer = user * 2 + rng.integers(0, 2, n)  # every user has two wallets
    device = np.where(rng.random(n) < 0.1, -1, rng.integers(0, 4, n))  # -1: no device sent
    ip = rng.integers(0, 3, n)
    amount = rng.integers(1, 40_000, n)
    failed = rng.integers(0, 3, n)
    payment_h = np.arange(1, n + 1, dtype=np.int64)
    wallet_h, user_h = payer + 101, user + 1_001
    hashes = {name: rng.integers(1, 1 << 40, n) for name in ("payee_h", "device_h", "ip_h", "country_h")}
    traffic = Traffic(payer=payer, payee=rng.integers(0, 5, n), ts_ms=ts, amount=amount, failed=failed,
                      payer_h=wallet_h, payment_h=payment_h, user=user, device=device, ip=ip, user_h=user_h,
                      **hashes)
    x = traffic_features(traffic, 12)
    for k, (kind, key, other) in enumerate((("user", user, wallet_h), ("device", device, user_h),
                                            ("ip", ip, user_h))):
        present = np.flatnonzero(key >= 0)
        ref, _ = entity_reference([EntityEv(int(key[i]), int(ts[i]), int(amount[i]), int(failed[i]),
                                            int(other[i]), int(payment_h[i])) for i in present])
        for j in range(ff.N_ENTITY_FEATURES):
            name = ff.ENTITY_FEATURES[k * ff.N_ENTITY_FEATURES + j]
            column = x[:, rm.FEATURE_INDEX[name]]
            np.testing.assert_array_equal(column[present], ref[:, j], err_msg=name)
            assert (column[key < 0] == 0).all(), name  # a payment without the value reads 0
    assert x[:, rm.FEATURE_INDEX["device_users_24h"]].max() >= 2  # devices are shared in this traffic
    assert x[:, rm.FEATURE_INDEX["user_wallets_24h"]].max() == 2


def test_entity_view_reads_windows_as_of_now_without_changing_the_row() -> None:
    events = [EntityEv(0, T0 + i * 1_000, 100 + i, 1, i % 3 + 1, i + 1) for i in range(10)]
    rows = ff.new_entity_rows(1)
    col = {name: np.array([getattr(e, name) for e in events], dtype=np.int64) for name in EntityEv.__dataclass_fields__}
    run_entity(rows, col["key"], col["ts"], col["amount"], col["failed"], col["other"], col["payment"])
    before = rows[0].copy()
    out = np.empty(ff.N_ENTITY_FEATURES)
    ff.entity_windows_at(rows[0], T0 + 9_000, out)
    assert out.tolist() == [10, 10, 10, sum(100 + i for i in range(10)), 1045, 1045, 10, 10, 3, 3]
    ff.entity_windows_at(rows[0], T0 + 2 * 3_600_000, out)
    assert out.tolist() == [0, 0, 10, 0, 0, 1045, 0, 10, 0, 3]  # only the 24 h window still holds them
    np.testing.assert_array_equal(rows[0], before)
