"""Block mean kernels inside GPyTorch kernel products and other containers, in ExactGP models.

Each model is compared with the same model evaluated densely (:func:`gp_reference.dense_copy`: GPyTorch's dense
Cholesky on the kernel matrix in float64).
"""

from __future__ import annotations

import copy
import warnings

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, BlockMeanLinearOperator, ClosedFormFallbackWarning, GroupKernel, Partition
from gp_reference import GP, DenseKernel, dense_copy, dense_prediction, grouped_data

DTYPE = torch.float64
N = 60


def data(seed: int = 0):
    """Inputs ``(x0, x1, group id)``, targets, a partition of the rows and test inputs with seen and new ids."""
    inputs, y, xt, _ = grouped_data(seed, N, DTYPE)
    return inputs, y, Partition.from_labels(torch.arange(N) % 6), xt


def rbf():
    return gpytorch.kernels.RBFKernel(active_dims=[0, 1])


def scaled_block_mean_times_rbf(inputs, partition):
    return gpytorch.kernels.ScaleKernel(BlockMeanKernel(rbf(), inputs, partition)) * rbf()


def group_times_block_mean(inputs, partition):
    return GroupKernel(7, active_dims=[2]) * BlockMeanKernel(gpytorch.kernels.ScaleKernel(rbf()), inputs, partition)


def scaled_product(inputs, partition):
    return gpytorch.kernels.ScaleKernel(GroupKernel(7, active_dims=[2]) * BlockMeanKernel(rbf(), inputs, partition))


PRODUCTS = {
    "ScaleKernel(BlockMeanKernel) * RBF": scaled_block_mean_times_rbf,
    "GroupKernel * BlockMeanKernel": group_times_block_mean,
    "ScaleKernel(GroupKernel * BlockMeanKernel)": scaled_product,
}


def model_of(kernel, inputs, y) -> GP:
    return GP(inputs, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).to(DTYPE)


def predict(model: GP, x: torch.Tensor):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a product with an exact kernel has no closed form, and says so
        pred = model(x)
        return pred.mean, pred.variance


