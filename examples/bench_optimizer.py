"""Step time of BlockMeanAdagrad against torch.optim.Adagrad on a ~2M-parameter model.

Only ``optimizer.step()`` is timed: the gradients are fixed random tensors, so the
forward/backward pass (the same for every optimizer) does not dilute the ratio. Both
optimizers run in the same process, interleaved round by round, and the median step
time of each is reported with its ratio to ``torch.optim.Adagrad``, as one JSON line:
wall clock, and process CPU time (all threads), which other jobs on a shared machine
disturb less. ``block_mean_tensor_passes_only`` (CPU) runs only that step's passes over memory
(:class:`PassesOnly`): the floor of its design, beside it. ``block_mean_tensor_zeros`` has
1% of its gradient entries always exactly 0 (dead units), so that their h stays 0 and the
step masks them every time. With two
rounds or more, ``paired_ratio_to_adagrad`` is the median over the rounds of each round's
ratio (its median step over Adagrad's in the same round; quartiles for the block-mean
``tensor`` steps): what ``examples/benchmarks.py`` judges the targets on.

    python examples/bench_optimizer.py            # ~2.1M parameters, a few seconds per line
    python examples/bench_optimizer.py --smoke    # tiny model, finishes in seconds

``--baseline DIR`` also times the ``BlockMeanAdagrad`` of another checkout's ``bma_gp/optim``
(``DIR/bma_gp/optim``, e.g. ``git worktree add DIR REV``) in the same run, so that
before / after ratios share one Adagrad measurement (configurations ``baseline_*``), and the quartiles of the
per-round ratio now / before are reported as well. Every other round runs the configurations in reverse order.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bma_gp.optim import BlockMeanAdagrad, _cpu_kernels, _fused

DEFAULT_BACKEND = _fused.CPU_BACKEND


def build_model(width: int, depth: int) -> torch.nn.Module:
    """An MLP of ``depth`` square layers: ``depth * (width**2 + width)`` parameters, ``2 * depth`` tensors."""
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers)


class PassesOnly:
    """The passes over memory of ``BlockMeanAdagrad``'s eager CPU step with one block per tensor (its ratio form:
    the gradients' sum of squares, then per tensor ``h``, ``s n`` and ``sqrt(s) r`` in four passes and the three
    block sums, one read back, then ``p += c_n n + c_r r`` in one pass), with none of the step's bookkeeping: no
    argument or state checks, no statistics, no ``k x k`` root, a fixed scale. Timed beside the real step, it is
    the floor of that design on this machine; the difference is the step's Python and ``k``-sized work."""

    def __init__(self, params, lr: float) -> None:
        self.params = list(params)
        self.lr = lr
        self.h, self.n, self.r = ([torch.zeros(p.numel(), dtype=p.dtype) for p in self.params] for _ in range(3))
        self.one = torch.ones((), dtype=self.params[0].dtype)
        self.sums = torch.empty(len(self.params), 4, dtype=self.params[0].dtype)

    def step(self) -> None:
        grads = [p.grad.view(-1) for p in self.params]
        for j, g in enumerate(grads):
            torch.dot(g, g, out=self.sums[j, 0])
        self.sums[:, 0].tolist()
        for j, (g, h, n, r) in enumerate(zip(grads, self.h, self.n, self.r)):
            _cpu_kernels.adagrad_ratio(g, h, n, r, self.one, 2.0**40, 1e-10)
            torch.dot(g, r, out=self.sums[j, 1])
            torch.sum(n, 0, out=self.sums[j, 2])
            torch.dot(n, n, out=self.sums[j, 3])
        self.sums[:, 1:].tolist()
        for p, n, r in zip(reversed(self.params), reversed(self.n), reversed(self.r)):
            _cpu_kernels.add_two(p.view(-1), n, r, -self.lr * 2.0**-40, -self.lr * 2.0**-20)


def time_steps(
    opt: torch.optim.Optimizer,
    steps: int,
    device: torch.device,
    flush: torch.Tensor | None = None,
    backend: str | None = None,
) -> list[tuple[float, float]]:
    """Wall-clock and process CPU time of ``steps`` calls of ``opt.step()``; with ``flush``, that buffer is written
    (untimed) before every step, evicting the caches as a training step's forward and backward pass would. ``backend``
    sets the fused passes' CPU backend (``bma_gp.optim._fused.CPU_BACKEND``) for these steps."""
    _fused.CPU_BACKEND = backend or DEFAULT_BACKEND
    times = []
    for _ in range(steps):
        if flush is not None:
            flush.fill_(1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start, time.process_time() - start_cpu))
    return times


