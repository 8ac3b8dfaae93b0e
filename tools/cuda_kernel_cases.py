"""Every path of the CUDA kernels once, at small sizes, against the pure-torch reference.

Small enough to run under ``compute-sanitizer`` (memcheck, racecheck) in a minute:
``compute-sanitizer --tool memcheck python tools/cuda_kernel_cases.py``. Exits 1 on the
first mismatch (after printing it), 0 when every case agrees. ``--only confusion`` or
``--only sgd`` runs one op's cases (racecheck has nothing to check in the optimizer's
kernel, which uses no shared memory).
"""

from __future__ import annotations

import argparse
import sys

import torch

from recallprune.ops import (
    confusion_update_,
    confusion_update_reference,
    confusion_update_stacked_,
    confusion_update_stacked_reference,
    has_ops,
    load_error,
    undecayed_sgd_,
    undecayed_sgd_reference,
)

DEVICE = torch.device("cuda")


def confusion_cases():
    """(C, N, S, dtype, target dtype, ignore_index, misaligned, labels given)."""
    cases = []
    for c in (2, 10, 31, 33, 100, 130, 1000):
        for dtype in (torch.float32, torch.bfloat16):
            cases.append((c, 700, 1, dtype, torch.int64, c, False, False))
        cases.append((c, 300, 1, torch.float32, torch.int32, None, True, False))
    cases += [
        (7, 50, 1, torch.float64, torch.int64, None, False, False),
        (7, 50, 1, torch.float16, torch.int32, -1, False, False),
        (5, 40, 9, torch.float32, torch.int64, 0, False, False),  # S > 1, aggregated
        (40, 30, 5, torch.bfloat16, torch.int32, None, False, False),  # S > 1, global
        (6, 999, 1, None, torch.int32, 6, False, True),  # labels, aggregated
        (40, 999, 1, None, torch.int64, None, False, True),  # labels, global
        (33, 600_000, 1, torch.bfloat16, torch.int32, None, False, False),  # shared, groups
    ]
    return cases


