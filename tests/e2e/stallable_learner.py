"""``python stallable_learner.py STALL_FILE ARGS...``: ``supcon-stream ARGS...`` whose training
blocks while STALL_FILE exists: a hung step on purpose, for the liveness tests. The learner
is otherwise the real one (``pipeline.cli.main``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pipeline.learner.process as process
from pipeline.cli import main

STALL = Path(sys.argv[1])
_train_on = process._train_on


def _stalled_train_on(*args: Any, **kwargs: Any) -> Any:
    while STALL.exists():
        time.sleep(0.05)
    return _train_on(*args, **kwargs)


process._train_on = _stalled_train_on

if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))
