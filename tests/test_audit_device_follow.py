"""Device and dtype following, checked without a GPU on PyTorch's ``meta`` device, found by an audit.

A meta tensor has a shape, a dtype and a device but no values: an operation that mixes it with a CPU tensor raises
the error a CUDA user gets ("expected all tensors to be on the same device"), so a constant made on the default
device shows up here. Operations that need values on the host (``.item()``, validation, ``torch.unique``) fail on
meta with another error; the checks below keep to the operations that need none.

* ``block_mean_from_sums`` used the partition where it lay: sums on an accelerator with a partition built on the
  CPU (``Partition.from_labels`` of CPU labels) failed inside torch, where ``block_mean`` and the operator move the
  partition to the data; and float32 block sums with float64 diagonal sums raised a ``TypeError`` about ``lam`` and
  ``B``, arguments the caller never passed, while the other order promoted to float64;
* ``kmeans_objective`` used the partition where it lay as well: points on an accelerator with a CPU partition failed
  inside torch.
"""

from __future__ import annotations

import pytest
import torch

import bma_gp.partition_builders as builders
from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, Partition, block_mean, block_mean_from_sums

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems

META = torch.device("meta")
SCATTERED = [0, 1, 0, 2, 1, 3, 2, 1]
CONTIGUOUS = [0, 0, 1, 1, 1, 2, 2, 3]


def partition(labels) -> Partition:
    return Partition.from_labels(torch.tensor(labels))


