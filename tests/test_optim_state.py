"""state_dict round trips, dtypes and devices of BlockMeanAdagrad and FullMatrixAdagrad."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from optim import BlockMeanAdagrad, FullMatrixAdagrad
from optim_reference import flat, loss_of, small_batch, small_model


def train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, t).backward()
        opt.step()


def make(kind, model, **kw):
    if kind == "block":
        return BlockMeanAdagrad(model.parameters(), lr=0.05, update_interval=3, **kw)
    return FullMatrixAdagrad(model.parameters(), lr=0.05, **kw)


@pytest.mark.parametrize("kind,rule", [("block", "tensor"), ("block", "row"), ("full", None)])
def test_round_trip_through_torch_save_continues_bit_for_bit(kind, rule):
    kw = {"partition": rule} if rule else {}
    model = small_model()
    opt = make(kind, model, **kw)
    train(model, opt, 5)  # with update_interval=3 the saved root is stale (computed at step 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 5, start=5)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = small_model(seed=7)
    model2.load_state_dict(ckpt["model"])
    opt2 = make(kind, model2, **kw)
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, 5, start=5)
    assert torch.equal(flat(model.parameters()), flat(model2.parameters()))
    for key, value in opt.global_state.items():
        other = opt2.global_state[key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
    if kind == "block":
        for p, p2 in zip(model.parameters(), model2.parameters()):
            assert torch.equal(opt.state[p]["sum"], opt2.state[p2]["sum"])


def test_in_memory_load_does_not_alias_the_source():
    model = small_model()
    opt = make("block", model)
    train(model, opt, 3)
    model2 = copy.deepcopy(model)
    opt2 = make("block", model2)
    opt2.load_state_dict(opt.state_dict())
    U, h = opt.global_state["U"].clone(), flat(opt.state[p]["sum"] for p in model.parameters())
    train(model2, opt2, 2, start=3)
    assert torch.equal(opt.global_state["U"], U)
    assert torch.equal(flat(opt.state[p]["sum"] for p in model.parameters()), h)
    assert not torch.equal(opt2.global_state["U"], U)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_keep_float32_statistics(dtype):
    model = small_model(dtype=torch.float32).to(dtype)
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05, partition="row")
    for t in range(3):
        opt.zero_grad()
        x, y = small_batch(t, torch.float32)
        (model(x.to(dtype)).float() - y).pow(2).mean().backward()
        opt.step()
    assert opt.global_state["U"].dtype == torch.float32
    assert all(opt.state[p]["sum"].dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == dtype for p in model.parameters())
    sd = opt.state_dict()
    opt2 = BlockMeanAdagrad(copy.deepcopy(model).parameters(), lr=0.05, partition="row")
    opt2.load_state_dict(sd)  # torch alone would cast the float32 state to the parameters' dtype
    assert opt2.global_state["U"].dtype == torch.float32
    assert torch.equal(opt2.global_state["U"], opt.global_state["U"])
    p2 = opt2.param_groups[0]["params"][0]
    assert opt2.state[p2]["sum"].dtype == torch.float32
    assert torch.equal(opt2.state[p2]["sum"], opt.state[opt.param_groups[0]["params"][0]]["sum"])


def test_float32_state_loads_into_float64_model():
    model = small_model(dtype=torch.float32)
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05)
    train(model, opt, 3)
    model64 = copy.deepcopy(model).double()
    opt64 = BlockMeanAdagrad(model64.parameters(), lr=0.05)
    opt64.load_state_dict(opt.state_dict())
    assert opt64.global_state["U"].dtype == torch.float64
    assert torch.equal(opt64.global_state["U"], opt.global_state["U"].double())
    train(model, opt, 3, start=3)
    train(model64, opt64, 3, start=3)
    torch.testing.assert_close(flat(model64.parameters()).float(), flat(model.parameters()), rtol=1e-4, atol=1e-5)


def test_float64_parameters_get_float64_state():
    model = small_model(dtype=torch.float64)
    opt = BlockMeanAdagrad(model.parameters())
    train(model, opt, 1)
    assert opt.global_state["U"].dtype == torch.float64
    assert opt.global_state["root_B"].dtype == torch.float64


def snapshot(opt):
    """A deep copy of everything a load may change: the global state and the per-parameter state."""
    return copy.deepcopy(opt.global_state), {p: copy.deepcopy(dict(st)) for p, st in opt.state.items()}


def assert_unchanged(opt, before):
    global_state, state = before
    assert opt.global_state.keys() == global_state.keys()
    for key, value in global_state.items():
        other = opt.global_state[key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
    assert set(opt.state) == set(state)
    for p, st in state.items():
        assert opt.state[p].keys() == st.keys() and all(torch.equal(v, opt.state[p][k]) for k, v in st.items())


@pytest.mark.parametrize("saved,loaded", [("row", "tensor"), ("tensor", "row")])
def test_load_into_other_partition_is_refused_at_load(saved, loaded):
    """The global state of another partition (the same parameters) is refused by load_state_dict, naming both sizes,
    with nothing changed: "tensor" into "row" was zero-padded as if groups had been added (a row inheriting the
    statistics of a whole tensor), "row" into "tensor" loaded and then made every step raise."""
    model = small_model()
    opt = BlockMeanAdagrad(model.parameters(), partition=saved)
    train(model, opt, 2)
    opt2 = BlockMeanAdagrad(model.parameters(), partition=loaded)
    train(model, opt2, 1)
    before = snapshot(opt2)
    k_saved, k = opt.partition.num_blocks, opt2.partition.num_blocks
    match = rf"U of shape \({k_saved}, {k_saved}\).*form k = {k} blocks under partition='{loaded}'.*another partition"
    with pytest.raises(ValueError, match=match):
        opt2.load_state_dict(opt.state_dict())
    assert_unchanged(opt2, before)
    train(model, opt2, 1, start=1)  # still steps
    assert opt2.global_state["step"] == 2


def test_full_matrix_load_of_other_sizes_is_refused_at_load():
    """FullMatrixAdagrad keeps no per-parameter state, so only H tells the sizes: an 8 x 8 H was zero-padded into a
    10-entry model (the coordinates on the wrong entries), and a 10 x 10 one made every later step raise."""
    small, big = torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)  # the same number of tensors, d = 8 and 10
    for src, dst, d_saved, d in ((small, big, 8, 10), (big, small, 10, 8)):
        opt = FullMatrixAdagrad(src.parameters(), lr=0.1)
        src(torch.randn(5, src.in_features)).sum().backward()
        opt.step()
        opt2 = FullMatrixAdagrad(dst.parameters(), lr=0.1)
        dst(torch.randn(5, dst.in_features)).sum().backward()
        opt2.step()
        before = snapshot(opt2)
        with pytest.raises(ValueError, match=rf"H has shape \({d_saved}, {d_saved}\).*d = {d} entries"):
            opt2.load_state_dict(opt.state_dict())
        assert_unchanged(opt2, before)


@pytest.mark.parametrize("kind,rule", [("block", "tensor"), ("block", "row"), ("block", "callable"), ("full", None)])
def test_a_state_saved_between_add_param_group_and_the_next_step_loads(kind, rule):
    """The one legitimate smaller global state: saved after add_param_group and before the step that grows it. It
    loads into an optimizer built with all the groups, and the run continues bit for bit."""
    kw = {} if rule is None else {"partition": (lambda p: torch.arange(p.numel()) % 2) if rule == "callable" else rule}
    model, model2 = small_model(), small_model()
    ps, ps2 = list(model.parameters()), list(model2.parameters())
    cls = BlockMeanAdagrad if kind == "block" else FullMatrixAdagrad
    opt = cls([{"params": ps[:2]}], lr=0.05, **kw)
    train(model, opt, 2)
    opt.add_param_group({"params": ps[2:], "lr": 0.02})
    sd = copy.deepcopy(opt.state_dict())
    with torch.no_grad():
        for p, p2 in zip(ps, ps2):
            p2.copy_(p)
    opt2 = cls([{"params": ps2[:2]}, {"params": ps2[2:], "lr": 0.02}], lr=0.05, **kw)
    opt2.load_state_dict(sd)
    train(model, opt, 3, start=2)
    train(model2, opt2, 3, start=2)
    assert torch.equal(flat(ps), flat(ps2))


def test_foreign_state_dict_is_refused():
    model = small_model()
    adagrad = torch.optim.Adagrad(model.parameters())
    with pytest.raises(ValueError, match="global_state"):
        BlockMeanAdagrad(model.parameters()).load_state_dict(adagrad.state_dict())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["block", "full"])
def test_cpu_state_continues_on_cuda(kind):
    model = small_model()
    opt = make(kind, model)
    train(model, opt, 4)
    gpu_model = copy.deepcopy(model).cuda()
    gpu_opt = make(kind, gpu_model)
    gpu_opt.load_state_dict(opt.state_dict())
    train(model, opt, 3, start=4)
    for t in range(4, 7):
        gpu_opt.zero_grad()
        x, y = small_batch(t)
        (gpu_model(x.cuda()) - y.cuda()).pow(2).mean().backward()
        gpu_opt.step()
    assert all(v.is_cuda for v in gpu_opt.global_state.values() if torch.is_tensor(v))
    torch.testing.assert_close(flat(gpu_model.parameters()).cpu(), flat(model.parameters()), rtol=1e-9, atol=1e-11)
    # and back: the state moves with the parameters when the model moves (lazy layout)
    gpu_model.cpu()
    gpu_opt.zero_grad()
    loss_of(gpu_model, 8).backward()
    gpu_opt.step()
    assert not any(v.is_cuda for v in gpu_opt.global_state.values() if torch.is_tensor(v))


@pytest.mark.parametrize("rule", ["tensor", "row"])
def test_round_trip_keeps_entries_without_gradient_still(rule):
    # h = 0 entries (dead units) are masked by a list the eager step keeps on CPU; a loaded optimizer
    # finds them again from h and continues bit for bit, the dead entries unmoved
    def dead_entries(model):
        for p in model.parameters():
            mask = torch.ones_like(p).reshape(-1)
            mask[::3] = 0
            mask = mask.view(p.shape)
            p.register_hook(lambda g, mask=mask: g * mask)

    model = small_model()
    dead_entries(model)
    start = flat(model.parameters()).clone()
    opt = make("block", model, partition=rule)
    train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 3, start=3)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = small_model(seed=7)
    dead_entries(model2)
    model2.load_state_dict(ckpt["model"])
    opt2 = make("block", model2, partition=rule)
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, 3, start=3)
    assert torch.equal(flat(model.parameters()), flat(model2.parameters()))
    dead = torch.cat([torch.arange(p.numel()) % 3 == 0 for p in model.parameters()])
    assert torch.equal(flat(model2.parameters())[dead], start[dead])
    assert not torch.equal(flat(model2.parameters())[~dead], start[~dead])
    assert opt2._h_has_zero


@pytest.mark.parametrize("kind", ["block", "full"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_continues_the_same_run(kind, how):
    """copy.deepcopy and pickle keep the hyperparameters (also the non-default check_finite) and the global state."""
    import pickle

    model = small_model()
    opt = make(kind, model, check_finite=False)
    train(model, opt, 4)
    clone = copy.deepcopy if how == "deepcopy" else (lambda x: pickle.loads(pickle.dumps(x)))
    model2, opt2 = clone((model, opt))
    assert opt2.check_finite is False and opt2.eps == opt.eps
    for key, value in opt.global_state.items():
        other = opt2.global_state[key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
    train(model, opt, 4, start=4)
    train(model2, opt2, 4, start=4)
    assert torch.equal(flat(model.parameters()), flat(model2.parameters()))


def test_a_state_dict_of_other_shapes_is_refused_at_load():
    """Per-parameter state of other sizes (the same number of tensors) is named at load, before anything changes,
    not as an internal error at the next step."""
    kind = "block"
    model = small_model()
    opt = make(kind, model)
    train(model, opt, 1)
    other = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)).double()  # 4 tensors as well
    assert len(list(other.parameters())) == len(list(model.parameters()))
    opt2 = make(kind, other)
    with pytest.raises(ValueError, match="does not fit these parameters"):
        opt2.load_state_dict(opt.state_dict())
    assert not opt2.state and not opt2.global_state  # nothing loaded


@pytest.mark.parametrize("width", [10, 200])  # the host form; the ratio form (40,000 entries)
@pytest.mark.parametrize("loop", [False, True])
def test_entries_without_gradient_stay_put_after_h_is_reset_in_place(width, loop, monkeypatch):
    """A reset of the accumulator in place (state[p]["sum"].zero_(), a warm restart) makes entries whose gradient
    is 0 have h == 0 again: they must not move, as before their first gradient."""
    from bma_gp.optim import functional

    if loop:
        monkeypatch.setattr(functional, "_tensor_blocks_apply", lambda *a: False)
    torch.manual_seed(0)
    layer = torch.nn.Linear(width, width, dtype=torch.float64)
    opt = BlockMeanAdagrad(layer.parameters(), lr=0.1)
    for _ in range(2):
        for p in layer.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    for p in layer.parameters():
        opt.state[p]["sum"].zero_()
        p.grad = torch.randn_like(p)
        p.grad.view(-1)[::2] = 0.0  # these entries now have h == 0 after the step
    before = [p.detach().clone() for p in layer.parameters()]
    opt.step()
    for p, p0 in zip(layer.parameters(), before):
        still = opt.state[p]["sum"].view(-1) == 0
        assert still.sum() == (p.numel() + 1) // 2
        assert torch.equal(p.view(-1)[still], p0.view(-1)[still])
        assert not torch.equal(p, p0)


def test_a_tensor_weight_decay_in_one_group_is_the_float_one():
    runs = []
    for wd in (0.1, torch.tensor(0.1, dtype=torch.float64)):
        model = small_model()
        ps = list(model.parameters())
        opt = BlockMeanAdagrad([dict(params=ps[:2], weight_decay=wd), dict(params=ps[2:])], lr=0.05)
        train(model, opt, 3)
        runs.append(flat(model.parameters()))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_the_ratio_form_resumes_bit_for_bit(how):
    """Tensors above HOST_MAX_NUMEL take the ratio form, whose power-of-four scale comes from a bound of h kept
    between steps: the state carries it ("ratio_form"), so a resumed run picks the same scales (it parted by about
    one ulp when the bound was rebuilt from h)."""

    def make_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(200, 200), torch.nn.Tanh(), torch.nn.Linear(200, 3))

    def grads(model, t):
        x = torch.randn(16, 200, generator=torch.Generator().manual_seed(t))
        model.zero_grad()
        model(x).square().mean().backward()

    a, b = make_model(), make_model()
    opt_a, opt_b = (BlockMeanAdagrad(m.parameters(), lr=0.05) for m in (a, b))
    for t in range(8):
        if t == 4:
            if how == "torch.save":
                buf = io.BytesIO()
                torch.save(opt_b.state_dict(), buf)
                assert "ratio_form" in opt_b.state_dict()
                buf.seek(0)
                opt_b = BlockMeanAdagrad(b.parameters(), lr=0.05)
                opt_b.load_state_dict(torch.load(buf, weights_only=True))
            else:
                b, opt_b = copy.deepcopy((b, opt_b))
        grads(a, t)
        grads(b, t)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("rule", ["tensor", "row", "callable"])
def test_a_replaced_sum_is_honoured_like_a_reset_in_place(rule):
    """optimizer.state[p]["sum"] = new tensor (which torch.optim.Adagrad's step reads) is used by the next step, as a
    reset in place already was; it used to be ignored (the step kept its flat buffer) while state_dict() saved the
    new tensor, so a run resumed from the checkpoint parted from the live one."""
    kw = {"partition": (lambda p: torch.arange(p.numel()) % 2) if rule == "callable" else rule}
    runs = []
    for how in ("in place", "replaced", "replaced, then saved and loaded"):
        model = small_model()
        opt = make("block", model, **kw)
        train(model, opt, 4)
        for i, p in enumerate(model.parameters()):
            if i % 2 == 0:
                if how == "in place":
                    opt.state[p]["sum"].zero_()
                else:
                    opt.state[p]["sum"] = torch.zeros_like(p)
        if how.endswith("loaded"):
            sd = copy.deepcopy(opt.state_dict())
            opt = make("block", model, **kw)
            opt.load_state_dict(sd)
        train(model, opt, 3, start=4)
        runs.append((flat(model.parameters()), flat(opt.state[p]["sum"] for p in model.parameters())))
    for params, h in runs[1:]:
        assert torch.equal(params, runs[0][0]) and torch.equal(h, runs[0][1])


def test_a_cleared_state_restarts_the_optimizer():
    """optimizer.state = defaultdict(dict), the common reset idiom, restarts the optimizer: the next steps are those
    of a new optimizer (the global state restarts too), and state_dict() saves what the step uses."""
    from collections import defaultdict

    model, fresh_model = small_model(), small_model()
    opt = make("block", model)
    train(model, opt, 4)
    with torch.no_grad():
        for p, q in zip(model.parameters(), fresh_model.parameters()):
            q.copy_(p)
    opt.state = defaultdict(dict)
    fresh = make("block", fresh_model)
    train(model, opt, 3, start=4)
    train(fresh_model, fresh, 3, start=4)
    assert torch.equal(flat(model.parameters()), flat(fresh_model.parameters()))
    assert opt.global_state["step"] == 3
    sd = opt.state_dict()
    assert all(torch.equal(sd["state"][i]["sum"], opt.state[p]["sum"]) for i, p in enumerate(model.parameters()))


def test_a_refused_step_after_a_replaced_sum_changes_nothing():
    model = small_model()
    opt = make("block", model)
    train(model, opt, 2)
    p0 = next(model.parameters())
    mine = torch.zeros_like(p0)
    opt.state[p0]["sum"] = mine
    before, params = snapshot(opt), flat(model.parameters()).clone()
    opt.zero_grad()
    loss_of(model, 2).backward()
    p0.grad.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert opt.state[p0]["sum"] is mine
    assert_unchanged(opt, before)
    assert torch.equal(flat(model.parameters()), params)
    opt.state[p0]["sum"] = torch.zeros(3)
    p0.grad.view(-1)[0] = 0.0
    with pytest.raises(ValueError, match=r"state\[p\]\['sum'\] of a parameter of shape .* holds 3 entries"):
        opt.step()
    assert torch.equal(flat(model.parameters()), params)
