r"""The optimal block mean approximation of a kernel matrix on data, without the ``n x n`` matrix.

:func:`kernel_block_mean` returns the Frobenius-nearest block mean matrix of
:math:`K = k(X, X)` (see ``docs/math.md``). It needs only

.. math::
    T = P^\top K P \quad (k \times k), \qquad d = P^\top \operatorname{diag}(K) \quad (k),

which an engine in :mod:`bma_gp._kernel_sums` reduces from tiles or row chunks of
:math:`K`. This module checks the arguments, sorts the points by block and picks the engine:

* the **stationary engine** for ``RBFKernel`` and ``MaternKernel`` (:math:`\nu \in \{1/2,
  3/2, 5/2\}`), optionally inside a ``ScaleKernel``, with one or ARD lengthscales, when
  ``x`` needs no gradient: each unordered pair is evaluated once and reduced by segment
  sums, so the work does not grow with the number of blocks; backward is a second tiled
  pass for the lengthscales (the outputscale is a factor applied here);
* the **generic engine** for every other kernel: row chunks evaluated without a graph,
  re-evaluated one at a time in backward.

**Distributed.** With ``process_group`` every rank evaluates its own share of the rows
(generic) or of the tiles (stationary); all ranks must pass the same ``x``, partition and
kernel parameters. One small all-gather first compares the problems' shapes (``n``, ``k``,
the block sizes, ``d``, the engine, the batch, the dtype and ``chunk_size``) and raises
``ValueError`` on every rank where they differ; different values of ``x``, of the labels
within equal block sizes or of the parameters are not detected. A rank whose own arguments
are refused (``chunk_size=0``, NaN in ``x``, ...) still takes part in that all-gather: it
raises its own error, and every other rank a ``ValueError`` naming it (none waits in a
collective for it until the backend's timeout). A rank outside the group is refused.
The block sums are all-reduced in forward, so every rank returns the same operator, and
the hyperparameter (and input) gradients are all-reduced in backward, so every rank ends
with the full gradient of its (identical) loss: do not sum the gradients again. Every
rank must call backward. Wrapping the model in ``DistributedDataParallel`` is harmless,
since averaging identical gradients leaves them unchanged.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, cast

import numpy as np
import torch
from gpytorch.kernels import AdditiveKernel, InducingPointKernel, Kernel, ProductKernel, ScaleKernel
from torch import Tensor

from bma_gp import settings
from bma_gp._autograd import carries_tangent
from bma_gp._kernel_sums.generic import (
    GenericKernelSums,
    centred_inputs,
    check_parameters,
    entry_factor,
    evaluate,
    kernel_parameters,
)
from bma_gp._kernel_sums.plan import KernelSumsPlan
from bma_gp._kernel_sums.stationary import StationaryForm, stationary_block_means
from bma_gp._precision import core_dtype
from bma_gp.approximation import block_mean_from_sums, positive_int_or_none
from bma_gp.block_mean_linear_operator import BlockMeanLinearOperator
from bma_gp.partition import Partition

__all__ = ["kernel_block_mean"]

#: Target size of one ``chunk x n`` matrix of kernel values in the generic engine (bytes).
_CHUNK_BYTES = 64 * 2**20
#: Number of kernel entries above which a progress bar is shown by default.
_PROGRESS_ENTRIES = 10**9


def _check_inputs(kernel: Any, x: Any, partition: Any, chunk_size: Any, x_name: str = "x") -> Tensor:
    if not isinstance(kernel, Kernel):
        raise TypeError(f"kernel must be a gpytorch.kernels.Kernel, got {type(kernel).__name__}.")
    if any(isinstance(m, InducingPointKernel) and m.training for m in kernel.modules()):
        raise ValueError(
            "kernel contains an InducingPointKernel in training mode, which refuses different inputs "
            "(kernel_block_mean evaluates chunks of rows against all rows) and would add its SGPR loss term for the "
            "exact low-rank matrix, not for the block mean. Put the InducingPointKernel beside the block mean kernels "
            "instead (InducingPointKernel(...) + GroupKernel(...) stays closed form, docs/gp.md), or call .eval() on "
            "it to use its low-rank covariance as the base kernel."
        )
    from bma_gp.kernels.block_mean_kernel import BlockMeanKernel

    if any(isinstance(m, BlockMeanKernel) for m in kernel.modules()):
        raise ValueError(
            "kernel contains a BlockMeanKernel, whose matrix at its own training inputs is a block mean matrix but "
            "which kernel_block_mean would evaluate on chunks of rows, points it takes for new ones (exact "
            "cross-covariances): the result would be the block means of another matrix. For the block means of "
            "kernel(x, x) over another partition use bma_gp.block_mean(kernel(x, x), partition) (its products are "
            "closed form); for a block mean kernel over another partition wrap the base kernel itself."
        )
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a torch.Tensor of shape (n, d), got {type(x).__name__}.")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be floating point, got dtype {x.dtype}; convert it with .float().")
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    if x.dim() < 2 or x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(
            f"x must have shape (n, d) or (*batch, n, d) with n, d >= 1 (or (n,) for d = 1), got {tuple(x.shape)}."
        )
    if not isinstance(partition, Partition):
        raise TypeError(
            f"partition must be a bma_gp.Partition, got {type(partition).__name__}; build one with "
            "Partition.from_labels(labels) or a builder from bma_gp.partition_builders."
        )
    if len(partition) != x.shape[-2]:
        raise ValueError(f"partition has {len(partition)} indices but x has {x.shape[-2]} rows; they must match.")
    check_reverse_mode(kernel, x, x_name)
    check_input_device(kernel, x, x_name)
    check_active_dims(kernel, x.shape[-1], x_name)
    check_single_output(kernel, x)
    chunk_rows(chunk_size)
    check_finite_inputs(kernel, x, x_name)
    return x


def _forward_mode_error(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"kernel_block_mean is differentiated in reverse mode only, and {what} carries a forward-mode tangent (a dual "
        "tensor of torch.autograd.forward_ad, or it depends on an input of torch.func.jvp, jacfwd or hessian) or the "
        "derivative of a torch.func transform (grad, jacrev): its engines sum the kernel matrix without a graph and "
        "give derivatives in a backward pass only, so that derivative would be lost (a silently zero or wrong "
        "value). Use ordinary reverse-mode autograd instead: requires_grad on the inputs or the kernel's "
        "hyperparameters, then backward(), torch.autograd.grad or torch.autograd.functional.jacobian."
    )


def check_reverse_mode(kernel: Kernel, x: Tensor, name: str) -> None:
    """``NotImplementedError`` in words where ``x`` or a parameter or buffer of ``kernel`` carries a forward-mode
    tangent or a ``torch.func`` transform's derivative (:func:`~bma_gp._autograd.carries_tangent`): both engines
    reduce the kernel matrix under ``no_grad`` or in a ``torch.autograd.Function`` with a backward pass only, and such
    a tensor may report ``requires_grad=False``, so with frozen hyperparameters the stationary engine ran without a
    graph and returned a forward-mode derivative of 0 with respect to ``x``. A few flag reads per tensor, no host
    synchronisation. Tensors the kernel reads that are neither (a plain attribute) are caught where the engines
    start."""
    if carries_tangent(x):
        raise _forward_mode_error(name)
    for label, t in itertools.chain(kernel.named_parameters(), kernel.named_buffers()):
        if t.is_floating_point() and carries_tangent(t):
            raise _forward_mode_error(f"the kernel's {label}")


def optional_flag(value: Any, name: str, meaning: str) -> bool | None:
    """``value`` as ``True``, ``False`` or ``None`` (a Python or NumPy bool, or None); anything else a ``TypeError``
    naming ``name``: ``bool("False")`` and ``bool("no")`` are ``True`` and ``0 is not False``, so a string from a
    configuration file or an integer silently picked the other setting."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be {meaning}, got {value!r}.")


