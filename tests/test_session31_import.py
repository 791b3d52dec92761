"""Importing the package leaves ``torch._dynamo`` unimported (1.7 s of the 6.5 s that ``import bma_gp`` took): the
one function kept out of ``torch.compile``'s tracing imports it at its first call (``torch._disable_dynamo``), as
torch's own optimizers do, instead of ``torch.compiler.disable`` importing it when the module is loaded."""

from __future__ import annotations

import subprocess
import sys


def test_import_does_not_load_dynamo():
    code = "import sys, bma_gp, optim, bma_gp.kernels, bma_gp.optim; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
