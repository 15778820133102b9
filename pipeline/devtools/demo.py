"""``supcon-stream demo``: the cross-entropy trap on one stream, end to end, on the devstack.

Steps: devstack up → topics → sidecar and three learners as separate processes in separate
consumer groups → the stream replayed once (``split-digits``, or ``--data``: another built-in
scenario or a labeled file, the learners' ``model.input_dim`` set to its width) → progress
while they learn → the sidecar's final forgetting records are read back from Kafka → a table
with a row per learner, also written to ``<out>/report.json``.

The three learners (:data:`ARMS`) are the honest comparison: ``ce`` without replay (the
cross-entropy trap), ``ce_replay`` (cross-entropy with experience replay) and ``supcon`` with
its memory bank. They share one configuration, so the two replay arms have the same memory
(``bank.*``), the same replay batch and the same optimizer steps per batch; only the objective
(and, for ``ce``, replay) differs. Each row also reports the learner's wall time per event
while it had work, so the accuracy is read beside what it cost. Every process it starts is
stopped by PID before it returns (the devstack too, unless it was already running or
``--keep-stack`` is given).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

from pipeline.config import Settings, load_settings
from pipeline.devtools.devstack import Devstack, free_port, stop_process
from pipeline.devtools.spawn import cli_command, set_args, spawn
from pipeline.exceptions import ConfigError, SupconStreamError
from pipeline.streams.scenarios import Scenario

log = structlog.get_logger(__name__)

SCENARIO = "split-digits"  # the stream the demo replays unless given ``--data``


@dataclass(frozen=True)
class Arm:
    """One learner of the demo: its name (learner and consumer group), objective and replay."""

    name: str
    objective: str
    replay: bool


ARMS = (
    Arm("ce", "ce", replay=False),
    Arm("ce_replay", "ce", replay=True),
    Arm("supcon", "supcon", replay=True),
)
LEARNERS = tuple(arm.name for arm in ARMS)
LEARNER_IDLE_EXIT_S = 6.0
_LOG_PROGRESS_EVERY_S = 5.0  # progress lines into a log (no terminal): at most this often
LEARNER_TIMEOUT_S = 200.0
# A longer stream gets this much more time per event (20 events/s, far below any learner's
# measured rate), so ``--data`` with a large file is not cut short.
LEARNER_TIMEOUT_PER_EVENT_S = 0.05
FINAL_METRICS_TIMEOUT_S = 60.0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path


def _start_child(name: str, command: str, args: list[str], out_dir: Path) -> Child:
    log_path = out_dir / f"{name}.log"
    proc = spawn(cli_command(command, *args), log_path, append=False, threads=1)
    return Child(name, proc, log_path)


def _start_learner(arm: Arm, base: list[str], http_port: int, out_dir: Path) -> Child:
    """One arm's learner: the shared settings ``base``, then its objective and replay."""
    args = [
        *base,
        "--objective",
        arm.objective,
        "--name",
        arm.name,
        "--set",
        f"train.replay={str(arm.replay).lower()}",
        "--set",
        "train.torch_threads=1",
        "--set",
        f"health.http_port={http_port}",
        "--exit-when-idle",
        str(LEARNER_IDLE_EXIT_S),
    ]
    return _start_child(arm.name, "learn", args, out_dir)


def _endpoints(ports: dict[str, int]) -> str:
    """Where the demo's processes serve their Prometheus metrics and health probes."""
    lines = ["metrics and health (while the demo runs):"]
    width = max(8, *(len(name) for name in ports))
    for name, port in ports.items():
        url = f"http://127.0.0.1:{port}"
        paths = "/metrics /healthz" if name == "sidecar" else "/metrics /healthz /readyz"
        lines.append(f"  {name:{width}} {url}  {paths}")
    return "\n".join(lines)


