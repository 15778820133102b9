"""decode_batch with and without its native scanner, interleaved in one process.

On a shared machine two stages timed minutes apart compare badly; here each round times the
parse floor (`orjson.loads` per record), the native scanner and the reference path back to back, in
CPU time of this thread, on the throughput bench's synthetic events (64 features, ~1.3 KB).
Run: `python bench/decode_ab.py [--rounds 20] [--events 10000]`. Figures in
docs/performance.md ("Two Kafka clients").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import orjson

from consumers.decode import decode_batch
from consumers.events import SourceRecord
from pipeline.devtools.bench.throughput_stages import Synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    n, size = args.events, args.batch_size
    data = Synthetic.make(n, 64)
    values = [data.payload(i) for i in range(n)]
    records = [SourceRecord("bench", 0, i, v, 0) for i, v in enumerate(values)]
    loads = orjson.loads

    def floor() -> None:
        for value in values:
            loads(value)

    def native() -> None:
        for i in range(0, n, size):
            decode_batch(records[i : i + size], 64, 65_536)

    def reference() -> None:
        for i in range(0, n, size):
            decode_batch(records[i : i + size], 64, 65_536, native=False)

    def us_per_event(run: Callable[[], None]) -> float:
        started = time.thread_time()
        run()
        return (time.thread_time() - started) / n * 1e6

    times: dict[str, list[float]] = {"floor": [], "native": [], "reference": []}
    for _ in range(args.rounds):
        times["floor"].append(us_per_event(floor))
        times["native"].append(us_per_event(native))
        times["reference"].append(us_per_event(reference))
    ratios = [f / r for f, r in zip(times["native"], times["reference"], strict=True)]
    floor_ratios = [f / r for f, r in zip(times["native"], times["floor"], strict=True)]
    print(
        json.dumps(
            {
                "events": n,
                "rounds": args.rounds,
                **{f"{k}_us_median": round(statistics.median(v), 3) for k, v in times.items()},
                **{f"{k}_us_min": round(min(v), 3) for k, v in times.items()},
                "native_over_reference_median": round(statistics.median(ratios), 3),
                "native_over_floor_median": round(statistics.median(floor_ratios), 3),
                "rounds_native_is_faster": sum(r < 1 for r in ratios),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