def check_input_device(kernel: Kernel, x: Tensor, name: str) -> None:
    """``ValueError`` naming ``name`` where ``x`` is on the meta device (it has no values to take block means of) or
    on another device than the kernel's parameters (torch's own error names neither, from deep in the engines)."""
    if x.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device: it has shapes but no values, and block means are sums of kernel values. "
            f"Pass {name} on a device with data ({name}.to('cpu') or a CUDA device)."
        )
    held = next((t for t in itertools.chain(kernel.parameters(), kernel.buffers()) if t.is_floating_point()), None)
    if held is not None and held.device != x.device:
        raise ValueError(
            f"{name} is on {x.device} but the kernel's parameters are on {held.device}; move one to the other's "
            f"device (kernel.to({name}.device), or {name}.to(...)) before taking block means."
        )


def check_active_dims(kernel: Kernel, width: int, name: str) -> None:
    """``ValueError`` naming ``name`` where the ``active_dims`` of ``kernel``, or of a kernel inside it that sees all
    ``width`` columns of ``x`` (no kernel around it has ``active_dims``), select a column ``x`` does not have (torch's
    own error reads "INDICES element is out of DATA bounds"). Kernels inside one with ``active_dims`` are not
    looked at: whether they select again depends on how it calls them (``ScaleKernel`` takes its base kernel's
    ``active_dims`` as its own and calls the base kernel's ``forward``)."""

    def walk(module: torch.nn.Module, path: str) -> None:
        if isinstance(module, Kernel) and module.active_dims is not None:
            dims = module.active_dims
            if dims.numel() and (int(dims.max()) >= width or int(dims.min()) < 0):  # index_select takes no negatives
                raise ValueError(
                    f"{path} has active_dims = {dims.tolist()}, but {name} has {width} column"
                    f"{'s' if width != 1 else ''}. Give active_dims within 0..{width - 1}, or pass {name} with the "
                    "columns they name."
                )
            return
        for child_name, child in module.named_children():
            walk(child, f"{path}.{child_name}")

    walk(kernel, "kernel")


