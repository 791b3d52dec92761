"""Audit of block-mean AdaGrad as a torch.optim / functional-optimizer user would use it: the public functional
step (:func:`bma_gp.optim.functional.block_mean_adagrad`) with caller-held state, and the class with torch.optim's
ecosystem (schedulers, param groups, hooks, dtypes)."""

from __future__ import annotations

import re

import pytest
import torch

from bma_gp.optim import SparseGradientError
from bma_gp.optim.functional import FINGERPRINT_KEY, Workspace, block_mean_adagrad
from bma_gp.optim.param_blocks import ParamBlocks

F64 = torch.float64


def _params(dtype=F64) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=dtype)),
        torch.nn.Parameter(torch.randn(4, generator=gen, dtype=dtype)),
    ]


def _grads(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def _stats(k: int, dtype=F64) -> dict:
    return {"U": torch.zeros(k, k, dtype=dtype), "w": torch.zeros(k, dtype=dtype), "step": 0}


def _step(params, grads, h, stats, blocks, workspace=None, **kwargs):
    m = len(params)
    args = dict(
        lr=[0.1] * m, weight_decay=[0.0] * m, maximize=[False] * m, eps=1e-10, damping=0.1, update_interval=1,
        mask=True, check_finite=True, fused=False,
    )  # fmt: skip
    args.update(kwargs)
    with torch.no_grad():
        block_mean_adagrad(params, grads, h, stats, blocks, workspace, **args)


def _uneven(p):
    """4 blocks over the parameters of :func:`_params`, as under "row", but of sizes 6, 3, 3 and 4."""
    if p.numel() == 12:
        return torch.tensor([0] * 6 + [1] * 3 + [2] * 3)
    return torch.zeros(p.numel(), dtype=torch.long)


def _snapshot(params, h, stats):
    tensors = [p.detach().clone() for p in params] + [h.clone()]
    tensors += [v.clone() for v in stats.values() if isinstance(v, torch.Tensor) and not v.is_meta]
    return tensors, {k: v for k, v in stats.items() if not isinstance(v, torch.Tensor)}


def _unchanged(before, params, h, stats) -> bool:
    after = _snapshot(params, h, stats)
    return all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and before[1] == after[1]


def test_statistics_of_another_partition_with_as_many_blocks_are_refused():
    """Only the number of blocks was checked: statistics accumulated under "row" (4 blocks of 4 entries) were taken
    as those of a partition into 4 blocks of sizes 6, 3, 3, 4, whose blocks hold other entries."""
    params = _params()
    row = ParamBlocks.build(params, "row")
    h, stats = torch.zeros(16, dtype=F64), _stats(4)
    for t in range(2):
        _step(params, _grads(params, t), h, stats, row)
    assert stats[FINGERPRINT_KEY] == row.label_fingerprint(4)
    uneven = ParamBlocks.build(params, _uneven)
    assert uneven.num_blocks == 4
    before = _snapshot(params, h, stats)
    with pytest.raises(ValueError, match=r"stats belong to other blocks.*sizes \[6, 3, 3, 4\]"):
        _step(params, _grads(params, 2), h, stats, uneven)
    assert _unchanged(before, params, h, stats)
    _step(params, _grads(params, 2), h, stats, ParamBlocks.build(params, "row"))  # the same blocks, rebuilt: fine
    assert stats["step"] == 3


def _bad_cases():
    k = 4
    yield "U float32", dict(stats={"U": torch.zeros(k, k), "w": torch.zeros(k, dtype=F64), "step": 0}), r"stats\['U'\]"
    yield (
        "w on meta",
        dict(stats={"U": torch.zeros(k, k, dtype=F64), "w": torch.zeros(k, dtype=F64, device="meta"), "step": 0}),
        r"stats\['w'\].*on meta",
    )
    stale = {**_stats(k), "root_lam": torch.ones(3, dtype=F64), "root_B": torch.zeros(3, 3, dtype=F64), "root_step": 0}
    yield "root of 3 blocks", dict(stats=stale, update_interval=10), r"stats\['root_lam'\].*shape \(4,\)"
    yield "h float32", dict(h=torch.zeros(16), stats=_stats(k, torch.float32)), "state_sum has dtype torch.float32"
    yield "h float16", dict(h=torch.zeros(16, dtype=torch.float16), stats=_stats(k, torch.float16)), "narrower"
    yield "h integer", dict(h=torch.zeros(16, dtype=torch.long)), "real floating-point"
    yield "h strided", dict(h=torch.zeros(32, dtype=F64)[::2]), "contiguous"
    yield "grad transposed", dict(grads=[torch.randn(4, 3, dtype=F64), torch.randn(4, dtype=F64)]), r"grads\[0\]"
    yield "sparse grad", dict(grads=[torch.randn(3, 4, dtype=F64).to_sparse(), None]), "sparse"
    yield "step missing", dict(stats={"U": torch.zeros(k, k, dtype=F64), "w": torch.zeros(k, dtype=F64)}), "step"
    yield "lr float", dict(lr=0.1), r"lr per parameter.*got a float"
    yield "lr short", dict(lr=[0.1]), r"lr per parameter.*got 1 values"
    yield "eps 0", dict(eps=0.0), "Invalid eps"
    yield "negative damping", dict(damping=-1.0), "Invalid damping"
    other_h = torch.zeros(16, dtype=F64)
    yield "workspace of another h", dict(workspace=lambda blocks: Workspace.build(blocks, other_h)), "workspace"
    yield "workspace of other blocks", dict(workspace=lambda blocks: "tensor"), "workspace"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_arguments_that_do_not_fit_are_refused_before_anything_changes(case):
    """Statistics, root, ``state_sum``, gradients and workspace of the wrong dtype, device or shape were accepted
    (wrong updates: a float32 ``h`` for float64 parameters, a workspace of another ``h`` updated that ``h``) or
    failed mid-step with torch's or numpy's errors (``addmv``, ``size mismatch``, ``KeyError: 'step'``)."""
    _, kwargs, match = case
    params = _params()
    blocks = ParamBlocks.build(params, "row")
    h = kwargs.pop("h", torch.zeros(16, dtype=F64))
    stats = kwargs.pop("stats", _stats(4))
    grads = kwargs.pop("grads", _grads(params, 0))
    workspace = kwargs.pop("workspace", None)
    if workspace is not None:
        made = workspace(blocks)
        workspace = Workspace.build(ParamBlocks.build(params, "tensor"), h) if made == "tensor" else made
    before = _snapshot(params, h, stats)
    with pytest.raises((ValueError, TypeError)) as info:
        _step(params, grads, h, stats, blocks, workspace, **kwargs)
    assert re.search(match, str(info.value)), str(info.value)
    assert _unchanged(before, params, h, stats)


def test_blocks_and_stats_of_the_wrong_type_are_named():
    """``blocks`` given as the rule (``"tensor"``) or ``stats`` as a tuple raised AttributeError from inside."""
    params = _params()
    blocks = ParamBlocks.build(params, "tensor")
    with pytest.raises(TypeError, match="blocks must be a ParamBlocks"):
        _step(params, _grads(params, 0), torch.zeros(16, dtype=F64), _stats(2), "tensor")
    with pytest.raises(TypeError, match="stats must be a dict"):
        _step(params, _grads(params, 0), torch.zeros(16, dtype=F64), (torch.zeros(2, 2), torch.zeros(2)), blocks)


def test_a_sparse_gradient_raises_sparse_gradient_error():
    params = _params()
    blocks = ParamBlocks.build(params, "tensor")
    with pytest.raises(SparseGradientError):
        _step(params, [torch.ones(3, 4, dtype=F64).to_sparse(), None], torch.zeros(16, dtype=F64), _stats(2), blocks)


def test_the_class_drops_the_recorded_fingerprint_when_its_blocks_grow():
    """Statistics stepped by the functional API record their blocks; the class pads them after add_param_group and
    they then belong to more blocks: the record of the old ones must not refuse the new ones."""
    from bma_gp.optim import BlockMeanAdagrad

    params = _params()
    opt = BlockMeanAdagrad(params[:1], lr=0.1)
    params[0].grad = _grads(params, 0)[0]
    opt.step()
    blocks = ParamBlocks.build(params[:1], "tensor")
    _step(params[:1], [params[0].grad], opt.state[params[0]]["sum"].view(-1), opt.global_state, blocks)
    assert FINGERPRINT_KEY in opt.global_state
    opt.add_param_group({"params": params[1:]})
    for p, g in zip(params, _grads(params, 1)):
        p.grad = g
    opt.step()
    assert FINGERPRINT_KEY not in opt.global_state and opt.global_state["U"].shape == (2, 2)


@pytest.mark.parametrize(
    "rule", ["tensor", "row", lambda p: torch.arange(p.numel()) % 2], ids=["tensor", "row", "call"]
)
def test_check_finite_refuses_a_nan_gradient_on_every_eager_path(rule):
    """With ``check_finite=True`` the public functional step checked only on the fused path and the CPU step for
    one block per tensor; "row" and callable partitions stepped the NaN into ``h``, ``U`` and ``w`` and then raised
    ``LinAlgError`` from the root's ``eigh``, the state half-changed."""
    params = _params()
    blocks = ParamBlocks.build(params, rule)
    h, stats = torch.zeros(16, dtype=F64), _stats(blocks.num_blocks)
    _step(params, _grads(params, 0), h, stats, blocks)
    grads = _grads(params, 1)
    grads[1][0] = float("nan")
    before = _snapshot(params, h, stats)
    with pytest.raises(ValueError, match="non-finite gradient"):
        _step(params, grads, h, stats, blocks)
    assert _unchanged(before, params, h, stats)


@pytest.mark.parametrize("cls", ["BlockMeanAdagrad", "FullMatrixAdagrad"])
def test_a_torch_compiled_training_step_updates_as_the_eager_one(cls):
    """``torch.compile`` of a training step that calls ``opt.step()`` traced into the step: Dynamo turned its numpy
    arithmetic on the parameters' memory (and other host-side work) into graph ops, and the parameters moved by
    something else than the eager step (0.06-0.08 apart after three steps), silently. The step now runs outside the
    graph (a graph break), bit for bit as eagerly."""
    import bma_gp.optim as optim

    torch._dynamo.reset()
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
        models.append((model, getattr(optim, cls)(model.parameters(), lr=0.1)))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=gen, dtype=F64), torch.randn(16, 2, generator=gen, dtype=F64)

    def train_step(model, opt):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        return loss

    calls = []
    models[1][1].register_step_pre_hook(lambda *args: calls.append("pre"))
    models[1][1].register_step_post_hook(lambda *args: calls.append("post"))
    compiled = torch.compile(train_step, backend="eager")
    for _ in range(3):
        train_step(*models[0])
        compiled(*models[1])
    for a, b in zip(models[0][0].parameters(), models[1][0].parameters()):
        assert torch.equal(a, b)
    assert calls == ["pre", "post"] * 3  # torch.optim's step hooks run once per step, around the whole step


