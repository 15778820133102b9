"""Measure `supcon-stream replay topic:NAME --speed 10` over a slice spanning 20 s of event time.

Starts its own Tansu broker on a free loopback port, writes 2,001 records whose timestamps are
10 ms apart (20.00 s of event time) into a 4-partition topic, then times three replays at
--speed 10 (expected: 2 s). Run: `python bench/playback_speed.py`. Figures in README.md.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from kafka import KafkaProducer

from consumers.admin import ensure_topics
from pipeline.devtools.devstack import free_port, start_broker, stop_process

d = Path(tempfile.mkdtemp())
b = start_broker(free_port(), d)
try:
    ensure_topics({"bootstrap_servers": b.address}, ["archive"], 4, 1, timeout_s=30)
    p = KafkaProducer(bootstrap_servers=b.address, acks="all")
    ts0 = int(time.time() * 1000) - 3_600_000
    for i in range(2001):  # one record every 10 ms of event time: 20.00 s
        e = {"id": f"e{i}", "features": [0.0] * 8, "label": i % 3}
        p.send("archive", orjson.dumps(e), key=e["id"].encode(), timestamp_ms=ts0 + 10 * i)
    p.flush()
    p.close()
    for run in range(3):
        cmd = [
            sys.executable,
            "-m",
            "pipeline.cli",
            "replay",
            "topic:archive",
            "--speed",
            "10",
            "--to-prefix",
            f"m{run}",
            "--set",
            f"kafka.bootstrap_servers={b.address}",
        ]
        t = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        wall = time.monotonic() - t
        rep = json.loads(out.strip().splitlines()[-1])
        print(
            json.dumps(
                {
                    "run": run,
                    "sent": rep["sent"],
                    "event_time_span_s": rep["event_time_span_s"],
                    "elapsed_s": rep["elapsed_s"],
                    "process_wall_s": round(wall, 2),
                }
            )
        )
finally:
    stop_process(b.pid)
