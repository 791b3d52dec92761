"""kernel_block_mean: values and hyperparameter gradients against the dense block mean, both paths."""

import copy
import importlib
from unittest import mock

import gpytorch
import pytest
import torch
from gpytorch.kernels import LinearKernel, MaternKernel, PeriodicKernel, RBFKernel, ScaleKernel

from autograd_graph import graph_nodes
from bma_gp import BlockMeanLinearOperator, Partition, block_mean
from bma_gp.kernel_block_mean import kernel_block_mean
from gloo_ranks import run_on_ranks

# the package re-exports the function under the module's name, so fetch the modules themselves
generic = importlib.import_module("bma_gp._kernel_sums.generic")
stationary = importlib.import_module("bma_gp._kernel_sums.stationary")
jit = importlib.import_module("bma_gp._kernel_sums.jit")

N, D = 150, 3


def _x(n=N, d=D, dtype=torch.float64, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


PARTITIONS = {
    "scattered": lambda n: Partition.from_labels(torch.randint(9, (n,), generator=torch.Generator().manual_seed(1))),
    "contiguous": lambda n: Partition.from_sizes([1, n // 3, n - n // 3 - 3, 2]),  # with a singleton block
    "one_block": lambda n: Partition.from_labels(torch.zeros(n, dtype=torch.long)),
    "singletons": lambda n: Partition.from_labels(torch.randperm(n, generator=torch.Generator().manual_seed(2))),
}

KERNELS = {
    "rbf": lambda: ScaleKernel(RBFKernel()),
    "rbf_ard": lambda: ScaleKernel(RBFKernel(ard_num_dims=D)),
    "rbf_bare": lambda: RBFKernel(),
    "matern05_ard": lambda: ScaleKernel(MaternKernel(nu=0.5, ard_num_dims=D)),
    "matern15": lambda: ScaleKernel(MaternKernel(nu=1.5)),
    "matern25_ard": lambda: ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=D)),
    "periodic_plus_linear": lambda: ScaleKernel(PeriodicKernel()) + LinearKernel(),  # generic path only
}


def _set_hypers(kernel, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in kernel.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return kernel


def _dense_reference(kernel, x, partition):
    with gpytorch.settings.lazily_evaluate_kernels(False):
        K = kernel(x, x).to_dense()
    return block_mean(K, partition)


def _loss(op):  # touches lam and every entry of B with different weights
    w = torch.linspace(-1, 2, op.B.shape[-1], dtype=op.B.dtype)
    return (op.lam * w).sin().sum() + (op.B * w).square().sum() + (op.B * w.unsqueeze(-1)).sum()


def _compare(kernel, x, partition, atol=1e-9, **kwargs):
    op = kernel_block_mean(kernel, x, partition, **kwargs)
    ref = _dense_reference(kernel, x, partition)
    assert isinstance(op, BlockMeanLinearOperator)
    torch.testing.assert_close(op.B, ref.B, atol=atol, rtol=1e-7)
    torch.testing.assert_close(op.lam, ref.lam, atol=max(atol, 1e-7), rtol=1e-6)
    params = [p for p in kernel.parameters()]
    g = torch.autograd.grad(_loss(op), params)
    g_ref = torch.autograd.grad(_loss(ref), params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=max(atol, 1e-7) * 10, rtol=1e-6)
    return op


@pytest.mark.parametrize("kernel_name", list(KERNELS))
@pytest.mark.parametrize("fused", [None, False])
def test_values_and_gradients_match_dense(kernel_name, fused):
    kernel = _set_hypers(KERNELS[kernel_name]().double())
    _compare(kernel, _x(), PARTITIONS["scattered"](N), chunk_size=40, fused=fused)


@pytest.mark.parametrize("partition_name", ["contiguous", "one_block", "singletons"])
@pytest.mark.parametrize("kernel_name", ["rbf_ard", "matern15", "periodic_plus_linear"])
def test_partition_shapes(kernel_name, partition_name):
    kernel = _set_hypers(KERNELS[kernel_name]().double())
    _compare(kernel, _x(), PARTITIONS[partition_name](N), chunk_size=40)


@pytest.mark.parametrize("chunk_size", [1, 7, 10 * N, None])
def test_chunk_size_does_not_change_the_result(chunk_size):
    kernel = _set_hypers(ScaleKernel(RBFKernel(ard_num_dims=D)).double())
    _compare(kernel, _x(), PARTITIONS["scattered"](N), chunk_size=chunk_size)


def _matern_plus_rbf(dtype):
    return ScaleKernel(MaternKernel(nu=0.5)).to(dtype) + ScaleKernel(RBFKernel()).to(dtype)  # generic engine


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_generic_engine_takes_the_exact_kernel_diagonal(dtype):
    """The per-block means of diag(K) of a non-RBF kernel sum equal the dense diagonal's to rounding, for any
    chunk_size. In a row chunk x1 is not x2, so gpytorch's self-distances are ~sqrt(eps), not zero: Matern-1/2
    turned that into diagonal means off by 3e-4 in float32 (~2700 eps)."""
    n = 600
    x = 20 * torch.rand(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x.to(dtype)
    partition = Partition.from_labels(torch.arange(n) % 10)
    kernel = _matern_plus_rbf(dtype)
    with torch.no_grad(), gpytorch.settings.lazily_evaluate_kernels(False):  # x1 is x2: exact zero distances
        dense_diag = kernel(x, x).to_dense().diagonal().double()
    want = partition.block_sum(dense_diag, dim=-1) / partition.sizes.double()
    eps = torch.finfo(dtype).eps
    ops = {chunk: kernel_block_mean(kernel, x, partition, chunk_size=chunk) for chunk in (7, 64, None, n)}
    for chunk, op in ops.items():
        got = (op.lam + torch.diagonal(op.B, dim1=-2, dim2=-1)).detach().double()
        torch.testing.assert_close(got, want, rtol=0, atol=8 * eps * float(want.abs().max()), msg=f"chunk {chunk}")
        torch.testing.assert_close(op.lam, ops[n].lam, rtol=8 * eps, atol=8 * eps, msg=f"chunk {chunk}")
        torch.testing.assert_close(op.B, ops[n].B, rtol=8 * eps, atol=8 * eps, msg=f"chunk {chunk}")
    # the gradient path: k(x_i, x_i) does not depend on the lengthscales, so neither do the diagonal means
    op = ops[64]
    lengthscales = [kernel.kernels[0].base_kernel.raw_lengthscale, kernel.kernels[1].base_kernel.raw_lengthscale]
    grads = torch.autograd.grad((op.lam + torch.diagonal(op.B, dim1=-2, dim2=-1)).sum(), lengthscales)
    for g in grads:
        assert float(g.abs().max()) <= 8 * eps, g


def test_generic_engine_gradients_with_the_exact_diagonal_match_dense():
    """Hyperparameter and input gradients through the exact-diagonal evaluation, against dense (float64)."""
    kernel = _set_hypers(ScaleKernel(MaternKernel(nu=0.5)).double() + ScaleKernel(PeriodicKernel()).double())
    _compare(kernel, _x(), PARTITIONS["scattered"](N), chunk_size=17)
    x1, x2 = _x().requires_grad_(True), _x().requires_grad_(True)
    partition = PARTITIONS["contiguous"](N)
    g = torch.autograd.grad(_loss(kernel_block_mean(kernel, x1, partition, chunk_size=23)), x1)[0]
    g_ref = torch.autograd.grad(_loss(_dense_reference(kernel, x2, partition)), x2)[0]
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)


def test_fused_path_is_taken_for_stationary_kernels():
    kernel = _set_hypers(ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=D)).double())
    with mock.patch.object(generic.GenericKernelSums, "apply", side_effect=AssertionError("generic path used")):
        op = kernel_block_mean(kernel, _x(), PARTITIONS["scattered"](N), fused=True)
        _loss(op).backward()
    assert kernel.base_kernel.raw_lengthscale.grad is not None