#: GPyTorch kernels that read their inputs only through the kernels inside them (their ``forward`` hands ``x1`` and
#: ``x2`` on): the columns they read are those of their parts
_COMBINATORS = (ScaleKernel, AdditiveKernel, ProductKernel)


def _kernels_inside(module: torch.nn.Module):
    """The kernels directly inside ``module``: its child kernels, and those inside its other children (a sum's
    ``ModuleList``), not the kernels inside those kernels."""
    for child in module.children():
        if isinstance(child, Kernel):
            yield child
        else:
            yield from _kernels_inside(child)


def _columns_read(kernel: Kernel) -> set[int] | None:
    """The columns of ``x`` that ``kernel`` reads, or ``None`` for all of them: its ``active_dims``; for a
    ``ScaleKernel``, a sum or a product of kernels without them, the union of its parts' (a part without
    ``active_dims`` reads all). Any other kernel without ``active_dims`` reads all columns."""
    if kernel.active_dims is not None:
        return {int(c) for c in kernel.active_dims.tolist()}
    if not isinstance(kernel, _COMBINATORS):
        return None
    direct = list(_kernels_inside(kernel))
    read: set[int] = set()
    for part in direct:
        columns = _columns_read(part)
        if columns is None:
            return None
        read |= columns
    return read if direct else None


def check_finite_inputs(kernel: Kernel, x: Tensor, name: str) -> None:
    """``ValueError`` naming ``name`` (and the first bad entry) when the columns of ``x`` that ``kernel`` reads (its
    ``active_dims``, else all) hold NaN or inf, with :class:`bma_gp.settings.validate` on: one host read, O(n d).
    With validation off nothing is read back and such inputs give NaN block means, as before: a block's means take
    all its points, and the inputs of a translation-invariant kernel are centred over all points, so one bad value
    made every entry of ``lam`` and ``B`` NaN, and the model failed only later, without naming the input."""
    if not settings.validate.on() or x.device.type == "meta" or not x.numel():
        return
    check_active_dims(kernel, x.shape[-1], name)  # before they index x: a column beyond x's is named as such
    read = _columns_read(kernel)
    if read is not None:
        columns = torch.tensor(sorted(read), dtype=torch.long, device=x.device)
        seen = x.detach().index_select(-1, columns)
    else:
        columns, seen = None, x.detach()
    bad = ~torch.isfinite(seen)
    if not bool(bad.any()):
        return
    at = bad.nonzero()[0].tolist()
    value = seen[tuple(at)].item()
    if columns is not None:
        at[-1] = int(columns[at[-1]])
    where = ", ".join(str(i) for i in at)
    raise ValueError(
        f"{name} contains NaN or infinite values ({name}[{where}] = {value}); remove or impute them first: the "
        "block means average over all points of a block (and the inputs of a translation-invariant kernel are "
        "centred over all points), so one such value makes the block mean approximation NaN."
    )


