"""`make demo` prints where its processes serve metrics and health."""

from __future__ import annotations

from pipeline.devtools.demo import _endpoints


def test_endpoints_name_every_process_and_its_paths() -> None:
    text = _endpoints({"sidecar": 4001, "supcon": 4002, "ce": 4003})
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0].startswith("metrics and health")
    assert "sidecar  http://127.0.0.1:4001  /metrics /healthz" in lines
    assert "supcon   http://127.0.0.1:4002  /metrics /healthz /readyz" in lines
    assert "ce       http://127.0.0.1:4003  /metrics /healthz /readyz" in lines


def test_a_long_learner_name_keeps_the_urls_aligned() -> None:
    text = _endpoints({"sidecar": 4001, "ce_replay": 4002})
    lines = text.splitlines()[1:]
    assert len({line.index("http://") for line in lines}) == 1