def test_generic_path_for_other_kernels_and_fused_true_rejects_them():
    kernel = _set_hypers(ScaleKernel(PeriodicKernel()).double())
    with mock.patch.object(stationary.StationaryBlockMeans, "apply", side_effect=AssertionError("fused path used")):
        kernel_block_mean(kernel, _x(), PARTITIONS["scattered"](N))
    with pytest.raises(ValueError, match="fused=True"):
        kernel_block_mean(kernel, _x(), PARTITIONS["scattered"](N), fused=True)


def test_generic_backward_reevaluates_chunks_without_keeping_them():
    kernel = _set_hypers(ScaleKernel(PeriodicKernel()).double())
    x, partition = _x(), PARTITIONS["scattered"](N)
    calls = []
    real = generic.evaluate

    def counting(kern, x1, x2):
        if x2.shape[-2] == N:  # a chunk of rows against every point (not the one-entry dtype probe)
            calls.append(x1.shape[-2])
        return real(kern, x1, x2)

    with mock.patch.object(generic, "evaluate", side_effect=counting):
        op = kernel_block_mean(kernel, x, partition, chunk_size=40)
        forward_calls = len(calls)
        _loss(op).backward()
    assert forward_calls == 4 and len(calls) == 8  # 150 rows in chunks of 40, re-evaluated once in backward
    assert max(calls) <= 40
    # the graph holds one custom node instead of per-chunk kernel graphs
    seen = graph_nodes(op.B)
    assert any("GenericKernelSums" in type(node).__name__ for node in seen)
    assert len(seen) < 40


