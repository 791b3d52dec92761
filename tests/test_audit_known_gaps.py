"""Known gaps of earlier audits, each against a dense reference or the package's closed-form guard.

* Under ``lazily_evaluate_kernels(False)`` an ExactGP on a ``GroupKernel`` predicts with GPyTorch's default strategy:
  ``model(train_x).rsample()`` in eval mode factorised the dense predictive covariance without the package's
  warning (up to ``max_eager_kernel_size`` GPyTorch densifies it first, so no operator of the package ever saw it).
* With validation off, a NaN in a sum's ``d``, ``B_j`` or root gave ``logdet() = -inf`` (``torch.sign(nan)`` is 0,
  read as a zero determinant); ``torch.logdet`` of the dense matrix is NaN.
* ``MultivariateNormal.rsample(base_samples=...)`` with ``n`` base samples per draw (GPyTorch's ``base_sample_shape``)
  failed inside GPyTorch's reshape for a sum without a diagonal, whose root ``Z L`` had ``q < n`` columns.
"""

from __future__ import annotations

import math
import warnings

import gpytorch
import pytest
import torch
from gpytorch.distributions import MultivariateNormal
from linear_operator.operators import DiagLinearOperator, LowRankRootLinearOperator

import bma_gp
from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, ClosedFormFallbackWarning, Partition
from bma_gp.kernels import GroupKernel
from closed_form_guard import closed_forms_only

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems

DTYPE = torch.float64
N = 10
LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
CROSSED = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])


# ---------------------------------------------------------------------------- 1. eager GroupKernel prediction
class _GroupGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = GroupKernel(6)

    def forward(self, x):
        return MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _group_model(n: int = 40) -> tuple[_GroupGP, torch.Tensor]:
    torch.manual_seed(0)
    x = (torch.arange(n) % 6).to(DTYPE).unsqueeze(-1)
    y = torch.randn(n, dtype=DTYPE)
    model = _GroupGP(x, y, gpytorch.likelihoods.GaussianLikelihood()).to(DTYPE)
    return model, x


@pytest.mark.filterwarnings("ignore:The input matches the stored training data")
def test_eager_group_kernel_prediction_warns_and_lazy_stays_closed_form():
    model, x = _group_model()
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with closed_forms_only(x.shape[0]):
            lazy = model(x).rsample(torch.Size([2]))  # the package's strategy: a closed-form root
    assert lazy.shape == (2, x.shape[0])
    model.prediction_strategy = None
    with torch.no_grad(), gpytorch.settings.lazily_evaluate_kernels(False):
        with pytest.warns(ClosedFormFallbackWarning, match="lazily_evaluate_kernels") as record:
            post = model(x)
        assert any("DefaultPredictionStrategy" in str(w.message) for w in record)
        # GPyTorch's default strategy, dense below max_eager_kernel_size: what the warning announced
        assert type(model.prediction_strategy) is gpytorch.models.exact_prediction_strategies.DefaultPredictionStrategy
        assert post.rsample(torch.Size([2])).shape == (2, x.shape[0])


def test_eager_group_kernel_training_draws_stay_closed_form_and_silent():
    model, x = _group_model()
    with torch.no_grad(), gpytorch.settings.lazily_evaluate_kernels(False), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with closed_forms_only(x.shape[0]):
            prior = model(x)
            assert isinstance(prior.lazy_covariance_matrix, BlockMeanLinearOperator)
            assert prior.rsample(torch.Size([3])).shape == (3, x.shape[0])
            assert model.likelihood(prior).rsample(torch.Size([3])).shape == (3, x.shape[0])


# ---------------------------------------------------------------------------- 2. NaN log-determinants
def _sum(where: str) -> BlockMeanSumLinearOperator:
    torch.manual_seed(1)
    lam = torch.rand(4, dtype=DTYPE) + 1
    W = torch.randn(4, 4, dtype=DTYPE)
    B = W @ W.T / 4
    d = torch.full((N,), 0.5, dtype=DTYPE)
    U = torch.randn(N, 2, dtype=DTYPE)
    if where == "lam":
        lam[2] = math.nan
    elif where == "B":
        B[0, 1] = B[1, 0] = math.nan
    elif where == "d":
        d[4] = math.nan
    elif where == "root":
        U[3, 1] = math.nan
    M = BlockMeanLinearOperator(lam, B, Partition.from_labels(LABELS))
    crossed = BlockMeanLinearOperator(
        torch.zeros(3, dtype=DTYPE), torch.ones(3, dtype=DTYPE), Partition.from_labels(CROSSED), diagonal=True
    )
    res = DiagLinearOperator(d) + M + crossed + LowRankRootLinearOperator(U)
    assert isinstance(res, BlockMeanSumLinearOperator)
    return res


@pytest.mark.parametrize("where", ["lam", "B", "d", "root"])
def test_sum_logdet_of_nan_input_is_nan_like_torch(where):
    with bma_gp.settings.validate(False):
        op = _sum(where)
        assert torch.logdet(op.to_dense()).isnan()
        assert op.logdet().isnan()
        inv_quad, logdet = op.inv_quad_logdet(torch.ones(N, 1, dtype=DTYPE), logdet=True)
        assert logdet.isnan()


