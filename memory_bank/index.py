"""Vector indexes over the bank's L2-normalised embeddings (inner product = cosine).

Three implementations of :class:`~memory_bank.protocols.VectorIndex`:

- :class:`FaissIndex`: exact flat inner-product search with FAISS; on the GPU when the
  installed FAISS build has GPU support and sees a GPU (``faiss-gpu``), else on the CPU.
- :class:`TorchIndex`: exact ``matmul`` + ``topk`` on the device the vectors live on. On a
  GPU learner this avoids any host round trip; on a CPU it is often faster than FAISS flat
  (docs/performance.md).
- :class:`MirrorIndex`: a :class:`TorchIndex` that a bank attaches to its own mirror, searched
  in place without any rebuild (the default on CPU and the GPU fallback).

Every index is offered the bank's mirror (:meth:`~memory_bank.protocols.VectorIndex.attach`);
only :class:`MirrorIndex` takes it. The others are rebuilt wholesale from the mirror (every
``index_refresh_steps`` steps), never updated item by item: rows are numbered 0..n-1 in the
order given to ``rebuild`` and the bank keeps the row -> slot map. All answer an empty index
and ``k > n`` the same way: missing neighbours have row ``-1`` and score ``-inf``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any, Literal

import structlog
import torch

from memory_bank.exceptions import BankError

log = structlog.get_logger(__name__)

IndexKind = Literal["auto", "faiss", "torch", "mirror"]
# ``"never"`` is accepted beside ``False`` because that is how the settings spell it.
UseGpu = bool | Literal["auto", "never"]

# TorchIndex computes a [queries, n] similarity block; cap it so a large bank with many
# queries does not allocate gigabytes at once (2**24 float32 = 64 MiB).
_MAX_BLOCK_ELEMENTS = 1 << 24


def _import_faiss() -> ModuleType:
    try:
        import faiss
    except ImportError as exc:
        raise BankError(
            "FAISS is not installed: run pip install 'supcon-stream[cpu]' "
            "(or pip install 'supcon-stream[gpu]' on a CUDA host), "
            "or use the 'torch' index kind"
        ) from exc
    return faiss


def faiss_gpu_available() -> bool:
    """True when the installed FAISS build has GPU support and sees at least one GPU."""
    try:
        faiss = _import_faiss()
    except BankError:
        return False
    return hasattr(faiss, "StandardGpuResources") and int(faiss.get_num_gpus()) > 0


def _empty_result(q: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.full((q, k), float("-inf"), dtype=torch.float32, device=device)
    rows = torch.full((q, k), -1, dtype=torch.int64, device=device)
    return scores, rows


def _pad(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad [q, kk] results to [q, k] with (-inf, -1) and mark invalid rows the same way."""
    rows = rows.to(torch.int64)
    scores = scores.to(torch.float32).masked_fill(rows < 0, float("-inf"))
    missing = k - rows.shape[1]
    if missing > 0:
        pad_scores, pad_rows = _empty_result(rows.shape[0], missing, rows.device)
        scores = torch.cat([scores, pad_scores], dim=1)
        rows = torch.cat([rows, pad_rows], dim=1)
    return scores, rows


