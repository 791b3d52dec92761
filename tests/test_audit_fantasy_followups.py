"""Follow-ups of the fantasy model audits (``model.get_fantasy_model(x_new, y_new)`` of an ``ExactGP`` whose kernel
holds a ``BlockMeanKernel`` or a ``GroupKernel``): ``train()`` / ``eval()`` on a fantasy model, its prediction at the
parent's training inputs, the training block sums it reuses from the parent, and the fantasy noise it refuses."""

from __future__ import annotations

import pytest
import torch

from test_audit_fantasy_single import DTYPE, N, _fantasy_points, _model

pytestmark = [pytest.mark.usefixtures("one_thread")]


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kernel", ["group", "block_mean"])
@pytest.mark.parametrize("noise", [[-0.1, 0.1], [0.05, -1e-3]])
def test_negative_fantasy_noise_is_refused_and_leaves_the_model_unchanged(kernel, noise):
    # a FixedNoiseGaussianLikelihood appended a negative variance to its noise as it was: the fantasy model predicted
    # from a covariance that is not a covariance (here: variances that still looked plausible), without a word
    model, test_x = _model(kernel, "fixed")
    model.eval()
    (x1, y1), _ = _fantasy_points(model)
    with torch.no_grad():
        before = model(test_x)
        strategy = model.prediction_strategy
        with pytest.raises(ValueError, match=r"noise=.*negative.*>= 0"):
            model.get_fantasy_model(x1, y1, noise=torch.tensor(noise, dtype=DTYPE))
        with pytest.raises(ValueError, match=r"noise=.*negative"):  # also one entry of a batch of fantasy noises
            model.get_fantasy_model(x1, torch.stack([y1, y1]), noise=torch.tensor([[0.1, 0.1], noise], dtype=DTYPE))
        assert model.prediction_strategy is strategy and model.likelihood.noise.shape == (N,)
        assert model.train_inputs[0].shape == (N, 2) and model.train_targets.shape == (N,)
        after = model(test_x)
        torch.testing.assert_close(after.mean, before.mean, rtol=0, atol=0)
        assert model.get_fantasy_model(x1, y1, noise=torch.tensor([0.0, 0.1], dtype=DTYPE))(test_x).mean.shape == (4,)
