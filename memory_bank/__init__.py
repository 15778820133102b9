"""Memory bank of past examples: durable in Redis, mirrored in-process, indexed by FAISS.

Knows Redis, FAISS and torch, and nothing of Kafka or the pipeline. FAISS is imported only
when a :class:`~memory_bank.index.FaissIndex` is built. Modules:

- ``bank``: ``MemoryBank``, the facade the learner uses (add, sample, search, flush);
- ``mirror``: ``Mirror``, the bank's slot-addressed tensors on the learner's device;
- ``reservoir``: which items stay (class-balanced or reservoir policy, pure);
- ``replay``: ``ReplaySampler``, the replay draw from the mirror;
- ``search``: index refresh schedule, hard negatives, kNN over the mirror;
- ``ids``: class names and recent ids kept beside the mirror;
- ``index``: ``VectorIndex`` implementations (FAISS, torch, mirror) and ``make_index``;
- ``redis_store``: ``RedisBankStore``, the durable copy;
- ``redis_client``: ``make_redis_client``, the project's one Redis client factory (torch-free);
- ``protocols``: the ``BankStore`` and ``VectorIndex`` boundaries;
- ``testing``: ``InMemoryBankStore`` for tests;
- ``exceptions``: ``BankError`` and its subclasses.

This file imports nothing, so that ``memory_bank.redis_client`` alone (as the sidecar uses
it) loads no torch.
"""
