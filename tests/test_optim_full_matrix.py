"""FullMatrixAdagrad against its formula."""

from __future__ import annotations

import pytest
import torch

from optim import FullMatrixAdagrad
from optim_reference import DenseFullMatrixAdagrad, flat, loss_of, set_flat, small_model


def test_matches_formula_with_groups_and_none_grads():
    model, ref_model = small_model(), small_model()
    conv, lin = list(model[0].parameters()), list(model[3].parameters())
    opt = FullMatrixAdagrad([{"params": conv, "lr": 0.05}, {"params": lin, "lr": 0.02}], eps=1e-4)
    params = conv + lin
    ref_params = list(ref_model[0].parameters()) + list(ref_model[3].parameters())
    numels = [p.numel() for p in params]
    lr = torch.cat([torch.full((m,), 0.05 if i < 2 else 0.02, dtype=torch.float64) for i, m in enumerate(numels)])
    ref = DenseFullMatrixAdagrad(60, lr, eps=1e-4)
    for t in range(12):
        opt.zero_grad()
        ref_model.zero_grad()
        loss_of(model, t).backward()
        loss_of(ref_model, t).backward()
        if t % 3 == 1:
            params[1].grad = None
            ref_params[1].grad = None
        before = params[1].detach().clone()
        opt.step()
        active = torch.cat([torch.full((m,), p.grad is not None) for p, m in zip(ref_params, numels)])
        g = torch.cat(
            [
                p.grad.reshape(-1) if p.grad is not None else torch.zeros(m, dtype=torch.float64)
                for p, m in zip(ref_params, numels)
            ]
        )
        set_flat(ref_params, ref.step(flat(ref_params), g, active))
        torch.testing.assert_close(flat(params), flat(ref_params), rtol=1e-9, atol=1e-11)
        if t % 3 == 1:
            assert torch.equal(params[1], before)
    assert opt.global_state["H"].shape == (60, 60)


def test_first_step_is_normalised_gradient():
    # H_1 = g g^T: (g g^T + eps I)^{-1/2} g = g / sqrt(|g|^2 + eps)
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = FullMatrixAdagrad([p], lr=1.0, eps=1e-4)
    p.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    opt.step()
    expected = torch.tensor([3.0, 4.0], dtype=torch.float64) * (1 - 1 / (25 + 1e-4) ** 0.5)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


def test_add_param_group_pads_H():
    a = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(2, dtype=torch.float64))
    opt = FullMatrixAdagrad([a], lr=0.1)
    a.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    H = opt.global_state["H"].clone()
    opt.add_param_group({"params": [b]})
    a.grad, b.grad = None, torch.ones(2, dtype=torch.float64)
    opt.step()
    assert opt.global_state["H"].shape == (5, 5)
    assert torch.equal(opt.global_state["H"][:3, :3], H)
    assert torch.equal(opt.global_state["H"][3:, 3:], torch.ones(2, 2, dtype=torch.float64))
    assert torch.equal(opt.global_state["H"][:3, 3:], torch.zeros(3, 2, dtype=torch.float64))


def _trial_first_step(model):
    """A user trial's first step: ``small_model(0, float32)`` with the Linear weight frozen (``grad = None``), whose
    float32 ``g g^T`` LAPACK's float32 ``eigh`` failed to converge on (float64 did not)."""
    params = list(model.parameters())
    model.zero_grad()
    loss_of(model, 0).backward()
    params[2].grad = None
    return params


def test_a_float32_eigh_that_fails_to_converge_is_done_in_float64():
    """The step went half-way (``H`` updated, the step count not) and raised torch's bare ``LinAlgError``; a retry
    then counted the gradient twice. The eigendecomposition is now redone in float64 where float32's fails, so the
    step goes through and matches the float64 formula."""
    model = small_model(0, torch.float32)
    params = _trial_first_step(model)
    g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]).double()
    start = flat(params).double()
    opt = FullMatrixAdagrad(params, lr=0.05)
    opt.step()
    mu, Q = torch.linalg.eigh(torch.outer(g, g))
    expected = start - 0.05 * (Q @ ((Q.mT @ g) * (mu.clamp_min(0) + 1e-4).rsqrt()))
    assert opt.global_state["step"] == 1
    torch.testing.assert_close(flat(params).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("check_finite", [True, False])
def test_an_eigh_failure_in_every_dtype_leaves_the_optimizer_as_it_was(monkeypatch, check_finite):
    """Where the eigendecomposition fails in float64 too, the step raises ``ValueError`` naming it, with the
    parameters and the step count unchanged and ``H`` restored; the next step then counts its gradient once."""
    model = small_model(0, torch.float64)
    params = list(model.parameters())
    opt = FullMatrixAdagrad(params, lr=0.05, check_finite=check_finite)
    model.zero_grad()
    loss_of(model, 0).backward()
    opt.step()
    model.zero_grad()
    loss_of(model, 1).backward()
    H, step, before = opt.global_state["H"].clone(), opt.global_state["step"], flat(params).clone()
    eigh = torch.linalg.eigh

    def failing(A, *args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.raises(ValueError, match="eigendecomposition of H \\+ g g\\^T .* failed to converge"):
        opt.step()
    torch.testing.assert_close(opt.global_state["H"], H, rtol=0, atol=1e-15)
    assert opt.global_state["step"] == step
    assert torch.equal(flat(params), before)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    g = torch.cat([p.grad.reshape(-1) for p in params])
    opt.step()
    torch.testing.assert_close(opt.global_state["H"], H + torch.outer(g, g), rtol=1e-12, atol=1e-15)
