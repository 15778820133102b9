"""The cost of ``eval.class_means: stream``: one micro-batch's drift follow against its training.

Fills a bank (in-memory store, CPU mirror, the learner's default model: 64 -> 256 -> 128) with
items of 10 classes, then, per micro-batch of new events, times the learner's two calls
alternated on the same state: ``learn_batch`` (the default SupCon training: 5 steps, 64
class-balanced replay items + 16 hard negatives) and ``StreamClassMeans.follow`` (re-encode
the items of the first ``eval.drift_probe_items`` slots, move the means, take in the batch).
Prints one JSON line per capacity. ``--tasks N`` names N tasks, every class in each (the
micro-batches cycle through them), so the follow moves up to ``N`` means a class (at most
``eval.means_per_class``): the cost of keeping a mean per class and task.

    PYTHONPATH=. .venv/bin/python bench/drift_cost.py --capacities 200,2000,100000
    PYTHONPATH=. .venv/bin/python bench/drift_cost.py --capacities 2000 --classes 100 --tasks 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from memory_bank.bank import MemoryBank
from memory_bank.index import make_index
from memory_bank.testing import InMemoryBankStore
from pipeline.config import EvalSettings, ModelSettings, TrainSettings
from pipeline.learning.batch import learn_batch
from pipeline.learning.model import StreamNet
from pipeline.learning.step import make_state
from pipeline.learning.stream_means import StreamClassMeans


def _batch(n: int, classes: int, model_cfg: ModelSettings) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, classes, (n,))
    return torch.rand(n, model_cfg.input_dim) + labels[:, None] * 0.1, labels


def measure(
    capacity: int,
    batches: int,
    batch: int,
    classes: int = 10,
    tasks: int = 1,
    shrinkage: float | None = EvalSettings().covariance_shrinkage,
) -> dict[str, float | None]:
    """Median ms per micro-batch of training and of the follow, on a full bank."""
    torch.manual_seed(0)
    model_cfg = ModelSettings(input_dim=64, max_classes=100)
    train_cfg = TrainSettings(device="cpu", amp=False)
    eval_cfg = EvalSettings()
    model = StreamNet(model_cfg)
    state = make_state(model, train_cfg)
    bank = MemoryBank(
        InMemoryBankStore(),
        make_index("faiss", model_cfg.embed_dim, "cpu", "never"),
        capacity=capacity,
        input_dim=model_cfg.input_dim,
        embed_dim=model_cfg.embed_dim,
        device="cpu",
    )
    means = StreamClassMeans(
        model_cfg.max_classes,
        model_cfg.embed_dim,
        eval_cfg.drift_sigma,
        eval_cfg.drift_probe_items,
        per_class=eval_cfg.means_per_class,
        shrinkage=shrinkage,
    )
    filled = 0
    while len(bank) < capacity:
        x, y = _batch(1000, classes, model_cfg)
        with torch.no_grad():
            embeddings = model.embed(x)
        ids = [f"fill{filled}-{i}" for i in range(len(y))]
        bank.add(ids, x, y, [f"c{int(c)}" for c in y], embeddings, [None] * len(y))
        filled += 1
    seen = torch.zeros(model_cfg.max_classes, dtype=torch.bool)
    seen[:classes] = True
    generator = torch.Generator().manual_seed(0)
    train_ms: list[float] = []
    follow_ms: list[float] = []
    for b in range(batches):
        x, y = _batch(batch, classes, model_cfg)
        ids = [f"new{b}-{i}" for i in range(batch)]
        items = (ids, [f"c{int(c)}" for c in y], [None] * batch)
        started = time.perf_counter()
        learn_batch(state, bank, train_cfg, x, y, seen, generator, items)
        train_ms.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        means.follow(model, bank, x, y, [f"task{b % tasks}"] * batch)
        means.means()  # the read-out a prediction after this batch would build
        follow_ms.append(1000 * (time.perf_counter() - started))
    train, follow = statistics.median(train_ms[2:]), statistics.median(follow_ms[2:])
    return {
        "capacity": capacity,
        "probe_items": min(capacity, eval_cfg.drift_probe_items),
        "batch": batch,
        "classes": classes,
        "tasks": tasks,
        "shrinkage": shrinkage,
        "means": len(means.means()),
        "train_ms_per_batch": round(train, 2),
        "follow_ms_per_batch": round(follow, 2),
        "follow_over_train": round(follow / train, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacities", default="200,2000,100000")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=1, help="task names the batches cycle")
    parser.add_argument(
        "--shrinkages",
        default="default,none",
        help="eval.covariance_shrinkage values to time side by side (none: cosine NCM)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = EvalSettings().covariance_shrinkage
    shrinkages = [
        default if s == "default" else None if s == "none" else float(s)
        for s in args.shrinkages.split(",")
    ]
    for capacity in (int(c) for c in args.capacities.split(",")):
        for shrinkage in shrinkages:
            result = measure(
                capacity, args.batches, args.batch, args.classes, args.tasks, shrinkage
            )
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
