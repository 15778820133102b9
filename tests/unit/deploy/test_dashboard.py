"""The Grafana dashboard and the alert rules name only series the code exports (or that the
rules record): a renamed series cannot leave a silent panel or an alert that never fires.
(The e2e monitoring test also runs every dashboard query against a real Prometheus.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry
from prometheus_tools import dashboard_queries

from pipeline.config import SloSettings
from pipeline.learner.exposition import LearnerExposition
from pipeline.serving.exposition import ServeExposition
from pipeline.sidecar.exposition import SidecarExposition

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "supcon-stream.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
_NAME = re.compile(r"\bsupcon[_:][A-Za-z0-9_:]*")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def _exported(registry: CollectorRegistry) -> set[str]:
    return {m.name + suffix for m in registry.collect() for suffix in _SUFFIXES.get(m.type, ("",))}


def _known_series() -> set[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    learner = LearnerExposition("l", "supcon", max_classes=4).registry
    sidecar = SidecarExposition(max_labels=4, slo=SloSettings()).registry
    serve = ServeExposition("l", stale_after_s=30.0).registry
    return _exported(learner) | _exported(sidecar) | _exported(serve) | recorded


def test_dashboard_names_only_exported_series() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    used = {name for q in queries for name in _NAME.findall(q)}
    assert used - _known_series() == set()


def test_alert_rules_name_only_exported_series() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    used = {n for g in rules["groups"] for r in g["rules"] for n in _NAME.findall(r["expr"])}
    assert used - _known_series() == set()


def test_dashboard_has_the_panels_operators_look_for() -> None:
    titles = " ".join(p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]).lower()
    for word in ("throughput", "lag", "loss", "per-class accuracy", "forgetting", "matrix"):
        assert word in titles