def test_gradient_with_respect_to_inputs():
    kernel = _set_hypers(ScaleKernel(RBFKernel(ard_num_dims=D)).double())
    partition = PARTITIONS["scattered"](N)
    x1 = _x().requires_grad_(True)
    x2 = _x().requires_grad_(True)
    g = torch.autograd.grad(_loss(kernel_block_mean(kernel, x1, partition, chunk_size=31)), x1)[0]
    g_ref = torch.autograd.grad(_loss(_dense_reference(kernel, x2, partition)), x2)[0]
    torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("fused", [None, False])
def test_batch_kernels_and_batch_inputs(fused):
    batch = torch.Size([2])
    kernel = _set_hypers(ScaleKernel(RBFKernel(ard_num_dims=D, batch_shape=batch), batch_shape=batch).double())
    op = _compare(kernel, _x(), PARTITIONS["scattered"](N), chunk_size=50, fused=fused)
    assert op.shape == (2, N, N)
    x = torch.stack([_x(seed=0), _x(seed=1)])
    op = _compare(kernel, x, PARTITIONS["contiguous"](N), chunk_size=50, fused=fused)
    assert op.shape == (2, N, N)


def test_active_dims_are_respected():
    kernel = _set_hypers(ScaleKernel(RBFKernel(ard_num_dims=2, active_dims=[0, 2])).double())
    _compare(kernel, _x(), PARTITIONS["scattered"](N), chunk_size=40)


