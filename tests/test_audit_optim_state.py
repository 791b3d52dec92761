"""Audit of the optimizers' state dicts: the optimizer-wide hyperparameters travel with the state (as torch.optim's
param groups do), and a state saved under a partition whose blocks hold other entries is refused."""

from __future__ import annotations

import copy
import hashlib
import io
import pickle

import pytest
import torch

from bma_gp.optim import BlockMeanAdagrad, FullMatrixAdagrad
from bma_gp.optim.param_blocks import ParamBlocks


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64)),
    ]


def _steps(opt, params, start: int, count: int) -> None:
    for t in range(start, start + count):
        gen = torch.Generator().manual_seed(100 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def _source(**kw):
    params = _params()
    opt = BlockMeanAdagrad(params, lr=0.05, eps=1e-6, damping=0.5, update_interval=3, **kw)
    _steps(opt, params, 0, 4)  # the saved root is stale (computed at step 4 of update_interval=3)
    return params, opt


def _reload(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------------- hyperparameters


def test_load_state_dict_restores_eps_damping_and_update_interval_and_continues_bit_for_bit():
    """eps, damping and update_interval were not in the state dict: after load_state_dict the loading
    optimizer's constructor values won, and the resumed run took other steps than the saved one."""
    params, opt = _source()
    sd = _reload(opt.state_dict())
    assert sd["hyperparameters"] == {"eps": 1e-6, "damping": 0.5, "update_interval": 3}
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = BlockMeanAdagrad(params2, lr=0.05)  # eps=1e-10, damping=0.1, update_interval=1
    opt2.load_state_dict(sd)
    assert (opt2.eps, opt2.damping, opt2.update_interval) == (1e-6, 0.5, 3)
    assert type(opt2.update_interval) is int
    _steps(opt, params, 4, 4)
    _steps(opt2, params2, 4, 4)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


def test_full_matrix_adagrad_restores_eps_but_not_max_dim():
    params = _params()
    opt = FullMatrixAdagrad(params, eps=1e-3, max_dim=100)
    _steps(opt, params, 0, 2)
    opt2 = FullMatrixAdagrad(_params(), max_dim=50)
    opt2.load_state_dict(_reload(opt.state_dict()))
    assert opt2.eps == 1e-3 and opt2.max_dim == 50


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("eps", 0.0, "Invalid eps value: 0.0"),
        ("eps", float("nan"), "Invalid eps value: nan"),
        ("damping", -1.0, "Invalid damping value: -1.0"),
        ("update_interval", 0, "Invalid update_interval value: 0"),
        ("update_interval", 2.5, "Invalid update_interval value: 2.5"),
        ("eps", "1e-6", "Invalid eps value: '1e-6'"),
    ],
)
def test_an_invalid_saved_hyperparameter_is_refused_and_nothing_changes(key, value, match):
    _, opt = _source()
    sd = opt.state_dict()
    sd["hyperparameters"] = {**sd["hyperparameters"], key: value}
    opt2 = BlockMeanAdagrad(_params(), lr=0.05, eps=1e-8, damping=0.2, update_interval=2)
    before = opt2.param_groups[0]["lr"]
    with pytest.raises(ValueError, match=f"{match}.*Nothing was loaded.*hyperparameters'\\]\\['{key}'\\]"):
        opt2.load_state_dict(sd)
    # all or nothing: neither the valid hyperparameters of the dict nor the state were taken
    assert (opt2.eps, opt2.damping, opt2.update_interval) == (1e-8, 0.2, 2)
    assert opt2.global_state == {} and len(opt2.state) == 0 and opt2.param_groups[0]["lr"] == before


@pytest.mark.parametrize("entry", [{"eps": 1e-6, "lr": 0.1}, [1e-6, 0.5, 3]])
def test_a_hyperparameters_entry_of_other_keys_or_type_is_refused(entry):
    _, opt = _source()
    sd = opt.state_dict()
    sd["hyperparameters"] = entry
    opt2 = BlockMeanAdagrad(_params())
    with pytest.raises(ValueError, match=r"'hyperparameters' entry must be a dict with some of the keys"):
        opt2.load_state_dict(sd)
    assert opt2.eps == 1e-10 and opt2.global_state == {}


