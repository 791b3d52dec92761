"""What PyTorch users routinely do to the package's objects: ``copy.deepcopy``, ``pickle`` and ``torch.save`` round
trips of whole models (in training mode and in eval mode with prediction caches), ``state_dict`` through
``torch.load(weights_only=True)`` into freshly built models, state dicts of models built with other groupings, and
dtype moves after training."""

from __future__ import annotations

import copy
import pickle

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, GroupGaussianLikelihood, GroupKernel, Partition
from gp_reference import GP
from test_audit_optim_state import _reload as save_load

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64
N = 60
LEVELS = 5


def data(seed=0):
    """Columns: a covariate, a group id in ``0 .. LEVELS - 1``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(N, generator=g, dtype=DTYPE)
    ids = torch.arange(N) % LEVELS
    x = torch.stack([t, ids.to(DTYPE)], -1)
    y = torch.sin(6 * t) + 0.3 * ids + 0.1 * torch.randn(N, generator=g, dtype=DTYPE)
    test = torch.stack([torch.rand(7, generator=g, dtype=DTYPE), (torch.arange(7) % LEVELS).to(DTYPE)], -1)
    return x, y, test


def block_mean_model(x, y, blocks=6):
    base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0]))
    partition = Partition.from_labels(torch.arange(N) * blocks // N)
    covar = BlockMeanKernel(base, x, partition) + GroupKernel(LEVELS, active_dims=[1])
    return GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), covar).to(DTYPE)


# ---------------------------------------------------------------------------------------------- state dicts
def test_a_batched_group_likelihood_refuses_a_state_dict_of_another_number_of_groups_by_name():
    """A state dict of the former layout (one ``observed`` flag vector for all batch entries) was expanded over the
    batch before torch compared the sizes: one of another number of groups failed in ``expand_as`` ("The expanded
    size of the tensor (7) must match the existing size (5)"), which names neither the entry nor the module. Now
    torch's size-mismatch error names the entries, and nothing is loaded."""
    saved = GroupGaussianLikelihood(LEVELS, batch_shape=torch.Size([2])).state_dict()
    saved["noise_covar.observed"] = torch.tensor([True, False, True, False, True])  # the former layout
    other = GroupGaussianLikelihood(LEVELS + 2, batch_shape=torch.Size([2]))
    before = other.noise.detach().clone()
    with pytest.raises(RuntimeError, match=r"size mismatch for noise_covar\.observed.*\[5\]"):
        other.load_state_dict(save_load(saved))
    torch.testing.assert_close(other.noise, before)
    assert not other.noise_covar.observed.any()


# ---------------------------------------------------------------------------------------------- round trips (guards)
def predict(model, x):
    model.eval()
    with torch.no_grad():
        out = model.likelihood(model(x))
        return out.mean, out.variance


def fit(model, x, y, steps):
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        (-mll(model(x), y)).backward()
        optimizer.step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "state_dict"])
