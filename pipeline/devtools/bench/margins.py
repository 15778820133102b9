"""SupCon + bank against CE + ER, as issue 16's acceptance reads them: the paired margin per
memory and the share of CE + ER's gap to the offline joint bound that SupCon closes.

Both come from the seeds every arm ran. The margin's interval is Student's t over the paired
per-seed differences (:func:`pipeline.devtools.bench.forgetting_report.interval`). The share
is a ratio of means, ``(mean(supcon) - mean(ce_er)) / (mean(joint) - mean(ce_er))``; its
interval resamples the seeds with replacement (:data:`RESAMPLES` draws, percentile interval,
a fixed generator so a report is reproducible), since a ratio whose denominator is a few
points wide moves far with one seed and has no t-interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.devtools.bench.forgetting import RunResult

CONTENDER = "supcon"
BASELINE = "ce_er"
# The bound the share is taken against: SupCon's own offline bound, else CE's.
JOINT_BOUNDS = ("joint_supcon", "joint")
RESAMPLES = 10_000


@dataclass(frozen=True)
class GapShare:
    value: float  # the share over all seeds
    low: float  # 2.5th percentile over the resampled seeds (nan with one seed)
    high: float  # 97.5th percentile
    joint: str  # which bound
    resamples: int  # draws whose denominator was > 0 (the others have no share)


@dataclass(frozen=True)
class Margin:
    memory: int
    seeds: tuple[int, ...]  # the seeds both arms ran
    per_seed: tuple[float, ...]  # contender - baseline, in accuracy points, by seed
    share: GapShare | None  # None without a joint bound on these seeds, or at or below CE + ER


def _by_seed(results: Sequence[RunResult], method: str, memory: int | None) -> dict[int, float]:
    return {
        r.seed: r.final_accuracy
        for r in results
        if r.method == method and (memory is None or r.memory == memory)
    }


def _shares(means: np.ndarray) -> np.ndarray:
    """Per row of (contender, baseline, joint) means ``[k, 3]``: the share of the gap closed,
    NaN where the bound is not above the baseline."""
    c, b, j = means.T
    gap = j - b
    return np.where(gap > 0, (c - b) / np.where(gap > 0, gap, 1.0), np.nan)


def _gap_share(
    seeds: Sequence[int],
    contender: dict[int, float],
    baseline: dict[int, float],
    results: Sequence[RunResult],
) -> GapShare | None:
    for bound in JOINT_BOUNDS:
        joint = _by_seed(results, bound, None)
        if all(s in joint for s in seeds):
            break
    else:
        return None
    table = np.array([[contender[s], baseline[s], joint[s]] for s in seeds])
    value = float(_shares(table.mean(axis=0, keepdims=True))[0])
    if math.isnan(value):  # the bound at or below CE + ER: no gap to close
        return None
    if len(seeds) < 2:
        return GapShare(value, float("nan"), float("nan"), bound, 0)
    draws = np.random.default_rng(0).integers(0, len(seeds), size=(RESAMPLES, len(seeds)))
    shares = _shares(table[draws].mean(axis=1))  # [RESAMPLES, 3] means of each draw's seeds
    shares = shares[~np.isnan(shares)]
    low, high = np.percentile(shares, [2.5, 97.5])
    return GapShare(value, float(low), float(high), bound, int(shares.size))


def versus_baseline(results: Sequence[RunResult]) -> list[Margin]:
    """One :class:`Margin` per memory both arms ran, by memory; empty when either is absent."""
    memories = sorted({r.memory for r in results if r.method == CONTENDER})
    margins = []
    for memory in memories:
        contender = _by_seed(results, CONTENDER, memory)
        baseline = _by_seed(results, BASELINE, memory)
        seeds = tuple(sorted(set(contender) & set(baseline)))
        if not seeds:
            continue
        per_seed = tuple(100 * (contender[s] - baseline[s]) for s in seeds)
        share = _gap_share(seeds, contender, baseline, results)
        margins.append(Margin(memory, seeds, per_seed, share))
    return margins
