"""The benchmark suite of issue 5 in one command: JSON lines, a summary table and plots.

Runs the existing benchmark scripts as subprocesses, each figure a ratio against a
baseline measured in the same run (see each script's docstring for its baseline):

==========  ===========================================  =============================================
suite       script                                       baseline in the same run
==========  ===========================================  =============================================
operator    ``bench_operator.py --part dense`` and       one elementwise pass over an n-vector; torch
            ``--part sweep``                             dense Cholesky / eigh at n = 6,000
compositions ``bench_compositions.py``                   linear_operator's generic path (CG, stochastic
                                                         Lanczos) on the same sum; dense Cholesky
mixed       ``bench_mixed.py --predict 1000``,           absolute targets (issue 11: one SGPR + groups
            ``bench_groups.py``                          training iteration at n = 10^6, < 10 s, < 4 GB);
                                                         random intercepts: the general k x k path
kernel      ``bench_kernel_block_mean.py``               the same kernel entries in the same chunks,
                                                         not reduced
gp          ``bench_gp_iteration.py``,                   GPyTorch exact GP (CG), SGPR at m = k
            ``bench_elecdemand_step.py``
optimizer   ``bench_optimizer.py``                       ``torch.optim.Adagrad`` step
==========  ===========================================  =============================================

Writes to ``--out-dir`` (default ``docs/results/bench``; with ``--smoke`` a temporary
directory unless given): ``results.jsonl`` (a ``machine`` record first, then every record of
every script with a ``suite`` field), ``summary.md`` (tables, the issue-5 targets as held /
missed, the machine and the command), ``matvec_ratio.png`` and ``gp_iteration.png``, and the
raw output of each script in ``logs/``.

    python examples/benchmarks.py                      # everything, full size (27-40 minutes on 2 cores)
    python examples/benchmarks.py --smoke              # tiny sizes, a couple of minutes
    python examples/benchmarks.py --only gp,optimizer  # a subset
    python examples/benchmarks.py --device cuda        # GPU sizes where a script accepts --device

With ``--device cuda`` every script whose ``--help`` lists ``--device`` gets it and picks its
own GPU sizes; without CUDA the suite records that it skipped and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # examples/: the shared _common module
from _common import check_out_dir  # noqa: E402

# the slowest last, so a --budget cuts it first
SUITES = ("operator", "compositions", "mixed", "kernel", "optimizer", "gp")
#: Issue-5 targets: (label, limit) used by :func:`targets`.
MATVEC_LIMITS = {"contiguous": 5.0, "scattered": 8.0}
#: Issue-13 kernel block sums: the numbers of blocks timed at n = 20,000 (RBF-ARD, d = 3).
KERNEL_SWEEP_KS = "10,100,1000,2000,5000"


# ============================================================================ running
def commands(suite: str, smoke: bool, device: str, py: str) -> list[list[str]]:
    """The subprocess command lines of one suite."""
    s = ["--smoke"] if smoke else []
    if suite == "operator":
        return [
            [py, str(HERE / "bench_operator.py"), "--part", "dense", *s],
            [py, str(HERE / "bench_operator.py"), "--part", "sweep", *s],
        ]
    if suite == "compositions":  # the float32 / float64 agreement in its own process: its peak memory is its own
        return [
            [py, str(HERE / "bench_compositions.py"), *s],
            [py, str(HERE / "bench_compositions.py"), "--part", "agree", *s],
        ]
    if suite == "mixed":
        return [
            [py, str(HERE / "bench_mixed.py"), "--predict", "1000", *s],
            [py, str(HERE / "bench_groups.py"), *s],
            [py, str(HERE / "bench_groups.py"), "--rank", "2", *s],
            [py, str(HERE / "bench_groups.py"), "--slope", *(s or ["--n", "20000", "--ks", "1000,5000"])],
        ]
    if suite == "kernel":
        rounds = ["--repeat", "5"]
        return [
            [py, str(HERE / "bench_kernel_block_mean.py"), *s],
            # the fastest of five interleaved rounds: the k = 2000 / k = 10 ratio moved by 0.1 between runs of two
            [py, str(HERE / "bench_kernel_block_mean.py"), "--k-sweep", KERNEL_SWEEP_KS, "--d", "3", *(s or rounds)],
        ]
    if suite == "gp":
        return [[py, str(HERE / "bench_gp_iteration.py"), *s], [py, str(HERE / "bench_elecdemand_step.py"), *s]]
    if suite == "optimizer":  # back-to-back steps (caches warm), then with the caches flushed before each step
        script = str(HERE / "bench_optimizer.py")
        return [[py, script, *s], [py, script, "--flush-mb", "64", *s]]
    raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}.")


def accepts_device(cmd: list[str]) -> bool:
    """Whether the script's ``--help`` lists a ``--device`` option."""
    done = subprocess.run([cmd[0], cmd[1], "--help"], capture_output=True, text=True, timeout=120)
    return "--device" in done.stdout


