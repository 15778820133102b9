"""The learning sections: ``model``, ``train``, ``bank``, ``eval``, and the objective names.

Part of :class:`pipeline.config.Settings`; README "Configuration" documents every key.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from pydantic import Field, model_validator

from pipeline.settings.frozen import Frozen as _Frozen


class ModelSettings(_Frozen):
    input_dim: int = Field(64, ge=1)
    hidden_dim: int = Field(256, ge=1)
    embed_dim: int = Field(128, ge=2)
    proj_dim: int = Field(128, ge=2)
    max_classes: int = Field(100, ge=2)
    standardize: bool = Field(
        True,
        description="Standardise each input feature with running mean/variance of the "
        "training events (kept in the checkpoint); augmentation is relative to that scale.",
    )
    reference_input_dim: int | None = Field(
        64,
        ge=1,
        description="The input width train.lr is set for: the input layer is parametrised "
        "so that Adam changes a hidden unit per step as much as with this many inputs "
        "(gain reference_input_dim / input_dim, kept in the checkpoint); None: plain layer.",
    )

    @property
    def input_gain(self) -> float:
        """The input layer's gain: ``reference_input_dim / input_dim`` (1 without one)."""
        if self.reference_input_dim is None:
            return 1.0
        return self.reference_input_dim / self.input_dim


# Objective names are written here once: settings validate against them, the CLI's --objective
# offers them, and the loss-term registry (pipeline/learning/objectives.py) implements them.
# Kept in this torch-free module so that every process can read them.
Objective = Literal["supcon", "ce", "asym_supcon", "focal", "triplet"]
# A loss term is an objective, the CE head trained on a detached encoder output, PCR's proxy
# contrast (anchors against the head's normalised rows) or Co2L's relation distillation from
# an earlier snapshot of the network (``distill``, snapshot every ``train.distill_every``) or
# ER-ACE's asymmetric cross-entropy of the head (``ace``; ``ace_detached`` on a detached encoder
# output, training the head alone) or the proxy term on mixed encoder outputs of random pairs
# with soft targets (``proxy_mixup``, manifold mixup).
LossTermName = Literal[
    Objective, "ce_detached", "proxy", "distill", "ace", "ace_detached", "proxy_mixup"
]
OBJECTIVES: tuple[Objective, ...] = get_args(Objective)
LOSS_TERMS: tuple[LossTermName, ...] = get_args(LossTermName)
# The terms that train the representation itself: replay is on by default for them.
REPRESENTATION_TERMS: frozenset[LossTermName] = frozenset(
    {"supcon", "asym_supcon", "triplet", "proxy", "distill", "proxy_mixup"}
)


