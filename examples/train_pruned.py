"""Train a small MLP on scikit-learn's digits with UndecayedSGD, prune it by magnitude,
fine-tune the pruned network with keep masks, and print what happened.

Runs offline in seconds on a CPU: ``python examples/train_pruned.py``.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import recallprune
from recallprune import Pruner, UndecayedSGD, decay_param_groups


def load_data(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    return x_train, x_test, y_train, y_test


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(model, optimizer, x, y, epochs: int, batch_size: int, generator) -> None:
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.9, help="fraction of weights pruned")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x_train, x_test, y_train, y_test = load_data(args.seed)
    model = nn.Sequential(
        nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )
    optimizer = UndecayedSGD(
        decay_param_groups(model, weight_decay=5e-4), lr=0.05, momentum=0.9, track_grad_avg=True
    )
    backend = "C++ kernel" if recallprune.has_ops("cpu") else "pure-torch reference"
    print(f"UndecayedSGD on the CPU through the {backend}")

    train(model, optimizer, x_train, y_train, args.epochs, 64, generator)
    dense_accuracy = accuracy(model, x_test, y_test)
    print(f"dense model: test accuracy {dense_accuracy:.4f} after {args.epochs} epochs")

    # Global magnitude pruning of the hidden layers' weights (the output layer is kept).
    pruner = Pruner(model, "magnitude", exclude=["4"], optimizer=optimizer)
    pruner.prune(sparsity=args.sparsity)
    weights = list(pruner.params.values())
    print(
        f"pruned {pruner.num_pruned()} of {pruner.num_weights()} hidden weights "
        f"({pruner.sparsity():.1%}) by magnitude"
    )
    print(f"pruned model before fine-tuning: test accuracy {accuracy(model, x_test, y_test):.4f}")

    optimizer.reset_grad_average()
    train(model, optimizer, x_train, y_train, args.epochs // 3, 64, generator)
    pruned_accuracy = accuracy(model, x_test, y_test)
    still_zero = all(bool((w[~optimizer.get_mask(w)] == 0).all()) for w in weights)
    print(f"pruned model after fine-tuning: test accuracy {pruned_accuracy:.4f}")
    print(f"pruned weights still exactly zero after fine-tuning: {still_zero}")
    grad_avg = optimizer.grad_average(model[0].weight)
    print(
        f"mean |undecayed gradient| of the first layer while fine-tuning: "
        f"{grad_avg.abs().mean().item():.3e}"
    )


if __name__ == "__main__":
    main()
