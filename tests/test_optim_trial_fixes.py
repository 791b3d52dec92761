"""The defects of the user trial of BlockMeanAdagrad (optimizer-wide settings assigned as attributes, the partition
assigned after construction, damping=0 with a singular F, the fused step's fallback warning, and parameters that are
all empty tensors): each test failed before its fix."""

from __future__ import annotations

import copy
import inspect
import pickle
import warnings

import numpy as np
import pytest
import torch

from bma_gp.optim import _fused, _jit
from bma_gp.optim.functional import Workspace, block_mean_adagrad
from bma_gp.optim.param_blocks import ParamBlocks
from optim import BlockMeanAdagrad, FullMatrixAdagrad
from optim_reference import flat, fused_at_any_size, loss_of, small_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, t).backward()
        opt.step()


def _state_of(opt) -> tuple:
    """Everything a refused step must leave as it was: per-parameter state, global state and the hyperparameters,
    as copies (compared with :func:`_same`)."""
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for p, st in opt.state.items()}
    global_state = {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in opt.global_state.items()}
    return state, global_state


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------- 1. settings assigned as attributes are checked
BAD_SETTINGS = [
    (BlockMeanAdagrad, "damping", -1.0),
    (BlockMeanAdagrad, "damping", float("nan")),
    (BlockMeanAdagrad, "damping", float("inf")),
    (BlockMeanAdagrad, "damping", "0.1"),
    (BlockMeanAdagrad, "eps", -0.5),
    (BlockMeanAdagrad, "eps", 0.0),
    (BlockMeanAdagrad, "update_interval", 0),
    (BlockMeanAdagrad, "update_interval", 2.0),
    (BlockMeanAdagrad, "fused", "yes"),
    (BlockMeanAdagrad, "check_finite", "no"),
    (BlockMeanAdagrad, "check_finite", 1),
    (FullMatrixAdagrad, "eps", -1.0),
    (FullMatrixAdagrad, "eps", float("nan")),
    (FullMatrixAdagrad, "max_dim", 0),
    (FullMatrixAdagrad, "max_dim", 1.5),
    (FullMatrixAdagrad, "check_finite", "no"),
]


@pytest.mark.parametrize("cls,name,value", BAD_SETTINGS, ids=[f"{c.__name__}.{n}={v!r}" for c, n, v in BAD_SETTINGS])
def test_an_invalid_attribute_setting_raises_the_constructors_error_and_changes_nothing(cls, name, value):
    """``opt.damping = -1.0`` was taken silently and the next step wrote nan into every parameter (and the step after
    blamed the gradient); ``opt.eps``, ``opt.update_interval``, ``opt.fused`` and ``opt.check_finite`` likewise."""
    with pytest.raises(ValueError) as constructor_error:
        cls(small_model().parameters(), **{name: value})
    model, twin = small_model(), small_model()
    opt, twin_opt = cls(model.parameters(), lr=0.05), cls(twin.parameters(), lr=0.05)
    _train(model, opt, 2)
    _train(twin, twin_opt, 2)
    old = getattr(opt, name)
    with pytest.raises(ValueError) as attribute_error:
        setattr(opt, name, value)
    assert str(attribute_error.value) == str(constructor_error.value)  # the constructor's message
    assert getattr(opt, name) == old and type(getattr(opt, name)) is type(old)
    _train(model, opt, 2, start=2)  # steps on as if nothing had been assigned
    _train(twin, twin_opt, 2, start=2)
    assert torch.equal(flat(model.parameters()), flat(twin.parameters()))
    assert bool(torch.isfinite(flat(model.parameters())).all())


