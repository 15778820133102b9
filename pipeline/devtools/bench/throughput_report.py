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


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    raw = results["raw_consume"]["events_per_s"]
    ingest = results["ingest_only"]["events_per_s"]
    learner = results["learner_only"]["events_per_s"]
    e2e = results["end_to_end"]["events_per_s"]
    bank = results["memory_bank"]
    out = {
        "ingest_over_raw": round(ingest / raw, 3) if raw else None,
        "end_to_end_over_min_ingest_learner": (
            round(e2e / min(ingest, learner), 3) if min(ingest, learner) else None
        ),
        "replay_plus_search_share_of_step": bank["sample_plus_search_share"],
        "restart_s": results["restart"]["seconds"],
        "restart_s_without_group_join": (
            round(results["restart"]["seconds"] - results["restart"]["group_join_s"], 3)
            if "group_join_s" in results["restart"]
            else None
        ),
    }
    if "ingest_processes" in results:
        out["ingest_processes_over_raw"] = (
            round(results["ingest_processes"]["events_per_s"] / raw, 3) if raw else None
        )
    out["targets"] = {
        "ingest_over_raw >= 0.8": bool(out["ingest_over_raw"] and out["ingest_over_raw"] >= 0.8),
        "end_to_end_over_min >= 0.8": bool(
            out["end_to_end_over_min_ingest_learner"]
            and out["end_to_end_over_min_ingest_learner"] >= 0.8
        ),
        "replay+search <= 10% of step": bank["sample_plus_search_share"] <= 0.10,
        "restart <= 5 s": results["restart"]["seconds"] <= 5.0,
    }
    return out


def render_markdown(report: dict[str, Any]) -> str:
    r = report["results"]
    q = report["ratios"]
    m = report["machine"]
    b = r["memory_bank"]
    lat = r["latency"]
    lines = [
        "# Throughput benchmark",
        "",
        f"Command: `{report['command']}`  ",
        f"Date (UTC): {report['date_utc']}, total {report['total_s']} s  ",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu']}), GPU: {m['gpu'] or 'none'}, "
        f"torch {m['torch']} ({m['torch_threads']} threads), kafka-python {m['kafka_python']} "
        f"(crc32c: {m['crc32c']}), faiss {m['faiss']}; load average at start "
        f"{m['load_avg_at_start']}, at end {m['load_avg_at_end']}.",
        "",
        f"Stream: {report['events']} synthetic events, {report['input_dim']} features, "
        f"{report['classes']} classes, {report['partitions']} partitions; "
        f"batch size {r['learner_only']['batch_size']}, replay {r['learner_only']['replay_size']}"
        f" + {r['learner_only']['hard_negatives']} hard negatives per step.",
        "",
        "| stage | events | seconds | events/s |",
        "|---|---|---|---|",
    ]
    for key, title in (
        ("raw_consume", "raw consume (bare kafka-python)"),
        ("ingest_only", "ingest-only (source: poll, batch, decode, validate)"),
        (
            "learner_only",
            "learner-only (in-memory batches, real bank; mean of runs before and after e2e)",
        ),
        ("end_to_end", "end-to-end (learner process, first batch to final commit)"),
    ):
        row = r[key]
        lines.append(f"| {title} | {row['events']} | {row['seconds']} | {row['events_per_s']} |")
        if key == "ingest_only" and "ingest_processes" in r:
            row = r["ingest_processes"]
            lines.append(
                f"| ingest-only, {row['processes']} consumer processes "
                f"(`consumer.processes`) | {row['events']} | {row['seconds']} | "
                f"{row['events_per_s']} |"
            )
    lines += [
        "",
        "| ratio / target | value | met |",
        "|---|---|---|",
        f"| ingest-only / raw ≥ 0.8 | {q['ingest_over_raw']} | "
        f"{q['targets']['ingest_over_raw >= 0.8']} |",
        f"| end-to-end / min(ingest, learner) ≥ 0.8 | {q['end_to_end_over_min_ingest_learner']}"
        f" | {q['targets']['end_to_end_over_min >= 0.8']} |",
        f"| (replay sample + hard-negative search) / train iteration ≤ 0.10, "
        f"{b['bank_items']}-item bank | {b['sample_plus_search_share']} | "
        f"{q['targets']['replay+search <= 10% of step']} |",
        f"| restart to first trained batch ≤ 5 s, {r['restart']['bank_items']}-item bank | "
        f"{r['restart']['seconds']} s | {q['targets']['restart <= 5 s']} |",
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
        f"Restart: {r['restart']['seconds']} s from process start to the first trained batch; "
        f"after process start: group join started at {r['restart'].get('join_started_s')} s, "
        f"partitions assigned at {r['restart'].get('assigned_s')} s (join "
        f"{r['restart'].get('group_join_s')} s, set by the broker: Tansu takes about half of "
        f"consumer.session_timeout_ms), bank opened at {r['restart'].get('bank_opened_s')} s "
        f"(load {r['restart'].get('bank_load_s')} s, overlapping the join).",
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
