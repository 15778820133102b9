"""The shared within-class scatter of the stream means and the discriminant read through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.learning.discriminant import (
    WithinClassScatter,
    discriminant,
    saved_covariance,
    shrunk,
)
from pipeline.learning.inference import NCM_TEMPERATURE, class_cosines
from pipeline.learning.stream_means import TaskClassMeans


def direct_scatter(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The scatter of ``x`` about each row's mean, computed in one go."""
    out = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for r in torch.unique(rows).tolist():
        centred = x[rows == r].double() - x[rows == r].double().mean(dim=0)
        out += centred.T @ centred
    return out


def test_the_pooled_scatter_of_batches_is_the_scatter_of_all_events_about_their_means():
    g = torch.Generator().manual_seed(0)
    x, rows = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    means, counts = torch.zeros(3, 5), torch.zeros(3, dtype=torch.long)
    scatter = WithinClassScatter(5)
    for start in (0, 7, 8, 23):  # batches of 7, 1, 15 and 17 events
        end = {0: 7, 7: 8, 8: 23, 23: 40}[start]
        xb, rb = x[start:end], rows[start:end]
        scatter.add(xb, rb, means, counts)
        for r in torch.unique(rb).tolist():  # the rows' running means, as fold_into keeps them
            n, m = int(counts[r]), int((rb == r).sum())
            means[r] = (means[r] * n + xb[rb == r].sum(dim=0)) / (n + m)
            counts[r] += m
    assert torch.allclose(scatter.scatter, direct_scatter(x, rows), atol=1e-9)
    assert float(scatter.count) == 40


def test_two_rows_merged_keep_the_scatter_about_the_merged_mean():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g) + 2
    scatter = WithinClassScatter(4)
    scatter.scatter = direct_scatter(torch.cat([a, b]), torch.tensor([0] * 6 + [1] * 9))
    scatter.merge(a.mean(dim=0), 6.0, b.mean(dim=0), 9.0)
    assert torch.allclose(scatter.scatter, direct_scatter(torch.cat([a, b]), torch.zeros(15)))


def test_the_scatter_follows_a_linear_change_of_the_encoder():
    """Items spanning the space, moved by a linear map ``A``: the carried scatter is the scatter
    of the moved events, ``A^T S A`` (up to the ridge); a change no item measures keeps it."""
    g = torch.Generator().manual_seed(2)
    events, rows = torch.randn(50, 6, generator=g), torch.randint(0, 2, (50,), generator=g)
    lift = torch.eye(6) + 0.2 * torch.randn(6, 6, generator=g)
    scatter = WithinClassScatter(6)
    scatter.scatter = direct_scatter(events, rows)
    items = torch.randn(200, 6, generator=g)
    scatter.carry(items, items @ lift)
    assert torch.allclose(scatter.scatter, direct_scatter(events @ lift, rows), rtol=1e-3)
    before = scatter.scatter.clone()
    scatter.carry(torch.empty(0, 6), torch.empty(0, 6))
    scatter.carry(items, items)
    assert torch.allclose(scatter.scatter, before)


def test_the_discriminant_is_the_gaussian_posterior_at_ncms_temperature():
    means = torch.tensor([[0.0, 0.0], [1.0, 0.5]])
    cov = torch.tensor([[0.5, 0.1], [0.1, 0.2]], dtype=torch.float64)
    read = discriminant(torch.tensor([3, 7]), means, cov, 0.0)
    e = torch.tensor([[0.3, 0.1], [0.9, 0.6]])
    posterior = torch.softmax(read.scores(e) / NCM_TEMPERATURE, dim=1)
    gaussians = torch.distributions.MultivariateNormal(means.double(), cov)
    expected = torch.softmax(gaussians.log_prob(e.double()[:, None, :]), dim=1)
    assert torch.allclose(posterior.double(), expected, atol=1e-5)
    assert read.labels.tolist() == [3, 7]


