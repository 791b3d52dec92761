"""Subprocess scripts of tests/test_numba_processes.py: numba's kernels across fork() and from two threads at once.

Run as ``python tests/numba_processes.py fork`` or ``... threads`` (the test sets the environment, such as
``NUMBA_THREADING_LAYER``, and a timeout). Each prints one line of JSON, the last line of its output, and exits 0
where the run finished (the test reads the line); a child killed by numba, or a process aborted by it, shows as a
missing line and a nonzero exit status. Importing this module runs nothing (pytest's ``--doctest-modules`` imports
it).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import warnings

N = 4096  # kernel_block_mean reduces tiles with numba from 4096^2 = 2^24 entries (jit.MIN_ENTRIES)


def _kernel_sums(seed: int, backward: bool = True):
    """``kernel_block_mean`` on the stationary engine with numba's tile reduction (float32, 50 blocks), and the
    lengthscale and outputscale gradients of a loss of it: ``(lam, B, grads)``."""
    import torch
    from gpytorch.kernels import RBFKernel, ScaleKernel

    from bma_gp import Partition, kernel_block_mean

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 3, generator=gen)
    kernel = ScaleKernel(RBFKernel(ard_num_dims=3))
    op = kernel_block_mean(kernel, x, Partition.from_labels(torch.randint(0, 50, (N,), generator=gen)))
    grads = []
    if backward:
        (op.lam.sum() + op.B.square().sum()).backward()
        grads = [p.grad.clone() for p in kernel.parameters()]
    return op.lam.detach(), op.B.detach(), grads


def _fused_steps(seed: int, width: int, steps: int):
    """``steps`` steps of ``BlockMeanAdagrad(fused=True)`` on a ``Linear(width, width)`` (numba's parallel kernels
    from 2^16 entries): the weight and bias after them."""
    import torch

    from bma_gp.optim import BlockMeanAdagrad

    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(width, width)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(width, width, generator=gen) / width**0.5)
        lin.bias.zero_()
    opt = BlockMeanAdagrad(lin.parameters(), lr=0.01, fused=True)
    for _ in range(steps):
        opt.zero_grad()
        lin(torch.randn(8, width, generator=gen)).square().sum().backward()
        opt.step()
    return lin.weight.detach().clone(), lin.bias.detach().clone()


def _close(a, b, rtol: float, atol: float = 0.0) -> bool:
    import torch

    return all(torch.allclose(u, v, rtol=rtol, atol=atol) for u, v in zip(a, b, strict=True))


def _layer() -> str:
    """numba's threading layer in this process (launched by now), OpenMP's vendor after a colon."""
    import numba

    layer = numba.threading_layer()
    if layer == "omp":
        from numba.np.ufunc import omppool

        layer += ":" + str(getattr(omppool, "openmp_vendor", "unknown"))
    return layer


def _child(path: str) -> None:
    """In the forked child: what a DataLoader worker does (one torch thread), then the same calls as the parent."""
    import torch

    from bma_gp.optim import _fused

    torch.set_num_threads(1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lam, B, grads = _kernel_sums(0)
        small = _fused_steps(1, 256, 3)  # 65,792 entries: numba's parallel kernels in the parent
        large = _fused_steps(2, 512, 2)  # 262,656 entries: past FUSED_MIN_NUMEL, the fused passes without numba
    messages = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    compiled = sorted(k for k in _fused._COMPILED if not k.startswith(":"))  # torch.compile'd passes, if any
    torch.save(
        {"kbm": (lam, B, grads), "small": small, "large": large, "warnings": messages, "compiled": compiled}, path
    )


def fork() -> dict:
    """numba's kernels in this process, then the same calls in a child forked from it (multiprocessing's fork
    context): whether the child finished, its warnings, and whether its results equal this process's."""
    import multiprocessing

    import torch

    lam, B, grads = _kernel_sums(0)
    small = _fused_steps(1, 256, 3)
    large = _fused_steps(2, 512, 2)
    layer = _layer()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "child.pt")
        child = multiprocessing.get_context("fork").Process(target=_child, args=(path,))
        child.start()
        child.join(90)
        if child.exitcode is None:
            child.kill()
            child.join()
        report: dict = {"layer": layer, "exitcode": child.exitcode}
        if child.exitcode != 0 or not os.path.exists(path):
            return report
        got = torch.load(path)
    report.update(
        warnings=got["warnings"],
        compiled=got["compiled"],
        kbm_equal=_close((lam, B, *grads), (got["kbm"][0], got["kbm"][1], *got["kbm"][2]), rtol=1e-5, atol=1e-7),
        small_equal=_close(small, got["small"], rtol=1e-5, atol=1e-6),
        large_equal=_close(large, got["large"], rtol=1e-5, atol=1e-6),
    )
    return report


def threads() -> dict:
    """Two threads at once, each calling kernel_block_mean (with backward) and stepping its own fused optimizer
    (numba's parallel kernels), against the same calls made one after the other in this thread."""
    from bma_gp import _numba

    def work(seed: int):
        return _kernel_sums(seed), _fused_steps(seed, 256, 60)

    reference = [work(seed) for seed in (0, 1)]
    results: list = [None, None]
    errors: list = []

    def run(i: int) -> None:
        try:
            for _ in range(2):
                results[i] = work(i)
        except BaseException as exc:  # reported, not lost in the thread
            errors.append(repr(exc))

    workers = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(100)
    equal = not errors and all(
        r is not None
        and _close((*r[0][:2], *r[0][2]), (*ref[0][:2], *ref[0][2]), rtol=0)
        and _close(r[1], ref[1], rtol=0)
        for r, ref in zip(results, reference, strict=True)
    )
    serialised = getattr(_numba, "_SERIALISE", None)
    return {"layer": _layer(), "serialised": serialised, "errors": errors, "equal": equal}


if __name__ == "__main__":
    print(json.dumps({"fork": fork, "threads": threads}[sys.argv[1]]()), flush=True)
