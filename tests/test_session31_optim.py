"""Session 31 (optimizer user trial): training-loop workflows of torch 2.13 that the earlier optimizer tests did not
run, each held to the dense reference or to the uninterrupted run.

The trial found no wrong step in them; these tests keep it so: schedulers that no test ran (warm restarts, sequential,
lambda, SWALR) with a tensor learning rate and a checkpoint taken mid-schedule, an optimizer built from
``model.named_parameters()`` (torch's ``param_names``), ``torch.__future__``'s swapped module conversion between
steps, parameters restored by ``vector_to_parameters`` (new storage, the same ``Parameter`` objects), and a float32
model under ``torch.set_default_dtype(torch.float64)``.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.optim import lr_scheduler
from torch.optim.swa_utils import SWALR

from bma_gp.optim import BlockMeanAdagrad
from optim_reference import DenseBlockMeanAdagrad, flat, reference_labels

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(dtype)


def _batch(t: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + t)
    return torch.randn(8, 4, generator=gen, dtype=torch.float64).to(dtype), torch.randn(
        8, 2, generator=gen, dtype=torch.float64
    ).to(dtype)


def _train(model, opt, steps, scheduler=None) -> None:
    for t in steps:
        x, y = _batch(t, next(model.parameters()).dtype)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


_SCHEDULERS = {
    "warm_restarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2),
    "sequential": lambda o: lr_scheduler.SequentialLR(
        o,
        [lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=2), lr_scheduler.ExponentialLR(o, gamma=0.8)],
        milestones=[2],
    ),
    "lambda": lambda o: lr_scheduler.LambdaLR(o, lambda epoch: 1.0 / (1 + epoch)),
    "swalr": lambda o: SWALR(o, swa_lr=0.01, anneal_epochs=3),
}


@pytest.mark.parametrize("name", sorted(_SCHEDULERS))
def test_schedulers_with_a_tensor_lr_step_as_the_dense_reference_and_resume_bit_for_bit(name):
    """Each step under the scheduler is the dense reference's at the scheduler's learning rate of that step (the
    tensor lr is filled in place by the scheduler), and a checkpoint of model, optimizer and scheduler taken after
    three steps (``torch.save`` / ``torch.load(weights_only=True)``) continues bit for bit."""
    make = _SCHEDULERS[name]
    model = _mlp()
    params = list(model.parameters())
    opt = BlockMeanAdagrad(params, lr=torch.tensor(0.05, dtype=torch.float64), damping=0.1)
    sched = make(opt)
    labels = reference_labels(params, "tensor")
    ref = DenseBlockMeanAdagrad(labels, torch.zeros(labels.numel(), dtype=torch.float64), damping=0.1)
    theta = flat(params)
    lrs = []
    for t in range(7):
        lr = float(opt.param_groups[0]["lr"])
        lrs.append(lr)
        ref.lr = torch.full_like(ref.lr, lr)
        x, y = _batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        g = flat(p.grad for p in params)
        opt.step()
        sched.step()
        theta = ref.step(theta, g, torch.ones_like(g, dtype=torch.bool))
        torch.testing.assert_close(flat(params), theta, rtol=1e-12, atol=1e-13)
    assert len(set(lrs)) > 2  # the schedule moved the learning rate
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    uninterrupted = flat(params)

    model = _mlp()
    opt = BlockMeanAdagrad(model.parameters(), lr=torch.tensor(0.05, dtype=torch.float64), damping=0.1)
    sched = make(opt)
    _train(model, opt, range(3), sched)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _mlp()
    resumed.load_state_dict(saved["model"])
    opt2 = BlockMeanAdagrad(resumed.parameters(), lr=torch.tensor(0.05, dtype=torch.float64), damping=0.1)
    sched2 = make(opt2)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    _train(resumed, opt2, range(3, 7), sched2)
    assert torch.equal(flat(resumed.parameters()), uninterrupted)


def test_an_optimizer_of_named_parameters_steps_and_resumes_as_one_of_parameters():
    """torch >= 2.5 takes ``model.named_parameters()`` (groups get ``param_names``): the same steps as from
    ``model.parameters()``, a group added with names too, and a state dict with the names resumes bit for bit."""
    model = _mlp()
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05, partition="row")
    _train(model, opt, range(6))
    expected = flat(model.parameters())

    model = _mlp()
    named = list(model.named_parameters())
    opt = BlockMeanAdagrad([{"params": named[:2]}], lr=0.05, partition="row")
    opt.add_param_group({"params": named[2:]})
    assert [g["param_names"] for g in opt.param_groups] == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    _train(model, opt, range(3))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert saved["opt"]["param_groups"][1]["param_names"] == ["2.weight", "2.bias"]
    _train(model, opt, range(3, 6))
    assert torch.equal(flat(model.parameters()), expected)

    resumed = _mlp()
    resumed.load_state_dict(saved["model"])
    named = list(resumed.named_parameters())
    opt2 = BlockMeanAdagrad([{"params": named[:2]}, {"params": named[2:]}], lr=0.05, partition="row")
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, range(3, 6))
    assert torch.equal(flat(resumed.parameters()), expected)


def _conv(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(3 * 3 * 3, 2)
    ).to(dtype)


def _conv_train(model, opt, steps) -> None:
    for t in steps:
        dtype = next(model.parameters()).dtype
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(4, 2, 5, 5, generator=gen, dtype=torch.float64).to(dtype)
        y = torch.randn(4, 2, generator=gen, dtype=torch.float64).to(dtype)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("conversion", ["double", "channels_last"])
def test_swapped_module_conversion_between_steps_steps_as_the_plain_conversion(conversion):
    """``torch.__future__.set_swap_module_params_on_conversion(True)`` makes ``model.double()`` and
    ``model.to(memory_format=torch.channels_last)`` swap each parameter's tensor in place
    (``torch.utils.swap_tensors``: the same ``Parameter`` object, new memory, dtype, strides and version counter)
    instead of assigning ``.data``: the optimizer's state follows and the run is bit for bit the one with ``.data``."""
    results = []
    for swap in (False, True):
        previous = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(swap)
        try:
            model = _conv()
            opt = BlockMeanAdagrad(model.parameters(), lr=0.05, update_interval=2)
            _conv_train(model, opt, range(3))
            held = list(model.parameters())
            if conversion == "double":
                model.double()
            else:
                model.to(memory_format=torch.channels_last)
            assert all(p is q for p, q in zip(model.parameters(), held))
            _conv_train(model, opt, range(3, 7))
        finally:
            torch.__future__.set_swap_module_params_on_conversion(previous)
        results.append((flat(model.parameters()), opt.state[held[0]]["sum"].clone(), opt.global_state["U"].clone()))
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert results[1][0].dtype == (torch.float64 if conversion == "double" else torch.float32)


