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
