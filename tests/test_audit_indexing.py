"""Indexing audit: the block mean operators, their sums and products indexed as torch indexes their dense matrices
(boolean masks, negative ints, numpy arrays, lists, 0-d tensors, Ellipsis, None, batch indices, bounds)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from bma_gp import (
    BlockMeanLinearOperator,
    BlockMeanProductLinearOperator,
    BlockMeanSumLinearOperator,
    ClosedFormFallbackWarning,
    Partition,
)

DT = torch.float64
LABELS = torch.tensor([0, 1, 0, 2, 1, 2, 2])
LABELS2 = torch.tensor([1, 0, 0, 1, 1, 0, 1])
N = LABELS.numel()
MASK = torch.tensor([True, False, True, True, False, False, True])
IDX = torch.tensor([0, 2, 2, 5])


def _spd(*shape: int) -> torch.Tensor:
    A = torch.randn(*shape, dtype=DT)
    return A @ A.mT + torch.eye(shape[-1], dtype=DT)


def _operators(batch: tuple[int, ...] = ()) -> dict[str, object]:
    torch.manual_seed(0)
    p, p2 = Partition.from_labels(LABELS), Partition.from_labels(LABELS2)
    M = BlockMeanLinearOperator(torch.rand(*batch, 3, dtype=DT) + 1, _spd(*batch, 3, 3), p)
    M2 = BlockMeanLinearOperator(torch.rand(*batch, 2, dtype=DT) + 1, _spd(*batch, 2, 2), p2)
    S = BlockMeanSumLinearOperator(
        torch.rand(*batch, N, dtype=DT) + 1,
        _spd(*batch, 3, 3),
        _spd(*batch, 2, 2),
        partitions=[p, p2],
        root=torch.randn(*batch, N, 2, dtype=DT),
    )
    return {"block_mean": M, "sum": S, "product": BlockMeanProductLinearOperator(M, M2)}


def _check(op, index_fn) -> object:
    """``index_fn(op)`` equals ``index_fn(dense)`` in shape and values; returns ``index_fn(op)``."""
    expected = index_fn(op.to_dense())
    res = index_fn(op)
    got = res.to_dense() if hasattr(res, "to_dense") else res
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)
    return res


CASES = {
    "mask rows": lambda o: o[MASK],
    "mask rows then columns": lambda o: o[MASK][:, MASK],
    "mask columns": lambda o: o[:, MASK],
    "mask rows, all columns": lambda o: o[MASK, :][:, MASK],
    "numpy mask": lambda o: o[MASK.numpy()],
    "list mask": lambda o: o[MASK.tolist()],
    "mask pairs": lambda o: o[MASK, MASK],
    "negative row": lambda o: o[-1],
    "negative entry": lambda o: o[-1, -2],
    "negative column": lambda o: o[:, -1],
    "negative row, slice": lambda o: o[-2, 1:5],
    "negative slices": lambda o: o[-3:, -3:],
    "negative slice rows": lambda o: o[-5:-1],
    "step slices": lambda o: o[::2, ::2],
    "ellipsis": lambda o: o[...],
    "ellipsis columns": lambda o: o[..., IDX],
    "ellipsis negative": lambda o: o[..., -1],
    "new axis": lambda o: o[None],
    "new axis, ellipsis": lambda o: o[None, ..., 1:4, 1:4],
    "repeated indices": lambda o: o[IDX][:, IDX],
    "index pairs": lambda o: o[IDX, IDX.flip(0)],
    "negative index tensor": lambda o: o[torch.tensor([0, -1])][:, torch.tensor([-2, 1])],
    "numpy indices": lambda o: o[np.array([0, 2, 5])],
    "numpy pairs": lambda o: o[np.array([0, 2]), np.array([-1, 3])],
    "list indices": lambda o: o[[0, 2, 5]],
    "list pairs": lambda o: o[[0, 2, 5], [1, 1, 3]],
    "empty list": lambda o: o[[]],
    "empty mask": lambda o: o[:, torch.zeros(N, dtype=torch.bool)],
    "0-d row": lambda o: o[torch.tensor(3)],
    "0-d entry": lambda o: o[torch.tensor(3), torch.tensor(-1)],
    "numpy int": lambda o: o[np.int64(-2)],
    "broadcast pairs": lambda o: o[torch.tensor([[0], [6]]), torch.tensor([1, -3])],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["block_mean", "sum", "product"])
def test_matrix_indexing_as_torch(kind, case):
    _check(_operators()[kind], CASES[case])


BATCH_CASES = {
    "batch entry": lambda o: o[0],
    "negative batch entry": lambda o: o[-1],
    "batch entry, principal slice": lambda o: o[0, 1:4, 1:4],
    "all batches, pairs": lambda o: o[:, IDX, IDX],
    "all batches, rows": lambda o: o[:, IDX],
    "broadcast triples": lambda o: o[torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([[0], [6]])],
    "batch tensor, row tensor": lambda o: o[torch.tensor([0, 2]), torch.tensor([1, -3]), :],
    "batch tensor": lambda o: o[torch.tensor([2, 0, 2])],
    "batch mask": lambda o: o[torch.tensor([True, False, True])],
    "batch mask, then masks": lambda o: o[torch.tensor([True, False, True])][:, MASK][..., MASK],
    "negative triple": lambda o: o[-1, -1, -1],
    "ellipsis mask": lambda o: o[..., MASK],
    "ellipsis negative": lambda o: o[..., -1],
    "new axis": lambda o: o[None],
    "new axis, entry": lambda o: o[None, 0],
    "entry, new axis": lambda o: o[0, None],
    "new batch axis": lambda o: o[:, None],
    "2-d batch tensor": lambda o: o[torch.tensor([[0, 1], [2, 0]])],
    "negative slices": lambda o: o[-2:, -3:, -3:],
    "numpy batch": lambda o: o[np.array([2, 0])],
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
@pytest.mark.parametrize("kind", ["block_mean", "sum", "product"])
def test_batch_indexing_as_torch(kind, case):
    _check(_operators((3,))[kind], BATCH_CASES[case])


@pytest.mark.parametrize("kind", ["block_mean", "sum", "product"])
def test_batch_indices_keep_the_family(kind):
    op = _operators((3,))[kind]
    for res in (op[0], op[-1], op[torch.tensor([True, False, True])], op[np.array([2, 0])], op[None], op[:, None]):
        assert type(res) is type(op)


@pytest.mark.parametrize("kind", ["block_mean", "sum"])
def test_negative_principal_slice_stays_closed_form(kind):
    op = _operators()[kind]
    sub = _check(op, lambda o: o[-4:, -4:])
    assert type(sub) is type(op)
    rhs = torch.randn(4, 2, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        torch.testing.assert_close(sub.solve(rhs), torch.linalg.solve(op.to_dense()[-4:, -4:], rhs))


@pytest.mark.parametrize("kind", ["block_mean", "sum"])
def test_mask_submatrix_of_whole_blocks_as_documented(kind):
    """``M[mask][:, mask]`` over whole blocks: the same operator as the index-tensor form, exact, and the principal
    submatrix in the family (docs/gp.md: ``S[idx][:, idx]``), whose solve is closed form (no warning)."""
    op = _operators()[kind]
    mask = (LABELS == 0) | (LABELS == 2)
    idx = mask.nonzero().squeeze(-1)
    by_mask, by_idx = op[mask][:, mask], op[idx][:, idx]
    assert type(by_mask) is type(by_idx) is type(op)
    dense = op.to_dense()[mask][:, mask]
    torch.testing.assert_close(by_mask.to_dense(), dense)
    rhs = torch.randn(idx.numel(), 2, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        x = by_mask.solve(rhs)
    torch.testing.assert_close(x, torch.linalg.solve(dense, rhs))


ERRORS = {
    "row past the end": (lambda o: o[N], "out of (bounds|range)"),
    "row before the start": (lambda o: o[-N - 1], "out of (bounds|range)"),
    "column past the end": (lambda o: o[:, N], "out of (bounds|range)"),
    "index tensor past the end": (lambda o: o[torch.tensor([0, N])], "out of bounds"),
    "index tensor before the start": (lambda o: o[:, torch.tensor([0, -N - 1])], "out of bounds"),
    "mask of another length": (lambda o: o[:, torch.tensor([True, False])], "shape of the mask"),
    "too many indices": (lambda o: o[0, 0, 0], "too many indices"),
    "two ellipses": (lambda o: o[..., 0, ...], "single ellipsis"),
    "float indices": (lambda o: o[torch.tensor([0.0])], "long, int, byte or bool"),
    "new axis between the matrix dimensions": (lambda o: o[:, None], "between its two matrix dimensions"),
    "2-d index tensor on the rows": (lambda o: o[IDX.view(2, 2)], "more than one dimension"),
    "new axis with index tensors": (lambda o: o[None, IDX], "together with index tensors"),
}


@pytest.mark.parametrize("case", list(ERRORS))
@pytest.mark.parametrize("kind", ["block_mean", "sum", "product"])
def test_bad_indices_raise_index_error(kind, case):
    fn, match = ERRORS[case]
    with pytest.raises(IndexError, match=match):
        fn(_operators()[kind])


def test_batch_index_out_of_range():
    op = _operators((3,))["block_mean"]
    with pytest.raises(IndexError, match="out of bounds for dimension 0 with size 3"):
        op[3]
    with pytest.raises(IndexError, match="out of bounds"):
        op[torch.tensor([0, -4])]


def test_indexed_submatrix_takes_torch_indices_too():
    """Indexing the result of an index (a ``FallbackIndexedLinearOperator``) follows torch as well."""
    op = _operators()["block_mean"]
    _check(op, lambda o: o[IDX][-1])
    _check(op, lambda o: o[IDX][:, MASK])
    _check(op, lambda o: o[MASK][[True, False, True, False]][:, -2:])


# ------------------------------------------------------------------ operators built from block mean operators
def _derived_operators() -> dict[str, object]:
    from linear_operator.operators import DenseLinearOperator

    ops = _operators()
    M, S = ops["block_mean"], ops["sum"]
    dense = torch.randn(N, N, dtype=DT, generator=torch.Generator().manual_seed(3))
    from test_audit_multitask_prediction import layout_operators

    block_diag, interleaved = layout_operators()
    return {
        "fallback sum": M + DenseLinearOperator(dense @ dense.mT),
        "fallback product": M @ S,
        "negative multiple": S * -1.0,
        "tasks, block-diagonal": block_diag,
        "tasks, interleaved": interleaved,
    }


def _posterior_operators() -> dict[str, object]:
    """The posterior covariances of a mixed model (prediction, training inputs) and of a block mean kernel's GP, and
    that kernel's cross covariance (a ``BlockCrossLinearOperator``)."""
    import gpytorch

    from test_gp_inference import build_model, make_data, make_partition
    from test_mixed_prediction import CASES, build, closed_form, new_inputs

    model, x, _ = build(CASES[0])
    model.eval()
    xt = new_inputs()
    res = {"predictive covariance": closed_form(model, xt, False)[0]}
    with torch.no_grad():
        res["training posterior"] = model(x).lazy_covariance_matrix
    x, y = make_data()
    bm_model, likelihood, _ = build_model(x, y, make_partition(x.shape[0], 7, False), scale=True)
    bm_model.eval()
    with torch.no_grad(), gpytorch.settings.fast_pred_var(False):
        res["block mean posterior"] = bm_model(torch.rand(9, 2, dtype=DT)).lazy_covariance_matrix
        res["block mean cross covariance"] = bm_model.covar_module(torch.rand(9, 2, dtype=DT), x).evaluate_kernel()
    return res


