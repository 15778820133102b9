"""The sync-free train step (the CUDA path) with fused and with unfused Adam, side by side.

    python bench/step_ab.py                      # CPU: the host work the CUDA path issues
    python bench/step_ab.py --device cuda        # on a GPU host

Per variant: the top-level torch operators one step issues (on CUDA each is a kernel launch or
more, and the GPU learner is bound by those launches: docs/performance.md, The GPU path) and
the wall time per step, the variants interleaved round by round in one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40, help="steps per round and variant")
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline.config import ModelSettings, TrainSettings
    from pipeline.learning.model import StreamNet
    from pipeline.learning.step import StepInputs, make_state, train_step

    torch.set_num_threads(1)
    device = torch.device(args.device)
    model_cfg, cfg = ModelSettings(input_dim=64), TrainSettings()

    def inputs(seed: int) -> StepInputs:
        g = torch.Generator().manual_seed(seed)
        seen = torch.zeros(model_cfg.max_classes, dtype=torch.bool)
        seen[:4] = True
        return StepInputs(
            torch.randn(32, 64, generator=g).to(device),
            torch.arange(4).repeat(8).to(device),
            torch.randn(64, 64, generator=g).to(device),
            torch.arange(4).repeat(16).to(device),
            seen.to(device),
        )

    batches = [inputs(s) for s in range(args.steps)]
    states = {}
    for fused in (False, True):
        torch.manual_seed(0)
        states[fused] = make_state(StreamNet(model_cfg).to(device), cfg, fused=fused)
        for batch in batches[:5]:  # Adam's state, allocator, kernels
            train_step(states[fused], batch, cfg, sync_free=True)

    def timed(fused: bool) -> float:
        started = time.perf_counter()
        for batch in batches:
            train_step(states[fused], batch, cfg, sync_free=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / len(batches) * 1e3

    ms: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for fused in (False, True):
            ms[fused].append(timed(fused))
    report = {}
    for fused in (False, True):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(states[fused], batches[0], cfg, sync_free=True)
        ops = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
        report["fused" if fused else "unfused"] = {
            "top_level_ops_per_step": ops,
            "ms_per_step_median": round(statistics.median(ms[fused]), 3),
        }
    report["ratio_ms_fused_over_unfused"] = round(
        report["fused"]["ms_per_step_median"] / report["unfused"]["ms_per_step_median"], 3
    )
    print(json.dumps({"device": args.device, **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