def test_valid_settings_assigned_as_attributes_are_converted_as_by_the_constructor():
    opt = BlockMeanAdagrad(small_model().parameters())
    opt.eps = np.float32(1e-8)  # docs/optimizer.md: "set the attribute instead (opt.eps = 1e-8)"
    opt.damping = torch.tensor(0.2, dtype=torch.float64)  # "set the attribute after loading (opt.damping = 0.2)"
    opt.update_interval = np.int64(3)
    opt.fused = None  # torch.optim's default: the eager step, as in the constructor
    opt.check_finite = False
    assert (opt.eps, opt.damping, opt.update_interval, opt.fused, opt.check_finite) == (
        float(np.float32(1e-8)),
        0.2,
        3,
        False,
        False,
    )
    assert [type(x) for x in (opt.eps, opt.damping, opt.update_interval)] == [float, float, int]
    model = small_model()
    assigned = BlockMeanAdagrad(model.parameters(), lr=0.05)
    assigned.eps, assigned.damping, assigned.update_interval = 1e-8, 0.2, 2
    twin = small_model()
    built = BlockMeanAdagrad(twin.parameters(), lr=0.05, eps=1e-8, damping=0.2, update_interval=2)
    _train(model, assigned, 3)
    _train(twin, built, 3)
    assert torch.equal(flat(model.parameters()), flat(twin.parameters()))
    assert assigned.state_dict()["hyperparameters"] == {"eps": 1e-8, "damping": 0.2, "update_interval": 2}
    full = FullMatrixAdagrad(small_model().parameters())
    full.eps, full.max_dim = np.float64(1e-3), np.int64(100)
    assert (full.eps, full.max_dim) == (1e-3, 100) and type(full.max_dim) is int


def test_fused_assigned_with_a_callable_partition_and_max_dim_below_the_model_are_refused():
    rule = lambda p: torch.arange(p.numel()) % 2  # noqa: E731
    with pytest.raises(ValueError) as constructor_error:
        BlockMeanAdagrad(small_model().parameters(), partition=rule, fused=True)
    opt = BlockMeanAdagrad(small_model().parameters(), partition=rule)
    with pytest.raises(ValueError) as attribute_error:
        opt.fused = True
    assert str(attribute_error.value) == str(constructor_error.value) and opt.fused is False
    full = FullMatrixAdagrad(small_model().parameters(), max_dim=100)  # d = 60
    with pytest.raises(ValueError, match="d = 60 parameters.*above max_dim = 59"):
        full.max_dim = 59
    assert full.max_dim == 100
    full.max_dim = 60
    assert full.max_dim == 60


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "state_dict"])
def test_assigned_settings_survive_copies_and_loads(how):
    model = small_model()
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05, partition="row")
    _train(model, opt, 2)
    opt.eps, opt.damping, opt.update_interval, opt.check_finite = 1e-8, 0.3, 2, False
    if how == "state_dict":
        clone_model = copy.deepcopy(model)
        clone = BlockMeanAdagrad(clone_model.parameters(), lr=0.05, partition="row", check_finite=False)
        clone.load_state_dict(opt.state_dict())
    else:
        copier = copy.deepcopy if how == "deepcopy" else (lambda x: pickle.loads(pickle.dumps(x)))
        clone_model, clone = copier((model, opt))
    assert (clone.eps, clone.damping, clone.update_interval, clone.check_finite) == (1e-8, 0.3, 2, False)
    with pytest.raises(ValueError, match="Invalid damping"):  # the copy checks its assignments too
        clone.damping = -1.0
    _train(model, opt, 2, start=2)
    _train(clone_model, clone, 2, start=2)
    assert torch.equal(flat(model.parameters()), flat(clone_model.parameters()))


