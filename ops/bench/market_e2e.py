"""End-to-end market benchmark on the embedded servers (Tansu, PostgreSQL 18, Redis 6.2).

    python -m ops.bench.market_e2e throughput [--ticks 4000000] [--symbols 20] [--batch-ticks 4096] [--runs 3]
    python -m ops.bench.market_e2e latency [--rate 100000] [--batch-ms 5] [--clients 100] [--symbols 20] [--seconds 20] [--runs 3]
    python -m ops.bench.market_e2e all

throughput (per run, fresh topics and consumer group):
  1. `fintide feed sim --speed 0 --max-ticks N` publishes N ticks (the real feed code);
     its rate is reported as "feed";
  2. a raw aiokafka consumer reads the whole topic (bytes only: the broker/client ceiling),
     then again decoding every batch to numpy columns (`TICKS.decode(...).columns()`);
  3. a market worker (`python -m streams.worker --agents agents.market`, fan-out to Redis and
     persistence to PostgreSQL on) drains the same backlog; its rate is measured from its
     own `fintide_market_ticks_total` counter between the first and the last processed tick
     (the group join before the first tick is excluded);
  4. live: the feed publishing at full speed while the worker consumes, both running, over
     `--seconds`: the rate the pair sustains together on this machine.

latency (per run): a worker and an API server (`fintide api`, uvicorn) run as child
processes; `--clients` WebSocket clients subscribe to every symbol (bars, indicators,
signals); a generator child process publishes `--rate` ticks/s whose event time is the
wall clock at generation, in --batch-ms batches. Each client records, for every update it
receives, now - event_ms, where event_ms is the event time of the earliest tick of that
symbol in the batch that produced the update (an upper bound on the true tick-to-client
latency). The first 5 s are discarded; p50/p99 are over every update of every client.
Two stages are printed beside it: Kafka timestamp -> the worker taking the message up (the
worker's consume-lag histogram), and tick event time -> the update's PUBLISH reaching a
Redis subscriber in this process (everything before the API and its sockets).

Figures are medians over --runs runs. Every process shares this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from redis.asyncio import Redis

from ops.embedded import EmbeddedStack, free_port
from ops.settings import Settings, load_settings
from streams.market import TICKS
from streams.topics import ensure_topics, full_name

REPO = Path(__file__).resolve().parents[2]
WARMUP_S = 5.0
START_TIMEOUT_S = 90.0
DEFAULT_PARTITIONS = 4


# The embedded servers' process ids (set once the stack runs), for the CPU shares.
STACK_PIDS: dict[str, int] = {}


# -- processes -----------------------------------------------------------------------------------

def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINTIDE_")}
    env.update({"FINTIDE_ENV": "test", "FINTIDE_LOG_LEVEL": "WARNING", "FINTIDE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                "FINTIDE_DATABASE_URL": settings.database_url, "FINTIDE_REDIS_URL": settings.redis_url,
                "FINTIDE_DATA_DIR": settings.data_dir, "FINTIDE_TOPIC_PREFIX": settings.topic_prefix,
                "FINTIDE_APP_ID": settings.app_id, "FINTIDE_WORKER_ID": settings.worker_id,
                "FINTIDE_WORKER_WEB_PORT": str(settings.worker_web_port), "FINTIDE_API_PORT": str(settings.api_port),
                "FINTIDE_TOPIC_PARTITIONS": str(settings.topic_partitions),
                # every benchmark client is the same user: lift the per-user handshake limit
                "FINTIDE_RATE_LIMIT_WS_PER_MINUTE": "100000"})
    return env


def _spawn(settings: Settings, argv: Sequence[str], name: str) -> subprocess.Popen[bytes]:
    log = open(Path(settings.data_dir) / f"{name}.log", "ab")  # noqa: SIM115 - the child writes it
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=_env(settings), stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}")
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {START_TIMEOUT_S} s")
            await asyncio.sleep(0.2)


async def _ticks_processed(url: str) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(url + "/metrics")).text
    match = re.search(r"^fintide_market_ticks_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _run_settings(base: Settings, tag: str) -> Settings:
    prefix = f"b{tag}{uuid.uuid4().hex[:6]}."
    data = Path(base.data_dir) / prefix.rstrip(".")
    data.mkdir(parents=True, exist_ok=True)
    return load_settings(environ={}, env="test", kafka_bootstrap=base.kafka_bootstrap, database_url=base.database_url,
                         redis_url=base.redis_url, topic_prefix=prefix, app_id=f"bench-{prefix.rstrip('.')}",
                         data_dir=str(data), worker_web_port=free_port(), api_port=free_port(),
                         topic_partitions=base.topic_partitions, feed_enabled=False)


# -- throughput ------------------------------------------------------------------------------------

@dataclass
class ThroughputRun:
    feed: float
    raw_consumer: float
    raw_consumer_decode: float
    worker: float
    live: float
    worker_cpu_us_per_message: float  # worker CPU time per tick message while draining


async def _feed(settings: Settings, symbols: str, ticks: int, seconds: float = 0.0,
                batch_ticks: int = 4_096) -> tuple[float, int]:
    """Run the real feed (simulator, no pacing); returns its ticks/s and the batches it sent."""
    from ops.feed import parse_feed_args, run

    # 1M ticks/s of simulated time per 10 ms step: the simulator's per-step bound allows it.
    args = ["sim", "--symbols", symbols, "--rate", "1000000", "--speed", "0", "--seed", "1",
            "--batch-ticks", str(batch_ticks)]
    args += ["--duration", str(seconds)] if seconds else ["--max-ticks", str(ticks)]
    report = await run(settings, parse_feed_args(args, settings))
    return report.ticks_out / report.seconds, report.batches_out


async def _raw_read(settings: Settings, n_messages: int, decode: bool) -> tuple[int, float]:
    """Read n_messages from the start of market.ticks; (ticks decoded or 0, seconds)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    topic = full_name(settings, TICKS.name)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20,
                                fetch_max_bytes=64 << 20)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(settings.topic_partitions)])
        await consumer.seek_to_beginning()
        ticks = seen = 0
        started = time.perf_counter()
        while seen < n_messages:
            for messages in (await consumer.getmany(timeout_ms=500, max_records=10_000)).values():
                seen += len(messages)
                if decode:
                    ticks += sum(len(TICKS.decode(m.value).columns()) for m in messages)
        return ticks, time.perf_counter() - started
    finally:
        await consumer.stop()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drain_rate(worker: subprocess.Popen[bytes], url: str, total: int) -> tuple[float, float]:
    """Ticks/s while the worker drains the backlog, from its own counter, and the worker's
    CPU seconds per tick meanwhile: between 10 % and 90 % of the backlog, so the group join
    (and its second rebalance, which Faust often does right after starting) and the tail
    are not in the figures. CPU per tick does not depend on how much of the machine the
    worker got, so it compares code on a loaded machine where the rate cannot."""
    first_t = last_t = 0.0
    first_n = last_n = 0.0
    first_cpu = last_cpu = 0.0
    deadline = time.monotonic() + 600
    while last_n < 0.9 * total and time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError("worker exited")
        n = await _ticks_processed(url)
        now, cpu = time.perf_counter(), _cpu_s(worker.pid)
        if n >= 0.1 * total and first_t == 0.0:
            first_t, first_n, first_cpu = now, n, cpu
        if n > last_n:
            last_t, last_n, last_cpu = now, n, cpu
        await asyncio.sleep(0.05)
    if last_t <= first_t:
        raise RuntimeError("worker processed nothing measurable")
    return (last_n - first_n) / (last_t - first_t), (last_cpu - first_cpu) / (last_n - first_n)


