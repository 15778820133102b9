"""The collectives of a learner's data-parallel group.

torchrun (``torchrun --nproc-per-node N -m pipeline.cli learn ...``) starts N learner processes
and tells each who it is through ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:mod:`pipeline.distributed.rank_info` reads them, in this one place, without torch.
:func:`join_group` starts the process group: gloo on CPU, NCCL on CUDA (each rank on the GPU
``LOCAL_RANK`` names). With ``WORLD_SIZE`` 1 (or unset) nothing here runs: a single learner
never initialises ``torch.distributed``.

Every collective here is called by every rank in the same order: that is the group's one
rule. The learner keeps it with a fixed cadence, one round of votes per loop turn
(:mod:`pipeline.learner.ranks`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, TypeVar

import structlog
import torch

from pipeline.distributed.rank_info import RankInfo

log = structlog.get_logger(__name__)
T = TypeVar("T")

# A collective waits this long for its slowest rank before failing (then torchrun restarts
# the group). Long: a rank may spend minutes in a startup wait for Kafka or Redis.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def join_group(info: RankInfo, device: torch.device) -> None:
    """Start the process group (torchrun's env:// rendezvous): gloo on CPU, NCCL on CUDA."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    store, _, _ = next(
        dist.rendezvous("env://", info.rank, info.world_size, timeout=COLLECTIVE_TIMEOUT)
    )
    # The group's keys under its attempt: after a restart, torchrun's store may still hold
    # the dead attempt's peer addresses, and gloo would dial those (seen in the kill drill).
    store = dist.PrefixStore(f"supcon-stream/attempt-{info.attempt}", store)
    dist.init_process_group(
        backend,
        store=store,
        rank=info.rank,
        world_size=info.world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    log.info(
        "joined the data-parallel group", backend=backend, attempt=info.attempt, **info.as_dict()
    )


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (picklable, small)."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (others pass anything, e.g. None)."""
    import torch.distributed as dist

    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def model_digest(model: torch.nn.Module) -> str:
    """A short hash of every parameter's bytes: equal on every rank of a healthy group."""
    return state_digest(model.state_dict())


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A short hash of named tensors' values (e.g. the stream class means of each rank)."""
    h = hashlib.blake2b(digest_size=8)
    for name, value in sorted(state.items()):
        h.update(name.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
