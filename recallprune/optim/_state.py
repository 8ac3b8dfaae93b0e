"""The optimizer's ``state`` as dicts that count their changes.

UndecayedSGD gathers its lists of momentum buffers, masks and gradient sums from the
per-parameter state once and keeps them; a count of changes, moved on by every write to the
state (``set_mask``, ``del state["momentum_buffer"]``, a new entry), says when they must be
gathered again. Copies and pickles of it are plain ``dict`` / ``defaultdict(dict)``, which
the optimizer tracks again when it gets them back (``__setstate__``).

:func:`checked_param_state` checks and converts what a checkpoint holds for one parameter, so
that a load can check everything before it changes anything.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from ..ops.undecayed_sgd import in_layout_of

# State keys of UndecayedSGD beyond torch.optim.SGD's "momentum_buffer".
MASK_KEYS = ("keep_mask", "decay_mask")
AVERAGE_KEYS = ("grad_sum", "grad_count")
EXTRA_KEYS = MASK_KEYS + AVERAGE_KEYS


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a gradient sum for weights of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def checked_param_state(param_id: Any, param: Tensor, saved: dict[str, Any]) -> dict[str, Any]:
    """UndecayedSGD's entries of one parameter's saved state, checked against the parameter
    and converted to what a step takes: bool masks, gradient sums in the opmath dtype, an
    int64 step count, all on the parameter's device. Raises ValueError or TypeError naming
    the parameter and the entry; changes nothing.

    Masks may be bool, or hold only 0 and 1 in another dtype: ``torch.optim.SGD`` casts every
    tensor of a loaded state to its parameter's dtype, so a checkpoint that went through it
    holds float masks. The momentum buffer, which torch's loader converts itself, is checked
    for its shape only.
    """
    where = f"load_state_dict: parameter {param_id} (shape {tuple(param.shape)})"
    buf = saved.get("momentum_buffer")
    if buf is not None:
        _check_tensor(where, "momentum_buffer", buf, param)
    checked: dict[str, Any] = {}
    for key in MASK_KEYS:
        if key in saved:
            checked[key] = _checked_mask(where, key, saved[key], param)
    has_sum, has_count = "grad_sum" in saved, "grad_count" in saved
    if has_sum != has_count:
        present, missing = ("grad_sum", "grad_count") if has_sum else ("grad_count", "grad_sum")
        raise ValueError(f"{where}: the state has {present} but no {missing}")
    if has_sum:
        grad_sum = saved["grad_sum"]
        _check_tensor(where, "grad_sum", grad_sum, param)
        if not grad_sum.is_floating_point():
            raise TypeError(f"{where}: grad_sum must be a float tensor, got {grad_sum.dtype}")
        checked["grad_sum"] = in_layout_of(param, grad_sum, opmath_dtype(param.dtype), copy=True)
        checked["grad_count"] = _checked_count(where, saved["grad_count"], param.device)
    return checked


def _check_tensor(where: str, key: str, value: Any, param: Tensor) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{where}: {key} must be a tensor, got {type(value).__name__}")
    if value.shape != param.shape:
        raise ValueError(
            f"{where}: {key} has shape {tuple(value.shape)}, expected the parameter's shape"
        )


def _checked_mask(where: str, key: str, mask: Any, param: Tensor) -> Tensor:
    _check_tensor(where, key, mask, param)
    if mask.dtype != torch.bool:
        if mask.is_complex():
            raise TypeError(f"{where}: {key} must be a bool tensor (or 0/1), got {mask.dtype}")
        not_binary = (mask != 0) & (mask != 1)
        if bool(not_binary.any()):
            example = mask[not_binary].reshape(-1)[0].item()
            raise ValueError(
                f"{where}: {key} ({mask.dtype}) holds {int(not_binary.sum())} value(s) other "
                f"than 0 and 1 (e.g. {example}); a mask must be bool, or 0/1 as "
                "torch.optim.SGD saves it"
            )
        mask = mask != 0
    # A copy in the parameter's memory layout, which the kernels take (e.g. channels_last).
    return in_layout_of(param, mask, torch.bool, copy=True)


def _checked_count(where: str, count: Any, device: torch.device) -> Tensor:
    if not isinstance(count, Tensor) or count.numel() != 1:
        got = f"shape {tuple(count.shape)}" if isinstance(count, Tensor) else type(count).__name__
        raise ValueError(f"{where}: grad_count must be a one-element tensor, got {got}")
    value = count.reshape(()).double()
    if not (bool(value >= 0) and bool(value == value.round())):
        raise ValueError(f"{where}: grad_count must be a whole number of steps, got {value.item()}")
    return count.reshape(()).to(device=device, dtype=torch.int64, copy=True)


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
