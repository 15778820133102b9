"""Start decisions of a learner (pipeline/learner/start.py) with a fake offset probe."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from consumers.positions import parse_position
from pipeline.config import load_settings
from pipeline.exceptions import ConfigError, SupconStreamError
from pipeline.learner.checkpoint import Checkpoint
from pipeline.learner.start import StartRequest, plan_start, prepare_lineage

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class FakeProbe:
    def __init__(self, ends: dict[int, int], at_time: dict[int, int] | None = None) -> None:
        self.ends = ends
        self.at_time = at_time or {}
        self.topic = "p.events"

    def __enter__(self) -> FakeProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def resolve(self, position: Any) -> dict[tuple[str, int], int]:
        per = {"earliest": dict.fromkeys(self.ends, 0), "latest": self.ends}.get(
            position.kind, self.at_time
        )
        return {(self.topic, p): o for p, o in per.items()}

    def beyond_end(self, offsets: dict[tuple[str, int], int]) -> dict:
        return {
            k: (o, self.ends.get(k[1], 0)) for k, o in offsets.items() if o > self.ends.get(k[1], 0)
        }


def _settings(tmp_path):
    return load_settings(None, [f"checkpoint.dir={tmp_path}", "kafka.topic_prefix=p"], environ={})


def _ckpt(offsets: dict[tuple[str, int], int]) -> Checkpoint:
    return Checkpoint(1, {}, {}, [], {}, offsets, {}, start={"from": "earliest"})


def test_checkpoint_offsets_are_the_start_and_keep_the_lineage(tmp_path):
    plan = plan_start(
        _settings(tmp_path), _ckpt({("p.events", 0): 5}), StartRequest(), lambda: FakeProbe({0: 9})
    )
    assert plan.offsets == {("p.events", 0): 5}
    assert plan.start == {"from": "earliest"}


def test_checkpoint_beyond_the_end_names_the_partitions(tmp_path):
    ckpt = _ckpt({("p.events", 0): 5, ("p.events", 1): 50, ("p.events", 2): 1})
    with pytest.raises(SupconStreamError) as err:
        plan_start(_settings(tmp_path), ckpt, StartRequest(), lambda: FakeProbe({0: 9, 1: 3}))
    assert "p.events:1 at 50 > end 3" in str(err.value)
    assert "p.events:2 at 1 > end 0" in str(err.value)
    assert "p.events:0" not in str(err.value)


def test_without_checkpoint_from_resolves_and_reset_defaults_to_earliest(tmp_path):
    s = _settings(tmp_path)
    probe = lambda: FakeProbe({0: 9, 1: 4}, at_time={0: 7, 1: 4})  # noqa: E731
    plan = plan_start(s, None, StartRequest(parse_position("1767323045000")), probe, NOW)
    assert plan.offsets == {("p.events", 0): 7, ("p.events", 1): 4}
    assert plan.start["from"].startswith("2026-01-02T03:04:05")
    reset = plan_start(s, None, StartRequest(reset=True), probe, NOW)
    assert reset.offsets == {("p.events", 0): 0, ("p.events", 1): 0}
    plain = plan_start(s, None, StartRequest(), probe, NOW)
    assert plain.offsets == {}
    assert plain.start["from"] == "committed"


def test_from_on_a_learner_with_checkpoints_needs_reset(tmp_path):
    s = _settings(tmp_path)
    s.checkpoint_dir.mkdir(parents=True)
    (s.checkpoint_dir / "ckpt-000000000010.pt").write_bytes(b"x")
    (s.checkpoint_dir / "ledger.jsonl").write_bytes(b"")
    with pytest.raises(ConfigError, match="--reset"):
        prepare_lineage(s, StartRequest(parse_position("earliest")), lambda name: [])
    renamed: list[str] = []
    prepare_lineage(s, StartRequest(reset=True), lambda name: renamed.append(name) or [], NOW)
    aside = s.checkpoint_dir / "aside-20260102T030405Z"
    assert sorted(p.name for p in aside.iterdir()) == ["ckpt-000000000010.pt", "ledger.jsonl"]
    assert not list(s.checkpoint_dir.glob("ckpt-*.pt"))
    assert renamed == [f"{s.learner_name}.aside-20260102T030405Z"]
