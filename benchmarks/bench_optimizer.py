"""Benchmark one optimizer step of UndecayedSGD against torch.optim.SGD plus mask multiplies.

What is measured, per device (CPU, and CUDA when present) and per workload (the ResNet-18
parameter list, one 16M-element fp32 tensor, 2,000 small tensors and, on CUDA with enough
free memory, ~1.07B parameters in 64 tensors):

* ``torch.optim.SGD`` as a for-loop (``foreach=False``), ``foreach=True`` and ``fused=True``:
  alone, and followed by the usual masking of a pruned network, ``grad *= mask`` before the
  step and ``param *= mask`` after it, with a float mask (the parameter's dtype) and a bool
  mask (per-tensor ``mul_`` for the for-loop; ``torch._foreach_mul_`` for foreach/fused).
* ``recallprune.UndecayedSGD(backend="kernel")``: no mask, an all-true mask (0% pruned),
  50% and 90% pruned; the mask is applied inside the fused step.
* ``dst.copy_(src)`` over flat buffers that move as many bytes as the fused masked step:
  the bandwidth a memory-bound step could reach; and ``a.add_(b)`` moving the same bytes
  (an in-place read-modify-write, free of the copy's write-allocate reads on CPUs).
* Diagnostics: ``torch.ops.recallprune.undecayed_sgd_`` called directly ("op only"), which
  separates the kernel's time from the optimizer's Python around it.

Every step is timed as one ``step()`` call (plus the mask multiplies where they belong)
with the gradients already set and the momentum buffers created by an untimed first step:
momentum 0.9, weight decay 5e-4, lr 0.01. The methods are timed round-robin over a few
rounds (each round sets a method up afresh), so that a slow spell of a shared machine hits
them alike. The median of the repeats is reported (and the minimum), with
effective bandwidth (the bytes a method must move, see ``BYTE_MODEL``, over its median
time), its share of the copy's bandwidth, and for every UndecayedSGD row the speedups
``time(baseline) / time(UndecayedSGD)`` (> 1: UndecayedSGD is faster). On CUDA the script
also records whether one step runs without a host synchronisation.

Run ``python benchmarks/bench_optimizer.py`` (``--help`` for options; ``--quick`` for a
smoke run of a few seconds; ``--capability all`` to measure the CPU under each instruction
set torch can use on it). Results go to ``benchmarks/results/optimizer-<device>.json``, for
the CPU ``optimizer-<cpu model>-<capability>.json``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_timing_arguments,
    bandwidth_fn,
    check_no_host_sync,
    device_label,
    kernel_benchmark_args,
    print_table,
    resolve_timing_arguments,
    run_devices,
    synchronize,
    time_cases,
)

from recallprune import UndecayedSGD

LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
MIN_REPEATS = 5  # slow methods run fewer repeats (see --max-seconds), never fewer than this
# Composite baselines mask with this pruned fraction (their cost does not depend on it).
COMPOSITE_PRUNED = 0.5
UNDECAYED_CASES = (  # (label, pruned fraction; None: no mask at all)
    ("no mask", None),
    ("0% (all-true mask)", 0.0),
    ("50% pruned", 0.5),
    ("90% pruned", 0.9),
)
SGD_IMPLS = {  # label -> torch.optim.SGD keyword arguments
    "for-loop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}

# Bytes that a method must move per element, for a parameter of E bytes per element and
# a mask of M bytes per element (fp32: E = 4; float mask: M = 4, bool mask: M = 1).
BYTE_MODEL = {
    "sgd": "5E: read w, g, buf; write w, buf (fp32: 20 B)",
    "sgd+mask": (
        "5E + 2(2E + M): the SGD step, plus grad.mul_(mask) (read g, mask; write g) and "
        "param.mul_(mask) (read w, mask; write w) (fp32: 44 B float mask, 38 B bool mask)"
    ),
    "undecayed, no mask": "5E: read w, g, buf; write w, buf (fp32: 20 B)",
    "undecayed, mask": "5E + 1: read w, g, buf, bool mask; write w, buf (fp32: 21 B)",
    "copy": (
        "dst.copy_(src) moving as many bytes as the fused masked step (5E + 1 per element): "
        "each buffer holds half of them; bytes = read + write"
    ),
    "add_": (
        "a.add_(b) over fp32 buffers moving the same bytes (read a, b; write a): an in-place "
        "read-modify-write like an optimizer step"
    ),
    "note": (
        "minimal traffic of each method's algorithm; implementations that take several "
        "passes (the for-loop SGD) move more than they are credited with. On CPUs the copy "
        "also reads dst before writing it (write-allocate), which the count leaves out, so "
        "an in-place step can exceed 100% of the copy's bandwidth; add_ has no such read"
    ),
}


# -- workloads ------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    description: str
    shapes: list[tuple[int, ...]]
    cuda_only: bool = False
    min_free_gib: float = 0.0  # CUDA: skip unless this much memory is free

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def resnet18_shapes() -> list[tuple[int, ...]]:
    from torchvision.models import resnet18

    with torch.device("meta"):
        model = resnet18()
    return [tuple(p.shape) for p in model.parameters()]


def small_tensor_shapes(count: int, low: int, high: int, seed: int) -> list[tuple[int, ...]]:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(low, high + 1, (count,), generator=gen)
    return [(int(n),) for n in sizes]


def make_workloads(quick: bool, seed: int) -> tuple[list[Workload], list[str]]:
    notes: list[str] = []
    workloads: list[Workload] = []
    try:
        shapes = resnet18_shapes()
        if quick:
            shapes = shapes[:10]
        workloads.append(
            Workload(
                "resnet18",
                "torchvision resnet18() parameters"
                + (" (first 10 tensors: --quick)" if quick else ""),
                shapes,
            )
        )
    except ImportError as error:
        notes.append(f"resnet18 workload skipped: torchvision not importable ({error})")
    big = 1 << 16 if quick else 16 * 2**20
    workloads.append(Workload("single-16M", f"one fp32 tensor of {big} elements", [(big,)]))
    count = 50 if quick else 2000
    workloads.append(
        Workload(
            "small-2000",
            f"{count} fp32 tensors of 64..4096 elements (seeded)",
            small_tensor_shapes(count, 64, 4096, seed),
        )
    )
    if not quick:
        workloads.append(
            Workload(
                "1B",
                "64 fp32 tensors of 16M elements (1.07B parameters)",
                [(16 * 2**20,)] * 64,
                cuda_only=True,
                min_free_gib=30.0,
            )
        )
    return workloads, notes


# -- state shared by the methods of one workload --------------------------------------------


class Tensors:
    """Parameters, gradients and masks of one workload on one device."""

    def __init__(self, workload: Workload, device: torch.device, seed: int) -> None:
        self.device = device
        self.seed = seed
        self.params = [
            torch.empty(s, device=device, dtype=torch.float32).requires_grad_()
            for s in workload.shapes
        ]
        for p in self.params:
            p.grad = torch.empty_like(p)
        self.grads = [p.grad for p in self.params]
        self._bool_masks: dict[float, list[torch.Tensor]] = {}
        self.float_masks = [m.to(torch.float32) for m in self.bool_masks(COMPOSITE_PRUNED)]

    def generator(self, offset: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(self.seed + offset)

    @torch.no_grad()
    def reset(self) -> None:
        """The same starting weights and gradients for every method."""
        gen = self.generator(1)
        for p, g in zip(self.params, self.grads, strict=True):
            p.normal_(0.0, 0.1, generator=gen)
            g.normal_(0.0, 0.01, generator=gen)

    def bool_masks(self, pruned: float) -> list[torch.Tensor]:
        """Seeded keep masks with about ``pruned`` of the elements false."""
        if pruned not in self._bool_masks:
            gen = self.generator(1000 + int(pruned * 1000))
            self._bool_masks[pruned] = [
                torch.rand(p.shape, generator=gen, device=self.device) >= pruned
                for p in self.params
            ]
        return self._bool_masks[pruned]


# -- methods --------------------------------------------------------------------------------


@dataclass
class Method:
    name: str
    family: str  # "sgd", "sgd+mask", "undecayed", "diagnostic"
    impl: str | None = None
    mask: str | None = None  # None, "float", "bool"
    pruned: float | None = None
    notes: list[str] = field(default_factory=list)

    def bytes_per_element(self, elt: int) -> int:
        if self.family == "sgd":
            return 5 * elt
        if self.family == "sgd+mask":
            mask_bytes = elt if self.mask == "float" else 1
            return 5 * elt + 2 * (2 * elt + mask_bytes)
        return 5 * elt + (0 if self.pruned is None else 1)


def list_methods() -> list[Method]:
    methods = [Method(f"SGD {impl}", "sgd", impl=impl) for impl in SGD_IMPLS]
    for impl in SGD_IMPLS:
        for mask in ("float", "bool"):
            methods.append(
                Method(
                    f"SGD {impl} + {mask} mask",
                    "sgd+mask",
                    impl=impl,
                    mask=mask,
                    pruned=COMPOSITE_PRUNED,
                )
            )
    for label, pruned in UNDECAYED_CASES:
        methods.append(Method(f"UndecayedSGD {label}", "undecayed", impl="kernel", pruned=pruned))
    for label, pruned in (("no mask", None), ("50% pruned", 0.5)):
        methods.append(Method(f"(op only) {label}", "diagnostic", impl="torch.ops", pruned=pruned))
    return methods


def _mask_multiply(
    method: Method, tensors: list[torch.Tensor], masks: list[torch.Tensor]
) -> Callable[[], None]:
    """``t *= mask`` over the lists: a loop for the for-loop SGD, else ``_foreach_mul_``."""

    def loop() -> None:
        for t, m in zip(tensors, masks, strict=True):
            t.mul_(m)

    if method.impl == "for-loop":
        return loop
    try:
        with torch.no_grad():  # the parameters are leaves that require grad
            torch._foreach_mul_(tensors, masks)
    except (RuntimeError, TypeError) as error:
        note = f"torch._foreach_mul_ with {method.mask} masks raised ({error}); per-tensor mul_"
        if note not in method.notes:
            method.notes.append(note)
        return loop
    return lambda: torch._foreach_mul_(tensors, masks)


def build_step(method: Method, t: Tensors) -> Callable[[], None]:
    """One step of ``method`` (under no_grad); the first (untimed) step has been taken."""
    t.reset()
    hyper = {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}

    if method.family in ("sgd", "sgd+mask"):
        opt = torch.optim.SGD(t.params, **hyper, **SGD_IMPLS[method.impl])
        if method.family == "sgd":
            step = opt.step
        else:
            masks = t.float_masks if method.mask == "float" else t.bool_masks(method.pruned)
            mask_grads = _mask_multiply(method, t.grads, masks)
            mask_params = _mask_multiply(method, t.params, masks)

            def step() -> None:
                mask_grads()
                opt.step()
                mask_params()

    elif method.family == "undecayed":
        opt = UndecayedSGD(t.params, **hyper, backend="kernel")
        if method.pruned is not None:
            for p, m in zip(t.params, t.bool_masks(method.pruned), strict=True):
                opt.set_mask(p, m)
        step = opt.step

    else:  # diagnostic: the fused op alone, without the optimizer's Python around it
        bufs = [torch.zeros_like(p) for p in t.params]
        keeps = [] if method.pruned is None else list(t.bool_masks(method.pruned))
        params = [p.detach() for p in t.params]

        def step() -> None:
            torch.ops.recallprune.undecayed_sgd_(
                params,
                t.grads,
                bufs,
                keeps,
                [],
                [],
                lr=LR,
                momentum=MOMENTUM,
                dampening=0.0,
                weight_decay=WEIGHT_DECAY,
                nesterov=False,
                maximize=False,
                is_first_step=False,
            )

    with torch.no_grad():
        step()  # creates the momentum buffers
    synchronize(t.device)

    def no_grad_step() -> None:
        with torch.no_grad():
            step()

    return no_grad_step


# -- one workload ---------------------------------------------------------------------------

SPEEDUP_BASELINES = (  # key in the JSON, table header
    ("fused", "x fused"),
    ("best_composite_float", "x best+float"),
    ("fused+bool", "x fused+bool"),
    ("foreach", "x foreach"),
    ("for-loop", "x loop"),
)


def run_workload(
    workload: Workload, device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "name": workload.name,
        "description": workload.description,
        "num_tensors": len(workload.shapes),
        "numel": workload.numel,
        "dtype": "float32",
    }
    if device.type == "cuda" and workload.min_free_gib:
        free, _ = torch.cuda.mem_get_info(device)
        if free / 2**30 < workload.min_free_gib:
            result["skipped"] = (
                f"needs ~{workload.min_free_gib:.0f} GiB free, {free / 2**30:.1f} GiB free"
            )
            print(f"\n[{device}] {workload.name}: skipped ({result['skipped']})")
            return result

    tensors = Tensors(workload, device, args.seed)
    elt = 4
    numel = workload.numel
    methods = {m.name: m for m in list_methods()}

    # Bandwidth baselines move as many bytes as the fused masked step.
    baseline_bytes = (5 * elt + 1) * numel
    baseline_info: dict[str, tuple[int, list[str]]] = {}

    def baseline_builder(kind: str) -> Callable[[], Callable[[], None]]:
        def build() -> Callable[[], None]:
            fn, moved, notes = bandwidth_fn(baseline_bytes, device, kind)
            baseline_info[kind] = (moved, notes)
            return fn

        return build

    builders: dict[str, Callable[[], Callable[[], None]]] = {
        "copy": baseline_builder("copy"),
        "add_": baseline_builder("add_"),
    }
    for name, method in methods.items():
        builders[name] = lambda method=method: build_step(method, tensors)

    no_host_sync: dict[str, bool] = {}

    def after_first_round(name: str, fn: Callable[[], object]) -> None:
        if name in methods:
            flag = check_no_host_sync(fn, device)
            if flag is not None:
                no_host_sync[name] = flag
        if args.verbose:
            print(f"  {name}: built and timed (round 1)", flush=True)

    timings, errors = time_cases(
        builders,
        device,
        args,
        min_repeats=MIN_REPEATS,
        after_first_round=after_first_round,
    )

    for kind in ("copy", "add_"):
        if kind not in timings:
            raise RuntimeError(f"the {kind} baseline failed: {errors.get(kind)}")
        moved, notes = baseline_info[kind]
        timing = timings[kind]
        timing.notes.extend(notes)
        result[kind] = {
            **timing.summary(),
            "bytes_moved": moved,
            "gbps": moved / timing.median_s / 1e9,
        }
    copy = result["copy"]

    rows = []
    for name, method in methods.items():
        if name in errors:
            rows.append({"method": name, "family": method.family, "error": errors[name]})
            continue
        timing = timings[name]
        nbytes = method.bytes_per_element(elt) * numel
        gbps = nbytes / timing.median_s / 1e9
        row = {
            "method": name,
            "family": method.family,
            "impl": method.impl,
            "mask": method.mask if method.family == "sgd+mask" else None,
            "pruned": method.pruned,
            "bytes_per_element": method.bytes_per_element(elt),
            "bytes": nbytes,
            **timing.summary(),
            "gbps": gbps,
            "fraction_of_copy_bandwidth": gbps / copy["gbps"],
        }
        row["notes"] = row["notes"] + method.notes
        if name in no_host_sync:
            row["no_host_sync"] = no_host_sync[name]
        rows.append(row)

    by_name = {r["method"]: r for r in rows if "error" not in r}

    def median(name: str) -> float | None:
        row = by_name.get(name)
        return None if row is None else row["median_ms"]

    float_composites = [
        r for r in by_name.values() if r["family"] == "sgd+mask" and r["mask"] == "float"
    ]
    best_float = min(float_composites, key=lambda r: r["median_ms"], default=None)
    baselines = {
        "fused": median("SGD fused"),
        "best_composite_float": None if best_float is None else best_float["median_ms"],
        "fused+bool": median("SGD fused + bool mask"),
        "foreach": median("SGD foreach"),
        "for-loop": median("SGD for-loop"),
    }
    result["best_composite_float"] = None if best_float is None else best_float["method"]
    for row in rows:
        if row.get("family") in ("undecayed", "diagnostic") and "error" not in row:
            row["speedup"] = {
                key: None if base is None else base / row["median_ms"]
                for key, base in baselines.items()
            }
    result["methods"] = rows
    print_workload(result, device)
    return result


def print_workload(result: dict[str, Any], device: torch.device) -> None:
    copy = result["copy"]
    headers = ["method", "median ms", "min ms", "GB/s", "% copy"]
    headers += [h for _, h in SPEEDUP_BASELINES]
    add = result["add_"]
    blank = [None] * len(SPEEDUP_BASELINES)
    table = [
        ["copy_ (bytes of fused+mask)", copy["median_ms"], copy["min_ms"], copy["gbps"], 100.0]
        + blank,
        [
            "add_ (bytes of fused+mask)",
            add["median_ms"],
            add["min_ms"],
            add["gbps"],
            100.0 * add["gbps"] / copy["gbps"],
        ]
        + blank,
    ]
    for row in result["methods"]:
        if "error" in row:
            table.append([row["method"] + " (failed)"] + [None] * (len(headers) - 1))
            continue
        speedup = row.get("speedup", {})
        line = [
            row["method"] + ("  [no sync]" if row.get("no_host_sync") else ""),
            row["median_ms"],
            row["min_ms"],
            row["gbps"],
            100.0 * row["fraction_of_copy_bandwidth"],
        ]
        line.extend(speedup.get(key) for key, _ in SPEEDUP_BASELINES)
        table.append(line)
    title = (
        f"[{device_label(device)}, {torch.get_num_threads()} threads] "
        f"{result['name']}: {result['description']} ({result['numel']:,} elements, "
        f"{result['num_tensors']} tensors); best float composite: {result['best_composite_float']}"
    )
    print_table(title, headers, table)


# -- main -----------------------------------------------------------------------------------


OPTIMIZER_DEFAULTS = {"repeats": 30, "warmup": 5, "max_seconds": 3.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_arguments(parser, "steps", "optimizer", OPTIMIZER_DEFAULTS)
    parser.add_argument(
        "--workloads",
        default=None,
        help="comma-separated subset of: resnet18, single-16M, small-2000, 1B",
    )
    parser.add_argument("--verbose", action="store_true", help="print each method as it ends")
    args = parser.parse_args(argv)
    resolve_timing_arguments(args, parser, OPTIMIZER_DEFAULTS, quick_max_seconds=0.5)
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    argv, args = kernel_benchmark_args(parse_args, argv)
    workloads, workload_notes = make_workloads(args.quick, args.seed)
    if args.workloads:
        wanted = {w.strip() for w in args.workloads.split(",")}
        unknown = wanted - {w.name for w in workloads}
        if unknown:
            raise SystemExit(f"--workloads: unknown {sorted(unknown)}")
        workloads = [w for w in workloads if w.name in wanted]
    for note in workload_notes:
        print(note)

    settings = {
        "repeats": args.repeats,
        "warmup": args.warmup,
        "max_seconds": args.max_seconds,
        "rounds": args.rounds,
        "min_repeats": MIN_REPEATS,
        "quick": args.quick,
        "seed": args.seed,
        "lr": LR,
        "momentum": MOMENTUM,
        "weight_decay": WEIGHT_DECAY,
        "composite_pruned_fraction": COMPOSITE_PRUNED,
        "argv": argv,
    }

    def measure(device: torch.device) -> dict[str, Any]:
        return {
            "workloads": [
                run_workload(workload, device, args)
                for workload in workloads
                if not (workload.cuda_only and device.type != "cuda")
            ]
        }

    started = time.perf_counter()
    written = run_devices(
        args,
        argv,
        __file__,
        "optimizer",
        measure,
        lambda runs: payload(settings, runs, workload_notes),
    )
    print(f"\ntotal {time.perf_counter() - started:.1f} s; wrote " + ", ".join(map(str, written)))
    return written


def payload(settings: dict, runs: list[dict], notes: list[str]) -> dict[str, Any]:
    return {
        "benchmark": "optimizer step: UndecayedSGD vs torch.optim.SGD + mask multiplies",
        "settings": settings,
        "byte_model": BYTE_MODEL,
        "speedup_definition": "time(baseline) / time(method); > 1 means the method is faster",
        "notes": notes,
        "runs": runs,
    }


if __name__ == "__main__":
    main()
