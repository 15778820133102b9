"""Health of a running learner: its dependencies (Kafka, Redis) and its progress.

A learner cut off from Kafka or Redis must not look like a quiet stream. Every component
that can lose its connection reports through a plain callback, ``report(error)`` while
failing and ``report(None)`` once it works again (the consumer thread, the producer flush,
the Redis bank store). :class:`HealthBoard` keeps that state and the loop's progress, and

* a daemon thread rewrites ``<checkpoint.dir>/<name>/health.json`` every ``health.every_s``
  (atomically: write a temp file, then rename), also while the training thread is blocked in a
  retry, which is exactly when the file matters;
* optionally serves, on ``health.http_port``:

  - ``GET /healthz``, liveness: the same JSON, HTTP 200 while ``running``, 503 otherwise;
    a loop that has made no progress (no batch handled, no idle tick: :meth:`tick`) for
    ``health.stale_after_s`` turns the status to ``unresponsive``, so a hung training step
    fails the probe even though this thread still answers;
  - ``GET /readyz``, readiness: 200 only once partitions are assigned, the checkpoint is
    restored and the bank is loaded (:meth:`mark_ready`), and the loop is live;
  - ``GET /metrics``, the Prometheus exposition (:mod:`pipeline.learner.exposition`).

``supcon-stream status`` reads the files (:func:`read_status`); a file older than
``health.stale_after_s`` means the learner is gone, a status ``unresponsive`` that its loop
is hung.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import structlog

from pipeline.http_endpoints import METRICS_CONTENT_TYPE, Answer, EndpointServer, json_answer

log = structlog.get_logger(__name__)

HEALTH_FILE = "health.json"
# What /readyz waits for; each is set by the component that does it (mark_ready).
READINESS = ("partitions_assigned", "checkpoint_restored", "bank_loaded")
Reporter = Callable[[str | None], None]


class HealthBoard:
    """Thread-safe state: components up/down with the error and since when, plus progress."""

    def __init__(
        self,
        learner: str,
        path: Path | None = None,
        stale_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.learner = learner
        self.path = path
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._last_tick = clock()
        self._ready = dict.fromkeys(READINESS, False)
        self._render_metrics: Callable[[], bytes] | None = None
        self._lock = threading.Lock()
        # One writer at a time: the background writer and a reported change share the temp
        # file, and a write that snapshot the state before a change must not land after it.
        self._write_lock = threading.Lock()
        self._components: dict[str, dict[str, Any]] = {}
        self._progress: dict[str, Any] = {}
        self._state = "starting"
        self._failure: str | None = None  # why the learner failed (set on close)
        self._started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: EndpointServer | None = None

    # ---- reporting ------------------------------------------------------------------------

    def reporter(self, component: str) -> Reporter:
        """A callback for one component: ``report(error_text)`` or ``report(None)``."""
        with self._lock:
            self._components.setdefault(component, _up())

        def report(error: str | None) -> None:
            self._set(component, error)

        return report

    def _set(self, component: str, error: str | None) -> None:
        now = time.time()
        with self._lock:
            entry = self._components.setdefault(component, _up())
            was_up = entry["up"]
            if error is None:
                if was_up:
                    return
                down_s = round(now - entry["since"], 3)
                entry.update(up=True, since=now, error=None, last_outage_s=down_s)
            else:
                entry["error"] = error[:300]
                if not was_up:
                    return
                entry.update(up=False, since=now, outages=entry["outages"] + 1)
        if error is None:
            log.info("dependency recovered", component=component, down_s=down_s)
        else:
            log.warning("dependency unavailable", component=component, error=error[:300])
        self.write()

    def progress(self, **fields: Any) -> None:
        with self._lock:
            self._progress.update(fields)

    def set_state(self, state: str) -> None:
        with self._lock:
            self._state = state
            self._last_tick = self._clock()  # staleness counts from the loop's start
        self.write()

    def tick(self) -> None:
        """The loop made progress (a batch handled or an idle wait ended)."""
        self._last_tick = self._clock()  # one float store: no lock on the hot path

    def mark_ready(self, part: str, value: bool = True) -> None:
        """One of :data:`READINESS` is (or is no longer) done."""
        with self._lock:
            self._ready[part] = value

    def serve_metrics(self, render: Callable[[], bytes]) -> None:
        """Serve ``render()`` (the Prometheus text format) on ``GET /metrics``."""
        self._render_metrics = render

    def loop_age_s(self) -> float:
        return self._clock() - self._last_tick

    def live(self) -> bool:
        """False once the running loop has been stuck for more than ``stale_after_s``."""
        with self._lock:
            state = self._state
        return state != "running" or self.loop_age_s() <= self.stale_after_s

    def readiness(self) -> dict[str, bool]:
        with self._lock:
            return dict(self._ready)

    def ready(self) -> bool:
        with self._lock:
            parts_done = all(self._ready.values())
            state = self._state
        return parts_done and state == "running" and self.live()

    # ---- reading --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            components = {k: dict(v) for k, v in self._components.items()}
            progress = dict(self._progress)
            state = self._state
            readiness = dict(self._ready)
            failure = self._failure
        loop_age = self.loop_age_s()
        if state == "running" and loop_age > self.stale_after_s:
            state = "unresponsive"
        elif state == "running" and not all(c["up"] for c in components.values()):
            state = "degraded"
        return {
            "learner": self.learner,
            "pid": os.getpid(),
            "status": state,
            "updated": round(time.time(), 3),
            "started": round(self._started, 3),
            "components": components,
            "progress": progress,
            "loop_age_s": round(loop_age, 3),
            "readiness": readiness,
            "failure": failure,
        }

    def write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with self._write_lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(orjson.dumps(self.snapshot(), option=orjson.OPT_INDENT_2))
                os.replace(tmp, self.path)
        except OSError as exc:  # health reporting must never stop the learner
            log.warning("cannot write the health file", path=str(self.path), error=str(exc))

    # ---- background writer and /healthz ---------------------------------------------------

    def start(
        self, every_s: float, http_host: str = "127.0.0.1", http_port: int | None = None
    ) -> None:
        self.write()
        self._thread = threading.Thread(
            target=self._write_loop, args=(every_s,), name="health-writer", daemon=True
        )
        self._thread.start()
        if http_port is not None:
            routes = {"/healthz": self._healthz, "/readyz": self._readyz, "/metrics": self._metrics}
            self._server = EndpointServer(routes, "health.http_port")
            self._server.start(http_host, http_port)
            log.info(
                "serving /healthz, /readyz and /metrics",
                address=f"http://{http_host}:{self.http_port}",
            )

    @property
    def http_port(self) -> int | None:
        return self._server.port if self._server is not None else None

    def _healthz(self) -> Answer:
        snap = self.snapshot()
        return json_answer(snap["status"] == "running", snap)

    def _readyz(self) -> Answer:
        ready = self.ready()
        return json_answer(ready, {"ready": ready, "live": self.live(), **self.readiness()})

    def _metrics(self) -> Answer:
        if self._render_metrics is None:
            return 404, b"no metrics\n", "text/plain"
        return 200, self._render_metrics(), METRICS_CONTENT_TYPE

    def close(self, final_state: str = "stopped", failure: str | None = None) -> None:
        """Write the final state, with ``failure`` (what stopped a failed learner), and stop."""
        with self._lock:
            self._failure = failure
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._server is not None:
            self._server.close()
        self.set_state(final_state)

    def _write_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.write()


def _up() -> dict[str, Any]:
    return {"up": True, "since": time.time(), "error": None, "outages": 0}


def health_path(checkpoint_dir: Path, rank: int = 0) -> Path:
    """``health.json`` (a single learner, rank 0); rank r of a group: ``health-rank<r>.json``."""
    return checkpoint_dir / (HEALTH_FILE if rank == 0 else f"health-rank{rank}.json")


def read_status(
    checkpoint_root: Path, stale_after_s: float, names: list[str] | None = None
) -> dict[str, Any]:
    """Status of every learner with a health file under ``checkpoint_root`` (or of ``names``).

    Each entry is the learner's last snapshot plus ``age_s``; a ``running``/``degraded``
    snapshot older than ``stale_after_s`` is reported as ``unresponsive``; a learner named
    but without a file as ``unknown``.
    """
    wanted = names or sorted(
        p.parent.name for p in checkpoint_root.glob(f"*/{HEALTH_FILE}") if p.is_file()
    )
    report: dict[str, Any] = {}
    now = time.time()
    for name in wanted:
        path = health_path(checkpoint_root / name)
        try:
            snap = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            report[name] = {"learner": name, "status": "unknown", "file": str(path)}
            continue
        age_s = now - float(snap.get("updated", 0))
        # Compare the exact age: rounded first, an age just past a small stale_after_s
        # would read as 0.0 and a hung learner as running. The rounding is for display.
        snap["age_s"] = round(age_s, 1)
        if snap.get("status") in ("running", "degraded", "starting") and age_s > stale_after_s:
            snap["status"] = "unresponsive"
        ranks = _rank_files(checkpoint_root / name, now, stale_after_s)
        if ranks:
            snap["ranks"] = ranks  # the other ranks of a data-parallel group, by rank
        report[name] = snap
    return report


def _rank_files(directory: Path, now: float, stale_after_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in sorted(directory.glob("health-rank*.json")):
        try:
            snap = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        age_s = now - float(snap.get("updated", 0))
        status = snap.get("status")
        if status in ("running", "degraded", "starting") and age_s > stale_after_s:
            status = "unresponsive"
        progress = snap.get("progress", {})
        out[path.stem.removeprefix("health-rank")] = {
            "status": status,
            "pid": snap.get("pid"),
            "age_s": round(age_s, 1),
            **{k: progress.get(k) for k in ("step", "consumed", "model_digest")},
        }
    return out


def healthy(report: dict[str, Any]) -> bool:
    """True when at least one learner is known and every one is running or cleanly stopped."""
    return bool(report) and all(s.get("status") in ("running", "stopped") for s in report.values())


def stop_quietly(board: HealthBoard | None, final_state: str, failure: str | None = None) -> None:
    if board is not None:
        with contextlib.suppress(Exception):
            board.close(final_state, failure)
