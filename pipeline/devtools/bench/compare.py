"""``supcon-stream compare SOURCE``: the objectives side by side on a user's own labeled history.

SOURCE is ``split-digits`` (then this is the forgetting benchmark, same defaults, same table),
another built-in scenario (``domain-digits``, ``blurry-digits``, ``gaussian-drift``), a
labeled file (JSONL, CSV, NPZ, Parquet; :func:`pipeline.streams.files.load_labeled_file`) or
a ``topic:NAME`` slice (``--from`` / ``--until``, as ``replay``). The protocol is the one of
:mod:`pipeline.devtools.bench.forgetting`: a stratified hold-out of ``TEST_FRACTION`` per class
(seeded) is the test set; the rest streams once **in its recorded order**, in micro-batches of
10, each learned with :func:`pipeline.learning.batch.learn_batch`, the learner's own function.
Input dimension and classes come from the data. A ``task`` field cuts the stream into task
segments (forgetting is then per task, as in the benchmark); without one, forgetting is the
mean over classes of best − final accuracy.

Methods: CE fine-tune, CE + replay, SupCon + bank (and any of the benchmark's others through
``--methods``), plus ``loss_terms`` when ``train.loss_terms`` is set (``-c`` or ``--set``): the
SupCon + bank run with those weighted terms.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from pipeline.devtools.bench.forgetting import (
    TEST_FRACTION,
    BenchConfig,
    Method,
    RunResult,
    Split,
)
from pipeline.exceptions import ConfigError

COMPARE_METHODS = ("ce_finetune", "ce_er", "supcon")
COMPARE_MEMORIES = (100, 500)
COMPARE_SEEDS = 2
EVALUATIONS_PER_RUN = 60
TOPIC_SOURCE = "topic:"


@dataclass(frozen=True)
class LabeledStream:
    """Labeled events in stream order."""

    name: str
    x: np.ndarray  # float32 [n, dim]
    labels: list[str]
    tasks: list[str] | None
    skipped: Mapping[str, int]  # events left out, by reason (unlabeled, dead-letter reasons)


def load_file_stream(path: Path) -> LabeledStream:
    from pipeline.streams.files import load_labeled_file

    scenario = load_labeled_file(path)
    rows, labels, tasks = [], [], []
    for event in scenario:
        rows.append(event["features"])
        labels.append(str(event["label"]))
        tasks.append(str(event["task"]) if "task" in event else None)
    has_tasks = any(t is not None for t in tasks)
    x = np.asarray(rows, dtype=np.float32)
    task_list = [str(t) for t in tasks] if has_tasks else None
    return LabeledStream(path.name, x, labels, task_list, {})


def load_scenario_stream(name: str, seed: int = 0) -> LabeledStream:
    """A built-in scenario other than split-digits (``domain-digits``, ``blurry-digits``,
    ``gaussian-drift``), generated with ``seed``, in its stream order."""
    from pipeline.streams.scenarios import get_scenario

    rows, labels, tasks = [], [], []
    for event in get_scenario(name, seed):
        rows.append(event["features"])
        labels.append(str(event["label"]))
        tasks.append(str(event["task"]))
    return LabeledStream(name, np.asarray(rows, dtype=np.float32), labels, tasks, {})


def load_topic_stream(
    client_options: dict[str, Any], topic: str, start: str | None, until: str | None
) -> LabeledStream:
    """The labeled events of a topic slice, validated by the learner's own decoder."""
    import orjson

    from consumers.decode import decode_batch
    from consumers.events import SourceRecord
    from consumers.positions import OffsetProbe, parse_position
    from consumers.slice import read_slice, resolve_slice

    try:
        first = parse_position(start or "earliest")
        last = parse_position(until) if until else None
    except ValueError as exc:
        raise ConfigError(f"compare: {exc}") from None
    with OffsetProbe(client_options, topic) as probe:
        if not probe.partitions():
            raise ConfigError(f"compare: topic {topic!r} does not exist")
        bounds = resolve_slice(probe, first, last)
    records = [
        SourceRecord(topic, r.partition, r.offset, r.value, r.timestamp_ms)
        for r in read_slice(client_options, bounds)
    ]
    dim = _first_dimension(records, orjson.loads)
    batch = decode_batch(records, dim, max_event_bytes=1 << 24)
    skipped: dict[str, int] = {}
    for dl in batch.dead_letters:
        skipped[dl.reason] = skipped.get(dl.reason, 0) + 1
    keep = [i for i, label in enumerate(batch.labels) if label is not None]
    if len(keep) < len(batch):
        skipped["unlabeled"] = len(batch) - len(keep)
    tasks = [batch.tasks[i] for i in keep]
    return LabeledStream(
        f"{TOPIC_SOURCE}{topic}",
        batch.features[keep],
        [str(batch.labels[i]) for i in keep],
        [str(t) for t in tasks] if any(t is not None for t in tasks) else None,
        skipped,
    )


