"""``GroupGaussianLikelihood`` without ``group_dim`` reads the ids from the last input column, while the kernel reads
them from its own ``active_dims``: with ids first and a small integer covariate last (sleepstudy's Days, 0-9) it
learned one noise per day instead of per subject, silently (a user trial). It now warns once when it reads the last
of several columns without ``group_dim``."""

from __future__ import annotations

import warnings

import pytest
import torch

from bma_gp import GroupGaussianLikelihood

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs():
    ids = torch.arange(40) % 4
    days = (torch.arange(40) // 4).to(torch.float64)
    return torch.stack([ids.to(torch.float64), days], -1)


def test_reading_the_last_of_several_columns_without_group_dim_warns_once():
    x = _inputs()
    with pytest.warns(UserWarning, match=r"last column of .*2 columns.*group_dim=j"):
        likelihood = GroupGaussianLikelihood(10, train_inputs=x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        likelihood.noise_covar.groups_of(x)  # once per likelihood


@pytest.mark.parametrize("case", ["group_dim", "one_column", "ids"])
def test_no_warning_where_the_column_is_declared_or_the_only_one(case):
    x = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if case == "group_dim":
            likelihood = GroupGaussianLikelihood(4, group_dim=0, train_inputs=x)
        elif case == "one_column":
            likelihood = GroupGaussianLikelihood(4, train_inputs=x[:, :1])
        else:
            likelihood = GroupGaussianLikelihood(4, train_inputs=x[:, 0].long())
    assert likelihood.noise_covar.train_groups is not None