async def throughput_run(base: Settings, ticks: int, symbols: str, live_s: float, batch_ticks: int) -> ThroughputRun:
    settings = _run_settings(base, "t")
    await ensure_topics(settings)
    feed_rate, n_batches = await _feed(settings, symbols, ticks, batch_ticks=batch_ticks)
    _, raw_s = await _raw_read(settings, n_batches, decode=False)
    n_ticks, dec_s = await _raw_read(settings, n_batches, decode=True)
    assert n_ticks == ticks, (n_ticks, ticks)
    worker = _spawn(settings, ["-m", "streams.worker", "--agents", "agents.market"], "worker")
    url = f"http://127.0.0.1:{settings.worker_web_port}"
    try:
        await _wait_http(url + "/metrics", worker, "worker")
        worker_rate, cpu_per_tick = await _drain_rate(worker, url, ticks)
        # Live: feed and worker together for live_s; the rate the worker sustains meanwhile.
        before, t0 = await _ticks_processed(url), time.perf_counter()
        await _feed(settings, symbols, 0, seconds=live_s, batch_ticks=batch_ticks)
        await asyncio.sleep(2.0)  # what the feed left in the topic is part of the run
        live = (await _ticks_processed(url) - before) / (time.perf_counter() - t0)
    finally:
        _stop(worker)
    return ThroughputRun(feed=feed_rate, raw_consumer=ticks / raw_s, raw_consumer_decode=n_ticks / dec_s,
                         worker=worker_rate, live=live,
                         worker_cpu_us_per_message=cpu_per_tick * ticks / n_batches * 1e6)


