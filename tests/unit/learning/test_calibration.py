"""Temperature scaling: recovers a known temperature, lowers ECE, refuses too little data."""

from __future__ import annotations

import torch

from pipeline.learning.calibration import MIN_EXAMPLES, fit_temperature, targets_in
from pipeline.quality import expected_calibration_error


def _sampled(true_t: float, n: int = 4000, k: int = 5, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    cosines = torch.rand(n, k, generator=g) * 2 - 1
    probs = torch.softmax(cosines / true_t, dim=1)
    targets = torch.multinomial(probs, 1, generator=g).squeeze(1)
    return cosines, targets


def test_recovers_the_temperature_the_labels_were_drawn_with() -> None:
    cosines, targets = _sampled(true_t=0.3)
    fit = fit_temperature(cosines, targets, start=0.1)
    assert fit is not None
    assert abs(fit.temperature - 0.3) < 0.03
    assert fit.nll_after < fit.nll_before
    assert fit.examples == 4000


def test_calibrated_confidences_have_a_lower_ece() -> None:
    cosines, targets = _sampled(true_t=0.4, seed=1)

    def ece(t: float) -> float:
        conf, pred = torch.softmax(cosines / t, dim=1).max(dim=1)
        value = expected_calibration_error(conf.tolist(), (pred == targets).tolist())
        assert value is not None
        return value

    fit = fit_temperature(cosines, targets, start=0.1)
    assert fit is not None
    assert ece(fit.temperature) < 0.03 < ece(0.1)


def test_too_few_examples_or_one_class_fit_nothing() -> None:
    cosines, targets = _sampled(true_t=0.3, n=MIN_EXAMPLES - 1)
    assert fit_temperature(cosines, targets, start=0.1) is None
    assert fit_temperature(torch.zeros(50, 1), torch.zeros(50, dtype=torch.long), 0.1) is None


def test_targets_in_maps_truth_to_mean_columns_and_drops_unknown_classes() -> None:
    keep, columns = targets_in(torch.tensor([4, 2, 7]), torch.tensor([2, 9, 7, 4]))
    assert keep.tolist() == [True, False, True, True]
    assert columns.tolist() == [1, 2, 0]