def chunk_rows(chunk_size: Any) -> int | None:
    """``chunk_size`` as a Python int (any integer: a NumPy one, a one-element integer tensor), or None; else
    ``ValueError``. A bool or a float is refused."""
    return positive_int_or_none(chunk_size, "chunk_size must be a positive int (rows per chunk) or None")


def check_single_output(kernel: Kernel, x: Tensor) -> None:
    """``ValueError`` unless ``kernel`` gives one output per input (``kernel(x, x)`` is ``n x n``)."""
    outputs = kernel.num_outputs_per_input(x, x)
    if outputs != 1:
        raise ValueError(
            f"{type(kernel).__name__} gives {outputs} outputs per input (a multitask or derivative kernel), so its "
            "matrix on n inputs is not n x n and has no block mean over a partition of the inputs. Approximate the "
            "kernel over the inputs instead, e.g. MultitaskKernel(BlockMeanKernel(RBFKernel(), x, partition), "
            "num_tasks=t)."
        )


def _rank_and_world(process_group: Any) -> tuple[int, int]:
    if process_group is None:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first (or pass process_group=None)."
        )
    non_member = getattr(dist.GroupMember, "NON_GROUP_MEMBER", object())  # new_group's value on the other ranks
    if not isinstance(process_group, dist.ProcessGroup) and process_group is not non_member:
        raise TypeError(
            "process_group must be a torch.distributed process group (torch.distributed.group.WORLD, or one from "
            f"torch.distributed.new_group(ranks)), got {process_group!r}."
        )
    if process_group is non_member:
        rank, world = -1, 0
    else:
        group = cast(dist.ProcessGroup, process_group)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of process_group: its share of the rows "
            "would be empty and the sums all-reduced among the other ranks without it. Call kernel_block_mean with "
            "a process group only on its members (torch.distributed.new_group(ranks) is called on every rank, the "
            "kernel block mean only on the ranks in ranks), or pass process_group=None here."
        )
    return rank, world


#: what :func:`_check_ranks_agree` compares across the ranks, one name per value, in order (the batch is two values:
#: its number of entries and of dimensions)
_RANK_SIGNATURE = (
    "n",
    "the number of blocks k",
    "the block sizes",
    "the input dimension d",
    "the engine",
    "the batch shape",
    "the batch shape",
    "the dtype",
    "chunk_size",
)

#: the errors of a rank's own argument checks that :func:`_share_refusal` reports to the other ranks (the code each
#: is sent as is its place here, plus one; 0: the arguments were taken)
_ARGUMENT_ERRORS = (ValueError, TypeError, NotImplementedError)


def _gather_flags(process_group: Any, refused: int, values: list[int], device: torch.device) -> list[Tensor]:
    """Every rank's ``[refused, *values]``, in group rank order (one all-gather; ``values`` padded to the length of
    :data:`_RANK_SIGNATURE` with zeros, as a rank that refused its arguments has none)."""
    import torch.distributed as dist

    row = [refused, *values] + [0] * (len(_RANK_SIGNATURE) - len(values))
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, mine, group=process_group)
    return gathered


def _share_refusal(process_group: Any, error: BaseException, x: Any) -> None:
    """Take part in :func:`_check_ranks_agree`'s all-gather for a rank whose own arguments were refused with
    ``error`` (which its caller then raises), so that the other ranks raise a ``ValueError`` naming it instead of
    waiting for it in the gather until the backend's timeout (30 minutes by default). Nothing is gathered where the
    process group itself is refused (this rank cannot take part): the caller raises ``error`` alone."""
    try:
        _rank_and_world(process_group)
    except (ValueError, TypeError):
        return
    import torch.distributed as dist

    if torch.is_tensor(x) and x.device.type != "meta":
        device = x.device
    elif str(dist.get_backend(process_group)) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    code = next(i for i, kind in enumerate(_ARGUMENT_ERRORS) if isinstance(error, kind)) + 1
    _gather_flags(process_group, code, [], device)


