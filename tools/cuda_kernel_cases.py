"""The kernels' edge cases, each against the pure-torch reference: one list for the tests and
for compute-sanitizer.

Every case is small enough to run under ``compute-sanitizer`` (memcheck, racecheck) in a
few minutes: ``compute-sanitizer --tool memcheck python tools/cuda_kernel_cases.py``. The
tests (tests/test_kernel_cases.py) run the same cases on every device with kernels, the CPU
included, and the large ones (``--large`` runs them alone: more than 2**31 logits, a tensor
of more than 320 chunks) on a GPU. Exits 1 after printing every mismatch, 0 when every case agrees.
``--only confusion`` or ``--only sgd`` runs one op's cases (racecheck has nothing to check
in the optimizer's kernel, which uses no shared memory).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

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

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def confusion_cases(large: bool = False) -> list[dict[str, Any]]:
    """Keyword arguments of :func:`run_confusion_case`. Every C where a kernel changes its
    strategy, either side of it, in each logit dtype, with and without a storage offset;
    spatial logits; labels; int32 targets."""
    cases = []
    for i, c in enumerate((1, 2, 10, 31, 33, 100, 110, 111, 127, 128, 129, 130, 1000)):
        for j, dtype in enumerate(LOGIT_DTYPES):
            offset = (i + j) % 2 == 1
            target_dtype = torch.int32 if j % 2 else torch.int64
            cases.append(dict(c=c, n=300, dtype=dtype, target_dtype=target_dtype, offset=offset))
        cases.append(dict(c=c, n=700, dtype=torch.bfloat16, ignore_index=c))
    cases += [
        dict(c=5, n=40, s=9, ignore_index=0),  # spatial, aggregated counting
        dict(c=40, n=30, s=5, dtype=torch.bfloat16, target_dtype=torch.int32),  # spatial
        dict(c=128, n=12, s=7, dtype=torch.float16, offset=True),  # spatial, C >= 128
        dict(c=1000, n=8, s=3, dtype=torch.float32, ignore_index=-1),  # spatial, C >= 128
        dict(c=6, n=999, dtype=None, target_dtype=torch.int32, ignore_index=6),  # labels
        dict(c=40, n=999, dtype=None),  # labels, global counting
        dict(c=33, n=600_000, dtype=torch.bfloat16, target_dtype=torch.int32),  # shared
    ]
    if large:
        # More than 2**31 logits (int32 offsets would wrap), with int32 targets.
        cases.append(
            dict(c=1000, n=2_200_000, dtype=torch.float16, target_dtype=torch.int32, hard=False)
        )
    return cases


def _hard_logits(n, c, s, dtype, offset, generator, device) -> torch.Tensor:
    """Logits ``[n, c, s]`` (starting one element past an aligned address when ``offset``)
    whose rows test torch.argmax's rules: ties (the first wins), a NaN first, in the middle
    or last (the first NaN wins), rows all -inf (index 0)."""
    flat = torch.randn(n * c * s + 1, generator=generator, device=device).to(dtype)
    x = (flat[1:] if offset else flat[:-1]).view(n, c, s)
    x[::3] = x[::3].round()
    x[1::7, c // 2] = float("nan")
    x[2::11, 0] = float("nan")
    x[3::13, c - 1] = float("nan")
    x[4::17] = float("-inf")
    return x


def run_confusion_case(
    device: torch.device,
    c: int,
    n: int,
    s: int = 1,
    dtype: torch.dtype | None = torch.float32,
    target_dtype: torch.dtype = torch.int64,
    ignore_index: int | None = None,
    offset: bool = False,
    hard: bool = True,
) -> str:
    """The counts of one batch (``dtype`` None: labels), "" when the kernel's agree with
    the reference's, else what differs."""
    generator = torch.Generator(device).manual_seed(c * 1000 + n)
    target = torch.randint(-1, c + 1, (n, s), generator=generator, device=device)
    if dtype is None:
        batch = torch.randint(-1, c + 1, (n, s), generator=generator, device=device)
        batch = batch.to(target_dtype)
    elif hard:
        batch = _hard_logits(n, c, s, dtype, offset, generator, device)
    else:
        batch = torch.randn(n, c, s, generator=generator, device=device, dtype=dtype)
    counts = torch.zeros(c * c, dtype=torch.int64, device=device)
    invalid = torch.zeros(1, dtype=torch.int64, device=device)
    confusion_update_(
        counts, invalid, batch, target.to(target_dtype), c, ignore_index, backend="kernel"
    )
    expected_counts, expected_invalid = torch.zeros_like(counts), torch.zeros_like(invalid)
    confusion_update_reference(expected_counts, expected_invalid, batch, target, c, ignore_index)
    if not torch.equal(counts, expected_counts) or not torch.equal(invalid, expected_invalid):
        wrong = int((counts != expected_counts).sum())
        return f"{wrong} of {c * c} bins differ; invalid {int(invalid)} vs {int(expected_invalid)}"
    return ""