# ---------------------------------------------------------------- 2. the partition cannot be assigned
@pytest.mark.parametrize("when", ["before the first step", "after a step"])
def test_assigning_another_partition_is_refused_and_add_param_group_keeps_the_blocks(when):
    """``opt.partition_rule = "row"`` was accepted and ignored; after ``add_param_group`` the new rule was applied to
    all parameters and the per-tensor statistics were handed to the first row blocks."""
    torch.manual_seed(0)
    W, b, c = (torch.nn.Parameter(torch.randn(*shape)) for shape in [(4, 3), (3,), (2, 2)])
    twin = [torch.nn.Parameter(x.detach().clone()) for x in (W, b, c)]
    opt = BlockMeanAdagrad([W, b], lr=0.1)
    ref = BlockMeanAdagrad(twin[:2], lr=0.1)
    grads = [torch.randn(4, 3), torch.randn(3), torch.randn(2, 2)]
    if when == "after a step":
        for o, ps in ((opt, (W, b)), (ref, twin[:2])):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            o.step()
    before = _state_of(opt)
    for value in ["row", lambda p: torch.zeros(p.numel(), dtype=torch.long)]:
        with pytest.raises(ValueError, match="partition of BlockMeanAdagrad cannot change.*build a new"):
            opt.partition_rule = value
    with pytest.raises(ValueError, match="cannot change"):
        opt.partition = "row"
    assert opt.partition_rule == "tensor" and _same(_state_of(opt), before)
    opt.partition_rule = "tensor"  # the same rule again: nothing to change
    opt.add_param_group({"params": [c]})
    ref.add_param_group({"params": [twin[2]]})
    for step in range(3):
        for o, ps in ((opt, (W, b, c)), (ref, twin)):
            for p, g in zip(ps, grads):
                p.grad = g * (step + 1)
            o.step()
    assert opt.global_state["U"].shape == (3, 3)  # one block per tensor
    assert torch.equal(flat([W, b, c]), flat(twin)) and torch.equal(opt.global_state["U"], ref.global_state["U"])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_the_partition_survives_copies(how):
    model = small_model()
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05, partition="row")
    _train(model, opt, 2)
    copier = copy.deepcopy if how == "deepcopy" else (lambda x: pickle.loads(pickle.dumps(x)))
    clone_model, clone = copier((model, opt))
    assert clone.partition_rule == "row"
    with pytest.raises(ValueError, match="cannot change"):
        clone.partition_rule = "tensor"
    _train(model, opt, 2, start=2)
    _train(clone_model, clone, 2, start=2)
    assert torch.equal(flat(model.parameters()), flat(clone_model.parameters()))


# ---------------------------------------------------------------- 3. damping=0 and a singular F
def _scalars(n: int) -> torch.nn.ParameterList:
    return torch.nn.ParameterList([torch.nn.Parameter(torch.randn(3)) for _ in range(n)])


def _rows(p):  # a callable partition: the scattered path
    return torch.arange(p.numel()) % 2 if p.numel() > 1 else torch.zeros(p.numel(), dtype=torch.long)


# model, partition, options: the paths of the step and of its root
FIRST_STEP_CASES = {
    "tensor, root on Python floats": (lambda: torch.nn.Linear(4, 2), "tensor", {}),
    "tensor, root in numpy": (lambda: _scalars(10), "tensor", {}),
    "tensor, root in torch": (lambda: _scalars(130), "tensor", {}),
    "tensor, ratio form": (lambda: torch.nn.Linear(200, 200), "tensor", {}),
    "tensor, maximize": (lambda: torch.nn.Linear(4, 2), "tensor", {"maximize": True}),
    "row, root in numpy": (lambda: torch.nn.Linear(4, 2), "row", {}),
    "row, root in torch": (lambda: torch.nn.Linear(4, 130), "row", {}),
    "callable": (lambda: torch.nn.Linear(4, 2), _rows, {}),
}


@pytest.mark.parametrize("case", list(FIRST_STEP_CASES))
def test_damping_zero_refuses_the_first_step_of_a_singular_F_and_changes_nothing(case):
    """With damping=0 the first step of any model of two or more blocks wrote nan (or, where rounding left the
    singular F's smallest eigenvalue a tiny positive number, steps of millions) into the parameters, with no error
    although check_finite=True; the next step blamed the gradient."""
    make, partition, options = FIRST_STEP_CASES[case]
    torch.manual_seed(0)
    model = make()
    opt = BlockMeanAdagrad(model.parameters(), lr=0.1, damping=0.0, partition=partition, **options)
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    params = flat(model.parameters()).clone()
    with pytest.raises(ValueError, match=r"damping=0\.0: F is singular.*Choose damping > 0.*No state or parameter"):
        opt.step()
    assert torch.equal(flat(model.parameters()), params)
    assert len(opt.state) == 0 and opt.global_state == {} and opt.partition is None
    opt.damping = 0.1  # the error's advice: the optimizer steps on as one built with it
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    twin_opt = BlockMeanAdagrad(twin.parameters(), lr=0.1, damping=0.1, partition=partition, **options)
    for _ in range(2):
        opt.step()
        twin_opt.step()
    assert torch.equal(flat(model.parameters()), flat(twin.parameters()))
    assert _same(_state_of(opt)[1], _state_of(twin_opt)[1])


