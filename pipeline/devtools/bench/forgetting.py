"""``supcon-stream bench forgetting``: the cross-entropy trap, measured in-process.

The standard online class-incremental protocol on ``split-digits`` (sklearn's 1797 8×8 digits,
5 tasks × 2 classes): a stratified hold-out of :data:`TEST_FRACTION` per class is the test
set, the rest streams once, task after task, in micro-batches of ``stream_batch`` (10) events.
Each method learns every batch with :func:`pipeline.learning.batch.learn_batch`, the function the
streaming learner runs (same ``train_step``, same bank, same replay retrieval), only without
Kafka and Redis: the bank writes through to an in-memory store.

Every ``eval_every`` batches, and at the end of every task, the test images of the classes
seen so far are classified (class-incremental: one classifier over all classes seen) and the
per-class accuracies fed to :class:`pipeline.quality.ForgettingTracker`, the sidecar's
tracker, which gives final average accuracy, forgetting, anytime accuracy and the stability
gap. ``joint`` and ``joint_supcon`` are offline upper bounds: the same network trained with
CE or SupCon for several epochs on the whole (shuffled) training set, same ``train_step``.

Methods (hyperparameters in :data:`METHODS`, shared ones in :func:`bench_train_settings`).
By default (:data:`DEFAULT_METHODS`) the three arms a user should compare: CE fine-tune (no
replay: the trap), CE + experience replay (the learner's CE with replay on: the same
class-balanced memory, replay draw and steps per batch as SupCon) and SupCon + bank, with the
offline joint bounds. On request: CE + ER with a reservoir memory and uniform replay, SupCon
+ bank with a reservoir memory, SupCon + FAISS hard negatives and asymmetric SupCon (Co2L).
Replay per step never exceeds ``replay_size`` bank items, hard negatives included. Each run
also reports its training wall time per event (compute parity), and the final accuracy of
every read-out of the same network (:func:`readouts`). SupCon's classifier is the learner's:
NCM to running class means of the stream that follow the encoder (``eval.class_means:
stream``, :mod:`pipeline.learning.drift`), kept in step after every micro-batch inside the
timed work, as the learner does; NCM over the re-encoded bank is a read-out beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import torch

from memory_bank.bank import MemoryBank
from memory_bank.eviction import TARGETED_EVICTIONS
from memory_bank.index import make_index
from memory_bank.testing import InMemoryBankStore
from pipeline.config import BankSettings, EvalSettings, ModelSettings, TrainSettings
from pipeline.devtools.bench.averaging import WeightAverage
from pipeline.devtools.bench.readouts import (
    EMA_READOUT,
    drift_sets,
    predictor,
    readouts,
    score_test_set,
)
from pipeline.learning.batch import learn_batch
from pipeline.learning.drift import DriftFollower, RunningClassMeans, follow_encoder
from pipeline.learning.model import StreamNet
from pipeline.learning.objectives import natural_classifier
from pipeline.learning.step import StepInputs, make_state, train_step
from pipeline.quality import ForgettingTracker
from pipeline.streams.scenarios import SPLIT_DIGITS_TASKS

log = structlog.get_logger(__name__)

TEST_FRACTION = 0.3
DEFAULT_MEMORIES = (20, 50, 100, 200)
DEFAULT_SEEDS = 5
JOINT = "joint"
JOINT_SUPCON = "joint_supcon"


@dataclass(frozen=True)
class Method:
    """One benchmarked configuration: ``train`` overrides on top of the shared settings."""

    name: str
    label: str
    train: dict[str, Any]
    bank_policy: str = "class_balanced"
    uses_memory: bool = True


# Every arm runs with the learner's defaults (TrainSettings: the settings this benchmark measured
# best, docs/forgetting.md) and changes only what names it: objective, replay, memory. The CE
# arms were tuned too (learning rate 2.5e-4 / 5e-4 / 1e-3 on seeds 0-2): the default is also
# CE + ER's best, so both replay arms share it.
CE = {"objective": "ce"}
METHODS: tuple[Method, ...] = (
    Method(
        "ce_finetune",
        "CE fine-tune",
        {**CE, "replay": False},
        uses_memory=False,
    ),
    # The honest baseline: the learner's own CE with replay switched on, so the same memory
    # (class-balanced), the same replay draw and the same steps per batch as SupCon + bank.
    Method("ce_er", "CE + ER", {**CE, "replay": True}),
    # The same baseline with a reservoir memory and uniform replay, the classic ER recipe.
    Method(
        "ce_er_res",
        "CE + ER, reservoir memory",
        {**CE, "replay": True, "replay_sampling": "random"},
        bank_policy="reservoir",
    ),
    Method("supcon", "SupCon + bank", {}),
    Method("supcon_res", "SupCon + bank, reservoir memory", {}, bank_policy="reservoir"),
    Method("supcon_no_hn", "SupCon + bank, no hard neg.", {"hard_negatives": 0}),
    Method("supcon_plain", "SupCon alone (SCR), no proxy term", {"proxy_weight": 0.0}),
    Method("asym_supcon", "Asym. SupCon (Co2L)", {"objective": "asym_supcon"}),
)
JOINT_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    JOINT: ("Joint, offline (CE)", {**CE}),
    JOINT_SUPCON: ("Joint, offline (SupCon)", {}),
}
# Every method the benchmark knows, in report order: the online ones, then the joint bounds.
METHOD_NAMES: tuple[str, ...] = (*(m.name for m in METHODS), *JOINT_METHODS)
# What runs by default: the three arms (the trap, the baseline, the product) and the bounds.
DEFAULT_METHODS: tuple[str, ...] = ("ce_finetune", "ce_er", "supcon", *JOINT_METHODS)


def bench_train_settings(**overrides: Any) -> TrainSettings:
    """The shared training settings of the benchmark: the learner's defaults on the CPU.

    ``overrides`` (``--set train.KEY=VALUE``) apply to every method; a method's own keys
    (:data:`METHODS`) apply on top.
    """
    return TrainSettings(**{"device": "cpu", "amp": False, **overrides})


@dataclass(frozen=True)
class Split:
    """A labeled stream cut into a training stream and a stratified test set.

    ``train_y``/``test_y`` are class indices; ``class_names[i]`` is class i's label and
    ``class_task`` maps a class index (as text) to its task. ``segments`` is the training
    stream's order, one array of row indices per task segment; None means split-digits'
    seeded shuffle within each task (:func:`stream_order`).
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: torch.Tensor
    test_y: torch.Tensor
    input_dim: int = 64
    class_names: tuple[str, ...] = tuple(str(c) for c in range(10))
    # The lambdas defer the look-up of functions defined further down.
    class_task: dict[str, str] = field(default_factory=lambda: _task_of())  # noqa: PLW0108
    task_names: tuple[str, ...] = tuple(str(t) for t in range(len(SPLIT_DIGITS_TASKS)))
    segments: tuple[np.ndarray, ...] | None = None

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class BenchConfig:
    memories: tuple[int, ...] = DEFAULT_MEMORIES
    seeds: int = DEFAULT_SEEDS
    methods: tuple[str, ...] = DEFAULT_METHODS
    stream_batch: int = 10
    eval_every: int = 2  # batches between evaluations (anytime accuracy, stability gap)
    joint_epochs: int = 30
    joint_batch: int = 32
    train: TrainSettings = field(default_factory=bench_train_settings)
    model: dict[str, Any] = field(default_factory=dict)  # e.g. {"standardize": False}
    bank: BankSettings = field(default_factory=BankSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)  # class_means, drift_sigma, ...
    # The stream: the split of each seed (split-digits by default) and its name in reports.
    data: Callable[[int], Split] = field(default=lambda seed: digits_split(seed))  # noqa: PLW0108
    data_name: str = "split-digits"
    extra_methods: tuple[Method, ...] = ()  # compare's loss_terms presets
    # Per-step decay of the weight average read as the ``ema`` read-out; None: no average.
    ema_decay: float | None = None


