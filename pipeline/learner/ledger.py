"""The learner's ledger of trained event ids: an append-only file, one line per trained batch.

What it is for: proving the delivery guarantee from the learner's own records. A test (or an
operator) reads the ledger after a crash-and-restart run and checks that every produced event
was trained at least once, and counts how many were trained more than once.

Format: ``<checkpoint.dir>/<learner name>/ledger.jsonl``, one JSON object per trained
micro-batch, ``{"step": <optimizer step after the batch>, "ids": [...]}``. The event ids are
JSON strings, so any id the decoder accepts (newlines included) round-trips.

Cost: one ``os.write`` of one line per trained batch (no Python buffering, so a SIGKILL loses
nothing that ``record`` returned from: the bytes are in the kernel's page cache), and one
``fsync`` per checkpoint.

INVARIANT: :meth:`TrainedLedger.sync` runs before the checkpoint is written, so every batch
covered by a committed offset has its ledger line on disk, even across a machine crash. A
batch trained after the last checkpoint may have a ledger line and be trained again after a
crash: that is the duplicate training at-least-once allows, and the ledger shows it.
A torn last line (a write cut by a machine crash) is ignored by :func:`read_ledger`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
import structlog

log = structlog.get_logger(__name__)

LEDGER_FILE = "ledger.jsonl"


class TrainedLedger:
    """Appends trained ids; one instance per learner process, used by the training thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # O_APPEND: each line lands whole at the end even if an earlier run left a torn line.
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._dirty = False
        if path.stat().st_size and not _ends_with_newline(path):
            # A torn line from a machine crash: start ours on a fresh line.
            os.write(self._fd, b"\n")
            log.warning("ledger had a torn last line; it is ignored", path=str(path))

    def record(self, step: int, ids: Sequence[str]) -> None:
        if not ids:
            return
        if self._fd is None:
            raise ValueError("the ledger is closed")
        line = orjson.dumps({"step": step, "ids": list(ids)}) + b"\n"
        written = os.write(self._fd, line)
        if written != len(line):  # regular files write whole unless the disk is full
            raise OSError(f"short write to the ledger {self.path}: {written}/{len(line)} bytes")
        self._dirty = True

    def sync(self) -> None:
        """Make every recorded line durable (called before each checkpoint)."""
        if self._fd is not None and self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def close(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def ledger_path(checkpoint_dir: Path, rank: int = 0) -> Path:
    """``ledger.jsonl`` (a single learner, rank 0); rank r of a group: ``ledger-rank<r>.jsonl``."""
    return checkpoint_dir / (LEDGER_FILE if rank == 0 else f"ledger-rank{rank}.jsonl")


def iter_ledger(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(step, ids) per complete line; torn or unparsable lines are skipped."""
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                return  # torn last line
            try:
                doc = orjson.loads(raw)
                yield int(doc["step"]), [str(i) for i in doc["ids"]]
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # an empty line written after a torn one


@dataclass(frozen=True)
class LedgerReport:
    """How often each id was trained, and the figures the delivery checks need."""

    counts: Counter[str]

    @property
    def distinct(self) -> int:
        return len(self.counts)

    @property
    def trainings(self) -> int:
        return sum(self.counts.values())

    @property
    def duplicate_trainings(self) -> int:
        """Trainings beyond the first of each id (what at-least-once costs)."""
        return self.trainings - self.distinct

    def never_trained(self, expected: set[str]) -> set[str]:
        return expected - self.counts.keys()


def read_ledger(path: Path) -> LedgerReport:
    counts: Counter[str] = Counter()
    if path.exists():
        for _step, ids in iter_ledger(path):
            counts.update(ids)
    return LedgerReport(counts)


def read_group_ledger(checkpoint_dir: Path) -> LedgerReport:
    """The ledgers of every rank (just ``ledger.jsonl`` for a single learner), added up."""
    counts: Counter[str] = Counter()
    for path in [ledger_path(checkpoint_dir), *sorted(checkpoint_dir.glob("ledger-rank*.jsonl"))]:
        counts.update(read_ledger(path).counts)
    return LedgerReport(counts)