# more blocks than steps at the refused third step (F singular by its rank)
MID_RUN_CASES = {
    "tensor, ratio and host forms": (
        lambda: torch.nn.Sequential(torch.nn.Linear(200, 200), torch.nn.Linear(200, 3)),
        "tensor",
    ),
    "row": (lambda: torch.nn.Linear(4, 6), "row"),
    "callable": (lambda: torch.nn.Linear(4, 6), _rows),
    "after add_param_group": (lambda: torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Linear(2, 2)), "tensor"),
}


@pytest.mark.parametrize("case", list(MID_RUN_CASES))
def test_a_refused_damping_zero_step_mid_run_leaves_everything_as_it_was(case):
    """Mid-run, the refused step restores h, U, w, the step count and the root (the eager paths update h before the
    root), and a layout it committed: the run then goes on bit for bit as one that never tried it."""
    make, partition = MID_RUN_CASES[case]

    def build():
        torch.manual_seed(0)
        model = make()
        return model, BlockMeanAdagrad(model.parameters(), lr=0.1, partition=partition)

    def grads(model, t):
        gen = torch.Generator().manual_seed(100 + t)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
            if p.numel() == 40000:  # entries without a gradient yet (h = 0): the lists of them are restored too
                p.grad[:2] = 0.0

    model, opt = build()
    twin, twin_opt = build()
    extra = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))]
    for t in range(2):
        for m, o in ((model, opt), (twin, twin_opt)):
            grads(m, t)
            o.step()
    if case == "after add_param_group":  # a new layout is committed by the refused step: undone as well
        opt.add_param_group({"params": [extra[0]]})
        twin_opt.add_param_group({"params": [extra[1]]})
        extra[1].data.copy_(extra[0])
    params = [p for g in opt.param_groups for p in g["params"]]
    twin_params = [p for g in twin_opt.param_groups for p in g["params"]]
    before, values = _state_of(opt), flat(params).clone()
    opt.damping = 0.0
    grads(model, 2)
    if case == "after add_param_group":
        extra[0].grad = torch.ones(5)
    with pytest.raises(ValueError, match=r"damping=0\.0: F is singular"):
        opt.step()
    assert torch.equal(flat(params), values) and _same(_state_of(opt), before)
    opt.damping = 0.1
    for t in range(2, 5):
        for m, o, e in ((model, opt, extra[0]), (twin, twin_opt, extra[1])):
            grads(m, t)
            if case == "after add_param_group":
                e.grad = torch.ones(5) * t
            o.step()
    assert torch.equal(flat(params), flat(twin_params))
    assert _same(_state_of(opt)[1], _state_of(twin_opt)[1])


@pytest.mark.parametrize("partition", ["tensor", _rows], ids=["host root", "root of the scattered step"])
def test_damping_zero_refuses_a_root_that_comes_out_non_finite(partition):
    """Past the steps where F is singular by its rank, two parameters whose gradients are always equal keep F
    singular (all their normalised gradients agree): the root came out nan and the step wrote it."""
    a, b = torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(2.0))
    opt = BlockMeanAdagrad([a, b], lr=0.1, damping=0.1, partition=partition)
    for t in range(2):
        a.grad, b.grad = torch.tensor(0.5 + t), torch.tensor(0.5 + t)
        opt.step()
    before, values = _state_of(opt), flat([a, b]).clone()
    opt.damping = 0.0
    a.grad, b.grad = torch.tensor(2.5), torch.tensor(2.5)
    with pytest.raises(ValueError, match=r"came out inf or nan: F is singular.*Choose damping > 0"):
        opt.step()
    assert torch.equal(flat([a, b]), values) and _same(_state_of(opt), before)


