"""The stages of ``supcon-stream bench throughput`` on a full memory bank.

5. **memory bank**: fill a bank of ``--bank-items`` items through Redis, then time
   :func:`pipeline.learning.batch.learn_batch` (the learner's own code) on it, with each call
   it makes on the bank timed;
6. **restart**: process start to the first trained batch of a learner opening that bank.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import orjson

from pipeline.config import Settings
from pipeline.devtools.bench.throughput_stages import (
    CLASSES,
    JOIN_TIMEOUT_S,
    Synthetic,
    learn_command,
    rate,
)
from pipeline.devtools.spawn import spawn

if TYPE_CHECKING:
    from memory_bank.bank import MemoryBank

RESTART_EVENTS = 4_000

# --------------------------------------------------------------------------- 5. memory bank


@contextlib.contextmanager
def _timer(sink: list[float]) -> Iterator[None]:
    started = time.perf_counter()
    yield
    sink.append(time.perf_counter() - started)


def _fill_bank(
    bank: Any, data: Synthetic, items: int, bs: int, rng: np.random.Generator
) -> dict[str, Any]:
    """Fill through Redis in adds of 1000, then time 200 per-batch adds to the full bank."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    embed_dim = bank.embed_dim
    names = [str(c) for c in range(CLASSES)]
    rng = np.random.default_rng(1)
    fill_chunk = 1000
    started = time.perf_counter()
    for lo in range(0, items, fill_chunk):
        hi = min(items, lo + fill_chunk)
        idx = rng.integers(0, len(data.labels), hi - lo)
        labels = torch.from_numpy(data.labels[idx])
        emb = F.normalize(torch.randn(hi - lo, embed_dim), dim=1)
        bank.add(
            [f"b-{i}" for i in range(lo, hi)],
            torch.from_numpy(data.features[idx]),
            labels,
            [names[int(c)] for c in labels],
            emb,
            [None] * (hi - lo),
        )
    fill_s = time.perf_counter() - started

    # Per-batch adds to the full bank: evictions and Redis writes as in the learner.
    add_times: list[float] = []
    for j in range(200):
        idx = rng.integers(0, len(data.labels), bs)
        labels = torch.from_numpy(data.labels[idx])
        emb = F.normalize(torch.randn(bs, embed_dim), dim=1)
        with _timer(add_times):
            bank.add(
                [f"n-{j}-{k}" for k in range(bs)],
                torch.from_numpy(data.features[idx]),
                labels,
                [names[int(c)] for c in labels],
                emb,
                [None] * bs,
            )
    return {
        "fill_items_per_s": rate(items, fill_s),
        "fill_chunk": fill_chunk,
        "add_batch_size": bs,
        "add_ms_per_batch": _ms_mean(add_times),
        "add_items_per_s": rate(bs * len(add_times), sum(add_times)),
    }


class TimedBank:
    """A memory bank whose methods that :func:`learn_batch` calls add up their time by name.

    Stands in for the bank in ``learn_batch``, so the stage times the learner's own code and
    not a copy of it; every other attribute is the bank's.
    """

    TIMED = ("sample", "hard_negatives", "gather", "update_embeddings", "step", "add")

    def __init__(self, bank: Any) -> None:
        self._bank = bank
        self.spent = dict.fromkeys(self.TIMED, 0.0)

    def __len__(self) -> int:
        return len(self._bank)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._bank, name)
        if name not in self.TIMED:
            return method

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.spent[name] += time.perf_counter() - started

        return timed

    def take(self) -> dict[str, float]:
        """Seconds spent in each timed method since the last take."""
        spent, self.spent = self.spent, dict.fromkeys(self.TIMED, 0.0)
        return spent