class TrainSettings(_Frozen):
    objective: Objective = "supcon"
    # The defaults below are the settings `bench forgetting` measured best on split-digits
    # (docs/forgetting.md lists what was tried); nothing in the benchmark overrides them.
    lr: float = Field(2.5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    temperature: float = Field(0.07, gt=0)
    base_temperature: float = Field(0.07, gt=0)
    contrast_mode: Literal["all", "one"] = "all"
    replay: bool | None = Field(
        None, description="Replay from the bank; None means on for supcon, off for ce."
    )
    replay_size: int = Field(64, ge=0)
    hard_negatives: int = Field(16, ge=0)
    iters_per_batch: int = Field(5, ge=1, le=100)
    grad_clip: float | None = Field(5.0, gt=0)
    noise_std: float = Field(0.02, ge=0, description="Augmentation noise, in feature stds.")
    mask_prob: float = Field(0.05, ge=0, lt=1)
    views: int = Field(
        2,
        ge=2,
        le=16,
        description="Augmented views of every contrasted item per step; every term sees "
        "all of them (SupCon's positives include an item's other views).",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    seed: int = 0
    torch_threads: int | None = Field(
        None, ge=1, description="Intra-op threads for torch; None keeps torch's default."
    )
    # The loss family (pipeline/learning/objectives.py). ``loss_terms`` empty: the objective alone.
    loss_terms: dict[LossTermName, float] = Field(
        default_factory=dict,
        description="Weighted loss terms, e.g. {supcon: 1.0, ce_detached: 0.1}; "
        "empty means {<objective>: 1.0}.",
    )
    proxy_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of the PCR proxy term beside SupCon in the supcon preset "
        "(loss_terms empty); 0 is SupCon alone.",
    )
    distill_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of Co2L's relation distillation in the supcon preset; 0 is off.",
    )
    mixup_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the proxy-mixup term (``proxy_mixup``: normalised encoder "
        "outputs of random pairs of labeled items mixed with λ ~ U(0, 1), soft targets "
        "against the class proxies) in the supcon preset; 0 is off.",
    )
    mix_negatives: int = Field(
        0,
        ge=0,
        le=4096,
        description="Random pairs of labeled views drawn per step whose cross-class "
        "mixtures (projections, λ ~ U(0, 1), no gradient) join SupCon's contrast set as "
        "negatives of every anchor (MoCHi-style synthetic negatives); 0 is off.",
    )
    replay_sampling: Literal["class_balanced", "random"] = "class_balanced"
    train_unlabeled: bool = Field(
        False,
        description="Also train on events without a label (NT-Xent), alongside the labeled "
        "events of the same micro-batch; they are still predicted.",
    )
    label_smoothing: float = Field(0.0, ge=0, le=1)
    focal_gamma: float = Field(2.0, ge=0)
    focal_alpha: float | None = Field(None, gt=0)
    triplet_margin: float = Field(0.2, ge=0)
    distill_every: int = Field(
        100,
        ge=1,
        description="Optimizer steps between snapshots of the network that the distill "
        "term keeps the relations of (no snapshot, no distillation, before the first).",
    )

    @property
    def replay_enabled(self) -> bool:
        if self.replay is None:
            return self.objective in REPRESENTATION_TERMS
        return self.replay

    @model_validator(mode="after")
    def _check_loss_terms(self) -> TrainSettings:
        for name, weight in self.loss_terms.items():
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"loss_terms.{name}: weight must be finite and >= 0")
        if self.loss_terms and not any(self.loss_terms.values()):
            raise ValueError("loss_terms: at least one weight must be > 0")
        if self.mix_negatives and self.contrast_mode != "all":
            raise ValueError("mix_negatives: needs contrast_mode all")
        return self


class BankSettings(_Frozen):
    capacity: int = Field(2000, ge=1)
    policy: Literal["class_balanced", "reservoir"] = Field(
        "class_balanced", description="Admission/eviction: class-balanced or plain reservoir."
    )
    eviction: Literal["random", "mean_preserving", "stream_mean", "adaptive"] = Field(
        "adaptive",
        description="Which item of a class leaves when it gives up a slot: a random one; the "
        "one whose removal moves the class's mean embedding least (mean_preserving); the "
        "one whose removal brings the class's bank mean nearest its stream class mean "
        "(stream_mean); or stream_mean's while the class has at most adaptive_items "
        "candidates (its items and the newcomer), mean_preserving's above, a random one for a "
        "class of more than 256 items (adaptive). "
        "stream_mean needs eval.class_means: stream; adaptive without it is mean_preserving. "
        "class_balanced only; under policy reservoir the victim is random.",
    )
    adaptive_items: int = Field(
        6,  # memory_bank.eviction.ADAPTIVE_ITEMS (the settings load no torch)
        ge=2,
        description="eviction adaptive: the most candidates (a class's items and the "
        "newcomer) for which the victim aims at the stream class mean.",
    )
    index_refresh_steps: int = Field(10, ge=1)
    hard_negative_queries: int = Field(32, ge=1)
    use_gpu: Literal["auto", "never"] = "auto"
    index: Literal["auto", "faiss", "torch", "mirror"] = Field(
        "auto",
        description="Vector index: auto = FAISS on a GPU when faiss-gpu sees one, else the "
        "in-place torch search of the bank mirror (mirror) on the learner's device.",
    )
    hard_negative_every: int | None = Field(
        None,
        ge=1,
        description="Search the index for hard negatives every N train iterations; None = "
        "ceil(capacity * hard_negative_queries / 16384), see hard_negative_interval.",
    )

    @model_validator(mode="after")
    def _check_eviction(self) -> BankSettings:
        # The default eviction is class-balanced's; only a rule asked for conflicts.
        if (
            "eviction" in self.model_fields_set
            and self.eviction != "random"
            and self.policy != "class_balanced"
        ):
            raise ValueError(f"bank.eviction {self.eviction} needs bank.policy class_balanced")
        return self

    @property
    def victim_rule(self) -> str:
        """The eviction the bank runs: ``eviction``, or ``random`` under ``policy: reservoir``
        (whose victim is any item, not one of a class)."""
        return self.eviction if self.policy == "class_balanced" else "random"

    @property
    def hard_negative_interval(self) -> int:
        """Iterations between hard-negative searches.

        Automatic: a search scans ``capacity x hard_negative_queries`` (row, query) pairs; one
        every ``ceil(that / 16384)`` iterations keeps the average near 16k pairs per iteration
        (~0.2 ms on 2 CPU cores, a few % of a train step), whatever the bank size: 1 up to
        512 items, 4 at the default 2000, 196 at 100k.
        """
        if self.hard_negative_every is not None:
            return self.hard_negative_every
        return max(1, math.ceil(self.capacity * self.hard_negative_queries / 16_384))


