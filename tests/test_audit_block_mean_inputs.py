"""Audit of the inputs of block mean approximations: ``block_mean``, ``kernel_block_mean`` and ``Partition``."""

from __future__ import annotations

import copy
import io
import pickle

import gpytorch
import pytest
import torch
from gpytorch.kernels import MaternKernel, RBFKernel, RQKernel, ScaleKernel
from linear_operator.operators import DenseLinearOperator

from bma_gp import (
    BlockMeanKernel,
    BlockMeanLinearOperator,
    GroupKernel,
    Partition,
    block_mean,
    block_mean_from_sums,
    kernel_block_mean,
)
from bma_gp._kernel_sums import jit, stationary
from gp_reference import GP


def _partitions(n: int, k: int) -> dict[str, Partition]:
    generator = torch.Generator().manual_seed(1)
    return {
        "contiguous": Partition.from_sizes(torch.full((k,), n // k)),
        "scattered": Partition.from_labels(torch.randperm(n, generator=generator) % k),
    }


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.detach().double() - reference).abs().max() / reference.abs().max())


# ---------------------------------------------------------------- float32 block sums of nearly equal entries
def _flat_kernel_matrix(n: int) -> torch.Tensor:
    """A float32 RBF matrix at lengthscale 100 on n points in [0, 1]: every entry nearly 1, so lam = d / s - B_ii
    cancels."""
    x = torch.rand(n, 1, generator=torch.Generator().manual_seed(0))
    kernel = RBFKernel()
    kernel.lengthscale = 100.0
    with torch.no_grad():
        return kernel(x, x).to_dense()


@pytest.mark.parametrize("layout", ["contiguous", "scattered"])
def test_float32_block_mean_matches_float64_sums_of_the_same_entries(layout):
    """With a long lengthscale every entry of a block is nearly 1 and lam = d / s - B_ii cancels: float32 running
    sums (of the scattered index_add in particular) put lam off by up to 60% (3e-3 to 0.6 here). The sums are now
    taken in float64 and only the result is rounded to float32."""
    n, k = 1200, 4
    A = _flat_kernel_matrix(n)
    partition = _partitions(n, k)[layout]
    result = block_mean(A, partition)
    reference = block_mean(A.double(), partition)
    assert result.dtype == torch.float32 and result.lam.dtype == result.B.dtype == torch.float32
    assert _relative(result.lam, reference.lam) < 1e-6
    assert _relative(result.B, reference.B) < 1e-6


def test_float32_dense_operator_is_summed_as_its_tensor():
    """``block_mean(DenseLinearOperator(A))`` multiplied float32 ``A`` by the indicator columns in float32 and widened
    only the products: lam off by 0.17 relative at lengthscale 100 where the tensor gives 5e-8. A dense operator is
    now summed as its tensor; gradients still reach it."""
    n, k = 1200, 4
    A = _flat_kernel_matrix(n)
    partition = _partitions(n, k)["scattered"]
    reference = block_mean(A.double(), partition)
    leaf = A.clone().requires_grad_(True)
    result = block_mean(DenseLinearOperator(leaf), partition)
    assert result.dtype == torch.float32
    assert _relative(result.lam, reference.lam) < 1e-6
    result.lam.sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == (n, n)


