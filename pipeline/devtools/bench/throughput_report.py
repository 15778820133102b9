"""The machine, the ratios and the Markdown of a ``bench throughput`` report.

Kept apart from :mod:`pipeline.devtools.bench.throughput`, which runs the stages: this part
only reads the results dictionary.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    """What the run ran on; also applies the learner's torch thread default to this process."""
    import kafka
    import torch

    from pipeline.learning.tuning import default_torch_threads

    threads = default_torch_threads(torch.device("cpu"))
    if threads:
        torch.set_num_threads(threads)

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "kafka_python": kafka.__version__,
    }
    try:
        import confluent_kafka

        info["confluent_kafka"] = confluent_kafka.version()
        info["librdkafka"] = confluent_kafka.libversion()[0]
    except ImportError:
        info["confluent_kafka"] = info["librdkafka"] = None
    try:
        import crc32c  # noqa: F401

        info["crc32c"] = True
    except ImportError:
        info["crc32c"] = False
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    return info


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 3) if den else None


def client_ratios(row: dict[str, Any], learner: float) -> dict[str, Any]:
    """The ratios of one client's stages (``row``: raw_consume, parse_floor, ingest_only...)."""
    raw = row["raw_consume"]["events_per_s"]
    floor = row["parse_floor"]["events_per_s"]
    ingest = row["ingest_only"]["events_per_s"]
    out: dict[str, Any] = {
        "ingest_over_raw": _ratio(ingest, raw),
        "ingest_over_parse_floor": _ratio(ingest, floor),
        # Per event: what the source adds to the bare client (decode, batching, hand-off).
        "ingest_us_per_event": round(1e6 / ingest, 3) if ingest else None,
        "client_us_per_event": round(1e6 / raw, 3) if raw else None,
    }
    if "end_to_end" in row:
        e2e = row["end_to_end"]["events_per_s"]
        out["end_to_end_over_min_ingest_learner"] = _ratio(e2e, min(ingest, learner))
    if "ingest_processes" in row:
        out["ingest_processes_over_raw"] = _ratio(row["ingest_processes"]["events_per_s"], raw)
    return out


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    learner = results["learner_only"]["events_per_s"]
    bank = results["memory_bank"]
    clients = {name: client_ratios(row, learner) for name, row in results["clients"].items()}
    ingest = {name: row["ingest_only"]["events_per_s"] for name, row in results["clients"].items()}
    restart_runs = [r["seconds"] for r in results["restart"].get("runs", [results["restart"]])]
    out: dict[str, Any] = {
        "clients": clients,
        "confluent_over_kafka_python_ingest": _ratio(
            ingest.get("confluent", 0.0), ingest.get("kafka-python", 0.0)
        ),
        "replay_plus_search_share_of_step": bank["sample_plus_search_share"],
        "restart_s": results["restart"]["seconds"],
        "restart_runs_s": restart_runs,
        "restart_s_without_group_join": (
            round(results["restart"]["seconds"] - results["restart"]["group_join_s"], 3)
            if "group_join_s" in results["restart"]
            else None
        ),
    }
    targets: dict[str, bool] = {}
    confluent = clients.get("confluent")
    if confluent is not None:
        targets["confluent ingest / parse floor >= 0.8"] = (
            confluent["ingest_over_parse_floor"] or 0.0
        ) >= 0.8
        targets["confluent ingest / kafka-python ingest >= 3"] = (
            out["confluent_over_kafka_python_ingest"] or 0.0
        ) >= 3.0
    for name, row in clients.items():
        targets[f"{name} end_to_end / min(ingest, learner) >= 0.8"] = (
            row.get("end_to_end_over_min_ingest_learner") or 0.0
        ) >= 0.8
    targets["replay+search <= 10% of step"] = bank["sample_plus_search_share"] <= 0.10
    targets["restart <= 5 s in every run"] = all(s <= 5.0 for s in restart_runs)
    out["targets"] = targets
    return out


def _client_rows(r: dict[str, Any], q: dict[str, Any]) -> list[str]:
    lines = [
        "| stage | " + " | ".join(r["clients"]) + " |",
        "|---|" + "---|" * len(r["clients"]),
    ]
    for key, title in (
        ("raw_consume", "raw consume (bare client), events/s"),
        ("parse_floor", "parse floor (bare client + orjson.loads per record), events/s"),
        ("ingest_only", "ingest-only (source: poll, batch, decode, validate), events/s"),
        ("ingest_processes", "ingest-only, `consumer.processes` processes, events/s"),
        ("end_to_end", "end-to-end (learner process, first batch to final commit), events/s"),
    ):
        cells = [
            str(row[key]["events_per_s"]) if key in row else "-" for row in r["clients"].values()
        ]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    for key, title in (
        ("ingest_over_raw", "ingest-only / raw"),
        ("ingest_over_parse_floor", "ingest-only / parse floor"),
        ("end_to_end_over_min_ingest_learner", "end-to-end / min(ingest, learner)"),
        ("client_us_per_event", "client, µs per event"),
        ("ingest_us_per_event", "ingest, µs per event"),
    ):
        cells = [str(row.get(key, "-")) for row in q["clients"].values()]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return lines