def test_damping_zero_steps_where_F_is_regular_and_without_check_finite():
    """The check refuses only a singular F: a one-block model (F = 1, torch's Adagrad) and two blocks whose
    normalised gradients differ after two steps step with damping=0; check_finite=False skips it (nan, as
    documented)."""
    p = torch.nn.Parameter(torch.tensor(1.0))
    q = torch.nn.Parameter(torch.tensor(1.0))
    opt = BlockMeanAdagrad([p], lr=0.1, damping=0.0)
    adagrad = torch.optim.Adagrad([q], lr=0.1, eps=1e-10)
    for t in range(3):
        p.grad, q.grad = torch.tensor(0.3 * (t + 1)), torch.tensor(0.3 * (t + 1))
        opt.step()
        adagrad.step()
    assert torch.equal(p, q)
    a, b = torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(2.0))
    opt = BlockMeanAdagrad([a, b], lr=0.1)
    for t, (ga, gb) in enumerate([(1.0, 1.0), (1.0, -3.0), (2.0, 0.5)]):
        opt.damping = 0.0 if t == 2 else 0.1
        a.grad, b.grad = torch.tensor(ga), torch.tensor(gb)
        opt.step()
    assert opt.global_state["step"] == 3 and bool(torch.isfinite(flat([a, b])).all())
    model = torch.nn.Linear(4, 2)
    opt = BlockMeanAdagrad(model.parameters(), lr=0.1, damping=0.0, check_finite=False)
    model(torch.randn(6, 4)).pow(2).mean().backward()
    opt.step()
    assert opt.global_state["step"] == 1


@pytest.mark.parametrize("backend", ["numba", "inductor"])
def test_damping_zero_refuses_the_fused_step_too(monkeypatch, backend):
    if backend == "numba" and not _jit.AVAILABLE:
        pytest.skip("numba is not installed (pip install bma-gp[jit])")
    monkeypatch.setattr(_fused, "CPU_BACKEND", backend)
    with fused_at_any_size():
        model = small_model()
        opt = BlockMeanAdagrad(model.parameters(), lr=0.05, partition="row", fused=True)
        _train(model, opt, 1)
        before, values = _state_of(opt), flat(model.parameters()).clone()
        opt.damping = 0.0
        opt.zero_grad()
        loss_of(model, 1).backward()
        with pytest.raises(ValueError, match="F is singular"):
            opt.step()
        assert torch.equal(flat(model.parameters()), values) and _same(_state_of(opt), before)