def measure_bank(settings: Settings, data: Synthetic, items: int) -> dict[str, Any]:
    """Fill a bank of ``items`` through Redis, then time ``learn_batch`` on it, part by part.

    One iteration is one ``learn_batch`` call: ``train.iters_per_batch`` × (replay sample,
    hard-negative search, train step, write-back), then the batch's add to the full bank.
    The train step's share is what the bank calls leave of the iteration: the forward that
    embeds the search queries and ``train_step`` itself.
    """
    import torch

    from memory_bank.bank import MemoryBank
    from memory_bank.index import make_index
    from memory_bank.redis_store import RedisBankStore, make_redis_client
    from pipeline.learning.batch import learn_batch
    from pipeline.learning.model import StreamNet
    from pipeline.learning.step import make_state

    s = settings
    torch.manual_seed(0)
    every = s.bank.model_copy(update={"capacity": items}).hard_negative_interval
    client = make_redis_client(s.redis.url)
    store = RedisBankStore(
        client, s.redis.key_prefix, s.learner_name, s.model.input_dim, s.model.embed_dim
    )
    bank = MemoryBank(
        store,
        make_index(s.bank.index, s.model.embed_dim, "cpu", s.bank.use_gpu),
        capacity=items,
        input_dim=s.model.input_dim,
        embed_dim=s.model.embed_dim,
        device="cpu",
        index_refresh_steps=s.bank.index_refresh_steps,
        hard_negative_queries=s.bank.hard_negative_queries,
        hard_negative_every=every,
        policy=s.bank.policy,
        # the learner's victim rule (no stream means here: adaptive chooses mean-preserving)
        eviction=s.bank.victim_rule,
        adaptive_items=s.bank.adaptive_items,
    )
    rng = np.random.default_rng(1)
    bs = s.consumer.batch_size
    fill = _fill_bank(bank, data, items, bs, rng)
    bank.refresh_index()

    state = make_state(StreamNet(s.model), s.train)
    seen = torch.ones(s.model.max_classes, dtype=torch.bool)
    timed = TimedBank(bank)
    spent: dict[str, list[float]] = {name: [] for name in (*TimedBank.TIMED, "iteration")}
    # Steady state: a warm-up (first search, allocator, autograd) is run and then dropped,
    # and the timed span holds whole search intervals, so every search is counted at its rate.
    warmup = 20
    iterations = max(300, 2 * every)
    for i in range(warmup + iterations):
        idx = rng.integers(0, len(data.labels), bs)
        labels = data.labels[idx]
        items_of_batch = ([f"t-{i}-{k}" for k in range(bs)], [str(c) for c in labels], [None] * bs)
        started = time.perf_counter()
        learn_batch(
            state,
            cast("MemoryBank", timed),
            s.train,
            torch.from_numpy(data.features[idx]),
            torch.from_numpy(labels),
            seen,
            None,
            items_of_batch,
        )
        elapsed = time.perf_counter() - started
        in_bank = timed.take()
        if i >= warmup:
            spent["iteration"].append(elapsed)
            for name, seconds in in_bank.items():
                spent[name].append(seconds)
    client.close()
    ms = {name: _ms_mean(values) for name, values in spent.items()}
    iteration = ms["iteration"]
    train_step = iteration - sum(ms[name] for name in TimedBank.TIMED)
    return {
        "bank_items": len(bank),
        **fill,
        "iterations": iterations,
        "iters_per_batch": s.train.iters_per_batch,
        "replay_size": s.train.replay_size,
        "hard_negatives": s.train.hard_negatives,
        "hard_negative_queries": s.bank.hard_negative_queries,
        "hard_negative_every": every,
        "index": s.bank.index,
        "sample_ms": ms["sample"],
        "search_ms": ms["hard_negatives"],
        "train_step_ms": round(max(train_step, 0.0), 4),
        "writeback_and_refresh_ms": round(ms["update_embeddings"] + ms["step"], 4),
        "batch_add_ms": ms["add"],
        "iteration_ms": iteration,
        "sample_share": round(ms["sample"] / iteration, 4) if iteration else 0.0,
        "search_share": round(ms["hard_negatives"] / iteration, 4) if iteration else 0.0,
        "sample_plus_search_share": (
            round((ms["sample"] + ms["hard_negatives"]) / iteration, 4) if iteration else 0.0
        ),
        "search_ms_max": (
            round(max(spent["hard_negatives"]) * 1000, 3) if spent["hard_negatives"] else 0.0
        ),
    }


def _ms_mean(values: list[float]) -> float:
    return round(float(np.mean(values)) * 1000, 4) if values else 0.0


# --------------------------------------------------------------------------- 6. restart


def measure_restart(
    overrides: Sequence[str], settings: Settings, bank_items: int, workdir: Path
) -> dict[str, Any]:
    """Process start to the first trained batch of a learner whose bank holds ``bank_items``."""
    from pipeline.telemetry.channel import stream_key, telemetry_client

    client = telemetry_client(settings.redis)
    key = stream_key(settings.redis.key_prefix, settings.learner_name)
    client.delete(key)
    log_path = workdir / "restart-learner.log"
    started = time.perf_counter()
    started_epoch = time.time()
    first_trained: float | None = None
    proc = spawn(
        learn_command(
            [*overrides, f"bank.capacity={bank_items}"],
            "--max-events",
            str(RESTART_EVENTS),
            "--exit-when-idle",
            "5",
            level="INFO",
        ),
        log_path,
        append=False,
        threads=None,
        stdout="discard",
    )
    try:
        first_trained = _wait_first_trained(client, key, proc)
    finally:
        proc.wait(timeout=120)
    client.close()
    if first_trained is None:
        raise RuntimeError(f"the restarted learner trained nothing; see {log_path}")
    return {
        "bank_items": bank_items,
        "seconds": round(first_trained - started, 3),
        "log": str(log_path),
        **restart_breakdown(log_path, started_epoch),
    }


def _wait_first_trained(client: Any, key: str, proc: subprocess.Popen[bytes]) -> float | None:
    """perf_counter() when the learner's first step record with trained events shows up."""
    deadline = time.monotonic() + JOIN_TIMEOUT_S + 60
    cursor: Any = "0-0"
    while time.monotonic() < deadline and proc.poll() is None:
        reply: Any = client.xread({key: cursor}, count=100, block=20) or []
        for _stream, entries in reply:
            for entry_id, fields in entries:
                cursor = entry_id
                record = orjson.loads(fields[b"data"])
                if fields[b"kind"] == b"step" and record.get("trained", 0) > 0:
                    return time.perf_counter()
    return None


def restart_breakdown(log_path: Path, started_epoch: float) -> dict[str, Any]:
    """Phases of the restart from the learner's own log lines (ISO timestamps, UTC)."""
    marks = {
        "kafka source started": "join_started_s",
        "partitions assigned": "assigned_s",
        "bank read": "bank_read_s",  # the store's snapshot, read on a thread from the start
        "start position set": "offsets_known_s",  # torch imported, checkpoint read
        "vector_index_selected": "model_built_s",  # model and Adam built, the bank opening
        "memory_bank_opened": "bank_opened_s",
    }
    out: dict[str, Any] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        for text, key in marks.items():
            if text in line and key not in out:
                with contextlib.suppress(ValueError, IndexError):
                    stamp = datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
                    out[key] = round(stamp.timestamp() - started_epoch, 3)
        if "memory_bank_opened" in line and "seconds=" in line:
            with contextlib.suppress(ValueError, IndexError):
                out["bank_load_s"] = float(line.split("seconds=")[1].split()[0])
    if "join_started_s" in out and "assigned_s" in out:
        out["group_join_s"] = round(out["assigned_s"] - out["join_started_s"], 3)
    return out
