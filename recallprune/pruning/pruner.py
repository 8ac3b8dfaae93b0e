"""The Pruner: which tensors, which criterion, how many weights; masks held as bool tensors
and applied by zeroing the weights and through an attached UndecayedSGD's keep masks."""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.utils.prune
from torch import Tensor, nn

from . import criteria
from .step_masks import mask_holder

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
SCOPES = ("global", "layer")
GRAD_SOURCES = ("data", "average")


def _matches(name: str, patterns: Sequence[str]) -> list[str]:
    return [p for p in patterns if name == p or fnmatch.fnmatchcase(name, p)]


def _weight_name(module_name: str) -> str:
    """The parameter name of a module's weight (``"weight"`` for the root module)."""
    return f"{module_name}.weight" if module_name else "weight"


def _names(what: str, value: Iterable[str]) -> list[str]:
    """``value`` as a list of module names or patterns; a bare string is refused, since
    iterating it would give single characters (``exclude="11"`` would exclude ``"1"``)."""
    if isinstance(value, str | bytes):
        raise TypeError(
            f"{what} must be a list of module names or patterns, not a string: "
            f"write {what}=[{value!r}], got {what}={value!r}"
        )
    if not isinstance(value, Iterable):
        raise TypeError(
            f"{what} must be a list of module names or patterns, got {type(value).__name__}"
        )
    names = list(value)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(
                f"{what}: module names and patterns are strings, got {name!r} "
                f"({type(name).__name__})"
            )
    return names


def _torch_pruning_hooks(module: nn.Module) -> dict[str, torch.nn.utils.prune.BasePruningMethod]:
    """The ``torch.nn.utils.prune`` methods attached to ``module``, by tensor name."""
    return {
        hook._tensor_name: hook
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, torch.nn.utils.prune.BasePruningMethod)
    }


def _layer_types(value: Iterable[type[nn.Module]]) -> tuple[type[nn.Module], ...]:
    if isinstance(value, type):
        value = (value,)
    if not isinstance(value, Iterable):
        raise TypeError(f"layer_types must be module classes, got {value!r}")
    types = tuple(value)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"layer_types must be subclasses of torch.nn.Module, got {t!r}")
    return types


def select_lowest(scores: Tensor, count: int) -> Tensor:
    """A bool mask of the ``count`` lowest entries of the 1-D ``scores``: exact count, ties
    broken by position (lower index first), NaN scores ranked last. Runs on the scores'
    device with ``torch.kthvalue`` (no full sort)."""
    n = scores.numel()
    selected = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if count <= 0:
        return selected
    if count >= n:
        return selected.fill_(True)
    scores = torch.nan_to_num(scores.float(), nan=math.inf)
    threshold = torch.kthvalue(scores, count).values
    selected = scores < threshold
    missing = count - int(selected.sum())
    ties = torch.nonzero(scores == threshold).flatten()[:missing]
    selected[ties] = True
    return selected


def select_lowest_stacked(scores: Tensor, kept: Tensor, counts: Sequence[int]) -> Tensor:
    """Row by row, what :func:`select_lowest` selects among the kept entries: a bool
    ``[B, N]`` mask of row ``i``'s ``counts[i]`` lowest ``scores`` where ``kept`` (each row's
    candidates), exact counts, ties broken by position, NaN ranked last; never an entry
    outside ``kept``. ``scores``, ``kept``: ``[B, N]``. The rows with as many candidates and
    the same count (the models of a round, usually all of them) take one ``kthvalue`` over
    their candidates side by side."""
    if scores.dim() != 2 or kept.shape != scores.shape or kept.dtype != torch.bool:
        raise ValueError(
            f"select_lowest_stacked: scores [B, N] and a bool kept mask of its shape, got "
            f"{list(scores.shape)} and {kept.dtype} {list(kept.shape)}"
        )
    if len(counts) != scores.shape[0]:
        raise ValueError(
            f"select_lowest_stacked: one count per row, got {len(counts)} for {scores.shape[0]}"
        )
    selected = torch.zeros_like(kept)
    groups: dict[tuple[int, int], list[int]] = {}
    for row, (count, n) in enumerate(zip(counts, kept.sum(dim=1).tolist(), strict=True)):
        if count >= n:
            selected[row] = kept[row]
        elif count > 0:
            groups.setdefault((n, count), []).append(row)
    for (n, count), rows in groups.items():
        index = torch.tensor(rows)
        among = kept[index]
        # The candidates of each row, in position order: [rows, n].
        candidates = torch.nan_to_num(scores[index][among].float(), nan=math.inf).view(-1, n)
        threshold = torch.kthvalue(candidates, count, dim=1).values.unsqueeze(1)
        less = candidates < threshold
        ties = candidates == threshold
        missing = count - less.sum(dim=1, keepdim=True)
        chosen = less | (ties & (ties.cumsum(dim=1) <= missing))
        rows_selected = torch.zeros_like(among)
        rows_selected[among] = chosen.flatten()
        selected[index] = rows_selected
    return selected


