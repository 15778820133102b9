"""The throughput report's arithmetic and text, from a made-up result set."""

from __future__ import annotations

from pathlib import Path

from pipeline.devtools.bench.throughput_bank import restart_breakdown
from pipeline.devtools.bench.throughput_report import ratios, render_markdown


def _row(events_per_s: float) -> dict:
    return {"events": 100, "seconds": round(100 / events_per_s, 3), "events_per_s": events_per_s}


def _results() -> dict:
    return {
        "clients": {
            "kafka-python": {
                "raw_consume": _row(100.0),
                "parse_floor": _row(90.0),
                "ingest_only": _row(80.0),
                "end_to_end": _row(40.0),
            },
            "confluent": {
                "raw_consume": _row(1000.0),
                "parse_floor": _row(300.0),
                "ingest_only": _row(250.0),
                "ingest_processes": _row(400.0),
                "end_to_end": _row(30.0),
            },
        },
        "decode": {
            "events": 100,
            "batch_size": 32,
            "orjson_loads_us_per_event": 5.0,
            "decode_batch_us_per_event": 7.0,
            "decode_batch_reference_path_us_per_event": 9.0,
            "native_over_loads": 0.5,
        },
        "learner_only": {
            "events": 50,
            "seconds": 1.0,
            "events_per_s": 50.0,
            "batch_size": 32,
            "replay_size": 64,
            "hard_negatives": 16,
        },
        "memory_bank": {
            "bank_items": 1000,
            "index": "auto",
            "hard_negative_queries": 32,
            "hard_negative_every": 2,
            "fill_items_per_s": 1.0,
            "fill_chunk": 1000,
            "add_batch_size": 32,
            "add_ms_per_batch": 1.0,
            "add_items_per_s": 1.0,
            "sample_ms": 0.1,
            "search_ms": 0.2,
            "search_ms_max": 1.0,
            "train_step_ms": 2.0,
            "writeback_and_refresh_ms": 0.1,
            "batch_add_ms": 0.5,
            "iters_per_batch": 1,
            "iteration_ms": 3.0,
            "sample_plus_search_share": 0.1,
        },
        "restart": {
            "bank_items": 1000,
            "seconds": 6.0,
            "group_join_s": 3.0,
            "runs": [{"seconds": 4.0}, {"seconds": 6.0}, {"seconds": 4.5}],
        },
        "latency": {
            "offered_events_per_s": 10.0,
            "batch_size": 32,
            "max_latency_ms_setting": 250,
            "p50_ms": 100.0,
            "p99_ms": 200.0,
            "max_ms": 300.0,
            "events": 20,
        },
        "torch_threads": {"step_ms_1_threads": 2.0, "step_ms_2_threads": 3.0},
    }


def test_ratios_and_targets() -> None:
    q = ratios(_results())
    kp, cf = q["clients"]["kafka-python"], q["clients"]["confluent"]
    assert kp["ingest_over_raw"] == 0.8
    assert kp["end_to_end_over_min_ingest_learner"] == 0.8  # 40 / min(80, 50)
    assert cf["ingest_over_parse_floor"] == 0.833
    assert cf["end_to_end_over_min_ingest_learner"] == 0.6  # 30 / min(250, 50)
    assert cf["ingest_processes_over_raw"] == 0.4
    assert cf["ingest_us_per_event"] == 4000.0
    assert q["confluent_over_kafka_python_ingest"] == 3.125
    assert q["restart_runs_s"] == [4.0, 6.0, 4.5]
    assert q["restart_s_without_group_join"] == 3.0
    assert q["targets"] == {
        "confluent ingest / parse floor >= 0.8": True,
        "confluent ingest / kafka-python ingest >= 3": True,
        "kafka-python end_to_end / min(ingest, learner) >= 0.8": True,
        "confluent end_to_end / min(ingest, learner) >= 0.8": False,
        "replay+search <= 10% of step": True,
        "restart <= 5 s in every run": False,
    }


def test_markdown_names_the_command_machine_and_gpu_status() -> None:
    report = {
        "command": "supcon-stream bench throughput",
        "date_utc": "2026-01-01T00:00:00Z",
        "total_s": 1.0,
        "events": 100,
        "input_dim": 64,
        "classes": 20,
        "partitions": 4,
        "machine": {
            "cpu_count": 2,
            "cpu": "x",
            "gpu": None,
            "torch": "2",
            "torch_threads": 1,
            "kafka_python": "3",
            "crc32c": True,
            "faiss": "1",
            "load_avg_at_start": [0.0],
            "load_avg_at_end": [0.0],
        },
        "results": _results(),
    }
    report["ratios"] = ratios(report["results"])
    text = render_markdown(report)
    assert "`supcon-stream bench throughput`" in text
    assert "2 CPUs" in text
    assert "GPU: not measured" in text
    assert "| confluent: ingest-only / parse floor ≥ 0.8 | 0.833 | True |" in text
    assert "| confluent: end-to-end / min(ingest, learner) ≥ 0.8 | 0.6 | False |" in text
    assert (
        "| ingest-only (source: poll, batch, decode, validate), events/s | 80.0 | 250.0 |" in text
    )
    assert "| ingest-only, `consumer.processes` processes, events/s | - | 400.0 |" in text
    assert "[4.0, 6.0, 4.5] s | False |" in text


def test_restart_phases_from_log_timestamps(tmp_path: Path) -> None:
    log = tmp_path / "learner.log"
    log.write_text(
        "2026-01-01T00:00:01.000000Z [info ] kafka source started group=g\n"
        "2026-01-01T00:00:01.500000Z [info ] bank read items=3 seconds=0.5\n"
        "2026-01-01T00:00:02.000000Z [info ] start position set group=g\n"
        "2026-01-01T00:00:02.250000Z [info ] vector_index_selected kind=mirror\n"
        "2026-01-01T00:00:02.500000Z [info ] memory_bank_opened items=3 seconds=1.25\n"
        "2026-01-01T00:00:04.000000Z [info ] partitions assigned group=g\n"
    )
    started = 1767225600.0  # 2026-01-01T00:00:00Z
    phases = restart_breakdown(log, started)
    assert phases["join_started_s"] == 1.0
    assert phases["assigned_s"] == 4.0
    assert phases["group_join_s"] == 3.0
    assert phases["bank_load_s"] == 1.25
    assert phases["bank_read_s"] == 1.5
    assert phases["offsets_known_s"] == 2.0
    assert phases["model_built_s"] == 2.25
    assert phases["bank_opened_s"] == 2.5


def test_median_round_keeps_every_rate() -> None:
    from pipeline.devtools.bench.throughput import _median_round

    runs = [
        {"events_per_s": 3.0, "n": 1},
        {"events_per_s": 1.0, "n": 2},
        {"events_per_s": 2.0, "n": 3},
    ]
    assert _median_round(runs) == {"events_per_s": 2.0, "n": 3, "rounds": [3.0, 1.0, 2.0]}
    two = _median_round(runs[:2])  # an even count: the lower middle
    assert (two["n"], two["rounds"]) == (2, [3.0, 1.0])
