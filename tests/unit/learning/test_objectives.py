"""Objectives from config: presets, weighted terms, unlabeled events, natural classifiers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memory_bank.bank import MemoryBank
from memory_bank.index import TorchIndex
from memory_bank.testing import InMemoryBankStore
from pipeline.config import ModelSettings, TrainSettings, load_settings
from pipeline.exceptions import ConfigError
from pipeline.learning.batch import learn_batch
from pipeline.learning.losses import asymmetric_supcon_loss, nt_xent_loss, supcon_loss
from pipeline.learning.model import StreamNet
from pipeline.learning.objectives import (
    chosen_classifier,
    loss_weights,
    natural_classifier,
    objective_loss,
)
from pipeline.learning.step import StepInputs, make_state, train_step

MODEL = ModelSettings(input_dim=8, hidden_dim=32, embed_dim=16, proj_dim=16, max_classes=5)
# No augmentation: both views equal the input, so the closed forms below need no RNG.
PLAIN = {"noise_std": 0.0, "mask_prob": 0.0}


def _net(seed: int = 0) -> StreamNet:
    torch.manual_seed(seed)
    return StreamNet(MODEL)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, MODEL.input_dim, generator=g)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 3, 0])
    seen = torch.zeros(MODEL.max_classes, dtype=torch.bool)
    seen[:4] = True
    return x, y, seen


def _views(model: StreamNet, x: torch.Tensor) -> torch.Tensor:
    z = model.project(model.embed(x))
    return torch.stack([z, z], dim=1)


def test_supcon_term_is_the_reference_supcon_over_batch_and_replay() -> None:
    model, (x, y, seen) = _net(), _data()
    cfg = TrainSettings(objective="supcon", proxy_weight=0.0, **PLAIN)
    out = objective_loss(model, x, y, 8, seen, cfg)
    expected = supcon_loss(_views(model, x), y, cfg.temperature, cfg.base_temperature)
    torch.testing.assert_close(out.loss, expected)
    per_anchor = supcon_loss(_views(model, x), y, reduction="none").view(2, 12).mean(dim=0)
    torch.testing.assert_close(out.batch_per_sample, per_anchor[:8].detach())


def test_supcon_preset_adds_the_weighted_proxy_term() -> None:
    from pipeline.learning.objectives import loss_weights
    from pipeline.learning.proxy_losses import proxy_contrastive_loss

    model, (x, y, seen) = _net(), _data()
    cfg = TrainSettings(objective="supcon", proxy_weight=0.5, **PLAIN)
    assert loss_weights(cfg) == {"supcon": 1.0, "proxy": 0.5}
    assert loss_weights(TrainSettings(objective="ce", proxy_weight=0.5)) == {"ce": 1.0}
    out = objective_loss(model, x, y, 12, seen, cfg)
    h = F.normalize(model.embed(x), dim=-1)
    proxies = F.normalize(model.head.weight, dim=-1)
    expected = supcon_loss(_views(model, x), y) + 0.5 * proxy_contrastive_loss(h, y, proxies)
    torch.testing.assert_close(out.loss, expected)


def test_asymmetric_preset_anchors_only_the_batch() -> None:
    model, (x, y, seen) = _net(), _data()
    n = 8
    cfg = TrainSettings(objective="asym_supcon", **PLAIN)
    out = objective_loss(model, x, y, n, seen, cfg)
    feats = _views(model, x)
    replay = feats[n:].transpose(0, 1).reshape(-1, feats.shape[-1])
    expected = asymmetric_supcon_loss(feats[:n], y[:n], replay, y[n:].repeat(2))
    torch.testing.assert_close(out.loss, expected)
    assert out.batch_per_sample.shape == (n,)


def test_weighted_terms_are_the_weighted_sum_and_the_detached_head_spares_the_encoder() -> None:
    x, y, seen = _data()
    cfg_sup = TrainSettings(loss_terms={"supcon": 1.0}, **PLAIN)
    cfg_mix = TrainSettings(loss_terms={"supcon": 1.0, "ce_detached": 0.1}, **PLAIN)
    m1, m2 = _net(), _net()
    sup = objective_loss(m1, x, y, 12, seen, cfg_sup)
    mix = objective_loss(m2, x, y, 12, seen, cfg_mix)
    h = m2.embed(x)
    ce = F.cross_entropy(m2.logits(h).masked_fill(~seen, float("-inf")), y)
    torch.testing.assert_close(mix.loss, sup.loss + 0.1 * ce)
    sup.loss.backward()
    mix.loss.backward()
    for p1, p2 in zip(m1.encoder.parameters(), m2.encoder.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad)  # CE reached the head only
    assert m1.head.weight.grad is None
    assert m2.head.weight.grad is not None
    assert m2.head.weight.grad.abs().sum() > 0


def test_ace_term_is_er_aces_cross_entropy_of_the_head_and_trains_the_encoder() -> None:
    from pipeline.learning.losses import asymmetric_cross_entropy_loss

    model, (x, y, seen) = _net(), _data()
    y = y.clone()
    y[10] = -1  # an unlabeled replayed row: no head loss, and it marks no class as present
    n = 8
    cfg = TrainSettings(loss_terms={"supcon": 1.0, "ace": 0.5}, **PLAIN)
    out = objective_loss(model, x, y, n, seen, cfg)
    labeled = y >= 0
    incoming = torch.arange(12) < n
    ace = asymmetric_cross_entropy_loss(
        model.logits(model.embed(x[labeled])), y[labeled], incoming[labeled], seen, "none"
    )
    per_item = torch.zeros(12).masked_scatter(labeled, ace)
    contrast_y = torch.where(labeled, y, torch.tensor(-2 - 10))
    sup = supcon_loss(_views(model, x), contrast_y)
    torch.testing.assert_close(out.loss, sup + 0.5 * per_item.mean())
    out.loss.backward()
    assert model.head.weight.grad is not None
    assert model.head.weight.grad.abs().sum() > 0
    plain = _net()  # the same network with SupCon alone: the ACE term moves the encoder too
    objective_loss(
        plain, x, y, n, seen, TrainSettings(loss_terms={"supcon": 1.0}, **PLAIN)
    ).loss.backward()
    first = next(model.encoder.parameters()).grad
    assert first is not None
    assert not torch.allclose(first, next(plain.encoder.parameters()).grad)
    assert natural_classifier(cfg) == "ncm"
    assert natural_classifier(TrainSettings(loss_terms={"ace": 1.0})) == "head"


def test_ace_detached_is_the_same_loss_and_trains_the_head_alone() -> None:
    model, (x, y, seen) = _net(), _data()
    n = 8
    attached = objective_loss(
        model, x, y, n, seen, TrainSettings(loss_terms={"supcon": 1.0, "ace": 0.5}, **PLAIN)
    )
    spared = _net()
    cfg = TrainSettings(loss_terms={"supcon": 1.0, "ace_detached": 0.5}, **PLAIN)
    detached = objective_loss(spared, x, y, n, seen, cfg)
    torch.testing.assert_close(detached.loss, attached.loss)  # same value, other gradient
    detached.loss.backward()
    plain = _net()
    objective_loss(
        plain, x, y, n, seen, TrainSettings(loss_terms={"supcon": 1.0}, **PLAIN)
    ).loss.backward()
    for p1, p2 in zip(plain.encoder.parameters(), spared.encoder.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad)  # ACE reached the head only
    assert spared.head.weight.grad is not None
    assert spared.head.weight.grad.abs().sum() > 0
    assert natural_classifier(cfg) == "ncm"


def test_unlabeled_events_get_nt_xent() -> None:
    model, (x, _, seen) = _net(), _data()
    unlabeled = torch.full((12,), -1)
    cfg = TrainSettings(objective="supcon", temperature=0.5, base_temperature=0.5, **PLAIN)
    out = objective_loss(model, x, unlabeled, 12, seen, cfg)
    torch.testing.assert_close(out.loss, nt_xent_loss(_views(model, x), temperature=0.5))


def test_head_terms_skip_unlabeled_events() -> None:
    model, (x, y, seen) = _net(), _data()
    y = y.clone()
    y[3] = -1
    out = objective_loss(model, x, y, 12, seen, TrainSettings(objective="ce", **PLAIN))
    assert out.batch_per_sample[3] == 0.0
    assert bool((out.batch_per_sample[y >= 0] > 0).all())


def test_triplet_preset_and_focal_preset_train() -> None:
    x, y, seen = _data()
    for objective in ("triplet", "focal", "asym_supcon", "supcon", "ce"):
        model = _net()
        cfg = TrainSettings(objective=objective, lr=5e-3)
        state = make_state(model, cfg)
        inputs = StepInputs(x[:8], y[:8], x[8:], y[8:], seen)
        results = [train_step(state, inputs, cfg) for _ in range(5)]
        assert all(r.loss is not None and r.loss >= 0 for r in results), objective
        assert results[0].per_sample_loss.shape == (8,)


def test_loss_weights_and_natural_classifiers() -> None:
    assert loss_weights(TrainSettings(objective="focal")) == {"focal": 1.0}
    mixed = TrainSettings(loss_terms={"supcon": 1.0, "ce_detached": 0.1, "triplet": 0.0})
    assert loss_weights(mixed) == {"supcon": 1.0, "ce_detached": 0.1}
    assert natural_classifier(TrainSettings(objective="ce")) == "head"
    assert natural_classifier(TrainSettings(objective="focal")) == "head"
    assert natural_classifier(TrainSettings(objective="asym_supcon")) == "ncm"
    # A representation term decides, whatever the preset says; a detached head does not.
    assert natural_classifier(TrainSettings(objective="ce", loss_terms={"supcon": 1})) == "ncm"
    assert natural_classifier(TrainSettings(loss_terms={"focal": 1, "ce_detached": 1})) == "head"
    assert chosen_classifier(TrainSettings(objective="ce"), "natural") == "head"
    assert chosen_classifier(TrainSettings(objective="ce"), "knn") == "knn"
    assert TrainSettings(objective="asym_supcon").replay_enabled
    assert not TrainSettings(objective="focal").replay_enabled


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.loss_terms={supcon: -1}", "weight must be finite and >= 0"),
        ("train.loss_terms={supcon: 0}", "at least one weight"),
        ("train.loss_terms={softmax: 1}", "train.loss_terms.softmax"),
        ("train.objective=mse", "train.objective"),
        ("bank.policy=fifo", "bank.policy"),
        ("train.replay_sampling=hard", "train.replay_sampling"),
        ("eval.classifier=svm", "eval.classifier"),
    ],
)
def test_bad_objective_settings_fail_with_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, [override], environ={})


def test_learn_batch_trains_on_unlabeled_rows_but_banks_only_labeled_ones() -> None:
    x, y, seen = _data()
    y = torch.cat([y[:8], torch.full((4,), -1)])  # 8 labeled rows, then 4 unlabeled
    model = _net()
    cfg = TrainSettings(objective="supcon", iters_per_batch=2)
    state = make_state(model, cfg)
    bank = MemoryBank(InMemoryBankStore(), TorchIndex(MODEL.embed_dim), 50, 8, 16, "cpu")
    ids = [f"e{i}" for i in range(8)]
    items = (ids, [str(int(c)) for c in y[:8]], [None] * 8)
    out = learn_batch(state, bank, cfg, x, y, seen, None, items)
    assert sorted(bank.ids()) == sorted(ids)
    assert len(out.losses) == 2
    assert out.per_sample_loss is not None
    assert out.per_sample_loss.shape == (12,)
    assert bool((out.per_sample_loss[8:] > 0).all())  # NT-Xent of the unlabeled rows


@pytest.mark.parametrize("offer", [True, False])
def test_learn_batch_reports_trained_after_the_steps_and_before_the_bank(offer: bool) -> None:
    """The learner's ledger line is written there: a bank item always has one."""
    x, y, seen = _data()
    cfg = TrainSettings(objective="supcon", iters_per_batch=2)
    state = make_state(_net(), cfg)
    bank = MemoryBank(InMemoryBankStore(), TorchIndex(MODEL.embed_dim), 50, 8, 16, "cpu")
    ids = [f"e{i}" for i in range(len(y))]
    seen_then: list[tuple[int, list[str]]] = []
    learn_batch(
        state,
        bank,
        cfg,
        x,
        y,
        seen,
        None,
        (ids, [str(int(c)) for c in y], [None] * len(y)),
        offer=offer,
        trained=lambda: seen_then.append((state.step, sorted(bank.ids()))),
    )
    assert seen_then == [(2, [])]  # both steps taken, nothing of the batch banked yet
    assert sorted(bank.ids()) == (sorted(ids) if offer else [])