def prune_together(
    pruners: Sequence[Pruner],
    amount: float,
    gradients: Sequence[Mapping[str, Tensor] | None] | None = None,
) -> list[int]:
    """Prune ``amount`` of the remaining weights of each pruner's model, exactly as
    ``pruner.prune(amount=amount, gradients=gradients[i])`` would one pruner at a time (the
    same masks), with one selection for all: each pruner's scores (its own criterion and
    gradients), then per threshold group (the whole model, or each layer) the models'
    candidates stacked and selected by :func:`select_lowest_stacked`. The pruners must prune
    parameters of the same names and shapes, with the same scope (the models of one stack).
    Returns how many weights each pruner newly pruned."""
    pruners = list(pruners)
    if not pruners:
        return []
    if not (isinstance(amount, numbers.Real) and not isinstance(amount, bool) and 0 <= amount <= 1):
        raise ValueError(f"amount must be a number in [0, 1], got {amount!r}")
    gradients = [None] * len(pruners) if gradients is None else list(gradients)
    if len(gradients) != len(pruners):
        raise ValueError(
            f"gradients: one entry per pruner, got {len(gradients)} for {len(pruners)} pruners"
        )
    first = pruners[0]
    shapes = {name: m.shape for name, m in first.masks.items()}
    for pruner in pruners[1:]:
        if pruner.scope != first.scope or {n: m.shape for n, m in pruner.masks.items()} != shapes:
            raise ValueError(
                "prune_together: the pruners must prune tensors of the same names and shapes "
                "with the same scope"
            )
    scores = [p.scores(gradients=g) for p, g in zip(pruners, gradients, strict=True)]
    newly = torch.zeros(len(pruners), dtype=torch.int64)
    names = list(shapes)
    groups = [names] if first.scope == "global" else [[name] for name in names]
    for group in groups:
        kept = torch.stack([torch.cat([p.masks[n].flatten() for n in group]) for p in pruners])
        stacked = torch.stack([torch.cat([s[n].flatten() for n in group]) for s in scores])
        counts = [round(amount * n) for n in kept.sum(dim=1).tolist()]
        selected = select_lowest_stacked(stacked, kept.to(stacked.device), counts)
        newly += selected.sum(dim=1).cpu()
        remaining = kept & ~selected.to(kept.device)
        offset = 0
        for name in group:
            numel = shapes[name].numel()
            for i, pruner in enumerate(pruners):
                pruner.masks[name] = remaining[i, offset : offset + numel].view(shapes[name])
            offset += numel
    for pruner in pruners:
        pruner.apply()
    return newly.tolist()


