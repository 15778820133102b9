"""The kill drill for a data-parallel group: SIGKILL one rank at a time while a replay runs.

One ``torchrun`` group of ``ranks`` learners (``--max-restarts`` one more than the kills)
trains a ``supcon-stream replay``; a rank chosen at random (a worker process of torchrun) is
SIGKILLed ``kills`` times. Each time torchrun stops the other ranks and restarts the whole
group, which resumes from the last complete cut (:mod:`pipeline.learner.rank_cut`). The last
incarnation finishes the stream (``--exit-when-idle``), then :func:`~.chaos.check_delivery`
checks every rank's ledger, the committed offsets and the bank, as for a single learner.

As in :mod:`.chaos`, odd-numbered kills come after the new group's first trained batch (its
ledgers grow), even-numbered ones at a random moment of its start-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from pipeline.devtools.chaos import DeliveryReport, KillDrill, finish_drill, start_drill
from pipeline.devtools.spawn import spawn, torchrun_command

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 180.0
FINISH_TIMEOUT_S = 900.0


def workers(agent_pid: int) -> set[int]:
    """The worker processes (ranks) of a torchrun agent: its children, from /proc."""
    try:
        text = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text()
    except OSError:
        return set()
    return {int(pid) for pid in text.split()}


def _ledger_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("ledger*.jsonl") if p.is_file())


def _wait_for_new_group(
    agent: subprocess.Popen[bytes], ranks: int, killed: set[int], timeout_s: float
) -> set[int]:
    """Until torchrun runs ``ranks`` workers none of which was killed before."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise RuntimeError(f"torchrun exited early ({agent.returncode})")
        current = workers(agent.pid)
        if len(current) == ranks and not current & killed:
            return current
        time.sleep(0.1)
    raise RuntimeError(f"torchrun did not (re)start {ranks} ranks within {timeout_s:.0f} s")


def _wait_for_growth(directory: Path, agent: subprocess.Popen[bytes], timeout_s: float) -> None:
    size = _ledger_bytes(directory)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and agent.poll() is None:
        if _ledger_bytes(directory) > size:
            return
        time.sleep(0.05)


def run_rank_kill_drill(
    drill: KillDrill,
    settings_pairs: Sequence[str],
    workdir: Path,
    ranks: int = 2,
    idle_exit_s: float = 10.0,
) -> DeliveryReport:
    """The drill of the module doc; returns the delivery report (``ok``: every check held)."""
    settings, rng, common, started, replay = start_drill(drill, settings_pairs, workdir)
    group_log = workdir / "group.log"
    learn = ["--exit-when-idle", str(idle_exit_s), *common]
    agent = spawn(torchrun_command(ranks, "learn", *learn, max_restarts=drill.kills), group_log)
    kill_after: list[float] = []
    killed: set[int] = set()
    try:
        for n in range(drill.kills):
            group = _wait_for_new_group(agent, ranks, killed, START_TIMEOUT_S)
            spawned = time.monotonic()
            if n % 2:
                _wait_for_growth(settings.checkpoint_dir, agent, timeout_s=120.0)
                delay = rng.uniform(0.0, drill.max_delay_s)
            else:
                delay = rng.uniform(drill.min_delay_s, drill.max_delay_s)
            time.sleep(delay)
            victim = rng.choice(sorted(group))
            if agent.poll() is not None:
                raise RuntimeError(f"torchrun exited early ({agent.returncode}); see {group_log}")
            os.kill(victim, signal.SIGKILL)
            killed |= group
            kill_after.append(round(time.monotonic() - spawned, 2))
            log.info("rank killed", kill=n + 1, pid=victim, after_s=kill_after[-1])
        if replay.wait(timeout=max(600.0, 3 * drill.events / drill.rate)) != 0:
            raise RuntimeError(f"replay failed; see {workdir / 'replay.log'}")
        if agent.wait(timeout=FINISH_TIMEOUT_S) != 0:
            raise RuntimeError(f"the group's last run failed ({agent.returncode}); see {group_log}")
    finally:
        for proc in (replay, agent):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return finish_drill(drill, settings, kill_after, started)
