"""The optimizer example scripts run (paper CNNs on generated CIFAR-shaped tensors, step benchmark)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
paper_cnn = pytest.importorskip("paper_cnn")
bench_optimizer = pytest.importorskip("bench_optimizer")


@pytest.mark.parametrize("make,params", [(paper_cnn.small_model, 4 * 84 + 130), (paper_cnn.large_model, None)])
def test_paper_models_take_cifar_shaped_input(make, params):
    model = make(3)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    if params is not None:  # 4 convs of 3 channels (84 parameters each with 3 input channels) + linear 12 -> 10
        assert sum(p.numel() for p in model.parameters()) == params


def test_train_run_on_generated_cifar_batch():
    gen = torch.Generator().manual_seed(0)
    data = (
        torch.randn(100, 3, 32, 32, generator=gen),
        torch.randint(0, 10, (100,), generator=gen),
        torch.randn(20, 3, 32, 32, generator=gen),
        torch.randint(0, 10, (20,), generator=gen),
    )
    run = paper_cnn.train_run(
        lambda: paper_cnn.small_model(3), data, "block_mean_row", 0.05, epochs=2, seed=0, batch_size=50
    )
    assert run["finite"] and len(run["summed_loss"]) == 2 and len(run["test_error"]) == 2
    assert all(0.0 <= e <= 1.0 for e in run["test_error"])
    assert math.isclose(run["summed_loss"][0] / 2, run["mean_loss"][0])


def test_bench_smoke_prints_one_json_line(capsys):
    bench_optimizer.main(["--smoke"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(line)
    assert result["ratio_to_adagrad"]["adagrad"] == 1.0
    assert result["median_ms"]["block_mean_tensor"] > 0
    # per-round ratios against the Adagrad steps of the same round (two rounds under --smoke)
    assert result["paired_ratio_to_adagrad"]["adagrad"] == 1.0
    assert set(result["paired_ratio_to_adagrad"]) == set(result["ratio_to_adagrad"])
    assert all(len(q) == 3 and q[0] <= q[1] <= q[2] for q in result["paired_ratio_quartiles"].values())


def test_bench_baseline_times_another_optim_package(capsys, tmp_path):
    import shutil

    import bma_gp.optim
    import optim

    # a copy of the current optimizer package stands in for another checkout's
    shutil.copytree(os.path.dirname(bma_gp.optim.__file__), tmp_path / "bma_gp" / "optim")
    current = {name: mod for name, mod in sys.modules.items() if name.startswith("bma_gp.optim")}
    Baseline = bench_optimizer.load_baseline(str(tmp_path))
    assert Baseline is not optim.BlockMeanAdagrad
    assert Baseline._step.__code__.co_filename.startswith(str(tmp_path))  # the copy's code, not the current one
    assert {name: mod for name, mod in sys.modules.items() if name.startswith("bma_gp.optim")} == current
    assert bma_gp.optim.BlockMeanAdagrad is optim.BlockMeanAdagrad  # the current package is restored
    bench_optimizer.main(["--smoke", "--baseline", str(tmp_path)])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["median_cpu_ms"]["baseline_tensor"] > 0 and result["cpu_ratio_to_adagrad"]["adagrad"] == 1.0
    assert sys.modules["optim"] is optim
    assert optim.BlockMeanAdagrad.__module__ == "bma_gp.optim.block_mean_adagrad"
