"""``B`` linear layers of one shape at once, each with its own weights, dense or compact (its
kept weights alone, the others pruned): ``torch.ops.recallprune.stacked_linear`` and its
backward, which backend runs, the index lists of the kept weights (:class:`KeptWeights`) and
the autograd wrapper.

The layout is samples last: an activation is ``[B, features, n]``, so that each model's
feature is a contiguous row of its ``n`` samples. The output is ``relu?(weight @ input +
bias[..., None])`` per model. A compact weight is the values of the kept weights alone
(``KeptWeights.compact``): a pruned weight does not exist, so it takes no part in the sums and
has no gradient, and the memory the layer and its optimizer touch shrinks with the weights.

The CPU kernels visit only the kept weights of sparse rows and compute blocks of mostly kept
rows densely, with the same sums in the same order (one fused multiply-add chain per output,
over the kept inputs in ascending order), so which rows go dense (``dense_above``, the kept
fraction from which a block does) changes the speed and not the output or the input's
gradient; the weight gradient's sums are ordered differently in the two (dense: sample by
sample; sparse: a dot product of vectors) and agree to rounding. Elsewhere (CUDA, other dtypes,
torch's portable instruction set, ``backend="reference"``) the same math runs as torch's
batched products.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .extension import check_backend, has_ops, register_fakes, require_ops, resolve_backend


@dataclass(frozen=True, eq=False)
class KeptWeights:
    """The kept weights of ``B`` layers with weights ``[B, out, in]``: the boolean ``mask`` and,
    for the CPU kernels, its index lists by row (row ``b * out + o`` keeps the columns
    ``row_cols[row_ptr[r] : row_ptr[r + 1]]``, ascending, whose values are the compact
    weight's same entries) and by column (column ``b * in + i`` is kept by the rows
    ``col_rows[col_ptr[c] : col_ptr[c + 1]]``, ascending, whose values are at ``col_vals``).
    Build it with :meth:`from_mask` (``built``: its lists are well formed by construction, so
    :func:`stacked_mlp_step_` need not check them before it steps)."""

    mask: Tensor
    row_ptr: Tensor
    row_cols: Tensor
    col_ptr: Tensor
    col_rows: Tensor
    col_vals: Tensor
    built: bool = field(default=False, repr=False)

    @classmethod
    def from_mask(cls, mask: Tensor) -> KeptWeights:
        """The lists of a boolean ``mask`` ``[B, out, in]`` (True: kept), on its device."""
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 3:
            got = (
                f"{mask.dtype} of shape {tuple(mask.shape)}"
                if isinstance(mask, Tensor)
                else type(mask).__name__
            )
            raise ValueError(f"KeptWeights: mask must be a bool [B, out, in] tensor, got {got}")
        models, out, inputs = mask.shape
        if max(out, inputs) >= 2**31:
            raise ValueError(
                f"KeptWeights: a layer of {out} x {inputs} weights is too large for int32 indices"
            )
        mask = mask.contiguous()
        if mask.device.type == "cpu" and has_ops("cpu"):
            return cls(mask, *torch.ops.recallprune.kept_weight_lists(mask), built=True)
        row_ptr, row_cols = _lists(mask.reshape(models * out, inputs))
        by_column = mask.transpose(1, 2)
        col_ptr, col_rows = _lists(by_column.reshape(models * inputs, out))
        # Each kept weight's position among the values (row-major order), read by column.
        position = torch.cumsum(mask.reshape(-1), dim=0).reshape(mask.shape) - 1
        col_vals = position.transpose(1, 2)[by_column].contiguous()
        return cls(mask, row_ptr, row_cols, col_ptr, col_rows, col_vals, built=True)

    @property
    def shape(self) -> torch.Size:
        return self.mask.shape

    def compact(self, weight: Tensor) -> Tensor:
        """The kept entries of a dense ``weight`` ``[B, out, in]``: the compact weight."""
        return weight[self.mask]

    def expand(self, values: Tensor) -> Tensor:
        """The dense weight ``[B, out, in]`` of compact ``values`` (on their device), 0 at the
        pruned weights (differentiable)."""
        mask = self.mask.to(values.device)
        return values.new_zeros(mask.shape).masked_scatter(mask, values)


def _lists(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Offsets (int64 ``[R + 1]``) and column indices (int32) of the True entries of ``rows``
    ``[R, C]``, row by row, ascending."""
    ptr = torch.zeros(rows.shape[0] + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(rows.sum(dim=1), dim=0, out=ptr[1:])
    return ptr, rows.nonzero()[:, 1].to(torch.int32)


def stacked_linear_reference(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    kept: KeptWeights | None = None,
    relu: bool = False,
) -> Tensor:
    """:func:`stacked_linear` in torch's batched products (differentiable by autograd)."""
    if kept is not None:
        weight = kept.expand(weight)
    out = (
        torch.bmm(weight, input)
        if bias is None
        else torch.baddbmm(bias.unsqueeze(-1), weight, input)
    )
    return torch.relu(out) if relu else out


class _StackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, kept, relu, dense_above):
        lists = (None, None) if kept is None else (kept.row_ptr, kept.row_cols)
        output = torch.ops.recallprune.stacked_linear(
            input, weight, bias, *lists, relu, dense_above
        )
        ctx.save_for_backward(input, weight, output if relu else None)
        ctx.kept, ctx.dense_above, ctx.has_bias = kept, dense_above, bias is not None
        return output

    @staticmethod
    def backward(ctx, grad):
        input, weight, output = ctx.saved_tensors
        kept = ctx.kept
        lists = (
            (None,) * 5
            if kept is None
            else (
                kept.row_ptr,
                kept.row_cols,
                kept.col_ptr,
                kept.col_rows,
                kept.col_vals,
            )
        )
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grad_input, grad_weight, grad_bias = torch.ops.recallprune.stacked_linear_backward(
            grad.contiguous(), input, weight, output, *lists, wanted, ctx.dense_above
        )
        return (
            grad_input if wanted[0] else None,
            grad_weight if wanted[1] else None,
            grad_bias if wanted[2] and ctx.has_bias else None,
            None,
            None,
            None,
        )


