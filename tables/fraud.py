"""Fraud state: one float64 row per payer wallet and per payee wallet, in RocksDB tables.

* `fraud.payer_features` (key: payer wallet; written by the `fraud.payer` agent from
  `fraud.requests`): the payer row of indicators/fraud_features.py.
* `fraud.payee_features` (key: payee wallet; written by the `fraud.entity` agent from
  `fraud.by_entity`): the payee row.
* `fraud.entity_features` (keys "user:<id>", "device:<id>", "ip:<id>"; written by the
  `fraud.entity` agent from `fraud.by_entity`): the entity row of the paying user, the
  device and the IP (one layout, one table: one changelog topic rather than three).

Each value is the row's little-endian bytes in a `State` (msgspec JSON: base64 bytes,
~3 KB per payer, ~2 KB per payee, ~2 KB per user, device or IP); each table has a
changelog topic from which a worker rebuilds it. `payer_view` / `payee_view` /
`entity_view` turn a row into named values as of now: the routed views
`/fraud/payers/{key}`, `/fraud/payees/{key}` and `/fraud/entities/{kind:id}` serve them
from the worker that owns the key, and the API's
`GET /api/v1/fraud/accounts/{wallet_id}/features` and
`GET /api/v1/fraud/entities/{kind}/{id}/features` call those views.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faust
import numpy as np

from indicators import fraud_features as ff
from streams.app import FintideApp, state_table
from streams.events import State, now_ms
from streams.fraud import BY_ENTITY, REQUESTS

PAYER_TABLE = "fraud.payer_features"
PAYEE_TABLE = "fraud.payee_features"
ENTITY_TABLE = "fraud.entity_features"
ROW_DTYPE = np.dtype("<f8")


class PayerFeatures(State):
    layout: int
    row: bytes  # float64[PAYER_WIDTH], little-endian


class PayeeFeatures(State):
    layout: int
    row: bytes  # float64[PAYEE_WIDTH]


class EntityFeatures(State):
    layout: int
    kind: str  # "user" | "device" | "ip" (names the view's values)
    row: bytes  # float64[ENTITY_WIDTH]


def payer_table(app: FintideApp) -> faust.Table:
    return state_table(app, PAYER_TABLE, PayerFeatures, source=REQUESTS,
                       help="fraud feature state per payer wallet")


def payee_table(app: FintideApp) -> faust.Table:
    return state_table(app, PAYEE_TABLE, PayeeFeatures, source=BY_ENTITY,
                       help="fraud fan-in state per payee wallet")


def entity_table(app: FintideApp) -> faust.Table:
    return state_table(app, ENTITY_TABLE, EntityFeatures, source=BY_ENTITY,
                       help="fraud feature state per paying user, device and IP")


def payer_row(value: PayerFeatures | None) -> np.ndarray:
    """A writable payer row (a fresh one for a wallet never seen), checked."""
    return _stored_row(value, "payer", ff.new_payer_rows, ff.check_payer_row)


def payee_row(value: PayeeFeatures | None) -> np.ndarray:
    return _stored_row(value, "payee", ff.new_payee_rows, ff.check_payee_row)


def entity_row(value: EntityFeatures | None) -> np.ndarray:
    return _stored_row(value, "entity", ff.new_entity_rows, ff.check_entity_row)


def _stored_row(value: PayerFeatures | PayeeFeatures | EntityFeatures | None, what: str,
                new_rows: Callable[[int], np.ndarray], check: Callable[[np.ndarray], None]) -> np.ndarray:
    if value is None:
        return new_rows(1)[0]
    assert value.layout == ff.LAYOUT_VERSION, f"{what} state layout {value.layout}, code reads {ff.LAYOUT_VERSION}"
    row = np.frombuffer(value.row, dtype=ROW_DTYPE).astype(np.float64)
    check(row)
    return row


def payer_state(row: np.ndarray) -> PayerFeatures:
    ff.check_payer_row(row)
    return PayerFeatures(layout=ff.LAYOUT_VERSION, row=row.astype(ROW_DTYPE).tobytes())


def payee_state(row: np.ndarray) -> PayeeFeatures:
    ff.check_payee_row(row)
    return PayeeFeatures(layout=ff.LAYOUT_VERSION, row=row.astype(ROW_DTYPE).tobytes())


def payer_view(value: PayerFeatures, at_ms: int | None = None) -> dict[str, Any]:
    """A payer row as named values; windows as of `at_ms` (default now)."""
    row = payer_row(value)
    now = at_ms if at_ms is not None else now_ms()
    windows = np.empty(3 * ff.PAYER_Q)
    ff.payer_windows_at(row, now, windows)
    out: dict[str, Any] = {"as_of_ms": max(now, int(row[ff.P_LAST_TS])),
                           "last_payment_ms": int(row[ff.P_LAST_TS]),
                           "payments_seen": int(row[ff.P_SEEN])}
    for w, name in enumerate(ff.WINDOW_NAMES):
        out[f"payer_count_{name}"] = int(windows[w * ff.PAYER_Q + ff.Q_COUNT])
        out[f"payer_sum_{name}"] = int(windows[w * ff.PAYER_Q + ff.Q_SUM])
        out[f"small_count_{name}"] = int(windows[w * ff.PAYER_Q + ff.Q_SMALL])
        out[f"failed_{name}"] = int(windows[w * ff.PAYER_Q + ff.Q_FAILED])
    seen = row[ff.P_SEEN]
    out["amount_ew_mean_log"] = round(float(row[ff.P_EW_MEAN]), 6) if seen else None
    out["amount_ew_std_log"] = round(float(np.sqrt(row[ff.P_EW_VAR])), 6) if seen else None
    out["known_payees"] = int(np.count_nonzero(row[ff.P_PAYEES:ff.P_PAYEES + ff.PAYEE_K]))
    out["known_devices"] = int(np.count_nonzero(row[ff.P_DEVICES:ff.P_DEVICES + ff.DEVICE_K]))
    out["known_ips"] = int(np.count_nonzero(row[ff.P_IPS:ff.P_IPS + ff.IP_K]))
    out["known_countries"] = int(np.count_nonzero(row[ff.P_COUNTRIES:ff.P_COUNTRIES + ff.COUNTRY_K]))
    return out


def payee_view(value: PayeeFeatures, at_ms: int | None = None) -> dict[str, Any]:
    """A payee row as named values (fan-in and incoming window) as of `at_ms`."""
    row = payee_row(value)
    now = at_ms if at_ms is not None else now_ms()
    values = np.empty(ff.N_PAYEE_FEATURES)
    ff.payee_windows_at(row, now, values)
    out: dict[str, Any] = {"as_of_ms": max(now, int(row[ff.PE_LAST_TS])),
                           "last_payment_ms": int(row[ff.PE_LAST_TS]), "payments_received": int(row[ff.PE_SEEN])}
    out.update({name: int(v) for name, v in zip(ff.PAYEE_FEATURES, values, strict=True)})
    return out


def entity_state(kind: str, row: np.ndarray) -> EntityFeatures:
    assert kind in ff.ENTITY_KINDS, kind
    ff.check_entity_row(row)
    return EntityFeatures(layout=ff.LAYOUT_VERSION, kind=kind, row=row.astype(ROW_DTYPE).tobytes())


def entity_view(value: EntityFeatures, at_ms: int | None = None) -> dict[str, Any]:
    """A user / device / IP row as named values (the rule language's names) as of `at_ms`."""
    row = entity_row(value)
    now = at_ms if at_ms is not None else now_ms()
    values = np.empty(ff.N_ENTITY_FEATURES)
    ff.entity_windows_at(row, now, values)
    k = ff.ENTITY_KINDS.index(value.kind)
    names = ff.ENTITY_FEATURES[k * ff.N_ENTITY_FEATURES:(k + 1) * ff.N_ENTITY_FEATURES]
    out: dict[str, Any] = {"kind": value.kind, "as_of_ms": max(now, int(row[ff.E_LAST_TS])),
                           "last_payment_ms": int(row[ff.E_LAST_TS]), "payments_seen": int(row[ff.E_SEEN])}
    out.update({name: int(v) for name, v in zip(names, values, strict=True)})
    return out
