"""A small HTTP server for probes and scrapes: ``GET <path>`` → one function's answer.

Learner, sidecar and ``serve`` all serve ``/healthz`` and ``/metrics`` (the learner also
``/readyz``) through this; torch-free, so the sidecar can use it. Each request runs on a
daemon thread of its own (``ThreadingHTTPServer``): a slow scrape never holds the process's
main loop. :func:`serve_metrics_and_healthz` is the pair sidecar and ``serve`` start, with a
liveness answer (:func:`liveness_route`) read from the loop's last progress.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import structlog

from pipeline.exceptions import SupconStreamError

log = structlog.get_logger(__name__)

# The Prometheus text format 0.0.4, which prometheus_client's generate_latest writes.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON = "application/json"

Answer = tuple[int, bytes, str]  # status, body, content type
Route = Callable[[], Answer]
# Histogram buckets of one micro-batch's duration (learner and serve): milliseconds on a GPU,
# up to seconds on a loaded CPU.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def json_answer(ok: bool, body: Any) -> Answer:
    """200 with ``body`` as JSON when ``ok``, else 503."""
    return (200 if ok else 503), orjson.dumps(body), JSON


def liveness_route(
    last_progress: Callable[[], float],
    stale_after_s: float,
    details: Callable[[], Mapping[str, Any]] = dict,
    clock: Callable[[], float] = time.monotonic,
) -> Route:
    """``/healthz``: 200 while the loop's last progress (a ``clock()`` reading) is at most
    ``stale_after_s`` old, 503 after; the body says so, with the age and ``details()``."""

    def healthz() -> Answer:
        age = clock() - last_progress()
        live = age <= stale_after_s
        return json_answer(live, {"live": live, "loop_age_s": round(age, 3), **details()})

    return healthz


def serve_metrics_and_healthz(
    render: Callable[[], bytes], healthz: Route, config_key: str, host: str, port: int
) -> EndpointServer:
    """Start ``GET /metrics`` (``render()``, the Prometheus text format) and ``/healthz`` on
    ``host:port`` (0 = any free port); ``config_key`` names the port setting in errors."""

    def metrics() -> Answer:
        return 200, render(), METRICS_CONTENT_TYPE

    server = EndpointServer({"/healthz": healthz, "/metrics": metrics}, config_key)
    server.start(host, port)
    log.info("serving /metrics and /healthz", address=f"http://{host}:{server.port}")
    return server


class EndpointServer:
    """Serves ``routes`` ({path: function}) on ``host:port`` from a daemon thread."""

    def __init__(self, routes: Mapping[str, Route], config_key: str) -> None:
        self.routes = dict(routes)
        self.config_key = config_key  # named in the error when the port is taken
        self._server: ThreadingHTTPServer | None = None

    def start(self, host: str, port: int) -> None:
        try:
            self._server = ThreadingHTTPServer((host, port), _handler_for(self.routes))
        except OSError as exc:
            raise SupconStreamError(
                f"{self.config_key}: cannot serve on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self._server.daemon_threads = True
        name = f"http:{self.config_key}"
        threading.Thread(target=self._server.serve_forever, name=name, daemon=True).start()

    @property
    def port(self) -> int | None:
        return int(self._server.server_address[1]) if self._server is not None else None

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


def _handler_for(routes: Mapping[str, Route]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's naming
            route = routes.get(self.path.split("?")[0])
            if route is None:
                self.send_error(404)
                return
            code, body, content_type = route()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # base class signature
            return  # probes and scrapes every few seconds would flood the log

    return Handler
