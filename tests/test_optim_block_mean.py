"""BlockMeanAdagrad against its dense reference and against torch.optim.Adagrad."""

from __future__ import annotations

import pytest
import torch

from bma_gp import BlockMeanLinearOperator
from optim import BlockMeanAdagrad
from optim_reference import (
    DenseBlockMeanAdagrad,
    flat,
    fused_at_any_size,
    loss_of,
    reference_labels,
    set_flat,
    small_batch,
    small_model,
)


@pytest.fixture(autouse=True)
def _fused_at_any_size():
    with fused_at_any_size():
        yield


def alternate(p: torch.Tensor) -> torch.Tensor:
    """A scattered partition: even and odd flat entries of every tensor."""
    return torch.arange(p.numel()) % 2


def two_groups(model, lr0=0.05, lr1=0.02, wd1=0.0):
    conv, lin = list(model[0].parameters()), list(model[3].parameters())
    return [{"params": conv, "lr": lr0}, {"params": lin, "lr": lr1, "weight_decay": wd1}]


def per_entry(model, groups, key, default=0.0):
    values = []
    for group in groups:
        for p in group["params"]:
            values.append(torch.full((p.numel(),), float(group.get(key, default)), dtype=torch.float64))
    return torch.cat(values)


@pytest.mark.parametrize(
    "rule,update_interval,fused",
    [
        ("tensor", 1, False),
        ("row", 1, False),
        (alternate, 1, False),
        ("tensor", 3, False),
        (alternate, 3, False),
        ("tensor", 1, True),
        ("row", 1, True),
        ("row", 3, True),
    ],
    ids=[
        "tensor",
        "row",
        "callable",
        "tensor-interval3",
        "callable-interval3",
        "tensor-fused",
        "row-fused",
        "row-interval3-fused",
    ],
)
def test_streamed_matches_dense_reference(rule, update_interval, fused):
    model = small_model()
    groups = two_groups(model, wd1=0.01)
    params = [p for g in groups for p in g["params"]]
    opt = BlockMeanAdagrad(groups, damping=0.1, partition=rule, update_interval=update_interval, fused=fused)
    ref = DenseBlockMeanAdagrad(
        reference_labels(params, rule),
        per_entry(model, groups, "lr"),
        damping=0.1,
        update_interval=update_interval,
        weight_decay=per_entry(model, groups, "weight_decay"),
    )
    ref_model = small_model()
    ref_params = [p for m in (ref_model[0], ref_model[3]) for p in m.parameters()]
    active = torch.ones(sum(p.numel() for p in params), dtype=torch.bool)
    for t in range(12):
        opt.zero_grad()
        loss_of(model, t).backward()
        opt.step()
        ref_model.zero_grad()
        loss_of(ref_model, t).backward()
        set_flat(ref_params, ref.step(flat(ref_params), flat(p.grad for p in ref_params), active))
        torch.testing.assert_close(flat(params), flat(ref_params), rtol=1e-10, atol=1e-12)
    # the run moved: the comparison is not between two frozen models
    assert not torch.allclose(
        flat(params), flat(p for m in (small_model()[0], small_model()[3]) for p in m.parameters())
    )


def test_reference_agreement_float32():
    model = small_model(dtype=torch.float32)
    params = list(model.parameters())
    opt = BlockMeanAdagrad(params, lr=0.03, partition="row")
    ref = DenseBlockMeanAdagrad(reference_labels(params, "row"), torch.full((60,), 0.03, dtype=torch.float64))
    theta = flat(params).double()
    for t in range(10):
        opt.zero_grad()
        loss_of(model, t).backward()
        g = flat(p.grad for p in params).double()
        opt.step()
        theta = ref.step(theta, g, torch.ones(60, dtype=torch.bool))
        torch.testing.assert_close(flat(params).double(), theta, rtol=1e-4, atol=1e-5)
    assert opt.global_state["U"].dtype == torch.float32


