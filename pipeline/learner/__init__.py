"""The learner runtime: one process that consumes the stream, learns from it and commits.

``loop`` (run_learner: get → process → emit → checkpoint/commit when due), ``assembly``
(builds the LearnerContext of ``context``), ``process`` (one micro-batch), ``predictions``,
``probes`` (held-out set and evaluation), ``emit`` (telemetry, health, progress logs),
``checkpointer`` (offsets, schedule, commit order) over ``checkpoint`` (atomic files),
``idle`` (group join and idle exit), ``health`` and ``ledger``; for one rank of a
data-parallel group (torchrun): ``ranks`` (run_group_learner: the group turn), ``rank_cut``
(the group checkpoint) and ``sharing`` (one logical bank and probe set).
"""