def assert_predicts_as_dense(model: GP, x: torch.Tensor, tol: float = 1e-9) -> None:
    mean, variance = predict(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_mean, ref_variance = dense_prediction(dense_copy(model), x)
    torch.testing.assert_close(mean, ref_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(variance, ref_variance, rtol=tol, atol=tol)


def block_mean_kernel_of(model: GP) -> BlockMeanKernel:
    (kernel,) = [m for m in model.covar_module.modules() if isinstance(m, BlockMeanKernel)]
    return kernel


# ---------------------------------------------------------------------------- stale prediction caches
@pytest.mark.parametrize("name", list(PRODUCTS))
def test_product_refuses_the_stale_prediction_cache_after_set_partition(name):
    """A product kernel took GPyTorch's default prediction strategy, which did not record the BlockMeanKernel's data:
    after ``set_partition`` in eval mode the cached solves of the old training covariance were combined with the new
    kernel (means off by 0.03-0.04 on this data, no error)."""
    inputs, y, partition, xt = data()
    model = model_of(PRODUCTS[name](inputs, partition), inputs, y)
    model.eval()
    predict(model, xt)  # caches the prediction strategy
    block_mean_kernel_of(model).set_partition(Partition.from_labels(torch.arange(N) // 10))
    with pytest.raises(ValueError, match=r"set_partition.*model\.set_train_data"):
        predict(model, xt)
    model.set_train_data(inputs, y, strict=False)  # the fix the message names
    assert_predicts_as_dense(model, xt)


@pytest.mark.parametrize("name", list(PRODUCTS))
def test_product_refuses_the_stale_prediction_cache_after_kernel_set_train_data(name):
    inputs, y, partition, xt = data()
    inputs2, y2, _, _ = data(seed=4)
    inputs2, y2 = inputs2[:40], y2[:40]
    partition2 = Partition.from_labels(torch.arange(40) % 4)
    model = model_of(PRODUCTS[name](inputs, partition), inputs, y)
    model.eval()
    predict(model, xt)
    block_mean_kernel_of(model).set_train_data(inputs2, partition2)
    with pytest.raises(ValueError, match="set_train_data"):
        predict(model, xt)
    model.set_train_data(inputs2, y2, strict=False)
    assert_predicts_as_dense(model, xt)


# ---------------------------------------------------------------------------- training inputs not bound
SUMS_AND_PRODUCTS = {
    **PRODUCTS,
    "BlockMeanKernel + GroupKernel": lambda inputs, partition: (
        BlockMeanKernel(gpytorch.kernels.ScaleKernel(rbf()), inputs, partition) + GroupKernel(7, active_dims=[2])
    ),
}


@pytest.mark.parametrize("name", list(SUMS_AND_PRODUCTS))
def test_model_data_changed_without_the_kernel_is_refused_in_sums_and_products(name):
    """``model.set_train_data`` without the kernel's ``set_train_data``: the BlockMeanKernel takes the new training
    inputs for new points, so the model conditions on the exact base kernel instead of its block mean approximation.
    A BlockMeanKernel alone refused to predict; inside a sum or a product the model predicted silently."""
    inputs, y, partition, xt = data()
    model = model_of(SUMS_AND_PRODUCTS[name](inputs, partition), inputs, y)
    model.set_train_data(inputs[:40], y[:40], strict=False)
    model.eval()
    with pytest.raises(ValueError, match=r"do not match BlockMeanKernel\.train_x.*kernel\.set_train_data"):
        predict(model, xt)
    block_mean_kernel_of(model).set_train_data(inputs[:40], Partition.from_labels(torch.arange(40) % 6))
    assert_predicts_as_dense(model, xt)


def test_active_dims_of_a_product_are_followed_to_the_bound_inputs():
    """The check compares what the BlockMeanKernel is given: a scaled product over columns (0, 1) hands it those."""
    inputs, y, partition, xt = data()
    product = BlockMeanKernel(gpytorch.kernels.RBFKernel(), inputs[:, :2], partition) * gpytorch.kernels.RBFKernel()
    kernel = gpytorch.kernels.ScaleKernel(product, active_dims=[0, 1])
    model = model_of(kernel, inputs, y)
    model.eval()
    assert_predicts_as_dense(model, xt)


# ---------------------------------------------------------------------------- other containers
def test_multitask_kernel_refuses_the_stale_prediction_cache():
    """``MultitaskKernel(BlockMeanKernel(...))`` took GPyTorch's default strategy (``Kernel.prediction_strategy``; now
    the package's Kronecker strategy), which did not record the BlockMeanKernel's data: a new partition in eval mode
    moved the means by 0.25, silently."""

    class Multitask(gpytorch.models.ExactGP):
        def __init__(self, x, y, kernel):
            super().__init__(x, y, gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2))
            self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), num_tasks=2)
            self.covar_module = kernel

        def forward(self, x):
            return gpytorch.distributions.MultitaskMultivariateNormal(self.mean_module(x), self.covar_module(x))

    inputs, y, partition, xt = data()
    x = inputs[:, :2]
    targets = torch.stack([y, torch.cos(x[:, 1])], -1)
    kernel = gpytorch.kernels.MultitaskKernel(
        BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, partition), num_tasks=2, rank=1
    )
    model = Multitask(x, targets, kernel).to(DTYPE)
    model.eval()
    with torch.no_grad():
        before = model(xt[:, :2]).mean
    kernel.data_covar_module.set_partition(Partition.from_labels(torch.arange(N) // 10))
    with torch.no_grad(), pytest.raises(ValueError, match="set_partition"):
        model(xt[:, :2])
    model.set_train_data(x, targets, strict=False)
    with torch.no_grad():
        after = model(xt[:, :2]).mean
    assert (after - before).abs().max() > 1e-3  # the new partition is a different model


# ---------------------------------------------------------------------------- warnings in eval mode
def test_product_predicts_without_the_elementwise_warning_in_eval_mode():
    """Between test points ``GroupKernel * BlockMeanKernel`` is a block mean operator over the test ids times the base
    kernel's dense matrix; prediction never solves with it, but every prediction warned that the product's solves
    leave the closed forms. Between test and training points the product is a ``BlockCrossLinearOperator`` over the
    intersection of the partitions (``tests/test_product_kernel_cross.py``; it was GPyTorch's dense ``t x n``
    matrix, announced with a warning): nothing warns."""
    inputs, y, partition, xt = data()
    model = model_of(group_times_block_mean(inputs, partition), inputs, y)
    model.eval()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(xt).variance  # noqa: B018
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "elementwise product" in m or "t x n" in m], messages
    assert_predicts_as_dense(model, xt)


def test_product_inside_a_sum_predicts_in_closed_form():
    inputs, y, partition, xt = data()
    kernel = group_times_block_mean(inputs, partition) + GroupKernel(7, active_dims=[2])
    model = model_of(kernel, inputs, y)
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        model(xt)
    assert_predicts_as_dense(model, xt)


def test_product_with_an_exact_kernel_still_warns_in_training():
    inputs, y, partition, _ = data()
    model = model_of(scaled_block_mean_times_rbf(inputs, partition), inputs, y)
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with pytest.warns(Warning, match="elementwise product of a BlockMeanLinearOperator"):
        mll(model(inputs), y)


# ---------------------------------------------------------------------------- float32
@pytest.mark.parametrize("fast_pred_var", [False, True])
def test_float32_interaction_of_groupings_predicts_in_the_working_precision(fast_pred_var):
    """``GroupKernel(a) * GroupKernel(b)`` (an interaction random effect) is a block mean operator over the occupied
    cells, but GPyTorch's ProductKernel gives a dense cross covariance, so prediction took GPyTorch's path: in float32
    its solves lost ``eps * cond(M)`` and the posterior lost it again in the cancellation (noise 1e-3: means off by
    0.65 posterior standard deviations, variances by a factor of 23). The solves now run in the working precision."""
    generator = torch.Generator().manual_seed(0)
    n = 2000
    a = torch.randint(0, 20, (n,), generator=generator)
    b = torch.randint(0, 10, (n,), generator=generator)
    inputs = torch.stack([a, b], -1).to(DTYPE)
    effects = torch.randn(20, 10, generator=generator, dtype=DTYPE)
    y = 3.0 + effects[a, b] + 0.03 * torch.randn(n, generator=generator, dtype=DTYPE)
    xt = torch.cat([inputs[:20], torch.tensor([[3.0, 9.0], [19.0, 0.0]], dtype=DTYPE)])
    kernel = GroupKernel(20, active_dims=[0]) * GroupKernel(10, active_dims=[1])
    model = model_of(kernel, inputs, y)
    model.likelihood.noise = 1e-3
    ref_mean, ref_variance = dense_prediction(dense_copy(model), xt)

    single = copy.deepcopy(model).float()
    single.set_train_data(inputs.float(), y.float(), strict=False)
    single.eval()
    with torch.no_grad(), gpytorch.settings.fast_pred_var(fast_pred_var), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dense cross covariance of a product, announced
        pred = single(xt.float())
        mean, variance = pred.mean.double(), pred.variance.double()
    assert ((mean - ref_mean).abs() / ref_variance.sqrt()).max() < 0.02
    torch.testing.assert_close(variance, ref_variance, rtol=1e-2, atol=0)


# ---------------------------------------------------------------------------- elementwise products of lazy kernels
class Hadamard(gpytorch.models.ExactGP):
    """GPyTorch's Hadamard multitask model: ``covar_module(x).mul(task_covar_module(task))`` in ``forward``."""

    def __init__(self, x, task, y, kernel, task_kernel):
        super().__init__((x, task), y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel
        self.task_covar_module = task_kernel

    def forward(self, x, task):
        covar = self.covar_module(x).mul(self.task_covar_module(task))
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), covar)


