"""Kafka side of supcon-stream: event decoding, dead letters, micro-batching, producers.

Knows Kafka and nothing of torch or Redis. Modules:

- ``events``: the frozen dataclasses that travel (``SourceRecord``, ``DeadLetter``, ``EventBatch``);
- ``decode``: ``decode_batch`` (validation, reasons in ``REASONS``) and ``dead_letter_payload``;
- ``batcher``: ``MicroBatcher`` (size or max latency, pure);
- ``protocols``: the ``EventSource`` boundary the learner depends on;
- ``config``: ``SourceConfig`` and ``ConsumerTuning`` (the consumer knobs and their bounds);
- ``source``: ``KafkaBatchSource`` (one consumer thread, hand-off queue, backpressure);
- ``group``: what that thread does as a group member (rebalance events, offset commits);
- ``partitions``: ``PartitionTracker`` (that thread's assignment, fetch positions, lag, and
  how its buffers follow rebalances);
- ``broker_watch``: ``BrokerWatch`` (reports a lost broker connection);
- ``producer``: ``JsonProducer`` (acks=all, flush that raises, recreate on a broken client);
- ``admin``: ``ensure_topics``;
- ``testing``: ``InMemorySource`` and the ``EventSourceContract`` test suite;
- ``exceptions``: ``ConsumerError`` and its subclasses.
"""