def parse_json_lines(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                records.append(value)
    return records


def _run(cmd: list[str], timeout: float) -> tuple[str, str, int | None]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (the scripts start
    subprocesses of their own) and return what was printed so far, with returncode None."""
    import signal

    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, timeout))
        return stdout, stderr, proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return stdout, stderr + f"\n[benchmarks] killed after {timeout:.0f} s", None


def run_suite(
    suite: str, smoke: bool, device: str, logs: Path, timeout: float, deadline: float = float("inf")
) -> list[dict]:
    records = []
    for i, cmd in enumerate(commands(suite, smoke, device, sys.executable)):
        if deadline - time.monotonic() < 10:
            records.append({"suite": suite, "command": _show(cmd), "skipped": "the --budget was spent"})
            continue
        if device != "cpu":
            if accepts_device(cmd):
                cmd = cmd + ["--device", device]
            elif suite in ("operator", "kernel") and i == 0:
                # the script has no --device yet: measure the GPU-size figures here instead
                cmd = [sys.executable, str(Path(__file__).resolve()), "--_gpu-sizes", suite, "--device", device]
                if smoke:
                    cmd.append("--smoke")
            else:
                records.append(
                    {
                        "suite": suite,
                        "device": device,
                        "command": _show(cmd),
                        "skipped": f"{Path(cmd[1]).name} has no --device option",
                    }
                )
                continue
        print(f"[benchmarks] {suite}: {_show(cmd)}", flush=True)
        start = time.perf_counter()
        stdout, stderr, rc = _run(cmd, min(timeout, deadline - time.monotonic()))
        seconds = time.perf_counter() - start
        (logs / f"{suite}_{i}.out").write_text(stdout)
        (logs / f"{suite}_{i}.err").write_text(stderr)
        found = parse_json_lines(stdout)
        for rec in found:
            rec.setdefault("suite", suite)
        records.extend(found)
        status = {
            "suite": suite,
            "status": "ok" if rc == 0 else ("timed out" if rc is None else "failed"),
            "returncode": rc,
            "command": _show(cmd),
            "wall_s": round(seconds, 2),
            "records": len(found),
        }
        if rc != 0:
            status["stderr_tail"] = stderr.strip().splitlines()[-3:]
        records.append(status)
        print(f"[benchmarks] {suite}: {status['status']} in {seconds:.1f} s, {len(found)} records", flush=True)
    return records


def _show(cmd: list[str]) -> str:
    return shlex.join(
        [
            Path(cmd[0]).name if cmd[0] == sys.executable else cmd[0],
            *[os.path.relpath(c, REPO) if c.startswith(str(REPO)) else c for c in cmd[1:]],
        ]
    )


def machine_record(argv: list[str], device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    try:
        import gpytorch

        gpytorch_version = gpytorch.__version__
    except ImportError:  # pragma: no cover
        gpytorch_version = None
    rec = {
        "suite": "machine",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", os.path.relpath(__file__, REPO), *argv]),
        "git_commit": commit,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "gpytorch": gpytorch_version,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "device": device,
    }
    if torch.cuda.is_available():
        rec["cuda_device"] = torch.cuda.get_device_name(0)
        rec["cuda_version"] = torch.version.cuda
    return rec


# ============================================================================ GPU sizes
GPU_MATVEC_N = 100_000_000
GPU_KERNEL_N = 1_000_000


def _best_of(fn, repeats: int, device, warm_up: bool = True) -> float:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if warm_up:
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _peak_mb(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def gpu_operator(device_name: str, n: int = GPU_MATVEC_N, k: int = 1000, repeats: int = 5) -> list[dict]:
    """Matvec and solve of a block mean operator at GPU size, as ratios to one elementwise pass (``x * 2``)."""
    import torch

    from bma_gp import BlockMeanLinearOperator, Partition

    device = torch.device(device_name)
    records = []
    for dtype in (torch.float32, torch.float64):
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, dtype=dtype, device=device, generator=gen)
        floor = _best_of(lambda: x * 2.0, repeats, device)
        for labels_kind in ("contiguous", "scattered"):
            if labels_kind == "contiguous":
                partition = Partition.from_sizes(
                    torch.full((k,), n // k, device=device).index_add_(
                        0, torch.arange(n % k, device=device), torch.ones(n % k, dtype=torch.long, device=device)
                    )
                )
            else:
                labels = torch.randint(0, k, (n,), device=device, generator=gen)
                labels[:k] = torch.arange(k, device=device)
                partition = Partition.from_labels(labels, num_blocks=k)
            root = torch.randn(k, k, dtype=dtype, device=device, generator=gen)
            lam = torch.rand(k, dtype=dtype, device=device, generator=gen) + 0.5
            B = root @ root.T / k + 0.1
            op = BlockMeanLinearOperator(lam, B, partition)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ops = {
                "matvec": lambda op=op, x=x: op @ x,
                "solve": lambda lam=lam, B=B, partition=partition, x=x: BlockMeanLinearOperator(
                    lam, B, partition
                ).solve(x),
            }
            for name, fn in ops.items():
                seconds = _best_of(fn, repeats, device)
                records.append(
                    {
                        "bench": "operator_gpu",
                        "op": name,
                        "n": n,
                        "k": k,
                        "labels": labels_kind,
                        "dtype": str(dtype).split(".")[-1],
                        "device": str(device),
                        "seconds": seconds,
                        "floor_s": floor,
                        "ratio_to_floor": seconds / floor,
                        "cuda_peak_mb": _peak_mb(device),
                    }
                )
            del op, partition
    return records


def gpu_kernel(
    device_name: str, n: int = GPU_KERNEL_N, k: int = 1000, d: int = 4, chunk_bytes: int = 2 * 2**30
) -> list[dict]:
    """kernel_block_mean of RBF-ARD at GPU size against the bare evaluation of the same entries in the same chunks."""
    import gpytorch
    import torch

    from bma_gp import Partition, kernel_block_mean
    from bma_gp.partition_builders import kmeans_partition

    device = torch.device(device_name)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(n, d, device=device, generator=gen)
    t0 = time.perf_counter()
    partition = kmeans_partition(x, k, seed=0)
    prep = time.perf_counter() - t0
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=d)).to(device)
    params = list(kernel.parameters())
    chunk = max(1, chunk_bytes // (n * x.element_size() * 2))

    def bare_fwd():
        with torch.no_grad(), gpytorch.settings.lazily_evaluate_kernels(False):
            for a in range(0, n, chunk):
                kernel(x[a : a + chunk], x).to_dense()

    def kbm_fwd():
        with torch.no_grad():
            kernel_block_mean(kernel, x, partition)

    def kbm_fwd_bwd():
        op = kernel_block_mean(kernel, x, partition)
        torch.autograd.grad(op.lam.sum() + op.B.square().sum(), params)

    # warm up (allocator, kernels' first launch) on a slice, so the full size is evaluated once per variant
    small = min(n, 20_000)
    warm = Partition.from_labels(torch.arange(small, device=device) % 10)
    kernel_block_mean(kernel, x[:small], warm)
    with torch.no_grad(), gpytorch.settings.lazily_evaluate_kernels(False):
        kernel(x[:chunk], x[:small]).to_dense()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = {f.__name__: _best_of(f, 1, device, warm_up=False) for f in (bare_fwd, kbm_fwd, kbm_fwd_bwd)}
    return [
        {
            "bench": "kernel_gpu",
            "case": "rbf-ard",
            "n": n,
            "k": partition.num_blocks,
            "d": d,
            "dtype": "float32",
            "device": str(device),
            "chunk_rows": chunk,
            "partition_s": round(prep, 3),
            **{f"t_{key}_s": round(val, 4) for key, val in times.items()},
            "ratio_fwd": round(times["kbm_fwd"] / times["bare_fwd"], 3),
            "ratio_fwd_bwd_vs_bare_fwd": round(times["kbm_fwd_bwd"] / times["bare_fwd"], 3),
            "cuda_peak_mb": _peak_mb(device),
        }
    ]


# ============================================================================ summary
def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def operator_tables(records: list[dict]) -> list[str]:
    out = []
    dense = [r for r in records if r.get("bench") == "operator_vs_dense"]
    if dense:
        out += [
            "### Operator against torch dense factorisations (same matrix, same run)",
            "",
            "| op | n | k | dense s | block mean s | speedup |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['op']} | {r['n']:,} | {r['k']} | {r['dense_s']:.4f} | {r['blockmean_s']:.6f} | "
            f"{r['speedup']:,.0f}x |"
            for r in dense
        ]
        out.append("")
    sweep = [r for r in records if r.get("bench") == "operator_sweep"]
    if sweep:
        rows: dict = {}
        for r in sweep:
            rows.setdefault((r["n"], r["k"], r["labels"], r["dtype"]), {})[r["op"]] = r
        out += [
            "### Operator sweep: seconds as a ratio to one elementwise pass over an n-vector (`x * 2`)",
            "",
            "| n | k | labels | dtype | floor s | matvec | solve | logdet | inv-sqrt product | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (n, k, labels, dtype), ops in sorted(rows.items()):

            def ratio(name):
                return f"{ops[name]['ratio_to_floor']:.1f}x" if name in ops else "-"

            floor = next(iter(ops.values()))["floor_s"]
            peak = max(r["peak_rss_mb"] for r in ops.values())
            out.append(
                f"| {n:,} | {k} | {labels} | {dtype} | {floor:.2e} | {ratio('matvec')} | {ratio('solve')} | "
                f"{ratio('logdet')} | {ratio('inv_sqrt_matmul')} | {peak:.0f} |"
            )
        out.append("")
    return out


def kernel_tables(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("suite") == "kernel" and "case" in r and r.get("bench") != "kernel_k_sweep"]
    sweep = [r for r in records if r.get("bench") == "kernel_k_sweep"]
    if not rows and not sweep:
        return []
    if not rows:
        return _kernel_sweep_table(sweep)
    out = [
        "### kernel_block_mean against evaluating the same entries in the same chunks",
        "",
        "Ratios: forward vs bare forward; forward + backward vs bare forward; forward + backward vs bare "
        "forward + backward (autograd through every entry).",
        "",
        "| case | n | k | dtype | bare fwd s | kbm fwd s | fwd ratio | fwd+bwd / bare fwd | "
        "fwd+bwd / bare fwd+bwd | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['case']} | - | - | - | - | - | - | - | - | error: {r['error']} |")
            continue
        out.append(
            f"| {r['case']} | {r['n']:,} | {r['k']} | {r['dtype']} | {r['t_bare_fwd_s']:.3f} | "
            f"{r['t_kbm_fwd_s']:.3f} | {r['ratio_fwd']:.2f} | {r['ratio_fwd_bwd_vs_bare_fwd']:.2f} | "
            f"{r['ratio_fwd_bwd_vs_bare_fwd_bwd']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    return out + [""] + _kernel_sweep_table(sweep)


def _kernel_sweep_table(sweep: list[dict]) -> list[str]:
    if not sweep:
        return []
    out = [
        "### Kernel block sums against the number of blocks (issue 13; RBF-ARD, values + lengthscale backward)",
        "",
        "One process, interleaved rounds, fastest of each; wall and process CPU time. Ratios: forward + backward "
        "against the bare forward of all n^2 entries, and against the same at the smallest k. Backward takes fixed "
        "cotangents for lam and B (the engine alone); the loss columns time it through the earlier loss "
        "lam.sum() + B.square().sum(), whose own k x k work is included there.",
        "",
        "| n | d | k | tiles | bare fwd s | kbm fwd s | kbm fwd+bwd s | fwd+bwd / bare fwd | fwd+bwd / smallest k | "
        "CPU: fwd+bwd / bare fwd | CPU: / smallest k | loss: fwd+bwd s | loss: / smallest k | "
        "torch tiles: fwd+bwd s | torch tiles: / smallest k |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    out += [
        f"| {r['n']:,} | {r['d']} | {r['k']} | {r.get('tile_backend', 'torch')} | {r['t_bare_fwd_s']:.3f} | "
        f"{r['t_kbm_fwd_s']:.3f} | {r['t_kbm_fwd_bwd_s']:.3f} | {r['ratio_fwd_bwd_vs_bare_fwd']:.2f} | "
        f"{r['ratio_fwd_bwd_vs_first_k']:.2f} | {r['cpu_ratio_fwd_bwd_vs_bare_fwd']:.2f} | "
        f"{r['cpu_ratio_fwd_bwd_vs_first_k']:.2f} | {r.get('t_kbm_fwd_bwd_loss_s', nan):.3f} | "
        f"{r.get('ratio_fwd_bwd_loss_vs_first_k', nan):.2f} | {r.get('t_kbm_fwd_bwd_torch_s', nan):.3f} | "
        f"{r.get('ratio_fwd_bwd_vs_first_k_torch', nan):.2f} |"
        for r in sweep
    ]
    return out + [""]


def gpu_tables(records: list[dict]) -> list[str]:
    out = []
    ops = [r for r in records if r.get("bench") == "operator_gpu"]
    if ops:
        out += [
            "### Operator at GPU size: seconds as a ratio to one elementwise pass (`x * 2`)",
            "",
            "| op | n | k | labels | dtype | device | floor s | seconds | ratio | CUDA peak MB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['op']} | {r['n']:,} | {r['k']} | {r['labels']} | {r['dtype']} | {r['device']} | "
            f"{r['floor_s']:.2e} | {r['seconds']:.2e} | {r['ratio_to_floor']:.2f}x | {_fmt(r['cuda_peak_mb'], 0)} |"
            for r in ops
        ]
        out.append("")
    ker = [r for r in records if r.get("bench") == "kernel_gpu"]
    if ker:
        out += [
            "### kernel_block_mean at GPU size against the bare evaluation of the same chunks",
            "",
            "| case | n | k | device | chunk rows | bare fwd s | kbm fwd s | kbm fwd+bwd s | fwd ratio | "
            "fwd+bwd / bare fwd | CUDA peak MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['case']} | {r['n']:,} | {r['k']} | {r['device']} | {r['chunk_rows']} | "
            f"{r['t_bare_fwd_s']:.3f} | {r['t_kbm_fwd_s']:.3f} | {r['t_kbm_fwd_bwd_s']:.3f} | {r['ratio_fwd']:.2f} | "
            f"{r['ratio_fwd_bwd_vs_bare_fwd']:.2f} | {_fmt(r['cuda_peak_mb'], 0)} |"
            for r in ker
        ]
        out.append("")
    return out


def gp_tables(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("bench") == "gp_iteration" and "n" in r]
    if not rows:
        return []
    exact = {r["n"]: r["warm_s"] for r in rows if r.get("method") == "exact" and "warm_s" in r}
    exact_cpu = {r["n"]: r["warm_cpu_s"] for r in rows if r.get("method") == "exact" and "warm_cpu_s" in r}
    out = [
        "### GP training iteration (marginal likelihood + backward + Adam step, RBF-ARD, float32)",
        "",
        "Warm iteration (fastest of the timed ones after a cold first); speedup = exact CG seconds / this "
        "method's seconds at the same n in the same run, on wall time and on process CPU time (all threads; "
        "steadier on a loaded machine); prep = k-means partition (block mean) before training; peak RSS of "
        "the case's own process (about 230 MB of it is the imported libraries).",
        "",
        "| n | method | k / m | warm s | speedup vs exact CG | CPU s | CPU-time speedup | cold s | prep s "
        "| peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        rows,
        key=lambda r: (
            r["n"],
            ("exact", "blockmean", "sgpr").index(r["method"]) if r["method"] in ("exact", "blockmean", "sgpr") else 3,
            r.get("k") or 0,
        ),
    ):
        if "warm_s" not in r:
            out.append(
                f"| {r['n']:,} | {r['method']} | {r.get('k') or '-'} | - | - | - | - | - | - | "
                f"{r.get('skipped') or r.get('error')} |"
            )
            continue
        ratio = (
            "baseline"
            if r["method"] == "exact"
            else (f"{exact[r['n']] / r['warm_s']:.2f}x" if r["n"] in exact else "(no exact run)")
        )
        cpu = r.get("warm_cpu_s")
        cpu_ratio = (
            "baseline"
            if r["method"] == "exact"
            else (f"{exact_cpu[r['n']] / cpu:.2f}x" if r["n"] in exact_cpu and cpu else "-")
        )
        peak = f"{r['peak_rss_mb']:.0f}" + (f" (cuda {r['cuda_peak_mb']:.0f})" if "cuda_peak_mb" in r else "")
        out.append(
            f"| {r['n']:,} | {r['method']} | {r.get('k') or '-'} | {r['warm_s']:.3f} | {ratio} | "
            f"{_fmt(cpu)} | {cpu_ratio} | {r['cold_s']:.3f} | {r['prep_s']:.3f} | {peak} |"
        )
    return out + [""]


def group_tables(records: list[dict]) -> list[str]:
    """Random intercepts (``bench_groups.py``): the elementwise path against the general ``k x k`` path."""
    rows = [r for r in records if r.get("bench") == "group_iteration"]
    others = ("group_factor_iteration", "group_slope_iteration", "mixed_prediction")
    if not rows and not any(r.get("bench") in others for r in records):
        return []
    lines = [
        "### Random-intercept GP, one training iteration (elementwise diagonal core vs general k x k path)",
        "",
        "| n | groups k | elementwise s | general s | ratio | loss equal |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        general = r.get("general_s")
        equal = "" if general is None else str(abs(r["general_loss"] - r["elementwise_loss"]) <= 1e-5)
        lines.append(
            f"| {r['n']:,} | {r['k']:,} | {_fmt(r.get('elementwise_s'))} | {_fmt(general)} | "
            f"{_fmt(r.get('speedup'), 1)} | {equal} |"
        )
    factor = [r for r in records if r.get("bench") == "group_factor_iteration"]
    if factor:
        lines += [
            "",
            "### Correlated group effects (`GroupKernel(k, rank=r)`): factor form vs dense k x k B",
            "",
            "| n | groups k | rank | factor s | dense s | ratio | predict factor s | predict dense s | loss equal |"
            " max mean diff |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in factor:
            dense = r.get("dense_s")
            equal = "" if dense is None else str(abs(r["dense_loss"] - r["factor_loss"]) <= 1e-5)
            lines.append(
                f"| {r['n']:,} | {r['k']:,} | {r['rank']} | {_fmt(r.get('factor_s'))} | {_fmt(dense)} | "
                f"{_fmt(r.get('speedup'), 1)} | {_fmt(r.get('factor_predict_s'))} | {_fmt(r.get('dense_predict_s'))} | "
                f"{equal} | {_fmt(r.get('max_mean_diff'))} |"
            )
    slope = [r for r in records if r.get("bench") == "group_slope_iteration"]
    if slope:
        lines += [
            "",
            "### Correlated random slopes (`GroupKernel(k, slope=True)`): three terms eliminated together vs one",
            "",
            "| n | groups k | joint s | one term s | ratio | predict joint s | predict one term s | loss equal |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in slope:
            one = r.get("dense_s")
            equal = "" if one is None else str(abs(r["dense_loss"] - r["factor_loss"]) <= 1e-5)
            lines.append(
                f"| {r['n']:,} | {r['k']:,} | {_fmt(r.get('factor_s'))} | {_fmt(one)} | {_fmt(r.get('speedup'), 1)} | "
                f"{_fmt(r.get('factor_predict_s'))} | {_fmt(r.get('dense_predict_s'))} | {equal} |"
            )
    prediction = [r for r in records if r.get("bench") == "mixed_prediction"]
    if prediction:
        lines += [
            "",
            "### Mixed GP prediction after training (`bench_mixed.py --predict`): mean and variance at new points",
            "",
            "| n | SGPR m | groups | new points | seconds | peak RSS GB |",
            "|---|---|---|---|---|---|",
        ]
        for r in prediction:
            lines.append(
                f"| {r['n']:,} | {r['m']} | {r['levels'][0]:,} x {r['levels'][1]:,} | {r['t']:,} | "
                f"{_fmt(r['seconds'])} | {r['peak_rss_mb'] / 1024:.2f} |"
            )
    return [*lines, ""]


def optimizer_tables(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("benchmark") == "optimizer_step"]
    if not rows:
        return []
    out = ["### Optimizer step against torch.optim.Adagrad (same parameters, interleaved rounds)", ""]
    for r in rows:
        cache = (
            f"caches flushed before every step ({r['flush_mb']:g} MB written, untimed)"
            if r.get("flush_mb")
            else "back-to-back steps (caches warm)"
        )
        out += [
            f"{r['params']:,} parameters in {r['tensors']} tensors, device {r['device']}, "
            f"{r['steps_timed']} timed steps each (median); {cache}.",
            "",
        ]
        paired = r.get("paired_ratio_to_adagrad")
        if paired:  # the per-round ratios (each round's median over Adagrad's in that round), then their median
            out += ["| optimizer | median ms | ratio to Adagrad | paired per round |", "|---|---|---|---|"]
            out += [
                f"| {name} | {ms:.3f} | {r['ratio_to_adagrad'][name]:.2f} | {paired[name]:.2f} |"
                for name, ms in r["median_ms"].items()
            ]
        else:
            out += ["| optimizer | median ms | ratio to Adagrad |", "|---|---|---|"]
            out += [f"| {name} | {ms:.3f} | {r['ratio_to_adagrad'][name]:.2f} |" for name, ms in r["median_ms"].items()]
        out.append("")
    return out


def _pooled_floors(records: list[dict]) -> dict[tuple[int, str], float]:
    """Per ``(n, dtype)`` of the operator sweep, the median of the floors (``x * 2``) timed beside its rows.

    Every row times the same pass over the same vector, so one floor per ``(n, dtype)`` is what the rows share. Its
    best-of-rounds time is bimodal at ``n = 10^7``: 12-13 ms (float32) in almost every row, 2.9 ms in an odd one,
    where the output's 40 MB happened to need no fresh pages. A row judged against such a floor missed its target
    with the operator's time equal to its neighbours' (docs/results/bench_session9/matvec_rerun.txt); the median
    of the rows' floors is not moved by one such row, and it is still timed in the same run, interleaved."""
    floors: dict[tuple[int, str], dict] = {}
    for r in records:
        if r.get("bench") == "operator_sweep" and "floor_s" in r:
            floors.setdefault((r["n"], r["dtype"]), {})[(r["k"], r["labels"])] = r["floor_s"]
    return {key: statistics.median(per_row.values()) for key, per_row in floors.items()}


def targets(records: list[dict]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the issue-5 ratios that the records cover."""
    res = []
    for labels, limit in MATVEC_LIMITS.items():
        rows = [
            r
            for r in records
            if r.get("bench") == "operator_sweep"
            and r["op"] == "matvec"
            and r["labels"] == labels
            and r["n"] == 10_000_000
        ]
        if rows:
            floors = _pooled_floors(records)
            ratios = [(r["seconds"] / floors[(r["n"], r["dtype"])], r) for r in rows]
            ratio, worst = max(ratios, key=lambda x: x[0])
            own = max(r["ratio_to_floor"] for r in rows)
            res.append(
                (
                    f"matvec n = 10^7, {labels} labels: <= {limit:g}x one elementwise pass",
                    f"worst {ratio:.2f}x (k = {worst['k']}, {worst['dtype']}); best "
                    f"{min(x for x, _ in ratios):.2f}x; against each row's own floor at worst {own:.2f}x",
                    _verdict(ratio <= limit, ratio / limit),
                )
            )
    rows = [
        r
        for r in records
        if r.get("suite") == "kernel"
        and r.get("case") == "rbf-ard"
        and r.get("n") == 20_000
        and r.get("bench") != "kernel_k_sweep"
    ]
    for r in rows:
        ratio = r["ratio_fwd_bwd_vs_bare_fwd"]
        res.append(
            (
                "kernel_block_mean n = 20,000 (RBF-ARD): <= 1.5x bare kernel evaluation",
                f"forward {r['ratio_fwd']:.2f}x, forward + backward {ratio:.2f}x the bare forward of all "
                "n^2 entries (the fused pass evaluates each unordered pair once, about half of them)",
                _verdict(ratio <= 1.5, ratio / 1.5),
            )
        )
    sweep = {
        r.get("k_requested", r["k"]): r for r in records if r.get("bench") == "kernel_k_sweep" and r.get("n") == 20_000
    }
    if 10 in sweep and 2000 in sweep:
        ratio = sweep[2000]["t_kbm_fwd_bwd_s"] / sweep[10]["t_kbm_fwd_bwd_s"]
        cpu = sweep[2000]["cpu_kbm_fwd_bwd_s"] / sweep[10]["cpu_kbm_fwd_bwd_s"]
        backend = sweep[2000].get("tile_backend", "torch")
        if sweep[2000].get("device", "cpu") != "cpu":
            backend = f"{sweep[2000]['device']}, {backend}"
        other = ""
        if "t_kbm_fwd_bwd_torch_s" in sweep[2000] and "t_kbm_fwd_bwd_torch_s" in sweep[10]:
            torch_ratio = sweep[2000]["t_kbm_fwd_bwd_torch_s"] / sweep[10]["t_kbm_fwd_bwd_torch_s"]
            other = (
                f"; torch's tile reduction in the same run: {torch_ratio:.2f}x "
                f"({sweep[2000]['t_kbm_fwd_bwd_torch_s']:.2f} s vs {sweep[10]['t_kbm_fwd_bwd_torch_s']:.2f} s)"
            )
        if "t_kbm_fwd_bwd_loss_s" in sweep[2000]:
            other += (
                f"; through the loss lam.sum() + B.square().sum(): "
                f"{sweep[2000]['t_kbm_fwd_bwd_loss_s'] / sweep[10]['t_kbm_fwd_bwd_loss_s']:.2f}x"
            )
        res.append(
            (
                f"kernel block sums n = 20,000 (RBF-ARD, d = 3, fwd + bwd with fixed cotangents, {backend} tile "
                "reduction): k = 2,000 <= 1.5x k = 10",
                f"{ratio:.2f}x ({sweep[2000]['t_kbm_fwd_bwd_s']:.2f} s vs {sweep[10]['t_kbm_fwd_bwd_s']:.2f} s; "
                f"CPU time {cpu:.2f}x){other}",
                _verdict(ratio <= 1.5, ratio / 1.5),
            )
        )
    small = [r for k, r in sorted(sweep.items()) if k <= 20_000 // 4]
    if small:
        worst = max(small, key=lambda r: r["ratio_fwd_bwd_vs_bare_fwd"])
        res.append(
            (
                "kernel block sums n = 20,000: fwd + bwd <= 1.5x one bare forward at every k <= n / 4",
                "worst "
                + f"{worst['ratio_fwd_bwd_vs_bare_fwd']:.2f}x at k = {worst['k']}; "
                + ", ".join(f"k = {r['k']}: {r['ratio_fwd_bwd_vs_bare_fwd']:.2f}x" for r in small),
                _verdict(worst["ratio_fwd_bwd_vs_bare_fwd"] <= 1.5, worst["ratio_fwd_bwd_vs_bare_fwd"] / 1.5),
            )
        )
    for r in (r for r in records if r.get("benchmark") == "optimizer_step" and r["params"] >= 1_000_000):
        # the per-round paired ratios where the run has them (bench_optimizer.py: each round's median over Adagrad's
        # in the same round, then the median over the rounds), else the ratio of the two overall medians
        ratios = r.get("paired_ratio_to_adagrad") or r["ratio_to_adagrad"]
        paired = "paired, " if "paired_ratio_to_adagrad" in r else ""
        eager, fused = ratios.get("block_mean_tensor"), ratios.get("block_mean_tensor_fused")
        size = f"'tensor', {r['params'] / 1e6:.1f}M params, {r.get('threads', '?')} threads"
        if r.get("flush_mb"):
            size += f", caches flushed before each step ({r['flush_mb']:g} MB)"
        ms = r.get("median_ms", {})
        if eager is not None:  # issue 13: the default step, no compiler
            res.append(
                (
                    f"BlockMeanAdagrad eager step ({size}): <= 2x Adagrad",
                    f"{eager:.2f}x ({paired}{ms.get('block_mean_tensor', float('nan')):.2f} ms vs Adagrad "
                    f"{ms.get('adagrad', float('nan')):.2f} ms)",
                    _verdict(eager <= 2.0, eager / 2.0),
                )
            )
        if fused is not None:
            backend = r.get("fused_cpu_backend", "inductor") if r.get("device") == "cpu" else "torch.compile"
            inductor = ratios.get("block_mean_tensor_fused_inductor")
            other = "" if inductor is None else f"; torch.compile'd passes in the same run: {inductor:.2f}x"
            res.append(
                (
                    f"BlockMeanAdagrad fused=True step ({size}, {backend}): <= 1.5x Adagrad",
                    f"{fused:.2f}x ({paired}{ms.get('block_mean_tensor_fused', float('nan')):.2f} ms vs Adagrad "
                    f"{ms.get('adagrad', float('nan')):.2f} ms){other}",
                    _verdict(fused <= 1.5, fused / 1.5),
                )
            )
    for r in (r for r in records if r.get("bench") == "compositions_large" and r["n"] >= 1_000_000):
        ok = r["seconds"] < 10 and r["peak_rss_mb"] < 3072
        res.append(
            (
                f"sum n = 10^6 (crossed k = {r['k1']} x {r['k2']}, m = {r['m']}, {r['dtype']}): inv_quad_logdet + "
                "backward < 10 s and < 3 GB",
                f"{r['seconds']:.2f} s, peak RSS {r['peak_rss_mb'] / 1024:.2f} GB ({r['threads']} threads)",
                _verdict(ok, max(r["seconds"] / 10, r["peak_rss_mb"] / 3072)),
            )
        )
    for r in (r for r in records if r.get("bench") == "compositions_vs_cg" and r["n"] >= 20_000):
        res.append(
            (
                f"sum n = 2x10^4 (k = {r['k1']} x {r['k2']}, m = {r['m']}, noise x {r.get('noise_scale', 1.0):g}): "
                "closed form >= 100x faster than "
                "linear_operator's generic CG path",
                f"{r['closed_form_s']:.3f} s vs {r['generic_cg_s']:.2f} s ({r['speedup']:.0f}x)"
                + (
                    f"; U^T D^-1 U and its gradient alone {r['gram_floor_s'] * 1e3:.1f} ms, so at most "
                    f"{r['speedup_ceiling']:.0f}x on this machine"
                    if "gram_floor_s" in r
                    else ""
                ),
                _verdict(r["speedup"] >= 100, 100 / r["speedup"]),
            )
        )
    for r in (r for r in records if r.get("bench") == "compositions_agreement" and r["n"] >= 1_000_000):
        worst = max(r["rel_err"], key=r["rel_err"].get)
        res.append(
            (
                f"sum n = 10^6 (k = {r['k1']} x {r['k2']}, m = {r['m']}): float32 answers (inv_quad, logdet, solve, "
                "gradients) agree with float64 on the same entries to 1e-4 relative",
                f"largest {r['max_rel_err']:.1e} ({worst}); with fast_root_products {r['fast_max_rel_err']:.1e}",
                _verdict(r["max_rel_err"] <= 1e-4, r["max_rel_err"] / 1e-4),
            )
        )
    mixed = [r for r in records if r.get("bench") == "mixed_iteration" and r["n"] >= 1_000_000]
    if mixed:  # issue 11: the best measured iteration (the first pays one-off costs) and the process's peak
        best = min(mixed, key=lambda r: r["seconds"])
        peak = max(r["peak_rss_mb"] for r in mixed)
        ok = best["seconds"] < 10 and peak < 4096
        res.append(
            (
                f"mixed GP n = 10^6 (SGPR m = {best['m']} + groups {best['levels'][0]} x {best['levels'][1]}, "
                f"{best['dtype']}): one training iteration < 10 s and < 4 GB",
                f"{best['seconds']:.1f} s (CPU {best['cpu_seconds']:.1f} s, {best['threads']} threads, load "
                f"{best['load_avg']:.1f}), peak RSS {peak / 1024:.2f} GB ({best.get('sgpr', 'gpytorch')} SGPR kernel)",
                _verdict(ok, max(best["seconds"] / 10, peak / 4096)),
            )
        )
    for r in (r for r in records if r.get("bench") == "compositions_exactness" and r["n"] >= 2000):
        err = max(r["closed_form_inv_quad_rel_err"], r["closed_form_logdet_rel_err"])
        res.append(
            (
                "sum n = 2000, float64: relative error < 1e-8 against dense Cholesky",
                f"closed form {err:.1e}; generic CG path inv_quad {r['generic_cg_inv_quad_rel_err']:.1e}, logdet "
                f"{r['generic_cg_logdet_rel_err']:.1e}",
                _verdict(err < 1e-8, err / 1e-8),
            )
        )
    gp = [r for r in records if r.get("bench") == "gp_iteration" and "warm_s" in r and r.get("device") == "cpu"]
    exact = {r["n"]: r["warm_s"] for r in gp if r["method"] == "exact"}
    bm20 = [r for r in gp if r["method"] == "blockmean" and r["n"] == 20_000]
    if bm20 and 20_000 in exact:
        best = min(bm20, key=lambda r: r["warm_s"])
        speed = exact[20_000] / best["warm_s"]
        each = ", ".join(f"k = {r['k']}: {exact[20_000] / r['warm_s']:.2f}x" for r in bm20)
        ex_cpu = next((r.get("warm_cpu_s") for r in gp if r["method"] == "exact" and r["n"] == 20_000), None)
        if ex_cpu and all(r.get("warm_cpu_s") for r in bm20):
            each += " (CPU time: " + ", ".join(f"k = {r['k']}: {ex_cpu / r['warm_cpu_s']:.2f}x" for r in bm20) + ")"
        res.append(
            (
                "GP iteration n = 20,000: block mean >= 3x faster than exact CG",
                f"exact {exact[20_000]:.2f} s; {each}",
                _verdict(speed >= 3.0, 3.0 / speed),
            )
        )
    bm100 = [r for r in gp if r["method"] == "blockmean" and r["n"] == 100_000]
    for r in bm100:
        ok = r["warm_s"] < 60 and r["peak_rss_mb"] < 2048
        cpu = f" (process CPU time {r['warm_cpu_s']:.1f} s)" if r.get("warm_cpu_s") else ""
        res.append(
            (
                f"GP iteration n = 100,000 (k = {r['k']}): < 60 s and peak memory < 2 GB",
                f"{r['warm_s']:.1f} s{cpu}, peak RSS {r['peak_rss_mb']:.0f} MB",
                _verdict(ok, max(r["warm_s"] / 60, r["peak_rss_mb"] / 2048)),
            )
        )
    for r in (r for r in records if r.get("bench") == "elecdemand_step"):  # issue 13
        res.append(
            (
                f"GP step on elecdemand (n = {r['n_train']:,}, {r['dtype']}, {r['threads']} threads, "
                f"{r.get('tile_backend', 'torch')} tile reduction): block mean k = {r['k']} no slower than SGPR "
                f"m = {r['k']}",
                f"{r['blockmean_s']:.3f} s vs {r['sgpr_s']:.3f} s ({r['ratio']:.2f}x)"
                + (
                    f"; torch's tile reduction in the same run: {r['blockmean_torch_tiles_s']:.3f} s "
                    f"({r['ratio_torch_tiles']:.2f}x)"
                    if "ratio_torch_tiles" in r
                    else ""
                ),
                _verdict(r["ratio"] <= 1.0, r["ratio"]),
            )
        )
    return res


def _verdict(ok: bool, factor: float) -> str:
    return "holds" if ok else f"misses by {factor:.2f}x"


def summary(records: list[dict], machine: dict) -> str:
    lines = [
        "# Benchmark summary",
        "",
        f"Command: `{machine['command']}` (git {machine.get('git_commit') or '?'}), {machine['date']}.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), gpytorch {machine.get('gpytorch')}, Python {machine['python']}, "
        f"device {machine['device']}"
        + (f" ({machine['cuda_device']})" if "cuda_device" in machine else "")
        + f". Load average at start {machine['load_avg_start']}, at end {machine.get('load_avg_end')}.",
        "",
    ]
    found = targets(records)
    if found:
        lines += ["## Issue-5 targets", "", "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {v} |" for t, m, v in found]
        lines.append("")
    lines += ["## Tables", ""]
    for part in (operator_tables, kernel_tables, gpu_tables, gp_tables, group_tables, optimizer_tables):
        lines += part(records)
    skipped = [r for r in records if "skipped" in r and r.get("bench") != "gp_iteration"]
    failed = [r for r in records if r.get("status") in ("failed", "timed out")]
    if skipped or failed:
        lines += ["## Skipped or failed", ""]
        lines += [f"- {r['suite']}: skipped, {r['skipped']}" for r in skipped]
        lines += [
            f"- {r['suite']}: `{r['command']}` {r['status']} (exit {r['returncode']}): "
            f"{' / '.join(r.get('stderr_tail', []))}"
            for r in failed
        ]
        lines.append("")
    runs = [r for r in records if "status" in r]
    if runs:
        lines += ["## Runs", "", "| suite | command | status | wall s | records |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['suite']} | `{r['command']}` | {r['status']} | {r['wall_s']:.1f} | {r['records']} |" for r in runs
        ]
        lines.append("")
    return "\n".join(lines)


def plots(records: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sweep = [r for r in records if r.get("bench") == "operator_sweep" and r["op"] == "matvec"]
    if sweep:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, labels in zip(axes, ("contiguous", "scattered")):
            series: dict = {}
            for r in sweep:
                if r["labels"] == labels:
                    series.setdefault((r["dtype"], r["k"]), []).append((r["n"], r["ratio_to_floor"]))
            for (dtype, k), pts in sorted(series.items()):
                pts.sort()
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="o",
                    linestyle="-" if dtype == "float32" else "--",
                    label=f"{dtype}, k={k}",
                )
            ax.axhline(MATVEC_LIMITS[labels], color="k", linewidth=0.8, linestyle=":")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"matvec, {labels} labels (target <= {MATVEC_LIMITS[labels]:g}x at n=1e7)")
            ax.set_xlabel("n")
            ax.legend(fontsize=7)
        axes[0].set_ylabel("time / one elementwise pass")
        fig.tight_layout()
        path = out_dir / "matvec_ratio.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    gp = [r for r in records if r.get("bench") == "gp_iteration" and "warm_s" in r]
    if gp:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        series = {}
        for r in gp:
            name = {"exact": "exact CG", "sgpr": f"sgpr m={r['k']}"}.get(r["method"], f"{r['method']} k={r['k']}")
            series.setdefault(name, []).append((r["n"], r["warm_s"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                linestyle="-" if name.startswith("blockmean") else "--",
                label=name,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n (training points)")
        ax.set_ylabel("seconds per warm iteration")
        ax.set_title("GP training iteration (RBF-ARD, float32)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "gp_iteration.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ============================================================================ entry point
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (passed to every script)")
    parser.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {', '.join(SUITES)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda; cuda is skipped cleanly without a GPU")
    parser.add_argument(
        "--out-dir",
        default=None,
        help="where results go (default docs/results/bench; with --smoke a temporary directory)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per script before it is killed")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole suite: no script starts, and a running one is killed, after it "
        "(the summary still covers what finished)",
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--resummarize",
        metavar="DIR",
        default=None,
        help="run nothing: rewrite DIR/summary.md and the plots from DIR/results.jsonl",
    )
    parser.add_argument("--_gpu-sizes", dest="gpu_sizes", choices=["operator", "kernel"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.resummarize:
        where = Path(args.resummarize)
        if not (where / "results.jsonl").is_file():  # was a FileNotFoundError traceback
            parser.error(f"--resummarize: {where / 'results.jsonl'} does not exist (DIR is an earlier run's --out-dir)")
        found = parse_json_lines((where / "results.jsonl").read_text())
        if not found or found[0].get("suite") != "machine":
            parser.error(f"--resummarize: {where / 'results.jsonl'} does not start with a machine record")
        (where / "summary.md").write_text(summary(found[1:], found[0]))
        if not args.no_plots:
            plots(found[1:], where)
        print(f"[benchmarks] rewrote {where / 'summary.md'} from {where / 'results.jsonl'}", flush=True)
        return 0
    if args.gpu_sizes:  # child: GPU-size figures for a script without --device (smoke: tiny sizes)
        if args.gpu_sizes == "operator":
            found = gpu_operator(args.device, **({"n": 100_000, "k": 50, "repeats": 2} if args.smoke else {}))
        else:
            from bench_kernel_block_mean import run_k_sweep

            found = gpu_kernel(args.device, **({"n": 2_000, "k": 20} if args.smoke else {}))
            # issue 13's figures on the GPU: the k-sweep at n = 20,000 (k = 2,000 against k = 10, and against the bare
            # forward at every k <= n / 4), judged by the same target lines as on CPU
            n_sweep, ks = (
                (2_000, [10, 100, 500]) if args.smoke else (20_000, [int(k) for k in KERNEL_SWEEP_KS.split(",")])
            )
            found += run_k_sweep(n_sweep, 3, ks, 2 if args.smoke else 3, "float32", device=args.device)
        for rec in found:
            print(json.dumps(rec), flush=True)
        return 0
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SUITES]
    if bad:
        parser.error(f"--only: unknown suite(s) {', '.join(bad)}; choose from {', '.join(SUITES)}")
    if not only:  # ran nothing and replaced the results in --out-dir with an empty summary
        parser.error(f"--only: no suite given; choose from {', '.join(SUITES)}")
    repeated = sorted({s for s in only if only.count(s) > 1})
    if repeated:  # the suite ran twice (its scripts and records twice)
        parser.error(f"--only: {', '.join(repeated)} given twice; name each once")
    if not args.timeout > 0:  # every script was killed after the 1 s floor
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    if args.budget is not None and not args.budget > 0:  # every script was skipped as past the budget
        parser.error(f"--budget must be a positive number of seconds, got {args.budget:g}")
    if args.device != "cpu":  # --device foo went to every script, each failed, and the failures were the results
        import torch

        try:
            device_type = torch.device(args.device).type
        except RuntimeError:
            device_type = None
        if device_type != "cuda":
            parser.error(f"--device: {args.device!r} is not cpu, cuda or cuda:N")
    check_out_dir(parser, args.out_dir, "--out-dir")

    if args.out_dir:
        out_dir = Path(args.out_dir)
    elif args.smoke:
        out_dir = Path(tempfile.mkdtemp(prefix="bma_gp_bench_"))
    else:
        out_dir = REPO / "docs" / "results" / "bench"
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    deadline = time.monotonic() + (args.budget if args.budget is not None else float("inf"))
    machine = machine_record(argv, args.device)
    records: list[dict] = []

    def write() -> None:  # after every suite, so a run cut short still leaves its results
        machine["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
        with open(out_dir / "results.jsonl", "w") as fh:
            for rec in [machine, *records]:
                fh.write(json.dumps(rec) + "\n")
        (out_dir / "summary.md").write_text(summary(records, machine))

    if args.device.startswith("cuda") and "cuda_device" not in machine:
        records.append({"suite": "all", "device": args.device, "skipped": "CUDA is not available on this machine"})
        print("[benchmarks] --device cuda: CUDA is not available here; nothing to run.", flush=True)
    else:
        for suite in only:
            records += run_suite(suite, args.smoke, args.device, logs, args.timeout, deadline)
            write()
    write()
    written = [] if args.no_plots else plots(records, out_dir)
    print(
        f"[benchmarks] wrote {out_dir / 'results.jsonl'}, {out_dir / 'summary.md'}"
        + "".join(f", {p}" for p in written),
        flush=True,
    )
    failed = [r for r in records if r.get("status") in ("failed", "timed out")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
