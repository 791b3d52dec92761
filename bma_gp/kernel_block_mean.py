r"""Block sums of a kernel matrix on data, without ever holding the ``n x n`` matrix.

:func:`kernel_block_mean` returns the optimal block mean approximation (SPEC section 2)
of :math:`K = k(X, X)`. It needs only

.. math::
    T = P^\top K P \quad (k \times k), \qquad d = P^\top \operatorname{diag}(K) \quad (k),

so rows of :math:`K` are evaluated a chunk at a time and reduced into :math:`T` and
:math:`d` at once. Two implementations share that plan:

* the **generic path** works for any gpytorch kernel. A custom autograd function
  evaluates the chunks under ``no_grad`` in forward and re-evaluates each chunk in
  backward, pulling the incoming gradient on :math:`(T, d)` back through it, so memory
  is :math:`O(n \cdot \text{chunk})` in both passes (like activation checkpointing, but
  one chunk at a time);
* the **fused stationary path** for ``RBFKernel`` and ``MaternKernel`` (:math:`\nu \in
  \{1/2, 3/2, 5/2\}`), optionally inside a ``ScaleKernel``, with one or ARD
  lengthscales: the same pass that reduces the kernel values also reduces their
  derivatives with respect to the lengthscales into block sums, so backward is a
  contraction of two ``k x k`` arrays and forward + backward is one pass over the
  entries. The kernel is symmetric, so only the tiles on and right of the diagonal are
  evaluated (half the entries); each tile is a few MB, so the passes over it stay in
  cache: one GEMM for the distances, one elementwise pass, one GEMM against the
  column features :math:`[1, z_j, z_j^2]` placed in the slot of their block, and a
  small GEMM adding the rows of each block (``_stationary_pass``). Used
  automatically whenever the kernel matches and ``x`` does not require a gradient;
  without a gradient to compute (prediction, ``torch.no_grad``) it reduces the
  values only.

The generic path evaluates the rows in the order of the sorted block labels, so every
block is a contiguous run of columns and reductions are segment sums; the fused path
works in that order too.

**Distributed.** With ``process_group`` every rank evaluates its own share of the rows
(generic path) or of the tiles (fused path); all ranks must pass the same ``x``,
partition and kernel parameters, and the block
sums are all-reduced in forward, so every rank returns the same operator. In backward
the generic path differentiates its own rows and all-reduces (sums) the hyperparameter
and input gradients inside the autograd function; the fused path all-reduced the
derivative block sums in forward and needs no communication in backward. Either way
every rank ends with the full gradient of its (identical) loss: do not sum the
gradients again. Wrapping the model in ``DistributedDataParallel`` is harmless, since
averaging identical gradients leaves them unchanged. Every rank must call backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from gpytorch import settings as gpt_settings
from gpytorch.kernels import Kernel, MaternKernel, RBFKernel, ScaleKernel
from linear_operator import to_dense
from torch import Tensor
from torch.autograd.function import once_differentiable

from bma_gp._broadcast import sum_to_shape
from bma_gp.approximation import block_mean_from_sums
from bma_gp.block_mean_linear_operator import BlockMeanLinearOperator
from bma_gp.partition import Partition

__all__ = ["kernel_block_mean"]

#: Target size of one ``chunk x n`` matrix of kernel values (bytes).
_CHUNK_BYTES = 64 * 2**20
#: Number of kernel entries above which a progress bar is shown by default.
_PROGRESS_ENTRIES = 10**9
#: Largest size of the derivative block sums the fused path keeps (bytes); beyond it, generic path.
_FUSED_STATE_BYTES = 512 * 2**20


# ============================================================================ shared helpers
def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Block sums of many chunks are accumulated in double precision when the kernel is single precision."""
    return torch.float64 if dtype in (torch.float16, torch.bfloat16, torch.float32) else dtype


def _segment_sum(values: Tensor, lengths: Tensor) -> Tensor:
    """Sum the last dimension of ``values`` over consecutive runs of the given lengths.

    The leading dimensions are flattened first: ``segment_reduce`` is many times slower with
    lengths of three or more dimensions than with a (stride-0) two-dimensional one.
    """
    lead = values.shape[:-1]
    flat = values.reshape(-1, values.shape[-1])
    out = torch.segment_reduce(flat, "sum", lengths=lengths.expand(flat.shape[0], lengths.numel()), axis=1)
    return out.view(*lead, lengths.numel())


