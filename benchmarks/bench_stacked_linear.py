"""Benchmark the stacked linear layers' CPU kernels against torch's batched products.

What is measured: one training step of a layer of ``B`` stacked models (the forward pass and
the gradients of input, weight and bias), samples last (``[B, features, n]``), for the
default study's MLP layers (64 -> 300 -> 100 -> 10, the last without relu) at ``B = 50`` and
``n = 64`` (the study's batch):

* ``bmm``: torch's ``baddbmm`` forward, ``bmm`` for the two gradients, ``relu`` and its
  backward (``threshold_backward``), the bias gradient's ``sum``: what the stacked layers ran
  before their kernels;
* ``dense``: ``torch.ops.recallprune.stacked_linear`` and its backward, dense weights;
* ``compact d``: the same with compact weights, each model keeping a random fraction ``d`` of
  its weights (every fifth model whole, as a round's control arm is).

And one training step's gradients of the whole stacked MLP (the two hidden layers compact at
``d``, the output layer dense, as in a study's round; ``dense``: every layer dense), each
model on its own 64 samples of a 1,000-sample training set, loss and all:

* ``autograd bmm``: through autograd with torch's batched products and ``cross_entropy``;
* ``autograd kernels``: through autograd with the stacked_linear kernels (the study's step
  before ``stacked_mlp_grads``);
* ``fused``: ``torch.ops.recallprune.stacked_mlp_grads``, one call, no autograd
  (``matches_torch``: the same bits as ``autograd kernels`` where torch uses AVX2 or AVX-512,
  else to rounding).

Every case is timed round-robin (so that a slow spell of a shared machine hits all alike);
reported: the median per step and ``time(bmm) / time(case)`` (> 1: faster than ``bmm``), and
whether the kernels' output and input gradient matched torch's (``matches_torch``).
The fraction from which the study makes a round's layers compact (``COMPACT_BELOW`` in
``recallprune/study/grid.py``) comes from these numbers and the study's own
(``bench_study.py``). Run ``python benchmarks/bench_stacked_linear.py`` (``--capability all``
for each instruction set the CPU has, ``--quick`` for a smoke run); results go to
``benchmarks/results/stacked-linear-<cpu model>-<capability>.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_timing_arguments,
    kernel_benchmark_args,
    print_table,
    resolve_timing_arguments,
    run_devices,
    time_cases,
)
from torch import Tensor

from recallprune.ops.stacked_linear import KeptWeights, stacked_linear, stacked_mlp_grads

LAYERS = [(64, 300, True), (300, 100, True), (100, 10, False)]
DENSITIES = [1.0, 0.8, 0.5, 0.2, 0.05]
MLP_DENSITIES = [None, 0.2, 0.05]  # None: every layer dense
DEFAULTS = {"repeats": 60, "warmup": 6, "max_seconds": 4.0}
ops = torch.ops.recallprune


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_arguments(parser, "steps", "stacked-linear", DEFAULTS)
    parser.add_argument("--models", type=int, default=50, help="stacked models B (default 50)")
    parser.add_argument("--samples", type=int, default=64, help="samples n (default 64)")
    args = parser.parse_args(argv)
    resolve_timing_arguments(args, parser, DEFAULTS, quick_max_seconds=0.2)
    if args.quick:
        args.models = min(args.models, 8)
    return args


def layer_cases(inputs: int, out: int, relu: bool, args, checks: dict[str, bool]) -> dict[str, Any]:
    """The builders of one layer's cases (each returns the step to time). Each kernel case,
    once built, checks its output and input gradient against torch's (in ``checks``)."""
    g = torch.Generator().manual_seed(args.seed)
    models, n = args.models, args.samples
    x = torch.rand(models, inputs, n, generator=g)
    weight = torch.randn(models, out, inputs, generator=g) / inputs**0.5
    bias = torch.randn(models, out, generator=g)
    grad = torch.randn(models, out, n, generator=g)

    def bmm():
        def step():
            y = torch.baddbmm(bias.unsqueeze(-1), weight, x)
            pre = grad
            if relu:
                y = torch.relu(y)
                pre = torch.ops.aten.threshold_backward(grad, y, 0)
            pre.sum(dim=2)
            torch.bmm(pre, x.transpose(1, 2))
            torch.bmm(weight.transpose(1, 2), pre)

        return step

    def kernel(density: float | None):
        def build():
            if density is None:
                w, lists, columns = weight, (None, None), (None, None, None)
                dense = weight
            else:
                mask = torch.rand(models, out, inputs, generator=g) < density
                mask[::5] = True
                kept = KeptWeights.from_mask(mask)
                w = kept.compact(weight)
                lists = (kept.row_ptr, kept.row_cols)
                columns = (kept.col_ptr, kept.col_rows, kept.col_vals)
                dense = kept.expand(w)
            name = "dense" if density is None else f"compact {density:g}"
            if name not in checks:
                y = ops.stacked_linear(x, w, bias, *lists, relu, 0.5)
                gx = ops.stacked_linear_backward(
                    grad, x, w, y if relu else None, *lists, *columns, [True, False, False], 0.5
                )[0]
                want = torch.baddbmm(bias.unsqueeze(-1), dense, x)
                pre = grad
                if relu:
                    want = torch.relu(want)
                    pre = torch.ops.aten.threshold_backward(grad, want, 0)
                want_gx = torch.bmm(dense.transpose(1, 2), pre)
                checks[name] = bool(
                    torch.allclose(y, want, rtol=1e-4, atol=1e-4)
                    and torch.allclose(gx, want_gx, rtol=1e-4, atol=1e-4)
                )

            def step():
                y = ops.stacked_linear(x, w, bias, *lists, relu, 0.5)
                ops.stacked_linear_backward(
                    grad, x, w, y if relu else None, *lists, *columns, [True, True, True], 0.5
                )

            return step

        return build

    builders = {"bmm": bmm, "dense": kernel(None)}
    for density in DENSITIES:
        builders[f"compact {density:g}"] = kernel(density)
    return builders