@pytest.mark.parametrize("rule", ["tensor", "row"])
def test_damping_zero_through_the_functional_step(rule):
    """block_mean_adagrad(..., damping=0, check_finite=True) refuses too, with h, the statistics and the workspace's
    lists of entries where h == 0 as they were: later steps equal those of a run that never tried (the entries whose
    gradient is 0 in them stay where they are, as h == 0 there again)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64)), torch.nn.Parameter(torch.randn(4).double())]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    blocks = ParamBlocks.build(params, rule)
    k = blocks.num_blocks
    runs = []
    for ps in (params, twin):
        h = torch.zeros(blocks.bounds[-1], dtype=torch.float64)
        stats = {"U": torch.zeros(k, k, dtype=torch.float64), "w": torch.zeros(k, dtype=torch.float64), "step": 0}
        runs.append((ps, h, stats, Workspace.build(blocks, h)))

    def step(run, t, damping):
        ps, h, stats, ws = run
        gen = torch.Generator().manual_seed(t)
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps]
        if damping:  # after the refused step, entries of h that stay 0
            grads[0][0, :2] = 0.0
        block_mean_adagrad(
            ps, grads, h, stats, blocks, ws, lr=[0.1, 0.1], weight_decay=[0.0, 0.0], maximize=[False, False],
            eps=1e-10, damping=damping, update_interval=1, mask=True, check_finite=True, fused=False,
        )  # fmt: skip

    h, stats = runs[0][1], runs[0][2]
    with pytest.raises(ValueError, match="F is singular"):
        step(runs[0], 0, 0.0)
    assert not h.any() and stats["step"] == 0 and not stats["U"].any() and stats.get("root_lam") is None
    start = flat(params).clone()
    for t in range(3):
        for run in runs:
            step(run, t, 0.1)
    assert torch.equal(flat(params), flat(twin)) and torch.equal(h, runs[1][1])
    assert torch.equal(params[0][0, :2], start[:2])  # no gradient yet: not moved


# ---------------------------------------------------------------- 4. one warning where torch.compile fails
def test_a_failing_torch_compile_warns_once_per_process_at_the_callers_line(monkeypatch):
    """Without numba and a C++ compiler the two fused passes warned once each, both at functional.py's line."""
    from torch._dynamo.exc import BackendCompilerFailed

    def broken_compile(fn, **kwargs):
        def call(*args):
            raise BackendCompilerFailed("inductor", RuntimeError("no C++ compiler"), None)

        return call

    monkeypatch.setattr(_fused, "CPU_BACKEND", "inductor")
    monkeypatch.setattr(_fused, "_COMPILED", {})
    monkeypatch.setattr(_fused.torch, "compile", broken_compile)
    with fused_at_any_size(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = small_model()
        opt = BlockMeanAdagrad(model.parameters(), lr=0.05, fused=True)
        loss_of(model, 0).backward()
        line = inspect.currentframe().f_lineno + 1
        opt.step()
        _train(model, opt, 2, start=1)
        other = small_model()
        _train(other, BlockMeanAdagrad(other.parameters(), lr=0.05, fused=True), 2)  # another optimizer: no warning
    found = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(found) == 1, [str(w.message) for w in found]
    assert "torch.compile of the fused step failed" in str(found[0].message)
    assert (found[0].filename, found[0].lineno) == (__file__, line)  # the caller's opt.step()


# ---------------------------------------------------------------- 5. parameters that are all empty tensors
@pytest.mark.parametrize("options", [{}, {"partition": "row", "fused": True}, {"partition": _rows}])
def test_stepping_only_empty_parameters_does_nothing_and_later_groups_step(options):
    """BlockMeanAdagrad over empty tensors only (a zero-width layer) was built fine, then every step raised; torch's
    Adagrad and FullMatrixAdagrad step such parameters as a no-op."""
    empty = torch.nn.Parameter(torch.zeros(0, 8))
    opt = BlockMeanAdagrad([empty], lr=0.1, **options)
    empty.sum().backward()
    for _ in range(2):
        opt.step()
    assert len(opt.state) == 0 and opt.global_state == {} and opt.partition is None
    saved = opt.state_dict()
    fresh = BlockMeanAdagrad([torch.nn.Parameter(torch.zeros(0, 8))], lr=0.1, **options)
    fresh.load_state_dict(saved)
    assert fresh.global_state == {}
    # a group with entries added later steps as in an optimizer built with both groups
    weight = torch.nn.Parameter(torch.ones(2, 3))
    twin_empty, twin = torch.nn.Parameter(torch.zeros(0, 8)), torch.nn.Parameter(torch.ones(2, 3))
    opt.add_param_group({"params": [weight]})
    ref = BlockMeanAdagrad([{"params": [twin_empty]}, {"params": [twin]}], lr=0.1, **options)
    twin_empty.grad = torch.zeros(0, 8)
    for t in range(3):
        weight.grad = torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, 1.0]]) * (t + 1)
        twin.grad = weight.grad.clone()
        opt.step()
        ref.step()
    assert torch.equal(weight, twin) and not torch.equal(weight, torch.ones(2, 3))
    assert torch.equal(opt.global_state["U"], ref.global_state["U"]) and opt.global_state["step"] == 3


