"""param_groups edited between steps as torch.optim allows: a parameter moved to another group takes that group's
settings; groups merged keep stepping; torch Adagrad's own per-group options are refused, not ignored."""

import copy

import pytest
import torch

from bma_gp.optim import BlockMeanAdagrad, FullMatrixAdagrad


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
def test_moved_parameter_takes_its_new_groups_settings(cls):
    model = _model()
    ps = list(model.parameters())
    opt = cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.2}], lr=0.05)
    for s in range(2):
        _grads(model, s)
        opt.step()
    # move ps[1] into a group of its own with lr 0 (the flat order of the parameters is unchanged)
    opt.param_groups[0]["params"] = [ps[0]]
    opt.param_groups.insert(1, {**opt.param_groups[1], "params": [ps[1]], "lr": 0.0})
    before = [p.detach().clone() for p in ps]
    _grads(model, 5)
    opt.step()
    assert torch.equal(ps[1], before[1])  # lr 0: not moved
    assert not torch.equal(ps[0], before[0]) and not torch.equal(ps[2], before[2])


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
def test_moved_parameter_matches_an_optimizer_built_with_those_groups(cls):
    """Regrouping changes only the per-group settings: the state carries over, and the next steps equal those of a
    copy whose state was loaded into an optimizer built with the new groups."""
    model = _model()
    ps = list(model.parameters())
    opt = cls([{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "lr": 0.2}], lr=0.05)
    _grads(model, 0)
    opt.step()
    twin_model = copy.deepcopy(model)
    tps = list(twin_model.parameters())
    state = opt.state_dict()
    # the bias of the first layer joins the second group (the flat order is unchanged)
    opt.param_groups[0]["params"] = ps[:1]
    opt.param_groups[1]["params"] = ps[1:]
    twin = cls([{"params": tps[:1], "weight_decay": 0.1}, {"params": tps[1:], "lr": 0.2}], lr=0.05)
    state["param_groups"][0]["params"] = [0]
    state["param_groups"][1]["params"] = [1, 2, 3]
    twin.load_state_dict(state)
    for s in (1, 2):
        _grads(model, s)
        _grads(twin_model, s)
        opt.step()
        twin.step()
    for a, b in zip(ps, tps):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
def test_merged_groups_step(cls):
    model = _model()
    ps = list(model.parameters())
    opt = cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.2}], lr=0.05)
    _grads(model, 0)
    opt.step()
    opt.param_groups[0]["params"] += opt.param_groups[1]["params"]
    del opt.param_groups[1]
    before = [p.detach().clone() for p in ps]
    _grads(model, 1)
    opt.step()  # raised IndexError: the layout kept the old group index
    assert all(not torch.equal(a, b) for a, b in zip(ps, before))
    assert len(opt.state_dict()["param_groups"]) == 1


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
@pytest.mark.parametrize("option", ["lr_decay", "initial_accumulator_value"])
def test_adagrad_only_group_options_refused(cls, option):
    model = _model()
    ps = list(model.parameters())
    with pytest.raises(ValueError, match=f"{option}=0.5.*torch.optim.Adagrad option.*silently ignored"):
        cls([{"params": ps, option: 0.5}], lr=0.1)
    opt = cls([{"params": ps[:2]}], lr=0.1)
    with pytest.raises(ValueError, match=option):
        opt.add_param_group({"params": ps[2:], option: 1})
    assert len(opt.param_groups) == 1  # nothing added
    # Adagrad's defaults (0) are what these optimizers do: accepted, as from a ported configuration
    opt.add_param_group({"params": ps[2:], option: 0.0})
    _grads(model, 0)
    opt.step()


_CORRUPTIONS = [(BlockMeanAdagrad, c) for c in ("nan_global", "negative_global", "nan_sum", "negative_sum")] + [
    (FullMatrixAdagrad, c)
    for c in ("nan_global", "negative_global")  # no per-parameter statistics there
]


@pytest.mark.parametrize(("cls", "corrupt"), _CORRUPTIONS)
def test_corrupt_statistics_refused_at_load(cls, corrupt):
    model = _model()
    opt = cls(model.parameters(), lr=0.1)
    for s in range(2):
        _grads(model, s)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    key = "U" if cls is BlockMeanAdagrad else "H"
    if corrupt.endswith("global"):
        sd["global_state"][key][0, 0] = float("nan") if corrupt.startswith("nan") else -1.0
    else:
        sd["state"][1]["sum"][0] = float("nan") if corrupt.startswith("nan") else -1.0
    fresh_model = _model()
    fresh = cls(fresh_model.parameters(), lr=0.1)
    _grads(fresh_model, 0)
    fresh.step()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match="(not finite|negative sum of squares).*Nothing was loaded"):
        fresh.load_state_dict(sd)
    after = fresh.state_dict()
    assert after["global_state"]["step"] == before["global_state"]["step"]
    torch.testing.assert_close(after["global_state"][key], before["global_state"][key], rtol=0, atol=0)
    # check_finite=False: loaded as it is (such a run may hold inf / nan statistics)
    lax = cls(_model().parameters(), lr=0.1, check_finite=False)
    lax.load_state_dict(sd)


_EDITS = [
    ("foreach", True, "foreach"),
    ("capturable", True, "capturable"),
    ("differentiable", True, "differentiable"),
    ("lr", float("nan"), "learning rate"),
    ("lr", -1.0, "learning rate"),
    ("lr", None, "learning rate"),
    ("lr", torch.tensor([0.1, 0.2]), "learning rate"),
    ("weight_decay", float("nan"), "weight_decay"),
    ("weight_decay", float("inf"), "weight_decay"),
    ("maximize", "yes", "maximize"),
]


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
@pytest.mark.parametrize(("key", "value", "named"), _EDITS, ids=[f"{k}={v!r}"[:24] for k, v, _ in _EDITS])
def test_group_options_edited_in_place_are_refused_at_the_step(cls, key, value, named):
    """The constructor and add_param_group refuse these values; set in place between steps they were taken
    silently (a differentiable step without gradients, NaN in every parameter from lr = nan) (trial 20)."""
    model = _model()
    ps = list(model.parameters())
    opt = cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.2}], lr=0.05)
    _grads(model, 0)
    opt.step()
    before = [p.detach().clone() for p in ps]
    state = copy.deepcopy(opt.state_dict())
    opt.param_groups[1][key] = value
    _grads(model, 1)
    with pytest.raises(ValueError, match=rf"{named}.*param_groups\[1\] was edited after it was added; nothing"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    after = opt.state_dict()
    for name in ("state", "global_state"):
        if name in state:
            torch.testing.assert_close(after[name], state[name], rtol=0, atol=0)
    # set back to a valid value, the step runs
    opt.param_groups[1][key] = {"lr": 0.1, "weight_decay": 0.0, "maximize": False}.get(key, False)
    opt.step()
    assert not torch.equal(ps[2], before[2])


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
def test_valid_group_values_of_other_types_still_step(cls):
    """Python ints, numpy floats and one-element tensors (a scheduler's or a config's values) pass the step's check."""
    np = pytest.importorskip("numpy")
    model = _model()
    ps = list(model.parameters())
    opt = cls(ps, lr=0.05)
    for lr in (1, np.float64(0.1), torch.tensor(0.05)):
        opt.param_groups[0]["lr"] = lr
        opt.param_groups[0]["weight_decay"] = np.float32(0.01)
        _grads(model, 2)
        before = ps[0].detach().clone()
        opt.step()
        assert not torch.equal(ps[0], before)
