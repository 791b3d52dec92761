"""The optimizers' two import paths: ``bma_gp.optim`` (the code) and ``optim`` (a re-export)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import bma_gp.optim
import optim


def test_both_paths_give_the_same_classes():
    for name in ("BlockMeanAdagrad", "FullMatrixAdagrad", "SparseGradientError"):
        assert getattr(optim, name) is getattr(bma_gp.optim, name)
    assert bma_gp.optim.BlockMeanAdagrad.__module__ == "bma_gp.optim.block_mean_adagrad"


def test_bma_gp_optim_is_not_shadowed_by_another_optim(tmp_path):
    # a research repository's optim/ folder first on the path shadows the top-level name only
    (tmp_path / "optim").mkdir()
    (tmp_path / "optim" / "__init__.py").write_text("WHOSE = 'theirs'\n")
    code = textwrap.dedent("""
        import optim
        from bma_gp.optim import BlockMeanAdagrad
        print(optim.WHOSE, BlockMeanAdagrad.__module__)
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["theirs", "bma_gp.optim.block_mean_adagrad"]
