"""The kernels' edge cases (tools/cuda_kernel_cases.py, the list compute-sanitizer runs on a
GPU) on every device with kernels: confusion counts at every C where a kernel changes its
strategy, in every logit dtype, with storage offsets, NaN first, in the middle and last,
rows all -inf, ties, spatial logits and int32 targets; the optimizer's op at sizes about a
chunk, lists of several launches, misaligned views, masks on some tensors only, tensor
hyper-parameters and an overflow on the first step. The large cases run on a GPU only."""

import importlib.util
from pathlib import Path

import pytest
import torch

from .conftest import requires_cuda, requires_ops

_PATH = Path(__file__).resolve().parents[1] / "tools" / "cuda_kernel_cases.py"
_spec = importlib.util.spec_from_file_location("cuda_kernel_cases", _PATH)
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)


def _case_id(name, kwargs):
    parts = [
        f"{k}={getattr(v, 'name', None) or str(v).replace('torch.', '')}"
        for k, v in kwargs.items()
        if k != "sizes"
    ]
    if "sizes" in kwargs:
        parts.append(f"tensors={len(kwargs['sizes'])}")
    return f"{name}-" + "-".join(parts)


SMALL = cases.all_cases()
LARGE = [case for case in cases.all_cases(large=True) if case not in SMALL]


@requires_ops
@pytest.mark.parametrize(
    ("name", "run", "kwargs"), SMALL, ids=[_case_id(n, k) for n, _, k in SMALL]
)
def test_kernel_case(kernel_device, name, run, kwargs):
    assert run(torch.device(kernel_device), **kwargs) == ""


@requires_cuda
@requires_ops
@pytest.mark.parametrize(
    ("name", "run", "kwargs"), LARGE, ids=[_case_id(n, k) for n, _, k in LARGE]
)
def test_large_cuda_kernel_case(name, run, kwargs):
    assert run(torch.device("cuda"), **kwargs) == ""


def test_the_large_cases_pass_the_limits_they_are_for():
    (logits,) = [k for n, _, k in LARGE if n == "confusion"]
    assert logits["c"] * logits["n"] > 2**31 and logits["target_dtype"] == torch.int32
    (sgd,) = [k for n, _, k in LARGE if n == "undecayed_sgd"]
    assert max(sgd["sizes"]) > cases.TORCH_LAUNCH_CHUNKS * cases.CHUNK
    assert any(len(k["sizes"]) > cases.LAUNCH_TENSORS for n, _, k in SMALL if n == "undecayed_sgd")
