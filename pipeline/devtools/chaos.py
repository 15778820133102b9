"""Crash-recovery drills with real processes, and the checks that prove "nothing lost".

:func:`run_kill_drill` replays a scenario through the ``supcon-stream replay`` CLI while a
``supcon-stream learn`` process is SIGKILLed at random moments and restarted each time; a last
learner run finishes the stream. :func:`check_delivery` then verifies, from the learner's own
ledger (``checkpoint.ledger``), the consumer group's committed offsets and the bank in Redis:

* every produced event that is not a probe was trained at least once, and no probe was;
* the committed offsets add up to the number of events produced;
* the bank holds each id once, only ids that were trained, within its capacity;

and reports how many trainings were duplicates (the price of at-least-once).

Used by ``tests/e2e/test_recovery.py`` (small numbers, part of ``make test``) and by
``bench/kill9.py`` (20k events, 10 kills). Everything here drives real processes against a
real broker and a real redis-server; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from consumers.reading import read_topic_json
from pipeline.config import Settings, load_settings
from pipeline.devtools.spawn import cli_command, run, set_args, spawn
from pipeline.learner.ledger import ledger_path, read_group_ledger, read_ledger
from pipeline.learner.probes import is_probe

log = structlog.get_logger(__name__)


def read_topic_ids(bootstrap: str, topic: str, expect: int, timeout_s: float = 60.0) -> list[str]:
    """The ``id`` of every record in ``topic`` (read without a group, nothing committed)."""
    return [str(v["id"]) for v in read_topic_json(bootstrap, topic, expect, timeout_s)]


def committed_total(settings: Settings) -> int:
    """Sum of the group's committed offsets over the events topic's partitions."""
    from kafka import KafkaConsumer, TopicPartition

    k = settings.kafka
    consumer = KafkaConsumer(group_id=settings.group_id, **k.client_options())
    try:
        return sum(
            consumer.committed(TopicPartition(k.events_topic, p)) or 0 for p in range(k.partitions)
        )
    finally:
        consumer.close()


@dataclass(frozen=True)
class DeliveryReport:
    produced: int
    expected_trained: int  # produced minus probes
    never_trained: int
    probes_trained: int
    trainings: int
    duplicate_trainings: int
    committed: int
    bank_items: int
    bank_duplicate_ids: int
    bank_untrained_ids: int
    bank_capacity: int
    bank_seen_total: int  # events counted by the reservoir (re-offers after restarts inflate it)
    kills: int = 0
    kill_after_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.never_trained == 0
            and self.probes_trained == 0
            and self.committed == self.produced
            and self.bank_duplicate_ids == 0
            and self.bank_untrained_ids == 0
            and self.bank_items <= self.bank_capacity
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def check_delivery(settings: Settings, produced_ids: Sequence[str]) -> DeliveryReport:
    from memory_bank.redis_store import RedisBankStore, make_redis_client

    ledger = read_group_ledger(settings.checkpoint_dir)  # every rank's, for a group
    fraction = settings.eval.probe_fraction
    probes = {i for i in produced_ids if is_probe(i, fraction)}
    expected = set(produced_ids) - probes
    r = settings.redis
    client = make_redis_client(
        r.url, r.username, r.password, r.socket_timeout_s, tls_options=r.tls_options()
    )
    try:
        store = RedisBankStore(
            client,
            r.key_prefix,
            settings.learner_name,
            settings.model.input_dim,
            settings.model.embed_dim,
        )
        snapshot = store.load()
    finally:
        client.close()
    bank_ids = list(snapshot.ids)
    return DeliveryReport(
        produced=len(produced_ids),
        expected_trained=len(expected),
        never_trained=len(ledger.never_trained(expected)),
        probes_trained=len(probes & ledger.counts.keys()),
        trainings=ledger.trainings,
        duplicate_trainings=ledger.duplicate_trainings,
        committed=committed_total(settings),
        bank_items=len(bank_ids),
        bank_duplicate_ids=len(bank_ids) - len(set(bank_ids)),
        bank_untrained_ids=len(set(bank_ids) - ledger.counts.keys()),
        bank_capacity=settings.bank.capacity,
        bank_seen_total=sum(snapshot.seen_per_class.values()),
    )


def _wait_for_growth(path: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Until the ledger grows (the new learner trained a batch), it exits, or time runs out."""
    size = path.stat().st_size if path.exists() else 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.stat().st_size > size:
            return
        time.sleep(0.05)


@dataclass(frozen=True)
class KillDrill:
    """A replay of ``events`` events at ``rate``/s with ``kills`` SIGKILLs of the learner."""

    events: int
    kills: int
    rate: float
    source: str = "gaussian-drift"
    seed: int = 0
    # Odd-numbered kills come min_delay_s..max_delay_s after the process starts (start-up,
    # bank load, group join included); even-numbered ones 0..max_delay_s after its first
    # trained batch, so both phases get hit.
    min_delay_s: float = 0.5
    max_delay_s: float = 8.0


