"""The optimizer's ``state`` as dicts that count their changes.

UndecayedSGD gathers its lists of momentum buffers, masks and gradient sums from the
per-parameter state once and keeps them; a count of changes, moved on by every write to the
state (``set_mask``, ``del state["momentum_buffer"]``, a new entry), says when they must be
gathered again. Copies and pickles of it are plain ``dict`` / ``defaultdict(dict)``, which
the optimizer tracks again when it gets them back (``__setstate__``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any


class Revision:
    """A count of changes, shared by an :class:`OptimizerState` and its entries."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class ParamState(dict):
    """The state of one parameter: a ``dict`` that counts its changes in ``revision``."""

    __slots__ = ("revision",)

    def __init__(self, revision: Revision, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.revision = revision

    def __setitem__(self, key, value) -> None:
        self.revision.count += 1
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        self.revision.count += 1
        super().__delitem__(key)

    def __ior__(self, other):
        self.revision.count += 1
        return super().__ior__(other)

    def pop(self, *args):
        self.revision.count += 1
        return super().pop(*args)

    def popitem(self):
        self.revision.count += 1
        return super().popitem()

    def clear(self) -> None:
        self.revision.count += 1
        super().clear()

    def update(self, *args, **kwargs) -> None:
        self.revision.count += 1
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        if key not in self:
            self.revision.count += 1
        return super().setdefault(key, default)

    def __reduce__(self):
        return dict, (dict(self),)


class OptimizerState(defaultdict):
    """``optimizer.state``: parameter -> :class:`ParamState`, created on first access like
    ``defaultdict(dict)``. A change to it or to any entry moves ``revision.count`` on; a
    plain dict stored in it is copied into a ``ParamState``."""

    __slots__ = ("revision",)

    def __init__(self, items: Any = ()) -> None:
        super().__init__(None)
        self.revision = Revision()
        for key, value in dict(items).items():
            self[key] = value

    def __missing__(self, key) -> ParamState:
        value = self[key] = ParamState(self.revision)
        return value

    def __setitem__(self, key, value) -> None:
        if not (isinstance(value, ParamState) and value.revision is self.revision):
            value = ParamState(self.revision, value)
        self.revision.count += 1
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        self.revision.count += 1
        super().__delitem__(key)

    def __ior__(self, other):
        self.update(other)
        return self

    def pop(self, *args):
        self.revision.count += 1
        return super().pop(*args)

    def popitem(self):
        self.revision.count += 1
        return super().popitem()

    def clear(self) -> None:
        self.revision.count += 1
        super().clear()

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = {} if default is None else default
        return self[key]

    def __reduce__(self):
        return defaultdict, (dict, {key: dict(value) for key, value in self.items()})
