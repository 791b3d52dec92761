"""Measure the peak memory a piece of code adds, in a fresh Python process.

Tensors live outside Python's allocator, so ``tracemalloc`` does not see them; the resident set
size does. :func:`peak_memory_increase` runs ``setup``, resets the process's peak resident set
size to its current size (Linux: ``/proc/self/clear_refs``), runs ``work`` and returns how far the
peak rose above the size after ``setup``. Differences between two problem sizes cancel the fixed
overhead (allocator arenas, library buffers) and leave the memory per index.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_TEMPLATE = """
import gc


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key + " missing from /proc/self/status")


{setup}
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set size (VmHWM) to the current one
_before = _status("VmRSS")
{work}
print("PEAK_INCREASE", _status("VmHWM") - _before)
"""


def peak_memory_increase(setup: str, work: str, timeout: float = 300) -> int:
    """Bytes by which running ``work`` raises the peak resident set size above its size after ``setup``.

    Args:
        setup: Python source run first (imports, inputs); its memory is not counted.
        work: Python source whose peak memory is measured. Assertions in it are checked: a failure
            raises here with the child's error output.
        timeout: seconds before the child is stopped.

    Returns:
        The increase in bytes (0 when ``work`` allocated nothing beyond what was resident).
    """
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("measuring peak memory needs Linux's /proc/self/clear_refs")
    script = _TEMPLATE.format(setup=textwrap.dedent(setup), work=textwrap.dedent(work))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"the measured code failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK_INCREASE ")]
    if not lines:
        raise AssertionError(f"no measurement in the child's output:\n{done.stdout[-2000:]}")
    return int(lines[-1].split()[1])
