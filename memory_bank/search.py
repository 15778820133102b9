"""Nearest-neighbour reads of the bank's mirror: index refresh, hard negatives, kNN votes.

:class:`MirrorSearch` owns the bank's :class:`~memory_bank.protocols.VectorIndex` and the
schedule that keeps it close to the mirror. It reads the mirror's embedding and label tensors
(the bank's own, shared, never copied except into an index that keeps a copy) and writes
nothing to them.

An index either searches the mirror in place (:meth:`VectorIndex.attach` says yes: row =
slot, never stale, nothing to rebuild) or keeps its own copy, rebuilt from the mirror's
occupied slots when stale; then the row -> slot map is kept here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)

from memory_bank.protocols import VectorIndex

# Neighbours fetched per hard-negative query: the nearest items of a query are mostly of its
# own class, so search deeper than k to find items of other classes.
_MIN_NEGATIVE_DEPTH = 32
_NEGATIVE_DEPTH_FACTOR = 4


def _first_positions(values: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each distinct value of a 1-d tensor, ascending."""
    unique, inverse = torch.unique(values, return_inverse=True)
    positions = torch.arange(values.shape[0], device=values.device)
    first = torch.full_like(unique, values.shape[0]).scatter_reduce_(0, inverse, positions, "amin")
    return first.sort().values