# -- latency ----------------------------------------------------------------------------------------

async def generate(settings: Settings, symbols: list[str], rate: float, seconds: float, batch_ms: float = 5.0) -> None:
    """Ticks stamped with the wall clock at generation, `rate` per second, batches closed
    after `batch_ms` (or 4,096 ticks) per partition."""
    from ops.feeds.pipeline import FeedPipeline, TickBatcher, TickChunk, TickPublisher

    publisher = TickPublisher(settings, linger_ms=1)
    n_partitions = await publisher.start()
    batcher = TickBatcher(n_partitions, 4_096, batch_ms, source="bench")
    pipeline = FeedPipeline(batcher, publisher, max_ready=256)
    ids = np.array([batcher.symbol_id(s) for s in symbols], dtype=np.int32)
    prices = np.full(len(symbols), 100.0)
    rng = np.random.default_rng(0)
    publishing = asyncio.create_task(pipeline.run())
    started = last = time.time()
    owed = 0.0
    while last - started < seconds:
        await asyncio.sleep(0.001)
        now = time.time()
        owed += rate * (now - last)
        last = now
        n = int(owed)
        if n == 0:
            continue
        owed -= n
        sym = rng.integers(0, len(symbols), n)
        prices *= np.exp(rng.normal(0.0, 0.0005, len(symbols)))
        price = prices[sym] * np.exp(rng.normal(0.0, 0.0002, n))
        ts = np.full(n, int(now * 1000), dtype=np.int64)
        await pipeline.push(TickChunk(ids[sym], ts, price, rng.uniform(0.1, 2.0, n)))
    pipeline.close()
    await publishing
    await publisher.stop()


@dataclass
class LatencyRun:
    p50_ms: float
    p99_ms: float
    max_ms: float
    updates: int
    ticks_per_s: float
    # Kafka timestamp -> the worker taking the message up (its consume lag histogram over
    # the measured window, interpolated inside buckets): how much of the latency is queueing
    # in front of the worker.
    worker_lag_p50_ms: float = float("nan")
    worker_lag_p99_ms: float = float("nan")
    # Tick event time -> the update's PUBLISH reaching a Redis subscriber in this process:
    # everything up to the API (generator batch, Kafka, worker, fan-out).
    redis_p50_ms: float = float("nan")
    redis_p99_ms: float = float("nan")
    # CPU time of the API process per update it delivered to a client over the measured window.
    api_cpu_us_per_update: float = float("nan")
    # Cores each process used over the measured window (where the machine's 2 cores went).
    cores: dict[str, float] = field(default_factory=dict)


async def _lag_buckets(url: str) -> list[tuple[float, float]]:
    """The worker's consume-lag histogram: (upper bound s, cumulative count)."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(url + "/metrics")).text
    found = re.findall(r'^fintide_market_consume_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.MULTILINE)
    return [(float(le), float(n)) for le, n in found]


def _bucket_quantile(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float) -> float:
    """The q-quantile (ms) of what was observed between two histogram snapshots."""
    counts = [(le, n - dict(before).get(le, 0.0)) for le, n in after]
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return float("nan")
    lower, below = 0.0, 0.0
    for le, n in counts:
        if n >= q * total:
            if le == float("inf"):
                return lower * 1000.0
            return (lower + (le - lower) * (q * total - below) / max(n - below, 1e-9)) * 1000.0
        lower, below = le, n
    return float("nan")


async def _redis_listener(redis_url: str, samples: list[float], stop_at: float, measure_from: float) -> None:
    """Receipt - event_ms of every update published on the market channels (services.market.channel)."""
    redis = Redis.from_url(redis_url)
    pubsub = redis.pubsub()
    try:
        await pubsub.psubscribe("market:*")
        while time.time() < stop_at:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is None or message["type"] != "pmessage":
                continue
            received_ms = time.time() * 1000.0
            event_ms = json.loads(message["data"]).get("event_ms")
            if event_ms and received_ms / 1000.0 >= measure_from:
                samples.append(received_ms - event_ms)
    finally:
        await pubsub.aclose()
        await redis.aclose()


async def _client(url: str, symbols: list[str], samples: list[float], stop_at: float, measure_from: float) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, open_timeout=30, max_size=None) as ws:
        await ws.send(json.dumps({"op": "subscribe", "symbols": symbols}))
        while time.time() < stop_at:
            try:
                raw = await asyncio.wait_for(ws.recv(), max(0.1, stop_at - time.time()))
            except TimeoutError:
                break
            received_ms = time.time() * 1000.0
            message = json.loads(raw)
            event_ms = message.get("event_ms")
            if event_ms and received_ms / 1000.0 >= measure_from:
                samples.append(received_ms - event_ms)


async def _prime(settings: Settings, api: str, token: str, symbols: list[str], rate: float) -> None:
    """Publish ticks until the API has market data for every symbol (the worker's group join
    can take longer than any fixed wait)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx.AsyncClient(base_url=api, timeout=10, headers={"Authorization": f"Bearer {token}"}) as client:
        while True:
            await generate(settings, symbols, min(rate, 5_000.0), 1.0)
            r = await client.get("/api/v1/signals/live", params={"symbols": ",".join(symbols)})
            if r.status_code == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"symbols still unknown to the API after {START_TIMEOUT_S} s: {r.text[:300]}")


