"""Health of a running learner: its dependencies (Kafka, Redis) and its progress.

A learner cut off from Kafka or Redis must not look like a quiet stream. Every component
that can lose its connection reports through a plain callback, ``report(error)`` while
failing and ``report(None)`` once it works again (the consumer thread, the producer flush,
the Redis bank store). :class:`HealthBoard` keeps that state and the loop's progress, and

* a daemon thread rewrites ``<checkpoint.dir>/<name>/health.json`` every ``health.every_s``
  (atomically: write a temp file, then rename), also while the training thread is blocked in a
  retry, which is exactly when the file matters;
* optionally serves the same JSON on ``GET /healthz`` (HTTP 200 when ``ok``, 503 otherwise),
  for an orchestrator's probe.

``supcon-stream status`` reads the files (:func:`read_status`); a file older than
``health.stale_after_s`` means the learner is gone or hung.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import structlog

from pipeline.exceptions import SupconStreamError

log = structlog.get_logger(__name__)

HEALTH_FILE = "health.json"
Reporter = Callable[[str | None], None]


class HealthBoard:
    """Thread-safe state: components up/down with the error and since when, plus progress."""

    def __init__(self, learner: str, path: Path | None = None) -> None:
        self.learner = learner
        self.path = path
        self._lock = threading.Lock()
        self._components: dict[str, dict[str, Any]] = {}
        self._progress: dict[str, Any] = {}
        self._state = "starting"
        self._started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: ThreadingHTTPServer | None = None

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
        self.write()

    # ---- reading --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            components = {k: dict(v) for k, v in self._components.items()}
            progress = dict(self._progress)
            state = self._state
        if state == "running" and not all(c["up"] for c in components.values()):
            state = "degraded"
        return {
            "learner": self.learner,
            "pid": os.getpid(),
            "status": state,
            "updated": round(time.time(), 3),
            "started": round(self._started, 3),
            "components": components,
            "progress": progress,
        }

    def write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
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
            try:
                self._server = ThreadingHTTPServer((http_host, http_port), _handler_for(self))
            except OSError as exc:
                raise SupconStreamError(
                    f"health.http_port: cannot serve /healthz on {http_host}:{http_port}: "
                    f"{exc.strerror or exc}"
                ) from None
            self._server.daemon_threads = True
            threading.Thread(target=self._server.serve_forever, name="healthz", daemon=True).start()
            log.info("serving /healthz", address=f"http://{http_host}:{self.http_port}/healthz")

    @property
    def http_port(self) -> int | None:
        return int(self._server.server_address[1]) if self._server is not None else None

    def close(self, final_state: str = "stopped") -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.set_state(final_state)

    def _write_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.write()


def _up() -> dict[str, Any]:
    return {"up": True, "since": time.time(), "error": None, "outages": 0}


def _handler_for(board: HealthBoard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's naming
            if self.path.split("?")[0] != "/healthz":
                self.send_error(404)
                return
            snap = board.snapshot()
            body = orjson.dumps(snap)
            self.send_response(200 if snap["status"] == "running" else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # base class signature
            return  # probes every few seconds would flood the log

    return Handler


def health_path(checkpoint_dir: Path) -> Path:
    return checkpoint_dir / HEALTH_FILE


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
        report[name] = snap
    return report


def healthy(report: dict[str, Any]) -> bool:
    """True when at least one learner is known and every one is running or cleanly stopped."""
    return bool(report) and all(s.get("status") in ("running", "stopped") for s in report.values())


def stop_quietly(board: HealthBoard | None, final_state: str) -> None:
    if board is not None:
        with contextlib.suppress(Exception):
            board.close(final_state)
