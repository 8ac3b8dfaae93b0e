"""Shared fixtures: devices and optimizer backends to parametrise over."""

import pytest
import torch

import recallprune

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
requires_ops = pytest.mark.skipif(
    not recallprune.has_ops(), reason=f"compiled kernels missing: {recallprune.load_error()}"
)

# (device, backend) pairs: the reference everywhere, the kernels where they can run.
KERNEL_DEVICES = [
    pytest.param("cpu", marks=requires_ops, id="cpu"),
    pytest.param("cuda", marks=[requires_ops, requires_cuda], id="cuda"),
]


@pytest.fixture(params=KERNEL_DEVICES)
def kernel_device(request):
    """A device whose compiled kernel is available (CUDA cases skip without a GPU)."""
    return request.param
