"""Internal tensors follow the inputs' device, not torch's global default device.

With CPU parameters (or CPU kernel inputs) and ``torch.set_default_device("meta")`` (a stand-in for ``"cuda"``, which
a program may set elsewhere), :class:`~bma_gp.optim.BlockMeanAdagrad` steps and :func:`~bma_gp.kernel_block_mean`
(its numba tile path) give what they give under the normal default, bit for bit; and a step that fails before its
first write (here: a workspace buffer that cannot be allocated) leaves ``h``, the statistics and the step count as
they were.
"""

from __future__ import annotations

import time

import gpytorch
import pytest
import torch

from bma_gp import Partition, kernel_block_mean
from bma_gp._kernel_sums import jit as kernel_jit
from bma_gp.optim import BlockMeanAdagrad, _cpu_kernels, _jit, functional

pytestmark = pytest.mark.usefixtures("one_thread")

NUMBA = _jit.AVAILABLE and _jit.usable("cpu", torch.float32)
needs_numba = pytest.mark.skipif(not NUMBA, reason="numba is not installed (pip install bma-gp[jit])")


@pytest.fixture
def default_meta():
    """A context that sets torch's default device to ``meta`` and always puts the normal default back."""

    class _Meta:
        def __enter__(self):
            torch.set_default_device("meta")

        def __exit__(self, *exc):
            torch.set_default_device(None)

    try:
        yield _Meta()
    finally:
        torch.set_default_device(None)


class _Tensors(torch.nn.Module):
    """``count`` independent parameter tensors (one block each under ``"tensor"``), a loss without depth."""

    def __init__(self, count: int, shape: tuple[int, ...] = (3,)):
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(shape)) for _ in range(count)])

    def forward(self, x):
        return sum((p * x[i % x.shape[0], : p.shape[-1]]).sin().sum() for i, p in enumerate(self.ps))


def _linear(n_in, n_out):
    return lambda: torch.nn.Linear(n_in, n_out)


def _layers(count, width):
    return lambda: torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(count)], torch.nn.Tanh())


def _every_third(p):
    return torch.arange(p.numel(), device=p.device) % 3  # the user's callable names its device


# (model builder, input width, optimizer keyword arguments, the functional pieces that must run)
CASES = {
    "tensor, python root": (_layers(1, 5), 5, {}, {"_host_coefficients"}),
    "tensor, numpy root": (_layers(10, 4), 4, {}, {"_host_coefficients"}),
    "tensor, >128 blocks": (lambda: _Tensors(140), 3, {}, {"_normalised_inverse_root_torch"}),
    "row, >128 blocks": (_linear(3, 200), 3, {"partition": "row"}, {"_normalised_inverse_root_torch"}),
    "tensor, chunked ratio form": (_linear(300, 300), 300, {"weight_decay": 0.01}, {"_chunked_ratio_pass"}),
    "tensor, update_interval 2": (_layers(2, 4), 4, {"update_interval": 2}, {"_host_coefficients"}),
    "callable partition": (_layers(2, 4), 4, {"partition": _every_third}, {"_scattered_block_mean_adagrad"}),
    "row, maximize": (_linear(4, 6), 4, {"partition": "row", "maximize": True}, {"_single_tensor_block_mean_adagrad"}),
}
# a callable that returns a list: its ids become a tensor in bma_gp/optim/param_blocks.py, without a device there,
# so only under the optimizer's own default-device guard (see test_the_eager_steps_name_their_devices_themselves)
LIST_CASES = {
    "callable partition returning a list": (
        _layers(2, 4),
        4,
        {"partition": lambda p: [i % 3 for i in range(p.numel())]},
        {"_scattered_block_mean_adagrad"},
    ),
}
FUSED_CASES = {
    "fused row, >128 blocks": (_linear(3, 200), 3, {"partition": "row", "fused": True}, {"numba"}),
    "fused tensor": (_linear(256, 256), 256, {"fused": True}, {"numba"}),
}
SPIED = [
    "_host_coefficients",
    "_normalised_inverse_root_torch",
    "_chunked_ratio_pass",
    "_scattered_block_mean_adagrad",
    "_single_tensor_block_mean_adagrad",
]


@pytest.fixture
def spies(monkeypatch):
    """Which functional pieces ran (names of :data:`SPIED`, and ``"numba"`` for the fused numba pass)."""
    ran: set[str] = set()
    monkeypatch.setattr(_cpu_kernels, "RATIO_CHUNK_NUMEL", 2**12)  # the 300 x 300 weight: 22 chunks

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            ran.add(name)
            return fn(*args, **kwargs)

        return wrapper

    for name in SPIED:
        monkeypatch.setattr(functional, name, spy(name, getattr(functional, name)))
    monkeypatch.setattr(_jit, "block_sums", spy("numba", _jit.block_sums))
    return ran


