"""PCR's proxy contrast: softmax over the classes present only; absent proxies are left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.learning.proxy_losses import proxy_contrastive_loss


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_with_every_class_present_it_is_cross_entropy_on_cosines_over_tau() -> None:
    z, w = _unit(6, 4, seed=0), _unit(3, 4, seed=1)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    expected = F.cross_entropy(z @ w.T / 0.1, y)
    torch.testing.assert_close(proxy_contrastive_loss(z, y, w, 0.1), expected)


def test_the_softmax_runs_over_the_classes_present_only() -> None:
    z, w = _unit(4, 5, seed=2), _unit(6, 5, seed=3)
    y = torch.tensor([1, 4, 4, 1])
    cols = torch.tensor([1, 4])
    expected = F.cross_entropy(z @ w[cols].T / 0.2, torch.tensor([0, 1, 1, 0]), reduction="none")
    got = proxy_contrastive_loss(z, y, w, 0.2, reduction="none")
    torch.testing.assert_close(got, expected)


def test_absent_proxies_get_no_gradient() -> None:
    z = _unit(4, 5, seed=4)
    w = _unit(6, 5, seed=5).requires_grad_()
    proxy_contrastive_loss(z, torch.tensor([0, 2, 2, 0]), w).backward()
    assert w.grad is not None
    assert bool((w.grad[[1, 3, 4, 5]] == 0).all())
    assert bool((w.grad[[0, 2]] != 0).any())


def test_one_class_present_gives_zero_loss_and_bad_shapes_are_refused() -> None:
    z, w = _unit(3, 4, seed=6), _unit(5, 4, seed=7)
    loss = proxy_contrastive_loss(z, torch.tensor([2, 2, 2]), w)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="proxies"):
        proxy_contrastive_loss(z, torch.tensor([0, 1, 2]), w[:, :3])
    with pytest.raises(ValueError, match="labels"):
        proxy_contrastive_loss(z, torch.tensor([0, 1]), w)


def test_relation_distillation_is_minimal_when_the_student_keeps_the_teachers_relations() -> None:
    from pipeline.learning.losses import relation_distillation_loss

    z = _unit(8, 6, seed=8)
    same = relation_distillation_loss(z, z)
    moved = relation_distillation_loss(_unit(8, 6, seed=9), z)
    assert float(moved) > float(same)
    # By hand for item 0: -Σ_j p_teacher(j) log p_student(j) over j ≠ 0.
    sims = z @ z.T
    p_t = torch.softmax(sims[0, 1:] / 0.01, dim=0)
    log_p_s = torch.log_softmax(sims[0, 1:] / 0.2, dim=0)
    per_item = relation_distillation_loss(z, z, reduction="none")
    torch.testing.assert_close(per_item[0], -(p_t * log_p_s).sum())


def test_relation_distillation_sends_no_gradient_to_the_teacher() -> None:
    from pipeline.learning.losses import relation_distillation_loss

    student = _unit(5, 4, seed=10).requires_grad_()
    teacher = _unit(5, 4, seed=11).requires_grad_()
    relation_distillation_loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()


def test_ace_batch_rows_softmax_over_the_batch_classes_replay_rows_over_the_seen() -> None:
    from pipeline.learning.losses import asymmetric_cross_entropy_loss

    g = torch.Generator().manual_seed(12)
    logits = torch.randn(5, 6, generator=g)
    y = torch.tensor([3, 4, 3, 0, 1])
    incoming = torch.tensor([True, True, True, False, False])
    seen = torch.tensor([True, True, True, True, True, False])
    got = asymmetric_cross_entropy_loss(logits, y, incoming, seen, reduction="none")
    # By hand: rows 0-2 over the batch's classes {3, 4}; rows 3-4 over the seen {0, ..., 4}.
    batch_cols, seen_cols = torch.tensor([3, 4]), torch.arange(5)
    expected_batch = F.cross_entropy(
        logits[:3, batch_cols], torch.tensor([0, 1, 0]), reduction="none"
    )
    expected_replay = F.cross_entropy(logits[3:, seen_cols], y[3:], reduction="none")
    torch.testing.assert_close(got, torch.cat([expected_batch, expected_replay]))
    torch.testing.assert_close(asymmetric_cross_entropy_loss(logits, y, incoming, seen), got.mean())


def test_ace_is_plain_cross_entropy_when_every_row_is_incoming_and_every_class_present() -> None:
    from pipeline.learning.losses import asymmetric_cross_entropy_loss

    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(13))
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    got = asymmetric_cross_entropy_loss(logits, y, torch.ones(6, dtype=torch.bool))
    torch.testing.assert_close(got, F.cross_entropy(logits, y))


def test_ace_batch_rows_leave_absent_classes_alone_and_bad_shapes_are_refused() -> None:
    from pipeline.learning.losses import asymmetric_cross_entropy_loss

    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(14)).requires_grad_()
    incoming = torch.ones(3, dtype=torch.bool)
    asymmetric_cross_entropy_loss(logits, torch.tensor([1, 2, 1]), incoming).backward()
    assert logits.grad is not None
    assert bool((logits.grad[:, [0, 3]] == 0).all())  # old classes: not pushed down by new data
    assert bool((logits.grad[:, [1, 2]] != 0).all())
    with pytest.raises(ValueError, match="incoming"):
        asymmetric_cross_entropy_loss(logits, torch.tensor([1, 2, 1]), incoming[:2])