class EvalSettings(_Frozen):
    probe_fraction: float = Field(0.1, ge=0, lt=1)
    probe_per_class: int = Field(50, ge=1)
    # Steps are optimizer iterations (train.iters_per_batch per batch): 100 = every 20 batches
    # at the default 5 iterations, the per-event cadence of 20 steps at one iteration.
    every_steps: int = Field(100, ge=1)
    prediction_refresh_steps: int = Field(100, ge=1)
    classifier: Literal["natural", "ncm", "knn", "head"] = Field(
        "natural",
        description="Classifier for predictions and the primary evaluation; natural: the "
        "head for ce/focal, NCM otherwise.",
    )
    knn_k: int = Field(10, ge=1, description="Neighbours of the kNN classifier.")
    class_means: Literal["stream", "bank"] = Field(
        "stream",
        description="The class means NCM reads. stream: per class, the running mean of every "
        "trained event's embedding, moved after each micro-batch by the drift the re-encoded "
        "bank measures (semantic drift compensation), kept in the checkpoint; bank: the "
        "mean of the bank's items re-encoded by the current encoder (SCR).",
    )
    drift_sigma: float | None = Field(
        0.5,
        gt=0,
        description="Width of SDC's Gaussian weights of the bank items around a class mean "
        "(on unit vectors); null: a class moves by the mean drift of its own bank items.",
    )
    means_per_class: int = Field(
        8,
        ge=1,
        description="Under class_means stream, the means a class keeps: one per task its "
        "events name (the event's task), so a class seen again in a new domain is read by "
        "its nearest mean rather than one average of its domains; a class brought by more "
        "tasks merges its two nearest means. 1: one mean per class.",
    )
    covariance_shrinkage: float | None = Field(
        0.8,
        gt=0,
        le=1,
        description="Under class_means stream, NCM reads the means through a shared "
        "within-class covariance of the stream's embeddings (a streaming linear "
        "discriminant; the covariance follows the encoder through a linear map the re-encoded "
        "bank fits), shrunk by this weight (above 0: the covariance alone is singular until "
        "the stream has more events than dimensions) towards a multiple of the identity; "
        "null: plain cosine to the means.",
    )
    drift_probe_items: int = Field(
        1024,
        ge=1,
        description="Bank items re-encoded after each micro-batch to measure the drift (those "
        "of the first this many slots): bounds the cost on a large bank.",
    )


def eviction_target_problem(bank: BankSettings, evaluation: EvalSettings) -> str | None:
    """Why ``bank`` and ``evaluation`` cannot go together, or None: ``stream_mean`` eviction
    aims at the stream class means, which only ``eval.class_means: stream`` keeps
    (``adaptive`` without them chooses as ``mean_preserving`` does)."""
    if bank.victim_rule == "stream_mean" and evaluation.class_means != "stream":
        return "bank.eviction stream_mean needs eval.class_means stream (its target means)"
    return None
