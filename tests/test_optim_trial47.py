"""Trial 47: param groups that lost a required entry, and state dicts whose global state or ratio form a step cannot
take, are refused before anything changes.

Before: a group without ``lr`` (or ``maximize``) passed the step's group-edit check and the step failed with a bare
``KeyError`` after ``FullMatrixAdagrad``'s ``H`` and ``step`` changed (with two groups the first group's parameters
had moved; ``BlockMeanAdagrad`` kept the first step's zero state). ``load_state_dict`` accepted a root of the wrong
size, a ``step`` / ``root_step`` of the wrong type, a ``root_step`` after ``step`` and a malformed ``"ratio_form"``;
the next step failed half-way with ``IndexError`` / ``TypeError`` / ``KeyError`` or kept a stale root for good."""

import copy

import pytest
import torch

from bma_gp.optim import BlockMeanAdagrad, FullMatrixAdagrad
from bma_gp.optim import functional as F
from bma_gp.optim.param_blocks import ParamBlocks

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = [BlockMeanAdagrad, FullMatrixAdagrad]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _grads(model, seed):
    g = torch.Generator().manual_seed(100 + seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _snapshot(model, opt):
    return copy.deepcopy(([p.detach().clone() for p in model.parameters()], opt.state_dict()))


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _pair(cls, steps=2, groups=False, **kw):
    """Two identical models and optimizers after ``steps`` identical steps."""
    out = []
    for _ in range(2):
        model = _model()
        ps = list(model.parameters())
        params = [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}] if groups else ps
        opt = cls(params, lr=0.1, **kw)
        for s in range(steps):
            _grads(model, s)
            opt.step()
        out += [model, opt]
    return out


def _assert_next_steps_equal(model, opt, twin_model, twin, start=10):
    for s in range(start, start + 3):
        _grads(model, s)
        opt.step()
        _grads(twin_model, s)
        twin.step()
    assert _same([p.detach() for p in model.parameters()], [p.detach() for p in twin_model.parameters()])
    assert _same(opt.global_state, twin.global_state)
    assert _same(opt.state_dict()["state"], twin.state_dict()["state"])


# ---------------------------------------------------------------------------------------------- group entries removed
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("key", ["lr", "maximize", "params"])
@pytest.mark.parametrize("steps", [0, 2])
def test_a_group_without_a_required_entry_is_refused_before_anything_changes(cls, key, steps):
    model, opt, twin_model, twin = _pair(cls, steps=steps, groups=True)
    before = _snapshot(model, opt)
    global_before = copy.deepcopy(opt.global_state)
    value = opt.param_groups[1].pop(key)
    _grads(model, 7)
    with pytest.raises(ValueError, match=rf"param_groups\[1\] of {cls.__name__} has no '{key}' entry") as info:
        opt.step()
    assert "Nothing was changed" in str(info.value)
    assert _same(before[0], [p.detach() for p in model.parameters()])  # the first group's parameters did not move
    assert _same(global_before, opt.global_state)  # FullMatrixAdagrad's H and step did not change
    assert len(opt.state) == len(before[1]["state"])  # no first-step state was made either
    opt.param_groups[1][key] = value  # put back: the run goes on as if nothing had happened
    assert _same(before, _snapshot(model, opt))
    _assert_next_steps_equal(model, opt, twin_model, twin)


@pytest.mark.parametrize("cls", CLASSES)
def test_the_message_says_how_to_put_lr_back(cls):
    model, opt, _, _ = _pair(cls, steps=1)
    del opt.param_groups[0]["lr"]
    _grads(model, 3)
    with pytest.raises(ValueError, match=r"opt\.param_groups\[0\]\['lr'\] = opt\.defaults\['lr'\] \(here 0\.1\)"):
        opt.step()


@pytest.mark.parametrize("cls", CLASSES)
def test_a_group_without_weight_decay_still_steps_without_decay(cls):
    model, opt, twin_model, twin = _pair(cls, steps=1)
    del opt.param_groups[0]["weight_decay"]
    _assert_next_steps_equal(model, opt, twin_model, twin)


# ---------------------------------------------------------------------------------------------- corrupt global state
def _set(key, value):
    def edit(sd):
        sd["global_state"][key] = value(sd) if callable(value) else value

    return edit


def _delete(*keys):
    def edit(sd):
        for key in keys:
            del sd["global_state"][key]

    return edit


