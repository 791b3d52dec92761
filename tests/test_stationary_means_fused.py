"""The stationary engine's fused block means (``StationaryBlockMeans``): values and gradients against the dense
block mean when only some hyperparameters want a gradient, when a loss reads only ``lam`` or only ``B``, and when
the outputscale's batch shape is wider than the sums' (the ``k x k`` steps run in place and by hand there).

Each test runs on both engines: torch's reduction, and numba's (tiles of 16 rows, so that blocks straddle tiles and
mirrored tiles hold diagonal block pairs), where the means come from one compiled pass
(``jit.block_means``) and backward hands ``dL/dB`` and factors to the contraction (``jit.GradientScaling``)."""

import importlib
from unittest import mock

import pytest
import torch
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel

from bma_gp import Partition
from bma_gp.kernel_block_mean import kernel_block_mean
from test_kernel_block_mean import _dense_reference, _set_hypers

stationary = importlib.import_module("bma_gp._kernel_sums.stationary")
jit = importlib.import_module("bma_gp._kernel_sums.jit")

N, D = 90, 2


@pytest.fixture(params=["torch", "numba"], autouse=True)
def engine(request, monkeypatch):
    """``kernel_block_mean`` keyword arguments; with "numba", the numba reduction for any size, and spies on the
    fused means and the scaled contraction (``engine["calls"]``)."""
    if request.param == "torch":
        monkeypatch.setattr(jit, "BACKEND", "torch")
        return {"kwargs": {}, "calls": None}
    pytest.importorskip("numba")
    monkeypatch.setattr(jit, "MIN_ENTRIES", 0)
    monkeypatch.setattr(jit, "MEANS_MIN_ENTRIES", 0)
    calls = {"block_means": 0, "scaled": 0, "plain": 0}
    real_means, real_contract = jit.block_means, jit.contract_kept

    def means(*args, **kwargs):
        calls["block_means"] += 1
        return real_means(*args, **kwargs)

    def contract(grad, kept, tiles, out, scaling=None):
        calls["scaled" if scaling is not None else "plain"] += 1
        return real_contract(grad, kept, tiles, out, scaling)

    monkeypatch.setattr(jit, "block_means", means)
    monkeypatch.setattr(jit, "contract_kept", contract)
    return {"kwargs": {"chunk_size": 16}, "calls": calls}


def _partition(kind):
    g = torch.Generator().manual_seed(3)
    if kind == "singletons_and_unequal":  # singleton blocks next to large ones, labels scattered
        labels = torch.cat([torch.arange(5), torch.full((30,), 5), torch.randint(6, 11, (N - 35,), generator=g)])
        return Partition.from_labels(labels[torch.randperm(N, generator=g)])
    return Partition.from_labels(torch.randint(7, (N,), generator=g))


def _kernel(name, dtype, batch_shape=()):
    base = RBFKernel(ard_num_dims=D) if name == "rbf_ard" else MaternKernel(nu=1.5)
    return _set_hypers(ScaleKernel(base, batch_shape=torch.Size(batch_shape)).to(dtype))


