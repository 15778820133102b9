"""The second figure of ``compare``: final accuracy per class, and forgetting per memory size.

matplotlib is imported only here, to draw (``pip install 'supcon-stream[bench]'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.devtools.bench.forgetting import JOINT_METHODS, BenchConfig, RunResult
from pipeline.devtools.bench.forgetting_report import label_of
from pipeline.exceptions import ConfigError


def plot_per_class(
    results: Sequence[RunResult], cfg: BenchConfig, class_names: Sequence[str], path: Path
) -> None:
    """Left: final accuracy per class at the largest memory, one bar group per class.
    Right: forgetting (mean over seeds) against memory size, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError(
            "the compare plots need matplotlib: pip install 'supcon-stream[bench]'"
        ) from exc
    memory = max(cfg.memories)
    methods = [m for m in cfg.methods if m not in JOINT_METHODS]
    fig, (bars, lines) = plt.subplots(
        1, 2, figsize=(max(8.0, 0.5 * len(class_names) * len(methods) / 2 + 5), 4.2)
    )
    width = 0.8 / max(1, len(methods))
    positions = np.arange(len(class_names))
    for k, method in enumerate(methods):
        runs = [r for r in results if r.method == method and r.memory in (memory, 0)]
        if not runs:
            continue
        means = [
            float(np.mean([r.per_class.get(str(c), np.nan) for r in runs]))
            for c in range(len(class_names))
        ]
        bars.bar(positions + k * width, means, width, label=label_of(method, cfg.extra_methods))
        by_memory = sorted({r.memory for r in results if r.method == method})
        forgetting = [
            float(np.mean([r.forgetting for r in results if r.method == method and r.memory == m]))
            for m in by_memory
        ]
        xs = by_memory if by_memory != [0] else list(cfg.memories)
        ys = forgetting if by_memory != [0] else forgetting * len(cfg.memories)
        lines.plot(xs, ys, marker="o", label=label_of(method, cfg.extra_methods))
    bars.set_xticks(positions + 0.4 - width / 2, [str(c)[:10] for c in class_names], rotation=45)
    bars.set_ylim(0, 1.02)
    bars.set_title(f"final accuracy per class, memory {memory}")
    bars.grid(alpha=0.3, axis="y")
    lines.set_xscale("log")
    lines.set_xlabel("memory (bank items)")
    lines.set_title("forgetting ↓")
    lines.grid(alpha=0.3)
    lines.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
