"""An example's output option is checked when its arguments are parsed: an ``--out`` that names a file, or one that
cannot be created, is a usage error (status 2, one line naming the option) before any data loads or any model trains.
It was a FileExistsError / FileNotFoundError traceback (status 1), for some scripts only after the training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
_common = pytest.importorskip("_common")

#: (script, its output-directory option)
DIR_SCRIPTS = [
    ("gp_regression", "--out"),
    ("grouped_gp", "--out"),
    ("mixed_effects_gp", "--out"),
    ("evaluate_gp", "--out"),
    ("evaluate_mixed", "--out"),
    ("paper_cnn", "--out"),
    ("benchmarks", "--out-dir"),
]
#: scripts whose --out is a file the JSON lines are appended to
FILE_SCRIPTS = ["bench_gp_iteration", "bench_kernel_block_mean"]


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python examples/SCRIPT.py --smoke ARGS`` (--smoke: were the check missing, a short run, not a long one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / f"{script}.py"), "--smoke", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_usage_error(done: subprocess.CompletedProcess, script: str, message: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == f"{script}.py: error: {message}"
    assert done.stdout == ""  # nothing loaded, trained or printed before the error


@pytest.mark.slow
@pytest.mark.parametrize("script,option", DIR_SCRIPTS)
def test_out_that_is_a_file_is_a_usage_error(tmp_path, script, option):
    taken = tmp_path / "results.txt"
    taken.write_text("kept\n")
    done = _run(script, option, str(taken), cwd=tmp_path)
    _assert_usage_error(
        done, script, f"argument {option}: {str(taken)!r} is a file; give a directory (it is created if missing)"
    )
    assert taken.read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]  # nothing written or left behind


@pytest.mark.slow
@pytest.mark.parametrize("script,option", DIR_SCRIPTS)
def test_out_that_cannot_be_created_is_a_usage_error(tmp_path, script, option):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "results"
    done = _run(script, option, str(out), cwd=tmp_path)
    _assert_usage_error(
        done,
        script,
        f"argument {option}: cannot create directory {str(out)!r}: {str(tmp_path / 'a_file')!r} is a file; choose "
        f"another {option}",
    )


@pytest.mark.slow
@pytest.mark.parametrize("script", FILE_SCRIPTS)
def test_out_file_that_is_a_directory_or_in_a_missing_folder_is_a_usage_error(tmp_path, script):
    done = _run(script, "--out", str(tmp_path), cwd=tmp_path)
    _assert_usage_error(
        done,
        script,
        f"argument --out: {str(tmp_path)!r} is a directory; give a file name (the JSON lines are appended)",
    )
    out = tmp_path / "missing" / "results.jsonl"
    done = _run(script, "--out", str(out), cwd=tmp_path)
    _assert_usage_error(
        done,
        script,
        f"argument --out: the folder of {str(out)!r}, {str(out.parent)!r}, does not exist; create it or choose "
        "another --out",
    )
    assert list(tmp_path.iterdir()) == []


class _Parser:
    """Stands in for argparse: records the message of ``error``."""

    def error(self, message: str):
        raise SystemExit(message)


def test_check_out_dir_passes_a_usable_directory_and_leaves_nothing(tmp_path):
    _common.check_out_dir(_Parser(), None)  # not given
    _common.check_out_dir(_Parser(), tmp_path)  # an existing directory: a probe file, removed
    _common.check_out_dir(_Parser(), tmp_path / "new" / "nested")  # created later by the script, not here
    _common.check_out_dir(_Parser(), str(tmp_path / "new"))
    assert list(tmp_path.iterdir()) == []


def test_check_out_file_passes_a_usable_file_and_leaves_it_as_it_was(tmp_path):
    _common.check_out_file(_Parser(), None)
    _common.check_out_file(_Parser(), tmp_path / "new.jsonl")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old.jsonl").write_text("{}\n")
    _common.check_out_file(_Parser(), tmp_path / "old.jsonl")
    assert (tmp_path / "old.jsonl").read_text() == "{}\n" and list(tmp_path.iterdir()) == [tmp_path / "old.jsonl"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc (no directory can be created there)")
def test_check_out_dir_refuses_a_directory_the_file_system_will_not_create():
    with pytest.raises(SystemExit, match=r"^argument --out: cannot create directory '/proc/x' \(.+\); choose a "):
        _common.check_out_dir(_Parser(), "/proc/x")
    with pytest.raises(SystemExit, match=r"^argument --out: cannot write to '/proc' \(.+\); choose a writable "):
        _common.check_out_dir(_Parser(), "/proc")
