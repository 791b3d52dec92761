"""The posterior weight ``W = Z^T M^{-1} Z`` applied as products instead of formed (``_ImplicitWeight``).

Past ``_DENSE_WEIGHT_MAX_ELIMINATED`` levels in the eliminated (largest diagonal) grouping, prediction at new
inputs multiplies by ``W = A - A C^{-1} G A`` through the sum's Gram blocks and capacitance factorisation, so no
``q x q`` matrix exists and ``q`` may exceed ``max_capacitance_size``. The tests force that path at small sizes and
compare it with GPyTorch's dense computation (the cases of test_mixed_prediction), with the formed ``W``, and with
dense algebra past the size limit; and check batches (entries of several members at once too) and float32 (the
gradients are in test_mixed_prediction, for both weights).
"""

from __future__ import annotations

import gpytorch
import pytest
import torch

import bma_gp.block_mean_sum_linear_operator as bmsl
from bma_gp import GroupKernel, settings
from bma_gp.kernels import group_kernel
from bma_gp.kernels import sum_prediction_strategy as sps
from closed_form_guard import closed_forms_only
from test_gp_inference import GP as SingleGP
from test_gp_inference import dense_posterior
from test_group_factor import posteriors_in_both_precisions
from test_mixed_posterior import reference
from test_mixed_prediction import CASES, build, closed_form, new_inputs, random_new_inputs
from test_mixed_prediction import GP as SumGP

pytestmark = pytest.mark.filterwarnings("ignore:The input matches the stored training data")

DTYPE = torch.float64


@pytest.fixture
def implicit(monkeypatch):
    """Every sum with a diagonal grouping to eliminate predicts through the implicit weight, by products only (it
    never forms ``W``, however many columns are asked for; that switch is tested on its own below)."""
    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)
    monkeypatch.setattr(sps, "_stable_past_threshold", lambda M: False)  # W itself, not G - Sigma
    monkeypatch.setattr(sps._ImplicitWeight, "formed", lambda self, columns: None)
    no_structured_forms(monkeypatch)


@pytest.fixture(params=["products", "structured"])
def implicit_either(request, monkeypatch):
    """As ``implicit``, and once more with the structured forms where they apply (the default path;
    tests/test_structured_prediction.py)."""
    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)
    monkeypatch.setattr(sps, "_stable_past_threshold", lambda M: False)  # W itself, not G - Sigma
    monkeypatch.setattr(sps._ImplicitWeight, "formed", lambda self, columns: None)
    if request.param == "products":
        no_structured_forms(monkeypatch)
    return request.param


def no_structured_forms(monkeypatch):
    """The diagonal and products by products with ``W`` (the structured forms, tests/test_structured_prediction.py,
    are taken first wherever they apply)."""
    cls = sps.PredictiveCovarianceLinearOperator
    monkeypatch.setattr(cls, "_structured_quadratic_diagonal", lambda self: None)
    monkeypatch.setattr(cls, "_structured_product", lambda self, x: None)