@functools.cache
def _vector_cpu() -> bool:
    """Whether torch runs its CPU kernels with AVX2 or AVX-512 (ATEN_CPU_CAPABILITY), where the
    stacked kernels are built for vectors; on the portable set torch's products are faster."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def stacked_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    kept: KeptWeights | None = None,
    relu: bool = False,
    *,
    dense_above: float = 0.5,
    backend: str = "auto",
) -> Tensor:
    """``relu?(weight @ input + bias[..., None])`` for ``B`` models: ``input`` ``[B, in, n]``,
    ``weight`` ``[B, out, in]`` (with ``kept``: compact, the kept weights' values, as
    :meth:`KeptWeights.compact` gives them), ``bias`` ``[B, out]``, output ``[B, out, n]``.
    Differentiable.

    ``backend``: ``"auto"`` runs the CPU kernels on float32 CPU tensors where torch uses AVX2
    or AVX-512, and torch's batched products elsewhere; ``"kernel"`` insists on the CPU
    kernels; ``"reference"`` is torch's.
    ``dense_above``: the kept fraction from which the CPU kernels compute a block of rows
    densely (speed only)."""
    check_backend(backend)
    if kept is not None and (weight.dim() != 1 or weight.numel() != kept.row_cols.numel()):
        raise ValueError(
            f"stacked_linear: with kept, weight must be the {kept.row_cols.numel()} kept "
            f"weights' values (KeptWeights.compact), got shape {tuple(weight.shape)}"
        )
    tensors = [t for t in (input, weight, bias) if t is not None]
    if _kernel_runs(backend, "stacked_linear", *tensors):
        if bias is not None:
            bias = bias.contiguous()
        return _StackedLinear.apply(
            input.contiguous(), weight.contiguous(), bias, kept, relu, float(dense_above)
        )
    return stacked_linear_reference(input, weight, bias, kept, relu)


def kernels_run(*tensors: Tensor) -> bool:
    """Whether ``backend="auto"`` runs the CPU kernels of :func:`stacked_linear` and
    :func:`stacked_mlp_grads` on ``tensors``."""
    return _kernel_runs("auto", "stacked_linear", *tensors)


def _kernel_runs(backend: str, what: str, *tensors: Tensor) -> bool:
    """Whether the CPU kernels run ``what`` on ``tensors`` (``backend`` as
    :func:`stacked_linear` takes it): float32 CPU tensors, and with ``"auto"`` only where
    torch uses AVX2 or AVX-512; ``"kernel"`` raises where they cannot."""
    runs = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    if backend == "auto" and runs and not _vector_cpu():
        runs = False  # torch's products are the faster on the portable instruction set
    if backend == "kernel" and not runs:
        first = tensors[0]
        require_ops(first.device, what)
        got = ", ".join(sorted({f"{t.dtype} on {t.device}" for t in tensors}))
        raise RuntimeError(
            f"{what}: backend='kernel' runs float32 CPU tensors only, got {got}. Use "
            "backend='auto' (torch's batched products there) or 'reference'."
        )
    return runs and resolve_backend(backend, tensors[0].device, what) == "kernel"


def stacked_mlp_grads(
    x: Tensor,
    y: Tensor,
    batch: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    kept: list[KeptWeights | None] | None = None,
    *,
    dense_above: float = 0.5,
    backend: str = "auto",
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One training step's losses and gradients of ``B`` stacked MLPs (layers as
    :func:`stacked_linear` takes them, a relu after each but the last), each model on its own
    samples: model ``b``'s inputs are the rows ``x[batch[b]]`` (``x`` ``[N, features]``), its
    targets ``y[batch[b]]``, its loss the mean cross-entropy of its logits over its ``n``
    samples (``batch`` ``[B, n]``).

    Returns each sample's loss ``[B, n]`` and, per layer, the gradients of the weight (of its
    shape, compact or dense) and of the bias ``[B, out]``: those of ``stacked_linear``'s
    forward, ``cross_entropy`` and its backward, in one call and without autograd. The CPU
    kernels run each model's whole step in turn (its activations stay in cache), with the same
    products and the same log-softmax as the step through autograd: the same bits, where torch
    uses AVX2 or AVX-512. Elsewhere (``backend`` as :func:`stacked_linear`'s) the step runs
    through autograd."""
    check_backend(backend)
    if kept is None:
        kept = [None] * len(weights)
    if not (len(weights) == len(biases) == len(kept)) or not weights:
        raise ValueError(
            "stacked_mlp_grads: weights, biases and kept must list the same layers (at least "
            f"one), got {len(weights)}, {len(biases)} and {len(kept)}"
        )
    if _kernel_runs(backend, "stacked_mlp_grads", x, *weights, *biases):
        with torch.no_grad():
            losses, grad_weights, grad_biases = torch.ops.recallprune.stacked_mlp_grads(
                x, y, batch, weights, biases, _kept_lists(kept), float(dense_above)
            )
        return losses, list(grad_weights), list(grad_biases)
    inner = "reference" if backend == "reference" else "auto"
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in [*weights, *biases]]
        out = x[batch].transpose(1, 2)  # [B, features, n]
        for i, k in enumerate(kept):
            last = i == len(kept) - 1
            out = stacked_linear(out, leaves[i], leaves[len(kept) + i], k, not last, backend=inner)
        losses = torch.nn.functional.cross_entropy(out, y[batch], reduction="none")
        grads = torch.autograd.grad(losses.mean(dim=1).sum(), leaves)
    return losses.detach(), list(grads[: len(kept)]), list(grads[len(kept) :])


