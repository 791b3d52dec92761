"""The optimizers against torch.optim's conventions, as a demanding torch.optim user meets them: the constructor
arguments configuration systems pass to every optimizer, a model converted to another dtype between steps, torch's
autograd bookkeeping of parameters changed in place, a state dict loaded into parameters in another order, and an
empty first param group."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from optim import BlockMeanAdagrad, FullMatrixAdagrad
from optim_reference import flat, loss_of, small_model

CLASSES = [BlockMeanAdagrad, FullMatrixAdagrad]


def train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, t).backward()  # in the model's dtype
        opt.step()


# ---------------------------------------------------------------- torch.optim's implementation switches


@pytest.mark.parametrize("cls", CLASSES)
def test_torch_optim_switches_at_their_default_values_are_accepted(cls):
    """Configuration systems pass torch.optim.Adagrad's foreach=None, differentiable=False (and Adam's
    capturable=False) to every optimizer; they were a TypeError. At those values the step is the usual one."""
    torch_names = set(inspect.signature(torch.optim.Adagrad.__init__).parameters) | {"capturable"}
    assert {"foreach", "differentiable", "fused"} <= torch_names  # what is mirrored exists in this torch
    model, reference = small_model(), small_model()
    opt = cls(model.parameters(), lr=0.05, foreach=None, capturable=False, differentiable=False, fused=None)
    opt_ref = cls(reference.parameters(), lr=0.05)
    cls(model.parameters(), lr=0.05, foreach=False)
    train(model, opt, 3)
    train(reference, opt_ref, 3)
    assert torch.equal(flat(model.parameters()), flat(reference.parameters()))
    assert "foreach" not in opt.defaults  # not stored: torch's zero_grad reads defaults["foreach"]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    ("kwargs", "fix"),
    [
        (dict(foreach=True), "foreach=None or foreach=False"),
        (dict(capturable=True), "capturable=False"),
        (dict(differentiable=True), "differentiable=False"),
        (dict(foreach="yes"), "foreach=None or foreach=False"),
        (dict(capturable=None), "capturable=False"),
    ],
)
def test_torch_optim_switches_that_cannot_be_honoured_are_refused(cls, kwargs, fix):
    (name,) = kwargs
    with pytest.raises(ValueError, match=rf"Invalid {name} value.*{fix}"):
        cls(small_model().parameters(), lr=0.05, **kwargs)


def test_full_matrix_adagrad_refuses_fused_true_and_accepts_none():
    FullMatrixAdagrad(small_model().parameters(), fused=False)
    with pytest.raises(ValueError, match="Invalid fused value.*no fused implementation"):
        FullMatrixAdagrad(small_model().parameters(), fused=True)


def test_block_mean_adagrad_names_fused_as_the_faster_step():
    with pytest.raises(ValueError, match="fused=True"):
        BlockMeanAdagrad(small_model().parameters(), foreach=True)


@pytest.mark.parametrize("cls", CLASSES)
def test_a_param_group_with_a_switch_that_cannot_be_honoured_is_refused(cls):
    params = list(small_model().parameters())
    opt = cls(params[:2], lr=0.05)
    with pytest.raises(ValueError, match="Invalid differentiable value"):
        opt.add_param_group({"params": params[2:], "differentiable": True})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[2:], "foreach": None, "capturable": False})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("fused", [False, None])
def test_a_param_group_may_repeat_fused_none_as_the_constructor_takes_it(fused):
    """fused=None is torch.optim's default and means False in the constructor; a param group that repeats it (a
    configuration passing the same options to every group) is the same setting, and fused=True is another."""
    params = list(small_model().parameters())
    opt = BlockMeanAdagrad(params[:1], lr=0.05, fused=fused)
    opt.add_param_group({"params": params[1:2], "fused": None})
    opt.add_param_group({"params": params[2:3], "fused": False})
    with pytest.raises(ValueError, match="fused is an optimizer-wide setting"):
        opt.add_param_group({"params": params[3:], "fused": True})
    assert len(opt.param_groups) == 3


# ---------------------------------------------------------------- a model converted to another dtype between steps


def wide_model(dtype):
    """Two tensors above the host form's HOST_MAX_NUMEL (the CPU step's ratio form, with its kept bounds of h)
    and two small ones."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(200, 200), torch.nn.Tanh(), torch.nn.Linear(200, 200)).to(dtype)


