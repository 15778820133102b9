from __future__ import annotations

import pytest
import torch

from pipeline.exceptions import CheckpointError
from pipeline.learner.checkpoint import Checkpoint, list_checkpoints, load_latest, save_checkpoint


def _ckpt(step: int) -> Checkpoint:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    return Checkpoint(
        step=step,
        model=model.state_dict(),
        optimizer=opt.state_dict(),
        labels=["a", "b"],
        class_task={"a": "0", "b": None},
        offsets={("t", 0): 10 + step, ("t", 1): 5},
        probe={
            "features": torch.zeros(0, 3),
            "labels": torch.zeros(0, dtype=torch.long),
            "ids": [],
        },
        counters={"consumed": 15.0},
    )


def test_round_trip_and_retention(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, _ckpt(step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-000000000004.pt",
        "ckpt-000000000003.pt",
    ]
    restored = load_latest(tmp_path)
    assert restored is not None
    assert restored.step == 4
    assert restored.offsets == {("t", 0): 14, ("t", 1): 5}
    assert restored.class_task == {"a": "0", "b": None}
    assert not list(tmp_path.glob(".*.tmp"))


def test_corrupt_latest_falls_back_to_previous(tmp_path):
    save_checkpoint(tmp_path, _ckpt(1), keep=3)
    newest = save_checkpoint(tmp_path, _ckpt(2), keep=3)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated write
    restored = load_latest(tmp_path)
    assert restored is not None
    assert restored.step == 1


def test_all_corrupt_is_an_error_not_a_silent_fresh_start(tmp_path):
    path = save_checkpoint(tmp_path, _ckpt(1), keep=3)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="could be loaded"):
        load_latest(tmp_path)


def test_empty_directory_means_fresh_start(tmp_path):
    assert load_latest(tmp_path / "none") is None


def test_code_in_a_checkpoint_is_not_executed(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    path = tmp_path / "ckpt-000000000009.pt"
    with path.open("wb") as fh:
        pickle.dump({"format": 1, "x": Boom()}, fh)
    save_checkpoint(tmp_path, _ckpt(1), keep=5)
    restored = load_latest(tmp_path)  # the malicious newest one is refused, not run
    assert restored is not None
    assert restored.step == 1


def test_fallback_is_logged_with_the_file_and_the_error(tmp_path):
    from structlog.testing import capture_logs

    save_checkpoint(tmp_path, _ckpt(1), keep=3)
    newest = save_checkpoint(tmp_path, _ckpt(2), keep=3)
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = b"\x00" * 64  # corrupt, same length
    newest.write_bytes(bytes(raw))
    with capture_logs() as logs:
        restored = load_latest(tmp_path)
    assert restored is not None
    assert restored.step == 1
    fallback = [e for e in logs if e["event"] == "checkpoint unreadable, trying the previous one"]
    assert len(fallback) == 1
    assert fallback[0]["path"] == str(newest)
    assert fallback[0]["error"]


def test_unfinished_write_left_by_a_crash_is_removed_and_ignored(tmp_path):
    save_checkpoint(tmp_path, _ckpt(1), keep=3)
    torn = tmp_path / ".ckpt-000000000002.pt.tmp"
    torn.write_bytes(b"half a checkpoint")
    restored = load_latest(tmp_path)
    assert restored is not None
    assert restored.step == 1
    assert not torn.exists()


def test_calibration_and_metrics_round_trip_and_older_files_load(tmp_path):
    ckpt = _ckpt(1)
    ckpt.temperature = 0.042
    ckpt.metrics = {"ece": 0.1, "per_class_accuracy": {"a": 0.5}}
    save_checkpoint(tmp_path, ckpt, keep=2)
    restored = load_latest(tmp_path)
    assert restored is not None
    assert restored.temperature == 0.042
    assert restored.metrics == ckpt.metrics
    payload = _ckpt(2).to_payload()
    del payload["temperature"], payload["metrics"]  # written before calibration existed
    older = Checkpoint.from_payload(payload)
    assert older.temperature is None
    assert older.metrics == {}


def test_stream_class_means_round_trip_and_older_files_have_none(tmp_path):
    from pipeline.learning.stream_means import StreamClassMeans

    means = StreamClassMeans(max_classes=3, dim=2, sigma=0.3, per_class=2)
    means.running.add(
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
        torch.tensor([0, 2, 0]),
        ["a", "7", None],
    )
    means.follower.load_previous_state({"ids": ["x", "y"], "embeddings": torch.eye(2)}, "cpu")
    ckpt = _ckpt(1)
    ckpt.class_means = means.state_dict()
    save_checkpoint(tmp_path, ckpt, keep=2)  # weights_only loading must accept the payload
    restored = load_latest(tmp_path)
    assert restored is not None
    assert restored.class_means is not None
    again = StreamClassMeans(max_classes=3, dim=2, sigma=0.3, per_class=2)
    again.load_state_dict(restored.class_means)
    assert again.means().labels.tolist() == [0, 0, 2]  # class 0 under task "a" and unnamed
    assert again.running.keys == means.running.keys
    assert torch.equal(again.means().means, means.means().means)
    assert again.follower.previous_state()["ids"] == ["x", "y"]
    payload = _ckpt(2).to_payload()
    del payload["class_means"]  # written before the stream class means
    assert Checkpoint.from_payload(payload).class_means is None