def _kept_lists(kept: list[KeptWeights | None]) -> list[Tensor | None]:
    lists: list[Tensor | None] = []
    for k in kept:
        lists += (
            [None] * 5 if k is None else [k.row_ptr, k.row_cols, k.col_ptr, k.col_rows, k.col_vals]
        )
    return lists


def stacked_mlp_step_(
    x: Tensor,
    y: Tensor,
    batch: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    kept: list[KeptWeights | None],
    step: dict,
    *,
    dense_above: float = 0.5,
) -> Tensor:
    """:func:`stacked_mlp_grads` through the CPU kernels, then, model by model while its
    gradients are in cache, the UndecayedSGD step of its parameters, in place: the same bits
    as ``undecayed_sgd_`` over the whole stacked parameters with these gradients. ``step``:
    what :meth:`~recallprune.optim.UndecayedSGD.fused_step_args` gives for
    ``[*weights, *biases]``. Returns each sample's loss ``[B, n]`` (the gradients are spent
    in the step).

    Nothing changes where the call fails: the samples, targets and shapes are checked first,
    and so are the index lists unless every ``kept`` was built by
    :meth:`KeptWeights.from_mask` (well formed by construction; the kernels check the lists
    they read in any case, so a list changed in place since raises either way, the models
    before it then stepped)."""
    layers = len(weights)
    with torch.no_grad():
        return torch.ops.recallprune.stacked_mlp_step_(
            x,
            y,
            batch,
            weights,
            biases,
            _kept_lists(kept),
            step["momentum_buffers"][:layers],
            step["momentum_buffers"][layers:],
            step["keep_masks"][:layers],
            step["lr"],
            step["weight_decay"],
            step["momentum"],
            step["dampening"],
            step["nesterov"],
            step["maximize"],
            not all(k is None or k.built for k in kept),
            float(dense_above),
        )