@pytest.mark.parametrize("kernel_name", ["rbf_ard", "matern05_ard", "matern25_ard"])
@pytest.mark.parametrize("derivatives", ["kept", "evaluated_again"])
def test_float32_fused_is_accurate(kernel_name, derivatives, monkeypatch, tile_backend):
    _derivatives_from(monkeypatch, derivatives)
    kernel64 = _set_hypers(KERNELS[kernel_name]().double())
    partition = PARTITIONS["scattered"](400)
    x = _x(400)
    ref = kernel_block_mean(kernel64, x, partition, fused=False)
    g_ref = torch.autograd.grad(_loss(ref), list(kernel64.parameters()))
    kernel32 = kernel64.float()
    op = kernel_block_mean(kernel32, x.float(), partition, fused=True)
    assert op.B.dtype == torch.float32
    torch.testing.assert_close(op.B.double(), ref.B, atol=1e-5, rtol=1e-5)
    g = torch.autograd.grad(_loss(op), list(kernel32.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.double(), b, atol=1e-3, rtol=1e-4)


def test_result_is_positive_semidefinite_block_mean():
    kernel = _set_hypers(ScaleKernel(MaternKernel(nu=1.5)).double())
    with torch.no_grad():
        op = kernel_block_mean(kernel, _x(), PARTITIONS["scattered"](N))
        assert float(torch.linalg.eigvalsh(op.to_dense()).min()) > -1e-10


def test_progress_bar(capsys):
    kernel = ScaleKernel(RBFKernel()).double()
    kernel_block_mean(kernel, _x(), PARTITIONS["scattered"](N), chunk_size=10, progress=True)
    assert "kernel block sums" in capsys.readouterr().err


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: kernel_block_mean("rbf", _x(), PARTITIONS["scattered"](N)), TypeError, "gpytorch"),
        (lambda: kernel_block_mean(RBFKernel(), _x().tolist(), PARTITIONS["scattered"](N)), TypeError, "x must"),
        (lambda: kernel_block_mean(RBFKernel(), _x().long(), PARTITIONS["scattered"](N)), ValueError, "floating"),
        (lambda: kernel_block_mean(RBFKernel(), _x(), torch.zeros(N)), TypeError, "Partition"),
        (lambda: kernel_block_mean(RBFKernel(), _x(N - 1), PARTITIONS["scattered"](N)), ValueError, "rows"),
        (lambda: kernel_block_mean(RBFKernel(), _x(), PARTITIONS["scattered"](N), 0), ValueError, "chunk_size"),
        (
            lambda: kernel_block_mean(RBFKernel(), _x(), PARTITIONS["scattered"](N), process_group=object()),
            ValueError,
            "not initialised",
        ),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------- torch.distributed
def _distributed_worker(rank, world):
    import torch.distributed as dist

    results = {}
    for name, fused in DISTRIBUTED_CASES:
        # "fused_again": the stationary engine evaluates every tile again in backward
        stationary.MAX_ROW_BLOCKS = 0 if name == "fused_again" else 32
        kernel = _set_hypers(ScaleKernel(RBFKernel(ard_num_dims=D)).double())
        op = kernel_block_mean(
            kernel, _x(), PARTITIONS["scattered"](N), chunk_size=16, fused=fused, process_group=dist.group.WORLD
        )
        _loss(op).backward()
        results[name] = [op.lam.detach(), op.B.detach()] + [p.grad for p in kernel.parameters()]
    return results


DISTRIBUTED_CASES = (("fused", None), ("fused_again", None), ("generic", False))


@pytest.mark.slow
def test_distributed_two_ranks_equal_single_process():
    ranks = run_on_ranks(_distributed_worker, 2)
    for name, fused in DISTRIBUTED_CASES:
        kernel = _set_hypers(ScaleKernel(RBFKernel(ard_num_dims=D)).double())
        op = kernel_block_mean(kernel, _x(), PARTITIONS["scattered"](N), fused=fused)
        _loss(op).backward()
        single = [op.lam.detach(), op.B.detach()] + [p.grad for p in kernel.parameters()]
        for r in range(2):
            for got, want in zip(ranks[r][name], single):
                torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fused", [None, False])
