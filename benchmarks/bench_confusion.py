"""Benchmark the confusion-count kernel against argmax + bincount, scatter_add_ and torchmetrics.

What is measured, per device (CPU, and CUDA when present), per logits dtype (fp32, bf16,
fp16, fp64), per number of classes C (2, 10, 100, 1000) and per batch size N (256, 4,096,
65,536, 2**20), on the same random logits ``[N, C]`` and targets ``[N]`` (int64, uniform
over the classes):

* ``torch.ops.recallprune.confusion_update_(counts, invalid, logits[N, C, 1], target[N, 1],
  C, None)``, the raw op ("op"), and ``recallprune.ConfusionCounter(C).update(logits,
  target)``, the Python path around it ("update").
* Baselines accumulating into int64 counts ``[C*C]``: ``counts += torch.bincount(target * C
  + logits.argmax(1), minlength=C*C)`` and ``counts.scatter_add_(0, target * C +
  logits.argmax(1), ones)`` (``ones`` preallocated); torchmetrics'
  ``MulticlassConfusionMatrix(num_classes=C, validate_args=True / False).update(logits,
  target)`` when torchmetrics is installed; ``logits.argmax(1)`` alone.
* ``dst.copy_(logits)``: the bandwidth a memory-bound pass over the logits could reach.

Cases whose logits exceed ``MAX_LOGIT_BYTES`` (N = 2**20 with C = 1000) are skipped. Every
method is timed as one call, round-robin over a few rounds (so that a slow spell of a shared
machine hits all methods alike), with wall-clock time on the CPU and CUDA events on the
GPU. Reported: the median (and minimum) per call, the effective bandwidth (see
``BYTE_MODEL``) and its share of the copy's, and for the op and the update path the ratios
``time(baseline) / time(op)`` (> 1: the op is faster). Before timing, every method's counts
of one batch are checked against argmax + bincount; on CUDA the script also records whether
one call runs without a host synchronisation (``set_sync_debug_mode("error")``).

Run ``python benchmarks/bench_confusion.py`` (``--help`` for options; ``--quick`` for a
smoke run of a few seconds; ``--capability all`` to measure the CPU under each instruction
set torch can use on it). Results go to ``benchmarks/results/confusion-<device>.json``, for
the CPU ``confusion-<cpu model>-<capability>.json``.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_timing_arguments,
    check_no_host_sync,
    device_label,
    kernel_benchmark_args,
    print_table,
    resolve_timing_arguments,
    run_devices,
    synchronize,
    time_cases,
)

from recallprune import ConfusionCounter

CLASSES = (2, 10, 100, 1000)
SIZES = (256, 4096, 65536, 2**20)
QUICK_CLASSES = (10, 100)
QUICK_SIZES = (256, 4096)
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
MAX_LOGIT_BYTES = int(1.1e9)  # larger logits are skipped (N = 2**20, C = 1000: 4 GB / 2 GB)
MIN_REPEATS = 5  # slow methods run fewer repeats (see --max-seconds), never fewer than this

# (key in the JSON, label); the kernel's two entry points first.
KERNELS = (
    ("op", "torch.ops.recallprune.confusion_update_"),
    ("update", "ConfusionCounter.update"),
)
BASELINES = (
    ("bincount", "counts += bincount(target * C + argmax)"),
    ("scatter_add", "counts.scatter_add_(0, target * C + argmax, ones)"),
    ("torchmetrics", "MulticlassConfusionMatrix(validate_args=True).update"),
    ("torchmetrics_novalidate", "MulticlassConfusionMatrix(validate_args=False).update"),
    ("argmax", "logits.argmax(1) alone"),
)
COPY = ("copy", "dst.copy_(logits)")
TORCHMETRICS_KEYS = ("torchmetrics", "torchmetrics_novalidate")
COUNTING_KEYS = ("op", "update", "bincount", "scatter_add", *TORCHMETRICS_KEYS)

BYTE_MODEL = {
    "counting methods": (
        "L + T: read the logits (N * C * element size) and the targets (N * 8, int64); the "
        "C*C counts are left out"
    ),
    "argmax": "L: read the logits (the argmax does not read the targets)",
    "copy": "2L: dst.copy_(logits) reads the logits and writes as many bytes (read + write)",
    "note": (
        "minimal traffic of each method's algorithm; the baselines also write and re-read an "
        "int64 index per row, which they are not credited with. A pass that only reads can "
        "exceed 100% of the copy's bandwidth (the copy's stores also cost a write-allocate "
        "read on CPUs, which the count leaves out)"
    ),
}


def torchmetrics_status() -> tuple[Any, str]:
    """``(MulticlassConfusionMatrix or None, version or 'not installed: ...')``."""
    try:
        import torchmetrics
        from torchmetrics.classification import MulticlassConfusionMatrix
    except ImportError as error:
        return None, f"not installed ({error})"
    return MulticlassConfusionMatrix, torchmetrics.__version__


# -- one case -------------------------------------------------------------------------------


def make_batch(
    n: int, c: int, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device).manual_seed(seed)
    logits = torch.randn(n, c, generator=gen, device=device).to(dtype)
    target = torch.randint(0, c, (n,), generator=gen, device=device)
    return logits, target


def make_builders(
    logits: torch.Tensor, target: torch.Tensor, tm_class: Any
) -> dict[str, Callable[[], Callable[[], object]]]:
    """Per method, a builder that sets up fresh state and returns the function to time."""
    n, c = logits.shape
    device = logits.device
    logits3, target2 = logits.view(n, c, 1), target.view(n, 1)

    def zeros() -> torch.Tensor:
        return torch.zeros(c * c, dtype=torch.int64, device=device)

    def op() -> Callable[[], object]:
        counts, invalid = zeros(), torch.zeros(1, dtype=torch.int64, device=device)
        return lambda: torch.ops.recallprune.confusion_update_(
            counts, invalid, logits3, target2, c, None
        )

    def update() -> Callable[[], object]:
        counter = ConfusionCounter(c, device=device)
        return lambda: counter.update(logits, target)

    def bincount() -> Callable[[], object]:
        counts = zeros()

        def fn() -> None:
            counts.add_(torch.bincount(target * c + logits.argmax(1), minlength=c * c))

        return fn

    def scatter_add() -> Callable[[], object]:
        counts, ones = zeros(), torch.ones(n, dtype=torch.int64, device=device)
        return lambda: counts.scatter_add_(0, target * c + logits.argmax(1), ones)

    def metric(validate: bool) -> Callable[[], Callable[[], object]]:
        def build() -> Callable[[], object]:
            m = tm_class(num_classes=c, validate_args=validate).to(device)
            return lambda: m.update(logits, target)

        return build

    def argmax() -> Callable[[], object]:
        return lambda: logits.argmax(1)

    def copy() -> Callable[[], object]:
        dst = torch.empty_like(logits)
        return lambda: dst.copy_(logits)

    builders = {"op": op, "update": update, "bincount": bincount, "scatter_add": scatter_add}
    if tm_class is not None:
        builders["torchmetrics"] = metric(True)
        builders["torchmetrics_novalidate"] = metric(False)
    builders["argmax"] = argmax
    builders["copy"] = copy
    return builders


def check_counts(
    logits: torch.Tensor, target: torch.Tensor, tm_class: Any
) -> tuple[dict[str, bool], dict[str, str]]:
    """One batch through every counting method, compared with argmax + bincount."""
    n, c = logits.shape
    device = logits.device
    expected = torch.bincount(target * c + logits.argmax(1), minlength=c * c)
    matches: dict[str, bool] = {}
    errors: dict[str, str] = {}

    def record(key: str, get_counts: Callable[[], torch.Tensor]) -> None:
        try:
            counts = get_counts()
        except (RuntimeError, TypeError, ValueError) as error:
            errors[key] = f"{type(error).__name__}: {error}"
            return
        matches[key] = bool(torch.equal(counts.reshape(-1).to(torch.int64).cpu(), expected.cpu()))

    def op() -> torch.Tensor:
        counts = torch.zeros(c * c, dtype=torch.int64, device=device)
        invalid = torch.zeros(1, dtype=torch.int64, device=device)
        torch.ops.recallprune.confusion_update_(
            counts, invalid, logits.view(n, c, 1), target.view(n, 1), c, None
        )
        if int(invalid.item()) != 0:
            raise ValueError(f"{int(invalid.item())} entries flagged invalid")
        return counts

    def update() -> torch.Tensor:
        counter = ConfusionCounter(c, device=device)
        counter.update(logits, target)
        return counter.compute()

    def scatter_add() -> torch.Tensor:
        counts = torch.zeros(c * c, dtype=torch.int64, device=device)
        ones = torch.ones(n, dtype=torch.int64, device=device)
        return counts.scatter_add_(0, target * c + logits.argmax(1), ones)

    def metric(validate: bool) -> Callable[[], torch.Tensor]:
        def get() -> torch.Tensor:
            m = tm_class(num_classes=c, validate_args=validate).to(device)
            m.update(logits, target)
            return m.compute()

        return get

    record("op", op)
    record("update", update)
    matches["bincount"] = True  # the reference
    record("scatter_add", scatter_add)
    if tm_class is not None:
        record("torchmetrics", metric(True))
        record("torchmetrics_novalidate", metric(False))
    return matches, errors


def run_case(
    c: int,
    n: int,
    dtype_name: str,
    device: torch.device,
    args: argparse.Namespace,
    tm_class: Any,
) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    elt = torch.empty((), dtype=dtype).element_size()
    logit_bytes, target_bytes = n * c * elt, n * 8
    result: dict[str, Any] = {
        "num_classes": c,
        "batch": n,
        "dtype": dtype_name,
        "logits_bytes": logit_bytes,
        "target_bytes": target_bytes,
    }
    if logit_bytes > MAX_LOGIT_BYTES:
        result["skipped"] = (
            f"logits of {logit_bytes / 1e9:.1f} GB exceed the {MAX_LOGIT_BYTES / 1e9:.1f} GB cap"
        )
        return result
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if free < 4 * logit_bytes:
            result["skipped"] = f"needs ~{4 * logit_bytes / 2**30:.1f} GiB free on the GPU"
            return result

    logits, target = make_batch(n, c, dtype, device, args.seed)
    matches, errors = check_counts(logits, target, tm_class)
    result["counts_match_bincount"] = matches
    builders = make_builders(logits, target, tm_class)
    for key in errors:
        builders.pop(key, None)

    no_host_sync: dict[str, bool] = {}
    if device.type == "cuda":
        for key, build in builders.items():
            flag = check_no_host_sync(build(), device)
            if flag is not None:
                no_host_sync[key] = flag

    timings, build_errors = time_cases(
        builders,
        device,
        args,
        min_repeats=MIN_REPEATS,
    )
    errors.update(build_errors)
    if "copy" not in timings:
        raise RuntimeError(f"the copy baseline failed: {errors.get('copy')}")

    def moved(key: str) -> int:
        if key == "copy":
            return 2 * logit_bytes
        if key == "argmax":
            return logit_bytes
        return logit_bytes + target_bytes

    copy_gbps = moved("copy") / timings["copy"].median_s / 1e9
    methods: dict[str, dict[str, Any]] = {}
    for key, label in (*KERNELS, *BASELINES, COPY):
        if key in errors:
            methods[key] = {"label": label, "error": errors[key]}
            continue
        if key not in timings:
            continue  # torchmetrics not installed
        timing = timings[key]
        gbps = moved(key) / timing.median_s / 1e9
        row = {
            "label": label,
            **timing.summary(),
            "bytes": moved(key),
            "gbps": gbps,
            "fraction_of_copy_bandwidth": gbps / copy_gbps,
        }
        if key in no_host_sync:
            row["no_host_sync"] = no_host_sync[key]
        methods[key] = row
    for key, _ in KERNELS:
        row = methods.get(key)
        if row is None or "error" in row:
            continue
        row["speedup"] = {
            base: None
            if base not in methods or "error" in methods[base]
            else methods[base]["median_ms"] / row["median_ms"]
            for base, _ in BASELINES
        }
    result["methods"] = methods
    del logits, target, builders, timings
    gc.collect()
    return result


# -- tables ---------------------------------------------------------------------------------

TIME_COLUMNS = (  # key, header (median ms)
    ("op", "op"),
    ("update", "update"),
    ("bincount", "bincnt"),
    ("scatter_add", "scatter"),
    ("torchmetrics", "tm"),
    ("torchmetrics_novalidate", "tm-nv"),
    ("argmax", "argmax"),
    ("copy", "copy_"),
)
RATIO_COLUMNS = (  # key, header: time(baseline) / time(op)
    ("bincount", "x bincnt"),
    ("scatter_add", "x scatter"),
    ("torchmetrics", "x tm"),
    ("torchmetrics_novalidate", "x tm-nv"),
    ("argmax", "x argmax"),
)


def print_cases(cases: list[dict[str, Any]], device: torch.device, dtype_name: str) -> None:
    headers = ["C", "N", "MB"] + [h for _, h in TIME_COLUMNS]
    headers += ["op GB/s", "% copy"] + [h for _, h in RATIO_COLUMNS]
    headers += ["upd x bincnt", "check"]
    rows, skipped = [], []
    for case in cases:
        if case["dtype"] != dtype_name:
            continue
        if "skipped" in case:
            skipped.append(f"  C={case['num_classes']}, N={case['batch']}: {case['skipped']}")
            continue
        methods = case["methods"]

        def get(key: str, field: str, methods: dict = methods) -> float | None:
            row = methods.get(key)
            return None if row is None or "error" in row else row.get(field)

        op_speedup = get("op", "speedup") or {}
        update_speedup = get("update", "speedup") or {}
        bad = [k for k, ok in case["counts_match_bincount"].items() if not ok]
        failed = [k for k, row in methods.items() if "error" in row]
        synced = [k for k in ("op", "update") if get(k, "no_host_sync") is False]
        check = "ok"
        if bad or failed or synced:
            check = " ".join(
                [f"MISMATCH:{','.join(bad)}"] * bool(bad)
                + [f"FAILED:{','.join(failed)}"] * bool(failed)
                + [f"SYNC:{','.join(synced)}"] * bool(synced)
            )
        elif device.type == "cuda":
            check = "ok, no sync"
        rows.append(
            [case["num_classes"], case["batch"], case["logits_bytes"] / 1e6]
            + [get(key, "median_ms") for key, _ in TIME_COLUMNS]
            + [get("op", "gbps"), _percent(get("op", "fraction_of_copy_bandwidth"))]
            + [op_speedup.get(key) for key, _ in RATIO_COLUMNS]
            + [update_speedup.get("bincount"), check]
        )
    title = (
        f"[{device_label(device)}, {torch.get_num_threads()} threads] {dtype_name} "
        "logits: median ms per call; GB/s = (logits + target bytes) / median; "
        "x B = time(B) / time(op), > 1: the op is faster"
    )
    print_table(title, headers, rows)
    if skipped:
        print("skipped:\n" + "\n".join(skipped), flush=True)


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


# -- main -----------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


CONFUSION_DEFAULTS = {"repeats": 50, "warmup": 6, "max_seconds": 0.75}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_arguments(parser, "calls", "confusion", CONFUSION_DEFAULTS)
    parser.add_argument(
        "--classes", type=_int_list, default=None, help="comma-separated C (default 2,10,100,1000)"
    )
    parser.add_argument(
        "--sizes",
        type=_int_list,
        default=None,
        help="comma-separated N (default 256,4096,65536,1048576)",
    )
    parser.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated subset of fp32, bf16, fp16, fp64 (default all)",
    )
    args = parser.parse_args(argv)
    resolve_timing_arguments(args, parser, CONFUSION_DEFAULTS, quick_max_seconds=0.2)
    if args.classes is None:
        args.classes = list(QUICK_CLASSES if args.quick else CLASSES)
    if args.sizes is None:
        args.sizes = list(QUICK_SIZES if args.quick else SIZES)
    args.dtypes = list(DTYPES) if args.dtypes is None else args.dtypes.split(",")
    unknown = set(args.dtypes) - set(DTYPES)
    if unknown:
        parser.error(f"--dtypes: unknown {sorted(unknown)}")
    if min(args.classes + args.sizes) < 1:
        parser.error("--classes and --sizes must be positive")
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    argv, args = kernel_benchmark_args(parse_args, argv)
    tm_class, tm_version = torchmetrics_status()
    notes = [f"torchmetrics: {tm_version}"]
    if tm_class is None:
        notes.append("the torchmetrics baselines were not run")
    print("\n".join(notes))

    settings = {
        "repeats": args.repeats,
        "warmup": args.warmup,
        "max_seconds": args.max_seconds,
        "rounds": args.rounds,
        "min_repeats": MIN_REPEATS,
        "quick": args.quick,
        "seed": args.seed,
        "classes": args.classes,
        "sizes": args.sizes,
        "dtypes": args.dtypes,
        "max_logit_bytes": MAX_LOGIT_BYTES,
        "torchmetrics": tm_version,
        "argv": argv,
    }

    def measure(device: torch.device) -> dict[str, Any]:
        cases: list[dict[str, Any]] = []
        for dtype_name in args.dtypes:
            for c in args.classes:
                for n in args.sizes:
                    cases.append(run_case(c, n, dtype_name, device, args, tm_class))
                    synchronize(device)
            print_cases(cases, device, dtype_name)
        return {"cases": cases}

    started = time.perf_counter()
    written = run_devices(
        args, argv, __file__, "confusion", measure, lambda runs: payload(settings, runs, notes)
    )
    print(f"\ntotal {time.perf_counter() - started:.1f} s; wrote " + ", ".join(map(str, written)))
    return written


def payload(settings: dict, runs: list[dict], notes: list[str]) -> dict[str, Any]:
    return {
        "benchmark": (
            "confusion counts: recallprune confusion_update_ / ConfusionCounter.update vs "
            "argmax + bincount, scatter_add_, torchmetrics MulticlassConfusionMatrix"
        ),
        "settings": settings,
        "byte_model": BYTE_MODEL,
        "speedup_definition": "time(baseline) / time(method); > 1 means the method is faster",
        "notes": notes,
        "runs": runs,
    }


if __name__ == "__main__":
    main()