DERIVED_CASES = {
    "negative row": lambda o: o[..., -1, :],
    "negative entry": lambda o: o[..., -1, -2],
    "mask columns": lambda o: o[..., torch.arange(o.shape[-1]) % 2 == 0],
    "mask rows": lambda o: o[..., torch.arange(o.shape[-2]) % 3 == 0, :],
    "numpy rows": lambda o: o[..., np.array([0, 2]), :],
    "new axis": lambda o: o[None],
}


@pytest.mark.parametrize("case", list(DERIVED_CASES))
def test_fallback_operators_index_as_torch(case):
    for op in _derived_operators().values():
        _check(op, DERIVED_CASES[case])


@pytest.fixture(scope="module")
def posteriors():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _posterior_operators()


@pytest.mark.filterwarnings("ignore:The input matches the stored training data")
@pytest.mark.parametrize("case", list(DERIVED_CASES))
def test_posterior_covariances_index_as_torch(posteriors, case):
    for op in posteriors.values():
        _check(op, DERIVED_CASES[case])


@pytest.mark.filterwarnings("ignore:The input matches the stored training data")
def test_predictive_covariance_new_axes_and_batch_entries(monkeypatch):
    """``unsqueeze`` (and so ``op[None]``) of the mixed models' predictive covariance: linear_operator's default
    unsqueezed the one-hot blocks' batch-free columns and left the implicit weight's batch shape behind; batch entries
    of the result indexed those columns too."""
    from bma_gp.kernels import group_kernel
    from bma_gp.kernels import sum_prediction_strategy as sps
    from test_implicit_weight import factor_model
    from test_mixed_prediction import CASES, build, closed_form, new_inputs

    model, _, _ = build(CASES[0])
    model.eval()
    covar = closed_form(model, new_inputs(), False)[0]
    for fn in (lambda o: o.unsqueeze(0), lambda o: o[None][0], lambda o: o[None, None][:, 0]):
        _check(covar, fn)

    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)

    monkeypatch.setattr(sps, "_stable_past_threshold", lambda M: False)  # W past it, not G - Sigma
    monkeypatch.setattr(sps._ImplicitWeight, "formed", lambda self, columns: None)
    monkeypatch.setattr(group_kernel, "FACTOR_DENSE_MAX_GROUPS", 0)
    model, _, _, _, xt = factor_model(30, n=120, batch_shape=(2,))
    with torch.no_grad():
        covar = model(xt).lazy_covariance_matrix
        assert isinstance(covar.W, sps._ImplicitWeight)
        for fn in (
            lambda o: o[None],
            lambda o: o[:, None],
            lambda o: o[None][0],
            lambda o: o[:, None][-1, 0],
            lambda o: o[None][:, torch.tensor([1, 0, 1])],
        ):
            _check(covar, fn)