def digits_split(seed: int) -> Split:
    """Stratified train/test split of sklearn's digits (features ÷ 16), seeded."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float32) / 16.0
    y = np.asarray(digits.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for cls in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == cls))
        test[rows[: round(TEST_FRACTION * len(rows))]] = True
    return Split(x[~test], y[~test], torch.from_numpy(x[test]), torch.from_numpy(y[test]))


def stream_order(split: Split, seed: int) -> list[np.ndarray]:
    """Row indices of the training stream, one array per task (split-digits: shuffled within
    each task with ``seed``; a split with ``segments``: those, in stream order)."""
    if split.segments is not None:
        return list(split.segments)
    rng = np.random.default_rng(seed + 1)
    return [
        rng.permutation(np.flatnonzero(np.isin(split.train_y, classes)))
        for classes in SPLIT_DIGITS_TASKS
    ]


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of the online protocol: training rows, their tensors and bank items."""

    start: int  # position of its first row within its task
    rows: np.ndarray
    x: torch.Tensor
    y: torch.Tensor
    items: tuple[list[str], list[str], list[str]]  # ids, label names, task names


def task_batches(split: Split, seed: int, size: int) -> Iterator[tuple[str, list[MicroBatch]]]:
    """The training stream of the online protocol: per task in stream order
    (:func:`stream_order`), its micro-batches of ``size`` rows."""
    for task, rows in zip(split.task_names, stream_order(split, seed), strict=True):
        batches = []
        for start in range(0, len(rows), size):
            idx = rows[start : start + size]
            y = torch.from_numpy(split.train_y[idx])
            items = ([f"digits-{i}" for i in idx], [str(int(c)) for c in y], [task] * len(idx))
            batches.append(MicroBatch(start, idx, torch.from_numpy(split.train_x[idx]), y, items))
        yield task, batches


