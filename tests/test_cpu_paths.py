"""The CPU code paths the suite can take on another machine (``ATEN_CPU_CAPABILITY``, MKL's and numba's generic
paths): what the package must do on each, independently of the machine the tests run on.

``BlockMeanAdagrad(fused=True)``'s ``torch.compile`` passes name the vector instruction set in their inductor
options, so that its on-disk compiled-graph cache keeps one entry per set: with torch 2.13 that cache did not tell
``ATEN_CPU_CAPABILITY=avx2`` from the machine's AVX-512, and a process that loaded the other set's graph stepped
its parameters to wrong values (off by 1.4, then NaN) or failed to compile (docs/optimizer.md).
"""

from __future__ import annotations

import pytest
import torch

from bma_gp.optim import _fused

inductor = pytest.importorskip("torch._inductor.cpu_vec_isa")


@pytest.mark.parametrize("capability", ["avx2", "avx512", "default", None])
def test_fused_passes_name_the_vector_set_inductor_picks(monkeypatch, capability):
    if capability is None:
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    else:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    picked = inductor.pick_vec_isa()  # what inductor generates code for in this environment, without our options
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    monkeypatch.setattr(_fused, "_COMPILED", {})
    _fused._inductor("block_sums")
    (kwargs,) = seen
    options = kwargs["options"]
    assert options["cpp.simdlen"] == picked.bit_width()
    # the option keeps inductor's choice: the same set is picked with it as without it
    with torch._inductor.config.patch(options):
        assert inductor.pick_vec_isa() == picked


def test_each_vector_set_gets_its_own_cache_key(monkeypatch):
    """The sets a machine offers (at least "default", no vectors) give distinct options, hence distinct entries of
    the compiled-graph cache, whose key holds the inductor config."""
    widths = {}
    for capability in ("default", "avx2", "avx512"):
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
        widths[str(inductor.pick_vec_isa())] = _fused._isa_options()["cpp.simdlen"]
    assert len(set(widths.values())) == len(widths), widths
