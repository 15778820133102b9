"""Who a learner process is in its data-parallel group, read from torchrun's environment.

Torch-free: ``learn`` reads it before importing torch, to choose between the single learner's
early opening (:mod:`pipeline.learner.opening`) and a rank's path
(:mod:`pipeline.learner.ranks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.exceptions import ConfigError


@dataclass(frozen=True)
class RankInfo:
    """Who this process is in its group; the default is a single learner."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    attempt: int = 0  # torchrun's restart count of the group (TORCHELASTIC_RESTART_COUNT)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def leader(self) -> bool:
        """Rank 0: writes the checkpoint, the bank's durable copy and the telemetry."""
        return self.rank == 0

    def as_dict(self) -> dict[str, int]:
        return {"rank": self.rank, "world_size": self.world_size}


SINGLE = RankInfo()


def rank_from_env(environ: Mapping[str, str]) -> RankInfo:
    """torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; a single learner without them."""
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local = int(environ.get("LOCAL_RANK", str(rank)))
        attempt = int(environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError as exc:
        raise ConfigError(f"torchrun environment: {exc}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(
            f"torchrun environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}"
        )
    return RankInfo(rank, world, local, attempt)