def test_a_class_that_varies_along_one_direction_is_read_by_it_where_the_cosine_errs():
    """The classes vary along y and hardly along x: a point at 25 degrees, between class 0's
    mean at 0 and class 1's at 40, is nearer class 1's by cosine, but class 0's along x, the
    direction the discriminant trusts."""
    means = torch.tensor([[1.0, 0.0], [0.766, 0.643]])
    cov = torch.tensor([[0.002, 0.0], [0.0, 0.2]], dtype=torch.float64)
    e = F.normalize(torch.tensor([[0.906, 0.423]]), dim=-1)
    read = discriminant(torch.tensor([0, 1]), means, cov, 0.0)
    assert int(read.scores(e).argmax()) == 0
    assert int((e @ F.normalize(means, dim=-1).T).argmax()) == 1


def test_full_shrinkage_is_the_nearest_mean_and_no_spread_yet_the_identity():
    cov = torch.diag(torch.tensor([0.4, 0.1, 0.1], dtype=torch.float64))
    assert torch.allclose(shrunk(cov, 1.0), torch.eye(3, dtype=torch.float64) * 0.2)
    assert torch.equal(shrunk(torch.zeros(3, 3, dtype=torch.float64), 0.5), torch.eye(3) * 0.5)
    means = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    e = torch.tensor([[0.1, 0.3, 0.9], [0.2, 0.8, 0.1]])
    read = discriminant(torch.tensor([0, 1]), means, cov, 1.0)
    assert read.scores(e).argmax(dim=1).tolist() == torch.cdist(e, means).argmin(dim=1).tolist()
    empty = discriminant(torch.empty(0, dtype=torch.long), torch.empty(0, 3), cov, 0.5)
    assert len(empty) == 0


def test_a_class_of_several_rows_scores_by_its_best_row_however_low():
    read = discriminant(
        torch.tensor([0, 0, 1]),
        torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]]),
        torch.eye(2, dtype=torch.float64) * 0.01,
        0.0,
    )
    scores = read.scores(torch.tensor([[-1.0, 0.0]]))
    assert scores.min() < -100  # far below any cosine
    per_class = class_cosines(scores, read)
    assert per_class.shape == (1, 2)
    assert per_class[0, 0] == scores[0, :2].max()


def test_task_means_with_a_shrinkage_read_through_their_scatter_and_keep_it_in_their_state():
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(30, 4, generator=g), dim=-1)
    y = torch.randint(0, 3, (30,), generator=g)
    means = TaskClassMeans(max_classes=3, dim=4, sigma=0.5, shrinkage=0.3)
    means.add(x[:12], y[:12])
    means.add(x[12:], y[12:])
    assert means.scatter is not None
    assert torch.allclose(means.scatter.scatter, direct_scatter(x, y), atol=1e-6)
    read = means.class_means()
    assert read.bias is not None
    assert read.labels.tolist() == torch.unique(y).tolist()
    assert means.cosine_means().bias is None
    assert "scatter" in means.tensors()

    state = means.state_dict()
    assert torch.allclose(saved_covariance(state["scatter"]), means.scatter.covariance())
    again = TaskClassMeans(max_classes=3, dim=4, sigma=0.5, shrinkage=0.3)
    again.load_state_dict(state)
    assert torch.equal(again.class_means().means, read.means)
    assert torch.equal(again.class_means().bias, read.bias)

    without = {k: v for k, v in state.items() if k != "scatter"}  # saved by plain NCM
    again.load_state_dict(without)
    assert again.scatter is not None
    assert float(again.scatter.count) == 0
    assert torch.equal(again.means, means.means)
    again.reset()
    assert len(again.class_means()) == 0

    plain = TaskClassMeans(max_classes=3, dim=4, sigma=0.5)
    plain.load_state_dict(state)  # a scatter it does not keep is ignored
    assert plain.class_means().bias is None
    assert "scatter" not in plain.tensors()


def test_a_saved_scatter_of_another_width_is_refused():
    means = TaskClassMeans(max_classes=2, dim=4, sigma=0.5, shrinkage=0.5)
    state = means.state_dict()
    state["scatter"] = {"scatter": torch.zeros(3, 3, dtype=torch.float64), "count": 1.0}
    with pytest.raises(ValueError, match=r"embed_dim x model\.embed_dim"):
        means.load_state_dict(state)
