"""A ``GroupKernel`` model in eval mode sorted its ``n`` training ids at every prediction (two ``torch.unique`` per
call: 85 of 100 ms per one-point prediction at ``n = 10^6``, a performance trial); the last few partitions of the
ids are kept with copies of the ids, compared in one pass."""

from __future__ import annotations

import gpytorch
import torch

from bma_gp import GroupKernel
from bma_gp.kernels import group_kernel
from gp_reference import GP, dense_copy

DTYPE = torch.float64


def _model(slope=False, n=300, k=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=g)])
    cov = torch.randn(n, generator=g, dtype=DTYPE)
    x = torch.stack([ids.to(DTYPE), cov], -1)
    y = torch.randn(k, generator=g, dtype=DTYPE)[ids] + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    torch.manual_seed(0)
    kernel = GroupKernel(k + 1, slope=slope, active_dims=[0, 1] if slope else [0])
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).to(DTYPE)
    return model, x, k


def _counting(monkeypatch):
    calls = []
    real = group_kernel._present_partition
    monkeypatch.setattr(group_kernel, "_present_partition", lambda ids: calls.append(ids.numel()) or real(ids))
    return calls


def test_repeated_predictions_do_not_sort_the_training_ids_again(monkeypatch):
    for slope in (False, True):
        model, x, k = _model(slope)
        model.eval()
        xt = torch.tensor([[3.0, 0.5], [float(k), -1.0]], dtype=DTYPE)
        with torch.no_grad():
            first = model(xt)
            mean, var = first.mean, first.variance
            calls = _counting(monkeypatch)
            for _ in range(3):
                again = model(xt)
                torch.testing.assert_close(again.mean, mean, rtol=0, atol=0)
                torch.testing.assert_close(again.variance, var, rtol=0, atol=0)
        assert max(calls, default=0) < x.shape[0], calls  # nothing of the training ids' size sorted again
        monkeypatch.undo()


def test_training_ids_changed_in_place_are_seen(monkeypatch):
    """The kept ids are copies: training inputs changed in place (then the model retrained / re-evaluated) give
    the new posterior, equal to a dense model's."""
    model, x, k = _model()
    model.eval()
    xt = torch.tensor([[3.0, 0.0], [5.0, 0.0]], dtype=DTYPE)
    with torch.no_grad():
        _ = model(xt).mean
        x[:40, 0] = 5.0  # the first 40 points move to group 5, in place
        model.set_train_data(x, model.train_targets, strict=False)
        post = model(xt)
        ref = dense_copy(model)
        ref.eval()
        with gpytorch.settings.max_cholesky_size(10**6):
            want = ref(xt)
    torch.testing.assert_close(post.mean, want.mean)
    torch.testing.assert_close(post.variance, want.variance)


def test_the_cache_is_bounded_and_not_state():
    model, x, k = _model()
    kernel = model.covar_module
    for m in range(10):
        kernel(x[: 50 + m]).to_dense()
    cache = kernel.__dict__["_present_cache"]
    assert len(cache._entries) == group_kernel._PresentCache.SIZE
    assert not any("present" in name for name in model.state_dict())