# ---------------------------------------------------------------------------- a lazily evaluated BlockMeanKernel tensor
def _lazy_block_mean_kernel():
    import gpytorch

    from bma_gp import BlockMeanKernel

    torch.manual_seed(0)
    n = 24
    x = torch.randn(n, 2, dtype=DT)
    base = gpytorch.kernels.RBFKernel().to(DT)
    kernel = gpytorch.kernels.ScaleKernel(BlockMeanKernel(base, x, Partition.from_labels(torch.arange(n) % 5)))
    return kernel.to(DT), x


LAZY_INDICES = {
    "last rows and columns": (slice(-5, None), slice(-5, None)),
    "leading rows": (slice(0, 5), slice(None)),
    "middle rows": (slice(3, 9), slice(None)),
    "every other row": (slice(None, None, 2), slice(None, None, 2)),
    "one row": (7, slice(None)),
    "index tensors": (torch.tensor([0, 7, 3]), torch.tensor([1, 2, 9])),
    "a mask": (torch.arange(24) % 3 == 0, slice(None)),
}


@pytest.mark.parametrize("name", list(LAZY_INDICES))
def test_a_lazy_block_mean_kernel_tensor_is_indexed_as_its_matrix(name):
    """GPyTorch indexes a lazily evaluated kernel tensor by indexing the inputs, ``kernel(x)[I, J] = kernel(x[I],
    x[J])``. A BlockMeanKernel recognises its training inputs only whole, so an index taking some training rows gave
    the base kernel at them (0.2-0.5 off here), also as the marginal of the training prior; it now reads the
    block mean matrix."""
    kernel, x = _lazy_block_mean_kernel()
    with torch.no_grad():
        lazy = kernel(x)
        dense = lazy.to_dense()
        index = LAZY_INDICES[name]
        got = lazy[index]
        got = got.to_dense() if hasattr(got, "to_dense") else got
    torch.testing.assert_close(got, dense[index])


