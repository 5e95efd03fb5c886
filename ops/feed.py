"""`fintide feed`: publish market data to `market.ticks` as columnar tick batches.

    fintide feed [sim] [--symbols A,B] [--rate 5000] [--seed 1] [--speed 1] [--max-ticks N]
    fintide feed csv PATH [--speed 10] [--symbol S] [--rebase]
    fintide feed binance [--symbols BTCUSDT,ETHUSDT] [--url wss://...]
    common: [--duration S] [--batch-ticks N] [--batch-ms T] [--max-in-flight N]
            [--linger-ms MS] [--compression none|gzip|lz4|zstd|snappy]

The simulator is the default (`fintide up` runs it with FINTIDE_FEED_SYMBOLS and
FINTIDE_FEED_TICKS_PER_S). A batch closes at --batch-ticks ticks (default 4096) or when
its oldest tick has waited --batch-ms (default 50 ms): bigger batches cost the workers
less per tick, shorter waits cost less latency. SIGTERM or SIGINT stops the source,
publishes every open batch and exits 0; --duration S does the same after S seconds.
See docs/MARKET.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ops.feeds.binance import BinanceTrades, default_url
from ops.feeds.pipeline import FeedPipeline, TickBatcher, TickPublisher
from ops.feeds.replay import CsvReplay, ReplayConfig, ReplayError
from ops.feeds.simulator import SimConfig, Simulator
from ops.settings import Settings
from streams.market import MAX_BATCH_TICKS

log = logging.getLogger("fintide.feed")

DEFAULT_BATCH_TICKS = 4_096
DEFAULT_BATCH_MS = 50.0
DEFAULT_BINANCE_SYMBOLS = "BTCUSDT,ETHUSDT"
STATS_EVERY_S = 10.0
# After a stop, sending what is left may take this long before the feed gives up on it.
SHUTDOWN_TIMEOUT_S = 10.0
MAX_READY_BATCHES = 64


@dataclass
class FeedReport:
    source: str
    ticks_in: int
    ticks_out: int
    batches_out: int
    seconds: float


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--duration", type=float, default=0.0, help="stop after S seconds (0: until SIGTERM)")
    common.add_argument("--batch-ticks", type=int, default=DEFAULT_BATCH_TICKS,
                        help=f"close a batch at N ticks (1..{MAX_BATCH_TICKS})")
    common.add_argument("--batch-ms", type=float, default=DEFAULT_BATCH_MS, help="close a batch after T ms")
    common.add_argument("--max-in-flight", type=int, default=64, help="unacknowledged sends before waiting")
    common.add_argument("--linger-ms", type=int, default=5, help="producer linger")
    common.add_argument("--compression", default="none", choices=("none", "gzip", "lz4", "zstd", "snappy"))
    parser = argparse.ArgumentParser(prog="fintide feed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    sim = sub.add_parser("sim", parents=[common], help="GBM simulator with regime changes (default)")
    sim.add_argument("--symbols", default=settings.feed_symbols, help="comma-separated (FINTIDE_FEED_SYMBOLS)")
    sim.add_argument("--rate", type=float, default=float(settings.feed_ticks_per_s),
                     help="ticks per second over all symbols (FINTIDE_FEED_TICKS_PER_S)")
    sim.add_argument("--seed", type=int, default=None)
    sim.add_argument("--speed", type=float, default=1.0, help="event time / wall time; 0 = as fast as possible")
    sim.add_argument("--max-ticks", type=int, default=0, help="stop after N ticks (0: no limit)")
    csv = sub.add_parser("csv", parents=[common], help="replay a CSV of ticks or OHLCV bars")
    csv.add_argument("path", type=Path)
    csv.add_argument("--speed", type=float, default=1.0, help="replay speed factor; 0 = as fast as possible")
    csv.add_argument("--symbol", default=None, help="symbol for files without a symbol column")
    csv.add_argument("--rebase", action="store_true", help="shift event times to now (whole minutes)")
    binance = sub.add_parser("binance", parents=[common], help="Binance public trade stream (WebSocket)")
    binance.add_argument("--symbols", default=DEFAULT_BINANCE_SYMBOLS, help="comma-separated Binance symbols")
    binance.add_argument("--url", default=None, help="WebSocket URL (default: Binance combined trade streams)")
    binance.add_argument("--max-failures", type=int, default=10, help="give up after N failed connections in a row")
    return parser


def parse_feed_args(argv: list[str], settings: Settings) -> argparse.Namespace:
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["sim", *argv]
    opts = build_parser(settings).parse_args(argv)
    if not 1 <= opts.batch_ticks <= MAX_BATCH_TICKS or opts.batch_ms <= 0 or opts.max_in_flight < 1:
        raise SystemExit(f"fintide feed: --batch-ticks must be in 1..{MAX_BATCH_TICKS}, "
                         "--batch-ms > 0, --max-in-flight >= 1")
    if opts.duration < 0:
        raise SystemExit("fintide feed: --duration must be >= 0")
    return opts


def _symbols(text: str) -> tuple[str, ...]:
    symbols = tuple(s.strip() for s in text.split(",") if s.strip())
    if not symbols:
        raise SystemExit("fintide feed: no symbols")
    return symbols


def build_source(opts: argparse.Namespace, batcher: TickBatcher) -> Any:
    if opts.source == "sim":
        symbols = _symbols(opts.symbols)
        sim = Simulator(SimConfig(symbols=symbols, ticks_per_s=opts.rate, seed=opts.seed, speed=opts.speed,
                                  max_ticks=opts.max_ticks))
        ids = np.array([batcher.symbol_id(s) for s in symbols], dtype=np.int32)
        return _BoundSim(sim, ids)
    if opts.source == "csv":
        return CsvReplay(ReplayConfig(opts.path, speed=opts.speed, symbol=opts.symbol, rebase=opts.rebase),
                         batcher.symbol_id)
    symbols = _symbols(opts.symbols)
    return BinanceTrades(opts.url or default_url(symbols), batcher.symbol_id, max_failures=opts.max_failures)


class _BoundSim:
    """The simulator with its symbols' feed ids: the same run(push, stop) as other sources."""

    def __init__(self, sim: Simulator, ids: np.ndarray) -> None:
        self.sim = sim
        self.ids = ids

    async def run(self, push: Any, stop: asyncio.Event) -> None:
        await self.sim.run(push, self.ids, stop)


