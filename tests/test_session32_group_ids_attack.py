"""Attack on session 32's refusal to read a feature column as group ids (``GroupGaussianLikelihood`` given 1-D training
ids, ``likelihood(model(x), x)`` after a prediction showed the training inputs' column not to hold them).

What was wrong:

- after ``model.float()`` of a double model that had predicted, every prediction raised ``ValueError`` ("the model's
  training inputs ... are not those ... used with"): the remembered double training inputs were compared with the
  rounded float ones in double;
- in training mode before any prediction, ``mll(model(x), y, x)`` read the days column as the groups (silently: the
  loss of other noises), and after a prediction the stored ids: the same training call gave another loss depending on
  whether the model had predicted before. A training-mode output's inputs are the model's training inputs, which is
  the evidence the refusal needs; they now count as a prediction strategy's do;
- GPyTorch's 1-D inputs (``train_x`` of shape ``(n,)``, stored by ``ExactGP`` as ``(n, 1)``): ``likelihood(model(x),
  x)`` with 1-D floating point ``x`` took the days for ids, silently, for test and training points alike (1-D
  tensors were always taken for ids); floating point values where the model's inputs are one feature column now get
  the same refusal (integer 1-D tensors are still ids);
- inputs passed to the likelihood with another number of columns than the model's training inputs (so not in the
  model's layout) were refused; their column is read again, with the last-column warning;
- test inputs passed in a list or tuple (``likelihood(model(x_test), [x_test])``) are taken for the model's training
  inputs, and the error spoke only of ``set_train_data``; it now also says to pass ``groups=``.

What held (checked here): ids as a real column (given 1-D too, or only as the column; ``group_dim`` declared),
batch-shaped test inputs, a batch of models, a fantasy model where the ids are a column, ``model.double()`` after
predicting, a deep copy, ``set_train_inputs`` after ``set_train_data``. The reference is the likelihood given the
same points' ids as ``groups=``.
"""

from __future__ import annotations

import copy
import warnings

import gpytorch
import pytest
import torch

from bma_gp import GroupGaussianLikelihood
from test_session31_mixed import DTYPE, _days_data, _SmoothGP


def _model(x, y, groups, k, dtype=DTYPE):
    likelihood = GroupGaussianLikelihood(k, train_inputs=groups)
    model = _SmoothGP(x, y, likelihood).to(dtype)
    with torch.no_grad():
        likelihood.noise = torch.linspace(0.01, 3.0, k)
    return likelihood, model


def _added_noise(likelihood, latent, *args, **kwargs):
    return likelihood(latent, *args, **kwargs).variance - latent.variance


