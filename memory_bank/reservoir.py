"""Bank admission policies: class-balanced reservoir sampling (CBRS, Chrysakis & Moens,
ICML 2020) and plain reservoir sampling, with their slot bookkeeping.

Pure Python, no tensors: which event id sits in which slot of the bank, per-class slot lists,
per-class ``seen`` counters, and the admission decision for each offered item. The bank
(:mod:`memory_bank.bank`) turns the resulting :class:`Plan` into one store write and one
tensor write per call.

Policy, for an item of class ``c`` offered to a bank of capacity ``C``:

1. bank not full: store it in a free slot;
2. else, ``c`` is not among the largest classes: replace a random item of a largest class
   (ties broken at random), so small and new classes grow until the bank is balanced;
3. else: reservoir sampling within the class: accept with probability ``m_c / n_c``
   (``m_c`` items of ``c`` stored, ``n_c`` items of ``c`` seen, this one included) and
   replace a random item of ``c``.

The paper's "full class" is sticky (once largest, always full); here "largest" is the current
state, which can be rebuilt exactly from the stored items after a restart.

Which item of the victim class leaves (steps 2 and 3) is a random one, or, with a
:data:`VictimChooser` (the bank's evictions but ``random``), the one that chooser names among
the class's slots (at most :data:`MAX_VICTIM_CANDIDATES` of them, evenly spaced over a larger
class's list from a random start), or a random one where it names none; the chooser sees
embeddings, this module does not.

The accept draw in step 3 is a hash of the event id (blake2b, salted with the seed), not a
generator draw, so a re-delivered event tends to get the same decision it got the first time.
Victims come from a seeded ``random.Random``.

Offers are applied in place and recorded in an undo log, so that a failed write-through can
be rolled back (:meth:`ClassBalancedReservoir.rollback`) and the mirror never runs ahead of
the durable store.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

_U64 = float(1 << 64)

# A chooser weighs at most this many items of the victim class (evenly spaced over a larger
# class's list, see _spread), which bounds its cost per eviction whatever the bank size.
MAX_VICTIM_CANDIDATES = 256


class VictimChooser(Protocol):
    """Names the item a class gives up (the bank's evictions but ``random``)."""

    def weighs(self, class_items: int) -> bool:
        """Whether it chooses within a class of ``class_items`` items (else: a random one)."""
        ...

    def __call__(self, candidates: Sequence[int], joining: str | None, /) -> int:
        """The position in ``candidates`` (the victim class's slots) of the slot to evict;
        ``joining`` is the incoming item's id when it joins that class, None when it belongs
        to another."""
        ...


def uniform_from_id(event_id: str, salt: int = 0) -> float:
    """A deterministic draw in [0, 1) from an event id."""
    digest = hashlib.blake2b(
        event_id.encode("utf-8"), digest_size=8, key=salt.to_bytes(8, "little", signed=True)
    ).digest()
    return int.from_bytes(digest, "little") / _U64


@dataclass
class Plan:
    """What one batch of offers did, in the order it happened.

    ``placements`` maps each slot that now holds an item of this batch to the item's position
    in the batch; ``evicted`` lists ids that were stored before the batch and are gone now.
    Items accepted and then evicted again within the same batch appear in neither (they are
    counted in ``added`` and ``evictions``).
    """

    added: int = 0
    evictions: int = 0
    declined: int = 0
    placements: dict[int, int] = field(default_factory=dict)
    evicted: list[str] = field(default_factory=list)
    seen_increments: dict[int, int] = field(default_factory=dict)
    # (op, slot, id, label, aux) records, replayed backwards by rollback(); aux is "came
    # from the free list" for a place and the slot's position in its class list for a remove.
    _undo: list[tuple[str, int, str, int, int]] = field(default_factory=list, repr=False)
    _rng_state: Any = field(default=None, repr=False)


def class_balanced_subset(labels: Sequence[int], target: int, rng: random.Random) -> list[int]:
    """Positions of at most ``target`` items, as evenly spread over classes as possible.

    Used when a stored bank is larger than the capacity it is opened with. Quotas are filled
    smallest class first (each class gets an equal share of what is left, or all its items
    if it has fewer); the items kept within a class are drawn at random.
    """
    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        by_class.setdefault(label, []).append(position)
    if len(labels) <= target:
        return list(range(len(labels)))
    order = sorted(by_class, key=lambda c: (len(by_class[c]), c))
    remaining = target
    kept: list[int] = []
    for i, label in enumerate(order):
        members = by_class[label]
        quota = min(len(members), remaining // (len(order) - i))
        remaining -= quota
        kept.extend(rng.sample(members, quota))
    return sorted(kept)


class ClassBalancedReservoir:
    """Slots 0..capacity-1, each empty or holding one (event id, int label)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.seed = seed
        self._rng = random.Random(seed)
        self._slot_id: list[str | None] = [None] * capacity
        self._slot_label: list[int] = [-1] * capacity
        self._pos: list[int] = [-1] * capacity  # slot -> index in its class's slot list
        self._id_slot: dict[str, int] = {}
        self._class_slots: dict[int, list[int]] = {}
        # Pop from the end: slot 0 is filled first, which keeps small banks easy to read.
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._seen: dict[int, int] = {}
        # Size of the largest class, kept in O(1) per change with a histogram of class sizes
        # (size -> number of classes of that size): the policy asks for it on every offer.
        self._max_count = 0
        self._size_hist: dict[int, int] = {}
        self.victim_chooser: VictimChooser | None = None  # None: a random item of the class

    # -- queries ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._id_slot)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._id_slot

    def slot_of(self, event_id: str) -> int | None:
        return self._id_slot.get(event_id)

    def id_at(self, slot: int) -> str | None:
        return self._slot_id[slot]

    def label_at(self, slot: int) -> int:
        return self._slot_label[slot]

    def class_counts(self) -> dict[int, int]:
        return {label: len(slots) for label, slots in self._class_slots.items() if slots}

    def draw_balanced(self, take: int, rng: random.Random) -> list[int] | None:
        """``take`` distinct slots: each draw picks a class uniformly, then an item of it.

        Host-side and O(take + classes), so the cost does not grow with the bank. A slot
        drawn twice is drawn again; after ``4 * take`` draws without enough distinct slots
        (classes much smaller than ``take``) it returns None and the caller uses an exact draw.
        """
        classes = [slots for slots in self._class_slots.values() if slots]
        if not classes or take <= 0:
            return None
        n, rand = len(classes), rng.random
        chosen: set[int] = set()
        out: list[int] = []
        for _ in range(4 * take):
            slots = classes[int(rand() * n)]
            slot = slots[int(rand() * len(slots))]
            if slot not in chosen:
                chosen.add(slot)
                out.append(slot)
                if len(out) == take:
                    return out
        return None

    def seen_counts(self) -> dict[int, int]:
        return dict(self._seen)

    def ids(self) -> list[str]:
        """Stored ids in slot order."""
        return [event_id for event_id in self._slot_id if event_id is not None]

    # -- loading ---------------------------------------------------------------------------

    def restore(self, entries: Sequence[tuple[str, int]], seen: dict[int, int]) -> list[int]:
        """Place ``(id, label)`` entries into slots 0.. in order; returns their slots.

        The same state as placing them one by one from the free list, built in bulk (a
        100k-item bank is restored at every start). Ids must be distinct.
        """
        if len(self):
            raise RuntimeError("restore() needs an empty reservoir")
        n = len(entries)
        if n > self.capacity:
            raise ValueError(f"more entries than capacity {self.capacity}")
        slots = list(range(n))
        self._id_slot = {event_id: slot for slot, (event_id, _label) in enumerate(entries)}
        if len(self._id_slot) != n:
            self._id_slot = {}
            raise ValueError("restore() got an id twice")
        for slot, (event_id, label) in enumerate(entries):
            self._slot_id[slot] = event_id
            self._slot_label[slot] = label
            members = self._class_slots.setdefault(label, [])
            self._pos[slot] = len(members)
            members.append(slot)
        del self._free[len(self._free) - n :]  # the free list pops slot 0 first
        for members in self._class_slots.values():
            self._resize(0, len(members))
        self._seen = dict(seen)
        return slots

    # -- offers ----------------------------------------------------------------------------

    def offer_batch(self, items: Sequence[tuple[str, int]]) -> Plan:
        """Offer ``(event id, label)`` items, in order. Ids must be new (callers dedupe)."""
        plan = Plan(_rng_state=self._rng.getstate())
        batch_pos: dict[str, int] = {}
        prior_removed: dict[str, int] = {}  # prior id -> its slot
        for position, (event_id, label) in enumerate(items):
            if event_id in self._id_slot or event_id in batch_pos:
                raise ValueError(f"id {event_id!r} is already in the bank or the batch")
            self._seen[label] = self._seen.get(label, 0) + 1
            plan.seen_increments[label] = plan.seen_increments.get(label, 0) + 1
            target = self._admit(event_id, label)
            if target is None:
                plan.declined += 1
                continue
            slot = self._occupy(
                plan,
                target,
                (event_id, label),
                batch_pos=batch_pos,
                prior_removed=prior_removed,
            )
            batch_pos[event_id] = position
            # Overwrites the entry of a batch item that was just evicted from this slot.
            plan.placements[slot] = position
            plan.added += 1
        plan.evicted = list(prior_removed)
        return plan

    def rollback(self, plan: Plan) -> None:
        """Undo everything ``plan`` did (the store write it fed failed)."""
        # Exact inverses, in reverse order, so that class lists (and with the rewound
        # generator, every later victim choice) are as if the plan never ran.
        for op, slot, event_id, label, aux in reversed(plan._undo):
            if op == "place":
                self._remove(slot)  # it is last in its class list: a plain pop
                if aux:
                    self._free.append(slot)  # popped from the end, so pushed back in order
            else:
                self._place(slot, event_id, label, position=aux)
        for label, inc in plan.seen_increments.items():
            self._seen[label] -= inc
            if not self._seen[label]:
                del self._seen[label]
        if plan._rng_state is not None:
            self._rng.setstate(plan._rng_state)
        plan._undo.clear()

    # -- internals -------------------------------------------------------------------------

    def _admit(self, event_id: str, label: int) -> int | None:
        """Pick the slot for a new item (evicting its occupant), or None to decline."""
        if self._free:
            return -1  # sentinel: take a free slot
        count = len(self._class_slots.get(label, ()))
        if count < self._max_count:
            victim_class = self._random_largest_class()
        else:
            seen = max(self._seen[label], count)  # guards a store whose counters lag
            if uniform_from_id(event_id, self.seed) >= count / seen:
                return None
            victim_class = label
        slots = self._class_slots[victim_class]
        chooser = self.victim_chooser
        if chooser is None or len(slots) == 1 or not chooser.weighs(len(slots)):
            return slots[self._rng.randrange(len(slots))]
        candidates = slots if len(slots) <= MAX_VICTIM_CANDIDATES else self._spread(slots)
        joining = event_id if victim_class == label else None
        return candidates[chooser(candidates, joining)]

    def _spread(self, slots: list[int]) -> list[int]:
        """:data:`MAX_VICTIM_CANDIDATES` slots evenly spaced over a class's list from a random
        start: one draw of the generator, not one per candidate (a large bank evicts often)."""
        step = len(slots) / MAX_VICTIM_CANDIDATES
        start = self._rng.random() * step
        return [slots[int(start + i * step)] for i in range(MAX_VICTIM_CANDIDATES)]

    def _occupy(
        self,
        plan: Plan,
        target: int,
        item: tuple[str, int],
        *,
        batch_pos: dict[str, int],
        prior_removed: dict[str, int],
    ) -> int:
        """Put the item into ``target`` (-1: a free slot), evicting the occupant."""
        event_id, label = item
        if target == -1:
            slot = self._free.pop()
            self._place(slot, event_id, label)
            plan._undo.append(("place", slot, event_id, label, 1))
            return slot
        victim_id = self._slot_id[target]
        victim_label = self._slot_label[target]
        assert victim_id is not None
        position = self._remove(target)
        plan._undo.append(("remove", target, victim_id, victim_label, position))
        plan.evictions += 1
        if victim_id in batch_pos:
            del batch_pos[victim_id]  # accepted earlier in this call, gone again
        else:
            prior_removed[victim_id] = target
        self._place(target, event_id, label)
        plan._undo.append(("place", target, event_id, label, 0))
        return target

    def _random_largest_class(self) -> int:
        largest = [c for c, slots in self._class_slots.items() if len(slots) == self._max_count]
        largest.sort()  # dict order depends on history; sorting keeps the draw reproducible
        return largest[self._rng.randrange(len(largest))]

    def _place(self, slot: int, event_id: str, label: int, position: int | None = None) -> None:
        """Store an item; ``position`` (rollback only) undoes a swap-remove exactly."""
        self._slot_id[slot] = event_id
        self._slot_label[slot] = label
        self._id_slot[event_id] = slot
        slots = self._class_slots.setdefault(label, [])
        self._pos[slot] = len(slots)
        slots.append(slot)
        if position is not None and position < len(slots) - 1:
            moved = slots[position]
            slots[position], slots[-1] = slot, moved
            self._pos[slot], self._pos[moved] = position, len(slots) - 1
        self._resize(len(slots) - 1, len(slots))

    def _remove(self, slot: int) -> int:
        """Remove the item in ``slot``; returns its former position in its class list."""
        event_id, label = self._slot_id[slot], self._slot_label[slot]
        assert event_id is not None
        slots = self._class_slots[label]
        # Swap-remove keeps removal O(1); rollback() restores the order exactly.
        pos, last = self._pos[slot], slots[-1]
        slots[pos] = last
        self._pos[last] = pos
        slots.pop()
        self._resize(len(slots) + 1, len(slots))
        if not slots:
            del self._class_slots[label]
        del self._id_slot[event_id]
        self._slot_id[slot] = None
        self._slot_label[slot] = -1
        self._pos[slot] = -1
        return pos

    def _resize(self, old: int, new: int) -> None:
        """One class went from ``old`` to ``new`` items (``new = old ± 1``)."""
        if old:
            self._size_hist[old] -= 1
            if not self._size_hist[old]:
                del self._size_hist[old]
        if new:
            self._size_hist[new] = self._size_hist.get(new, 0) + 1
        if new > self._max_count:
            self._max_count = new
        elif old == self._max_count and old not in self._size_hist:
            self._max_count = new  # the only class of the largest size shrank by one


class Reservoir(ClassBalancedReservoir):
    """Plain reservoir sampling (Vitter's algorithm R), the usual experience-replay memory.

    Once the bank is full, the ``n``-th item offered (all classes together) is kept with
    probability ``capacity / n`` and replaces a uniformly drawn slot, so the bank is a
    uniform sample of the stream: class proportions follow the stream's, and a class seen
    long ago fades as it would in the stream. Same bookkeeping, hash-derived accept draw and
    rollback as :class:`ClassBalancedReservoir`; only the admission rule differs.
    """

    def _admit(self, event_id: str, label: int) -> int | None:
        if self._free:
            return -1
        seen = max(sum(self._seen.values()), self.capacity)
        if uniform_from_id(event_id, self.seed) >= self.capacity / seen:
            return None
        return self._rng.randrange(self.capacity)  # full: every slot holds an item


POLICIES: dict[str, type[ClassBalancedReservoir]] = {
    "class_balanced": ClassBalancedReservoir,
    "reservoir": Reservoir,
}
