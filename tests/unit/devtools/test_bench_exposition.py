"""`bench exposition`: its render stage fills every per-class series (no timing asserted)."""

from __future__ import annotations

from pipeline.devtools.bench.exposition import measure_render, measure_update, render_markdown


def test_render_stage_measures_bodies_with_every_class() -> None:
    result = measure_render(classes=100, renders=3)
    # bank items per class (learner); accuracy and forgetting per class + a 10x10 matrix.
    assert result["learner"]["series"] > 100
    assert result["sidecar"]["series"] > 2 * 100 + 100
    assert result["learner"]["median_ms"] > 0
    report = {
        "command": "supcon-stream bench exposition",
        "machine": {"cpu_count": 2, "torch": "x"},
        "render": result,
        "update": measure_update(calls=10),
        "end_to_end": {
            "runs": [
                {"metrics": False, "events": 10, "seconds": 1.0, "events_per_s": 10.0},
                {"metrics": True, "events": 10, "seconds": 1.0, "events_per_s": 9.0, "scrapes": 1},
            ],
            "off_mean": 10.0,
            "on_mean": 9.0,
            "on_over_off": 0.9,
            "off_spread": 0.0,
        },
    }
    text = render_markdown(report)
    assert "| learner |" in text
    assert "µs (`batch_done`, 10 calls)" in text
    assert "on/off = 0.9" in text