@pytest.mark.parametrize("cls", ["BlockMeanAdagrad", "FullMatrixAdagrad"])
def test_a_complex_parameter_is_refused_with_a_fix_that_keeps_its_imaginary_part(cls):
    """The refusal said "convert it with `.float()`", which discards the imaginary part."""
    import bma_gp.optim as optim

    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex64") as info:
        getattr(optim, cls)([p])
    assert "view_as_real" in str(info.value) and ".float()" not in str(info.value)


@pytest.mark.parametrize(
    "rule", ["tensor", "row", lambda p: torch.arange(p.numel()) % 2], ids=["tensor", "row", "call"]
)
def test_the_functional_step_takes_tensor_rates_and_grad_mode_as_the_class_does(rule):
    """Called with grad mode on (the parameters are leaves that require grad), the "row" and callable paths raised
    "a leaf Variable that requires grad is being used in an in-place operation" after updating ``h``, ``U`` and
    ``w``; a 0-d tensor ``lr`` (a scheduler's, accepted by the class) raised ``TypeError`` mid-step on the "tensor"
    path. Both now step as the class does, and a negative rate is refused before anything changes."""
    from bma_gp.optim import BlockMeanAdagrad

    params, reference = _params(), _params()
    opt = BlockMeanAdagrad(reference, lr=0.05, weight_decay=0.01, partition=rule)
    blocks = ParamBlocks.build(params, rule)
    h, stats = torch.zeros(16, dtype=F64), _stats(blocks.num_blocks)
    rate, decay = torch.tensor(0.05, dtype=F64), torch.tensor(0.01, dtype=F64)
    for t in range(3):
        grads = _grads(params, t)
        for p, g in zip(reference, grads):
            p.grad = g
        opt.step()
        block_mean_adagrad(
            params, grads, h, stats, blocks, None, lr=[rate, rate], weight_decay=[decay, decay],
            maximize=[False, False], eps=1e-10, damping=0.1, update_interval=1, mask=True, check_finite=True,
            fused=False,
        )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(params, reference))
    before = _snapshot(params, h, stats)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        _step(params, _grads(params, 3), h, stats, blocks, lr=[0.1, -0.1])
    assert _unchanged(before, params, h, stats)


