"""Input checks of kernel_block_mean and BlockMeanKernel, and BlockMeanKernel's training-plus-new-points mixtures.

* ``BlockMeanKernel`` on ``cat(train_x, A)`` against ``cat(train_x, B)`` (``A != B``) assembled the dense
  ``(n + a) x (n + b)`` matrix, the ``n x n`` block mean matrix included (2 GB at n = 12,000), without a word; the
  diagonal of such a rectangular evaluation (``diag=True``, unequal lengths) went through the same dense matrix.
  Both now read the block mean operator of the training points and both sets of new points.
* NaN or inf in ``x`` (``kernel_block_mean``) or ``train_x`` (``BlockMeanKernel``) gave an operator whose ``lam``
  and ``B`` were all NaN; the model failed later without naming the input.
* ``kernel_block_mean`` on inputs with no columns failed inside the stationary engine (torch's reshape error).
* ``fused=`` and ``progress=`` were read by truth value: ``fused=0``, ``"False"`` or ``"no"`` ran the stationary
  engine, and ``fused="False"`` on an RQ kernel said "fused=True, but ...".
"""

from __future__ import annotations

import sys

import gpytorch
import numpy as np
import pytest
import torch
from gpytorch.kernels import MaternKernel, RBFKernel, RQKernel, ScaleKernel
from linear_operator.operators import DenseLinearOperator
from torch.utils._python_dispatch import TorchDispatchMode

import bma_gp
from bma_gp import BlockMeanKernel, Partition, kernel_block_mean
from peak_memory import peak_memory_increase
from test_gp_inference import dense_block_mean, dense_cross

pytestmark = [pytest.mark.usefixtures("one_thread")]

DTYPE = torch.float64
N = 30


def _dense(kernel, a, b):
    with gpytorch.settings.lazily_evaluate_kernels(False):
        return kernel(a, b).to_dense()


def _setup(base=None, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=DTYPE)
    labels = torch.cat([torch.arange(5), torch.randint(0, 5, (n - 5,), generator=g)])[torch.randperm(n, generator=g)]
    base = base if base is not None else ScaleKernel(RBFKernel()).to(DTYPE)
    return x, labels, base, BlockMeanKernel(base, x, Partition.from_labels(labels))


def _reference(base, x, labels, new1, new2):
    """The dense kernel of the block mean approximation between ``cat(x, new1)`` and ``cat(x, new2)``: block means
    on the training points, block means of the cross-covariances, the base kernel between the new points."""
    n, t1 = x.shape[-2], new1.shape[-2]
    batch = torch.broadcast_shapes(x.shape[:-2], new1.shape[:-2], new2.shape[:-2])
    points = torch.cat([p.expand(*batch, *p.shape[-2:]) for p in (x, new1, new2)], dim=-2)
    K = _dense(base, points, points)
    top = torch.cat([dense_block_mean(K[..., :n, :n], labels), dense_cross(K[..., n + t1 :, :n], labels).mT], -1)
    bottom = torch.cat([dense_cross(K[..., n : n + t1, :n], labels), K[..., n : n + t1, n + t1 :]], -1)
    return torch.cat([top, bottom], -2)


class _Largest(TorchDispatchMode):
    """The largest tensor any torch operation returns, counted by what it holds: a sparse tensor by its stored
    entries and indices (``numel`` of a sparse tensor is its dense size), so that the sparse interpolation of an
    indexed operator, O(n), does not read as an n x n matrix."""

    def __init__(self):
        super().__init__()
        self.largest, self.where = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if not torch.is_tensor(value):
                continue
            size = value._nnz() * (1 + value.sparse_dim()) if value.layout == torch.sparse_coo else value.numel()
            if size > self.largest:
                self.largest, self.where = size, str(func)
        return out


# ---------------------------------------------------------------------------- train + new vs train + other new
@pytest.mark.parametrize("base", ["rbf", "rq"])  # the stationary and the generic engine for the training pass
@pytest.mark.parametrize("t1, t2", [(4, 6), (6, 4), (1, 1)])
def test_train_and_new_points_against_train_and_other_new_points_is_structured_and_exact(base, t1, t2):
    base = ScaleKernel(RBFKernel()).to(DTYPE) if base == "rbf" else RQKernel().to(DTYPE)
    x, labels, base, kernel = _setup(base)
    g = torch.Generator().manual_seed(1)
    new1, new2 = torch.rand(t1, 2, generator=g, dtype=DTYPE), torch.rand(t2, 2, generator=g, dtype=DTYPE)
    op = kernel(torch.cat([x, new1]), torch.cat([x, new2])).evaluate_kernel()
    assert not isinstance(op, DenseLinearOperator) and op.shape == (N + t1, N + t2)
    ref = _reference(base, x, labels, new1, new2)
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-12, atol=1e-12)
    rhs, lhs = torch.randn(N + t2, 3, dtype=DTYPE), torch.randn(N + t1, 2, dtype=DTYPE)
    torch.testing.assert_close(op @ rhs, ref @ rhs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.mT @ lhs, ref.mT @ lhs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op[3 : N + 1, -2:].to_dense(), ref[3 : N + 1, -2:], rtol=1e-12, atol=1e-12)
    # a ScaleKernel around the BlockMeanKernel scales it
    outer = ScaleKernel(kernel).to(DTYPE)
    outer.outputscale = 2.5
    torch.testing.assert_close(_dense(outer, torch.cat([x, new1]), torch.cat([x, new2])), 2.5 * ref)


