"""Block-mean AdaGrad: full-matrix AdaGrad with a block mean correlation matrix.

The math core is two pure functions, :func:`normalised_correlation` (the block mean
matrix :math:`F` from the streamed block sums) and :func:`inverse_root`
(:math:`(F + \\delta I)^{-1/2}`); both go through :class:`bma_gp.BlockMeanLinearOperator`,
which holds the closed-form algebra. :class:`BlockMeanAdagrad` is the bookkeeping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bma_gp import BlockMeanLinearOperator, Partition, block_mean_from_sums
from optim import _fused
from optim.flat_optimizer import FlatPreconditionedOptimizer, _non_finite_message, check_hyperparameter
from optim.flat_params import FlatParams
from optim.param_partition import ParamBlocks, check_partition_rule

__all__ = ["BlockMeanAdagrad", "inverse_root", "normalised_correlation"]


def normalised_correlation(U: Tensor, w: Tensor, partition: Partition) -> BlockMeanLinearOperator:
    r"""The block mean correlation matrix :math:`F` of the normalised gradients.

    :math:`\tilde F` is the Frobenius-nearest block mean matrix of
    :math:`N = \sum_\tau n_\tau n_\tau^\top` (SPEC section 2), computed from its
    block sums :math:`U = P^\top N P` and :math:`w = P^\top \operatorname{diag}(N)`.
    It is rescaled to unit mean diagonal in every block,

    .. math::

        F = D^{-1/2} \tilde F D^{-1/2}, \quad D = \operatorname{diag}(w / s), \qquad
        \lambda^F_i = \tilde\lambda_i / d_i, \quad B^F_{ij} = \tilde B_{ij} / \sqrt{d_i d_j},

    which keeps the block mean structure and positive semidefiniteness. A block
    with :math:`w_i = 0` (no gradient yet) is the identity in :math:`F`
    (:math:`\lambda^F_i = 1`, row and column :math:`i` of :math:`B^F` zero).

    Args:
        U: block sums of :math:`N`. # shape: (k, k)
        w: block sums of its diagonal. # shape: (k,)
        partition: the partition of the ``d`` parameter entries into ``k`` blocks.
    """
    F_tilde = block_mean_from_sums(U, w, partition)
    d = w / partition.sizes.to(w.dtype)
    seen = d > 0
    d_safe = torch.where(seen, d, torch.ones_like(d))
    lam = torch.where(seen, F_tilde.lam / d_safe, torch.ones_like(d))
    scale = torch.where(seen, d_safe.rsqrt(), torch.zeros_like(d))
    B = F_tilde.B * scale.unsqueeze(-1) * scale.unsqueeze(-2)
    return BlockMeanLinearOperator(lam, B, partition)


def inverse_root(F: BlockMeanLinearOperator, damping: float) -> BlockMeanLinearOperator:
    r""":math:`(F + \delta I)^{-1/2}` as a block mean operator, without validation (no host sync).

    With ``damping`` :math:`\delta = 0` and a singular :math:`F` the result holds ``inf``/``nan``.
    """
    return F.add_diagonal(damping).matrix_inv_sqrt(check=False)


class BlockMeanAdagrad(FlatPreconditionedOptimizer):
    r"""Block-mean AdaGrad (Lu, Harandi, Hartley and Pascanu, 2018), in the form of SPEC section 3.

    Full-matrix AdaGrad preconditions with :math:`H_t^{-1/2}`,
    :math:`H_t = \sum_{\tau \le t} g_\tau g_\tau^\top` (:math:`d \times d`). Here
    :math:`H_t \approx Z F Z` with :math:`Z` diagonal and :math:`F` a *block mean*
    matrix over a partition of the :math:`d` parameter entries into :math:`k` blocks,
    streamed exactly in :math:`O(d + k^2)` memory. With :math:`g_t` the concatenated
    gradient of all parameters (all groups, in order) and :math:`P` the
    :math:`d \times k` block indicator matrix:

    .. math::

        h_t &= h_{t-1} + g_t^2, \qquad z_t = \sqrt{h_t} + \epsilon, \qquad
        n_t = g_t / z_t, \\
        U_t &= U_{t-1} + (P^\top n_t)(P^\top n_t)^\top, \qquad
        w_t = w_{t-1} + P^\top (n_t^2), \\
        F_t &= D^{-1/2} \operatorname{blockmean}(N_t) D^{-1/2}, \qquad
        D = \operatorname{diag}(w_t / s), \qquad N_t = \textstyle\sum_\tau n_\tau n_\tau^\top, \\
        u_t &= z_t^{-1/2} \odot \bigl[(F_t + \delta I)^{-1/2} (z_t^{-1/2} \odot g_t)\bigr], \\
        \theta_t &= \theta_{t-1} - \mathrm{lr}\,(u_t + \mathrm{wd}\,\theta_{t-1}).

    :math:`N_t` is never formed: :math:`\operatorname{blockmean}(N_t)` needs only
    :math:`U_t` and :math:`w_t` (see :func:`normalised_correlation`), and the inverse
    square root is the closed form of :class:`bma_gp.BlockMeanLinearOperator`
    (:math:`O(k^3)`), recomputed every ``update_interval`` steps (the stale root is
    applied in between). With :math:`F = I` and :math:`\delta = 0` the update is
    exactly ``torch.optim.Adagrad``'s :math:`\mathrm{lr}\, g_t / (\sqrt{h_t} + \epsilon)`.
    Entries whose gradient has always been exactly zero (:math:`h = 0`) are not
    moved (their :math:`z^{-1/2}` is taken as 0 rather than :math:`\epsilon^{-1/2}`,
    which would amplify the coupling term by up to :math:`10^5`).

    The step (for ``"tensor"`` and ``"row"``) reads each gradient where it is, runs the
    elementwise chain and the block sums tensor by tensor, then adds :math:`u` into the
    parameters: about twenty passes over the :math:`d` entries in eager PyTorch where
    ``torch.optim.Adagrad`` makes about eleven. With ``fused=True`` the step is two
    ``torch.compile``'d loops instead (seven passes; see :mod:`optim._fused`).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate (per group). Default: ``1e-2``.
        eps: :math:`\epsilon`, added after the square root as in torch's Adagrad.
            Default: ``1e-10``.
        damping: :math:`\delta \ge 0` added to :math:`F` before the inverse root;
            with ``0`` a singular :math:`F` (e.g. after one step) gives ``inf``/``nan``.
            Default: ``0.1``.
        partition: the blocks of :math:`F`: ``"tensor"`` (one block per parameter
            tensor, the paper's choice), ``"row"`` (one block per slice along dim 0
            of every tensor with two or more dims, one block per other tensor) or a
            callable ``f(param) -> LongTensor`` with a block id in ``0 .. k_p - 1``
            for each of the ``param.numel()`` entries (row-major). Default: ``"tensor"``.
        update_interval: recompute :math:`(F + \delta I)^{-1/2}` every this many
            steps. Default: ``1``.
        weight_decay: decoupled weight decay, applied after preconditioning
            (per group). Default: ``0``.
        maximize: ascend instead of descend (per group). Default: ``False``.
        check_finite: raise ``ValueError`` on an inf/nan gradient before any state or
            parameter changes. This costs one sum over the gradients and reads it back
            from the device every step: the step's one host synchronisation (it also
            reads whether some entry of :math:`h` is still 0, see above). ``False`` skips
            it, and the step then has no host synchronisation on an accelerator; a
            non-finite gradient then turns the state into ``nan`` (on CPU the
            eigendecomposition of the ``k x k`` core may raise
            ``torch.linalg.LinAlgError``). Default: ``True``.
        fused: run the step as two ``torch.compile``'d passes over the parameters
            (``"tensor"`` and ``"row"`` partitions only): pass 1 reduces the block sums and the
            finiteness flag without writing, pass 2 writes ``h`` and the parameters. Same
            results to rounding, same state (checkpoints move between both modes), about half
            the eager step's time at millions of parameters; the first step of each new
            parameter structure compiles for a few seconds (cached on disk by PyTorch). Where
            ``torch.compile`` fails (the CPU backend needs a C++ compiler) the same passes run
            eagerly, with one ``RuntimeWarning``. Like ``torch.optim``'s ``fused``, it is
            opt-in. Default: ``False``.

    State: ``state[p]["sum"]`` is :math:`h` of parameter ``p`` (as in
    ``torch.optim.Adagrad``; a view of one flat buffer). :attr:`global_state` holds
    ``U`` (:math:`k \times k`), ``w`` (:math:`k`), ``step``, and the cached root
    (``root_lam``, ``root_B``, ``root_step``), all in float32 or the widest
    parameter dtype; :meth:`state_dict` saves it under ``"global_state"`` and
    :meth:`load_state_dict` restores it exactly. ``add_param_group`` appends the new
    parameters' blocks after the existing ones: ``U`` and ``w`` grow by zero
    padding (the new blocks start with no statistics, i.e. as identity blocks of
    :math:`F`) and the root is recomputed at the next step.

    Raises:
        ValueError: invalid hyperparameters or partition (``TypeError`` for a
            partition of the wrong type).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = BlockMeanAdagrad(model.parameters(), lr=0.1)
        >>> loss = model(torch.randn(8, 4)).pow(2).mean()
        >>> loss.backward()
        >>> opt.step()

    Reference:
        Jie Lu, Mehrtash Harandi, Richard Hartley, Razvan Pascanu (2018),
        "Block Mean Approximation for Efficient Second Order Optimization",
        arXiv:1804.05484.
    """

    _flat_state_keys = ("sum",)

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        eps: float = 1e-10,
        damping: float = 0.1,
        partition: str | Callable[[Tensor], Tensor] = "tensor",
        update_interval: int = 1,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        check_finite: bool = True,
        fused: bool = False,
    ):
        check_hyperparameter("learning rate", lr)
        check_hyperparameter("eps", eps)
        check_hyperparameter("damping", damping)
        check_hyperparameter("update_interval", update_interval, positive=True, integer=True)
        check_hyperparameter("weight_decay", weight_decay)
        check_partition_rule(partition)
        if not isinstance(maximize, bool):
            raise ValueError(f"Invalid maximize value: {maximize!r}; it must be True or False.")
        if not isinstance(fused, bool):
            raise ValueError(f"Invalid fused value: {fused!r}; it must be True or False.")
        if fused and callable(partition):
            raise ValueError(
                "fused=True supports partition='tensor' and partition='row' (blocks that are rows of each "
                "parameter); with a callable partition use fused=False."
            )
        self.fused = fused
        self.eps = float(eps)
        self.damping = float(damping)
        self.partition_rule = partition
        self.update_interval = update_interval
        self._root: BlockMeanLinearOperator | None = None
        self._h_has_zero = True
        defaults = dict(lr=lr, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, check_finite=check_finite)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("fused", False)
        self._root = None
        self._h_has_zero = True

    # ------------------------------------------------------------------ structure and state
    def _prepare_layout(self, layout: FlatParams) -> None:
        layout.blocks = ParamBlocks(layout.params, self.partition_rule)
        layout.partition = layout.blocks.partition

    @property
    def partition(self) -> Partition | None:
        """The partition of all parameter entries (built at the first step)."""
        return None if self._layout is None else self._layout.partition

    def _init_global_state(self, layout: FlatParams) -> dict[str, Any]:
        k = layout.partition.num_blocks
        zeros = dict(dtype=layout.dtype, device=layout.device)
        return {"step": 0, "U": torch.zeros(k, k, **zeros), "w": torch.zeros(k, **zeros),
                "root_lam": None, "root_B": None, "root_step": None}

    def _fit_global_state(self, state: dict[str, Any], layout: FlatParams) -> dict[str, Any]:
        self._h_has_zero = True
        k = layout.partition.num_blocks
        U = state["U"].to(device=layout.device, dtype=layout.dtype)
        w = state["w"].to(device=layout.device, dtype=layout.dtype)
        k_old = w.shape[-1]
        if k_old > k or U.shape != (k_old, k_old):
            raise ValueError(
                f"the optimizer state has {k_old} blocks but the parameters now form {k} blocks; load a "
                "state_dict only into an optimizer with the same parameters and partition rule."
            )
        new = dict(state, U=U, w=w)
        if k_old < k:
            new["U"] = torch.zeros(k, k, dtype=U.dtype, device=U.device)
            new["U"][:k_old, :k_old] = U
            new["w"] = torch.cat([w, w.new_zeros(k - k_old)])
            new.update(root_lam=None, root_B=None, root_step=None)
        elif state.get("root_lam") is not None:
            new["root_lam"] = state["root_lam"].to(device=layout.device, dtype=layout.dtype)
            new["root_B"] = state["root_B"].to(device=layout.device, dtype=layout.dtype)
        self._root = None
        return new

    def _root_operator(self, partition: Partition) -> BlockMeanLinearOperator:
        """The cached :math:`(F + \\delta I)^{-1/2}`, recomputed every ``update_interval`` steps."""
        st = self.global_state
        due = st["root_lam"] is None or (st["step"] - st["root_step"]) >= self.update_interval
        if due:
            root = inverse_root(self._correlation(st["U"], st["w"], partition), self.damping)
            st.update(root_lam=root.lam, root_B=root.B, root_step=st["step"])
            self._root = root
        elif self._root is None:
            self._root = BlockMeanLinearOperator(st["root_lam"], st["root_B"], partition)
        return self._root

    # test hook: the correlation matrix F (replaced by the identity to recover torch.optim.Adagrad)
    _correlation = staticmethod(normalised_correlation)

    # ------------------------------------------------------------------ the update
    def _update_from_grads(self, grads: list[Tensor | None], layout: FlatParams, active: list[bool]) -> None:
        if layout.blocks.rows is None:  # scattered blocks: flat vectors and the operator as it is
            super()._update_from_grads(grads, layout, active)
            return
        st = self.global_state
        h = self._flat["sum"]
        views = layout.__dict__.get("_contiguous_views")
        if views is None or views.h_buffer is not h:
            views = layout._contiguous_views = _ContiguousViews(layout, h)
        if self.fused and any(g is not None and views.shape[i] is not None for i, g in enumerate(grads)):
            self._fused_update(grads, layout, views, active)
            return
        st["step"] += 1
        dtype, maximize = layout.dtype, self._maximize_of_group()
        mask = self._masking_needed(h)
        big = _unmask_scale(dtype) if mask else 0.0
        sums = views.sums  # columns: per block P^T v (v = z^{-1/2} g), P^T n, P^T n^2
        sums.zero_()
        offsets = layout.blocks.block_offsets
        for i, g in enumerate(grads):
            if g is None or views.shape[i] is None:
                continue
            # g as the parameter's (rows, cols) block matrix, read where it is (no gather)
            if g.dtype != dtype:
                g = g.to(dtype)
            if maximize[layout.group_index[i]]:
                g = -g
            g = g.view(views.shape[i]) if g.is_contiguous() else g.reshape(views.shape[i])
            h_i, n_i, r_i = views.h[i], views.n[i], views.r[i]
            h_i.addcmul_(g, g)  # h += g^2
            _normalise(g, h_i, n_i, r_i, self.eps, views.scratch(layout, i) if mask else None, big)
            if g.shape[0] == 1:
                torch.stack([torch.dot(g[0], r_i[0]), n_i.sum(), torch.dot(n_i[0], n_i[0])], out=sums[offsets[i]])
            else:
                torch.stack([torch.linalg.vecdot(g, r_i), n_i.sum(-1), torch.linalg.vecdot(n_i, n_i)], dim=-1,
                            out=sums[offsets[i]:offsets[i + 1]])
        v_sums, n_sums, n_sq = sums.unbind(-1)
        st["U"].addr_(n_sums, n_sums)
        st["w"].add_(n_sq)
        root = self._root_operator(layout.partition)
        # u = z^{-1/2} [lam_R v + P B_R P^T v] = lam_R[c] n + (B_R P^T v)[c] r, c the block of each entry
        coef = torch.stack([root.lam, root.B @ v_sums], dim=-1)  # (k, 2)
        self._apply_contiguous(layout, views, active, coef)

    def _fused_update(self, grads: list[Tensor | None], layout: FlatParams, views: _ContiguousViews,
                      active: list[bool]) -> None:
        """The step as two compiled passes over the parameters (:mod:`optim._fused`); ``fused=True``."""
        st = self.global_state
        maximize = self._maximize_of_group()
        present = [i for i, g in enumerate(grads) if g is not None and views.shape[i] is not None]
        gs = [grads[i].neg() if maximize[layout.group_index[i]] else grads[i] for i in present]
        hs = [views.h[i] for i in present]
        sums, flag = _fused.compiled("block_sums")(gs, hs, self.eps)
        if self.check_finite and not bool(flag):  # the step's one host synchronisation
            raise ValueError(_non_finite_message(type(self).__name__))
        st["step"] += 1
        offsets = layout.blocks.block_offsets
        if len(present) < len(offsets) - 1:  # some parameters had no gradient: their blocks' sums are 0
            full = views.sums.zero_()
            row = 0
            for i in present:
                a, b = offsets[i], offsets[i + 1]
                full[a:b] = sums[row:row + b - a]
                row += b - a
            sums = full
        v_sums, n_sums, n_sq = sums.unbind(-1)
        st["U"].addr_(n_sums, n_sums)
        st["w"].add_(n_sq)
        root = self._root_operator(layout.partition)
        # theta <- (1 - lr wd) theta - lr [lam_R[c] n + (B_R P^T v)[c] r], per block c
        coef = torch.stack([root.lam, root.B @ v_sums, torch.ones_like(v_sums)], dim=-1)
        for lr, wd, indices in self._active_by_group(layout, active):
            a, b = offsets[indices[0]], offsets[indices[-1] + 1]
            coef[a:b, :2] *= -lr
            if wd:
                coef[a:b, 2] = 1.0 - lr * wd
        _fused.compiled("apply_update")(gs, hs, [layout.params[i] for i in present],
                                        [coef[offsets[i]:offsets[i + 1]] for i in present], self.eps)

    def _apply_contiguous(self, layout: FlatParams, views: _ContiguousViews, active: list[bool], coef: Tensor) -> None:
        """theta <- theta - lr (u + wd theta), u = coef[c, 0] n + coef[c, 1] r, for parameters with a gradient."""
        offsets = layout.blocks.block_offsets
        for lr, wd, indices in reversed(list(self._active_by_group(layout, active))):
            for i in reversed(indices):  # the tensors of pass 1 last to first: their n and r may still be in cache
                if views.shape[i] is None:
                    continue
                p = layout.params[i]
                if wd:
                    p.mul_(1.0 - lr * wd)
                c = coef[offsets[i]:offsets[i + 1]]
                if views.nr[i] is not None and p.is_contiguous() and p.dtype == layout.dtype:
                    # one block: both terms in one pass, p += -lr [n r] @ c
                    p.view(-1).addmv_(views.nr[i], c[0], alpha=-lr)
                    continue
                n, r = views.n[i], views.r[i]
                if p.is_contiguous():
                    p.view(n.shape).addcmul_(n, c[:, :1], value=-lr).addcmul_(r, c[:, 1:], value=-lr)
                else:
                    p.add_(torch.addcmul(n * c[:, :1], r, c[:, 1:]).view(p.shape).to(p.dtype), alpha=-lr)

    def _update(self, g: Tensor, layout: FlatParams, active: list[bool]) -> None:
        """The scattered-block update on the flat gradient ``g`` (maximize groups already negated)."""
        st = self.global_state
        st["step"] += 1
        h = self._flat["sum"]
        mask = self._masking_needed(h)
        h.addcmul_(g, g)
        n, r = layout.buffer("nr", rows=2).unbind(0)
        _normalise(g, h, n, r, self.eps, layout.buffer("q") if mask else None, _unmask_scale(h.dtype))
        partition = layout.partition
        n_sums = partition.block_sum(n)
        st["U"].addr_(n_sums, n_sums)
        st["w"].add_(partition.block_sum(n.square_()))
        root = self._root_operator(partition)
        self._apply(layout, (root @ g.mul_(r)).mul_(r), active)

    def _masking_needed(self, h: Tensor) -> bool:
        """Whether some entry of ``h`` (before this step's update) may be 0, so that z^{-1/2} must be zeroed.

        h only grows, so once every entry is positive this stays False. With ``check_finite`` the smallest
        entry was read back together with the finiteness flag (one host synchronisation). Without it, a
        CPU ``h`` is read directly (no synchronisation exists there); on other devices nothing is read
        and the (exact, cheap) masking runs every step.
        """
        if self._h_has_zero and not self.check_finite:
            if h.device.type != "cpu":
                return True
            self._h_has_zero = bool(h.numel()) and bool(h.amin() == 0)
        return self._h_has_zero

    def _checks_finite_in_update(self) -> bool:
        return self.fused  # pass 1 of the fused step reads the gradients anyway and writes nothing

    def _values_to_read_back(self) -> list[Tensor]:
        h = self._flat.get("sum")
        if self.fused:
            return []  # the fused passes mask h = 0 themselves
        if self._h_has_zero and h is not None and h.numel():
            return [h.amin()]
        return []

    def _values_read_back(self, values: list[float]) -> None:
        if values:
            self._h_has_zero = values[0] == 0


def _normalise(g: Tensor, h: Tensor, n: Tensor, r: Tensor, eps: float, scratch: Tensor | None,
               big: float) -> None:
    """In place, with ``z = sqrt(h) + eps`` (``h`` already holds this step's sum): ``n = g / z`` and
    ``r = z^{-1/2}``. With a ``scratch`` buffer of ``h``'s shape, also ``r = 0`` where ``h = 0``.

    The mask is exact and needs no boolean tensor: ``min(z^{-1/2}, sqrt(h) * big)`` is ``z^{-1/2}``
    for every ``h > 0`` (``big`` from :func:`_unmask_scale` clears even the smallest subnormal) and
    0 for ``h = 0``.
    """
    if scratch is not None:
        torch.sqrt(h, out=scratch)
        torch.add(scratch, eps, out=r)
    else:
        torch.sqrt(h, out=r).add_(eps)
    torch.div(g, r, out=n)
    r.rsqrt_()
    if scratch is not None:
        r.clamp_(max=scratch.mul_(big))


def _unmask_scale(dtype: torch.dtype) -> float:
    """A power of two ``big`` with ``sqrt(h) * big >= (sqrt(h) + eps)^{-1/2}`` for every representable h > 0.

    The worst case is the smallest subnormal h with ``eps = 0``: ``sqrt(h) * big = 2^{e/2} big`` against
    ``2^{-e/4}`` (``e`` its exponent, -149 in float32, -1074 in float64). ``big = 2^{m - 9}``, ``m`` the
    exponent of the largest finite value, clears it by more than ``2^7`` in both.
    """
    return 2.0 ** (math.frexp(torch.finfo(dtype).max)[1] - 9)


class _ContiguousViews:
    """Views of the flat buffers for the contiguous rules, built once per layout and state buffer.

    Per parameter: its ``(rows, cols)`` block matrix of h, n and r and, for a one-block parameter,
    the ``(numel, 2)`` matrix ``[n r]``: ``n`` and ``r`` are the two rows of one ``(2, d)`` work
    buffer, so that the update of such a parameter is one matrix-vector product.
    """

    def __init__(self, layout: FlatParams, h: Tensor):
        self.h_buffer = h
        nr = layout.buffer("nr", rows=2)
        blocks = layout.blocks
        count = len(layout.numels)
        self.shape: list[tuple[int, int] | None] = [None] * count
        self.h: list[Tensor | None] = [None] * count
        self.n, self.r, self.nr = list(self.h), list(self.h), list(self.h)
        for i in range(count):
            a, b = layout.offsets[i], layout.offsets[i + 1]
            if a == b:
                continue
            rows = blocks.rows[i]
            shape = self.shape[i] = (rows, (b - a) // rows)
            self.h[i], self.n[i], self.r[i] = h[a:b].view(shape), nr[0, a:b].view(shape), nr[1, a:b].view(shape)
            if rows == 1:
                self.nr[i] = nr[:, a:b].T
        self.sums = torch.zeros(blocks.num_blocks, 3, dtype=layout.dtype, device=layout.device)

    def scratch(self, layout: FlatParams, i: int) -> Tensor:
        """A work matrix of parameter ``i``'s shape (for sqrt(h) while masking), one buffer for all."""
        numel = max(layout.numels)
        rows, cols = self.shape[i]
        return layout.buffer("scratch", numel=numel)[:rows * cols].view(rows, cols)
