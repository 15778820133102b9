"""Memory bank of past examples: durable in Redis, mirrored in-process, indexed by FAISS.

``memory_bank`` knows Redis, FAISS and torch, and nothing of Kafka or the pipeline. FAISS is
imported only when a :class:`~memory_bank.index.FaissIndex` is built, so the package imports
without it (``TorchIndex`` needs nothing extra).

The names below are imported on first use (PEP 562), not with the package: importing
:mod:`memory_bank.redis_client` alone, as the sidecar does, must not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memory_bank.bank import AddResult, MemoryBank, Replay
    from memory_bank.exceptions import BankCorruptError, BankError, BankUnavailableError
    from memory_bank.index import FaissIndex, TorchIndex, make_index
    from memory_bank.protocols import BankSnapshot, BankStore, StoredItem, VectorIndex
    from memory_bank.redis_client import make_redis_client
    from memory_bank.redis_store import RedisBankStore

_MODULE_OF = {
    "AddResult": "bank",
    "MemoryBank": "bank",
    "Replay": "bank",
    "BankCorruptError": "exceptions",
    "BankError": "exceptions",
    "BankUnavailableError": "exceptions",
    "FaissIndex": "index",
    "TorchIndex": "index",
    "make_index": "index",
    "BankSnapshot": "protocols",
    "BankStore": "protocols",
    "StoredItem": "protocols",
    "VectorIndex": "protocols",
    "make_redis_client": "redis_client",
    "RedisBankStore": "redis_store",
}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'memory_bank' has no attribute {name!r}")
    return getattr(importlib.import_module(f"memory_bank.{module}"), name)


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