def stacked_confusion_cases() -> list[dict[str, Any]]:
    """Keyword arguments of :func:`run_stacked_confusion_case`: stacked models, each on its
    own slice."""
    return [
        dict(b=3, c=10, n=500),
        dict(b=4, c=2, n=300, dtype=torch.bfloat16, ignore_index=0),
        dict(b=2, c=100, n=200, ignore_index=-1),
        dict(b=2, c=129, n=50, dtype=torch.float64),
        dict(b=3, c=5, n=40, s=4, dtype=torch.float16),
        dict(b=2, c=40, n=999, dtype=None, ignore_index=3),  # labels
    ]


def run_stacked_confusion_case(
    device: torch.device,
    b: int,
    c: int,
    n: int,
    s: int = 1,
    dtype: torch.dtype | None = torch.float32,
    ignore_index: int | None = None,
) -> str:
    generator = torch.Generator(device).manual_seed(b * 100 + c)
    target = torch.randint(-1, c + 1, (b, n, s), generator=generator, device=device)
    if dtype is None:
        batch = torch.randint(-1, c + 1, (b, n, s), generator=generator, device=device)
    else:
        batch = torch.randn(b, n, c, s, generator=generator, device=device).to(dtype)
        batch[:, ::5, c // 2] = float("nan")
    counts = torch.zeros(b, c * c, dtype=torch.int64, device=device)
    invalid = torch.zeros(b, dtype=torch.int64, device=device)
    confusion_update_stacked_(counts, invalid, batch, target, c, ignore_index, backend="kernel")
    expected_counts, expected_invalid = torch.zeros_like(counts), torch.zeros_like(invalid)
    confusion_update_stacked_reference(
        expected_counts, expected_invalid, batch, target, c, ignore_index
    )
    if not torch.equal(counts, expected_counts) or not torch.equal(invalid, expected_invalid):
        wrong = int((counts != expected_counts).sum())
        return f"{wrong} of {b * c * c} bins differ; invalid {invalid.tolist()}"
    return ""


# Elements per chunk and tensors per launch of the CUDA chunker
# (csrc/cuda/multi_tensor_apply.cuh), and the chunks per launch of torch's own chunker: lists
# and tensors either side of these limits.
CHUNK = 65_536
LAUNCH_TENSORS = 48
TORCH_LAUNCH_CHUNKS = 320


def sgd_cases(large: bool = False) -> list[dict[str, Any]]:
    """Keyword arguments of :func:`run_sgd_case`."""
    edges = [1, 3, 4, CHUNK - 1, CHUNK, CHUNK + 1, 7, 1025]  # about a chunk, odd sizes
    many = [(i * 37) % 300 + 1 for i in range(2 * LAUNCH_TENSORS + 5)]  # several launches
    cases = [
        dict(dtype=torch.float32, sizes=edges),
        dict(dtype=torch.float32, sizes=edges, momentum=0.0, sums=False),
        dict(dtype=torch.float32, sizes=many, nesterov=True, amp=True),
        dict(dtype=torch.float16, sizes=edges, amp=True),
        dict(dtype=torch.bfloat16, sizes=edges, masks=False),
        dict(dtype=torch.float64, sizes=edges, momentum=0.5, nesterov=True),
        # An overflow on the very first step: nothing moves, the momentum starts from zero.
        dict(dtype=torch.float32, sizes=edges, amp=True, overflow_first=True),
        dict(dtype=torch.float16, sizes=many, amp=True, overflow_first=True),
        # lr and weight decay read on the device.
        dict(dtype=torch.float32, sizes=edges, tensor_hyper=True, amp=True),
    ]
    if large:
        # One tensor of more chunks than a launch of torch's chunker holds, beside small ones.
        cases.append(dict(dtype=torch.float32, sizes=[5, TORCH_LAUNCH_CHUNKS * CHUNK + 5, 3]))
    return cases


def run_sgd_case(
    device: torch.device,
    dtype: torch.dtype,
    sizes: list[int],
    momentum: float = 0.9,
    masks: bool = True,
    sums: bool = True,
    nesterov: bool = False,
    amp: bool = False,
    overflow_first: bool = False,
    tensor_hyper: bool = False,
) -> str:
    """Three steps of the op and of the reference on the same tensors: keep masks on every
    other parameter and decay masks on every third, one parameter a misaligned view (a
    storage offset); "" when they agree, else what differs."""
    generator = torch.Generator(device).manual_seed(len(sizes) + int(momentum * 10))

    def rand(n):
        return torch.randn(n, generator=generator, device=device).to(dtype)

    params = [rand(n) for n in sizes]
    misaligned = 2 % len(sizes)
    params[misaligned] = rand(sizes[misaligned] + 1)[1:]
    keeps = [
        (torch.rand(n, generator=generator, device=device) < 0.6) if masks and i % 2 == 0 else None
        for i, n in enumerate(sizes)
    ]
    decays = [
        (torch.rand(n, generator=generator, device=device) < 0.5) if masks and i % 3 == 0 else None
        for i, n in enumerate(sizes)
    ]
    for p, k in zip(params, keeps, strict=True):
        if k is not None:
            p.masked_fill_(~k, 0)
    sum_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    lr, weight_decay = 0.05, 1e-2
    if tensor_hyper:
        lr = torch.tensor(lr, device=device)
        weight_decay = torch.tensor([weight_decay], device=device, dtype=torch.float64)
    hyper = dict(lr=lr, momentum=momentum, dampening=0.0, weight_decay=weight_decay)
    hyper.update(nesterov=nesterov, maximize=False)
    scale = torch.tensor(8.0, device=device) if amp else None

    kernel_params = [p.clone() for p in params]
    # Zeros: a first step skipped for an overflow leaves them as they are.
    kernel_bufs = [torch.zeros_like(p) for p in params] if momentum else []
    kernel_sums = [torch.zeros(n, dtype=sum_dtype, device=device) for n in sizes] if sums else []
    ref_params = [p.clone() for p in params]
    ref_bufs = [None] * len(params)
    ref_sums = [torch.zeros(n, dtype=sum_dtype, device=device) for n in sizes] if sums else None
    for step in range(3):
        grads = [rand(n) for n in sizes]
        found_inf = None
        if amp:
            found_inf = torch.tensor(float(overflow_first and step == 0), device=device)
        undecayed_sgd_(
            kernel_params,
            grads,
            kernel_bufs,
            keeps,
            decays,
            kernel_sums,
            is_first_step=step == 0 and not overflow_first,
            grad_scale=scale,
            found_inf=found_inf,
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
            found_inf=found_inf,
            **hyper,
        )
        if overflow_first and step == 0:
            for got, want in zip(kernel_params, params, strict=True):
                if not torch.equal(got, want):
                    return "a weight moved on a step with an overflow"
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


def all_cases(only: str | None = None, large: bool = False) -> list[tuple[str, Any, dict]]:
    """(op name, runner, keyword arguments) of every case, or of one op's."""
    runs = []
    if only in (None, "confusion"):
        runs += [("confusion", run_confusion_case, case) for case in confusion_cases(large)]
        runs += [
            ("confusion_stacked", run_stacked_confusion_case, case)
            for case in stacked_confusion_cases()
        ]
    if only in (None, "sgd"):
        runs += [("undecayed_sgd", run_sgd_case, case) for case in sgd_cases(large)]
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("confusion", "sgd"), default=None)
    parser.add_argument("--large", action="store_true", help="the large cases (only)")
    parser.add_argument("--device", default="cuda", help="default: cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    if not has_ops(device):
        print(f"recallprune's kernels for {device} are missing: {load_error()}")
        return 1
    runs = all_cases(args.only)
    if args.large:
        runs = [run for run in all_cases(args.only, large=True) if run not in runs]
    failures = 0
    for name, run, case in runs:
        problem = run(device, **case)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if problem:
            failures += 1
            print(f"FAIL {name}({case}): {problem}", flush=True)
    print(f"{len(runs) - failures} of {len(runs)} kernel cases agree with the reference")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
