"""The ratio form's first pass in chunks that fit the level-2 caches (:func:`_cpu_kernels.ratio_chunk_numel`).

The chunked pass must give the step of the tensor-by-tensor loop (float32 and float64, uneven last chunks,
weight decay, a gradient entry exactly 0, tensors with entries where ``h == 0``, which keep the whole-tensor
pass), and the automatic choice of the chunk length must follow its rules.
"""

from __future__ import annotations

import time

import pytest
import torch

from bma_gp.optim import BlockMeanAdagrad, _cpu_kernels, functional
from test_optim_tensor_blocks import GAPS, assert_same, grads_at, make_model, run_pair

DTYPES = [torch.float32, torch.float64]


@pytest.fixture
def chunked(monkeypatch):
    """Every tensor takes the ratio form, in chunks of 7 entries (the test model's tensors have 6-240 entries,
    so most have an uneven last chunk); returns the list of (tensor numel, chunk length) of the chunked passes."""
    monkeypatch.setattr(functional, "HOST_MAX_NUMEL", 0)
    monkeypatch.setattr(_cpu_kernels, "RATIO_CHUNK_NUMEL", 7)
    ran = []
    chunk_pass = functional._chunked_ratio_pass

    def counting(ws, i, g, h, n, r, s, eps, size):
        ran.append((g.numel(), size))
        return chunk_pass(ws, i, g, h, n, r, s, eps, size)

    monkeypatch.setattr(functional, "_chunked_ratio_pass", counting)
    return ran


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_ratio_form_matches_the_loop(monkeypatch, chunked, dtype):
    fast, loop, calls = run_pair(
        monkeypatch, dtype, 8, lambda m: BlockMeanAdagrad(m.parameters(), lr=0.05, weight_decay=0.01)
    )
    assert calls == 8
    assert chunked and all(size == 7 and numel >= 14 for numel, size in chunked)
    # the first step finds the entries where h == 0 (whole-tensor pass); then every tensor of 14+ entries is chunked
    numels = sorted(p.numel() for p in fast[1].parameters() if p.numel() >= 14)
    assert sorted(numel for numel, _ in chunked[: len(numels)]) == numels
    assert len(chunked) == 7 * len(numels)
    assert_same(fast, loop, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_entries_with_h_zero_keep_the_whole_tensor_pass(monkeypatch, chunked, dtype):
    """A third of every gradient is always 0 (h stays 0 there, r must be masked): no tensor is chunked."""
    fast, loop, calls = run_pair(monkeypatch, dtype, 6, lambda m: BlockMeanAdagrad(m.parameters(), lr=0.05), **GAPS)
    assert calls == 6 and not chunked
    assert_same(fast, loop, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_zero_gradient_entry_in_a_chunk_is_repaired(monkeypatch, chunked, dtype):
    """One gradient entry exactly 0 where h > 0: that chunk's g . r is nan, the tensor's r is recomputed from h
    and the step still equals the loop's."""
    repairs = []
    rescale = _cpu_kernels.rescale_from_h
    monkeypatch.setattr(_cpu_kernels, "rescale_from_h", lambda *a: repairs.append(1) or rescale(*a))
    fast_model, loop_model = make_model(dtype), make_model(dtype)
    fast, loop = (BlockMeanAdagrad(m.parameters(), lr=0.05) for m in (fast_model, loop_model))
    apply = functional._tensor_blocks_apply
    for t in range(5):
        for model in (fast_model, loop_model):
            grads_at(model, t)
            if t == 2:
                next(model.parameters()).grad.view(-1)[30] = 0.0  # in the fifth chunk of the first weight
        fast.step()
        monkeypatch.setattr(functional, "_tensor_blocks_apply", lambda *a: False)
        loop.step()
        monkeypatch.setattr(functional, "_tensor_blocks_apply", apply)
    assert len(repairs) == 1
    assert any(numel == next(fast_model.parameters()).numel() for numel, _ in chunked)
    assert_same((fast, fast_model), (loop, loop_model), dtype)


def test_chunked_and_whole_passes_agree_to_rounding(monkeypatch):
    """The same float64 run with and without chunks: the chunks' sums are added in float64, so the two runs differ
    by rounding only."""
    monkeypatch.setattr(functional, "HOST_MAX_NUMEL", 0)
    models = []
    for chunk in (0, 5):
        monkeypatch.setattr(_cpu_kernels, "RATIO_CHUNK_NUMEL", chunk)
        model = make_model(torch.float64)
        opt = BlockMeanAdagrad(model.parameters(), lr=0.05)
        for t in range(6):
            grads_at(model, t)
            opt.step()
        models.append(model)
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.fixture
def automatic(monkeypatch):
    """The automatic choice, with its per-process cache cleared before and after."""
    monkeypatch.setattr(_cpu_kernels, "RATIO_CHUNK_NUMEL", None)
    _cpu_kernels._automatic_chunk.cache_clear()
    yield
    _cpu_kernels._automatic_chunk.cache_clear()


def test_automatic_chunk_fits_four_buffers_in_the_level_2_caches(monkeypatch, automatic):
    monkeypatch.setattr(_cpu_kernels, "_l2_bytes", lambda: 2 * 2**20)
    monkeypatch.setattr(_cpu_kernels, "_parallel_call_seconds", lambda: 4e-6)
    monkeypatch.setattr(_cpu_kernels, "_chunks_pay", lambda chunk, itemsize: True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert _cpu_kernels.ratio_chunk_numel(torch.float32) == 2**18  # 4 buffers x 2^18 x 4 bytes = 2 x 2 MB
    assert _cpu_kernels.ratio_chunk_numel(torch.float64) == 2**17
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert _cpu_kernels.ratio_chunk_numel(torch.float32) == 2**18  # 6 MB: the largest power of two below


@pytest.mark.parametrize(
    "l2, call, deterministic, pays",
    [
        (0, 4e-6, False, True),
        (2 * 2**20, 40e-6, False, True),
        (2 * 2**20, 4e-6, True, True),
        (2**16, 4e-6, False, True),
        (2 * 2**20, 4e-6, False, False),
    ],
    ids=["unknown-l2", "costly-calls", "deterministic-algorithms", "tiny-l2", "chunks-measured-slower"],
)
def test_automatic_chunk_declines(monkeypatch, automatic, l2, call, deterministic, pays):
    monkeypatch.setattr(_cpu_kernels, "_l2_bytes", lambda: l2)
    monkeypatch.setattr(_cpu_kernels, "_parallel_call_seconds", lambda: call)
    monkeypatch.setattr(_cpu_kernels, "_chunks_pay", lambda chunk, itemsize: pays)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    assert _cpu_kernels.ratio_chunk_numel(torch.float32) == 0


def test_chunks_pay_follows_the_measured_times(monkeypatch):
    """The calibration chunks where the chunked pass is faster by the margin, not otherwise; it leaves nothing
    changed behind (its own buffers only) and allocates nothing above its memory cap."""
    clock = {"t": 0.0, "calls": 0}
    durations = {}

    def fake_ratio(g, h, n, r, step, scale, eps):  # one call per chunk: the chunked pass costs `chunked` in all
        clock["calls"] += 1
        clock["t"] += durations["whole"] if g.numel() == 4 * 1024 else durations["chunked"] / 4

    monkeypatch.setattr(_cpu_kernels, "adagrad_ratio", fake_ratio)
    monkeypatch.setattr(_cpu_kernels.time, "perf_counter", lambda: clock["t"])
    for whole, chunked, expected in ((1.0, 0.9, True), (1.0, 0.96, False), (1.0, 1.3, False)):
        durations.update(whole=whole, chunked=chunked)
        assert _cpu_kernels._chunks_pay(1024, 4) is expected
    assert clock["calls"] == 3 * 11 * (1 + 4)  # 11 interleaved rounds of each
    monkeypatch.setattr(_cpu_kernels, "_CALIBRATION_MAX_BYTES", 4 * 4 * 1024 * 4 - 1)
    assert _cpu_kernels._chunks_pay(1024, 4) is False
    assert clock["calls"] == 3 * 11 * 5  # declined without measuring
    assert _cpu_kernels._chunks_pay(1024, 2) is False  # a dtype the step does not chunk


def test_chunks_pay_runs_for_real():
    """Unpatched, on this machine: a bool, in well under a second."""
    start = time.perf_counter()
    assert isinstance(_cpu_kernels._chunks_pay(2**12, 4), bool)
    assert time.perf_counter() - start < 5.0


def test_the_setting_wins_and_is_checked(monkeypatch):
    monkeypatch.setattr(_cpu_kernels, "_l2_bytes", lambda: pytest.fail("the setting must not look at the machine"))
    for value, expected in ((0, 0), (4096, 4096)):
        monkeypatch.setattr(_cpu_kernels, "RATIO_CHUNK_NUMEL", value)
        assert _cpu_kernels.ratio_chunk_numel(torch.float32) == expected
    for bad in (-1, 2.5, "4096", True):
        monkeypatch.setattr(_cpu_kernels, "RATIO_CHUNK_NUMEL", bad)
        with pytest.raises(ValueError, match="RATIO_CHUNK_NUMEL"):
            _cpu_kernels.ratio_chunk_numel(torch.float32)


def test_l2_size_from_sysfs_and_call_time_are_plausible():
    """On this machine: the L2 size is 0 (unknown) or at least 64 KiB, and one parallel call is timed."""
    size = _cpu_kernels._l2_bytes()
    assert size == 0 or size >= 2**16
    assert 0 < _cpu_kernels._parallel_call_seconds() < 1.0


def test_bad_setting_leaves_the_optimizer_unchanged(monkeypatch):
    """A bad RATIO_CHUNK_NUMEL is refused before the step changes anything."""
    monkeypatch.setattr(functional, "HOST_MAX_NUMEL", 0)
    model = make_model(torch.float32)
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05)
    grads_at(model, 0)
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    sums = [opt.state[p]["sum"].clone() for p in model.parameters()]
    step = opt.global_state["step"]
    monkeypatch.setattr(_cpu_kernels, "RATIO_CHUNK_NUMEL", -3)
    grads_at(model, 1)
    with pytest.raises(ValueError, match="RATIO_CHUNK_NUMEL"):
        opt.step()
    assert opt.global_state["step"] == step
    for p, p0, h0 in zip(model.parameters(), before, sums):
        assert torch.equal(p, p0) and torch.equal(opt.state[p]["sum"], h0)


@pytest.mark.parametrize("text, count", [("0", 1), ("0-1\n", 2), ("0,4-5", 3), ("2,6", 2), ("0-3,8-11", 8)])
def test_cpu_lists_are_counted(text, count):
    """The L2 size is shared among the logical CPUs of sysfs' shared_cpu_list (hyperthreads count it once)."""
    assert _cpu_kernels._cpu_count(text) == count
