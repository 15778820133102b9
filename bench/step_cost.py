"""Training-step cost of train settings against the defaults, interleaved in one process.

    PYTHONPATH=. python bench/step_cost.py views=3 views=4 mixup_weight=1 mix_negatives=32

Each argument is a variant: comma-separated ``train.*`` overrides (``KEY=VALUE,KEY=VALUE``).
Every variant and the defaults train their own network on the benchmark's step shape
(``bench forgetting``: a micro-batch of 10 events, 64 replayed plus 16 hard-negative rows, 64
features, 10 classes seen, the default model), one torch thread, the variants interleaved
round by round so that a load that comes and goes on a shared machine hits them alike. Prints
the median milliseconds per ``train_step`` and the ratio to the defaults (the step only: no
replay draw, no bank upkeep, which are the same for every variant).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help="KEY=VALUE[,KEY=VALUE...] of train.*")
    parser.add_argument("--rounds", type=int, default=12, help="the first 2 are warm-up")
    parser.add_argument("--steps", type=int, default=25, help="steps per round and variant")
    args = parser.parse_args(argv)

    import torch

    from pipeline.config import ModelSettings, TrainSettings
    from pipeline.learning.model import StreamNet
    from pipeline.learning.step import StepInputs, make_state, train_step

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros(ModelSettings().max_classes, dtype=torch.bool)
    seen[:10] = True
    inputs = StepInputs(
        torch.randn(10, 64, generator=g),
        torch.randint(0, 10, (10,), generator=g),
        torch.randn(80, 64, generator=g),
        torch.randint(0, 10, (80,), generator=g),
        seen,
    )
    variants: dict[str, dict[str, str]] = {"defaults": {}}
    for spec in args.variants:
        variants[spec] = dict(item.split("=", 1) for item in spec.split(","))
    runs = {}
    for name, overrides in variants.items():
        torch.manual_seed(0)
        cfg = TrainSettings.model_validate({"device": "cpu", "amp": False, **overrides})
        runs[name] = (cfg, make_state(StreamNet(ModelSettings()), cfg))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (cfg, state) in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(state, inputs, cfg, g)
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
    base = statistics.median(times["defaults"][2:])
    for name, spent in times.items():
        ms = statistics.median(spent[2:])
        print(f"{name}: {ms:.2f} ms/step, {ms / base:.2f}x the defaults")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
