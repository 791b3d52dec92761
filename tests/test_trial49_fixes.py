"""Trial 49: kmeans_partition's seed range (the 32 bits torch's generator keeps, as ``bma-gp --seed``), and
``bma_gp.cli.main`` leaving the caller's global torch random state as it found it."""

import contextlib
import io
import json
import os
import re

import numpy as np
import pytest
import torch

from bma_gp.cli import main
from bma_gp.partition_builders import kmeans_partition

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """The CLI's default --out is relative: keep whatever a run creates out of the checkout."""
    monkeypatch.chdir(tmp_path)


def _points():
    return torch.randn(300, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# ---------------------------------------------------------------------------- kmeans_partition's seed
@pytest.mark.parametrize("seed", [2**32, 1 + 2**32, -1, -(2**63), 2**64 - 1, np.uint64(2**63), torch.tensor(-5)])
def test_kmeans_refuses_a_seed_outside_the_32_bits_torch_keeps(seed):
    """torch's CPU generator keeps the low 32 bits of a seed: seeds 1 and 1 + 2**32 (and -1 and 2**64 - 1) gave the
    same partition. Outside 0 .. 2**32 - 1 a seed is refused, naming the argument, the range and why."""
    with pytest.raises(ValueError, match=r"seed must be an int in 0 \.\. 2\*\*32 - 1 = 4294967295, got") as info:
        kmeans_partition(_points(), 5, seed=seed)
    assert "keeps 32 bits of a seed" in str(info.value)


def test_kmeans_takes_every_seed_of_the_range_and_they_differ():
    x = _points()
    for seed in (0, 2**32 - 1, np.uint32(2**32 - 1), np.int64(7), torch.tensor(7)):
        assert kmeans_partition(x, 5, seed=seed).num_blocks == 5
    assert kmeans_partition(x, 5, seed=np.int64(7)) == kmeans_partition(x, 5, seed=7)
    # the two ends of the range are different draws (outside it they repeated draws inside)
    gen = [torch.randperm(300, generator=torch.Generator().manual_seed(s)) for s in (0, 2**32 - 1)]
    assert not torch.equal(*gen)


def test_kmeans_seed_docstring_gives_the_range():
    doc = " ".join(kmeans_partition.__doc__.split())
    assert "an int in ``0 .. 2**32 - 1``" in doc and "low 32 bits" in doc


def test_cli_and_library_share_one_seed_check(capsys):
    """``bma-gp --seed`` and ``kmeans_partition(seed=...)`` are checked by one helper, so their ranges agree."""
    from bma_gp import partition_builders
    from bma_gp.cli import arguments, parse_config

    assert arguments._checked_seed is partition_builders._seed
    low, high = partition_builders._SEED_RANGE
    assert (low, high) == (0, 2**32 - 1)
    assert parse_config(["--seed", str(high), "--device", "cpu"]).seed == high
    with pytest.raises(SystemExit):
        parse_config(["--seed", str(high + 1), "--device", "cpu"])
    assert "expected an integer from 0 to 4294967295 (2**32 - 1; torch's random generator keeps 32" in (
        capsys.readouterr().err
    )


# ---------------------------------------------------------------------------- main() and the global RNG
# --max-cholesky 50: the exact GP solves by CG with random probe vectors from torch's global generator, which the
# run seeds with --seed
QUICK = ["--method", "exact,blockmean", "--blocks", "8", "--iters", "2", "--max-rows", "150", "--max-cholesky", "50"]
QUICK += ["--no-plot", "--no-progress"]


def _quiet_main(argv):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


def _results_without_times(out):
    with open(os.path.join(out, "results.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    for row in summary["results"]:
        del row["train_seconds"], row["predict_seconds"]
    return summary


def test_main_restores_the_callers_global_rng(tmp_path):
    """main() reseeded the caller's global torch generator with --seed (torch.manual_seed): a Python caller's random
    stream restarted at seed 0. It runs its own seeding in a fork of the global state now."""
    torch.manual_seed(123)
    torch.rand(3)
    expected = torch.rand(5)
    torch.manual_seed(123)
    torch.rand(3)
    assert _quiet_main([*QUICK, "--out", str(tmp_path / "a")]) == 0
    assert torch.equal(torch.rand(5), expected)


def test_main_restores_the_callers_global_rng_when_the_run_fails(tmp_path):
    """A run that stops after seeding (here --blocks above the training rows, found once the data are split) gives the
    state back too."""
    torch.manual_seed(321)
    expected = torch.rand(4)
    torch.manual_seed(321)
    with pytest.raises(SystemExit) as info:
        _quiet_main([*QUICK[:2], "--blocks", "1000", "--max-rows", "150", "--out", str(tmp_path / "b")])
    assert info.value.code == 2
    assert torch.equal(torch.rand(4), expected)


def test_main_results_depend_on_seed_not_on_the_callers_rng(tmp_path):
    """The run is still seeded with --seed: whatever the caller's global state, one seed gives one result."""
    summaries = []
    for caller_seed, out in ((5, "c"), (99, "d")):
        torch.manual_seed(caller_seed)
        assert _quiet_main([*QUICK, "--seed", "11", "--out", str(tmp_path / out)]) == 0
        summaries.append(_results_without_times(tmp_path / out))
    assert summaries[0] == summaries[1]


# ---------------------------------------------------------------------------- docs/cli.md's one-thread demo
def test_cli_page_demo_table_is_the_stored_run():
    """The one-thread table of docs/cli.md shows docs/results/cli/co2_demo.json, as the run prints it."""
    with open(os.path.join(REPO, "docs", "results", "cli", "co2_demo.json"), encoding="utf-8") as handle:
        stored = json.load(handle)
    with open(os.path.join(REPO, "docs", "cli.md"), encoding="utf-8") as handle:
        page = handle.read()
    table = page[page.index("co2_demo.json`") :].split("```text", 1)[1].split("```", 1)[0]
    rows = {line.split()[0]: line.split() for line in table.splitlines() if re.match(r"(exact|blockmean|sgpr) ", line)}
    assert list(rows) == [r["method"] for r in stored["results"]]
    for r in stored["results"]:
        row = rows[r["method"]]
        assert row[2:] == [
            f"{r['train_seconds']:.2f}",
            f"{r['predict_seconds']:.3f}",
            f"{r['rmse']:.4g}",
            f"{r['nlpd']:.4g}",
        ]