def test_an_eval_mode_block_mean_model_survives_round_trips_and_stays_independent(how):
    """A trained model in eval mode with its prediction caches: a deep copy, a pickle and a ``weights_only`` state
    dict loaded into a freshly built model predict what it predicts, and training the copy changes nothing of the
    original."""
    x, y, test = data()
    model = block_mean_model(x, y)
    fit(model, x, y, 3)
    expected = predict(model, test)
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(model))
    else:
        clone = block_mean_model(x, y, blocks=6)
        predict(clone, test)  # its own caches, of its initial hyperparameters
        clone.load_state_dict(save_load(model.state_dict()))
    torch.testing.assert_close(predict(clone, test), expected)
    fit(clone, x, y, 2)
    torch.testing.assert_close(predict(model, test), expected)
    assert not torch.allclose(predict(clone, test)[1], expected[1])
    clone.double()
    mean, var = predict(clone.float(), test.float())
    assert mean.dtype == var.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- partitions
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copying_a_partition_from_sizes_builds_no_labels(how):
    """``Partition.from_sizes`` builds its ``n`` labels only when asked, but ``__getstate__`` asked: a deep copy, a
    pickle or a ``torch.save`` of a contiguous partition (or of a model or operator holding one) left an ``n``-long
    int64 vector on the original and wrote one into every copy, where the ``k`` sizes suffice."""
    sizes = [1000] * 50 + [500] * 20
    partition = Partition.from_sizes(sizes)
    if how == "deepcopy":
        clone = copy.deepcopy(partition)
    elif how == "pickle":
        payload = pickle.dumps(partition)
        assert len(payload) < 10_000  # the 60,000 labels would take 480 kB
        clone = pickle.loads(payload)
    else:
        with torch.serialization.safe_globals([Partition]):
            clone = save_load(partition)
    assert partition._labels is None and clone._labels is None
    assert clone == partition and len(clone) == 60_000 and clone.is_contiguous
    x = torch.randn(60_000, dtype=DTYPE)
    torch.testing.assert_close(clone.block_sum(x), partition.block_sum(x))
    assert torch.equal(clone.labels, torch.repeat_interleave(torch.arange(70), torch.tensor(sizes)))
    # labels that were built (or given) are saved as before, and not shared with the copy
    scattered = Partition.from_labels(torch.tensor([1, 0, 1, 2, 0]))
    again = pickle.loads(pickle.dumps(scattered)) if how == "pickle" else copy.deepcopy(scattered)
    assert torch.equal(again.labels, scattered.labels) and again.labels.data_ptr() != scattered.labels.data_ptr()


# ---------------------------------------------------------------------------------------------- the saved partition
def _fitted_state(x, y):
    model = block_mean_model(x, y)
    with torch.no_grad():
        model.covar_module.kernels[0].base_kernel.base_kernel.lengthscale = 0.37
    return model.state_dict()


@pytest.mark.parametrize(
    "labels",
    [
        torch.arange(N) * 3 // N,  # fewer blocks
        torch.arange(N) % 6,  # as many blocks, scattered: other labels, the same sizes
    ],
    ids=["other_k", "same_k_scattered"],
)
def test_a_state_dict_loaded_under_another_partition_of_the_same_points_warns(labels):
    """A ``BlockMeanKernel``'s partition is not a parameter: a state saved from a model with one partition loaded into
    a model of the same training points with another partition gave another posterior (0.27 to 0.91 apart in a user
    trial) without a word. The state dict now records ``n``, ``k`` and a fingerprint of the labels, and loading it
    under another partition of as many points warns; the hyperparameters still load."""
    x, y, _ = data()
    saved = save_load(_fitted_state(x, y))
    model = block_mean_model(x, y)
    model.covar_module.kernels[0].set_partition(Partition.from_labels(labels))
    with pytest.warns(UserWarning, match=r"another partition of the same 60 training points"):
        model.load_state_dict(saved)
    assert model.covar_module.kernels[0].base_kernel.base_kernel.lengthscale.item() == pytest.approx(0.37)


def test_a_state_dict_loads_silently_under_the_same_partition_other_data_or_an_older_save(recwarn):
    """No warning where nothing differs (an equal partition rebuilt from labels, a contiguous one from sizes), where
    the training data differ (another ``n``: hyperparameters carried to other data, as GPyTorch allows), or for a
    state saved before the partition was recorded (no ``_extra_state`` entry, even with ``strict=True``)."""
    x, y, _ = data()
    state = _fitted_state(x, y)
    saved = save_load(state)
    assert saved["covar_module.kernels.0._extra_state"].tolist()[:2] == [N, 6]
    same = block_mean_model(x, y)
    sizes = Partition.from_labels(torch.arange(N) * 6 // N).sizes
    same.covar_module.kernels[0].set_partition(Partition.from_sizes(sizes))
    same.load_state_dict(saved)
    half = N // 2
    other = GP(
        x[:half],
        y[:half],
        gpytorch.likelihoods.GaussianLikelihood(),
        BlockMeanKernel(
            gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0])),
            x[:half],
            Partition.from_labels(torch.arange(half) % 4),
        )
        + GroupKernel(LEVELS, active_dims=[1]),
    ).to(DTYPE)
    other.load_state_dict(saved)
    older = {key: value for key, value in state.items() if not key.endswith("_extra_state")}
    fresh = block_mean_model(x, y)
    fresh.covar_module.kernels[0].set_partition(Partition.from_labels(torch.arange(N) % 2))
    fresh.load_state_dict(older, strict=True)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    assert fresh.covar_module.kernels[0].base_kernel.base_kernel.lengthscale.item() == pytest.approx(0.37)


