"""FullMatrixAdagrad refuses a finite gradient that would overflow H (nothing changed), and load_state_dict refuses a
state dict whose per-parameter statistics are missing where its global state spans the parameter."""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch

from optim import BlockMeanAdagrad, FullMatrixAdagrad

pytestmark = pytest.mark.usefixtures("one_thread")

F32_MAX = torch.finfo(torch.float32).max


def _snapshot(opt):
    """A deep copy of what a step may change: the global state and the per-parameter state."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state = {i: copy.deepcopy(opt.state[p]) for i, p in enumerate(params) if p in opt.state}
    return copy.deepcopy(opt.global_state), state


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or (a.isnan().any() and torch.equal(a.nan_to_num(), b.nan_to_num()))
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (sorted(map(str, a)), sorted(map(str, b)))
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _full_step(opt, p, grad):
    p.grad = grad
    opt.step()


# ---------------------------------------------------------------- FullMatrixAdagrad: a gradient that overflows H
def test_full_matrix_refuses_a_finite_gradient_that_would_overflow_H_and_changes_nothing():
    p = torch.nn.Parameter(torch.randn(5))
    q = torch.nn.Parameter(p.detach().clone())
    opt, twin = FullMatrixAdagrad([p], lr=0.1), FullMatrixAdagrad([q], lr=0.1)
    _full_step(opt, p, torch.ones(5))
    _full_step(twin, q, torch.ones(5))
    H = opt.global_state["H"]
    before, params = _snapshot(opt), p.detach().clone()
    p.grad = torch.full((5,), 1e30)  # finite in float32, but 1e60 is not
    with pytest.raises(ValueError, match=r"too large.*overflow torch\.float32.*No state or parameter was changed"):
        opt.step()
    assert opt.global_state["step"] == 1 and opt.global_state["H"] is H
    _assert_same(_snapshot(opt), before)
    assert torch.equal(p.detach(), params)
    # the optimizer is not poisoned: the next steps are those of a run that never saw the refused gradient
    for t in range(3):
        grad = torch.randn(5, generator=torch.Generator().manual_seed(t))
        _full_step(opt, p, grad.clone())
        _full_step(twin, q, grad.clone())
    assert torch.equal(p.detach(), q.detach())
    assert torch.equal(opt.global_state["H"], twin.global_state["H"]) and opt.global_state["step"] == 4


def test_the_overflow_message_names_the_fixes():
    p = torch.nn.Parameter(torch.randn(3))
    opt = FullMatrixAdagrad([p])
    p.grad = torch.full((3,), 1e30)
    with pytest.raises(ValueError) as error:
        opt.step()
    message = str(error.value)
    assert "Scale the loss" in message and "clip_grad_norm_" in message and "float64 parameters" in message


def test_a_refused_first_step_leaves_no_state():
    p = torch.nn.Parameter(torch.randn(4))
    opt = FullMatrixAdagrad([p], lr=0.1)
    p.grad = torch.full((4,), -3e19)
    with pytest.raises(ValueError, match="would overflow"):
        opt.step()
    assert opt.global_state == {} and opt.state_dict()["global_state"] == {}
    q = torch.nn.Parameter(p.detach().clone())
    fresh = FullMatrixAdagrad([q], lr=0.1)
    _full_step(opt, p, torch.ones(4))
    _full_step(fresh, q, torch.ones(4))
    assert torch.equal(p.detach(), q.detach()) and opt.global_state["step"] == 1


def test_statistics_that_grow_past_the_range_are_refused_at_the_step_that_would_overflow():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = FullMatrixAdagrad([p], lr=0.1)
    g = torch.tensor(
        [1.2e19, 0.0, 0.0]
    )  # g g^T and its eigenvalue |g|^2 about 1.44e38: two steps fit in float32, the third does not
    _full_step(opt, p, g.clone())
    _full_step(opt, p, g.clone())
    assert bool(torch.isfinite(opt.global_state["H"]).all())
    before, params = _snapshot(opt), p.detach().clone()
    p.grad = g.clone()
    with pytest.raises(ValueError, match="would overflow"):
        opt.step()
    _assert_same(_snapshot(opt), before)
    assert torch.equal(p.detach(), params)


def test_a_gradient_near_the_limit_that_fits_steps_as_without_the_check():
    """Just below float32's limit the update is computed into a new matrix and checked: the step is that of
    check_finite=False (H updated in place, the same numbers)."""
    g = torch.tensor([1.84e19, -1.0, 2.0])  # 1.84e19**2 = 3.39e38: finite, but near the limit
    runs = []
    for check in (True, False):
        p = torch.nn.Parameter(torch.ones(3))
        opt = FullMatrixAdagrad([p], lr=0.1, check_finite=check)
        _full_step(opt, p, torch.ones(3))
        H = opt.global_state["H"]
        _full_step(opt, p, g.clone())
        assert opt.global_state["H"] is H and opt.global_state["step"] == 2
        runs.append((p.detach().clone(), H.clone()))
    assert bool(torch.isfinite(runs[0][1]).all())
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_float64_parameters_take_the_gradient_that_float32_refuses():
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = FullMatrixAdagrad([p], lr=0.1)
    _full_step(opt, p, torch.full((4,), 1e30, dtype=torch.float64))
    assert opt.global_state["step"] == 1 and bool(torch.isfinite(p).all())
    p.grad = torch.full((4,), 1e160, dtype=torch.float64)
    with pytest.raises(ValueError, match="would overflow torch.float64") as error:
        opt.step()
    assert "float64 parameters" not in str(error.value)
    assert opt.global_state["step"] == 1


def test_without_check_finite_a_failed_eigendecomposition_does_not_count_a_step():
    p = torch.nn.Parameter(torch.randn(5))
    opt = FullMatrixAdagrad([p], lr=0.1, check_finite=False)
    _full_step(opt, p, torch.ones(5))
    params = p.detach().clone()
    p.grad = torch.full((5,), 1e30)
    with pytest.raises(RuntimeError):  # torch.linalg.LinAlgError from eigh: H is not finite
        opt.step()
    assert opt.global_state["step"] == 1
    assert torch.equal(p.detach(), params)


def test_with_check_finite_a_non_finite_H_is_refused_before_anything_changes():
    """H holding inf (accumulated with check_finite=False) is named at the next checked step, not left to eigh."""
    p = torch.nn.Parameter(torch.randn(5))
    opt = FullMatrixAdagrad([p], lr=0.1, check_finite=False)
    _full_step(opt, p, torch.ones(5))
    p.grad = torch.full((5,), 1e30)
    with pytest.raises(RuntimeError):
        opt.step()
    opt.check_finite = True
    before, params = _snapshot(opt), p.detach().clone()
    p.grad = torch.ones(5)
    with pytest.raises(ValueError, match="H .* holds inf or nan before this step.*No state or parameter was changed"):
        opt.step()
    _assert_same(_snapshot(opt), before)
    assert torch.equal(p.detach(), params)


def test_H_that_overflows_when_cast_to_float32_is_refused_and_the_float64_state_kept():
    """model.float() after float64 steps casts H at the next step: entries beyond float32's range would be inf."""
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = FullMatrixAdagrad([p], lr=0.1)
    _full_step(opt, p, torch.full((3,), 1e25, dtype=torch.float64))  # H about 1e50
    H, layout = opt.global_state["H"], opt._layout
    before = _snapshot(opt)
    p.data = p.data.float()
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="holds inf or nan before this step"):
        opt.step()
    assert opt.global_state["H"] is H and H.dtype == torch.float64 and opt._layout is layout
    _assert_same(_snapshot(opt), before)


