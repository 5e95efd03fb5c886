"""The worker consumer's fetch wait comes from settings, not Faust's hard-coded 1,500 ms
(streams/kafka.py): on Tansu that wait is the latency of every record reaching an idle agent."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.embedded import EmbeddedStack
from ops.settings import Settings, load_settings
from streams.app import create_app
from streams.kafka import FAUST_FETCH_MAX_WAIT_MS, _ConsumerThread


def _settings(stack: EmbeddedStack, tmp_path: Path, **overrides: int) -> Settings:
    return load_settings(environ={}, env="test", data_dir=str(tmp_path / "data"), kafka_bootstrap=stack.kafka_bootstrap,
                         topic_prefix="fetchwait.", app_id="fintide-fetchwait", worker_web_port=0, feed_enabled=False,
                         **overrides)


@pytest.mark.parametrize("configured", [None, 25])
async def test_the_started_worker_consumer_fetches_with_the_configured_wait(
        stack: EmbeddedStack, tmp_path: Path, configured: int | None) -> None:
    overrides = {} if configured is None else {"broker_fetch_max_wait_ms": configured}
    settings = _settings(stack, tmp_path, **overrides)
    app = create_app(settings)
    thread = app.consumer._thread
    assert isinstance(thread, _ConsumerThread)
    consumer = thread._create_worker_consumer(app.transport)
    await consumer.start()  # the Fetcher is built here, from the consumer's attribute
    try:
        assert consumer._fetcher._fetch_max_wait_ms == settings.broker_fetch_max_wait_ms
        assert consumer._fetcher._fetch_max_wait_ms != FAUST_FETCH_MAX_WAIT_MS
    finally:
        await consumer.stop()


def test_the_fetch_wait_setting_is_bounded() -> None:
    with pytest.raises(ValueError, match="FETCH_MAX_WAIT_MS"):
        load_settings(environ={"FINTIDE_BROKER_FETCH_MAX_WAIT_MS": "0"})
    assert load_settings(environ={"FINTIDE_BROKER_FETCH_MAX_WAIT_MS": "40"}).broker_fetch_max_wait_ms == 40
