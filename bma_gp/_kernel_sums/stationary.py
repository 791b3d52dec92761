r"""Block sums of an RBF or Matern kernel matrix in tiles, with work independent of the number of blocks.

The kernel is :math:`K_{pj} = \sigma^2 f(\rho_{pj})` with :math:`\rho_{pj} = \|z_p - z_j\|`
and :math:`z = c\, x / \ell` (:math:`c` folds the kernel's own constant into the inputs, see
:attr:`StationaryForm.input_scale`). The rows are sorted by block, so in a tile of rows
:math:`p \in [r_0, r_1)` and columns :math:`j \in [c_0, c_1)` every block is a contiguous run
of rows and of columns.

**Forward** (:func:`block_sums`). Only tiles on and right of the diagonal are evaluated
(each unordered pair once; a tile right of the diagonal is added as it is and transposed).
Per tile: one GEMM for :math:`\pm\rho^2` in coordinates centred on the tile's rows, one
elementwise pass for :math:`f`, then two segment sums: the rows of each block (an
``index_add`` of contiguous rows), then the columns of each block (the same on the
transposed, much smaller, per-block rows). That is :math:`O(1)` work per entry whatever
the number of blocks :math:`k`; nothing of size :math:`k` per entry is formed.

**Backward** (:class:`StationaryBlockMeans`). With :math:`G` the incoming gradient on
:math:`T_0 = P^\top f(R) P` and :math:`g(r^2) = f(\rho)`,

.. math::
    \frac{\partial L}{\partial \ell_a} = -\frac{2}{\ell_a} \sum_{p, j} G_{c_p c_j}\,
        g'(r_{pj}^2)\, \Delta z_{pja}^2,
    \qquad
    \sum_p W_{pj} (z_{pa} - z_{ja})^2 = z_{ja}^2 \sum_p W_{pj} - 2 z_{ja} \sum_p W_{pj} z_{pa}
        + \sum_p W_{pj} z_{pa}^2,

so one GEMM of the derivative weights :math:`W` with the row features :math:`[1, z_p,
z_p^2]` gives every lengthscale's sum. A diagonal tile's self pairs (:math:`p = j`) are left out of it
(:func:`_without_self_pairs`): their :math:`\Delta z = 0` exactly, but the expanded form adds and cancels
:math:`z_j^2` for them, all of it rounding error where :math:`|z|` is large (float32 and a lengthscale of
:math:`10^{-4}` on unit-scale inputs: a lengthscale gradient of 0.2 where the true one is 0).
Each tile takes the cheaper of two routes:

* rows spanning few blocks (at most :data:`MAX_ROW_BLOCKS`, the usual case with large
  blocks): forward also runs that GEMM once per row block and keeps the tile's derivative
  sums per (row block, column block), within a budget (:func:`_kept_shapes`); backward
  contracts them with :math:`G`;
* the others (many small blocks): backward evaluates the tile again, multiplies
  :math:`W` by :math:`G` spread over the tile (one gather) and runs the GEMM once.

Both are :math:`O(d)` work per entry whatever :math:`k`, and the memory kept between
the passes is bounded.

**On CPU with numba** (float32/float64, the optional ``jit`` extra; :mod:`bma_gp._kernel_sums.jit`)
each tile is instead reduced by one numba kernel that reads the values once and adds the block
sums straight into the accumulator, and (forward with gradient) computes every tile's derivative
sums :math:`\sum w (z_{pa} - z_{ja})^2` per (row block, column block) directly, however many
blocks its rows span, into one buffer. Backward then only contracts them with :math:`G` (one parallel numba
launch for every tile, reading :math:`G` in place and summing in float64), within a budget (:func:`_kept_shapes`);
tiles past it are evaluated again and reduced by the same kernel.
This removes the per-row-block GEMMs that made many small blocks cost a second evaluation.

**The means** (:class:`StationaryBlockMeans`). The float64 sums become the block means in place and are
rounded to the kernel's dtype once; backward maps :math:`\partial L / \partial B` and
:math:`\partial L / \partial \lambda` to :math:`G` in one product. Nothing ``k x k`` is allocated in between
but the result: at ``k = 2000`` the earlier chain of ``k x k`` operations, each on a fresh 32 MB float64 buffer,
took about 80 of the 460 ms of a forward and backward. Where the tiles were reduced by numba, the means are one
compiled pass (:func:`bma_gp._kernel_sums.jit.block_means`: the same values to the bit, 1.8 against 4.2 ms at
``k = 2000``), and where every tile's derivative sums were kept, backward forms no :math:`G` at all: the
contraction reads :math:`\partial L / \partial B` and applies the sizes and the scale as it goes
(:class:`bma_gp._kernel_sums.jit.GradientScaling`).

**Distributed.** Each rank evaluates every ``world``-th tile; the block sums are summed over
ranks in forward and the lengthscale gradient in backward, so every rank must call backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from gpytorch.kernels import Kernel, MaternKernel, RBFKernel, ScaleKernel
from torch import Tensor

from bma_gp._autograd import first_order_only, refuse_tangents, reverse_mode_only, unbatched_backward
from bma_gp._broadcast import sum_to_shape
from bma_gp._kernel_sums import jit
from bma_gp._kernel_sums.plan import KernelSumsPlan, all_reduce, progress
from bma_gp._precision import core_dtype

__all__ = [
    "StationaryBlockMeans",
    "StationaryForm",
    "block_sums",
    "stationary_block_means",
]

#: Rows and columns of one tile on CPU: 8 MB per float32 buffer (three of them). 512 rows rather than 256 halve the
#: tiles and their per-tile Python and dispatch cost (2 Dec 2026: fwd + bwd of RBF-ARD block sums at n = 2x10^4
#: 0.54 -> 0.42 s at k = 10). 4096 columns rather than 2048 make each row block's derivative GEMM twice as wide,
#: and these small GEMMs run on one thread whatever torch's thread count (3 Dec 2026, 2 threads, alternating
#: processes: fwd + bwd 0.40 -> 0.355 s at k = 10, 0.49 -> 0.43 s at k = 400, 0.74 -> 0.68 s at k = 2000; the
#: elecdemand step, n = 14,016, k = 400, float32, 0.288 -> 0.257 s). 8192 columns gained little more for twice
#: the buffers; 128 or 256 rows were slower at every k.
TILE_ROWS, TILE_COLS = 512, 4096
#: Rows and columns of one tile on CUDA: big tiles, so that per-tile Python overhead is negligible.
TILE_ROWS_CUDA, TILE_COLS_CUDA = 4096, 32768
#: Entries of a float32 tile widened to float64 at a time by the torch reduction (32 MB in float64).
_WIDEN_ENTRIES = 2**22
#: Multiple of the distance GEMM's rounding bound below which Matern-1/2's derivative weight is 0.
_NOISE_FLOOR = 4.0


# ============================================================================ the kernel's form
@dataclass(frozen=True)
class StationaryForm:
    r"""A kernel :math:`\sigma^2 f(\rho)` the tiled engine handles: RBF or Matern :math:`\nu \in \{1/2, 3/2, 5/2\}`.

    With :math:`\rho = \|z' - z''\|` and :math:`z = c\, x / \ell`: RBF :math:`f = e^{-\rho^2}`;
    Matern :math:`f = p_\nu(\rho)\, e^{-\rho}` with :math:`p = 1`, :math:`1 + \rho`,
    :math:`1 + \rho + \rho^2 / 3` for :math:`\nu = 1/2, 3/2, 5/2`.

    Attributes:
        base: the RBF or Matern kernel (holds the lengthscale).
        scale: the ``ScaleKernel`` around it, or ``None``.
        nu: Matern smoothness, ``None`` for RBF.
    """

    base: Kernel
    scale: ScaleKernel | None
    nu: float | None

    @staticmethod
    def match(kernel: Kernel) -> StationaryForm | None:
        """The form of ``kernel``, or ``None`` when the tiled engine does not apply."""
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
        return StationaryForm(base, scale, nu)

    def select_dims(self, x: Tensor) -> Tensor:
        """The columns the kernel sees: only the outermost kernel's ``__call__`` applies ``active_dims``."""
        outer = self.scale if self.scale is not None else self.base
        if outer.active_dims is not None:
            x = x.index_select(-1, outer.active_dims.to(x.device))
        return x

    @property
    def input_scale(self) -> float:
        r"""The constant :math:`c`: :math:`\sqrt{1/2}` for RBF, :math:`\sqrt{2 \nu}` for Matern."""
        return math.sqrt(0.5) if self.nu is None else math.sqrt(2.0 * self.nu)

    @property
    def distance_sign(self) -> float:
        r"""The sign the distance GEMM writes :math:`\rho^2` with: RBF takes :math:`e^{-\rho^2}` in place."""
        return -1.0 if self.nu is None else 1.0

    def values(self, rho2: Tensor, spare: Tensor) -> Tensor:
        r""":math:`f(\rho)` from ``distance_sign * rho^2``, overwriting ``rho2`` and ``spare`` (same shape)."""
        if self.nu is None:
            return rho2.exp_()
        rho = rho2.sqrt_()
        e = torch.neg(rho, out=spare).exp_()
        if self.nu == 0.5:
            return e
        if self.nu == 1.5:
            return e.mul_(rho.add_(1.0))
        # (1 + rho + rho^2 / 3) e = (1 + rho) e + (rho^2 / 3) e
        tail = torch.mul(rho, rho, out=torch.empty_like(rho)).mul_(1.0 / 3.0).mul_(e)
        return e.mul_(rho.add_(1.0)).add_(tail)

    def values_and_weights(
        self, rho2: Tensor, spare: Tensor, extra: Tensor, floor: NoiseFloor | None = None
    ) -> tuple[Tensor, Tensor, float]:
        """``values(...)`` and ``derivative_weights(..., floor)`` from one evaluation, in three buffers."""
        if self.nu is None:
            values = rho2.exp_()
            return values, values, -1.0
        if self.nu == 0.5:
            noise = _below_floor(rho2, floor, extra)  # before extra holds the weights
            rho = rho2.sqrt_()
            e = torch.neg(rho, out=spare).exp_()
            weights = torch.div(e, rho, out=extra).masked_fill_(noise, 0.0)  # 1 / 0 (inf) only where noise is set
            return e, weights, -0.5
        rho = rho2.sqrt_()
        e = torch.neg(rho, out=spare).exp_()
        if self.nu == 1.5:
            weights = extra.copy_(e)
            return e.mul_(rho.add_(1.0)), weights, -0.5
        weights = torch.add(rho, 1.0, out=extra).mul_(e)  # (1 + rho) e
        tail = rho.square_().mul_(1.0 / 3.0).mul_(e)  # (rho^2 / 3) e
        return torch.add(weights, tail, out=spare), weights, -1.0 / 6.0

    def derivative_weights(
        self, rho2: Tensor, spare: Tensor, extra: Tensor, floor: NoiseFloor | None = None
    ) -> tuple[Tensor, float]:
        r"""Weights :math:`w` and a factor with :math:`g'(r^2)\, \Delta z_a^2 = \text{factor} \cdot w\, \Delta z'^2_a`.

        :math:`g(r^2) = f(\rho)` is the kernel as a function of the squared distance in
        lengthscale units and :math:`z'` are the scaled inputs. RBF: :math:`w = f`, factor
        :math:`-1`; Matern :math:`\nu = 1/2`: :math:`w = e^{-\rho} / \rho` (0 at :math:`\rho = 0`,
        where every :math:`\Delta z'_a` is 0), factor :math:`-1/2`; :math:`\nu = 3/2`:
        :math:`w = e^{-\rho}`, :math:`-1/2`; :math:`\nu = 5/2`: :math:`w = (1 + \rho) e^{-\rho}`,
        :math:`-1/6`. Overwrites ``rho2`` and ``spare`` (and, for Matern-1/2, ``extra``).

        ``floor`` (Matern-1/2 only): a pair's squared distance up to its own bound is rounding noise of the distance
        GEMM (:meth:`_TilePass.noise_floor`), where :math:`w` is set to 0 as at :math:`\rho = 0`. Duplicate points
        otherwise get :math:`w \sim 1 / \sqrt{\text{noise}}` times a :math:`\Delta z'^2` that is noise as well
        (the feature GEMM), a large spurious gradient; a pair below its floor contributes at most
        :math:`\rho \le \sqrt{\text{floor}}` in exact arithmetic. Every :math:`\rho = 0` is below its floor (the
        bound is at least 0), so :math:`e^{-\rho} / \rho` is divided as it is (its infinities masked) rather than
        clamped first: one pass over the tile less, which pays for most of the per-pair bound's (the Matern-1/2
        forward and backward at ``n = 2x10^4`` took 5-8% longer with both, measured on a shared 2-core machine).
        """
        if self.nu is None:
            return rho2.exp_(), -1.0
        if self.nu == 0.5:
            noise = _below_floor(rho2, floor, extra)
            rho = rho2.sqrt_()
            e = torch.neg(rho, out=spare).exp_()
            return e.div_(rho).masked_fill_(noise, 0.0), -0.5  # 1 / 0 (inf) only where noise is set
        rho = rho2.sqrt_()
        e = torch.neg(rho, out=spare).exp_()
        if self.nu == 1.5:
            return e, -0.5
        return e.mul_(rho.add_(1.0)), -1.0 / 6.0


