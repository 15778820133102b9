"""Regression tests for defects found in review: restored optimizers, the /healthz port,
secrets in benchmark reports, and unlabeled hard-negative queries."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from memory_bank.bank import MemoryBank
from memory_bank.index import make_index
from memory_bank.testing import InMemoryBankStore
from pipeline.config import redact_argv
from pipeline.exceptions import SupconStreamError
from pipeline.learner.health import HealthBoard
from pipeline.learning.step import match_optimizer_device


def test_optimizer_saved_as_capturable_steps_on_cpu_after_matching() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    saved = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.ones(3)
    saved.step()
    state = saved.state_dict()
    state["param_groups"][0]["capturable"] = True  # as a CUDA learner writes it

    restored = torch.optim.Adam([param], lr=0.1)
    restored.load_state_dict(state)
    match_optimizer_device(restored, torch.device("cpu"))
    param.grad = torch.ones(3)
    restored.step()  # raised "If capturable=True, params and state_steps must be on ..."

    assert restored.param_groups[0]["capturable"] is False
    assert torch.all(param < 1.0)


def test_busy_healthz_port_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        board = HealthBoard("l", tmp_path / "health.json")
        with pytest.raises(SupconStreamError, match=rf"health.http_port: .*:{port}"):
            board.start(60.0, "127.0.0.1", port)
        board.close()


def test_bench_command_line_hides_secret_values() -> None:
    argv = [
        "bench",
        "throughput",
        "--set",
        "redis.password=hunter2",
        "--set",
        "kafka.sasl_password=s3cret",
        "--set",
        "consumer.batch_size=64",
    ]
    shown = " ".join(redact_argv(argv))
    assert "hunter2" not in shown
    assert "s3cret" not in shown
    assert "redis.password=**********" in shown
    assert "consumer.batch_size=64" in shown


def test_unlabeled_queries_get_no_hard_negatives_and_mark_no_class() -> None:
    bank = MemoryBank(
        InMemoryBankStore(),
        make_index("mirror", 4, torch.device("cpu"), "never"),
        capacity=40,
        input_dim=4,
        embed_dim=4,
        device=torch.device("cpu"),
        hard_negative_queries=8,
        hard_negative_every=3,
    )
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    emb = torch.nn.functional.normalize(torch.randn(40, 4, generator=gen), dim=1)
    bank.add(
        [f"e{i}" for i in range(40)],
        torch.randn(40, 4, generator=gen),
        labels,
        [str(int(c)) for c in labels],
        emb,
        [None] * 40,
    )
    queries = emb[:4]
    unlabeled = torch.full((4,), -1, dtype=torch.long)
    for _ in range(3):  # one search, then two calls served from its cached candidates
        assert bank.hard_negatives(queries, unlabeled, 8).numel() == 0
    labeled = torch.zeros(4, dtype=torch.long)
    found = bank.hard_negatives(queries, labeled, 8)
    assert found.numel() > 0
    assert bool((bank.gather(found)[1] != 0).all())