def load_baseline(directory: str):
    """``BlockMeanAdagrad`` of the ``bma_gp.optim`` package of another checkout, imported beside the current one.

    ``directory`` holds that version's ``bma_gp/optim`` (e.g. ``git worktree add DIR REV``). Only the optimizer
    package is swapped: its modules are imported from ``directory`` while the rest of ``bma_gp`` (the operator)
    stays the current one, then the current ``bma_gp.optim`` modules are put back.
    """
    import importlib
    import sys

    import bma_gp

    if not (Path(directory) / "bma_gp" / "optim" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {directory}: no bma_gp/optim there (make one with: git worktree add DIR REV)")

    def ours(name: str) -> bool:
        return name == "bma_gp.optim" or name.startswith("bma_gp.optim.")

    saved = {name: mod for name, mod in sys.modules.items() if ours(name)}
    saved_attr = getattr(bma_gp, "optim", None)
    for name in saved:
        del sys.modules[name]
    path = list(bma_gp.__path__)
    bma_gp.__path__[:] = [str(Path(directory) / "bma_gp"), *path]
    try:
        module = importlib.import_module("bma_gp.optim")
        assert Path(module.__file__).resolve().is_relative_to(Path(directory).resolve()), module.__file__
        return module.BlockMeanAdagrad
    finally:
        bma_gp.__path__[:] = path
        for name in [n for n in sys.modules if ours(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
        if saved_attr is not None:
            bma_gp.optim = saved_attr


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 rounds")
    parser.add_argument(
        "--flush-mb",
        type=float,
        default=0.0,
        help="write a buffer of this many MB before every timed step (untimed): steps start with cold caches, "
        "as after a forward and backward pass; 0 (the default) times back-to-back steps, whose data can stay "
        "in the last-level cache when it is small enough (2.1M float32 parameters: 25 MB for Adagrad)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="DIR",
        help="also time BlockMeanAdagrad from DIR/bma_gp/optim (another checkout, e.g. git worktree add DIR REV), "
        "in the same run",
    )
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults: an option given explicitly still wins
        parser.set_defaults(width=64, depth=2, rounds=2, steps=3)
        args = parser.parse_args(argv)
    for option, value in (
        ("--width", args.width),
        ("--depth", args.depth),
        ("--rounds", args.rounds),
        ("--steps", args.steps),
        ("--threads", args.threads),
    ):
        if value is not None and value < 1:  # a usage error, not a traceback or inf / nan after the run
            parser.error(f"{option} must be at least 1, got {value}")
    if args.flush_mb < 0:
        parser.error(f"--flush-mb must be >= 0, got {args.flush_mb}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: {args.device!r} is not a torch device; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():  # was a traceback from the first model.to(device)
        parser.error("--device: CUDA is not available on this machine; use --device cpu")
    torch.manual_seed(0)

    configs = {
        "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
        "adagrad_foreach": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, foreach=True),
        "adagrad_fused": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True),
        # fused=True: on CPU numba's kernels when numba is installed, torch.compile'd passes otherwise
        # (the "_inductor" configurations force torch.compile, for the comparison in the same run)
        "block_mean_tensor_fused": lambda ps: BlockMeanAdagrad(ps, lr=1e-2, partition="tensor", fused=True),
        "block_mean_row_interval100_fused": lambda ps: BlockMeanAdagrad(
            ps, lr=1e-2, partition="row", update_interval=100, fused=True
        ),
        "block_mean_tensor_fused_inductor": lambda ps: BlockMeanAdagrad(ps, lr=1e-2, partition="tensor", fused=True),
        "block_mean_tensor": lambda ps: BlockMeanAdagrad(ps, lr=1e-2, partition="tensor"),
        "block_mean_tensor_nocheck": lambda ps: BlockMeanAdagrad(ps, lr=1e-2, partition="tensor", check_finite=False),
        "block_mean_row_interval100": lambda ps: BlockMeanAdagrad(ps, lr=1e-2, partition="row", update_interval=100),
        # 1% of the gradient entries always exactly 0 (dead units): h = 0 there, the step masks every time
        "block_mean_tensor_zeros": lambda ps: BlockMeanAdagrad(ps, lr=1e-2, partition="tensor"),
    }
    if device.type == "cpu" and _cpu_kernels.available():
        configs["block_mean_tensor_passes_only"] = lambda ps: PassesOnly(ps, lr=1e-2)
    if args.baseline:
        Baseline = load_baseline(args.baseline)
        configs["baseline_tensor"] = lambda ps: Baseline(ps, lr=1e-2, partition="tensor")
        configs["baseline_tensor_nocheck"] = lambda ps: Baseline(ps, lr=1e-2, partition="tensor", check_finite=False)
        configs["baseline_tensor_zeros"] = lambda ps: Baseline(ps, lr=1e-2, partition="tensor")
    runs = {}
    for name, make in configs.items():
        model = build_model(args.width, args.depth).to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
            if name.endswith("_zeros"):
                p.grad.view(-1)[::100] = 0.0
        opt = make(model.parameters())
        backend = "inductor" if name.endswith("_inductor") else None
        time_steps(opt, 2, device, backend=backend)  # warm-up: lazy state, first root, compilation
        runs[name] = (model, opt, [], backend)
    d = sum(p.numel() for p in runs["adagrad"][0].parameters())
    flush = None
    if args.flush_mb:
        flush = torch.empty(int(args.flush_mb * 2**20) // 4, dtype=torch.float32, device=device)
    per_round: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(args.rounds):
        # every other round in reverse order: no configuration always follows the same one (whose data the
        # caches then hold) or always runs first
        order = list(runs.items()) if index % 2 == 0 else list(runs.items())[::-1]
        for name, (_, opt, times, backend) in order:
            steps = time_steps(opt, args.steps, device, flush, backend)
            times.extend(steps)
            per_round[name].append(statistics.median(w for w, _ in steps))

    wall = {name: statistics.median(w for w, _ in t) for name, (_, _, t, _) in runs.items()}
    cpu = {name: statistics.median(c for _, c in t) for name, (_, _, t, _) in runs.items()}
    result = {
        "benchmark": "optimizer_step",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "params": d,
        "tensors": 2 * args.depth,
        "steps_timed": args.rounds * args.steps,
        "flush_mb": args.flush_mb,
        "median_ms": {name: round(1e3 * t, 3) for name, t in wall.items()},
        "ratio_to_adagrad": {name: round(t / wall["adagrad"], 3) for name, t in wall.items()},
        # process CPU time (all threads): less sensitive than wall time to other jobs on a shared machine
        "median_cpu_ms": {name: round(1e3 * t, 3) for name, t in cpu.items()},
        "cpu_ratio_to_adagrad": {name: round(t / cpu["adagrad"], 3) for name, t in cpu.items()},
        "blocks_row": runs["block_mean_row_interval100"][1].partition.num_blocks,
        "fused_cpu_backend": DEFAULT_BACKEND if _fused.uses_numba(device, torch.float32) else "inductor",
    }
    if args.rounds >= 2:
        # per round, each configuration's median over the adagrad median of the same round, then the median over the
        # rounds: the two were timed within seconds of each other, so a drift of the shared machine's speed over the
        # run (other jobs starting or stopping) moves both; the ratio of the two overall medians above compares steps
        # timed up to a whole run apart. The targets are judged on this one (examples/benchmarks.py)
        paired = {name: [a / b for a, b in zip(rounds, per_round["adagrad"])] for name, rounds in per_round.items()}
        result["paired_ratio_to_adagrad"] = {name: round(statistics.median(x), 3) for name, x in paired.items()}
        result["paired_ratio_quartiles"] = {
            name: [round(q, 3) for q in statistics.quantiles(paired[name], n=4)]
            for name in ("block_mean_tensor", "block_mean_tensor_fused")
        }
    if args.baseline and args.rounds >= 2:
        # now / before per round (the two ran within the same round): quartiles, less exposed to drifts of the
        # machine over the run than the ratio of the two medians
        paired = [a / b for a, b in zip(per_round["block_mean_tensor"], per_round["baseline_tensor"])]
        result["now_over_baseline_quartiles"] = [round(q, 3) for q in statistics.quantiles(paired, n=4)]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
