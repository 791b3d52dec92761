"""Fixes from the user trials of 6 December 2026 (session 25): each test fails on the code before them.

* a device named by a string (``M.to("meta")``) was ignored by the operators (linear_operator's ``to`` reads only
  ``torch.device`` objects);
* ``M + DiagLinearOperator(d)`` on the meta device read values (torch's ``.item()`` error);
* an integer right-hand side was promoted silently by ``solve`` and raised torch's dtype error from ``@``;
* a parameter whose entries share memory (``.expand``) failed half-way through an optimizer step;
* a random-slope ``GroupKernel`` predicted under ``torch.autocast`` in bfloat16 and was refused as if the test
  inputs had the wrong dtype;
* a checkpoint whose param group held an invalid ``lr`` / ``weight_decay`` / ``maximize`` loaded, and every later
  step blamed an in-place edit.
"""

from __future__ import annotations

import copy

import gpytorch
import pytest
import torch
from linear_operator.operators import DiagLinearOperator

from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, GroupKernel, Partition
from bma_gp.optim import BlockMeanAdagrad, FullMatrixAdagrad
from gp_reference import GP

pytestmark = pytest.mark.usefixtures("one_thread")

N, K = 40, 5


def _operators(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    part = Partition.from_labels(torch.arange(N) % K)
    other = Partition.from_labels(torch.arange(N) % 3)
    W = torch.randn(K, K, generator=gen, dtype=torch.float64)
    M = BlockMeanLinearOperator(torch.rand(K, dtype=torch.float64, generator=gen) + 0.5, W @ W.mT / K, part)
    M2 = BlockMeanLinearOperator(torch.rand(3, dtype=torch.float64, generator=gen) + 0.5,
                                 torch.eye(3, dtype=torch.float64), other)  # fmt: skip
    S = M + M2 + DiagLinearOperator(torch.rand(N, dtype=torch.float64, generator=gen) + 1)
    return {"block mean": M, "sum": S, "product": M @ M2}


@pytest.mark.parametrize("kind", ["block mean", "sum", "product"])
def test_to_takes_a_device_named_by_a_string(kind):
    op = _operators()[kind]
    for moved in (op.to("meta"), op.to("meta", torch.float32), op.to(device="meta")):
        assert moved.device.type == "meta"
    assert op.to("meta", torch.float32).dtype == torch.float32
    back = op.to("cpu", torch.float32)
    assert back.device.type == "cpu" and back.dtype == torch.float32
    torch.testing.assert_close(back.to_dense(), op.to_dense().float())
    same = op.to(torch.zeros(1, dtype=torch.float32))  # a tensor's device and dtype, as torch.Tensor.to takes it
    assert same.dtype == torch.float32


def test_a_sum_is_built_on_the_meta_device():
    M = _operators()["block mean"].to("meta")
    S = M + DiagLinearOperator(torch.ones(N, dtype=torch.float64, device="meta"))
    assert isinstance(S, BlockMeanSumLinearOperator) and S.device.type == "meta" and S.shape == (N, N)


@pytest.mark.parametrize("kind", ["block mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_an_integer_right_hand_side_is_a_type_error_everywhere(kind, dtype):
    op = _operators()[kind]
    rhs = torch.ones(N, 2, dtype=dtype)
    with pytest.raises(TypeError, match=r"right_tensor has dtype .* not a floating-point dtype"):
        op.solve(rhs)
    with pytest.raises(TypeError, match=r"other has dtype .* not a floating-point dtype"):
        op @ rhs  # noqa: B018
    solved = op.solve(rhs.double())  # the cast it names works
    torch.testing.assert_close(op @ solved, rhs.double())


@pytest.mark.parametrize("make", [BlockMeanAdagrad, FullMatrixAdagrad], ids=["block mean", "full matrix"])
def test_a_parameter_whose_entries_share_memory_is_refused_up_front(make):
    p = torch.nn.Parameter(torch.randn(3, 4))
    shared = torch.nn.Parameter(torch.randn(3, 1).expand(3, 4))
    with pytest.raises(ValueError, match="entries share memory"):
        make([p, shared], lr=0.1)
    opt = make([p], lr=0.1)
    p.grad = torch.randn(3, 4)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="entries share memory"):
        opt.add_param_group({"params": [shared]})
    assert len(opt.param_groups) == 1
    after = opt.state_dict()
    assert after["global_state"]["step"] == before["global_state"]["step"]


def test_random_slope_prediction_under_autocast_is_the_float32_prediction():
    torch.manual_seed(0)
    n, groups = 120, 6
    x = torch.stack([torch.randint(0, groups, (n,)).float(), torch.rand(n)], -1)
    y = torch.randn(n)
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), GroupKernel(groups, slope=True))
    model.eval()
    xt = x[:5] + torch.tensor([0.0, 0.01])
    with torch.no_grad():
        want = model(xt)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(xt)
    assert got.mean.dtype == torch.float32
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.variance, want.variance, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "key, value", [("lr", float("nan")), ("lr", -0.1), ("weight_decay", -0.1), ("maximize", "yes")]
)
@pytest.mark.parametrize("make", [BlockMeanAdagrad, FullMatrixAdagrad], ids=["block mean", "full matrix"])
def test_a_checkpoint_with_an_invalid_group_option_is_refused_at_load(make, key, value):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = make(model.parameters(), lr=0.1)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    saved = opt.state_dict()
    saved["param_groups"][0][key] = value
    fresh = make(model.parameters(), lr=0.3)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"in state_dict\['param_groups'\]\[0\]; nothing was loaded"):
        fresh.load_state_dict(saved)
    after = fresh.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["global_state"].keys() == before["global_state"].keys()


