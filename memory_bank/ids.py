"""The bank's identity bookkeeping: class names against int labels, and recently offered ids."""

from __future__ import annotations

from collections import OrderedDict


class ClassNames:
    """Int label <-> class name, one to one: the learner's labels against the names stored."""

    def __init__(self) -> None:
        self.by_label: dict[int, str] = {}
        self._by_name: dict[str, int] = {}

    def register(self, label: int, name: str) -> int:
        """Record (or check) that ``label`` is ``name``; returns ``label``.

        Raises ValueError for a negative label or one that contradicts what is known.
        """
        if label < 0:
            raise ValueError(f"labels must be >= 0, got {label} for class {name!r}")
        known_name = self.by_label.get(label)
        known_label = self._by_name.get(name)
        if known_name is None and known_label is None:
            self.by_label[label] = name
            self._by_name[name] = label
        elif known_name != name or known_label != label:
            raise ValueError(
                f"class {name!r} has label {label}, but the bank knows label {label} as "
                f"{known_name!r} and {name!r} as label {known_label}"
            )
        return label

    def bound(self) -> int:
        """One past the largest label known; 0 when none is."""
        return max(self.by_label, default=-1) + 1


class RecentIds:
    """The last ``size`` event ids remembered, oldest forgotten first (``size`` 0: none)."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self._size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        if self._size == 0:
            return
        self._ids[event_id] = None
        self._ids.move_to_end(event_id)
        while len(self._ids) > self._size:
            self._ids.popitem(last=False)
