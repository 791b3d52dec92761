"""The optimizers in training setups a torch.optim user would try (AMP, schedulers, hooks, changed setups)."""

from __future__ import annotations

import copy

import pytest
import torch

from bma_gp.optim import BlockMeanAdagrad, FullMatrixAdagrad
from optim_reference import flat, fused_at_any_size

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems


def _every_third(p: torch.Tensor) -> torch.Tensor:
    return torch.arange(p.numel()) % 3


#: (class, keyword arguments) of the step's paths that run torch matrix products (the CPU step for one block per
#: tensor runs its k x k rest in numpy, except with fused=True)
MATMUL_PATHS = [
    (BlockMeanAdagrad, dict(partition="row")),
    (BlockMeanAdagrad, dict(partition="row", fused=True)),
    (BlockMeanAdagrad, dict(partition="tensor", fused=True)),
    (BlockMeanAdagrad, dict(partition=_every_third)),
    (FullMatrixAdagrad, {}),
]
MATMUL_IDS = ["row", "row-fused", "tensor-fused", "callable", "full-matrix"]


def _conv_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(64, 2))


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(i)
    return torch.randn(8, 3, 6, 6, generator=gen), torch.randn(8, 2, generator=gen)


def _amp_closure(model, opt, x, y, seen: list):
    def closure():
        opt.zero_grad()
        seen.append(torch.is_autocast_enabled("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the same gradients whether step() is in autocast or not
            out = model(x)
        loss = (out.float() - y).pow(2).mean()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("cls,kwargs", MATMUL_PATHS, ids=MATMUL_IDS)
def test_a_step_inside_autocast_is_the_step_outside_it(cls, kwargs):
    # scaler.step(opt) inside the autocast block: autocast ran the step's matrix products in bfloat16
    # (FullMatrixAdagrad's step was off by its own size); the closure still runs under autocast
    seen = []
    runs = []
    with fused_at_any_size():
        for inside in (False, True):
            model = _conv_model()
            opt = cls(model.parameters(), lr=0.05, **kwargs)
            for i in range(3):
                closure = _amp_closure(model, opt, *_batch(i), seen)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
                    loss = opt.step(closure)
                assert loss is not None and loss.requires_grad
            runs.append(flat(model.parameters()))
    assert seen == [False] * 3 + [True] * 3
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("cls,kwargs", [MATMUL_PATHS[0], MATMUL_PATHS[-1]], ids=["row", "full-matrix"])
def test_grad_scaler_with_clipping_steps_as_the_plain_step_and_skips_inf_gradients(cls, kwargs):
    # the whole loop inside the autocast block, as many AMP scripts write it; unscale_, clipping, scaler.step
    model, plain = _conv_model(), _conv_model()
    opt = cls(model.parameters(), lr=0.05, **kwargs)
    opt_plain = cls(plain.parameters(), lr=0.05, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i in range(4):
        x, y = _batch(i)
        overflow = float("inf") if i == 2 else 1.0  # step 2 overflows
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (model(x).float() - y).pow(2).mean() * overflow
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
            before = (flat(model.parameters()), copy.deepcopy(opt.state_dict()))
            scaler.step(opt)
            scaler.update()
        if i == 2:  # skipped: parameters and state as they were, and the scale halved
            assert not all(torch.isfinite(g).all() for g in grads)
            assert torch.equal(flat(model.parameters()), before[0])
            after = opt.state_dict()
            assert after["global_state"]["step"] == before[1]["global_state"]["step"] == 2
            for key, value in before[1]["state"].items():  # FullMatrixAdagrad's entries are empty (global H)
                assert after["state"][key].keys() == value.keys()
                for name, tensor in value.items():
                    assert torch.equal(after["state"][key][name], tensor)
            assert scaler.get_scale() == 2.0**9
            continue
        for p, g in zip(plain.parameters(), grads):
            p.grad = g
        opt_plain.step()
        assert torch.equal(flat(model.parameters()), flat(plain.parameters()))


@pytest.mark.parametrize("rule", ["row", _every_third], ids=["row", "callable"])
def test_the_functional_step_inside_autocast_is_the_step_outside_it(rule):
    from bma_gp.optim.functional import block_mean_adagrad
    from bma_gp.optim.param_blocks import ParamBlocks

    runs = []
    for inside in (False, True):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(6, 5, generator=gen), torch.randn(6, generator=gen)]
        blocks = ParamBlocks.build(params, rule)
        k = blocks.num_blocks
        h, stats = torch.zeros(36), {"U": torch.zeros(k, k), "w": torch.zeros(k), "step": 0}
        for _ in range(3):
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
                block_mean_adagrad(
                    params, grads, h, stats, blocks, None, lr=[0.05] * 2, weight_decay=[0.0] * 2,
                    maximize=[False] * 2, eps=1e-10, damping=0.1, update_interval=1, mask=True, check_finite=True,
                    fused=False,
                )  # fmt: skip
        runs.append(flat(params + [h, stats["U"], stats["w"]]))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
@pytest.mark.parametrize("where", ["same group", "other group"])
def test_a_parameter_appended_to_param_groups_twice_is_refused_and_nothing_changes(cls, where):
    # param_groups[i]["params"].append(p) of a listed p bypasses add_param_group's check: the step held p as two
    # blocks and updated it twice (BlockMeanAdagrad rebuilt its flat state from one of the two views every step)
    model, plain = _conv_model(), _conv_model()
    groups = [list(model[0].parameters()), list(model[3].parameters())]
    opt = cls([{"params": groups[0]}, {"params": groups[1]}], lr=0.05)
    opt_plain = cls([{"params": list(plain[0].parameters())}, {"params": list(plain[3].parameters())}], lr=0.05)
    for i in range(3):
        for m, o in ((model, opt), (plain, opt_plain)):
            x, y = _batch(i)
            o.zero_grad()
            (m(x) - y).pow(2).mean().backward()
            if i < 2:
                o.step()
        if i == 1:
            opt.param_groups[1 if where == "other group" else 0]["params"].append(model[0].weight)
    before = (flat(model.parameters()), copy.deepcopy(opt.global_state))
    match = "twice in group 0" if where == "same group" else "in groups 0 and 1"
    with pytest.raises(ValueError, match=f"list a parameter \\(shape \\(4, 3, 3, 3\\)\\) {match}.*remove the second"):
        opt.step()
    assert torch.equal(flat(model.parameters()), before[0])
    assert opt.global_state.keys() == before[1].keys()
    for key, value in before[1].items():
        assert (
            torch.equal(opt.global_state[key], value)
            if isinstance(value, torch.Tensor)
            else opt.global_state[key] == value
        )
    opt.param_groups[1 if where == "other group" else 0]["params"].pop()
    opt.step()
    opt_plain.step()
    assert torch.equal(flat(model.parameters()), flat(plain.parameters()))


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
@pytest.mark.parametrize("edit", ["replace", "remove"])
def test_a_parameter_replaced_or_removed_in_param_groups_is_named_with_the_fixes(cls, edit):
    # the error said only that "the optimizer's parameters changed", and offered a new optimizer as the one fix
    model = _conv_model()
    opt = cls([{"params": list(model[0].parameters())}, {"params": list(model[3].parameters())}], lr=0.05)
    x, y = _batch(0)
    (model(x) - y).pow(2).mean().backward()
    opt.step()
    group = opt.param_groups[1]["params"]
    if edit == "replace":
        group[1] = torch.nn.Parameter(group[1].detach().clone())
    else:
        del group[1]  # "freezing" the bias by leaving it out
    before = (flat(model.parameters()), copy.deepcopy(opt.global_state))
    with pytest.raises(ValueError, match=r"entry 1 of group 1 \(a parameter of shape \(2,\)\) was removed or replaced"):
        opt.step()
    with pytest.raises(ValueError, match=r"To freeze a parameter keep it listed and leave its grad None"):
        opt.step()
    assert torch.equal(flat(model.parameters()), before[0])
    assert opt.global_state["step"] == before[1]["step"] == 1


@pytest.mark.parametrize("rule", ["tensor", "row"])
def test_unusual_parameter_layouts_step_as_the_dense_reference(rule):
    # channels_last conv weights, a weight_norm parametrization, a strided slice of a larger tensor and a bias
    # shared by two modules (listed once), against docs/math.md written out densely
    from optim_reference import DenseBlockMeanAdagrad, reference_labels

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).double().to(memory_format=torch.channels_last)
    head = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(64, 2).double())
    extra = torch.nn.Linear(2, 2).double()
    base = torch.randn(2, 4, dtype=torch.float64)
    extra.weight = torch.nn.Parameter(base[:, ::2])
    extra.bias = head.bias
    model = torch.nn.Sequential(conv, torch.nn.Tanh(), torch.nn.Flatten(), head, extra)
    params = list(model.parameters())
    assert len(params) == 6 and not conv.weight.is_contiguous() and not extra.weight.is_contiguous()
    opt = BlockMeanAdagrad(params, lr=0.05, partition=rule, weight_decay=0.01)
    labels = reference_labels(params, rule)
    d = labels.numel()
    rate, decay = torch.full((d,), 0.05, dtype=torch.float64), torch.full((d,), 0.01, dtype=torch.float64)
    ref = DenseBlockMeanAdagrad(labels, rate, weight_decay=decay)
    theta = flat(params)
    for i in range(4):
        x, y = _batch(i)
        opt.zero_grad()
        (model(x.double().contiguous(memory_format=torch.channels_last)) - y.double()).pow(2).mean().backward()
        theta = ref.step(theta, flat(p.grad for p in params), torch.ones(d, dtype=torch.bool))
        opt.step()
        torch.testing.assert_close(flat(params), theta, rtol=0, atol=1e-13)
    assert torch.equal(base[:, ::2], extra.weight.detach())  # the slice was updated in place
    assert not conv.weight.is_contiguous()


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
def test_one_cycle_with_momentum_is_refused_and_plateau_rates_are_the_ones_stepped(cls):
    model, plain = _conv_model(), _conv_model()
    opt, opt_plain = cls(model.parameters(), lr=0.05), cls(plain.parameters(), lr=0.05)
    with pytest.raises(ValueError, match="momentum"):
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for i in range(3):
        x, y = _batch(i)
        for m, o in ((model, opt), (plain, opt_plain)):
            o.zero_grad()
            (m(x) - y).pow(2).mean().backward()
            o.step()
        plateau.step(1.0)  # no improvement after the first: the rate halves
        opt_plain.param_groups[0]["lr"] = 0.05 * 0.5**i
        assert opt.param_groups[0]["lr"] == opt_plain.param_groups[0]["lr"]
        assert torch.equal(flat(model.parameters()), flat(plain.parameters()))


