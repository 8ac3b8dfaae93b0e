"""UndecayedSGD: ``torch.optim.SGD`` with keep masks, selective weight-decay suppression and
an optional running average of the undecayed gradient, fused into one pass over memory."""

from __future__ import annotations

import itertools
import warnings
from collections import defaultdict
from collections.abc import Iterable
from itertools import compress, repeat
from operator import attrgetter, is_not
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import SGD
from torch.optim import optimizer as _torch_optimizer
from torch.optim.optimizer import _use_grad_for_differentiable

from ..ops import check_backend
from ..ops.reference import where_kept
from ..ops.undecayed_sgd import in_layout_of
from ._state import EXTRA_KEYS, OptimizerState, checked_param_state, opmath_dtype
from .functional import StepPlan

_GRAD = attrgetter("grad")

# torch.optim.SGD's options of implementation, accepted and ignored; each warned about once
# per process, when set to True or False.
_IGNORED_OPTIONS = ("foreach", "fused")
_warned_options: set[str] = set()


def _warn_ignored(name: str, value: Any, stacklevel: int) -> None:
    if value is None or name in _warned_options:
        return
    _warned_options.add(name)
    warnings.warn(
        f"UndecayedSGD ignores {name}={value!r} (accepted for compatibility with "
        "torch.optim.SGD): it runs its own fused kernel where the backend allows and the "
        "pure-torch reference otherwise; choose between them with backend='auto', 'kernel' "
        "or 'reference'",
        UserWarning,
        stacklevel=stacklevel + 1,
    )


class _GroupLists:
    """What a step gathers for one parameter group, kept for the next steps.

    Valid while the group's ``params`` (the list and its length), the options that shape
    the lists, the optimizer's state (its revision) and which parameters have a gradient
    stay the same; the hyper-parameters are read from the group at every step. The
    gradients are read afresh at every step and never kept: ``zero_grad()`` may free them,
    and ``backward()`` then makes new ones.
    """

    __slots__ = (
        "group_params",
        "num_params",
        "options",
        "state",
        "revision",
        "has_grad",
        "all_have_grad",
        "params",
        "plan",
        "grad_counts",
    )

    def __init__(self, group: dict, options: tuple, state: OptimizerState, has_grad: list):
        self.group_params = group["params"]
        self.num_params = len(self.group_params)
        self.options = options
        self.state = state
        self.revision: int | None = None  # set when the step that made it ends
        self.has_grad = has_grad
        self.all_have_grad = all(has_grad)
        self.params = list(compress(self.group_params, has_grad))
        self.plan: StepPlan | None = None
        self.grad_counts: dict[torch.device, list[Tensor]] = {}

    def grads_if_valid(
        self, group: dict, options: tuple, state: OptimizerState, revision: int, grads: list
    ) -> list[Tensor] | None:
        """The gradients of ``self.params`` in ``grads`` (every parameter's ``.grad``) if
        these lists still hold for the group as it is now, else None."""
        if not (
            self.group_params is group["params"]
            and self.num_params == len(group["params"])
            and self.options == options
            and self.state is state
            and self.revision == revision
        ):
            return None
        has_grad = list(map(is_not, grads, repeat(None)))
        if has_grad != self.has_grad:
            return None
        grads = grads if self.all_have_grad else list(compress(grads, has_grad))
        return grads if self.plan.takes(grads) else None


