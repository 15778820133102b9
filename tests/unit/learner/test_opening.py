"""What ``learn`` opens before torch: importing it must not load torch (the restart overlap)."""

from __future__ import annotations

import subprocess
import sys


def test_opening_the_learners_connections_loads_no_torch() -> None:
    code = (
        "import sys\n"
        "import pipeline.cli, pipeline.learner.opening, pipeline.distributed.rank_info\n"
        "import memory_bank.redis_store\n"
        "print('torch' in sys.modules, 'faiss' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "False"]
