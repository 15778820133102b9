"""``supcon-stream`` command line.

Every command takes ``--config FILE`` (YAML, see configs/) and repeatable ``--set key=value``
overrides; environment variables ``SUPCON_STREAM__SECTION__KEY`` apply in between. Any
configuration or usage error prints one line and exits 2; a lost dependency (broker, Redis)
prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import structlog

from pipeline.config import OBJECTIVES, Settings, load_settings
from pipeline.exceptions import ConfigError, SupconStreamError
from pipeline.logs import configure_logging
from pipeline.redaction import redact_argv

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage plus the message; one clear line is what we promise.
        self.exit(EXIT_USAGE, f"supcon-stream: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        help="YAML settings file (default: the built-in "
        "defaults of pipeline/config.py, whose addresses match the devstack)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set train.lr=0.01 (repeatable)",
    )
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--json-logs", action="store_true", help="structured JSON log lines")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="supcon-stream", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    learn = sub.add_parser("learn", help="run a learner (consumer group member) until stopped")
    _common(learn)
    learn.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help="shortcut for --set train.objective=...",
    )
    learn.add_argument("--name", help="learner name (group, bank, checkpoints, telemetry)")
    learn.add_argument("--max-events", type=_positive_int, help="exit after consuming N events")
    learn.add_argument(
        "--exit-when-idle",
        type=_positive_float,
        metavar="SECONDS",
        help="exit after this long without new events",
    )
    learn.add_argument(
        "--from",
        dest="start_from",
        metavar="POSITION",
        help="where a learner without a checkpoint starts: earliest, latest, an ISO-8601 time "
        "or epoch ms (a time past the end means the end)",
    )
    learn.add_argument(
        "--reset",
        action="store_true",
        help="start a fresh lineage: old checkpoints and bank set aside (default --from earliest)",
    )

    side = sub.add_parser("sidecar", help="publish rolling loss and forgetting metrics to Kafka")
    _common(side)

    replay = sub.add_parser(
        "replay",
        help="produce a built-in scenario, a labeled file (JSONL, CSV, NPZ, Parquet) "
        "or a slice of a topic (topic:NAME)",
    )
    _common(replay)
    replay.add_argument(
        "source",
        help="scenario (split-digits, domain-digits, blurry-digits, gaussian-drift), a file, "
        "or topic:NAME",
    )
    pace = replay.add_mutually_exclusive_group()
    pace.add_argument(
        "--rate", type=_positive_float, help="events/s (default: as fast as possible)"
    )
    pace.add_argument(
        "--speed",
        type=_positive_float,
        metavar="X",
        help="topic:NAME only: X times the original pace (by record timestamps, see --pace-by)",
    )
    replay.add_argument("--limit", type=_positive_int, help="produce at most N events")
    replay.add_argument("--seed", type=int, default=0, help="scenario shuffle seed")
    _add_topic_slice_options(replay)

    dev = sub.add_parser("devstack", help="embedded broker + redis-server on loopback")
    _common(dev)
    dev.add_argument("action", choices=["up", "down", "status"])
    dev.add_argument(
        "--durable", action="store_true", help="up: broker log in a local S3 server (moto)"
    )

    topics = sub.add_parser("topics", help="create the pipeline's topics if missing")
    _common(topics)

    demo = sub.add_parser("demo", help="devstack + split-digits through supcon and ce learners")
    _common(demo)
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="report folder")
    demo.add_argument(
        "--keep-stack",
        action="store_true",
        help="leave the devstack running afterwards (to inspect the topics)",
    )

    show = sub.add_parser("config", help="print the effective settings (secrets redacted)")
    _common(show)

    _add_compare(sub)
    bench = sub.add_parser("bench", help="benchmarks: forgetting (in-process), throughput")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    _add_bench_forgetting(bench_sub)
    _add_bench_throughput(bench_sub)
    status = sub.add_parser(
        "status", help="health of the learners under checkpoint.dir (exit 1 unless all healthy)"
    )
    _common(status)
    status.add_argument(
        "--learner", action="append", dest="learners", help="only this learner (repeatable)"
    )
    return parser


def _add_topic_slice_options(replay: argparse.ArgumentParser) -> None:
    replay.add_argument(
        "--from",
        dest="start_from",
        metavar="POSITION",
        help="topic:NAME only: first record (earliest, latest, ISO-8601 time, epoch ms or "
        "partition:offset,...; default earliest)",
    )
    replay.add_argument(
        "--until",
        metavar="POSITION",
        help="topic:NAME only: first record NOT copied (time or partition:offset,...; "
        "default: the end when the replay starts)",
    )
    replay.add_argument(
        "--pace-by",
        choices=["record", "event"],
        default="record",
        help="--speed follows the record timestamps or the events' ts field",
    )
    replay.add_argument(
        "--to-prefix",
        metavar="P",
        help="produce into P.events instead of kafka.topic_prefix's (backfill a new learner)",
    )


def _add_compare(sub: argparse._SubParsersAction[_Parser]) -> None:
    compare = sub.add_parser(
        "compare", help="CE vs CE + replay vs SupCon + bank on split-digits, a file or topic:NAME"
    )
    _common(compare)
    compare.add_argument("source", help="split-digits, a labeled file, or topic:NAME")
    compare.add_argument("--memories", help="comma-separated bank sizes (default: per source)")
    compare.add_argument("--seeds", type=_positive_int, help="seeds 0..N-1 (default: per source)")
    compare.add_argument("--methods", help="comma-separated subset (default: per source)")
    compare.add_argument("--out", type=Path, default=Path("runs/compare"), help="report folder")
    compare.add_argument("--threads", type=_positive_int, default=1, help="torch threads")
    compare.add_argument(
        "--from", dest="start_from", metavar="POSITION", help="topic:NAME slice start"
    )
    compare.add_argument("--until", metavar="POSITION", help="topic:NAME slice end (exclusive)")


def _add_bench_forgetting(bench_sub: argparse._SubParsersAction[_Parser]) -> None:
    forgetting = bench_sub.add_parser(
        "forgetting", help="split-digits online: CE vs SupCon + bank, forgetting table and plot"
    )
    _common(forgetting)
    forgetting.add_argument(
        "--memories", default="20,50,100,200", help="comma-separated bank sizes"
    )
    forgetting.add_argument("--seeds", type=_positive_int, default=5, help="seeds 0..N-1")
    forgetting.add_argument("--methods", help="comma-separated subset (default: all)")
    forgetting.add_argument("--out", type=Path, default=Path("runs/bench"), help="report folder")
    forgetting.add_argument(
        "--threads", type=_positive_int, default=1, help="torch threads (tiny MLP: 1 is fastest)"
    )


def _add_bench_throughput(bench_sub: argparse._SubParsersAction[_Parser]) -> None:
    tp = bench_sub.add_parser(
        "throughput", help="raw/ingest/learner/end-to-end rates, bank costs, restart, latency"
    )
    _common(tp)
    tp.add_argument("--events", type=_positive_int, default=200_000, help="stream length")
    tp.add_argument("--bank-items", type=_positive_int, default=100_000, help="bank size")
    tp.add_argument(
        "--learner-events",
        type=_positive_int,
        default=60_000,
        help="events through the learner-only stage (at most --events)",
    )
    tp.add_argument(
        "--latency-rate",
        type=_positive_float,
        help="offered load of the latency stage, events/s (default: half the end-to-end rate)",
    )
    tp.add_argument(
        "--latency-seconds", type=_positive_float, default=10.0, help="latency stage length"
    )
    tp.add_argument(
        "--consumer-processes",
        type=_positive_int,
        default=2,
        help="also measure ingest-only with this many consumer processes (1 = skip)",
    )
    tp.add_argument("--out", type=Path, default=Path("runs/bench"), help="report folder")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = list(args.overrides)
    if getattr(args, "objective", None):
        overrides.append(f"train.objective={args.objective}")
    if getattr(args, "name", None):
        overrides.append(f"learner.name={args.name}")
    settings = load_settings(args.config, overrides)
    level = args.log_level or settings.logging.level
    configure_logging(level, args.json_logs or settings.logging.json_logs)
    return settings


def _cmd_learn(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.learner.loop import RunLimits, run_learner
    from pipeline.learner.start import StartRequest, check_request
    from pipeline.signals import install_stop_signals

    request = StartRequest.from_args(args.start_from, args.reset)
    check_request(settings, request)
    log.info("configuration", settings=settings.redacted())
    stop = threading.Event()
    install_stop_signals(stop)
    summary = run_learner(settings, stop, RunLimits(args.max_events, args.exit_when_idle), request)
    print(
        json.dumps(
            {
                "learner": summary.name,
                "objective": summary.objective,
                "steps": summary.steps,
                "skipped_steps": summary.skipped_steps,
                "events_per_s": round(summary.events_per_s, 1),
                "bank_size": summary.bank_size,
                "first_batch_to_commit_s": round(summary.first_batch_to_commit_s, 3),
                "consumer_processes": settings.consumer.processes,
                **summary.counters,
            }
        )
    )
    return EXIT_OK


def _cmd_sidecar(_args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.sidecar.service import run_sidecar
    from pipeline.signals import install_stop_signals

    log.info("configuration", settings=settings.redacted())
    stop = threading.Event()
    install_stop_signals(stop)
    run_sidecar(settings, stop)
    return EXIT_OK


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.streams.playback import run_replay
    from pipeline.streams.topic_playback import TOPIC_SOURCE

    if args.to_prefix:
        settings = settings.model_copy(
            update={"kafka": settings.kafka.model_copy(update={"topic_prefix": args.to_prefix})}
        )
    if args.source.startswith(TOPIC_SOURCE):
        return _replay_topic(args, settings)
    for flag, value in (
        ("--from", args.start_from),
        ("--until", args.until),
        ("--speed", args.speed),
    ):
        if value is not None:
            raise ConfigError(f"replay: {flag} applies to a {TOPIC_SOURCE}NAME source only")
    report = run_replay(
        settings, args.source, rate=args.rate, limit=args.limit, seed=args.seed, progress=None
    )
    print(json.dumps(report.as_dict()))
    return EXIT_OK


def _replay_topic(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.positions import parse_position
    from pipeline.streams.topic_playback import TOPIC_SOURCE, TopicPlayback, run_topic_playback

    name = args.source[len(TOPIC_SOURCE) :]
    if not name:
        raise ConfigError(f"replay: {TOPIC_SOURCE} needs a topic name, e.g. {TOPIC_SOURCE}archive")
    try:
        start = parse_position(args.start_from or "earliest")
        until = parse_position(args.until) if args.until else None
    except ValueError as exc:
        raise ConfigError(f"replay: {exc}") from None
    plan = TopicPlayback(name, start, until, args.rate, args.speed, args.pace_by, args.limit)
    print(json.dumps(run_topic_playback(settings, plan).as_dict()))
    return EXIT_OK


def _cmd_devstack(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.devtools.devstack import Devstack

    d = settings.devstack
    stack = Devstack(d.dir, d.broker_port, d.redis_port, d.s3_port)
    if args.action == "up":
        state = stack.up(durable=args.durable)
        print(
            json.dumps(
                {
                    "bootstrap_servers": state.bootstrap_servers,
                    "redis_url": state.redis_url,
                    "storage": f"s3 at http://{state.s3.address}" if state.s3 else "memory",
                    "dir": str(d.dir),
                }
            )
        )
    elif args.action == "down":
        stack.down()
    else:
        status = stack.status()
        print(json.dumps(status))
        return EXIT_OK if all(s["running"] for s in status.values()) else EXIT_FAILURE
    return EXIT_OK


def _cmd_topics(_args: argparse.Namespace, settings: Settings) -> int:
    from consumers.admin import ensure_topics

    k = settings.kafka
    ensure_topics(
        k.client_options(), k.all_topics(), k.partitions, k.replication_factor, timeout_s=30.0
    )
    print(json.dumps({"topics": k.all_topics()}))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.devtools.demo import run_demo

    run_demo(settings, args.config, args.overrides, args.out, keep_stack=args.keep_stack)
    return EXIT_OK


def _cmd_config(_args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(settings.redacted(), indent=2))
    return EXIT_OK


def _cmd_compare(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.devtools.bench.cli import run_compare

    return run_compare(args, settings)


def _cmd_bench(args: argparse.Namespace, _settings: Settings) -> int:
    if args.bench == "forgetting":
        from pipeline.devtools.bench.cli import run_bench_forgetting

        return run_bench_forgetting(args)
    if args.bench == "throughput":
        return _bench_throughput(args, _settings)
    raise ConfigError(f"unknown benchmark {args.bench!r}")


def _bench_throughput(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.devtools.bench.throughput import BenchOptions, run_bench

    opts = BenchOptions(
        events=args.events,
        input_dim=settings.model.input_dim,
        bank_items=args.bank_items,
        learner_events=args.learner_events,
        latency_rate=args.latency_rate,
        latency_seconds=args.latency_seconds,
        consumer_processes=args.consumer_processes,
        out=args.out,
        config=args.config,
        overrides=tuple(args.overrides),
    )
    report = run_bench(opts, "supcon-stream " + " ".join(redact_argv(sys.argv[1:])))
    print(json.dumps(report["ratios"]))
    return EXIT_OK


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.learner.health import healthy, read_status

    report = read_status(settings.checkpoint.dir, settings.health.stale_after_s, args.learners)
    print(json.dumps(report, indent=2))
    return EXIT_OK if healthy(report) else EXIT_FAILURE


COMMANDS = {
    "learn": _cmd_learn,
    "sidecar": _cmd_sidecar,
    "replay": _cmd_replay,
    "devstack": _cmd_devstack,
    "topics": _cmd_topics,
    "demo": _cmd_demo,
    "config": _cmd_config,
    "compare": _cmd_compare,
    "bench": _cmd_bench,
    "status": _cmd_status,
}


def main(argv: Sequence[str] | None = None) -> int:
    from consumers.exceptions import ConsumerError
    from memory_bank.exceptions import BankError

    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"supcon-stream: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args, settings)
    except ConfigError as exc:
        print(f"supcon-stream: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SupconStreamError, ConsumerError, BankError) as exc:
        print(f"supcon-stream: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
