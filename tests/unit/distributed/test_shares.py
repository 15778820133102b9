"""The group-wide counts of a data-parallel group split among its ranks: the consumer's
micro-batch (1/N each), the replay (in proportion to the ranks' rows) and the draw seeds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import TrainSettings, load_settings
from pipeline.distributed.rank_info import RankInfo
from pipeline.distributed.shares import rank_seed, rank_share, split
from pipeline.learner.ranks import group_turn, rank_settings
from pipeline.learner.sharing import GroupTurn


def test_split_is_proportional_and_gives_the_remainder_to_the_largest_fractions():
    assert split(80, [16, 16]) == [40, 40]
    assert split(64, [30, 10]) == [48, 16]
    assert split(16, [21, 11]) == [11, 5]  # exact 10.5 and 5.5: the tie goes to rank 0
    assert split(10, [1, 1, 1]) == [4, 3, 3]
    assert split(64, [0, 32]) == [0, 64]  # a rank without rows replays nothing
    assert split(64, [0, 0]) == [0, 0]
    assert split(0, [5, 3]) == [0, 0]
    with pytest.raises(ValueError, match="weights"):
        split(4, [1, -1])


@given(
    total=st.integers(0, 10_000),
    weights=st.lists(st.integers(0, 1_000), min_size=1, max_size=8),
)
def test_split_sums_to_the_total_and_each_part_is_within_one_of_its_exact_share(total, weights):
    parts = split(total, weights)
    whole = sum(weights)
    if whole == 0:
        assert parts == [0] * len(weights)
        return
    assert sum(parts) == total
    for part, weight in zip(parts, weights, strict=True):
        exact = total * weight / whole
        assert exact - 1 < part < exact + 1
        if weight == 0:
            assert part == 0


def test_rank_share_splits_evenly_and_is_the_whole_for_a_single_learner():
    assert [rank_share(32, 2, r) for r in range(2)] == [16, 16]
    assert [rank_share(10, 4, r) for r in range(4)] == [3, 3, 2, 2]
    assert rank_share(32, 1, 0) == 32


def test_rank_seed_is_the_seed_on_rank_0_and_differs_on_every_other_rank():
    assert rank_seed(7, 0) == 7
    assert len({rank_seed(7, r) for r in range(8)}) == 8


def test_each_rank_reads_its_share_of_the_groups_batch_and_nothing_else_changes():
    settings = load_settings(None, ["consumer.batch_size=33"], environ={})
    shares = [rank_settings(settings, RankInfo(r, 2)) for r in range(2)]
    assert [s.consumer.batch_size for s in shares] == [17, 16]
    assert shares[1].consumer.model_copy(update={"batch_size": 33}) == settings.consumer
    assert shares[1].train == settings.train
    assert rank_settings(settings, RankInfo()) == settings  # a single learner: the whole batch
    tiny = load_settings(None, ["consumer.batch_size=1"], environ={})
    assert rank_settings(tiny, RankInfo(1, 2)).consumer.batch_size == 1  # at least one row


def test_a_group_turn_weighs_the_loss_and_shares_the_replay_by_the_ranks_rows():
    train = TrainSettings(replay_size=64, hard_negatives=16)
    busy, light = (group_turn(train, RankInfo(r, 2), [30, 10]) for r in range(2))
    assert (busy.weight, light.weight) == (1.5, 0.5)  # DDP's mean: the mean over all 40 rows
    assert (busy.replay_size, light.replay_size) == (48, 16)
    assert (busy.hard_negatives, light.hard_negatives) == (12, 4)
    idle = group_turn(train, RankInfo(0, 2), [0, 40])
    assert (idle.weight, idle.replay_size, idle.hard_negatives) == (0.0, 0, 0)
    alone = group_turn(train, RankInfo(1, 2), [0, 40])
    assert (alone.weight, alone.replay_size, alone.hard_negatives) == (2.0, 64, 16)


def test_a_turns_train_settings_carry_its_replay_share_only():
    train = TrainSettings(replay_size=64, hard_negatives=16, lr=0.01)
    assert GroupTurn().train_settings(train) is train
    mine = GroupTurn(replay_size=48, hard_negatives=12).train_settings(train)
    assert (mine.replay_size, mine.hard_negatives) == (48, 12)
    assert mine.model_copy(update={"replay_size": 64, "hard_negatives": 16}) == train
