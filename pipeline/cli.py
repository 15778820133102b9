"""``supcon-stream`` command line.

Every command takes ``--config FILE`` (YAML, see configs/) and repeatable ``--set key=value``
overrides; environment variables ``SUPCON_STREAM__SECTION__KEY`` apply in between. Any
configuration or usage error prints one line and exits 2; a lost dependency (broker, Redis)
prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Sequence

import structlog

from pipeline.cli_parser import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, build_parser
from pipeline.config import Settings, load_settings
from pipeline.exceptions import ConfigError, SupconStreamError
from pipeline.logs import configure_logging
from pipeline.redaction import redact_argv

log = structlog.get_logger(__name__)


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
    from consumers.runtime import tune_gc
    from pipeline.distributed.rank_info import rank_from_env
    from pipeline.learner.opening import open_io
    from pipeline.learner.start import StartRequest, check_request
    from pipeline.signals import install_stop_signals

    tune_gc()  # the consumer thread's allocation rate (consumers/runtime.py)
    request = StartRequest.from_args(args.start_from, args.reset)
    check_request(settings, request)
    rank = rank_from_env(os.environ)  # torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    log.info("configuration", settings=settings.redacted(), **rank.as_dict())
    stop = threading.Event()
    install_stop_signals(stop)
    if rank.distributed:
        from pipeline.learner.loop import RunLimits
        from pipeline.learner.ranks import run_group_learner

        limits = RunLimits(args.max_events, args.exit_when_idle)
        summary = run_group_learner(settings, stop, rank, limits, request)
    else:
        # Before torch is imported: the group join and the bank's read run while it loads.
        opened = open_io(settings, stop, request, early=True)
        try:
            from pipeline.learner.loop import RunLimits, run_learner
        except BaseException:
            opened.close()
            raise
        limits = RunLimits(args.max_events, args.exit_when_idle)
        summary = run_learner(settings, stop, limits, request, opened)
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
                **summary.group,
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

    run_demo(
        settings,
        args.config,
        args.overrides,
        args.out,
        keep_stack=args.keep_stack,
        source=args.data,
    )
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
    if args.bench == "exposition":
        from pipeline.devtools.bench.exposition import run_bench_exposition

        command = "supcon-stream " + " ".join(redact_argv(sys.argv[1:]))
        report = run_bench_exposition(
            args.events, args.classes, args.renders, args.rounds, args.out, command
        )
        print(
            json.dumps(
                {"render": report["render"], "on_over_off": report["end_to_end"]["on_over_off"]}
            )
        )
        return 0
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
        ingest_events=args.ingest_events,
        ingest_rounds=args.ingest_rounds,
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


def _cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.learner.exporting import announce_once, export_checkpoint, registry_dir

    published = export_checkpoint(settings, args.out or registry_dir(settings))
    announced = False if args.no_announce else announce_once(settings, published)
    print(
        json.dumps(
            {
                "learner": settings.learner_name,
                "version": published.version,
                "path": str(published.path),
                "digest": published.digest,
                "announced": announced,
            }
        )
    )
    return EXIT_OK


def _cmd_predict(args: argparse.Namespace, _settings: Settings) -> int:
    from pipeline.serving.scoring import score_file

    report = score_file(args.model, args.input, args.out, args.label_column, args.id_column)
    print(json.dumps(report.as_dict()))
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Answer events with the newest bundle of ``serve.learner`` (default: learner.name)."""
    from pipeline.serving.serve import ServeLimits, run_serve
    from pipeline.signals import install_stop_signals

    log.info("configuration", settings=settings.redacted())
    stop = threading.Event()
    install_stop_signals(stop)
    summary = run_serve(settings, stop, ServeLimits(args.max_events, args.exit_when_idle))
    print(json.dumps(summary))
    return EXIT_OK


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
    "export": _cmd_export,
    "predict": _cmd_predict,
    "serve": _cmd_serve,
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
