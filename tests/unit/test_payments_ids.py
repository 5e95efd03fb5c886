"""The saga's deterministic ids: the fast uuid5 gives exactly the stdlib's ids, so event ids
and derived ids (holds, captures) stay what earlier versions wrote and consumers dedupe by."""

from __future__ import annotations

import uuid

import pytest

from services import payments
from services import payments_events as events


@pytest.mark.parametrize("name", ["", "a", "payment:3f1c2d4e-0000-4000-8000-000000000001:funds_reserved", "üñí:ç"])
def test_fast_uuid5_equals_the_stdlib_uuid5(name: str) -> None:
    namespace = uuid.uuid4()
    assert events.uuid5_str(namespace, name) == str(uuid.uuid5(namespace, name))
    assert events.uuid5_bytes(namespace, name) == uuid.uuid5(namespace, name).bytes


def test_event_and_derived_ids_are_unchanged() -> None:
    pid = uuid.UUID("2b0e3a1c-9d44-4b6f-8a51-0c7e5d9f1a23")
    assert events.event_id("payment", pid, "completed") == str(
        uuid.uuid5(uuid.UUID("6c0f6a0e-7d1b-4d0e-9a57-5b1f3c2e9a41"), f"payment:{pid}:completed"))
    assert payments.derived_id(pid, "hold") == uuid.uuid5(uuid.UUID("2f1d4b8e-61c3-4c55-8f0e-3b7a9d2c6e10"),
                                                          f"{pid}:hold")