def _chunk_ranges(start: int, stop: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(stop, a + chunk)) for a in range(start, stop, chunk)]


def _progress(ranges: list, show: bool, desc: str):
    if not show:
        return ranges
    from tqdm.auto import tqdm

    return tqdm(ranges, desc=desc, unit="chunk", leave=False)


def _all_reduce(tensors: Sequence[Tensor], group) -> list[Tensor]:
    """Sum a list of tensors over the ranks of ``group`` with one collective call."""
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


class _Plan:
    """What both paths need: the sorted layout, this rank's rows, the chunk size, communication."""

    def __init__(self, x: Tensor, sizes: Tensor, labels: Tensor, rows: tuple[int, int], chunk: int,
                 group, show_progress: bool):
        self.x = x  # (*batch, n, d), rows ordered by block
        self.sizes = sizes  # (k,)
        self.labels = labels  # (n,) sorted
        self.rows = rows
        self.chunk = chunk
        self.group = group
        self.show_progress = show_progress

    @property
    def num_blocks(self) -> int:
        return self.sizes.numel()

    def ranges(self) -> list[tuple[int, int]]:
        return _chunk_ranges(*self.rows, self.chunk)


# ============================================================================ generic path
def _evaluate(kernel: Kernel, x1: Tensor, x2: Tensor) -> Tensor:
    with gpt_settings.lazily_evaluate_kernels(False):
        return to_dense(kernel(x1, x2))


class _GenericKernelSums(torch.autograd.Function):
    """``(T, d)`` of ``kernel(x, x)`` by row chunks; backward re-evaluates each chunk."""

    @staticmethod
    def forward(ctx, plan: _Plan, kernel: Kernel, x: Tensor, *params: Tensor):
        k = plan.num_blocks
        sums = diag = None
        with torch.no_grad():
            for a, b in _progress(plan.ranges(), plan.show_progress, "kernel block sums"):
                values = _evaluate(kernel, x[..., a:b, :], x)  # (*batch, c, n)
                if sums is None:
                    probe_dtype = values.dtype
                    acc = _accumulation_dtype(values.dtype)
                    sums = values.new_zeros(*values.shape[:-2], k, k, dtype=acc)
                    diag = values.new_zeros(*values.shape[:-2], k, dtype=acc)
                rows = plan.labels[a:b]
                sums.index_add_(sums.dim() - 2, rows, _segment_sum(values, plan.sizes).to(acc))
                diag.index_add_(diag.dim() - 1, rows,
                                torch.diagonal(values, offset=a, dim1=-2, dim2=-1).to(acc))
            if sums is None:  # this rank has no rows: the shapes come from a one-row evaluation
                probe = _evaluate(kernel, x[..., :1, :], x[..., :1, :])
                probe_dtype = probe.dtype
                acc = _accumulation_dtype(probe.dtype)
                sums = probe.new_zeros(*probe.shape[:-2], k, k, dtype=acc)
                diag = probe.new_zeros(*probe.shape[:-2], k, dtype=acc)
            if plan.group is not None:
                sums, diag = _all_reduce([sums, diag], plan.group)
        dtype = probe_dtype
        ctx.plan, ctx.kernel = plan, kernel
        ctx.save_for_backward(x, *params)
        return sums.to(dtype), diag.to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sums: Tensor, grad_diag: Tensor):
        plan, kernel = ctx.plan, ctx.kernel
        x, *params = ctx.saved_tensors
        need_x = ctx.needs_input_grad[2]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        grads: list[Tensor | None] = [None] * (len(wanted) + int(need_x))
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(need_x)
            inputs = [params[i] for i in wanted] + ([x_in] if need_x else [])
            for a, b in _progress(plan.ranges(), plan.show_progress, "kernel block sums (backward)"):
                values = _evaluate(kernel, x_in[..., a:b, :], x_in)
                rows = plan.labels[a:b]
                # dL/dK for this chunk: the k x k gradient spread over its entries (c x n, never n x n)
                weight = grad_sums.to(values.dtype).index_select(-2, rows).index_select(-1, plan.labels)
                weight = weight.expand_as(values).clone() if weight.shape != values.shape else weight
                torch.diagonal(weight, offset=a, dim1=-2, dim2=-1).add_(
                    grad_diag.to(values.dtype).index_select(-1, rows))
                if not inputs:
                    continue
                pieces = torch.autograd.grad(values, inputs, grad_outputs=weight, allow_unused=True)
                for j, g in enumerate(pieces):
                    if g is not None:
                        grads[j] = g if grads[j] is None else grads[j] + g
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
        if plan.group is not None and grads:
            grads = _all_reduce(grads, plan.group)
        out_params: list[Tensor | None] = [None] * len(params)
        for j, i in enumerate(wanted):
            out_params[i] = grads[j]
        grad_x = grads[-1] if need_x else None
        return (None, None, grad_x, *out_params)