@register_fakes
def _register_fakes() -> None:
    @torch.library.register_fake("recallprune::stacked_linear")
    def _(input, weight, bias, row_ptr, row_cols, relu=False, dense_above=0.5):
        models = input.shape[0]
        out = weight.shape[1] if row_ptr is None else (row_ptr.shape[0] - 1) // models
        return input.new_empty((models, out, input.shape[2]))

    @torch.library.register_fake("recallprune::kept_weight_lists")
    def _(mask):
        models, out, inputs = mask.shape
        kept = torch.library.get_ctx().new_dynamic_size()
        long, int32 = dict(dtype=torch.int64), dict(dtype=torch.int32)
        return (
            mask.new_empty((models * out + 1,), **long),
            mask.new_empty((kept,), **int32),
            mask.new_empty((models * inputs + 1,), **long),
            mask.new_empty((kept,), **int32),
            mask.new_empty((kept,), **long),
        )

    @torch.library.register_fake("recallprune::stacked_mlp_grads")
    def _(x, y, batch, weights, biases, lists, dense_above=0.5):
        return (
            x.new_empty(batch.shape),
            [w.new_empty(w.shape) for w in weights],
            [b.new_empty(b.shape) for b in biases],
        )

    @torch.library.register_fake("recallprune::stacked_mlp_step_")
    def _(x, y, batch, weights, biases, lists, *rest):
        return x.new_empty(batch.shape)

    @torch.library.register_fake("recallprune::stacked_linear_backward")
    def _(
        grad,
        input,
        weight,
        output,
        row_ptr,
        row_cols,
        col_ptr,
        col_rows,
        col_vals,
        output_mask,
        dense_above=0.5,
    ):
        empty = grad.new_empty((0,))
        return (
            input.new_empty(input.shape) if output_mask[0] else empty,
            weight.new_empty(weight.shape) if output_mask[1] else empty,
            grad.new_empty((grad.shape[0], grad.shape[1])) if output_mask[2] else empty,
        )
