"""``block_mean`` of integer matrices and of 16-bit operators: where the means are formed and in which dtype.

Both are checked against block means computed by hand in float64 from the exact entries (a loop over blocks), rounded
once to the dtype the result is documented to have.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
from gpytorch.kernels import RBFKernel
from linear_operator.operators import (
    DenseLinearOperator,
    DiagLinearOperator,
    LowRankRootAddedDiagLinearOperator,
    LowRankRootLinearOperator,
    SumLinearOperator,
)
from torch.utils._python_dispatch import TorchDispatchMode

from bma_gp import Partition, block_mean, block_mean_from_sums

pytestmark = pytest.mark.usefixtures("one_thread")  # small problems

HALF = [torch.float16, torch.bfloat16]


def _hand_block_mean(A: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lam and B of the symmetric part of ``A`` (any dtype; computed in float64), one block pair at a time."""
    A = A.double()
    A = (A + A.mT) / 2
    k = int(labels.max()) + 1
    lam = torch.zeros(*A.shape[:-2], k, dtype=torch.float64)
    B = torch.zeros(*A.shape[:-2], k, k, dtype=torch.float64)
    for i in range(k):
        rows = (labels == i).nonzero().squeeze(-1)
        s = len(rows)
        for j in range(k):
            block = A[..., rows, :][..., (labels == j).nonzero().squeeze(-1)]
            if i != j:
                B[..., i, j] = block.mean(dim=(-2, -1))
                continue
            trace = torch.diagonal(block, dim1=-2, dim2=-1).sum(-1)
            if s > 1:
                B[..., i, i] = (block.sum(dim=(-2, -1)) - trace) / (s * (s - 1))
            lam[..., i] = trace / s - B[..., i, i]
    return lam, B


