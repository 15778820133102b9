"""The throughput bench's memory-bank stage times the learner's own learn_batch."""

from __future__ import annotations

from typing import cast

import torch

from memory_bank.bank import MemoryBank
from memory_bank.index import TorchIndex
from memory_bank.testing import InMemoryBankStore
from pipeline.config import ModelSettings, TrainSettings
from pipeline.devtools.bench.throughput_bank import TimedBank
from pipeline.learning.batch import BatchOutcome, learn_batch
from pipeline.learning.model import StreamNet
from pipeline.learning.step import make_state

MODEL = ModelSettings(input_dim=8, hidden_dim=32, embed_dim=16, proj_dim=16, max_classes=5)
CFG = TrainSettings(objective="supcon", iters_per_batch=2, replay_size=4, hard_negatives=2)


def _learn(bank: MemoryBank) -> list[BatchOutcome]:
    torch.manual_seed(0)
    state = make_state(StreamNet(MODEL), CFG)
    seen = torch.ones(MODEL.max_classes, dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    outcomes = []
    for b in range(3):
        x = torch.randn(6, MODEL.input_dim, generator=g)
        y = torch.tensor([0, 1, 2, 3, 4, 0])
        items = ([f"b{b}-{i}" for i in range(6)], [str(int(c)) for c in y], [None] * 6)
        outcomes.append(learn_batch(state, bank, CFG, x, y, seen, None, items))
    return outcomes


def _bank() -> MemoryBank:
    return MemoryBank(InMemoryBankStore(), TorchIndex(MODEL.embed_dim), 10, 8, 16, "cpu")


def test_timed_bank_changes_nothing_learn_batch_does() -> None:
    plain, wrapped = _bank(), _bank()
    timed = TimedBank(wrapped)
    expected = _learn(plain)
    got = _learn(cast(MemoryBank, timed))
    assert [o.losses for o in got] == [o.losses for o in expected]
    assert sorted(wrapped.ids()) == sorted(plain.ids())
    assert len(timed) == len(plain) == 10


def test_timed_bank_adds_up_the_time_of_each_bank_call_learn_batch_makes() -> None:
    timed = TimedBank(_bank())
    _learn(cast(MemoryBank, timed))
    spent = timed.take()
    assert set(spent) == set(TimedBank.TIMED)
    assert all(seconds > 0 for seconds in spent.values()), spent
    assert all(seconds == 0 for seconds in timed.take().values())