class UndecayedSGD(SGD):
    r"""Drop-in :class:`torch.optim.SGD` for training pruned networks.

    Per element, for weight ``w``, gradient ``g`` (the data-loss gradient in ``.grad``),
    keep mask ``k`` and decay mask ``d`` (both all-true unless set)::

        if not k: w and its momentum stay exactly 0; nothing else happens
        g' = -g if maximize else g
        if tracking: gbar <- mean of g over the steps seen      (the undecayed gradient)
        if weight_decay != 0 and d: g' = g' + weight_decay * w
        if momentum != 0:
            buf = g' on the first step, else momentum * buf + (1 - dampening) * g'
            g' = g' + momentum * buf if nesterov else buf
        w = w - lr * g'

    With no masks and no tracking this is exactly ``torch.optim.SGD``: the reference
    backend runs the op sequence of ``SGD(foreach=False)`` (bit-identical results); the
    kernels agree within a few ulp. The state key is ``"momentum_buffer"``, so
    checkpoints move between the two optimizers both ways.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize, foreach,
        differentiable, fused: as in :class:`torch.optim.SGD`, with the same validation.
            ``foreach`` and ``fused`` (here or in a parameter group) are accepted for
            compatibility and ignored, with a warning (once per process) when set to True
            or False: UndecayedSGD runs its own fused kernel when the backend allows.
        backend: ``"auto"`` (the compiled kernel for the tensors' device when present,
            else the reference), ``"kernel"`` (the kernel, or a clear error) or
            ``"reference"`` (pure torch).
        track_grad_avg: keep, per element, the mean of the undecayed gradient over the
            steps taken (a parameter-group option; see :meth:`grad_average`).

    A step gathers its lists of parameters, momentum buffers, masks and gradient sums once
    and keeps them while they hold, so that it costs a few Python calls however many tensors
    it updates. They are gathered again when they change: masks set or cleared, a parameter
    group added or its ``params`` edited, a checkpoint loaded, the state edited by hand
    (``del optimizer.state[p]["momentum_buffer"]``), a parameter's gradient appearing or
    vanishing, ``momentum`` turned to or from 0. Hyper-parameters (an lr schedule) and new
    gradient tensors are taken at every step. A tensor ``lr`` on the GPU is read there.

    AMP: ``torch.amp.GradScaler`` passes ``grad_scale`` and ``found_inf`` as to torch's
    fused SGD; a step with an overflow changes nothing. An overflow on the very first
    step leaves zero-filled momentum buffers (never uninitialised memory); the next step
    then starts from them.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        track_grad_avg: bool = False,
    ) -> None:
        check_backend(backend)
        _warn_ignored("foreach", foreach, stacklevel=2)
        _warn_ignored("fused", fused, stacklevel=2)
        self.backend = backend
        self._track_grad_avg_default = bool(track_grad_avg)
        self._step_lists: list[_GroupLists | None] = []
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        self.defaults["track_grad_avg"] = bool(track_grad_avg)
        for group in self.param_groups:
            group.setdefault("track_grad_avg", bool(track_grad_avg))
        # grad_scale / found_inf are taken as torch's fused SGD takes them.
        self._step_supports_amp_scaling = True
        self.state = OptimizerState(self.state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also the end of torch's load_state_dict, with a fresh plain state.
        super().__setstate__(state)
        default = getattr(self, "_track_grad_avg_default", False)
        for group in self.param_groups:
            group.setdefault("track_grad_avg", default)
        self.__dict__.setdefault("backend", "auto")
        self.state = OptimizerState(self.state)
        self._step_lists = []

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.add_param_group`; ``foreach`` and ``fused`` given
        in the group are ignored, as in the constructor."""
        for name in _IGNORED_OPTIONS:
            _warn_ignored(name, param_group.get(name), stacklevel=2)
        super().add_param_group(param_group)

    # -- masks ----------------------------------------------------------------------------

    def _check_held(self, param: Tensor, what: str) -> None:
        if not any(p is param for group in self.param_groups for p in group["params"]):
            raise ValueError(
                f"{what}: the parameter (shape {tuple(param.shape)}) is not held by this "
                "optimizer; pass one of the tensors given to UndecayedSGD"
            )

    @staticmethod
    def _check_mask(param: Tensor, mask: Tensor, what: str) -> Tensor:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{what}: expected a bool tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(
                f"{what}: expected a torch.bool mask, got {mask.dtype} "
                "(convert it with mask.bool() or mask != 0)"
            )
        if mask.shape != param.shape:
            raise ValueError(
                f"{what}: the mask has shape {tuple(mask.shape)}, expected the parameter's "
                f"shape {tuple(param.shape)}"
            )
        if mask.device != param.device:
            raise ValueError(
                f"{what}: the mask is on {mask.device}, expected the parameter's device "
                f"{param.device} (move it with mask.to(param.device))"
            )
        # A copy, in the parameter's memory layout (the kernels' need; e.g. channels_last).
        return in_layout_of(param, mask.detach(), copy=True)

    @torch.no_grad()
    def set_mask(self, param: Tensor, keep_mask: Tensor | None) -> None:
        """Keep ``param`` only where ``keep_mask`` is true; ``None`` clears the mask.

        The pruned weights and their momentum are zeroed at once and stay exactly zero:
        never decayed, never updated.
        """
        self._check_held(param, "set_mask")
        if keep_mask is None:
            self.state.get(param, {}).pop("keep_mask", None)
            return
        keep_mask = self._check_mask(param, keep_mask, "set_mask")
        state = self.state[param]
        state["keep_mask"] = keep_mask
        _zero_pruned(param, state, keep_mask)

    def set_decay_mask(self, param: Tensor, decay_mask: Tensor | None) -> None:
        """Apply the group's weight decay only where ``decay_mask`` is true (``None``: all)."""
        self._check_held(param, "set_decay_mask")
        if decay_mask is None:
            self.state.get(param, {}).pop("decay_mask", None)
            return
        self.state[param]["decay_mask"] = self._check_mask(param, decay_mask, "set_decay_mask")

    def get_mask(self, param: Tensor) -> Tensor | None:
        """The keep mask of ``param``, or ``None``. Change it with :meth:`set_mask`, not in
        place: a step on the CPU reads a packed copy, made when the masks were set."""
        return self.state.get(param, {}).get("keep_mask")

    def get_decay_mask(self, param: Tensor) -> Tensor | None:
        """The decay mask of ``param``, or ``None``."""
        return self.state.get(param, {}).get("decay_mask")

    # -- undecayed-gradient average -------------------------------------------------------

    def grad_average(self, param: Tensor) -> Tensor | None:
        """Mean of the undecayed gradient of ``param`` over the steps taken while tracking.

        ``None`` if the parameter's group does not track it; zeros before the first step.
        Pruned elements accumulate nothing while pruned.
        """
        self._check_held(param, "grad_average")
        state = self.state.get(param, {})
        if "grad_sum" not in state:
            return None
        return state["grad_sum"] / state["grad_count"].clamp(min=1)

    @torch.no_grad()
    def reset_grad_average(self) -> None:
        """Start every tracked average afresh."""
        for state in self.state.values():
            if "grad_sum" in state:
                state["grad_sum"].zero_()
                state["grad_count"].zero_()

    # -- fused steps ----------------------------------------------------------------------

    def fused_step_args(self, params: list[Tensor]) -> dict[str, Any] | None:
        """What a fused kernel needs to step ``params`` (held by this optimizer, on the CPU)
        after computing their gradients, as :meth:`step` would with those gradients (as
        ``recallprune.ops.stacked_linear.stacked_mlp_step_`` does): per parameter its momentum
        buffer, keep mask (or None), lr and weight decay (``momentum_buffers``, ``keep_masks``,
        ``lr``, ``weight_decay``), and the options its groups share (``momentum``,
        ``dampening``, ``nesterov``, ``maximize``). None where such a step would not be
        :meth:`step`'s: a parameter not held or not float32 on the CPU, momentum off or not
        started yet (the first step makes the buffers), tracked gradient averages, a decay
        mask, an AMP gradient scale, a differentiable group, the reference backend, options
        that differ between the groups, or step hooks (the fused step does not run them)."""
        if (
            self.backend == "reference"
            or getattr(self, "grad_scale", None) is not None
            or getattr(self, "found_inf", None) is not None
            or self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
            or getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
        ):
            return None
        groups = {id(p): group for group in self.param_groups for p in group["params"]}
        shared = ("momentum", "dampening", "nesterov", "maximize")
        args: dict[str, Any] = {
            "momentum_buffers": [],
            "keep_masks": [],
            "lr": [],
            "weight_decay": [],
        }
        first = None
        for p in params:
            group = groups.get(id(p))
            if group is None or p.device.type != "cpu" or p.dtype != torch.float32:
                return None
            if group["momentum"] == 0 or group["track_grad_avg"] or group["differentiable"]:
                return None
            options = tuple(group[key] for key in shared)
            if first is None:
                first = options
            elif options != first:
                return None
            state = self.state.get(p, {})
            buffer = state.get("momentum_buffer")
            if buffer is None or state.get("decay_mask") is not None:
                return None
            args["momentum_buffers"].append(buffer)
            args["keep_masks"].append(state.get("keep_mask"))
            args["lr"].append(float(group["lr"]))
            args["weight_decay"].append(float(group["weight_decay"]))
        if first is None:
            return None
        args.update(zip(shared, first, strict=True))
        return args

    # -- step -----------------------------------------------------------------------------

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns
                the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if type(self.state) is not OptimizerState:  # replaced by hand
            self.state = OptimizerState(self.state)
        revision = self.state.revision.count
        if len(self._step_lists) != len(self.param_groups):
            self._step_lists = [None] * len(self.param_groups)
        for index, group in enumerate(self.param_groups):
            lists, grads = self._group_lists(index, group, revision)
            new_buffers = lists.plan.run(
                grads,
                lr=group["lr"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                grad_scale=grad_scale,
                found_inf=found_inf,
            )
            for i in new_buffers:
                self.state[lists.params[i]]["momentum_buffer"] = lists.plan.momentum_buffers[i]
            for device, counts in lists.grad_counts.items():
                if found_inf is None:
                    torch._foreach_add_(counts, 1)
                else:
                    # Count the step only where it was taken, without a host sync (on CUDA,
                    # _foreach_add_ with a tensor scalar reads it on the host).
                    taken = (found_inf.to(device) == 0).to(torch.int64).reshape(())
                    for count in counts:
                        count.add_(taken)
        # The state changed only by this step's own writes (new buffers and gradient sums),
        # which the kept lists hold already.
        revision = self.state.revision.count
        for lists in self._step_lists:
            lists.revision = revision
        return loss

    def _group_lists(self, index: int, group: dict, revision: int) -> tuple[_GroupLists, list]:
        """The lists of ``group`` for this step, kept ones where still valid, and the
        gradients of the parameters that have one."""
        grads = list(map(_GRAD, group["params"]))
        options = (
            group["momentum"] != 0,
            group["track_grad_avg"],
            group["differentiable"],
            self.backend,
        )
        lists = self._step_lists[index]
        if lists is not None:
            with_grad = lists.grads_if_valid(group, options, self.state, revision, grads)
            if with_grad is not None:
                return lists, with_grad
        has_grad = list(map(is_not, grads, repeat(None)))
        with_grad = list(compress(grads, has_grad))
        lists = self._step_lists[index] = self._gather(group, options, has_grad, with_grad)
        return lists, with_grad

    def _gather(self, group: dict, options: tuple, has_grad: list, grads: list) -> _GroupLists:
        lists = _GroupLists(group, options, self.state, has_grad)
        momentum_buffers: list[Tensor | None] = []
        keep_masks: list[Tensor | None] = []
        decay_masks: list[Tensor | None] = []
        grad_sums: list[Tensor] = []
        tracking = group["track_grad_avg"]
        counts_by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
        for p in lists.params:
            # Touch the state only where SGD would, so state_dicts match torch's.
            state = self.state[p] if (group["momentum"] != 0 or p in self.state) else {}
            momentum_buffers.append(state.get("momentum_buffer"))
            keep_masks.append(state.get("keep_mask"))
            decay_masks.append(state.get("decay_mask"))
            if tracking:
                state = self.state[p]
                if "grad_sum" not in state:
                    dtype = opmath_dtype(p.dtype)
                    state["grad_sum"] = torch.zeros_like(p, dtype=dtype)  # p's layout
                    state["grad_count"] = torch.zeros((), dtype=torch.int64, device=p.device)
                grad_sums.append(state["grad_sum"])
                counts_by_device[p.device].append(state["grad_count"])
        lists.plan = StepPlan(
            lists.params,
            grads,
            momentum_buffers,
            keep_masks,
            decay_masks,
            grad_sums if tracking else None,
            momentum=group["momentum"],
            backend=self.backend,
            differentiable=group["differentiable"],
        )
        lists.grad_counts = dict(counts_by_device)
        return lists

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`torch.optim.Optimizer.state_dict`, with the masks and gradient sums.

        The per-parameter entries are plain dicts (shallow copies), so that a checkpoint
        loads anywhere: ``torch.load(weights_only=True)``, ``torch.optim.SGD``.
        """
        state_dict = super().state_dict()
        state_dict["state"] = {key: dict(value) for key, value in state_dict["state"].items()}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of UndecayedSGD or of ``torch.optim.SGD``.

        Everything is checked before anything changes: on an error the optimizer is left as
        it was. Masks and gradient sums keep their dtypes (torch's loader would cast every
        tensor of the state to the parameter's dtype); masks saved as 0/1 floats (a
        checkpoint that went through ``torch.optim.SGD``) load as bool masks. As with
        :meth:`set_mask`, the pruned weights and their momentum are zeroed.
        """
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        # torch's checks (and messages), made here first: the ids below pair up only then.
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        sizes = [len(g["params"]) for g in groups]
        if sizes != [len(g["params"]) for g in saved_groups]:
            raise ValueError(
                "loaded state dict contains a parameter group "
                "that doesn't match the size of optimizer's group"
            )
        id_to_param = dict(
            zip(
                itertools.chain.from_iterable(g["params"] for g in saved_groups),
                itertools.chain.from_iterable(g["params"] for g in groups),
                strict=True,
            )
        )
        extras: dict[Tensor, dict[str, Any]] = {}
        stripped_state: dict[Any, Any] = {}
        for param_id, param_state in state_dict["state"].items():
            param = id_to_param.get(param_id)
            if param is None:  # kept as torch keeps it
                stripped_state[param_id] = param_state
                continue
            extras[param] = checked_param_state(param_id, param, param_state)
            stripped_state[param_id] = {
                key: value for key, value in param_state.items() if key not in EXTRA_KEYS
            }
        stripped = dict(state_dict)
        stripped["state"] = stripped_state
        super().load_state_dict(stripped)
        with torch.no_grad():
            for param, values in extras.items():
                if not values:
                    continue
                state = self.state[param]
                state.update(values)
                if "keep_mask" in values:
                    _zero_pruned(param, state, values["keep_mask"])


def _zero_pruned(param: Tensor, state: dict, keep_mask: Tensor) -> None:
    """Zero the pruned weights of ``param`` and their momentum (a sparse buffer, which has no
    masked_fill_, is replaced)."""
    param.masked_fill_(~keep_mask, 0)
    buf = state.get("momentum_buffer")
    if buf is None:
        return
    if buf.is_sparse:
        state["momentum_buffer"] = where_kept(keep_mask, buf)
    else:
        buf.masked_fill_(~keep_mask, 0)


def decay_param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    no_decay_types: Iterable[type[nn.Module]] = (
        nn.modules.batchnorm._NormBase,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
    ),
    decay_bias: bool = False,
) -> list[dict[str, Any]]:
    """The usual parameter groups: weight decay on weights, none on biases and norm layers.

    Returns ``[{"params": decayed, "weight_decay": weight_decay},
    {"params": undecayed, "weight_decay": 0.0}]``, ready for ``UndecayedSGD`` (or any
    torch optimizer). Parameters shared between modules are listed once.
    """
    no_decay_types = tuple(no_decay_types)
    decayed: list[Tensor] = []
    undecayed: list[Tensor] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, no_decay_types) or (name == "bias" and not decay_bias):
                undecayed.append(param)
            else:
                decayed.append(param)
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]
