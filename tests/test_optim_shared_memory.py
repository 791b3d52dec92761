"""BlockMeanAdagrad's state moved to other memory between steps, the tensor objects kept.

``Tensor.share_memory_()`` (what A3C/Hogwild code calls on ``state[p]["sum"]``, and what torch.multiprocessing's
pickler does to every tensor of an optimizer handed to a spawn worker), ``set_()`` and ``.data =`` to another
storage, and a ``resize_()`` that grows the storage all keep the tensor object and move its memory (the old block
is freed). The CPU eager step for one block per tensor kept numpy arrays on that memory (``h``, ``U``, ``w`` and the
stored root), found by identity: after the move it read and wrote freed memory (``malloc(): unaligned tcache chunk``,
segfaults) or stepped a copy of the state the user no longer saw. Each case here runs in a child process (a crash
must not take pytest with it) and checks that the run equals an uninterrupted one bit for bit: parameters, every
``state[p]["sum"]``, ``U``, ``w``, the root and the step count, and that shared state stays shared.

The file is also the child's script: ``python tests/test_optim_shared_memory.py CASE [CASE ...]`` prints one line per
scenario and a JSON report (one per case) last.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.abspath(__file__)
TESTS = os.path.dirname(SCRIPT)

#: per model: the parameter shapes. "host": tensors of up to HOST_MAX_NUMEL entries, the host form (numpy on the
#: tensors' memory) with the root on Python floats (6 blocks); "many": 14 small tensors, the root in numpy (more than
#: PYTHON_ROOT_MAX_BLOCKS blocks); "big": tensors above 2^15 entries, the ratio form (torch's fused kernels)
MODELS = {
    "host": [(5, 6), (5,), (4, 5), (4,), (3, 4), (3,)],
    "many": [(4, 4), (4,)] * 7,
    "big": [(200, 200), (200,), (180, 200), (180,)],
}
#: scenarios applied between step 5 and step 6 (of 8): with update_interval=3 the root computed at step 4 is reused
#: at step 5 (its host copy cached), at step 6 from the moved memory, and computed again at step 7
SCENARIOS = ("share_sum", "share_global", "set_sum", "set_global", "data_sum", "resize")
STEPS, MOVE_AT = 8, 5  # the move before the sixth step


def _grads(shapes, step, dtype):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes]


def _params(shapes, dtype):
    gen = torch.Generator().manual_seed(7)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)) for shape in shapes]


def _optimizer(params, fused):
    from bma_gp.optim import BlockMeanAdagrad

    # update_interval=3: steps that compute the root and steps that reuse the stored one (its host copy is cached)
    return BlockMeanAdagrad(params, lr=0.05, damping=0.1, update_interval=3, fused=fused)


def _step(opt, params, shapes, step, dtype):
    for p, g in zip(params, _grads(shapes, step, dtype)):
        p.grad = g
    opt.step()


def _move(opt, params, scenario):
    """Move the optimizer's state to other memory, keeping the tensor objects (and their values)."""
    sums = [opt.state[p]["sum"] for p in params]
    stats = [v for v in opt.global_state.values() if isinstance(v, torch.Tensor)]
    if scenario == "share_sum":
        for s in sums:
            s.share_memory_()
    elif scenario == "share_global":
        for t in stats:
            t.share_memory_()
    elif scenario == "set_sum":
        for s in sums:
            s.set_(s.clone())
    elif scenario == "set_global":
        for t in stats:
            t.set_(t.clone())
    elif scenario == "data_sum":  # p.data = ...-style: no version counter bump
        for s in sums:
            s.data = s.clone()
    elif scenario == "resize":  # a storage that grows is reallocated; shrunk back to the old shape
        # torch refuses to resize a storage that numpy arrays were made on (the host form's h, U and w, a root from
        # numpy): the others
        for t in [x for x in (sums[0], *stats) if x.untyped_storage().resizable()]:
            shape = t.shape
            t.resize_(opt._flat["sum"].numel() + t.numel() + 1024)
            t.resize_(shape)
    else:
        raise ValueError(scenario)


def _compare(ref, opt, ref_params, params, scenario) -> str | None:
    """What differs between the uninterrupted run and the moved one (``None``: nothing)."""
    for i, (p, q) in enumerate(zip(ref_params, params)):
        if not torch.equal(p, q):
            return f"parameter {i} differs by {(p - q).abs().max().item():.3g}"
        if not torch.equal(ref.state[p]["sum"], opt.state[q]["sum"]):
            return f"state sum {i} differs"
    for key, value in ref.global_state.items():
        other = opt.global_state[key]
        same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
        if not same:
            return f"global_state[{key!r}] differs"
    if scenario == "share_sum" and not all(opt.state[q]["sum"].is_shared() for q in params):
        return "state sums no longer shared"
    if scenario == "share_global" and not all(opt.global_state[k].is_shared() for k in ("U", "w")):
        return "U, w no longer shared"
    return None