@dataclass
class RunResult:
    method: str
    seed: int
    memory: int  # 0 for methods without a memory (CE fine-tune, the joint bounds)
    final_accuracy: float
    forgetting: float | None  # None for the offline joint bounds (nothing to forget)
    anytime_accuracy: float | None
    min_accuracy: float | None
    ncm_final_accuracy: float
    ece: float | None  # final ECE of the natural classifier on the test set
    curve: list[tuple[int, float]]  # (events seen, average accuracy over seen classes)
    seconds: float
    per_class: dict[str, float] = field(default_factory=dict)  # final accuracy per class index
    # Compute parity: wall time of learn_batch (training and bank upkeep, no evaluation) per
    # training event, in ms. None for the offline joint bounds.
    train_ms_per_event: float | None = None
    # Final average accuracy of every classifier the run scored (:func:`readouts`).
    readout_accuracy: dict[str, float] = field(default_factory=dict)


def _model_settings(split: Split, cfg: BenchConfig) -> ModelSettings:
    """The learner's model defaults, sized to the data, with ``--set model.KEY=VALUE``."""
    return ModelSettings(
        **{**cfg.model, "input_dim": split.input_dim, "max_classes": split.n_classes}
    )


def _task_of() -> dict[str, str]:
    return {str(c): str(t) for t, classes in enumerate(SPLIT_DIGITS_TASKS) for c in classes}


def _task_forgetting(tracker: ForgettingTracker, split: Split) -> float:
    """Chaudhry et al. 2018: mean over all tasks but the last of (best − final) accuracy.

    A stream with one task has nothing to forget task-wise: the mean over classes of
    (best − final) accuracy is reported instead.
    """
    r = tracker.result()
    if len(split.task_names) < 2:
        return float(np.mean(list(r.forgetting.values()))) if r.forgetting else 0.0
    last = split.task_names[-1]
    values = [f for task, f in r.per_task_forgetting.items() if task != last]
    return float(np.mean(values)) if values else 0.0


def _arm_bank(
    bank: BankSettings, method: Method, memory: int, seed: int, model_cfg: ModelSettings
) -> MemoryBank:
    """The arm's memory: ``memory`` items under its policy, in memory, on the CPU."""
    arm = bank.model_copy(update={"policy": method.bank_policy})
    return MemoryBank(
        InMemoryBankStore(),
        make_index("faiss", model_cfg.embed_dim, "cpu", "never"),
        capacity=memory,
        input_dim=model_cfg.input_dim,
        embed_dim=model_cfg.embed_dim,
        device="cpu",
        seed=seed,
        index_refresh_steps=arm.index_refresh_steps,
        hard_negative_queries=arm.hard_negative_queries,
        policy=arm.policy,
        eviction=arm.victim_rule,
        adaptive_items=arm.adaptive_items,
    )


