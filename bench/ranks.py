"""Learner throughput: one process against a torchrun group of N ranks, on the same stream.

Starts its own Tansu broker and redis-server on free loopback ports under --dir, produces
``--events`` events of ``--source`` into ``--partitions`` partitions, then trains them with one
learner and afterwards with an N-rank group (gloo on CPU, one torch thread per process), each
under its own learner name, so both read the whole topic. Prints a JSON report and a Markdown
row: events/s while there was work (join and idle excluded; for the group, every rank's events
over the longest rank's active span), and the final average accuracy on the probes of each.

    .venv/bin/python bench/ranks.py --events 6000 --ranks 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.devtools.devstack import free_port, start_broker, start_redis, stop_process
from pipeline.devtools.spawn import child_env, cli_command, set_args, torchrun_command
from pipeline.learner.checkpoint import load_latest


def _accuracy(directory: Path) -> float | None:
    ckpt = load_latest(directory)
    return None if ckpt is None else ckpt.metrics.get("avg_accuracy")


def _summaries(cmd: list[str], timeout_s: float) -> tuple[list[dict[str, Any]], float]:
    started = time.monotonic()
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout_s, env=child_env(1), check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:6]} failed: {done.stderr[-2000:]}")
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    return lines, time.monotonic() - started


def _rate(summaries: list[dict[str, Any]]) -> float:
    """Every process's events over the longest active span among them."""
    events = sum(s["consumed"] for s in summaries)
    spans = [s["consumed"] / s["events_per_s"] for s in summaries if s["events_per_s"] > 0]
    return events / max(spans) if spans else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--source", default="gaussian-drift")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp)")
    args = parser.parse_args()
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="ranks-"))
    broker = start_broker(free_port(), workdir / "stack")
    redis_proc = start_redis(free_port(), workdir / "stack")
    prefix = f"rk{uuid.uuid4().hex[:8]}"
    common = set_args(
        [
            f"kafka.bootstrap_servers={broker.address}",
            f"kafka.topic_prefix={prefix}",
            f"kafka.partitions={args.partitions}",
            f"redis.url=redis://{redis_proc.address}/0",
            f"redis.key_prefix={prefix}",
            f"checkpoint.dir={workdir / 'ckpt'}",
            "train.torch_threads=1",
        ]
    )
    learn = ["--exit-when-idle", "5", *common]
    try:
        subprocess.run(cli_command("topics", *common), check=True, capture_output=True)
        subprocess.run(
            cli_command("replay", args.source, "--limit", str(args.events), *common),
            check=True,
            capture_output=True,
        )
        one, one_wall = _summaries(cli_command("learn", "--name", "one", *learn), 1800)
        group, group_wall = _summaries(
            torchrun_command(args.ranks, "learn", "--name", "group", *learn), 1800
        )
    finally:
        stop_process(redis_proc.pid)
        stop_process(broker.pid)
    report = {
        "events": args.events,
        "partitions": args.partitions,
        "source": args.source,
        "single": {
            "events_per_s": round(_rate(one), 1),
            "steps": one[0]["steps"],
            "avg_accuracy": _accuracy(workdir / "ckpt" / "one"),
        },
        "group": {
            "ranks": args.ranks,
            "events_per_s": round(_rate(group), 1),
            "steps": group[0]["steps"],
            "avg_accuracy": _accuracy(workdir / "ckpt" / "group"),
            "consumed_per_rank": [s["consumed"] for s in group],
            "digests_equal": len({s["model_digest"] for s in group}) == 1,
        },
        "wall_s": {"single": round(one_wall, 1), "group": round(group_wall, 1)},
        "workdir": str(workdir),
    }
    ratio = report["group"]["events_per_s"] / max(report["single"]["events_per_s"], 1e-9)
    report["group_over_single"] = round(ratio, 2)
    print(json.dumps(report, indent=2))
    print(
        f"| {args.events} events, {args.partitions} partitions | "
        f"{report['single']['events_per_s']} ev/s, {one[0]['steps']} steps | "
        f"{report['group']['events_per_s']} ev/s, {group[0]['steps']} steps | {ratio:.2f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
