"""torch.distributed.checkpoint's optimizer state-dict helpers keep only ``state`` and ``param_groups``.

``set_optimizer_state_dict`` of a dict from ``get_optimizer_state_dict`` raised "it was not produced by
BlockMeanAdagrad.state_dict()", which was wrong about the cause: torch's helper dropped ``global_state`` (the
statistics, which no per-parameter entry holds). The message now says so and what to do; nothing is loaded. The
whole ``state_dict()`` round-trips."""

from __future__ import annotations

import copy

import pytest
import torch

from bma_gp.optim import BlockMeanAdagrad, FullMatrixAdagrad

state_dict_helpers = pytest.importorskip("torch.distributed.checkpoint.state_dict")


def _trained(make):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    opt = make(model.parameters())
    for i in range(3):
        opt.zero_grad()
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(i))
        model(x).square().mean().backward()
        opt.step()
    return model, opt


MAKERS = {
    "block mean": lambda ps: BlockMeanAdagrad(ps, lr=0.05, damping=0.1),
    "full matrix": lambda ps: FullMatrixAdagrad(ps, lr=0.05),
}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_dcp_optimizer_dict_is_refused_in_words_and_changes_nothing(kind):
    model, opt = _trained(MAKERS[kind])
    saved = state_dict_helpers.get_optimizer_state_dict(model, opt)
    assert "global_state" not in saved  # torch's helper drops it
    model2, opt2 = _trained(MAKERS[kind])
    before = copy.deepcopy(opt2.state_dict())
    with pytest.raises(ValueError, match="torch.distributed.checkpoint"):
        state_dict_helpers.set_optimizer_state_dict(model2, opt2, saved)
    after = opt2.state_dict()
    assert before["global_state"].keys() == after["global_state"].keys()
    for key, value in before["global_state"].items():
        if torch.is_tensor(value):
            assert torch.equal(value, after["global_state"][key]), key
        else:
            assert value == after["global_state"][key], key
    for idx, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, after["state"][idx][key])


@pytest.mark.parametrize("kind", list(MAKERS))
def test_whole_state_dict_round_trips(kind):
    model, opt = _trained(MAKERS[kind])
    model2 = copy.deepcopy(model)
    opt2 = MAKERS[kind](model2.parameters())
    opt2.load_state_dict(opt.state_dict())
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(9))
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
