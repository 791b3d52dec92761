"""Where the time of kernel_block_mean's forward + backward goes at k = 10 and k = 2000 (RBF-ARD, n = 20,000, d = 3,
float32; docs/benchmarks.md, "Thirteenth session"): wall time per run in ms (mean of 3 runs after a warm-up) of the
pieces, by wrapping the engine's functions. Pieces nest: tile_sums and distances are inside block_sums, which is
inside fwd_total; lengthscale_gradient (with contract_kept) is inside Fbackward, inside bwd_total.

    python docs/results/bench_session13/kernel_k2000_breakdown.py
"""

import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))

from bench_kernel_block_mean import _kernel  # noqa: E402

from bma_gp._kernel_sums import jit  # noqa: E402
from bma_gp._kernel_sums import stationary as S  # noqa: E402
from bma_gp.kernel_block_mean import kernel_block_mean  # noqa: E402
from bma_gp.partition_builders import kmeans_partition  # noqa: E402

T: dict[str, float] = collections.defaultdict(float)


def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            T[name] += time.perf_counter() - start

    return wrapper


def main() -> None:
    torch.manual_seed(0)
    n, d = 20000, 3
    x = torch.randn(n, d)
    kernel = _kernel("rbf-ard", d)
    params = list(kernel.parameters())
    for name in ("block_sums", "_unscaled_means", "_scaled", "lengthscale_gradient", "_prepare"):
        setattr(S, name, timed(name, getattr(S, name)))
    for name in ("tile_sums", "contract_kept"):
        setattr(jit, name, timed(name, getattr(jit, name)))
    S._TilePass.distances = timed("distances", S._TilePass.distances)
    S.StationaryBlockMeans.backward = staticmethod(timed("Fbackward", S.StationaryBlockMeans.backward))

    def run(k: int, reps: int = 3) -> None:
        partition = kmeans_partition(x, k, seed=0)
        op = kernel_block_mean(kernel, x, partition)  # warm-up
        torch.autograd.grad(op.lam.sum() + op.B.square().sum(), params)
        T.clear()
        start = time.perf_counter()
        for _ in range(reps):
            op = timed("fwd_total", kernel_block_mean)(kernel, x, partition)
            loss = timed("loss", lambda o: o.lam.sum() + o.B.square().sum())(op)
            timed("bwd_total", torch.autograd.grad)(loss, params)
        total = (time.perf_counter() - start) / reps
        pieces = " ".join(f"{key}={value / reps * 1e3:.1f}" for key, value in sorted(T.items()))
        print(k, f"total {total:.4f}", pieces)

    for k in (10, 2000, 10, 2000):
        run(k)


if __name__ == "__main__":
    main()