def test_a_state_dict_saved_without_the_new_entries_still_loads_with_the_constructors_values():
    params, opt = _source()
    sd = opt.state_dict()
    del sd["hyperparameters"], sd["partition_fingerprint"]
    opt2 = BlockMeanAdagrad([torch.nn.Parameter(p.detach().clone()) for p in params], eps=1e-8, damping=0.2)
    opt2.load_state_dict(sd)
    assert (opt2.eps, opt2.damping, opt2.update_interval) == (1e-8, 0.2, 1)
    assert torch.equal(opt2.global_state["U"], opt.global_state["U"])
    # a partial entry restores what it has
    sd = opt.state_dict()
    sd["hyperparameters"] = {"damping": 0.25}
    opt3 = BlockMeanAdagrad(_params(), eps=1e-8)
    opt3.load_state_dict(sd)
    assert (opt3.eps, opt3.damping, opt3.update_interval) == (1e-8, 0.25, 1)


def test_a_state_dict_saved_before_the_first_step_carries_the_hyperparameters():
    opt = BlockMeanAdagrad(_params(), eps=1e-5, damping=0.3, update_interval=4)
    opt2 = BlockMeanAdagrad(_params())
    opt2.load_state_dict(opt.state_dict())
    assert (opt2.eps, opt2.damping, opt2.update_interval) == (1e-5, 0.3, 4)


def test_fused_and_check_finite_stay_the_loading_optimizers():
    """Documented: implementation switches (same numbers to rounding) are not restored."""
    _, opt = _source(check_finite=False)
    opt2 = BlockMeanAdagrad(_params(), check_finite=True, fused=True)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.check_finite is True and opt2.fused is True and opt2.partition_rule == "tensor"


def test_deepcopy_and_pickle_keep_the_hyperparameters_and_the_state_dict():
    params, opt = _source(partition="row")
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (clone.eps, clone.damping, clone.update_interval, clone.partition_rule) == (1e-6, 0.5, 3, "row")
        sd, sd_clone = opt.state_dict(), clone.state_dict()
        assert sd_clone["hyperparameters"] == sd["hyperparameters"]
        assert sd_clone["partition_fingerprint"] == sd["partition_fingerprint"]
        assert sd_clone["block_sizes"] == sd["block_sizes"]


def _echoing_source():
    """An optimizer whose param group repeats optimizer-wide settings at its values (the torch habit of per-group
    ``eps``), after a step."""
    params = _params()
    opt = BlockMeanAdagrad([{"params": params, "eps": 1e-6, "fused": False}], lr=0.05, eps=1e-6, damping=0.5)
    _steps(opt, params, 0, 2)
    return opt


def test_param_groups_repeating_a_setting_match_the_optimizer_after_load():
    """A loaded group kept its repeated eps and fused while the optimizer ran with others: param_groups said
    fused=False for a fused optimizer, and an older state dict's groups said eps=1e-6 while the step used 1e-10."""
    sd = _echoing_source().state_dict()
    opt = BlockMeanAdagrad(_params(), fused=True)
    opt.load_state_dict(sd)
    assert opt.eps == 1e-6 and opt.param_groups[0]["eps"] == 1e-6
    assert opt.fused is True and opt.param_groups[0]["fused"] is True
    # a state dict saved before "hyperparameters": the groups' repeated eps is the saved run's
    del sd["hyperparameters"]
    old = BlockMeanAdagrad(_params(), damping=0.2)
    old.load_state_dict(sd)
    assert (old.eps, old.damping) == (1e-6, 0.2) and old.param_groups[0]["eps"] == 1e-6


def test_a_group_repeating_a_setting_at_another_value_than_the_entry_is_refused():
    """An edited group eps (torch's way of changing it) would have been silently ignored."""
    sd = _echoing_source().state_dict()
    sd["param_groups"][0]["eps"] = 1e-3
    opt = BlockMeanAdagrad(_params())
    with pytest.raises(ValueError, match=r"optimizer-wide eps .* twice: .*\['param_groups'\]\[0\]\['eps'\] = 0.001"):
        opt.load_state_dict(sd)
    assert opt.eps == 1e-10 and opt.global_state == {} and "eps" not in opt.param_groups[0]
    del sd["hyperparameters"]
    sd["param_groups"][0]["eps"] = -1.0
    with pytest.raises(ValueError, match=r"Invalid eps value: -1.0.*correct state_dict\['param_groups'\]\[0\]"):
        opt.load_state_dict(sd)
    assert opt.eps == 1e-10 and opt.global_state == {}


# ---------------------------------------------------------------------- the partition's fingerprint


def _alternating(p):  # two blocks of the even and the odd entries
    return torch.arange(p.numel()) % 2