def identity_correlation(U, w, partition):
    k = partition.num_blocks
    return BlockMeanLinearOperator(torch.ones(k, dtype=U.dtype), torch.zeros(k, k, dtype=U.dtype), partition)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_identity_correlation_is_torch_adagrad(monkeypatch, dtype, tol):
    monkeypatch.setattr(BlockMeanAdagrad, "_correlation", staticmethod(identity_correlation))
    ours, theirs = small_model(dtype=dtype), small_model(dtype=dtype)
    opt = BlockMeanAdagrad(ours.parameters(), lr=0.1, eps=1e-10, damping=0.0, partition="row")
    torch_opt = torch.optim.Adagrad(theirs.parameters(), lr=0.1, eps=1e-10)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    torch_sched = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=4, gamma=0.5)
    for t in range(20):
        # both take the gradient at our parameters: with each its own, the float32 rounding differences of the two
        # updates (an ulp or so) came back through the gradients amplified, and the comparison at rtol 1e-6 held or
        # failed with the thread count
        opt.zero_grad()
        loss_of(ours, t).backward()
        for p, q in zip(ours.parameters(), theirs.parameters()):
            q.grad = p.grad.clone()
        for o, s in ((opt, sched), (torch_opt, torch_sched)):
            o.step()
            s.step()
        torch.testing.assert_close(flat(ours.parameters()), flat(theirs.parameters()), rtol=tol, atol=tol)
        torch.testing.assert_close(
            flat(opt.state[p]["sum"] for p in ours.parameters()),
            flat(torch_opt.state[p]["sum"] for p in theirs.parameters()),
            rtol=tol,
            atol=0,
        )
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**5)


def test_block_mean_differs_from_adagrad():
    ours, theirs = small_model(), small_model()
    opt = BlockMeanAdagrad(ours.parameters(), lr=0.1, damping=0.1)
    torch_opt = torch.optim.Adagrad(theirs.parameters(), lr=0.1, eps=1e-10)
    for t in range(3):
        for model, o in ((ours, opt), (theirs, torch_opt)):
            o.zero_grad()
            loss_of(model, t).backward()
            o.step()
    assert (flat(ours.parameters()) - flat(theirs.parameters())).abs().max() > 1e-3


def test_none_grad_parameters_do_not_move_and_match_reference():
    model = small_model()
    params = list(model.parameters())
    frozen = params[2]  # the linear weight gets no gradient on even steps
    opt = BlockMeanAdagrad(params, lr=0.05, partition="tensor")
    ref = DenseBlockMeanAdagrad(reference_labels(params, "tensor"), torch.full((60,), 0.05, dtype=torch.float64))
    ref_model = small_model()
    ref_params = list(ref_model.parameters())
    numels = [p.numel() for p in params]
    for t in range(12):
        opt.zero_grad()
        ref_model.zero_grad()
        loss_of(model, t).backward()
        loss_of(ref_model, t).backward()
        before = frozen.detach().clone()
        h_before = opt.state[frozen]["sum"].clone() if frozen in opt.state else None
        if t % 2 == 0:
            frozen.grad = None
            ref_params[2].grad = None
        opt.step()
        active = torch.cat([torch.full((m,), p.grad is not None) for p, m in zip(ref_params, numels)])
        grads = torch.cat(
            [p.grad.reshape(-1) if p.grad is not None else torch.zeros(m) for p, m in zip(ref_params, numels)]
        ).double()
        set_flat(ref_params, ref.step(flat(ref_params), grads, active))
        if t % 2 == 0:
            assert torch.equal(frozen, before)
            if h_before is not None:
                assert torch.equal(opt.state[frozen]["sum"], h_before)
        torch.testing.assert_close(flat(params), flat(ref_params), rtol=1e-10, atol=1e-12)
    assert not torch.equal(frozen, small_model().state_dict()["3.weight"])


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_closure_and_maximize(fused):
    a, b = small_model(), small_model()
    opt_a = BlockMeanAdagrad(a.parameters(), lr=0.05, fused=fused)
    opt_b = BlockMeanAdagrad(b.parameters(), lr=0.05, maximize=True, fused=fused)
    for t in range(5):

        def closure(t=t):
            opt_a.zero_grad()
            loss = loss_of(a, t)
            loss.backward()
            return loss

        loss = opt_a.step(closure)
        assert torch.is_tensor(loss) and loss.item() > 0
        opt_b.zero_grad()
        (-loss_of(b, t)).backward()
        opt_b.step()
        torch.testing.assert_close(flat(a.parameters()), flat(b.parameters()), rtol=1e-12, atol=1e-14)


