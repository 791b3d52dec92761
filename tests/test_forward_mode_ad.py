"""Forward-mode differentiation (dual tensors of ``torch.autograd.forward_ad``, ``torch.func.jacfwd``) and the
``torch.func`` transforms: a derivative that matches dense linear algebra, or a refusal in words, never a silently
wrong number.

Dual tensors and the inputs of ``jacfwd`` report ``requires_grad=False``; the shortcuts the package takes where "no
derivatives are wanted" (a ``B`` diagonal by value, a diagonal constant in the blocks folded into ``lam``, the
stationary engine's ``no_grad`` pass, a cached training block mean) dropped or altered their tangents.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func as tf
from linear_operator.operators import DiagLinearOperator

from bma_gp import BlockMeanKernel, BlockMeanLinearOperator, BlockMeanSumLinearOperator, Partition, kernel_block_mean
from bma_gp._autograd import carries_tangent, functorch_wrapped, tracks_derivatives

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
REFUSED = "reverse mode only"


def _partition() -> Partition:
    return Partition.from_labels(torch.tensor([0, 1, 1, 0, 2, 1, 2]))


def _indicator(part: Partition) -> torch.Tensor:
    return torch.nn.functional.one_hot(part.labels, part.num_blocks).to(DT)


def _dense(lam: torch.Tensor, B: torch.Tensor, part: Partition) -> torch.Tensor:
    P = _indicator(part)
    return torch.diag(lam[part.labels]) + P @ (0.5 * (B + B.mT)) @ P.T


LAM = torch.tensor([1.0, 2.0, 1.5], dtype=DT)
# diagonal by value (a B initialised to the identity); no eigenvalue of the core matrix equals a lam_i (eigvalsh)
B_DIAG = torch.diag(torch.tensor([0.6, 0.7, 0.9], dtype=DT))
OFF = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=DT)  # a symmetric off-diagonal direction
R = torch.arange(7.0, dtype=DT)

OPS = {
    "inv_quad": (lambda M: M.inv_quad(R), lambda D: R @ torch.linalg.solve(D, R)),
    "solve": (lambda M: M.solve(R), lambda D: torch.linalg.solve(D, R)),
    "matmul": (lambda M: M @ R, lambda D: D @ R),
    "logdet": (lambda M: M.logdet(), lambda D: torch.logdet(D)),
    "inv_quad_logdet": (
        lambda M: sum(M.inv_quad_logdet(R, logdet=True)),
        lambda D: R @ torch.linalg.solve(D, R) + torch.logdet(D),
    ),
    "diagonal": (lambda M: M.diagonal(), lambda D: D.diagonal()),
    "eigvalsh": (lambda M: M.eigvalsh(), lambda D: torch.linalg.eigvalsh(D)),
    "to_dense": (lambda M: M.to_dense(), lambda D: D),
}


def _jvp(f, x, t):
    with fwAD.dual_level():
        out = fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent
    return torch.zeros(()) if out is None else out.clone()


# ---------------------------------------------------------------------------- the helper
def test_tracks_derivatives_sees_dual_tensors_and_torch_func_inputs():
    x = torch.randn(3, dtype=DT)
    assert not tracks_derivatives(x) and not carries_tangent(x)
    assert tracks_derivatives(x.clone().requires_grad_()) and not carries_tangent(x.clone().requires_grad_())
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        assert not dual.requires_grad and tracks_derivatives(dual) and carries_tangent(dual)
        assert not tracks_derivatives(x)  # a plain tensor inside a dual level has no tangent
        assert not tracks_derivatives(fwAD.unpack_dual(dual).primal)
    assert not tracks_derivatives(dual)  # the tangent is gone with its level

    seen = {}

    def probe(name):
        def f(v):
            seen[name] = (tracks_derivatives(v), functorch_wrapped(v), tracks_derivatives(v.detach() * 0 + 1))
            return v.sin().sum()

        return f

    tf.jacfwd(probe("jacfwd"))(x)
    tf.grad(probe("grad"))(x)
    tf.jacrev(probe("jacrev"))(x)
    tf.vmap(lambda v: probe("vmap")(v))(x.unsqueeze(-1))
    assert seen["jacfwd"] == (True, True, False)
    assert seen["grad"] == (True, True, False)  # a constant made inside a transform carries nothing
    assert seen["jacrev"] == (True, True, False)
    assert seen["vmap"] == (False, True, False)  # a batch is no derivative


# ---------------------------------------------------------------------------- 1. B diagonal by value
@pytest.mark.parametrize("name", list(OPS))
def test_forward_mode_off_the_diagonal_of_a_diagonal_b_matches_dense(name):
    part = _partition()
    f, fd = OPS[name]
    ours = lambda B: f(BlockMeanLinearOperator(LAM, B, part))  # noqa: E731
    dense = lambda B: fd(_dense(LAM, B, part))  # noqa: E731
    expected = _jvp(dense, B_DIAG, OFF)
    torch.testing.assert_close(_jvp(ours, B_DIAG, OFF), expected, rtol=1e-10, atol=1e-10)
    # reverse mode (a leaf that requires grad) agrees
    J = torch.autograd.functional.jacobian(ours, B_DIAG)
    torch.testing.assert_close((J * OFF).sum((-2, -1)), expected, rtol=1e-10, atol=1e-10)
    # jacfwd: every direction, off-diagonal ones included
    torch.testing.assert_close(tf.jacfwd(ours)(B_DIAG), tf.jacfwd(dense)(B_DIAG), rtol=1e-10, atol=1e-10)
    if name == "inv_quad":  # the user's case: the off-diagonal entries of the derivative were 0
        assert expected.abs() > 1 and (tf.jacfwd(ours)(B_DIAG) * OFF).sum().abs() > 1


def test_elementwise_path_kept_where_no_tangent_is_off_the_diagonal():
    part = _partition()
    assert BlockMeanLinearOperator(LAM, B_DIAG, part)._diagonal_core()  # no derivatives: the O(k) forms
    diag_dir = torch.diag(torch.tensor([0.3, -0.2, 0.5], dtype=DT))
    with fwAD.dual_level():
        assert not BlockMeanLinearOperator(LAM, fwAD.make_dual(B_DIAG, OFF), part)._diagonal_core()
        assert BlockMeanLinearOperator(LAM, fwAD.make_dual(B_DIAG, diag_dir), part)._diagonal_core()
        b = fwAD.make_dual(B_DIAG.diagonal(), diag_dir.diagonal())
        assert BlockMeanLinearOperator(LAM, b, part, diagonal=True)._diagonal_core()
    for name, (f, fd) in OPS.items():
        ours = lambda B, f=f: f(BlockMeanLinearOperator(LAM, B, part))  # noqa: E731
        dense = lambda B, fd=fd: fd(_dense(LAM, B, part))  # noqa: E731
        torch.testing.assert_close(_jvp(ours, B_DIAG, diag_dir), _jvp(dense, B_DIAG, diag_dir), msg=name)
        ours_b = lambda b, f=f: f(BlockMeanLinearOperator(LAM, b, part, diagonal=True))  # noqa: E731
        dense_b = lambda b, fd=fd: fd(_dense(LAM, torch.diag(b), part))  # noqa: E731
        b0, tb = B_DIAG.diagonal(), diag_dir.diagonal()
        torch.testing.assert_close(_jvp(ours_b, b0, tb), _jvp(dense_b, b0, tb), msg=name)


def test_sum_with_a_b_diagonal_by_value_refuses_an_off_diagonal_tangent():
    part = _partition()
    d = torch.linspace(0.1, 0.7, 7, dtype=DT)
    op = lambda B: BlockMeanLinearOperator(LAM, B, part) + DiagLinearOperator(d)  # noqa: E731
    assert isinstance(op(B_DIAG), BlockMeanSumLinearOperator)
    for f in (lambda B: op(B).inv_quad(R), lambda B: op(B).logdet(), lambda B: op(B).solve(R)):
        with pytest.raises(NotImplementedError, match=REFUSED):
            _jvp(f, B_DIAG, OFF)  # was 0 (the dense derivative is -4.06 for inv_quad)
        with pytest.raises(NotImplementedError, match=REFUSED):
            tf.jacfwd(f)(B_DIAG)
    # the diagonal does not go through the capacitance: its derivative is right
    dense = lambda B: torch.diag(LAM[part.labels] + d) + _indicator(part) @ B @ _indicator(part).T  # noqa: E731
    expected = _jvp(lambda B: dense(B).diagonal(), B_DIAG, OFF)
    torch.testing.assert_close(_jvp(lambda B: op(B).diagonal(), B_DIAG, OFF), expected)


def test_sum_eliminates_a_diagonal_b_whose_tangent_is_diagonal():
    part = _partition()
    d = torch.linspace(0.1, 0.7, 7, dtype=DT)
    P = _indicator(part)
    diag_dir = torch.diag(torch.tensor([0.3, -0.2, 0.5], dtype=DT))
    for f, fd in (OPS["inv_quad"], OPS["logdet"], OPS["solve"]):
        ours = lambda B, f=f: f(BlockMeanLinearOperator(LAM, B, part) + DiagLinearOperator(d))  # noqa: E731
        dense = lambda B, fd=fd: fd(torch.diag(LAM[part.labels] + d) + P @ B @ P.T)  # noqa: E731
        torch.testing.assert_close(_jvp(ours, B_DIAG, diag_dir), _jvp(dense, B_DIAG, diag_dir))


# ---------------------------------------------------------------------------- 3. a diagonal constant in the blocks
def _collapse_case():
    part = _partition()
    B = torch.tensor([[1.0, 0.2, 0.1], [0.2, 0.8, 0.3], [0.1, 0.3, 0.9]], dtype=DT)
    d = torch.full((7,), 0.1, dtype=DT)  # constant by value (a homoscedastic noise vector)
    td = torch.arange(7.0, dtype=DT)  # a per-point direction
    P = _indicator(part)
    Md = torch.diag(LAM[part.labels]) + P @ B @ P.T
    return part, B, d, td, Md


def test_diagonal_constant_in_the_blocks_is_not_folded_into_lam_under_forward_mode():
    part, B, d, td, Md = _collapse_case()
    assert isinstance(BlockMeanLinearOperator(LAM, B, part) + DiagLinearOperator(d), BlockMeanLinearOperator)
    with fwAD.dual_level():
        summed = BlockMeanLinearOperator(LAM, B, part) + DiagLinearOperator(fwAD.make_dual(d, td))
        assert not isinstance(summed, BlockMeanLinearOperator)
        # a tangent constant in the blocks may be folded
        folded = BlockMeanLinearOperator(LAM, B, part) + DiagLinearOperator(fwAD.make_dual(d, torch.ones_like(d)))
        assert not isinstance(folded, BlockMeanLinearOperator)  # (not read by value: the general path, also right)
    ours = lambda dd: (BlockMeanLinearOperator(LAM, B, part) + DiagLinearOperator(dd)).diagonal()  # noqa: E731
    torch.testing.assert_close(_jvp(ours, d, td), td)  # was the block means of td
    torch.testing.assert_close(tf.jacfwd(ours)(d) @ td, td)
    for name in ("inv_quad", "logdet"):
        f, fd = OPS[name]
        ours = lambda dd, f=f: f(BlockMeanLinearOperator(LAM, B, part) + DiagLinearOperator(dd))  # noqa: E731
        with pytest.raises(NotImplementedError, match=REFUSED):  # inv_quad was -2.1998 against -2.0121
            _jvp(ours, d, td)
        with pytest.raises(NotImplementedError, match=REFUSED):
            tf.jacfwd(ours)(d)
        # reverse mode: the general path, right
        dense = lambda dd, fd=fd: fd(Md + torch.diag(dd))  # noqa: E731
        g = torch.autograd.functional.jacobian(ours, d)
        torch.testing.assert_close(g @ td, _jvp(dense, d, td))


# ---------------------------------------------------------------------------- 2. kernel_block_mean
def _kernels():
    from gpytorch.kernels import MaternKernel, PeriodicKernel, RBFKernel, ScaleKernel

    return [RBFKernel(), ScaleKernel(MaternKernel(nu=1.5)), PeriodicKernel()]  # stationary, stationary, generic


@pytest.mark.parametrize("index", range(3))
def test_kernel_block_mean_refuses_forward_mode_inputs_with_frozen_hyperparameters(index):
    part = Partition.from_labels(torch.tensor([0, 1, 1, 0, 2, 1, 2, 0]))
    x = torch.randn(8, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    tx = torch.randn(8, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    kern = _kernels()[index].to(DT).requires_grad_(False)
    f = lambda z: kernel_block_mean(kern, z, part).B  # noqa: E731
    with pytest.raises(NotImplementedError, match=REFUSED):
        _jvp(f, x, tx)  # the stationary engine returned no tangent (a derivative of 0)
    with pytest.raises(NotImplementedError, match=REFUSED):
        tf.jacfwd(f)(x)
    # reverse mode is the way: nonzero, and what the refusal suggests
    J = torch.autograd.functional.jacobian(f, x)
    assert (J * tx).sum((-2, -1)).abs().max() > 1e-3
    # inside a dual level, tensors without tangents take the usual path
    with fwAD.dual_level():
        inside = kernel_block_mean(kern, x, part)
    torch.testing.assert_close(inside.B, f(x))


@pytest.mark.parametrize("index", range(3))
def test_kernel_block_mean_refuses_dual_hyperparameters(index):
    part = Partition.from_labels(torch.tensor([0, 1, 1, 0, 2, 1, 2, 0]))
    x = torch.randn(8, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    kern = _kernels()[index].to(DT)
    params = {n: p.detach().clone() for n, p in kern.named_parameters()}

    def f(p):
        return _kbm_of(kern, p, x, part)

    with pytest.raises(NotImplementedError, match=REFUSED):
        with fwAD.dual_level():
            f({n: fwAD.make_dual(v, torch.ones_like(v)) for n, v in params.items()})
    with pytest.raises(NotImplementedError, match=REFUSED):
        tf.jacfwd(f)(params)


def _kbm_of(kern, params, x, part):
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = kern

        def forward(self, z):
            return kernel_block_mean(self.k, z, part).B

    return tf.functional_call(Wrapped(), {f"k.{n}": v for n, v in params.items()}, (x,))


def test_stationary_engine_refuses_a_dual_lengthscale_it_reads_as_an_attribute():
    from gpytorch.kernels import RBFKernel

    part = Partition.from_labels(torch.tensor([0, 1, 1, 0, 2, 1, 2, 0]))
    x = torch.randn(8, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    kern = RBFKernel().to(DT)
    raw = kern.raw_lengthscale.detach().clone()
    with fwAD.dual_level():
        del kern.raw_lengthscale
        kern.raw_lengthscale = fwAD.make_dual(raw, torch.ones_like(raw))  # a plain attribute, not a parameter
        with pytest.raises(NotImplementedError, match=REFUSED):
            kernel_block_mean(kern, x, part)


# ---------------------------------------------------------------------------- 4, 5. BlockMeanKernel
def _bmk_model():
    from gpytorch.kernels import PeriodicKernel, RBFKernel, ScaleKernel

    part = Partition.from_labels(torch.tensor([0, 1, 1, 0, 2, 1, 2, 0]))
    X = torch.randn(8, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    models = []
    for base in (ScaleKernel(RBFKernel()), PeriodicKernel()):
        k = BlockMeanKernel(base.to(DT), X, part).to(DT)

        class Wrapped(torch.nn.Module):
            def __init__(self, k):
                super().__init__()
                self.k = k

            def forward(self, x):
                return self.k(x).to_dense()

        models.append(Wrapped(k))
    return X, models


@pytest.mark.parametrize("index", range(2))
def test_block_mean_kernel_cache_is_not_returned_to_a_forward_mode_call(index):
    X, models = _bmk_model()
    w = models[index]
    params = {n: p.detach().clone() for n, p in w.named_parameters()}
    with torch.no_grad():
        cached = w.k(X).to_dense()  # fills the kernel's cache of the training block means
    assert w.k.__dict__.get("_block_sums_cache") is not None
    with pytest.raises(NotImplementedError, match=REFUSED):  # was a result without a tangent (a derivative of 0)
        with fwAD.dual_level():
            tf.functional_call(w, {n: fwAD.make_dual(v, torch.ones_like(v)) for n, v in params.items()}, (X,))
    names = list(params)
    with pytest.raises(NotImplementedError, match=REFUSED):
        tf.jacfwd(lambda *v: tf.functional_call(w, dict(zip(names, v)), (X,)), argnums=tuple(range(len(names))))(
            *params.values()
        )
    # ordinary evaluations are unchanged, and reverse mode gives the derivative
    torch.testing.assert_close(w(X), cached)
    J = torch.autograd.functional.jacobian(
        lambda *v: tf.functional_call(w, dict(zip(names, v)), (X,)), tuple(params.values())
    )
    assert max(float(j.abs().max()) for j in J) > 0.1


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd", "hessian"])
def test_block_mean_kernel_under_torch_func_is_refused_in_words(transform):
    X, models = _bmk_model()
    w = models[0]
    params = {n: p.detach().clone() for n, p in w.named_parameters()}
    loss = lambda p: tf.functional_call(w, p, (X,)).sum()  # noqa: E731
    # was RuntimeError "Cannot access data pointer of Tensor that doesn't have storage" (from _same_rows)
    with pytest.raises(NotImplementedError, match=REFUSED):
        getattr(tf, transform)(loss)(params)


def test_same_rows_compares_values_of_torch_func_wrappers():
    from bma_gp.kernels.block_mean_kernel import _same_rows

    X = torch.randn(5, 2, dtype=DT)
    other = X + 1
    seen = []

    def f(s):
        seen.append((_same_rows(X * s, X), _same_rows(X * s, other), _same_rows(X * 1.0, X)))
        return (X * s).sum()

    tf.grad(f)(torch.tensor(1.0, dtype=DT))
    tf.jacfwd(f)(torch.tensor(1.0, dtype=DT))
    assert seen == [(True, False, True)] * 2


# ---------------------------------------------------------------------------- the sum over a batch of c M
def test_batch_sum_of_equal_separate_factors_gives_each_its_derivative():
    # c M over a batch (a negative c: FallbackScaledLinearOperator), summed over the batch: factors equal by value
    # were taken as one, c[0], which got the derivative of all of them (reverse mode and forward mode alike)
    from linear_operator.operators import LowRankRootLinearOperator

    part = Partition.from_labels(torch.tensor([0, 1, 1, 0, 2]))
    lam = torch.ones(2, 3, dtype=DT)
    B = 0.5 * torch.eye(3, dtype=DT).expand(2, 3, 3)
    U = torch.randn(2, 5, 1, dtype=DT, generator=torch.Generator().manual_seed(0))
    M = BlockMeanLinearOperator(lam, B, part) + LowRankRootLinearOperator(U)
    c0 = torch.tensor([-2.0, -2.0], dtype=DT)
    ours = lambda c: M._mul_constant(c)._sum_batch(0).to_dense().sum()  # noqa: E731
    dense = lambda c: (M.to_dense() * c.view(-1, 1, 1)).sum()  # noqa: E731
    c = c0.clone().requires_grad_()
    (g,) = torch.autograd.grad(ours(c), c)
    (gd,) = torch.autograd.grad(dense(c), c)
    torch.testing.assert_close(g, gd)
    tc = torch.tensor([1.0, -3.0], dtype=DT)
    torch.testing.assert_close(_jvp(ours, c0, tc), _jvp(dense, c0, tc))
    # one factor broadcast over the batch (or none to differentiate) keeps the closed form
    s = torch.tensor(-2.0, dtype=DT, requires_grad=True)
    assert type(M._mul_constant(s)._sum_batch(0)).__name__ == "FallbackScaledLinearOperator"
    assert type(M._mul_constant(c0)._sum_batch(0)).__name__ == "FallbackScaledLinearOperator"


@pytest.mark.parametrize(
    "call",
    [
        lambda M, x: M.matrix_inv_sqrt() @ x,
        lambda M, x: M.root_decomposition().root.to_dense(),
        lambda M, x: M.sqrt_inv_matmul(x),
        lambda M, x: M.matrix_function(torch.exp) @ x,
    ],
    ids=["matrix_inv_sqrt", "root_decomposition", "sqrt_inv_matmul", "matrix_function"],
)
def test_matrix_functions_of_a_dense_B_refuse_forward_mode_in_words(call):
    """torch said "You must implement the jvp function" from inside the package."""
    import torch.autograd.forward_ad as fwAD

    from bma_gp import BlockMeanLinearOperator, Partition

    gen = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, dtype=torch.float64, generator=gen)
    B = A @ A.mT + torch.eye(3, dtype=torch.float64)
    lam = torch.rand(3, dtype=torch.float64, generator=gen) + 0.5
    x = torch.randn(7, 2, dtype=torch.float64, generator=gen)
    part = Partition.from_labels(torch.tensor([0, 1, 2, 1, 0, 2, 2]))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="reverse mode only"):
        call(BlockMeanLinearOperator(lam, fwAD.make_dual(B, torch.randn_like(B)), part), x)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd"])
@pytest.mark.parametrize("name", ["solve", "matmul"])
def test_reverse_and_forward_transforms_through_solve_and_matmul_match_dense(transform, name):
    """``torch.func.grad`` / ``jacrev`` through a single operator's ``solve`` or ``@`` reached linear_operator's
    ``Matmul`` (an ``autograd.Function`` without ``setup_context``) and failed with torch's raw "must override the
    setup_context" error, while ``jacfwd`` and the other operations worked. Under a transform the product now runs in
    plain torch operations: every transform gives the dense derivative, in ``lam`` and in ``B``."""
    part = _partition()
    B = B_DIAG + 0.2 * OFF
    rhs = torch.stack([R, R.flip(0)], -1)

    def f_ours(lam, b):
        M = BlockMeanLinearOperator(lam, b, part)
        out = M.solve(rhs) if name == "solve" else M @ rhs
        return out.square().sum() if transform == "grad" else out

    def f_dense(lam, b):
        D = _dense(lam, b, part)
        out = torch.linalg.solve(D, rhs) if name == "solve" else D @ rhs
        return out.square().sum() if transform == "grad" else out

    t = getattr(tf, transform)
    got = t(f_ours, argnums=(0, 1))(LAM, B)
    expected = t(f_dense, argnums=(0, 1))(LAM, B)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize(
    "labels",
    [torch.arange(60) // 15, torch.arange(40000) % 4],
    ids=["contiguous", "scattered_past_the_gather_chunks"],
)
@pytest.mark.parametrize("name", ["matmul", "solve"])
def test_vmap_and_jvp_over_right_hand_sides_on_every_partition_layout(labels, name):
    """``vmap(M.solve)(R)``, ``vmap(lambda r: M @ r)(R)`` and ``jvp`` in ``r`` worked on a small scattered partition but
    failed on a contiguous one (any ``n``) and on a scattered one past 32,768 points on CPU, with torch's "Batching
    rule not implemented for aten::addcmul.out" and "Trying to use forward AD with addcmul_out": the product's
    ``out=`` paths took wrapped and dual tensors. Each now gives the product or solve of every right-hand side."""
    part = Partition.from_labels(labels)
    g = torch.Generator().manual_seed(0)
    M = BlockMeanLinearOperator(torch.rand(4, generator=g, dtype=DT) + 1.0, torch.eye(4, dtype=DT) * 0.5, part)
    R = torch.randn(3, len(part), generator=g, dtype=DT)

    def f(r):
        return M.solve(r) if name == "solve" else M @ r

    expected = torch.stack([f(r) for r in R])
    torch.testing.assert_close(tf.vmap(f)(R), expected)
    value, tangent = tf.jvp(f, (R[0],), (R[1],))
    torch.testing.assert_close(value, expected[0])
    torch.testing.assert_close(tangent, expected[1])  # linear in r: the derivative along R[1] is f(R[1])
    with fwAD.dual_level():
        dual = f(fwAD.make_dual(R[0], R[2]))
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, expected[2])
