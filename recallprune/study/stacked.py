"""Many small models trained as one: the study's MLP and CNN with every parameter stacked
along a leading model dimension ``B``.

A study's grid (seeds x arms) is made of small models trained the same way, and for the
models the paper is about a training step is almost all per-operation overhead. Stacked, the
``B`` models share every operation: one batched product per layer, one
grouped convolution (``groups=B``), one backward, one optimizer step over a handful of
tensors. Each model keeps its own parameters, data order, masks and criterion; nothing is
shared between them but the kernels. The linear layers take their activations samples last
(``[B, features, N]``, :func:`~recallprune.ops.stacked_linear`); made compact with the models'
masks (:meth:`StackedModel.compact`), they hold, compute with and train their kept weights
alone.

A stacked module's parameter ``name`` has shape ``[B, *shape]`` where the single model's
parameter of the same name has ``shape``, so masks, state dicts and pruning scores carry over
by name (:meth:`StackedModel.model_state` and :meth:`StackedModel.load_model_state`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..ops.stacked_linear import (
    KeptWeights,
    kernels_run,
    stacked_linear,
    stacked_mlp_grads,
    stacked_mlp_step_,
)
from .models import MLP, SmallCNN


def _stack(tensors: Sequence[Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).contiguous())


class StackedLinear(nn.Module):
    """``B`` linear layers, samples last: ``x [B, in, n] -> [B, out, n]`` (see
    :func:`~recallprune.ops.stacked_linear`). Its weight is the parameter ``weight``
    ``[B, out, in]``, or once :meth:`compact`, ``kept_weight``: the kept weights' values alone,
    which the CPU kernels visit alone and an optimizer steps alone."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.weight = _stack([layer.weight for layer in layers])  # [B, out, in]
        self.bias = _stack([layer.bias for layer in layers])  # [B, out]
        self.kept: KeptWeights | None = None

    def compact(self, mask: Tensor) -> None:
        """Keep only the weights where ``mask`` (bool ``[B, out, in]``) is True: ``weight``
        becomes ``kept_weight``, their values (the others, which must be 0 to change nothing,
        are dropped)."""
        if self.kept is not None:
            raise RuntimeError("StackedLinear.compact: the layer is compact already")
        kept = KeptWeights.from_mask(mask.to(self.weight.device))
        values = kept.compact(self.weight.detach())
        del self.weight
        self.kept_weight = nn.Parameter(values)
        self.kept = kept
        self._weight_first()

    def expand(self) -> None:
        """Back to a dense ``weight``, 0 at the weights :meth:`compact` dropped."""
        if self.kept is None:
            return
        dense = self.kept.expand(self.kept_weight.detach())
        del self.kept_weight
        self.weight = nn.Parameter(dense)
        self.kept = None
        self._weight_first()

    def _weight_first(self) -> None:
        """The weight before the bias among the parameters, as built: state dicts, and the
        checkpoints saved from them, list them in that order."""
        self._parameters["bias"] = self._parameters.pop("bias")

    def forward(self, x: Tensor, relu: bool = False) -> Tensor:
        if self.kept is None:
            return stacked_linear(x, self.weight, self.bias, None, relu)
        return stacked_linear(x, self.kept_weight, self.bias, self.kept, relu)


