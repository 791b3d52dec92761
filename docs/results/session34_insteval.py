"""lme4's InstEval, y ~ service + (1 | s) + (1 | d) + (1 | dept) (n = 73,421; 2,972 x 1,128 x 14 crossed levels):
the time of one training evaluation (forward and backward of the exact marginal log-likelihood, the students
eliminated in closed form) and of the L-BFGS fit of docs/results/session33_mixed_trial.py, beside gpboost's exact
(Cholesky) and default fits. Run from a checkout (PYTHONPATH picks the code measured):

    PYTHONPATH=. python docs/results/session34_insteval.py [--no-gpboost]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import gpytorch
import torch

sys.path.insert(0, os.path.dirname(__file__))
from session33_mixed_trial import MixedGP, PeakMemory, codes, fit_lbfgs, rdataset  # noqa: E402

import bma_gp  # noqa: E402
from bma_gp import GroupKernel  # noqa: E402


def main() -> None:
    df = rdataset("lme4", "InstEval")
    s, d, dept = codes(df.s), codes(df.d), codes(df.dept)
    y = torch.tensor(df.y.to_numpy(float))
    ys = (y - y.mean()) / y.std()
    x = torch.stack([torch.tensor(df.service.to_numpy(float))] + [torch.tensor(c).double() for c in (s, d, dept)], -1)

    def model() -> MixedGP:
        covar = (
            GroupKernel(int(s.max()) + 1, active_dims=[1])
            + GroupKernel(int(d.max()) + 1, active_dims=[2])
            + GroupKernel(int(dept.max()) + 1, active_dims=[3])
        )
        return MixedGP(x, ys, covar)

    gp = model()
    gp.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(gp.likelihood, gp)
    fw, bw = [], []
    for _ in range(12):
        gp.zero_grad()
        t0 = time.perf_counter()
        loss = -mll(gp(x), ys)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        fw.append(t1 - t0)
        bw.append(t2 - t1)
    fw, bw = fw[2:], bw[2:]  # the first two build caches (the groups' partitions, the tables' row orders)
    print(
        f"one evaluation (median of 10 after 2): forward {statistics.median(fw) * 1e3:.0f} ms, "
        f"backward {statistics.median(bw) * 1e3:.0f} ms"
    )
    gp = model()
    evals = []
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        original = gp.forward

        def counted(inputs):
            evals.append(1)
            return original(inputs)

        gp.forward = counted
        ll = fit_lbfgs(gp, x, ys, rounds=1)
        fit_s = time.perf_counter() - t0
    print(
        f"GP fit (L-BFGS as in the session 33 trial): {fit_s:.1f} s, {len(evals)} model calls, peak RSS growth "
        f"{mem.peak_bytes / 2**20:.0f} MB, loglik (standardised y) {ll:.4f}"
    )
    if "--no-gpboost" in sys.argv:
        return
    import gpboost as gpb
    import numpy as np

    design = np.column_stack([np.ones(len(y)), df.service.to_numpy(float)])
    for method in ["cholesky", "default"]:
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            gpm = gpb.GPModel(
                group_data=np.column_stack([s, d, dept]), likelihood="gaussian", matrix_inversion_method=method
            )
            gpm.fit(y=y.numpy(), X=design, params={"trace": False})
            gb_s = time.perf_counter() - t0
        print(
            f"gpboost ({method}): {gb_s:.1f} s, peak RSS growth {mem.peak_bytes / 2**20:.0f} MB, reported loglik "
            f"{-gpm.get_current_neg_log_likelihood():.4f} (original y)"
        )
    where = os.path.dirname(bma_gp.__file__)
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=where
    ).stdout.strip()
    print(f"bma_gp {bma_gp.__version__} (git {rev}), torch {torch.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