async def _new_user(api: str) -> str:
    email = f"bench-{uuid.uuid4().hex[:10]}@example.com"
    async with httpx.AsyncClient(base_url=api, timeout=30) as client:
        r = await client.post("/api/v1/auth/register", json={"email": email, "password": "Bench-Password-42"})
        r.raise_for_status()
        r = await client.post("/api/v1/auth/login", json={"email": email, "password": "Bench-Password-42"})
        r.raise_for_status()
        return str(r.json()["access_token"])


async def latency_run(base: Settings, rate: float, clients: int, symbols: list[str], seconds: float,
                      batch_ms: float) -> LatencyRun:
    settings = _run_settings(base, "l")
    await ensure_topics(settings)
    worker = _spawn(settings, ["-m", "streams.worker", "--agents", "agents.market"], "worker")
    api = _spawn(settings, ["-m", "ops.cli", "api"], "api")
    worker_url, api_url = f"http://127.0.0.1:{settings.worker_web_port}", f"http://127.0.0.1:{settings.api_port}"
    generator: subprocess.Popen[bytes] | None = None
    try:
        await _wait_http(worker_url + "/metrics", worker, "worker")
        await _wait_http(api_url + "/health", api, "api")
        # Prime: ticks until every symbol is known to the API, then the clients join (a
        # client subscribing to a symbol with no data yet gets `unknown_symbol`, no updates).
        token = await _new_user(api_url)
        await _prime(settings, api_url, token, symbols, rate)
        total = WARMUP_S + seconds
        generator = _spawn(settings, ["-m", "ops.bench.market_e2e", "_generate", "--rate", str(rate),
                                      "--seconds", str(total + 2), "--symbols", ",".join(symbols),
                                      "--batch-ms", str(batch_ms)], "generator")
        before = await _ticks_processed(worker_url)
        start = time.time()
        samples: list[float] = []
        ws_url = f"ws://127.0.0.1:{settings.api_port}/ws/signals/stream?token={token}"

        pids = {"worker": worker.pid, "api": api.pid, "generator": generator.pid, "this process (clients)": os.getpid(),
                **STACK_PIDS}

        async def at_measure_start() -> tuple[list[tuple[float, float]], dict[str, float], float]:
            await asyncio.sleep(WARMUP_S)
            return await _lag_buckets(worker_url), {name: _cpu_s(pid) for name, pid in pids.items()}, time.time()

        lag_task = asyncio.create_task(at_measure_start())
        redis_samples: list[float] = []
        await asyncio.gather(_redis_listener(settings.redis_url, redis_samples, start + total, start + WARMUP_S),
                             *(_client(ws_url, symbols, samples, start + total, start + WARMUP_S)
                               for _ in range(clients)))
        ticks_per_s = (await _ticks_processed(worker_url) - before) / (time.time() - start)
        cpu_after, measured_until = {name: _cpu_s(pid) for name, pid in pids.items()}, time.time()
        lag_before, cpu_before, measured_from = await lag_task
        lag_after = await _lag_buckets(worker_url)
    finally:
        for proc in (generator, api, worker):
            if proc is not None:
                _stop(proc)
    if not samples:
        raise RuntimeError("no update reached the clients")
    arr = np.asarray(samples)
    return LatencyRun(p50_ms=float(np.percentile(arr, 50)), p99_ms=float(np.percentile(arr, 99)),
                      max_ms=float(arr.max()), updates=len(samples), ticks_per_s=ticks_per_s,
                      worker_lag_p50_ms=_bucket_quantile(lag_before, lag_after, 0.5),
                      worker_lag_p99_ms=_bucket_quantile(lag_before, lag_after, 0.99),
                      redis_p50_ms=_percentile(redis_samples, 50), redis_p99_ms=_percentile(redis_samples, 99),
                      api_cpu_us_per_update=(cpu_after["api"] - cpu_before["api"]) / max(len(samples), 1) * 1e6,
                      cores={name: (cpu_after[name] - cpu_before[name]) / (measured_until - measured_from)
                             for name in pids})