class NoiseFloor(NamedTuple):
    """Per-pair bounds on the rounding noise of a tile's squared distances, ``rows + cols``
    (:meth:`_TilePass.noise_floor`). # shapes: (B, R, 1), (B, 1, C)"""

    rows: Tensor
    cols: Tensor


def _below_floor(rho2: Tensor, floor: NoiseFloor | None, scratch: Tensor) -> Tensor:
    """Where the squared distances ``rho2`` are at most their pair's noise bound (at most 0 without ``floor``), as
    a boolean tile; ``scratch`` (``rho2``'s shape) is overwritten. Every ``rho2 = 0`` is set (the bound is at least
    0): Matern-1/2's weights divide by ``rho`` unclamped and rely on it."""
    if floor is None:
        return rho2 <= 0
    return torch.le(rho2, torch.add(floor.rows, floor.cols, out=scratch))


# ============================================================================ tiles
class Tile(NamedTuple):
    """Rows ``r0:r1`` against columns ``c0:c1``; ``mirror``: also add the transposed sums.

    ``row_block`` / ``col_block``: the first block of the rows / columns; ``row_blocks`` /
    ``col_blocks``: how many consecutive blocks they span.
    """

    r0: int
    r1: int
    c0: int
    c1: int
    mirror: bool
    row_block: int
    row_blocks: int
    col_block: int
    col_blocks: int


