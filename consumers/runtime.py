"""Process-wide settings for a process that runs a consumer thread at full rate.

The consumer thread allocates several container objects per event (the client's message, a
``SourceRecord``, its value-less copy in the batch, the batch's tuples); CPython's cyclic
garbage collector runs a young-generation pass every 700 such allocations and, every tenth and
hundredth of those, older passes over everything the process holds. Measured on the ingest
path, that was about a fifth of the consumer thread's time (docs/performance.md, "Two Kafka
clients"). The learner's objects are few and long-lived and its data live in numpy and torch
buffers the collector does not track, so passes that rare cost little memory.
"""

from __future__ import annotations

import gc
from typing import Final

# Allocations between two young-generation passes (CPython's default is 700).
GEN0_THRESHOLD: Final = 50_000


def tune_gc() -> None:
    """Raise the young generation's threshold to :data:`GEN0_THRESHOLD` (never lower it);
    the older generations keep their ratios."""
    gen0, gen1, gen2 = gc.get_threshold()
    if 0 < gen0 < GEN0_THRESHOLD:  # 0: the collector was switched off on purpose
        gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
