"""lme4's InstEval (y ~ service + (1 | s) + (1 | d) + (1 | dept)), 80 % of the rows to fit and 20 % (14,685) held
out, seed 0: the GP's fit and its predictive mean and variance at the held-out rows against gpboost's exact fit and
prediction (`predict_response=True`: the noise included, as the likelihood's marginal). Run from a checkout:

    PYTHONPATH=. python docs/results/session34_insteval_predict.py
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from session33_mixed_trial import MixedGP, PeakMemory, codes, fit_lbfgs, rdataset  # noqa: E402

from bma_gp import GroupKernel  # noqa: E402
from bma_gp._warnings import ClosedFormFallbackWarning  # noqa: E402


def main() -> None:
    warnings.simplefilter("error", ClosedFormFallbackWarning)
    df = rdataset("lme4", "InstEval")
    s, d, dept = codes(df.s), codes(df.d), codes(df.dept)
    y = torch.tensor(df.y.to_numpy(float))
    ids = [torch.tensor(c).double() for c in (s, d, dept)]
    x = torch.stack([torch.tensor(df.service.to_numpy(float)), *ids], -1)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    ntr = int(0.8 * len(y))
    tr, te = perm[:ntr], perm[ntr:]
    mu, sd = y[tr].mean(), y[tr].std()
    ys = (y - mu) / sd
    covar = (
        GroupKernel(int(s.max()) + 2, active_dims=[1])
        + GroupKernel(int(d.max()) + 2, active_dims=[2])
        + GroupKernel(int(dept.max()) + 2, active_dims=[3])
    )
    gp = MixedGP(x[tr], ys[tr], covar)
    start = time.perf_counter()
    fit_lbfgs(gp, x[tr], ys[tr], rounds=1)
    print(f"GP fit on {ntr} rows: {time.perf_counter() - start:.1f} s")
    gp.eval()
    times = []
    with PeakMemory() as mem, torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            pred = gp.likelihood(gp(x[te]))
            mean, var = pred.mean, pred.variance
            times.append(time.perf_counter() - start)
    m, v = mean * sd + mu, var * sd**2
    rmse = float(((m - y[te]) ** 2).mean().sqrt())
    nlpd = float((0.5 * torch.log(2 * math.pi * v) + 0.5 * (y[te] - m) ** 2 / v).mean())
    print(
        f"GP predictive mean and variance at {len(te)} rows: {', '.join(f'{t:.2f}' for t in times)} s "
        f"(peak RSS growth {mem.peak_bytes / 2**20:.0f} MB); RMSE {rmse:.6f}, NLPD {nlpd:.6f}"
    )
    import gpboost as gpb

    design = np.column_stack([np.ones(len(y)), df.service.to_numpy(float)])
    groups = np.column_stack([s, d, dept])
    start = time.perf_counter()
    gpm = gpb.GPModel(group_data=groups[tr.numpy()], likelihood="gaussian", matrix_inversion_method="cholesky")
    gpm.fit(y=y[tr].numpy(), X=design[tr.numpy()], params={"trace": False})
    print(f"gpboost fit (cholesky): {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    p = gpm.predict(
        group_data_pred=groups[te.numpy()], X_pred=design[te.numpy()], predict_var=True, predict_response=True
    )
    gb_s = time.perf_counter() - start
    gm, gv = np.asarray(p["mu"]), np.asarray(p["var"])
    print(
        f"gpboost prediction: {gb_s:.2f} s; RMSE {float(np.sqrt(np.mean((gm - y[te].numpy()) ** 2))):.6f}; "
        f"GP against gpboost: means at most {float(np.abs(gm - m.numpy()).max()):.2e} apart, variances "
        f"{float(np.abs(gv - v.numpy()).max() / gv.max()):.2e} relative"
    )


if __name__ == "__main__":
    main()