def _check_ranks_agree(process_group: Any, values: list[int], device: torch.device) -> None:
    """``ValueError`` on every rank when the ranks of ``process_group`` called :func:`kernel_block_mean` on problems
    of different shapes (the values :data:`_RANK_SIGNATURE` names): one small all-gather before the sums' collectives,
    which would otherwise abort the processes (gloo: received data of another size), hang (one rank waiting in the
    other engine's collective) or silently add sums of different problems (another n, the same k). Different values
    of ``x``, of the labels within equal block sizes or of the kernel's parameters are not detected. A rank that
    refused its own arguments sends a flag instead (:func:`_share_refusal`): the others then raise a ``ValueError``
    that names it."""
    gathered = _gather_flags(process_group, 0, values, device)
    refused = [(rank, int(theirs[0])) for rank, theirs in enumerate(gathered) if int(theirs[0]) != 0]
    if refused:
        ranks = ", ".join(str(rank) for rank, _ in refused)
        kinds = sorted({_ARGUMENT_ERRORS[code - 1].__name__ for _, code in refused if code <= len(_ARGUMENT_ERRORS)})
        raise ValueError(
            f"kernel_block_mean with a process group: the arguments of rank{'s' if len(refused) > 1 else ''} {ranks} "
            f"of the group were refused there ({' or '.join(kinds) or 'an error'} raised on "
            f"{'those ranks' if len(refused) > 1 else 'that rank'}: see its message); every rank must pass valid "
            "and identical x, partition, kernel and options. Nothing was summed."
        )
    for rank, theirs in enumerate(gathered):
        differ = (theirs[1:] != gathered[0][1:]).nonzero().flatten().tolist()
        if differ:
            what = ", ".join(dict.fromkeys(_RANK_SIGNATURE[i] for i in differ))
            raise ValueError(
                f"kernel_block_mean with a process group: the ranks disagree on {what} (rank 0 and rank {rank} of "
                "the group); every rank must pass the same x, partition, kernel and options, and each evaluates "
                "its own share of the rows. Nothing was summed."
            )


def _values_batch_shape(kernel: Kernel, x: Tensor) -> torch.Size:
    """The batch shape of ``kernel(x, x)``: the inputs' batch broadcast with the kernel's ``batch_shape``.

    A batch kernel on unbatched inputs evaluates one matrix per batch entry, so chunk sizes and the
    progress default must count both.
    """
    try:
        return torch.broadcast_shapes(x.shape[:-2], kernel.batch_shape)
    except RuntimeError:
        raise ValueError(
            f"x has batch shape {tuple(x.shape[:-2])} and the kernel has batch_shape {tuple(kernel.batch_shape)}, "
            "which do not broadcast; give x a batch shape that broadcasts with the kernel's."
        ) from None


def _stationary_form(kernel: Kernel, x: Tensor, fused: bool | None) -> StationaryForm | None:
    """The form the stationary engine uses, ``None`` for the generic engine; checks ``fused=True``."""
    form = StationaryForm.match(kernel) if fused is not False else None
    if form is None:
        if fused:
            raise ValueError(
                f"fused=True, but {type(kernel).__name__} is not an RBF or Matern (nu 0.5, 1.5, 2.5) "
                "kernel, optionally in a ScaleKernel; use fused=None."
            )
        return None
    num_lengthscales = form.base.lengthscale.shape[-1]
    usable = not (torch.is_grad_enabled() and x.requires_grad) and (
        num_lengthscales == 1 or num_lengthscales == form.select_dims(x).shape[-1]
    )
    if not usable:
        if fused:
            raise ValueError(
                "fused=True, but the stationary engine needs x without gradient and ARD lengthscales "
                "matching the input columns; use fused=None."
            )
        return None
    return form