def test_objective_names_come_from_one_place() -> None:
    """config.LOSS_TERMS is the one list; the registry, the term kinds and the CLI follow it."""
    from pipeline.cli_parser import build_parser
    from pipeline.learning.objectives import HEAD_TERMS, TERMS
    from pipeline.settings.learning import LOSS_TERMS, OBJECTIVES, REPRESENTATION_TERMS

    assert set(TERMS) == set(LOSS_TERMS)
    assert set(OBJECTIVES) < set(LOSS_TERMS)
    assert set(LOSS_TERMS) == HEAD_TERMS | REPRESENTATION_TERMS
    assert not HEAD_TERMS & REPRESENTATION_TERMS
    for name in OBJECTIVES:
        args = build_parser().parse_args(["learn", "--objective", name])
        assert args.objective == name
        assert TrainSettings(objective=name).replay_enabled == (name in REPRESENTATION_TERMS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["learn", "--objective", "ce_detached"])


def test_distill_waits_for_its_first_snapshot_then_keeps_one() -> None:
    from pipeline.config import ModelSettings
    from pipeline.learning.model import StreamNet
    from pipeline.learning.step import StepInputs, make_state, train_step

    torch.manual_seed(0)
    cfg = TrainSettings(
        loss_terms={"supcon": 1.0, "distill": 1.0}, distill_every=2, device="cpu", amp=False
    )
    model = StreamNet(ModelSettings(input_dim=6, hidden_dim=16, embed_dim=8, proj_dim=8))
    state = make_state(model, cfg)
    x, y = torch.randn(8, 6), torch.tensor([0, 1] * 4)
    seen = torch.zeros(100, dtype=torch.bool)
    seen[:2] = True
    inputs = StepInputs(x, y, x[:0], y[:0], seen)
    train_step(state, inputs, cfg)
    assert state.teacher is None  # no snapshot before step distill_every
    train_step(state, inputs, cfg)
    train_step(state, inputs, cfg)
    assert state.teacher is not None
    assert not any(p.requires_grad for p in state.teacher.parameters())
    # The snapshot is a copy: training on moves the model, not the teacher.
    before = [p.clone() for p in state.teacher.parameters()]
    train_step(state, inputs, cfg)
    for p, q in zip(state.teacher.parameters(), before, strict=True):
        assert torch.equal(p, q)