def test_model_float_after_a_prediction_in_double_still_predicts_with_the_stored_ids():
    x, y, groups, k = _days_data()
    x = x + 0.123456789123  # not a float32 value
    likelihood, model = _model(x, y, groups, k)
    model.eval()
    x_test = torch.tensor([[2.5], [7.25]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)  # (the training inputs, on purpose)
        reference = model(x_test.to(DTYPE))
        model.float()
        pred = model(x_test)  # raised ValueError: the rounded training inputs were not the remembered ones
        assert pred.mean.dtype == torch.float32
        torch.testing.assert_close(pred.mean, reference.mean.float(), rtol=1e-4, atol=1e-4)
        train_x = model.train_inputs[0]
        latent = model(train_x)
        torch.testing.assert_close(_added_noise(likelihood, latent, train_x), likelihood.noise[groups].detach())
        model.double()  # and back
        latent = model(model.train_inputs[0])
        added = _added_noise(likelihood, latent, model.train_inputs[0])
        torch.testing.assert_close(added, likelihood.noise[groups].detach())


@pytest.mark.parametrize("predicted_first", [False, True])
def test_training_with_the_inputs_passed_takes_the_stored_ids_before_and_after_a_prediction(predicted_first):
    x, y, groups, k = _days_data()
    likelihood, model = _model(x, y, groups, k)
    if predicted_first:
        model.eval()
        with torch.no_grad():
            model(torch.tensor([[2.5]], dtype=DTYPE))
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    output = model(x)
    passed = mll(output, y, x)  # read the days as groups where no prediction had run
    reference = mll(output, y, groups=groups)
    torch.testing.assert_close(passed, reference)
    torch.testing.assert_close(_added_noise(likelihood, output, x), likelihood.noise[groups])
    # the evidence holds in eval mode too: a test column is refused, not read
    model.eval()
    with torch.no_grad():
        latent = model(torch.tensor([[2.0], [7.0]], dtype=DTYPE))
        with pytest.raises(ValueError, match=r"groups= \(likelihood\(model\(x\), groups=ids\)\)"):
            likelihood(latent, torch.tensor([[2.0], [7.0]], dtype=DTYPE))


def test_training_with_the_ids_as_a_real_column_passed_reads_the_column():
    x, y, groups, k = _days_data()
    x2 = torch.cat([x, groups.to(DTYPE).unsqueeze(-1)], -1)
    likelihood, model = _model(x2, y, groups, k)
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    output = model(x2)
    with pytest.warns(UserWarning, match="reads the group ids from the last column"):
        passed = mll(output, y, x2)
    torch.testing.assert_close(passed, mll(output, y, groups=groups))
    model.eval()
    x2_test = torch.tensor([[2.0, 4.0], [7.0, 11.0]], dtype=DTYPE)
    with torch.no_grad():
        latent = model(x2_test)
        torch.testing.assert_close(_added_noise(likelihood, latent, x2_test), likelihood.noise[[4, 11]].detach())


def test_one_dimensional_feature_inputs_are_not_read_as_ids():
    x, y, groups, k = _days_data()
    days = x.squeeze(-1)  # GPyTorch's 1-D train_x
    likelihood, model = _model(days, y, groups, k)
    model.eval()
    days_test = torch.tensor([2.0, 7.0], dtype=DTYPE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)  # (the training inputs, on purpose)
        latent = model(days_test)
        state = dict(likelihood.noise_covar.__dict__)
        with pytest.raises(ValueError, match=r"shape \(2,\)\) is not group ids either: pass the points' group ids"):
            likelihood(latent, days_test)  # read days 2 and 7 as subjects 2 and 7, silently
        assert likelihood.noise_covar.__dict__.keys() == state.keys()
        assert all(likelihood.noise_covar.__dict__[key] is value for key, value in state.items())
        ids = torch.tensor([0, 17])  # integer 1-D tensors are ids, positional or groups=
        torch.testing.assert_close(_added_noise(likelihood, latent, ids), likelihood.noise[ids].detach())
        torch.testing.assert_close(_added_noise(likelihood, latent, groups=ids), likelihood.noise[ids].detach())
        latent = model(days)  # the training days get the stored ids (their values were read as ids too)
        torch.testing.assert_close(_added_noise(likelihood, latent, days), likelihood.noise[groups].detach())
    model.train()  # and in training mode before any prediction
    likelihood, model = _model(days, y, groups, k)
    output = model(days)
    torch.testing.assert_close(_added_noise(likelihood, output, days), likelihood.noise[groups])


def test_test_inputs_in_a_list_are_refused_with_a_message_that_names_groups():
    """``likelihood(model(x_test), [x_test])``: a list is taken for the model's training inputs (as the strategies
    pass them), and the error spoke only of ``set_train_data``; it now says to pass ``groups=``."""
    x, y, groups, k = _days_data()
    likelihood, model = _model(x, y, groups, k)
    model.eval()
    x_test = torch.tensor([[2.0], [7.0]], dtype=DTYPE)
    with torch.no_grad():
        latent = model(x_test)
        for wrapped in ([x_test], (x_test,)):
            with pytest.raises(ValueError, match=r"as a list or tuple .* groups= \(likelihood\(model\(x\), groups"):
                likelihood(latent, wrapped)


def test_inputs_with_another_number_of_columns_than_the_model_are_read_with_the_warning():
    x, y, groups, k = _days_data()
    likelihood, model = _model(x, y, groups, k)
    model.eval()
    with torch.no_grad():
        latent = model(torch.tensor([[2.0], [7.0]], dtype=DTYPE))
        table = torch.tensor([[2.0, 4.0], [7.0, 11.0]], dtype=DTYPE)  # days and subject: not the model's layout
        with pytest.warns(UserWarning, match="reads the group ids from the last column"):
            added = _added_noise(likelihood, latent, table)
    torch.testing.assert_close(added, likelihood.noise[[4, 11]].detach())


def test_what_held_ids_columns_batches_fantasies_copies_and_new_training_ids():
    x, y, groups, k = _days_data()
    x2 = torch.cat([x, groups.to(DTYPE).unsqueeze(-1)], -1)
    x2_test = torch.tensor([[2.0, 4.0], [7.0, 11.0]], dtype=DTYPE)
    for group_dim, train_inputs in ((None, groups), (None, x2), (1, groups)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the last-column warning where group_dim is not given
            likelihood = GroupGaussianLikelihood(k, group_dim=group_dim, train_inputs=train_inputs)
        model = _SmoothGP(x2, y, likelihood).to(DTYPE)
        with torch.no_grad():
            likelihood.noise = torch.linspace(0.01, 3.0, k)
        model.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the last-column warning where group_dim is not given
            inputs = x2_test.expand(3, 2, 2) if group_dim is None else x2_test  # batch-shaped test inputs too
            latent = model(inputs)
            added = _added_noise(likelihood, latent, inputs)
            torch.testing.assert_close(added, likelihood.noise[[4, 11]].detach().expand_as(added))
            fantasy = model.get_fantasy_model(x2_test, torch.zeros(2, dtype=DTYPE))
            latent = fantasy(x2_test)
            added = _added_noise(fantasy.likelihood, latent, x2_test)
            torch.testing.assert_close(added, likelihood.noise[[4, 11]].detach())

    # days only: a deep copy keeps the evidence; new training ids after set_train_data replace it
    likelihood, model = _model(x, y, groups, k)
    model.eval()
    x_test = torch.tensor([[2.0], [7.0]], dtype=DTYPE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)  # (the training inputs, on purpose)
        model(x_test)
        copied = copy.deepcopy(model)
        with pytest.raises(ValueError, match="groups="):
            copied.likelihood(copied(x_test), x_test)
        latent = copied(copied.train_inputs[0])
        added = _added_noise(copied.likelihood, latent, copied.train_inputs[0])
        torch.testing.assert_close(added, likelihood.noise[groups].detach())
        x_new, groups_new = x[:100] + 0.25, groups[:100].flip(0)
        model.set_train_data(x_new, y[:100], strict=False)
        likelihood.set_train_inputs(groups_new)
        latent = model(x_new)
        torch.testing.assert_close(_added_noise(likelihood, latent, x_new), likelihood.noise[groups_new].detach())
        with pytest.raises(ValueError, match="groups="):
            likelihood(model(x_test), x_test)

    # a batch of two models on the days: refused for test days, the stored ids for the training inputs
    likelihood = GroupGaussianLikelihood(k, train_inputs=groups, batch_shape=torch.Size([2]))
    xb = torch.stack([x, x + 0.5])

    class Batch(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(xb, torch.stack([y, y]), likelihood)
            self.mean_module = gpytorch.means.ConstantMean(batch_shape=torch.Size([2]))
            self.covar_module = gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2]))

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    model = Batch().to(DTYPE)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
        with pytest.raises(ValueError, match="groups="):
            likelihood(model(x_test.expand(2, 2, 1)), x_test.expand(2, 2, 1))
        latent = model(xb)
        added = _added_noise(likelihood, latent, xb)
        torch.testing.assert_close(added, likelihood.noise[..., groups].detach())
