"""Keep masks for optimizers that have none of their own: after every step of any
``torch.optim.Optimizer``, a step post-hook sets the pruned weights back to exactly zero.

UndecayedSGD holds keep masks itself and applies them inside its fused update; every other
optimizer gets one :class:`StepMasks` with the same ``set_mask``/``get_mask`` interface, so
that the Pruner treats both alike (:func:`mask_holder`).

Why re-zeroing the weights is enough, and the optimizer state is left alone: in SGD, Adam,
AdamW, RMSprop, Adagrad and the other element-wise optimizers, a pruned element's state
(momentum, ``exp_avg``, ``exp_avg_sq``) moves only its own weight, which the hook zeroes again,
so the kept weights follow exactly the trajectory of a masked update. The state keeps the
running statistics of the pruned weight's gradient, which is what a weight that is regrown
later should start from; zeroing Adam's second moment instead would make its first steps
after regrowth several times too large. Optimizers whose update couples elements (LBFGS,
Muon, Adafactor's factored second moment) still end every step with the pruned weights at
zero, but the pruned weights' gradients then shape the kept weights' update.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

# One StepMasks per optimizer, so that every Pruner attached to it shares one hook and sees
# the masks the others set (as UndecayedSGD's own masks are shared). Weak keys: the entry
# goes with the optimizer.
_HOLDERS: weakref.WeakKeyDictionary[torch.optim.Optimizer, StepMasks] = weakref.WeakKeyDictionary()

# Integer types of each element size: on the CPU, a bitwise AND with an all-ones or
# all-zeros integer mask zeroes a tensor about 7x faster than masked_fill_ with a bool mask
# (torch 2.14, AVX2), gives +0.0, and clears NaN and inf too.
_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def mask_holder(optimizer: Any) -> Any:
    """What keeps the masks for ``optimizer``: the optimizer itself if it has keep masks of
    its own (``set_mask`` and ``get_mask``, as UndecayedSGD), else its :class:`StepMasks`."""
    if callable(getattr(optimizer, "set_mask", None)) and callable(
        getattr(optimizer, "get_mask", None)
    ):
        return optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer (its pruned weights are kept at zero "
            f"by a step post-hook), got {type(optimizer).__name__}"
        )
    holder = _HOLDERS.get(optimizer)
    if holder is None:
        holder = _HOLDERS[optimizer] = StepMasks(optimizer)
    return holder


class StepMasks:
    """Keep masks of one optimizer's parameters, applied by a step post-hook.

    The hook is registered while some mask prunes something and removed when none does
    (every mask cleared or all-true), so an optimizer with nothing pruned pays nothing.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)  # the optimizer holds the hook, hence this
        self._keep: dict[Tensor, Tensor] = {}  # parameter -> bool keep mask
        self._zeroing: dict[Tensor, Tensor] = {}  # parameter -> the mask the hook applies
        self._handle: RemovableHandle | None = None

    @property
    def hooked(self) -> bool:
        """Whether the step post-hook is registered."""
        return self._handle is not None

    def get_mask(self, param: Tensor) -> Tensor | None:
        """The keep mask of ``param``, or ``None`` if nothing of it is pruned."""
        return self._keep.get(param)

    @torch.no_grad()
    def set_mask(self, param: Tensor, keep_mask: Tensor | None) -> None:
        """Keep ``param`` only where ``keep_mask`` is true, after every step from now on;
        the pruned weights are zeroed at once. ``None`` (or an all-true mask) clears it."""
        optimizer = self._optimizer()
        if optimizer is None:
            raise RuntimeError("the optimizer of these masks no longer exists")
        if not any(p is param for group in optimizer.param_groups for p in group["params"]):
            raise ValueError(
                f"set_mask: the parameter (shape {tuple(param.shape)}) is not held by the "
                f"{type(optimizer).__name__}; pass the optimizer that trains it"
            )
        if keep_mask is not None:
            if keep_mask.dtype != torch.bool or keep_mask.shape != param.shape:
                raise ValueError(
                    f"set_mask: expected a bool mask of shape {tuple(param.shape)}, got "
                    f"{keep_mask.dtype} of shape {tuple(keep_mask.shape)}"
                )
            keep_mask = keep_mask.to(param.device)
        if keep_mask is None or bool(keep_mask.all()):
            self._keep.pop(param, None)
            self._zeroing.pop(param, None)
        else:
            self._keep[param] = keep_mask.clone()
            self._zeroing[param] = _zeroing_mask(param, keep_mask)
            _zero_pruned(param, self._zeroing[param])
        if self._keep and self._handle is None:
            self._handle = optimizer.register_step_post_hook(self._after_step)
        elif not self._keep and self._handle is not None:
            self._handle.remove()
            self._handle = None

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        for param, mask in self._zeroing.items():
            _zero_pruned(param, mask)


def _zeroing_mask(param: Tensor, keep_mask: Tensor) -> Tensor:
    """On the CPU an integer mask of the parameter's element size (all ones where kept);
    elsewhere the bool mask of the pruned elements, for masked_fill_ (fast on GPUs and
    four times smaller)."""
    if (
        param.device.type == "cpu"
        and param.is_floating_point()
        and param.element_size() in _SAME_SIZE_INT
    ):
        return keep_mask.to(_SAME_SIZE_INT[param.element_size()]).neg_()
    return ~keep_mask


def _zero_pruned(param: Tensor, mask: Tensor) -> None:
    if mask.dtype == torch.bool:
        param.masked_fill_(mask, 0)
    else:
        param.view(mask.dtype).bitwise_and_(mask)