def test_train_and_new_points_mixture_in_batches():
    """A batch kernel, batched new points on one side and unbatched on the other, and batched training inputs."""
    g = torch.Generator().manual_seed(2)
    base = ScaleKernel(MaternKernel(nu=1.5, batch_shape=torch.Size([2])), batch_shape=torch.Size([2])).to(DTYPE)
    x, labels, base, kernel = _setup(base)
    new1, new2 = torch.rand(3, 1, 4, 2, generator=g, dtype=DTYPE), torch.rand(5, 2, generator=g, dtype=DTYPE)
    op = kernel(torch.cat([x.expand(3, 1, N, 2), new1], -2), torch.cat([x, new2])).evaluate_kernel()
    assert not isinstance(op, DenseLinearOperator) and op.shape == (3, 2, N + 4, N + 5)
    ref = _reference(base, x.expand(3, 2, N, 2), labels, new1.expand(3, 2, 4, 2), new2.expand(3, 2, 5, 2))
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-12, atol=1e-12)
    rhs = torch.randn(N + 5, 2, dtype=DTYPE)
    torch.testing.assert_close(op @ rhs, ref @ rhs, rtol=1e-12, atol=1e-12)

    xb = torch.rand(2, N, 2, generator=g, dtype=DTYPE)
    kernel = BlockMeanKernel(base, xb, Partition.from_labels(labels))
    new1, new2 = torch.rand(2, 3, 2, generator=g, dtype=DTYPE), torch.rand(2, 2, 2, generator=g, dtype=DTYPE)
    op = kernel(torch.cat([xb, new1], -2), torch.cat([xb, new2], -2)).evaluate_kernel()
    torch.testing.assert_close(op.to_dense(), _reference(base, xb, labels, new1, new2), rtol=1e-12, atol=1e-12)


def test_train_and_new_points_mixture_gradients_match_the_dense_kernel():
    x, labels, base, kernel = _setup()
    g = torch.Generator().manual_seed(3)
    new1, new2 = torch.rand(3, 2, generator=g, dtype=DTYPE), torch.rand(5, 2, generator=g, dtype=DTYPE)
    rhs, w = torch.randn(N + 5, 2, dtype=DTYPE), torch.randn(N + 3, 2, dtype=DTYPE)
    params = list(base.parameters())
    ours = torch.autograd.grad(((kernel(torch.cat([x, new1]), torch.cat([x, new2])) @ rhs) * w).sum(), params)
    ref = torch.autograd.grad(((_reference(base, x, labels, new1, new2) @ rhs) * w).sum(), params)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("base", ["rbf", "rq"])
def test_train_and_new_points_mixture_allocates_nothing_n_by_n(base):
    """Evaluation, products both ways and a block of entries of the mixture hold O(n) numbers at a time (the
    training pass itself is done, and cached, before)."""
    n = 3000
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, 2, generator=g, dtype=DTYPE)
    base = ScaleKernel(RBFKernel()).to(DTYPE) if base == "rbf" else RQKernel().to(DTYPE)
    kernel = BlockMeanKernel(base, x, Partition.from_labels(torch.arange(n) % 40))
    new1, new2 = torch.randn(5, 2, generator=g, dtype=DTYPE), torch.randn(7, 2, generator=g, dtype=DTYPE)
    with torch.no_grad():
        kernel(x).evaluate_kernel()  # the training pass (cached)
        with _Largest() as probe:
            op = kernel(torch.cat([x, new1]), torch.cat([x, new2])).evaluate_kernel()
            op @ torch.randn(n + 7, 3, dtype=DTYPE)
            op.mT @ torch.randn(n + 5, 2, dtype=DTYPE)
            op[..., 10:20, -3:].to_dense()
            diagonal = kernel(torch.cat([x, new1]), torch.cat([x, new2]), diag=True)
    assert probe.largest <= 20 * n, (probe.largest, probe.where)
    assert diagonal.shape == (n + 5,)


