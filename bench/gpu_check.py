"""One-shot GPU check: everything a CUDA host has to prove, in one run, one JSON out.

    python bench/gpu_check.py --out runs/gpu_check.json            # on a CUDA host, <= 8 min
    python bench/gpu_check.py --budget-s 300 --events 100000       # a shorter lease
    python bench/gpu_check.py --dry-run --out /tmp/gpu_dry.json    # on CPU: every stage, tiny

Stages (each bounded; a stage that would overrun the total budget is recorded as skipped):

1. ``cuda_tests``: the tests that need a CUDA device (they skip without one);
2. ``learner_only``: ``process_batch`` on in-memory batches at stream batch 32, 256 and 1024,
   bf16 autocast (``train.amp``), on ``cuda``;
3. ``index``: build + search time of the bank index at 100k and 1M items, faiss-gpu
   (``FaissIndex(use_gpu=True)``) and the torch search (``TorchIndex`` on the device);
4. ``end_to_end``: a full learner process per Kafka client (``consumer.client``) with N
   consumer processes (``consumer.processes``), first batch to final commit.

The JSON is rewritten after every stage, so a run cut short still leaves what it measured.

Needs tansu and redis-server on the path (as the tests do) and the ``fast`` extra (both clients);
faiss-gpu (``gpu`` extra) for the FAISS GPU rows, which are marked unavailable otherwise.
``--dry-run`` runs every stage on the CPU at small sizes: it proves the script, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGET_S = 480.0  # the whole check, 8 minutes, unless --budget-s says otherwise
CUDA_TESTS = [
    "tests/unit/memory_bank/test_index_contract.py",
    "tests/unit/memory_bank/test_bank_mirror.py",
]


def _log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Budget:
    def __init__(self, total_s: float) -> None:
        self.start = time.monotonic()
        self.total_s = total_s

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.start)


def cuda_tests(budget: Budget) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *CUDA_TESTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=max(30.0, min(150.0, budget.left() - 60)),
        check=False,
    )
    tail = proc.stdout.strip().splitlines()
    return {
        "returncode": proc.returncode,
        "summary": tail[-1] if tail else "",
        "skipped": [line for line in tail if line.startswith("SKIPPED")],
        "seconds": round(time.monotonic() - started, 1),
    }


def index_search(device: str, sizes: list[int], dim: int, queries: int, k: int) -> list[dict]:
    import torch

    from memory_bank.exceptions import BankError
    from memory_bank.index import FaissIndex, TorchIndex

    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        bank = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1).to(device)
        q = bank[torch.randint(0, n, (queries,), generator=gen).to(device)]
        for kind in ("faiss-gpu", "torch"):
            try:
                index = (
                    FaissIndex(dim, use_gpu=True)
                    if kind == "faiss-gpu"
                    else TorchIndex(dim, device)
                )
            except BankError as exc:
                rows.append({"kind": kind, "items": n, "unavailable": str(exc)[:200]})
                continue
            t0 = time.perf_counter()
            index.rebuild(bank)
            build_s = time.perf_counter() - t0
            index.search(q, k)  # warm-up (kernels, allocations)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            reps = 5
            t0 = time.perf_counter()
            for _ in range(reps):
                index.search(q, k)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            search_ms = (time.perf_counter() - t0) / reps * 1e3
            rows.append(
                {
                    "kind": kind,
                    "items": n,
                    "device": device,
                    "build_s": round(build_s, 3),
                    "search_ms": round(search_ms, 3),
                    "queries": queries,
                    "k": k,
                }
            )
        del bank
    return rows


def _write(path: str, report: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def _stack_stages(args: argparse.Namespace, budget: Budget, out: dict[str, Any]) -> None:
    """Stages that need the broker and redis: learner-only and end-to-end."""
    from consumers.admin import ensure_topics
    from pipeline.config import load_settings
    from pipeline.devtools.bench.throughput import Stack
    from pipeline.devtools.bench.throughput_stages import (
        Synthetic,
        measure_end_to_end,
        measure_learner,
        produce,
    )

    device = "cpu" if args.dry_run else "cuda"
    workdir = Path(args.workdir)
    # A fresh stack and no checkpoints of an earlier run (a restored learner would find its
    # offsets at the end of the new topic and train nothing).
    shutil.rmtree(workdir, ignore_errors=True)
    data = Synthetic.make(args.events, args.input_dim)
    with Stack.running(workdir) as stack:

        def overrides(name: str, *extra: str) -> list[str]:
            return [
                f"kafka.bootstrap_servers={stack.broker.address}",
                "kafka.topic_prefix=gpu-check",
                f"redis.url=redis://{stack.redis.address}/0",
                f"redis.key_prefix=gpu-{name}",
                f"model.input_dim={args.input_dim}",
                f"learner.name={name}",
                f"checkpoint.dir={workdir / 'checkpoints'}",
                f"train.device={device}",
                "train.amp=true",
                *extra,
            ]

        settings = load_settings(None, overrides("setup"), environ={})
        k = settings.kafka
        ensure_topics(k.client_options(), k.all_topics(), k.partitions, 1, timeout_s=30.0)
        out["produced_per_s"] = round(produce(settings, data, 0, args.events), 1)

        out["learner_only"] = []
        for batch in (32, 256, 1024):
            if budget.left() < 120:
                out["learner_only"].append({"batch_size": batch, "skipped": "budget"})
                continue
            s = load_settings(
                None, overrides(f"lo-{batch}", f"consumer.batch_size={batch}"), environ={}
            )
            total = min(args.events, max(batch * args.learner_batches, batch * 4))
            row = measure_learner(s, data, total)
            row["device"], row["amp_bf16"] = device, device == "cuda"
            out["learner_only"].append(row)
            _write(args.out, out)
            _log(f"learner-only, batch {batch}: {row['events_per_s']:,.0f} events/s")

        out["end_to_end"] = []
        for client in ("kafka-python", "confluent"):
            if budget.left() < 90:
                out["end_to_end"].append({"client": client, "skipped": "budget"})
                continue
            extra = (f"consumer.client={client}", f"consumer.processes={args.processes}")
            row = measure_end_to_end(overrides(f"e2e-{client}", *extra), args.events, workdir)
            row["client"] = client
            if row["events"] < args.events:
                raise RuntimeError(f"end-to-end with {client} trained {row['events']} events")
            out["end_to_end"].append(row)
            _write(args.out, out)
            _log(f"end-to-end, {client}, {args.processes} processes: {row['events_per_s']:,.0f}/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, small sizes: prove the script")
    parser.add_argument("--out", default="runs/gpu_check.json")
    parser.add_argument("--workdir", default="runs/gpu_check_stack")
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--processes", type=int, default=None, help="consumer processes (e2e)")
    parser.add_argument("--input-dim", type=int, default=64)
    parser.add_argument("--learner-batches", type=int, default=60)
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole check")
    args = parser.parse_args(argv)
    args.events = args.events or (4_000 if args.dry_run else 200_000)
    args.processes = args.processes or (2 if args.dry_run else 4)

    import torch

    budget = Budget(args.budget_s)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run on a CPU host", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "events": args.events,
        "processes": args.processes,
    }
    failures: list[str] = []
    report["cuda_tests"] = cuda_tests(budget)
    if report["cuda_tests"]["returncode"] != 0:
        failures.append("cuda_tests")
    _log(f"cuda tests: {report['cuda_tests']['summary']}")
    _write(args.out, report)

    device = "cpu" if args.dry_run else "cuda"
    sizes = [10_000, 20_000] if args.dry_run else [100_000, 1_000_000]
    report["index"] = index_search(device, sizes, dim=128, queries=256, k=16)
    _log(f"index: {len(report['index'])} rows")
    _write(args.out, report)
    try:
        _stack_stages(args, budget, report)
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON, exit code says it failed
        report["stack_error"] = repr(exc)
        failures.append("stack")
    report["seconds"] = round(args.budget_s - budget.left(), 1)
    report["within_budget"] = budget.left() >= 0
    report["failures"] = failures
    _write(args.out, report)
    _log(f"wrote {args.out} ({report['seconds']} s); failures: {failures or 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
