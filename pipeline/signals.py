"""Process signals shared by the long-running commands (learner, sidecar).

Torch-free on purpose: the sidecar process imports this module and must not load libtorch.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import structlog

log = structlog.get_logger(__name__)


def install_stop_signals(stop: threading.Event) -> None:
    """SIGTERM/SIGINT set ``stop``: the loop finishes its current unit of work and exits 0."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("stop requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
