"""Checkpointer: the step/time schedule (an injected clock, no sleeps) and the commit order."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import pipeline.learner.checkpointer as checkpointer_module
from consumers.exceptions import ProducerError
from pipeline.learner.checkpoint import list_checkpoints, load_latest
from pipeline.learner.checkpointer import Checkpointer
from pipeline.learner.context import Counters
from pipeline.learner.probes import ProbeSet
from pipeline.learning.labels import LabelRegistry


def _checkpointer(tmp_path: Path, step: int = 0, now: float = 100.0) -> Checkpointer:
    return Checkpointer(tmp_path, keep=2, every_steps=10, every_seconds=30.0, step=step, now=now)


def test_due_after_every_steps_or_every_seconds(tmp_path):
    c = _checkpointer(tmp_path, step=0, now=100.0)
    assert not c.due(0, 100.0)
    assert not c.due(9, 129.9)
    assert c.due(10, 100.0)  # steps alone
    assert c.due(0, 130.0)  # time alone


def test_schedule_from_restarts_both_counts(tmp_path):
    c = _checkpointer(tmp_path, step=0, now=100.0)
    c.schedule_from(50, 500.0)
    assert not c.due(59, 529.9)
    assert c.due(60, 529.9)
    assert c.due(59, 530.0)


def test_cover_never_moves_offsets_back_and_restore_replaces_them(tmp_path):
    c = _checkpointer(tmp_path)
    c.cover({("t", 0): 10})
    c.cover({("t", 0): 5, ("t", 1): 3})
    assert c.offsets == {("t", 0): 10, ("t", 1): 3}
    c.restore({("t", 2): 7})
    assert c.offsets == {("t", 2): 7}


class _Recorder:
    """Fake bank, producer, ledger, health board and source writing to one call log."""

    def __init__(
        self,
        directory: Path,
        calls: list[str],
        producer_error: bool = False,
        sync_ok: bool = True,
    ):
        self.calls = calls
        self.directory = directory
        self.producer_error = producer_error
        self.sync_ok = sync_ok
        self.committed: list[dict[tuple[str, int], int]] = []

    def flush_bank(self) -> None:
        self.calls.append("bank flush")

    def flush_producer(self) -> None:
        self.calls.append("producer flush")
        if self.producer_error:
            raise ProducerError("broker unreachable")

    def sync_ledger(self) -> None:
        self.calls.append("ledger sync")

    def health_progress(self, **fields: Any) -> None:
        self.calls.append("health progress")

    def export(self, ctx: Any, offsets: dict[tuple[str, int], int]) -> None:
        # A bundle never covers more than a durable checkpoint.
        assert list_checkpoints(self.directory)
        self.calls.append(f"export {dict(offsets)}")

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        # The checkpoint covering these offsets must already be on disk.
        assert list_checkpoints(self.directory)
        self.calls.append("commit offsets")
        self.committed.append(offsets)

    def commit_sync(self, offsets: dict[tuple[str, int], int], timeout_s: float) -> bool:
        assert list_checkpoints(self.directory)
        self.calls.append("commit offsets (sync)")
        self.committed.append(offsets)
        return self.sync_ok


def _context(rec: _Recorder, step: int = 7) -> SimpleNamespace:
    model = torch.nn.Linear(3, 2)
    registry = LabelRegistry(5, ["a", "b"])
    registry.note_task("a", "t0")
    return SimpleNamespace(
        bank=SimpleNamespace(flush=rec.flush_bank),
        producer=SimpleNamespace(flush=rec.flush_producer),
        ledger=SimpleNamespace(sync=rec.sync_ledger),
        health=SimpleNamespace(progress=rec.health_progress),
        exposition=None,
        source=SimpleNamespace(commit=rec.commit, commit_sync=rec.commit_sync),
        state=SimpleNamespace(
            step=step,
            skipped=2,
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ),
        registry=registry,
        probes=ProbeSet(per_class=2, input_dim=3, device=torch.device("cpu")),
        counters=Counters(consumed=40, trained=30),
        temperature=0.042,
        last_metrics={"ece": 0.1},
        stream_means=None,
        exporter=SimpleNamespace(after_checkpoint=rec.export),
    )


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """One call log for the fakes and for save_checkpoint (the real one, recorded)."""
    log: list[str] = []
    real = checkpointer_module.save_checkpoint

    def recording_save(directory, ckpt, keep):
        path = real(directory, ckpt, keep)
        log.append(f"save checkpoint {ckpt.step}")
        return path

    monkeypatch.setattr(checkpointer_module, "save_checkpoint", recording_save)
    return log


def test_commit_runs_its_steps_in_order(tmp_path, calls):
    rec = _Recorder(tmp_path, calls)
    c = _checkpointer(tmp_path)
    c.cover({("t", 0): 12, ("t", 1): 4})
    path = c.commit(_context(rec), now=200.0)
    assert rec.calls == [
        "bank flush",
        "producer flush",
        "ledger sync",
        "save checkpoint 7",
        "health progress",
        "export {('t', 0): 12, ('t', 1): 4}",
        "commit offsets",
    ]
    assert path == list_checkpoints(tmp_path)[0]
    assert rec.committed == [{("t", 0): 12, ("t", 1): 4}]
    restored = load_latest(tmp_path)
    assert restored is not None
    assert restored.step == 7
    assert restored.offsets == {("t", 0): 12, ("t", 1): 4}
    assert restored.labels == ["a", "b"]
    assert restored.class_task == {"a": "t0", "b": None}
    assert restored.counters["consumed"] == 40.0
    assert restored.counters["skipped"] == 2.0
    assert restored.temperature == 0.042
    assert restored.metrics == {"ece": 0.1}


def test_commit_restarts_the_schedule(tmp_path, calls):
    c = _checkpointer(tmp_path, step=0, now=100.0)
    c.commit(_context(_Recorder(tmp_path, calls), step=15), now=140.0)
    assert not c.due(24, 169.9)
    assert c.due(25, 140.0)
    assert c.due(15, 170.0)


def test_unflushable_producer_defers_checkpoint_and_commit(tmp_path, calls):
    rec = _Recorder(tmp_path, calls, producer_error=True)
    c = _checkpointer(tmp_path, step=0, now=100.0)
    c.cover({("t", 0): 12})
    assert c.commit(_context(rec, step=15), now=140.0) is None
    assert calls == ["bank flush", "producer flush"]
    assert list_checkpoints(tmp_path) == []
    assert rec.committed == []
    # The attempt counts: the next one is due a full interval later, as before the split.
    assert not c.due(15, 140.0)
    assert c.due(25, 140.0)


def test_nothing_to_commit_still_saves(tmp_path, calls):
    rec = _Recorder(tmp_path, calls)
    c = _checkpointer(tmp_path)
    assert c.commit(_context(rec)) is not None
    assert calls[-3:] == ["save checkpoint 7", "health progress", "export {}"]
    assert rec.committed == []


@pytest.mark.parametrize("sync_ok", [True, False])
def test_final_commit_waits_for_the_broker(tmp_path, calls, sync_ok):
    rec = _Recorder(tmp_path, calls, sync_ok=sync_ok)
    c = _checkpointer(tmp_path)
    c.cover({("t", 0): 3})
    assert c.commit(_context(rec), wait=True) is not None
    assert calls[-1] == "commit offsets (sync)"
    assert "commit offsets" not in calls
    assert rec.committed == [{("t", 0): 3}]
