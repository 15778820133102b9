"""Label registry: class names (as they arrive on the stream) to dense indices.

SupCon needs no fixed number of classes, but the CE head and the bank mirror use dense
indices, so the registry is capped at ``model.max_classes``. It is saved in every checkpoint;
indices never change once given.
"""

from __future__ import annotations

from collections.abc import Iterable


class LabelRegistry:
    def __init__(self, max_classes: int, names: Iterable[str] = ()) -> None:
        self.max_classes = max_classes
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        self.class_task: dict[str, str | None] = {}
        for name in names:
            self.index(name)

    def __len__(self) -> int:
        return len(self._names)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def has_room_for(self, name: str) -> bool:
        return name in self._index or len(self._names) < self.max_classes

    def index(self, name: str, task: str | None = None) -> int:
        """The index of ``name``, registering it if new. Raises ValueError when full."""
        found = self._index.get(name)
        if found is not None:
            return found
        if len(self._names) >= self.max_classes:
            raise ValueError(f"label registry is full ({self.max_classes} classes)")
        self._index[name] = len(self._names)
        self._names.append(name)
        self.class_task.setdefault(name, task)
        return self._index[name]

    def name(self, index: int) -> str:
        return self._names[index]

    def note_task(self, name: str, task: str | None) -> None:
        """Record the task a class first appeared in (when it was registered without one)."""
        if self.class_task.get(name) is None and task is not None:
            self.class_task[name] = task
