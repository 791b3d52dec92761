"""Bad input to the optimizers: clear errors, and nothing changed when a step is refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bma_gp.optim import SparseGradientError
from optim import BlockMeanAdagrad, FullMatrixAdagrad
from optim_reference import flat, loss_of, small_model


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -0.1}, "Invalid learning rate"),
        ({"lr": float("nan")}, "Invalid learning rate"),
        ({"eps": -1e-8}, "Invalid eps"),
        ({"damping": -0.1}, "Invalid damping"),
        ({"update_interval": 0}, "Invalid update_interval"),
        ({"update_interval": 2.0}, "Invalid update_interval"),
        ({"weight_decay": -1.0}, "Invalid weight_decay"),
        ({"partition": "block"}, "Invalid partition"),
        ({"maximize": "yes"}, "Invalid maximize"),
        ({"check_finite": 1}, "Invalid check_finite"),
    ],
)
def test_block_mean_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockMeanAdagrad(small_model().parameters(), **kwargs)


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (BlockMeanAdagrad, {"lr": np.float32(0.1), "eps": np.float64(1e-8), "weight_decay": np.float32(0.01)}),
        (BlockMeanAdagrad, {"damping": np.float32(0.25), "update_interval": np.int64(2)}),
        (FullMatrixAdagrad, {"lr": np.float64(0.1), "eps": np.float32(1e-4), "max_dim": np.int64(100)}),
    ],
)
def test_numpy_scalar_hyperparameters_are_python_numbers(cls, kwargs):
    """Like torch.optim, any real number is a hyperparameter (numpy scalars too), kept as a Python number."""
    opt = cls(small_model().parameters(), **kwargs)
    for name, value in kwargs.items():
        kept = opt.param_groups[0][name] if name in ("lr", "weight_decay") else getattr(opt, name)
        assert type(kept) is (int if name in ("update_interval", "max_dim") else float), name
        assert kept == value, name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": np.float32(-0.1)}, "Invalid learning rate value: .*finite non-negative"),
        ({"update_interval": np.int64(0)}, "Invalid update_interval value: 0; it must be a positive integer"),
        ({"update_interval": True}, "Invalid update_interval value: True"),
        ({"lr": "0.1"}, "Invalid learning rate value: '0.1'; it must be a real number"),
    ],
)
def test_bad_numbers_name_what_is_wrong(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockMeanAdagrad(small_model().parameters(), **kwargs)


def _rows(p):
    return torch.arange(p.numel()) % 2


def _group_refused_both_ways(cls, option, match):
    """``option`` in a second param group is refused by the constructor and by ``add_param_group``, which then adds
    nothing; returns the one-group optimizer and the parameters."""
    params = list(small_model().parameters())
    with pytest.raises(ValueError, match=match):
        cls([{"params": params[:2]}, {"params": params[2:], **option}])
    opt = cls(params[:2])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": params[2:], **option})
    assert len(opt.param_groups) == 1
    return opt, params


@pytest.mark.parametrize(
    "cls,option",
    [
        (BlockMeanAdagrad, {"eps": 1.0}),
        (BlockMeanAdagrad, {"damping": 100.0}),
        (BlockMeanAdagrad, {"update_interval": 7}),
        (BlockMeanAdagrad, {"partition": "row"}),
        (BlockMeanAdagrad, {"partition": _rows}),
        (BlockMeanAdagrad, {"fused": True}),
        (BlockMeanAdagrad, {"check_finite": False}),
        (FullMatrixAdagrad, {"eps": 0.5}),
        (FullMatrixAdagrad, {"max_dim": 10}),
        (FullMatrixAdagrad, {"check_finite": False}),
    ],
)
def test_optimizer_wide_hyperparameters_in_a_group_are_refused(cls, option):
    """One preconditioner spans all groups, so eps / damping / partition / ... in a group would be silently ignored
    (torch's Adagrad honours a per-group eps): refused in the constructor's groups and in add_param_group (which then
    adds nothing), unless the value is the optimizer's."""
    (key,) = option
    match = f"{key} is an optimizer-wide setting of {cls.__name__}.*Set it in the constructor"
    opt, params = _group_refused_both_ways(cls, option, match)
    own = getattr(opt, "partition_rule" if key == "partition" else key)
    opt.add_param_group({"params": params[2:], key: own})  # the optimizer's own value: accepted
    assert len(opt.param_groups) == 2


def test_block_mean_partition_of_wrong_type():
    with pytest.raises(TypeError, match="Invalid partition"):
        BlockMeanAdagrad(small_model().parameters(), partition=3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"eps": 0.0}, "Invalid eps"),
        ({"max_dim": 0}, "Invalid max_dim"),
        ({"maximize": "no"}, "Invalid maximize value: 'no'; it must be True or False"),
        ({"maximize": 1}, "Invalid maximize"),
        ({"check_finite": "yes"}, "Invalid check_finite"),
    ],
)
def test_full_matrix_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FullMatrixAdagrad(small_model().parameters(), **kwargs)


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
@pytest.mark.parametrize(
    "option,match",
    [
        ({"maximize": "no"}, "Invalid maximize value: 'no'"),
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"weight_decay": float("nan")}, "Invalid weight_decay"),
    ],
)
def test_invalid_group_options_are_refused(cls, option, match):
    """Per-group lr / weight_decay / maximize are checked like the constructor's, in the constructor's groups and in
    add_param_group (which then adds nothing); numpy numbers become Python numbers."""
    opt, params = _group_refused_both_ways(cls, option, match)
    opt.add_param_group({"params": params[2:], "lr": np.float32(0.5), "maximize": True})
    assert type(opt.param_groups[1]["lr"]) is float and opt.param_groups[1]["lr"] == 0.5


