"""Closed-form sums: a per-point diagonal, two crossed partitions and a low-rank root.

The operator is ``diag(d) + P_1 B_1 P_1^T + P_2 B_2 P_2^T + U U^T`` with non-constant ``d``, a dense
positive definite ``B_1`` (``k_1`` levels), a diagonal ``B_2`` (``k_2`` levels: per-level variances, given
as a vector with ``diagonal=True``; the grouping that is eliminated first) and ``U`` of rank ``m``, built by
adding operators the way a user would (``M1 + M2 + LowRankRootLinearOperator(U) + DiagLinearOperator(d)``).

Parts (one JSON line each, then a readable line):

* ``large``: ``inv_quad_logdet`` plus backward to every input at ``n = 10^6`` (``k_1 = 1000``,
  ``k_2 = 5000``, ``m = 256``), wall time and peak resident memory of the process.
* ``cg``: the same kind of operator at ``n = 2 x 10^4`` (with the same levels and rank, and with levels
  in proportion to ``n``: ``k = 100 x 500``, ``m = 64``) against linear_operator's generic path on the
  same matrix (a ``SumLinearOperator`` of the same summands at ``max_cholesky_size(0)``: CG and
  stochastic Lanczos quadrature), forward plus backward, timed in the same run.
* ``exact``: relative error of the closed form and of the generic path against dense Cholesky at
  ``n = 2000`` in float64.
* ``agree`` (not in ``all``; run it as its own process, since it holds float64 copies at ``n = 10^6`` that
  would count in the ``large`` part's peak memory): the ``large`` operator's ``inv_quad``, ``logdet``,
  ``solve`` and the gradients to ``B_1``, ``v_2``, ``d`` and ``U`` in float32 against float64 on the same
  entries (the float32 inputs cast up), as relative errors (norms for vectors and matrices), with the root's
  products in float64 (the default) and in float32 (``bma_gp.settings.fast_root_products``).

    python examples/bench_compositions.py                  # all parts
    python examples/bench_compositions.py --part large --dtype float64
    python examples/bench_compositions.py --part agree     # float32 against float64 at n = 10^6
    python examples/bench_compositions.py --smoke          # tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import gpytorch
import linear_operator
import torch
from linear_operator.operators import DiagLinearOperator, LowRankRootLinearOperator, SumLinearOperator

import bma_gp
from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, Partition


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_inputs(n: int, k1: int, k2: int, m: int, dtype: torch.dtype, seed: int = 0, noise: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    labels1 = torch.randperm(n, generator=gen) % k1  # scattered labels, every level used
    labels2 = torch.randperm(n, generator=gen) % k2
    W = torch.randn(k1, k1, generator=gen, dtype=dtype) / k1**0.5
    return {
        "p1": Partition.from_labels(labels1),
        "p2": Partition.from_labels(labels2),
        "B1": W @ W.mT * 0.1,
        "v2": torch.rand(k2, generator=gen, dtype=dtype) * 0.5 + 0.1,
        "d": (torch.rand(n, generator=gen, dtype=dtype) + 0.5) * noise,
        "U": torch.randn(n, m, generator=gen, dtype=dtype) / m**0.5,
        "y": torch.randn(n, generator=gen, dtype=dtype),
    }


def leaves(inputs: dict) -> dict:
    """The inputs as fresh leaves that need gradients (no copies: ``U`` alone is 1 GB at full size)."""
    return {name: inputs[name].detach().requires_grad_(True) for name in ("B1", "v2", "d", "U")}


def summands(inputs: dict, x: dict) -> list:
    """``M1``, ``M2`` (per-level variances held as their diagonal), ``U U^T`` and ``diag(d)``."""
    dtype = x["d"].dtype
    p1, p2 = inputs["p1"], inputs["p2"]
    return [
        BlockMeanLinearOperator(torch.zeros(p1.num_blocks, dtype=dtype), x["B1"], p1),
        BlockMeanLinearOperator(torch.zeros(p2.num_blocks, dtype=dtype), x["v2"], p2, diagonal=True),
        LowRankRootLinearOperator(x["U"]),
        DiagLinearOperator(x["d"]),
    ]


def closed_form(inputs: dict, x: dict):
    M1, M2, low_rank, diag = summands(inputs, x)
    M = M1 + M2 + low_rank + diag
    assert isinstance(M, BlockMeanSumLinearOperator), type(M)
    return M


class GenericSum(SumLinearOperator):
    """linear_operator's ``SumLinearOperator``, left to linear_operator's generic path.

    bma_gp routes a ``SumLinearOperator`` built directly around its operators to the closed form (so that no user
    gets CG without asking for it), and a subclass is not routed. From e582a24 (6 December 2026) to 7 December
    this suite built the plain class, so that both sides of ``cg`` were the closed form (0 CG products, "1x"); the
    part now raises where the generic side asked for no product."""


def generic(inputs: dict, x: dict):
    """The same summands in linear_operator's own sum (:class:`GenericSum`: CG and Lanczos, no closed form)."""
    return GenericSum(*summands(inputs, x))