def hadamard_data():
    inputs, y, partition, xt = data()
    return inputs[:, :1], (torch.arange(N) % 2).to(DTYPE).unsqueeze(-1), y, partition, xt[:, :1]


def predict_with(model, *inputs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = model(*inputs)
        return pred.mean, pred.variance


def test_hadamard_multitask_model_refuses_the_stale_prediction_cache():
    """GPyTorch's Hadamard multitask model multiplies two lazily evaluated kernels in ``forward``, so its prior is no
    kernel's and GPyTorch builds its default strategy, which recorded nothing: a new partition set in eval mode moved
    the means by 0.7-0.9 without an error."""
    x, task, y, partition, xt = hadamard_data()
    task = task.long()
    test_task = torch.arange(5).remainder(2).unsqueeze(-1)
    kernel = BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, partition)
    model = Hadamard(x, task, y, kernel, gpytorch.kernels.IndexKernel(num_tasks=2, rank=1)).to(DTYPE)
    model.eval()
    before, _ = predict_with(model, xt, test_task)
    model.covar_module.set_partition(Partition.from_labels(torch.arange(N) // 10))
    with pytest.raises(ValueError, match="set_partition"):
        predict_with(model, xt, test_task)
    model.set_train_data((x, task), y, strict=False)
    after, _ = predict_with(model, xt, test_task)
    assert (after - before).abs().max() > 1e-3  # the new partition is a different model


def test_elementwise_product_of_lazy_block_mean_kernels_is_closed_form():
    """``GroupKernel(...)(g).mul(BlockMeanKernel(...)(x))`` is a block mean operator over the occupied pairs of blocks,
    but linear_operator's product of two lazily evaluated kernel tensors multiplied their roots: a generic
    ``MulLinearOperator`` whose solves ran a dense n x n Cholesky, without a warning."""
    from bma_gp import BlockMeanLinearOperator
    from closed_form_guard import closed_forms_only

    x, task, y, partition, xt = hadamard_data()
    block_mean = BlockMeanKernel(gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()), x, partition).to(DTYPE)
    group = GroupKernel(2).to(DTYPE)
    for product in (block_mean(x).mul(group(task)), group(task).mul(block_mean(x)), block_mean(x) * group(task)):
        assert isinstance(product, BlockMeanLinearOperator)
        torch.testing.assert_close(product.to_dense(), block_mean(x).to_dense() * group(task).to_dense())

    # a Hadamard multitask model with a GroupKernel over the tasks: training and prediction in closed form
    model = Hadamard(x, task, y, block_mean, GroupKernel(2, rank=1)).to(DTYPE)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    test_task = torch.arange(5).remainder(2).to(DTYPE).unsqueeze(-1)
    with closed_forms_only(N), warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            optimizer.zero_grad()
            (-mll(model(x, task), y)).backward()
            optimizer.step()
        model.eval()
        mean, variance = predict_with(model, xt, test_task)
    reference = copy.deepcopy(model)
    reference.covar_module = DenseKernel(reference.covar_module)
    reference.prediction_strategy = None
    with gpytorch.settings.max_cholesky_size(10**6):
        ref_mean, ref_variance = predict_with(reference, xt, test_task)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(variance, ref_variance, rtol=1e-9, atol=1e-9)


def test_hadamard_model_with_an_index_kernel_stays_closed_form():
    """A block mean kernel times an IndexKernel: linear_operator's product went on without a word (a dense n x n
    Cholesky with jitter), then with a warning. ``IndexKernel(i)`` between the same ids is the block mean matrix
    ``C[i_a, i_b]``, so the product is a block mean operator over the intersection of the partitions
    (tests/test_audit_batch_models.py compares it with the dense model)."""
    x, task, y, partition, _ = hadamard_data()
    kernel = BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, partition)
    model = Hadamard(x, task.long(), y, kernel, gpytorch.kernels.IndexKernel(num_tasks=2, rank=1)).to(DTYPE)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        mll(model(x, task.long()), y)
    assert isinstance(model(x, task.long()).lazy_covariance_matrix.evaluate_kernel(), BlockMeanLinearOperator)


