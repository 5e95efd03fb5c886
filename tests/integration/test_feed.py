"""`fintide feed` on the real broker: simulator, CSV replay, Binance adapter, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from websockets.asyncio.server import ServerConnection, serve

from indicators.bank import IndicatorBank
from indicators.bars import BarAggregator, BarOutput
from indicators.signals import FeatureMap, SignalRules
from ops.feed import parse_feed_args, run
from ops.feeds.replay import CsvReplay, ReplayConfig, ReplayError
from ops.feeds.simulator import SimConfig, Simulator
from ops.settings import Settings, load_settings
from streams.market import TICKS, TickBatch, partition_for_symbol
from streams.topics import full_name

REPO = Path(__file__).resolve().parents[2]


async def read_batches(settings: Settings, want_ticks: int,
                       timeout_s: float = 30.0) -> list[tuple[int, bytes, TickBatch]]:
    """Every batch on market.ticks (partition, key, batch) until want_ticks ticks arrived."""
    topic = full_name(settings, TICKS.name)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(settings.topic_partitions)])
        await consumer.seek_to_beginning()
        got: list[tuple[int, bytes, TickBatch]] = []
        ticks = 0
        deadline = time.monotonic() + timeout_s
        while ticks < want_ticks and time.monotonic() < deadline:
            records = await consumer.getmany(timeout_ms=500)
            for tp, messages in records.items():
                for m in messages:
                    batch = TICKS.decode(m.value)
                    got.append((tp.partition, m.key, batch))
                    ticks += batch.count
        return got
    finally:
        await consumer.stop()


def ticks_by_symbol(batches: list[tuple[int, bytes, TickBatch]]) -> dict[str, list[tuple[int, float, float]]]:
    out: dict[str, list[tuple[int, float, float]]] = {}
    for _, _, batch in sorted(batches, key=lambda b: (b[0], b[2].seq)):
        cols = batch.columns()
        for i in range(len(cols)):
            out.setdefault(cols.symbols[cols.sym[i]], []).append(
                (int(cols.ts_ms[i]), float(cols.price[i]), float(cols.size[i])))
    return out


async def test_simulator_publishes_every_tick_each_symbol_on_its_own_partition(settings: Settings) -> None:
    symbols = "AAA,BBB,CCC,DDD,EEE,FFF,GGG"
    opts = parse_feed_args(["--symbols", symbols, "--rate", "50000", "--speed", "0", "--max-ticks", "60000",
                            "--seed", "5", "--batch-ticks", "1000"], settings)
    report = await run(settings, opts)
    assert report.ticks_in == report.ticks_out == 60_000
    batches = await read_batches(settings, 60_000)
    assert sum(b.count for _, _, b in batches) == 60_000
    per_partition_seq: dict[int, list[int]] = {}
    for partition, key, batch in batches:
        assert batch.partition == partition and 0 < batch.count <= 1_000
        assert key.decode() in batch.symbols
        for name in batch.symbols:
            assert partition_for_symbol(name, settings.topic_partitions) == partition
        per_partition_seq.setdefault(partition, []).append(batch.seq)
    for seqs in per_partition_seq.values():
        assert seqs == list(range(len(seqs)))  # in order, none lost or repeated
    by_symbol = ticks_by_symbol(batches)
    assert sorted(by_symbol) == symbols.split(",")
    for ticks in by_symbol.values():
        times = [t for t, _, _ in ticks]
        assert times == sorted(times)  # per-symbol event time never goes back: no late ticks
        assert all(p > 0 for _, p, _ in ticks)


def _bar_csv(path: Path) -> list[tuple[str, int, float, float, float, float, float]]:
    rng = np.random.default_rng(0)
    rows = []
    for symbol in ("AAA", "BBB", "CCC"):
        price = 100.0
        for k in range(30):
            o = price
            c = o * float(np.exp(rng.normal(0, 0.01)))
            h, lo = max(o, c) * 1.004, min(o, c) * 0.996
            rows.append((symbol, 1_700_000_040_000 + k * 60_000, o, h, lo, c, float(rng.uniform(1, 50))))
            price = c
    rows.sort(key=lambda r: r[1])
    with open(path, "w") as out:
        out.write("timestamp,symbol,open,high,low,close,volume\n")
        for s, t, o, h, lo, c, v in rows:
            out.write(f"{t},{s},{o!r},{h!r},{lo!r},{c!r},{v!r}\n")
    return rows


async def test_csv_bar_replay_reproduces_the_bars_exactly(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "bars.csv"
    rows = _bar_csv(path)
    report = await run(settings, parse_feed_args(["csv", str(path), "--speed", "0", "--batch-ms", "5"], settings))
    assert report.ticks_out == 4 * len(rows)
    by_symbol = ticks_by_symbol(await read_batches(settings, 4 * len(rows)))
    names = sorted(by_symbol)
    agg = BarAggregator(len(names), (1_000, 60_000))
    bars: list[tuple[int, str, int, float, float, float, float, float]] = []

    def collect(out: BarOutput) -> None:
        bars.extend((int(out.interval[i]), names[out.sym[i]], int(out.open_ts_ms[i]), *map(float, out.ohlcv[i]))
                    for i in range(len(out)))

    for i, name in enumerate(names):
        ticks = np.array(by_symbol[name])
        collect(agg.process_batch(np.full(len(ticks), i, np.int32), ticks[:, 0].astype(np.int64), ticks[:, 1],
                                  ticks[:, 2]))
    collect(agg.flush(2**52))
    assert sorted(bar[1:] for bar in bars if bar[0] == 1) == sorted(rows)
    assert sorted(bar[1:] for bar in bars if bar[0] == 0) == sorted((s, t - t % 1_000, *rest) for s, t, *rest in rows)


async def test_csv_replay_is_paced_by_event_time_over_speed(tmp_path: Path) -> None:
    path = tmp_path / "ticks.csv"
    path.write_text("time,price,qty\n" + "".join(f"{1_700_000_000 + k * 0.1:.1f},{100 + k},1\n" for k in range(21)))
    pushes: list[float] = []

    async def push(chunk: object) -> None:
        pushes.append(time.monotonic())

    names: list[str] = []
    replay = CsvReplay(ReplayConfig(path, speed=4.0, symbol="XYZ"), lambda s: names.append(s) or 0)
    await replay.run(push, asyncio.Event())
    # 2 s of event time at 4x: about 0.5 s of wall time.
    assert 0.45 <= pushes[-1] - pushes[0] <= 1.0
    assert replay.ticks_out == 21 and set(names) == {"XYZ"}
    fast = CsvReplay(ReplayConfig(path, speed=0, symbol="XYZ"), lambda s: 0)
    started = time.monotonic()
    await fast.run(push, asyncio.Event())
    assert time.monotonic() - started < 0.2


def test_csv_rows_that_do_not_parse_name_their_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("ts,symbol,price,size\n1700000000000,A,1.5,1\n1700000000001,A,oops,1\n")
    with pytest.raises(ReplayError, match=r"bad.csv:3: could not convert"):
        list(CsvReplay(ReplayConfig(path), lambda s: 0).ticks())
    path.write_text("when,price\n1,2\n")
    with pytest.raises(ReplayError, match="no time column"):
        list(CsvReplay(ReplayConfig(path, symbol="A"), lambda s: 0).ticks())


TRADES = [("BTCUSDT", 1_700_000_000_000 + 7 * k, 60_000 + k * 0.5, 0.001 * (k + 1)) for k in range(20)] + \
         [("ETHUSDT", 1_700_000_000_003 + 11 * k, 3_000 + k * 0.25, 0.01 * (k + 1)) for k in range(20)]


def _trade_json(symbol: str, t: int, p: float, q: float, k: int, combined: bool) -> str:
    payload = {"e": "trade", "E": t + 2, "s": symbol, "t": 1000 + k, "p": f"{p:.8f}", "q": f"{q:.8f}", "T": t,
               "m": k % 2 == 0, "M": True}
    if combined:
        return msgspec.json.encode({"stream": f"{symbol.lower()}@trade", "data": payload}).decode()
    return msgspec.json.encode(payload).decode()


async def test_binance_adapter_against_a_local_trade_stream(settings: Settings) -> None:
    trades = sorted(TRADES, key=lambda x: x[1])
    connections = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            # First connection: half the trades, noise, then the server drops the connection.
            for k, tr in enumerate(trades[:20]):
                await ws.send(_trade_json(*tr, k, combined=k % 2 == 0))
            await ws.send("{not json")
            await ws.send('{"e":"aggTrade","E":1,"s":"BTCUSDT"}')
            await ws.send('{"stream":"x@trade","data":{"e":"trade","E":1,"s":"BTCUSDT","t":1,"p":"-1","q":"1","T":1}}')
            return
        for k, tr in enumerate(trades[20:], start=20):
            await ws.send(_trade_json(*tr, k, combined=k % 2 == 0))
        await ws.wait_closed()  # keep the second connection open until the feed stops

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        stop = asyncio.Event()
        opts = parse_feed_args(["binance", "--url", f"ws://127.0.0.1:{port}/stream", "--batch-ms", "20"], settings)
        feed = asyncio.create_task(run(settings, opts, stop))
        batches = await read_batches(settings, len(trades), timeout_s=20)
        stop.set()
        report = await asyncio.wait_for(feed, 15)
    assert connections == 2
    assert report.ticks_out == len(trades)
    by_symbol = ticks_by_symbol(batches)
    for symbol in ("BTCUSDT", "ETHUSDT"):
        want = [(t, float(f"{p:.8f}"), float(f"{q:.8f}")) for s, t, p, q in trades if s == symbol]
        assert by_symbol[symbol] == want


def test_the_defaults_give_bars_every_second_and_signals_within_a_minute() -> None:
    # The simulator with `fintide up`'s defaults (settings.feed_symbols, feed_ticks_per_s),
    # aggregated to 1 s bars and run through the indicator bank and the signal rules.
    defaults = load_settings(environ={})
    symbols = tuple(defaults.feed_symbols.split(","))
    for seed in range(3):
        sim = Simulator(SimConfig(symbols=symbols, ticks_per_s=defaults.feed_ticks_per_s, seed=seed),
                        start_ms=1_700_000_000_000)
        agg = BarAggregator(len(symbols), (1_000,))
        bank = IndicatorBank(n_symbols=len(symbols))
        features, rules = FeatureMap(bank.output_names), SignalRules(n_rows=len(symbols))
        bars = np.zeros(len(symbols), int)
        signals = 0
        first_signal_s = None
        steps_per_s = 1000 // sim.config.step_ms
        for step in range(60 * steps_per_s):
            out = agg.process_batch(*sim.step())
            if not len(out):
                continue
            np.add.at(bars, out.sym, 1)
            o = out.ohlcv
            values = bank.update(out.sym, o[:, 0], o[:, 1], o[:, 2], o[:, 3], o[:, 4])
            fired = rules.process_batch(out.sym, features.build(values, o[:, 1], o[:, 2], o[:, 3]))
            signals += len(fired)
            if len(fired) and first_signal_s is None:
                first_signal_s = step / steps_per_s
        assert bars.min() >= 58, f"seed {seed}: a symbol missed 1 s bars: {bars}"
        assert first_signal_s is not None and first_signal_s < 45, f"seed {seed}: first signal at {first_signal_s}"
        assert signals >= 10


def test_feed_arguments_default_to_the_simulator_and_settings() -> None:
    settings = load_settings(environ={"FINTIDE_FEED_SYMBOLS": "X,Y", "FINTIDE_FEED_TICKS_PER_S": "321"})
    opts = parse_feed_args([], settings)
    assert (opts.source, opts.symbols, opts.rate, opts.batch_ticks, opts.batch_ms) == ("sim", "X,Y", 321.0, 4096, 50.0)
    opts = parse_feed_args(["--symbols", "A,B", "--rate", "5000", "--duration", "10"], settings)
    assert (opts.source, opts.symbols, opts.rate, opts.duration) == ("sim", "A,B", 5000.0, 10.0)
    opts = parse_feed_args(["csv", "f.csv", "--speed", "10"], settings)
    assert (opts.source, opts.path, opts.speed) == ("csv", Path("f.csv"), 10.0)
    with pytest.raises(SystemExit):
        parse_feed_args(["--batch-ticks", "0"], settings)


async def test_sigterm_publishes_open_batches_and_exits_cleanly(settings: Settings) -> None:
    env = {**os.environ, "FINTIDE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "FINTIDE_TOPIC_PREFIX": settings.topic_prefix, "FINTIDE_ENV": "test",
           "FINTIDE_TOPIC_PARTITIONS": str(settings.topic_partitions)}
    # Long batch age: the ticks of the last second are still open when SIGTERM arrives.
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "feed", "sim", "--symbols", "A,B,C", "--rate", "2000",
                             "--batch-ms", "5000"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        await read_batches(settings, 1, timeout_s=60)  # it is publishing
        await asyncio.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.to_thread(proc.communicate, timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    summary = stdout.decode().strip().splitlines()[-1]
    sent = int(summary.split()[2])
    batches = await read_batches(settings, sent, timeout_s=20)
    assert sum(b.count for _, _, b in batches) == sent > 0