@pytest.mark.parametrize("fast_pred_var", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_matches_gpytorch_and_the_formed_weight(implicit_either, monkeypatch, case, fast_pred_var):
    model, x, y = build(case)
    model.eval()
    xt = new_inputs()
    covar, (mean, dense, diag, variance), _ = closed_form(model, xt, fast_pred_var)
    assert isinstance(covar, sps.PredictiveCovarianceLinearOperator)
    assert isinstance(covar.W, sps._ImplicitWeight)
    ref_mean, ref_cov = reference(model, xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dense, ref_cov, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(diag, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(variance, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-10)
    rhs = torch.randn(xt.shape[0], 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(covar @ rhs, dense @ rhs, rtol=1e-10, atol=1e-12)
    rows, cols = torch.tensor([0, 2, 5, 1]), torch.tensor([1, 2, 3, 1])
    torch.testing.assert_close(covar[..., rows, cols], dense[rows, cols], rtol=1e-10, atol=1e-12)

    # the same numbers as the formed q x q weight
    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 10**9)
    model.train()
    model.eval()
    formed, (_, dense_formed, diag_formed, _), _ = closed_form(model, xt, fast_pred_var)
    # formed, or (every term in the stable form) G - Sigma as products, formed past q columns
    assert torch.is_tensor(formed.W) or (isinstance(formed.W, sps._ImplicitWeight) and formed.W.stable)
    torch.testing.assert_close(dense, dense_formed, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diag, diag_formed, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["crossed", "sgpr_chunked", "slopes"])
def test_chunked_diagonal(implicit, monkeypatch, case):
    """More test points than one row chunk: the diagonal is built chunk by chunk, each with its own products."""
    monkeypatch.setattr(sps, "_DIAG_CHUNK", 64)
    model, x, y = build(case)
    model.eval()
    xt = random_new_inputs(150)
    calls = []
    real = sps._weight_matmul
    monkeypatch.setattr(sps, "_weight_matmul", lambda M, X: calls.append(X.shape[-1]) or real(M, X))
    covar, (mean, _, diag, _), _ = closed_form(model, xt, False)
    assert isinstance(covar.W, sps._ImplicitWeight)
    q = covar.W.shape[-1]
    assert max(1, 64 // q) in calls and len(calls) > 2  # the diagonal went chunk by chunk
    ref_mean, ref_cov = reference(model, xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(diag, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-10)


def factor_model(num_groups, n=400, batch_shape=(), seed=0):
    """A correlated random intercept (rank 2) over many groups, in its factor form (a diagonal grouping plus a
    root), with groups ``num_groups - 5 ..`` unseen in training and every other group seen."""
    batch_shape = torch.Size(batch_shape)
    g = torch.Generator().manual_seed(seed)
    seen = num_groups - 5
    ids = torch.cat([torch.arange(seen), torch.randint(0, seen, (n - seen,), generator=g)])  # every seen group
    x = ids.to(DTYPE).unsqueeze(-1)
    y = torch.randn(num_groups, generator=g, dtype=DTYPE)[ids] + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    torch.manual_seed(seed)
    kernel = GroupKernel(num_groups, rank=2, batch_shape=batch_shape).to(DTYPE)
    with torch.no_grad():
        kernel.var = torch.rand(*batch_shape, 1, dtype=DTYPE) + 0.5
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch_shape).to(DTYPE)
    likelihood.noise = 0.1
    model = SingleGP(x, y.expand(*batch_shape, n), likelihood, kernel).to(DTYPE)
    model.eval()
    xt = torch.tensor([[0.0], [3.0], [num_groups - 1.0], [7.0], [num_groups - 2.0]], dtype=DTYPE)
    return model, kernel, x, y, xt


@pytest.mark.parametrize("few_levels_formed", [False, True], ids=["products", "q_past_the_limit"])
def test_past_the_capacitance_limit(monkeypatch, few_levels_formed):
    """300 groups, ``max_capacitance_size`` 50: the formed weight (300 + 2 square) must refuse; the implicit one
    factorises only the root's 2 x 2 capacitance and gives dense algebra's posterior. It is chosen for q past
    the limit even where the eliminated grouping is small enough for the formed weight."""
    monkeypatch.setattr(group_kernel, "FACTOR_DENSE_MAX_GROUPS", 0)
    model, kernel, x, y, xt = factor_model(300)
    k = int(x[:, 0].unique().numel())
    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 10**9 if few_levels_formed else 0)
    with torch.no_grad(), settings.max_capacitance_size(50), closed_forms_only(x.shape[0]):
        post = model(xt)
        W = post.lazy_covariance_matrix.W
        assert isinstance(W, sps._ImplicitWeight)
        mean, cov, var = post.mean, post.covariance_matrix, post.variance
        with pytest.raises(ValueError, match=f"needs a {k + 2} x {k + 2} matrix"):
            sps._formed_weight(W.M)
    C = kernel.covar_matrix.detach()
    ids, tid = x[:, 0].long(), xt[:, 0].long()
    ref_mean, ref_cov = dense_posterior(
        C[ids][:, ids],
        model.likelihood.noise.detach(),
        y,
        model.mean_module.constant.detach(),
        C[tid][:, ids],
        C[tid][:, tid],
    )
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(var, torch.diagonal(ref_cov), rtol=1e-9, atol=1e-10)


def test_default_threshold_takes_the_implicit_weight_for_many_levels(monkeypatch):
    """With the package's defaults, a random intercept with more levels than the threshold predicts through
    products, and the formed weight is the same matrix (checked through its products)."""
    levels = sps._DENSE_WEIGHT_MAX_ELIMINATED + 40
    model, kernel, x, y, xt = factor_model(levels, n=2 * levels)
    with torch.no_grad():
        post = model(xt)
        covar = post.lazy_covariance_matrix
        assert isinstance(covar.W, sps._ImplicitWeight)
        M = covar.W.M
        X = torch.randn(covar.W.shape[-1], 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
        # past the threshold the weight is G - Sigma (every term diagonal or the root's: _stable_past_threshold)
        assert covar.W.stable
        formed = sps._transformed_weight(M, [True] * len(M._sizes()))
        torch.testing.assert_close(covar.W @ X, formed @ X, rtol=1e-9, atol=1e-11)


def test_batch(implicit_either, monkeypatch):
    monkeypatch.setattr(group_kernel, "FACTOR_DENSE_MAX_GROUPS", 0)
    model, kernel, x, y, xt = factor_model(30, n=120, batch_shape=(2,))
    with torch.no_grad():
        post = model(xt)
        covar = post.lazy_covariance_matrix
        assert isinstance(covar.W, sps._ImplicitWeight)
        mean, cov, var = post.mean, covar.to_dense(), post.variance
        assert cov.shape == (2, xt.shape[0], xt.shape[0])
        # entries of different batch members at once (each column multiplied by its own member's weight)
        bi, ri, ci = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 4, 3]), torch.tensor([1, 2, 0, 3])
        entries = covar[bi, ri, ci]
        torch.testing.assert_close(entries, cov[bi, ri, ci], rtol=1e-10, atol=1e-12)
    C = kernel.covar_matrix.detach()
    ids, tid = x[:, 0].long(), xt[:, 0].long()
    noise = model.likelihood.noise.detach()
    const = model.mean_module.constant.detach()
    for b in range(2):
        Cb = C[b]
        ref_mean, ref_cov = dense_posterior(
            Cb[ids][:, ids], noise[b], y, const[b] if const.dim() else const, Cb[tid][:, ids], Cb[tid][:, tid]
        )
        torch.testing.assert_close(mean[b], ref_mean, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(cov[b], ref_cov, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(var[b], torch.diagonal(ref_cov), rtol=1e-9, atol=1e-10)


def test_float32_agrees_with_float64(implicit_either, monkeypatch):
    """The products run in double precision for a float32 model: means and variances agree with float64's."""
    monkeypatch.setattr(group_kernel, "FACTOR_DENSE_MAX_GROUPS", 0)
    res = posteriors_in_both_precisions(seen_inputs=False)
    (mean32, var32, covar32), (mean64, var64, covar64) = res[torch.float32], res[torch.float64]
    assert isinstance(covar32.W, sps._ImplicitWeight) and isinstance(covar64.W, sps._ImplicitWeight)
    assert float((mean32 - mean64).abs().max()) < 1e-4 * float(mean64.abs().max())
    assert float(((var32 - var64) / var64).abs().max()) < 1e-4  # each variance, the small ones at seen groups too


def test_forms_the_weight_once_products_reach_q(monkeypatch):
    """Fewer test points than ``q``: products. Once the columns asked for reach ``q`` in all (here after several
    calls), or at once for ``t >= q`` points, ``W`` is formed, and the numbers do not change."""
    monkeypatch.setattr(group_kernel, "FACTOR_DENSE_MAX_GROUPS", 0)
    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)
    no_structured_forms(monkeypatch)
    model, kernel, x, y, xt = factor_model(30, n=120)
    with torch.no_grad():
        covar = model(xt).lazy_covariance_matrix
        W = covar.W
        assert isinstance(W, sps._ImplicitWeight)
        q = W.shape[-1]
        first = covar.diagonal()
        assert W._formed is None and W._columns == xt.shape[0] < q
        calls = 1
        while W._formed is None:
            torch.testing.assert_close(covar.diagonal(), first, rtol=1e-9, atol=1e-12)
            calls += 1
        assert calls == -(-q // xt.shape[0])  # the call that brought the count to q formed it
        torch.testing.assert_close(covar.diagonal(), first, rtol=1e-9, atol=1e-12)
        eye = torch.eye(q, dtype=DTYPE)
        torch.testing.assert_close(W._formed @ eye, W._matmul(eye), rtol=1e-10, atol=1e-12)

        # many test points at once: formed before the diagonal, which then takes the formed weight's gathers
        many = torch.arange(30, dtype=DTYPE).repeat(2).unsqueeze(-1)
        model.prediction_strategy = None
        covar = model(many).lazy_covariance_matrix
        assert isinstance(covar.W, sps._ImplicitWeight) and covar.W._formed is None
        diag = covar.diagonal()
        assert covar.W._formed is not None
        with pytest.MonkeyPatch.context() as m:  # the same diagonal by products only
            m.setattr(sps._ImplicitWeight, "formed", lambda self, columns: None)
            torch.testing.assert_close(diag, covar.diagonal(), rtol=1e-8, atol=1e-12)
    # past max_capacitance_size the weight is never formed, whatever was asked
    model.prediction_strategy = None
    with torch.no_grad(), settings.max_capacitance_size(q - 1):
        covar = model(many).lazy_covariance_matrix
        covar.diagonal()
        assert covar.W._formed is None


def crossed_model(n=400, k1=300, k2=40):
    """Random intercepts of two crossed groupings (``k1`` and ``k2`` levels, the last two of each unseen in
    training) in eval mode, and test inputs at seen and unseen levels."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, k1 - 2, (n,), generator=g), torch.randint(0, k2 - 2, (n,), generator=g)
    x = torch.stack([a, b], -1).to(DTYPE)
    y = torch.randn(k1, generator=g, dtype=DTYPE)[a] + torch.randn(k2, generator=g, dtype=DTYPE)[b]
    y = y + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    ka, kb = GroupKernel(k1, active_dims=[0]), GroupKernel(k2, active_dims=[1])
    ka.var, kb.var = 0.7, 0.4
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = SumGP(x, y, likelihood, [ka, kb]).to(DTYPE)
    likelihood.noise = 0.1
    model.eval()
    xt = torch.tensor([[0.0, 1.0], [k1 - 1.0, 3.0], [5.0, k2 - 1.0], [k1 - 2.0, k2 - 2.0], [17.0, 9.0]], dtype=DTYPE)
    return model, xt


def test_crossed_levels_kept_as_cells(implicit_either, monkeypatch):
    """Two crossed groupings whose table is sparse (300 x 40 levels, 400 points: the capacitance keeps the table
    as its nonzero cells): with tables that large treated as too large to form, the products take the blocks
    against the eliminated grouping from those cells, a few columns at a time; no ``40 x 300`` table is formed, and
    the posterior equals GPyTorch's dense one (training and new levels)."""
    monkeypatch.setattr(sps, "_DENSE_TABLE_ELEMENTS", 0)
    monkeypatch.setattr(bmsl, "CELL_PRODUCT_ELEMENTS", 1000)  # about 3 columns per chunk
    model, xt = crossed_model()
    n = model.train_targets.shape[-1]
    formed = []
    watched = bmsl._Contingencies.__missing__  # where a table of two partitions is formed

    def missing(self, key):
        formed.append(key)
        return watched(self, key)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(bmsl._Contingencies, "__missing__", missing)
        with torch.no_grad(), closed_forms_only(n):
            post = model(xt)
            covar = post.lazy_covariance_matrix
            assert isinstance(covar.W, sps._ImplicitWeight)
            mean, dense, var = post.mean, covar.to_dense(), post.variance
            cap = covar.W.M._capacitance()
            assert any(not torch.is_tensor(piece) for piece in cap.A_re.pieces)  # the table as cells
            if implicit_either == "structured":  # A_Er at the test levels, from the cells
                assert covar._structured() is not None
            levels = torch.tensor(
                [0, 5, 17, cap.A_re.ke - 1, 42]
            )  # columns of A_re from its cells, against the formed table
            for i in range(len(cap.A_re.pieces)):
                torch.testing.assert_close(
                    cap.A_re.columns(levels)[..., sum(cap.A_re.sizes[:i]) : sum(cap.A_re.sizes[: i + 1]), :],
                    cap.A_re.dense(i).index_select(-1, levels),
                )
    assert (0, 1) not in formed  # and never as a k1 x k2 matrix
    # with autograd on, the products from the cells take gathers instead of the sparse CSR product: same numbers
    model.train()
    model.eval()
    with closed_forms_only(n):
        post = model(xt)
        var_grad = post.variance
        assert var_grad.requires_grad
    torch.testing.assert_close(var_grad.detach(), var, rtol=1e-10, atol=1e-12)
    ref_mean, ref_cov = reference(model, xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dense, ref_cov, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(var, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-10)


def test_root_comparison_goes_piece_by_piece(monkeypatch):
    """The training root and a cross covariance's right factor (``n x m`` each) are compared in pieces of rows, so
    no ``n x m`` temporary is made; rounding anywhere passes, a real difference in the last piece does not."""
    monkeypatch.setattr(sps, "_COMPARE_CHUNK", 64)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(100, 8, generator=g, dtype=DTYPE)
    b = a * (1 + 2 * torch.finfo(DTYPE).eps * torch.randn(100, 8, generator=g, dtype=DTYPE))
    assert len(sps._pieces(a)) == 13 and all(p.shape[-1] == 8 for p in sps._pieces(a))
    assert sps._same_root(a, b) and sps._close(a, b)
    c = b.clone()
    c[-1, 3] += 1e-6
    assert not sps._same_root(a, c) and not sps._close(a, c)
    assert not sps._same_root(a, b[:, :7]) and sps._close(a[0, 0], a[0, 0].clone())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(implicit, monkeypatch):
    """The implicit weight and the products from a table's cells (the sparse CSR product) on the device."""
    monkeypatch.setattr(sps, "_DENSE_TABLE_ELEMENTS", 0)
    model, xt = crossed_model()
    gpu_model = crossed_model()[0].cuda()  # a fresh model (no strategy cached on the CPU), the same numbers
    with torch.no_grad():
        post = model(xt)
        mean, var = post.mean, post.variance
        post = gpu_model(xt.cuda())
        assert isinstance(post.lazy_covariance_matrix.W, sps._ImplicitWeight)
        mean_gpu, var_gpu = post.mean, post.variance
    assert mean_gpu.device.type == "cuda"
    torch.testing.assert_close(mean_gpu.cpu(), mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(var_gpu.cpu(), var, rtol=1e-9, atol=1e-10)


def test_weight_formed_without_gradients_is_formed_again_with_them(monkeypatch):
    """``W`` formed by a diagonal under ``no_grad`` is not reused by a later diagonal with gradients (it would
    carry no graph): the gradient equals that of a fresh prediction."""
    monkeypatch.setattr(group_kernel, "FACTOR_DENSE_MAX_GROUPS", 0)
    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)
    no_structured_forms(monkeypatch)
    model, kernel, x, y, xt = factor_model(30, n=120)
    many = torch.arange(30, dtype=DTYPE).repeat(2).unsqueeze(-1)  # t >= q: W is formed by the first diagonal
    with gpytorch.settings.detach_test_caches(False):
        covar = model(many).lazy_covariance_matrix
        assert isinstance(covar.W, sps._ImplicitWeight)
        with torch.no_grad():
            first = covar.diagonal()
        assert covar.W._formed is not None and not covar.W._formed.requires_grad
        second = covar.diagonal()
        assert second.requires_grad
        (grad,) = torch.autograd.grad(second.sum(), [kernel.raw_var])
        model.prediction_strategy = None
        fresh = model(many).lazy_covariance_matrix.diagonal()
        (want,) = torch.autograd.grad(fresh.sum(), [kernel.raw_var])
    torch.testing.assert_close(first, second.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want, rtol=1e-8, atol=1e-10)