def test_cuda_matches_cpu(fused):
    kernel = _set_hypers(ScaleKernel(RBFKernel(ard_num_dims=D)).double())
    partition = PARTITIONS["scattered"](N)
    op = kernel_block_mean(kernel, _x(), partition, chunk_size=40, fused=fused)
    g = torch.autograd.grad(_loss(op), list(kernel.parameters()))
    kernel_gpu = kernel.cuda()
    op_gpu = kernel_block_mean(kernel_gpu, _x().cuda(), partition.to("cuda"), chunk_size=40, fused=fused)
    assert op_gpu.B.device.type == "cuda"
    torch.testing.assert_close(op_gpu.B.cpu(), op.B, atol=1e-9, rtol=1e-7)
    g_gpu = torch.autograd.grad(_loss(op_gpu), list(kernel_gpu.parameters()))
    for a, b in zip(g_gpu, g):
        torch.testing.assert_close(a.cpu(), b, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------- tiles of the stationary engine
@pytest.mark.parametrize("n, rows, cols", [(37, 8, 16), (150, 64, 64), (5, 8, 8), (64, 16, 2048), (10, 1, 3)])
def test_tiles_cover_every_ordered_pair_once(n, rows, cols):
    count = torch.zeros(n, n, dtype=torch.long)
    for r0, r1, c0, c1, mirror in stationary.tile_ranges(n, rows, cols):
        assert r1 - r0 <= rows and c1 - c0 <= max(rows, cols) and mirror == (c0 >= r1)
        block = torch.zeros(n, n, dtype=torch.long)
        block[r0:r1, c0:c1] = 1
        count += block + (block.T if mirror else 0)
    assert torch.equal(count, torch.ones(n, n, dtype=torch.long))


# where backward gets the lengthscale derivatives from: sums kept from forward, a second evaluation
# of every tile, or both (a budget that keeps some tiles only); torch's tile reduction keeps only
# tiles whose rows span few blocks
DERIVATIVES = {
    "kept": {},
    "evaluated_again": {"KEPT_DERIVATIVE_BYTES": 0, "KEPT_BYTES_PER_BLOCK_PAIR": 0},
    "mixed": {"KEPT_DERIVATIVE_BYTES": 2000, "KEPT_BYTES_PER_BLOCK_PAIR": 0},
    "few_row_blocks_kept": {"MAX_ROW_BLOCKS": 2},
}


def _derivatives_from(monkeypatch, name):
    for attr, value in DERIVATIVES[name].items():
        monkeypatch.setattr(stationary, attr, value)


@pytest.fixture(params=["numba", "torch"])
def tile_backend(request, monkeypatch):
    """Reduce tiles with the numba kernel, or with torch's ops; asserts the chosen one ran."""
    if request.param == "numba" and not jit.AVAILABLE:
        pytest.skip("numba is not installed (pip install bma-gp[jit])")
    monkeypatch.setattr(jit, "BACKEND", request.param)
    monkeypatch.setattr(jit, "MIN_ENTRIES", 0)  # numba at the tests' sizes too
    ran = []
    real = jit.tile_sums
    monkeypatch.setattr(jit, "tile_sums", lambda *args, **kwargs: ran.append(1) or real(*args, **kwargs))
    yield request.param
    assert bool(ran) == (request.param == "numba")


@pytest.mark.parametrize("derivatives", list(DERIVATIVES))
@pytest.mark.parametrize("kernel_name", ["rbf", "rbf_ard", "matern05_ard", "matern15", "matern25_ard"])
@pytest.mark.parametrize("chunk_size", [13, 64])
def test_fused_tiles_cut_blocks(kernel_name, chunk_size, derivatives, monkeypatch, tile_backend):
    monkeypatch.setattr(stationary, "TILE_COLS", 24)  # several mirrored tiles per row group
    _derivatives_from(monkeypatch, derivatives)
    # contiguous blocks of very different sizes: tiles of 13 or 64 rows start and end inside blocks
    sizes = [1, 23, 5, 40, 17, 3, 1, 2, 58]
    assert sum(sizes) == N
    kernel = _set_hypers(KERNELS[kernel_name]().double())
    with mock.patch.object(generic.GenericKernelSums, "apply", side_effect=AssertionError("generic path used")):
        _compare(kernel, _x(), Partition.from_sizes(sizes), chunk_size=chunk_size)


@pytest.mark.parametrize("derivatives", list(DERIVATIVES))
@pytest.mark.parametrize("chunk_size", [5, 37, 256])
def test_fused_many_small_blocks_scattered(chunk_size, derivatives, monkeypatch, tile_backend):
    _derivatives_from(monkeypatch, derivatives)
    # k close to n: every tile spans many blocks in its rows and in its columns
    labels = torch.unique(torch.randint(60, (N,), generator=torch.Generator().manual_seed(4)), return_inverse=True)[1]
    kernel = _set_hypers(ScaleKernel(RBFKernel(ard_num_dims=D)).double())
    _compare(kernel, _x(), Partition.from_labels(labels), chunk_size=chunk_size, fused=True)


def test_backward_evaluates_again_only_the_tiles_it_did_not_keep(monkeypatch, tile_backend):
    kernel = _set_hypers(ScaleKernel(RBFKernel(ard_num_dims=D)).double())
    partition = PARTITIONS["scattered"](N)
    calls = []
    real = stationary._TilePass.distances

    def counting(self, tile):
        calls.append(tile)
        return real(self, tile)

    monkeypatch.setattr(stationary._TilePass, "distances", counting)
    monkeypatch.setattr(stationary, "TILE_COLS", 32)
    op = kernel_block_mean(kernel, _x(), partition, chunk_size=32)
    forward = len(calls)
    _loss(op).backward()
    assert forward == 5 + 4 + 3 + 2 + 1 and len(calls) == forward  # everything kept: no second evaluation
    monkeypatch.setattr(stationary, "KEPT_DERIVATIVE_BYTES", 0)
    monkeypatch.setattr(stationary, "KEPT_BYTES_PER_BLOCK_PAIR", 0)
    calls.clear()
    _loss(kernel_block_mean(kernel, _x(), partition, chunk_size=32)).backward()
    assert len(calls) == 2 * forward


def test_fused_batch_and_float32():
    batch = torch.Size([2])
    base = MaternKernel(nu=2.5, ard_num_dims=D, batch_shape=batch)
    kernel = _set_hypers(ScaleKernel(base, batch_shape=batch).double())
    x = torch.stack([_x(seed=0), _x(seed=1)])
    _compare(kernel, x, PARTITIONS["scattered"](N), chunk_size=50, fused=True)
    kernel64 = _set_hypers(ScaleKernel(RBFKernel(ard_num_dims=D)).double())
    kernel32 = _set_hypers(ScaleKernel(RBFKernel(ard_num_dims=D)).double()).float()
    op32 = kernel_block_mean(kernel32, _x().float(), PARTITIONS["contiguous"](N), chunk_size=29)
    ref = _dense_reference(kernel64, _x(), PARTITIONS["contiguous"](N))
    torch.testing.assert_close(op32.B.double(), ref.B, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kernel_name", ["rbf", "rbf_ard", "matern05_ard", "matern15"])
def test_without_gradient_the_stationary_engine_records_no_graph(kernel_name):
    kernel = _set_hypers(KERNELS[kernel_name]().double())
    partition = PARTITIONS["scattered"](N)
    ref = _dense_reference(kernel, _x(), partition)
    with (
        torch.no_grad(),
        mock.patch.object(generic.GenericKernelSums, "apply", side_effect=AssertionError("generic")),
        mock.patch.object(stationary.StationaryBlockMeans, "apply", side_effect=AssertionError("autograd")),
    ):
        op = kernel_block_mean(kernel, _x(), partition, chunk_size=40)
    torch.testing.assert_close(op.B, ref.B, atol=1e-9, rtol=1e-7)  # the tolerances of _compare
    torch.testing.assert_close(op.lam, ref.lam, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("numba", [True, False])
def test_the_kept_budget_is_the_larger_of_a_floor_and_a_share_per_block_pair(monkeypatch, numba):
    """Tiles keep their derivative sums in order while they fit: KEPT_DERIVATIVE_BYTES, or KEPT_BYTES_PER_BLOCK_PAIR
    per batch x k x k block pair where that is more; torch's reduction only for tiles of few row blocks."""
    Tile = stationary.Tile
    tiles = [Tile(0, 1, 0, 1, False, 0, m, 0, q) for m, q in [(2, 10), (40, 3), (3, 5), (1, 1)]]
    # float32, d = 2: 160, 960, 120 and 8 bytes
    monkeypatch.setattr(stationary, "KEPT_DERIVATIVE_BYTES", 300)
    monkeypatch.setattr(stationary, "KEPT_BYTES_PER_BLOCK_PAIR", 0)
    assert list(stationary._kept_shapes(tiles, 1, 20, 2, 4, numba, True)) == [0, 2, 3]  # 160 + 120 + 8 <= 300
    monkeypatch.setattr(stationary, "KEPT_BYTES_PER_BLOCK_PAIR", 3)  # 3 x 20^2 = 1200 bytes
    kept = stationary._kept_shapes(tiles, 1, 20, 2, 4, numba, True)
    assert list(kept) == ([0, 1, 3] if numba else [0, 2, 3])  # 160 + 960 + 120 > 1200: the third does not fit
    assert kept[0] == (1, 2, 2, 10)
    assert stationary._kept_shapes(tiles, 2, 20, 2, 4, numba, True).keys() == ({0, 1, 3} if numba else {0, 2, 3})
    assert stationary._kept_shapes(tiles, 1, 20, 2, 4, numba, False) == {}  # no gradient wanted: nothing kept


@pytest.mark.parametrize("kernel", [RBFKernel(), MaternKernel(nu=2.5), MaternKernel(nu=0.5)], ids=["rbf", "m52", "m12"])
@pytest.mark.parametrize("engine", ["torch", "numba"])
def test_stationary_float32_inputs_with_an_offset_keep_their_digits(kernel, engine):
    """float32 dates near 60000 days with lengthscale 1 (user trial): the stationary engine scaled the inputs before
    centring, so z had lost the digits the offset takes and the block means were 1e-3 off (the generic engine,
    which centres x first, 1e-6). Against the float64 block means of the same points, values and gradient."""
    from bma_gp._kernel_sums import jit

    if engine == "numba" and not jit.AVAILABLE:
        pytest.skip("numba is not installed (the jit extra)")
    gen = torch.Generator().manual_seed(0)
    x32 = (60000 + 30 * torch.rand(600, generator=gen)).unsqueeze(-1)
    part = Partition.from_labels(torch.div(torch.argsort(torch.argsort(x32[:, 0])), 12, rounding_mode="floor"))
    k64 = ScaleKernel(copy.deepcopy(kernel)).double()
    ref = kernel_block_mean(k64, x32.double(), part)
    k32 = ScaleKernel(copy.deepcopy(kernel)).float()
    backend = jit.BACKEND
    jit.BACKEND = engine
    try:
        with mock.patch.object(jit, "MIN_ENTRIES", 0):
            got = kernel_block_mean(k32, x32, part)
            (g32,) = torch.autograd.grad(got.B.sum() + got.lam.sum(), k32.base_kernel.raw_lengthscale)
    finally:
        jit.BACKEND = backend
    assert got.lam.dtype == torch.float32
    # Matern-1/2's exp(-r) takes the square root of rho^2, whose float32 rounding near 0 shows at close pairs
    # (2e-5 in the generic engine too): 2e-4 there, 1e-3 before the fix
    atol = 2e-4 if getattr(kernel, "nu", None) == 0.5 else 2e-5
    torch.testing.assert_close(got.B.double(), ref.B, rtol=0, atol=atol)
    torch.testing.assert_close(got.lam.double(), ref.lam, rtol=0, atol=atol)
    (g64,) = torch.autograd.grad(ref.B.sum() + ref.lam.sum(), k64.base_kernel.raw_lengthscale)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-3, atol=1e-3 * float(g64.abs().max()))


def test_chunk_size_takes_any_integer_and_refuses_the_rest():
    """``chunk_size=np.int64(25)`` was refused as 'not a positive int' by kernel_block_mean and BlockMeanKernel,
    where block_mean(chunk_columns=...) and the partition builders take NumPy integers (user trial)."""
    import numpy as np

    from bma_gp.kernels import BlockMeanKernel

    x = torch.linspace(0, 1, 60, dtype=torch.float64).unsqueeze(-1)
    part = Partition.from_labels(torch.arange(60) // 6)
    kernel = gpytorch.kernels.RQKernel().double()
    ref = kernel_block_mean(kernel, x, part, chunk_size=25)
    for size in (np.int64(25), torch.tensor(25)):
        got = kernel_block_mean(kernel, x, part, chunk_size=size)
        torch.testing.assert_close(got.to_dense(), ref.to_dense())
        assert BlockMeanKernel(kernel, x, part, chunk_size=size).chunk_size == 25
    for bad in (0, -3, 2.5, True, "25"):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            kernel_block_mean(kernel, x, part, chunk_size=bad)
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            BlockMeanKernel(kernel, x, part, chunk_size=bad)


def _disagreeing_worker(rank, world):
    """Each case on every rank, with the world group: the type and message of what it raised, or None."""
    import torch.distributed as dist

    group = dist.group.WORLD
    kernel = ScaleKernel(RBFKernel()).double()

    def call(n, k, fused=None):
        return kernel_block_mean(
            kernel, _x(n), Partition.from_labels(torch.arange(n) % k), fused=fused, process_group=group
        )

    cases = {
        "same": lambda: call(12, 3),
        "k": lambda: call(12, 3 + rank),  # gloo aborted both processes (received data of another size)
        "n": lambda: call(12 + 2 * rank, 3),  # the same k: silently summed two problems
        "engine": lambda: call(12, 3, None if rank == 0 else False),  # each rank waited in the other's collective
    }
    found = {}
    for name, case in cases.items():
        try:
            with torch.no_grad():
                case()
            found[name] = None
        except (ValueError, TypeError) as error:
            found[name] = (type(error).__name__, str(error))
    other = dist.new_group([0])  # rank 1 is not a member
    try:
        kernel_block_mean(kernel, _x(12), Partition.from_labels(torch.arange(12) % 3), process_group=other)
        found["non_member"] = None
    except ValueError as error:
        found["non_member"] = ("ValueError", str(error))
    return found


@pytest.mark.slow
def test_distributed_ranks_that_disagree_raise_on_every_rank():
    ranks = run_on_ranks(_disagreeing_worker, 2)
    for found in ranks:
        assert found["same"] is None
        assert found["k"][0] == "ValueError" and "disagree on the number of blocks k" in found["k"][1]
        assert found["n"][0] == "ValueError" and "disagree on n" in found["n"][1]
        assert found["engine"][0] == "ValueError" and "disagree on the engine" in found["engine"][1]
    assert ranks[0]["non_member"] is None
    assert ranks[1]["non_member"][0] == "ValueError" and "not a member of process_group" in ranks[1]["non_member"][1]


def test_process_group_of_the_wrong_type(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # past the "not initialised" check
    for bad in (1, "WORLD", object()):
        with pytest.raises(TypeError, match="process_group must be a torch.distributed process group"):
            kernel_block_mean(
                ScaleKernel(RBFKernel()), _x(6), Partition.from_labels(torch.arange(6) % 2), process_group=bad
            )