def kernel_block_mean(
    kernel: Kernel,
    x: Tensor,
    partition: Partition,
    chunk_size: int | None = None,
    *,
    process_group: Any = None,
    progress: bool | None = None,
    fused: bool | None = None,
) -> BlockMeanLinearOperator:
    r"""The optimal block mean approximation of the kernel matrix ``kernel(x, x)``, in O(n * chunk) memory.

    With :math:`T = P^\top K P` and :math:`d = P^\top \operatorname{diag}(K)` for
    :math:`K = k(X, X)`, the result is (see ``docs/math.md``)

    .. math::
        B_{ij} = \frac{T_{ij}}{s_i s_j}\ (i \ne j), \qquad
        B_{ii} = \frac{T_{ii} - d_i}{s_i (s_i - 1)}, \qquad
        \lambda_i = \frac{d_i}{s_i} - B_{ii},

    the covariance of the block-exchangeable process. The kernel is evaluated in tiles or
    row chunks that are reduced into :math:`T` and :math:`d` at once; the result is
    differentiable in the kernel's hyperparameters (and in ``x``), with backward also in
    :math:`O(n \cdot \text{chunk})` memory (see the module docstring for the two engines).

    Args:
        kernel: any gpytorch kernel; batch kernels give a batch of operators.
        x: inputs. # shape: (n, d), (*batch, n, d) or (n,)
        partition: partition of the ``n`` inputs.
        chunk_size: rows per chunk (generic engine; default about 64 MB of kernel values
            per chunk, with the float64 copy a float32 chunk is summed in, divided by the numbers
            per entry of the kernel's largest intermediate tensor: ``d`` for a ``PeriodicKernel``,
            ``Q d`` for a ``SpectralMixtureKernel``) or per tile (stationary engine; default 512 on
            CPU, 4096 on CUDA).
        process_group: a ``torch.distributed`` process group; each rank evaluates its
            share of the rows and the sums are all-reduced (module docstring). ``None``:
            single process.
        progress: show a tqdm progress bar; ``None`` shows one when there are more than
            :math:`10^9` entries (on rank 0 only). A bool (Python or NumPy) or ``None``.
        fused: force (``True``) or forbid (``False``) the stationary engine; ``None``
            uses it whenever it applies. Forcing it on a kernel it does not support is a
            ``ValueError``; anything but a bool (Python or NumPy) or ``None`` a ``TypeError``
            (``bool("False")`` is ``True``).

    Returns:
        BlockMeanLinearOperator over ``partition``. # shape: (*batch, n, n)

    Raises:
        TypeError: ``kernel`` is not a gpytorch kernel, ``x`` not a tensor, ``partition``
            not a :class:`~bma_gp.Partition`, ``fused`` or ``progress`` not ``True``, ``False`` or ``None``.
        ValueError: wrong shapes (no rows or no columns), ``x`` holding NaN or inf in the columns the kernel
            reads (with :class:`bma_gp.settings.validate` on), a bad ``chunk_size``, a process group without an
            initialised ``torch.distributed``, ``fused=True`` on an unsupported kernel, batch
            shapes of ``x`` and the kernel that do not broadcast, or (generic engine, with
            gradients on) a kernel whose values depend on a tensor needing a gradient that is
            not one of its parameters (its gradient would be lost), a kernel containing an
            ``InducingPointKernel`` in training mode, or one with several outputs per input
            (multitask, derivative kernels).
        NotImplementedError: ``x``, a kernel parameter or a tensor the kernel's values depend on carries a
            forward-mode tangent (a dual tensor of ``torch.autograd.forward_ad``, ``torch.func.jvp``, ``jacfwd``,
            ``hessian``) or a ``torch.func`` transform's derivative (``grad``, ``jacrev``): the engines are reverse
            mode only (their derivatives come in a backward pass), so such a derivative would be lost.

    Example:
        >>> from gpytorch.kernels import RBFKernel, ScaleKernel
        >>> x = torch.randn(1000, 2)
        >>> op = kernel_block_mean(ScaleKernel(RBFKernel()), x, Partition.from_labels(torch.arange(1000) % 10))
        >>> op.shape
        torch.Size([1000, 1000])
    """
    return block_mean_of_kernel(
        kernel, x, partition, chunk_size, process_group=process_group, progress=progress, fused=fused
    )