def test_the_marginal_of_a_block_mean_prior_is_its_submatrix():
    import gpytorch

    kernel, x = _lazy_block_mean_kernel()
    with torch.no_grad():
        covar = kernel(x)
        prior = gpytorch.distributions.MultivariateNormal(torch.zeros(24, dtype=DT), covar)
        torch.testing.assert_close(prior[..., -5:].covariance_matrix, covar.to_dense()[-5:, -5:])


def test_splitting_at_the_training_rows_keeps_the_lazy_form():
    """The prediction strategy's split of the joint covariance (training rows whole, new rows apart) keeps
    GPyTorch's lazy form: the training block, the cross covariance and the new points' block."""
    from gpytorch.lazy import LazyEvaluatedKernelTensor

    kernel, x = _lazy_block_mean_kernel()
    joint_x = torch.cat([x, torch.randn(3, 2, dtype=DT)])
    with torch.no_grad():
        joint = kernel(joint_x)
        dense = joint.to_dense()
        for index in [(slice(None, 24), slice(None, 24)), (slice(24, None), slice(None, 24)), (slice(24, None),) * 2]:
            part = joint[index]
            assert isinstance(part, LazyEvaluatedKernelTensor), index
            torch.testing.assert_close(part.to_dense(), dense[index])
        torch.testing.assert_close(joint[2:26, 2:26].to_dense(), dense[2:26, 2:26])  # cuts the training rows