def _assert_rounded_from(result: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    """``result`` is ``exact`` rounded once to ``dtype``: within half an ulp (one ulp of slack for the order of the
    float64 sums)."""
    assert result.dtype == dtype
    torch.testing.assert_close(result.detach().double(), exact, rtol=torch.finfo(dtype).eps, atol=0)


# ---------------------------------------------------------------- integer matrices
def _near_2_24(dtype: torch.dtype) -> torch.Tensor:
    """Diagonal 2^24 - 1, off-diagonal 2^24 - 2: every entry and every exact mean is a float32 number, but
    lam = mean(diagonal) - mean(off-diagonal) = 1 is a difference of two means near 2^24."""
    n = 6
    return torch.full((n, n), 2**24 - 2, dtype=dtype) + torch.eye(n, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("layout", ["contiguous", "scattered"])
def test_integer_means_are_formed_in_float64(dtype, layout):
    """The int64 block sums of an integer ``A`` were divided by torch's true division, in the default dtype
    (float32): lam came out 2 for 1, and B[0, 0] 16777213 for 16777214, where the same matrix as a float32 tensor
    (summed and differenced in float64) is exact. The means are now formed in float64 and rounded to the default
    dtype, which stays the result's dtype."""
    A = _near_2_24(dtype)
    partition = Partition.from_sizes([3, 3]) if layout == "contiguous" else Partition.from_labels([0, 1, 1, 0, 1, 0])
    lam, B = _hand_block_mean(A, partition.labels)
    assert torch.equal(lam, torch.ones(2, dtype=torch.float64)) and float(B[0, 0]) == 2**24 - 2  # the hand loop
    result = block_mean(A, partition)
    assert result.dtype == torch.get_default_dtype() == torch.float32
    assert torch.equal(result.lam, lam.float()) and torch.equal(result.B, B.float())  # exact in float32
    assert torch.equal(result.lam, block_mean(A.float(), partition).lam)  # as the float32 tensor gives
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        wide = block_mean(A, partition)
    finally:
        torch.set_default_dtype(default)
    assert wide.dtype == torch.float64 and torch.equal(wide.lam, lam) and torch.equal(wide.B, B)


def test_random_integer_matrix_matches_float64_means():
    """Integers up to 2^30 in scattered blocks: each mean is the float64 one rounded once to float32 (float32
    division of the int64 sums was off by up to 2^6 in lam, which is small against the entries)."""
    generator = torch.Generator().manual_seed(3)
    n, k = 40, 3
    labels = torch.randperm(n, generator=generator) % k
    partition = Partition.from_labels(labels)
    A = 2**30 + torch.randint(-50, 50, (n, n), generator=generator)
    A = A + A.mT + torch.diag(torch.randint(1, 1000, (n,), generator=generator))
    lam, B = _hand_block_mean(A, labels)
    result = block_mean(A, partition)
    _assert_rounded_from(result.lam, lam, torch.float32)
    _assert_rounded_from(result.B, B, torch.float32)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_integer_block_sums_are_divided_in_float64(dtype):
    """``block_mean_from_sums`` of integer sums: the same true division in float32, the same cancellation."""
    A = _near_2_24(torch.int64)
    partition = Partition.from_sizes([2, 4])
    lam, B = _hand_block_mean(A, partition.labels)
    block_sums = partition.block_sum(partition.block_sum(A, dim=-1), dim=-2)
    diag_sums = partition.block_sum(torch.diagonal(A), dim=-1)
    if dtype == torch.int32:  # the sums fit: 16 entries of 2^24
        block_sums, diag_sums = block_sums.to(dtype), diag_sums.to(dtype)
    result = block_mean_from_sums(block_sums, diag_sums, partition)
    assert result.dtype == torch.float32
    assert torch.equal(result.lam, lam.float()) and torch.equal(result.B, B.float())


# ---------------------------------------------------------------- 16-bit operators
@pytest.mark.parametrize("dtype", HALF)
def test_16bit_operator_products_do_not_overflow(dtype):
    """A float16 operator (not a ``DenseLinearOperator``) was multiplied by the block indicators in float16: the row
    sums of 1000 entries of 100 overflowed (B = inf, lam = -inf), and in bfloat16 they kept 8 bits, where the 16-bit
    tensor (summed in float64) gives B = 100, lam = 0."""
    n = 1000
    A = torch.full((n, n), 100.0, dtype=dtype)
    partition = Partition.from_sizes([n])
    operator = SumLinearOperator(DenseLinearOperator(A), DiagLinearOperator(torch.zeros(n, dtype=dtype)))
    result = block_mean(operator, partition)
    assert result.dtype == dtype
    assert torch.equal(result.B, torch.full((1, 1), 100.0, dtype=dtype))
    assert torch.equal(result.lam, torch.zeros(1, dtype=dtype))
    tensor = block_mean(A, partition)
    assert torch.equal(result.B, tensor.B) and torch.equal(result.lam, tensor.lam)


def _nearly_equal(n: int, dtype: torch.dtype, generator: torch.Generator, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """A symmetric 16-bit matrix of entries near 1 (a kernel matrix at a long lengthscale): lam = d / s - B_ii
    cancels, so row sums rounded to 11 or 8 bits put it far off."""
    noise = torch.rand(*batch, n, n, generator=generator, dtype=torch.float64)
    return (1 + 0.01 * (noise + noise.mT)).to(dtype)


def _summed_operators(dtype: torch.dtype, generator: torch.Generator):
    """(name, operator, its exact float64 matrix) for operators whose products were formed in 16 bits."""
    n = 256
    A = _nearly_equal(n, dtype, generator)
    jitter = torch.full((n,), 2.0**-6, dtype=dtype)
    exact = A.double() + torch.diag(jitter.double())
    root = (1 + 0.01 * torch.rand(n, 2, generator=generator, dtype=torch.float64)).to(dtype)
    batched = _nearly_equal(n, dtype, generator, batch=(2,))
    return [
        ("dense+diag", SumLinearOperator(DenseLinearOperator(A), DiagLinearOperator(jitter)), exact),
        ("added-diag", DenseLinearOperator(A) + DiagLinearOperator(jitter), exact),
        (
            "scaled",
            DenseLinearOperator(A) * 2.0 + DiagLinearOperator(jitter),
            2 * A.double() + torch.diag(jitter.double()),
        ),
        (
            "root+diag",
            LowRankRootAddedDiagLinearOperator(LowRankRootLinearOperator(root), DiagLinearOperator(jitter)),
            root.double() @ root.double().mT + torch.diag(jitter.double()),
        ),
        (
            "batch",
            DenseLinearOperator(batched) + DiagLinearOperator(jitter),
            batched.double() + torch.diag(jitter.double()),
        ),
    ]


@pytest.mark.parametrize("dtype", HALF)
def test_16bit_operators_are_summed_in_float64(dtype):
    """Entries near 1 with lam = 2^-6: the 16-bit products of each summand (and their 16-bit sum) put lam off by
    several ulps of its dtype. Each summand is now summed in float64 and only the means are rounded, so the result is
    the float64 block mean of the operator's exact entries, rounded once."""
    generator = torch.Generator().manual_seed(5)
    labels = torch.randperm(256, generator=generator) % 3
    partition = Partition.from_labels(labels)
    for name, operator, exact in _summed_operators(dtype, generator):
        assert operator.dtype == dtype, name
        lam, B = _hand_block_mean(exact, labels)
        result = block_mean(operator, partition, chunk_columns=2)
        assert result.lam.shape == lam.shape, name
        _assert_rounded_from(result.lam, lam, dtype)
        _assert_rounded_from(result.B, B, dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_16bit_operator_gradients_reach_its_tensors(dtype):
    """The widened products stay differentiable: the gradients of a 16-bit ``dense + diag`` operator's tensors are
    those of the same means in float64 (the block means are linear in A), rounded to the dtype."""
    generator = torch.Generator().manual_seed(7)
    n = 300
    labels = torch.randperm(n, generator=generator) % 4
    partition = Partition.from_labels(labels)
    A = _nearly_equal(n, dtype, generator).requires_grad_(True)
    jitter = torch.full((n,), 2.0**-6, dtype=dtype, requires_grad=True)
    # cotangents exact in 16 bits, and symmetric (B's gradient is then that of the symmetric part's)
    w_lam = torch.randint(-8, 9, (4,), generator=generator).double() / 4
    w_B = torch.randint(-8, 9, (4, 4), generator=generator).double() / 4
    w_B = w_B + w_B.mT
    result = block_mean(DenseLinearOperator(A) + DiagLinearOperator(jitter), partition)
    ((result.lam.double() * w_lam).sum() + (result.B.double() * w_B).sum()).backward()
    A64 = A.detach().double().requires_grad_(True)
    jitter64 = jitter.detach().double().requires_grad_(True)
    lam, B = _hand_block_mean(A64 + torch.diag(jitter64), labels)
    _assert_rounded_from(result.lam, lam.detach(), dtype)
    ((lam * w_lam).sum() + (B * w_B).sum()).backward()
    assert A.grad.dtype == jitter.grad.dtype == dtype
    _assert_rounded_from(A.grad, A64.grad, dtype)
    _assert_rounded_from(jitter.grad, jitter64.grad, dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_16bit_lazy_kernel_operator(dtype):
    """A 16-bit GPyTorch kernel tensor plus a jitter (the kernel is held inside the sum): the same float64 sums of
    its entries, and the kernel is left in its dtype (linear_operator's ``.to(dtype)`` would cast it in place) with
    gradients reaching its parameters."""
    generator = torch.Generator().manual_seed(11)
    n = 240
    labels = torch.randperm(n, generator=generator) % 3
    partition = Partition.from_labels(labels)
    x = torch.rand(n, 1, generator=generator).to(dtype)
    kernel = RBFKernel().to(dtype)
    kernel.lengthscale = 10.0
    jitter = torch.full((n,), 2.0**-6, dtype=dtype)
    with torch.no_grad(), gpytorch.settings.lazily_evaluate_kernels(False):
        exact = kernel(x, x).to_dense().double() + torch.diag(jitter.double())  # the kernel's own 16-bit entries
    lam, B = _hand_block_mean(exact, labels)
    result = block_mean(kernel(x, x) + DiagLinearOperator(jitter), partition)
    assert all(p.dtype == dtype for p in kernel.parameters())
    _assert_rounded_from(result.lam, lam, dtype)
    _assert_rounded_from(result.B, B, dtype)
    result.lam.float().sum().backward()
    assert kernel.raw_lengthscale.grad is not None and torch.isfinite(kernel.raw_lengthscale.grad).all()


def test_float_operator_products_keep_their_dtype():
    """Only 16-bit operators are widened: a float32 operator's products are formed in float32 as before (so the
    gradient path of float32 and float64 operators is unchanged), and they still differentiate."""
    generator = torch.Generator().manual_seed(13)
    n = 50
    partition = Partition.from_labels(torch.randperm(n, generator=generator) % 3)
    A = torch.randn(n, n, generator=generator).requires_grad_(True)
    seen = []

    class Recording(DenseLinearOperator):
        def _matmul(self, rhs):
            seen.append(rhs.dtype)
            return super()._matmul(rhs)

    result = block_mean(SumLinearOperator(Recording(A), DiagLinearOperator(torch.ones(n))), partition)
    assert result.dtype == torch.float32 and seen and set(seen) == {torch.float32}
    result.lam.sum().backward()
    assert A.grad is not None


def test_16bit_dense_summand_is_not_copied_whole():
    """The float16 ``dense + diag`` operator's dense summand is widened a chunk of rows at a time, as a float16
    tensor is: casting the operator to float64 would add an n x n float64 copy (72 MB at n = 3000).

    Counted as the largest float32 / float64 tensor any torch operation returns (views of the float16 input do not
    count): the process's peak memory, measured first, read 4-8 MB in some runs and 60-64 MB in others for the same
    code, as glibc kept or returned the freed chunks."""
    n = 3000
    A = torch.full((n, n), 100.0, dtype=torch.float16)
    partition = Partition.from_labels(torch.arange(n) % 7)
    operator = DenseLinearOperator(A) + DiagLinearOperator(torch.zeros(n, dtype=torch.float16))

    class LargestWide(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value in out if isinstance(out, (tuple, list)) else (out,):
                if torch.is_tensor(value) and value.dtype in (torch.float32, torch.float64):
                    LargestWide.largest = max(LargestWide.largest, value.numel())
            return out

    with LargestWide():
        result = block_mean(operator, partition)
    assert torch.equal(result.B, torch.full((7, 7), 100.0, dtype=torch.float16))
    assert 0 < LargestWide.largest < n * n // 4, LargestWide.largest
