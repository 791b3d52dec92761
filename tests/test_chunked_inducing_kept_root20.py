"""ChunkedInducingPointKernel keeps the root of the training inputs in eval mode without autograd (trial 20): every
prediction formed it again for the covariance with the test inputs (``n m`` kernel values and an ``n m^2`` product:
1.1 s per one-point prediction at ``n = 10^6``, ``m = 64``); kept, the second prediction reads it. Any change of
what it depends on forms it again."""

from __future__ import annotations

import pytest
import torch

from bma_gp.kernels import chunked_inducing_point_kernel as cipk
from test_chunked_inducing import DTYPE, data, pair


def _predict(model, xt):
    with torch.no_grad():
        post = model.likelihood(model(xt))
        return post.mean, post.variance


@pytest.fixture
def roots(monkeypatch):
    sizes = []
    real = cipk.ChunkedInducingPointKernel._root
    monkeypatch.setattr(
        cipk.ChunkedInducingPointKernel, "_root", lambda self, x: sizes.append(x.shape[-2]) or real(self, x)
    )
    return sizes


@pytest.mark.parametrize("groups", [False, True], ids=["sgpr", "sgpr+groups"])
def test_a_second_prediction_does_not_root_the_training_inputs_again(groups, roots):
    x, y, (reference, model) = pair(groups, 40)
    reference.eval()
    model.eval()
    xt, _ = data(n=5, seed=4)
    mean, var = _predict(model, xt)
    n = x.shape[0]
    assert n in roots
    roots.clear()
    for _ in range(3):
        again = _predict(model, xt[:3])
        torch.testing.assert_close(again[0], mean[:3], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(again[1], var[:3], rtol=1e-12, atol=1e-12)
    assert n not in roots and roots  # the test inputs only
    want = _predict(reference, xt)
    torch.testing.assert_close(mean, want[0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(var, want[1], rtol=1e-8, atol=1e-10)


def _fresh_prediction(model, xt):
    model.train()
    model.eval()
    return _predict(model, xt)


@pytest.mark.parametrize(
    "change",
    ["lengthscale assigned", "inducing points in place", "new training inputs", "state dict", "double()"],
)
def test_changes_form_the_root_again(change):
    x, y, (_, model) = pair(True, 40)
    model.eval()
    xt, _ = data(n=4, seed=5)
    _predict(model, xt)
    kernel = model.covar_module.kernels[0]
    with torch.no_grad():
        if change == "lengthscale assigned":  # initialize(): through .data, seen by the hyperparameter check
            kernel.base_kernel.base_kernel.lengthscale = torch.tensor([[0.3, 0.7]], dtype=DTYPE)
        elif change == "inducing points in place":
            kernel.inducing_points.add_(0.05)
        elif change == "new training inputs":  # the kept copy is compared by value: scaled in place after
            moved = model.train_inputs[0]
            model.set_train_data(moved, model.train_targets, strict=False)
            moved[:, :2].mul_(1.1)
        elif change == "state dict":
            state = {k: v.clone() for k, v in model.state_dict().items()}
            state["likelihood.noise_covar.raw_noise"] += 0.5
            model.load_state_dict(state)
        else:
            model.double()
    got = _predict(model, xt)
    want = _fresh_prediction(model, xt)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)


def test_nothing_is_kept_with_autograd_or_in_training():
    x, y, (_, model) = pair(False, 40)
    kernel = model.covar_module
    model.eval()
    xt, _ = data(n=3, seed=6)
    model(xt).mean.sum().backward()  # autograd on
    assert "_bma_gp_kept_root" not in kernel.__dict__
    _predict(model, xt)
    assert len(kernel.__dict__["_bma_gp_kept_root"]) <= 2
    model.train()  # GPyTorch's train() clears the eval caches
    assert "_bma_gp_kept_root" not in kernel.__dict__
    with torch.no_grad():
        model(x)
    assert "_bma_gp_kept_root" not in kernel.__dict__
