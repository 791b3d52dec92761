"""One GP training step on elecdemand: block mean (k-means, k = 400) against SGPR (m = 400), issue 13.

The models are those of ``examples/evaluate_gp.py`` (constant mean, ``ScaleKernel(RBFKernel(ARD))``,
Gaussian likelihood; SGPR's inducing points at k-means centres), trained on the same split of the
elecdemand data (n_train = 14,016, d = 3). A step is ``-ExactMarginalLogLikelihood``, ``backward`` and one
Adam step. After one warm-up step, ``--repeats`` steps of each method are timed, interleaved so that a busy
moment hits both; the best of each is reported with the ratio block mean / SGPR (target: <= 1).

    python examples/bench_elecdemand_step.py                          # float32 and float64, torch's threads
    python examples/bench_elecdemand_step.py --threads 1 --profile    # and the top operators of each step
    python examples/bench_elecdemand_step.py --smoke                  # 1,500 rows, k = 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import gpytorch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate_gp as ev  # noqa: E402  (the models and data of the evaluation)


def build(spec, data):
    model, info = ev.build_model(spec, data, 0, 2000)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    x, y = model.train_inputs[0], model.train_targets

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()

    return step, info


def profile_table(step, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def run(dtype: torch.dtype, k: int, repeats: int, max_rows: int | None, show_profile: bool) -> dict:
    x, y, _ = ev.load_elecdemand()
    if max_rows:
        x, y = x[:max_rows], y[:max_rows]
    data = ev.make_split(x, y, 0, 0.2, dtype)
    specs = {"sgpr": ev.FitSpec("sgpr", k), "blockmean": ev.FitSpec("blockmean", k, "kmeans")}
    steps = {}
    for name, spec in specs.items():
        steps[name], _ = build(spec, data)
        steps[name]()  # warm-up
    from bma_gp._kernel_sums import jit

    if jit.usable("cpu", dtype):  # the block mean step again with torch's tile reduction instead of numba's kernel
        torch_tiles, _ = build(specs["blockmean"], data)

        def blockmean_torch_tiles():
            jit.BACKEND = "torch"
            try:
                torch_tiles()
            finally:
                jit.BACKEND = "numba"

        steps["blockmean_torch_tiles"] = blockmean_torch_tiles
        blockmean_torch_tiles()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in times.items()}
    record = {
        "bench": "elecdemand_step",
        "dtype": str(dtype).split(".")[-1],
        "n_train": int(data.x_train.shape[0]),
        "k": k,
        "blockmean_s": best["blockmean"],
        "sgpr_s": best["sgpr"],
        "ratio": best["blockmean"] / best["sgpr"],
        "tile_backend": "numba" if "blockmean_torch_tiles" in best else "torch",
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0],
    }
    if "blockmean_torch_tiles" in best:
        record["blockmean_torch_tiles_s"] = best["blockmean_torch_tiles"]
        record["ratio_torch_tiles"] = best["blockmean_torch_tiles"] / best["sgpr"]
    if show_profile:
        for name, step in steps.items():
            print(f"## {name} ({record['dtype']}): top operators of one step\n{profile_table(step)}", flush=True)
    return record


DTYPES = ("float32", "float64")


def _dtypes(text: str) -> list[str]:
    """``--dtypes``: a comma-separated list of float32 / float64 (argparse names the option in front)."""
    names = text.split(",")
    unknown = [name for name in names if name not in DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(DTYPES)}")
    repeated = sorted({str(v) for v in names if names.count(v) > 1})
    if repeated:  # the same runs twice, in two rows
        raise argparse.ArgumentTypeError(f"{','.join(repeated)} given twice in {text!r}; name each once")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", type=_dtypes, default="float32,float64", help="comma-separated, of float32,float64")
    parser.add_argument("--k", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults: an option given explicitly still wins
        parser.set_defaults(k=40, repeats=2)
        args = parser.parse_args(argv)
    for option, value in (("--k", args.k), ("--repeats", args.repeats), ("--threads", args.threads)):
        if value is not None and value < 1:  # a usage error, not a traceback or inf / nan after the run
            parser.error(f"{option} must be at least 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = 1500 if args.smoke else None
    for name in args.dtypes:
        r = run(getattr(torch, name), args.k, args.repeats, rows, args.profile)
        print(json.dumps(r), flush=True)
        print(
            f"# elecdemand n = {r['n_train']:,}, k = m = {r['k']}, {r['dtype']}: block mean step "
            f"{r['blockmean_s']:.3f} s ({r['tile_backend']} tiles), SGPR {r['sgpr_s']:.3f} s, ratio {r['ratio']:.2f}"
            + (f"; torch tiles {r['blockmean_torch_tiles_s']:.3f} s" if "blockmean_torch_tiles_s" in r else "")
            + f" ({r['threads']} threads, load {r['load_avg']:.1f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
