"""The optimizers against torch.optim's conventions, as a demanding torch.optim user meets them: the constructor
arguments configuration systems pass to every optimizer, a model converted to another dtype between steps, and
torch's autograd bookkeeping of parameters changed in place."""

from __future__ import annotations

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
