"""Many small models trained as one: the study's MLP and CNN with every parameter stacked
along a leading model dimension ``B``.

A study's grid (seeds x arms) is made of small models trained the same way, and for the
models the paper is about a training step is almost all per-operation overhead. Stacked, the
``B`` models share every operation: one batched matrix product per layer (``baddbmm``), one
grouped convolution (``groups=B``), one backward, one optimizer step over a handful of
tensors. Each model keeps its own parameters, data order, masks and criterion; nothing is
shared between them but the kernels.

A stacked module's parameter ``name`` has shape ``[B, *shape]`` where the single model's
parameter of the same name has ``shape``, so masks, state dicts and pruning scores carry over
by name (:meth:`StackedModel.model_state` and :meth:`StackedModel.load_model_state`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .models import MLP, SmallCNN


def _stack(tensors: Sequence[Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).contiguous())


class _StackedLinearFunction(torch.autograd.Function):
    """``baddbmm(bias, x, weight^T)`` with the weight's gradient computed in the weight's own
    layout (``dy^T @ x``, ``[B, out, in]``): autograd's ``x^T @ dy`` is its transpose, which
    gradient accumulation would copy to the parameter's layout on every step."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(dim=1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


class StackedLinear(nn.Module):
    """``B`` linear layers: ``x [B, N, in] -> [B, N, out]``."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.weight = _stack([layer.weight for layer in layers])  # [B, out, in]
        self.bias = _stack([layer.bias for layer in layers])  # [B, out]

    def forward(self, x: Tensor) -> Tensor:
        return _StackedLinearFunction.apply(x, self.weight, self.bias)


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
        x = torch.relu(self.fc1(x.flatten(2)))
        return self.fc3(torch.relu(self.fc2(x)))


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
        x = x.view(n, b, -1).transpose(0, 1)  # [B, N, c2 * 4], each model's flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


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