def _check_queries(queries: torch.Tensor, dim: int, k: int) -> None:
    if queries.dim() != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must be [q, {dim}], got {tuple(queries.shape)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")


def _check_vectors(vectors: torch.Tensor, dim: int) -> None:
    if vectors.dim() != 2 or vectors.shape[1] != dim:
        raise ValueError(f"vectors must be [n, {dim}], got {tuple(vectors.shape)}")


class FaissIndex:
    """Exact inner-product index (``IndexFlatIP``, or ``GpuIndexFlatIP`` with faiss-gpu).

    ``use_gpu``: ``"auto"`` takes the GPU when FAISS can; ``True`` insists (``BankError``
    when it cannot); ``False`` / ``"never"`` stays on the CPU. Results come back on the
    queries' device whatever FAISS ran on.
    """

    def __init__(self, dim: int, use_gpu: UseGpu = "auto", gpu_device: int = 0) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        faiss = _import_faiss()
        self.dim = dim
        gpu_ok = hasattr(faiss, "StandardGpuResources") and int(faiss.get_num_gpus()) > 0
        if use_gpu is True and not gpu_ok:
            raise BankError(
                "a GPU FAISS index was requested but this FAISS build has no GPU support or "
                "sees no GPU: pip install 'supcon-stream[gpu]' on a CUDA host, or set "
                "use_gpu to 'auto'"
            )
        self.on_gpu = gpu_ok and use_gpu in (True, "auto")
        self._gpu_resources: Any = None
        if self.on_gpu:
            # The resources object owns the GPU scratch memory; it must outlive the index.
            self._gpu_resources = faiss.StandardGpuResources()
            config = faiss.GpuIndexFlatConfig()
            config.device = gpu_device
            self._index: Any = faiss.GpuIndexFlatIP(self._gpu_resources, dim, config)
        else:
            self._index = faiss.IndexFlatIP(dim)
        log.debug("faiss_index_created", dim=dim, on_gpu=self.on_gpu)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def attach(self, vectors: torch.Tensor, labels: torch.Tensor, count: Callable[[], int]) -> bool:
        return False  # FAISS keeps its own copy (on the GPU, in its own memory)

    def rebuild(self, vectors: torch.Tensor) -> None:
        _check_vectors(vectors, self.dim)
        # FAISS takes host float32 C-contiguous arrays (the GPU index copies them over itself).
        host = vectors.detach().to("cpu", torch.float32).contiguous().numpy()
        self._index.reset()
        if host.shape[0]:
            self._index.add(host)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_queries(queries, self.dim, k)
        q, n = queries.shape[0], len(self)
        if n == 0 or q == 0 or k == 0:
            return _empty_result(q, k, queries.device)
        host = queries.detach().to("cpu", torch.float32).contiguous().numpy()
        scores, rows = self._index.search(host, min(k, n))
        out_scores, out_rows = _pad(torch.from_numpy(scores), torch.from_numpy(rows), k)
        return out_scores.to(queries.device), out_rows.to(queries.device)


class TorchIndex:
    """Exact inner-product search with ``matmul`` + ``topk`` on the vectors' device.

    ``rebuild`` copies the vectors, so later writes to the bank's mirror do not change the
    index until the next rebuild (the same semantics as :class:`FaissIndex`).
    """

    def __init__(self, dim: int, device: torch.device | str | None = None) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self._vectors = torch.empty((0, dim), dtype=torch.float32, device=device)

    def __len__(self) -> int:
        return int(self._vectors.shape[0])

    def attach(self, vectors: torch.Tensor, labels: torch.Tensor, count: Callable[[], int]) -> bool:
        return False  # a copy, like FaissIndex; MirrorIndex is the in-place variant

    def rebuild(self, vectors: torch.Tensor) -> None:
        _check_vectors(vectors, self.dim)
        self._vectors = vectors.detach().to(torch.float32).clone()

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_queries(queries, self.dim, k)
        q, n = queries.shape[0], len(self)
        if n == 0 or q == 0 or k == 0:
            return _empty_result(q, k, queries.device)
        kk = min(k, n)
        x = queries.detach().to(self._vectors.device, torch.float32)
        block = max(1, _MAX_BLOCK_ELEMENTS // n)
        parts = [(x[i : i + block] @ self._vectors.T).topk(kk, dim=1) for i in range(0, q, block)]
        scores = torch.cat([p.values for p in parts])
        rows = torch.cat([p.indices for p in parts])
        out_scores, out_rows = _pad(scores, rows, k)
        return out_scores.to(queries.device), out_rows.to(queries.device)


class MirrorIndex(TorchIndex):
    """:class:`TorchIndex` that, once :meth:`attach`-ed to a bank, searches its mirror in place.

    Attached, it holds references to the bank's embedding and label tensors (capacity rows,
    row = slot): :meth:`rebuild` is a no-op and results are never stale, because nothing is
    copied. Empty slots (label < 0) are masked out before the top-k. That saves the rebuild,
    which dominates at large banks: copying the mirror's embeddings costs more than the
    search itself (docs/performance.md). Detached, it behaves exactly like
    :class:`TorchIndex` (same contract tests).
    """

    def __init__(self, dim: int, device: torch.device | str | None = None) -> None:
        super().__init__(dim, device)
        self._live: tuple[torch.Tensor, torch.Tensor, Callable[[], int]] | None = None

    @property
    def attached(self) -> bool:
        return self._live is not None

    def attach(self, vectors: torch.Tensor, labels: torch.Tensor, count: Callable[[], int]) -> bool:
        """Search ``vectors`` [capacity, dim] in place, rows with ``labels < 0`` excluded.

        ``count`` returns how many rows are occupied (host-side, so ``len`` needs no sync).
        """
        _check_vectors(vectors, self.dim)
        if labels.shape != (vectors.shape[0],):
            raise ValueError(f"labels must be [{vectors.shape[0]}], got {tuple(labels.shape)}")
        self._live = (vectors, labels, count)
        return True

    def __len__(self) -> int:
        return self._live[2]() if self._live is not None else super().__len__()

    def rebuild(self, vectors: torch.Tensor) -> None:
        if self._live is None:
            super().rebuild(vectors)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._live is None:
            return super().search(queries, k)
        _check_queries(queries, self.dim, k)
        vectors, labels, _ = self._live
        q, n = queries.shape[0], len(self)
        if n == 0 or q == 0 or k == 0:
            return _empty_result(q, k, queries.device)
        kk = min(k, vectors.shape[0])
        x = queries.detach().to(vectors.device, torch.float32)
        empty = labels < 0
        block = max(1, _MAX_BLOCK_ELEMENTS // vectors.shape[0])
        parts = [
            (x[i : i + block] @ vectors.T).masked_fill_(empty, float("-inf")).topk(kk, dim=1)
            for i in range(0, q, block)
        ]
        scores = torch.cat([p.values for p in parts])
        rows = torch.cat([p.indices for p in parts]).masked_fill(scores == float("-inf"), -1)
        out_scores, out_rows = _pad(scores, rows, k)
        return out_scores.to(queries.device), out_rows.to(queries.device)


def make_index(
    kind: IndexKind, dim: int, device: torch.device | str, use_gpu: UseGpu = "auto"
) -> FaissIndex | TorchIndex:
    """Build the index the settings ask for.

    ``kind="auto"``: FAISS when the learner runs on CUDA and FAISS sees a GPU, else
    :class:`MirrorIndex` on ``device`` (the fallback; see the comment below).

    With ``kind="faiss"`` and ``use_gpu="auto"`` the GPU index is used only when the learner
    itself runs on CUDA (a CPU learner would pay two host/device copies per search for
    nothing). ``kind="torch"`` searches on ``device``.
    """
    dev = torch.device(device)
    if kind == "auto":
        # FAISS flat on the CPU is slower than torch matmul + topk (docs/performance.md) and
        # needs a copy of the bank per rebuild; on a GPU, faiss-gpu when installed, else the
        # in-place torch search on the device, which never copies the bank to the host.
        on_gpu_faiss = dev.type == "cuda" and use_gpu == "auto" and faiss_gpu_available()
        kind = "faiss" if on_gpu_faiss else "mirror"
        log.info("vector_index_selected", kind=kind, device=str(dev))
    if kind == "torch":
        return TorchIndex(dim, dev)
    if kind == "mirror":
        return MirrorIndex(dim, dev)
    if kind == "faiss":
        if use_gpu == "auto" and dev.type != "cuda":
            use_gpu = False
        elif use_gpu == "auto" and not faiss_gpu_available():
            log.info(
                "faiss_gpu_unavailable",
                hint="pip install 'supcon-stream[gpu]' for a GPU index; using the CPU one",
            )
        gpu_device = dev.index if dev.type == "cuda" and dev.index is not None else 0
        return FaissIndex(dim, use_gpu=use_gpu, gpu_device=gpu_device)
    raise ValueError(f"unknown index kind {kind!r}: expected 'faiss' or 'torch'")