def test_full_matrix_refuses_large_models():
    big = torch.nn.Linear(300, 100)  # d = 30100
    with pytest.raises(ValueError, match=r"d = 30100 .* 3624040000 bytes"):
        FullMatrixAdagrad(big.parameters())
    opt = FullMatrixAdagrad(small_model().parameters(), max_dim=80)
    with pytest.raises(ValueError, match="d = 90 .*max_dim = 80"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(5, 6, dtype=torch.float64))]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
def test_sparse_gradient_is_an_error(cls):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = cls(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(SparseGradientError, match="sparse") as info:
        opt.step()
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_changes_nothing(cls, bad):
    model = small_model()
    opt = cls(model.parameters(), lr=0.05)
    for t in range(2):
        opt.zero_grad()
        loss_of(model, t).backward()
        opt.step()
    params_before = flat(model.parameters()).clone()
    state_before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss_of(model, 2).backward()
    list(model.parameters())[1].grad[0] = bad
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert torch.equal(flat(model.parameters()), params_before)
    state_after = opt.state_dict()
    assert state_after["global_state"]["step"] == state_before["global_state"]["step"] == 2
    for key, value in state_before["global_state"].items():
        if torch.is_tensor(value):
            assert torch.equal(value, state_after["global_state"][key]), key
    for idx, st in state_before["state"].items():
        for key, value in st.items():
            assert torch.equal(value, state_after["state"][idx][key])


@pytest.mark.parametrize("partition", ["tensor", "row"])
def test_a_gradient_made_non_finite_by_the_parameters_says_so(partition):
    """With ``damping=0`` and ``check_finite=False`` the first step makes the parameters nan (F is singular after one
    step; with ``check_finite=True`` that step is refused, tests/test_optim_trial_fixes.py); the next step's error
    told only to check the loss for overflow or to lower the learning rate, which cannot help."""
    model = torch.nn.Linear(4, 2)
    opt = BlockMeanAdagrad(model.parameters(), lr=0.1, damping=0.0, partition=partition, check_finite=False)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    model(x).pow(2).sum().backward()
    opt.step()
    assert not all(bool(torch.isfinite(p).all()) for p in model.parameters())
    opt.check_finite = True
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    with pytest.raises(ValueError, match=r"non-finite gradient.*parameters are already inf or nan.*damping > 0"):
        opt.step()


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
def test_a_non_finite_gradient_of_finite_parameters_names_only_the_loss(cls):
    """The sentence about non-finite parameters appears only when some parameter is; and the damping advice only for
    the optimizer that has a damping."""
    model = small_model()
    opt = cls(model.parameters(), lr=0.05)
    loss_of(model, 0).backward()
    list(model.parameters())[0].grad.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite") as info:
        opt.step()
    assert "already inf or nan" not in str(info.value)
    with torch.no_grad():
        list(model.parameters())[1].view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match="already inf or nan") as info:
        opt.step()
    assert ("damping" in str(info.value)) == (cls is BlockMeanAdagrad)


def test_non_finite_first_step_leaves_state_empty():
    model = small_model()
    opt = BlockMeanAdagrad(model.parameters())
    loss_of(model, 0).backward()
    list(model.parameters())[0].grad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert len(opt.state) == 0 and opt.global_state == {}