@pytest.mark.parametrize(
    "dtypes", [(torch.int64, torch.int64), (torch.float32, torch.float64), (torch.bool, torch.bool)]
)
def test_preconditioner_refuses_statistics_that_are_not_one_floating_dtype(dtypes):
    """Integer statistics gave a root rounded to integers, mixed dtypes a root in whichever came first; both
    :func:`preconditioner` and :func:`normalised_correlation` now say so before computing anything."""
    from bma_gp import Partition
    from bma_gp.optim.functional import normalised_correlation, preconditioner

    partition = Partition.from_sizes(torch.tensor([2, 3]))
    U = (torch.eye(2) * 4 + 1).to(dtypes[0])
    w = torch.tensor([5, 7]).to(dtypes[1])
    stats = {"U": U, "w": w, "step": 1, "root_lam": None}
    with pytest.raises(TypeError, match="real floating-point tensors of one dtype"):
        preconditioner(stats, partition, damping=1e-4, update_interval=1)
    assert stats["root_lam"] is None  # nothing cached
    with pytest.raises(TypeError, match=r"U\.double\(\)"):
        normalised_correlation(U, w, partition)
    # the same statistics in one floating dtype give a root
    lam, B = preconditioner({**stats, "U": U.double(), "w": w.double()}, partition, damping=1e-4, update_interval=1)
    assert lam.dtype == torch.float64 and B.shape == (2, 2) and torch.isfinite(B).all()