def _halves(p):  # two blocks of the same sizes: the first and the second half
    return (torch.arange(p.numel()) >= p.numel() // 2).long()


def test_a_state_of_blocks_of_the_same_sizes_over_other_entries_is_refused_at_load():
    """Only the block sizes were checked: a state saved under one callable loaded silently into another whose blocks
    have the same sizes, and its U and w were read as the statistics of other entries."""
    params = _params()
    source = BlockMeanAdagrad(params, partition=_alternating)
    _steps(source, params, 0, 2)
    sd = _reload(source.state_dict())
    assert sd["block_sizes"] == [6, 6, 2, 2] and len(sd["partition_fingerprint"]) == 32
    target = BlockMeanAdagrad(_params(), partition=_halves, eps=1e-7)
    with pytest.raises(ValueError, match=r"same sizes, \[6, 6, 2, 2\].*_halves.*hold other entries.*Nothing was"):
        target.load_state_dict(sd)
    assert target.global_state == {} and len(target.state) == 0 and target.eps == 1e-7
    same = BlockMeanAdagrad(_params(), partition=_alternating)
    same.load_state_dict(sd)
    assert torch.equal(same.global_state["U"], source.global_state["U"])


def test_blocks_numbered_in_another_order_are_refused():
    params = _params()
    source = BlockMeanAdagrad(params, partition=_halves)
    _steps(source, params, 0, 1)
    target = BlockMeanAdagrad(_params(), partition=lambda p: 1 - _halves(p))  # the same blocks, swapped ids
    with pytest.raises(ValueError, match="hold other entries"):
        target.load_state_dict(source.state_dict())


def test_the_same_blocks_from_another_rule_load():
    """The fingerprint reads the blocks, not the rule: a callable that builds the rows loads a "row" state."""
    params = _params()
    source = BlockMeanAdagrad(params, partition="row")
    _steps(source, params, 0, 2)

    def rows(p):
        return torch.arange(p.shape[0]).repeat_interleave(p.shape[1]) if p.dim() == 2 else torch.zeros_like(p).long()

    target = BlockMeanAdagrad(_params(), partition=rows)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.global_state["w"], source.global_state["w"])


def test_a_state_saved_between_add_param_group_and_the_next_step_carries_the_first_groups_fingerprint():
    params = _params()
    source = BlockMeanAdagrad(params[:1], partition=_alternating)
    _steps(source, params[:1], 0, 2)
    source.add_param_group({"params": params[1:]})
    sd = source.state_dict()  # U and w still of the first group's 2 blocks
    assert sd["block_sizes"] == [6, 6]
    fresh = _params()
    target = BlockMeanAdagrad(fresh[:1], partition=_alternating)
    target.add_param_group({"params": fresh[1:]})
    target.load_state_dict(sd)
    other = _params()
    refused = BlockMeanAdagrad(other[:1], partition=_halves)
    refused.add_param_group({"params": other[1:]})
    with pytest.raises(ValueError, match="hold other entries"):
        refused.load_state_dict(sd)


def test_the_fingerprint_is_not_computed_at_steps(monkeypatch):
    """The hash costs nothing per step: computed when a state dict is saved (or loaded), once per partition."""
    hashes = []
    blake2b = hashlib.blake2b

    def counted(*args, **kwargs):
        hashes.append(1)
        return blake2b(*args, **kwargs)

    monkeypatch.setattr(hashlib, "blake2b", counted)
    params = _params()
    opt = BlockMeanAdagrad(params, partition=_alternating)
    _steps(opt, params, 0, 3)
    assert hashes == []
    first = opt.state_dict()["partition_fingerprint"]
    _steps(opt, params, 3, 2)
    assert opt.state_dict()["partition_fingerprint"] == first
    assert len(hashes) == 1


def test_a_contiguous_and_a_scattered_tensor_hash_by_their_labels():
    """A contiguous segment is hashed by its sizes, a scattered one by its labels: one tensor's blocks of a scattered
    partition hash as those of a contiguous one when they hold the same entries."""
    params = _params()

    def mixed(p):  # the matrix scattered, the vector in one block
        return _alternating(p) if p.dim() == 2 else torch.zeros(p.numel(), dtype=torch.long)

    a = ParamBlocks.build(params, mixed)
    b = ParamBlocks.build(params, _alternating)
    c = ParamBlocks.build(params, "tensor")
    assert a.label_fingerprint(2) == b.label_fingerprint(2)  # the matrix's blocks, the same in both
    assert a.label_fingerprint(3) != b.label_fingerprint(4)
    assert a.label_fingerprint(3) is not None and a.label_fingerprint(1) is None  # not the blocks of whole tensors
    assert c.label_fingerprint(1) != a.label_fingerprint(2)