def _corrupt_cases():
    both = [
        ("step '2'", _set("step", "2"), r"global_state\['step'\] must be an int"),
        ("step None", _set("step", None), r"global_state\['step'\] must be an int"),
        ("step 2.5", _set("step", 2.5), r"global_state\['step'\] must be an int"),
        ("step tensor", _set("step", torch.tensor(2)), r"global_state\['step'\] must be an int"),
        ("step -3", _set("step", -3), r"global_state\['step'\] must be a non-negative int"),
        ("step missing", _delete("step"), r"global_state\['step'\] is missing"),
        ("global_state list", lambda sd: sd.__setitem__("global_state", [1]), "'global_state' must be a dict"),
    ]
    for case in both:
        for cls in CLASSES:
            yield (cls, {}, *case)
    bma = [
        ("root_lam of 2", _set("root_lam", torch.ones(2)), r"global_state\['root_lam'\] has shape \(2,\)"),
        ("root_B of 2", _set("root_B", torch.ones(2, 2)), r"global_state\['root_B'\] has shape \(2, 2\)"),
        ("root_lam list", _set("root_lam", [1.0]), r"global_state\['root_lam'\] has \[1\.0\]"),
        ("root_lam deleted", _delete("root_lam"), r"global_state\['root_lam'\] is missing"),
        ("root_lam int", _set("root_lam", lambda sd: sd["global_state"]["root_lam"].long()), "root_lam"),
        ("root_step 'x'", _set("root_step", "x"), r"global_state\['root_step'\] must be the int step"),
        ("root_step after step", _set("root_step", 100), r"'root_step'\] = 100 is after .*'step'\] = 2"),
        ("U int", _set("U", lambda sd: sd["global_state"]["U"].long()), r"global_state\['U'\] has dtype torch\.int64"),
        ("ratio_form h_max str", lambda sd: sd.__setitem__("ratio_form", {"h_max": "x"}), "'ratio_form' must be"),
        ("ratio_form list", lambda sd: sd.__setitem__("ratio_form", [1]), "'ratio_form' must be a dict"),
        (
            "ratio_form entries str",
            lambda sd: sd.__setitem__("ratio_form", {"h_max": "x", "chain_until": {}}),
            r"'ratio_form'\['h_max'\] must be a dict",
        ),
        (
            "ratio_form bound str",
            lambda sd: sd.__setitem__("ratio_form", {"h_max": {0: "x"}, "chain_until": {}}),
            r"'ratio_form'\['h_max'\]\[0\] is 'x'",
        ),
        (
            "ratio_form bound nan",
            lambda sd: sd.__setitem__("ratio_form", {"h_max": {0: float("nan")}, "chain_until": {}}),
            r"'ratio_form'\['h_max'\]\[0\] is nan",
        ),
        (
            "ratio_form position",
            lambda sd: sd.__setitem__("ratio_form", {"h_max": {9: 1.0}, "chain_until": {}}),
            r"has the key 9, not the position of one of this optimizer's 4 parameters",
        ),
        (
            "ratio_form step float",
            lambda sd: sd.__setitem__("ratio_form", {"h_max": {}, "chain_until": {0: 1.5}}),
            r"'ratio_form'\['chain_until'\]\[0\] is 1\.5",
        ),
    ]
    for case in bma:
        for kw in ({}, {"update_interval": 3}):
            yield (BlockMeanAdagrad, kw, *case)


@pytest.mark.parametrize(
    "cls, kw, name, edit, match",
    [pytest.param(*case, id=f"{case[0].__name__}-{'ui3-' if case[1] else ''}{case[2]}") for case in _corrupt_cases()],
)
def test_a_global_state_the_step_cannot_take_is_refused_with_nothing_loaded(cls, kw, name, edit, match):
    model, opt, twin_model, twin = _pair(cls, **kw)
    sd = copy.deepcopy(opt.state_dict())
    edit(sd)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=match) as info:
        opt.load_state_dict(sd)
    assert "Nothing was loaded" in str(info.value)
    assert _same(before, _snapshot(model, opt))
    _assert_next_steps_equal(model, opt, twin_model, twin)  # the optimizer steps on as before the refused load


def test_root_step_after_step_no_longer_freezes_the_root():
    """The trial's case: root_step=100 loaded with update_interval=2 kept the stale root for six steps and more."""
    model, opt, _, _ = _pair(BlockMeanAdagrad, update_interval=2)
    sd = copy.deepcopy(opt.state_dict())
    sd["global_state"]["root_step"] = 100
    with pytest.raises(ValueError, match="root_step"):
        opt.load_state_dict(sd)
    for s in range(4):
        _grads(model, 20 + s)
        opt.step()
    assert 0 <= opt.global_state["step"] - opt.global_state["root_step"] < 2  # recomputed every 2 steps