LOSSES = {
    "lam_only": lambda op, w: (op.lam * w).sin().sum(),
    "B_only": lambda op, w: (op.B * w).square().sum() + (op.B * w.unsqueeze(-1)).sum(),
    "both": lambda op, w: (op.lam * w).cos().sum() + (op.B * w).sum(),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("wanted", ["lengthscale", "outputscale", "both"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("kind", ["singletons_and_unequal", "scattered"])
@pytest.mark.parametrize("name", ["rbf_ard", "matern15"])
def test_gradients_match_dense_for_every_subset_of_hyperparameters(dtype, wanted, loss_name, kind, name, engine):
    kernel = _kernel(name, dtype)
    raw_ls, raw_os = kernel.base_kernel.raw_lengthscale, kernel.raw_outputscale
    raw_ls.requires_grad_(wanted in ("lengthscale", "both"))
    raw_os.requires_grad_(wanted in ("outputscale", "both"))
    params = [p for p in (raw_ls, raw_os) if p.requires_grad]
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1), dtype=dtype)
    partition = _partition(kind)
    with mock.patch.object(stationary.StationaryBlockMeans, "apply", wraps=stationary.StationaryBlockMeans.apply) as f:
        op = kernel_block_mean(kernel, x, partition, **engine["kwargs"])
    assert f.call_count == 1
    assert op.lam.dtype == op.B.dtype == dtype
    ref = _dense_reference(_kernel(name, torch.float64), x.double(), partition)
    rtol = 1e-9 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(op.B.double(), ref.B, rtol=rtol, atol=rtol)
    torch.testing.assert_close(op.lam.double(), ref.lam, rtol=rtol, atol=rtol)
    w = torch.linspace(-1, 2, partition.num_blocks, dtype=dtype)
    grads = torch.autograd.grad(LOSSES[loss_name](op, w), params)
    k64 = _kernel(name, torch.float64)
    params64 = [
        p for p, q in zip((k64.base_kernel.raw_lengthscale, k64.raw_outputscale), (raw_ls, raw_os)) if q.requires_grad
    ]
    ref = _dense_reference(k64, x.double(), partition)
    refs = torch.autograd.grad(LOSSES[loss_name](ref, w.double()), params64)
    for got, want in zip(grads, refs):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=rtol * 10, atol=rtol * 10)
    if engine["calls"] is not None:  # the compiled means, and the scaled contraction wherever dL/dB is given
        lengthscale = wanted != "outputscale"
        scaled = lengthscale and loss_name != "lam_only"
        assert engine["calls"] == {"block_means": 1, "scaled": int(scaled), "plain": int(lengthscale and not scaled)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_outputscale_batch_around_an_unbatched_base_kernel(dtype, engine):
    # the sums have no batch, the outputscale has (2,): the means broadcast, dL/dT0 sums the batch back
    kernel = _kernel("rbf_ard", dtype, batch_shape=torch.Size([2]))
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1), dtype=dtype)
    partition = _partition("singletons_and_unequal")
    op = kernel_block_mean(kernel, x, partition, **engine["kwargs"])
    assert op.B.shape == (2, partition.num_blocks, partition.num_blocks)
    k64 = _kernel("rbf_ard", torch.float64, batch_shape=torch.Size([2]))
    ref = _dense_reference(k64, x.double(), partition)
    rtol = 1e-9 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(op.B.double(), ref.B, rtol=rtol, atol=rtol)
    w = torch.linspace(-1, 2, partition.num_blocks, dtype=dtype)
    grads = torch.autograd.grad(LOSSES["both"](op, w), list(kernel.parameters()))
    refs = torch.autograd.grad(LOSSES["both"](ref, w.double()), list(k64.parameters()))
    for got, want in zip(grads, refs):
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=rtol * 10, atol=rtol * 10)
    if engine["calls"] is not None:  # the wider scale batch takes torch's k x k steps, forward and backward
        assert engine["calls"] == {"block_means": 0, "scaled": 0, "plain": 1}


def test_batched_inputs_with_an_unbatched_kernel(engine):
    kernel = _kernel("matern15", torch.float64)
    x = torch.randn(3, N, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    partition = _partition("scattered")
    op = kernel_block_mean(kernel, x, partition, **engine["kwargs"])
    ref = _dense_reference(_kernel("matern15", torch.float64), x, partition)
    torch.testing.assert_close(op.B, ref.B, rtol=1e-9, atol=1e-9)
    w = torch.linspace(-1, 2, partition.num_blocks, dtype=torch.float64)
    k64 = _kernel("matern15", torch.float64)
    grads = torch.autograd.grad(LOSSES["both"](op, w), list(kernel.parameters()))
    refs = torch.autograd.grad(LOSSES["both"](_dense_reference(k64, x, partition), w), list(k64.parameters()))
    for got, want in zip(grads, refs):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)
    if engine["calls"] is not None:
        assert engine["calls"] == {"block_means": 1, "scaled": 1, "plain": 0}


