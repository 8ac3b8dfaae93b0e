"""The Pruner: which tensors, which criterion, how many weights; masks held as bool tensors
and applied by zeroing the weights and through an attached UndecayedSGD's keep masks."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.utils.prune
from torch import Tensor, nn

from . import criteria

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
SCOPES = ("global", "layer")
GRAD_SOURCES = ("data", "average")


def _matches(name: str, patterns: Sequence[str]) -> list[str]:
    return [p for p in patterns if name == p or fnmatch.fnmatchcase(name, p)]


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


class Pruner:
    """Prunes the weights of a model's layers by a criterion, globally or per layer.

    Args:
        model: the network.
        criterion: ``"magnitude"``, ``"gradient"``, ``"undecayed"`` or ``"random"``.
        scope: ``"global"`` (one threshold across all pruned tensors) or ``"layer"``.
        include: module names or ``fnmatch`` patterns to prune (default: every module of
            ``layer_types``).
        exclude: module names or patterns to leave dense (the output layer, often).
        optimizer: the optimizer training the model. An UndecayedSGD gets the keep masks
            (pruned weights and momentum then stay exactly zero); its parameter groups give
            UP's ``lam`` (their weight decay) unless ``lam`` is given.
        lam: UP's weight-decay coefficient.
        loss_fn: the data loss for gradient criteria (default: cross-entropy).
        seed: seeds the random criterion.
        layer_types: module types whose ``weight`` is prunable.

    ``masks`` maps parameter names (``"fc1.weight"``) to bool keep masks.
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
        if lam is not None and lam < 0:
            raise ValueError(f"lam must be non-negative, got {lam}")
        self.model = model
        self.criterion = criterion
        self.scope = scope
        self.optimizer = optimizer
        self.lam = lam
        self.loss_fn = loss_fn if loss_fn is not None else nn.functional.cross_entropy
        self.generator = torch.Generator().manual_seed(seed)
        self.params: dict[str, Tensor] = self._select(
            model, None if include is None else list(include), list(exclude), tuple(layer_types)
        )
        self.masks: dict[str, Tensor] = {
            name: torch.ones_like(p, dtype=torch.bool) for name, p in self.params.items()
        }
        if optimizer is not None and hasattr(optimizer, "get_mask"):
            for name, p in self.params.items():
                existing = optimizer.get_mask(p)
                if existing is not None:
                    self.masks[name] = existing.clone()

    @staticmethod
    def _select(model, include, exclude, layer_types) -> dict[str, Tensor]:
        modules = dict(model.named_modules())
        for what, patterns in (("include", include or []), ("exclude", exclude)):
            for pattern in patterns:
                if not any(
                    _matches(name, [pattern]) or _matches(f"{name}.weight", [pattern])
                    for name in modules
                ):
                    raise ValueError(
                        f"{what}: no module of the model is named or matches {pattern!r}; "
                        f"modules: {[n for n in modules if n][:20]}"
                    )
        selected = {}
        for name, module in modules.items():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, nn.Parameter):
                continue
            candidates = [name, f"{name}.weight"]
            if include is not None:
                if not any(_matches(c, include) for c in candidates):
                    continue
            elif not isinstance(module, layer_types):
                continue
            if any(_matches(c, exclude) for c in candidates):
                continue
            selected[f"{name}.weight" if name else "weight"] = weight
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

    def sparsity_per_tensor(self) -> dict[str, float]:
        return {
            name: (1.0 - int(m.sum()) / m.numel()) if m.numel() else 0.0
            for name, m in self.masks.items()
        }

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
    ) -> dict[str, Tensor]:
        """Each pruned tensor's float32 scores under the criterion (low: pruned first)."""
        if grad_source not in GRAD_SOURCES:
            raise ValueError(f"grad_source must be one of {GRAD_SOURCES}, got {grad_source!r}")
        grads: dict[str, Tensor | None] = dict.fromkeys(self.params)
        if self.criterion in criteria.NEEDS_GRADIENT:
            if grad_source == "average":
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
            lam = self._lam_for(p) if self.criterion == "undecayed" else None
            out[name] = criteria.score(self.criterion, p, grads[name], lam, self.generator)
        return out

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
        regrow: bool = False,
    ) -> int:
        """Prune ``amount`` of the remaining weights, or up to an overall ``sparsity``.

        The count is exact (rounded to the nearest weight), ties broken by position.
        Pruned weights never come back unless ``regrow=True``, which ranks all weights
        afresh (the result then has exactly the asked sparsity). Returns how many weights
        were newly pruned.
        """
        if (amount is None) == (sparsity is None):
            raise ValueError("give exactly one of amount (of the remaining weights) or sparsity")
        for what, value in (("amount", amount), ("sparsity", sparsity)):
            if value is not None and not (isinstance(value, int | float) and 0 <= value <= 1):
                raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
        scores = self.scores(data, n_batches, grad_source=grad_source, loss_fn=loss_fn)
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
        """Zero the pruned weights (and hand the masks to an attached UndecayedSGD, which
        then keeps them and their momentum at zero through training)."""
        for name, p in self.params.items():
            mask = self.masks[name]
            p.masked_fill_(~mask, 0)
            if self.optimizer is None:
                continue
            if hasattr(self.optimizer, "set_mask"):
                self.optimizer.set_mask(p, mask)
            else:
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.masked_fill_(~mask, 0)

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
        """Take over the masks of modules pruned with ``torch.nn.utils.prune``: the pruning is
        made permanent (``prune.remove``) and the masks move into a new Pruner over exactly
        those modules."""
        pruned = {}
        for module_name, module in model.named_modules():
            for hook in list(module._forward_pre_hooks.values()):
                if isinstance(hook, torch.nn.utils.prune.BasePruningMethod):
                    attribute = hook._tensor_name
                    mask = getattr(module, f"{attribute}_mask").detach().bool().clone()
                    torch.nn.utils.prune.remove(module, attribute)
                    pruned[f"{module_name}.{attribute}" if module_name else attribute] = mask
        if not pruned:
            raise ValueError("the model has no module pruned with torch.nn.utils.prune")
        include = [name.rpartition(".")[0] or name for name in pruned]
        pruner = cls(model, criterion, include=include, **kwargs)
        for name, mask in pruned.items():
            pruner.masks[name] = mask
        pruner.apply()
        return pruner