def test_add_param_group_grows_state_and_matches_reference():
    model = small_model()
    groups = two_groups(model)
    params = [p for g in groups for p in g["params"]]
    opt = BlockMeanAdagrad([groups[0]], lr=0.05, partition="row", update_interval=2)
    ref = DenseBlockMeanAdagrad(reference_labels(params, "row"), per_entry(model, groups, "lr"), update_interval=2)
    ref_model = small_model()
    ref_params = [p for m in (ref_model[0], ref_model[3]) for p in m.parameters()]
    n_conv = sum(p.numel() for p in groups[0]["params"])
    for t in range(10):
        if t == 4:
            k_old = opt.partition.num_blocks
            U_old = opt.global_state["U"].clone()
            opt.add_param_group(groups[1])
        opt.zero_grad()
        ref_model.zero_grad()
        loss_of(model, t).backward()
        loss_of(ref_model, t).backward()
        opt.step()
        active = torch.arange(60) < (n_conv if t < 4 else 60)
        set_flat(ref_params, ref.step(flat(ref_params), flat(p.grad for p in ref_params), active))
        if t == 4:
            assert opt.partition.num_blocks == k_old + 3 + 1
            assert opt.global_state["U"].shape == (k_old + 4, k_old + 4)
            assert not torch.equal(opt.global_state["U"][:k_old, :k_old], U_old)  # one more step was added
        torch.testing.assert_close(flat(params), flat(ref_params), rtol=1e-10, atol=1e-12)


def test_partition_rules_give_expected_blocks():
    model = small_model()
    for rule, k in (("tensor", 4), ("row", 3 + 1 + 3 + 1), (alternate, 8)):
        opt = BlockMeanAdagrad(model.parameters(), partition=rule)
        assert opt.partition is None  # lazy
        model.zero_grad()
        loss_of(model, 0).backward()
        opt.step()
        assert opt.partition.num_blocks == k
        assert len(opt.partition) == 60
        assert opt.global_state["U"].shape == (k, k)
        assert torch.equal(opt.partition.labels, reference_labels(list(model.parameters()), rule))