class StackedConv2d(nn.Module):
    """``B`` 2-D convolutions as one grouped convolution: ``x [N, B * in, H, W] ->
    [N, B * out, H', W']`` (the models' channels side by side)."""

    def __init__(self, layers: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        first = layers[0]
        self.stride, self.padding = first.stride, first.padding
        self.weight = _stack([layer.weight for layer in layers])  # [B, out, in, kh, kw]
        self.bias = _stack([layer.bias for layer in layers])  # [B, out]

    def forward(self, x: Tensor) -> Tensor:
        b = self.weight.shape[0]
        return nn.functional.conv2d(
            x,
            self.weight.flatten(0, 1),
            self.bias.flatten(),
            self.stride,
            self.padding,
            groups=b,
        )


class StackedModel(nn.Module):
    """Base of the stacked models: ``forward(x [B, N, ...]) -> logits [B, N, C]``."""

    num_models: int

    def model_state(self, index: int) -> dict[str, Tensor]:
        """Model ``index``'s state dict, as its single model would hold it."""
        return {name: p[index].detach().clone() for name, p in self.named_parameters()}

    def model_states(self) -> list[dict[str, Tensor]]:
        """Every model's state dict on the CPU, as :meth:`model_state` then ``.cpu()`` would
        give them, from one copy of each stacked parameter to the host (not one per model)."""
        host = {name: p.detach().cpu() for name, p in self.named_parameters()}
        return [
            {name: tensor[index].clone() for name, tensor in host.items()}
            for index in range(self.num_models)
        ]

    def compact(self, masks: dict[str, Tensor], below: float = 1.0) -> None:
        """Make each linear layer whose weight has a mask in ``masks`` (by parameter name, bool
        of the stacked weight's shape, True: kept) compact (:meth:`StackedLinear.compact`): its
        pruned weights, 0 as a masked optimizer keeps them, no longer exist, so neither the
        kernels nor an optimizer built afterwards touch them. ``below``: only the layers whose
        pruned models (those with a weight pruned) keep less than this fraction of their
        weights, on average. :meth:`expand` undoes it; the state-dict methods below need the
        dense weights."""
        for name, module in self.named_modules():
            mask = masks.get(f"{name}.weight")
            if not isinstance(module, StackedLinear) or mask is None:
                continue
            kept = mask.flatten(1).float().mean(dim=1)
            pruned = kept < 1
            if pruned.any() and kept[pruned].mean().item() < below:
                module.compact(mask)

    def expand(self) -> None:
        """Every compact linear layer's weight dense again."""
        for module in self.modules():
            if isinstance(module, StackedLinear):
                module.expand()

    def dense_named(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Tensors by parameter name (say, an optimizer's per-parameter state), each compact
        layer's ``kept_weight`` entry given as the dense ``weight`` entry (0 where pruned)."""
        out = dict(tensors)
        for name, module in self.named_modules():
            key = f"{name}.kept_weight"
            if isinstance(module, StackedLinear) and module.kept is not None and key in out:
                out[f"{name}.weight"] = module.kept.expand(out.pop(key))
        return out

    @torch.no_grad()
    def load_model_state(self, index: int, state: dict[str, Tensor]) -> None:
        """Set model ``index`` from a single model's state dict."""
        for name, p in self.named_parameters():
            p[index].copy_(state[name])


class StackedMLP(StackedModel):
    """``B`` :class:`~recallprune.study.models.MLP` models of one shape."""

    def __init__(self, models: Sequence[MLP]) -> None:
        super().__init__()
        self.num_models = len(models)
        self.fc1 = StackedLinear([m.fc1 for m in models])
        self.fc2 = StackedLinear([m.fc2 for m in models])
        self.fc3 = StackedLinear([m.fc3 for m in models])

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).transpose(1, 2)  # [B, in, N]: samples last
        x = self.fc2(self.fc1(x, relu=True), relu=True)
        return self.fc3(x).transpose(1, 2)

    def _layers(self) -> list[StackedLinear]:
        return [self.fc1, self.fc2, self.fc3]

    def fused_step(self, x: Tensor) -> bool:
        """Whether :meth:`step_grads` runs the fused CPU kernel on inputs like ``x`` (float32
        CPU tensors, where torch uses AVX2 or AVX-512)."""
        return kernels_run(x, *self.parameters())

    def step_grads(self, x: Tensor, y: Tensor, batch: Tensor) -> Tensor:
        """One training step's gradients, each model on its own samples ``batch`` ``[B, n]``
        (rows of ``x`` and ``y``), into the parameters' ``.grad`` (replaced): each model's
        gradient of its mean batch cross-entropy, without autograd
        (:func:`~recallprune.ops.stacked_linear.stacked_mlp_grads`). Returns each sample's loss
        ``[B, n]``."""
        return self._step(x, y, batch, None)

    def step_fused(self, x: Tensor, y: Tensor, batch: Tensor, optimizer: Any) -> Tensor | None:
        """:meth:`step_grads`, then ``optimizer``'s step of every parameter, model by model
        while its gradients are in cache, in one call of the CPU kernels
        (:func:`~recallprune.ops.stacked_linear.stacked_mlp_step_`): the same parameters and
        momentum as :meth:`step_grads` then ``optimizer.step()``; the gradients, spent, are
        left None. Returns each sample's loss; None, with nothing done, where ``optimizer``
        cannot step them so
        (:meth:`~recallprune.optim.UndecayedSGD.fused_step_args`; say, on its first step)."""
        fused = getattr(optimizer, "fused_step_args", None)
        args = fused(self._weights() + self._biases()) if fused is not None else None
        if args is None:
            return None
        return self._step(x, y, batch, args)

    def _weights(self) -> list[Tensor]:
        return [l.weight if l.kept is None else l.kept_weight for l in self._layers()]

    def _biases(self) -> list[Tensor]:
        return [layer.bias for layer in self._layers()]

    def _step(self, x: Tensor, y: Tensor, batch: Tensor, step: dict | None) -> Tensor:
        weights, biases = self._weights(), self._biases()
        kept = [layer.kept for layer in self._layers()]
        if step is not None:
            losses = stacked_mlp_step_(x.flatten(1), y, batch, weights, biases, kept, step)
            for p in [*weights, *biases]:
                p.grad = None  # spent in the step
            return losses
        losses, grad_weights, grad_biases = stacked_mlp_grads(
            x.flatten(1), y, batch, weights, biases, kept
        )
        for p, grad in zip([*weights, *biases], [*grad_weights, *grad_biases], strict=True):
            p.grad = grad
        return losses


class StackedCNN(StackedModel):
    """``B`` :class:`~recallprune.study.models.SmallCNN` models of one shape."""

    def __init__(self, models: Sequence[SmallCNN]) -> None:
        super().__init__()
        self.num_models = len(models)
        self.conv1 = StackedConv2d([m.conv1 for m in models])
        self.conv2 = StackedConv2d([m.conv2 for m in models])
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = StackedLinear([m.fc1 for m in models])
        self.fc2 = StackedLinear([m.fc2 for m in models])

    def forward(self, x: Tensor) -> Tensor:
        b, n = x.shape[:2]
        x = x.transpose(0, 1).flatten(1, 2)  # [N, B * in, H, W]
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))  # [N, B * c2, 2, 2]
        x = x.view(n, b, -1).permute(1, 2, 0)  # [B, c2 * 4, N], each model's flatten(1)
        return self.fc2(self.fc1(x, relu=True)).transpose(1, 2)


