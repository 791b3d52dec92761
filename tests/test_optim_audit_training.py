"""The optimizers as training scripts use them: checkpoints (torch.save, copy, pickle) and torch.optim's hooks."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from optim import BlockMeanAdagrad, FullMatrixAdagrad
from optim_reference import flat, loss_of, small_model


def train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, t).backward()
        opt.step()


def make(kind, model):
    if kind == "full":
        return FullMatrixAdagrad(model.parameters(), lr=0.05)
    return BlockMeanAdagrad(model.parameters(), lr=0.05, update_interval=3, partition=kind)


def saved(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf)  # torch's default, weights_only=True


KINDS = ["tensor", "row", "full"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_load_state_dict_post_hook_sees_the_loaded_state(kind):
    """torch.optim runs load_state_dict post-hooks after the state is loaded: they saw (and could change) the global
    state and h of the optimizer before the load, which the load then overwrote."""
    model = small_model()
    opt = make(kind, model)
    train(model, opt, 4)
    checkpoint = saved(opt)
    fresh = make(kind, small_model())
    seen = []

    def hook(optimizer):
        seen.append(dict(optimizer.global_state))
        if kind != "full":
            for state in optimizer.state.values():
                state["sum"].mul_(2.0)  # a hook that adjusts the loaded state

    fresh.register_load_state_dict_post_hook(hook)
    fresh.load_state_dict(checkpoint)
    assert seen and seen[0].get("step") == 4
    if kind != "full":
        for p, q in zip(model.parameters(), fresh.param_groups[0]["params"]):
            torch.testing.assert_close(fresh.state[q]["sum"], 2.0 * opt.state[p]["sum"], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_load_state_dict_pre_hook_may_supply_the_global_state(kind):
    """A pre-hook's returned state dict is what torch.optim loads; the global state was taken (and refused as
    missing) before the pre-hooks ran."""
    model = small_model()
    opt = make(kind, model)
    train(model, opt, 3)
    checkpoint = saved(opt)
    global_state = checkpoint.pop("global_state")  # say an older checkpoint format, kept elsewhere
    fresh_model = small_model()
    fresh = make(kind, fresh_model)
    fresh.register_load_state_dict_pre_hook(lambda optimizer, sd: {**sd, "global_state": global_state})
    fresh.load_state_dict(checkpoint)
    with torch.no_grad():
        for p, q in zip(fresh_model.parameters(), model.parameters()):
            p.copy_(q)
    train(model, opt, 3, start=3)
    train(fresh_model, fresh, 3, start=3)
    assert torch.equal(flat(model.parameters()), flat(fresh_model.parameters()))


@pytest.mark.parametrize("kind", KINDS)
def test_a_state_dict_post_hook_sees_the_whole_state_dict(kind):
    """torch.optim passes the finished state dict to the post-hooks: "global_state" was added after them, so a hook
    that copies the dict (say, for an asynchronous checkpoint) left the live global state in it."""
    model = small_model()
    opt = make(kind, model)
    train(model, opt, 2)
    opt.register_state_dict_post_hook(lambda optimizer, sd: copy.deepcopy(sd))
    sd = opt.state_dict()
    assert "global_state" in sd
    key = "H" if kind == "full" else "U"
    assert sd["global_state"][key] is not opt.global_state[key]
    assert torch.equal(sd["global_state"][key], opt.global_state[key])


def _ratio_form_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(200, 200), torch.nn.Tanh(), torch.nn.Linear(200, 3))


@pytest.mark.parametrize("how", ["save again", "deepcopy", "pickle"])
def test_a_checkpoint_taken_right_after_a_load_keeps_the_ratio_form_bounds(how):
    """The loaded bounds of h ("ratio_form") wait for the next step; a state_dict (or copy) taken before it dropped
    them, so a run resumed from that second checkpoint parted from the uninterrupted one by about one ulp."""

    def grads(model, t):
        x = torch.randn(16, 200, generator=torch.Generator().manual_seed(t))
        model.zero_grad()
        model(x).square().mean().backward()

    a, b = _ratio_form_model(), _ratio_form_model()
    opt_a, opt_b = (BlockMeanAdagrad(m.parameters(), lr=0.05) for m in (a, b))
    for t in range(12):
        if t == 4:
            loaded = BlockMeanAdagrad(b.parameters(), lr=0.05)
            loaded.load_state_dict(saved(opt_b))
            if how == "save again":
                opt_b = BlockMeanAdagrad(b.parameters(), lr=0.05)
                opt_b.load_state_dict(saved(loaded))
            elif how == "deepcopy":
                b, opt_b = copy.deepcopy((b, loaded))
            else:
                b, opt_b = pickle.loads(pickle.dumps((b, loaded)))
        grads(a, t)
        grads(b, t)
        opt_a.step()
        opt_b.step()
    assert torch.equal(flat(a.parameters()), flat(b.parameters()))


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
def test_a_parameter_listed_twice_in_a_group_is_refused(cls):
    """torch.optim only warns about a parameter listed twice in a group; the flat layout held it twice (two blocks
    of one preconditioner), rebuilt its state at every step, and the eager and fused steps parted."""
    p, q = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="more than once"):
        cls([p, q, p])
    opt = cls([q])
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="dict.fromkeys"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1


def test_fused_none_is_the_default_as_in_torch_optim():
    """torch.optim's fused defaults to None ("let the optimizer choose"); configs that pass it through keep working
    and get the eager step, while other non-bool values are still refused."""
    model = torch.nn.Linear(3, 2)
    opt = BlockMeanAdagrad(model.parameters(), lr=0.1, fused=None)
    assert opt.fused is False
    with pytest.raises(ValueError, match="Invalid fused value"):
        BlockMeanAdagrad(model.parameters(), lr=0.1, fused="yes")