def test_without_a_gradient_the_means_come_without_a_graph(engine):
    kernel = _kernel("rbf_ard", torch.float32)
    for p in kernel.parameters():
        p.requires_grad_(False)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    with mock.patch.object(stationary.StationaryBlockMeans, "apply", side_effect=AssertionError("autograd")):
        op = kernel_block_mean(kernel, x, _partition("scattered"), **engine["kwargs"])
    assert not op.B.requires_grad and op.B.dtype == torch.float32
    ref = _dense_reference(_kernel("rbf_ard", torch.float64), x.double(), _partition("scattered"))
    torch.testing.assert_close(op.B.double(), ref.B, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(op.lam.double(), ref.lam, rtol=2e-5, atol=2e-5)
    if engine["calls"] is not None:
        assert engine["calls"]["block_means"] == 1


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_outputscale_gradient_from_B_and_at_a_zero_scale(zero, dtype, engine):
    """dL/dsc = <dL/dB, B0> + <dL/dlam, lam0>, with <dL/dB, B0> taken as <dL/dB, B> / sc; at sc = 0 (B = 0) the
    unscaled means are kept for it instead. An outputscale without a transform, so that 0 is reachable."""
    from gpytorch.constraints import GreaterThan

    def kernel():
        k = ScaleKernel(RBFKernel(ard_num_dims=D), outputscale_constraint=GreaterThan(0.0, transform=None))
        k.base_kernel.lengthscale = torch.tensor([0.7, 1.3])
        k.raw_outputscale.data.fill_(0.0 if zero else 1.7)
        return k.to(dtype)

    x = torch.randn(N, D, generator=torch.Generator().manual_seed(2), dtype=dtype)
    partition = _partition("singletons_and_unequal")
    k = kernel()
    op = kernel_block_mean(k, x, partition, **engine["kwargs"])
    w = torch.linspace(-1, 2, partition.num_blocks, dtype=dtype)
    (got,) = torch.autograd.grad(LOSSES["both"](op, w), [k.raw_outputscale])
    k64 = kernel().double()
    ref = _dense_reference(k64, x.double(), partition)
    (want,) = torch.autograd.grad(LOSSES["both"](ref, w.double()), [k64.raw_outputscale])
    assert torch.isfinite(got).all()
    rtol = 1e-9 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), want, rtol=rtol * 10, atol=rtol * 10)


def test_the_spare_accumulator_is_reused_zeroed(engine, monkeypatch):
    """Where the numba means free the k x k accumulator, the next call of that size takes it back, zeroed: two calls
    on different inputs both match the dense means. Past SPARE_ACCUMULATOR_BYTES none is kept."""
    monkeypatch.setattr(stationary, "_SPARE", {})
    kernel = _kernel("rbf_ard", torch.float64)
    partition = _partition("scattered")
    seen = []
    real = stationary._new_accumulator
    monkeypatch.setattr(stationary, "_new_accumulator", lambda *a: seen.append(bool(stationary._SPARE)) or real(*a))
    for seed in (1, 2):
        x = torch.randn(N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        with torch.no_grad():
            op = kernel_block_mean(kernel, x, partition, **engine["kwargs"])
        ref = _dense_reference(kernel, x, partition)
        torch.testing.assert_close(op.B, ref.B, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(op.lam, ref.lam, rtol=1e-9, atol=1e-9)
    numba = engine["calls"] is not None
    assert seen == [False, numba]  # the torch path's accumulator may be its output: never kept
    monkeypatch.setattr(stationary, "SPARE_ACCUMULATOR_BYTES", 0)
    stationary._SPARE.clear()
    with torch.no_grad():
        kernel_block_mean(kernel, x, partition, **engine["kwargs"])
    assert not stationary._SPARE