class MirrorSearch:
    """The bank's index over its mirror (``embeddings`` / ``labels``: capacity rows, label -1 =
    empty slot), searched for hard negatives and kNN predictions.

    ``count`` returns how many slots are occupied (host-side); ``generator`` is the bank's, so
    one seed fixes every random draw of the bank.
    """

    def __init__(
        self,
        index: VectorIndex,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        count: Callable[[], int],
        generator: torch.Generator,
        *,
        refresh_steps: int,
        hard_negative_queries: int,
        hard_negative_every: int,
    ) -> None:
        self.index = index
        self._embeddings = embeddings
        self._labels = labels
        self._count = count
        self._generator = generator
        self._device = labels.device
        self._capacity = labels.shape[0]
        self._refresh_steps = refresh_steps
        self._queries = hard_negative_queries
        self._every = hard_negative_every
        # Searched in place: row = slot, never stale, no rebuild copies.
        self._in_place = index.attach(embeddings, labels, count)
        if self._in_place:
            self._index_slots = torch.arange(self._capacity, device=self._device)
        else:  # index row -> slot, set at each rebuild
            self._index_slots = torch.empty(0, dtype=torch.int64, device=self._device)
        self._stale = False
        self._due = False  # stale and refresh_steps elapsed: rebuild before next search
        self._steps = 0
        # Hard-negative candidates of the last search (see hard_negatives): distinct slots,
        # best first, and the label of the query each is nearest to; reused between searches.
        self._negative_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._negative_calls = 0
        self._owner_bound = 1

    def mark_stale(self) -> None:
        """The mirror's embeddings or membership changed since the last rebuild."""
        self._stale = True

    def step(self) -> None:
        """Once per train step: a stale index is due for a rebuild every ``refresh_steps``.

        The rebuild itself is lazy, done just before the next search: with a search interval,
        a large bank is not copied into the index on steps that never search it.
        """
        self._steps += 1
        if self._stale and self._steps % self._refresh_steps == 0:
            self._due = True

    def refresh(self) -> None:
        """Rebuild the index from the mirror's current embeddings (one host sync)."""
        if self._in_place:
            self._stale = self._due = False
            return
        occupied = torch.nonzero(self._labels >= 0).squeeze(1)
        self.index.rebuild(self._embeddings[occupied])
        self._index_slots = occupied
        self._stale = False
        self._due = False

    def _search_index(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Callers refresh a due index first: they size the search by the refreshed index.
        scores, rows = self.index.search(queries, k)
        return scores.to(self._device), rows.to(self._device)

    def hard_negatives(
        self,
        queries: torch.Tensor,
        query_labels: torch.Tensor,
        k: int,
        exclude_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Up to ``k`` distinct slots of other classes nearest to the queries, best first.

        At most ``hard_negative_queries`` queries are searched (a random subset); labels are
        checked against the mirror now, since the index may be a few steps old.

        Search interval: the index is searched on every ``hard_negative_every``-th call only;
        the calls in between reuse that search's ranked candidates, keeping those found for
        queries of a class present in this batch and still of another class in the mirror.
        A search over a large bank costs several train steps (docs/performance.md), so the
        interval bounds its cost per step as the bank grows.
        """
        empty = torch.empty(0, dtype=torch.int64, device=self._device)
        if k <= 0 or queries.shape[0] == 0 or (len(self.index) == 0 and not self._due):
            return empty
        query_labels = query_labels.to(self._device, torch.int64)
        if self._negative_cache is None or self._negative_calls % self._every == 0:
            self._negative_cache = self._search_negatives(queries, query_labels, k)
        self._negative_calls += 1
        slots, owners = self._negative_cache
        current = self._labels[slots]
        # Lookup masks instead of torch.isin (faster at these sizes). Owners are below
        # _owner_bound; query labels beyond it land in an overflow bucket.
        n_labels = self._owner_bound
        present = torch.zeros(n_labels + 1, dtype=torch.bool, device=self._device)
        # Unlabeled queries (label -1) mark no class present and own no candidate.
        present[query_labels[query_labels >= 0].clamp(max=n_labels)] = True
        keep = (owners >= 0) & (current >= 0) & (current != owners) & present[owners.clamp(min=0)]
        if exclude_slots is not None and exclude_slots.numel():
            excluded = torch.zeros(self._capacity, dtype=torch.bool, device=self._device)
            excluded[exclude_slots.to(self._device, torch.int64)] = True
            keep &= ~excluded[slots]
        return slots[keep][:k]  # the one sync: the result's length

    def _search_negatives(
        self, queries: torch.Tensor, query_labels: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Search the index; returns distinct candidate slots, best first, and for each the
        label of the query it is nearest to (its "owner"), at most ``4 * k`` per query."""
        queries = queries.detach().to(self._device, torch.float32)
        if queries.shape[0] > self._queries:
            pick = torch.randperm(queries.shape[0], generator=self._generator, device=self._device)
            pick = pick[: self._queries]
            queries, query_labels = queries[pick], query_labels[pick]
        if self._due:
            self.refresh()
        depth = min(len(self.index), max(_NEGATIVE_DEPTH_FACTOR * k, _MIN_NEGATIVE_DEPTH))
        scores, rows = self._search_index(F.normalize(queries, dim=1), depth)
        slots = self._index_slots[rows.clamp(min=0)]
        current = self._labels[slots]
        owners = query_labels[:, None].expand_as(slots)
        # One host read per search (not per call): sizes the owner mask of the cached calls.
        self._owner_bound = int(query_labels.max()) + 1
        valid = (rows >= 0) & (owners >= 0) & (current >= 0) & (current != owners)
        flat_scores = scores.masked_fill(~valid, float("-inf")).flatten()
        order = flat_scores.argsort(descending=True, stable=True)
        ranked_slots, ranked_owners = slots.flatten()[order], owners.flatten()[order]
        first = _first_positions(ranked_slots)  # each slot at the rank of its best score
        found = flat_scores[order][first] > float("-inf")
        return ranked_slots[first][found], ranked_owners[first][found]

    def knn_predict(
        self, queries: torch.Tensor, k: int, n_labels: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarity-weighted majority vote of the ``k`` nearest items over labels
        ``0..n_labels-1`` (see :meth:`MemoryBank.knn_predict`)."""
        q = queries.shape[0]
        if self._due or (len(self.index) == 0 and self._count() > 0):
            # Items arrived before the first scheduled refresh: build the index now rather
            # than answer "no label" until step index_refresh_steps.
            self.refresh()
        if len(self.index) == 0 or k <= 0 or n_labels <= 0:
            return (
                torch.full((q,), -1, dtype=torch.int64, device=queries.device),
                torch.zeros(q, dtype=torch.float32, device=queries.device),
            )
        x = F.normalize(queries.detach().to(self._device, torch.float32), dim=1)
        scores, rows = self._search_index(x, k)
        labels = self._labels[self._index_slots[rows.clamp(min=0)]]
        valid = (rows >= 0) & (labels >= 0)
        # Cosine can be negative; clamp so a far neighbour never votes against its class,
        # and add a floor so that all-negative neighbourhoods still vote (unweighted).
        weights = torch.where(valid, scores.clamp(min=0) + 1e-6, torch.zeros_like(scores))
        votes = torch.zeros((q, n_labels), device=self._device)
        votes.scatter_add_(1, labels.clamp(min=0), weights)
        top, predicted = votes.max(dim=1)
        total = votes.sum(dim=1)
        predicted = torch.where(total > 0, predicted, torch.full_like(predicted, -1))
        confidence = torch.where(total > 0, top / total.clamp(min=1e-12), torch.zeros_like(top))
        return predicted.to(queries.device), confidence.to(queries.device)