def wide_step(model, opt, t):
    dtype = next(model.parameters()).dtype
    x = torch.randn(32, 200, generator=torch.Generator().manual_seed(t), dtype=torch.float64).to(dtype)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def make(kind, params):
    if kind == "full":
        return FullMatrixAdagrad(params, lr=0.05)
    if kind == "callable":
        return BlockMeanAdagrad(params, lr=0.05, partition=lambda p: torch.arange(p.numel()) % 2)
    if kind == "fused":
        return BlockMeanAdagrad(params, lr=0.05, update_interval=2, fused=True)
    return BlockMeanAdagrad(params, lr=0.05, update_interval=2, partition=kind)


@pytest.mark.parametrize("kind", ["tensor", "row", "callable", "fused", "full"])
@pytest.mark.parametrize(
    ("before", "after"),
    [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float32, torch.bfloat16)],
)
def test_a_model_converted_to_another_dtype_continues_as_if_its_state_were_saved_and_loaded(kind, before, after):
    """model.double() after some steps kept float32 statistics for float64 parameters (and model.float() float64
    ones): the run went on in the old precision, on the slow path of mixed dtypes. The state now follows the
    parameters' dtype (float32 or wider, as at construction) at the next step, exactly as an optimizer whose state
    is saved and loaded into the converted model. (torch.optim.Adagrad keeps the old dtype; its fused=True raises.)"""
    from optim_reference import fused_at_any_size

    model = small_model(dtype=before)
    with fused_at_any_size():
        opt = make(kind, model.parameters())
        train(model, opt, 3)
        saved = copy.deepcopy(opt.state_dict())
        twin = copy.deepcopy(model)
        model.to(after)
        twin.to(after)
        opt_twin = make(kind, twin.parameters())
        opt_twin.load_state_dict(saved)
        train(model, opt, 4, start=3)
        train(twin, opt_twin, 4, start=3)
    assert torch.equal(flat(model.parameters()), flat(twin.parameters()))
    want = torch.promote_types(after, torch.float32)
    dtypes = {t.dtype for t in opt.global_state.values() if isinstance(t, torch.Tensor)}
    dtypes |= {st["sum"].dtype for st in opt.state.values() if "sum" in st}
    assert dtypes == {want}


