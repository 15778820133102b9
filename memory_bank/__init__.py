"""Memory bank of past examples: durable in Redis, mirrored in-process, indexed by FAISS.

``memory_bank`` knows Redis, FAISS and torch, and nothing of Kafka or the pipeline. FAISS is
imported only when a :class:`~memory_bank.index.FaissIndex` is built, so the package imports
without it (``TorchIndex`` needs nothing extra).
"""

from memory_bank.bank import AddResult, MemoryBank, Replay
from memory_bank.exceptions import BankCorruptError, BankError, BankUnavailableError
from memory_bank.index import FaissIndex, TorchIndex, make_index
from memory_bank.protocols import BankSnapshot, BankStore, StoredItem, VectorIndex
from memory_bank.redis_store import RedisBankStore, make_redis_client

__all__ = [
    "AddResult",
    "BankCorruptError",
    "BankError",
    "BankSnapshot",
    "BankStore",
    "BankUnavailableError",
    "FaissIndex",
    "MemoryBank",
    "RedisBankStore",
    "Replay",
    "StoredItem",
    "TorchIndex",
    "VectorIndex",
    "make_index",
    "make_redis_client",
]
