"""The learning core: what one model learns from one batch, with no process around it.

``model`` (StreamNet: encoder, projection, CE head), ``losses`` (SupCon and its family),
``objectives`` (config presets → weighted loss terms), ``step`` (train_step: ONE optimizer
step), ``batch`` (learn_batch: ONE micro-batch = replay draw + iters_per_batch steps + bank
add), ``inference`` (NCM, kNN, head predictions), ``labels`` and ``tuning``.
Imports no Kafka client and nothing of the processes that use it (import-linter).
"""
