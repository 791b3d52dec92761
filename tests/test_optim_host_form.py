"""The host form of the CPU eager step (small tensors in numpy on their own memory) and the host-side root.

:func:`bma_gp.optim.functional._tensor_blocks_cpu_step` hands tensors of up to ``HOST_MAX_NUMEL`` entries to numpy
and computes the k-sized rest of the step in float64 numpy. Each case runs it beside the tensor-by-tensor loop
(which takes none of these shortcuts) and checks which form ran.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from bma_gp.optim import BlockMeanAdagrad, _cpu_kernels, functional
from test_optim_tensor_blocks import GAPS, assert_same, grads_at, make_model, run_pair

DTYPES = [torch.float32, torch.float64]


@pytest.fixture
def forms(monkeypatch):
    """Counts the tensors that take the host form and the ratio form (per call of each), with the ratio form's pass
    over whole tensors: its chunks are chosen by a time measurement (``_cpu_kernels.ratio_chunk_numel``), which on a
    loaded machine chose chunks and so 61 calls where these counts expect 6 (tests/test_optim_ratio_chunks.py tests
    the chunks)."""
    monkeypatch.setattr(_cpu_kernels, "RATIO_CHUNK_NUMEL", 0)
    used = {"host": 0, "ratio": 0}
    host_pass, ratio = functional._host_tensor_pass, _cpu_kernels.adagrad_ratio

    def count_host(*a):
        used["host"] += 1
        return host_pass(*a)

    def count_ratio(*a):
        used["ratio"] += 1
        return ratio(*a)

    monkeypatch.setattr(functional, "_host_tensor_pass", count_host)
    monkeypatch.setattr(_cpu_kernels, "adagrad_ratio", count_ratio)
    return used


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_tensors_take_the_host_form(monkeypatch, forms, dtype):
    fast, loop, calls = run_pair(
        monkeypatch, dtype, 9, lambda m: BlockMeanAdagrad(m.parameters(), lr=0.05, weight_decay=0.01), **GAPS
    )
    assert calls == 9
    # every tensor of the test model is below HOST_MAX_NUMEL; the loop takes neither form
    assert forms == {"host": sum(6 - (t % 3 != 2) for t in range(9)), "ratio": 0}  # 5, 5 and 6 tensors per step
    assert_same(fast, loop, dtype)
    opt, model = fast
    for p in model.parameters():  # the dead entries never had a gradient: h = 0 there, and the step knows it
        assert torch.all(opt.state[p]["sum"].view(-1)[::3] == 0)
    assert opt._h_has_zero


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_and_ratio_forms_in_one_step(monkeypatch, forms, dtype):
    monkeypatch.setattr(functional, "HOST_MAX_NUMEL", 60)  # the conv weight (54) and the biases; not the 240
    fast, loop, calls = run_pair(monkeypatch, dtype, 6, lambda m: BlockMeanAdagrad(m.parameters(), lr=0.05))
    assert calls == 6
    assert forms == {"host": 6 * 5, "ratio": 6}
    assert_same(fast, loop, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("host_max", "host", "ratio"), [(4, 0, 6), (5, 3, 3)])
def test_a_few_small_tensors_beside_larger_ones_take_the_torch_forms(monkeypatch, forms, dtype, host_max, host, ratio):
    """Below HOST_MIN_TENSORS small tensors beside a larger one, every tensor takes the torch forms (numpy's code is
    cold after the larger tensors' passes); from HOST_MIN_TENSORS on the small ones take the host form. The biases
    have 3, 5 and 2 entries, the weights 54, 240 and 10: at HOST_MAX_NUMEL = 4 two tensors qualify, at 5 three."""
    monkeypatch.setattr(functional, "HOST_MAX_NUMEL", host_max)
    assert functional.HOST_MIN_TENSORS == 3
    fast, loop, calls = run_pair(monkeypatch, dtype, 4, lambda m: BlockMeanAdagrad(m.parameters(), lr=0.05))
    assert calls == 4
    assert forms == {"host": 4 * host, "ratio": 4 * ratio}
    assert_same(fast, loop, dtype)


@pytest.mark.parametrize("eps", [0.0, -1e-8])
def test_eps_must_be_positive(eps):
    """eps = 0 would divide 0 by 0 where a gradient entry has always been 0 and poison the statistics for good."""
    with pytest.raises(ValueError, match="Invalid eps value"):
        BlockMeanAdagrad(make_model(torch.float64).parameters(), eps=eps)


def test_non_finite_gradient_without_the_check_behaves_as_the_loop_without_numpy_warnings():
    """With check_finite=False an inf gradient entry runs into the step: the host form computes it silently as torch
    does (no numpy RuntimeWarning), and the step ends as it ends on the loop."""
    outcomes = []
    for fast in (True, False):
        model = make_model(torch.float64)
        opt = BlockMeanAdagrad(model.parameters(), lr=0.05, check_finite=False)
        grads_at(model, 0)
        list(model.parameters())[-1].grad.view(-1)[0] = math.inf
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with pytest.MonkeyPatch.context() as mp:
                if not fast:
                    mp.setattr(functional, "_tensor_blocks_apply", lambda *a: False)
                try:
                    opt.step()
                except Exception as error:  # noqa: BLE001 - whatever the loop does, the fast step must do
                    outcomes.append(type(error))
                else:
                    outcomes.append([torch.isfinite(p).all().item() for p in model.parameters()])
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("host_max", [0, 2**15])
def test_a_finite_gradient_whose_square_overflows_is_not_rejected(monkeypatch, host_max):
    """The step's first read is the sum of squares of each gradient; 1e20 squared overflows float32, and the step
    then looks at that gradient entry by entry instead of calling it non-finite."""
    monkeypatch.setattr(functional, "HOST_MAX_NUMEL", host_max)
    fast_model, loop_model = make_model(torch.float32), make_model(torch.float32)
    fast, loop = (BlockMeanAdagrad(m.parameters(), lr=0.05) for m in (fast_model, loop_model))
    apply = functional._tensor_blocks_apply
    for t in range(3):
        for model in (fast_model, loop_model):
            grads_at(model, t)
            next(model.parameters()).grad.view(-1)[0] = 1e20
        fast.step()
        monkeypatch.setattr(functional, "_tensor_blocks_apply", lambda *a: False)
        loop.step()
        monkeypatch.setattr(functional, "_tensor_blocks_apply", apply)
    for p, q in zip(fast_model.parameters(), loop_model.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("host_max", [0, 2**15])  # the ratio form, the host form
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_gradient_changes_nothing(monkeypatch, host_max, value):
    monkeypatch.setattr(functional, "HOST_MAX_NUMEL", host_max)
    model = make_model(torch.float32)
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05)
    grads_at(model, 0)
    opt.step()  # the layout is committed: the step checks the gradients itself
    before = [p.detach().clone() for p in model.parameters()]
    sums = [opt.state[p]["sum"].clone() for p in model.parameters()]
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.global_state.items()}
    grads_at(model, 1)
    list(model.parameters())[-1].grad.view(-1)[1] = value
    with pytest.raises(ValueError, match="non-finite gradient"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(opt.state[p]["sum"], s) for p, s in zip(model.parameters(), sums))
    for key, value_before in state.items():
        now = opt.global_state[key]
        assert torch.equal(now, value_before) if isinstance(now, torch.Tensor) else now == value_before


def test_the_stored_root_is_reused_and_follows_changes_in_place(monkeypatch):
    """Between roots (update_interval = 3) the step reuses the stored root through a float64 copy; a change of the
    stored tensors in place reaches the next step, as it does on the loop (float32: the copy is a copy)."""
    fast_model, loop_model = make_model(torch.float32), make_model(torch.float32)
    fast, loop = (BlockMeanAdagrad(m.parameters(), lr=0.05, update_interval=3) for m in (fast_model, loop_model))
    apply = functional._tensor_blocks_apply
    roots = []
    for t in range(7):
        for model in (fast_model, loop_model):
            grads_at(model, t)
        if t == 5:  # the root of step 4 (due at steps 1, 4, 7), after step 5 reused it (its float64 copy is made)
            for opt in (fast, loop):
                opt.global_state["root_B"].mul_(0.5)
        fast.step()
        roots.append(fast.global_state["root_B"])
        monkeypatch.setattr(functional, "_tensor_blocks_apply", lambda *a: False)
        loop.step()
        monkeypatch.setattr(functional, "_tensor_blocks_apply", apply)
        torch.testing.assert_close(fast.global_state["root_B"], loop.global_state["root_B"], rtol=2e-5, atol=1e-6)
    assert_same((fast, fast_model), (loop, loop_model), torch.float32)
    assert roots[0] is roots[-1]  # the host writes every root into the same tensors


def _root_case(k: int, seed: int):
    """Statistics of ``k`` blocks (one singleton, one block without gradient) and their partition."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(k, 2 * k, generator=gen, dtype=torch.float64)
    U = X @ X.T
    w = U.diagonal() * (1 + torch.rand(k, generator=gen, dtype=torch.float64))
    w[k // 2] = 0.0  # a block without gradient
    sizes = torch.randint(1, 5, (k,), generator=gen)
    sizes[0] = 1  # a singleton
    U[k // 2] = U[:, k // 2] = 0.0
    return U, w, functional.Partition(torch.repeat_interleave(torch.arange(k), sizes))


@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("damping", [0.0, 1e-3, 0.5])
def test_the_python_root_matches_numpy(k, damping):
    for seed in range(3):
        U, w, partition = _root_case(k, seed)
        cpu = torch.device("cpu")
        consts_np = functional._root_constants(partition, torch.float64, cpu, numpy=True)
        consts_py = functional._root_constants(partition, torch.float64, cpu, lists=True)
        root = functional._inverse_root_python(U.tolist(), w.tolist(), consts_py, damping)
        lam_np, B_np = functional._inverse_root_numpy(U.numpy().copy(), w.numpy().copy(), consts_np, damping)
        if root is None:  # declined: only where numpy's root is not finite (an eigenvalue 0, with damping 0)
            assert damping == 0.0 and not (math.isfinite(lam_np.sum()) and math.isfinite(B_np.sum()))
            continue
        lam, B = (torch.tensor(x, dtype=torch.float64) for x in root)
        scale = float(torch.from_numpy(B_np).abs().max())
        torch.testing.assert_close(lam, torch.from_numpy(lam_np), rtol=1e-13, atol=0)
        torch.testing.assert_close(B, torch.from_numpy(B_np), rtol=1e-11, atol=1e-13 * scale)
        assert torch.equal(B, B.T)


def test_the_python_root_declines_what_is_not_finite_or_not_positive():
    """Where the numpy root gives inf or nan (a zero eigenvalue with no damping, NaN statistics), the Python root
    returns None and the numpy path decides, so the two agree on every input."""
    partition = functional.Partition(torch.arange(2))  # two singletons
    cpu = torch.device("cpu")
    consts_np = functional._root_constants(partition, torch.float64, cpu, numpy=True)
    consts_py = functional._root_constants(partition, torch.float64, cpu, lists=True)
    singular = ([[2.0, 2.0], [2.0, 2.0]], [2.0, 2.0])  # C = [[1, 1], [1, 1]]: eigenvalue 0
    assert functional._inverse_root_python(*singular, consts_py, 0.0) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        lam, B = functional._inverse_root_numpy(*(np.array(x) for x in singular), consts_np, 0.0)
    assert not np.isfinite(B).all()
    assert functional._inverse_root_python(*singular, consts_py, 1e-3) is not None  # damping lifts it
    for bad in ([[math.nan, 0.0], [0.0, 1.0]], [[1.0, math.nan], [math.nan, 1.0]], [[1.0, math.inf], [math.inf, 1.0]]):
        assert functional._inverse_root_python(bad, [1.0, 1.0], consts_py, 1e-3) is None
    negative = ([[1.0, 3.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [1.0, 1.0, 1.0])  # C has eigenvalue -2
    three = functional._root_constants(functional.Partition(torch.arange(3)), torch.float64, cpu, lists=True)
    assert functional._inverse_root_python(*negative, three, 0.0) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interval", [1, 3])
def test_the_steps_root_on_python_floats_matches_numpy(monkeypatch, dtype, interval):
    """The whole step with the root on Python floats (up to PYTHON_ROOT_MAX_BLOCKS blocks, the test model's 6) and
    with it in numpy: tensors without gradient, dead entries, a stored root reused between roots."""
    calls = []
    python_root = functional._inverse_root_python
    monkeypatch.setattr(functional, "_inverse_root_python", lambda *a: calls.append(1) or python_root(*a))
    runs = []
    for limit in (functional.PYTHON_ROOT_MAX_BLOCKS, 0):
        monkeypatch.setattr(functional, "PYTHON_ROOT_MAX_BLOCKS", limit)
        runs.append(
            run_pair(
                monkeypatch,
                dtype,
                7,
                lambda m: BlockMeanAdagrad(m.parameters(), lr=0.05, update_interval=interval),
                **GAPS,
            )
        )
        assert len(calls) == (-(-7 // interval) if limit else 0)  # one root per update_interval steps, or none
        calls.clear()
    (python, _, _), (numpy_run, _, _) = runs
    assert_same(python, numpy_run, dtype)
    assert_same(python, runs[0][1], dtype)  # and both as the tensor-by-tensor loop


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_statistics_on_python_floats_round_as_numpy(monkeypatch, dtype):
    """At a few blocks the step adds (P^T n)(P^T n)^T and P^T n^2 to U and w on Python floats: the same float64 sums,
    rounded once into the state's dtype, bit for bit as numpy's in-place outer product (the path above
    PYTHON_ROOT_MAX_BLOCKS), for the same block sums (one tensor without a gradient)."""
    model = make_model(dtype)
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05)
    grads_at(model, 0)
    opt.step()
    blocks, ws = opt._blocks_of(opt._layout), opt._workspace
    gen = torch.Generator().manual_seed(3)
    U0 = torch.rand(blocks.num_blocks, blocks.num_blocks, generator=gen, dtype=torch.float64) + 0.5
    w0 = torch.rand(blocks.num_blocks, generator=gen, dtype=torch.float64) + 0.5
    rows = [0, 2, 3]  # block 1 without a gradient
    sums = [tuple(torch.rand(3, generator=gen, dtype=torch.float64).add(0.1).tolist()) for _ in rows]
    results = []
    for limit in (functional.PYTHON_ROOT_MAX_BLOCKS, 0):
        monkeypatch.setattr(functional, "PYTHON_ROOT_MAX_BLOCKS", limit)
        stats = dict(opt.global_state, U=(U0 + U0.mT).to(dtype), w=w0.to(dtype), root_lam=None)
        functional._host_coefficients(stats, blocks, ws, rows, sums, 1e-3, 1)
        results.append((stats["U"], stats["w"]))
    (U_py, w_py), (U_np, w_np) = results
    assert torch.equal(U_py, U_np) and torch.equal(w_py, w_np)
    assert not torch.equal(U_py, (U0 + U0.mT).to(dtype)) and torch.equal(U_py[1], (U0 + U0.mT).to(dtype)[1])


def test_the_numpy_root_matches_torch():
    for k in (1, 3, 8):
        U, w, partition = _root_case(k, seed=5)
        consts_np = functional._root_constants(partition, torch.float64, torch.device("cpu"), numpy=True)
        consts_t = functional._root_constants(partition, torch.float64, torch.device("cpu"))
        lam_np, B_np = functional._inverse_root_numpy(U.numpy().copy(), w.numpy().copy(), consts_np, 1e-3)
        lam_t, B_t = functional._inverse_root_formulas(U, w, consts_t, 1e-3)
        torch.testing.assert_close(torch.from_numpy(lam_np), lam_t, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.from_numpy(B_np), B_t, rtol=1e-10, atol=1e-10)