def test_state_is_lazy():
    model = small_model()
    opt = BlockMeanAdagrad(model.parameters())
    assert len(opt.state) == 0 and opt.global_state == {}
    model.zero_grad()
    opt.step()  # no gradients at all: nothing happens
    assert len(opt.state) == 0 and opt.global_state == {}
    loss_of(model, 0).backward()
    opt.step()
    assert opt.global_state["step"] == 1
    assert all(opt.state[p]["sum"].shape == p.shape for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cpu, gpu = small_model(), small_model().cuda()
    opt_c = BlockMeanAdagrad(cpu.parameters(), lr=0.05, partition="row")
    opt_g = BlockMeanAdagrad(gpu.parameters(), lr=0.05, partition="row", check_finite=False)
    for t in range(8):
        opt_c.zero_grad()
        loss_of(cpu, t).backward()
        opt_c.step()
        opt_g.zero_grad()
        x, y = small_batch(t)
        (gpu(x.cuda()) - y.cuda()).pow(2).mean().backward()
        opt_g.step()
    assert opt_g.global_state["U"].is_cuda and opt_g.partition.labels.is_cuda
    torch.testing.assert_close(flat(gpu.parameters()).cpu(), flat(cpu.parameters()), rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- the step's fast paths: masking, layouts
def _zero_some_entries(model, until):
    """A gradient hook that zeroes two entries of every tensor while ``step[0] < until`` (h stays 0 there)."""
    step = [0]
    for p in model.parameters():
        mask = torch.ones_like(p).reshape(-1)
        mask[:2] = 0
        mask = mask.view(p.shape)
        p.register_hook(lambda g, mask=mask: g * mask if step[0] < until else g)
    return step


@pytest.mark.parametrize("rule", ["tensor", "row", alternate], ids=["tensor", "row", "callable"])
@pytest.mark.parametrize("check_finite", [True, False])
def test_entries_without_gradient_stay_and_match_reference(rule, check_finite):
    # entries whose gradient has always been exactly 0 (h = 0) must not move; after step 4 they get
    # gradients, h > 0 everywhere and the masking switches off
    model, ref_model = small_model(), small_model()
    step, ref_step = _zero_some_entries(model, until=4), _zero_some_entries(ref_model, until=4)
    params, ref_params = list(model.parameters()), list(ref_model.parameters())
    start = flat(params).clone()
    zeroed = torch.cat([torch.arange(p.numel()) < 2 for p in params])
    opt = BlockMeanAdagrad(params, lr=0.05, partition=rule, check_finite=check_finite)
    ref = DenseBlockMeanAdagrad(reference_labels(params, rule), torch.full((60,), 0.05, dtype=torch.float64))
    active = torch.ones(60, dtype=torch.bool)
    for t in range(7):
        step[0] = ref_step[0] = t
        opt.zero_grad()
        ref_model.zero_grad()
        loss_of(model, t).backward()
        loss_of(ref_model, t).backward()
        opt.step()
        set_flat(ref_params, ref.step(flat(ref_params), flat(p.grad for p in ref_params), active))
        torch.testing.assert_close(flat(params), flat(ref_params), rtol=1e-10, atol=1e-12)
        if t < 4:
            assert torch.equal(flat(params)[zeroed], start[zeroed])
            assert opt._h_has_zero
    assert not opt._h_has_zero
    assert not torch.equal(flat(params)[zeroed], start[zeroed])


@pytest.mark.parametrize("rule", ["tensor", alternate], ids=["tensor", "callable"])
def test_masking_is_exact_where_h_is_positive(monkeypatch, rule):
    # the mask min(z^{-1/2}, sqrt(h) * big) leaves every entry with h > 0 bit for bit as it is
    plain, masked = small_model(), small_model()
    opt_plain = BlockMeanAdagrad(plain.parameters(), lr=0.05, partition=rule)
    opt_masked = BlockMeanAdagrad(masked.parameters(), lr=0.05, partition=rule)
    from bma_gp.optim import functional

    always = functional.z_inv_sqrt
    monkeypatch.setattr(functional, "z_inv_sqrt", lambda h, eps, mask, **kw: always(h, eps, mask=True, **kw))
    for t in range(4):
        for model, opt in ((plain, opt_plain), (masked, opt_masked)):
            opt.zero_grad()
            loss_of(model, t).backward()
            opt.step()
        assert torch.equal(flat(plain.parameters()), flat(masked.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unmask_scale_clears_the_smallest_subnormal(dtype):
    from bma_gp.optim._scaling import unmask_scale as _unmask_scale

    h = torch.tensor([torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps, 1e-30, 1.0, 1e30], dtype=dtype)
    assert h[0] > 0 and h[0] / 2 == 0  # the smallest subnormal
    q = h.sqrt()
    worst = q.rsqrt()  # z^{-1/2} with eps = 0, the largest it can be
    assert torch.all(q * _unmask_scale(dtype) >= worst)
    assert torch.isfinite(torch.tensor(_unmask_scale(dtype), dtype=dtype))


@pytest.mark.parametrize(
    "rule,fused", [("tensor", False), ("row", False), ("row", True)], ids=["tensor", "row", "row-fused"]
)
def test_non_contiguous_parameter_matches_contiguous(rule, fused):
    # the strided parameter's optimizer runs fused=True in the last case: against the eager one
    torch.manual_seed(3)
    value = torch.randn(4, 5, dtype=torch.float64)
    strided = torch.nn.Parameter(value.T.contiguous().T)  # same values, column-major storage
    dense = torch.nn.Parameter(value.clone())
    assert not strided.is_contiguous()
    opt_s = BlockMeanAdagrad([strided], lr=0.05, partition=rule, weight_decay=0.01, fused=fused)
    opt_d = BlockMeanAdagrad([dense], lr=0.05, partition=rule, weight_decay=0.01)
    for _ in range(4):
        x = torch.randn(5, 3, dtype=torch.float64)
        for p, opt in ((strided, opt_s), (dense, opt_d)):
            opt.zero_grad()
            (p @ x).tanh().sum().backward()
            opt.step()
        torch.testing.assert_close(strided, dense, rtol=1e-12 if fused else 1e-13, atol=1e-14 if fused else 1e-15)
    assert not strided.is_contiguous()
    assert not torch.equal(dense, value)