def mlp_cases(density: float | None, args, checks: dict[str, bool]) -> dict[str, Any]:
    """The builders of the whole MLP's cases at one density (see the module docstring); the
    fused case checks itself against the autograd step (in ``checks``)."""
    g = torch.Generator().manual_seed(args.seed)
    models, n = args.models, args.samples
    samples = max(1000, n)
    x = torch.rand(samples, LAYERS[0][0], generator=g)
    y = torch.randint(0, LAYERS[-1][1], (samples,), generator=g)
    batch = torch.stack([torch.randperm(samples, generator=g)[:n] for _ in range(models)])
    weights, biases, kept = [], [], []
    for i, (inputs, out, _) in enumerate(LAYERS):
        weight = torch.randn(models, out, inputs, generator=g) / inputs**0.5
        biases.append(torch.randn(models, out, generator=g) * 0.1)
        if density is None or i == len(LAYERS) - 1:
            weights.append(weight)
            kept.append(None)
            continue
        mask = torch.rand(models, out, inputs, generator=g) < density
        mask[::5] = True
        k = KeptWeights.from_mask(mask)
        weights.append(k.compact(weight))
        kept.append(k)

    def case(backend: str):
        def build():
            def step():
                stacked_mlp_grads(x, y, batch, weights, biases, kept, backend=backend)

            return step

        return build

    def through_autograd() -> tuple[Tensor, tuple[Tensor, ...]]:
        """The step through autograd, stacked_linear's kernels and cross_entropy: each
        sample's loss and every gradient."""
        leaves = [t.detach().requires_grad_() for t in [*weights, *biases]]
        out = x[batch].transpose(1, 2)
        for i, k in enumerate(kept):
            out = stacked_linear(
                out, leaves[i], leaves[len(kept) + i], k, i < len(kept) - 1, backend="kernel"
            )
        losses = torch.nn.functional.cross_entropy(out, y[batch], reduction="none")
        return losses.detach(), torch.autograd.grad(losses.mean(dim=1).sum(), leaves)

    def autograd_kernels():
        return through_autograd

    def fused():
        got = stacked_mlp_grads(x, y, batch, weights, biases, kept, backend="kernel")
        want = stacked_mlp_grads(x, y, batch, weights, biases, kept, backend="auto")
        losses, grads = through_autograd()
        exact = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        same = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6))
        checks["fused"] = bool(
            same(got[0], losses)
            and all(same(a, b) for a, b in zip([*got[1], *got[2]], grads, strict=True))
            and torch.allclose(got[0], want[0])
        )
        return case("kernel")()

    return {"autograd bmm": case("reference"), "autograd kernels": autograd_kernels, "fused": fused}