def _run(case, steps: int, meta=None, before_construction: bool = True):
    """``(model, optimizer)`` after ``steps`` steps, under ``meta`` (a context) from construction or from the
    first step; model and data are made under the normal default (the same seed every call)."""
    build, width, kwargs, _ = case
    torch.manual_seed(0)
    model = build()
    x = torch.randn(8, width)
    opt = None
    if meta is not None and before_construction:
        meta.__enter__()
    try:
        opt = BlockMeanAdagrad(model.parameters(), lr=0.05, **kwargs)
        if meta is not None and not before_construction:
            meta.__enter__()
        for _ in range(steps):
            opt.zero_grad()
            out = model(x)
            (out.square().mean() if out.dim() else out).backward()
            opt.step()
    finally:
        if meta is not None:
            meta.__exit__(None, None, None)
    return model, opt


def _assert_same(a, b):
    (model_a, opt_a), (model_b, opt_b) = a, b
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert p.device.type == "cpu" and torch.equal(p, q)
        assert torch.equal(opt_a.state[p]["sum"], opt_b.state[q]["sum"])
    ga, gb = opt_a.global_state, opt_b.global_state
    assert ga["step"] == gb["step"] and ga["root_step"] == gb["root_step"]
    for key in ("U", "w", "root_lam", "root_B"):
        assert ga[key].device.type == "cpu" and gb[key].device.type == "cpu"
        assert torch.equal(ga[key], gb[key]), key


def _params(cases: dict, **marks):
    return [pytest.param(case, id=name, **marks) for name, case in cases.items()]


ALL = _params(CASES) + _params(LIST_CASES) + _params(FUSED_CASES, marks=needs_numba)


@pytest.mark.parametrize("before_construction", [True, False], ids=["meta from construction", "meta at the steps"])
@pytest.mark.parametrize("case", ALL)
def test_optimizer_steps_match_the_normal_default_device(case, before_construction, default_meta, spies):
    reference = _run(case, 3)  # first: caches made on the first step (probes of the CPU kernels) see the CPU
    assert case[3] <= spies, f"the case did not run {case[3] - spies}"
    spies.clear()
    stepped = _run(case, 3, default_meta, before_construction)
    assert case[3] <= spies
    _assert_same(stepped, reference)


@pytest.mark.parametrize("case", _params(CASES))
def test_the_eager_steps_name_their_devices_themselves(case, default_meta, spies, monkeypatch):
    """Without the step's ``with torch.device(state device)`` guard: every tensor the eager paths make names its
    device (the fused numba pass is left out: its finiteness flag is made in bma_gp/optim/_jit.py)."""
    reference = _run(case, 3)
    monkeypatch.setattr(functional, "_default_device_elsewhere", lambda device: False)
    _assert_same(_run(case, 3, default_meta), reference)


def test_functional_pieces_make_their_tensors_on_the_inputs_device(default_meta):
    partition = Partition.from_sizes([2, 3, 1, 4])
    torch.manual_seed(0)
    n = torch.randn(5, 10, dtype=torch.float64)
    # statistics of a few normalised gradients, block by block
    sums = torch.stack([torch.stack([r[:2].sum(), r[2:5].sum(), r[5:6].sum(), r[6:].sum()]) for r in n])
    U = sums.T @ sums
    w = torch.stack([(n[:, a:b] ** 2).sum() for a, b in ((0, 2), (2, 5), (5, 6), (6, 10))])
    lam_ref, B_ref = functional._normalised_inverse_root_torch(U, w, partition, 0.1)
    h = torch.zeros(10)
    with default_meta:
        lam, B = functional._normalised_inverse_root_torch(U, w, partition, 0.1)
        ws = functional.Workspace(h=h, nr=torch.empty(2, 10, device="cpu"), sums=h, scratch=h)
        stored = ws.root_buffers(4, torch.float32)
        chunk = ws.chunk_sums(3)
    assert lam.device.type == "cpu" and torch.equal(lam, lam_ref) and torch.equal(B, B_ref)
    assert stored[0].device.type == "cpu" and stored[1].device.type == "cpu" and stored[2].shape == (4,)
    assert chunk.device.type == "cpu" and chunk.shape == (3, 3) and chunk.dtype == h.dtype