def test_a_constant_kernel_in_a_sum_has_no_n_by_n_gradient():
    """``ConstantKernel() + GroupKernel``: the constant's value was sliced from its expanded ``n x n`` tensor, whose
    backward allocated the whole ``n x n`` gradient (320 GB asked for at n = 2e5 in a user trial)."""
    from largest_tensor import LargestTensor

    n = 3000
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (n, 1), generator=g).double()
    y = torch.randn(n, generator=g, dtype=torch.float64)
    kernel = gpytorch.kernels.ConstantKernel() + GroupKernel(50)
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).double()
    model.train()
    with LargestTensor(storage=True) as seen:
        loss = -gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y)
        loss.backward()
    assert seen.largest < n * n // 16, seen.where
    assert model.covar_module.kernels[0].raw_constant.grad is not None


# ------------------------------------------------------------------ the second round of this session's trials
def _sum_prediction():
    """A model over two crossed groupings, and its prediction at new points (a sum's predictive covariance)."""
    g = torch.Generator().manual_seed(0)
    n = 80
    x = torch.stack([torch.randint(0, 5, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)], -1).double()
    y = torch.randn(n, generator=g, dtype=torch.float64)
    kernel = GroupKernel(6, active_dims=[0]) + GroupKernel(4, active_dims=[1])
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).double()
    model.eval()
    xt = torch.tensor([[0.0, 1], [5, 3], [2, 0]], dtype=torch.float64)
    with torch.no_grad():
        return model(xt).lazy_covariance_matrix, model