def _percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q)) if samples else float("nan")


# -- main --------------------------------------------------------------------------------------------

def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({model}), {mem_gb:.0f} GiB RAM, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


async def _main(args: argparse.Namespace, base: Settings) -> None:
    symbols = [f"S{i:03d}" for i in range(args.symbols)]
    print(f"machine: {machine()}", flush=True)
    if args.mode in ("throughput", "all"):
        runs = []
        for _ in range(args.runs):
            runs.append(await throughput_run(base, args.ticks, ",".join(symbols), args.seconds, args.batch_ticks))
            print(f"  run: {runs[-1]}", flush=True)
        print(f"throughput, {args.ticks:,} ticks, {args.symbols} symbols, {args.partitions} partitions, "
              f"batches of up to {args.batch_ticks} ticks, "
              f"median of {args.runs} (ticks/s):")
        for name in ("feed", "raw_consumer", "raw_consumer_decode", "worker", "live"):
            print(f"  {name:22s} {_median([getattr(r, name) for r in runs]):>14,.0f}")
        cpu = _median([r.worker_cpu_us_per_message for r in runs])
        print(f"  worker CPU per message {cpu:>13,.0f} us")
    if args.mode in ("latency", "all"):
        lat = []
        for _ in range(args.runs):
            lat.append(await latency_run(base, args.rate, args.clients, symbols, args.seconds, args.batch_ms))
            print(f"  run: {lat[-1]}", flush=True)
        print(f"latency at {args.rate:,.0f} ticks/s offered, {args.batch_ms:g} ms batches, {args.clients} clients x "
              f"{args.symbols} symbols, median of {args.runs}:")
        print(f"  p50 {_median([r.p50_ms for r in lat]):.1f} ms, p99 {_median([r.p99_ms for r in lat]):.1f} ms, "
              f"max {_median([r.max_ms for r in lat]):.1f} ms, updates/run {_median([r.updates for r in lat]):,.0f}, "
              f"worker ticks/s {_median([r.ticks_per_s for r in lat]):,.0f}")
        print(f"  of which Kafka -> worker (consume lag): p50 {_median([r.worker_lag_p50_ms for r in lat]):.1f} ms, "
              f"p99 {_median([r.worker_lag_p99_ms for r in lat]):.1f} ms")
        print("  cores used over the measured window: " + ", ".join(
            f"{name} {_median([r.cores[name] for r in lat]):.2f}" for name in lat[0].cores))
        print(f"  API CPU per update delivered: {_median([r.api_cpu_us_per_update for r in lat]):.0f} us")
        print(f"  tick -> Redis PUBLISH received (everything before the API): "
              f"p50 {_median([r.redis_p50_ms for r in lat]):.1f} ms, p99 {_median([r.redis_p99_ms for r in lat]):.1f} ms")


def _generate_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--symbols", required=True)
    p.add_argument("--batch-ms", type=float, default=5.0)
    a = p.parse_args(argv)
    asyncio.run(generate(load_settings(), a.symbols.split(","), a.rate, a.seconds, a.batch_ms))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_generate":  # the latency run's generator child process
        _generate_main(argv[1:])
        return
    p = argparse.ArgumentParser(prog="python -m ops.bench.market_e2e", description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("throughput", "latency", "all"))
    p.add_argument("--ticks", type=int, default=4_000_000)
    p.add_argument("--symbols", type=int, default=20)
    p.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS)
    p.add_argument("--batch-ticks", type=int, default=4_096, help="the feed's batch size (throughput)")
    p.add_argument("--batch-ms", type=float, default=5.0, help="the generator's batch window (latency)")
    p.add_argument("--rate", type=float, default=100_000.0)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fintide-bench-") as tmp:
        stack = EmbeddedStack(Path(tmp) / "stack").start()
        STACK_PIDS.update({name: stack.server(server).proc.pid for name, server in  # type: ignore[union-attr]
                           (("Tansu", "kafka"), ("PostgreSQL", "postgres"), ("Redis", "redis"))})
        try:
            from db.migrate import migrate_all

            asyncio.run(migrate_all(stack.database_url))
            base = load_settings(environ={}, env="test", kafka_bootstrap=stack.kafka_bootstrap,
                                 database_url=stack.database_url, redis_url=stack.redis_url, data_dir=tmp,
                                 topic_partitions=args.partitions, feed_enabled=False)
            asyncio.run(_main(args, base))
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
