"""An example's output option is checked when its arguments are parsed: an ``--out`` that names a file, or one that
cannot be created, is a usage error (status 2, one line naming the option) before any data loads or any model trains.
It was a FileExistsError / FileNotFoundError traceback (status 1), for some scripts only after the training."""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
import traceback
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


def _cases(root: Path) -> dict[str, dict]:
    """Every run the tests below check, keyed by test id: its folder (the run's working directory, made here),
    script and arguments (after ``--smoke``: were the check missing, a short run, not a long one)."""
    cases = {}
    for script, option in DIR_SCRIPTS:
        cwd = root / f"file-{script}"
        cwd.mkdir()
        (cwd / "results.txt").write_text("kept\n")
        cases[f"file-{script}"] = {"cwd": cwd, "script": script, "args": [option, str(cwd / "results.txt")]}
        cwd = root / f"uncreatable-{script}"
        cwd.mkdir()
        (cwd / "a_file").write_text("")
        out = cwd / "a_file" / "results"
        cases[f"uncreatable-{script}"] = {"cwd": cwd, "script": script, "args": [option, str(out)]}
    for script in FILE_SCRIPTS:
        cwd = root / f"out-{script}"
        cwd.mkdir()
        cases[f"directory-{script}"] = {"cwd": cwd, "script": script, "args": ["--out", str(cwd)]}
        missing = str(cwd / "missing" / "results.jsonl")
        cases[f"missing-{script}"] = {"cwd": cwd, "script": script, "args": ["--out", missing]}
    return cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every case in one child process (``python tests/test_examples_out.py``: each script run as
    ``__main__`` with its arguments, stdout and stderr captured): the scripts' imports are paid once, not per case
    (16 interpreters took 50 s of the suite's time). Returns the cases, each with ``code``, ``stdout``, ``stderr``."""
    cases = _cases(tmp_path_factory.mktemp("examples_out"))
    request = [{"id": key, "cwd": str(c["cwd"]), "script": c["script"], "args": c["args"]} for key, c in cases.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, __file__],
        input=json.dumps(request),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    results = json.loads(lines[-1])
    return {key: {**case, **results[key]} for key, case in cases.items()}


def _child(request: list[dict]) -> dict[str, dict]:
    """In the child: run each script as ``python examples/SCRIPT.py --smoke ARGS`` would, in this process."""
    results = {}
    for case in request:
        out, err = io.StringIO(), io.StringIO()
        argv, cwd = sys.argv, os.getcwd()
        path = str(EXAMPLES / f"{case['script']}.py")
        sys.argv = [path, "--smoke", *case["args"]]
        os.chdir(case["cwd"])
        code = 0
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    runpy.run_path(path, run_name="__main__")
                except SystemExit as stop:
                    code = stop.code if isinstance(stop.code, int) else 1
                except BaseException:  # a traceback, as the interpreter would print it
                    traceback.print_exc()
                    code = 1
        finally:
            sys.argv = argv
            os.chdir(cwd)
        results[case["id"]] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
    return results


def _assert_usage_error(done: dict, script: str, message: str) -> None:
    assert done["code"] == 2, done["stderr"][-2000:]
    assert "Traceback" not in done["stderr"], done["stderr"][-2000:]
    assert done["stderr"].splitlines()[-1] == f"{script}.py: error: {message}"
    assert done["stdout"] == ""  # nothing loaded, trained or printed before the error


@pytest.mark.slow
@pytest.mark.parametrize("script,option", DIR_SCRIPTS)
def test_out_that_is_a_file_is_a_usage_error(runs, script, option):
    done = runs[f"file-{script}"]
    taken = done["cwd"] / "results.txt"
    _assert_usage_error(
        done, script, f"argument {option}: {str(taken)!r} is a file; give a directory (it is created if missing)"
    )
    assert taken.read_text() == "kept\n"
    assert sorted(p.name for p in done["cwd"].iterdir()) == ["results.txt"]  # nothing written or left behind


@pytest.mark.slow
@pytest.mark.parametrize("script,option", DIR_SCRIPTS)
def test_out_that_cannot_be_created_is_a_usage_error(runs, script, option):
    done = runs[f"uncreatable-{script}"]
    out = done["cwd"] / "a_file" / "results"
    _assert_usage_error(
        done,
        script,
        f"argument {option}: cannot create directory {str(out)!r}: {str(done['cwd'] / 'a_file')!r} is a file; "
        f"choose another {option}",
    )


@pytest.mark.slow
@pytest.mark.parametrize("script", FILE_SCRIPTS)
def test_out_file_that_is_a_directory_or_in_a_missing_folder_is_a_usage_error(runs, script):
    done = runs[f"directory-{script}"]
    _assert_usage_error(
        done,
        script,
        f"argument --out: {str(done['cwd'])!r} is a directory; give a file name (the JSON lines are appended)",
    )
    done = runs[f"missing-{script}"]
    out = done["cwd"] / "missing" / "results.jsonl"
    _assert_usage_error(
        done,
        script,
        f"argument --out: the folder of {str(out)!r}, {str(out.parent)!r}, does not exist; create it or choose "
        "another --out",
    )
    assert list(done["cwd"].iterdir()) == []


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


if __name__ == "__main__":
    print(json.dumps(_child(json.load(sys.stdin))), flush=True)