@pytest.mark.parametrize("make", [BlockMeanAdagrad, FullMatrixAdagrad], ids=["block mean", "full matrix"])
def test_a_parameter_made_to_share_memory_after_construction_is_refused_before_the_step(make):
    a = torch.nn.Parameter(torch.randn(3, 4))
    q = torch.nn.Parameter(torch.randn(3, 4))
    opt = make([a, q], lr=0.1)
    a.grad, q.grad = torch.randn(3, 4), torch.randn(3, 4)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    a_before = a.detach().clone()
    q.data = torch.randn(3, 1).expand(3, 4)
    with pytest.raises(ValueError, match="parameter 1 .* share memory"):
        opt.step()
    torch.testing.assert_close(a.detach(), a_before, rtol=0, atol=0)  # the other parameter did not move
    after = opt.state_dict()
    for key, value in before["global_state"].items():
        if torch.is_tensor(value):
            torch.testing.assert_close(after["global_state"][key], value, rtol=0, atol=0)
    for index, entry in before["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                torch.testing.assert_close(after["state"][index][key], value, rtol=0, atol=0)


def test_predictive_covariances_take_a_device_index_as_torch_does():
    covar, _ = _sum_prediction()
    assert type(covar).__name__ == "PredictiveCovarianceLinearOperator"
    moved = covar.to("meta")
    assert moved.device.type == "meta" and moved.shape == covar.shape
    if torch.cuda.is_available():
        assert covar.to(0).device.type == "cuda"
        return
    with pytest.raises(RuntimeError) as for_tensor:
        torch.zeros(1).to(0)
    with pytest.raises(type(for_tensor.value)):  # it was ignored: the operator stayed on the CPU, without a word
        covar.to(0)


def test_integer_operands_are_type_errors_in_every_operator():
    from bma_gp._composition import BlockMeanInterleavedLinearOperator
    from bma_gp.kernels import BlockCrossLinearOperator

    covar, _ = _sum_prediction()
    t = covar.shape[-1]
    ints = torch.ones(t, 2, dtype=torch.int64)
    for call in (
        lambda: covar.solve(ints),
        lambda: covar @ ints,
        lambda: covar.inv_quad(ints.bool()),
        lambda: covar.sqrt_inv_matmul(ints),
        lambda: covar.solve(ints.double(), left_tensor=ints.mT),
    ):
        with pytest.raises(TypeError, match="not a real floating-point dtype"):
            call()
    M = _operators()["block mean"]
    tasks = BlockMeanInterleavedLinearOperator(
        BlockMeanLinearOperator(M.lam.expand(2, K), M.B.expand(2, K, K), M.partition)
    ).add_diagonal(torch.tensor(0.5, dtype=torch.float64))
    rows = torch.ones(tasks.shape[-1], 1, dtype=torch.int64)
    for call in (lambda: tasks @ rows, lambda: tasks.solve(rows), lambda: tasks.solve(rows.double(), rows.mT)):
        with pytest.raises(TypeError, match="not a real floating-point dtype"):
            call()
    cross = BlockCrossLinearOperator(torch.rand(3, K, dtype=torch.float64), M.partition)
    with pytest.raises(TypeError, match="not a real floating-point dtype"):
        cross @ torch.ones(N, 1, dtype=torch.int64)  # noqa: B018
    with pytest.raises(TypeError, match="stay real floating point"):
        cross.to(torch.int64)
    S = _operators()["sum"]
    with pytest.raises(TypeError, match="lhs has dtype"):
        S.sqrt_inv_matmul(torch.ones(N, 1, dtype=torch.float64), torch.ones(1, N, dtype=torch.int64))


def test_a_sum_times_a_negative_or_zero_multiple_of_a_task_operator():
    """``S * (c X)`` for ``c <= 0``: a multiple of a block mean operator is one again (``B`` scaled), so a sum
    without a root takes it in closed form; with a root, whose ``U U^T`` cannot carry an indefinite factor, the
    product is formed densely with exact entries and a warning (it raised a ValueError about the k x k core matrix
    of the task operator's root, a matrix the user never built)."""
    from linear_operator.operators import ConstantMulLinearOperator, LowRankRootLinearOperator

    from bma_gp import ClosedFormFallbackWarning

    gen = torch.Generator().manual_seed(4)
    ops = _operators()
    X = ops["block mean"]
    plain = ops["sum"]
    rooted = plain + LowRankRootLinearOperator(torch.randn(N, 2, generator=gen, dtype=torch.float64))
    assert isinstance(rooted, BlockMeanSumLinearOperator) and rooted.root is not None
    for c in (-1.5, 0.0):
        scaled = ConstantMulLinearOperator(X, torch.tensor(c, dtype=torch.float64))
        product = plain * scaled
        assert isinstance(product, BlockMeanSumLinearOperator)
        torch.testing.assert_close(product.to_dense(), c * plain.to_dense() * X.to_dense(), rtol=1e-12, atol=1e-12)
    with pytest.warns(ClosedFormFallbackWarning, match="formed densely"):
        product = rooted * ConstantMulLinearOperator(X, torch.tensor(-1.5, dtype=torch.float64))
    torch.testing.assert_close(product.to_dense(), -1.5 * rooted.to_dense() * X.to_dense(), rtol=1e-12, atol=1e-12)


def test_leave_one_out_gradients_keep_no_cells_by_columns_gathers():
    """The leave-one-out objective's ``A_Er Q`` multiplied the eliminated grouping's table, kept as its nonzero cells
    (about n of them), by ``Q`` (``R`` columns) in gathers that autograd kept for backward, ``cells x R`` twice (a
    user trial: +2.67 GB at n = 40,000 against +0.35 GB for the marginal likelihood); the sparse product keeps
    ``values`` and ``Q`` only. Value and gradients against the dense objective at a smaller size are in
    test_trial24_fixes.py; here nothing of the size cells x R is formed."""
    from largest_tensor import LargestTensor

    g = torch.Generator().manual_seed(8)
    n, k1, k2, k3 = 12000, 1500, 300, 100
    x = torch.stack([torch.randint(0, k, (n,), generator=g) for k in (k1, k2, k3)], -1).double()
    y = torch.randn(n, generator=g, dtype=torch.float64)
    kernel = GroupKernel(k1, active_dims=[0]) + GroupKernel(k2, active_dims=[1]) + GroupKernel(k3, active_dims=[2])
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).double()
    model.train()
    mll = gpytorch.mlls.LeaveOneOutPseudoLikelihood(model.likelihood, model)
    with LargestTensor(storage=True) as seen:
        loss = -mll(model(x), y)
    loss.backward()
    assert seen.largest < n * (k2 + k3) // 2, seen.where
    assert all(p.grad is not None for p in model.covar_module.parameters())


def test_a_trained_task_factor_times_a_sum_with_a_root_keeps_one_root_sized_buffer():
    """The root's products with the task factor's row weights kept an ``n x m k_X`` tensor per weighted term for
    backward (``index_add``'s backward holds its source): ``k_X`` of them per grouping (a user trial: 2.33 against
    0.73 GB at n = 20,000 with 16 tasks). The sparse product keeps the weights and the root only."""
    from test_sum_times_block_mean import _model

    model, x, y, _ = _model("sum first", sum_kind="inducing points + group")
    model.train()
    seen: dict[int, int] = {}

    def pack(t):
        if t.layout == torch.strided:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = -gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y)
    loss.backward()
    covar = model.likelihood(model(x)).lazy_covariance_matrix.evaluate_kernel()
    assert isinstance(covar, BlockMeanSumLinearOperator) and len(covar.partitions) == 3  # one grouping, 3 tasks
    n, width = x.shape[0], covar.rank  # 5 inducing points times 3 tasks
    big = [b for b in seen.values() if b >= n * width * 8]
    assert len(big) <= 2, len(big)  # the root and its transpose (one more per weighted term before)