def _kernel_parameters(kernel: Kernel) -> list[Tensor]:
    seen, out = set(), []
    for p in kernel.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# ============================================================================ fused stationary path
class _Stationary:
    """A stationary kernel ``outputscale * f(r)`` the fused path understands."""

    def __init__(self, base: Kernel, scale: ScaleKernel | None, nu: float | None):
        self.base, self.scale, self.nu = base, scale, nu  # nu None: RBF

    @staticmethod
    def match(kernel: Kernel) -> _Stationary | None:
        scale, base = None, kernel
        if type(kernel) is ScaleKernel:
            scale, base = kernel, kernel.base_kernel
        if type(base) is RBFKernel:
            nu = None
        elif type(base) is MaternKernel and float(base.nu) in (0.5, 1.5, 2.5):
            nu = float(base.nu)
        else:
            return None
        if base.lengthscale is None:
            return None
        return _Stationary(base, scale, nu)

    def select_dims(self, x: Tensor) -> Tensor:
        """The columns the kernel sees: only the outermost kernel's ``__call__`` applies ``active_dims``."""
        outer = self.scale if self.scale is not None else self.base
        if outer.active_dims is not None:
            x = x.index_select(-1, outer.active_dims.to(x.device))
        return x

    @property
    def input_scale(self) -> float:
        r"""Factor on :math:`z = x / \ell` that makes the kernel a function of :math:`\rho = \|z' - z''\|`.

        RBF: :math:`e^{-\rho^2}`; Matern: :math:`p_\nu(\rho)\, e^{-\rho}` with :math:`p = 1`,
        :math:`1 + \rho`, :math:`1 + \rho + \rho^2 / 3` for :math:`\nu = 1/2, 3/2, 5/2`.
        """
        return math.sqrt(0.5) if self.nu is None else math.sqrt(2.0 * self.nu)

    def evaluate(self, rho2: Tensor, values: Tensor, weights: Tensor, ard: bool) -> float:
        r"""Fill ``values`` with the kernel and ``weights`` with the derivative weights; return their factor.

        With :math:`g(r^2) = f(r)` the unscaled kernel as a function of the squared distance in
        lengthscale units, :math:`\partial K / \partial \ell_a = -2 g'(r^2) \Delta z_a^2 / \ell_a`.
        The returned ``factor`` and ``weights`` :math:`w` satisfy :math:`g'(r^2)\, r^2 = \text{factor}
        \cdot w` (isotropic) and :math:`g'(r^2) \Delta z_a^2 = \text{factor} \cdot w\, \Delta z'^2_a`
        (ARD, :math:`z'` the scaled inputs). For RBF, ``rho2`` holds :math:`-\rho^2` (the GEMM
        writes it negated) and is used as ``weights``' storage; ARD RBF needs no weights (they
        are the values) and returns them in ``values``.
        """
        if self.nu is None:  # f = exp(-rho2); g'(r2) r2 = -K rho2, g'(r2) dz^2 = -K dz'^2
            torch.exp(rho2, out=values)
            if ard:
                return -1.0
            weights.mul_(values)  # weights is rho2's storage: -K rho2
            return 1.0
        rho = rho2.sqrt()
        torch.neg(rho, out=values).exp_()  # e = exp(-rho)
        if self.nu == 0.5:  # f = e; g' r2 = -e rho / 2; g' dz^2 = -(e / rho) dz'^2 / 2
            if ard:
                torch.where(rho > 0, values / rho.clamp_min(torch.finfo(rho.dtype).tiny), rho.new_zeros(()), out=weights)
            else:
                torch.mul(values, rho, out=weights)
            return -0.5
        if self.nu == 1.5:  # f = (1 + rho) e; g' r2 = -e rho2 / 2; g' dz^2 = -e dz'^2 / 2
            torch.mul(values, rho2, out=weights) if not ard else weights.copy_(values)
            values.mul_(rho.add_(1.0))
            return -0.5
        # nu = 2.5: f = (1 + rho + rho2 / 3) e; g' r2 = -(1 + rho) e rho2 / 6; g' dz^2 = -(1 + rho) e dz'^2 / 6
        poly = rho2.mul(1.0 / 3.0).add_(rho).add_(1.0)
        if ard:
            torch.mul(values, rho.add_(1.0), out=weights)
        else:
            weights.mul_(rho.add_(1.0)).mul_(values)  # weights is rho2's storage
        values.mul_(poly)
        return -1.0 / 6.0