def test_train_and_new_points_mixture_peak_memory():
    """At n = 8000 the dense float64 n x n matrix is 512 MB: the mixture's evaluation and a product stay far below."""
    setup = """
        import torch
        torch.set_num_threads(1)
        from gpytorch.kernels import RBFKernel, ScaleKernel
        from bma_gp import BlockMeanKernel, Partition
        n = 8000
        x = torch.randn(n, 2, dtype=torch.float64)
        kernel = BlockMeanKernel(ScaleKernel(RBFKernel()).double(), x, Partition.from_labels(torch.arange(n) % 50))
        new1, new2 = torch.randn(5, 2, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
        rhs = torch.randn(n + 7, 2, dtype=torch.float64)
        x1, x2 = torch.cat([x, new1]), torch.cat([x, new2])
        with torch.no_grad():
            kernel(x).evaluate_kernel()  # the training pass, cached
            kernel(x1, x2).evaluate_kernel() @ rhs  # warm up the code paths
    """
    work = """
        with torch.no_grad():
            op = kernel(x1, x2).evaluate_kernel()
            assert tuple((op @ rhs).shape) == (n + 5, 2)
    """
    increase = peak_memory_increase(setup, work)
    assert increase < 64 * 2**20, f"peak rose by {increase / 2**20:.0f} MB"


@pytest.mark.parametrize(
    "case", ["mixture", "train vs train+new", "train+new vs train", "train vs new", "new vs train"]
)
def test_rectangular_diagonal_matches_the_dense_diagonal(case):
    x, labels, base, kernel = _setup()
    g = torch.Generator().manual_seed(5)
    a, b, c = (torch.rand(m, 2, generator=g, dtype=DTYPE) for m in (3, 5, 40))
    x1, x2 = {
        "mixture": (torch.cat([x, a]), torch.cat([x, b])),
        "train vs train+new": (x, torch.cat([x, b])),
        "train+new vs train": (torch.cat([x, a]), x),
        "train vs new": (x, c),
        "new vs train": (b, x),
    }[case]
    diagonal = kernel(x1, x2, diag=True)
    torch.testing.assert_close(diagonal, torch.diagonal(_dense(kernel, x1, x2)), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- non-finite inputs
def _nan_x(value=float("nan")):
    x = torch.randn(20, 3, dtype=DTYPE)
    x[3, 1] = value
    return x, Partition.from_labels(torch.arange(20) % 4)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "make, fused",
    [(lambda: ScaleKernel(RBFKernel()), None), (lambda: ScaleKernel(RBFKernel()), False), (RQKernel, None)],
)
def test_kernel_block_mean_refuses_non_finite_x(value, make, fused):
    x, partition = _nan_x(value)
    with pytest.raises(ValueError, match=r"x contains NaN or infinite values \(x\[3, 1\] = -?(nan|inf)\)"):
        kernel_block_mean(make().to(DTYPE), x, partition, fused=fused)
    with pytest.raises(ValueError, match=r"x contains NaN or infinite values \(x\[1, 3, 1\]"):
        kernel_block_mean(make().to(DTYPE), torch.stack([x.nan_to_num(), x]), partition, fused=fused)


def test_kernel_block_mean_reads_only_the_kernels_columns():
    """A non-finite value in a column the kernel does not read (``active_dims``) changes nothing."""
    x, partition = _nan_x()
    op = kernel_block_mean(RBFKernel(active_dims=[0, 2]).to(DTYPE), x, partition)
    assert bool(torch.isfinite(op.lam).all() and torch.isfinite(op.B).all())
    with pytest.raises(ValueError, match=r"x\[3, 1\] = nan"):  # the position in x, not in the columns read
        kernel_block_mean(RBFKernel(active_dims=[1, 2]).to(DTYPE), x, partition)


def test_non_finite_inputs_with_validation_off_are_not_read_back():
    x, partition = _nan_x()
    with bma_gp.settings.validate(False):
        op = kernel_block_mean(ScaleKernel(RBFKernel()).to(DTYPE), x, partition)
        kernel = BlockMeanKernel(ScaleKernel(RBFKernel()).to(DTYPE), x, partition)
    assert bool(op.B.isnan().all())
    with pytest.raises(ValueError, match=r"train_x contains NaN or infinite values \(train_x\[3, 1\] = nan\)"):
        kernel(x).evaluate_kernel()  # validated again where the training pass runs


def test_block_mean_kernel_refuses_non_finite_train_x():
    x, partition = _nan_x()
    base = ScaleKernel(RBFKernel()).to(DTYPE)
    with pytest.raises(ValueError, match=r"train_x contains NaN or infinite values \(train_x\[3, 1\] = nan\)"):
        BlockMeanKernel(base, x, partition)
    kernel = BlockMeanKernel(base, x.nan_to_num(), partition)
    with pytest.raises(ValueError, match=r"train_x contains NaN or infinite values"):
        kernel.set_train_data(x)
    good = x.nan_to_num()
    kernel.set_train_data(good)
    good[5, 0] = float("inf")  # changed in place after binding
    with pytest.raises(ValueError, match=r"train_x contains NaN or infinite values \(train_x\[5, 0\] = inf\)"):
        kernel(good).evaluate_kernel()