def test_full_matrix_refuses_parameters_appended_in_place_past_max_dim_before_allocating():
    # param_groups[0]["params"].append(p) bypassed add_param_group's max_dim check: H grew to d x d anyway
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(20))
    opt = FullMatrixAdagrad([a], lr=0.1, max_dim=25)
    a.grad = torch.randn(10)
    opt.step()
    with pytest.raises(ValueError, match="above max_dim = 25"):
        opt.add_param_group({"params": [b]})
    opt.param_groups[0]["params"].append(b)
    b.grad = torch.randn(20)
    before = (a.detach().clone(), b.detach().clone(), opt.global_state["H"].clone())
    with pytest.raises(ValueError, match=r"d = 30 parameters \(param_groups were edited in place.*above max_dim = 25"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert torch.equal(opt.global_state["H"], before[2]) and opt.global_state["step"] == 1
    opt.param_groups[0]["params"].pop()
    opt.step()
    assert opt.global_state["H"].shape == (10, 10) and opt.global_state["step"] == 2


@pytest.mark.parametrize("cls,key,value", [(BlockMeanAdagrad, "eps", 1e-3), (BlockMeanAdagrad, "damping", 5.0),
                                           (FullMatrixAdagrad, "eps", 1e-2)])  # fmt: skip
def test_an_optimizer_wide_setting_edited_in_a_param_group_is_refused_not_ignored(cls, key, value):
    # param_groups[0]["eps"] = ..., how torch.optim's eps is changed between steps, was silently ignored
    model = _conv_model()
    opt = cls(model.parameters(), lr=0.05)
    x, y = _batch(0)
    (model(x) - y).pow(2).mean().backward()
    opt.step()
    opt.param_groups[0][key] = value
    before = (flat(model.parameters()), copy.deepcopy(opt.global_state))
    with pytest.raises(ValueError, match=f"param_groups\\[0\\] was edited after it was added: {key} is an optimizer"):
        opt.step()
    assert torch.equal(flat(model.parameters()), before[0]) and opt.global_state["step"] == 1
    setattr(opt, key, value)  # the way to change it: the attribute (the group's entry now agrees)
    opt.step()
    assert opt.global_state["step"] == 2 and getattr(opt, key) == value
