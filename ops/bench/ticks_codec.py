"""Tick batch codec throughput: ticks/s to encode and to decode (+ validate) `market.ticks`.

    python -m ops.bench.ticks_codec [--runs 7] [--seconds 0.5] [--json]

For each batch size, each case runs repeatedly for --seconds, --runs times; the figure is
the median run in ticks per second (single core). Cases:

* wire encode: `tick_batch(...)` from numpy columns + the platform's msgspec JSON encode
  (what the feed does per batch);
* wire decode: `TICKS.decode` + `.columns()` with every validation (what an agent does);
* msgpack encode/decode of the same Struct: the codec the columns would use without the
  platform's JSON convention (for comparison only);
* per-tick JSON decode: one JSON object per tick decoded with msgspec into a list of
  Structs, the design batches avoid (for comparison only).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import msgspec
import numpy as np

from streams.codec import encode
from streams.market import TICKS, TickBatch, tick_batch


class _Tick(msgspec.Struct):
    s: str
    t: int
    p: float
    q: float


def _columns(n: int, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    symbols = [f"SYM{i}" for i in range(50)]
    return (symbols, rng.integers(0, 50, n).astype(np.int32), 1_700_000_000_000 + np.sort(rng.integers(0, 1_000, n)),
            rng.uniform(1, 1e5, n), rng.uniform(0, 10, n))


def _median_rate(work: Callable[[], object], ticks_per_call: int, runs: int, seconds: float) -> float:
    rates = []
    for _ in range(runs):
        calls = 0
        start = time.perf_counter()
        while True:
            work()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        rates.append(calls * ticks_per_call / elapsed)
    return statistics.median(rates)


def bench(sizes: tuple[int, ...], runs: int, seconds: float) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    msgpack_encoder = msgspec.msgpack.Encoder()
    msgpack_decoder = msgspec.msgpack.Decoder(TickBatch)
    per_tick_decoder = msgspec.json.Decoder(list[_Tick])
    for n in sizes:
        symbols, sym, ts, price, size = _columns(n)

        def build() -> TickBatch:
            return tick_batch(partition=0, source="bench", seq=0, symbols=symbols, sym=sym, ts_ms=ts,
                              price=price, size=size)

        batch = build()
        wire = encode(batch)
        packed = msgpack_encoder.encode(batch)
        per_tick = msgspec.json.encode([_Tick(symbols[sym[i]], int(ts[i]), float(price[i]), float(size[i]))
                                        for i in range(n)])
        cases: dict[str, Callable[[], object]] = {
            "wire encode (json)": lambda: encode(build()),
            "wire decode+validate (json)": lambda: TICKS.decode(wire).columns(),
            "msgpack encode": lambda: msgpack_encoder.encode(build()),
            "msgpack decode+validate": lambda: msgpack_decoder.decode(packed).columns(),
            "per-tick json decode": lambda: per_tick_decoder.decode(per_tick),
        }
        for name, work in cases.items():
            rate = _median_rate(work, n, runs, seconds)
            size_bytes = {"wire": len(wire), "msgp": len(packed), "per-": len(per_tick)}[name[:4]]
            results.append({"case": name, "batch_ticks": n, "ticks_per_s": rate,
                            "bytes_per_tick": size_bytes / n})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--sizes", default="256,4096,16384")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    results = bench(sizes, args.runs, args.seconds)
    if args.json:
        print(msgspec.json.encode(results).decode())
        return 0
    print(f"{'case':30} {'batch':>6} {'ticks/s (median)':>18} {'bytes/tick':>11}")
    for r in results:
        print(f"{r['case']:30} {r['batch_ticks']:>6} {r['ticks_per_s']:>18,.0f} {r['bytes_per_tick']:>11.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
