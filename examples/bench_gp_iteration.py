"""One GP training iteration: BlockMeanKernel against GPyTorch's exact GP (CG) and SGPR (issue 5).

An iteration is what a training loop repeats: ``-ExactMarginalLogLikelihood`` on all training
points, ``backward``, one Adam step. The model is the same for every method: constant mean,
``ScaleKernel(RBFKernel(ard_num_dims=d))``, ``GaussianLikelihood``, float32, synthetic inputs
``x ~ U[0, 1]^d`` (d = 4) with a smooth target plus noise. Methods:

* ``blockmean``: ``BlockMeanKernel`` on a k-means partition into ``k`` blocks (the partition is
  built once, before training, and timed separately as ``partition_s``);
* ``exact``: GPyTorch's exact GP under default settings (n > 800, so CG + Lanczos with a
  pivoted-Cholesky preconditioner). It evaluates the ``n x n`` kernel matrix, so it runs only
  up to ``--exact-max-n`` (default 20,000: 1.6 GB of float32 kernel entries; 50,000 would need
  10 GB for the matrix alone);
* ``sgpr``: ``InducingPointKernel`` with ``m = k`` inducing points (a random subset of the data).

Each (method, n, k) runs in a fresh subprocess so that its peak resident memory
(``ru_maxrss``; on CUDA also ``torch.cuda.max_memory_allocated``) belongs to it alone. The first
iteration is cold; the next ``--warm`` iterations (one from n = 50,000) are timed and the fastest is reported, with
the ratio to the exact GP's warm iteration at the same n measured in the same run. ``warm_cpu_s`` is the
process CPU time of that iteration (all threads): on a shared, loaded machine it moves far less than the
wall time, so the ratios are also given on it.

    python examples/bench_gp_iteration.py                    # n = 5k .. 100k (about 10 minutes on 2 cores)
    python examples/bench_gp_iteration.py --smoke            # seconds
    python examples/bench_gp_iteration.py --n 20000 --methods blockmean --ks 1000 --profile

Output: JSON lines on stdout (and appended to ``--out``), then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/: the shared _common module
from _common import check_out_file  # noqa: E402

FULL_NS = (5_000, 10_000, 20_000, 50_000, 100_000)
FULL_KS = (100, 1000)
CUDA_NS = (20_000, 100_000, 300_000, 1_000_000)
CUDA_KS = (1000,)
METHODS = ("exact", "blockmean", "sgpr")
#: From this n on, one warm iteration is timed (each takes a minute or more on 2 CPU cores).
BIG_N = 50_000


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_data(n: int, d: int, seed: int, device, dtype):
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=gen, dtype=torch.float64)
    f = torch.sin(6.0 * x[:, 0]) + torch.cos(4.0 * x[:, 1]) * x[:, 2] + 0.5 * x[:, 3:].sum(-1)
    y = f + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    y = (y - y.mean()) / y.std()
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def build_model(method: str, x, y, k: int, seed: int):
    """Returns (model, likelihood, seconds spent building the partition / inducing points)."""
    import gpytorch
    import torch

    from bma_gp import BlockMeanKernel
    from bma_gp.partition_builders import kmeans_partition

    d = x.shape[-1]
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=d))
    prep = 0.0
    if method == "blockmean":
        t0 = time.perf_counter()
        partition = kmeans_partition(x, k, seed=seed)
        prep = time.perf_counter() - t0
        covar = BlockMeanKernel(base, x, partition)  # the fused pass picks its tiles per device
    elif method == "sgpr":
        gen = torch.Generator().manual_seed(seed)
        inducing = x[torch.randperm(x.shape[0], generator=gen)[:k].to(x.device)].clone()
        covar = gpytorch.kernels.InducingPointKernel(base, inducing_points=inducing, likelihood=likelihood)
    elif method == "exact":
        covar = base
    else:
        raise ValueError(f"method must be blockmean, exact or sgpr, got {method!r}.")

    class Model(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = covar

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(inputs), self.covar_module(inputs))

    model = Model().to(device=x.device, dtype=x.dtype)
    return model, likelihood.to(device=x.device, dtype=x.dtype), prep


def run_case(method: str, n: int, k: int, d: int, warm: int, device_name: str, profile: bool) -> dict:
    """Runs in the child process: builds the model, times ``1 + warm`` iterations."""
    import gpytorch
    import torch

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    base_rss = _rss_mb()
    x, y = make_data(n, d, seed=0, device=device, dtype=torch.float32)
    model, likelihood, prep_s = build_model(method, x, y, k, seed=0)
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)

    def iteration() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach().item()

    def timed() -> tuple[float, float, float]:
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = iteration()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0, loss

    cold_s, _, _ = timed()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warm_times, cpu_times, losses = [], [], []
    for _ in range(warm):
        seconds, cpu_seconds, loss = timed()
        warm_times.append(seconds)
        cpu_times.append(cpu_seconds)
        losses.append(loss)
    record = {
        "bench": "gp_iteration",
        "method": method,
        "n": n,
        "k": k if method != "exact" else None,
        "d": d,
        "dtype": "float32",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cold_s": round(cold_s, 4),
        "warm_s": round(min(warm_times), 4),
        "warm_all_s": [round(t, 4) for t in warm_times],
        "warm_cpu_s": round(min(cpu_times), 4),
        "prep_s": round(prep_s, 4),
        "loss": round(losses[-1], 5),
        "peak_rss_mb": round(_rss_mb(), 1),
        "baseline_rss_mb": round(base_rss, 1),
    }
    if cuda:
        record["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if profile:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        iteration()
        prof.disable()
        stream = io.StringIO()
        pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(18)
        print(stream.getvalue(), file=sys.stderr)
        stream = io.StringIO()
        pstats.Stats(prof, stream=stream).sort_stats("cumulative").print_stats(30)
        print(stream.getvalue(), file=sys.stderr)
    return record


def _skip(method: str, n: int, k, reason: str, device: str) -> dict:
    return {
        "bench": "gp_iteration",
        "method": method,
        "n": n,
        "k": k,
        "dtype": "float32",
        "device": device,
        "skipped": reason,
    }


def plan(ns, ks, methods, exact_max_n: int, device: str) -> list[tuple[str, int, int | None, str | None]]:
    cases = []
    for n in ns:
        for method in methods:
            if method == "exact":
                reason = (
                    None
                    if n <= exact_max_n
                    else (
                        f"exact GP evaluates the n x n kernel matrix ({n * n * 4 / 2**30:.1f} GB in float32) "
                        f"and more for its backward; run only up to --exact-max-n {exact_max_n}"
                    )
                )
                cases.append(("exact", n, None, reason))
            else:  # k >= n is no approximation (and SGPR cannot draw k of n points): said in the table
                cases.extend((method, n, k, None if k < n else f"k = {k} is not below n = {n}") for k in ks)
    return cases


def table(records: list[dict]) -> str:
    exact = {r["n"]: r["warm_s"] for r in records if r.get("method") == "exact" and "warm_s" in r}
    lines = [
        "| n | method | k / m | warm iteration s | vs exact CG | CPU s | cold s | prep s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("bench") != "gp_iteration":
            continue
        if "warm_s" not in r:
            lines.append(
                f"| {r['n']:,} | {r['method']} | {r.get('k') or '-'} | - | - | - | - | - | "
                f"{r.get('skipped') or r.get('error')} |"
            )
            continue
        ratio = (
            "baseline"
            if r["method"] == "exact"
            else (f"{exact[r['n']] / r['warm_s']:.2f}x faster" if r["n"] in exact else "-")
        )
        peak = f"{r['peak_rss_mb']:.0f}" + (f" (cuda {r['cuda_peak_mb']:.0f})" if "cuda_peak_mb" in r else "")
        lines.append(
            f"| {r['n']:,} | {r['method']} | {r.get('k') or '-'} | {r['warm_s']:.3f} | {ratio} | "
            f"{r['warm_cpu_s']:.3f} | {r['cold_s']:.3f} | {r['prep_s']:.3f} | {peak} |"
        )
    return "\n".join(lines)


def _sizes(text: str) -> list[int]:
    """``--n`` / ``--ks``: comma-separated integers >= 1 (argparse names the option in front of the message)."""
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1000,5000, got {text!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    repeated = sorted({str(v) for v in sizes if sizes.count(v) > 1})
    if repeated:  # the same runs twice, in two rows
        raise argparse.ArgumentTypeError(f"{','.join(repeated)} given twice in {text!r}; name each once")
    return sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--n",
        type=_sizes,
        default=None,
        help="comma-separated training sizes (default 5k,10k,20k,50k,100k; on CUDA 20k .. 1M)",
    )
    parser.add_argument(
        "--ks",
        type=_sizes,
        default=None,
        help="blocks / inducing points (default 100,1000)",
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {','.join(METHODS)}")
    parser.add_argument("--d", type=int, default=4)
    parser.add_argument("--warm", type=int, default=2, help="timed warm iterations after the cold one")
    parser.add_argument(
        "--exact-max-n",
        type=int,
        default=None,
        help="largest n for the exact GP (default 20,000 on CPU, 50,000 on CUDA)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (skips cleanly when CUDA is missing)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per case before it is abandoned")
    parser.add_argument("--profile", action="store_true", help="cProfile one more iteration (to stderr)")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="n = 1,000, k = 20, one warm iteration, all cases in this process (seconds)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the cases here instead of one subprocess each (peak memory is then shared)",
    )
    parser.add_argument("--_case", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults: an option given explicitly still wins
        parser.set_defaults(n=[1_000], ks=[20], warm=1, in_process=True)
        args = parser.parse_args(argv)
    for option, value in (("--d", args.d), ("--warm", args.warm), ("--exact-max-n", args.exact_max_n)):
        if value is not None and value < 1:  # a usage error, not a traceback or inf / nan after the run
            parser.error(f"{option} must be at least 1, got {value}")
    if not args.timeout > 0:  # every case was abandoned at once
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    check_out_file(parser, args.out)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:  # each case of an unknown method was recorded as a failure; none ran nothing
        parser.error(f"--methods: {f'unknown {unknown}' if unknown else 'none given'}; choose from {','.join(METHODS)}")
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:  # the same cases twice, in two rows
        parser.error(f"--methods: {','.join(repeated)} given twice; name each once")
    import torch

    try:
        device_type = torch.device(args.device).type
    except RuntimeError:
        device_type = None
    if device_type not in ("cpu", "cuda"):  # was a traceback (in process) or a failed record per case
        parser.error(f"--device: {args.device!r} is not cpu, cuda or cuda:N")

    if args._case:
        method, n, k, d = args._case
        record = run_case(method, int(n), int(k), int(d), args.warm, args.device, args.profile)
        print(json.dumps(record), flush=True)
        return 0

    cuda = device_type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            print(
                json.dumps(
                    {"bench": "gp_iteration", "device": args.device, "skipped": "CUDA is not available on this machine"}
                ),
                flush=True,
            )
            return 0
    ns = args.n or list(CUDA_NS if cuda else FULL_NS)
    ks = args.ks or list(CUDA_KS if cuda else FULL_KS)
    exact_max_n = args.exact_max_n or (50_000 if cuda else 20_000)

    records = []
    out = open(args.out, "a") if args.out else None
    for method, n, k, reason in plan(ns, ks, methods, exact_max_n, args.device):
        if reason:
            record = _skip(method, n, k, reason, args.device)
        elif args.in_process:
            record = {**run_case(method, n, k or 0, args.d, args.warm, args.device, args.profile), "in_process": True}
        else:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--_case",
                method,
                str(n),
                str(k or 0),
                str(args.d),
                "--warm",
                str(args.warm if n < BIG_N else min(args.warm, 1)),
                "--device",
                args.device,
            ]
            cmd += ["--profile"] if args.profile else []
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                if args.profile:
                    sys.stderr.write(f"\n===== profile: {method} n={n} k={k}\n{done.stderr}")
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
                if done.returncode == 0 and lines:
                    record = json.loads(lines[-1])
                else:
                    tail = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
                    record = {**_skip(method, n, k, "", args.device), "error": f"exit {done.returncode}: {tail}"}
                    record.pop("skipped")
            except subprocess.TimeoutExpired:
                record = {**_skip(method, n, k, f"exceeded --timeout {args.timeout:.0f} s", args.device)}
        records.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()
    if out:
        out.close()
    print("\n" + table(records), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
