"""A real Prometheus for the tests: Debian's ``prometheus`` binary on a free loopback port,
scraping given targets every second, with ``deploy/prometheus/alerts.yml`` loaded.

Tests that need it skip where the binary is absent (`make system-deps` installs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.devtools.devstack import free_port

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "supcon-stream.json"
PROMETHEUS = shutil.which("prometheus")
T = TypeVar("T")


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; raises (HTTP 400) when the expression is invalid."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def targets_up(self) -> dict[str, str]:
        """{scrape URL: health} of the active targets."""
        data = self.api("targets")
        return {t["scrapeUrl"]: t["health"] for t in data["activeTargets"]}


def dashboard_queries() -> list[str]:
    """Every panel query (``expr``) of the Grafana dashboard, as written there."""
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in doc["panels"] for t in panel["targets"]]


def alert_expr(name: str) -> str:
    """The ``expr`` of alert ``name`` in alerts.yml."""
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == name:
                return str(rule["expr"])
    raise KeyError(name)


def poll(what: str, fn: Callable[[], T | None], timeout_s: float, every_s: float = 0.5) -> T:
    """``fn()`` until it returns something truthy; fails naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


@contextmanager
def running_prometheus(workdir: Path, jobs: Mapping[str, Sequence[str]]) -> Iterator[Prometheus]:
    """Prometheus scraping ``jobs`` ({job: ["127.0.0.1:port", ...]}) every second."""
    assert PROMETHEUS is not None, "prometheus is not installed"
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(targets)}]}
            for job, targets in jobs.items()
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        poll("prometheus ready", lambda: _ready(prom), timeout_s=60)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(prom: Prometheus) -> bool:
    if prom.proc.poll() is not None:
        raise AssertionError(f"prometheus exited: {prom.log.read_text()[-2000:]}")
    try:
        with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
