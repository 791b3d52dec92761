"""The flat layout of an optimizer's parameters: one d-vector for all of them.

The optimizers in this package precondition the concatenation of every gradient
(all parameter groups, in ``param_groups`` order) with one matrix, so they work on
flat buffers: the gradients are gathered into a single vector once per step, the
update is computed on that vector, and it is written back through per-parameter
views. :class:`FlatParams` records where each parameter lives in the vector.
"""

from __future__ import annotations

from functools import reduce

import torch
from torch import Tensor

__all__ = ["FlatParams", "SparseGradientError", "check_params", "state_dtype"]


class SparseGradientError(ValueError, RuntimeError):
    """A parameter has a sparse gradient, which these optimizers do not support.

    Subclasses both ``ValueError`` (bad input) and ``RuntimeError`` (what
    ``torch.optim.Adam`` raises for the same situation).
    """


def state_dtype(dtypes) -> torch.dtype:
    """Floating dtype of flat and global state: the promotion of ``dtypes`` and float32.

    Low-precision parameters (float16, bfloat16) get float32 statistics; float64
    parameters get float64 statistics.
    """
    return reduce(torch.promote_types, dtypes, torch.float32)


def check_params(params: list[Tensor]) -> None:
    """Raise ``ValueError`` unless the flat preconditioner can step ``params``: real floating-point tensors with data
    (not on the ``meta`` device) whose entries do not share memory, all on one device.

    The optimizers run it when a param group is added (so an unusable parameter is refused before it joins the
    optimizer) and when they build a layout (parameters may have moved since).
    """
    devices = set()
    for p in params:
        if p.is_complex():  # `.float()` would drop the imaginary part
            raise ValueError(
                f"can only optimize real floating-point parameters, got one of dtype {p.dtype} (shape "
                f"{tuple(p.shape)}); keep it as a real parameter of shape (..., 2), `torch.view_as_real(p)`, and view "
                "it as complex in the forward with `torch.view_as_complex`, or leave it out of the optimizer."
            )
        if not p.is_floating_point():
            raise ValueError(
                f"can only optimize real floating-point parameters, got one of dtype {p.dtype}; "
                "convert it with `.float()` or leave it out of the optimizer."
            )
        if p.is_meta:
            raise ValueError(
                f"cannot optimize a parameter on the meta device (shape {tuple(p.shape)}): it holds no data for the "
                "optimizer's statistics. Materialize the model first (e.g. `model.to_empty(device=...)` and load its "
                "weights), then build the optimizer from its parameters."
            )
        if torch._debug_has_internal_overlap(p) == 1:  # 1: overlap for certain (a stride of 0 over several entries)
            raise ValueError(
                f"cannot optimize a parameter whose entries share memory (shape {tuple(p.shape)}, strides "
                f"{tuple(p.stride())}, e.g. made with `.expand`): an in-place update would write one location several "
                "times (torch raised this midway through a step, after the optimizer's state had changed). Make it "
                "its own storage, `torch.nn.Parameter(p.detach().clone())`, before building the optimizer."
            )
        devices.add(p.device)
    if len(devices) > 1:
        raise ValueError(
            f"all parameters must be on one device for the flat preconditioner, found {sorted(map(str, devices))}; "
            "move the model to one device (or use one optimizer per device)."
        )


_IS_CONTIGUOUS = Tensor.is_contiguous


def materialised_grad(grad: Tensor) -> Tensor:
    """``grad`` itself, or a materialised copy where the step's kernels would mishandle it:

    * torch's lazy negation (``x.conj().imag``, ``torch._neg_view``): its values are right, but torch's fused kernels
      and ``.numpy()`` refuse it (the CPU step's ratio form raised from ``torch._fused_adagrad_``, ``fused=True``
      from numba's ``.numpy()``); ``torch.optim.Adagrad`` accepts it. ``resolve_neg()`` is free where the bit is
      not set.
    * a zero stride along a dimension of more than one entry (a hand-assigned ``g.expand(p.shape)``; autograd's
      accumulated gradients never have one): torch's float32 dot product over such a vector accumulates with less
      precision (4.4e-6 against 1e-7 relative, a user trial), which a block whose step nearly cancels amplified to
      a step 92% off the float64 reference (2.7% for the same gradient made contiguous).
    """
    if grad.is_neg():
        grad = grad.resolve_neg()
    if not grad.is_contiguous() and any(stride == 0 and size > 1 for stride, size in zip(grad.stride(), grad.shape)):
        grad = grad.contiguous()
    return grad


