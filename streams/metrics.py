"""Prometheus metrics of the stream layer, on prometheus_client's default registry.

Topic labels are logical names (`ops.heartbeat`), without the deployment's topic prefix,
so dashboards work the same everywhere.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

EVENTS_PROCESSED = Counter(
    "fintide_events_processed_total", "Events an agent decoded and finished processing.",
    ["topic", "agent"])
EVENTS_DLQ = Counter(
    "fintide_events_dlq_total", "Messages sent to the topic's dead-letter topic.", ["topic"])
CONSUMER_LAG = Gauge(
    "fintide_consumer_lag", "End offset minus the app's committed offset, per partition.",
    ["topic", "partition"])