def run_confusion_case(c, n, s, dtype, target_dtype, ignore_index, misaligned, labels) -> str:
    generator = torch.Generator(DEVICE).manual_seed(c * 1000 + n)
    target = torch.randint(-1, c + 1, (n, s), generator=generator, device=DEVICE)
    if labels:
        batch = torch.randint(-1, c + 1, (n, s), generator=generator, device=DEVICE)
        batch = batch.to(target_dtype)
    else:
        flat = torch.randn(n * c * s + 1, generator=generator, device=DEVICE).to(dtype)
        batch = (flat[1:] if misaligned else flat[:-1]).view(n, c, s)
        batch[::3] = batch[::3].round()  # ties
        batch[::7, c // 2] = float("nan")
    counts = torch.zeros(c * c, dtype=torch.int64, device=DEVICE)
    invalid = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    confusion_update_(
        counts, invalid, batch, target.to(target_dtype), c, ignore_index, backend="kernel"
    )
    expected_counts, expected_invalid = torch.zeros_like(counts), torch.zeros_like(invalid)
    confusion_update_reference(expected_counts, expected_invalid, batch, target, c, ignore_index)
    if not torch.equal(counts, expected_counts) or not torch.equal(invalid, expected_invalid):
        wrong = int((counts != expected_counts).sum())
        return f"{wrong} of {c * c} bins differ; invalid {int(invalid)} vs {int(expected_invalid)}"
    return ""


def stacked_confusion_cases():
    """(B, C, N, S, dtype, ignore_index): stacked models, each on its own slice."""
    return [
        (3, 10, 500, 1, torch.float32, None),
        (4, 2, 300, 1, torch.bfloat16, 0),
        (2, 100, 200, 1, torch.float32, -1),
        (3, 5, 40, 4, torch.float16, None),
        (2, 40, 999, 1, None, 3),  # labels
    ]


def run_stacked_confusion_case(b, c, n, s, dtype, ignore_index) -> str:
    generator = torch.Generator(DEVICE).manual_seed(b * 100 + c)
    target = torch.randint(-1, c + 1, (b, n, s), generator=generator, device=DEVICE)
    if dtype is None:
        batch = torch.randint(-1, c + 1, (b, n, s), generator=generator, device=DEVICE)
    else:
        batch = torch.randn(b, n, c, s, generator=generator, device=DEVICE).to(dtype)
        batch[:, ::5, c // 2] = float("nan")
    counts = torch.zeros(b, c * c, dtype=torch.int64, device=DEVICE)
    invalid = torch.zeros(b, dtype=torch.int64, device=DEVICE)
    confusion_update_stacked_(counts, invalid, batch, target, c, ignore_index, backend="kernel")
    expected_counts, expected_invalid = torch.zeros_like(counts), torch.zeros_like(invalid)
    confusion_update_stacked_reference(
        expected_counts, expected_invalid, batch, target, c, ignore_index
    )
    if not torch.equal(counts, expected_counts) or not torch.equal(invalid, expected_invalid):
        wrong = int((counts != expected_counts).sum())
        return f"{wrong} of {b * c * c} bins differ; invalid {invalid.tolist()}"
    return ""


def sgd_cases():
    """(dtype, sizes, momentum, masks, grad sums, nesterov, AMP scale)."""
    small = [1, 7, 1025, 3, 65_537]
    many = [(i * 37) % 300 + 1 for i in range(60)]  # more tensors than one launch holds
    return [
        (torch.float32, small, 0.9, True, True, False, False),
        (torch.float32, small, 0.0, True, False, False, False),
        (torch.float32, many, 0.9, True, True, True, True),
        (torch.float16, small, 0.9, True, True, False, True),
        (torch.bfloat16, small, 0.9, False, True, False, False),
        (torch.float64, small, 0.5, True, True, True, False),
    ]


def run_sgd_case(dtype, sizes, momentum, masks, sums, nesterov, amp) -> str:
    generator = torch.Generator(DEVICE).manual_seed(len(sizes) + int(momentum * 10))

    def rand(n):
        return torch.randn(n, generator=generator, device=DEVICE).to(dtype)

    params = [rand(n) for n in sizes]
    # Every other parameter with a keep mask; one misaligned parameter (offset storage).
    params[2] = torch.randn(sizes[2] + 1, generator=generator, device=DEVICE).to(dtype)[1:]
    keeps = [
        (torch.rand(n, generator=generator, device=DEVICE) < 0.6) if masks and i % 2 == 0 else None
        for i, n in enumerate(sizes)
    ]
    decays = [
        (torch.rand(n, generator=generator, device=DEVICE) < 0.5) if masks and i % 3 == 0 else None
        for i, n in enumerate(sizes)
    ]
    for p, k in zip(params, keeps, strict=True):
        if k is not None:
            p.masked_fill_(~k, 0)
    sum_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    hyper = dict(lr=0.05, momentum=momentum, dampening=0.0, weight_decay=1e-2)
    hyper.update(nesterov=nesterov, maximize=False)
    scale = torch.tensor([8.0], device=DEVICE) if amp else None
    no_inf = torch.zeros(1, device=DEVICE) if amp else None

    kernel_params = [p.clone() for p in params]
    kernel_bufs = [torch.empty_like(p) for p in params] if momentum else []
    kernel_sums = [torch.zeros(n, dtype=sum_dtype, device=DEVICE) for n in sizes] if sums else []
    ref_params = [p.clone() for p in params]
    ref_bufs = [None] * len(params)
    ref_sums = [torch.zeros(n, dtype=sum_dtype, device=DEVICE) for n in sizes] if sums else None
    for step in range(3):
        grads = [rand(n) for n in sizes]
        undecayed_sgd_(
            kernel_params,
            grads,
            kernel_bufs,
            keeps,
            decays,
            kernel_sums,
            is_first_step=step == 0,
            grad_scale=scale,
            found_inf=no_inf,
            **hyper,
        )
        undecayed_sgd_reference(
            ref_params,
            grads,
            ref_bufs,
            keeps,
            decays,
            ref_sums,
            grad_scale=scale,
            found_inf=no_inf,
            **hyper,
        )
    tol = {
        torch.float32: 1e-5,
        torch.float64: 1e-12,
        torch.float16: 4e-3,
        torch.bfloat16: 3e-2,
    }[dtype]
    pairs = list(zip(kernel_params, ref_params, strict=True))
    if momentum:
        pairs += list(zip(kernel_bufs, ref_bufs, strict=True))
    if sums:
        pairs += list(zip(kernel_sums, ref_sums, strict=True))
    for i, (got, want) in enumerate(pairs):
        if not torch.allclose(got.double(), want.double(), rtol=tol, atol=tol):
            return f"tensor {i}: max |diff| {float((got.double() - want.double()).abs().max())}"
    for p, k in zip(kernel_params, keeps, strict=True):
        if k is not None and bool((p[~k] != 0).any()):
            return "a pruned weight is not zero"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("confusion", "sgd"), default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    if not has_ops("cuda"):
        print(f"recallprune's CUDA kernels are missing: {load_error()}")
        return 1
    runs = []
    if args.only in (None, "confusion"):
        runs += [("confusion", run_confusion_case, case) for case in confusion_cases()]
        runs += [
            ("confusion_stacked", run_stacked_confusion_case, case)
            for case in stacked_confusion_cases()
        ]
    if args.only in (None, "sgd"):
        runs += [("undecayed_sgd", run_sgd_case, case) for case in sgd_cases()]
    failures = 0
    for name, run, case in runs:
        problem = run(*case)
        torch.cuda.synchronize()
        if problem:
            failures += 1
            print(f"FAIL {name}{case}: {problem}", flush=True)
    print(f"{len(runs) - failures} of {len(runs)} CUDA kernel cases agree with the reference")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
