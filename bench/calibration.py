"""Calibration of the exported NCM model on split-digits: ECE before and after temperature scaling.

Starts its own Tansu broker and redis-server on free loopback ports under --dir, splits the
split-digits stream into a training file (4 of every 5 events of each class, in stream
order) and a held-out file (the 5th), then drives the CLI as a user would: ``replay`` the
training file, ``learn --exit-when-idle``, ``export``, ``predict`` the held-out file. Prints
one JSON report: accuracy and ECE on the held-out file with the bundle's fitted temperature
and with the fixed uncalibrated one, and the learner's own figures on its probes.

    .venv/bin/python bench/calibration.py --config configs/local.yaml
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from pipeline.devtools.devstack import free_port, start_broker, start_redis, stop_process
from pipeline.devtools.spawn import child_env, cli_command, set_args
from pipeline.streams.scenarios import split_digits

HELD_OUT_EVERY = 5


def write_split(workdir: Path, seed: int) -> tuple[Path, Path, int, int]:
    """(train file, held-out file, rows in each): the 5th event of each class is held out."""
    train, held = workdir / "train.jsonl", workdir / "heldout.jsonl"
    seen: Counter[object] = Counter()
    n_train = n_held = 0
    with train.open("wb") as t, held.open("wb") as h:
        for event in split_digits(seed):
            seen[event["label"]] += 1
            if seen[event["label"]] % HELD_OUT_EVERY == 0:
                h.write(orjson.dumps(event) + b"\n")
                n_held += 1
            else:
                t.write(orjson.dumps(event) + b"\n")
                n_train += 1
    return train, held, n_train, n_held


def _cli(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        cli_command(*args), capture_output=True, text=True, env=child_env(None), check=False
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"supcon-stream {args[0]} failed with exit {done.returncode}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/local.yaml"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp)")
    args = parser.parse_args()
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="calibration-"))
    workdir.mkdir(parents=True, exist_ok=True)
    train, held, n_train, n_held = write_split(workdir, args.seed)
    broker = start_broker(free_port(), workdir / "stack")
    redis_proc = start_redis(free_port(), workdir / "stack")
    prefix = f"cal{uuid.uuid4().hex[:8]}"
    pairs = [
        f"kafka.bootstrap_servers={broker.address}",
        f"kafka.topic_prefix={prefix}",
        f"redis.url=redis://{redis_proc.address}/0",
        f"redis.key_prefix={prefix}",
        f"checkpoint.dir={workdir / 'ckpt'}",
        f"export.dir={workdir / 'models'}",
    ]
    common = ["--config", str(args.config), *set_args(pairs)]
    try:
        _cli("topics", *common)
        replayed = _cli("replay", str(train), *common)
        learned = _cli("learn", "--exit-when-idle", "10", *common)
        exported = _cli("export", *common)
        scored = _cli(
            "predict", str(held), "--model", exported["path"], "--out", str(workdir / "p.jsonl")
        )
    finally:
        stop_process(broker.pid)
        stop_process(redis_proc.pid)
    manifest = json.loads((Path(exported["path"]) / "manifest.json").read_text())
    report = {
        "train_events": n_train,
        "held_out_events": n_held,
        "replayed": replayed["sent"],
        "steps": learned["steps"],
        "bundle_version": exported["version"],
        "temperature": scored["temperature"],
        "held_out_accuracy": scored["accuracy"],
        "held_out_ece_calibrated": scored["ece"],
        "held_out_ece_uncalibrated": scored["ece_uncalibrated"],
        "probe_metrics_at_export": manifest["metrics"],
        "workdir": str(workdir),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