def run_case(case: str) -> dict[str, str]:
    """Every scenario of one case (``model:dtype:path``), each against an uninterrupted run. The module settings a
    path changes are put back after it, so that the cases of one child process do not see each other's."""
    from bma_gp.optim import _cpu_kernels, _fused, block_mean_adagrad

    model, dtype_name, path = case.split(":")
    dtype, shapes = getattr(torch, dtype_name), MODELS[model]
    fused = path.startswith("fused")
    patched = [
        (_cpu_kernels, "RATIO_CHUNK_NUMEL"),
        (block_mean_adagrad, "FUSED_MIN_NUMEL"),
        (block_mean_adagrad, "FUSED_MIN_NUMEL_ONE_BLOCK"),
        (block_mean_adagrad, "FUSED_MIN_MEAN_NUMEL_ONE_BLOCK"),
        (_fused, "compiled"),
    ]
    kept = [(module, name, getattr(module, name)) for module, name in patched]
    try:
        if path == "chunked":  # the ratio form's first pass in chunks of 4096 entries
            _cpu_kernels.RATIO_CHUNK_NUMEL = 4096
        if path == "fused_passes":  # the fused path itself at this size, its passes uncompiled (no compiler needed)
            block_mean_adagrad.FUSED_MIN_NUMEL = block_mean_adagrad.FUSED_MIN_NUMEL_ONE_BLOCK = 0
            block_mean_adagrad.FUSED_MIN_MEAN_NUMEL_ONE_BLOCK = 0
            passes = {"block_sums": _fused.block_sums, "apply_update": _fused.apply_update}
            _fused.compiled = passes.__getitem__
        report = {}
        for scenario in SCENARIOS:
            print("running", case, scenario, flush=True)  # the last line before a crash names it
            ref_params, params = _params(shapes, dtype), _params(shapes, dtype)
            ref, opt = _optimizer(ref_params, fused), _optimizer(params, fused)
            for t in range(STEPS):
                _step(ref, ref_params, shapes, t, dtype)
                if t == MOVE_AT:
                    _move(opt, params, scenario)
                _step(opt, params, shapes, t, dtype)
            report[scenario] = _compare(ref, opt, ref_params, params, scenario) or "ok"
        return report
    finally:
        for module, name, value in kept:
            setattr(module, name, value)


def run_refusal() -> dict[str, str]:
    """A statistic moved to memory of another shape (``w.set_(torch.zeros(k + 1))``, ``U.data = ...``) is refused
    with a ``ValueError`` before the step changes anything; with the statistics put back the run continues."""
    shapes, dtype = MODELS["host"], torch.float32
    ref_params, params = _params(shapes, dtype), _params(shapes, dtype)
    ref, opt = _optimizer(ref_params, False), _optimizer(params, False)
    report = {}
    for t in range(STEPS):
        _step(ref, ref_params, shapes, t, dtype)
        if t == MOVE_AT:
            U, w = opt.global_state["U"], opt.global_state["w"]
            k = w.shape[0]
            for name, tensor, wrong in (("w", w, torch.zeros(k + 1)), ("U", U, torch.zeros(k, k + 1))):
                print("running refusal", name, flush=True)
                kept = tensor.clone()
                before = [x.clone() for x in (*params, *(opt.state[p]["sum"] for p in params))]
                step = opt.global_state["step"]
                tensor.data = wrong
                try:
                    _step(opt, params, shapes, t, dtype)
                    report[name] = "no error"
                except ValueError as error:
                    after = [*params, *(opt.state[p]["sum"] for p in params)]
                    unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
                    words = "do not fit its blocks" in str(error) and "Nothing was changed" in str(error)
                    report[name] = "ok" if unchanged and words and opt.global_state["step"] == step else str(error)
                tensor.data = kept  # put back: the run goes on
        _step(opt, params, shapes, t, dtype)
    report["continued"] = _compare(ref, opt, ref_params, params, "refusal") or "ok"
    return report


def _worker_noop(payload):
    """Runs in a spawn worker: it received the model and the optimizer (their tensors in shared memory)."""
    _params, opt = payload
    return opt.global_state["step"]


