"""Run the ``supcon-stream`` CLI as a user would: a subprocess of this interpreter."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping

from pipeline.devtools.spawn import cli_command

# A learner small enough for drills on a loaded 2-core machine (outage and durability tests).
SMALL_DIM = 8
SMALL_LEARNER = [
    f"model.input_dim={SMALL_DIM}",
    "model.hidden_dim=32",
    "model.embed_dim=16",
    "model.proj_dim=16",
    "bank.capacity=64",
    "consumer.batch_size=16",
    "consumer.max_latency_ms=100",
    "kafka.partitions=2",
]


def run_cli(
    *args: str, timeout: float = 120, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``supcon-stream ARGS...`` to completion, output captured as text, exit code not checked."""
    command, *rest = args
    return subprocess.run(
        cli_command(command, *rest),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else dict(env),
        check=False,
    )
