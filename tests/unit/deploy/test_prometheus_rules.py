"""deploy/prometheus: the alerting rules pass `promtool check rules` and their unit tests
(`promtool test rules`: every alert fires in one case and stays silent in another).

promtool comes with Debian's ``prometheus`` package (`make system-deps`, run by .ci/run);
these tests are skipped only where it is absent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
RULES = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")


def _alerts() -> set[str]:
    doc = yaml.safe_load((RULES / "alerts.yml").read_text())
    return {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=RULES, capture_output=True, text=True, timeout=120, check=False
    )


@needs_promtool
def test_rules_are_valid() -> None:
    done = _promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    done = _promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_fires_in_one_case_and_not_in_another() -> None:
    """The unit tests name every alert with an expected alert and with none."""
    doc = yaml.safe_load((RULES / "alerts_test.yml").read_text())
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    alerts = _alerts()
    assert len(alerts) >= 12
    assert alerts - fires == set()
    assert alerts - silent == set()


def test_every_alert_has_a_runbook_entry_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Operating it", 1)[1]
    missing = {a for a in _alerts() if f"`{a}`" not in section}
    assert missing == set()
