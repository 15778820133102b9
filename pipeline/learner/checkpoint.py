"""Atomic checkpoints of the learner: model, optimizer, step, label registry, offsets, probes.

Write order (INVARIANT behind "no event is lost"):
  1. serialise to ``<dir>/.ckpt-<step>.pt.tmp`` and fsync the file;
  2. ``os.replace`` it to ``ckpt-<step>.pt`` and fsync the directory;
  3. only then may the caller commit the Kafka offsets stored inside it.
A crash between 2 and 3 leaves a checkpoint ahead of the committed offsets; on restart the
source skips records below the checkpoint's offsets, so nothing is trained twice needlessly.

Loading uses ``torch.load(weights_only=True)``: no code from a checkpoint is executed. A file
that fails to load (truncated, corrupt) is logged and the previous one is tried.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from pipeline.exceptions import CheckpointError

if TYPE_CHECKING:  # imported where used: listing checkpoints (a restart's first step) needs none
    import torch

log = structlog.get_logger(__name__)

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")


@dataclass
class Checkpoint:
    step: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    labels: list[str]
    class_task: dict[str, str | None]
    offsets: dict[tuple[str, int], int]
    probe: dict[str, Any]
    counters: dict[str, float] = field(default_factory=dict)
    temperature: float | None = None  # NCM's fitted temperature (absent in older files)
    metrics: dict[str, Any] = field(default_factory=dict)  # of the last evaluation
    # Where this lineage started: {"from", "offsets", "at"} (pipeline/learner/start.py)
    start: dict[str, Any] = field(default_factory=dict)
    # A data-parallel group's checkpoint: per rank, {"counters": ...} (rank order; empty for a
    # single learner). Model, optimizer and offsets above are the group's.
    ranks: list[dict[str, Any]] = field(default_factory=list)
    # eval.class_means: stream: the running class means, their counts and the bank items'
    # embeddings at the last micro-batch (pipeline/learning/stream_means.py); None otherwise and in
    # older files
    class_means: dict[str, Any] | None = None

    def to_payload(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "step": self.step,
            "model": self.model,
            "optimizer": self.optimizer,
            "labels": list(self.labels),
            "class_task": dict(self.class_task),
            "offsets": [[t, p, o] for (t, p), o in sorted(self.offsets.items())],
            "probe": self.probe,
            "counters": dict(self.counters),
            "temperature": self.temperature,
            "metrics": dict(self.metrics),
            "start": dict(self.start),
            "ranks": list(self.ranks),
            "class_means": self.class_means,
        }

    @classmethod
    def from_payload(cls, raw: dict[str, Any]) -> Checkpoint:
        if raw.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"unsupported checkpoint format {raw.get('format')!r}")
        return cls(
            step=int(raw["step"]),
            model=raw["model"],
            optimizer=raw["optimizer"],
            labels=[str(x) for x in raw["labels"]],
            class_task=dict(raw["class_task"]),
            offsets={(str(t), int(p)): int(o) for t, p, o in raw["offsets"]},
            probe=raw["probe"],
            counters=dict(raw.get("counters", {})),
            temperature=raw.get("temperature"),
            metrics=dict(raw.get("metrics") or {}),
            start=dict(raw.get("start", {})),  # absent in checkpoints written before --from
            ranks=list(raw.get("ranks", [])),  # absent but for data-parallel groups
            class_means=raw.get("class_means"),  # absent before the stream class means
        )


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, newest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def save_checkpoint(directory: Path, ckpt: Checkpoint, keep: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"ckpt-{ckpt.step:012d}.pt"
    tmp = directory / f".{final.name}.tmp"
    import torch

    try:
        with tmp.open("wb") as fh:
            torch.save(ckpt.to_payload(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(directory)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {exc}") from exc
    for old in list_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
    return final


def _remove_torn_writes(directory: Path) -> None:
    """Delete temp files of writes cut short by a crash (never renamed, so never loaded)."""
    if not directory.is_dir():
        return
    for tmp in directory.glob(".ckpt-*.pt.tmp"):
        tmp.unlink(missing_ok=True)
        log.info("removed an unfinished checkpoint write", path=str(tmp))


def load_latest(directory: Path, map_location: torch.device | str = "cpu") -> Checkpoint | None:
    """The newest checkpoint that loads, or None when there is none at all.

    Raises CheckpointError when checkpoints exist but every one of them is unreadable:
    starting from scratch silently would retrain (and re-commit) a whole stream.
    """
    import torch

    _remove_torn_writes(directory)
    candidates = list_checkpoints(directory)
    for path in candidates:
        try:
            raw = torch.load(path, map_location=map_location, weights_only=True)
            ckpt = Checkpoint.from_payload(raw)
        except Exception as exc:  # noqa: BLE001 - any unreadable file means "try the previous"
            log.warning(
                "checkpoint unreadable, trying the previous one",
                path=str(path),
                error=f"{type(exc).__name__}: {exc}",
            )
            continue
        log.info(
            "checkpoint restored", path=str(path), step=ckpt.step, partitions=len(ckpt.offsets)
        )
        return ckpt
    if candidates:
        raise CheckpointError(
            f"none of the {len(candidates)} checkpoints in {directory} could be loaded; "
            "start a fresh lineage with `learn --reset` (they are kept aside)"
        )
    return None