# ---------------------------------------------------------------------------- float32, one kernel
@pytest.mark.parametrize("rank", [0, 1])
def test_float32_random_intercept_variances_keep_their_digits(rank):
    """A float32 GroupKernel's posterior variance at new inputs is ``K_** - (A W)(A W)^T``, far smaller than ``K_**``
    for a well-observed group (about noise / rows), and the subtraction ran in float32: at 1000 rows per group and
    noise 1e-3 the variances were 9 % off (22 % with a cross-group factor), where sums of kernels, which subtract in
    double precision, kept 1e-6. The difference is now formed in the working precision: variances, the dense
    covariance and products."""
    generator = torch.Generator().manual_seed(0)
    n, k = 20000, 20
    groups = torch.randint(0, k, (n,), generator=generator)
    ids = groups.to(DTYPE).unsqueeze(-1)
    y = 3.0 + torch.randn(k, generator=generator, dtype=DTYPE)[groups] + 0.03 * torch.randn(n, dtype=DTYPE)
    xt = torch.arange(k + 2, dtype=DTYPE).unsqueeze(-1)  # every group, and two never seen
    model = model_of(GroupKernel(k + 2, rank=rank), ids, y)
    model.likelihood.noise = 1e-3
    model.eval()
    with torch.no_grad():
        reference = model(xt).lazy_covariance_matrix
        ref_variance, ref_covariance = reference.diagonal(), reference.to_dense()
    single = copy.deepcopy(model).float()
    single.set_train_data(ids.float(), y.float(), strict=False)
    single.eval()
    with torch.no_grad():
        # the operator's diagonal: MultivariateNormal.variance clamps float32 variances below 1e-6 (GPyTorch's)
        covar = single(xt.float()).lazy_covariance_matrix
        variance, covariance = covar.diagonal().double(), covar.to_dense().double()
        product = covar @ torch.ones(k + 2, 1)
    torch.testing.assert_close(variance, ref_variance, rtol=1e-4, atol=0)
    torch.testing.assert_close(covariance, ref_covariance, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(product.double(), ref_covariance.sum(-1, keepdim=True), rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("rank", [0, 1])  # the one-hot Gram, then the t x k factor's product
def test_a_principal_slice_of_the_prediction_keeps_the_exact_root(rank):
    """``mvn[..., a:b]`` of a GroupKernel prediction is the same difference ``K_** - (A W)(A W)^T`` on the slice: its
    covariance equals the slice of the dense one, and sampling it uses the exact root (R R^T equal to the slice, no
    warning), not linear_operator's generic indexed operator and its root."""
    generator = torch.Generator().manual_seed(1)
    n, k = 400, 8
    groups = torch.randint(0, k, (n,), generator=generator)
    y = torch.randn(k, generator=generator, dtype=torch.float64)[groups] + 0.1 * torch.randn(
        n, generator=generator, dtype=torch.float64
    )
    model = model_of(GroupKernel(k, rank=rank), groups.double().unsqueeze(-1), y)
    model.eval()
    xt = torch.arange(k, dtype=torch.float64).repeat(3).unsqueeze(-1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        full = model(xt)
        part = full[..., 3:17]
        covar = part.lazy_covariance_matrix
        assert type(covar).__name__ == "_PredictiveDifference"
        expected = full.lazy_covariance_matrix.to_dense()[3:17, 3:17]
        torch.testing.assert_close(covar.to_dense(), expected, rtol=1e-10, atol=1e-12)
        root = covar.root_decomposition().root.to_dense()
        torch.testing.assert_close(root @ root.mT, expected, rtol=1e-8, atol=1e-10)
        assert part.rsample(torch.Size([2])).shape == (2, 14)


# ------------------------------------------------------------------ a sum with an exact kernel, times a task kernel
def _sum_times_task_kernel_data():
    g = torch.Generator().manual_seed(1)
    n, tasks, levels = 80, 3, 6
    x = torch.stack(
        [
            torch.rand(n, generator=g, dtype=DTYPE),
            torch.randint(0, levels, (n,), generator=g).to(DTYPE),
            torch.randint(0, tasks, (n,), generator=g).to(DTYPE),
        ],
        -1,
    )
    group = GroupKernel(levels, active_dims=[1])
    group.var = 0.7
    smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0]))
    smooth.base_kernel.lengthscale = 0.3
    task = gpytorch.kernels.IndexKernel(num_tasks=tasks, rank=1, active_dims=[2])
    task.covar_factor.data = torch.tensor([[0.5], [-0.3], [0.8]], dtype=torch.float32)
    task.var = torch.tensor([0.2, 0.4, 0.6])
    return x, group.to(DTYPE), smooth.to(DTYPE), task.to(DTYPE)