def test_parameters_restored_by_vector_to_parameters_step_as_restored_in_place():
    """``torch.nn.utils.vector_to_parameters`` (a rollback to a saved flat vector) gives every parameter new memory,
    views of one vector; the steps after it write there and match a rollback by ``copy_`` bit for bit (the eager CPU
    step's numpy forms write the parameters' memory through arrays made per step)."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    def run(restore):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2), torch.nn.Linear(2, 2)
        )
        opt = BlockMeanAdagrad(model.parameters(), lr=0.05)
        _train_any(model, opt, range(3))
        saved = parameters_to_vector(model.parameters()).detach().clone()
        _train_any(model, opt, range(3, 5))
        restore(saved, list(model.parameters()))
        _train_any(model, opt, range(5, 9))
        return flat(model.parameters())

    def by_copy(vec, params):
        with torch.no_grad():
            for p, chunk in zip(params, vec.split([p.numel() for p in params])):
                p.copy_(chunk.view_as(p))

    assert torch.equal(run(vector_to_parameters), run(by_copy))


def _train_any(model, opt, steps) -> None:
    width = model[0].in_features
    for t in steps:
        gen = torch.Generator().manual_seed(t)
        x, y = torch.randn(8, width, generator=gen), torch.randn(8, 2, generator=gen)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("partition", ["tensor", "row"])
def test_a_float64_default_dtype_does_not_change_the_steps_of_a_float32_model(partition):
    """Buffers the step makes (work vectors, block sums, the root, tables of per-tensor sums) follow the state's dtype,
    not torch's default: under ``torch.set_default_dtype(torch.float64)`` a float32 model steps bit for bit as under
    float32, with float32 state (one parameter without a gradient on some steps, a 40,000-entry tensor for the ratio
    form)."""

    def run(default):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            torch.manual_seed(0)
            shapes = [(40000,), (5,), (3, 4), (7,)]
            params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float32)) for s in shapes]
            opt = BlockMeanAdagrad(params, lr=0.1, partition=partition, update_interval=2, weight_decay=0.01)
            for t in range(4):
                gen = torch.Generator().manual_seed(t)
                for i, p in enumerate(params):
                    p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float32) if (t + i) % 3 else None
                opt.step()
        finally:
            torch.set_default_dtype(previous)
        assert opt.global_state["U"].dtype == torch.float32
        return flat(params)

    a, b = run(torch.float32), run(torch.float64)
    assert a.dtype == b.dtype == torch.float32
    assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("partition", ["tensor", "row"])
def test_an_entry_whose_h_overflows_never_moves_again_and_the_rest_step_as_the_reference(partition, fused):
    """A finite float32 gradient entry of 1e30 makes ``h = inf`` there (docs/optimizer.md, "Entries whose h
    overflows"): that entry never moves again, as with ``torch.optim.Adagrad``, nothing turns nan, and every other
    entry steps as the dense float64 reference does when its ``h`` is inf there too (a gradient of 1e200)."""
    from optim_reference import fused_at_any_size

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    start = flat(params).double()
    labels = reference_labels(params, partition)
    ref = DenseBlockMeanAdagrad(labels, torch.full((labels.numel(),), 0.1, dtype=torch.float64))
    adagrad_param = torch.nn.Parameter(params[0].detach().clone())
    adagrad = torch.optim.Adagrad([adagrad_param], lr=0.1)
    theta = start
    with fused_at_any_size():
        opt = BlockMeanAdagrad(params, lr=0.1, partition=partition, fused=fused)
        for t in range(4):
            gen = torch.Generator().manual_seed(t)
            grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
            ref_grads = [g.clone() for g in grads]
            if t == 0:
                grads[0][0, 0], ref_grads[0][0, 0] = 1e30, 1e200  # squares: inf in float32 and in float64
            for p, g in zip(params, grads):
                p.grad = g.float()
            adagrad_param.grad = grads[0].float()
            opt.step()
            adagrad.step()
            theta = ref.step(theta, flat(ref_grads), torch.ones(labels.numel(), dtype=torch.bool))
            assert opt.state[params[0]]["sum"][0, 0] == float("inf")
            assert params[0][0, 0] == start[0] == adagrad_param[0, 0]
            assert all(torch.isfinite(opt.global_state[key]).all() for key in ("U", "w", "root_lam", "root_B"))
            torch.testing.assert_close(flat(params).double(), theta, rtol=1e-5, atol=1e-6)
    assert (flat(params).double() - start).abs().max() > 0.1  # the other entries moved


def test_the_functional_step_bumps_the_versions_of_the_tensors_it_writes_when_the_workspace_saw_others():
    """``block_mean_adagrad`` with a kept workspace and other parameter tensors of the same shapes (a rebuilt list,
    ``load_state_dict(..., assign=True)``): the CPU step for one block per tensor writes them through numpy and bumped
    the version counters of the tensors its cached views were made with. The tensors written kept their counters, so a
    ``backward()`` through a graph that saved their old values ran on the new ones without an error (torch.optim's
    in-place steps make autograd raise there), and the old tensors, not written, were marked as changed."""
    from bma_gp.optim.functional import Workspace, block_mean_adagrad
    from bma_gp.optim.param_blocks import ParamBlocks

    torch.manual_seed(0)
    first = [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2)]
    blocks = ParamBlocks.build(first, "tensor")
    k = blocks.num_blocks
    h = torch.zeros(blocks.bounds[-1])
    stats = {"U": torch.zeros(k, k), "w": torch.zeros(k), "step": 0}
    workspace = Workspace.build(blocks, h)

    def step(params, seed):
        gen = torch.Generator().manual_seed(seed)
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        n = len(params)
        block_mean_adagrad(
            params, grads, h, stats, blocks, workspace, lr=[0.1] * n, weight_decay=[0.0] * n, maximize=[False] * n,
            eps=1e-10, damping=0.1, update_interval=1, mask=True, check_finite=True, fused=False,
        )  # fmt: skip

    step(first, 0)
    second = [p.detach().clone().requires_grad_() for p in first]
    loss = sum((p * p).sum() for p in second)  # saves the values of `second`
    before_first = [p._version for p in first]
    before_second = [p._version for p in second]
    values = [p.detach().clone() for p in second]
    step(second, 1)
    assert not any(torch.equal(p.detach(), v) for p, v in zip(second, values))  # written
    assert [p._version for p in first] == before_first
    assert all(p._version > v for p, v in zip(second, before_second))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize(
    ("partition", "numel"),
    [("row", 12), ("tensor", 40000), (lambda p: torch.arange(p.numel()).reshape(p.shape) % 2, 12)],
    ids=["row", "tensor-torch-form", "callable"],
)
def test_the_functional_step_after_h_is_reset_in_place_does_not_move_entries_without_gradient(partition, numel):
    """``block_mean_adagrad`` with a kept workspace after ``state_sum.zero_()`` (a warm restart): the workspace's CPU
    lists of the entries where ``h == 0`` assume that ``h`` only grows, and were kept, so an entry whose gradient was
    0 at the next step had ``r = eps^(-1/2)`` instead of 0 and moved (by 236 at ``lr = 0.1`` with ``"row"``, 20 with a
    tensor of 40,000 entries), where the class's step (which checks ``h``'s version counter) and a fresh workspace
    leave it. The kept workspace now steps as a fresh one."""
    from bma_gp.optim.functional import Workspace, block_mean_adagrad
    from bma_gp.optim.param_blocks import ParamBlocks

    def run(keep):
        torch.manual_seed(0)
        params = [torch.randn(numel), torch.randn(5), torch.randn(3, 4)]
        blocks = ParamBlocks.build(params, partition)
        k = blocks.num_blocks
        h = torch.zeros(blocks.bounds[-1])
        stats = {"U": torch.zeros(k, k), "w": torch.zeros(k), "step": 0}
        workspace = Workspace.build(blocks, h) if keep else None
        n = len(params)
        for t in range(4):
            gen = torch.Generator().manual_seed(t)
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            if t == 3:
                h.zero_()
                grads[0][:4] = 0
                held = params[0][:4].clone()
            block_mean_adagrad(
                params, grads, h, stats, blocks, workspace, lr=[0.1] * n, weight_decay=[0.0] * n,
                maximize=[False] * n, eps=1e-10, damping=0.1, update_interval=1, mask=True, check_finite=True,
                fused=False,
            )  # fmt: skip
        assert torch.equal(params[0][:4], held)  # h = 0 and g = 0 there: not moved
        return flat(params)

    torch.testing.assert_close(run(keep=True), run(keep=False), rtol=1e-6, atol=1e-6)