def test_ordinary_steps_are_unchanged_by_the_check():
    torch.manual_seed(0)
    runs = []
    for check in (True, False):
        model = torch.nn.Linear(4, 3)
        model.load_state_dict({k: torch.ones_like(v) * 0.1 for k, v in model.state_dict().items()})
        opt = FullMatrixAdagrad(model.parameters(), lr=0.05, check_finite=check)
        for t in range(4):
            x = torch.randn(6, 4, generator=torch.Generator().manual_seed(t))
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        runs.append((torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt.global_state["H"].clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# ---------------------------------------------------------------- load_state_dict: missing per-parameter statistics
def _linear_run(seed=0, **kw):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = BlockMeanAdagrad(model.parameters(), **kw)
    model(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    return model, opt


def _loaded_state(opt):
    return (
        copy.deepcopy(opt.global_state),
        {i: copy.deepcopy(opt.state[p]) for i, p in enumerate(p for g in opt.param_groups for p in g["params"])},
        copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
    )


@pytest.mark.parametrize("check_finite", [True, False])
@pytest.mark.parametrize("position", [0, 1])
def test_a_state_dict_missing_a_parameters_sum_is_refused_and_nothing_is_loaded(position, check_finite):
    _, source = _linear_run()
    sd = copy.deepcopy(source.state_dict())
    del sd["state"][position]["sum"]
    for target_steps in (False, True):
        model, target = _linear_run(seed=1, lr=0.5, check_finite=check_finite)
        if not target_steps:
            target = BlockMeanAdagrad(model.parameters(), lr=0.5, check_finite=check_finite)
        before = _loaded_state(target)
        with pytest.raises(ValueError, match=rf"'sum' of parameter {position} .*global state spans.*Nothing was"):
            target.load_state_dict(copy.deepcopy(sd))
        _assert_same(_loaded_state(target), before)


def test_a_state_dict_missing_a_parameters_whole_entry_is_refused():
    _, source = _linear_run()
    sd = copy.deepcopy(source.state_dict())
    del sd["state"][1]
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"'sum' of parameter 1 \(shape \(3,\)\)"):
        BlockMeanAdagrad(model.parameters()).load_state_dict(sd)


def test_a_state_saved_after_add_param_group_loads_but_not_without_the_first_groups_sums():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))
    source = BlockMeanAdagrad([a], lr=0.1)
    a.grad = torch.randn(3, 4)
    source.step()
    source.add_param_group({"params": [b]})  # saved before the next step: no state for b, U and w for a only
    sd = copy.deepcopy(source.state_dict())
    assert 1 not in sd["state"]

    def target():
        x, y = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
        opt = BlockMeanAdagrad([x], lr=0.1)
        opt.add_param_group({"params": [y]})
        return opt, x, y

    opt, x, y = target()
    opt.load_state_dict(copy.deepcopy(sd))  # the legitimate smaller global state
    a.grad, b.grad = torch.ones(3, 4), torch.ones(5)
    x.grad, y.grad = torch.ones(3, 4), torch.ones(5)
    source.step()
    opt.step()
    assert torch.equal(x.detach(), a.detach()) and torch.equal(y.detach(), b.detach())

    broken = copy.deepcopy(sd)
    del broken["state"][0]["sum"]
    broken["state"][1] = {"sum": torch.zeros(5)}  # a later group's state does not make up for it
    opt, _, _ = target()
    with pytest.raises(ValueError, match=r"'sum' of parameter 0 .*the first 1 parameters"):
        opt.load_state_dict(broken)
    assert opt.global_state == {} and len(opt.state) == 0