@pytest.mark.parametrize("kw", [{}, {"update_interval": 3}])
def test_a_global_state_saved_without_a_cached_root_loads_and_computes_one(kw):
    """A global state without root_lam, root_B and root_step (the functional step's stats may lack them) loads as one
    whose root is None: the next step computes the root. It failed there with KeyError('root_lam')."""
    model, opt, twin_model, twin = _pair(BlockMeanAdagrad, **kw)
    sd = copy.deepcopy(opt.state_dict())
    for key in ("root_lam", "root_B", "root_step"):
        del sd["global_state"][key]
    opt.load_state_dict(sd)
    assert opt.global_state["root_lam"] is None and opt.global_state["root_step"] is None
    twin_sd = copy.deepcopy(twin.state_dict())
    twin_sd["global_state"].update(root_lam=None, root_B=None, root_step=None)
    twin.load_state_dict(twin_sd)
    _assert_next_steps_equal(model, opt, twin_model, twin)


def test_an_intact_ratio_form_still_loads_as_plain_numbers():
    model, opt, twin_model, twin = _pair(BlockMeanAdagrad)
    sd = copy.deepcopy(opt.state_dict())
    sd["ratio_form"] = {"h_max": {0: 5, 2: 1.5}, "chain_until": {1: 4}}
    opt.load_state_dict(sd)
    assert opt._pending_ratio_form == {"h_max": {0: 5.0, 2: 1.5}, "chain_until": {1: 4}}
    assert type(opt._pending_ratio_form["h_max"][0]) is float


# ---------------------------------------------------------------------------------------------- the functional step
def _functional_setup():
    params = [torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64)), torch.nn.Parameter(torch.randn(4))]
    params[1].data = params[1].data.double()
    blocks = ParamBlocks.build(params, "tensor")
    k = blocks.num_blocks
    h = torch.zeros(16, dtype=torch.float64)
    stats = {"U": torch.zeros(k, k, dtype=torch.float64), "w": torch.zeros(k, dtype=torch.float64), "step": 0}
    grads = [torch.randn_like(p) for p in params]
    kwargs = dict(
        lr=[0.1, 0.1],
        weight_decay=[0.0, 0.0],
        maximize=[False, False],
        eps=1e-10,
        damping=0.1,
        update_interval=5,
        mask=True,
        check_finite=True,
        fused=False,
    )
    return params, grads, h, stats, blocks, kwargs


def test_the_functional_step_refuses_a_root_from_a_later_step_and_a_negative_step():
    params, grads, h, stats, blocks, kwargs = _functional_setup()
    F.block_mean_adagrad(params, grads, h, stats, blocks, None, **kwargs)
    assert stats["root_step"] == 1
    for edit, match in (
        ({"root_step": 50}, r"stats\['root_step'\] = 50 is after stats\['step'\] = 1"),
        ({"step": -1, "root_lam": None, "root_B": None}, r"stats\['step'\] must be a non-negative int"),
    ):
        bad = {**stats, **edit}
        before = copy.deepcopy((bad, h, [p.detach() for p in params]))
        with pytest.raises(ValueError, match=match):
            F.block_mean_adagrad(params, grads, h, bad, blocks, None, **kwargs)
        assert _same(before, (bad, h, [p.detach() for p in params]))


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
def test_a_saved_group_without_maximize_loads_as_minimising_and_one_without_lr_is_refused(cls):
    torch.manual_seed(0)
    w = torch.randn(6, 5, requires_grad=True)
    opt = cls([w], lr=0.1)
    w.grad = torch.randn_like(w)
    opt.step()
    saved = opt.state_dict()
    grad = torch.randn_like(w)
    reference = copy.deepcopy(opt)
    reference.param_groups[0]["params"][0].grad = grad.clone()
    reference.step()
    for key, loads in (("maximize", True), ("lr", False)):
        s = copy.deepcopy(saved)
        del s["param_groups"][0][key]
        w2 = w.detach().clone().requires_grad_()
        other = cls([w2], lr=0.5)
        before = copy.deepcopy(other.state_dict())
        if loads:
            other.load_state_dict(s)
            assert other.param_groups[0]["maximize"] is False
            w2.grad = grad.clone()
            other.step()
            assert torch.equal(w2, reference.param_groups[0]["params"][0])
        else:
            with pytest.raises(ValueError, match=r"param_groups'\]\[0\] has no 'lr'.*Nothing was loaded"):
                other.load_state_dict(s)
            assert other.param_groups[0]["lr"] == 0.5 and not other.state and str(other.state_dict()) == str(before)
