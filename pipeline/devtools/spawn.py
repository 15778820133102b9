"""Starting ``supcon-stream`` commands as child processes: the one way the dev tools do it.

The demo, the crash drills (:mod:`pipeline.devtools.chaos`) and the throughput bench all run
the CLI as a user would, in a process of its own with its output in a log file:

- :func:`spawn` starts one and returns at once (learners to kill, a sidecar to stop);
- :func:`run` runs one to its end, its stdout (the command's JSON result) captured.

The command is ``python -m pipeline.cli`` of this interpreter, so a child runs the same code
and virtual environment as its parent. Each start is logged with the values of secret
``--set`` keys and the password of URL values hidden.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Literal

import structlog

from pipeline.redaction import MASK, redact_argv

log = structlog.get_logger(__name__)

HIDDEN = MASK

Stdout = Literal["log", "discard"]


def cli_command(command: str, *args: str) -> list[str]:
    """``supcon-stream COMMAND ARGS...`` as this interpreter runs it."""
    return [sys.executable, "-m", "pipeline.cli", command, *args]


def torchrun_command(ranks: int, command: str, *args: str, max_restarts: int = 0) -> list[str]:
    """``supcon-stream COMMAND ARGS...`` as ``ranks`` processes of one torchrun group on this host.

    ``--standalone``: torchrun's own rendezvous on a free loopback port, so several groups
    (tests, drills) can run side by side; ``max_restarts`` restarts of the whole group.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(ranks),
        "--max-restarts",
        str(max_restarts),
        "-m",
        "pipeline.cli",
        command,
        *args,
    ]


def set_args(pairs: Sequence[str]) -> list[str]:
    """``--set`` options for ``key=value`` pairs."""
    return [arg for pair in pairs for arg in ("--set", pair)]


def child_env(threads: int | None) -> dict[str, str]:
    """This process's environment; with ``threads``, that many OpenMP threads in the child.

    Children of the dev tools share the machine with each other, so they run single-threaded
    unless a caller measures the default (the bench passes None).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _open_log(log_path: Path, append: bool) -> IO[bytes]:
    return log_path.open("ab" if append else "wb")


def spawn(
    cmd: Sequence[str],
    log_path: Path,
    *,
    append: bool = True,
    threads: int | None = 1,
    stdout: Stdout = "log",
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with its stderr (and its stdout, unless discarded) in ``log_path``.

    ``append`` keeps what the log holds (a learner restarted after a kill writes on).
    """
    with _open_log(log_path, append) as out:
        proc = subprocess.Popen(
            list(cmd),
            stdout=out if stdout == "log" else subprocess.DEVNULL,
            stderr=out if stdout == "discard" else subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(threads),
        )
    log.info("process started", command=redact_argv(cmd), pid=proc.pid, log=str(log_path))
    return proc


def run(
    cmd: Sequence[str],
    log_path: Path,
    *,
    timeout_s: float,
    append: bool = True,
    threads: int | None = 1,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd`` to its end: stdout captured (the result), stderr in ``log_path``.

    A run past ``timeout_s`` is killed and raises :class:`subprocess.TimeoutExpired`.
    """
    log.info("process run", command=redact_argv(cmd), log=str(log_path))
    with _open_log(log_path, append) as err:
        return subprocess.run(
            list(cmd),
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=child_env(threads),
            timeout=timeout_s,
            check=False,
        )