def _clear_namespace(settings: Settings) -> None:
    """Drop Redis keys left by an earlier demo in this namespace (the AOF keeps them)."""
    from memory_bank.redis_store import make_redis_client

    r = settings.redis
    client = make_redis_client(r.url, r.username, r.password, r.socket_timeout_s)
    try:
        keys = list(client.scan_iter(match=f"{r.key_prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


def _progress(settings: Settings, stop_when: Any) -> None:
    """Print one status line per second from the learners' telemetry until ``stop_when()``."""
    from memory_bank.redis_store import make_redis_client
    from pipeline.telemetry.channel import TelemetryReader
    from pipeline.telemetry.records import StepRecord

    r = settings.redis
    client = make_redis_client(r.url, r.username, r.password, r.socket_timeout_s)
    reader = TelemetryReader(client, r.key_prefix)
    cursors = dict.fromkeys(LEARNERS, "0-0")
    latest: dict[str, StepRecord] = {}
    tty = sys.stderr.isatty()
    last_line, next_line_at = "", 0.0
    try:
        while not stop_when():
            for rec in reader.read(cursors, block_ms=1000, count=1000):
                cursors[rec.learner] = rec.id
                if isinstance(rec.record, StepRecord):
                    latest[rec.learner] = rec.record
            parts = []
            for name in LEARNERS:
                p = latest.get(name)
                if p is None:
                    parts.append(f"{name}: waiting")
                    continue
                parts.append(
                    f"{name}: {p.events_total:>5} events, step {p.step:>5}, loss {p.loss:.3f}"
                    if p.loss is not None
                    else f"{name}: {p.events_total:>5} events, step {p.step:>5}"
                )
            line = " | ".join(parts)
            if tty:
                print("\r" + line, end="", file=sys.stderr, flush=True)
            elif line != last_line and time.monotonic() >= next_line_at:
                # A log (no terminal): a new line only when something moved, every few seconds.
                print(line, file=sys.stderr, flush=True)
                next_line_at = time.monotonic() + _LOG_PROGRESS_EVERY_S
            last_line = line
    finally:
        if tty:
            print(file=sys.stderr)
        client.close()


def _final_metrics(settings: Settings) -> dict[str, dict[str, Any]]:
    """Read the forgetting and loss topics until every learner's final record is there."""
    from kafka import KafkaConsumer

    k = settings.kafka
    consumer = KafkaConsumer(
        k.forgetting_topic,
        k.loss_topic,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=1000,
        **k.client_options(),
    )
    final: dict[str, dict[str, Any]] = {}
    loss: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + FINAL_METRICS_TIMEOUT_S
    try:
        while time.monotonic() < deadline and len(final) < len(LEARNERS):
            for msg in consumer:
                payload = orjson.loads(msg.value)
                name = payload.get("learner")
                if msg.topic == k.forgetting_topic and payload.get("final"):
                    final[name] = payload
                elif msg.topic == k.loss_topic:
                    loss[name] = payload
    finally:
        consumer.close()
    missing = [n for n in LEARNERS if n not in final]
    if missing:
        raise SupconStreamError(
            f"the sidecar published no final metrics for {missing} within "
            f"{FINAL_METRICS_TIMEOUT_S:.0f} s"
        )
    return {n: {"forgetting": final[n], "loss": loss.get(n, {})} for n in LEARNERS}


def _learner_result(child: Child) -> dict[str, Any]:
    """The JSON summary a learner prints on stdout as its last line."""
    for raw in reversed(child.log_path.read_text(errors="replace").splitlines()):
        line = raw.strip()
        if line.startswith("{") and '"learner"' in line:
            result: dict[str, Any] = json.loads(line)
            return result
    raise SupconStreamError(f"learner {child.name} printed no summary; see {child.log_path}")


def build_report(
    metrics: dict[str, dict[str, Any]], results: dict[str, dict[str, Any]], scenario: str
) -> dict[str, Any]:
    """``report.json``: one entry per learner, in :data:`ARMS` order."""
    arms = {arm.name: arm for arm in ARMS}
    learners: dict[str, Any] = {}
    for name, m in metrics.items():
        f = m["forgetting"]
        res = results[name]
        events_per_s = float(res["events_per_s"])
        arm = arms.get(name)
        learners[name] = {
            "objective": arm.objective if arm else res.get("objective"),
            "replay": arm.replay if arm else None,
            "final_avg_accuracy": round(float(f["avg_accuracy"]), 4),
            "avg_forgetting": round(float(f["avg_forgetting"]), 4),
            "per_task_accuracy": {
                str(t): round(float(a), 4) for t, a in sorted(f["per_task_accuracy"].items())
            },
            "events": int(res["consumed"]),
            "events_per_s": round(events_per_s, 1),
            # Compute parity: wall time per event while the learner had work (its inverse rate).
            "wall_ms_per_event": round(1000.0 / events_per_s, 3) if events_per_s > 0 else None,
            "classifier": f.get("classifier"),
            "anytime_avg_accuracy": f.get("anytime_avg_accuracy"),
            "trained": int(res["trained"]),
            "held_out": int(res["held_out"]),
            "dead_lettered": int(res["dead_lettered"]),
            "skipped_steps": int(res["skipped_steps"]),
        }
    return {"scenario": scenario, "learners": learners}


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def format_table(report: dict[str, Any]) -> str:
    learners = report["learners"]
    tasks = sorted({t for o in learners.values() for t in o["per_task_accuracy"]}, key=str)
    head = [
        "learner",
        "objective",
        "replay",
        "final avg acc",
        "avg forgetting",
        *[f"task {t}" for t in tasks],
        "events",
        "ms/event",
    ]
    rows = [head]
    for name, o in learners.items():
        rows.append(
            [
                name,
                str(o["objective"]),
                "yes" if o["replay"] else "no",
                f"{o['final_avg_accuracy']:.3f}",
                f"{o['avg_forgetting']:.3f}",
                *[f"{o['per_task_accuracy'].get(t, float('nan')):.3f}" for t in tasks],
                str(o["events"]),
                _ms(o["wall_ms_per_event"]),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return (
        f"scenario: {report['scenario']}\n"
        + "\n".join(lines)
        + "\nms/event: the learner's wall time per event while it had work (compute parity)"
    )


def learner_timeout_s(events: int) -> float:
    """How long the demo waits for its learners to finish a stream of ``events``."""
    return max(LEARNER_TIMEOUT_S, events * LEARNER_TIMEOUT_PER_EVENT_S)


def check_fits(settings: Settings, stream: Scenario, source: str) -> None:
    """A clear error before anything starts when the learners could not take the stream (every
    event would otherwise be dead-lettered for its width, or its label refused)."""
    m = settings.model
    input_dim, classes = stream.input_dim, len(stream.classes)
    if m.input_dim != input_dim:
        raise ConfigError(
            f"{source} has {input_dim} features per event but model.input_dim is "
            f"{m.input_dim}: drop the setting (the demo takes the stream's width) or match it"
        )
    if classes > m.max_classes:
        raise ConfigError(
            f"{source} has {classes} classes but model.max_classes is {m.max_classes}: "
            f"set --set model.max_classes={classes} or more"
        )


def _report(
    learners: dict[str, Child],
    settings: Settings,
    stream_name: str,
    out_dir: Path,
    started_at: float,
) -> dict[str, Any]:
    """Once the learners are done: their summaries and the sidecar's final records, as the
    table printed and ``<out>/report.json``."""
    for child in learners.values():
        code = child.proc.poll()
        if code != 0:
            raise SupconStreamError(
                f"learner {child.name} exited with {code}; see {child.log_path}"
            )
    results = {n: _learner_result(c) for n, c in learners.items()}
    report = build_report(_final_metrics(settings), results, stream_name)
    report["elapsed_s"] = round(time.monotonic() - started_at, 1)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(
        f"\nreport: {out_dir / 'report.json'}   logs: {out_dir}/*.log   "
        f"({report['elapsed_s']:.0f} s)"
    )
    return report


def run_demo(
    settings: Settings,
    config_path: Path | None,
    user_overrides: Sequence[str],
    out_dir: Path,
    keep_stack: bool = False,
    source: str = SCENARIO,
) -> dict[str, Any]:
    from consumers.admin import ensure_topics
    from pipeline.streams.playback import labeled_source, run_replay

    started_at = time.monotonic()
    # Read and checked before the devstack starts: a bad file or a width the learners would
    # refuse fails here, in a second, with nothing to stop.
    stream = labeled_source(source)
    width = f"model.input_dim={stream.input_dim}"
    check_fits(load_settings(config_path, [width, *user_overrides]), stream, source)
    d = settings.devstack
    stack = Devstack(d.dir, d.broker_port, d.redis_port)
    already_running = all(s["running"] for s in stack.status().values())
    state = stack.up()
    run_id = time.strftime("%Y%m%d-%H%M%S")
    # A reused broker may hold an earlier run's events: give this run its own topics.
    prefix = (
        settings.kafka.topic_prefix
        if not already_running
        else f"{settings.kafka.topic_prefix}-demo-{run_id}"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    # The user's own --set values first, then this run's addresses and namespace. The same
    # list configures this process and every child, so they cannot disagree.
    overrides = [
        # One partition keeps the stream class-incremental: a learner that lags behind the
        # replay would otherwise read 4 partitions one after the other, i.e. the 5 tasks 4
        # times over, and CE would seem not to forget (measured: CE without replay 0.884).
        # The user's own --set kafka.partitions still wins.
        "kafka.partitions=1",
        # The stream's width; a user's own --set model.input_dim comes later and must match.
        width,
        *user_overrides,
        f"kafka.bootstrap_servers={state.bootstrap_servers}",
        f"kafka.topic_prefix={prefix}",
        f"redis.url={state.redis_url}",
        f"redis.key_prefix={prefix}",
        f"checkpoint.dir={ckpt_dir}",
    ]
    run_settings = load_settings(config_path, overrides)
    children: list[Child] = []
    try:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        _clear_namespace(run_settings)
        k = run_settings.kafka
        ensure_topics(
            k.client_options(), k.all_topics(), k.partitions, k.replication_factor, timeout_s=30.0
        )
        base = [*(["--config", str(config_path)] if config_path else []), *set_args(overrides)]
        ports = {name: free_port() for name in ("sidecar", *LEARNERS)}
        sidecar_port = ["--set", f"sidecar.http_port={ports['sidecar']}"]
        children.append(_start_child("sidecar", "sidecar", [*base, *sidecar_port], out_dir))
        learners = {arm.name: _start_learner(arm, base, ports[arm.name], out_dir) for arm in ARMS}
        children.extend(learners.values())
        log.info("demo running", prefix=prefix, logs=str(out_dir))
        print(_endpoints(ports), flush=True)
        # The stream read and checked above, produced as it is (its file is not read twice).
        replayed = run_replay(run_settings, stream, rate=None, limit=None, seed=0, progress=None)
        log.info("stream replayed", source=source, events=replayed.as_dict())
        deadline = time.monotonic() + learner_timeout_s(len(stream))
        _progress(
            run_settings,
            lambda: (
                all(c.proc.poll() is not None for c in learners.values())
                or time.monotonic() > deadline
            ),
        )
        return _report(learners, run_settings, stream.name, out_dir, started_at)
    finally:
        for child in children:
            stop_process(child.proc.pid, timeout_s=15.0)
            with contextlib.suppress(Exception):
                child.proc.wait(timeout=1)
        if not already_running and not keep_stack:
            stack.down()
        elif keep_stack:
            log.info(
                "devstack left running",
                bootstrap=state.bootstrap_servers,
                redis=state.redis_url,
                topic_prefix=prefix,
            )
