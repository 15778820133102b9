"""Hot reload decisions of the serving loop (pure logic; the loader reads real bundles)."""

from __future__ import annotations

from pathlib import Path

import pytest
from serving_helpers import CONFIG, publish_model

from pipeline.exceptions import SupconStreamError
from pipeline.serving.announce import Announcement, parse_announcement
from pipeline.serving.bundle import WEIGHTS
from pipeline.serving.predictor import Predictor
from pipeline.serving.serve import ModelSlot


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return tmp_path / "models"


def _slot(registry: Path) -> ModelSlot:
    first, *_ = publish_model(registry, seed=0)
    return ModelSlot(registry, Predictor.load(first.path))


def test_switches_to_an_announced_newer_version(registry: Path) -> None:
    slot = _slot(registry)
    second, *_ = publish_model(registry, seed=1)
    assert not slot.switch_if_announced()  # nothing announced yet
    slot.offer(Announcement("unit", 2, second.digest))
    assert slot.switch_if_announced()
    assert slot.version == 2
    assert slot.switches == 1


def test_older_or_equal_versions_are_ignored(registry: Path) -> None:
    slot = _slot(registry)
    slot.offer(Announcement("unit", 1, "sha256:whatever"))
    assert not slot.switch_if_announced()
    assert slot.rejected == []


def test_a_corrupt_bundle_is_rejected_once_and_the_version_kept(
    registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    slot = _slot(registry)
    bad, *_ = publish_model(registry, seed=1)
    (bad.path / WEIGHTS).write_bytes(b"not safetensors")
    slot.offer(Announcement("unit", 2, bad.digest))
    assert not slot.switch_if_announced()
    assert slot.version == 1
    assert slot.rejected == [2]
    slot.offer(Announcement("unit", 2, bad.digest))  # re-read announcement: not retried
    assert not slot.switch_if_announced()
    assert slot.rejected == [2]


def test_a_missing_bundle_or_another_digest_is_rejected(registry: Path) -> None:
    slot = _slot(registry)
    slot.offer(Announcement("unit", 5, "sha256:x"))
    assert not slot.switch_if_announced()
    assert slot.rejected == [5]
    other, *_ = publish_model(registry, seed=2)
    slot.offer(Announcement("unit", other.version, "sha256:not-the-one"))
    assert not slot.switch_if_announced()
    assert slot.version == 1


def test_an_incompatible_input_dim_is_rejected(registry: Path) -> None:
    slot = _slot(registry)
    wider = CONFIG.model_copy(update={"input_dim": 9})
    new, *_ = publish_model(registry, seed=1, config=wider)
    slot.offer(Announcement("unit", new.version, new.digest))
    assert not slot.switch_if_announced()
    assert slot.version == 1
    assert slot.rejected == [new.version]


def test_parse_announcement_accepts_only_well_formed_payloads() -> None:
    good = {"learner": "a", "version": 3, "digest": "sha256:1", "step": 9}
    assert parse_announcement(good) == Announcement("a", 3, "sha256:1", 9)
    assert parse_announcement({**good, "version": "3"}) is None
    assert parse_announcement({**good, "version": True}) is None
    assert parse_announcement([good]) is None


def test_a_bundle_folder_pins_its_version_and_a_registry_serves_the_newest(
    registry: Path,
) -> None:
    import threading

    from pipeline.serving.serve import pinned, wait_for_model

    first, *_ = publish_model(registry, seed=0)
    publish_model(registry, seed=1)
    stop = threading.Event()
    assert wait_for_model(registry, 0.0, stop).version == 2
    assert not pinned(registry)
    assert wait_for_model(first.path, 0.0, stop).version == 1
    assert pinned(first.path)
    with pytest.raises(SupconStreamError, match="no loadable model bundle"):
        wait_for_model(registry.parent / "empty", 0.0, stop)
