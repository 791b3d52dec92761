"""Audit of BlockMeanAdagrad with torch.optim's training-loop machinery: learning rates set by schedulers or by hand,
state dicts loaded mid-training, and what an error leaves behind."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from optim import BlockMeanAdagrad
from optim_reference import flat, fused_at_any_size, loss_of, small_model


def _scattered(p: torch.Tensor) -> torch.Tensor:
    """A callable partition: even and odd flat entries of every tensor."""
    return torch.arange(p.numel()) % 2


@pytest.mark.parametrize(
    "rule,fused",
    [("tensor", False), ("row", False), (_scattered, False), ("tensor", True), ("row", True)],
    ids=["tensor", "row", "callable", "tensor-fused", "row-fused"],
)
def test_a_numpy_float32_learning_rate_steps_as_its_python_float(rule, fused):
    """A learning rate that a scheduler's lambda or a hand sets to a numpy float32 (``np.float32(0.9) ** epoch``)
    rounded the step's coefficients (``1 - lr * wd``, ``-lr * lam``) to float32, about 1e-8 off on float64
    parameters, and the fused step raised TypeError with weight decay. torch.optim takes it as a Python float."""
    with fused_at_any_size():
        a, b = small_model(), small_model()
        kwargs = dict(lr=0.1, partition=rule, fused=fused, weight_decay=0.01)
        opt_a, opt_b = BlockMeanAdagrad(a.parameters(), **kwargs), BlockMeanAdagrad(b.parameters(), **kwargs)
        for t in range(4):
            lr = np.float32(0.1) / np.float32(t + 3)
            opt_a.param_groups[0]["lr"], opt_b.param_groups[0]["lr"] = lr, float(lr)
            for model, opt in ((a, opt_a), (b, opt_b)):
                opt.zero_grad()
                loss_of(model, t).backward()
                opt.step()
        assert torch.equal(flat(a.parameters()), flat(b.parameters()))
        assert isinstance(opt_a.param_groups[0]["lr"], np.float32)  # the group keeps what was set, as in torch


def test_a_state_entry_that_is_not_a_tensor_is_refused_before_anything_is_loaded():
    """A state dict whose ``"sum"`` is not a tensor passed the size check, torch's load replaced the param groups
    and the state, and the cast then raised AttributeError: a half-loaded optimizer (new learning rate, a list as
    ``h``) that could not step."""
    model = small_model()
    opt = BlockMeanAdagrad(model.parameters(), lr=0.1)
    for t in range(2):
        opt.zero_grad()
        loss_of(model, t).backward()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["sum"] = sd["state"][0]["sum"].tolist()
    sd["param_groups"][0]["lr"] = 0.5
    first = next(model.parameters())
    h = opt.state[first]["sum"]
    with pytest.raises(ValueError, match="'sum' of parameter 0 is a list, not a tensor.*Nothing was loaded"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.1
    assert opt.state[first]["sum"] is h
    opt.zero_grad()
    loss_of(model, 2).backward()
    opt.step()
    assert opt.global_state["step"] == 3


@pytest.mark.parametrize(
    "rule,fused",
    [("tensor", False), ("row", False), (_scattered, False), ("row", True)],
    ids=["tensor", "row", "callable", "row-fused"],
)
def test_a_first_step_under_inference_mode_steps_as_outside_it(rule, fused):
    """torch's Adagrad steps under ``torch.inference_mode()`` (its state is made at construction). Here the first
    step made the flat state there, as inference tensors: it moved the parameters, then raised RuntimeError reading
    h's version counter, and so did every later step."""

    def run(inference_steps):
        with fused_at_any_size():
            model = small_model()
            opt = BlockMeanAdagrad(model.parameters(), lr=0.1, partition=rule, fused=fused)
            for t in range(3):
                opt.zero_grad()
                loss_of(model, t).backward()
                if t in inference_steps:
                    with torch.inference_mode():
                        opt.step()
                    assert torch.is_inference_mode_enabled() is False and torch.is_grad_enabled()
                else:
                    opt.step()
            state = [opt.state[p]["sum"] for p in model.parameters()] + [opt.global_state["U"]]
            assert not any(t.is_inference() for t in state)
            return flat(model.parameters())

    assert torch.equal(run((0,)), run(()))
    assert torch.equal(run((0, 2)), run(()))


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("rule", ["tensor", "row"])
@pytest.mark.parametrize("shape", [(50, 30), (20, 30), (30, 40)], ids=["grown", "shrunk", "reshaped"])
def test_a_parameter_resized_between_steps_is_refused_and_nothing_changes(rule, fused, shape):
    """``p.data = ...`` of another shape after a step: the fused step read and wrote the parameter by its old bounds
    without a word (numba's kernels past the end of h for a grown one), the eager steps raised numpy's or torch's
    broadcasting error after the step count had moved, and "row" stepped a reshaped one by its old rows. torch's
    optimizers raise there too (their state has the old shape)."""
    with fused_at_any_size():
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(40, 30, generator=gen)), torch.nn.Parameter(torch.randn(30))]
        opt = BlockMeanAdagrad(params, lr=0.1, partition=rule, fused=fused)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        h = [opt.state[p]["sum"].clone() for p in params]
        U, other = opt.global_state["U"].clone(), params[1].detach().clone()
        params[0].data = torch.randn(shape, generator=gen)
        resized = params[0].detach().clone()
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        with pytest.raises(ValueError, match=r"parameter 0 of BlockMeanAdagrad changed shape from \(40, 30\) to"):
            opt.step()
        assert opt.global_state["step"] == 2 and torch.equal(opt.global_state["U"], U)
        assert all(torch.equal(a, opt.state[p]["sum"]) for a, p in zip(h, params))
        assert torch.equal(params[0], resized) and torch.equal(params[1], other)


@pytest.mark.parametrize(
    "rule,fused",
    [("tensor", False), ("row", False), (_scattered, False), ("row", True)],
    ids=["tensor", "row", "callable", "row-fused"],
)
def test_a_state_dict_loaded_under_inference_mode_continues_as_one_loaded_outside(rule, fused):
    """torch.optim keeps a state dict's own tensors where no cast is needed, so its optimizers load under
    ``torch.inference_mode()``; here the load copies them, and the copies were inference tensors: the next step
    outside inference mode raised RuntimeError updating ``U`` in place, after it had changed ``h`` and the step count.
    """
    with fused_at_any_size():
        source = small_model()
        opt = BlockMeanAdagrad(source.parameters(), lr=0.1, partition=rule, fused=fused)
        for t in range(2):
            opt.zero_grad()
            loss_of(source, t).backward()
            opt.step()
        saved = copy.deepcopy(opt.state_dict())
        results = []
        for inference in (False, True):
            model = small_model()
            model.load_state_dict(source.state_dict())
            resumed = BlockMeanAdagrad(model.parameters(), lr=0.1, partition=rule, fused=fused)
            with torch.inference_mode(inference):
                resumed.load_state_dict(copy.deepcopy(saved))
            for t in range(2, 4):
                resumed.zero_grad()
                loss_of(model, t).backward()
                resumed.step()
            assert not any(v.is_inference() for v in resumed.global_state.values() if isinstance(v, torch.Tensor))
            results.append(flat(model.parameters()))
        assert torch.equal(results[0], results[1])