#: Rows of one tile of the fused path (rounded to a multiple of the column slot width).
_TILE_ROWS = 256
#: Columns of one tile of the fused path (a multiple of every slot width).
_TILE_COLS = 2048
#: Tile rows and columns on CUDA: big tiles, so that per-tile Python overhead is negligible.
_TILE_ROWS_CUDA, _TILE_COLS_CUDA = 4096, 65536
#: Candidate widths of the column slot tiles (see :func:`_column_slots`).
_SLOT_WIDTHS = (8, 16, 32, 64, 128, 256)


def _column_slots(labels: Tensor, num_blocks: int, width: int) -> tuple[Tensor, Tensor, int]:
    """Cut the sorted columns into runs of ``width``; the slot of every column in its run and each slot's block.

    A run spans at most ``q`` consecutive blocks. Column ``j`` sits in slot ``local[j]`` of
    its run ``j // width``; slot ``s`` of run ``r`` belongs to block ``target[r, s]``
    (``num_blocks`` for slots past the last block). The columns are padded with copies of
    the last label to a multiple of ``width``.

    Returns:
        (local, target, q) # shapes: (n_pad,), (n_pad / width, q), int
    """
    n = labels.numel()
    n_pad = -(-n // width) * width
    runs = torch.cat([labels, labels[n - 1:].expand(n_pad - n)]).view(-1, width)
    first = runs[:, :1]
    local = runs - first
    q = int(local[:, -1].max()) + 1
    target = (first + torch.arange(q, device=labels.device)).clamp_max_(num_blocks)
    return local.flatten(), target, q


def _choose_slot_width(labels: Tensor, num_blocks: int, max_width: int) -> int:
    """Slot width trading the GEMM columns per kernel entry (``q`` slots) against short, inefficient runs."""
    best = None
    for width in _SLOT_WIDTHS:
        if width > max(max_width, _SLOT_WIDTHS[0]):
            break
        q = _column_slots(labels, num_blocks, width)[2]
        cost = q * (1.0 + 128.0 / width)  # small widths make short, inefficient GEMMs (fitted on CPU)
        if best is None or cost < best[0]:
            best = (cost, width)
    return best[1]


class _StationaryKernelSums(torch.autograd.Function):
    r"""Unscaled block sums :math:`T_0 = P^\top f(R) P` and, in the same pass, their lengthscale derivatives."""

    @staticmethod
    def forward(ctx, plan: _Plan, spec: _Stationary, lengthscale: Tensor):
        with torch.no_grad():
            sums, derivs = _stationary_pass(plan, spec, lengthscale)
        ctx.save_for_backward(lengthscale, derivs)
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sums: Tensor):
        lengthscale, derivs = ctx.saved_tensors  # derivs: sum g'(r2) dz_a^2 over blocks, (B, k, k, D)
        g = torch.einsum("bij,bija->ba", grad_sums.reshape(derivs.shape[:-1]).to(derivs.dtype), derivs)
        batch = grad_sums.shape[:-2]
        g = g.reshape(*batch, 1, derivs.shape[-1]).to(lengthscale.dtype)
        g = g * (-2.0) / lengthscale
        return None, None, sum_to_shape(g, lengthscale.shape)