def run_spawn() -> dict[str, str]:
    """Hand model and optimizer to a spawn worker (torch's pickler moves every tensor to shared memory in this
    process), then train on here: equal to a run that never sent them."""
    import torch.multiprocessing  # noqa: F401  (registers torch's reductions with multiprocessing's pickler)

    print("running spawn", flush=True)
    shapes, dtype = MODELS["host"], torch.float32
    ref_params, params = _params(shapes, dtype), _params(shapes, dtype)
    ref, opt = _optimizer(ref_params, False), _optimizer(params, False)
    for t in range(STEPS + 12):
        _step(ref, ref_params, shapes, t, dtype)
        if t == MOVE_AT:
            try:
                pool = multiprocessing.get_context("spawn").Pool(1)
            except (OSError, PermissionError, ValueError) as error:
                return {"skip": f"no spawn pool here: {error}"}
            with pool:
                got = pool.apply(_worker_noop, ((params, opt),))
            if got != MOVE_AT:
                return {"spawn": f"the worker saw step {got}, not {MOVE_AT}"}
            if not opt.state[params[0]]["sum"].is_shared():
                return {"spawn": "the pickler did not move the state to shared memory (nothing was tested)"}
        _step(opt, params, shapes, t, dtype)
    return {"spawn": _compare(ref, opt, ref_params, params, "spawn") or "ok"}


def _run_child(*args: str, timeout: float = 240) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=TESTS
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("{"):
        last = lines[-1] if lines else "(no output)"
        raise AssertionError(
            f"the child exited with {done.returncode} (negative: killed by that signal) after {last!r}\n"
            f"stderr:\n{done.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


#: the cases, in two child processes (each pays torch's imports, a few seconds, once)
CASE_GROUPS = {
    "small": [
        "host:float32:eager",
        "host:float64:eager",
        "many:float64:eager",
        "host:float32:fused",  # fused=True below FUSED_MIN_NUMEL(_ONE_BLOCK): the eager step
        "host:float64:fused_passes",
    ],
    "big": [
        "big:float32:eager",
        "big:float64:eager",
        "big:float32:chunked",
        "big:float64:chunked",
        "big:float32:fused",  # numba's kernels where numba is installed (76,380 entries), else the eager step
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("group", CASE_GROUPS)
def test_state_moved_between_steps_continues_the_run(group):
    cases = CASE_GROUPS[group]
    report = _run_child(*cases)
    assert report == {case: dict.fromkeys(SCENARIOS, "ok") for case in cases}


def test_a_case_puts_back_the_settings_it_changes():
    """The cases of one child must not see each other's settings (chunk size, fused thresholds)."""
    from bma_gp.optim import _cpu_kernels, _fused, block_mean_adagrad

    before = (
        _cpu_kernels.RATIO_CHUNK_NUMEL,
        block_mean_adagrad.FUSED_MIN_NUMEL,
        block_mean_adagrad.FUSED_MIN_NUMEL_ONE_BLOCK,
        block_mean_adagrad.FUSED_MIN_MEAN_NUMEL_ONE_BLOCK,
        _fused.compiled,
    )
    for case in ("host:float32:chunked", "host:float64:fused_passes"):
        assert run_case(case) == dict.fromkeys(SCENARIOS, "ok")
        after = (
            _cpu_kernels.RATIO_CHUNK_NUMEL,
            block_mean_adagrad.FUSED_MIN_NUMEL,
            block_mean_adagrad.FUSED_MIN_NUMEL_ONE_BLOCK,
            block_mean_adagrad.FUSED_MIN_MEAN_NUMEL_ONE_BLOCK,
            _fused.compiled,
        )
        assert after == before, case


@pytest.mark.slow
def test_statistics_moved_to_the_wrong_shape_are_refused():
    assert _run_child("refusal") == {"w": "ok", "U": "ok", "continued": "ok"}


@pytest.mark.slow
@pytest.mark.skipif("spawn" not in multiprocessing.get_all_start_methods(), reason="no spawn start method")
def test_optimizer_sent_to_a_spawn_worker_keeps_training():
    report = _run_child("spawn")
    if "skip" in report:
        pytest.skip(report["skip"])
    assert report == {"spawn": "ok"}


if __name__ == "__main__":
    torch.set_num_threads(1)
    special = {"spawn": run_spawn, "refusal": run_refusal}
    if sys.argv[1] in special:
        result = special[sys.argv[1]]()
    else:  # one or more cases: a report per case
        result = {case: run_case(case) for case in sys.argv[1:]}
    print(json.dumps(result), flush=True)
