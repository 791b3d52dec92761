"""A small ``python -m bma_gp`` run in a subprocess, for the tests of what the command does with its output streams."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])


def small_cli_run(tmp_path) -> tuple[list[str], dict[str, str]]:
    """Writes ``tmp_path/d.csv`` (200 rows, two features and a target ``y``); returns the command line of a short run
    on it (two iterations, no progress bar, no plot, output in ``out``, run with ``cwd=tmp_path``) and the environment
    that imports this checkout's ``bma_gp``."""
    lines = ["u,v,y"] + [f"{i % 7 / 2},{i % 5 / 3},{math.sin(i)}" for i in range(200)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = ["--data", "d.csv", "--target", "y", "--iters", "2", "--no-progress", "--no-plot", "--blocks", "8"]
    return [sys.executable, "-m", "bma_gp", *argv, "--out", "out"], env