def stack_models(models: Sequence[nn.Module]) -> StackedModel | None:
    """The models stacked, or None where their kind cannot be (anything but the study's
    MLP and CNN, e.g. models with batch normalisation) or their shapes differ."""
    if not models:
        return None
    kind = type(models[0])
    if any(type(m) is not kind for m in models):
        return None
    shapes = [[tuple(p.shape) for p in m.parameters()] for m in models]
    if any(s != shapes[0] for s in shapes):
        return None
    if kind is MLP:
        return StackedMLP(models)
    if kind is SmallCNN:
        return StackedCNN(models)
    return None


def stack_states(template: nn.Module, states: Sequence[dict[str, Tensor]]) -> StackedModel | None:
    """The models whose state dicts are ``states`` stacked, as :func:`stack_models` would stack
    them, without building each: ``template``, one model of their kind and shape (on any
    device, "meta" too), gives the structure. None where the kind cannot be stacked."""
    stacked = stack_models([template])
    if stacked is None or not states:
        return None
    for name, _ in list(stacked.named_parameters()):
        module_name, _, attribute = name.rpartition(".")
        owner = stacked.get_submodule(module_name) if module_name else stacked
        setattr(owner, attribute, nn.Parameter(torch.stack([state[name] for state in states])))
    stacked.num_models = len(states)
    return stacked