async def run(settings: Settings, opts: argparse.Namespace, stop: asyncio.Event | None = None) -> FeedReport:
    """Publish until the source ends, `stop` is set or --duration passes."""
    stop = stop or asyncio.Event()
    started = time.monotonic()
    publisher = TickPublisher(settings, linger_ms=opts.linger_ms, max_in_flight=opts.max_in_flight,
                              compression=None if opts.compression == "none" else opts.compression)
    n_partitions = await publisher.start()
    batcher = TickBatcher(n_partitions, opts.batch_ticks, opts.batch_ms, source=opts.source)
    pipeline = FeedPipeline(batcher, publisher, max_ready=MAX_READY_BATCHES)
    source = build_source(opts, batcher)
    log.info("feed started", extra={"source": opts.source, "topic": publisher.topic, "partitions": n_partitions,
                                    "batch_ticks": opts.batch_ticks, "batch_ms": opts.batch_ms})
    publishing = asyncio.create_task(pipeline.run(), name="feed-publish")
    producing = asyncio.create_task(source.run(pipeline.push, stop), name="feed-source")
    stopping = asyncio.create_task(stop.wait(), name="feed-stop")
    stats = asyncio.create_task(_log_stats(batcher, publisher), name="feed-stats")
    timer = asyncio.get_running_loop().call_later(opts.duration, stop.set) if opts.duration else None
    try:
        await asyncio.wait({publishing, producing, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if publishing.done():
            publishing.result()  # a publishing error ends the feed with that error
            raise RuntimeError("publisher stopped unexpectedly")
        if not producing.done():
            producing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producing  # re-raises a source error (e.g. a bad CSV row)
        pipeline.close()
        await asyncio.wait_for(publishing, SHUTDOWN_TIMEOUT_S)
    finally:
        for task in (producing, stopping, stats, publishing):
            task.cancel()
        if timer is not None:
            timer.cancel()
        await publisher.stop()
    report = FeedReport(opts.source, batcher.ticks_in, publisher.ticks_out, publisher.batches_out,
                        time.monotonic() - started)
    log.info("feed stopped", extra=vars(report))
    return report


async def _log_stats(batcher: TickBatcher, publisher: TickPublisher) -> None:
    last_ticks, last_t = 0, time.monotonic()
    while True:
        await asyncio.sleep(STATS_EVERY_S)
        now = time.monotonic()
        log.info("feed progress", extra={"ticks_per_s": round((publisher.ticks_out - last_ticks) / (now - last_t)),
                                         "ticks_out": publisher.ticks_out, "batches_out": publisher.batches_out,
                                         "bytes_out": publisher.bytes_out, "queued_batches": len(batcher.ready)})
        last_ticks, last_t = publisher.ticks_out, now


def run_feed(settings: Settings, args: argparse.Namespace) -> int:
    """Entry point of `fintide feed` (ops/cli.py)."""
    opts = parse_feed_args(getattr(args, "feed_args", []) or [], settings)
    if not settings.kafka_bootstrap:
        print("fintide feed: FINTIDE_KAFKA_BOOTSTRAP is not set (or run `fintide up`)")
        return 2

    async def main() -> FeedReport:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await run(settings, opts, stop)

    try:
        report = asyncio.run(main())
    except ReplayError as exc:
        log.error("replay failed: %s", exc)
        print(f"fintide feed: {exc}")
        return 2
    except Exception as exc:
        log.exception("feed failed")
        print(f"fintide feed: {type(exc).__name__}: {exc}")
        return 1
    print(f"fintide feed: {report.ticks_out} ticks in {report.batches_out} batches, {report.seconds:.1f} s")
    return 0