def test_block_mean_kernel_in_a_gp_names_train_x():
    x, partition = _nan_x()

    class GP(gpytorch.models.ExactGP):
        def __init__(self, x, y, likelihood):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = BlockMeanKernel(ScaleKernel(RBFKernel()), x, partition)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    with pytest.raises(ValueError, match="train_x contains NaN or infinite values"):
        GP(x, torch.randn(20, dtype=DTYPE), gpytorch.likelihoods.GaussianLikelihood())


def test_non_finite_new_points_leave_the_training_block_finite():
    """New points do not go through the training pass (they are not checked): a NaN among them makes their own
    entries NaN (and, as GPyTorch centres the inputs of one evaluation together, those of the new points evaluated with
    them), never the block means of the training points."""
    x, labels, base, kernel = _setup()
    new = torch.rand(3, 2, dtype=DTYPE)
    new[1, 0] = float("nan")
    full = torch.cat([x, new])
    dense = _dense(kernel, full, full)
    torch.testing.assert_close(dense[:N, :N], dense_block_mean(_dense(base, x, x), labels))
    assert bool(dense[N + 1, :N].isnan().all())


# ---------------------------------------------------------------------------- inputs without columns
@pytest.mark.parametrize("make", [RBFKernel, RQKernel])
@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("shape", [(10, 0), (2, 10, 0)])
def test_kernel_block_mean_refuses_inputs_without_columns(make, fused, shape):
    partition = Partition.from_labels(torch.arange(10) % 2)
    message = r"x must have shape \(n, d\) or \(\*batch, n, d\) with n, d >= 1 \(or \(n,\) for d = 1\), got"
    with pytest.raises(ValueError, match=message):
        kernel_block_mean(make(), torch.randn(*shape), partition, fused=fused)
    with pytest.raises(ValueError, match="train_" + message):  # BlockMeanKernel's words, for train_x
        BlockMeanKernel(make(), torch.randn(*shape), partition)


# ---------------------------------------------------------------------------- fused= and progress=
@pytest.fixture
def engine_calls(monkeypatch):
    """How many times kernel_block_mean ran the stationary engine."""
    module = sys.modules["bma_gp.kernel_block_mean"]
    calls = []
    original = module.stationary_block_means

    def counted(*args, **kwargs):
        calls.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "stationary_block_means", counted)
    return calls


@pytest.mark.parametrize("flag", [0, 1, "False", "no", "True", 0.0, torch.tensor(False), [False]])
def test_fused_must_be_a_bool_or_none(flag, engine_calls):
    x, partition = torch.randn(20, 2), Partition.from_labels(torch.arange(20) % 4)
    for kernel in (RBFKernel(), RQKernel()):
        with pytest.raises(TypeError, match=r"fused must be True \(force the stationary engine\), False"):
            kernel_block_mean(kernel, x, partition, fused=flag)
    assert not engine_calls


@pytest.mark.parametrize(
    "flag, used", [(None, True), (True, True), (False, False), (np.bool_(True), True), (np.bool_(False), False)]
)
def test_fused_bools_pick_the_engine(flag, used, engine_calls):
    x, partition = torch.randn(20, 2, dtype=DTYPE), Partition.from_labels(torch.arange(20) % 4)
    op = kernel_block_mean(RBFKernel().to(DTYPE), x, partition, fused=flag)
    assert bool(engine_calls) == used
    ref = dense_block_mean(_dense(RBFKernel().to(DTYPE), x, x), partition.labels)
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_fused_false_as_a_string_on_an_rq_kernel_names_the_argument():
    x, partition = torch.randn(20, 2), Partition.from_labels(torch.arange(20) % 4)
    with pytest.raises(TypeError, match=r"fused must be .* got 'False'"):
        kernel_block_mean(RQKernel(), x, partition, fused="False")
    with pytest.raises(ValueError, match="fused=True, but RQKernel"):  # a real True still says why
        kernel_block_mean(RQKernel(), x, partition, fused=np.bool_(True))


@pytest.mark.parametrize("flag", [0, "False", "no", 1.0])
def test_progress_must_be_a_bool_or_none(flag):
    x, partition = torch.randn(20, 2), Partition.from_labels(torch.arange(20) % 4)
    with pytest.raises(TypeError, match=r"progress must be True \(show a progress bar\), False"):
        kernel_block_mean(RBFKernel(), x, partition, progress=flag)
    assert kernel_block_mean(RBFKernel(), x, partition, progress=np.bool_(False)).shape == (20, 20)