@pytest.mark.parametrize(("before", "after"), [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_after_a_dtype_conversion_the_cpu_step_keeps_its_fast_path_and_its_bounds(before, after, monkeypatch):
    """The CPU step for one block per tensor (the benchmark's path) takes the converted model, and continues bit for
    bit as a saved and loaded state would: its kept bounds of h (the ratio form's scales) carry over."""
    from bma_gp.optim import functional

    model = wide_model(before)
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05)
    for t in range(3):
        wide_step(model, opt, t)
    saved = copy.deepcopy(opt.state_dict())
    assert "ratio_form" in saved
    twin = copy.deepcopy(model)
    model.to(after)
    twin.to(after)
    opt_twin = BlockMeanAdagrad(twin.parameters(), lr=0.05)
    opt_twin.load_state_dict(saved)
    calls = []
    fast = functional._tensor_blocks_cpu_step
    monkeypatch.setattr(functional, "_tensor_blocks_cpu_step", lambda *a, **k: calls.append(1) or fast(*a, **k))
    for t in range(3, 7):
        wide_step(model, opt, t)
        wide_step(twin, opt_twin, t)
    assert len(calls) == 8
    assert torch.equal(flat(model.parameters()), flat(twin.parameters()))
    assert opt.state[model[0].weight]["sum"].dtype == after


@pytest.mark.parametrize("cls", CLASSES)
def test_a_refused_step_after_a_dtype_conversion_changes_nothing(cls):
    model = small_model(dtype=torch.float32)
    opt = cls(model.parameters(), lr=0.05)
    train(model, opt, 2)
    state = copy.deepcopy(opt.state_dict())
    model.double()
    opt.zero_grad()
    loss_of(model, 2).backward()
    model[0].weight.grad[0, 0, 0] = float("nan")
    before = flat(model.parameters())
    with pytest.raises(ValueError, match="non-finite gradient"):
        opt.step()
    assert torch.equal(flat(model.parameters()), before)
    now = opt.state_dict()
    for key, value in state["global_state"].items():
        assert type(now["global_state"][key]) is type(value)
        if isinstance(value, torch.Tensor):
            assert now["global_state"][key].dtype == torch.float32
            assert torch.equal(now["global_state"][key], value)
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(now["state"][idx][key], value) and now["state"][idx][key].dtype == torch.float32
    train(model, opt, 1, start=3)  # the next good step converts
    assert all(t.dtype == torch.float64 for t in opt.global_state.values() if isinstance(t, torch.Tensor))


# ---------------------------------------------------------------- autograd's version counters


@pytest.mark.parametrize(
    ("kind", "size"),
    [(kind, "small") for kind in ("tensor", "row", "callable", "fused", "full")]
    + [(kind, "wide") for kind in ("tensor", "row", "fused")],  # FullMatrixAdagrad refuses 80,000 parameters
)
def test_a_graph_that_saved_the_parameters_is_refused_after_a_step_as_with_torch_optim(kind, size):
    """torch.optim's in-place updates bump the parameters' version counters, so autograd refuses to backpropagate
    through a graph that saved their old values ("modified by an inplace operation"). The CPU step for one block per
    tensor (numpy's host form, torch's fused SGD kernel in the ratio form) and the fused numba kernels wrote the
    parameters behind autograd's back: the second backward below ran and silently mixed old activations with new
    weights."""
    from optim_reference import fused_at_any_size, small_batch

    model = wide_model(torch.float32) if size == "wide" else small_model(dtype=torch.float32)
    x = torch.randn(8, 200) if size == "wide" else small_batch(0, torch.float32)[0]
    with fused_at_any_size():
        opt = make(kind, model.parameters())
        loss = model(x).pow(2).mean()
        loss.backward(retain_graph=True)
        versions = [p._version for p in model.parameters()]
        opt.step()
    assert all(p._version > v for p, v in zip(model.parameters(), versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------- state_dict into parameters in another order


def test_full_matrix_state_loaded_into_parameters_in_another_order_is_refused():
    """FullMatrixAdagrad has no per-parameter state: a state dict loaded into the same parameters listed in another
    order (the same d) loaded silently, and H's rows then belonged to other entries. BlockMeanAdagrad refuses it
    through its per-parameter h; now both do, before anything changes."""
    model = small_model(dtype=torch.float32)
    params = list(model.parameters())
    opt = FullMatrixAdagrad(params, lr=0.05)
    train(model, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    opt_twin = FullMatrixAdagrad(list(twin.parameters())[::-1], lr=0.05)
    with pytest.raises(ValueError, match="same order"):
        opt_twin.load_state_dict(saved)
    assert opt_twin.global_state == {} and len(opt_twin.state) == 0
    opt_same = FullMatrixAdagrad(twin.parameters(), lr=0.05)
    opt_same.load_state_dict(saved)  # the same order loads, and continues the run exactly
    train(model, opt, 2, start=2)
    train(twin, opt_same, 2, start=2)
    assert torch.equal(flat(model.parameters()), flat(twin.parameters()))
    legacy = {k: v for k, v in saved.items() if k != "param_numels"}  # saved before the entry existed
    FullMatrixAdagrad(copy.deepcopy(model).parameters(), lr=0.05).load_state_dict(legacy)


# ---------------------------------------------------------------- an empty first param group


def test_the_layout_follows_a_device_move_when_the_first_param_group_is_empty():
    """The layout is rebuilt (its state moved) when the parameters move to another device, seen through the device in
    its key; that device was taken from the first group only, so with an empty first group (a filtered "no weight
    decay" group, say) it was None and a model moved after some steps kept its state on the old device."""
    from bma_gp.optim.flat_params import FlatParams

    p = torch.nn.Parameter(torch.randn(3))
    on_meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    assert FlatParams.key_of([{"params": []}, {"params": [p]}])[-1] == torch.device("cpu")  # the device is last
    assert FlatParams.key_of([{"params": []}, {"params": [on_meta]}])[-1] == torch.device("meta")
    assert FlatParams.key_of([{"params": []}]) == ((), (0,), None)