@pytest.mark.parametrize("form", ["product kernel", "hadamard mul"])
def test_a_sum_with_an_exact_kernel_times_a_task_kernel_has_exact_entries(form):
    """``(GroupKernel + ScaleKernel(RBF)) * IndexKernel``: the sum holds an exact kernel (a fallback sum, ``n x n``
    anyway), and linear_operator's elementwise product of the factors' roots took a jittered Cholesky root of the
    singular sum: entries 2.6e-8 off in float64, a log-density 0.53 nats off at noise 1e-3. The product is now formed
    densely, as GPyTorch's own dense sum is (with a warning when formed and when solved), and its entries are exact."""
    x, group, smooth, task = _sum_times_task_kernel_data()
    with torch.no_grad():
        expected = (group(x).to_dense() + smooth(x).to_dense()) * task(x).to_dense()
        with pytest.warns(ClosedFormFallbackWarning, match="elementwise product of a FallbackSumLinearOperator"):
            if form == "product kernel":
                product = ((group + smooth) * task)(x)
                product = product.evaluate_kernel() if hasattr(product, "evaluate_kernel") else product
            else:
                product = (group + smooth)(x).mul(task(x))
        torch.testing.assert_close(product.to_dense(), expected, rtol=0, atol=1e-15)
        noisy = product.add_diagonal(torch.tensor(1e-3, dtype=DTYPE))
        y = torch.linspace(-1, 1, x.shape[0], dtype=DTYPE)
        with pytest.warns(ClosedFormFallbackWarning):
            got = gpytorch.distributions.MultivariateNormal(torch.zeros_like(y), noisy).log_prob(y)
        want = torch.distributions.MultivariateNormal(
            torch.zeros_like(y), expected + 1e-3 * torch.eye(x.shape[0], dtype=DTYPE)
        ).log_prob(y)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ a ProductKernel with GPyTorch's IndexKernel