def block_mean_of_kernel(
    kernel: Kernel,
    x: Tensor,
    partition: Partition,
    chunk_size: int | None = None,
    *,
    process_group: Any = None,
    progress: bool | None = None,
    fused: bool | None = None,
    x_name: str = "x",
) -> BlockMeanLinearOperator:
    """:func:`kernel_block_mean`, its errors about the inputs naming them ``x_name`` (``BlockMeanKernel``'s
    ``train_x``)."""
    try:
        fused = optional_flag(
            fused, "fused", "True (force the stationary engine), False (forbid it) or None (use it where it applies)"
        )
        progress = optional_flag(
            progress, "progress", "True (show a progress bar), False (none) or None (one above 10^9 entries)"
        )
        x = _check_inputs(kernel, x, partition, chunk_size, x_name)
        chunk_size = chunk_rows(chunk_size)
        partition = partition.to(x.device)

        # evaluate in the order of sorted labels: every block becomes a contiguous run of rows and columns
        if partition.is_contiguous:
            xs, labels = x, partition.labels
        else:
            order = torch.argsort(partition.labels, stable=True)
            xs, labels = x.index_select(-2, order), partition.labels[order]

        form = _stationary_form(kernel, xs, fused)
        batch = _values_batch_shape(kernel, x)
    except _ARGUMENT_ERRORS as error:
        if process_group is not None:  # the other ranks learn of it in the agreement all-gather, and raise too
            _share_refusal(process_group, error, x)
        raise
    rank, world = _rank_and_world(process_group)
    n = x.shape[-2]
    sizes = partition.sizes
    batch_numel = math.prod(batch)
    if process_group is not None:
        dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        _check_ranks_agree(
            process_group,
            [
                n,
                partition.num_blocks,
                hash(partition) & (2**62 - 1),
                x.shape[-1],
                int(form is not None),
                batch_numel,
                len(batch),
                dtypes.index(x.dtype) if x.dtype in dtypes else -1,
                chunk_size or 0,
            ],
            x.device,
        )
    if batch_numel == 0:  # an empty batch has nothing to sum (and the engines size chunks and tiles per entry)
        with torch.no_grad():
            dtype = evaluate(kernel, xs[..., :1, :], xs[..., :1, :]).dtype
        k = partition.num_blocks
        lam = torch.zeros(*batch, k, dtype=dtype, device=x.device)
        return BlockMeanLinearOperator(lam, lam.new_zeros(*batch, k, k), partition)
    show = (bool(progress) if progress is not None else batch_numel * n * n >= _PROGRESS_ENTRIES) and rank == 0
    rows = (rank * n // world, (rank + 1) * n // world)

    # the engines return the sums in core_dtype (float64 for float32): lam = d / s - B_ii cancels where a block's
    # values are nearly equal (a long lengthscale), so the means are taken there and rounded to the kernel's dtype
    if form is not None:
        plan = KernelSumsPlan(form.select_dims(xs).detach(), sizes, labels, rows, chunk_size, process_group, show)
        dtype = torch.promote_types(xs.dtype, form.base.lengthscale.dtype)
        if form.scale is not None:
            dtype = torch.promote_types(dtype, form.scale.outputscale.dtype)
        return BlockMeanLinearOperator(*stationary_block_means(plan, form, dtype), partition)
    else:
        # a chunk's values and, for a narrower dtype, their float64 copy that is summed (within the budget)
        wide = core_dtype(x.dtype)
        entry_bytes = x.element_size() + (0 if wide == x.dtype else wide.itemsize)
        per_row = batch_numel * n * entry_bytes * entry_factor(kernel, xs.shape[-1])
        chunk = chunk_size or max(1, _CHUNK_BYTES // per_row)
        xs = centred_inputs(kernel, xs)
        plan = KernelSumsPlan(xs, sizes, labels, rows, chunk, process_group, show)
        params = kernel_parameters(kernel)
        if torch.is_grad_enabled():
            check_parameters(kernel, xs, params)
        with torch.no_grad():  # (forward mode is not switched off by no_grad: the probe shows a tangent)
            probe = evaluate(kernel, xs[..., :1, :], xs[..., :1, :])
        if carries_tangent(probe):  # a tangent of a tensor the kernel reads that is not one of its parameters
            raise _forward_mode_error("a tensor the kernel's values depend on")
        dtype = probe.dtype
        block_sums, diag_sums = GenericKernelSums.apply(plan, kernel, xs, *params)
    result = block_mean_from_sums(block_sums, diag_sums, partition)
    if result.dtype != dtype:
        return BlockMeanLinearOperator(result.lam.to(dtype), result.B.to(dtype), partition)
    return result
