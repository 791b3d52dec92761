"""Option paths of the optimizers that ran silently wrong (user trials p12, p13).

* FullMatrixAdagrad's overflow check bounded the entries of ``H + g g^T``, not its eigenvalues: a float32 gradient of
  1.5e19 in four entries gives entries of 2.25e38 (finite) but the eigenvalue ``|g|^2 = 9e38`` (not), and the step
  moved the parameters by ~1e13 without an error. Now refused, nothing changed.
* torch.optim.Adagrad's ``lr_decay`` / ``initial_accumulator_value`` were refused only by the constructor and
  ``add_param_group``: set in place after construction or loaded with a state dict they were silently ignored, and
  their zero given as a tensor was refused. Now refused at the step and at ``load_state_dict`` too (nothing changed,
  nothing loaded), and zero is accepted as a Python or NumPy number or a one-element tensor.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bma_gp.optim import BlockMeanAdagrad, FullMatrixAdagrad

pytestmark = pytest.mark.usefixtures("one_thread")

F32_MAX = torch.finfo(torch.float32).max
OPTIONS = ["lr_decay", "initial_accumulator_value"]
CLASSES = [BlockMeanAdagrad, FullMatrixAdagrad]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _snapshot(opt, params):
    """Deep copies of all that a step or a load may change: parameters, per-parameter and global state (step count
    included), and the param groups' settings."""
    state = {i: copy.deepcopy(dict(opt.state[p])) for i, p in enumerate(params) if p in opt.state}
    groups = [{k: copy.deepcopy(v) for k, v in group.items() if k != "params"} for group in opt.param_groups]
    group_params = [[id(p) for p in group["params"]] for group in opt.param_groups]
    values = [p.detach().clone() for p in params]
    return values, state, copy.deepcopy(opt.global_state), groups, group_params


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or (a.isnan().any() and torch.equal(a.nan_to_num(), b.nan_to_num()))
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (sorted(map(str, a)), sorted(map(str, b)))
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b or (a != a and b != b), (a, b)  # nan: the same


# ---------------------------------------------------------------- FullMatrixAdagrad: eigenvalues past the range
def test_full_matrix_refuses_a_gradient_whose_eigenvalue_overflows_at_the_first_step():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = FullMatrixAdagrad([p], lr=0.1)
    p.grad = torch.full((4,), 1.5e19)  # entries of g g^T: 2.25e38 (finite); its eigenvalue |g|^2 = 9e38 (not)
    with pytest.raises(ValueError, match=r"too large.*overflow torch\.float32.*eigenvalues.*No state or parameter"):
        opt.step()
    assert opt.global_state == {} and torch.equal(p.detach(), torch.zeros(4))
    # the optimizer is not poisoned: it steps as a fresh one
    q = torch.nn.Parameter(torch.zeros(4))
    fresh = FullMatrixAdagrad([q], lr=0.1)
    for opt_, param in ((opt, p), (fresh, q)):
        param.grad = torch.ones(4)
        opt_.step()
    assert torch.equal(p.detach(), q.detach()) and opt.global_state["step"] == 1
    assert bool(torch.isfinite(p).all()) and float(p.detach().abs().max()) < 1.0


def test_the_eigenvalue_overflow_message_names_the_eigenvalue_and_the_fixes():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = FullMatrixAdagrad([p])
    p.grad = torch.full((4,), 1.5e19)
    with pytest.raises(ValueError) as error:
        opt.step()
    message = str(error.value)
    assert "|g|^2 = 9e+38" in message and "entries up to 2.25e+38" in message
    assert "Scale the loss" in message and "clip_grad_norm_" in message and "float64 parameters" in message


