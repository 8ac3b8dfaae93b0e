"""The UndecayedSGD update over lists of tensors: one entry point, two implementations.

``undecayed_sgd`` sorts the lists into launches of the fused op
(:func:`recallprune.ops.undecayed_sgd_`, C++ on the CPU, CUDA on the GPU), one per device,
dtype and first step or not, and a remainder for the pure-torch reference
(:func:`recallprune.ops.undecayed_sgd_reference`). The sorted lists are a :class:`StepPlan`:
the optimizer keeps its plans and reuses them while the tensors stay the same, so that a step
costs a few Python calls however many tensors it updates.
"""

from __future__ import annotations

from collections import defaultdict
from operator import attrgetter

import torch
from torch import Tensor

from ..ops import undecayed_sgd_, undecayed_sgd_reference
from ..ops.undecayed_sgd import (
    choose_backend,
    in_layout_of,
    kernel_takes,
    pack_keep_mask,
    same_layout,
)

_IS_SPARSE = attrgetter("is_sparse")


def _subset(values: list, indices: list[int] | None) -> list:
    return values if indices is None else list(map(values.__getitem__, indices))


class _KernelLaunch:
    """One call of the fused op: tensors of one device and dtype, first step or not."""

    __slots__ = (
        "indices",
        "device",
        "params",
        "copy_grads",
        "momentum_buffers",
        "first_step",
        "keep_masks",
        "decay_masks",
        "grad_sums",
        "contiguous",
        "keep_masks_packed",
    )

    def __init__(self, indices, device, plan: StepPlan, grad_sums, first_step) -> None:
        # indices: positions in the plan's lists; None when the launch holds all of them.
        self.indices = None if indices == list(range(len(plan.params))) else indices
        self.device = device
        self.params = _subset(plan.params, self.indices)
        # Contiguous weights (the common case) need contiguous gradients; others (e.g.
        # channels_last) need gradients in their own layout.
        self.contiguous = all(map(Tensor.is_contiguous, self.params))
        self.copy_grads = False
        self.first_step = first_step
        # The op's lists: empty where no tensor of the launch has one.
        self.momentum_buffers: list[Tensor] = []
        if plan.has_momentum and not first_step:
            self.momentum_buffers = _subset(plan.momentum_buffers, self.indices)
        # Masks in the weights' layout (a copy where one is not: the plan then holds it).
        keep_masks = self._in_layout(_subset(plan.keep_masks, self.indices))
        decay_masks = self._in_layout(_subset(plan.decay_masks, self.indices))
        self.keep_masks = keep_masks if any(m is not None for m in keep_masks) else []
        # The CPU kernel takes the keep masks as bits: on one core a byte per weight is 5% of
        # a step's traffic. The plan holds the bits while the masks stay (set_mask makes a
        # new plan).
        self.keep_masks_packed = device.type == "cpu" and bool(self.keep_masks)
        if self.keep_masks_packed:
            self.keep_masks = [
                None if m is None else pack_keep_mask(p, m)
                for p, m in zip(self.params, self.keep_masks, strict=True)
            ]
        self.decay_masks = decay_masks if any(m is not None for m in decay_masks) else []
        self.grad_sums = [] if grad_sums is None else _subset(grad_sums, self.indices)

    def _in_layout(self, masks: list[Tensor | None]) -> list[Tensor | None]:
        return [
            m if m is None else in_layout_of(p, m) for p, m in zip(self.params, masks, strict=True)
        ]

    def takes(self, grads: list[Tensor]) -> bool:
        """Whether the op takes these gradients of the launch's parameters (a dense
        gradient in another layout than its parameter's is copied, as noted in
        ``copy_grads``)."""
        # One pass in the common case: sparse gradients are never contiguous. Device, shape
        # and dtype are the parameter's (torch checks them when .grad is set; a dtype made
        # to differ with Tensor.grad_dtype meets the op's own check).
        if self.contiguous:
            self.copy_grads = not all(map(Tensor.is_contiguous, grads))
        else:
            self.copy_grads = any(g.is_sparse for g in grads) or not all(
                map(same_layout, self.params, grads)
            )
        return not (self.copy_grads and any(map(_IS_SPARSE, grads)))

    def run(self, grads, lr, grad_scale, found_inf, **hyper) -> bool:
        """Launch the op; True if it created the momentum buffers (the first step)."""
        created = self.first_step
        if created:
            # Zeros, not empty: a first step skipped for an overflow (found_inf) must not
            # leave uninitialised memory behind.
            init = torch.empty_like if found_inf is None else torch.zeros_like
            self.momentum_buffers = [init(p) for p in self.params]  # in the weights' layout
        if self.copy_grads:
            grads = list(map(in_layout_of, self.params, grads))
        undecayed_sgd_(
            self.params,
            grads,
            self.momentum_buffers,
            self.keep_masks,
            self.decay_masks,
            self.grad_sums,
            lr=lr,
            momentum=hyper["momentum"],
            dampening=hyper["dampening"],
            weight_decay=hyper["weight_decay"],
            nesterov=hyper["nesterov"],
            maximize=hyper["maximize"],
            is_first_step=self.first_step,
            grad_scale=grad_scale,
            found_inf=found_inf,
            keep_masks_packed=self.keep_masks_packed,
        )
        self.first_step = False
        return created


