"""The forgetting benchmark on a tiny grid: the protocol, its metrics and its report."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from memory_bank.bank import MemoryBank
from memory_bank.index import TorchIndex
from memory_bank.testing import InMemoryBankStore
from pipeline.cli_parser import build_parser
from pipeline.config import BankSettings, EvalSettings, ModelSettings
from pipeline.devtools.bench import forgetting
from pipeline.devtools.bench.cli import bench_config
from pipeline.devtools.bench.forgetting import (
    TEST_FRACTION,
    BenchConfig,
    bench_train_settings,
    digits_split,
    readouts,
    run_grid,
    stream_order,
)
from pipeline.devtools.bench.forgetting_report import interval, write_report
from pipeline.devtools.bench.readouts import CLASS_DRIFT_READOUT, STREAM_READOUT, drift_sets
from pipeline.exceptions import ConfigError
from pipeline.learning.drift import RunningClassMeans
from pipeline.learning.model import StreamNet
from pipeline.learning.stream_means import TaskClassMeans

TINY = BenchConfig(
    memories=(20,),
    seeds=1,
    methods=("ce_finetune", "supcon", "joint"),
    joint_epochs=2,
    # One step per batch at a higher lr than the default keeps this test quick.
    train=bench_train_settings(iters_per_batch=1, lr=1e-3),
)


@pytest.fixture(scope="module")
def results():
    return run_grid(TINY)


def test_split_is_stratified_and_the_stream_covers_the_training_rows_task_by_task() -> None:
    split = digits_split(0)
    n = len(split.train_y) + len(split.test_y)
    assert n == 1797
    assert len(split.test_y) == pytest.approx(TEST_FRACTION * n, abs=10)
    tasks = stream_order(split, 0)
    assert sorted(int(i) for rows in tasks for i in rows) == list(range(len(split.train_y)))
    assert set(split.train_y[tasks[0]].tolist()) == {0, 1}
    assert set(split.train_y[tasks[4]].tolist()) == {8, 9}


def test_ce_fine_tune_falls_into_the_trap_and_supcon_with_a_bank_does_not(results) -> None:
    by_method = {r.method: r for r in results}
    ce, supcon, joint = by_method["ce_finetune"], by_method["supcon"], by_method["joint"]
    assert ce.memory == 0  # no memory: one run, whatever the grid's sizes
    assert ce.forgetting is not None
    assert ce.forgetting > 0.8
    assert ce.final_accuracy < 0.35  # about the last task's 2 classes out of 10
    assert supcon.final_accuracy > ce.final_accuracy + 0.3
    assert supcon.min_accuracy is not None
    assert joint.forgetting is None
    for run in (ce, supcon, joint):
        assert run.ece is not None
        assert 0.0 <= run.ece <= 1.0
    assert joint.final_accuracy > 0.8
    # Compute parity: the online runs time their training per event, the offline bound not.
    assert ce.train_ms_per_event is not None
    assert supcon.train_ms_per_event is not None
    assert ce.train_ms_per_event > 0
    assert supcon.train_ms_per_event > 0
    assert joint.train_ms_per_event is None
    # One evaluation every eval_every batches and at each task end, over the whole stream.
    events = [e for e, _ in supcon.curve]
    assert events == sorted(events)
    assert events[-1] == len(digits_split(0).train_y)
    # Each run's own classifier, and NCM beside a head: CE's reads both. SupCon's is the
    # learner's NCM (class means of the stream that follow the encoder); it is also read by NCM
    # over the re-encoded bank, by the same means read by cosine (without the shared covariance)
    # and by class-restricted drift compensation, SupCon-level all three.
    assert set(supcon.readout_accuracy) == {"ncm", "ncm_bank", "ncm_cosine", "sdc_class"}
    assert supcon.readout_accuracy["ncm"] == supcon.final_accuracy
    for name in ("ncm_bank", "ncm_cosine", "sdc_class"):
        assert supcon.readout_accuracy[name] > ce.final_accuracy + 0.3
    assert set(ce.readout_accuracy) == {"head", "ncm"}
    assert ce.readout_accuracy["head"] == ce.final_accuracy


def test_a_head_trained_beside_supcon_is_scored_alone_and_in_the_ensemble() -> None:
    stream, bank = EvalSettings(), EvalSettings(class_means="bank")
    cosine = EvalSettings(covariance_shrinkage=None)
    supcon = bench_train_settings()
    assert readouts(supcon, stream) == ("ncm", "ncm_bank", "ncm_cosine", "sdc_class")
    assert readouts(supcon, cosine) == ("ncm", "ncm_bank", "sdc_class")
    assert readouts(supcon, bank) == ("ncm", "ncm_stream", "sdc_class")
    assert readouts(bench_train_settings(objective="ce"), stream) == ("head", "ncm")
    ace = bench_train_settings(loss_terms={"supcon": 1.0, "proxy": 1.0, "ace": 1.0})
    extra = ("head", "ensemble")
    assert readouts(ace, stream) == ("ncm", "ncm_bank", "ncm_cosine", "sdc_class", *extra)


def test_the_stream_means_only_read_the_run() -> None:
    """With a random victim (the default ``adaptive`` eviction aims at the stream means, so
    they steer the bank), ``eval.class_means: bank`` trains the same run: its NCM is the
    stream-means run's ``ncm_bank`` read-out, and its ``ncm_stream`` read-out is that run's
    NCM."""
    random_victim = dataclasses.replace(TINY, bank=BankSettings(eviction="random"))
    supcon, split = forgetting.method_by_name("supcon"), digits_split(0)
    stream_run = forgetting.run_online(supcon, 20, 0, random_victim, split)
    cfg = dataclasses.replace(random_victim, eval=EvalSettings(class_means="bank"))
    bank_run = forgetting.run_online(supcon, 20, 0, cfg, split)
    assert bank_run.final_accuracy == stream_run.readout_accuracy["ncm_bank"]
    assert bank_run.readout_accuracy["ncm_stream"] == stream_run.final_accuracy
    assert bank_run.readout_accuracy["sdc_class"] == stream_run.readout_accuracy["sdc_class"]
    assert bank_run.final_accuracy != stream_run.final_accuracy  # two classifiers, not one


def test_the_drift_readouts_leave_the_run_unchanged(results, monkeypatch) -> None:
    """The same SupCon run without the means that follow the encoder trains and scores alike:
    keeping them only reads the model (re-encodes the bank in eval mode, no gradient)."""
    monkeypatch.setattr(forgetting, "readouts", lambda _cfg, _eval: ("ncm",))
    split = digits_split(0)
    alone = forgetting.run_online(forgetting.method_by_name("supcon"), 20, 0, TINY, split)
    with_drift = next(r for r in results if r.method == "supcon")
    assert alone.readout_accuracy == {"ncm": with_drift.final_accuracy}
    assert alone.curve == with_drift.curve
    assert alone.per_class == with_drift.per_class


def test_the_weight_average_readout_leaves_the_run_unchanged_and_reads_other_weights(
    results,
) -> None:
    """``--ema-decay``: the run trains and scores exactly as without it; the ``ema`` column
    reads the same classifier through the averaged weights, which differ from the trained
    ones (a decay near 1 keeps them near the start, so the read-out falls well below)."""
    split = digits_split(0)
    cfg = dataclasses.replace(TINY, ema_decay=0.999)
    run = forgetting.run_online(forgetting.method_by_name("supcon"), 20, 0, cfg, split)
    plain = next(r for r in results if r.method == "supcon")
    assert run.curve == plain.curve
    assert run.per_class == plain.per_class
    assert {k: v for k, v in run.readout_accuracy.items() if k != "ema"} == (plain.readout_accuracy)
    assert run.readout_accuracy["ema"] < plain.final_accuracy - 0.05


def test_report_files(results, tmp_path) -> None:
    paths = write_report(results, TINY, tmp_path, wall_s=1.0)
    text = paths["markdown"].read_text()
    assert "| 20 | SupCon + bank |" in text
    assert "| – | CE fine-tune |" in text
    assert "ECE ↓" in text
    assert "train ms/event |" in text
    assert "![accuracy over the stream](forgetting.png)" in text
    # The read-outs of the same runs, in a table of their own (the one-seed interval is 0).
    assert "| memory | method | head | ncm | ncm_bank | ncm_cosine | sdc_class |" in text
    supcon = next(r for r in results if r.method == "supcon")
    assert f"| 20 | SupCon + bank | – | {supcon.readout_accuracy['ncm']:.3f} ± 0.000 |" in text
    report = json.loads(paths["json"].read_text())
    assert {row["method"] for row in report["summary"]} == {"ce_finetune", "supcon", "joint"}
    summary = {row["method"]: row for row in report["summary"]}
    assert summary["supcon"]["readouts"]["ncm_bank"]["mean"] == supcon.readout_accuracy["ncm_bank"]
    assert summary["joint"]["readouts"] == {}
    assert len(report["runs"]) == 3
    assert report["versus_ce_er"] == []  # no CE + ER arm in this grid: nothing to compare
    assert "share of the gap closed" not in text
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interval_is_the_student_t_95_percent_interval() -> None:
    stat = interval([1.0, 2.0, 3.0])
    assert stat is not None
    assert stat.mean == 2.0
    assert stat.half_width == pytest.approx(4.302653 * 1.0 / 3**0.5, rel=1e-5)
    single = interval([0.5])
    assert single is not None
    assert single.half_width == 0.0
    assert interval([]) is None


def _args(**kw):
    base = {"memories": "20,50", "seeds": 2, "methods": None, "overrides": []}
    return argparse.Namespace(**{**base, **kw})


def test_bench_arguments() -> None:
    cfg = bench_config(_args(overrides=["train.iters_per_batch=2", "kafka.partitions=3"]))
    assert cfg.memories == (20, 50)
    assert cfg.train.iters_per_batch == 2
    # The default set: the three arms (trap, baseline, product) and the offline bounds.
    assert cfg.methods == ("ce_finetune", "ce_er", "supcon", "joint", "joint_supcon")
    assert cfg.ema_decay is None
    assert cfg.bank.eviction == "adaptive"
    mean = bench_config(_args(overrides=["bank.eviction=mean_preserving"]))
    assert mean.bank.eviction == "mean_preserving"
    with pytest.raises(ConfigError, match="--set bank"):
        bench_config(_args(overrides=["bank.eviction=oldest"]))
    parsed = build_parser().parse_args(["bench", "forgetting", "--ema-decay", "0.99"])
    assert bench_config(parsed).ema_decay == 0.99
    compare = build_parser().parse_args(["compare", "domain-digits", "--ema-decay", "0.98"])
    assert compare.ema_decay == 0.98
    with pytest.raises(ConfigError, match="--ema-decay"):
        bench_config(_args(ema_decay=1.0))
    with pytest.raises(ConfigError, match="--memories"):
        bench_config(_args(memories="20,x"))
    with pytest.raises(ConfigError, match="unknown"):
        bench_config(_args(methods="supcon,sgd"))
    with pytest.raises(ConfigError, match="train"):
        bench_config(_args(overrides=["train.iters_per_batch=0"]))
    assert bench_config(_args(overrides=["model.standardize=false"])).model == {
        "standardize": False
    }
    with pytest.raises(ConfigError, match="model"):
        bench_config(_args(overrides=["model.hidden_dim=0"]))


@pytest.mark.parametrize(
    ("eviction", "timed"), [("adaptive", True), ("stream_mean", True), ("random", False)]
)
def test_a_ce_learner_pays_for_the_stream_means_its_eviction_aims_at(eviction, timed) -> None:
    """CE + ER reads its head; its stream means are a read-out, untimed, unless the bank's
    eviction aims at them: then the learner keeps them as the product's CE learner does, and
    following them is part of its timed work."""

    model_cfg = ModelSettings(input_dim=4, max_classes=3)
    bank = MemoryBank(
        InMemoryBankStore(),
        TorchIndex(model_cfg.embed_dim),
        8,
        4,
        model_cfg.embed_dim,
        "cpu",
        eviction=eviction,
    )
    model = StreamNet(model_cfg)
    drift, timed_call, untimed_call = forgetting._drift_upkeep(
        ("head", "ncm"), TINY, model_cfg, model, bank
    )
    assert drift is not None
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    tasks = ["0"] * 5
    (timed_call if timed else untimed_call)(x, y, tasks)
    assert int(drift.means["ncm"].counts.sum()) == 5
    (untimed_call if timed else timed_call)(x, y, tasks)  # the other one does nothing
    assert int(drift.means["ncm"].counts.sum()) == 5


def test_the_benchmarks_learner_keeps_a_mean_per_class_and_task() -> None:
    """As the product's learner: a class back under a new task (domain-digits) gets a second
    mean, which NCM reads beside the first."""
    model_cfg = ModelSettings(input_dim=4, max_classes=3)
    bank = MemoryBank(
        InMemoryBankStore(), TorchIndex(model_cfg.embed_dim), 8, 4, model_cfg.embed_dim, "cpu"
    )
    drift, follow, _ = forgetting._drift_upkeep(
        ("ncm",), TINY, model_cfg, StreamNet(model_cfg), bank
    )
    assert drift is not None
    follow(torch.randn(5, 4), torch.tensor([0, 1, 0, 0, 1]), ["a", "a", "b", "b", "a"])
    assert drift.means["ncm"].class_means().labels.tolist() == [0, 0, 1]


def test_the_stream_means_read_out_beside_the_bank_is_the_learners_kind() -> None:
    """Under ``eval.class_means: bank`` the ``ncm_stream`` read-out is what ``stream`` would
    give the learner: a mean per class and task; ``sdc_class`` stays one mean a class."""
    sets = drift_sets(
        ("ncm", STREAM_READOUT, CLASS_DRIFT_READOUT),
        EvalSettings(class_means="bank"),
        3,
        4,
    )
    assert sets is not None
    assert isinstance(sets.means[STREAM_READOUT], TaskClassMeans)
    assert isinstance(sets.means[CLASS_DRIFT_READOUT], RunningClassMeans)
    assert "ncm" not in sets.means  # NCM reads the bank there