def test_full_matrix_refuses_a_step_whose_eigenvalue_overflows_through_H_and_changes_nothing():
    """H of entries 1.69e38 (eigenvalue 3.38e38, which fits) and g of entries 5e18: every entry of H + g g^T stays
    below 2e38, but its top eigenvalue 3.38e38 + 5e37 = 3.88e38 does not (the bound on entries took the step, and eigh
    returned inf and garbage)."""
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(2))
    opt, twin = FullMatrixAdagrad([p], lr=0.1), FullMatrixAdagrad([q], lr=0.1)
    for opt_, param in ((opt, p), (twin, q)):
        param.grad = torch.full((2,), 1.3e19)
        opt_.step()
    H = opt.global_state["H"]
    assert opt.global_state["step"] == 1 and bool(torch.isfinite(H).all())
    before = _snapshot(opt, [p])
    p.grad = torch.full((2,), 5e18)
    with pytest.raises(ValueError, match=r"would overflow torch\.float32.*eigenvalues.*No state or parameter"):
        opt.step()
    assert opt.global_state["H"] is H and opt.global_state["step"] == 1
    _assert_same(_snapshot(opt, [p]), before)
    # the next steps are those of a run that never saw the refused gradient
    for t in range(3):
        grad = torch.randn(2, generator=torch.Generator().manual_seed(t))
        for opt_, param in ((opt, p), (twin, q)):
            param.grad = grad.clone()
            opt_.step()
    assert torch.equal(p.detach(), q.detach()) and opt.global_state["step"] == 4
    assert torch.equal(opt.global_state["H"], twin.global_state["H"])


