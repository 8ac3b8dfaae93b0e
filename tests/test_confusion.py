"""ConfusionCounter: kernels against the reference and scikit-learn, ties and NaN, invalid
labels, ignore_index, segmentation shapes, errors, state, and the distributed sync."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

from recallprune import ConfusionCounter, confusion_matrix
from recallprune.ops.reference import confusion_update_reference

from .conftest import requires_cuda, requires_ops

LOGIT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _logits(n, c, dtype, seed, nan_rows=True):
    """Random logits with many ties (rounded values) and some NaN, as torch.argmax sees them."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=generator) * 2
    x[::3] = x[::3].round()  # ties: argmax must take the first index
    if nan_rows and n > 0 and c > 1:
        x[::7, c // 2] = float("nan")  # NaN wins, as in torch.argmax
        x[::11, :] = float("nan")  # all NaN: index 0
    return x.to(dtype)


def _sklearn(target, pred, c):
    return torch.from_numpy(
        sklearn_confusion_matrix(target.numpy(), pred.numpy(), labels=np.arange(c))
    ).to(torch.int64)


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("c", [2, 3, 10, 31, 32, 33, 127, 128, 255, 256, 1000])
@pytest.mark.parametrize("n", [1, 17, 4099])
def test_kernel_matches_reference_and_sklearn(kernel_device, dtype, c, n):
    x = _logits(n, c, dtype, seed=c * 7 + n)
    target = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(n))
    expected = _sklearn(target, x.float().argmax(1), c)
    reference = confusion_matrix(x, target, c, backend="reference")
    kernel = confusion_matrix(x.to(kernel_device), target.to(kernel_device), c, backend="kernel")
    assert torch.equal(reference, expected)
    assert torch.equal(kernel.cpu(), expected)


# Every C where the CPU kernel changes strategy or loop shape on some instruction set, and
# either side of each: pairs split by shuffles for two classes, column blocks up to 7 to 15
# classes, row scans of 2 to 16 lanes with four accumulators (1 to 4 vectors, a partial
# one) and 64-lane chunks for the index.
REGIME_CLASSES = [*range(1, 71), 95, 96, 97, 127, 128, 129, 255, 256, 257, 1000]


