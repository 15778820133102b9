"""Kafka side of supcon-stream: event decoding, dead letters, micro-batching, producers.

Knows Kafka and nothing of torch or Redis. Modules:

- ``events``: the frozen dataclasses that travel (``SourceRecord``, ``DeadLetter``, ``EventBatch``);
- ``decode``: ``decode_batch`` (validation, reasons in ``REASONS``) and ``dead_letter_payload``;
- ``batcher``: ``MicroBatcher`` (size or max latency, pure);
- ``protocols``: the ``EventSource`` boundary the learner depends on;
- ``source``: ``KafkaBatchSource`` + ``SourceConfig`` (one consumer thread, backpressure, commits);
- ``producer``: ``JsonProducer`` (acks=all, flush that raises, recreate on a broken client);
- ``admin``: ``ensure_topics``;
- ``testing``: ``InMemorySource`` and the ``EventSourceContract`` test suite;
- ``exceptions``: ``ConsumerError`` and its subclasses.
"""
