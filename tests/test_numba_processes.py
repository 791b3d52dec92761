"""numba's kernels across processes and threads, and kernel_block_mean's argument checks across gloo ranks.

* fork: a child forked from a process that ran numba's parallel kernels under GNU OpenMP (numba's ``omp`` layer,
  not fork-safe) was terminated at its first kernel ("fork() called from a process already using GNU OpenMP");
  it now takes the torch paths, with one warning each, and gets the parent's results.
* threads: under numba's ``workqueue`` layer two threads launching parallel kernels at once aborted the process
  ("Concurrent access has been detected"); the launches are now serialised there.
* ranks: with a process group, a rank whose own arguments were refused raised at once while the others waited in the
  agreement all-gather until gloo's timeout (30 minutes by default); every rank now raises at once.

The process tests run tests/numba_processes.py in a subprocess (a fresh numba, a threading layer of their own).
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

from bma_gp import Partition, _numba
from bma_gp.kernel_block_mean import kernel_block_mean
from bma_gp.optim import _fused, _jit
from gloo_ranks import run_on_ranks

jit = importlib.import_module("bma_gp._kernel_sums.jit")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "numba_processes.py")

needs_numba = pytest.mark.skipif(not _numba.AVAILABLE, reason="numba is not installed (pip install bma-gp[jit])")
needs_fork = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="this platform has no fork start method"
)


def _run_script(mode: str, layer: str | None) -> tuple[subprocess.CompletedProcess, dict | None]:
    env = dict(os.environ)
    env.pop("NUMBA_THREADING_LAYER", None)
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    done = subprocess.run(
        [sys.executable, SCRIPT, mode], env=env, capture_output=True, text=True, timeout=150, check=False
    )
    lines = done.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return done, report


# ------------------------------------------------------------------------------------------------------- fork
@needs_numba
@needs_fork
@pytest.mark.parametrize("layer", [None, "workqueue"])
def test_a_child_forked_after_numba_ran_gets_the_parents_results(layer):
    done, report = _run_script("fork", layer)
    assert done.returncode == 0 and report is not None, done.stderr[-3000:]
    assert report["exitcode"] == 0, f"the forked child died ({report}): {done.stderr[-3000:]}"
    assert report["kbm_equal"] and report["small_equal"] and report["large_equal"], report
    assert report["compiled"] == []  # no torch.compile in the child: numba, or the passes' plain PyTorch
    unsafe = not (report["layer"] in ("tbb", "workqueue") or report["layer"] == "omp:Intel")
    if layer == "workqueue":
        assert report["layer"] == "workqueue"
    if unsafe:  # (GNU OpenMP: numba's omp layer where TBB is not installed): one warning per user, saying why
        assert len(report["warnings"]) == 2, report["warnings"]
        step, sums = sorted(report["warnings"])  # (capitals first)
        assert step.startswith("BlockMeanAdagrad(fused=True)") and sums.startswith("kernel block sums")
        for message in report["warnings"]:
            assert "not fork-safe" in message and "in this forked process" in message
            assert "spawn" in message and "NUMBA_THREADING_LAYER=workqueue or tbb" in message
        assert "without torch.compile" in step and "torch's ops" in sums
    else:  # a fork-safe layer: numba's kernels run in the child, nothing to say
        assert report["warnings"] == []


def _forked(monkeypatch, layer="omp:GNU"):
    """This process as a child forked from one whose numba threads ran under ``layer``."""
    monkeypatch.setattr(_numba, "_FORKED_UNDER", None)
    monkeypatch.setattr(_numba, "_WARNED", set())
    monkeypatch.setattr(_numba, "_LAUNCH_LOCK", _numba._LAUNCH_LOCK)  # restored after the handler replaces it
    monkeypatch.setattr(_numba, "_launched_layer", lambda: layer)
    _numba._after_fork_in_child()


@pytest.mark.parametrize(
    "layer, unsafe",
    [
        (None, False),  # no numba threads launched before the fork: the child launches its own
        ("tbb", False),
        ("workqueue", False),
        ("omp:Intel", False),
        ("omp:GNU", True),
        ("omp:unknown", True),
        ("unknown", True),
    ],
)
def test_which_forked_children_leave_numba(monkeypatch, layer, unsafe):
    _forked(monkeypatch, layer)
    assert _numba.in_unsafe_fork() is unsafe


def test_a_forked_child_warns_once_per_user_and_takes_the_torch_paths(monkeypatch):
    _forked(monkeypatch)
    monkeypatch.setattr(_fused, "CPU_BACKEND", "numba")
    with pytest.warns(RuntimeWarning, match="kernel block sums: .*GNU OpenMP.*not fork-safe") as seen:
        assert not jit.usable("cpu", torch.float32, jit.MIN_ENTRIES)
    assert len(seen) == 1 and seen[0].filename == __file__  # at the caller's line
    with pytest.warns(RuntimeWarning, match=r"BlockMeanAdagrad\(fused=True\): .*without torch.compile"):
        assert not _jit.usable("cpu", torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per user and process
        assert not jit.usable("cpu", torch.float32, jit.MIN_ENTRIES) and not _fused.uses_numba("cpu", torch.float64)
        assert _jit.forked_child("cpu", torch.float64) and not _jit.forked_child("cpu", torch.float16)
        assert _fused.forked_without_numba("cpu", torch.float32)
        # the fused passes: the plain-PyTorch functions, not torch.compile
        monkeypatch.setattr(_fused, "_inductor", lambda name: pytest.fail("torch.compile in a forked child"))
        g, h = torch.randn(2, 5, dtype=torch.float64), torch.rand(2, 5, dtype=torch.float64)
        sums, finite = _fused.compiled("block_sums")([g], [h], 1e-10)
        torch.testing.assert_close(sums, _fused.block_sums([g], [h], 1e-10)[0], rtol=0, atol=0)
    monkeypatch.setattr(_fused, "CPU_BACKEND", "inductor")  # asked for torch.compile: it stays
    assert not _fused.forked_without_numba("cpu", torch.float32)
    _numba._after_fork_in_child()  # a grandchild: warns again, once
    with pytest.warns(RuntimeWarning, match="kernel block sums"):
        assert not jit.usable("cpu", torch.float32, jit.MIN_ENTRIES)


def test_a_forked_child_with_an_optimizer_steps_without_numba(monkeypatch):
    from bma_gp.optim import BlockMeanAdagrad

    def run():
        torch.manual_seed(0)
        lin = torch.nn.Linear(40, 30).double()
        opt = BlockMeanAdagrad(lin.parameters(), lr=0.1, partition="row", fused=True)
        for _ in range(3):
            opt.zero_grad()
            lin(torch.randn(4, 40, dtype=torch.float64)).square().sum().backward()
            opt.step()
        return [p.detach().clone() for p in lin.parameters()]

    want = run()
    _forked(monkeypatch)
    monkeypatch.setattr(_fused, "_inductor", lambda name: pytest.fail("torch.compile in a forked child"))
    with pytest.warns(RuntimeWarning, match="BlockMeanAdagrad"):
        got = run()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------- threads
@needs_numba
def test_two_threads_under_numbas_workqueue_layer():
    done, report = _run_script("threads", "workqueue")
    assert done.returncode == 0 and report is not None, f"exit status {done.returncode}: {done.stderr[-3000:]}"
    assert report["layer"] == "workqueue" and report["serialised"] is True
    assert report["errors"] == [] and report["equal"], report


def test_launches_take_the_lock_until_the_layer_is_known_and_where_it_is_workqueue(monkeypatch):
    held = []

    def kernel(a, b):
        held.append(_numba._LAUNCH_LOCK.locked())
        return a + b

    for layer, serialised in (("workqueue", True), ("omp:GNU", False), ("tbb", False), ("unknown", True)):
        reads = []

        def launched(
            layer=layer, reads=reads
        ):  # numba's threads start with the first launch: the layer is known after it
            reads.append(layer)
            return None if len(reads) == 1 else layer

        monkeypatch.setattr(_numba, "_SERIALISE", None)
        monkeypatch.setattr(_numba, "_launched_layer", launched)
        assert _numba.launch(kernel, 1, 2) == 3 and held.pop() is True  # not known yet: under the lock
        assert _numba._SERIALISE is serialised and len(reads) == 2  # read after the launch, once
        assert _numba.launch(kernel, 1, 2) == 3 and held.pop() is serialised
        assert len(reads) == 2


def test_serialised_launches_run_one_at_a_time(monkeypatch):
    monkeypatch.setattr(_numba, "_SERIALISE", True)
    inside, most = [0], [0]
    start = threading.Barrier(4)

    def kernel():
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        threading.Event().wait(0.01)
        inside[0] -= 1

    def run():
        start.wait()
        for _ in range(5):
            _numba.launch(kernel)

    workers = [threading.Thread(target=run) for _ in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    assert most[0] == 1


# ------------------------------------------------------------------------------------------------------ ranks
def _x(n=12, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _one_bad_rank_worker(rank, world):
    """Each case on both ranks, in a group of its own with a 10 s timeout (a rank left waiting in a collective fails
    there, and the next case starts afresh): what each call raised, with its message and the seconds it took."""
    import datetime
    import time

    import torch.distributed as dist
    from gpytorch.kernels import RBFKernel

    kernel = RBFKernel().double()
    part = Partition.from_labels(torch.arange(12) % 3)
    nan = _x()
    nan[3, 0] = float("nan")
    cases = {
        "chunk_size": lambda: {"chunk_size": 0} if rank == 1 else {},
        "nan": lambda: {"x": nan} if rank == 1 else {},
        "type": lambda: {"partition": torch.arange(12) % 3} if rank == 1 else {},
        "both": lambda: {"x": nan} if rank == 0 else {"chunk_size": 0},
        "chunk_disagree": lambda: {"chunk_size": 5 + rank},  # compared by the gather: named, no IndexError
        "empty_batch": lambda: {"x": _x().expand(0, 12, 2)} if rank == 1 else {},  # left before the gather
        "same": lambda: {},
    }
    groups = {name: dist.new_group([0, 1], timeout=datetime.timedelta(seconds=10)) for name in cases}
    found = {}
    for name, case in cases.items():
        args = {"x": _x(), "partition": part, **case()}
        start = time.monotonic()
        try:
            with torch.no_grad():
                op = kernel_block_mean(kernel, args.pop("x"), args.pop("partition"), process_group=groups[name], **args)
            found[name] = ("returned", float(op.lam.sum()), time.monotonic() - start)
        except Exception as error:  # noqa: BLE001 - reported to the test, gloo's errors included
            found[name] = (type(error).__name__, str(error), time.monotonic() - start)
    return found


@pytest.mark.slow
def test_a_rank_whose_arguments_are_refused_does_not_leave_the_others_waiting():
    ranks = run_on_ranks(_one_bad_rank_worker, 2)
    good, bad = ranks
    for name in ("chunk_size", "nan", "type"):
        assert good[name][0] == "ValueError", (name, good[name])
        assert "the arguments of rank 1 of the group were refused there" in good[name][1], good[name]
        assert good[name][2] < 5 and bad[name][2] < 5, (good[name], bad[name])
    assert bad["chunk_size"][0] == "ValueError" and "chunk_size must be a positive int" in bad["chunk_size"][1]
    assert bad["nan"][0] == "ValueError" and "contains NaN" in bad["nan"][1]
    assert bad["type"][0] == "TypeError" and "partition must be a bma_gp.Partition" in bad["type"][1]
    assert "(TypeError raised on that rank" in good["type"][1]
    # both refused: each raises its own error, neither waits
    assert good["both"][0] == "ValueError" and "contains NaN" in good["both"][1]
    assert bad["both"][0] == "ValueError" and "chunk_size must be a positive int" in bad["both"][1]
    for found in ranks:
        assert found["both"][2] < 5
        assert found["chunk_disagree"][0] == "ValueError" and "disagree on chunk_size" in found["chunk_disagree"][1]
        assert found["empty_batch"][0] == "ValueError" and "disagree on the batch shape" in found["empty_batch"][1]
        assert found["empty_batch"][2] < 5
        assert found["same"][0] == "returned"
    assert good["same"][1] == bad["same"][1]