def tile_ranges(n: int, rows: int, cols: int) -> list[tuple[int, int, int, int, bool]]:
    """``(r0, r1, c0, c1, mirror)`` covering each unordered pair of the ``n`` points once.

    Rows go in groups of ``rows``. A group's diagonal tile holds all its ordered pairs; the
    tiles to its right (in steps of ``cols``) hold its pairs with later rows and are
    ``mirror``-ed: their sums are added as they are and transposed.
    """
    out = []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        out.append((r0, r1, r0, r1, False))
        out.extend((r0, r1, c0, min(n, c0 + cols), True) for c0 in range(r1, n, cols))
    return out


def _with_blocks(ranges: list[tuple[int, int, int, int, bool]], labels: Tensor) -> list[Tile]:
    """Attach each tile's block span, reading all the labels needed with one transfer."""
    if not ranges:
        return []
    ends = torch.tensor([[r0, r1 - 1, c0, c1 - 1] for r0, r1, c0, c1, _ in ranges], device=labels.device)
    spans = labels[ends].tolist()
    return [Tile(*t, a, b - a + 1, c, e - c + 1) for t, (a, b, c, e) in zip(ranges, spans)]


@dataclass
class _RowGroup:
    """The rows ``r0:r1`` shared by consecutive tiles, in coordinates centred on them."""

    r0: int
    centre: Tensor  # (B, 1, d)
    z: Tensor  # (B, R, d): the rows' scaled inputs minus the centre
    lhs: Tensor  # (B, R, d + 2): the rows' factor of the distance GEMM
    local: Tensor  # (R,): each row's block minus the group's first block
    zc: Tensor  # (B, n - r0, d): the inputs from row r0 on (every column the group's tiles hold), minus the centre
    rhs: Tensor  # (B, n - r0, d + 2): their factor of the distance GEMM
    _features: Tensor | None = None
    _bounds: list[int] | None = None

    @staticmethod
    def build(z: Tensor, labels: Tensor, tile: Tile, sign: float) -> _RowGroup:
        """The group of ``tile``'s rows, with the column factors of all its tiles at once: a few operations per group
        instead of per tile (about 40 us of small operations per ``512 x 4096`` tile)."""
        centre = z[:, tile.r0 : tile.r1].mean(1, keepdim=True)
        zc = z[:, tile.r0 :] - centre
        zr = zc[:, : tile.r1 - tile.r0]
        ones = zr.new_full((*zr.shape[:-1], 1), sign)
        lhs = torch.cat([zr, ones, sign * zr.square().sum(-1, keepdim=True)], dim=-1)
        rhs = torch.cat([(-2.0 * sign) * zc, zc.square().sum(-1, keepdim=True), torch.ones_like(zc[..., :1])], -1)
        return _RowGroup(tile.r0, centre, zr, lhs, labels[tile.r0 : tile.r1] - tile.row_block, zc, rhs)

    def features(self) -> Tensor:
        """The row features :math:`[1, z_p, z_p^2]`, made on first use. # shape: (B, 1 + 2d, R)"""
        if self._features is None:
            zr = self.z
            self._features = torch.cat([torch.ones_like(zr[..., :1]), zr, zr.square()], -1).transpose(1, 2).contiguous()
        return self._features

    def bounds(self) -> list[int]:
        """Where each row block starts in the group, and the group's end (one transfer, on first use)."""
        if self._bounds is None:
            counts = torch.unique_consecutive(self.local, return_counts=True)[1]
            self._bounds = [0, *torch.cumsum(counts, 0).tolist()]
        return self._bounds