# ---------------------------------------------------------------------------- block_mean_from_sums
@pytest.mark.parametrize("labels", [SCATTERED, CONTIGUOUS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_mean_from_sums_moves_a_cpu_partition_to_the_sums(labels, dtype):
    p = partition(labels)  # built on the CPU, as from CPU labels
    sums = torch.empty(4, 4, dtype=dtype, device=META)
    diag = torch.empty(4, dtype=dtype, device=META)
    M = block_mean_from_sums(sums, diag, p)
    assert M.device.type == "meta" and M.dtype == dtype
    assert M.partition.device.type == "meta"
    x = torch.empty(8, 3, dtype=dtype, device=META)
    assert (M @ x).device.type == "meta" and M.diagonal().device.type == "meta"


@pytest.mark.parametrize("low", ["block_sums", "diag_sums"])
def test_block_mean_from_sums_of_mixed_dtypes_follows_type_promotion(low):
    p = partition(SCATTERED)
    A = torch.randn(8, 8, dtype=torch.float64)
    A = A @ A.mT
    reference = block_mean(A, p)
    T = p.block_sum(p.block_sum(A, dim=-1), dim=-2)
    d = p.block_sum(torch.diagonal(A))
    T, d = (T.float(), d) if low == "block_sums" else (T, d.float())
    M = block_mean_from_sums(T, d, p)
    assert M.dtype == torch.float64
    torch.testing.assert_close(M.to_dense(), reference.to_dense(), rtol=1e-6, atol=1e-5)


def test_block_mean_from_sums_on_two_devices_is_refused_by_name():
    p = partition(SCATTERED)
    with pytest.raises(ValueError, match=r"block_sums is on cpu but diag_sums is on meta.*\.to\(device\)"):
        block_mean_from_sums(torch.zeros(4, 4), torch.zeros(4, device=META), p)


# ---------------------------------------------------------------------------- kmeans_objective
@pytest.mark.parametrize("labels", [SCATTERED, CONTIGUOUS])
def test_kmeans_objective_moves_a_cpu_partition_to_the_points(labels, monkeypatch):
    # the finiteness check reads values (a host synchronisation): skipped here, the rest runs on meta
    monkeypatch.setattr(builders, "_as_points", lambda x, name="x", **options: x)
    x = torch.empty(8, 2, device=META)
    value = builders.kmeans_objective(x, partition(labels))
    assert value.device.type == "meta" and value.dtype == torch.float64 and value.shape == ()


# ---------------------------------------------------------------------------- operators stay on the data's device
@pytest.mark.parametrize("labels", [SCATTERED, CONTIGUOUS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_operator_algebra_without_host_values_stays_on_the_device(labels, dtype):
    """What needs no values (products, diagonals, sums and products of operators, the approximation of a dense
    matrix) runs on meta from a CPU partition: no constant on the default device, float32 stays float32."""
    p = partition(labels)
    lam, B = torch.empty(4, dtype=dtype, device=META), torch.empty(4, 4, dtype=dtype, device=META)
    M = BlockMeanLinearOperator(lam, B, p)
    N = BlockMeanLinearOperator(
        torch.empty(2, dtype=dtype, device=META), torch.empty(2, 2, dtype=dtype, device=META), partition([0, 1] * 4)
    )
    x = torch.empty(8, 3, dtype=dtype, device=META)
    results = [
        M @ x,
        M.diagonal(),
        M.to_dense(),
        (M + M).to_dense(),
        (M @ M).to_dense(),
        (M * 2.0).to_dense(),
        (M @ N) @ x,
        block_mean(torch.empty(8, 8, dtype=dtype, device=META), p).to_dense(),
    ]
    for result in results:
        assert result.device.type == "meta" and result.dtype == dtype


def test_sum_constructor_moves_cpu_partitions_to_the_diagonal():
    parts = [partition(SCATTERED), partition([0, 1] * 4)]
    d = torch.empty(8, device=META)
    S = BlockMeanSumLinearOperator(d, torch.empty(4, 4, device=META), torch.empty(2, 2, device=META), partitions=parts)
    assert all(q.device.type == "meta" for q in S.partitions)
    assert (S @ torch.empty(8, 2, device=META)).device.type == "meta"


# ---------------------------------------------------------------------------- Partition's own methods
@pytest.mark.parametrize(
    "call",
    [
        ("block_sum", "x", lambda p, n, k: p.block_sum(torch.empty(3, n, device=META))),
        ("block_average", "x", lambda p, n, k: p.block_average(torch.empty(n, device=META))),
        ("block_dot", "x", lambda p, n, k: p.block_dot(torch.empty(n, device=META), torch.empty(n, device=META))),
        ("expand", "y", lambda p, n, k: p.expand(torch.empty(k, device=META))),
        (
            "expand_addcmul",
            "shift",
            lambda p, n, k: p.expand_addcmul(
                torch.empty(k, device=META), torch.empty(k, device=META), torch.empty(n, device=META)
            ),
        ),
        (
            "addcmul_",
            "y",
            lambda p, n, k: p.addcmul_(
                torch.empty(n, device=META), torch.empty(k, device=META), torch.empty(n, device=META)
            ),
        ),
    ],
    ids=lambda c: c[0] if isinstance(c, tuple) else None,
)
def test_partition_methods_name_data_on_another_device(call):
    """``block_sum``, ``block_average``, ``expand``, ... of a CPU partition with data on an accelerator raised torch's
    errors (or, on ``meta``, passed where CUDA fails); they name the argument and ``partition.to``. Partitions whose
    blocks are runs of equal size never index and keep working (``block_average`` divides by the sizes)."""
    method, name, fn = call
    p = partition(SCATTERED)
    with pytest.raises(ValueError, match=rf"{method}: {name} is on meta but the partition is on cpu.*partition\.to"):
        fn(p, len(p), p.num_blocks)
    fn(p.to(META), len(p), p.num_blocks)  # on the same device: no complaint


def test_partition_sums_over_runs_of_equal_blocks_need_no_index_on_the_data_device():
    """The runs of equal-size blocks are reshaped views, with no index tensor: they work wherever the data lie."""
    p = Partition.from_sizes([2, 2, 2, 2])
    assert p.block_sum(torch.empty(3, 8, device=META)).shape == (3, 4)
    assert p.block_dot(torch.empty(8, device=META), torch.empty(8, device=META)).shape == (4,)