class _ReferencePart:
    """The tensors that the kernels do not take, for the reference implementation."""

    __slots__ = ("indices", "params", "momentum_buffers", "keep_masks", "decay_masks", "grad_sums")

    def __init__(self, indices: list[int], plan: StepPlan, grad_sums) -> None:
        self.indices = indices
        self.params = _subset(plan.params, indices)
        self.momentum_buffers = _subset(plan.momentum_buffers, indices)
        self.keep_masks = _subset(plan.keep_masks, indices)
        self.decay_masks = _subset(plan.decay_masks, indices)
        self.grad_sums = None if grad_sums is None else _subset(grad_sums, indices)

    def run(self, grads, lr, grad_scale, found_inf, **hyper) -> list[int]:
        """Run the reference; the positions whose momentum buffer it created."""
        before = list(self.momentum_buffers)
        undecayed_sgd_reference(
            self.params,
            grads,
            self.momentum_buffers,
            self.keep_masks,
            self.decay_masks,
            self.grad_sums,
            lr=lr,
            grad_scale=grad_scale,
            found_inf=found_inf,
            **hyper,
        )
        return [
            i
            for i, old, new in zip(self.indices, before, self.momentum_buffers, strict=True)
            if new is not old
        ]


class StepPlan:
    """The lists of one step sorted into kernel launches and a remainder for the reference.

    Made once from the tensors (parameters with a gradient, their momentum buffers, masks and
    gradient sums) and run any number of times with the gradients and hyper-parameters of
    each step, which may change in between: new gradient tensors of the same parameters
    (see :meth:`takes`), an lr schedule. Any other change of the tensors needs a new plan.
    The plan holds no gradient between steps (``zero_grad()`` can free them).
    ``momentum_buffers`` holds the current buffers (``None`` before the first step);
    :meth:`run` says which of them are new, so that the caller can store them.
    """

    def __init__(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        keep_masks: list[Tensor | None],
        decay_masks: list[Tensor | None],
        grad_sums: list[Tensor] | None,
        *,
        momentum: float,
        backend: str = "auto",
        differentiable: bool = False,
    ) -> None:
        self.params = params
        self.has_momentum = momentum != 0
        self.momentum_buffers = (
            list(momentum_buffers) if self.has_momentum else [None] * len(params)
        )
        self.keep_masks = keep_masks
        self.decay_masks = decay_masks
        self._new_buffers: list[
            int
        ] = []  # put in the weights' layout here: the next run reports them

        kernel_groups: dict[tuple, list[int]] = defaultdict(list)
        reference_indices: list[int] = []
        backend_of: dict[torch.device, str] = {}  # resolved once per device
        for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
            device = param.device
            if device not in backend_of:
                backend_of[device] = choose_backend(backend, device, differentiable)
            chosen = backend_of[device]
            if chosen == "kernel" and grad.is_sparse:
                if backend == "kernel":
                    raise RuntimeError(
                        f"UndecayedSGD: parameter {i} has a sparse gradient, which the fused "
                        "kernels do not take; use backend='reference' (or 'auto') for sparse "
                        "gradients"
                    )
                chosen = "reference"
            grad_sum = None if grad_sums is None else grad_sums[i]
            if (
                chosen == "kernel"
                and kernel_takes(param, grad)
                and (grad_sum is None or same_layout(param, grad_sum))
            ):
                buf = self.momentum_buffers[i]
                if buf is not None and not same_layout(param, buf):
                    self.momentum_buffers[i] = in_layout_of(param, buf)
                    self._new_buffers.append(i)
                first = self.has_momentum and buf is None
                kernel_groups[(device, param.dtype, first)].append(i)
            else:
                reference_indices.append(i)

        self.launches = [
            _KernelLaunch(indices, device, self, grad_sums, first)
            for (device, _, first), indices in kernel_groups.items()
        ]
        self.reference = (
            _ReferencePart(reference_indices, self, grad_sums) if reference_indices else None
        )
        self.takes(grads)  # notes which launches copy their gradients to the weights' layout

    def takes(self, grads: list[Tensor]) -> bool:
        """Whether :meth:`run` takes these gradients: one per parameter, in order, and dense
        where the parameter's launch is a kernel's. Call it before running with new gradient
        tensors; it notes which launches copy theirs to the weights' layout."""
        return len(grads) == len(self.params) and all(
            launch.takes(_subset(grads, launch.indices)) for launch in self.launches
        )

    def run(
        self,
        grads: list[Tensor],
        *,
        lr: float | Tensor,
        momentum: float,
        dampening: float,
        weight_decay: float | Tensor,
        nesterov: bool,
        maximize: bool,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> list[int]:
        """One step; returns the positions whose momentum buffer is new since the last run
        (created, or put in the weights' layout when the plan was made)."""
        if self.has_momentum != (momentum != 0):
            raise ValueError(
                f"StepPlan: made for momentum {'!=' if self.has_momentum else '=='} 0, run "
                f"with momentum={momentum}; make a new plan"
            )
        hyper = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
        new_buffers, self._new_buffers = self._new_buffers, []
        for launch in self.launches:
            if launch.run(_subset(grads, launch.indices), **hyper):
                indices = launch.indices or range(len(self.params))
                for i, buf in zip(indices, launch.momentum_buffers, strict=True):
                    self.momentum_buffers[i] = buf
                new_buffers.extend(indices)
        if self.reference is not None:
            created = self.reference.run(_subset(grads, self.reference.indices), **hyper)
            for i, buf in zip(self.reference.indices, self.reference.momentum_buffers, strict=True):
                self.momentum_buffers[i] = buf
            new_buffers.extend(created)
        return new_buffers


def undecayed_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    keep_masks: list[Tensor | None],
    decay_masks: list[Tensor | None],
    grad_sums: list[Tensor] | None,
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float | Tensor,
    nesterov: bool,
    maximize: bool,
    backend: str = "auto",
    differentiable: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One UndecayedSGD step; see :class:`recallprune.UndecayedSGD` for the math.

    ``momentum_buffers`` holds one entry per parameter when ``momentum != 0`` (``None``
    where none exists yet; created in place) and is ignored otherwise. ``keep_masks`` and
    ``decay_masks`` hold a bool mask or ``None`` per parameter. ``grad_sums``, when given,
    receives the undecayed (data-loss) gradient of every kept element.
    """
    if not params:
        return
    plan = StepPlan(
        params,
        grads,
        momentum_buffers,
        keep_masks,
        decay_masks,
        grad_sums,
        momentum=momentum,
        backend=backend,
        differentiable=differentiable,
    )
    new_buffers = plan.run(
        grads,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )
    for i in new_buffers:
        momentum_buffers[i] = plan.momentum_buffers[i]
