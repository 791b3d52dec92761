"""GroupKernel's ``var`` and ``corr`` setters (and the slope prior's sample closure) refuse values that hold no real
numbers with a ``TypeError`` naming the setting, nothing changed, as the likelihood's ``noise`` does.

Before: a complex value was accepted with its imaginary part dropped (torch's UserWarning only); a string or ``None``
raised torch's ``new(): invalid data type 'str'`` / ``must be real number, not NoneType``, naming neither ``var``
nor the fix."""

import warnings

import gpytorch
import numpy as np
import pytest
import torch

from bma_gp import GroupKernel

BAD = [
    ("complex", torch.tensor([2 + 5j]), "must hold real"),
    ("complex python", 2 + 5j, "must hold real"),
    ("str", "a", "must be a number or a tensor"),
    ("None", None, "must be a number or a tensor"),
    ("ragged", [1.0, [2.0]], "must be a number or a tensor"),
    ("bool", torch.tensor([True]), "must hold real"),
]


def _raw(kernel):
    return {name: p.detach().clone() for name, p in kernel.named_parameters()}


@pytest.mark.parametrize("name, value, match", BAD, ids=[b[0] for b in BAD])
def test_var_that_holds_no_real_numbers_is_a_type_error_naming_var(name, value, match):
    kernel = GroupKernel(3)
    kernel.var = 0.7
    before = _raw(kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Casting complex values to real discards the imaginary part"
        with pytest.raises(TypeError, match=rf"^var {match}") as info:
            kernel.var = value
    assert str(info.value).count("var") >= 1 and "got" in str(info.value)
    after = _raw(kernel)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name, value, match", BAD, ids=[b[0] for b in BAD])
def test_corr_that_holds_no_real_numbers_is_a_type_error_naming_corr(name, value, match):
    kernel = GroupKernel(3, slope=True, correlated=True)
    kernel.corr = 0.2
    before = _raw(kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match=rf"^corr {match}"):
            kernel.corr = value
    after = _raw(kernel)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_complex_var_message_names_the_fix():
    kernel = GroupKernel(3)
    with pytest.raises(TypeError, match=r"var must hold real variances, got dtype torch\.complex64; .*value\.real"):
        kernel.var = torch.tensor([2 + 5j])


def test_real_values_are_still_taken_in_the_kernels_dtype():
    kernel = GroupKernel(3, per_group_variance=True)
    for value in (
        0.5,
        2,
        np.float64(1.5),
        np.array([0.5, 1.0, 2.0]),
        torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64),
    ):
        kernel.var = value
        assert kernel.raw_var.dtype == torch.float32
        expected = torch.as_tensor(value, dtype=torch.float32).expand(3)
        assert torch.allclose(kernel.var.detach(), expected)
    slopes = GroupKernel(3, slope=True, correlated=True)
    slopes.corr = np.float32(-0.4)
    assert torch.allclose(slopes.corr.detach(), torch.tensor([-0.4]))


def test_slope_prior_sample_closure_refuses_complex_samples():
    kernel = GroupKernel(3, slope=True, correlated=True)
    before = _raw(kernel)
    with pytest.raises(TypeError, match="slope_covar must hold real"):
        kernel._prior_closure(kernel, torch.eye(2, dtype=torch.complex64))
    after = _raw(kernel)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_corr_outside_a_narrower_corr_constraint_is_refused_naming_corr_and_nothing_changes():
    kernel = GroupKernel(5, slope=True, corr_constraint=gpytorch.constraints.Interval(-0.5, 0.5))
    var, corr = kernel.var.detach().clone(), kernel.corr.detach().clone()
    with pytest.raises(ValueError, match=r"corr holds 0\.8.*correlation constraint Interval"):
        kernel.corr = 0.8
    # a prior's draw of slope_covar outside it: var was set before gpytorch refused corr
    covar = torch.tensor([[2.0, 0.8 * 6**0.5], [0.8 * 6**0.5, 3.0]])
    with pytest.raises(ValueError, match="corr holds"):
        kernel._prior_closure(kernel, covar)
    assert torch.equal(kernel.var, var) and torch.equal(kernel.corr, corr)
    kernel.corr = 0.4
    assert torch.allclose(kernel.corr, torch.tensor([0.4]))


@pytest.mark.parametrize("name", ["var_constraint", "corr_constraint"])
@pytest.mark.parametrize("bad", [1e-3, "positive"])
def test_a_constraint_that_is_no_interval_is_refused_naming_the_argument(name, bad):
    with pytest.raises(TypeError, match=f"{name} must be a gpytorch.constraints.Interval"):
        GroupKernel(3, slope=True, **{name: bad})