def main(argv: list[str] | None = None) -> list[Path]:
    argv, args = kernel_benchmark_args(parse_args, argv)
    settings = {
        "repeats": args.repeats,
        "warmup": args.warmup,
        "max_seconds": args.max_seconds,
        "rounds": args.rounds,
        "models": args.models,
        "samples": args.samples,
        "densities": DENSITIES,
        "quick": args.quick,
        "seed": args.seed,
        "argv": argv,
    }

    def timed(builders: dict[str, Any], device: torch.device, what: str) -> dict[str, Any]:
        timings, errors = time_cases(
            builders,
            device,
            args,
        )
        if errors:
            raise SystemExit(f"{what}: {errors}")
        return timings

    def measure(device: torch.device) -> dict[str, Any]:
        if device.type != "cpu":
            return {"cases": [], "note": "the stacked linear kernels are CPU kernels"}
        cases = []
        for inputs, out, relu in LAYERS:
            checks: dict[str, bool] = {}
            timings = timed(
                layer_cases(inputs, out, relu, args, checks), device, f"layer {inputs} -> {out}"
            )
            base = timings["bmm"].median_s
            rows = []
            for name, timing in timings.items():
                cases.append(
                    {
                        "layer": [inputs, out],
                        "relu": relu,
                        "case": name,
                        "median_ms": timing.median_s * 1e3,
                        "min_ms": min(timing.times_s) * 1e3,
                        "vs_bmm": base / timing.median_s,
                        "matches_torch": checks.get(name, True),
                    }
                )
                rows.append(
                    [name, f"{timing.median_s * 1e3:.3f}", f"{base / timing.median_s:.2f}x"]
                )
            print_table(
                f"layer {inputs} -> {out}, B = {args.models}, n = {args.samples}, "
                f"{torch.get_num_threads()} threads",
                ["case", "ms per step", "vs bmm"],
                rows,
            )
        for density in MLP_DENSITIES:
            checks = {}
            name = "dense" if density is None else f"compact {density:g}"
            timings = timed(mlp_cases(density, args, checks), device, f"mlp {name}")
            base = timings["autograd kernels"].median_s
            bmm = timings["autograd bmm"].median_s
            rows = []
            for case, timing in timings.items():
                cases.append(
                    {
                        "layer": "mlp",
                        "density": density,
                        "case": case,
                        "median_ms": timing.median_s * 1e3,
                        "min_ms": min(timing.times_s) * 1e3,
                        "vs_autograd_kernels": base / timing.median_s,
                        "vs_bmm": bmm / timing.median_s,
                        "matches_torch": checks.get(case, True),
                    }
                )
                rows.append(
                    [
                        case,
                        f"{timing.median_s * 1e3:.3f}",
                        f"{base / timing.median_s:.2f}x",
                        f"{bmm / timing.median_s:.2f}x",
                    ]
                )
            print_table(
                f"whole MLP step, {name}, B = {args.models}, n = {args.samples}, "
                f"{torch.get_num_threads()} threads",
                ["case", "ms per step", "vs autograd kernels", "vs autograd bmm"],
                rows,
            )
        return {"threads": torch.get_num_threads(), "cases": cases}

    started = time.perf_counter()
    written = run_devices(
        args,
        argv,
        __file__,
        "stacked-linear",
        measure,
        lambda runs: {"benchmark": "stacked-linear", "settings": settings, "runs": runs},
    )
    print(f"\ntotal {time.perf_counter() - started:.1f} s; wrote " + ", ".join(map(str, written)))
    return written


if __name__ == "__main__":
    main()
