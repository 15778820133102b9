"""The argument parser of ``supcon-stream``: every command, option and its help text.

:mod:`pipeline.cli` runs the commands; this module only describes them, so ``--help`` and the
README's command table can be checked against one place.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.settings.learning import OBJECTIVES

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

    demo = sub.add_parser(
        "demo", help="devstack + one stream through ce, ce + replay and supcon + bank learners"
    )
    _common(demo)
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="report folder")
    demo.add_argument(
        "--data",
        default="split-digits",
        metavar="SOURCE",
        help="the stream: a built-in scenario or a labeled JSONL, CSV, NPZ or Parquet file "
        "(label and optional task and id columns, as replay reads them); the learners' "
        "model.input_dim is set to its width (default: split-digits)",
    )
    demo.add_argument(
        "--keep-stack",
        action="store_true",
        help="leave the devstack running afterwards (to inspect the topics)",
    )

    show = sub.add_parser("config", help="print the effective settings (secrets redacted)")
    _common(show)

    _add_compare(sub)
    bench = sub.add_parser(
        "bench", help="benchmarks: forgetting (in-process), throughput, exposition"
    )
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    _add_bench_forgetting(bench_sub)
    _add_bench_throughput(bench_sub)
    _add_bench_exposition(bench_sub)
    status = sub.add_parser(
        "status", help="health of the learners under checkpoint.dir (exit 1 unless all healthy)"
    )
    _common(status)
    status.add_argument(
        "--learner", action="append", dest="learners", help="only this learner (repeatable)"
    )
    _add_serving_commands(sub)
    return parser


def _add_serving_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    export = sub.add_parser("export", help="export a learner's newest checkpoint as a bundle")
    _common(export)
    export.add_argument("--learner", dest="name", help="learner name (default: learner.name)")
    export.add_argument(
        "--out", type=Path, help="registry folder (default: <export.dir>/<learner>)"
    )
    export.add_argument(
        "--no-announce", action="store_true", help="do not announce it on <prefix>.models"
    )
    predict = sub.add_parser("predict", help="score a JSONL, CSV, NPZ or Parquet file")
    _common(predict)
    predict.add_argument("input", type=Path, help="file of events (features, optional labels)")
    predict.add_argument(
        "--model", type=Path, required=True, help="bundle folder or registry folder (newest)"
    )
    predict.add_argument("--out", type=Path, required=True, help=".jsonl, .csv, .npz, .parquet")
    predict.add_argument("--label-column", default="label")
    predict.add_argument("--id-column", default="id")
    serve = sub.add_parser("serve", help="answer events with the newest model bundle")
    _common(serve)
    serve.add_argument("--learner", dest="name", help="whose bundles (default: learner.name)")
    serve.add_argument("--max-events", type=_positive_int, help="exit after consuming N events")
    serve.add_argument(
        "--exit-when-idle",
        type=_positive_float,
        metavar="SECONDS",
        help="exit after this long without new events",
    )


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
    compare.add_argument(
        "source",
        help="split-digits (the benchmark), domain-digits, blurry-digits, gaussian-drift, "
        "a labeled file, or topic:NAME",
    )
    compare.add_argument("--memories", help="comma-separated bank sizes (default: per source)")
    compare.add_argument("--seeds", type=_positive_int, help="seeds 0..N-1 (default: per source)")
    compare.add_argument("--methods", help="comma-separated subset (default: per source)")
    compare.add_argument("--out", type=Path, default=Path("runs/compare"), help="report folder")
    compare.add_argument("--threads", type=_positive_int, default=1, help="torch threads")
    _add_ema_decay(compare)
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
    forgetting.add_argument(
        "--methods",
        help="comma-separated methods (default: ce_finetune, ce_er, supcon and the joint bounds)",
    )
    forgetting.add_argument("--out", type=Path, default=Path("runs/bench"), help="report folder")
    forgetting.add_argument(
        "--threads", type=_positive_int, default=1, help="torch threads (tiny MLP: 1 is fastest)"
    )
    _add_ema_decay(forgetting)


def _add_ema_decay(parser: _Parser) -> None:
    parser.add_argument(
        "--ema-decay",
        type=float,
        metavar="D",
        help="also score each online run with an exponential moving average of its weights "
        "(per-step decay D in (0, 1)): the 'ema' read-out; the run itself is unchanged",
    )


def _add_bench_exposition(bench_sub: argparse._SubParsersAction[_Parser]) -> None:
    ex = bench_sub.add_parser(
        "exposition", help="/metrics render time; end-to-end rate with metrics off vs on"
    )
    _common(ex)
    ex.add_argument("--events", type=_positive_int, default=20_000, help="events per run")
    ex.add_argument("--classes", type=_positive_int, default=100, help="classes in /metrics")
    ex.add_argument("--renders", type=_positive_int, default=500, help="renders timed")
    ex.add_argument("--rounds", type=_positive_int, default=2, help="off/on pairs of runs")
    ex.add_argument("--out", type=Path, default=Path("runs/bench"), help="report folder")


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
    tp.add_argument(
        "--ingest-events",
        type=_positive_int,
        default=200_000,
        help="events per round of raw consume, parse floor and ingest-only (default 200000)",
    )
    tp.add_argument(
        "--ingest-rounds",
        type=_positive_int,
        default=3,
        help="rounds of raw consume, parse floor and ingest-only per client, interleaved; "
        "each is reported as the median round (default 3)",
    )
    tp.add_argument("--out", type=Path, default=Path("runs/bench"), help="report folder")
