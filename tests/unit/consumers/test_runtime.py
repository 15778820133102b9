"""tune_gc raises the young generation's threshold and never lowers one."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from consumers.runtime import GEN0_THRESHOLD, tune_gc


@pytest.fixture(autouse=True)
def _restore_thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_raises_the_young_generation_and_keeps_the_older_ratios() -> None:
    gc.set_threshold(700, 10, 10)
    tune_gc()
    assert gc.get_threshold() == (GEN0_THRESHOLD, 10, 10)


@pytest.mark.parametrize("threshold", [0, GEN0_THRESHOLD * 2])
def test_leaves_a_switched_off_or_higher_threshold_alone(threshold: int) -> None:
    gc.set_threshold(threshold, 5, 5)
    tune_gc()
    assert gc.get_threshold() == (threshold, 5, 5)
