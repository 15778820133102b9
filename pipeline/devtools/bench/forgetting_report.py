"""Report of ``bench forgetting``: mean ± 95% interval per (method, memory), as Markdown, JSON
and a PNG of accuracy-over-time curves.

The interval is Student's t over seeds: ``mean ± t(0.975, n−1) · sd / √n`` (0 for one seed).
matplotlib is imported only to draw the PNG (``pip install 'supcon-stream[bench]'``).
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.devtools.bench.forgetting import (
    JOINT_METHODS,
    METHOD_NAMES,
    METHODS,
    BenchConfig,
    Method,
    RunResult,
)
from pipeline.devtools.bench.margins import RESAMPLES, Margin, versus_baseline
from pipeline.exceptions import ConfigError

METRICS = ("final_accuracy", "forgetting", "anytime_accuracy", "min_accuracy")
COLUMNS = (*METRICS, "ncm_final_accuracy", "ece", "train_ms_per_event")


@dataclass(frozen=True)
class Stat:
    mean: float
    half_width: float  # 95% interval half-width
    n: int

    def text(self) -> str:
        return f"{self.mean:.3f} ± {self.half_width:.3f}"


def interval(values: Sequence[float]) -> Stat | None:
    """Mean and 95% Student-t half-width; None for no values."""
    if not values:
        return None
    n = len(values)
    mean = float(np.mean(values))
    if n == 1:
        return Stat(mean, 0.0, 1)
    from scipy.stats import t

    sd = float(np.std(values, ddof=1))
    return Stat(mean, float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n), n)


def label_of(method: str, extra: Sequence[Method] = ()) -> str:
    for m in (*METHODS, *extra):
        if m.name == method:
            return m.label
    return JOINT_METHODS[method][0] if method in JOINT_METHODS else method


@dataclass(frozen=True)
class Row:
    method: str
    memory: int
    stats: dict[str, Stat | None]  # one per COLUMNS
    seconds: float
    # Final accuracy of every read-out the runs scored (RunResult.readout_accuracy).
    readouts: dict[str, Stat | None] = field(default_factory=dict)


def summarise(results: Sequence[RunResult]) -> list[Row]:
    """One row per (method, memory), in the order the runs first appear."""
    groups: dict[tuple[str, int], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.method, r.memory), []).append(r)
    rows = []
    for (method, memory), runs in groups.items():
        stats: dict[str, Stat | None] = {}
        for key in COLUMNS:
            values = [getattr(r, key) for r in runs if getattr(r, key) is not None]
            stats[key] = interval(values)
        names = dict.fromkeys(name for r in runs for name in r.readout_accuracy)
        readouts = {
            name: interval([r.readout_accuracy[name] for r in runs if name in r.readout_accuracy])
            for name in names
        }
        rows.append(Row(method, memory, stats, sum(r.seconds for r in runs), readouts))
    # CE fine-tune (no memory) first, then by memory, the joint bounds last.
    return sorted(
        rows,
        key=lambda row: (row.method in JOINT_METHODS, row.memory, _order(row.method)),
    )


def _order(method: str) -> int:
    return METHOD_NAMES.index(method) if method in METHOD_NAMES else len(METHOD_NAMES)


def _cell(stat: Stat | None) -> str:
    return stat.text() if stat is not None else "–"


def markdown(
    rows: Sequence[Row],
    cfg: BenchConfig,
    wall_s: float,
    png_name: str,
    per_class_png: str | None = None,
    margins: Sequence[Margin] = (),
) -> str:
    head = (
        "| memory | method | final avg accuracy | forgetting ↓ | anytime accuracy | "
        "min accuracy (stability gap) | final accuracy, NCM | ECE ↓ | train ms/event |\n"
        "|---:|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {row.memory or '–'} | {label_of(row.method, cfg.extra_methods)} | "
        + " | ".join(_cell(row.stats[k]) for k in COLUMNS)
        + " |\n"
        for row in rows
    )
    t = cfg.train
    return (
        _title(cfg)
        + f"{cfg.seeds} seeds, memories {', '.join(map(str, cfg.memories))}, stream batch "
        f"{cfg.stream_batch}, replay batch ≤ {t.replay_size}, {t.iters_per_batch} optimizer "
        f"steps per incoming batch, evaluation every {cfg.eval_every} batches and at each "
        f"task end. Mean ± 95% t-interval over seeds. Wall time {wall_s:.0f} s "
        f"({platform.machine()}, torch threads {_threads()}).\n\n"
        "CE fine-tune has no memory (its row is memory-independent); the joint rows are "
        "offline upper bounds. Accuracies use each method's natural classifier (the head "
        f"for CE, NCM for SupCon, to the {_means_kind(cfg)}); the NCM column applies NCM to "
        "every method; ECE is the final expected calibration error of the natural classifier "
        "(15 bins); train ms/event is the wall time of the learner's batch function "
        "(training, replay, bank upkeep and, when the learner keeps stream class means (its "
        "NCM reads them or its bank's eviction aims at them), following the encoder; no "
        "evaluation) per training event: the compute each method spent.\n\n"
        + head
        + body
        + _readout_table(rows, cfg)
        + _margin_table(margins)
        + f"\n![accuracy over the stream]({png_name})\n"
        + (f"\n![final accuracy per class]({per_class_png})\n" if per_class_png else "")
    )


def _readout_table(rows: Sequence[Row], cfg: BenchConfig) -> str:
    """Final accuracy of every read-out of the same runs, when some run has more than its
    natural classifier and NCM (empty otherwise)."""
    names = list(dict.fromkeys(name for row in rows for name in row.readouts))
    if not set(names) - {"head", "ncm"}:
        return ""
    head = "| memory | method | " + " | ".join(names) + " |\n" + "|---:|---|" + "---|" * len(names)
    body = "".join(
        f"| {row.memory or '–'} | {label_of(row.method, cfg.extra_methods)} | "
        + " | ".join(_cell(row.readouts.get(name)) for name in names)
        + " |\n"
        for row in rows
        if row.readouts
    )
    return (
        "\nFinal average accuracy of each read-out of the same runs (`readout_accuracy` in the "
        "JSON): `head` the CE head, `ncm` NCM to the learner's class means (`eval.class_means`: "
        "by default running class means of the stream moved by semantic drift compensation, "
        "read through a shared within-class covariance, `eval.covariance_shrinkage`), "
        "`ncm_bank` / `ncm_stream` NCM to the other kind (the bank re-encoded / the stream "
        "means), `ncm_cosine` the learner's stream means read by cosine alone, `sdc_class` "
        "stream means moved by the drift of the class's own bank items, "
        "`ensemble` the softmax average of the head and NCM, `ema` the natural classifier "
        "read with an exponential moving average of the weights (`--ema-decay`; NCM over the "
        "bank); the table above keeps each method's natural classifier.\n\n" + head + "\n" + body
    )


def _margin_table(margins: Sequence[Margin]) -> str:
    """SupCon + bank against CE + ER per memory (empty when the two did not both run)."""
    if not margins:
        return ""
    body = "".join(
        f"| {m.memory} | {len(m.seeds)} | {_points(m)} | {min(m.per_seed):+.1f} to "
        f"{max(m.per_seed):+.1f} | {_share_text(m)} |\n"
        for m in margins
    )
    return (
        "\nSupCon + bank against CE + ER (`versus_ce_er` in the JSON), over the seeds both ran: "
        "the paired margin in accuracy points (mean ± 95% t-interval of the per-seed "
        "differences, and the lowest and highest seed), and the share of CE + ER's gap to the "
        "offline joint bound that SupCon closes, (SupCon − CE + ER) / (joint − CE + ER) over "
        f"the means, with a 95% interval from resampling the seeds ({RESAMPLES:,} draws); "
        "the bound is SupCon's own where it ran, else CE's (– where neither ran on those "
        "seeds).\n\n"
        "| memory | seeds | margin (points) | per seed | share of the gap closed |\n"
        "|---:|---:|---|---|---|\n" + body
    )


def _points(m: Margin) -> str:
    stat = interval(m.per_seed)
    return "–" if stat is None else f"{stat.mean:+.1f} ± {stat.half_width:.1f}"


def _share_text(m: Margin) -> str:
    if m.share is None:
        return "–"
    share = m.share
    bound = label_of(share.joint)
    if share.resamples == 0:
        return f"{100 * share.value:.1f}% ({bound}; one seed: no interval)"
    return f"{100 * share.value:.1f}% ({100 * share.low:.0f}-{100 * share.high:.0f}%; {bound})"


def _means_kind(cfg: BenchConfig) -> str:
    if cfg.eval.class_means == "stream":
        return "class means of the stream that follow the encoder, `eval.class_means: stream`"
    return "class means of the re-encoded bank, `eval.class_means: bank`"


def _title(cfg: BenchConfig) -> str:
    if cfg.data_name == "split-digits":
        return "# Forgetting benchmark: split-digits, online class-incremental\n\n"
    return f"# Objectives compared on {cfg.data_name}: online, one pass in recorded order\n\n"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def to_json(
    rows: Sequence[Row],
    results: Sequence[RunResult],
    cfg: BenchConfig,
    wall_s: float,
    margins: Sequence[Margin] = (),
) -> dict[str, Any]:
    return {
        "config": {
            "data": cfg.data_name,
            "memories": list(cfg.memories),
            "seeds": cfg.seeds,
            "methods": list(cfg.methods),
            "stream_batch": cfg.stream_batch,
            "eval_every": cfg.eval_every,
            "joint_epochs": cfg.joint_epochs,
            "train": cfg.train.model_dump(mode="json"),
        },
        "wall_s": round(wall_s, 2),
        "summary": [
            {
                "method": row.method,
                "label": label_of(row.method, cfg.extra_methods),
                "memory": row.memory,
                **{k: _stat_json(s) for k, s in row.stats.items()},
                "readouts": {k: _stat_json(s) for k, s in row.readouts.items()},
            }
            for row in rows
        ],
        "versus_ce_er": [_margin_json(m) for m in margins],
        "runs": [asdict(r) for r in results],
    }


def _margin_json(m: Margin) -> dict[str, Any]:
    stat = interval(m.per_seed)
    return {
        "memory": m.memory,
        "seeds": list(m.seeds),
        "margin_points": _stat_json(stat),
        "per_seed_points": list(m.per_seed),
        # NaN is not JSON: a one-seed share has null bounds.
        "gap_closed": None
        if m.share is None
        else {
            "share": m.share.value,
            "ci95_low": None if m.share.resamples == 0 else m.share.low,
            "ci95_high": None if m.share.resamples == 0 else m.share.high,
            "joint": m.share.joint,
            "resamples": m.share.resamples,
        },
    }


def _stat_json(s: Stat | None) -> dict[str, float] | None:
    return None if s is None else {"mean": s.mean, "ci95": s.half_width, "n": s.n}


def plot(results: Sequence[RunResult], cfg: BenchConfig, path: Path) -> None:
    """Mean accuracy over seen classes vs events seen, one panel per memory size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError(
            "the forgetting plot needs matplotlib: pip install 'supcon-stream[bench]'"
        ) from exc
    memories = list(cfg.memories)
    fig, axes = plt.subplots(1, len(memories), figsize=(4.2 * len(memories), 3.9), sharey=True)
    axes = np.atleast_1d(axes)
    joint = [r.final_accuracy for r in results if r.method in JOINT_METHODS]
    for ax, memory in zip(axes, memories, strict=True):
        for method in [m.name for m in (*METHODS, *cfg.extra_methods) if m.name in cfg.methods]:
            mine = [r for r in results if r.method == method]
            # CE fine-tune has no memory: its one run per seed is drawn in every panel.
            runs = [r for r in mine if r.memory == memory] or mine
            if not runs:
                continue
            length = min(len(r.curve) for r in runs)
            x = [p[0] for p in runs[0].curve[:length]]
            y = np.mean([[p[1] for p in r.curve[:length]] for r in runs], axis=0)
            ax.plot(x, y, label=label_of(method, cfg.extra_methods), linewidth=1.4)
        if joint:
            ax.axhline(max(joint), color="grey", linestyle=":", label="joint (best offline)")
        ax.set_title(f"memory {memory}")
        ax.set_xlabel("training events seen")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy over classes seen")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(
    results: Sequence[RunResult],
    cfg: BenchConfig,
    out_dir: Path,
    wall_s: float,
    stem: str = "forgetting",
    class_names: Sequence[str] | None = None,
) -> dict[str, Path]:
    """``<out_dir>/<stem>.{md,json,png}``; with ``class_names`` also ``<stem>-per-class.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarise(results)
    paths = {
        "markdown": out_dir / f"{stem}.md",
        "json": out_dir / f"{stem}.json",
        "png": out_dir / f"{stem}.png",
    }
    plot(results, cfg, paths["png"])
    if class_names is not None:
        from pipeline.devtools.bench.compare_plots import plot_per_class

        paths["per_class_png"] = out_dir / f"{stem}-per-class.png"
        plot_per_class(results, cfg, class_names, paths["per_class_png"])
    per_class_name = paths["per_class_png"].name if "per_class_png" in paths else None
    margins = versus_baseline(results)
    paths["markdown"].write_text(
        markdown(rows, cfg, wall_s, paths["png"].name, per_class_name, margins)
    )
    paths["json"].write_text(json.dumps(to_json(rows, results, cfg, wall_s, margins), indent=1))
    return paths
