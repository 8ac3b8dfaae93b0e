"""What keeping masks costs each optimizer: one step with and without the Pruner's step
post-hook (half of the prunable weights pruned), timed round-robin in one process.

Optimizers: torch.optim.SGD (momentum 0.9, weight decay), Adam and AdamW with their default
implementation for the device, and UndecayedSGD, whose masks are fused into its update
(no hook), for comparison. Workloads: torchvision's ResNet-18 (when importable) and an MLP of
about 10 M weights. The ratio ``with hook / without`` is the cost; the hook's own time is
measured alone too.

    python benchmarks/bench_mask_hook.py --device cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_timing_arguments,
    device_label,
    print_table,
    resolve_timing_arguments,
    run_devices,
    time_cases,
)
from torch import nn

from recallprune import Pruner, UndecayedSGD, has_ops

PRUNED = 0.5
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, weight_decay=5e-4),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-4),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=1e-2),
}
DEFAULTS = {"repeats": 30, "warmup": 3, "max_seconds": 4.0}


def make_models(quick: bool) -> dict[str, Callable[[], nn.Module]]:
    width = 64 if quick else 2048
    models: dict[str, Callable[[], nn.Module]] = {
        f"mlp-{width}": lambda: nn.Sequential(
            nn.Linear(784, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 10),
        )
    }
    if not quick:
        try:
            from torchvision.models import resnet18

            models = {"resnet18": resnet18, **models}
        except ImportError as error:
            print(f"resnet18 skipped: torchvision not importable ({error})")
    return models


def run_model(name: str, build: Callable[[], nn.Module], device, args) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = build().to(device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    pruned_weights = sum(p.numel() for p in Pruner(model).params.values())

    def case(make_optimizer, hook: bool):
        def setup():
            opt = make_optimizer(params)
            if hook:
                Pruner(model, "random", optimizer=opt).prune(PRUNED)
            return opt.step

        return setup

    builders = {}
    for opt_name, make in OPTIMIZERS.items():
        builders[opt_name] = case(make, hook=False)
        builders[f"{opt_name} + hook"] = case(make, hook=True)
    if has_ops():
        builders["UndecayedSGD (fused masks)"] = case(
            lambda ps: UndecayedSGD(ps, lr=1e-3, momentum=0.9, weight_decay=5e-4), hook=True
        )

    def hook_alone():
        opt = torch.optim.SGD(params, lr=0.0)
        Pruner(model, "random", optimizer=opt).prune(PRUNED)
        hooks = list(opt._optimizer_step_post_hooks.values())
        return lambda: [h(opt, (), {}) for h in hooks]

    builders["hook alone"] = hook_alone
    timings, errors = time_cases(
        builders,
        device,
        args,
    )
    methods = []
    for method, timing in timings.items():
        entry = {"method": method, **timing.summary()}
        base = method.removesuffix(" + hook")
        if method.endswith(" + hook") and base in timings:
            entry["ratio_to_without"] = timing.median_s / timings[base].median_s
        methods.append(entry)
    rows = [
        [m["method"], f"{m['median_ms']:.2f}", f"{m.get('ratio_to_without', float('nan')):.2f}"]
        for m in methods
    ]
    print_table(
        f"{name}: {sum(p.numel() for p in params) / 1e6:.1f} M parameters, "
        f"{pruned_weights / 1e6:.1f} M prunable, {PRUNED:.0%} pruned, {device_label(device)}",
        ["method", "median ms", "with / without hook"],
        rows,
    )
    return {
        "name": name,
        "parameters": sum(p.numel() for p in params),
        "prunable": pruned_weights,
        "pruned_fraction": PRUNED,
        "methods": methods,
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> list[Path]:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_arguments(parser, "steps", "mask-hook", DEFAULTS)
    args = parser.parse_args(argv)
    resolve_timing_arguments(args, parser, DEFAULTS, quick_max_seconds=0.5)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = {
        k: getattr(args, k) for k in ("repeats", "warmup", "rounds", "max_seconds", "quick")
    }
    settings["argv"] = argv

    def measure(device: torch.device) -> dict[str, Any]:
        return {
            "workloads": [
                run_model(name, build, device, args)
                for name, build in make_models(args.quick).items()
            ]
        }

    started = time.perf_counter()
    written = run_devices(
        args, argv, __file__, "mask-hook", measure, lambda runs: payload(settings, runs)
    )
    print(f"\ntotal {time.perf_counter() - started:.1f} s; wrote " + ", ".join(map(str, written)))
    return written


def payload(settings: dict, runs: list[dict]) -> dict[str, Any]:
    return {
        "benchmark": "optimizer step with and without the Pruner's mask-keeping step hook",
        "ratio_definition": "time(step + hook) / time(step); 1.0 means the hook is free",
        "settings": settings,
        "runs": runs,
    }


if __name__ == "__main__":
    main()
