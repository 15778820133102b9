"""Pure parts of a data-parallel learner: torchrun's environment, the settle rule, the cut's
offsets, a batch cut down to the partitions still held, the zero-weight step of an idle rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from consumers.events import DeadLetter, EventBatch, SourceRecord, restrict
from pipeline.config import ModelSettings, TrainSettings
from pipeline.distributed.group import model_digest
from pipeline.distributed.rank_info import RankInfo, rank_from_env
from pipeline.distributed.replicas import ObjectiveModule
from pipeline.exceptions import ConfigError
from pipeline.learner.rank_cut import union_offsets
from pipeline.learner.ranks import Vote, settled
from pipeline.learning.model import StreamNet


def test_rank_from_env_reads_torchrun_and_defaults_to_a_single_learner():
    assert rank_from_env({}) == RankInfo(0, 1, 0, 0)
    assert not rank_from_env({}).distributed
    info = rank_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.leader) == (3, 4, 1, False)
    with pytest.raises(ConfigError, match="RANK=4"):
        rank_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ConfigError, match="torchrun"):
        rank_from_env({"WORLD_SIZE": "two"})


def _vote(*partitions: int) -> Vote:
    return Vote(False, False, False, False, 0, (), frozenset(("t", p) for p in partitions))


def test_group_settles_on_disjoint_assignments_covering_every_partition():
    assert settled([_vote(0, 1), _vote(2)], partitions=3)
    assert settled([_vote(0, 1, 2), _vote()], partitions=3)  # a rank may hold nothing
    assert not settled([_vote(0, 1, 2), _vote(2)], partitions=3)  # mid-rebalance overlap
    assert not settled([_vote(0), _vote(1)], partitions=3)  # a partition still unowned


def test_a_rank_whose_partitions_changed_means_the_group_moved():
    from pipeline.learner.ranks import moved

    held = [_vote(0, 1).assigned, _vote(2).assigned]
    assert not moved(held, [_vote(0, 1), _vote(2)])
    assert moved(held, [_vote(0), _vote(2)])  # revoked, not yet re-assigned
    assert moved(held, [_vote(0, 1), _vote(1, 2)])


def test_cut_takes_the_newest_offset_per_partition():
    parts = [{"offsets": {("t", 0): 5, ("t", 1): 9}}, {"offsets": {("t", 0): 7, ("t", 2): 1}}]
    assert union_offsets(parts) == {("t", 0): 7, ("t", 1): 9, ("t", 2): 1}


def _batch() -> EventBatch:
    sources = tuple(SourceRecord("t", p, o, None) for p, o in [(0, 10), (1, 20), (0, 11)])
    letter = DeadLetter("bad_json", "x", SourceRecord("t", 1, 21, b"{"))
    return EventBatch(
        ids=("a", "b", "c"),
        features=np.arange(6, dtype=np.float32).reshape(3, 2),
        labels=("1", "2", None),
        tasks=(None, None, None),
        timestamps_ms=np.array([1, 2, 3]),
        sources=sources,
        dead_letters=(letter,),
        offsets={("t", 0): 12, ("t", 1): 22},
        consumed=4,
    )


def test_restrict_keeps_only_rows_offsets_and_dead_letters_of_held_partitions():
    batch = _batch()
    assert restrict(batch, {("t", 0), ("t", 1)}) is batch
    kept = restrict(batch, {("t", 0)})
    assert kept.ids == ("a", "c")
    assert kept.features.tolist() == [[0.0, 1.0], [4.0, 5.0]]
    assert kept.offsets == {("t", 0): 12}
    assert kept.dead_letters == ()
    assert kept.consumed == 2
    other = restrict(batch, {("t", 1)})
    assert (other.ids, other.consumed, len(other.dead_letters)) == (("b",), 2, 1)


def test_idle_rank_forward_gives_every_parameter_a_zero_gradient():
    model_cfg = ModelSettings(input_dim=4, hidden_dim=8, embed_dim=8, proj_dim=4, max_classes=3)
    net = StreamNet(model_cfg)
    module = ObjectiveModule(net, TrainSettings(), None)
    seen = torch.ones(3, dtype=torch.bool)
    to_backward, loss, per_sample = module(torch.empty(0, 4), torch.empty(0).long(), 0, seen, 0.0)
    to_backward.backward()
    assert float(loss) == 0.0
    assert per_sample.numel() == 0
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())


def test_weighted_forward_scales_only_the_loss_that_is_backpropagated():
    torch.manual_seed(0)
    model_cfg = ModelSettings(input_dim=4, hidden_dim=8, embed_dim=8, proj_dim=4, max_classes=3)
    net = StreamNet(model_cfg)
    module = ObjectiveModule(net, TrainSettings(), torch.Generator().manual_seed(1))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    seen = torch.ones(3, dtype=torch.bool)
    to_backward, loss, _ = module(x, y, 6, seen, 0.5)
    assert float(to_backward.detach()) == pytest.approx(0.5 * float(loss))


def test_model_digest_changes_with_any_parameter():
    model_cfg = ModelSettings(input_dim=4, hidden_dim=8, embed_dim=8, proj_dim=4, max_classes=3)
    torch.manual_seed(0)
    a = StreamNet(model_cfg)
    torch.manual_seed(0)
    b = StreamNet(model_cfg)
    assert model_digest(a) == model_digest(b)
    with torch.no_grad():
        b.head.bias[0] += 1e-6
    assert model_digest(a) != model_digest(b)


def test_group_report_is_one_step_of_one_learner():
    from pipeline.learner.sharing import GroupTurn, group_report

    a = GroupTurn(
        report={
            "loss": 1.0,
            "per_class_loss": {"x": 1.0},
            "skipped": False,
            "batch_events": 30,
            "trained": 27,
            "held_out": 3,
            "predicted": 0,
            "dead_lettered": 0,
        },
        totals={"consumed": 300, "trained": 270},
    )
    b = GroupTurn(
        report={
            "loss": 3.0,
            "per_class_loss": {"x": 3.0, "y": 2.0},
            "skipped": False,
            "batch_events": 10,
            "trained": 9,
            "held_out": 0,
            "predicted": 0,
            "dead_lettered": 1,
        },
        totals={"consumed": 100, "trained": 90},
    )
    idle = GroupTurn(totals={"consumed": 5, "trained": 5})
    record, totals = group_report([a, b, idle])
    assert record["loss"] == 2.0
    assert record["per_class_loss"] == {"x": 2.0, "y": 2.0}
    assert (record["batch_events"], record["trained"], record["dead_lettered"]) == (40, 36, 1)
    assert totals == {"consumed": 405, "trained": 365}


def test_end_record_carries_the_group_and_reads_back():
    from pipeline.telemetry.records import EndRecord

    end = EndRecord("supcon", 7, events_total=10, world_size=2, model_digest="ab12")
    assert EndRecord.from_json(end.to_json()) == end
    assert EndRecord.from_json(b'{"learner": "s", "step": 1}').world_size is None
