"""Ops state and views on every worker's web server.

- `GET /ops/` (JSON; `?format=html` for a table a person can read): this app's agents,
  the lag of every topic they consume (committed and end offsets per partition, read from
  the broker so it covers all workers), dead letters per topic, and this worker's tables
  with their local partitions and key counts.
- `GET /metrics`: prometheus_client's registry, with `fintide_consumer_lag` refreshed.
- `GET /ops/heartbeats/{source}`: the latest heartbeat of a source, from the worker that
  owns the key (see agents/ops.py and streams.app.routed_table_view).
- Faust's own views stay on: `/table/...`, `/router/...`, `/assignment/`, `/performance/`.
"""

from __future__ import annotations

import html
import itertools
from typing import Any

import faust
from faust.web import Request, Response, View
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from streams.app import FintideApp, state_table
from streams.events import State
from streams.metrics import CONSUMER_LAG
from streams.offsets import LagReader, PartitionLag
from streams.ops import HEARTBEATS
from streams.topics import TOPICS, bootstrap_servers, dlq_name

HEARTBEAT_TABLE = "ops.heartbeats"
# Counting keys walks RocksDB; past this many the page says "at least".
MAX_COUNTED_KEYS = 100_000


class HeartbeatState(State):
    """The latest heartbeat seen from one source."""

    source: str
    count: int
    last_id: str
    last_seq: int
    last_ts_ms: int


def heartbeat_table(app: FintideApp) -> faust.Table:
    return state_table(app, HEARTBEAT_TABLE, HeartbeatState, source=HEARTBEATS,
                       help="latest heartbeat per source")


class LagService(Service):
    """Closes the LagReader's Kafka clients when the app stops. The reader connects on
    first use rather than here: Faust starts app services only after table recovery, and
    the ops page should answer during recovery too."""

    def __init__(self, reader: LagReader, **kwargs: Any) -> None:
        self.reader = reader
        super().__init__(**kwargs)

    async def on_stop(self) -> None:
        await self.reader.stop()


def install_ops_views(app: FintideApp) -> None:
    """Add `/ops/` and `/metrics` to the worker's web server."""
    lag = LagService(LagReader(bootstrap_servers(app.settings), app.conf.id))
    app.service(lag)

    class OpsView(View):
        async def get(self, request: Request) -> Response:
            report = await ops_report(app, lag.reader)
            if request.query.get("format") == "html":
                return self.html(render_html(report))
            return self.json(report)

    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            await refresh_lag_gauge(app, lag.reader)
            # aiohttp refuses a charset inside content_type; the exposition format is ASCII.
            return self.bytes(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    app.page("/ops/", name="ops")(OpsView)
    app.page("/metrics", name="metrics")(MetricsView)


def source_topics(app: FintideApp) -> dict[str, list[str]]:
    """Agent name -> the Kafka topics it consumes."""
    return {name: sorted(getattr(agent.channel, "topics", ()) or ())
            for name, agent in sorted(app.agents.items())}


async def ops_report(app: FintideApp, reader: LagReader) -> dict[str, Any]:
    agents = source_topics(app)
    consumed = sorted({topic for topics in agents.values() for topic in topics})
    dlqs = [dlq_name(topic) for topic in consumed if _logical(app, topic) in TOPICS]
    rows = await reader.read(consumed + dlqs)
    _set_lag_gauge(app, [row for row in rows if row.topic in consumed])
    return {
        "app": app.conf.id,
        "worker": app.settings.worker_id,
        "url": str(app.conf.canonical_url),
        "agents": [{"name": name, "topics": [_logical(app, t) for t in topics]} for name, topics in agents.items()],
        "topics": [_topic_report(app, topic, rows) for topic in consumed],
        "tables": [_table_report(app, table) for table in app.tables.values()],
    }


async def refresh_lag_gauge(app: FintideApp, reader: LagReader) -> None:
    consumed = sorted({topic for topics in source_topics(app).values() for topic in topics})
    _set_lag_gauge(app, await reader.read(consumed))


def _set_lag_gauge(app: FintideApp, rows: list[PartitionLag]) -> None:
    for row in rows:
        CONSUMER_LAG.labels(_logical(app, row.topic), str(row.partition)).set(row.lag)


def _topic_report(app: FintideApp, topic: str, rows: list[PartitionLag]) -> dict[str, Any]:
    partitions = [row for row in rows if row.topic == topic]
    dead = [row for row in rows if row.topic == dlq_name(topic)]
    return {
        "topic": _logical(app, topic),
        "kafka_topic": topic,
        "partitions": [{"partition": r.partition, "committed": r.committed, "end": r.end, "lag": r.lag}
                       for r in partitions],
        "lag": sum(r.lag for r in partitions),
        # Messages ever written to the DLQ (end offsets; Tansu and default Kafka retention
        # keep them), or None for a topic that has no registered spec.
        "dead_letters": sum(r.end for r in dead) if dead else None,
    }


def _table_report(app: FintideApp, table: Any) -> dict[str, Any]:
    changelog = table.changelog_topic.get_topic_name()
    actives = sorted(tp.partition for tp in app.assignor.assigned_actives() if tp.topic == changelog)
    standbys = sorted(tp.partition for tp in app.assignor.assigned_standbys() if tp.topic == changelog)
    keys = sum(1 for _ in itertools.islice(iter(table.data), MAX_COUNTED_KEYS + 1))
    return {"name": table.name, "changelog": changelog, "active_partitions": actives,
            "standby_partitions": standbys, "keys": min(keys, MAX_COUNTED_KEYS),
            "keys_capped": keys > MAX_COUNTED_KEYS}


def _logical(app: FintideApp, kafka_topic: str) -> str:
    prefix = app.settings.topic_prefix
    return kafka_topic[len(prefix):] if kafka_topic.startswith(prefix) else kafka_topic


def render_html(report: dict[str, Any]) -> str:
    """The ops report as a small HTML page (no scripts, no external assets)."""
    e = html.escape
    parts = [f"<!doctype html><title>Fintide ops: {e(report['app'])}</title>",
             f"<h1>{e(report['app'])} / {e(report['worker'])}</h1>",
             _html_table("Agents", ["agent", "topics"],
                         [[a["name"], ", ".join(a["topics"])] for a in report["agents"]]),
             _html_table("Topics", ["topic", "partition", "committed", "end", "lag"],
                         [[t["topic"], p["partition"], p["committed"], p["end"], p["lag"]]
                          for t in report["topics"] for p in t["partitions"]]),
             _html_table("Dead letters", ["topic", "dead letters"],
                         [[t["topic"], t["dead_letters"]] for t in report["topics"]]),
             _html_table("Tables (this worker)", ["table", "active partitions", "standby partitions", "keys"],
                         [[t["name"], t["active_partitions"], t["standby_partitions"],
                           f"{'>=' if t['keys_capped'] else ''}{t['keys']}"] for t in report["tables"]])]
    return "\n".join(parts)


def _html_table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<h2>{e(title)}</h2><table border=1><tr>{head}</tr>{body}</table>"