def _target_rows(q: dict[str, Any]) -> list[str]:
    t = q["targets"]
    rows = []
    if "confluent" in q["clients"]:
        c = q["clients"]["confluent"]
        rows += [
            f"| confluent: ingest-only / parse floor ≥ 0.8 | {c['ingest_over_parse_floor']} | "
            f"{t['confluent ingest / parse floor >= 0.8']} |",
            f"| confluent ingest-only / kafka-python ingest-only ≥ 3 | "
            f"{q['confluent_over_kafka_python_ingest']} | "
            f"{t['confluent ingest / kafka-python ingest >= 3']} |",
        ]
    for name, row in q["clients"].items():
        key = f"{name} end_to_end / min(ingest, learner) >= 0.8"
        rows.append(
            f"| {name}: end-to-end / min(ingest, learner) ≥ 0.8 | "
            f"{row.get('end_to_end_over_min_ingest_learner')} | {t[key]} |"
        )
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    r = report["results"]
    q = report["ratios"]
    m = report["machine"]
    b = r["memory_bank"]
    lat = r["latency"]
    d = r["decode"]
    lines = [
        "# Throughput benchmark",
        "",
        f"Command: `{report['command']}`  ",
        f"Date (UTC): {report['date_utc']}, total {report['total_s']} s  ",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu']}), GPU: {m['gpu'] or 'none'}, "
        f"torch {m['torch']} ({m['torch_threads']} threads), kafka-python {m['kafka_python']}, "
        f"confluent-kafka {m.get('confluent_kafka')} (librdkafka {m.get('librdkafka')}) "
        f"(crc32c: {m['crc32c']}), faiss {m['faiss']}; load average at start "
        f"{m['load_avg_at_start']}, at end {m['load_avg_at_end']}.",
        "",
        f"Stream: {report['events']} synthetic events end to end "
        f"({report.get('ingest_events', report['events'])} per ingest round), "
        f"{report['input_dim']} features, "
        f"{report['classes']} classes, {report['partitions']} partitions; "
        f"batch size {r['learner_only']['batch_size']}, replay {r['learner_only']['replay_size']}"
        f" + {r['learner_only']['hard_negatives']} hard negatives per step.",
        "",
        *_client_rows(r, q),
        "",
        f"Decode alone, offline ({d['events']} events, batches of {d['batch_size']}): "
        f"`orjson.loads` alone {d['orjson_loads_us_per_event']} µs per event; `decode_batch` "
        f"(native scanner, validation, matrix) {d['decode_batch_us_per_event']} µs, "
        f"{d.get('native_over_loads')} × `orjson.loads`; through the reference path alone "
        f"{d.get('decode_batch_reference_path_us_per_event')} µs.",
        "",
        f"Learner-only (in-memory batches, real bank; mean of the runs before and after the "
        f"end-to-end stages): {r['learner_only']['events_per_s']} events/s.",
        "",
        "| ratio / target | value | met |",
        "|---|---|---|",
        *_target_rows(q),
        f"| (replay sample + hard-negative search) / train iteration ≤ 0.10, "
        f"{b['bank_items']}-item bank | {b['sample_plus_search_share']} | "
        f"{q['targets']['replay+search <= 10% of step']} |",
        f"| restart to first trained batch ≤ 5 s in every run, {r['restart']['bank_items']}-item "
        f"bank | {q['restart_runs_s']} s | {q['targets']['restart <= 5 s in every run']} |",
        "",
        f"Memory bank ({b['bank_items']} items, index `{b['index']}`, "
        f"{b['hard_negative_queries']} queries searched every {b['hard_negative_every']} "
        "iterations):",
        "",
        f"- fill: {b['fill_items_per_s']} items/s in adds of {b['fill_chunk']}; "
        f"per-batch add of {b['add_batch_size']} to the full bank: {b['add_ms_per_batch']} ms "
        f"({b['add_items_per_s']} items/s, evictions included)",
        f"- per train iteration (one `learn_batch` call, {b['iters_per_batch']} step(s)): "
        f"sample {b['sample_ms']} ms, hard-negative search {b['search_ms']} ms (max "
        f"{b['search_ms_max']} ms), train step with the query forward {b['train_step_ms']} ms, "
        f"write-back + index refresh {b['writeback_and_refresh_ms']} ms, add of the batch "
        f"{b['batch_add_ms']} ms, total {b['iteration_ms']} ms",
        "",
        f"Restart (slowest of the runs): {r['restart']['seconds']} s from process start to the "
        f"first trained batch. After process start: group join started at "
        f"{r['restart'].get('join_started_s')} s, partitions assigned at "
        f"{r['restart'].get('assigned_s')} s (join {r['restart'].get('group_join_s')} s, set "
        f"by the broker: Tansu takes about half of consumer.session_timeout_ms); the bank's "
        f"snapshot read from Redis (on a thread, from the start) at "
        f"{r['restart'].get('bank_read_s')} s; torch imported and the checkpoint read (start "
        f"position handed to the source) at {r['restart'].get('offsets_known_s')} s; model and "
        f"optimizer built at {r['restart'].get('model_built_s')} s; the bank's mirror restored "
        f"(restore "
        f"{r['restart'].get('bank_load_s')} s) at {r['restart'].get('bank_opened_s')} s.",
        "",
        f"Latency at {lat['offered_events_per_s']} events/s offered "
        f"(batch {lat['batch_size']}, max_latency_ms {lat['max_latency_ms_setting']}): "
        f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms over "
        f"{lat['events']} events.",
        "",
        "Train step by torch intra-op threads: "
        + ", ".join(f"{k.removeprefix('step_ms_')}: {v} ms" for k, v in r["torch_threads"].items())
        + ".",
        "",
        "GPU: not measured (no GPU on this machine).",
        "",
    ]
    return "\n".join(lines)
