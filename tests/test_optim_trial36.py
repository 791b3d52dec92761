"""A user trial of the optimizers (session 36): a cleared state restarts FullMatrixAdagrad as it restarts
BlockMeanAdagrad; loaded state tensors are leaves; a meta or integer checkpoint entry is refused by name; the
refusal of Adagrad's ``initial_accumulator_value`` names each optimizer's own bound of the first steps."""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch

from bma_gp.optim import BlockMeanAdagrad, FullMatrixAdagrad

CLASSES = [BlockMeanAdagrad, FullMatrixAdagrad]


def _reset(opt, how: str) -> None:
    if how == "assign":
        opt.state = defaultdict(dict)
    else:
        opt.state.clear()


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("how", ["assign", "clear"])
def test_cleared_state_restarts_the_optimizer(cls, how):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    q = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = cls([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.randn(5, dtype=torch.float64)
        opt.step()
    _reset(opt, how)
    fresh = cls([q], lr=0.1)
    with torch.no_grad():
        q.copy_(p)
    for _ in range(2):
        g = torch.randn(5, dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        fresh.step()
        assert torch.equal(p, q)
    assert opt.global_state["step"] == 2


def test_full_matrix_cleared_state_survives_a_refused_step():
    """A step refused after the layout was committed (an overflowing gradient) leaves the state cleared: the next
    step still restarts."""
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(4))
    q = torch.nn.Parameter(torch.zeros(4))
    opt = FullMatrixAdagrad([p], lr=0.1)
    for _ in range(2):
        p.grad = torch.randn(4)
        opt.step()
    opt.state.clear()
    p.grad = torch.full((4,), 3e19)  # finite; g g^T overflows float32
    before = p.detach().clone()
    with pytest.raises(ValueError, match="overflow"):
        opt.step()
    assert torch.equal(p, before)
    assert p not in opt.state and opt.global_state["step"] == 2
    fresh = FullMatrixAdagrad([q], lr=0.1)
    with torch.no_grad():
        q.copy_(p)
    g = torch.randn(4)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    fresh.step()
    assert torch.equal(p, q)


def test_full_matrix_checkpoint_without_parameter_entries_keeps_its_statistics():
    """State dicts saved before the per-parameter marks (``"state": {}``) load and continue bit for bit: the load
    is not mistaken for a cleared state."""
    torch.manual_seed(2)
    model = torch.nn.Linear(3, 2)
    opt = FullMatrixAdagrad(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"] = {}
    twin = copy.deepcopy(model)
    loaded = FullMatrixAdagrad(twin.parameters(), lr=0.1)
    loaded.load_state_dict(saved)
    for a, b in zip(model.parameters(), twin.parameters()):
        b.grad = torch.randn_like(b)
        a.grad = b.grad.clone()
    opt.step()
    loaded.step()
    assert loaded.global_state["step"] == 3
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def _stepped_state(cls, seed: int):
    """A small model and a copy of its optimizer's state dict after one step."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = cls(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("cls", CLASSES)
def test_loaded_state_that_requires_grad_is_a_leaf(cls):
    model, saved = _stepped_state(cls, seed=3)
    for key, value in saved["global_state"].items():
        if torch.is_tensor(value) and value.is_floating_point():
            saved["global_state"][key] = value.clone().requires_grad_()
    for entry in saved["state"].values():
        for key, value in entry.items():
            entry[key] = value.clone().requires_grad_()
    loaded = cls(model.parameters(), lr=0.1)
    loaded.load_state_dict(saved)
    tensors = [v for v in loaded.global_state.values() if torch.is_tensor(v)]
    tensors += [v for entry in loaded.state.values() for v in entry.values() if torch.is_tensor(v)]
    assert tensors
    assert all(t.grad_fn is None and not t.requires_grad for t in tensors)
    copy.deepcopy(loaded.state_dict())
    copy.deepcopy(loaded)


@pytest.mark.parametrize(
    ("cls", "where"),
    [(BlockMeanAdagrad, "sum"), (BlockMeanAdagrad, "U"), (BlockMeanAdagrad, "w"), (FullMatrixAdagrad, "H")],
)
def test_meta_checkpoint_entry_is_refused_by_name(cls, where):
    model, saved = _stepped_state(cls, seed=4)
    if where == "sum":
        saved["state"][0]["sum"] = saved["state"][0]["sum"].to("meta")
        name = "'sum' of parameter 0"
    else:
        saved["global_state"][where] = saved["global_state"][where].to("meta")
        name = f"global_state['{where}']"
    target = cls(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    target.step()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=rf"{name.replace('[', '.').replace(']', '.')} is a tensor on the meta device"):
        target.load_state_dict(saved)
    after = target.state_dict()
    assert after["global_state"]["step"] == before["global_state"]["step"]
    for key, value in before["global_state"].items():
        if torch.is_tensor(value):
            assert torch.equal(after["global_state"][key], value)


def test_integer_sum_is_refused():
    model, saved = _stepped_state(BlockMeanAdagrad, seed=5)
    saved["state"][0]["sum"] = saved["state"][0]["sum"].round().long()
    fresh = BlockMeanAdagrad(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="'sum' of parameter 0 has dtype torch.int64"):
        fresh.load_state_dict(saved)
    assert not fresh.global_state and not any(fresh.state.values())


@pytest.mark.parametrize(("cls", "bound"), [(BlockMeanAdagrad, "damping"), (FullMatrixAdagrad, "eps")])
def test_initial_accumulator_refusal_names_the_optimizers_own_bound(cls, bound):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=rf"; {bound} .* keeps the first steps bounded") as info:
        cls([p], initial_accumulator_value=0.1)
    other = {"damping", "eps"} - {bound}
    assert f"; {other.pop()} " not in str(info.value)
    opt = cls([p])
    with pytest.raises(ValueError, match=rf"; {bound} .* keeps the first steps bounded"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "initial_accumulator_value": 0.5})


def _every_third(p):
    return torch.arange(p.numel()).reshape(p.shape) % 3


@pytest.mark.parametrize("partition", ["row", "tensor", _every_third], ids=["row", "tensor", "callable"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_a_16_bit_parameter_takes_the_eager_step_rounded_once(partition, weight_decay):
    """The eager step computes in float32 for a bfloat16 parameter; the new value is that result rounded once into
    bfloat16, as the fused passes and torch.optim.Adagrad do (it was rounded twice: 164 of 2048 entries off the
    correctly rounded value at the first step)."""
    torch.manual_seed(0)
    w0, g = torch.randn(64, 32).bfloat16(), torch.randn(64, 32).bfloat16()
    out = {}
    for dtype in (torch.float64, torch.bfloat16):
        p = torch.nn.Parameter(w0.to(dtype, copy=True))
        opt = BlockMeanAdagrad([p], lr=0.05, partition=partition, weight_decay=weight_decay)
        p.grad = g.to(dtype)
        opt.step()
        out[dtype] = p.detach()
    wrong = int((out[torch.bfloat16] != out[torch.float64].bfloat16()).sum())
    assert wrong <= 1, wrong  # float32's own rounding can still tip an entry that lies on a bfloat16 tie


def test_a_float32_parameter_beside_a_float64_one_is_rounded_once():
    """Mixed float32 / float64 parameters keep float64 statistics: the float32 parameter's step is the float64 step
    rounded once."""
    torch.manual_seed(1)
    a0, b0 = torch.randn(40, 30, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    ga, gb = torch.randn(40, 30, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    results = []
    for dtype in (torch.float64, torch.float32):
        a, b = torch.nn.Parameter(a0.to(dtype, copy=True)), torch.nn.Parameter(b0.clone())
        opt = BlockMeanAdagrad([a, b], lr=0.05, partition="row", weight_decay=0.1)
        a.grad, b.grad = ga.to(dtype), gb.clone()
        opt.step()
        results.append(a.detach())
    a_ref = torch.nn.Parameter(a0.to(torch.float32).double())  # the float32 start, exactly, in float64
    b_ref = torch.nn.Parameter(b0.clone())
    opt = BlockMeanAdagrad([a_ref, b_ref], lr=0.05, partition="row", weight_decay=0.1)
    a_ref.grad, b_ref.grad = ga.to(torch.float32).double(), gb.clone()
    opt.step()
    assert torch.equal(results[1], a_ref.detach().float())


def test_the_functional_step_refuses_a_parameter_listed_twice():
    """``BlockMeanAdagrad([p, p])`` is refused; the functional step took it, as two sets of blocks stepped twice."""
    from bma_gp.optim.functional import block_mean_adagrad
    from bma_gp.optim.param_blocks import ParamBlocks

    p, q = torch.randn(6, 5), torch.randn(4)
    params = [p, q, p]
    blocks = ParamBlocks.build(params, "row")
    k = blocks.num_blocks
    h, stats = torch.zeros(64), {"U": torch.zeros(k, k), "w": torch.zeros(k), "step": 0}
    before = [t.clone() for t in (p, q, h)]
    with pytest.raises(ValueError, match=r"params\[2\] is params\[0\] again"):
        block_mean_adagrad(
            params, [torch.ones_like(t) for t in params], h, stats, blocks, None, lr=[0.05] * 3,
            weight_decay=[0.0] * 3, maximize=[False] * 3, eps=1e-10, damping=0.1, update_interval=1, mask=True,
            check_finite=True, fused=False,
        )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip((p, q, h), before)) and stats["step"] == 0
