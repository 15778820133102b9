"""``supcon-stream compare`` from the command line: split-digits is the forgetting benchmark,
a labeled file brings its own dimension and classes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

TINY = ["--seeds", "1", "--memories", "20", "--methods", "ce_finetune,supcon"]
FAST = ["--set", "train.iters_per_batch=1", "--log-level", "WARNING"]


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _table(path) -> list[str]:
    """The table's rows without the last column, train ms/event: a timing, not a result."""
    rows = [line for line in path.read_text().splitlines() if line.startswith("|")]
    return [row.rstrip(" |").rsplit("|", 1)[0] for row in rows]


def test_compare_split_digits_reproduces_the_bench_forgetting_table(tmp_path):
    bench = _cli("bench", "forgetting", *TINY, *FAST, "--out", str(tmp_path / "bench"))
    assert bench.returncode == 0, bench.stderr
    compare = _cli("compare", "split-digits", *TINY, *FAST, "--out", str(tmp_path / "cmp"))
    assert compare.returncode == 0, compare.stderr
    rows = _table(tmp_path / "bench" / "forgetting.md")
    # The main table (header, rule, CE fine-tune, SupCon + bank), then the read-outs of the
    # same runs (header, rule, one row per arm; SupCon's adds NCM over the bank, its stream
    # means read by cosine and sdc_class).
    assert len(rows) == 8
    assert rows[4].endswith("| ncm | ncm_bank | ncm_cosine ")  # the last, sdc_class, is cut
    assert _table(tmp_path / "cmp" / "compare.md") == rows


def test_compare_on_a_labeled_file_writes_table_json_and_plots(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2, 3], 75)  # two tasks of two classes, in stream order
    means = rng.normal(0, 1, (4, 12))
    x = (means[y] + 0.3 * rng.normal(0, 1, (len(y), 12))).astype(np.float32)
    data = tmp_path / "mine.npz"
    np.savez(data, X=x, y=np.asarray(["a", "b", "c", "d"])[y], task=y // 2)

    result = _cli("compare", str(data), *TINY, *FAST, "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary["final_accuracy"]) == {"ce_finetune@0", "supcon@20"}
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert report["config"]["data"] == "mine.npz"
    supcon = next(r for r in report["runs"] if r["method"] == "supcon")
    assert set(supcon["per_class"]) == {"0", "1", "2", "3"}
    for name in ("compare.md", "compare.png", "compare-per-class.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "compare [" in result.stderr  # the progress bar


def test_compare_bad_input_is_one_line(tmp_path):
    one_class = tmp_path / "one.npz"
    np.savez(one_class, X=np.zeros((50, 3), dtype=np.float32), y=np.zeros(50, dtype=np.int64))
    for source in (str(one_class), str(tmp_path / "missing.npz")):
        result = _cli("compare", source, "--out", str(tmp_path / "out"), timeout=120)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