def drill_pairs(bootstrap: str, redis_url: str, prefix: str, workdir: Path) -> list[str]:
    """``--set`` pairs of a drill learner: ledger on, short session and checkpoint intervals."""
    return [
        f"kafka.bootstrap_servers={bootstrap}",
        f"kafka.topic_prefix={prefix}",
        f"redis.url={redis_url}",
        f"redis.key_prefix={prefix}",
        f"checkpoint.dir={workdir / 'ckpt'}",
        "checkpoint.ledger=true",
        "checkpoint.every_steps=20",
        "checkpoint.every_seconds=2",
        # A SIGKILLed member holds its partitions until its session expires.
        "consumer.session_timeout_ms=3000",
        "train.torch_threads=1",
    ]


def drill_settings(settings_pairs: Sequence[str]) -> Settings:
    return load_settings(None, list(settings_pairs), environ={})


def start_drill(
    drill: KillDrill, settings_pairs: Sequence[str], workdir: Path
) -> tuple[Settings, random.Random, list[str], float, subprocess.Popen[bytes]]:
    """What every kill drill does first: check the ledger is on, create the topics and start
    the replay. Returns the settings, the drill's random source, the ``--set`` arguments, the
    start time and the replay process."""
    settings = drill_settings(settings_pairs)
    if not settings.checkpoint.ledger:
        raise ValueError("the kill drill needs checkpoint.ledger=true")
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(drill.seed)
    common = set_args(settings_pairs)
    started = time.monotonic()
    topics = subprocess.run(cli_command("topics", *common), capture_output=True, check=False)
    if topics.returncode != 0:
        raise RuntimeError(f"topics failed: {topics.stderr.decode()[-500:]}")
    replay = spawn(
        cli_command(
            "replay",
            drill.source,
            "--limit",
            str(drill.events),
            "--rate",
            str(drill.rate),
            "--seed",
            str(drill.seed),
            *common,
        ),
        workdir / "replay.log",
    )
    return settings, rng, common, started, replay


def run_kill_drill(
    drill: KillDrill, settings_pairs: Sequence[str], workdir: Path
) -> DeliveryReport:
    """Run the drill with the CLI; ``settings_pairs`` point it at the broker and Redis.

    The pairs must enable ``checkpoint.ledger``. Returns the delivery report (its ``ok``
    says whether every check held); process logs are left under ``workdir``.
    """
    settings, rng, common, started, replay = start_drill(drill, settings_pairs, workdir)
    learner_log = workdir / "learner.log"
    kill_after: list[float] = []
    try:
        ledger = ledger_path(settings.checkpoint_dir)
        for n in range(drill.kills):
            learner = spawn(cli_command("learn", *common), learner_log)
            spawned = time.monotonic()
            if n % 2:
                _wait_for_growth(ledger, learner, timeout_s=60.0)
                delay = rng.uniform(0.0, drill.max_delay_s)
            else:
                delay = rng.uniform(drill.min_delay_s, drill.max_delay_s)
            time.sleep(delay)
            delay = time.monotonic() - spawned
            if learner.poll() is not None:
                raise RuntimeError(
                    f"learner exited early ({learner.returncode}); see {learner_log}"
                )
            learner.send_signal(signal.SIGKILL)
            learner.wait()
            kill_after.append(round(delay, 2))
            log.info("learner killed", kill=n + 1, after_s=round(delay, 2))
        if replay.wait(timeout=max(600.0, 3 * drill.events / drill.rate)) != 0:
            raise RuntimeError(f"replay failed; see {workdir / 'replay.log'}")
        final = run(
            cli_command("learn", "--exit-when-idle", "8", *common), learner_log, timeout_s=1800
        )
        if final.returncode != 0:
            raise RuntimeError(f"the final learner run failed; see {learner_log}")
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.wait()
    return finish_drill(drill, settings, kill_after, started)


def finish_drill(
    drill: KillDrill, settings: Settings, kill_after: list[float], started: float
) -> DeliveryReport:
    """What every kill drill does last: read back what the replay produced and check that the
    learner's ledger and committed offsets account for every event of it."""
    produced = read_topic_ids(
        settings.kafka.bootstrap_servers, settings.kafka.events_topic, drill.events
    )
    report = check_delivery(settings, produced)
    return replace(
        report,
        kills=drill.kills,
        kill_after_s=kill_after,
        elapsed_s=round(time.monotonic() - started, 1),
    )


def wait_for_ledger(path: Path, distinct: int, timeout_s: float) -> int:
    """Wait until the ledger at ``path`` holds ``distinct`` ids; returns how many it holds."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        seen = read_ledger(path).distinct
        if seen >= distinct:
            break
        time.sleep(0.25)
    return seen


class TcpProxy:
    """A loopback TCP forwarder that can be cut: the network outage of a live broker.

    ``cut()`` closes every open connection and the listening socket, so clients see resets
    and then "connection refused", exactly as when a broker host goes away; ``restore()``
    listens again on the same port. The broker behind it keeps its data, which is what makes
    a zero-loss check meaningful on a dev broker whose storage is in memory.
    """

    def __init__(self, upstream_port: int, port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.address = (host, port)
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._cut = threading.Event()

    def start(self) -> TcpProxy:
        listener = socket.create_server(self.address, reuse_port=False)
        listener.settimeout(0.2)
        self._listener = listener
        self._cut.clear()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    restore = start

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            conns, self._conns = self._conns, []
            listener, self._listener = self._listener, None
        for sock in [*conns, *([listener] if listener else [])]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    close = cut

    def _accept(self, listener: socket.socket) -> None:
        while not self._cut.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._cut.is_set():
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
