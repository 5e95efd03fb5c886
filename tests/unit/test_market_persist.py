"""Market persistence: a database outage is waited out, a batch the database refuses is
dead-lettered; neither raises (a raising take would be acknowledged unwritten)."""

from __future__ import annotations

import asyncpg
import pytest

from agents.market import write_until_done


class Writes:
    """A write that fails with the given errors, in order, then succeeds."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.rejected: list[Exception] = []

    async def write(self) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)

    async def reject(self, exc: Exception) -> None:
        self.rejected.append(exc)


@pytest.mark.asyncio
async def test_a_write_is_retried_through_an_outage_of_any_length_and_nothing_is_rejected() -> None:
    outage = [ConnectionRefusedError("down"), asyncpg.exceptions.ConnectionDoesNotExistError("dropped"),
              asyncpg.exceptions.CannotConnectNowError("starting up"), TimeoutError()] * 5
    writes = Writes(*outage)
    await write_until_done(writes.write, "bars", writes.reject, first_wait_s=0.0)
    assert writes.calls == len(outage) + 1
    assert writes.rejected == []


@pytest.mark.asyncio
async def test_a_batch_postgresql_refuses_for_its_data_is_rejected_once_and_not_retried() -> None:
    refused = asyncpg.exceptions.NumericValueOutOfRangeError("value out of range")
    writes = Writes(refused)
    await write_until_done(writes.write, "signals", writes.reject, first_wait_s=0.0)
    assert writes.calls == 1
    assert writes.rejected == [refused]
