"""The learner's class means under ``eval.class_means: stream``: a running mean per class and
task, moved with the encoder by semantic drift compensation (:mod:`pipeline.learning.drift`).

:class:`TaskClassMeans` keys the means by the events' ``task``: a class that comes back under
a new task (the same classes in a new domain) gets a mean of its own there, so NCM does not
read a class spread over several domains through one average of them. :class:`StreamClassMeans`
is what the learner holds: those means kept in step after every micro-batch, saved in the
checkpoint since they summarise the whole stream and cannot be rebuilt from the bank.
``bench forgetting`` reads the same classes (docs/forgetting.md, "A mean per class and task").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from memory_bank.bank import MemoryBank
from pipeline.learning.discriminant import WithinClassScatter, discriminant
from pipeline.learning.drift import (
    DRIFT_PROBE_ITEMS,
    DriftFollower,
    RunningClassMeans,
    fold_into,
    follow_encoder,
)
from pipeline.learning.inference import ClassMeans, unit_embeddings
from pipeline.learning.model import StreamNet

# Task names a class remembers per mean it may keep (TaskClassMeans): a stream that names a new
# task every day does not grow the key map, or the checkpoint, without bound.
TASK_KEYS_PER_MEAN = 4
# Bank items a learner without saved means seeds them from (the first this many slots: the
# same on every rank, no draw), so a restart on a large bank does not re-encode all of it.
SEED_ITEMS = 4096


class TaskClassMeans(RunningClassMeans):
    """Per class, one running mean for each task its events name, moved by SDC.

    The events' ``task`` keys the means: a class whose events all carry one task (a
    class-incremental stream) or none keeps one mean, exactly :class:`RunningClassMeans`'s;
    a class that comes back under a new task (the same classes in a new domain) gets a new
    mean there, and NCM reads the nearest of a class's means, so a class spread over several
    domains is not read through one average of them. A class keeps at most ``per_class``
    means: when another task brings it, its two nearest means merge (weighted by their
    counts) to make room, and both tasks' events then join the merged one. Means are stored in
    one block of ``per_class`` rows per class, so memory is bounded by ``max_classes ×
    per_class × dim`` whatever the number of tasks; a class remembers which row holds which of
    its tasks for its latest ``TASK_KEYS_PER_MEAN × per_class`` tasks (an older task that comes
    back is placed as a new one: it opens a row or joins by a merge).

    With a ``shrinkage``, the rows also keep a shared within-class scatter that follows the
    encoder (:mod:`pipeline.learning.discriminant`), and :meth:`class_means` is the linear
    discriminant of the rows under it, shrunk by that weight; without, NCM's unit means.
    """

    SHAPE = "model.max_classes x eval.means_per_class x model.embed_dim"

    def __init__(
        self,
        max_classes: int,
        dim: int,
        sigma: float | None,
        per_class: int = 1,
        device: torch.device | str = "cpu",
        shrinkage: float | None = None,
    ) -> None:
        if per_class < 1:
            raise ValueError(f"per_class must be at least 1, not {per_class}")
        super().__init__(max_classes * per_class, dim, sigma, device=device)
        self.max_classes = max_classes
        self.per_class = per_class
        self.keys: dict[tuple[int, str | None], int] = {}  # (class, task) -> row
        self.shrinkage = shrinkage
        self.scatter = WithinClassScatter(dim, device) if shrinkage is not None else None

    def _row_classes(self, rows: torch.Tensor) -> torch.Tensor:
        """Class ``c`` holds rows ``c × per_class`` to ``(c + 1) × per_class - 1``."""
        return rows // self.per_class

    def _row(self, label: int, task: str | None) -> int:
        """The row of ``(label, task)``, opened (or made by a merge) on its first event."""
        row = self.keys.get((label, task))
        if row is not None:
            return row
        base = label * self.per_class
        block = range(base, base + self.per_class)
        mine = [key for key in self.keys if key[0] == label]
        if len(mine) >= TASK_KEYS_PER_MEAN * self.per_class:
            del self.keys[mine.pop(0)]  # the class's oldest task name; its row keeps its mean
        named = {self.keys[key] for key in mine}  # rows opened in this batch have no count yet
        row = next((r for r in block if r not in named and int(self.counts[r]) == 0), None)
        if row is None:
            held = [r for r in block if int(self.counts[r]) > 0]
            # one mean a class (per_class 1) or a block opened by this batch alone: join it
            row = self._merge_nearest(held) if len(held) > 1 else (held or [base])[0]
        self.keys[(label, task)] = row
        return row

    def _merge_nearest(self, rows: list[int]) -> int:
        """Merge the two rows of one class whose means are nearest (cosine); the freed row."""
        unit = F.normalize(self.means[rows], dim=-1)
        sim = unit @ unit.T
        sim.fill_diagonal_(-float("inf"))
        i, j = divmod(int(torch.argmax(sim)), len(rows))
        keep, gone = min(rows[i], rows[j]), max(rows[i], rows[j])
        n_keep, n_gone = self.counts[keep], self.counts[gone]
        if self.scatter is not None:
            self.scatter.merge(self.means[keep], float(n_keep), self.means[gone], float(n_gone))
        total = (n_keep + n_gone).clamp(min=1)
        self.means[keep] = (self.means[keep] * n_keep + self.means[gone] * n_gone) / total
        self.counts[keep] += n_gone
        self.means[gone] = 0
        self.counts[gone] = 0
        for key, row in self.keys.items():
            if row == gone:
                self.keys[key] = keep
        return gone

    def add(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        tasks: Sequence[str | None] | None = None,
    ) -> None:
        """Fold embeddings ``[n, d]`` of classes ``labels [n]`` and tasks ``tasks`` (None:
        unnamed) into their means."""
        if labels.numel() == 0:
            return
        named = tasks if tasks is not None else [None] * labels.numel()
        keys = list(zip(labels.tolist(), named, strict=True))
        for key in dict.fromkeys(keys):  # open rows first: a merge re-points earlier keys
            self._row(*key)
        looked = [self.keys.get(key) for key in keys]
        if None in looked:  # a batch naming more new tasks of a class than it remembers
            looked = [self._row(*key) for key in keys]
        rows = torch.tensor(looked, dtype=torch.long, device=self.counts.device)
        if self.scatter is not None:  # about the means before the rows join them
            self.scatter.add(embeddings, rows, self.means, self.counts)
        fold_into(self.means, self.counts, rows, embeddings)

    def compensate(self, before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor) -> None:
        """SDC moves the means; the scatter is carried by the fitted linear drift map."""
        super().compensate(before, after, labels)
        if self.scatter is not None:
            self.scatter.carry(before, after)

    def class_means(self) -> ClassMeans:
        """NCM's read-out of the seen rows: the linear discriminant under the shared scatter
        when there is one, else the unit means (:meth:`cosine_means`)."""
        if self.scatter is None or self.shrinkage is None:  # both set, or neither
            return self.cosine_means()
        labels, rows = self.seen()
        return discriminant(labels, rows, self.scatter.covariance(), self.shrinkage)

    def cosine_means(self) -> ClassMeans:
        """The seen rows as unit means, read by cosine."""
        return super().class_means()

    def classes(self) -> int:
        """How many classes hold at least one mean."""
        return int((self.counts.view(self.max_classes, self.per_class) > 0).any(dim=1).sum())

    def mean_of(self, label: int) -> torch.Tensor | None:
        """Class ``label``'s running mean over all its tasks (not normalised; the
        count-weighted mean of its means), or None before its first event: the target of the
        bank's ``stream_mean`` eviction."""
        base = label * self.per_class
        counts = self.counts[base : base + self.per_class]
        held = torch.nonzero(counts > 0).squeeze(1)
        if held.numel() == 0:
            return None
        if held.numel() == 1:
            return self.means[base + int(held[0])]
        rows = self.means[base : base + self.per_class]
        weights = counts.to(rows.dtype)
        return (weights[:, None] * rows).sum(dim=0) / weights.sum()

    def reset(self) -> None:
        super().reset()
        self.keys.clear()
        if self.scatter is not None:
            self.scatter.reset()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The means, counts and scatter alone (what two ranks compare)."""
        scatter = {} if self.scatter is None else {"scatter": self.scatter.scatter}
        return {"means": self.means, "counts": self.counts, **scatter}

    def state_dict(self) -> dict[str, Any]:
        keys = [[label, task, row] for (label, task), row in self.keys.items()]
        state = {**super().state_dict(), "keys": keys, "per_class": self.per_class}
        if self.scatter is not None:
            state["scatter"] = self.scatter.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """A saved state of the same shape; or one mean per class (a checkpoint written before
        means were kept per task), each then the class's mean of unnamed events. A state
        without a scatter (saved without a shared covariance) leaves it empty: it fills again
        from the events that follow."""
        if "keys" not in state:
            self._load_one_per_class(state["means"], state["counts"])
            return
        super().load_state_dict(state)
        self.keys = {(int(c), None if t is None else str(t)): int(r) for c, t, r in state["keys"]}
        if self.scatter is not None:
            if "scatter" in state:
                self.scatter.load_state_dict(state["scatter"])
            else:
                self.scatter.reset()

    def _load_one_per_class(self, means: torch.Tensor, counts: torch.Tensor) -> None:
        if tuple(means.shape) != (self.max_classes, self.means.shape[1]):
            raise ValueError(
                f"saved class means of shape {tuple(means.shape)} do not fit "
                f"{(self.max_classes, self.means.shape[1])} (model.max_classes x "
                "model.embed_dim)"
            )
        self.reset()
        rows = torch.arange(self.max_classes) * self.per_class
        self.means[rows.to(self.means.device)] = means.to(self.means.device)
        self.counts[rows.to(self.counts.device)] = counts.to(self.counts.device)
        for label in torch.nonzero(counts > 0).squeeze(1).tolist():
            self.keys[(label, None)] = label * self.per_class


class StreamClassMeans:
    """The learner's class means under ``eval.class_means: stream``: per class and task (at
    most ``per_class`` tasks a class, :class:`TaskClassMeans`), the running mean of every
    trained event's embedding, moved by SDC (``sigma``) after each micro-batch.

    :meth:`follow` is called once the micro-batch is learned and in the bank; :meth:`means`
    is what NCM reads. :meth:`state_dict` goes into the checkpoint, so a restarted learner
    resumes with the means of the stream it covers (the events after it are trained again and
    added again, exactly once in the means as in the model).
    """

    def __init__(
        self,
        max_classes: int,
        dim: int,
        sigma: float | None,
        probe_items: int = DRIFT_PROBE_ITEMS,
        device: torch.device | str = "cpu",
        per_class: int = 1,
        shrinkage: float | None = None,
    ) -> None:
        self.running = TaskClassMeans(
            max_classes, dim, sigma, per_class, device=device, shrinkage=shrinkage
        )
        self.follower: DriftFollower[TaskClassMeans] = DriftFollower({"stream": self.running})
        self.probe_items = probe_items
        self.device = device
        self._read: ClassMeans | None = None  # means() since the last change

    def follow(
        self,
        model: StreamNet,
        bank: MemoryBank,
        x: torch.Tensor,
        y: torch.Tensor,
        tasks: Sequence[str | None] | None = None,
    ) -> None:
        """After ``x, y`` (labeled rows only, of the tasks ``tasks`` where known) were
        learned: see :func:`follow_encoder`."""
        self._read = None
        follow_encoder(self.follower, model, bank, x, y, self.probe_items, tasks)

    @torch.no_grad()
    def seed(self, model: StreamNet, bank: MemoryBank) -> None:
        """Start from the bank's items under ``model`` (a learner resuming without saved
        means: a checkpoint written before they existed, or a bank kept across a reset); from
        those of the first :data:`SEED_ITEMS` slots of a larger bank; a mean per class and
        task the items name."""
        self._read = None
        slots, feats, labels = bank.occupied(below=SEED_ITEMS)
        if labels.numel():
            model.eval()
            self.running.add(unit_embeddings(model, feats), labels, bank.slot_tasks(slots))

    def means(self) -> ClassMeans:
        """What NCM reads, made once per change (the discriminant's solve is not repeated for
        every prediction between two micro-batches)."""
        if self._read is None:
            self._read = self.running.class_means()
        return self._read

    def target(self, label: int) -> torch.Tensor | None:
        """The bank's ``stream_mean`` eviction target: :meth:`TaskClassMeans.mean_of`."""
        return self.running.mean_of(label)

    def __len__(self) -> int:
        """How many classes hold a mean."""
        return self.running.classes()

    def state_dict(self) -> dict[str, Any]:
        return {**self.running.state_dict(), "previous": self.follower.previous_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._read = None
        self.running.load_state_dict(state)
        self.follower.load_previous_state(state["previous"], self.device)