def run_online(method: Method, memory: int, seed: int, cfg: BenchConfig, split: Split) -> RunResult:
    """One online pass of ``method`` over the stream of ``seed``."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    train_cfg = cfg.train.model_copy(update={**method.train, "seed": seed})
    model_cfg = _model_settings(split, cfg)
    model = StreamNet(model_cfg)
    state = make_state(model, train_cfg)
    generator = torch.Generator().manual_seed(seed)
    bank = _arm_bank(cfg.bank, method, memory, seed, model_cfg)
    seen = torch.zeros(model_cfg.max_classes, dtype=torch.bool)
    natural, *others = readouts(train_cfg, cfg.eval)
    tracker = ForgettingTracker()
    trackers = {natural: tracker, **{name: ForgettingTracker() for name in others}}
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay is not None else None
    if average is not None:
        trackers[EMA_READOUT] = ForgettingTracker()
    class_task = split.class_task
    curve: list[tuple[int, float]] = []
    events = 0
    final_ece: float | None = None  # the natural classifier's, at the latest evaluation
    final_per_class: dict[str, float] = {}
    train_s = 0.0
    drift, timed_upkeep, upkeep = _drift_upkeep(tuple(trackers), cfg, model_cfg, model, bank)

    def evaluate(task: str) -> None:
        nonlocal final_ece, final_per_class
        _, bank_x, bank_y = bank.occupied()
        for classifier, trk in trackers.items():
            net, read, means = (model, classifier, drift)
            if classifier == EMA_READOUT and average is not None:
                # the stream means follow the trained encoder, not the average: NCM re-encodes
                # the bank with the averaged weights
                net, read, means = average.model, natural, None
            predict = predictor(read, net, bank_x, bank_y, means)
            score = score_test_set(predict, split.test_x, split.test_y, seen)
            trk.update(score.per_class_accuracy, class_task=class_task, current_task=str(task))
            if trk is tracker:
                final_ece, final_per_class = score.ece, score.per_class_accuracy
        avg = tracker.result().avg_accuracy
        curve.append((events, float(avg) if avg is not None else 0.0))

    for task, batches in task_batches(split, seed, cfg.stream_batch):
        for batch_no, mb in enumerate(batches, start=1):
            seen[mb.y] = True
            step_started = time.perf_counter()
            learn_batch(state, bank, train_cfg, mb.x, mb.y, seen, generator, mb.items)
            timed_upkeep(mb.x, mb.y, mb.items[2])
            train_s += time.perf_counter() - step_started
            upkeep(mb.x, mb.y, mb.items[2])
            if average is not None:
                average.update(model, train_cfg.iters_per_batch)
            events += len(mb.rows)
            if batch_no % cfg.eval_every == 0 or batch_no == len(batches):
                evaluate(task)
    for trk in trackers.values():
        trk.finish()
    finals = {name: float(trk.result().avg_accuracy or 0.0) for name, trk in trackers.items()}
    result = tracker.result()
    return RunResult(
        method=method.name,
        memory=memory if method.uses_memory else 0,
        seed=seed,
        final_accuracy=float(result.avg_accuracy or 0.0),
        forgetting=_task_forgetting(tracker, split),
        anytime_accuracy=float(result.anytime_avg_accuracy or 0.0),
        min_accuracy=result.avg_min_accuracy,
        ncm_final_accuracy=finals["ncm"],
        ece=final_ece,
        curve=curve,
        seconds=time.perf_counter() - started,
        per_class=final_per_class,
        train_ms_per_event=1000.0 * train_s / max(events, 1),
        readout_accuracy=finals,
    )


def _drift_upkeep(
    names: tuple[str, ...],
    cfg: BenchConfig,
    model_cfg: ModelSettings,
    model: StreamNet,
    bank: MemoryBank,
) -> tuple[
    DriftFollower[RunningClassMeans] | None,
    Callable[[torch.Tensor, torch.Tensor, Sequence[str | None]], None],
    Callable[[torch.Tensor, torch.Tensor, Sequence[str | None]], None],
]:
    """The running class means the read-outs ``names`` need, and the two calls that keep them
    in step after each micro-batch: (means, timed, untimed). The learner follows the encoder
    when its classifier (the first read-out) reads stream means or its bank's eviction aims at
    them (``adaptive``, ``stream_mean``; a CE learner keeps them for that alone): part of its
    work per micro-batch, timed with the training step; a read-out's upkeep alone is not
    timed."""
    drift = drift_sets(names, cfg.eval, model_cfg.max_classes, model_cfg.embed_dim)
    aimed = False
    if drift is not None and "ncm" in drift.means:  # the learner's means: the eviction's target
        bank.set_eviction_target(drift.means["ncm"].mean_of)
        aimed = bank.eviction in TARGETED_EVICTIONS

    def follow(x: torch.Tensor, y: torch.Tensor, tasks: Sequence[str | None]) -> None:
        if drift is not None:
            follow_encoder(drift, model, bank, x, y, cfg.eval.drift_probe_items, tasks)

    def skip(_x: torch.Tensor, _y: torch.Tensor, _tasks: Sequence[str | None]) -> None:
        return None

    if drift is not None and (names[0] in drift.means or aimed):
        return drift, follow, skip
    return drift, skip, follow


def run_joint(name: str, seed: int, cfg: BenchConfig, split: Split) -> RunResult:
    """Offline upper bound: ``joint_epochs`` over i.i.d. shuffled batches of all training data.

    Same ``train_step``, no replay; ``joint`` trains CE (predicts with the head),
    ``joint_supcon`` SupCon (predicts with NCM over the whole training set).
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    _, own = JOINT_METHODS[name]
    update = {**own, "replay": False, "seed": seed, "iters_per_batch": 1}
    train_cfg = cfg.train.model_copy(update=update)
    model = StreamNet(_model_settings(split, cfg))
    state = make_state(model, train_cfg)
    generator = torch.Generator().manual_seed(seed)
    seen = torch.ones(model.head.out_features, dtype=torch.bool)
    x_all, y_all = torch.from_numpy(split.train_x), torch.from_numpy(split.train_y)
    model.observe(x_all)  # offline: the standardisation statistics of all training data
    empty_x, empty_y = x_all[:0], y_all[:0]
    rng = np.random.default_rng(seed)
    for _ in range(cfg.joint_epochs):
        order = torch.from_numpy(rng.permutation(len(y_all)))
        for start in range(0, len(order), cfg.joint_batch):
            idx = order[start : start + cfg.joint_batch]
            inputs = StepInputs(x_all[idx], y_all[idx], empty_x, empty_y, seen)
            train_step(state, inputs, train_cfg, generator)
    natural = natural_classifier(train_cfg)
    score = score_test_set(
        predictor(natural, model, x_all, y_all), split.test_x, split.test_y, seen
    )
    ncm = score_test_set(predictor("ncm", model, x_all, y_all), split.test_x, split.test_y, seen)
    final = float(np.mean(list(score.per_class_accuracy.values())))
    return RunResult(
        method=name,
        memory=0,
        seed=seed,
        final_accuracy=final,
        forgetting=None,
        anytime_accuracy=None,
        min_accuracy=None,
        ncm_final_accuracy=float(np.mean(list(ncm.per_class_accuracy.values()))),
        ece=score.ece,
        curve=[],
        seconds=time.perf_counter() - started,
        per_class=score.per_class_accuracy,
    )


def method_by_name(name: str, extra: tuple[Method, ...] = ()) -> Method:
    for method in (*METHODS, *extra):
        if method.name == name:
            return method
    known = ", ".join(METHOD_NAMES)
    raise ValueError(f"unknown method {name!r}; known: {known}")


def _seed_runs(cfg: BenchConfig, seed: int) -> Iterator[RunResult]:
    split = cfg.data(seed)
    for name in cfg.methods:
        if name in JOINT_METHODS:
            yield run_joint(name, seed, cfg, split)
            continue
        method = method_by_name(name, cfg.extra_methods)
        for memory in cfg.memories if method.uses_memory else (max(cfg.memories),):
            yield run_online(method, memory, seed, cfg, split)


def run_grid(
    cfg: BenchConfig, progress: Callable[[RunResult], None] | None = None
) -> list[RunResult]:
    """Every (method, memory, seed) run; memory-free methods run once per seed."""
    for name in cfg.methods:
        if name not in JOINT_METHODS:
            method_by_name(name, cfg.extra_methods)  # fail before any run on a misspelt method
    results: list[RunResult] = []
    for seed in range(cfg.seeds):
        for result in _seed_runs(cfg, seed):
            results.append(result)
            if progress is not None:
                progress(result)
    return results
