"""Makes a lost broker connection visible: the consumer thread asks after every ``poll``.

Both clients reconnect on their own, backing off from ``reconnect_backoff_ms`` to
``reconnect_backoff_max_ms``; :class:`BrokerWatch` only reports the outage (a log line, and
the ``on_health`` callback: an error text while cut off, None once back).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from consumers.client import ConsumerClient

_BROKER_LOST_S: Final = 2.0  # no broker connection for this long counts as an outage
_PROBE_EVERY_S: Final = 1.0


class BrokerWatch:
    """Tracks whether any broker connection is up; reports a loss lasting over 2 s.

    Owned by the consumer thread; ``on_health`` is told each change.
    """

    def __init__(
        self, servers: Any, logger: Any, on_health: Callable[[str | None], None] | None = None
    ) -> None:
        self._servers = servers
        self._log = logger
        self._on_health = on_health
        self._lost_at: float | None = None
        self._reported_down = False
        self._next_probe = 0.0

    def observe(self, client: ConsumerClient, got_records: bool) -> None:
        """After a ``poll``: records prove a connection; otherwise probe about once a second."""
        now = time.monotonic()
        if not got_records and now < self._next_probe:
            return
        self._next_probe = now + _PROBE_EVERY_S
        connected = got_records or client.connected()
        if connected is None:
            return
        if connected:
            self._lost_at = None
            if self._reported_down:
                self._reported_down = False
                self._log.info("broker connection restored")
                self._health(None)
            return
        if self._lost_at is None:
            self._lost_at = now
        elif not self._reported_down and now - self._lost_at >= _BROKER_LOST_S:
            self._reported_down = True
            self._log.warning(
                "broker unreachable; reconnecting with backoff",
                bootstrap_servers=self._servers,
                since_s=round(now - self._lost_at, 1),
            )
            self._health(f"no connection to any broker of {self._servers}")

    def _health(self, error: str | None) -> None:
        if self._on_health is not None:
            self._on_health(error)
