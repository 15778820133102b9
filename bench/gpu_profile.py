"""Where one learner batch spends its time: cProfile and torch.profiler over learner-only batches.

    python bench/gpu_profile.py --out runs/gpu_profile            # on a CUDA host
    python bench/gpu_profile.py --device cpu --out /tmp/prof      # the same on the CPU

The learner-only stage of ``bench/gpu_check.py`` (``process_batch`` + step telemetry on
in-memory batches; a real Redis behind the bank and a broker for the learner's producers) at
one or more stream batch sizes.
For each size it writes ``profile-<batch>.txt``: the wall time per batch, the project functions
by cumulative time (cProfile), and torch's operators by self CPU and by device time, with the
count of host/device synchronisations (``aten::item``, ``aten::_local_scalar_dense``,
``cudaStreamSynchronize``, ``cudaMemcpy*``): a GPU learner that waits on the host shows there.
Needs tansu and redis-server on the path, as the tests do.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaMemcpyAsync")


def _log(message: str) -> None:
    print(f"[gpu_profile {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def profile_batch_size(
    settings: Any, data: Any, batches: int, device: str, out: Path
) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline.devtools.bench.throughput_stages import _learner_step, event_batches
    from pipeline.learner.assembly import build_context, close_context

    size = settings.consumer.batch_size
    ctx = build_context(settings)
    work = event_batches(settings, data, 0, size * (batches * 3 + 10))
    try:
        for batch in work[:10]:  # warm-up: kernels, allocator, bank fill
            _learner_step(ctx, batch)
        timed = work[10 : 10 + batches]
        started = time.perf_counter()
        for batch in timed:
            _learner_step(ctx, batch)
        if device == "cuda":
            torch.cuda.synchronize()
        plain_ms = (time.perf_counter() - started) / len(timed) * 1e3

        profiler = cProfile.Profile()
        profiler.enable()
        for batch in work[10 + batches : 10 + 2 * batches]:
            _learner_step(ctx, batch)
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text).sort_stats("cumulative")
        stats.print_stats(r"(pipeline|memory_bank|consumers)/", 45)

        activities = [ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            for batch in work[10 + 2 * batches : 10 + 3 * batches]:
                _learner_step(ctx, batch)
        averages = prof.key_averages()
        sort_device = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        syncs = {e.key: e.count for e in averages if e.key in SYNC_OPS}
    finally:
        close_context(ctx)

    report = out / f"profile-{size}.txt"
    report.write_text(
        f"batch size {size}, device {device}, {batches} batches\n"
        f"wall per batch (no profiler): {plain_ms:.2f} ms\n"
        f"host/device syncs over {batches} batches: {syncs}\n\n"
        "== cProfile, project functions by cumulative time ==\n"
        f"{text.getvalue()}\n"
        "== torch ops by self CPU time ==\n"
        f"{averages.table(sort_by='self_cpu_time_total', row_limit=30)}\n"
        f"== torch ops by {sort_device} ==\n"
        f"{averages.table(sort_by=sort_device, row_limit=25)}\n"
    )
    _log(f"batch {size}: {plain_ms:.2f} ms per batch, syncs {syncs} -> {report}")
    return {"batch_size": size, "ms_per_batch": round(plain_ms, 3), "syncs": syncs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", default="runs/gpu_profile")
    parser.add_argument("--batch-sizes", default="32,1024")
    parser.add_argument("--batches", type=int, default=40, help="batches per measurement")
    parser.add_argument("--input-dim", type=int, default=64)
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_profile: no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    from pipeline.config import load_settings
    from pipeline.devtools.bench.throughput import Stack
    from pipeline.devtools.bench.throughput_stages import Synthetic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "stack"
    shutil.rmtree(workdir, ignore_errors=True)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    data = Synthetic.make(max(sizes) * (args.batches * 3 + 10), args.input_dim)
    with Stack.running(workdir) as stack:
        for size in sizes:
            settings = load_settings(
                None,
                [
                    f"kafka.bootstrap_servers={stack.broker.address}",
                    "kafka.topic_prefix=prof",
                    f"redis.url=redis://{stack.redis.address}/0",
                    f"redis.key_prefix=prof-{size}",
                    f"model.input_dim={args.input_dim}",
                    f"learner.name=prof-{size}",
                    f"checkpoint.dir={workdir / 'checkpoints'}",
                    f"train.device={args.device}",
                    f"train.amp={'true' if args.device == 'cuda' else 'false'}",
                    f"consumer.batch_size={size}",
                ],
                environ={},
            )
            profile_batch_size(settings, data, args.batches, args.device, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
