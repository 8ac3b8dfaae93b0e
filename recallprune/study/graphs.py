"""A stack's training step replayed from a CUDA graph.

A stacked step of the study's small models is a few dozen small kernels; on a GPU, launching
them from Python costs several times what they compute. Captured once as a CUDA graph, the
step (gather of the batch, forward, loss, backward, optimizer step) is one launch: each later
step of the same batch size copies its sample indices into the graph's index tensor and
replays it. The kernels, and so the results, are those of the eager step.

What the graph bakes in stays fixed while it is replayed: the stack's parameters, their
gradients (the graph's own tensors from the capture on), the optimizer's momentum buffers,
masks and gradient sums, and its hyper-parameters other than ``lr``. The learning rate of
each parameter group is read on the device from a tensor that follows the group's float
``lr`` before each replay, so an lr schedule keeps working. Everything else a caller changes
between steps (a mask set, a state loaded) needs a new :class:`CapturedStep`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Eager steps before the capture, on a side stream as torch's CUDA-graph notes advise: they
# create the optimizer's momentum buffers and let libraries (cuBLAS) make their workspaces.
WARMUP_STEPS = 3


class CapturedStep:
    """``step(batch) -> Tensor`` for ``batch`` index tensors of one shape on a CUDA device,
    run eagerly for the first :data:`WARMUP_STEPS` calls, then captured and replayed.

    ``step`` must be a training step that a CUDA graph can hold: no host synchronisation,
    no CPU tensors read, and its result a tensor computed on the device. The tensor
    returned by a replay is the graph's own output, overwritten by the next replay: use it
    (or copy it) before calling again.
    """

    def __init__(
        self,
        step: Callable[[Tensor], Tensor],
        optimizer: torch.optim.Optimizer,
        shape: tuple[int, ...],
        device: torch.device,
    ) -> None:
        if device.type != "cuda":
            raise ValueError(f"CapturedStep: CUDA graphs need a CUDA device, got {device}")
        if any(isinstance(group["lr"], Tensor) for group in optimizer.param_groups):
            raise ValueError(
                "CapturedStep: every parameter group's lr must be a float (the graph reads "
                "its own device copy of it); got a tensor"
            )
        self.step = step
        self.optimizer = optimizer
        self.shape = tuple(shape)
        self.device = device
        self.warmup = WARMUP_STEPS
        self.graph: torch.cuda.CUDAGraph | None = None
        self.index: Tensor | None = None
        self.output: Tensor | None = None
        self.lrs: list[Tensor] = []
        self.lr_values: list[float] = []

    def __call__(self, batch: Tensor) -> Tensor:
        if tuple(batch.shape) != self.shape:
            raise ValueError(
                f"CapturedStep: batch of shape {list(batch.shape)}, expected {list(self.shape)}"
            )
        if self.graph is None:
            if self.warmup > 0:
                self.warmup -= 1
                return self._on_side_stream(batch)
            self._capture()
        self._follow_lr()
        self.index.copy_(batch)
        self.graph.replay()
        return self.output

    def _on_side_stream(self, batch: Tensor) -> Tensor:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            output = self.step(batch)
        current.wait_stream(side)
        return output

    def _capture(self) -> None:
        groups = self.optimizer.param_groups
        floats = [group["lr"] for group in groups]
        self.lrs = [
            torch.tensor(float(lr), dtype=torch.float64, device=self.device) for lr in floats
        ]
        self.lr_values = list(floats)
        self.index = torch.zeros(self.shape, dtype=torch.int64, device=self.device)
        # The graph's backward writes the gradients into tensors of its own.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            for group, lr in zip(groups, self.lrs, strict=True):
                group["lr"] = lr
            # A capture stream of the stack's GPU (torch's default is made once, on the GPU
            # current then); "thread_local": the study's file-writing thread may run meanwhile.
            stream = torch.cuda.Stream(self.device)
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                self.output = self.step(self.index)
        finally:
            for group, lr in zip(groups, floats, strict=True):
                group["lr"] = lr
        self.graph = graph

    def _follow_lr(self) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            if group["lr"] != self.lr_values[i]:
                self.lrs[i].fill_(float(group["lr"]))
                self.lr_values[i] = group["lr"]
