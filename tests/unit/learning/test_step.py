from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelSettings, TrainSettings
from pipeline.learner.probes import ProbeSet, is_probe
from pipeline.learning.inference import (
    class_means,
    per_class_accuracy,
    predict_ensemble,
    predict_head,
    predict_ncm,
)
from pipeline.learning.labels import LabelRegistry
from pipeline.learning.model import StreamNet
from pipeline.learning.step import StepInputs, make_state, match_optimizer_device, train_step

MODEL = ModelSettings(input_dim=8, hidden_dim=32, embed_dim=16, proj_dim=16, max_classes=5)


def _blobs(n_per_class: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, MODEL.input_dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centers[y] + 0.3 * torch.randn(len(y), MODEL.input_dim, generator=g)
    return x, y


def _inputs(x, y, rx=None, ry=None):
    seen = torch.zeros(MODEL.max_classes, dtype=torch.bool)
    seen[y.unique()] = True
    rx = x.new_empty(0, x.shape[1]) if rx is None else rx
    ry = y.new_empty(0) if ry is None else ry
    return StepInputs(x, y, rx, ry, seen)


@pytest.mark.parametrize("objective", ["supcon", "ce"])
def test_training_reduces_loss_and_separates_classes(objective):
    torch.manual_seed(0)
    cfg = TrainSettings(objective=objective, lr=5e-3)
    state = make_state(StreamNet(MODEL), cfg)
    x, y = _blobs(16, 3)
    first = train_step(state, _inputs(x, y), cfg)
    for _ in range(60):
        last = train_step(state, _inputs(x, y), cfg)
    assert first.loss is not None
    assert last.loss is not None
    # SupCon's floor here is ~log(31) (31 positives per anchor), so only demand a decrease;
    # the class separation below is the real check.
    assert last.loss < first.loss
    assert state.step == 61
    assert state.skipped == 0
    means = class_means(state.model, x, y)
    pred, conf = predict_ncm(state.model, x, means)
    assert (pred == y).float().mean() > 0.95
    assert ((conf > 0) & (conf <= 1)).all()


def test_replay_is_contrasted_and_gets_fresh_embeddings():
    cfg = TrainSettings()
    state = make_state(StreamNet(MODEL), cfg)
    x, y = _blobs(4, 2)
    rx, ry = _blobs(3, 3, seed=1)
    result = train_step(state, _inputs(x, y, rx, ry), cfg)
    assert result.batch_embeddings.shape == (8, MODEL.embed_dim)
    assert result.replay_embeddings.shape == (9, MODEL.embed_dim)
    assert result.per_sample_loss.shape == (8,)
    norms = result.replay_embeddings.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_non_finite_input_skips_the_step_and_leaves_weights_alone():
    cfg = TrainSettings()
    state = make_state(StreamNet(MODEL), cfg)
    before = [p.detach().clone() for p in state.model.parameters()]
    x, y = _blobs(4, 2)
    x[0, 0] = float("nan")
    result = train_step(state, _inputs(x, y), cfg)
    assert result.skipped
    assert result.loss is None
    assert state.skipped == 1
    for p, b in zip(state.model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_ce_head_masks_unseen_classes():
    model = StreamNet(MODEL)
    with torch.no_grad():
        model.head.bias[4] = 1e4  # an unseen class with a huge logit
    seen = torch.tensor([True, True, False, False, False])
    pred, _ = predict_head(model, torch.randn(6, MODEL.input_dim), seen)
    assert set(pred.tolist()) <= {0, 1}


def test_ensemble_averages_the_heads_and_ncms_softmax():
    torch.manual_seed(3)
    model = StreamNet(MODEL)
    x, y = _blobs(4, 3, seed=1)
    means = class_means(model, x[y != 1], y[y != 1])  # the bank holds classes 0 and 2 only
    seen = torch.tensor([True, True, True, False, False])
    queries = torch.randn(7, MODEL.input_dim)
    pred, conf = predict_ensemble(model, queries, means, seen, temperature=0.2)
    # By hand: the head's softmax over classes 0-2, NCM's over {0, 2} placed at columns 0, 2.
    with torch.no_grad():
        h = model.embed(queries)
        p_head = torch.softmax(model.logits(h)[:, :3], dim=1)
        cos = torch.nn.functional.normalize(h, dim=-1) @ means.means.T
        p_ncm = torch.zeros(7, 3)
        p_ncm[:, [0, 2]] = torch.softmax(cos / 0.2, dim=1)
    expected_conf, expected_pred = (0.5 * (p_head + p_ncm)).max(dim=1)
    assert torch.equal(pred, expected_pred)
    torch.testing.assert_close(conf, expected_conf)
    empty = class_means(model, x[:0], y[:0])
    assert torch.equal(
        predict_ensemble(model, queries, empty, seen)[0], predict_head(model, queries, seen)[0]
    )


def test_is_probe_is_deterministic_and_close_to_fraction():
    ids = [f"e-{i}" for i in range(20000)]
    first = [is_probe(i, 0.1) for i in ids]
    assert first == [is_probe(i, 0.1) for i in ids]
    assert 0.09 < sum(first) / len(ids) < 0.11
    assert not any(is_probe(i, 0.0) for i in ids[:100])


def test_probe_set_caps_per_class_ignores_duplicates_and_round_trips():
    probes = ProbeSet(per_class=2, input_dim=3, device=torch.device("cpu"))
    assert probes.add("a", torch.ones(3), 0)
    assert not probes.add("a", torch.ones(3), 0)
    assert probes.add("b", torch.ones(3), 0)
    assert not probes.add("c", torch.ones(3), 0)
    assert probes.add("d", torch.zeros(3), 1)
    assert probes.sizes() == {0: 2, 1: 1}
    copy = ProbeSet(per_class=2, input_dim=3, device=torch.device("cpu"))
    copy.load_state(probes.state())
    assert copy.sizes() == probes.sizes()
    assert not copy.add("d", torch.zeros(3), 1)


def test_per_class_accuracy_by_name():
    reg = LabelRegistry(5, ["cat", "dog"])
    truth = torch.tensor([0, 0, 1, 1, 1])
    pred = torch.tensor([0, 1, 1, 1, 0])
    assert per_class_accuracy(pred, truth, reg) == {"cat": 0.5, "dog": pytest.approx(2 / 3)}


def test_label_registry_caps_classes():
    reg = LabelRegistry(2)
    assert reg.index("x", task="0") == 0
    assert reg.index("y") == 1
    assert reg.index("x") == 0
    assert not reg.has_room_for("z")
    with pytest.raises(ValueError, match="full"):
        reg.index("z")
    reg.note_task("y", "1")
    assert reg.class_task == {"x": "0", "y": "1"}


def test_optimizer_saved_as_capturable_steps_on_cpu_after_matching() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    saved = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.ones(3)
    saved.step()
    state = saved.state_dict()
    state["param_groups"][0]["capturable"] = True  # as a CUDA learner writes it
    state["param_groups"][0]["fused"] = True

    restored = torch.optim.Adam([param], lr=0.1)
    restored.load_state_dict(state)
    match_optimizer_device(restored, torch.device("cpu"))
    param.grad = torch.ones(3)
    restored.step()  # raised "If capturable=True, params and state_steps must be on ..."

    assert restored.param_groups[0]["capturable"] is False
    assert restored.param_groups[0]["fused"] is False  # the CPU keeps unfused Adam
    assert torch.all(param < 1.0)