def test_a_foreign_extra_state_entry_warns_and_loads_the_rest():
    """An ``_extra_state`` entry BlockMeanKernel did not write is ignored with a warning (a refusal would leave the
    modules torch loaded before this kernel changed)."""
    x, y, _ = data()
    state = _fitted_state(x, y)
    state["covar_module.kernels.0._extra_state"] = {"partition": "labels"}
    model = block_mean_model(x, y)
    with pytest.warns(UserWarning, match=r"_extra_state.*is ignored"):
        model.load_state_dict(state)
    assert model.covar_module.kernels[0].base_kernel.base_kernel.lengthscale.item() == pytest.approx(0.37)


@pytest.mark.parametrize("cast", ["double", "average"])
def test_state_dict_utilities_that_cast_every_entry_still_load(cast, recwarn):
    """``{k: v.double() for k, v in sd.items()}`` and an average of state dicts (a model soup) cast the int64
    ``_extra_state`` to a float: they loaded before it existed, and they load now, silently (a float cannot hold the
    fingerprint exactly, so nothing is compared)."""
    x, y, _ = data()
    state = _fitted_state(x, y)
    if cast == "double":
        state = {key: value.double() for key, value in state.items()}
    else:
        other = block_mean_model(x, y).state_dict()
        state = {key: (value.double() + other[key].double()) / 2 for key, value in state.items()}
    model = block_mean_model(x, y)
    model.covar_module.kernels[0].set_partition(Partition.from_labels(torch.arange(N) % 2))
    model.load_state_dict(state)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_the_same_blocks_under_other_ids_load_silently(recwarn):
    """k-means run again numbers its clusters differently: the same blocks under other ids are the same block mean
    model (BlockMeanKernel has no per-block parameters), and loading does not warn; other blocks do."""
    x, y, _ = data()
    labels = torch.arange(N) % 6
    saved_model = block_mean_model(x, y)
    saved_model.covar_module.kernels[0].set_partition(Partition.from_labels(labels))
    saved = save_load(saved_model.state_dict())
    model = block_mean_model(x, y)
    model.covar_module.kernels[0].set_partition(Partition.from_labels(torch.tensor([3, 5, 0, 1, 4, 2])[labels]))
    model.load_state_dict(saved)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    moved = labels.clone()
    moved[:2] = moved[:2].flip(0)  # two points swap blocks
    model.covar_module.kernels[0].set_partition(Partition.from_labels(moved))
    with pytest.warns(UserWarning, match="another partition of the same"):
        model.load_state_dict(saved)


def test_a_pickled_inducing_point_model_leaves_its_kept_training_root_behind():
    """``ChunkedInducingPointKernel`` keeps its training root (``n x m``) between calls; pickling a model in eval mode
    (``torch.save(model)``) wrote it into the file (43 against 33 MB for GPyTorch's class at n = 20,000, m = 64).
    Kept values are now dropped when pickled; the loaded model predicts the same."""
    from bma_gp.kernels import ChunkedInducingPointKernel

    x, y, test = data()
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0]))
    covar = ChunkedInducingPointKernel(base, x[:8, :1].clone(), likelihood, active_dims=[0])
    model = GP(x, y, likelihood, covar).to(DTYPE)
    model.eval()
    with torch.no_grad():
        expected = model(test).mean
    kept = model.covar_module.__dict__.get("_bma_gp_kept_root")
    assert kept is not None and len(kept) > 0
    loaded = pickle.loads(pickle.dumps(model))
    assert len(loaded.covar_module.__dict__["_bma_gp_kept_root"]) == 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(test).mean, expected)