def step(build, inputs: dict, cpu: bool = False):
    """(seconds forward + backward, inverse quadratic form, log-determinant[, process CPU seconds])."""
    x = leaves(inputs)
    start, start_cpu = time.perf_counter(), time.process_time()
    M = build(inputs, x)
    inv_quad, logdet = M.inv_quad_logdet(inputs["y"], logdet=True)
    (inv_quad + logdet).backward()
    res = (time.perf_counter() - start, float(inv_quad.detach()), float(logdet.detach()))
    return (*res, time.process_time() - start_cpu) if cpu else res


def part_large(n: int, k1: int, k2: int, m: int, dtype: torch.dtype) -> dict:
    inputs = make_inputs(n, k1, k2, m, dtype)
    rss_inputs = _peak_rss_mb()
    seconds, inv_quad, logdet, cpu_seconds = step(closed_form, inputs, cpu=True)
    return {
        "bench": "compositions_large",
        "n": n,
        "k1": k1,
        "k2": k2,
        "m": m,
        "dtype": str(dtype).split(".")[-1],
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_inputs_mb": rss_inputs,
        "inv_quad": inv_quad,
        "logdet": logdet,
    }


def gram_floor(inputs: dict) -> float:
    """Seconds for ``U^T D^{-1} U`` and its gradient with respect to ``U`` and ``d``, alone and at the fewest
    operations (``V = D^{-1/2} U``, one GEMM ``V^T V`` forward, one ``V (W + W^T)`` backward, no autograd): the
    part of the closed form that SPEC section 5 prices at ``O(n m^2)`` and that no other step can avoid. The closed
    form's speedup over CG cannot pass (CG seconds) / (these seconds)."""
    U, d = inputs["U"], inputs["d"]
    upstream = torch.randn(U.shape[-1], U.shape[-1], dtype=U.dtype, generator=torch.Generator().manual_seed(3))
    start = time.perf_counter()
    with torch.no_grad():
        scale = d.rsqrt().unsqueeze(-1)
        V = U * scale
        _ = V.mT @ V  # forward
        grad_V = V @ (upstream + upstream.mT)  # backward
        _ = grad_V * scale  # dU
        _ = -0.5 * (grad_V * V).sum(-1) / d  # dd
    return time.perf_counter() - start


class _CountProducts:
    """Counts the products (and their columns) linear_operator's generic path asks of the sum."""

    def __init__(self):
        self.calls = self.columns = 0
        self._original = SumLinearOperator._matmul

    def __enter__(self):
        counter = self

        def counted(op, rhs):
            counter.calls += 1
            counter.columns += rhs.shape[-1] if rhs.dim() > 1 else 1
            return counter._original(op, rhs)

        SumLinearOperator._matmul = counted
        return self

    def __exit__(self, *exc):
        SumLinearOperator._matmul = self._original


def part_cg(n: int, k1: int, k2: int, m: int, dtype: torch.dtype, repeats: int, noise: float = 1.0) -> dict:
    inputs = make_inputs(n, k1, k2, m, dtype, seed=1, noise=noise)
    ours, theirs, floor = [], [], []
    with gpytorch.settings.max_cholesky_size(0), linear_operator.settings.max_cholesky_size(0):
        step(closed_form, inputs)  # warm-up
        gram_floor(inputs)
        with _CountProducts() as products:
            step(generic, inputs)
        if products.calls == 0:
            raise RuntimeError(
                "the generic side of the cg part asked the sum for no product: it is not linear_operator's CG path "
                "(bma_gp routed it to the closed form?), so the ratio would compare the closed form with itself"
            )
        for _ in range(repeats):  # interleaved: a busy moment hits all three
            ours.append(step(closed_form, inputs)[0])
            theirs.append(step(generic, inputs)[0])
            floor.append(gram_floor(inputs))
    best_ours, best_theirs = min(ours), min(theirs)
    return {
        "bench": "compositions_vs_cg",
        "n": n,
        "k1": k1,
        "k2": k2,
        "m": m,
        "dtype": str(dtype).split(".")[-1],
        "closed_form_s": best_ours,
        "generic_cg_s": best_theirs,
        "speedup": best_theirs / best_ours,
        "noise_scale": noise,
        "gram_floor_s": min(floor),
        "speedup_ceiling": best_theirs / min(floor),
        "cg_products": products.calls,
        "cg_product_columns": products.columns,
    }