class Pruner:
    """Prunes the weights of a model's layers by a criterion, globally or per layer.

    Args:
        model: the network.
        criterion: ``"magnitude"``, ``"gradient"``, ``"undecayed"``, ``"undecayed-balanced"``
            (UP with the gradient of the class-balanced loss) or ``"random"``.
        scope: ``"global"`` (one threshold across all pruned tensors) or ``"layer"``.
        include: module names or ``fnmatch`` patterns to prune (default: every module of
            ``layer_types``).
        exclude: module names or patterns to leave dense (the output layer, often).
        optimizer: the optimizer training the model; it keeps the pruned weights exactly
            zero after each of its steps. An UndecayedSGD gets the keep masks (fused into
            its update; pruned momentum stays zero too); any other ``torch.optim.Optimizer``
            gets a step post-hook that zeroes the pruned weights again (see
            :mod:`recallprune.pruning.step_masks`). Its parameter groups give UP's ``lam``
            (their weight decay) unless ``lam`` is given.
        lam: UP's weight-decay coefficient.
        loss_fn: the data loss for gradient criteria (default: cross-entropy; for
            ``undecayed-balanced``, the class-balanced cross-entropy).
        seed: seeds the random criterion.
        layer_types: module types whose ``weight`` is prunable.

    ``masks`` maps parameter names (``"fc1.weight"``) to bool keep masks; :meth:`apply`
    hands them to the optimizer (``prune`` and ``load_state_dict`` call it), :meth:`remove`
    takes them back.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: str = "magnitude",
        *,
        scope: str = "global",
        include: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        optimizer: torch.optim.Optimizer | None = None,
        lam: float | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        seed: int = 0,
        layer_types: Iterable[type[nn.Module]] = DEFAULT_LAYER_TYPES,
    ) -> None:
        if criterion not in criteria.CRITERIA:
            raise ValueError(f"criterion must be one of {criteria.CRITERIA}, got {criterion!r}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if lam is not None:
            lam = criteria.check_lam(lam)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        holder = None if optimizer is None else mask_holder(optimizer)
        self.model = model
        self.criterion = criterion
        self.scope = scope
        self.optimizer = optimizer
        self.lam = lam
        if loss_fn is None:
            balanced = criterion in criteria.CLASS_BALANCED
            loss_fn = (
                criteria.class_balanced_cross_entropy if balanced else nn.functional.cross_entropy
            )
        self.loss_fn = loss_fn
        self.generator = torch.Generator().manual_seed(seed)
        self.params: dict[str, Tensor] = self._select(
            model,
            None if include is None else _names("include", include),
            _names("exclude", exclude),
            _layer_types(layer_types),
            self._adopt_torch_pruned,
        )
        self.masks: dict[str, Tensor] = {
            name: torch.ones_like(p, dtype=torch.bool) for name, p in self.params.items()
        }
        self._mask_holder = holder
        if optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [name for name, p in self.params.items() if id(p) not in held]
            if missing:
                raise ValueError(
                    f"the optimizer does not hold {missing[:5]}: pass the optimizer that "
                    "trains the pruned weights, or exclude those modules"
                )
            for name, p in self.params.items():
                existing = holder.get_mask(p)
                if existing is not None:
                    self.masks[name] = existing.clone()

    # Set only while from_torch_prune builds a Pruner over modules that torch still prunes.
    _adopt_torch_pruned = False

    @staticmethod
    def _select(model, include, exclude, layer_types, adopt_torch_pruned) -> dict[str, Tensor]:
        """The selected weights by parameter name. A weight pruned with torch.nn.utils.prune is
        refused unless ``adopt_torch_pruned``, which selects its ``weight_orig`` parameter
        (the tensor that ``prune.remove`` turns back into ``weight``)."""
        modules = dict(model.named_modules())
        for what, patterns in (("include", include or []), ("exclude", exclude)):
            for pattern in patterns:
                if not any(
                    _matches(name, [pattern]) or _matches(_weight_name(name), [pattern])
                    for name in modules
                ):
                    hint = (
                        " (a Pruner prunes weights only, never biases)"
                        if pattern == "bias" or pattern.endswith(".bias")
                        else ""
                    )
                    raise ValueError(
                        f"{what}: no module of the model is named or matches {pattern!r}"
                        f"{hint}; modules: {[n for n in modules if n][:20]}"
                    )
        selected = {}
        for name, module in modules.items():
            torch_pruned = "weight" in _torch_pruning_hooks(module)
            if torch_pruned:
                weight = module._parameters.get("weight_orig")
            else:
                weight = getattr(module, "weight", None)
            if not isinstance(weight, nn.Parameter):
                continue
            candidates = [name, _weight_name(name)]
            if include is not None:
                if not any(_matches(c, include) for c in candidates):
                    continue
            elif not isinstance(module, layer_types):
                continue
            if any(_matches(c, exclude) for c in candidates):
                continue
            if torch_pruned and not adopt_torch_pruned:
                raise ValueError(
                    f"{_weight_name(name)} is pruned with torch.nn.utils.prune: take its mask "
                    "over with Pruner.from_torch_prune(model), or make that pruning permanent "
                    f"first with torch.nn.utils.prune.remove(module, 'weight')"
                )
            selected[_weight_name(name)] = weight
        if not selected:
            raise ValueError(
                "nothing to prune: no Conv1d/2d/3d or Linear weight (or included module) is "
                "left after the include/exclude rules"
            )
        return selected

    # -- what is pruned -------------------------------------------------------------------

    def sparsity(self) -> float:
        """Fraction of the pruned tensors' weights that are pruned."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def num_pruned(self) -> int:
        return sum(m.numel() - int(m.sum()) for m in self.masks.values())

    def num_weights(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    # -- scores ---------------------------------------------------------------------------

    def _lam_for(self, param: Tensor) -> float:
        if self.lam is not None:
            return self.lam
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                if any(p is param for p in group["params"]):
                    return float(group.get("weight_decay", 0.0))
        raise ValueError(
            "the undecayed criterion needs lam, the weight decay the model was trained with: "
            "pass lam=... or the optimizer that trained the model"
        )

    @torch.no_grad()
    def _restore(self, training, grads, buffers) -> None:
        for module, mode in training.items():
            module.training = mode
        for p, grad in grads.items():
            p.grad = grad
        for buffer, saved in buffers:
            buffer.copy_(saved)

    def gather_gradients(
        self, data: Iterable, n_batches: int = 1, loss_fn: Callable | None = None
    ) -> dict[str, Tensor]:
        """Mean data-loss gradient of every pruned tensor over ``n_batches`` of ``data``
        (``(input, target)`` pairs), the model in train mode as in the authors' UP. The
        model is left as it was: its modes, its ``.grad`` fields and its buffers."""
        if n_batches < 1:
            raise ValueError(f"n_batches must be at least 1, got {n_batches}")
        loss_fn = loss_fn if loss_fn is not None else self.loss_fn
        model = self.model
        device = next(iter(self.params.values())).device
        training = {m: m.training for m in model.modules()}
        grads = {p: p.grad for p in model.parameters()}
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        try:
            model.train()
            for p in model.parameters():
                p.grad = None
            seen = 0
            with torch.enable_grad():
                for batch in data:
                    if seen == n_batches:
                        break
                    inputs, targets = batch[0].to(device), batch[1].to(device)
                    loss_fn(model(inputs), targets).backward()
                    seen += 1
            if seen == 0:
                raise ValueError("data yielded no batch to compute gradients on")
            return {
                name: (p.grad.detach() / seen if p.grad is not None else torch.zeros_like(p))
                for name, p in self.params.items()
            }
        finally:
            self._restore(training, grads, buffers)

    def scores(
        self,
        data: Iterable | None = None,
        n_batches: int = 1,
        *,
        grad_source: str = "data",
        loss_fn: Callable | None = None,
        gradients: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Each pruned tensor's float32 scores under the criterion (low: pruned first).

        The gradient criteria take the data-loss gradient from ``data`` (``n_batches`` of
        it), from the optimizer's running average (``grad_source="average"``), or as given:
        ``gradients`` maps every pruned tensor's name to its gradient."""
        if grad_source not in GRAD_SOURCES:
            raise ValueError(f"grad_source must be one of {GRAD_SOURCES}, got {grad_source!r}")
        grads: dict[str, Tensor | None] = dict.fromkeys(self.params)
        if self.criterion in criteria.NEEDS_GRADIENT:
            if gradients is not None:
                grads = self._given_gradients(gradients)
            elif grad_source == "average":
                if self.criterion in criteria.CLASS_BALANCED:
                    raise ValueError(
                        f"grad_source='average' does not suit the {self.criterion} criterion: "
                        "the optimizer averages the gradient of the training loss, not of the "
                        "class-balanced loss; pass data= (or gradients=)"
                    )
                grads = self._average_gradients()
            elif data is None:
                raise ValueError(
                    f"the {self.criterion} criterion needs gradients: pass data= (a loader of "
                    "(input, target) batches) or grad_source='average' with an UndecayedSGD "
                    "that tracks the gradient average"
                )
            else:
                grads = self.gather_gradients(data, n_batches, loss_fn)
        out = {}
        for name, p in self.params.items():
            lam = self._lam_for(p) if self.criterion in criteria.UNDECAYED else None
            out[name] = criteria.score(self.criterion, p, grads[name], lam, self.generator)
        return out

    def _given_gradients(self, gradients: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not isinstance(gradients, Mapping):
            raise TypeError(
                f"gradients must map pruned tensor names to tensors, got {type(gradients).__name__}"
            )
        missing = [name for name in self.params if name not in gradients]
        unknown = [name for name in gradients if name not in self.params]
        if missing or unknown:
            raise ValueError(
                f"gradients must hold exactly the pruned tensors {list(self.params)[:5]}"
                + (f"; missing {missing[:5]}" if missing else "")
                + (f"; not pruned here {unknown[:5]}" if unknown else "")
            )
        for name, p in self.params.items():
            grad = gradients[name]
            if not isinstance(grad, Tensor) or grad.shape != p.shape:
                got = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
                raise ValueError(
                    f"gradients[{name!r}] must be a tensor of the weight's shape "
                    f"{tuple(p.shape)}, got {got}"
                )
        return {name: gradients[name].to(p.device) for name, p in self.params.items()}

    def _average_gradients(self) -> dict[str, Tensor]:
        if self.optimizer is None or not hasattr(self.optimizer, "grad_average"):
            raise ValueError("grad_source='average' needs an attached UndecayedSGD")
        grads = {}
        for name, p in self.params.items():
            average = self.optimizer.grad_average(p)
            if average is None:
                raise ValueError(
                    f"grad_source='average': the optimizer does not track the gradient average "
                    f"of {name}; create it with track_grad_avg=True"
                )
            grads[name] = average
        return grads

    # -- pruning --------------------------------------------------------------------------

    def prune(
        self,
        amount: float | None = None,
        *,
        sparsity: float | None = None,
        data: Iterable | None = None,
        n_batches: int = 1,
        grad_source: str = "data",
        loss_fn: Callable | None = None,
        gradients: Mapping[str, Tensor] | None = None,
        regrow: bool = False,
    ) -> int:
        """Prune ``amount`` of the remaining weights, or up to an overall ``sparsity``.

        The count is exact (rounded to the nearest weight), ties broken by position.
        Pruned weights never come back unless ``regrow=True``, which ranks all weights
        afresh (the result then has exactly the asked sparsity). The gradient criteria take
        their gradient as :meth:`scores` says. Returns how many weights were newly pruned.
        """
        if (amount is None) == (sparsity is None):
            raise ValueError("give exactly one of amount (of the remaining weights) or sparsity")
        for what, value in (("amount", amount), ("sparsity", sparsity)):
            if value is not None and (
                isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0 <= value <= 1)
            ):
                raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
        scores = self.scores(
            data, n_batches, grad_source=grad_source, loss_fn=loss_fn, gradients=gradients
        )
        before = self.num_pruned()
        if self.scope == "global":
            names = list(self.params)
            self._prune_group(names, scores, amount, sparsity, regrow)
        else:
            for name in self.params:
                self._prune_group([name], scores, amount, sparsity, regrow)
        self.apply()
        return self.num_pruned() - before

    def _prune_group(self, names, scores, amount, sparsity, regrow) -> None:
        masks = [self.masks[n] for n in names]
        total = sum(m.numel() for m in masks)
        pruned = sum(m.numel() - int(m.sum()) for m in masks)
        candidates = total if regrow else total - pruned
        if amount is not None:
            count = round(amount * candidates)
        else:
            target = round(sparsity * total)
            count = target if regrow else max(0, target - pruned)
        flat_scores = torch.cat(
            [
                (scores[n] if regrow else scores[n][m]).flatten()
                for n, m in zip(names, masks, strict=True)
            ]
        )
        selected = select_lowest(flat_scores, count)
        offset = 0
        for name, mask in zip(names, masks, strict=True):
            if regrow:
                chosen = selected[offset : offset + mask.numel()].view(mask.shape)
                self.masks[name] = ~chosen
                offset += mask.numel()
            else:
                kept = int(mask.sum())
                chosen = selected[offset : offset + kept]
                new_mask = mask.clone()
                new_mask[mask] = ~chosen
                self.masks[name] = new_mask
                offset += kept

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights and hand the masks to the optimizer, which then keeps the
        pruned weights at zero through training (UndecayedSGD also their momentum)."""
        for name, p in self.params.items():
            mask = self.masks[name]
            p.masked_fill_(~mask, 0)
            if self._mask_holder is not None:
                self._mask_holder.set_mask(p, mask)

    def remove(self) -> None:
        """Stop keeping the masks through the optimizer: UndecayedSGD's keep masks of these
        weights are cleared, and another optimizer's step hook no longer touches them (it
        goes when no weight is left in it). Weights and ``masks`` stay as they are; training
        may regrow the pruned weights from here on, and :meth:`apply` attaches the masks
        again."""
        if self._mask_holder is not None:
            for p in self.params.values():
                self._mask_holder.set_mask(p, None)

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "scope": self.scope,
            "masks": {name: m.detach().cpu().clone() for name, m in self.masks.items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = state["masks"]
        if set(masks) != set(self.params):
            raise ValueError(
                f"the state's masks are for {sorted(masks)}, this pruner prunes "
                f"{sorted(self.params)}"
            )
        for name, mask in masks.items():
            p = self.params[name]
            if mask.shape != p.shape or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask of {name} must be bool of shape {tuple(p.shape)}, got {mask.dtype} "
                    f"of shape {tuple(mask.shape)}"
                )
            self.masks[name] = mask.to(p.device)
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self.apply()

    # -- torch.nn.utils.prune interop -----------------------------------------------------

    def _module_of(self, name: str) -> tuple[nn.Module, str]:
        module_name, _, attribute = name.rpartition(".")
        return self.model.get_submodule(module_name), attribute

    def to_torch_prune(self) -> None:
        """Hand the masks to ``torch.nn.utils.prune`` (``weight_orig`` + ``weight_mask`` and a
        forward pre-hook per module)."""
        for name in self.params:
            module, attribute = self._module_of(name)
            torch.nn.utils.prune.custom_from_mask(module, attribute, self.masks[name])

    @classmethod
    def from_torch_prune(cls, model: nn.Module, criterion: str = "magnitude", **kwargs) -> Pruner:
        """Take over the masks of modules pruned with ``torch.nn.utils.prune``: a new Pruner
        over exactly those modules' weights, holding their masks, and the pruning made
        permanent (``prune.remove``). ``kwargs`` are the Pruner's other arguments, but for
        ``include``, which is the pruned modules.

        Everything is checked before anything is changed: a pruned bias or other tensor
        (a Pruner prunes weights only), a mask that is not 0/1, an ``exclude`` that would
        drop a pruned weight, or a bad argument raises and leaves the model as it was.
        """
        if "include" in kwargs:
            raise TypeError(
                "from_torch_prune takes over exactly the modules pruned with "
                "torch.nn.utils.prune; it has no include argument"
            )
        found: dict[str, tuple[nn.Module, str, Tensor]] = {}
        for module_name, module in model.named_modules():
            for attribute in _torch_pruning_hooks(module):
                name = f"{module_name}.{attribute}" if module_name else attribute
                if attribute != "weight":
                    raise ValueError(
                        f"{name} is pruned with torch.nn.utils.prune, but a Pruner prunes "
                        "weights only: make that pruning permanent first with "
                        f"torch.nn.utils.prune.remove(model.get_submodule({module_name!r}), "
                        f"{attribute!r}); nothing was changed"
                    )
                mask = getattr(module, f"{attribute}_mask").detach()
                if not bool(((mask == 0) | (mask == 1)).all()):
                    raise ValueError(
                        f"the torch.nn.utils.prune mask of {name} holds values other than 0 "
                        "and 1, which a keep mask cannot express; nothing was changed"
                    )
                found[name] = (module, attribute, mask.to(torch.bool, copy=True))
        if not found:
            raise ValueError("the model has no module pruned with torch.nn.utils.prune")
        include = [name.rpartition(".")[0] for name in found]  # module names, "" the root
        # Built while torch still prunes the model, over the weight_orig parameters (the very
        # tensors that prune.remove makes the weights again), so that every check of the
        # constructor runs before anything is removed.
        pruner = cls.__new__(cls)
        pruner._adopt_torch_pruned = True
        try:
            pruner.__init__(model, criterion, include=include, **kwargs)
        finally:
            del pruner._adopt_torch_pruned
        dropped = sorted(set(found) - set(pruner.params))
        if dropped:
            raise ValueError(
                f"exclude leaves out {dropped}, pruned with torch.nn.utils.prune; take them "
                "over too or remove their pruning first; nothing was changed"
            )
        for name, (module, attribute, mask) in found.items():
            torch.nn.utils.prune.remove(module, attribute)
            pruner.masks[name] = mask
        pruner.apply()
        return pruner