def test_sum_logdet_of_finite_input_unchanged():
    op = _sum("none")
    with bma_gp.settings.validate(False):
        torch.testing.assert_close(op.logdet(), torch.logdet(op.to_dense()), rtol=1e-10, atol=1e-10)


def test_sum_logdet_without_a_diagonal_stays_minus_inf():
    """A sum with d = 0 and fewer levels than points is singular: -inf, as before (its capacitance is NaN through
    1/d, which must not be taken for a NaN input)."""
    for C in _zero_diagonal_sums().values():
        with bma_gp.settings.validate(False):
            assert C.logdet().item() == -math.inf
            assert C.inv_quad_logdet(logdet=True)[1].item() == -math.inf


# ---------------------------------------------------------------------------- 3. base samples
def _zero_diagonal_sums() -> dict[str, BlockMeanSumLinearOperator]:
    torch.manual_seed(2)
    W = torch.randn(4, 4, dtype=DTYPE)
    M0 = BlockMeanLinearOperator(torch.zeros(4, dtype=DTYPE), W @ W.T, Partition.from_labels(LABELS))
    crossed = BlockMeanLinearOperator(
        torch.zeros(3, dtype=DTYPE), torch.rand(3, dtype=DTYPE) + 0.5, Partition.from_labels(CROSSED), diagonal=True
    )
    return {"crossed": M0 + crossed, "root": M0 + LowRankRootLinearOperator(torch.randn(N, 2, dtype=DTYPE))}


@pytest.mark.parametrize("name", ["crossed", "root"])
def test_rsample_with_n_base_samples_of_a_sum_without_diagonal(name):
    C = _zero_diagonal_sums()[name]
    mean = torch.linspace(-1, 1, N, dtype=DTYPE)
    mvn = MultivariateNormal(mean, C)
    assert mvn.base_sample_shape == (N,)
    base = torch.randn(5, N, dtype=DTYPE)
    with closed_forms_only(N):
        samples = mvn.rsample(torch.Size([5]), base_samples=base)
        R = C.root_decomposition().root.to_dense()
    assert samples.shape == (5, N)
    torch.testing.assert_close(R @ R.mT, C.to_dense(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(samples, mean + base @ R.mT, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- 4. the CLI
def test_cli_max_cholesky_without_exact_is_warned_about(tmp_path, capsys, monkeypatch):
    """``--max-cholesky`` only sets the size up to which the exact GP factorises its kernel matrix: blockmean and
    sgpr solve in closed form at any size (their results are the same for every value), and the option was ignored
    without the warning the other unused options give."""
    from bma_gp.cli import main
    from bma_gp.cli.arguments import parse_config

    csv = tmp_path / "small.csv"
    csv.write_text("x,y\n" + "".join(f"{i},{(i * i) % 7 + i}\n" for i in range(1, 13)), encoding="utf-8")
    base = ["--data", str(csv), "--target", "y", "--blocks", "3", "--iters", "2", "--no-progress", "--no-plot"]
    unused = parse_config([*base, "--method", "blockmean,sgpr", "--max-cholesky", "100"]).unused_options()
    assert len(unused) == 1 and unused[0].startswith("--max-cholesky has no effect"), unused
    assert "methods: blockmean, sgpr" in unused[0]
    assert parse_config([*base, "--method", "exact,blockmean", "--max-cholesky", "100"]).unused_options() == []
    assert parse_config([*base, "--method", "blockmean"]).unused_options() == []  # not given: no warning
    monkeypatch.chdir(tmp_path)
    assert main([*base, "--method", "blockmean", "--max-cholesky", "0", "--out", "out"]) == 0
    err = capsys.readouterr().err
    assert "bma-gp: warning: --max-cholesky has no effect" in err, err


def test_cli_period_below_the_sampling_step_is_named_instead_of_lr(tmp_path, capsys, monkeypatch):
    """A seasonal period shorter than twice the spacing of the inputs cannot be resolved at the data: in float32 the
    covariance turned singular after a few Adam steps, and the error said "lower the learning rate --lr", which does
    not help (the same run fails at --lr 0.001). The error names --period and the sampling step instead."""
    from bma_gp.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["--max-rows", "1000", "--method", "sgpr", "--dtype", "float32", "--iters", "5", "--no-progress"]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--no-plot", "--period", "0.0096", "--out", "out"])
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("bma-gp: error:"))
    assert info.value.code == 2 and "Traceback" not in err
    assert "training the sgpr GP diverged" in line
    assert "--period 0.0096 is shorter than twice the sampling step of 'date'" in line, line
    assert "lower the learning rate" not in line


def test_cli_short_period_check_leaves_resolvable_periods_alone():
    from bma_gp.cli.arguments import parse_config
    from bma_gp.cli.data import load_dataset, split
    from bma_gp.cli.run import _short_period

    for period, short in [("1", False), ("0.05", False), ("0.03", True)]:
        config = parse_config(["--period", period, "--no-plot"])
        loaded = load_dataset(config)
        problem = split(loaded, config.test_fraction, config.split, torch.Generator().manual_seed(0))
        assert (_short_period(config, problem) is not None) == short, period  # weekly data: 0.0192 apart