def test_a_gradient_whose_eigenvalue_fits_near_the_limit_steps_as_without_the_check():
    """|g|^2 = 3.39e38, within 2^-8 of float32's largest value: off the fast path, checked exactly, and taken; the
    step is that of check_finite=False (H updated in place, the same numbers)."""
    g = torch.tensor([1.302e19, 1.302e19])
    assert float(g.double().square().sum()) > F32_MAX * (1 - 2.0**-8)
    runs = []
    for check in (True, False):
        p = torch.nn.Parameter(torch.ones(2))
        opt = FullMatrixAdagrad([p], lr=0.1, check_finite=check)
        p.grad = g.clone()
        opt.step()
        H = opt.global_state["H"]
        assert opt.global_state["step"] == 1 and bool(torch.isfinite(H).all()) and bool(torch.isfinite(p).all())
        runs.append((p.detach().clone(), H.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_statistics_whose_entries_grow_past_the_range_are_refused_at_the_step_that_would_overflow():
    """One nonzero entry of 1.2e19: H's entry and eigenvalue grow by 1.44e38 a step, so two steps fit float32 and the
    third does not. (With the 1.2e19 in all three entries, as tests/test_optim_overflow_and_load.py has it, the first
    step's eigenvalue, 4.32e38, already overflows: it is refused now.)"""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = FullMatrixAdagrad([p], lr=0.1)
    g = torch.tensor([1.2e19, 0.0, 0.0])
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
    assert bool(torch.isfinite(opt.global_state["H"]).all()) and bool(torch.isfinite(p).all())
    assert opt.global_state["step"] == 2
    before = _snapshot(opt, [p])
    p.grad = g.clone()
    with pytest.raises(ValueError, match="would overflow"):
        opt.step()
    _assert_same(_snapshot(opt, [p]), before)
    # the old gradient, 1.2e19 in every entry: refused at the first step (eigenvalue 4.32e38), nothing made
    q = torch.nn.Parameter(torch.zeros(3))
    fresh = FullMatrixAdagrad([q], lr=0.1)
    q.grad = torch.full((3,), 1.2e19)
    with pytest.raises(ValueError, match=r"\|g\|\^2 = 4\.32e\+38"):
        fresh.step()
    assert fresh.global_state == {} and torch.equal(q.detach(), torch.zeros(3))


def test_float64_takes_the_gradient_whose_float32_eigenvalue_overflows():
    """|g|^2 = 4e38 is past float32's range, not float64's. The gradient is along one axis, so that H = g g^T is
    diagonal and its eigendecomposition exact: with g along (1, 1, 1, 1) the root of the rank-one H + eps I (condition
    number 1e43) is ill-posed in any precision, and its eigenvectors' rounding (which LAPACK builds decide) put the
    step anywhere from -0.05 to 2000 per entry."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = FullMatrixAdagrad([p], lr=0.1)
    p.grad = torch.tensor([2e19, 0.0, 0.0, 0.0], dtype=torch.float64)
    opt.step()
    assert opt.global_state["step"] == 1
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.0, 0.0, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------- torch.optim.Adagrad's own options, every path
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("option", OPTIONS)
def test_an_adagrad_option_set_in_place_is_refused_at_the_step_and_changes_nothing(cls, option):
    model, twin_model = _model(), _model()
    ps, qs = list(model.parameters()), list(twin_model.parameters())
    opt, twin = cls(ps, lr=0.1), cls(qs, lr=0.1)
    for opt_, params in ((opt, ps), (twin, qs)):
        _grads(params, 0)
        opt_.step()
    opt.param_groups[0][option] = 0.5
    before = _snapshot(opt, ps)
    _grads(ps, 1)
    pattern = rf"{option}=0\.5.*torch\.optim\.Adagrad option.*silently ignored.*param_groups\[0\].*nothing was changed"
    with pytest.raises(ValueError, match=pattern):
        opt.step()
    _assert_same(_snapshot(opt, ps), before)
    assert opt.global_state["step"] == 1
    # removed again: the run goes on as one that never had it
    del opt.param_groups[0][option]
    for t in (1, 2):
        for opt_, params in ((opt, ps), (twin, qs)):
            _grads(params, t)
            opt_.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs)) and opt.global_state["step"] == 3


@pytest.mark.parametrize("cls", CLASSES)
def test_an_adagrad_option_set_in_place_before_the_first_step_leaves_no_state(cls):
    model = _model()
    ps = list(model.parameters())
    opt = cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.2}], lr=0.1)
    opt.param_groups[1]["lr_decay"] = 1e-3
    before = _snapshot(opt, ps)
    _grads(ps, 0)
    with pytest.raises(ValueError, match=r"lr_decay=0\.001.*param_groups\[1\]"):
        opt.step()
    _assert_same(_snapshot(opt, ps), before)
    assert opt.global_state == {} and not opt.state


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("option", OPTIONS)
def test_a_state_dict_with_an_adagrad_option_is_refused_and_nothing_is_loaded(cls, option):
    model = _model()
    ps = list(model.parameters())
    saver = cls(ps, lr=0.1)
    _grads(ps, 0)
    saver.step()
    sd = copy.deepcopy(saver.state_dict())
    sd["param_groups"][0][option] = 0.5
    loader = cls(ps, lr=0.3)
    for t in (1, 2):  # a state of its own, other than the saved one
        _grads(ps, t)
        loader.step()
    before = _snapshot(loader, ps)
    with pytest.raises(ValueError, match=rf"{option}=0\.5.*torch\.optim\.Adagrad option.*nothing was loaded"):
        loader.load_state_dict(sd)
    _assert_same(_snapshot(loader, ps), before)
    assert loader.global_state["step"] == 2 and loader.param_groups[0]["lr"] == 0.3
    assert option not in loader.param_groups[0]
    # at 0 (a state dict of a ported configuration) it loads
    sd["param_groups"][0][option] = 0
    loader.load_state_dict(sd)
    assert loader.global_state["step"] == 1 and loader.param_groups[0]["lr"] == 0.1


ZEROS = [
    pytest.param(lambda: torch.tensor(0.0), id="tensor-0.0"),
    pytest.param(lambda: torch.tensor(0), id="tensor-int-0"),
    pytest.param(lambda: torch.tensor([0.0]), id="tensor-1-element"),
    pytest.param(lambda: np.float64(0.0), id="numpy-float64"),
    pytest.param(lambda: np.float32(0.0), id="numpy-float32"),
    pytest.param(lambda: np.int64(0), id="numpy-int64"),
]


def _reference_params(cls, seeds):
    model = _model()
    ps = list(model.parameters())
    opt = cls(ps, lr=0.1)
    for t in seeds:
        _grads(ps, t)
        opt.step()
    return ps


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("zero", ZEROS)
def test_zero_given_as_a_tensor_or_numpy_scalar_is_accepted_on_every_path(cls, option, zero):
    reference = _reference_params(cls, (0, 1, 2))
    # the constructor
    model = _model()
    ps = list(model.parameters())
    opt = cls([{"params": ps, option: zero()}], lr=0.1)
    for t in (0, 1, 2):
        _grads(ps, t)
        opt.step()
    assert all(torch.equal(p, r) for p, r in zip(ps, reference))
    # add_param_group
    model = _model()
    ps = list(model.parameters())
    opt = cls(ps[:2], lr=0.1)
    opt.add_param_group({"params": ps[2:], option: zero()})
    for t in (0, 1, 2):
        _grads(ps, t)
        opt.step()
    assert all(torch.equal(p, r) for p, r in zip(ps, reference))
    # set in place between steps, and loaded with a state dict
    model = _model()
    ps = list(model.parameters())
    opt = cls(ps, lr=0.1)
    _grads(ps, 0)
    opt.step()
    opt.param_groups[0][option] = zero()
    _grads(ps, 1)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    assert option in sd["param_groups"][0]
    loaded = cls(ps, lr=0.1)
    loaded.load_state_dict(sd)
    _grads(ps, 2)
    loaded.step()
    assert all(torch.equal(p, r) for p, r in zip(ps, reference))


NONZERO = [
    pytest.param(lambda: torch.tensor(0.5), id="tensor-0.5"),
    pytest.param(lambda: np.float64(0.5), id="numpy-0.5"),
    pytest.param(lambda: float("nan"), id="nan"),
    pytest.param(lambda: torch.zeros(2), id="tensor-2-elements"),
    pytest.param(lambda: "0", id="string"),
]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("value", NONZERO)
def test_other_values_are_refused_on_every_path(cls, value):
    model = _model()
    ps = list(model.parameters())
    with pytest.raises(ValueError, match=r"lr_decay=.*torch\.optim\.Adagrad option"):
        cls([{"params": ps, "lr_decay": value()}], lr=0.1)
    opt = cls(ps[:2], lr=0.1)
    with pytest.raises(ValueError, match=r"lr_decay=.*torch\.optim\.Adagrad option"):
        opt.add_param_group({"params": ps[2:], "lr_decay": value()})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": ps[2:]})
    _grads(ps, 0)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt.param_groups[1]["lr_decay"] = value()
    before = _snapshot(opt, ps)
    _grads(ps, 1)
    with pytest.raises(ValueError, match=r"lr_decay=.*param_groups\[1\]"):
        opt.step()
    _assert_same(_snapshot(opt, ps), before)
    del opt.param_groups[1]["lr_decay"]
    sd["param_groups"][1]["lr_decay"] = value()
    before = _snapshot(opt, ps)
    with pytest.raises(ValueError, match=r"lr_decay=.*nothing was loaded"):
        opt.load_state_dict(sd)
    _assert_same(_snapshot(opt, ps), before)


@pytest.mark.parametrize("cls", CLASSES)
def test_adagrad_options_as_constructor_keywords_at_zero_are_accepted_and_refused_otherwise(cls):
    """A ported torch.optim.Adagrad configuration passed as keywords (``Opt(params, **cfg)``) with ``lr_decay=0`` and
    ``initial_accumulator_value=0`` failed with ``TypeError: unexpected keyword argument``, while the same options in a
    param group were accepted at 0. Now the constructor takes them at 0 (not stored in the groups) and refuses any
    other value with the param groups' ``ValueError``."""
    p = torch.nn.Parameter(torch.ones(3))
    cfg = dict(lr=0.1, lr_decay=0, initial_accumulator_value=0.0, weight_decay=0.0)
    opt = cls([p], **cfg)
    assert "lr_decay" not in opt.param_groups[0] and "initial_accumulator_value" not in opt.param_groups[0]
    reference = torch.nn.Parameter(torch.ones(3))
    plain = cls([reference], lr=0.1)
    for q, o in ((p, opt), (reference, plain)):
        q.grad = torch.tensor([0.5, -1.0, 2.0])
        o.step()
    torch.testing.assert_close(p.detach(), reference.detach(), rtol=0, atol=0)
    for name, value in (("lr_decay", 0.5), ("initial_accumulator_value", 0.1)):
        with pytest.raises(ValueError, match=rf"{cls.__name__}\(\.\.\.\) was given {name}={value}.*Nothing was made"):
            cls([torch.nn.Parameter(torch.ones(3))], **{name: value})