def _snapshot(model, opt):
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.global_state.items()}
    sums = [opt.state[p]["sum"].clone() for p in model.parameters() if "sum" in opt.state[p]]
    return [p.detach().clone() for p in model.parameters()], sums, state


def _assert_snapshot(model, opt, snap):
    params, sums, state = snap
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    now = [opt.state[p]["sum"] for p in model.parameters() if "sum" in opt.state[p]]
    assert len(now) == len(sums) and all(torch.equal(a, b) for a, b in zip(now, sums))
    assert opt.global_state.keys() == state.keys()
    for key, value in state.items():
        current = opt.global_state[key]
        assert torch.equal(current, value) if isinstance(value, torch.Tensor) else current == value, key


def _failing(*args, **kwargs):
    raise RuntimeError("cannot allocate (simulated)")


@pytest.mark.parametrize("step", [0, 2], ids=["first step", "later step"])
def test_a_step_that_cannot_allocate_its_root_buffers_changes_nothing(monkeypatch, step):
    case = CASES["tensor, numpy root"]
    build, width, _, _ = case
    torch.manual_seed(0)
    model = build()
    x = torch.randn(8, width)
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05)

    def one_step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    for _ in range(step):
        one_step()
    if step:
        opt._workspace.root_store = None  # as on a new workspace: allocated again at the next step
    snap = _snapshot(model, opt)
    with monkeypatch.context() as patch:
        patch.setattr(functional.Workspace, "root_buffers", _failing)
        with pytest.raises(RuntimeError, match="simulated"):
            one_step()
    if step == 0:
        assert opt.global_state.get("step", 0) == 0
        assert all(not opt.state[p] or not opt.state[p]["sum"].any() for p in model.parameters())
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), snap[0]))
    else:
        _assert_snapshot(model, opt, snap)
    one_step()  # the retry: the step that failed, counted once
    _assert_same((model, opt), _run(case, step + 1))


def test_a_step_that_cannot_allocate_its_chunk_sums_changes_nothing(monkeypatch):
    monkeypatch.setattr(_cpu_kernels, "RATIO_CHUNK_NUMEL", 2**12)
    case = CASES["tensor, chunked ratio form"]
    model, opt = _run(case, 2)
    opt._workspace.chunk_dots = None
    torch.manual_seed(0)
    case[0]()  # the random numbers _run drew before its data
    x = torch.randn(8, case[1])
    snap = _snapshot(model, opt)
    opt.zero_grad()
    model(x).square().mean().backward()
    with monkeypatch.context() as patch:
        patch.setattr(functional.Workspace, "chunk_sums", _failing)
        with pytest.raises(RuntimeError, match="simulated"):
            opt.step()
    _assert_snapshot(model, opt, snap)
    opt.step()
    _assert_same((model, opt), _run(case, 3))


@pytest.mark.skipif(not kernel_jit.AVAILABLE, reason="numba is not installed (pip install bma-gp[jit])")
def test_kernel_block_mean_numba_path_matches_the_normal_default_device(default_meta, monkeypatch):
    start = time.perf_counter()
    n = 4096  # n^2 = MIN_ENTRIES: the numba tile reduction; 130 blocks: k^2 >= MEANS_MIN_ENTRIES, its block means
    assert n * n >= kernel_jit.MIN_ENTRIES and 130 * 130 >= kernel_jit.MEANS_MIN_ENTRIES
    calls = []
    for name in ("tile_sums", "block_means"):
        fn = getattr(kernel_jit, name)
        monkeypatch.setattr(kernel_jit, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    torch.manual_seed(0)
    x = torch.rand(n, 2)
    p = Partition.from_labels(torch.arange(n) % 130)
    k = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2))
    with torch.no_grad():
        ref = kernel_block_mean(k, x, p)
    assert {"tile_sums", "block_means"} <= set(calls)
    calls.clear()
    with default_meta, torch.no_grad():
        out = kernel_block_mean(k, x, p)
    assert {"tile_sums", "block_means"} <= set(calls)
    assert out.lam.device.type == "cpu" and out.B.device.type == "cpu"
    assert torch.equal(out.lam, ref.lam) and torch.equal(out.B, ref.B)
    # with gradients (the kept derivative sums of the tiles and their contraction)
    ref_grads = torch.autograd.grad(kernel_block_mean(k, x, p).B.sum(), list(k.parameters()))
    with default_meta:
        grads = torch.autograd.grad(kernel_block_mean(k, x, p).B.sum(), list(k.parameters()))
    assert all(g.device.type == "cpu" and torch.equal(g, r) for g, r in zip(grads, ref_grads))
    assert time.perf_counter() - start < 30  # about 2-4 s on the development machine
