"""The cost of ``bank.eviction``: wall time of ``MemoryBank.add`` on a full bank, by rule.

Fills a bank (in-memory store, CPU mirror) with items of 10 classes, then times batches of
new items drawn over 11 classes (an 11th class growing in: evictions across classes and within
them), for the random and the mean-preserving victim, alternated. Prints one JSON line.

    PYTHONPATH=. .venv/bin/python bench/eviction_cost.py --capacity 100000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from memory_bank.bank import MemoryBank
from memory_bank.index import TorchIndex
from memory_bank.testing import InMemoryBankStore

IN_DIM, EMBED_DIM, CLASSES = 8, 128, 10


def _offer(bank: MemoryBank, prefix: str, n: int, classes: int) -> int:
    labels = torch.randint(0, classes, (n,))
    result = bank.add(
        [f"{prefix}-{i}" for i in range(n)],
        torch.zeros(n, IN_DIM),
        labels,
        [f"c{int(c)}" for c in labels],
        torch.randn(n, EMBED_DIM),
        [None] * n,
    )
    return result.evicted


def ms_per_add(eviction: str, capacity: int, batches: int, batch: int) -> tuple[float, float]:
    """(ms per add of ``batch`` new items, ms per eviction) on a full bank."""
    torch.manual_seed(0)
    bank = MemoryBank(
        InMemoryBankStore(),
        TorchIndex(EMBED_DIM),
        capacity,
        IN_DIM,
        EMBED_DIM,
        "cpu",
        eviction=eviction,
    )
    filled = 0
    while len(bank) < capacity:
        _offer(bank, f"fill{filled}", 1000, CLASSES)
        filled += 1
    evicted, started = 0, time.perf_counter()
    for b in range(batches):
        evicted += _offer(bank, f"new{b}", batch, CLASSES + 1)
    seconds = time.perf_counter() - started
    return 1000 * seconds / batches, 1000 * seconds / max(evicted, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capacity", type=int, default=100_000)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    runs: dict[str, list[tuple[float, float]]] = {"random": [], "mean_preserving": []}
    for _ in range(args.rounds):
        for eviction, out in runs.items():
            out.append(ms_per_add(eviction, args.capacity, args.batches, args.batch))
    print(
        json.dumps(
            {
                "capacity": args.capacity,
                "batch": args.batch,
                **{
                    f"{eviction}_ms_per_add": round(statistics.median(a for a, _ in out), 2)
                    for eviction, out in runs.items()
                },
                **{
                    f"{eviction}_ms_per_eviction": round(statistics.median(e for _, e in out), 3)
                    for eviction, out in runs.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
