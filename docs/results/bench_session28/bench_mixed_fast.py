"""examples/bench_mixed.py under bma_gp.settings.fast_root_products(True) (a float32 root's products in float32)."""
import runpy
import sys

import bma_gp

sys.argv = ["bench_mixed.py", *sys.argv[1:]]
with bma_gp.settings.fast_root_products(True):
    try:
        runpy.run_path("examples/bench_mixed.py", run_name="__main__")
    except SystemExit:
        pass