def test_float32_block_mean_gradient_still_flows_to_A():
    partition = _partitions(39, 3)["scattered"]
    A = torch.randn(39, 39, generator=torch.Generator().manual_seed(2))
    A = (A + A.T).requires_grad_(True)
    weights = torch.randn(39, 39, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (block_mean(A, partition).to_dense().double() * weights).sum().backward()
    A64 = A.detach().double().requires_grad_(True)
    (block_mean(A64, partition).to_dense() * weights).sum().backward()
    assert A.grad is not None and A.grad.dtype == torch.float32
    torch.testing.assert_close(A.grad.double(), A64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["default", "torch"])
@pytest.mark.parametrize("layout", ["contiguous", "scattered"])
def test_float32_kernel_block_mean_matches_float64_sums(backend, layout, monkeypatch):
    """The stationary engine summed each tile in float32 (torch's index_add, or numba's column accumulators) and
    rounded the float64 total to float32 before the means: lam was off by 2e-4 to 7e-4 at lengthscale 10 (0.6 at
    100). The reference sums GPyTorch's own float32 entries in float64 (they differ from the engine's by rounding)."""
    monkeypatch.setattr(jit, "MIN_ENTRIES", 0)  # numba (when installed) on this small matrix too
    if backend == "torch":
        monkeypatch.setattr(jit, "BACKEND", "torch")
        monkeypatch.setattr(stationary, "_WIDEN_ENTRIES", 1000)  # widen each tile in several slabs of columns
    n, k = 1500, 3
    x = torch.rand(n, 1, generator=torch.Generator().manual_seed(0))
    kernel = ScaleKernel(RBFKernel())
    kernel.base_kernel.lengthscale = 10.0
    kernel.outputscale = 2.0
    partition = _partitions(n, k)[layout]
    with torch.no_grad():
        reference = block_mean(kernel(x, x).to_dense().double(), partition)
        result = kernel_block_mean(kernel, x, partition, fused=True)
    assert result.dtype == torch.float32 and result.lam.dtype == result.B.dtype == torch.float32
    assert _relative(result.lam, reference.lam) < 1e-5
    assert _relative(result.B, reference.B) < 1e-6


@pytest.mark.parametrize("kernel", [RQKernel(), MaternKernel(nu=2.5)], ids=["rq", "matern-generic"])
def test_float32_generic_engine_matches_float64_sums(kernel):
    """The generic engine reduced each chunk's rows with a float32 segment sum and rounded the sums to float32:
    lam off by about 1e-4 at lengthscale 10."""
    n, k = 1500, 3
    x = torch.rand(n, 1, generator=torch.Generator().manual_seed(0))
    kernel.lengthscale = 10.0
    partition = _partitions(n, k)["scattered"]
    with torch.no_grad():
        reference = block_mean(kernel(x, x).to_dense().double(), partition)
        result = kernel_block_mean(kernel, x, partition, fused=False)
    assert result.dtype == torch.float32
    assert _relative(result.lam, reference.lam) < 1e-5
    assert _relative(result.B, reference.B) < 1e-6


def test_float32_kernel_block_mean_gradient_matches_float64():
    """The lengthscale gradient of a float32 log-determinant through both engines: 3e-5 to 7e-5 relative off the
    float64 one with float32 sums, 6e-6 with float64 sums."""
    n, k = 300, 3
    x = torch.rand(n, 2, generator=torch.Generator().manual_seed(0))
    partition = _partitions(n, k)["scattered"]
    grads = {}
    for dtype in (torch.float32, torch.float64):
        kernel = ScaleKernel(RBFKernel(ard_num_dims=2)).to(dtype)
        kernel.base_kernel.lengthscale = torch.tensor([3.0, 5.0])
        for fused in (True, False):
            kernel.zero_grad()
            op = kernel_block_mean(kernel, x.to(dtype), partition, fused=fused)
            assert op.dtype == dtype
            op.inv_quad_logdet(torch.ones(n, 1, dtype=dtype), logdet=True)[1].backward()
            grads[dtype, fused] = kernel.base_kernel.raw_lengthscale.grad.clone()
    for fused in (True, False):
        torch.testing.assert_close(
            grads[torch.float32, fused].double(), grads[torch.float64, fused], rtol=1.5e-5, atol=0
        )


# ---------------------------------------------------------------- integer matrices
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_integer_block_mean_sums_do_not_overflow(dtype):
    """An integer ``A`` was summed in its own dtype: 100 entries of 100 in an int8 or int16 block wrapped around
    (B = -16.8 instead of 100), and an int32 block of 2^30 entries gave -1.9e6. Integers are now summed in int64, as
    ``torch.sum`` does; the means are in the default dtype, as before."""
    partition = Partition.from_labels(torch.arange(100) % 3)
    value = {torch.int32: 2**30, torch.int64: 2**40}.get(dtype, 100)
    A = torch.full((100, 100), value, dtype=dtype)
    A.diagonal().fill_(value // 2)
    result = block_mean(A, partition)
    reference = block_mean(A.double(), partition)
    assert result.dtype == torch.get_default_dtype()
    torch.testing.assert_close(result.lam.double(), reference.lam, rtol=1e-6, atol=0)
    torch.testing.assert_close(result.B.double(), reference.B, rtol=1e-6, atol=0)
    assert float(result.B[0, 1]) == pytest.approx(value, rel=1e-6)


# ---------------------------------------------------------------- Partition on the meta device
@pytest.mark.parametrize(
    "build",
    [
        lambda: Partition.from_sizes([2, 3, 4]),
        lambda: Partition.from_sizes([3, 3, 3]),
        lambda: Partition.from_sizes(list(range(1, 12))),
        lambda: Partition.from_labels([0, 0, 1, 1, 1, 2]),
        lambda: Partition.from_labels([0, 1, 0, 2, 1, 2]),
        lambda: Partition.from_labels([0]),
    ],
    ids=["sizes", "equal-sizes", "many-runs", "contiguous-labels", "scattered", "singleton"],
)
def test_partition_to_meta(build):
    """A partition from sizes (no label vector yet) summed its sizes on the target device: Tensor.item() on meta
    raised a RuntimeError, while partitions from labels moved."""
    partition = build()
    moved = partition.to("meta")
    assert moved.device.type == "meta" and len(moved) == len(partition) and moved.num_blocks == partition.num_blocks
    assert moved.is_contiguous == partition.is_contiguous
    assert moved.labels.device.type == "meta" and moved.labels.shape == (len(partition),)
    assert moved.block_sum(torch.ones(len(partition), device="meta")).shape == (partition.num_blocks,)
    assert partition.to(torch.device("meta")).device.type == "meta"


def test_stationary_engine_follows_a_float64_outputscale_as_gpytorch():
    """A float32 RBF in a ScaleKernel with a float64 outputscale on float32 inputs: GPyTorch and the generic engine
    give float64, the stationary engine gave float32 (it cast the outputscale to the sums' dtype)."""
    kernel = ScaleKernel(RBFKernel())
    kernel.raw_outputscale.data = kernel.raw_outputscale.data.double()
    x = torch.rand(12, 1, generator=torch.Generator().manual_seed(0))
    partition = Partition.from_labels(torch.arange(12) % 3)
    expected = kernel(x, x).to_dense().dtype
    assert expected == torch.float64
    for fused in (True, False):
        assert kernel_block_mean(kernel, x, partition, fused=fused).dtype == expected


def test_partition_from_sizes_on_the_meta_device():
    """``Partition.from_sizes(sizes, device="meta")`` moved the sizes first and then validated them there
    (``nonzero`` has no meta implementation: NotImplementedError). The sizes are now checked where they have
    values, and n and the run table are taken there."""
    moved = Partition.from_sizes([2, 3, 3], device="meta")
    assert moved.device.type == "meta" and len(moved) == 8 and moved.num_blocks == 3 and moved.is_contiguous
    assert moved.block_sum(torch.ones(8, device="meta")).shape == (3,)
    assert moved.labels.device.type == "meta" and moved.labels.shape == (8,)
    with pytest.raises(ValueError, match=r"sizes\[1\] = 0"):
        Partition.from_sizes([2, 0], device="meta")


@pytest.mark.parametrize("which", ["labels", "sizes"])
def test_partition_from_meta_values_names_the_way_round(which):
    """Labels or sizes already on the meta device cannot be validated: torch's RuntimeError / NotImplementedError
    named neither; now a ValueError says to build on the CPU and move the partition."""
    values = torch.tensor([0, 1, 1] if which == "labels" else [1, 2], device="meta")
    build = Partition.from_labels if which == "labels" else Partition.from_sizes
    with pytest.raises(ValueError, match=f"{which} are on the meta device.*partition.to"):
        build(values)


# ---------------------------------------------------------------- label views
def test_partition_from_a_column_view_pickles_only_its_labels():
    """``Partition.from_labels(table[:, 3])`` keeps the int64 view (documented: not copied), and pickle, torch.save and
    deepcopy wrote the view's whole storage: the 20-column table, 16 MB for 0.8 MB of labels. The labels are now saved
    as a compact copy."""
    table = torch.randint(0, 5, (20_000, 20), generator=torch.Generator().manual_seed(0))
    partition = Partition.from_labels(table[:, 3])
    compact = Partition.from_labels(table[:, 3].clone())
    assert partition.labels.data_ptr() == table[:, 3].data_ptr()  # still kept as given
    assert len(pickle.dumps(partition)) < 1.1 * len(pickle.dumps(compact))
    buffer = io.BytesIO()
    torch.save(partition, buffer)
    assert buffer.tell() < 1.1 * 8 * 20_000 + 10_000
    copied = copy.deepcopy(partition)
    assert copied.labels.untyped_storage().nbytes() == 8 * 20_000
    assert copied == partition and copied.is_contiguous == partition.is_contiguous


def test_meta_partitions_deepcopy_and_pickle():
    """A partition on the meta device rebuilt its run table from its sizes when unpickled (``sizes.cpu()``: "Cannot
    copy out of meta tensor"), so deepcopy failed; the table is now saved with it."""
    for partition in (Partition.from_sizes([2, 2, 3], device="meta"), Partition.from_labels([0, 1, 0]).to("meta")):
        copied = copy.deepcopy(partition)
        assert copied.device.type == "meta" and len(copied) == len(partition)
        assert copied._runs == partition._runs


# ---------------------------------------------------------------- the symmetric flag
@pytest.mark.parametrize("flag", ["False", "no", None, 2])
def test_symmetric_flag_must_be_a_bool(flag):
    """``symmetric="False"`` (a string from a configuration) was taken as ``bool("False") is True``: block_mean
    silently returned the symmetric part. Now a ``TypeError`` names the argument, before anything is computed."""
    partition = Partition.from_labels([0, 0, 1, 1])
    A = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    general = block_mean(A, partition, symmetric=False)
    with pytest.raises(TypeError, match="symmetric must be True or False"):
        block_mean(A, partition, symmetric=flag)
    with pytest.raises(TypeError, match="symmetric must be True or False"):
        block_mean(general, partition, symmetric=flag)  # the early return for a block mean operator too
    with pytest.raises(TypeError, match="symmetric must be True or False"):
        block_mean_from_sums(torch.ones(2, 2), torch.ones(2), partition, symmetric=flag)
    with pytest.raises(TypeError, match="symmetric must be True or False"):
        BlockMeanLinearOperator(torch.ones(2), torch.eye(2), partition, symmetric=flag)
    assert block_mean(A, partition, symmetric=0).symmetric is False  # 1 / 0 stay accepted, as in bma_gp.settings


# ---------------------------------------------------------------- prediction dtypes with float64 inputs
@pytest.mark.parametrize("with_groups", [False, True], ids=["block_mean", "block_mean_plus_groups"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_predictive_mean_dtype_follows_gpytorch(with_groups, dtype):
    """A model with GPyTorch's default float32 parameters on float64 data: GPyTorch's RBF predicts float64 means and
    variances, and so did the block mean model's variances, but its mean was cast to the mean module's float32
    (``test_mean.dtype``), rounding it. Now it has the dtype GPyTorch promotes to, float64 here (float32 data stay
    float32)."""
    n = 60
    generator = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 5, (n,), generator=generator)
    x = torch.stack([torch.rand(n, generator=generator, dtype=torch.float64), groups.double()], -1).to(dtype)
    y = torch.randn(n, generator=generator, dtype=torch.float64).to(dtype)
    partition = Partition.from_labels(torch.unique(groups, return_inverse=True)[1])
    kernel = BlockMeanKernel(RBFKernel(active_dims=[0]), x, partition)
    if with_groups:
        kernel = kernel + GroupKernel(num_groups=5, active_dims=[1])
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).eval()
    reference = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), RBFKernel(active_dims=[0])).eval()
    shift = torch.tensor([0.01, 0.0], dtype=dtype)
    with torch.no_grad():
        for test_x in (x[:5], x[:5] + shift):  # at training inputs, and at new ones
            expected = reference(test_x).mean.dtype
            assert expected == dtype
            prediction = model(test_x)
            assert prediction.mean.dtype == prediction.variance.dtype == expected


@pytest.mark.parametrize("batch", [(), (2,)])
def test_block_mean_of_an_operator_whose_products_are_operators(batch):
    """block_mean(ZeroLinearOperator(...)) raised NotImplementedError from index_add: its products are operators too
    (user trial). Such products are formed (n x chunk columns) and summed like any other."""
    from linear_operator.operators import ZeroLinearOperator

    part = Partition.from_labels(torch.tensor([0, 1, 1, 0, 2, 2]))
    got = block_mean(ZeroLinearOperator(*batch, 6, 6, dtype=torch.float64), part)
    assert got.shape == (*batch, 6, 6)
    assert torch.equal(got.to_dense(), torch.zeros(*batch, 6, 6, dtype=torch.float64))
