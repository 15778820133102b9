"""SIGKILL the learner N times at random moments during a replay; print the delivery report.

Starts its own Tansu broker and redis-server (AOF on) on free loopback ports under --dir,
replays ``gaussian-drift`` through the CLI, kills and restarts ``supcon-stream learn`` with
SIGKILL, lets a last run finish the stream, then checks the ledger, the committed offsets
and the bank (pipeline/devtools/chaos.py). Exit 0 when every check holds.

With ``--ranks N`` (N > 1) the learner is one torchrun group of N ranks; one rank at a time is
SIGKILLed and torchrun restarts the group (pipeline/devtools/rank_drill.py).

    .venv/bin/python bench/kill9.py --events 20000 --kills 10 --rate 150
    .venv/bin/python bench/kill9.py --events 20000 --kills 5 --rate 150 --ranks 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path

from pipeline.devtools.chaos import KillDrill, drill_pairs, run_kill_drill
from pipeline.devtools.devstack import free_port, start_broker, start_redis, stop_process
from pipeline.devtools.rank_drill import run_rank_kill_drill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--rate", type=float, default=150.0, help="replay events/s")
    parser.add_argument("--max-delay", type=float, default=8.0, help="longest s before a kill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp)")
    parser.add_argument("--ranks", type=int, default=1, help="learner ranks (torchrun group)")
    args = parser.parse_args()
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="kill9-"))
    broker = start_broker(free_port(), workdir / "stack")
    redis_proc = start_redis(free_port(), workdir / "stack")
    prefix = f"k9{uuid.uuid4().hex[:8]}"
    pairs = drill_pairs(broker.address, f"redis://{redis_proc.address}/0", prefix, workdir)
    try:
        drill = KillDrill(
            args.events, args.kills, args.rate, seed=args.seed, max_delay_s=args.max_delay
        )
        if args.ranks > 1:
            report = run_rank_kill_drill(drill, pairs, workdir / "logs", ranks=args.ranks)
        else:
            report = run_kill_drill(drill, pairs, workdir / "logs")
    finally:
        stop_process(redis_proc.pid)
        stop_process(broker.pid)
    print(json.dumps({**report.as_dict(), "workdir": str(workdir), "settings": pairs}, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
