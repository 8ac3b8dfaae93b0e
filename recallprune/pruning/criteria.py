"""Pruning criteria: a score per weight, the lowest pruned first.

| name | score |
| --- | --- |
| ``magnitude`` (MP) | ``|w|`` |
| ``gradient`` (GP), first-order Taylor | ``|w * g|`` |
| ``undecayed`` (UP) | ``|-w * g + lam * w**2|`` |
| ``random`` | uniform from a seeded generator |

``g`` is the gradient of the data loss (no weight decay) and ``lam`` the weight decay the
model was trained with. At a stationary point of the decayed loss, ``g = -lam * w``, so UP's
score is ``2 * lam * w**2`` and ranks exactly like magnitude.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

CRITERIA = ("magnitude", "gradient", "undecayed", "random")
NEEDS_GRADIENT = ("gradient", "undecayed")


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
    if lam is None:
        raise ValueError("the undecayed criterion needs lam (the weight decay of training)")
    return undecayed_score(weight, grad, check_lam(lam))
