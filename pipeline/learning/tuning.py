"""Process-level performance defaults that depend on the machine, kept in one place.

Torch intra-op threads on a CPU learner: the learner process also runs the Kafka consumer
thread (poll, decode, micro-batch), and OpenMP worker threads that find their core taken spin
and wait. Measured on the 2-core development machine, one train step (batch 32 + 80 replay
items, default model): 4.5 ms with 1 torch thread, 70-145 ms with 2 while other processes
used the CPU, 5.7 ms with 2 threads and ``OMP_WAIT_POLICY=PASSIVE``. So by default a CPU
learner leaves one core to the consumer thread.
"""

from __future__ import annotations

import os

import torch


def default_torch_threads(device: torch.device) -> int | None:
    """Intra-op threads for a learner on ``device`` when ``train.torch_threads`` is unset.

    ``None`` (keep torch's default) on CUDA, where the CPU threads only launch kernels;
    on CPU, every core but one, at least one.
    """
    if device.type == "cuda":
        return None
    return max(1, (os.cpu_count() or 1) - 1)
