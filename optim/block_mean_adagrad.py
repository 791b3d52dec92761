"""Block-mean AdaGrad: full-matrix AdaGrad with a block mean correlation matrix.

The math core is two pure functions, :func:`normalised_correlation` (the block mean
matrix :math:`F` from the streamed block sums) and :func:`inverse_root`
(:math:`(F + \\delta I)^{-1/2}`); both go through :class:`bma_gp.BlockMeanLinearOperator`,
which holds the closed-form algebra. :class:`BlockMeanAdagrad` is the bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bma_gp import BlockMeanLinearOperator, Partition, block_mean_from_sums
from optim.flat_optimizer import FlatPreconditionedOptimizer, check_hyperparameter
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
            parameter changes. This reads one flag back from the device every step
            (a host synchronisation); ``False`` skips it, and a non-finite gradient
            then turns the state into ``nan`` (on CPU the eigendecomposition of the
            ``k x k`` core may raise ``torch.linalg.LinAlgError``). Default: ``True``.

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
    ):
        check_hyperparameter("learning rate", lr)
        check_hyperparameter("eps", eps)
        check_hyperparameter("damping", damping)
        check_hyperparameter("update_interval", update_interval, positive=True, integer=True)
        check_hyperparameter("weight_decay", weight_decay)
        check_partition_rule(partition)
        if not isinstance(maximize, bool):
            raise ValueError(f"Invalid maximize value: {maximize!r}; it must be True or False.")
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
    def _update(self, g: Tensor, layout: FlatParams, active: list[bool]) -> None:
        st = self.global_state
        st["step"] += 1
        h = self._flat["sum"]
        h.addcmul_(g, g)
        z = torch.sqrt(h, out=layout.buffer("z")).add_(self.eps)
        n = torch.div(g, z, out=layout.buffer("n"))  # normalised gradient g / z
        r = z.rsqrt_()  # z^{-1/2}
        if self._masking_needed():
            r.masked_fill_(h == 0, 0.0)
        blocks = layout.blocks
        n_sums = blocks.sum(n)
        st["U"].addr_(n_sums, n_sums)
        st["w"].add_(blocks.dot(n, n))
        root = self._root_operator(layout.partition)
        if blocks.rows is None:  # scattered blocks: apply the operator as it is
            direction = (root @ g.mul_(r)).mul_(r)
            self._apply(layout, direction, active)
            return
        # contiguous blocks, fused: u = z^{-1/2} [lam_R v + P B_R P^T v], v = z^{-1/2} g,
        # i.e. u = lam_R[c] n + (B_R P^T v)[c] z^{-1/2}, added straight into the parameters
        coupling = root.B @ blocks.dot(g, r)
        n_views, r_views = blocks.param_views(n), blocks.param_views(r)
        lam_cols, coupling_cols = blocks.param_columns(root.lam), blocks.param_columns(coupling)
        for lr, wd, indices in self._active_by_group(layout, active):
            for i in indices:
                p = layout.params[i]
                if n_views[i] is None:
                    continue
                if wd:
                    p.mul_(1.0 - lr * wd)
                if p.is_contiguous():
                    view = p.view(n_views[i].shape)
                    view.addcmul_(n_views[i], lam_cols[i], value=-lr).addcmul_(r_views[i], coupling_cols[i], value=-lr)
                else:
                    u = torch.addcmul(n_views[i] * lam_cols[i], r_views[i], coupling_cols[i])
                    p.add_(u.view(p.shape).to(p.dtype), alpha=-lr)

    def _masking_needed(self) -> bool:
        """Whether some entry of h may still be 0 (never a nonzero gradient); h only grows, so once
        every entry is positive this stays False. Without ``check_finite`` it never reads the device."""
        if not self.check_finite:
            return True
        if self._h_has_zero:
            self._h_has_zero = bool(self._flat["sum"].amin() == 0)
        return self._h_has_zero