def test_a_cleared_state_saved_and_loaded_still_restarts_the_optimizer():
    """optimizer.state = defaultdict(dict) is a reset: its state dict (global state kept, no per-parameter state)
    loads, and the loaded optimizer restarts at its next step as the saving one does."""
    model, source = _linear_run(lr=0.1)
    source.state = defaultdict(dict)
    sd = copy.deepcopy(source.state_dict())
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    target = BlockMeanAdagrad(twin.parameters(), lr=0.1)
    target.load_state_dict(sd)
    x = torch.randn(5, 4)
    for m, o in ((model, source), (twin, target)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert target.global_state["step"] == source.global_state["step"] == 1


def test_an_empty_parameter_needs_no_saved_sum():
    torch.manual_seed(0)
    a, e = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.zeros(0))
    source = BlockMeanAdagrad([a, e], lr=0.1)
    a.grad, e.grad = torch.randn(3, 4), torch.zeros(0)
    source.step()
    sd = copy.deepcopy(source.state_dict())
    sd["state"].pop(1, None)
    target = BlockMeanAdagrad([torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(torch.zeros(0))], lr=0.1)
    target.load_state_dict(sd)
    assert target.global_state["step"] == 1


def test_intact_state_dicts_of_both_optimizers_still_load():
    for cls in (BlockMeanAdagrad, FullMatrixAdagrad):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = cls(model.parameters(), lr=0.1)
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        target = cls(torch.nn.Linear(4, 3).parameters(), lr=0.1)
        target.load_state_dict(copy.deepcopy(opt.state_dict()))
        _assert_same(target.global_state, opt.global_state)