def _rounded_statistics():
    """Statistics of six steps (F regular) whose block 1 has two equal gradient entries at every step (lam^F = 0
    exactly), with U_11 rounded up by a relative 1e-6, as float32 accumulation can: lam^F = -1e-6 there, below
    -damping for damping < 1e-6."""
    from bma_gp import Partition

    partition = Partition.from_sizes([3, 2, 4])
    n = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    n[:, 4] = n[:, 3]
    sums = partition.block_sum(n)
    U = sums.mT @ sums
    w = partition.block_sum(n * n).sum(0)
    exact = U.clone()
    U[1, 1] *= 1 + 1e-6
    return partition, U, w, exact


@pytest.mark.parametrize("form", ["python", "numpy", "torch"])
@pytest.mark.parametrize("damping", [1e-7, 1e-9])
def test_root_clamps_rounding_below_the_damping(form, damping):
    """(F + delta I)^(-1/2) of statistics whose rounding puts lam^F below -delta: before, 1 / sqrt of a negative
    number (nan; the Python form handed it to numpy, which gave nan too). Now finite in every form, and equal to the
    root of the unrounded statistics (lam^F = 0 there) to the size of the rounding."""
    from bma_gp.optim import functional as F

    partition, U, w, exact = _rounded_statistics()
    if form == "python":
        consts = F._root_constants(partition, torch.float64, torch.device("cpu"), lists=True)
        root = F._inverse_root_python(U.tolist(), w.tolist(), consts, damping)
        assert root is not None
        lam, B = (torch.tensor(x, dtype=torch.float64) for x in root)
    elif form == "numpy":
        lam, B = F._normalised_inverse_root(U, w, partition, damping)
    else:
        lam, B = F._normalised_inverse_root_torch(U, w, partition, damping)
    assert torch.isfinite(lam).all() and torch.isfinite(B).all()
    ref_lam, ref_B = F._normalised_inverse_root_torch(exact, w, partition, damping)
    # lam_1 is delta^(-1/2) in both (clamped / exact 0 + delta); the rest moves by the rounding only
    torch.testing.assert_close(lam, ref_lam, rtol=1e-4, atol=0)
    torch.testing.assert_close(B, ref_B, rtol=1e-4, atol=1e-4 * float(ref_B.abs().max()))


def test_small_damping_steps_stay_finite_in_float32():
    """The user-level failure: a float32 MLP with damping 1e-6 wrote nan into its parameters within two steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(40, 40), torch.nn.Tanh(), torch.nn.Linear(40, 40), torch.nn.Linear(40, 3)
    )
    for partition in ("tensor", "row"):
        opt = BlockMeanAdagrad(model.parameters(), lr=1e-3, damping=1e-6, partition=partition)
        x, y = torch.randn(32, 40), torch.randint(0, 3, (32,))
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_too_many_blocks_are_refused_before_any_state():
    """partition="row" on a tall tensor gave k of the order of its entries: the first step asked torch for a 60000 x
    60000 matrix (14 GB) and failed with its allocator's message (user trial). More than max_blocks blocks raise a
    ValueError naming the partition and the limit, with nothing changed; raising the limit lets the step run."""
    w = torch.nn.Parameter(torch.randn(50, 2))
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    opt = BlockMeanAdagrad([w], partition="row", max_blocks=40)
    with pytest.raises(ValueError, match=r"partition 'row' gives k = 50 blocks, more than max_blocks = 40"):
        opt.step()
    assert torch.equal(w.detach(), before) and not opt.state and not opt.global_state
    with pytest.raises(ValueError, match="max_blocks"):
        opt.max_blocks = 0
    opt.max_blocks = 50
    opt.step()
    assert opt.global_state["U"].shape == (50, 50) and not torch.equal(w.detach(), before)
    assert BlockMeanAdagrad([w]).max_blocks == 4096