def part_exact(n: int, k1: int, k2: int, m: int) -> dict:
    inputs = make_inputs(n, k1, k2, m, torch.float64, seed=2)
    x = {name: inputs[name] for name in ("B1", "v2", "d", "U")}
    dense = closed_form(inputs, x).to_dense()
    L = torch.linalg.cholesky(dense)
    y = inputs["y"]
    ref_quad = float((torch.cholesky_solve(y.unsqueeze(-1), L).squeeze(-1) * y).sum())
    ref_logdet = float(2 * torch.diagonal(L).log().sum())
    res = {"bench": "compositions_exactness", "n": n, "k1": k1, "k2": k2, "m": m, "dtype": "float64"}
    for name, build in (("closed_form", closed_form), ("generic_cg", generic)):
        with gpytorch.settings.max_cholesky_size(0), linear_operator.settings.max_cholesky_size(0):
            quad, logdet = build(inputs, x).inv_quad_logdet(y, logdet=True)
        res[f"{name}_inv_quad_rel_err"] = abs(float(quad) - ref_quad) / abs(ref_quad)
        res[f"{name}_logdet_rel_err"] = abs(float(logdet) - ref_logdet) / abs(ref_logdet)
    return res


def _answers(inputs: dict) -> dict:
    """``inv_quad``, ``logdet``, ``solve(y)`` and the gradients of ``inv_quad + logdet``, as float64 tensors."""
    x = leaves(inputs)
    M = closed_form(inputs, x)
    inv_quad, logdet = M.inv_quad_logdet(inputs["y"], logdet=True)
    (inv_quad + logdet).backward()
    with torch.no_grad():
        solve = M.solve(inputs["y"].unsqueeze(-1)).squeeze(-1)
    out = {"inv_quad": inv_quad.detach(), "logdet": logdet.detach(), "solve": solve}
    out.update({f"grad_{name}": leaf.grad for name, leaf in x.items()})
    return {name: value.double() for name, value in out.items()}