def _tiles(n: int, rows: int, cols: int, width: int) -> list[tuple[int, int, int, int, bool]]:
    """The tiles ``(r0, r1, c0, c1, mirror)`` covering each unordered pair of rows once.

    Rows go in groups of ``rows`` (a multiple of ``width``). A group's diagonal tile holds
    all its ordered pairs; the tiles to its right (columns from the group's end, in
    steps of ``cols``) hold its pairs with later rows, whose sums are added twice: as
    they are and transposed (``mirror``). Column ranges are multiples of ``width``.
    """
    n_pad = -(-n // width) * width
    out = []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        out.append((r0, r1, r0, -(-r1 // width) * width, False))
        out.extend((r0, r1, c0, min(n_pad, c0 + cols), True) for c0 in range(r1, n_pad, cols) if r1 < n)
    return out


def _stationary_pass(plan: _Plan, spec: _Stationary, lengthscale: Tensor,
                     derivatives: bool = True) -> tuple[Tensor, Tensor | None]:
    r"""Block sums of the unscaled kernel and of its lengthscale derivatives, in one pass over half the entries.

    The sorted rows are cut into tiles (:func:`_tiles`); the kernel is symmetric, so only
    tiles on or right of the diagonal are evaluated and the others are their transposes.
    Per tile (a few MB, so that the passes over it stay in cache): one GEMM for the
    squared distances in coordinates centred on the tile's rows, one elementwise pass
    for the values (and derivative weights), then one GEMM against the column
    features. Columns are grouped in runs of ``width`` spanning at most ``q`` blocks
    (:func:`_column_slots`), and each run's features sit in the slot of their block, so
    the GEMM output holds per-row, per-block sums. With ARD lengthscales the column
    features are :math:`[1, z_j, z_j^2]` and, per row :math:`p` and dimension :math:`a`,

    .. math::
        \sum_{j \in J} w_{pj} (z_{pa} - z_{ja})^2
        = z_{pa}^2 \sum_{j \in J} w_{pj} - 2 z_{pa} \sum_{j \in J} w_{pj} z_{ja} + \sum_{j \in J} w_{pj} z_{ja}^2,

    isotropic kernels sum the weights :math:`w_{pj} r_{pj}^2` directly. A last small GEMM
    with the rows' block indicator adds the rows of each block.

    Returns:
        (sums, derivs) # shapes: (*batch, k, k), (B, k, k, D) or None without ``derivatives``
    """
    x = plan.x
    n, d = x.shape[-2:]
    dtype = torch.promote_types(x.dtype, lengthscale.dtype)
    D = lengthscale.shape[-1]
    ard = derivatives and D > 1
    rbf = spec.nu is None
    k = plan.num_blocks
    z = x.to(dtype) / lengthscale.to(dtype) * spec.input_scale  # (*batch, n, d)
    batch = z.shape[:-2]
    z = z.reshape(-1, n, d)
    bsz = z.shape[0]
    acc_dtype = _accumulation_dtype(dtype)
    device = z.device

    cuda = device.type == "cuda"
    requested = plan.chunk if plan.chunk else (_TILE_ROWS_CUDA if cuda else _TILE_ROWS)
    width = _choose_slot_width(plan.labels, k, requested)
    local, target, q = _column_slots(plan.labels, k, width)
    rows = max(width, requested // width * width)
    cols = max(width, (_TILE_COLS_CUDA if cuda else _TILE_COLS) // max(1, bsz) // width * width)
    n_pad = target.shape[0] * width
    if n_pad > n:  # padded columns: copies of the last point, with zero weight in every slot
        z = torch.cat([z, z[:, -1:].expand(bsz, n_pad - n, d)], dim=1)
    slots = torch.zeros(n_pad, q, dtype=dtype, device=device)
    slots.scatter_(1, local.unsqueeze(-1), 1.0)
    slots[n:] = 0.0
    slots = slots.view(-1, width, q)  # (runs, width, q): the block indicator of each run's columns

    tiles = _tiles(n, rows, cols, width)
    if plan.group is not None:
        import torch.distributed as dist

        rank, world = dist.get_rank(plan.group), dist.get_world_size(plan.group)
        tiles = tiles[rank::world]
    starts = sorted({t[0] for t in tiles})
    ends = [min(n, r0 + rows) - 1 for r0 in starts]
    bounds = plan.labels[torch.tensor(starts + ends, device=device)].tolist() if starts else []
    row_bounds = dict(zip(starts, zip(bounds[: len(starts)], bounds[len(starts):])))  # one transfer
    E = 1 + (d if ard else int(derivatives))
    acc = torch.zeros(bsz, (k + 1) * (k + 1), E, dtype=acc_dtype, device=device)
    sign = -1.0 if rbf else 1.0  # the distance GEMM writes -r^2 for RBF, so that exp works in place
    buf = z.new_empty(2 * bsz * rows * min(max(rows, cols), n_pad))
    factor = 1.0
    row_state = None
    for r0, r1, c0, c1, mirror in _progress(tiles, plan.show_progress, "kernel block sums (fused)"):
        R, C = r1 - r0, c1 - c0
        runs = C // width
        if row_state is None or row_state[0] != r0:
            zr = z[:, r0:r1]
            centre = zr.mean(1, keepdim=True)
            zr = zr - centre
            zr_sq = zr.square()
            rows_aug = torch.cat([zr, zr.new_full((bsz, R, 1), sign), sign * zr_sq.sum(-1, keepdim=True)], dim=-1)
            first, last = row_bounds[r0]
            m = last - first + 1
            indicator = torch.zeros(m, R, dtype=dtype, device=device)
            indicator.scatter_(0, (plan.labels[r0:r1] - first).unsqueeze(0), 1.0)
            row_blocks = torch.arange(first, last + 1, device=device)
            row_state = (r0, centre, zr, zr_sq, rows_aug, indicator, row_blocks, m)
        _, centre, zr, zr_sq, rows_aug, indicator, row_blocks, m = row_state
        zc = z[:, c0:c1] - centre
        cols_aug = torch.cat([(-2.0 * sign) * zc, zc.square().sum(-1, keepdim=True), zc.new_ones(bsz, C, 1)], dim=-1)
        values = buf[: bsz * R * C].view(bsz, R, C)
        weights = buf[bsz * R * C: 2 * bsz * R * C].view(bsz, R, C)
        rho2 = torch.bmm(rows_aug, cols_aug.transpose(1, 2), out=weights)
        if not mirror:  # the diagonal tile: a point's distance to itself is exactly zero
            torch.diagonal(rho2, dim1=-2, dim2=-1).zero_()
        if not rbf:
            rho2.clamp_min_(0.0)
        if rbf and not (derivatives and not ard):
            torch.exp(rho2, out=values)  # ARD RBF: the derivative weights are the values (factor -1)
            factor = -1.0
        else:
            factor = spec.evaluate(rho2, values, weights, ard or not derivatives)
        run_slots = slots[c0 // width: c1 // width]  # (runs, width, q)

        def per_block(w: Tensor, right: Tensor) -> Tensor:  # (B, R, C) x (.., runs, width, f) -> (B, runs, R, f)
            return torch.matmul(w.view(bsz, R, runs, width).transpose(1, 2), right)

        if not derivatives:
            out = per_block(values, run_slots).unsqueeze(-1)  # (B, runs, R, q, 1)
        elif not ard:  # sums of the values and of the weights w r^2
            out = torch.stack([per_block(values, run_slots), per_block(weights, run_slots)], dim=-1)
        else:
            feats = torch.cat([zc.new_ones(bsz, C, 1), zc, zc.square()], dim=-1)  # (B, C, 1 + 2d)
            right = run_slots.unsqueeze(-1) * feats.view(bsz, runs, width, 1, 1 + 2 * d)
            y = per_block(values if rbf else weights, right.view(bsz, runs, width, q * (1 + 2 * d)))
            y = y.view(bsz, runs, R, q, 1 + 2 * d)
            zr_b, zr_sq_b = zr.view(bsz, 1, R, 1, d), zr_sq.view(bsz, 1, R, 1, d)
            deriv = torch.addcmul(y[..., 1 + d:], zr_sq_b, y[..., :1])
            deriv.addcmul_(zr_b, y[..., 1:1 + d], value=-2.0)
            total = y[..., :1] if rbf else per_block(values, run_slots).unsqueeze(-1)
            out = torch.cat([total, deriv], dim=-1)  # (B, runs, R, q, 1 + d)
        reduced = torch.matmul(indicator, out.view(bsz, runs, R, q * E))  # (B, runs, m, q E): rows into blocks
        reduced = reduced.reshape(bsz, -1, E).to(acc_dtype)
        col_blocks = target[c0 // width: c1 // width].view(runs, 1, q)
        acc.index_add_(1, (row_blocks.view(1, m, 1) * (k + 1) + col_blocks).flatten(), reduced)
        if mirror:
            acc.index_add_(1, (col_blocks * (k + 1) + row_blocks.view(1, m, 1)).flatten(), reduced)
    acc = acc.view(bsz, k + 1, k + 1, E)[:, :k, :k]
    sums = acc[..., 0]
    derivs = acc[..., 1:].mul(factor) if derivatives else None
    if plan.group is not None:
        reduced_all = _all_reduce([sums.contiguous()] + ([derivs.contiguous()] if derivatives else []), plan.group)
        sums, derivs = reduced_all[0], (reduced_all[1] if derivatives else None)
    sums = sums.to(dtype).reshape(*batch, k, k)
    return sums, derivs


# ============================================================================ public entry point
def _check_inputs(kernel, x, partition, chunk_size) -> Tensor:
    if not isinstance(kernel, Kernel):
        raise TypeError(f"kernel must be a gpytorch.kernels.Kernel, got {type(kernel).__name__}.")
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a torch.Tensor of shape (n, d), got {type(x).__name__}.")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be floating point, got dtype {x.dtype}; convert it with .float().")
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    if x.dim() < 2 or x.shape[-2] == 0:
        raise ValueError(f"x must have shape (n, d) or (*batch, n, d) with n >= 1, got {tuple(x.shape)}.")
    if not isinstance(partition, Partition):
        raise TypeError(
            f"partition must be a bma_gp.Partition, got {type(partition).__name__}; build one with "
            "Partition.from_labels(labels) or a builder from bma_gp.partition_builders."
        )
    if len(partition) != x.shape[-2]:
        raise ValueError(
            f"partition has {len(partition)} indices but x has {x.shape[-2]} rows; they must match."
        )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}.")
    return x


def kernel_block_mean(
    kernel: Kernel,
    x: Tensor,
    partition: Partition,
    chunk_size: int | None = None,
    *,
    process_group=None,
    progress: bool | None = None,
    fused: bool | None = None,
) -> BlockMeanLinearOperator:
    r"""The optimal block mean approximation of the kernel matrix ``kernel(x, x)``, in O(n * chunk) memory.

    With :math:`T = P^\top K P` and :math:`d = P^\top \operatorname{diag}(K)` for
    :math:`K = k(X, X)`, the result is (SPEC section 2)

    .. math::
        B_{ij} = \frac{T_{ij}}{s_i s_j}\ (i \ne j), \qquad
        B_{ii} = \frac{T_{ii} - d_i}{s_i (s_i - 1)}, \qquad
        \lambda_i = \frac{d_i}{s_i} - B_{ii},

    the covariance of the block-exchangeable process. The kernel is evaluated in row
    chunks of ``chunk_size x n`` entries that are reduced into :math:`T` and :math:`d` at
    once; the result is differentiable in the kernel's hyperparameters (and in ``x``),
    with backward also in :math:`O(n \cdot \text{chunk})` memory: the generic path
    re-evaluates each chunk in backward, the fused path for RBF / Matern kernels
    reduces the lengthscale derivatives in the forward pass (see the module docstring).

    Args:
        kernel: any gpytorch kernel; batch kernels give a batch of operators.
        x: inputs. # shape: (n, d), (*batch, n, d) or (n,)
        partition: partition of the ``n`` inputs.
        chunk_size: rows per chunk (generic path; default about 64 MB of kernel values
            per chunk) or per tile (fused path; default 256 on CPU, 4096 on CUDA, rounded to
            a multiple of the column slot width).
        process_group: a ``torch.distributed`` process group; each rank evaluates its
            share of the rows and the sums are all-reduced (module docstring). ``None``:
            single process.
        progress: show a tqdm progress bar; ``None`` shows one when there are more than
            :math:`10^9` entries (on rank 0 only).
        fused: force (``True``) or forbid (``False``) the fused stationary path; ``None``
            uses it whenever it applies. Forcing it on a kernel it does not support is a
            ``ValueError``.

    Returns:
        BlockMeanLinearOperator over ``partition``. # shape: (*batch, n, n)

    Raises:
        TypeError: ``kernel`` is not a gpytorch kernel, ``x`` not a tensor, ``partition``
            not a :class:`~bma_gp.Partition`.
        ValueError: wrong shapes, a bad ``chunk_size``, a process group without an
            initialised ``torch.distributed``, or ``fused=True`` on an unsupported kernel.

    Example:
        >>> from gpytorch.kernels import RBFKernel, ScaleKernel
        >>> x = torch.randn(1000, 2)
        >>> op = kernel_block_mean(ScaleKernel(RBFKernel()), x, Partition.from_labels(torch.arange(1000) % 10))
        >>> op.shape
        torch.Size([1000, 1000])
    """
    x = _check_inputs(kernel, x, partition, chunk_size)
    n = x.shape[-2]
    partition = partition.to(x.device)

    rank, world = 0, 1
    if process_group is not None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group was given but torch.distributed is not initialised; call "
                             "torch.distributed.init_process_group first (or pass process_group=None).")
        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)

    # evaluate in the order of sorted labels: every block becomes a contiguous run of columns
    if partition.is_contiguous:
        xs, labels = x, partition.labels
    else:
        order = torch.argsort(partition.labels, stable=True)
        xs, labels = x.index_select(-2, order), partition.labels[order]
    sizes = partition.sizes

    batch_numel = math.prod(x.shape[:-2])
    spec = _Stationary.match(kernel) if fused is not False else None
    # no gradient wanted (e.g. prediction): the fused pass reduces the values only
    values_only = not (torch.is_grad_enabled() and any(p.requires_grad for p in kernel.parameters()))
    if spec is not None:
        batch_numel = max(batch_numel, math.prod(spec.base.lengthscale.shape[:-2]))
    rows = (rank * n // world, (rank + 1) * n // world)
    show = bool(progress) if progress is not None else batch_numel * n * n >= _PROGRESS_ENTRIES
    show = show and rank == 0

    if spec is not None:
        ls = spec.base.lengthscale
        D = ls.shape[-1]
        state = batch_numel * partition.num_blocks ** 2 * D * 8
        usable = (not (torch.is_grad_enabled() and xs.requires_grad)) and state <= _FUSED_STATE_BYTES \
            and (D == 1 or D == spec.select_dims(xs).shape[-1])
        if not usable:
            if fused:
                raise ValueError("fused=True, but the fused path needs x without gradient, ARD lengthscales "
                                 "matching the input columns and k^2 * D small enough; use fused=None.")
            spec = None
    elif fused:
        raise ValueError(f"fused=True, but {type(kernel).__name__} is not an RBF or Matern (nu 0.5, 1.5, 2.5) "
                         "kernel, optionally in a ScaleKernel; use fused=None.")

    if spec is not None:
        xd = spec.select_dims(xs).detach()
        plan = _Plan(xd, sizes, labels, rows, chunk_size, process_group, show)
        if values_only:
            with torch.no_grad():
                unscaled = _stationary_pass(plan, spec, ls, derivatives=False)[0]
        else:
            unscaled = _StationaryKernelSums.apply(plan, spec, ls)
        dtype = unscaled.dtype
        size_vec = sizes.to(dtype)
        if spec.scale is not None:
            scale = spec.scale.outputscale.to(dtype)
            block_sums = scale.unsqueeze(-1).unsqueeze(-1) * unscaled
            diag_sums = scale.unsqueeze(-1) * size_vec
        else:
            block_sums, diag_sums = unscaled, size_vec
        diag_sums = diag_sums.expand(*block_sums.shape[:-1])
    else:
        per_row = batch_numel * n * x.element_size()
        chunk = chunk_size or max(1, _CHUNK_BYTES // per_row)
        plan = _Plan(xs, sizes, labels, rows, chunk, process_group, show)
        params = _kernel_parameters(kernel)
        block_sums, diag_sums = _GenericKernelSums.apply(plan, kernel, xs, *params)
    return block_mean_from_sums(block_sums, diag_sums, partition)