def _hard_rows(n, c, seed):
    """Rows that each test one rule of torch.argmax's order: ties (first wins), a maximum at
    either end or in a row's last, partial vector, NaN anywhere (the first NaN wins, over
    +inf too), all NaN, infinities, -0.0 == +0.0, and values that are subnormal in fp16."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=generator, dtype=torch.float64) * 2
    position = torch.randint(0, c, (n,), generator=generator)
    other = torch.randint(0, c, (n,), generator=generator)
    rows = torch.arange(n)
    pattern = rows % 13
    x[pattern == 1] = x[pattern == 1].round()  # many ties
    x[pattern == 2] = 1.5  # all equal: index 0
    x[pattern == 3, -1] = 100.0  # largest last
    x[pattern == 4, 0] = 100.0  # largest first
    x[pattern == 5, position[pattern == 5]] = float("nan")
    x[pattern == 6, -1] = float("nan")
    x[pattern == 7, position[pattern == 7]] = float("nan")
    x[pattern == 7, other[pattern == 7]] = float("nan")  # two NaNs: the first wins
    x[pattern == 8] = float("nan")
    x[pattern == 9, position[pattern == 9]] = float("inf")
    x[pattern == 9, other[pattern == 9]] = float("inf")  # two +inf: the first wins
    x[pattern == 10] = float("-inf")
    x[pattern == 10, position[pattern == 10]] = -1e30
    zeros = pattern == 11  # -0.0 and +0.0 tie as the maximum
    x[zeros] = -1.0
    x[zeros, position[zeros]] = -0.0
    x[zeros, other[zeros]] = 0.0
    ties = pattern == 12  # the largest value twice, the second time in the last lanes
    x[ties, c // 3] = 50.0
    x[ties, -1] = 50.0
    x[rows % 17 == 16, position[rows % 17 == 16]] = float("inf")
    x[rows % 17 == 16, other[rows % 17 == 16]] = float("nan")  # NaN beats +inf
    tiny = rows % 19 == 18  # fp16 subnormals (below 6.1e-5), ties among them
    x[tiny] = (x[tiny] * 4).round() * 1e-6
    return x


@requires_ops
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
def test_kernel_argmax_regimes_match_torch(dtype):
    for c in REGIME_CLASSES:
        # Whole column blocks of every size and a partial one; for fp16/bf16 several
        # buffers of widened rows.
        n = 4099 if c <= 70 else 517
        x = _hard_rows(n, c, seed=c).to(dtype)
        target = torch.arange(n) % c
        expected = confusion_matrix(x, target, c, backend="reference")
        counts = confusion_matrix(x, target, c, backend="kernel")
        assert torch.equal(counts, expected), f"C = {c}"


@requires_ops
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kernel_widening_keeps_the_order_of_every_16_bit_value(dtype):
    # Every bit pattern, in order, each next to its neighbour both ways round (C = 2),
    # then all of them in rows of 16: fp16/bf16 are widened to float before the argmax.
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    ordered = values[torch.argsort(values.float(), stable=True)]
    pairs = torch.stack([ordered[:-1], ordered[1:]], dim=1)
    for x in (pairs, pairs.flip(1), values.view(-1, 16)):
        target = torch.arange(x.shape[0]) % x.shape[1]
        expected = confusion_matrix(x, target, x.shape[1], backend="reference")
        assert torch.equal(confusion_matrix(x, target, x.shape[1], backend="kernel"), expected)


@pytest.mark.parametrize("ignore_index", [None, 0, 255, -100])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 4, 1), (6, 3, 2, 2, 2)])
def test_segmentation_shapes_and_ignore_index(kernel_device, ignore_index, shape):
    generator = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    x = torch.randn(shape, generator=generator)
    target_shape = shape[:1] + shape[2:]
    target = torch.randint(0, c, target_shape, generator=generator)
    if ignore_index is not None:
        target[torch.rand(target_shape, generator=generator) < 0.3] = ignore_index
    counter = ConfusionCounter(c, device=kernel_device, ignore_index=ignore_index, backend="kernel")
    counter.update(x.to(kernel_device), target.to(kernel_device))
    flat_pred = x.movedim(1, -1).reshape(-1, c).argmax(1)
    flat_target = target.reshape(-1)
    keep = flat_target != ignore_index if ignore_index is not None else slice(None)
    assert torch.equal(counter.compute().cpu(), _sklearn(flat_target[keep], flat_pred[keep], c))


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.uint8])
def test_label_input(kernel_device, label_dtype):
    generator = torch.Generator().manual_seed(3)
    pred = torch.randint(0, 6, (500,), generator=generator)
    target = torch.randint(0, 6, (500,), generator=generator)
    counts = confusion_matrix(
        pred.to(kernel_device, label_dtype), target.to(kernel_device, label_dtype), 6
    )
    assert torch.equal(counts.cpu(), _sklearn(target, pred, 6))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 600),
    c=st.integers(1, 70),
    inner=st.sampled_from([1, 1, 3]),
    dtype=st.sampled_from(LOGIT_DTYPES),
    ignore=st.sampled_from([None, 0, -1, 300]),
    seed=st.integers(0, 2**16),
)
def test_property_kernel_equals_reference(n, c, inner, dtype, ignore, seed):
    pytest.importorskip("recallprune._C")
    generator = torch.Generator().manual_seed(seed)
    x = _logits(n * inner, c, dtype, seed).reshape(n, inner, c).movedim(2, 1)
    # Targets include invalid labels and the ignore label now and then.
    target = torch.randint(-1, c + 1, (n, inner), generator=generator)
    results = []
    for backend in ("kernel", "reference"):
        counter = ConfusionCounter(c, ignore_index=ignore, backend=backend)
        counter.update(x, target)
        counter.update(x[: n // 2], target[: n // 2])
        results.append((counter._counts.clone(), counter.invalid_count))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("backend", ["reference", "kernel"])
def test_invalid_targets_raise_at_compute_and_keep_valid_counts(backend):
    if backend == "kernel":
        pytest.importorskip("recallprune._C")
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(300, 5, generator=generator)
    target = torch.randint(0, 5, (300,), generator=generator)
    bad = target.clone()
    bad[:7] = 5
    bad[7:10] = -3
    counter = ConfusionCounter(5, backend=backend)
    counter.update(x, bad)  # no error here: update never looks at the values on the host
    assert int(counter.invalid_count) == 10
    with pytest.raises(
        ValueError, match=r"^10 target or predicted label\(s\) were outside \[0, 5\)"
    ):
        counter.compute()
    with pytest.raises(ValueError, match="10 target"):
        counter.recall()
    expected = _sklearn(target[10:], x[10:].argmax(1), 5)
    assert torch.equal(counter._counts.view(5, 5), expected)  # the valid entries are intact
    counter.reset()
    assert int(counter.invalid_count) == 0
    counter.update(x, target)
    assert torch.equal(counter.compute(), _sklearn(target, x.argmax(1), 5))
    # Predicted labels out of range are invalid too.
    pred = x.argmax(1)
    pred[0] = 9
    with pytest.raises(ValueError, match="^1 target"):
        confusion_matrix(pred, target, 5, backend=backend)


def test_recall_accuracy_support():
    counter = ConfusionCounter(4)
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([0, 0, 1, 1, 0, 2, 2, 3, 2])
    counter.update(pred, target)
    assert torch.equal(counter.support(), torch.tensor([3, 2, 4, 0]))
    recall = counter.recall()
    torch.testing.assert_close(recall[:3], torch.tensor([2 / 3, 1 / 2, 3 / 4], dtype=torch.float64))
    assert torch.isnan(recall[3])  # no support: NaN, not 0
    assert counter.accuracy().item() == pytest.approx(6 / 9)
    empty = ConfusionCounter(3)
    assert torch.isnan(empty.accuracy())


def test_state_dict_round_trip_and_sync_without_distributed():
    counter = ConfusionCounter(3)
    counter.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))
    state = counter.state_dict()
    other = ConfusionCounter(3)
    other.load_state_dict(state)
    assert torch.equal(other.compute(), counter.compute())
    counter.sync()  # not initialised: a no-op
    assert torch.equal(other.compute(), counter.compute())
    with pytest.raises(ValueError, match="counts for 3 classes, this counter has 4"):
        ConfusionCounter(4).load_state_dict(state)
    with pytest.raises(TypeError, match="takes the dict that state_dict\\(\\) returns, got list"):
        ConfusionCounter(3).load_state_dict([state])
    broken = {**state, "counts": state["counts"].float()}
    with pytest.raises(ValueError, match=r"state\['counts'\] must be int64 of shape \(3, 3\)"):
        ConfusionCounter(3).load_state_dict(broken)


class TestErrors:
    def test_shapes_dtypes_devices(self):
        counter = ConfusionCounter(4)
        with pytest.raises(ValueError, match=r"logits must have shape \[N, C, ...\] with C = "):
            counter.update(torch.randn(5, 3), torch.zeros(5, dtype=torch.int64))
        with pytest.raises(ValueError, match=r"target must have shape \(5,\)"):
            counter.update(torch.randn(5, 4), torch.zeros(6, dtype=torch.int64))
        with pytest.raises(TypeError, match="target must hold integer class labels"):
            counter.update(torch.randn(5, 4), torch.zeros(5))
        with pytest.raises(ValueError, match="same shape"):
            counter.update(torch.zeros(5, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
        with pytest.raises(ValueError, match="input is on meta but target is on cpu"):
            counter.update(torch.randn(5, 4, device="meta"), torch.zeros(5, dtype=torch.int64))
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            ConfusionCounter(0)
        with pytest.raises(ValueError, match="backend must be one of"):
            ConfusionCounter(3, backend="gpu")

    def test_op_checks(self):
        pytest.importorskip("recallprune._C")
        counts, invalid = torch.zeros(9, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        op = torch.ops.recallprune.confusion_update_
        with pytest.raises(RuntimeError, match="counts must be a contiguous int64 tensor of 16"):
            op(counts, invalid, torch.randn(2, 4, 1), torch.zeros(2, 1, dtype=torch.int64), 4)
        with pytest.raises(RuntimeError, match="target must be int64 or int32"):
            op(counts, invalid, torch.randn(2, 3, 1), torch.zeros(2, 1), 3)


@requires_cuda
@requires_ops
def test_cuda_update_never_syncs():
    counter = ConfusionCounter(1000, device="cuda")
    x = torch.randn(4096, 1000, device="cuda")
    target = torch.randint(-1, 1001, (4096,), device="cuda")
    small = ConfusionCounter(10, device="cuda", ignore_index=255)
    torch.cuda.set_sync_debug_mode("error")
    try:
        counter.update(x, target)
        counter.update(x.bfloat16(), target.int())
        small.update(x[:, :10], target % 10)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(counter.invalid_count) > 0


# (C, N): each CUDA path at a size that spans many blocks and grid-stride rounds: the
# aggregated shared counting (C <= 32), lane groups of 8 (32 <= C < 128) and of 32 lanes,
# shared histograms (C = 50 with enough rows per block) and global atomics.
CUDA_PATH_CASES = [
    (2, 1_000_000),
    (5, 300_000),
    (31, 100_000),
    (32, 100_000),
    (50, 1_400_000),
    (100, 50_000),
    (127, 50_000),
    (128, 50_000),
    (1000, 8_000),
]


@requires_cuda
@requires_ops
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("c", "n"), CUDA_PATH_CASES, ids=[f"C{c}-N{n}" for c, n in CUDA_PATH_CASES]
)
def test_cuda_paths_match_reference(c, n, dtype, target_dtype, misaligned):
    generator = torch.Generator("cuda").manual_seed(c + n)
    # Misaligned: the rows start one element past an aligned address (no vector loads).
    flat = torch.randn(n * c + 1, generator=generator, device="cuda").to(dtype)
    x = (flat[1:] if misaligned else flat[:-1]).view(n, c)
    x[::5] = x[::5].round()  # ties
    # Labels in [-1, C]: C is ignored, -1 is invalid.
    target = torch.randint(-1, c + 1, (n,), generator=generator, device="cuda")
    counter = ConfusionCounter(c, device="cuda", ignore_index=c, backend="kernel")
    counter.update(x, target.to(target_dtype))
    counts = torch.zeros(c * c, dtype=torch.int64, device="cuda")
    invalid = torch.zeros(1, dtype=torch.int64, device="cuda")
    confusion_update_reference(counts, invalid, x.view(n, c, 1), target.view(n, 1), c, c)
    assert torch.equal(counter._counts, counts)
    assert torch.equal(counter._invalid, invalid)
    assert int(invalid) > 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world_size, port, shards, results):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        x, target = shards[rank]
        counter = ConfusionCounter(5)
        counter.update(x, target)
        seen = []
        for _ in range(2):  # a second sync without new updates changes nothing
            counter.sync()
            # compute() would raise for the invalid label: read the raw counts.
            seen.append((counter.state_dict()["counts"], counter.invalid_count))
        counter.update(x, target)  # counted again, summed by the next sync
        seen.append((counter.state_dict()["counts"], counter.invalid_count))
        counter.sync()
        seen.append((counter.state_dict()["counts"], counter.invalid_count))
        results[rank] = seen
    finally:
        dist.destroy_process_group()


def test_sync_sums_counts_across_two_processes_once():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1000, 5, generator=generator)
    target = torch.randint(0, 5, (1000,), generator=generator)
    target[3] = 7  # one invalid label, on rank 0
    shards = [(x[:400], target[:400]), (x[400:], target[400:])]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_distributed_worker, args=(2, _free_port(), shards, results), nprocs=2, join=True)
    valid = target != 7
    expected = _sklearn(target[valid], x[valid].argmax(1), 5)
    for rank in range(2):
        first, second, local, third = results[rank]
        first, first_invalid = first
        second, second_invalid = second
        third, third_invalid = third
        assert torch.equal(first, expected) and int(first_invalid) == 1
        assert torch.equal(second, expected) and int(second_invalid) == 1
        shard_x, shard_target = shards[rank]
        ok = shard_target != 7
        own = _sklearn(shard_target[ok], shard_x[ok].argmax(1), 5)
        assert torch.equal(local[0], expected + own)  # the global counts and its new ones
        assert torch.equal(third, 2 * expected) and int(third_invalid) == 2


@pytest.fixture
def two_identical_ranks(monkeypatch):
    """torch.distributed as two ranks that counted the same batches: all_reduce doubles."""
    calls = []

    def all_reduce(tensor, op=None):
        calls.append(op)
        tensor.mul_(2)

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return calls


def test_sync_is_idempotent(two_identical_ranks):
    generator = torch.Generator().manual_seed(6)
    first = (
        torch.randn(200, 4, generator=generator),
        torch.randint(0, 4, (200,), generator=generator),
    )
    second = (
        torch.randn(90, 4, generator=generator),
        torch.randint(0, 4, (90,), generator=generator),
    )
    second[1][0] = 9  # invalid
    counts_a = _sklearn(first[1], first[0].argmax(1), 4)
    ok = second[1] != 9
    counts_b = _sklearn(second[1][ok], second[0][ok].argmax(1), 4)

    counter = ConfusionCounter(4)
    counter.update(*first)
    counter.sync()
    assert torch.equal(counter.compute(), 2 * counts_a)
    counter.sync()  # nothing new: the same counts, not four times them
    assert torch.equal(counter.compute(), 2 * counts_a)
    assert len(two_identical_ranks) == 2  # every call takes part in the collective
    counter.update(*second)
    assert int(counter.invalid_count) == 1
    counter.sync()
    counter.sync()
    assert int(counter.invalid_count) == 2
    assert torch.equal(counter.state_dict()["counts"], 2 * counts_a + 2 * counts_b)

    # A checkpoint keeps what was summed apart: loaded and synced again, nothing doubles.
    loaded = ConfusionCounter(4)
    loaded.load_state_dict(counter.state_dict())
    loaded.sync()
    assert torch.equal(loaded.state_dict()["counts"], 2 * counts_a + 2 * counts_b)
    assert int(loaded.invalid_count) == 2

    counter.reset()
    counter.sync()
    assert torch.equal(counter.state_dict()["counts"], torch.zeros(4, 4, dtype=torch.int64))
    assert int(counter.invalid_count) == 0


def test_stacked_counter_syncs_saves_and_moves_as_a_counter_per_model(two_identical_ranks):
    """Each model's row of a StackedConfusionCounter syncs, saves and loads as its own
    ConfusionCounter would."""
    from recallprune import StackedConfusionCounter

    models, c = 3, 4
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(models, 50, c, generator=generator)
    target = torch.randint(0, c, (models, 50), generator=generator)
    target[2, 0] = c + 1  # invalid, model 2 only
    stacked = StackedConfusionCounter(models, c)
    singles = [ConfusionCounter(c) for _ in range(models)]
    stacked.update(logits, target)
    for b, single in enumerate(singles):
        single.update(logits[b], target[b])
    for _ in range(2):  # idempotent, as each model's counter
        stacked.sync()
        for single in singles:
            single.sync()
    stacked.update(logits, target)  # counted after the sync
    for b, single in enumerate(singles):
        single.update(logits[b], target[b])
    state = stacked.state_dict()
    assert state["num_models"] == models and state["counts"].shape == (models, c, c)
    assert state["invalid"].shape == (models, 1) and state["synced_counts"].shape == (models, c, c)
    for b, single in enumerate(singles):
        single_state = single.state_dict()
        for key in ("counts", "invalid", "synced_counts", "synced_invalid"):
            assert torch.equal(state[key][b], single_state[key]), (b, key)
    assert stacked.invalid_count.tolist() == [0, 0, 3]  # 2 (both ranks) + 1 since the sync

    loaded = StackedConfusionCounter(models, c).to("cpu")
    loaded.load_state_dict(state)
    loaded.sync()  # only what came after the last sync is summed again
    for b, single in enumerate(singles):
        single.sync()
        assert torch.equal(loaded.state_dict()["counts"][b], single.state_dict()["counts"]), b
    with pytest.raises(ValueError, match="counts for 3 models, this counter has 2"):
        StackedConfusionCounter(2, c).load_state_dict(state)
    with pytest.raises(ValueError, match="counts for None models"):
        StackedConfusionCounter(models, c).load_state_dict(singles[0].state_dict())
    loaded.reset()
    assert int(loaded.invalid_count.sum()) == 0 and int(loaded.compute().sum()) == 0


def test_the_cpu_memory_limit_reads_the_control_group(tmp_path, monkeypatch):
    from recallprune.metrics import confusion

    def tree(files, membership):
        root = tmp_path / f"cg{len(list(tmp_path.iterdir()))}"
        for path, text in files.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(text)
        (root / "self").write_text(membership)
        return confusion._cgroup_memory_limit(root, root / "self")

    # v2: the group's own limit, a tighter parent's, "max" (none), a container's root view.
    v2 = "0::/jobs/job1\n"
    assert tree({"jobs/job1/memory.max": "3000000000\n"}, v2) == 3_000_000_000
    assert tree({"jobs/job1/memory.max": "max\n", "jobs/memory.max": "2000\n"}, v2) == 2000
    assert tree({"jobs/job1/memory.max": "max\n"}, v2) is None
    assert tree({"memory.max": "5000\n"}, v2) == 5000
    # v1: the memory controller's hierarchy; its "unlimited" is a number near 2**63.
    v1 = "4:memory:/process/abc\n3:cpuset:/\n"
    assert tree({"memory/process/abc/memory.limit_in_bytes": "7000\n"}, v1) == 7000
    unlimited = {"memory/process/abc/memory.limit_in_bytes": "9223372036854771712\n"}
    assert tree(unlimited, v1) is None
    assert confusion._cgroup_memory_limit(tmp_path, tmp_path / "missing") is None
    # The CPU's memory is the lesser of physical memory and the group's limit.
    monkeypatch.setattr(confusion, "_cgroup_memory_limit", lambda: 1000)
    assert confusion._device_memory(torch.device("cpu")) == 1000
    monkeypatch.setattr(confusion, "_cgroup_memory_limit", lambda: 10**18)
    physical = confusion._device_memory(torch.device("cpu"))
    assert 10**8 < physical < 10**18
    monkeypatch.setattr(confusion, "_cgroup_memory_limit", lambda: 2 * 1000 * 1000 * 8 - 1)
    with pytest.raises(ValueError, match="num_classes=1000 needs a 1000 x 1000 int64 matrix"):
        ConfusionCounter(1000)


def test_a_matrix_too_large_is_refused_up_front(monkeypatch):
    from recallprune.metrics import confusion

    allocations = []
    monkeypatch.setattr(confusion, "_device_memory", lambda device: 64 * 10**9)
    monkeypatch.setattr(
        confusion.torch, "zeros", lambda *a, **k: allocations.append(a) or torch.empty(0)
    )
    with pytest.raises(ValueError) as refused:
        ConfusionCounter(100_000)
    message = str(refused.value)
    assert "num_classes=100000" in message and "80.0 GB (80,000,000,000 bytes)" in message
    assert "cpu has 64.0 GB" in message
    assert allocations == []  # refused before allocating anything
    monkeypatch.undo()

    # The limit: half the device's memory (the counts and one copy of them).
    needed = 1000 * 1000 * 8
    monkeypatch.setattr(confusion, "_device_memory", lambda device: 2 * needed)
    ConfusionCounter(1000)
    monkeypatch.setattr(confusion, "_device_memory", lambda device: 2 * needed - 1)
    with pytest.raises(ValueError, match=r"num_classes=1000 needs a 1000 x 1000 int64 matrix"):
        ConfusionCounter(1000)
    monkeypatch.undo()

    # Without patches: no machine holds 800 TB; meta tensors hold no data.
    with pytest.raises(ValueError, match=r"num_classes=10000000 .* 800000.0 GB"):
        ConfusionCounter(10_000_000)
    on_meta = ConfusionCounter(10_000_000, device="meta")
    with pytest.raises(ValueError, match="num_classes=10000000"):
        on_meta.to("cpu")
    assert on_meta.device == torch.device("meta")  # a refused move leaves it where it was
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            ConfusionCounter(10_000_000, device="cuda")


def test_to_moves_the_counts_and_returns_the_counter():
    generator = torch.Generator().manual_seed(8)
    x, target = (
        torch.randn(50, 3, generator=generator),
        torch.randint(0, 4, (50,), generator=generator),
    )
    counter = ConfusionCounter(3)
    counter.update(x, target)
    counts, invalid = counter.state_dict()["counts"], int(counter.invalid_count)
    assert invalid > 0
    assert counter.to("cpu") is counter and counter.to(torch.device("cpu")) is counter
    assert torch.equal(counter.state_dict()["counts"], counts)

    assert counter.to("meta") is counter
    assert counter.device == torch.device("meta")
    assert counter.state_dict()["counts"].device.type == "meta"
    counter.update(x.to("meta"), target.to("meta"))  # batches on the new device are taken
    with pytest.raises(ValueError, match="the batch is on cpu but the counter is on meta"):
        counter.update(x, target)

    devices = ["cuda"] if torch.cuda.is_available() else []
    for device in devices:
        counter = ConfusionCounter(3)
        counter.update(x, target)
        assert counter.to(device) is counter
        assert counter.state_dict()["counts"].device.type == device
        counter.update(x.to(device), target.to(device))
        assert counter.to("cpu") is counter
        assert torch.equal(counter.state_dict()["counts"], 2 * counts)
        assert int(counter.invalid_count) == 2 * invalid


# -- StackedConfusionCounter: B models at once, each as its own ConfusionCounter ----------


@pytest.mark.parametrize("backend", ["reference", "kernel"])
@pytest.mark.parametrize("dtype", [*LOGIT_DTYPES, torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("ignore_index", [None, 2])
@pytest.mark.parametrize("shared_target", [True, False], ids=["shared", "own"])
def test_stacked_counts_match_each_models_counter(
    kernel_device, backend, dtype, ignore_index, shared_target
):
    if backend == "kernel" and not __import__("recallprune").has_ops(kernel_device):
        pytest.skip("no compiled kernels")
    from recallprune import StackedConfusionCounter

    models, n, c = 4, 57, 6
    generator = torch.Generator().manual_seed(5)
    logits = torch.stack([_logits(n, c, torch.float32, seed=b) for b in range(models)])
    targets = torch.randint(0, c, (models, n), generator=generator)
    targets[1, ::9] = c + 3  # invalid labels in model 1 only
    if dtype.is_floating_point:
        batch = logits.to(dtype)
    else:
        batch = logits.argmax(2).to(dtype)
        batch[2, ::13] = -1  # an invalid prediction in model 2
    if shared_target:
        targets = targets[0]
    stacked = StackedConfusionCounter(models, c, kernel_device, ignore_index, backend)
    for half in (slice(0, 30), slice(30, n)):  # two updates, counts add up
        part_target = targets[half] if shared_target else targets[:, half]
        stacked.update(batch[:, half].to(kernel_device), part_target.to(kernel_device))
    invalid = stacked.invalid_count.cpu()
    for b in range(models):
        single = ConfusionCounter(c, "cpu", ignore_index, backend="reference")
        single.update(batch[b], targets if shared_target else targets[b])
        assert torch.equal(stacked._counts[b].cpu(), single._counts), b
        assert invalid[b] == single.invalid_count, b
    # Model 1's own targets, and model 2's predicted labels, hold invalid labels.
    expected_bad = {1} if not shared_target else set()
    if not dtype.is_floating_point:
        expected_bad.add(2)
    assert {b for b in range(models) if invalid[b] > 0} == expected_bad
    if expected_bad:
        with pytest.raises(ValueError, match="outside"):
            stacked.compute()
    stacked.reset()
    assert stacked.invalid_count.sum() == 0 and stacked._counts.sum() == 0
    # Valid batches: compute, recall and accuracy per model.
    valid = torch.randint(0, c, (n,), generator=generator)
    stacked.update(logits.to(kernel_device), valid.to(kernel_device))
    counts = stacked.compute().cpu()
    kept = valid != ignore_index if ignore_index is not None else torch.ones(n, dtype=torch.bool)
    for b in range(models):
        assert torch.equal(counts[b], _sklearn(valid[kept], logits[b].argmax(1)[kept], c))
    torch.testing.assert_close(
        stacked.accuracy().cpu(),
        (logits.argmax(2) == valid)[:, kept].double().mean(dim=1),
    )
    assert stacked.recall().shape == (models, c)


@settings(max_examples=40, deadline=None)
@given(
    models=st.integers(1, 5),
    n=st.integers(0, 300),
    c=st.integers(1, 140),
    inner=st.sampled_from([1, 1, 2]),
    dtype=st.sampled_from([*LOGIT_DTYPES, torch.int64, torch.int32]),
    shared=st.booleans(),
    ignore=st.sampled_from([None, 0, -1]),
    seed=st.integers(0, 2**16),
)
def test_property_stacked_kernel_equals_reference(models, n, c, inner, dtype, shared, ignore, seed):
    """The stacked counter's kernel against its reference, on random stacks: any number of
    models, classes and entries, shared or per-model targets, logits or labels."""
    pytest.importorskip("recallprune._C")
    from recallprune import StackedConfusionCounter

    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        batch = torch.stack(
            [_logits(n * inner, c, dtype, seed + b) for b in range(models)]
        ).reshape(models, n, inner, c)
        batch = batch.movedim(3, 2)  # [B, N, C, S]
    else:
        batch = torch.randint(-1, c + 1, (models, n, inner), generator=generator).to(dtype)
    target_shape = (n, inner) if shared else (models, n, inner)
    target = torch.randint(-1, c + 1, target_shape, generator=generator)
    results = []
    for backend in ("kernel", "reference"):
        counter = StackedConfusionCounter(models, c, ignore_index=ignore, backend=backend)
        counter.update(batch, target)
        half = target[: n // 2] if shared else target[:, : n // 2]
        counter.update(batch[:, : n // 2], half)
        results.append((counter._counts.clone(), counter.invalid_count))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize(
    ("c", "s", "dtype"),
    [
        (2, 1, torch.float32),  # CUDA: shared histogram, warp-aggregated
        (40, 1, torch.bfloat16),  # CUDA: groups of 8 lanes per row, global counters
        (130, 1, torch.float32),  # CUDA: a warp per row, more bins than shared memory holds
        (33, 1, torch.float64),  # rows that no 16-byte load divides
        (40, 3, torch.float16),  # S > 1: strided rows
        (40, 1, torch.int32),  # predicted labels
    ],
    ids=str,
)
def test_stacked_op_matches_the_per_model_op_on_every_kernel_path(kernel_device, c, s, dtype):
    """Model b of a stack counts what confusion_update_ counts on model b's slice, on each
    path of the kernels (the CUDA kernel counts the whole stack in one launch, the model in
    the grid's y index: a wrong offset shows up as another model's counts)."""
    if not __import__("recallprune").has_ops(kernel_device):
        pytest.skip("no compiled kernels")
    models, n = 3, 3001
    generator = torch.Generator().manual_seed(c * 10 + s)
    target = torch.randint(-1, c + 1, (models, n, s), generator=generator)
    if dtype.is_floating_point:
        batch = torch.randn(models, n, c, s, generator=generator).to(dtype)
        batch[:, ::7, c // 2] = float("nan")
    else:
        batch = torch.randint(-1, c + 1, (models, n, s), generator=generator).to(dtype)
    batch, target = batch.to(kernel_device), target.to(kernel_device)
    options = dict(dtype=torch.int64, device=kernel_device)
    counts = torch.zeros(models, c * c, **options)
    invalid = torch.zeros(models, **options)
    torch.ops.recallprune.confusion_update_stacked_(counts, invalid, batch, target, c, 0)
    for b in range(models):
        single_counts = torch.zeros(c * c, **options)
        single_invalid = torch.zeros(1, **options)
        torch.ops.recallprune.confusion_update_(
            single_counts, single_invalid, batch[b], target[b], c, 0
        )
        assert torch.equal(counts[b], single_counts), b
        assert torch.equal(invalid[b : b + 1], single_invalid), b
        assert int(single_counts.sum()) > 0 and int(single_invalid) > 0
    # The models differ, so a model counted from another's slice would not pass.
    assert not torch.equal(counts[0], counts[1])


def test_stacked_counter_errors():
    from recallprune import StackedConfusionCounter

    counter = StackedConfusionCounter(3, 4)
    with pytest.raises(ValueError, match="num_models must be a positive int"):
        StackedConfusionCounter(0, 4)
    with pytest.raises(ValueError, match=r"input must hold the 3 models' logits"):
        counter.update(torch.randn(2, 5, 4), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"target must be shared by the models"):
        counter.update(torch.randn(3, 5, 4), torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="C = num_classes = 4"):
        counter.update(torch.randn(3, 5, 6), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="needs 100 1000000 x 1000000 int64 matrices"):
        StackedConfusionCounter(100, 1_000_000)
    assert torch.equal(counter.compute(), torch.zeros(3, 4, 4, dtype=torch.int64))