def _index_product(order: str, scaled: bool, block_mean: bool, inputs, partition):
    task = gpytorch.kernels.IndexKernel(num_tasks=4, rank=1, active_dims=[3])
    task.covar_factor.data = torch.tensor([[0.5], [-0.3], [0.8], [0.1]])
    task.var = torch.tensor([0.2, 0.4, 0.6, 0.3])
    if scaled:
        task = gpytorch.kernels.ScaleKernel(task)
        task.outputscale = 1.7
    other = BlockMeanKernel(rbf(), inputs, partition) if block_mean else GroupKernel(7, active_dims=[2])
    return other * task if order == "block mean first" else task * other


@pytest.mark.parametrize("order", ["block mean first", "index first"])
@pytest.mark.parametrize("scaled", [False, True], ids=["bare", "scaled"])
@pytest.mark.parametrize("block_mean", [False, True], ids=["group", "block-mean"])
def test_product_with_an_index_kernel_predicts_in_closed_form(order, scaled, block_mean):
    """``GroupKernel * IndexKernel`` (or a ``BlockMeanKernel``, either order, the task kernel in a ``ScaleKernel``
    or not) as one ``ProductKernel`` with ``active_dims``: its training covariance was closed form, but its
    prediction formed the dense ``t x n`` cross covariance with a warning (12 s and 2.4 GB at n = 50,000 and
    t = 2,000 in a user trial, against 0.7 s for the same model with ``GroupKernel(4, rank=1)``). The IndexKernel's
    cross covariance is now read as block values over the training task ids, new ids included."""
    inputs, y, partition, xt = data()
    tasks = (torch.arange(N) % 3).to(DTYPE).unsqueeze(-1)  # task 3 is never seen in training
    x = torch.cat([inputs, tasks], -1)
    test_tasks = torch.tensor([[0.0], [3.0], [2.0], [1.0], [3.0]], dtype=DTYPE)
    xt = torch.cat([xt, test_tasks], -1)
    model = model_of(_index_product(order, scaled, block_mean, x, partition), x, y)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning, no torch warning about sparse tensors
        pred = model(xt)
        mean, var = pred.mean, pred.variance
    ref_mean, ref_var = dense_prediction(dense_copy(model), xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(var, ref_var, rtol=1e-10, atol=1e-10)


def test_product_with_an_index_kernel_differentiates_like_dense():
    """The closed-form prediction's gradients in the task kernel's parameters match the dense model's."""
    inputs, y, partition, xt = data()
    x = torch.cat([inputs, (torch.arange(N) % 3).to(DTYPE).unsqueeze(-1)], -1)
    xt = torch.cat([xt, torch.tensor([[0.0], [1.0], [2.0], [1.0], [3.0]], dtype=DTYPE)], -1)
    model = model_of(_index_product("block mean first", False, False, x, partition), x, y)
    reference = dense_copy(model)
    grads = []
    for m in (model, reference):
        m.eval()
        with warnings.catch_warnings(), gpytorch.settings.max_cholesky_size(10**6):
            warnings.simplefilter("error" if m is model else "ignore")
            with gpytorch.settings.detach_test_caches(False):
                pred = m(xt)
                (pred.mean.sum() + pred.variance.sum()).backward()
        task = m.covar_module.kernels[1] if m is model else m.covar_module.kernel.kernels[1]
        grads.append(task.covar_factor.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "form", ["ScaleKernel(GroupKernel * BlockMeanKernel) * IndexKernel", "ScaleKernel(BlockMeanKernel) * IndexKernel"]
)
def test_scaled_dense_test_covariance_times_an_index_kernel_is_exact(form):
    """A ``ScaleKernel`` around a kernel whose covariance between new points is held densely (a ``BlockMeanKernel``'s)
    is ``c D``: linear_operator multiplied it with the ``IndexKernel`` through roots of both factors, a jittered
    Cholesky or Lanczos past ``max_cholesky_size`` (a user trial's variances at 1000 new points were up to 100% off,
    with ``ScaleKernel(GroupKernel * BlockMeanKernel) * IndexKernel`` also leaving the closed form for the cross
    covariance). Its product is now formed densely (exact), and the nested product's cross covariance is closed form.
    ``max_cholesky_size`` is lowered so that the old path took Lanczos at this size."""
    inputs, y, partition, xt = data()
    x = torch.cat([inputs, (torch.arange(N) % 3).to(DTYPE).unsqueeze(-1)], -1)
    g = torch.Generator().manual_seed(3)
    xt = torch.cat([torch.randn(40, 2, generator=g, dtype=DTYPE), torch.randint(0, 7, (40, 1), generator=g).to(DTYPE),
                    torch.randint(0, 3, (40, 1), generator=g).to(DTYPE)], -1)  # fmt: skip
    task = gpytorch.kernels.IndexKernel(num_tasks=3, rank=1, active_dims=[3])
    task.covar_factor.data = torch.tensor([[0.5], [-0.3], [0.8]])
    block_mean = BlockMeanKernel(rbf(), x, partition)
    inner = GroupKernel(7, active_dims=[2]) * block_mean if "Group" in form else block_mean
    model = model_of(gpytorch.kernels.ScaleKernel(inner) * task, x, y)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings(), gpytorch.settings.max_cholesky_size(10):
        warnings.simplefilter("error")
        pred = model(xt)
        mean, covar = pred.mean, pred.covariance_matrix
    reference = dense_copy(model)
    reference.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**6):
        ref = reference(xt)
        ref_mean, ref_covar = ref.mean, ref.covariance_matrix
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(covar, ref_covar, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order", ["I1 * I2 * G", "I1 * G * I2", "G * I1 * I2", "I1 * I2 * M"])
def test_two_index_kernels_multiplied_first_stay_closed_form(order):
    """``IndexKernel(i1) * IndexKernel(i2) * GroupKernel(g)``: GPyTorch's product multiplied the two task kernels
    first, linear_operator's product of their roots (a training covariance that left the closed forms, with a
    warning), while the order ``I1 * G * I2`` was closed form. The product's factors are now taken block mean first
    (the elementwise product commutes), in training and in the cross covariance alike."""
    inputs, y, partition, xt = data()
    x = torch.cat([inputs, (torch.arange(N) % 3).to(DTYPE).unsqueeze(-1), (torch.arange(N) % 2).to(DTYPE)[:, None]], -1)
    xt = torch.cat([xt, torch.tensor([[0.0], [1.0], [2.0], [1.0], [3.0]], dtype=DTYPE),
                    torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0]], dtype=DTYPE)], -1)  # fmt: skip
    i1 = gpytorch.kernels.IndexKernel(num_tasks=4, rank=1, active_dims=[3])
    i1.covar_factor.data = torch.tensor([[0.5], [-0.3], [0.8], [0.1]])
    i2 = gpytorch.kernels.IndexKernel(num_tasks=2, rank=1, active_dims=[4])
    i2.covar_factor.data = torch.tensor([[0.9], [0.4]])
    other = BlockMeanKernel(rbf(), x, partition) if order.endswith("M") else GroupKernel(7, active_dims=[2])
    factors = {"I1": i1, "I2": i2, "G": other, "M": other}
    names = order.split(" * ")
    kernel = factors[names[0]] * factors[names[1]] * factors[names[2]]
    model = model_of(kernel, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        covar = model.covar_module(x)
        covar = covar.evaluate_kernel() if hasattr(covar, "evaluate_kernel") else covar
        assert isinstance(covar, BlockMeanLinearOperator)
        reference = dense_copy(model)
        torch.testing.assert_close(covar.to_dense(), reference.covar_module(x).to_dense(), rtol=1e-12, atol=1e-12)
        model.train()
        loss = -gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y)
        loss.backward()
        model.eval()
        with torch.no_grad():
            pred = model(xt)
            mean, var = pred.mean, pred.variance
    ref_mean, ref_var = dense_prediction(reference, xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(var, ref_var, rtol=1e-10, atol=1e-10)