def part_agree(n: int, k1: int, k2: int, m: int, noise: float = 1.0) -> dict:
    """float32 answers against float64 ones on the same entries (the float32 inputs cast up), relative errors."""
    inputs32 = make_inputs(n, k1, k2, m, torch.float32, seed=4, noise=noise)
    inputs64 = {name: v.double() if torch.is_tensor(v) else v for name, v in inputs32.items()}
    start = time.perf_counter()
    reference = _answers(inputs64)
    seconds64 = time.perf_counter() - start
    del inputs64
    res = {"bench": "compositions_agreement", "n": n, "k1": k1, "k2": k2, "m": m, "noise_scale": noise}
    res["float64_s"] = seconds64
    for label, fast in (("", False), ("fast_", True)):
        with bma_gp.settings.fast_root_products(fast):
            start = time.perf_counter()
            got = _answers(inputs32)
            res[f"{label}float32_s"] = time.perf_counter() - start
        errors = {
            name: float(torch.linalg.vector_norm(got[name] - ref) / torch.linalg.vector_norm(ref))
            for name, ref in reference.items()
        }
        res[f"{label}rel_err"] = errors
        res[f"{label}max_rel_err"] = max(errors.values())
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("large", "cg", "exact", "agree", "all"), default="all")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument(
        "--noise",
        type=float,
        default=None,
        help="instead of the CG part: the n = 2x10^4 comparison (--smoke: the smoke size) with d scaled by this; "
        "with --part agree, the agreement's operator with d scaled by this",
    )
    parser.add_argument(
        "--fast-root-products",
        action="store_true",
        help="the large part under bma_gp.settings.fast_root_products(True): a float32 root's products in float32",
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:  # 0 was ignored, < 0 a traceback from torch
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.noise is not None and not args.noise > 0:  # a diagonal d <= 0: no positive definite sum to time
        parser.error(f"--noise must be positive (it scales the noise diagonal d), got {args.noise:g}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    large = (2000, 20, 50, 8) if args.smoke else (1_000_000, 1000, 5000, 256)
    cg = (600, 10, 30, 4) if args.smoke else (20_000, 1000, 5000, 256)
    exact = (300, 10, 30, 4) if args.smoke else (2000, 100, 500, 32)
    records = []
    if args.part == "agree":
        records.append(part_agree(*large, noise=1.0 if args.noise is None else args.noise))
    if args.part in ("exact", "all"):
        records.append(part_exact(*exact))
    # --smoke: at the smoke sizes of the CG comparison (was always n = 2x10^4)
    if args.noise is not None and args.part != "agree":
        sizes, repeats = (cg, 1) if args.smoke else ((20_000, 100, 500, 64), 3)
        records.append(part_cg(*sizes, dtype=torch.float64, repeats=repeats, noise=args.noise))
    elif args.part in ("cg", "all"):
        records.append(part_cg(*cg, dtype=torch.float64, repeats=1 if args.smoke else 3))
        if not args.smoke:  # levels in proportion to n (about 200 and 40 points per level), m = 64
            records.append(part_cg(20_000, 100, 500, 64, dtype=torch.float64, repeats=3))
            # GP-like conditioning: a noise diagonal 100x smaller than the group variances
            records.append(part_cg(20_000, 100, 500, 64, dtype=torch.float64, repeats=3, noise=0.01))
    if args.part in ("large", "all"):
        with bma_gp.settings.fast_root_products(args.fast_root_products):
            records.append(part_large(*large, dtype=dtype))
        records[-1]["fast_root_products"] = args.fast_root_products
    for r in records:
        r["threads"] = torch.get_num_threads()
        r["load_avg"] = os.getloadavg()[0]
        print(json.dumps(r), flush=True)
    for r in records:
        if r["bench"] == "compositions_large":
            print(
                f"# n = {r['n']:,}, k = {r['k1']} x {r['k2']}, m = {r['m']}, {r['dtype']}: inv_quad_logdet + backward "
                f"{r['seconds']:.2f} s (process CPU time {r['cpu_seconds']:.2f} s, {r['threads']} threads, load "
                f"{r['load_avg']:.1f}; root products in "
                f"{'float32' if r['fast_root_products'] and r['dtype'] == 'float32' else 'float64'}"
                f"), peak RSS {r['peak_rss_mb'] / 1024:.2f} GB"
            )
        elif r["bench"] == "compositions_vs_cg":
            print(
                f"# n = {r['n']:,}, k = {r['k1']} x {r['k2']}, m = {r['m']}: closed form {r['closed_form_s']:.3f} s, "
                f"generic CG path {r['generic_cg_s']:.2f} s ({r['speedup']:.0f}x; {r['cg_products']} products with "
                f"{r['cg_product_columns']} columns in all); U^T D^-1 U and its gradient alone "
                f"{r['gram_floor_s'] * 1e3:.1f} ms, so at most {r['speedup_ceiling']:.0f}x"
            )
        elif r["bench"] == "compositions_agreement":
            worst = max(r["rel_err"], key=r["rel_err"].get)
            fast = max(r["fast_rel_err"], key=r["fast_rel_err"].get)
            print(
                f"# n = {r['n']:,}, k = {r['k1']} x {r['k2']}, m = {r['m']}, noise x {r['noise_scale']:g}: float32 "
                "against float64 on the same "
                f"entries, largest relative error {r['max_rel_err']:.1e} ({worst}; root products in float64), "
                f"{r['fast_max_rel_err']:.1e} ({fast}) with fast_root_products; float32 {r['float32_s']:.1f} s / "
                f"{r['fast_float32_s']:.1f} s, float64 {r['float64_s']:.1f} s"
            )
        else:
            print(
                f"# n = {r['n']}, float64, relative error vs dense Cholesky: closed form inv_quad "
                f"{r['closed_form_inv_quad_rel_err']:.1e}, logdet {r['closed_form_logdet_rel_err']:.1e}; generic CG "
                f"path inv_quad {r['generic_cg_inv_quad_rel_err']:.1e}, logdet {r['generic_cg_logdet_rel_err']:.1e}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
