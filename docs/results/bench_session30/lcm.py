"""Session 30: an ``LCMKernel`` of two ``BlockMeanKernel``s (t = 2 tasks, Q = 2 terms, k = 50 blocks) under a
``MultitaskGaussianLikelihood(rank=1)``: one marginal-likelihood step with backward and one prediction of 100 new
points (means and variances), at n = 2000 and 5000, with the bma_gp on ``PYTHONPATH``.

Each phase is timed ``repeats`` times after one warm-up run (median and minimum; one thread, as the machine is
shared); every phase runs in a fresh process, whose first run gives the peak memory (the peak resident set size
over the size after setup, Linux's ``/proc/self/clear_refs``); the loss and the predictions are compared with a
dense float64 reference (the dense ``n t x n t`` covariance factorised by ``torch.linalg.cholesky``, in its own
process). Before session 30 the training covariance was linear_operator's generic sum (CG and Lanczos past
``max_cholesky_size`` = 800, GPyTorch's default) and the prediction GPyTorch's default strategy; after, the closed
form.

Usage: ``PYTHONPATH=<checkout> python docs/results/bench_session30/lcm.py [--n 2000 5000] [--repeats 5]``
(``--child PHASE N`` is the per-measurement process)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

K_BLOCKS, TASKS, TEST_POINTS = 50, 2, 100


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _setup(n: int):
    import gpytorch
    import torch

    from bma_gp import BlockMeanKernel, Partition

    torch.set_num_threads(1)  # the machine is shared: two threads against a busy neighbour stalled 10-70x
    torch.manual_seed(0)  # (GPyTorch's IndexKernel draws its covar_factor from the global generator)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, generator=gen, dtype=torch.float64)
    perm = torch.randperm(K_BLOCKS, generator=gen)
    labels = perm[(x[:, 0] * K_BLOCKS).long().clamp(max=K_BLOCKS - 1)]  # non-contiguous labels
    labels[torch.randperm(n, generator=gen)[: n // 10]] = torch.randint(0, K_BLOCKS, (n // 10,), generator=gen)
    part = Partition.from_labels(labels)
    y = torch.stack([torch.sin(6 * x[:, 0]), torch.cos(4 * x[:, 0])], -1)
    y = y + 0.3 * torch.randn(n, TASKS, generator=gen, dtype=torch.float64)
    xt = torch.rand(TEST_POINTS, 1, generator=gen, dtype=torch.float64)

    class LCM(gpytorch.models.ExactGP):
        def __init__(self):
            likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=TASKS, rank=1)
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), num_tasks=TASKS)
            bases = [
                BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, part),
                gpytorch.kernels.ScaleKernel(BlockMeanKernel(gpytorch.kernels.MaternKernel(nu=1.5), x, part)),
            ]
            self.covar_module = gpytorch.kernels.LCMKernel(bases, num_tasks=TASKS, rank=1)

        def forward(self, inputs):
            return gpytorch.distributions.MultitaskMultivariateNormal(
                self.mean_module(inputs), self.covar_module(inputs)
            )

    model = LCM().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, x, y, xt


def _child(phase: str, n: int, repeats: int) -> dict:
    import warnings

    import gpytorch
    import torch

    model, x, y, xt = _setup(n)
    out: dict = {"phase": phase, "n": n}
    if phase == "dense":  # the float64 reference: dense covariance, torch.linalg.cholesky
        with torch.no_grad():
            model.train()
            prior = model.likelihood(model(x))
            S = prior.lazy_covariance_matrix.to_dense()
            r = (y - prior.mean).reshape(-1)
            L = torch.linalg.cholesky(S)
            a = torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
            logdet = 2 * L.diagonal().log().sum()
            loss = 0.5 * (r @ a + logdet + r.numel() * math.log(2 * math.pi)) / r.numel()
            joint = model.covar_module(torch.cat([x, xt])).to_dense()
            nt = y.numel()
            cross = joint[nt:, :nt]
            mean = model.mean_module(xt).reshape(-1) + cross @ a
            V = torch.linalg.solve_triangular(L, cross.T, upper=False)
            var = joint[nt:, nt:].diagonal() - V.square().sum(0)
        out.update(loss=loss.item(), mean=mean.tolist(), var=var.tolist())
        return out
    warned: list[str] = []
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    if phase == "train":
        model.train()
        times = []
        for i in range(repeats + 1):
            model.zero_grad()
            import gc

            gc.collect()
            if i == 0:  # the peak of one step in a fresh process (the first)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                before = _status("VmRSS")
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss = -mll(model(x), y)
                loss.backward()
            times.append(time.perf_counter() - start)
            if i == 0:
                out["peak_mb"] = (_status("VmHWM") - before) / 2**20
            warned += [f"{w.category.__name__}: {str(w.message)[:90]}" for w in caught]
        out.update(loss=loss.item(), seconds=sorted(times[1:])[len(times[1:]) // 2], seconds_min=min(times[1:]))
        out["operator"] = type(model.likelihood(model(x)).lazy_covariance_matrix).__name__
    else:
        fast = phase == "predict_fast"
        model.eval()
        times = []
        for i in range(repeats + 1):
            # a fresh strategy each time: the step after training (the caches built from scratch)
            model.prediction_strategy = None
            import gc

            gc.collect()
            if i == 0:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                before = _status("VmRSS")
            start = time.perf_counter()
            with torch.no_grad(), gpytorch.settings.fast_pred_var(fast), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pred = model(xt)
                mean, var = pred.mean.reshape(-1), pred.variance.reshape(-1)
            times.append(time.perf_counter() - start)
            if i == 0:
                out["peak_mb"] = (_status("VmHWM") - before) / 2**20
            warned += [f"{w.category.__name__}: {str(w.message)[:90]}" for w in caught]
        out.update(mean=mean.tolist(), var=var.tolist(), seconds=sorted(times[1:])[len(times[1:]) // 2])
        out["seconds_min"] = min(times[1:])
        out["strategy"] = type(model.prediction_strategy).__name__
    out["warnings"] = sorted(set(warned))
    return out


def _run(phase: str, n: int, repeats: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", phase, str(n), "--repeats", str(repeats)],
        capture_output=True,
        text=True,
        timeout=3000,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, nargs="+", default=[2000, 5000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("PHASE", "N"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), args.repeats)))
        return
    import bma_gp

    print(f"# bma_gp from {os.path.dirname(bma_gp.__file__)}; t = {TASKS}, Q = 2, k = {K_BLOCKS}, rank-1 noise")
    for n in args.n:
        ref = _run("dense", n, args.repeats)
        for phase in ("train", "predict", "predict_fast"):
            res = _run(phase, n, args.repeats)
            row = {"n": n, "phase": phase, "median_s": round(res["seconds"], 4), "min_s": round(res["seconds_min"], 4)}
            row["peak_mb"] = round(res["peak_mb"], 1)
            if phase == "train":
                row["loss"] = res["loss"]
                row["loss_error_vs_dense"] = abs(res["loss"] - ref["loss"])
                row["operator"] = res["operator"]
            else:
                row["mean_max_error"] = max(abs(a - b) for a, b in zip(res["mean"], ref["mean"]))
                row["var_max_rel_error"] = max(abs(a - b) / abs(b) for a, b in zip(res["var"], ref["var"]))
                row["strategy"] = res["strategy"]
            row["warnings"] = res["warnings"]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
