"""Pruning criteria: a score per weight, the lowest pruned first.

| name | score |
| --- | --- |
| ``magnitude`` (MP) | ``|w|`` |
| ``gradient`` (GP), first-order Taylor | ``|w * g|`` |
| ``undecayed`` (UP) | ``|-w * g + lam * w**2|`` |
| ``undecayed-balanced`` | UP with ``g`` from the class-balanced loss |
| ``random`` | uniform from a seeded generator |

``g`` is the gradient of the data loss (no weight decay) and ``lam`` the weight decay the
model was trained with. At a stationary point of the decayed loss, ``g = -lam * w``, so UP's
score is ``2 * lam * w**2`` and ranks exactly like magnitude.

The class-balanced loss weighs every class present in a batch the same, so that the score
does not favour the weights that the majority of examples lean on: a sample of class ``c``
weighs ``1 / (K * n_c)``, with ``n_c`` the samples of class ``c`` and ``K`` the classes
present. On a batch with as many samples of every class it is the ordinary mean loss.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

CRITERIA = ("magnitude", "gradient", "undecayed", "undecayed-balanced", "random")
NEEDS_GRADIENT = ("gradient", "undecayed", "undecayed-balanced")
UNDECAYED = ("undecayed", "undecayed-balanced")  # the criteria that take lam
CLASS_BALANCED = ("undecayed-balanced",)  # the criteria whose gradient is class-balanced


def check_lam(lam: object) -> float:
    """``lam`` as a float, or a ValueError if it is not a finite non-negative number."""
    if (
        isinstance(lam, bool)
        or not isinstance(lam, numbers.Real)
        or not math.isfinite(lam)
        or lam < 0
    ):
        raise ValueError(
            f"lam must be a finite non-negative number (the weight decay of training), got {lam!r}"
        )
    return float(lam)


def magnitude_score(weight: Tensor) -> Tensor:
    return weight.detach().float().abs()


def gradient_score(weight: Tensor, grad: Tensor) -> Tensor:
    return (weight.detach().float() * grad.float()).abs()


def undecayed_score(weight: Tensor, grad: Tensor, lam: float) -> Tensor:
    w = weight.detach().float()
    return (-w * grad.float() + lam * w**2).abs()


def class_balanced_weights(targets: Tensor, num_classes: int | None = None) -> Tensor:
    """Each sample's weight in the class-balanced loss, over the last dimension of
    ``targets`` (leading dimensions: separate batches): ``1 / (K * n_c)`` for a sample of
    class ``c``; each batch's weights sum to 1. ``num_classes`` (at least the largest label
    plus one) spares reading the largest label on the host."""
    targets = targets.long()
    if num_classes is None:
        num_classes = int(targets.max()) + 1 if targets.numel() else 1
    counts = torch.zeros(*targets.shape[:-1], num_classes, device=targets.device)
    counts.scatter_add_(-1, targets, torch.ones(targets.shape, device=targets.device))
    present = (counts > 0).sum(dim=-1, keepdim=True)
    return 1.0 / (present * counts.gather(-1, targets))


def class_balanced_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """The cross-entropy of a batch with every class present weighing the same."""
    losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return (losses * class_balanced_weights(targets, logits.shape[-1])).sum()


def random_score(weight: Tensor, generator: torch.Generator) -> Tensor:
    return torch.rand(weight.shape, generator=generator).to(weight.device)


def score(
    criterion: str,
    weight: Tensor,
    grad: Tensor | None = None,
    lam: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The float32 score of every element of ``weight`` under ``criterion``."""
    if criterion == "magnitude":
        return magnitude_score(weight)
    if criterion == "random":
        if generator is None:
            raise ValueError("the random criterion needs a seeded torch.Generator")
        return random_score(weight, generator)
    if criterion not in NEEDS_GRADIENT:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if grad is None:
        raise ValueError(f"the {criterion} criterion needs the data-loss gradient of the weight")
    if criterion == "gradient":
        return gradient_score(weight, grad)
    # undecayed-balanced differs from undecayed only in the loss its gradient comes from.
    if lam is None:
        raise ValueError(f"the {criterion} criterion needs lam (the weight decay of training)")
    return undecayed_score(weight, grad, check_lam(lam))
