"""The Faust app factory's own behaviour, without servers (nothing here connects)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ops.settings import load_settings
from streams.app import FintideApp, create_app


def _app(tmp_path: Path) -> FintideApp:
    return create_app(load_settings(environ={}, env="test", data_dir=str(tmp_path), worker_web_port=1,
                                    kafka_bootstrap="127.0.0.1:9"))


def test_a_send_does_not_yield_to_the_event_loop_once_the_producer_runs(tmp_path: Path) -> None:
    app = _app(tmp_path)
    app.producer._started.set()  # as after app.start()
    step = app.maybe_start_producer()
    # faust.App's version yields to the loop three times per send even now (mode's
    # stampede: asyncio.sleep(0)); ours must finish on its first step.
    with pytest.raises(StopIteration) as done:
        step.send(None)
    assert done.value.value is app.producer
    assert "maybe_start_producer" not in vars(app)  # nothing cached over the method


async def test_a_producer_not_yet_started_is_started_once_by_concurrent_senders(tmp_path: Path) -> None:
    app = _app(tmp_path)
    starts = []

    async def start() -> None:
        starts.append(1)
        app.producer._started.set()

    app.producer.start = start  # type: ignore[method-assign]
    got = await asyncio.gather(*(app.maybe_start_producer() for _ in range(5)))
    assert starts == [1] and all(p is app.producer for p in got)