class _TilePass:
    """Evaluates ``distance_sign * rho^2`` tile by tile, reusing the row group and three scratch buffers."""

    def __init__(self, labels: Tensor, form: StationaryForm, z: Tensor, tiles: list[Tile]):
        self.labels, self.form, self.z = labels, form, z
        self.sign = form.distance_sign
        size = max(((t.r1 - t.r0) * (t.c1 - t.c0) for t in tiles), default=0) * z.shape[0]
        self.scratch = z.new_empty(3, size)
        self.group: _RowGroup | None = None

    def rows(self, tile: Tile) -> _RowGroup:
        if self.group is None or self.group.r0 != tile.r0:
            self.group = _RowGroup.build(self.z, self.labels, tile, self.sign)
        return self.group

    def noise_floor(self, tile: Tile, zc: Tensor) -> NoiseFloor | None:
        r"""A bound on the rounding error of each pair's :math:`\rho^2` in the tile (Matern-1/2 only, else ``None``).

        :math:`\rho^2 = |z_p|^2 + |z_j|^2 - 2 z_p \cdot z_j` in centred coordinates is exact to about
        :math:`(d + 2)\, \epsilon\, (|z_p|^2 + |z_j|^2)`, a bound of each pair's own; only Matern-1/2's derivative
        weight :math:`e^{-\rho} / \rho` is sensitive to it (:meth:`StationaryForm.derivative_weights`). A bound
        from the tile's largest norms instead zeroed the weights of close pairs far above their own noise: in
        float32, one point 4300 lengthscales from the others made it cover every pair closer than 7 lengthscales
        (a lengthscale gradient of 0.0079 for 1.8187).
        """
        if self.form.nu != 0.5:
            return None
        group = self.rows(tile)
        c = _NOISE_FLOOR * (zc.shape[-1] + 2) * torch.finfo(zc.dtype).eps
        return NoiseFloor(group.z.square().sum(-1, keepdim=True).mul_(c), zc.square().sum(-1).mul_(c).unsqueeze(1))

    def distances(self, tile: Tile) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(sign * rho^2, spare, extra, centred column inputs)`` of one tile; ``spare``, ``extra``: free buffers."""
        group = self.rows(tile)
        if tile.c0 < group.r0:
            raise ValueError("_TilePass.distances: a tile's columns start at its rows (tile_ranges)")
        zc = group.zc[:, tile.c0 - group.r0 : tile.c1 - group.r0]
        rhs = group.rhs[:, tile.c0 - group.r0 : tile.c1 - group.r0]
        shape = (self.z.shape[0], tile.r1 - tile.r0, tile.c1 - tile.c0)
        rho2, spare, extra = (buf[: math.prod(shape)].view(shape) for buf in self.scratch)
        torch.bmm(group.lhs, rhs.transpose(1, 2), out=rho2)
        if not tile.mirror:  # the diagonal tile: a point's distance to itself is exactly zero
            torch.diagonal(rho2, dim1=-2, dim2=-1).zero_()
        # rho^2 >= 0: the GEMM's rounding makes near-duplicate points' distances slightly negative, and an RBF value
        # exp(-rho^2) above the outputscale made the block means indefinite (float32, a pair of duplicate rows per
        # block: lam = -5e-6 at noise 1e-6, and the marginal likelihood refused them)
        if self.sign > 0:
            rho2.clamp_min_(0.0)
        else:
            rho2.clamp_max_(0.0)
        return rho2, spare, extra, zc


def _prepare(plan: KernelSumsPlan, form: StationaryForm, lengthscale: Tensor) -> tuple[Tensor, list[Tile]]:
    """Scaled inputs ``z`` (batch flattened) and this rank's tiles."""
    x = plan.x
    n, d = x.shape[-2:]
    dtype = torch.promote_types(x.dtype, lengthscale.dtype)
    # centred before scaling (a constant shift: distances and their gradients are unchanged): the tiles centre z,
    # but a float32 z of inputs with a large offset (dates near 60000 days, lengthscale 1) has lost the digits the
    # offset takes already (1e-3 off in the block means, against 1e-6 for the generic engine, which centres x too)
    x = x.to(dtype)
    x = x - x.detach().mean(-2, keepdim=True)
    z = (x / lengthscale.to(dtype) * form.input_scale).reshape(-1, n, d)
    cuda = z.device.type == "cuda"
    rows = plan.chunk or (TILE_ROWS_CUDA if cuda else TILE_ROWS)
    cols = max(rows, (TILE_COLS_CUDA if cuda else TILE_COLS) // z.shape[0])
    rank, world = plan.rank_and_world()
    return z, _with_blocks(tile_ranges(n, rows, cols)[rank::world], plan.labels)


def _block_slices(tile: Tile) -> tuple[slice, slice]:
    return (
        slice(tile.row_block, tile.row_block + tile.row_blocks),
        slice(tile.col_block, tile.col_block + tile.col_blocks),
    )


def _block_starts(plan: KernelSumsPlan) -> np.ndarray:
    """Where each block starts in the sorted rows, then ``n``. # shape: (k + 1,)"""
    return torch.cat([plan.sizes.new_zeros(1), plan.sizes.cumsum(0)]).to(torch.int64).cpu().numpy()


def _tile_bounds(starts: np.ndarray, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
    """Where each row block and each column block starts in the tile, then its end (for the numba kernel).

    Of the block starts, only the first (at or before the tile's edge) and the last (at or after its end) fall
    outside the tile: they are set, the rest shifted (two ``clip`` calls cost about 4 us each, 3% of a forward).
    """
    rows = starts[tile.row_block : tile.row_block + tile.row_blocks + 1] - tile.r0
    rows[0], rows[-1] = 0, tile.r1 - tile.r0
    cols = starts[tile.col_block : tile.col_block + tile.col_blocks + 1] - tile.c0
    cols[0], cols[-1] = 0, tile.c1 - tile.c0
    return rows, cols


# ============================================================================ segment sums of one tile
def _column_segment_sum(values: Tensor, tile: Tile, labels: Tensor) -> Tensor:
    """Sum the last dimension (the tile's columns) over the column blocks. # shape: (..., C) -> (..., q)

    The columns go first so that ``index_add_`` adds one contiguous row per column.
    """
    lead, cols = values.shape[:-1], values.shape[-1]
    by_column = values.reshape(-1, cols).transpose(0, 1).contiguous()  # (C, rest)
    out = values.new_zeros(tile.col_blocks, by_column.shape[1])
    out.index_add_(0, labels[tile.c0 : tile.c1] - tile.col_block, by_column)
    return out.transpose(0, 1).reshape(*lead, tile.col_blocks)


def _tile_block_sums(values: Tensor, group: _RowGroup, tile: Tile, labels: Tensor) -> Tensor:
    """Sums of a tile's values over its (row block, column block) rectangles, in ``core_dtype``. # shape: (B, m, q)

    ``index_add_`` adds the rows one after another: in float32 the running sums of nearly equal values (a long
    lengthscale) drift by many units in the last place, all the same way, which ``lam = d / s - B_ii`` magnifies.
    """
    bsz, rows, cols = values.shape
    acc = core_dtype(values.dtype)
    per_row_block = values.new_zeros(bsz, tile.row_blocks, cols, dtype=acc)
    if acc == values.dtype:
        per_row_block.index_add_(1, group.local, values)
    else:  # widened a slab of columns at a time: a whole CUDA tile in float64 would take another 1 GB
        step = max(1, _WIDEN_ENTRIES // (bsz * rows))
        for c0 in range(0, cols, step):
            per_row_block[..., c0 : c0 + step].index_add_(1, group.local, values[..., c0 : c0 + step].to(acc))
    return _column_segment_sum(per_row_block, tile, labels)


def _column_combination(h: Tensor, zc: Tensor) -> Tensor:
    r""":math:`z_{ja}^2 H_{0j} - 2 z_{ja} H_{aj} + H_{d + a, j}` from :math:`H = [1, z_p, z_p^2]^\top W`.

    ``h``: (..., 1 + 2d, C); ``zc``: the columns' inputs, (B, C, d). # shape: (..., d, C)
    """
    d = zc.shape[-1]
    zt = zc.transpose(-1, -2)  # (B, d, C)
    if h.dim() == 4:  # one H per row block
        zt = zt.unsqueeze(1)
    return torch.addcmul(h[..., 1 + d :, :], zt.square(), h[..., :1, :]).addcmul_(zt, h[..., 1 : 1 + d, :], value=-2.0)


def _without_self_pairs(weights: Tensor, tile: Tile) -> Tensor:
    r"""``weights`` with a diagonal tile's self pairs (its diagonal, :math:`p = j`) set to 0, in place.

    For the derivative sums only, and only after the value sums have read the tile (RBF's weights are its values):
    every derivative sum is :math:`\sum w_{pj} \Delta z'^2_{pja}`, 0 for a self pair whatever :math:`w_{jj}`
    (RBF, Matern 3/2 and 5/2 have :math:`w = 1` at :math:`\rho = 0`; Matern-1/2's is already 0), so leaving them
    out is exact. Kept in, the expanded form :math:`z_j^2 w_{jj} - 2 z_j w_{jj} z_j + w_{jj} z_j^2` cancels
    catastrophically where :math:`|z_j|` is large: float32, unit-scale inputs and a lengthscale of :math:`10^{-4}`
    gave a lengthscale gradient of about 0.2 where every other pair's weight is 0 and the true gradient is 0. The
    numba kernel forms :math:`(z_{pa} - z_{ja})^2` itself and needs none of this. Tiles right of the diagonal hold
    no self pairs and are returned as they are.
    """
    if not tile.mirror:
        torch.diagonal(weights, dim1=-2, dim2=-1).zero_()
    return weights


def _tile_derivative_sums(weights: Tensor, group: _RowGroup, zc: Tensor, tile: Tile, labels: Tensor) -> Tensor:
    r""":math:`\sum_{p \in I, j \in J} w_{pj} \Delta z'^2_{pja}` per (row block, column block) of a tile.

    One GEMM per row block with its row features, then the column combination and a segment
    sum over the column blocks. Sets the self pairs' weights to 0 (:func:`_without_self_pairs`). # shape: (B, m, d, q)
    """
    weights = _without_self_pairs(weights, tile)
    bounds, feats = group.bounds(), group.features()
    h = torch.stack([torch.bmm(feats[:, :, a:b], weights[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], 1)
    return _column_segment_sum(_column_combination(h, zc), tile, labels)  # (B, m, d, C) -> (B, m, d, q)


def _tile_weights(grad: Tensor, tile: Tile) -> Tensor:
    r"""The incoming gradient on the tile's block pairs, both orders of a pair added. # shape: (B, m, q)

    A diagonal tile holds both orders of its pairs itself; a tile right of the diagonal also
    stands for its transpose, so :math:`G_{IJ} + G_{JI}`.
    """
    rows, cols = _block_slices(tile)
    g = grad[:, rows, cols]
    return g + grad[:, cols, rows].transpose(1, 2) if tile.mirror else g


def _tile_gradient(
    weights: Tensor, grad: Tensor, group: _RowGroup, zc: Tensor, tile: Tile, labels: Tensor, spare: Tensor
) -> Tensor:
    r""":math:`\sum_{p, j} G_{c_p c_j} w_{pj} \Delta z'^2_{pja}` over one tile. # shape: (B, d)

    One GEMM with the row features, :math:`H = [1, z_p, z_p^2]^\top (G \circ w)`, then the
    column combination summed over the columns. When the rows lie in one block, :math:`G` is
    constant down each column and is applied to :math:`H` instead. The self pairs are left out
    (:func:`_without_self_pairs`).
    """
    weights = _without_self_pairs(weights, tile)
    g = _tile_weights(grad, tile)
    bsz, m, q = g.shape
    # spread over the columns: a gather along the last dimension is fast on a 2-d tensor only
    g = g.reshape(bsz * m, q).index_select(1, labels[tile.c0 : tile.c1] - tile.col_block).view(bsz, m, -1)
    if m > 1:  # spread down the rows into the free buffer ``spare``
        weights.mul_(torch.index_select(g, 1, group.local, out=spare))
    h = torch.bmm(group.features(), weights)  # (B, 1 + 2d, C)
    if m == 1:
        h.mul_(g)
    return _column_combination(h, zc).sum(-1)


# ============================================================================ the two passes
#: The largest ``k x k`` float64 accumulator (bytes) kept on CPU after a call, for the next call of the same size
#: (where the numba means freed it). glibc hands freed buffers of tens of megabytes back to the system, so a fresh
#: one pays its page faults on every call: at ``k = 2000`` about 4 ms for its 32 MB, against 1.5 ms to zero a kept
#: one. One buffer at most; 0 keeps none.
SPARE_ACCUMULATOR_BYTES = 64 * 2**20
#: ``{(entries, dtype, made in inference mode): buffer}``: a buffer made under ``torch.inference_mode()`` is an
#: inference tensor, which may not be changed in place outside it (the next ordinary call of that size raised
#: ``RuntimeError: Inplace update to inference tensor outside InferenceMode``), so each mode reuses its own
_SPARE: dict[tuple[int, torch.dtype, bool], Tensor] = {}


def _new_accumulator(bsz: int, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zeroed ``(bsz, k, k)`` accumulator: the spare one where it has that size (and was made in the same
    inference mode), else a new one."""
    if device.type == "cpu":
        key = (bsz * k * k, dtype, torch.is_inference_mode_enabled())
        spare = _SPARE.pop(key, None)  # taken: a concurrent call makes its own
        if spare is not None:
            return spare.view(bsz, k, k).zero_()
    return torch.zeros(bsz, k, k, dtype=dtype, device=device)


def _keep_spare(acc: Tensor) -> None:
    """Keep ``acc``, which nothing reads any more, as the spare accumulator (in place of any other)."""
    if acc.device.type == "cpu" and acc.is_contiguous() and acc.numel() * acc.element_size() <= SPARE_ACCUMULATOR_BYTES:
        _SPARE.clear()
        _SPARE[(acc.numel(), acc.dtype, acc.is_inference())] = acc.reshape(-1)


#: Tiles whose rows span at most this many blocks reduce their derivative sums in forward
#: (one small GEMM per row block); the others are re-evaluated in backward.
MAX_ROW_BLOCKS = 32
#: Bytes of derivative sums kept from forward for backward, at least; tiles past the budget are re-evaluated.
KEPT_DERIVATIVE_BYTES = 64 * 2**20
#: ... and up to this many bytes per block pair (batch x k x k) where that is more: 8, the float64 accumulator's
#: own size, so that keeping them at most doubles the ``k x k`` memory of forward. At ``k = 5000``, ``n = 2x10^4``,
#: ``d = 3`` (150 MB of derivative sums) forward + backward took 363 against 448 ms, 84 MB more peak memory.
KEPT_BYTES_PER_BLOCK_PAIR = 8


class BlockSums(NamedTuple):
    """What :func:`block_sums` returns: the sums, the kept derivative sums, and how they were made."""

    acc: Tensor  # (*batch, k, k) in core_dtype
    kept: dict[int, Tensor]  # {tile index: (B, m, d, q)}
    numba: bool  # the tiles were reduced by the numba kernel
    all_kept: bool  # every tile's derivative sums are in kept (backward evaluates no tile again)


def _kept_shapes(
    tiles: list[Tile], bsz: int, k: int, d: int, itemsize: int, numba: bool, keep_derivatives: bool
) -> dict[int, tuple[int, int, int, int]]:
    """``{tile index: (B, m, d, q)}`` of the tiles whose derivative sums forward keeps: in order, while they fit in
    the budget (:data:`KEPT_DERIVATIVE_BYTES`, or :data:`KEPT_BYTES_PER_BLOCK_PAIR` per block pair where that is
    more), and (torch's reduction) only tiles whose rows span at most :data:`MAX_ROW_BLOCKS` blocks."""
    shapes = {}
    budget = max(KEPT_DERIVATIVE_BYTES, KEPT_BYTES_PER_BLOCK_PAIR * bsz * k * k) if keep_derivatives else 0
    for index, tile in enumerate(tiles):
        shape = (bsz, tile.row_blocks, d, tile.col_blocks)
        size = math.prod(shape) * itemsize
        if size <= budget and (numba or tile.row_blocks <= MAX_ROW_BLOCKS):
            shapes[index] = shape
            budget -= size
    return shapes


def block_sums(
    plan: KernelSumsPlan, form: StationaryForm, lengthscale: Tensor, keep_derivatives: bool = False
) -> BlockSums:
    r"""Unscaled block sums :math:`T_0 = P^\top f(R) P` by tiles and segment sums.

    With ``keep_derivatives``, tiles also reduce their derivative sums (numba: in the same pass, into views of one
    buffer; torch: :func:`_tile_derivative_sums`, for tiles whose rows span at most :data:`MAX_ROW_BLOCKS`
    blocks), while they fit in the budget of :func:`_kept_shapes`; backward then needs no second evaluation of
    them.

    Returns:
        :class:`BlockSums`: the sums and the kept derivative sums. # shapes: (*batch, k, k), {tile: (B, m, d, q)}
    """
    z, tiles = _prepare(plan, form, lengthscale)
    k, bsz = plan.num_blocks, z.shape[0]
    acc = _new_accumulator(bsz, k, core_dtype(z.dtype), z.device)
    kept: dict[int, Tensor] = {}
    numba = jit.usable(z.device, z.dtype, bsz * z.shape[1] ** 2)
    shapes = _kept_shapes(tiles, bsz, k, z.shape[-1], z.element_size(), numba, keep_derivatives)
    if numba and shapes:  # one buffer, so that backward contracts every tile in one parallel launch
        buffer = z.new_empty(sum(math.prod(shape) for shape in shapes.values()))
        offset = 0
        for index, shape in shapes.items():
            kept[index] = buffer[offset : offset + math.prod(shape)].view(shape)
            offset += math.prod(shape)
    starts = _block_starts(plan) if numba else None
    tiler = _TilePass(plan.labels, form, z, tiles)
    for index, tile in enumerate(progress(tiles, plan.show_progress, "kernel block sums")):
        rho2, spare, extra, zc = tiler.distances(tile)
        group = tiler.rows(tile)
        factor = 1.0
        if index in shapes:
            values, weights, factor = form.values_and_weights(rho2, spare, extra, tiler.noise_floor(tile, zc))
        else:
            values, weights = form.values(rho2, spare), None
        if starts is not None:  # values and derivative sums in one read of the tile, added to acc there
            at = (tile.row_block, tile.col_block, tile.mirror)
            bounds = _tile_bounds(starts, tile)
            jit.tile_sums(values, weights, *bounds, group.z, zc, acc, at, factor, out=kept.get(index))
            continue
        sums = _tile_block_sums(values, group, tile, plan.labels).to(acc.dtype)
        if weights is not None:  # after the value sums: this zeroes the self pairs' weights (RBF's are its values)
            kept[index] = factor * _tile_derivative_sums(weights, group, zc, tile, plan.labels)
        rows, cols = _block_slices(tile)
        acc[:, rows, cols] += sums
        if tile.mirror:
            acc[:, cols, rows] += sums.transpose(1, 2)
    if plan.group is not None:
        (acc,) = all_reduce([acc], plan.group)
    batch = torch.broadcast_shapes(plan.x.shape[:-2], lengthscale.shape[:-2])
    # in core_dtype: rounded to z's dtype only after the means
    return BlockSums(acc.reshape(*batch, k, k), kept, numba, keep_derivatives and len(kept) == len(tiles))


def lengthscale_gradient(
    plan: KernelSumsPlan,
    form: StationaryForm,
    lengthscale: Tensor,
    grad_sums: Tensor,
    kept: dict[int, Tensor],
    scaling: jit.GradientScaling | None = None,
) -> Tensor:
    r""":math:`\partial L / \partial \ell` from :math:`G = \partial L / \partial T_0`.

    Kept tiles contract their derivative sums with :math:`G`; the others are evaluated again. With ``scaling``
    (numba, every tile kept), ``grad_sums`` is the gradient :math:`G` is made of as the kernel reads it
    (:func:`bma_gp._kernel_sums.jit.contract_kept`).
    """
    z, tiles = _prepare(plan, form, lengthscale)
    k, bsz, d = plan.num_blocks, z.shape[0], z.shape[-1]
    grad = grad_sums.to(z.dtype).reshape(bsz, k, k)
    acc = z.new_zeros(bsz, d, dtype=core_dtype(z.dtype))
    numba = jit.usable(z.device, z.dtype, bsz * z.shape[1] ** 2)
    if scaling is not None and not (numba and acc.dtype == torch.float64 and len(kept) == len(tiles)):
        raise RuntimeError("lengthscale_gradient: a scaled gradient needs numba and every tile kept")
    if numba and acc.dtype == torch.float64:
        jit.contract_kept(grad, kept, tiles, acc, scaling)
    else:
        for index, derivs in kept.items():
            g = _tile_weights(grad, tiles[index]).to(acc.dtype)
            acc += (g.unsqueeze(2) * derivs).sum((1, 3))
    again = [t for i, t in enumerate(tiles) if i not in kept]
    starts = _block_starts(plan) if again and numba else None
    if starts is not None:
        rows, cols = max(t.row_blocks for t in again), max(t.col_blocks for t in again)
        scratch = z.new_zeros(bsz, rows, cols, dtype=torch.float64)  # the value sums, not needed here
    tiler = _TilePass(plan.labels, form, z, again)
    for tile in progress(again, plan.show_progress, "kernel block sums (backward)"):
        rho2, spare, extra, zc = tiler.distances(tile)
        weights, factor = form.derivative_weights(rho2, spare, extra, tiler.noise_floor(tile, zc))
        if starts is not None:  # the tile's derivative sums, contracted with G (its value sums land in scratch)
            at = (0, 0, False)
            sums = jit.tile_sums(weights, weights, *_tile_bounds(starts, tile), tiler.rows(tile).z, zc, scratch, at)
            assert sums is not None  # weights given: the derivative sums come back
            part = (_tile_weights(grad, tile).to(acc.dtype).unsqueeze(2) * sums).sum((1, 3))
        else:
            part = _tile_gradient(weights, grad, tiler.rows(tile), zc, tile, plan.labels, extra)
        acc += factor * part.to(acc.dtype)
    if plan.group is not None:
        (acc,) = all_reduce([acc], plan.group)
    ls = lengthscale
    g = acc.to(ls.dtype)
    if ls.shape[-1] == 1:  # one lengthscale for every input dimension
        g = g.sum(-1, keepdim=True)
    batch = grad_sums.shape[:-2]
    g = g.reshape(*batch, 1, g.shape[-1]) * (-2.0) / ls
    return sum_to_shape(g, ls.shape)


# ============================================================================ the means, fused
def _unscaled_means(acc: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
    r"""Turn the block sums :math:`T_0` in ``acc`` into the unscaled block means :math:`B_0`, in place.

    :math:`B_{0,ij} = T_{0,ij} / (s_i s_j)`, :math:`B_{0,ii} = (T_{0,ii} - s_i) / (s_i (s_i - 1))` (0 for a
    singleton; :math:`f(0) = 1` on the diagonal) and :math:`\lambda_{0,i} = 1 - B_{0,ii}`. Two in-place passes over
    ``acc`` and no ``k x k`` temporary: at ``k = 2000`` each fresh 32 MB float64 temporary costs about as much as
    the pass itself in page faults.

    Returns:
        (lam0, within): :math:`\lambda_0` and :math:`s_i (s_i - 1)`, in ``acc``'s dtype. # shapes: (*batch, k), (k,)
    """
    s = sizes.to(acc.dtype)
    diag = acc.diagonal(dim1=-2, dim2=-1)
    t_ii = diag.clone()
    inv = s.reciprocal()  # two multiplications per entry: 1.1 against 2.0 ms for two divisions at k = 2000 (float64)
    acc.mul_(inv.unsqueeze(-1)).mul_(inv)
    within = s * (s - 1)
    b_ii = torch.where(within > 0, (t_ii - s) / within.clamp_min(1), torch.zeros_like(t_ii))
    diag.copy_(b_ii)
    return 1 - b_ii, within


def _scaled(
    acc: Tensor, lam0: Tensor, scale: Tensor | None, dtype: torch.dtype, rounded: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(scale * lam0, scale * B0)`` in ``dtype``; ``acc`` (``B0``) is left as it is, and so is ``rounded`` (``B0``
    already in ``dtype``, which backward keeps: ``B`` is then one product of it)."""
    if scale is None:
        return lam0.to(dtype), acc.to(dtype)
    sc = scale.to(acc.dtype)
    lam = (lam0 * sc.unsqueeze(-1)).to(dtype)
    sc = sc.to(dtype).unsqueeze(-1).unsqueeze(-1)
    if rounded is not None:
        return lam, rounded * sc
    if dtype == acc.dtype or torch.broadcast_shapes(acc.shape, sc.shape) != acc.shape:
        return lam, acc.to(dtype) * sc  # acc stays B0 (saved for backward)
    # rounded, then scaled in place: 2.4 ms at k = 2000 against 5.7 ms for one multiplication into a float32 out=
    return lam, acc.to(dtype).mul_(sc)


def _batch_scale(scale: Tensor | None, batch: torch.Size) -> Tensor | None:
    """``scale`` as one value per entry of ``batch`` (flattened), or ``None`` where it is not one value or one per
    entry (a wider outputscale batch broadcasts the means: the torch path)."""
    if scale is None:
        return None
    if scale.numel() == 1 or scale.shape == batch:
        return scale.reshape(-1).expand(math.prod(batch)) if scale.numel() > 1 or batch else scale.reshape(1)
    return None


def _means(
    acc: Tensor, sizes: Tensor, scale: Tensor | None, dtype: torch.dtype, keep_unscaled: bool, numba: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """``(lam, B, lam0, within, B0)`` from the float64 block sums ``acc``: in one parallel numba pass where the tiles
    were reduced by numba and ``k x k`` is large (:func:`bma_gp._kernel_sums.jit.block_means`, 1.8 against 4.2 ms
    at ``k = 2000``), else by :func:`_unscaled_means` and :func:`_scaled` (which overwrite ``acc``); the same
    values either way. ``B0`` (the unscaled means in ``dtype``) only with ``keep_unscaled`` and a scale."""
    batch, k = acc.shape[:-2], acc.shape[-1]
    flat_scale = _batch_scale(scale, batch)
    fused = (
        numba
        and acc.dtype == torch.float64
        and (scale is None or flat_scale is not None)
        and acc.numel() >= jit.MEANS_MIN_ENTRIES
    )
    if not fused:
        lam0, within = _unscaled_means(acc, sizes)
        B0 = acc.to(dtype) if keep_unscaled and scale is not None else None
        lam, B = _scaled(acc, lam0, scale, dtype, rounded=B0)
        return lam, B, lam0, within, B0
    s = sizes.to(acc.dtype)
    B, B0, lam0 = jit.block_means(acc.reshape(-1, k, k), sizes, flat_scale, dtype, keep_unscaled and scale is not None)
    _keep_spare(acc)  # read for the last time: the next call of this size reuses it
    lam0 = lam0.reshape(*batch, k)
    lam = (lam0 * scale.to(acc.dtype).unsqueeze(-1)).to(dtype) if scale is not None else lam0.to(dtype)
    B0 = B0.reshape(*batch, k, k) if B0 is not None else None
    return lam, B.reshape(*batch, k, k), lam0, s * (s - 1), B0


@reverse_mode_only("kernel_block_mean (the stationary engine)")
class StationaryBlockMeans(torch.autograd.Function):
    r"""The block means :math:`(\lambda, B)` of :math:`\sigma^2 f(R)` in the kernel's dtype, differentiable in the
    lengthscale and the outputscale :math:`\sigma^2`.

    The same values as :func:`~bma_gp.approximation.block_mean_from_sums` on :math:`\sigma^2 T_0` and
    :math:`\sigma^2 s`, with the ``k x k`` steps fused: the float64 sums become means in place and are rounded once,
    and backward turns :math:`\partial L / \partial B` into :math:`\partial L / \partial T_0` in one product. At
    ``k = 2000`` this replaced about 80 ms of ``k x k`` passes (scale, outer product of sizes, division, diagonal
    scatter, cast, and their backward) out of a 0.46 s forward and backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        plan: KernelSumsPlan,
        form: StationaryForm,
        dtype: torch.dtype,
        lengthscale: Tensor,
        outputscale: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        sums = block_sums(plan, form, lengthscale, keep_derivatives=ctx.needs_input_grad[3])
        sums_shape = sums.acc.shape
        # dL/dsc = <dL/dB, B0> + <dL/dlam, lam0> in backward, with <dL/dB, B0> = <dL/dB, B> / sc: B0 is kept (a
        # second k x k tensor, 3-4 ms at k = 2000 with its page faults) only where a scale is 0
        wanted = outputscale is not None and ctx.needs_input_grad[4]
        keep = outputscale is not None and wanted and bool(torch.eq(outputscale, 0).any())
        lam, B, lam0, within, B0 = _means(sums.acc, plan.sizes, outputscale, dtype, keep, sums.numba)
        ctx.plan, ctx.form, ctx.kept, ctx.sums_shape = plan, form, sums.kept, sums_shape
        ctx.all_kept = sums.numba and sums.all_kept
        ctx.scaled = outputscale is not None
        ctx.divide = B0 is None  # rest[1] is B (divide by the scale), else B0
        saved: list[Tensor] = [lengthscale, within]
        if outputscale is not None:
            saved.append(outputscale)
            if wanted:
                saved += [B0 if B0 is not None else B, lam0]
        ctx.save_for_backward(*saved)
        ctx.set_materialize_grads(False)  # a loss of lam alone hands backward no k x k zeros
        return lam, B

    @staticmethod
    @unbatched_backward("kernel_block_mean (the stationary engine)")
    @first_order_only("kernel_block_mean (the stationary engine)")
    def backward(ctx: Any, grad_lam: Tensor | None, grad_B: Tensor | None) -> tuple[Any, ...]:
        lengthscale, within, *rest = ctx.saved_tensors
        outputscale: Tensor | None = rest[0] if ctx.scaled else None
        grad_ls = grad_scale = None
        if grad_lam is None and grad_B is None:
            return None, None, None, None, None
        if ctx.needs_input_grad[3]:  # dL/dT0 = sc dL/dB_ij / (s_i s_j); on the diagonal sc (dL/dB_ii - dL/dlam_i) / w_i
            scaling = _gradient_scaling(ctx, grad_lam, grad_B, outputscale, within)
            if scaling is not None:  # the numba contraction applies it as it reads dL/dB: no k x k pass here
                assert grad_B is not None  # _gradient_scaling needs it
                grad = grad_B
            else:
                grad = sum_to_shape(_sums_gradient(ctx, grad_lam, grad_B, outputscale, within), ctx.sums_shape)
            grad_ls = lengthscale_gradient(ctx.plan, ctx.form, lengthscale, grad, ctx.kept, scaling)
        if ctx.needs_input_grad[4]:  # dL/dsc = <dL/dB, B0> + <dL/dlam, lam0>
            assert outputscale is not None  # a gradient for it was asked for
            means, lam0 = rest[1], rest[2]  # B (then <dL/dB, B> / sc) or B0
            total: Tensor | int = 0
            if grad_B is not None:
                wide = torch.float64 if grad_B.dtype == torch.float32 else grad_B.dtype
                if grad_B.dim() == 2 and grad_B.is_contiguous() and means.is_contiguous():  # no k x k product formed
                    total = torch.dot(grad_B.view(-1).to(wide), means.view(-1).to(wide))
                else:
                    total = (grad_B.to(wide) * means.to(wide)).sum((-2, -1))
                if ctx.divide:
                    total = total / outputscale.to(grad_B.dtype)
            if grad_lam is not None:
                total = total + (grad_lam * lam0.to(grad_lam.dtype)).sum(-1)
            grad_scale = sum_to_shape(
                torch.as_tensor(total, dtype=outputscale.dtype, device=outputscale.device), outputscale.shape
            )
        return None, None, None, grad_ls, grad_scale


def _sums_gradient(
    ctx: Any, grad_lam: Tensor | None, grad_B: Tensor | None, outputscale: Tensor | None, within: Tensor
) -> Tensor:
    r""":math:`G = \partial L / \partial T_0`: :math:`\sigma^2 G^B_{ij} / (s_i s_j)` off the diagonal,
    :math:`\sigma^2 (G^B_{ii} - G^\lambda_i) / (s_i (s_i - 1))` on it (0 for a singleton)."""
    ref = grad_B if grad_B is not None else grad_lam
    assert ref is not None  # one of them is given (checked by backward)
    k = within.shape[-1]
    sc = outputscale.to(ref.dtype) if outputscale is not None else ref.new_ones(())
    inv = ctx.plan.sizes.to(ref.dtype).reciprocal()
    gB = grad_B if grad_B is not None else ref.new_zeros(*ref.shape, k)
    g = gB * inv.unsqueeze(-1)
    g.mul_(inv * sc.unsqueeze(-1).unsqueeze(-1))
    g_ii = gB.diagonal(dim1=-2, dim2=-1) - (grad_lam if grad_lam is not None else 0)
    g.diagonal(dim1=-2, dim2=-1).copy_(_diagonal_gradient(g_ii, sc.unsqueeze(-1), within))
    return g


def _diagonal_gradient(g_ii: Tensor, sc: Tensor, within: Tensor) -> Tensor:
    r""":math:`\sigma^2 (G^B_{ii} - G^\lambda_i) / (s_i (s_i - 1))` from ``g_ii`` (the difference), in its dtype; 0 for
    a singleton (``within`` = :math:`s_i (s_i - 1)` = 0)."""
    w = within.to(g_ii.dtype)
    return torch.where(w > 0, g_ii * sc / w.clamp_min(1), torch.zeros_like(g_ii))


def _gradient_scaling(
    ctx: Any, grad_lam: Tensor | None, grad_B: Tensor | None, outputscale: Tensor | None, within: Tensor
) -> jit.GradientScaling | None:
    """:func:`_sums_gradient` as factors the numba contraction applies to ``grad_B`` while it reads it (float64),
    or ``None`` where that does not apply: tiles evaluated again in backward, no ``grad_B``, or batch shapes that
    :func:`_sums_gradient` sums over."""
    if not ctx.all_kept or grad_B is None or grad_B.shape != ctx.sums_shape:
        return None
    batch, k = grad_B.shape[:-2], grad_B.shape[-1]
    sc = _batch_scale(outputscale, batch)
    if outputscale is not None and sc is None:
        return None
    nb = math.prod(batch)
    sc = sc.to(torch.float64).expand(nb) if sc is not None else grad_B.new_ones(nb, dtype=torch.float64)
    inv = ctx.plan.sizes.to(torch.float64).reciprocal()
    g_ii = grad_B.diagonal(dim1=-2, dim2=-1).reshape(nb, k).to(torch.float64)
    if grad_lam is not None:
        g_ii = g_ii - grad_lam.reshape(nb, k)
    diag = _diagonal_gradient(g_ii, sc.unsqueeze(-1), within)
    return jit.GradientScaling(inv, sc.contiguous(), diag)


def stationary_block_means(plan: KernelSumsPlan, form: StationaryForm, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    r"""``(lam, B)`` of the kernel's block mean approximation in ``dtype``, by :class:`StationaryBlockMeans` when a
    gradient can be asked for. A lengthscale or outputscale that carries a forward-mode tangent or a ``torch.func``
    wrapper (it reports ``requires_grad=False``) is refused in words, not evaluated without its tangent.
    # shapes: (*batch, k), (*batch, k, k)"""
    lengthscale = form.base.lengthscale
    outputscale = form.scale.outputscale if form.scale is not None else None
    refuse_tangents("kernel_block_mean (the stationary engine)", lengthscale, outputscale)
    wanted = lengthscale.requires_grad or (outputscale is not None and outputscale.requires_grad)
    if torch.is_grad_enabled() and wanted:
        return StationaryBlockMeans.apply(plan, form, dtype, lengthscale, outputscale)
    with torch.no_grad():
        sums = block_sums(plan, form, lengthscale)
        lam, B, *_ = _means(sums.acc, plan.sizes, outputscale, dtype, False, sums.numba)
        return lam, B
