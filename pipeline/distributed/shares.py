"""A group-wide count split among the ranks of a data-parallel group (torch-free arithmetic).

Under torchrun ``consumer.batch_size``, ``train.replay_size`` and ``train.hard_negatives`` are
the group's (docs/architecture.md, "Data-parallel group"): each rank reads its share of the
micro-batch, and each rank with rows draws the share of the replay its rows are of the group's
rows, so a group step has the rows of one learner's step, split among the ranks.
"""

from __future__ import annotations

from collections.abc import Sequence


def split(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` in parts proportional to ``weights``, summing to ``total``.

    Largest remainder: each part is the floor of its exact share, and what is left goes one
    each to the largest fractions, the lower index first on a tie. All parts are 0 when no
    weight is positive.
    """
    if total < 0 or any(w < 0 for w in weights):
        raise ValueError(f"need total >= 0 and weights >= 0: {total=} {list(weights)=}")
    whole = sum(weights)
    if whole == 0:
        return [0] * len(weights)
    parts = [total * w // whole for w in weights]
    left = total - sum(parts)
    # The remainders, compared exactly as integers (total * w mod whole).
    order = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in order[:left]:
        parts[i] += 1
    return parts


def rank_share(total: int, world_size: int, rank: int) -> int:
    """Rank ``rank``'s part of ``total`` split evenly over ``world_size`` ranks (lower ranks
    take the remainder); the whole of it for a single learner."""
    return split(total, [1] * world_size)[rank]


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own draws (replay, augmentation): ``seed`` on rank 0, so a
    single learner draws exactly as before, and different on every other rank, so ranks with
    rows in the same step do not replay the same items with the same noise."""
    return seed + rank