def _first_dimension(records: list[Any], loads: Any) -> int:
    for record in records:
        try:
            doc = loads(record.value)
        except Exception:  # noqa: BLE001, S112 - a malformed record is the decoder's to reject
            continue
        if isinstance(doc, dict) and isinstance(doc.get("features"), list) and doc["features"]:
            return len(doc["features"])
    raise ConfigError("compare: the topic slice holds no event with a features list")


def make_split(stream: LabeledStream, seed: int) -> Split:
    """Stratified hold-out per class (seeded); the rest in stream order, cut at task changes."""
    classes = list(dict.fromkeys(stream.labels))
    index = {name: i for i, name in enumerate(classes)}
    y = np.asarray([index[label] for label in stream.labels], dtype=np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for cls in range(len(classes)):
        rows = np.flatnonzero(y == cls)
        if len(rows) >= 2:  # a class seen once is only trained on
            test[rng.choice(rows, max(1, round(TEST_FRACTION * len(rows))), replace=False)] = True
    train_rows = np.flatnonzero(~test)
    tasks = stream.tasks or ["0"] * len(y)
    segments: list[np.ndarray] = []
    task_names: list[str] = []
    start = 0
    for i in range(1, len(train_rows) + 1):
        if i == len(train_rows) or tasks[train_rows[i]] != tasks[train_rows[start]]:
            segments.append(np.arange(start, i))
            task_names.append(tasks[train_rows[start]])
            start = i
    class_task: dict[str, str] = {}
    for row in range(len(y)):
        class_task.setdefault(str(int(y[row])), tasks[row])
    return Split(
        train_x=stream.x[train_rows],
        train_y=y[train_rows],
        test_x=torch.from_numpy(stream.x[test]),
        test_y=torch.from_numpy(y[test]),
        input_dim=int(stream.x.shape[1]),
        class_names=tuple(classes),
        class_task=class_task,
        task_names=tuple(task_names),
        segments=tuple(segments),
    )


def check_stream(stream: LabeledStream) -> None:
    """One clear error for a stream nothing can be compared on."""
    classes = set(stream.labels)
    if len(stream.labels) < 20 or len(classes) < 2:
        raise ConfigError(
            f"compare: {stream.name} holds {len(stream.labels)} labeled events of "
            f"{len(classes)} classes; it needs at least 20 events of 2 classes"
        )
    if not np.isfinite(stream.x).all():
        raise ConfigError(f"compare: {stream.name} has non-finite feature values")


def loss_terms_method(loss_terms: Mapping[str, float]) -> Method:
    """The ``loss_terms`` preset as a method: SupCon + bank, with those weighted terms."""
    terms = ", ".join(f"{k} {v:g}" for k, v in loss_terms.items())
    return Method(
        "loss_terms",
        f"SupCon + bank, terms {terms}",
        {"objective": "supcon", "loss_terms": loss_terms},
    )


def eval_every(split: Split, stream_batch: int) -> int:
    """Batches between evaluations: about :data:`EVALUATIONS_PER_RUN` per run, at least 2."""
    batches = math.ceil(len(split.train_y) / stream_batch)
    return max(2, math.ceil(batches / EVALUATIONS_PER_RUN))


class ProgressBar:
    """``compare [#####-----] 7/15 runs, 41 s, about 47 s left`` on stderr.

    Redrawn in place on a terminal; one line per finished run otherwise (logs, CI).
    """

    def __init__(self, total: int, out: TextIO | None = None, width: int = 24) -> None:
        self.total = max(1, total)
        self.done = 0
        self.out = out or sys.stderr
        self.width = width
        self.started = time.monotonic()

    def update(self, result: RunResult) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        left = elapsed / self.done * (self.total - self.done)
        filled = round(self.width * self.done / self.total)
        line = (
            f"compare [{'#' * filled}{'-' * (self.width - filled)}] {self.done}/{self.total} "
            f"runs, {elapsed:.0f} s, about {left:.0f} s left "
            f"(last: {result.method} memory {result.memory} seed {result.seed}, "
            f"accuracy {result.final_accuracy:.3f})"
        )
        tty = self.out.isatty()
        self.out.write(("\r" + line + "\033[K") if tty else line + "\n")
        if tty and self.done == self.total:
            self.out.write("\n")
        self.out.flush()


def count_runs(cfg: BenchConfig) -> int:
    per_seed = 0
    memory_free = {"ce_finetune", "joint", "joint_supcon"}
    for name in cfg.methods:
        per_seed += 1 if name in memory_free else len(cfg.memories)
    return per_seed * cfg.seeds
