"""Where a learner starts reading: its checkpoint, ``--from``, or a fresh lineage (``--reset``).

Decisions, in order (:func:`prepare_lineage` before the checkpoint is loaded, then
:func:`plan_start`):

1. ``--reset``: the learner's checkpoints and ledger move to ``<checkpoint dir>/aside-<UTC>/``
   and its bank's Redis keys to the bank ``<name>.aside-<UTC>``, both said in the log; then it
   starts as a new learner at ``--from`` (default ``earliest``: a fresh lineage trains the whole
   retained log, not what the old lineage's group happened to commit).
2. ``--from`` on a learner that has a checkpoint, without ``--reset``: a usage error. Moving a
   trained model to another point of the stream silently would break its lineage.
3. A checkpoint: every partition starts at the checkpoint's offsets (the source seeks there on
   its first assignment). That also covers a fallback to an older checkpoint after a corrupt
   newest one: the group's committed offsets are ahead, and the events between would
   otherwise never be trained. An offset beyond its partition's end (the broker lost its log,
   the topic was recreated) stops the learner with one error naming the partitions: starting
   anyway would either skip events or retrain a log the model has not seen, silently.
4. Neither: ``--from`` resolved per partition, or the group's committed offsets (the consumer's
   ``auto_offset_reset`` when there are none).

The start point goes into every checkpoint of the lineage (``Checkpoint.start``) and into the
health file, so ``supcon-stream status`` shows it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from consumers.events import TopicPartitionKey
from consumers.positions import OffsetProbe, Position, parse_position
from consumers.protocols import labelled, partition_label
from pipeline.config import Settings
from pipeline.exceptions import ConfigError, SupconStreamError
from pipeline.learner.checkpoint import Checkpoint, list_checkpoints
from pipeline.learner.ledger import LEDGER_FILE

log = structlog.get_logger(__name__)

ProbeFactory = Callable[[], OffsetProbe]


@dataclass(frozen=True)
class StartRequest:
    """What the command line asked for: ``--from`` and ``--reset``."""

    position: Position | None = None
    reset: bool = False

    @classmethod
    def from_args(cls, from_text: str | None, reset: bool) -> StartRequest:
        try:
            position = parse_position(from_text, allow_offsets=False) if from_text else None
        except ValueError as exc:
            raise ConfigError(f"--from: {exc}") from None
        return cls(position, reset)


NO_REQUEST = StartRequest()


@dataclass(frozen=True)
class StartPlan:
    """Offsets to start each partition at (empty: the group's), and the lineage's start."""

    offsets: dict[TopicPartitionKey, int]
    start: dict[str, Any]


def _stamp(now: datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%SZ")


def prepare_lineage(
    settings: Settings,
    request: StartRequest,
    set_bank_aside: Callable[[str], list[str]],
    now: datetime | None = None,
) -> None:
    """Steps 1 and 2 of the module doc. ``set_bank_aside(new_name)`` renames the bank's keys."""
    directory = settings.checkpoint_dir
    existing = list_checkpoints(directory)
    if request.reset:
        stamp = _stamp(now or datetime.now(UTC))
        aside = directory / f"aside-{stamp}"
        moved = _move_aside(directory, existing, aside)
        bank_keys = set_bank_aside(f"{settings.learner_name}.aside-{stamp}")
        log.warning(
            "fresh lineage (--reset): the old one is kept aside",
            checkpoints_to=str(aside) if moved else None,
            files_moved=moved,
            bank_to=f"{settings.learner_name}.aside-{stamp}" if bank_keys else None,
            bank_keys=len(bank_keys),
        )
        return
    check_request(settings, request)


def check_request(settings: Settings, request: StartRequest) -> None:
    """Step 2 of the module doc: ``--from`` on a learner with checkpoints needs ``--reset``."""
    directory = settings.checkpoint_dir
    if request.position is not None and not request.reset and list_checkpoints(directory):
        raise ConfigError(
            f"learner {settings.learner_name!r} has checkpoints in {directory}; --from starts "
            "a new lineage, add --reset to keep the old one aside and start over"
        )


def _move_aside(directory: Path, checkpoints: list[Path], aside: Path) -> int:
    files = [*checkpoints]
    ledger = directory / LEDGER_FILE
    if ledger.is_file():
        files.append(ledger)
    if not files:
        return 0
    aside.mkdir(parents=True, exist_ok=False)
    for path in files:
        shutil.move(path, aside / path.name)
    return len(files)


def plan_start(
    settings: Settings,
    ckpt: Checkpoint | None,
    request: StartRequest,
    probe: ProbeFactory,
    now: datetime | None = None,
) -> StartPlan:
    """Steps 3 and 4 of the module doc (``--reset`` has already removed the checkpoint)."""
    topic = settings.kafka.events_topic
    if ckpt is not None:
        if ckpt.offsets:
            with probe() as p:
                beyond = p.beyond_end(ckpt.offsets)
            if beyond:
                raise SupconStreamError(_beyond_message(settings, beyond))
        log.info(
            "resuming at the checkpoint's offsets",
            step=ckpt.step,
            offsets=labelled(ckpt.offsets),
            lineage_from=ckpt.start.get("from"),
        )
        return StartPlan(dict(ckpt.offsets), dict(ckpt.start))
    at = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    position = request.position
    if position is None and request.reset:
        position = parse_position("earliest")
    if position is None:
        return StartPlan({}, {"from": "committed", "at": at})
    with probe() as p:
        offsets = p.resolve(position)
    if not offsets:
        log.warning("--from: the events topic has no partitions yet", topic=topic)
    log.info("starting at --from", position=position.describe(), offsets=labelled(offsets))
    return StartPlan(offsets, {"from": position.describe(), "offsets": labelled(offsets), "at": at})


def _beyond_message(settings: Settings, beyond: dict[TopicPartitionKey, tuple[int, int]]) -> str:
    parts = ", ".join(
        f"{partition_label(key)} at {offset} > end {end}" for key, (offset, end) in beyond.items()
    )
    return (
        f"learner {settings.learner_name!r}: checkpoint offsets lie beyond the end of "
        f"{parts} (the broker lost its log or the topic was recreated); starting would skip "
        "or misplace events. Restart with --reset (and --from) to begin a fresh lineage"
    )