def test_check_finite_false_skips_the_check():
    model = small_model()
    opt = BlockMeanAdagrad(model.parameters(), check_finite=False)
    loss_of(model, 0).backward()
    list(model.parameters())[1].grad[0] = float("nan")
    try:
        opt.step()  # no ValueError: the nan reaches the state
    except torch.linalg.LinAlgError:
        pass  # on CPU the eigendecomposition of the nan k x k core matrix refuses
    assert torch.isnan(opt.state[list(model.parameters())[1]]["sum"]).any()


@pytest.mark.parametrize(
    "rule,match",
    [
        (lambda p: torch.zeros(3, dtype=torch.long), "one id per entry"),
        (lambda p: torch.zeros(p.numel()), "dtype"),
        (lambda p: 2 * torch.arange(p.numel()), "every id used"),
        (lambda p: torch.arange(p.numel()) - 1, "every id used"),
    ],
)
def test_bad_partition_callable(rule, match):
    model = small_model()
    opt = BlockMeanAdagrad(model.parameters(), partition=rule)
    loss_of(model, 0).backward()
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert flat(model.parameters()).equal(flat(small_model().parameters()))


def test_non_float_parameter_is_refused():
    opt = BlockMeanAdagrad([torch.zeros(3, dtype=torch.float64, requires_grad=True)])
    opt.param_groups[0]["params"].append(torch.zeros(2, dtype=torch.long))
    opt.param_groups[0]["params"][0].grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="floating-point"):
        opt.step()


@pytest.mark.parametrize("update_interval", [1, 3])
def test_non_finite_gradient_is_refused_with_a_callable_partition_and_a_tensor_without_grad(update_interval):
    """A callable partition whose tensors with a gradient are one block each, while a tensor without a gradient this
    step has several blocks: the step is the scattered one, which relies on the caller's finiteness check (this
    check was skipped, as if the one-block-per-tensor CPU step, which checks itself, were taking the step)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))  # two blocks
    b = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))  # one block

    def rule(p):
        return torch.arange(p.numel()) % 2 if p.dim() == 2 else torch.zeros(p.numel(), dtype=torch.long)

    opt = BlockMeanAdagrad([w, b], lr=0.1, partition=rule, update_interval=update_interval)
    w.grad, b.grad = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    opt.step()
    w.grad, b.grad = None, torch.tensor([1.0, float("nan"), 0.0, 2.0], dtype=torch.float64)
    params_before = [w.detach().clone(), b.detach().clone()]
    state_before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert torch.equal(w, params_before[0]) and torch.equal(b, params_before[1])
    state_after = opt.state_dict()
    assert state_after["global_state"]["step"] == state_before["global_state"]["step"] == 1
    assert state_before["global_state"]["root_lam"] is not None  # the cached root is compared too
    for key, value in state_before["global_state"].items():
        if torch.is_tensor(value):
            assert torch.equal(value, state_after["global_state"][key]), key
        else:
            assert value == state_after["global_state"][key], key
    for idx, st in state_before["state"].items():
        for key, value in st.items():
            assert torch.equal(value, state_after["state"][idx][key])


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda: torch.nn.Parameter(torch.randn(2, dtype=torch.complex64)), "real floating-point.*complex64"),
        (lambda: torch.zeros(3, dtype=torch.long), "real floating-point.*int64"),
        (lambda: torch.nn.Parameter(torch.randn(3, device="meta")), "meta device.*Materialize the model"),
    ],
)
def test_unusable_parameters_are_refused_when_added(cls, bad, match):
    """A parameter the optimizer cannot step is refused by the constructor and by add_param_group, which then adds
    nothing: the optimizer keeps stepping (it used to be refused only at every later step())."""
    with pytest.raises(ValueError, match=match):
        cls([bad()])
    model = small_model()
    opt = cls(model.parameters(), lr=0.05)
    loss_of(model, 0).backward()
    opt.step()
    groups_before = [dict(g, params=list(g["params"])) for g in opt.param_groups]
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [bad()]})
    assert len(opt.param_groups) == len(groups_before) == 1
    assert opt.param_groups[0]["params"] == groups_before[0]["params"]
    before = flat(model.parameters()).clone()
    opt.zero_grad()
    loss_of(model, 1).backward()
    opt.step()  # still usable
    assert opt.global_state["step"] == 2 and not torch.equal(flat(model.parameters()), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
@pytest.mark.cuda
def test_a_parameter_on_another_device_is_refused_when_added():
    opt = BlockMeanAdagrad([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match="one device"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, device="cuda"))]})
    assert len(opt.param_groups) == 1
