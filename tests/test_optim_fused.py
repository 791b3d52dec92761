"""BlockMeanAdagrad(fused=True): the two compiled passes against the dense reference and the eager step.

(The dense-reference runs with param groups and weight decay, maximize with closures, and the
non-contiguous parameter have fused cases in test_optim_block_mean.py.)

The compiled code is shared by all optimizers of the process, so these tests reuse a few
model structures (each new structure or dtype compiles once, a few seconds on two cores).
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from bma_gp.optim import _fused, _jit
from optim import BlockMeanAdagrad
from optim_reference import (
    DenseBlockMeanAdagrad,
    flat,
    fused_at_any_size,
    loss_of,
    reference_labels,
    set_flat,
    small_batch,
    small_model,
)
from test_optim_block_mean import _zero_some_entries, identity_correlation


@pytest.fixture(autouse=True)
def _fused_at_any_size():
    with fused_at_any_size():
        yield


@pytest.fixture(params=["numba", "inductor"])
def backend(request, monkeypatch):
    """Run the test with the fused passes on CPU from numba's kernels, then from torch.compile; check that the
    chosen backend is the one that ran."""
    if request.param == "numba" and not _jit.AVAILABLE:
        pytest.skip("numba is not installed (pip install bma-gp[jit])")
    monkeypatch.setattr(_fused, "CPU_BACKEND", request.param)
    calls = []
    for name in ("block_sums", "apply_update"):
        kernel = getattr(_jit, name)
        monkeypatch.setattr(_jit, name, lambda *args, _k=kernel, _n=name: calls.append(_n) or _k(*args))
    yield request.param
    assert bool(calls) == (request.param == "numba"), calls


@pytest.fixture
def inductor(monkeypatch):
    """The fused passes from torch.compile on CPU too (tests of its compilation and fallbacks)."""
    monkeypatch.setattr(_fused, "CPU_BACKEND", "inductor")


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, t).backward()
        opt.step()


@pytest.mark.slow
def test_fused_with_missing_grads_and_zero_h_matches_reference(monkeypatch, backend):
    # parameter 2 has no gradient on even steps; two entries of every tensor have a zero gradient
    # (h = 0, masked inside the compiled loop) until step 4
    model, ref_model = small_model(), small_model()
    step, ref_step = _zero_some_entries(model, until=4), _zero_some_entries(ref_model, until=4)
    params, ref_params = list(model.parameters()), list(ref_model.parameters())
    start = flat(params).clone()
    zeroed = torch.cat([torch.arange(p.numel()) < 2 for p in params])
    opt = BlockMeanAdagrad(params, lr=0.05, partition="tensor", fused=True)
    ref = DenseBlockMeanAdagrad(reference_labels(params, "tensor"), torch.full((60,), 0.05, dtype=torch.float64))
    numels = [p.numel() for p in params]
    checks = []  # the eager finiteness check (and its h.amin() read back) runs only at the first step
    check = opt._check_finite
    monkeypatch.setattr(opt, "_check_finite", lambda *args: checks.append(args) or check(*args))
    for t in range(8):
        step[0] = ref_step[0] = t
        opt.zero_grad()
        ref_model.zero_grad()
        loss_of(model, t).backward()
        loss_of(ref_model, t).backward()
        if t % 2 == 0:
            params[2].grad = ref_params[2].grad = None
        frozen = params[2].detach().clone()
        opt.step()
        active = torch.cat([torch.full((m,), p.grad is not None) for p, m in zip(ref_params, numels)])
        grads = torch.cat(
            [p.grad.reshape(-1) if p.grad is not None else torch.zeros(m) for p, m in zip(ref_params, numels)]
        )
        set_flat(ref_params, ref.step(flat(ref_params), grads, active))
        torch.testing.assert_close(flat(params), flat(ref_params), rtol=1e-10, atol=1e-12)
        if t % 2 == 0:
            assert torch.equal(params[2], frozen)
        if t < 4:
            assert torch.equal(flat(params)[zeroed], start[zeroed])
    assert not torch.equal(flat(params)[zeroed], start[zeroed])
    assert len(checks) == 1  # later steps: pass 1's flag, no h.amin() read back (the mask costs no synchronisation)


def test_fused_identity_correlation_is_torch_adagrad(monkeypatch, backend):
    monkeypatch.setattr(BlockMeanAdagrad, "_correlation", staticmethod(identity_correlation))
    ours, theirs = small_model(), small_model()
    opt = BlockMeanAdagrad(ours.parameters(), lr=0.1, eps=1e-10, damping=0.0, partition="tensor", fused=True)
    torch_opt = torch.optim.Adagrad(theirs.parameters(), lr=0.1, eps=1e-10)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (opt, torch_opt)]
    for t in range(10):
        for model, o, s in ((ours, opt, scheds[0]), (theirs, torch_opt, scheds[1])):
            o.zero_grad()
            loss_of(model, t).backward()
            o.step()
            s.step()
        torch.testing.assert_close(flat(ours.parameters()), flat(theirs.parameters()), rtol=1e-13, atol=1e-13)
        # h += g^2 may compile to a fused multiply-add: equal to rounding, not bit for bit
        torch.testing.assert_close(
            flat(opt.state[p]["sum"] for p in ours.parameters()),
            flat(torch_opt.state[p]["sum"] for p in theirs.parameters()),
            rtol=1e-14,
            atol=0,
        )


@pytest.mark.slow
def test_fused_float32_matches_eager(backend):
    fused_model, eager_model = small_model(dtype=torch.float32), small_model(dtype=torch.float32)
    opts = [
        BlockMeanAdagrad(m.parameters(), lr=0.03, partition="row", fused=f)
        for m, f in ((fused_model, True), (eager_model, False))
    ]
    for t in range(8):
        for m, o in zip((fused_model, eager_model), opts):
            _train(m, o, 1, start=t)
        torch.testing.assert_close(flat(fused_model.parameters()), flat(eager_model.parameters()), rtol=2e-5, atol=2e-6)
    assert opts[0].global_state["U"].dtype == torch.float32


@pytest.mark.slow
def test_fused_bfloat16_parameters_keep_float32_statistics(backend):
    low = small_model().to(torch.bfloat16)
    high = small_model().to(torch.bfloat16)
    opt_low = BlockMeanAdagrad(low.parameters(), lr=0.05, fused=True)
    opt_high = BlockMeanAdagrad(high.parameters(), lr=0.05, fused=False)
    for t in range(4):
        for m, o in ((low, opt_low), (high, opt_high)):
            _train(m, o, 1, start=t)
    assert opt_low.global_state["U"].dtype == torch.float32
    assert all(opt_low.state[p]["sum"].dtype == torch.float32 for p in low.parameters())
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    # both round the float32 update to bfloat16 once per step
    torch.testing.assert_close(flat(low.parameters()).float(), flat(high.parameters()).float(), rtol=2e-2, atol=2e-2)
    assert not torch.equal(flat(low.parameters()), flat(small_model().to(torch.bfloat16).parameters()))


def test_state_dict_moves_between_fused_and_eager(backend):
    # the state is the same in both modes: an eager checkpoint continues under fused=True and back
    model = small_model()
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05, update_interval=3, fused=False)
    _train(model, opt, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 4, start=4)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = small_model(seed=5)
    model2.load_state_dict(ckpt["model"])
    opt2 = BlockMeanAdagrad(model2.parameters(), lr=0.05, update_interval=3, fused=True)
    opt2.load_state_dict(ckpt["opt"])
    _train(model2, opt2, 4, start=4)
    torch.testing.assert_close(flat(model2.parameters()), flat(model.parameters()), rtol=1e-11, atol=1e-13)
    assert opt2.global_state["step"] == opt.global_state["step"] == 8


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"fused": "yes"}, "Invalid fused"),
        ({"fused": True, "partition": lambda p: torch.zeros(p.numel(), dtype=torch.long)}, "fused=True supports"),
    ],
)
def test_fused_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockMeanAdagrad(small_model().parameters(), **kwargs)


def test_non_finite_gradient_changes_nothing_when_fused(backend):
    model = small_model()
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05, fused=True)
    _train(model, opt, 2)
    before = flat(model.parameters()).clone()
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.global_state.items()}
    opt.zero_grad()
    loss_of(model, 2).backward()
    next(model.parameters()).grad.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert torch.equal(flat(model.parameters()), before)
    for key, value in state.items():
        assert torch.equal(opt.global_state[key], value) if torch.is_tensor(value) else opt.global_state[key] == value


def test_compile_failure_falls_back_to_the_eager_passes(monkeypatch, inductor):
    from torch._dynamo.exc import BackendCompilerFailed

    def broken_compile(fn, **kwargs):
        def call(*args):
            raise BackendCompilerFailed("inductor", RuntimeError("no C++ compiler"), None)

        return call

    monkeypatch.setattr(_fused, "_COMPILED", {})
    monkeypatch.setattr(_fused.torch, "compile", broken_compile)
    fused_model, eager_model = small_model(), small_model()
    opt_f = BlockMeanAdagrad(fused_model.parameters(), lr=0.05, fused=True)
    opt_e = BlockMeanAdagrad(eager_model.parameters(), lr=0.05)
    with pytest.warns(RuntimeWarning, match="torch.compile of the fused step failed"):
        _train(fused_model, opt_f, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not every step
        _train(fused_model, opt_f, 3, start=1)
    _train(eager_model, opt_e, 4)
    torch.testing.assert_close(flat(fused_model.parameters()), flat(eager_model.parameters()), rtol=1e-12, atol=1e-14)


def test_a_step_where_only_empty_parameters_have_gradients(backend):
    empty, weight = torch.nn.Parameter(torch.zeros(0, 3)), torch.nn.Parameter(torch.ones(2, 3))
    twin = torch.nn.Parameter(torch.ones(2, 3))
    opt = BlockMeanAdagrad([empty, weight], lr=0.1, partition="row", fused=True)
    ref = BlockMeanAdagrad([torch.nn.Parameter(torch.zeros(0, 3)), twin], lr=0.1, partition="row")
    empty.grad = torch.zeros(0, 3)
    ref.param_groups[0]["params"][0].grad = torch.zeros(0, 3)
    opt.step()
    ref.step()
    assert opt.global_state["step"] == 1 and torch.equal(weight, torch.ones(2, 3))
    weight.grad = twin.grad = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    opt.step()
    ref.step()
    torch.testing.assert_close(weight, twin, rtol=1e-6, atol=1e-7)
    assert not torch.equal(weight, torch.ones(2, 3))
    assert not any(key.endswith(":failed") for key in _fused._COMPILED)


@pytest.mark.slow
def test_past_the_recompile_limit_new_structures_run_eagerly_and_compiled_ones_stay(inductor):
    import torch._dynamo
    from torch._dynamo.utils import counters

    def run(model, fused, steps=3):
        opt = BlockMeanAdagrad(model.parameters(), lr=0.05, partition="row", fused=fused)
        _train(model, opt, steps)
        return flat(model.parameters())

    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            counters.clear()
            run(small_model(), True)  # compiles one variant of each pass
            graphs = counters["stats"]["unique_graphs"]
            assert graphs == 2
            # a second structure (float32) is past the limit: eager passes, same results as the eager step
            got = run(small_model(dtype=torch.float32), True)
            want = run(small_model(dtype=torch.float32), False)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
            # the first structure still runs its compiled code (no new graph, no failure mark)
            run(small_model(), True)
            assert counters["stats"]["unique_graphs"] == graphs
            assert not any(key.endswith(":failed") for key in _fused._COMPILED)
    finally:
        torch._dynamo.reset()


def test_errors_of_the_computation_itself_are_not_swallowed(monkeypatch, inductor):
    def compile_raising_value_error(fn, **kwargs):
        def call(*args):
            raise ValueError("a genuine error")

        return call

    monkeypatch.setattr(_fused, "_COMPILED", {})
    monkeypatch.setattr(_fused.torch, "compile", compile_raising_value_error)
    model = small_model()
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05, fused=True)
    loss_of(model, 0).backward()
    with pytest.raises(ValueError, match="a genuine error"):
        opt.step()


def test_an_error_torch_compile_reports_for_the_computation_is_raised_by_the_eager_pass(monkeypatch, inductor):
    # TorchDynamo reports errors of the traced computation as its own exceptions; the eager pass then
    # raises the computation's error, and compilation stays on for other calls
    from torch._dynamo.exc import TorchRuntimeError

    def compile_reporting(fn, **kwargs):
        def call(*args):
            raise TorchRuntimeError("RuntimeError when making fake tensor call")

        return call

    def broken_eager(*args):
        raise RuntimeError("shape mismatch in the computation")

    monkeypatch.setattr(_fused, "_COMPILED", {})
    monkeypatch.setattr(_fused.torch, "compile", compile_reporting)
    monkeypatch.setattr(_fused, "block_sums", broken_eager)
    model = small_model()
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05, fused=True)
    loss_of(model, 0).backward()
    with pytest.raises(RuntimeError, match="shape mismatch in the computation"):
        opt.step()
    assert "block_sums:failed" not in _fused._COMPILED
    assert opt.global_state["step"] == 0  # pass 1 writes nothing: the step did not happen


@pytest.mark.cuda
def test_fused_cuda_matches_cpu():
    cpu, gpu = small_model(), small_model().cuda()
    opt_c = BlockMeanAdagrad(cpu.parameters(), lr=0.05, partition="row")
    opt_g = BlockMeanAdagrad(gpu.parameters(), lr=0.05, partition="row", check_finite=False, fused=True)
    for t in range(6):
        _train(cpu, opt_c, 1, start=t)
        opt_g.zero_grad()
        x, y = small_batch(t)
        (gpu(x.cuda()) - y.cuda()).pow(2).mean().backward()
        opt_g.step()
    assert all(opt_g.state[p]["sum"].is_cuda for p in gpu.parameters())
    torch.testing.assert_close(flat(gpu.parameters()).cpu(), flat(cpu.parameters()), rtol=1e-9, atol=1e-11)


def test_a_fused_step_bumps_the_version_of_h(backend):
    """numba's kernels write ``h`` behind torch's back; the step bumps its version counter as an in-place op would, so
    that the CPU eager step (which a later step may take: fewer gradients, a smaller model) drops the bounds of ``h``
    it kept from before."""
    model = small_model()
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05, fused=True)
    _train(model, opt, 1)
    h = opt._flat["sum"]
    before = h._version
    _train(model, opt, 1, start=1)
    assert opt._flat["sum"] is h and h._version > before


def test_small_models_stay_on_the_eager_path(monkeypatch, inductor):
    # below FUSED_MIN_NUMEL entries fused=True with torch.compile runs the eager step (the compiled passes cost
    # more there)
    from bma_gp.optim import block_mean_adagrad

    monkeypatch.setattr(block_mean_adagrad, "FUSED_MIN_NUMEL", 61)  # the small model has 60 entries

    def not_compiled(name):
        raise AssertionError(f"the compiled {name} ran on a small model")

    monkeypatch.setattr(_fused, "compiled", not_compiled)
    fused_model, eager_model = small_model(), small_model()
    opt_f = BlockMeanAdagrad(fused_model.parameters(), lr=0.05, fused=True)
    opt_e = BlockMeanAdagrad(eager_model.parameters(), lr=0.05)
    _train(fused_model, opt_f, 3)
    _train(eager_model, opt_e, 3)
    assert torch.equal(flat(fused_model.parameters()), flat(eager_model.parameters()))
    monkeypatch.setattr(block_mean_adagrad, "FUSED_MIN_NUMEL", 60)
    with pytest.raises(AssertionError, match="compiled block_sums ran"):
        _train(fused_model, opt_f, 1, start=3)


@pytest.mark.skipif(not _jit.AVAILABLE, reason="numba is not installed (pip install bma-gp[jit])")
@pytest.mark.parametrize("partition", ["tensor", "row"])
def test_numba_kernels_and_small_models(monkeypatch, partition):
    # numba's kernels ignore torch.compile's threshold. With one block per tensor, small steps take the eager
    # step (as fast there, docs/optimizer.md) below FUSED_MIN_NUMEL_ONE_BLOCK; with rows they run at every size
    from bma_gp.optim import block_mean_adagrad, functional

    monkeypatch.setattr(block_mean_adagrad, "FUSED_MIN_NUMEL", 10**9)
    monkeypatch.setattr(block_mean_adagrad, "FUSED_MIN_NUMEL_ONE_BLOCK", 61)  # the small model has 60 entries
    monkeypatch.setattr(block_mean_adagrad, "FUSED_MIN_MEAN_NUMEL_ONE_BLOCK", 0)  # (tested below)
    monkeypatch.setattr(_fused, "CPU_BACKEND", "numba")
    calls, eager = [], []
    kernel, eager_step = _jit.block_sums, functional._tensor_blocks_cpu_step
    monkeypatch.setattr(_jit, "block_sums", lambda *args: calls.append(1) or kernel(*args))
    monkeypatch.setattr(functional, "_tensor_blocks_cpu_step", lambda *a, **k: eager.append(1) or eager_step(*a, **k))
    fused_model, eager_model = small_model(), small_model()
    opt = BlockMeanAdagrad(fused_model.parameters(), lr=0.05, fused=True, partition=partition)
    _train(fused_model, opt, 3)
    _train(eager_model, BlockMeanAdagrad(eager_model.parameters(), lr=0.05, partition=partition), 3)
    assert (len(calls), len(eager)) == ((0, 6) if partition == "tensor" else (3, 0))
    torch.testing.assert_close(flat(fused_model.parameters()), flat(eager_model.parameters()), rtol=1e-12, atol=1e-14)
    monkeypatch.setattr(block_mean_adagrad, "FUSED_MIN_NUMEL_ONE_BLOCK", 60)  # now at the threshold: numba's kernels
    _train(fused_model, opt, 1, start=3)
    assert len(calls) == (1 if partition == "tensor" else 4)


@pytest.mark.skipif(not _jit.AVAILABLE, reason="numba is not installed (pip install bma-gp[jit])")
def test_many_small_tensors_take_the_eager_step_and_few_large_ones_numbas_kernels(monkeypatch):
    """``fused=True`` with numba and one block per tensor took numba's kernels from 2^16 entries whatever the number
    of tensors: with hundreds of small tensors each tensor's fixed cost (two kernel dispatches) made the step slower
    than the eager one (a user trial: 400 tensors of 528 entries, 1.22x). Now it also needs
    ``FUSED_MIN_MEAN_NUMEL_ONE_BLOCK`` entries per stepped tensor on average."""
    from bma_gp.optim import block_mean_adagrad, functional

    monkeypatch.setattr(_fused, "CPU_BACKEND", "numba")
    calls, eager = [], []
    kernel, eager_step = _jit.block_sums, functional._tensor_blocks_cpu_step
    monkeypatch.setattr(_jit, "block_sums", lambda *args: calls.append(1) or kernel(*args))
    monkeypatch.setattr(functional, "_tensor_blocks_cpu_step", lambda *a, **k: eager.append(1) or eager_step(*a, **k))
    mean, total = 2**14, 2**16  # the defaults (this module's fixture sets them to 0)
    monkeypatch.setattr(block_mean_adagrad, "FUSED_MIN_MEAN_NUMEL_ONE_BLOCK", mean)
    monkeypatch.setattr(block_mean_adagrad, "FUSED_MIN_NUMEL_ONE_BLOCK", total)
    monkeypatch.setattr(block_mean_adagrad, "FUSED_MIN_NUMEL", 10**9)
    small = [torch.nn.Parameter(torch.randn(mean // 2)) for _ in range(2 * total // mean + 2)]  # past 2^16 in all
    large = [torch.nn.Parameter(torch.randn(total // 2)) for _ in range(2)]
    for params, expected in ((small, (0, 1)), (large, (1, 0)), (large + small[:2], (1, 0))):
        calls.clear(), eager.clear()
        for p in params:
            p.grad = torch.randn_like(p)
        BlockMeanAdagrad(params, lr=0.01, fused=True).step()
        assert (len(calls), len(eager)) == expected
    assert sum(p.numel() for p in small) >= total