class FlatParams:
    """Where each parameter of an optimizer sits in the flat d-vector.

    Args:
        param_groups: the optimizer's ``param_groups``; parameters are laid out in
            group order, then in the order of each group's ``params``.

    Attributes:
        params: the parameters, flattened over groups.
        group_index: for each parameter, the index of its group.
        numels: number of entries of each parameter.
        offsets: start of each parameter in the flat vector (length ``len(params) + 1``).
        numel: ``d``, the total number of entries.
        device: the common device of all parameters.
        dtype: dtype of the flat state (see :func:`state_dtype`).
        param_dtypes: the parameters' dtypes when the layout was built (or last checked, see
            :meth:`dtype_changed`).
        shapes: the parameters' shapes when the layout was built (see :meth:`shape_change`).

    Raises:
        ValueError: parameters on several devices, or a parameter that is not a
            real floating-point tensor with data (see :func:`check_params`).
    """

    def __init__(self, param_groups: list[dict]):
        params: list[Tensor] = []
        group_index: list[int] = []
        for gi, group in enumerate(param_groups):
            for p in group["params"]:
                params.append(p)
                group_index.append(gi)
        check_params(params)
        self.params = params
        self.group_index = group_index
        self.numels = [p.numel() for p in params]
        offsets = [0]
        for m in self.numels:
            offsets.append(offsets[-1] + m)
        self.offsets = offsets
        self.numel = offsets[-1]
        self.device = params[0].device if params else torch.device("cpu")
        self.param_dtypes = tuple([p.dtype for p in params])
        self.shapes = [p.shape for p in params]
        self.dtype = state_dtype(self.param_dtypes)
        self.key = self.key_of(param_groups)
        self._buffers: dict[str, Tensor] = {}

    @staticmethod
    def key_of(param_groups: list[dict]) -> tuple:
        """Identity of a layout: the parameter objects in order, how many each group holds (a parameter moved to
        another group between steps takes that group's settings, as with torch.optim, so :attr:`group_index` must
        follow) and their device (that of the first parameter, in whichever group it is: a first group may be
        empty)."""
        ids = tuple(id(p) for group in param_groups for p in group["params"])
        sizes = tuple(len(group["params"]) for group in param_groups)
        if param_groups and param_groups[0]["params"]:
            return ids, sizes, param_groups[0]["params"][0].device
        first = next((p for group in param_groups for p in group["params"]), None)
        return ids, sizes, None if first is None else first.device

    def dtype_changed(self) -> bool:
        """Whether the parameters' dtypes now call for state of another dtype than :attr:`dtype` (``model.double()``
        after the layout was built: :func:`state_dtype` of the new dtypes). A change that keeps the state's dtype
        (``model.half()`` from float32: float32 statistics either way) is only recorded in :attr:`param_dtypes`.
        One attribute read per parameter."""
        dtypes = tuple([p.dtype for p in self.params])
        if dtypes == self.param_dtypes:
            return False
        if state_dtype(dtypes) != self.dtype:
            return True
        self.param_dtypes = dtypes
        return False

    def shape_change(self) -> tuple[int, torch.Size, torch.Size] | None:
        """The first parameter whose shape is no longer the one this layout was built for (``p.data = ...`` of
        another shape between steps), as ``(index, built, now)``, or ``None``. One attribute read per parameter."""
        if [p.shape for p in self.params] == self.shapes:
            return None
        return next((i, a, p.shape) for i, (p, a) in enumerate(zip(self.params, self.shapes)) if p.shape != a)

    def overlapping(self) -> tuple[int, Tensor] | None:
        """The first parameter whose entries share memory (``p.data = t.expand(...)`` after the layout was built), as
        ``(index, parameter)``, or ``None``: the step's in-place update would fail half-way on it. Contiguous
        parameters (the usual case) cannot overlap and are passed in one C-level pass (about 1 us for 20)."""
        if all(map(_IS_CONTIGUOUS, self.params)):
            return None
        return next(((i, p) for i, p in enumerate(self.params) if torch._debug_has_internal_overlap(p) == 1), None)

    def extends(self, other: FlatParams) -> bool:
        """Whether ``other``'s parameters are a prefix of this layout's (``add_param_group``)."""
        n = len(other.params)
        return n <= len(self.params) and all(a is b for a, b in zip(self.params[:n], other.params))

    def split(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat`` shaped like the parameters."""
        return [chunk.view(p.shape) for chunk, p in zip(flat.split(self.numels), self.params)]

    def buffer(self, name: str, rows: int | None = None, numel: int | None = None) -> Tensor:
        """A persistent work vector of length ``numel`` (default ``d``; dtype :attr:`dtype`), reused every step.

        With ``rows``, a ``(rows, numel)`` matrix instead: several work vectors stacked, so
        that one strided view covers them together.
        """
        buffers = self._buffers
        numel = self.numel if numel is None else numel
        shape = (numel,) if rows is None else (rows, numel)
        if name not in buffers or buffers[name].shape != shape:
            buffers[name] = torch.empty(shape, dtype=self.dtype, device=self.device)
        return buffers[name]

    def collect_grads(self) -> tuple[list[Tensor | None], list[bool]]:
        """The parameters' gradients as they are (``None`` where a parameter has none), with a negative bit resolved
        and zero strides materialised (:func:`materialised_grad`).

        Returns:
            ``(grads, active)``: per parameter, its gradient and whether it has one.

        Raises:
            SparseGradientError: a gradient is sparse.
        """
        grads = [p.grad for p in self.params]
        for i, (p, grad) in enumerate(zip(self.params, grads)):
            if grad is None:
                continue
            if grad.is_sparse or grad.layout != torch.strided:
                raise SparseGradientError(
                    f"sparse gradients are not supported (parameter of shape {tuple(p.shape)} has a "
                    f"{grad.layout} gradient); use dense gradients, e.g. nn.Embedding(..., sparse=False)."
                )
            grads[i] = materialised_grad(grad)
        return grads, [grad is not None for grad in grads]

    def gather_grads(self, grads: list[Tensor | None], maximize_of_group: list[bool]) -> Tensor:
        """Concatenate ``grads`` into one vector of dtype :attr:`dtype` (a reused buffer).

        Missing gradients contribute zeros; gradients of parameters in a group with
        ``maximize=True`` are negated. # shape: (d,)
        """
        parts: list[Tensor] = []
        for p, gi, grad in zip(self.params, self.group_index, grads):
            if grad is None:
                parts.append(torch.zeros(p.numel(), dtype=self.dtype, device=self.device))
                continue
            flat = grad.reshape(-1)
            parts.append(-flat if maximize_of_group[gi] else flat)
        if any(part.dtype != self.dtype for part in parts):
            parts = [part.to(self.dtype) for part in parts]
        return torch.cat(parts, out=self.buffer("grad"))
