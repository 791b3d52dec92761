"""The typed configuration of one ``bma-gp`` run, and the error for unusable arguments or data.

:class:`RunConfig` is what the command line means once parsed and checked
(:func:`bma_gp.cli.arguments.parse_config` builds it); the data, model and report steps take it,
never an ``argparse.Namespace``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = ["METHODS", "PROG", "RunConfig", "UsageError"]

#: The methods ``--method`` chooses from, in the order they run and are reported.
METHODS = ("exact", "blockmean", "sgpr")
PROG = "bma-gp"


class UsageError(ValueError):
    """Arguments or data the run cannot use. :func:`bma_gp.cli.main` prints the message the way
    argparse prints its own errors (usage, then ``bma-gp: error: ...``) and exits with status 2."""


@dataclass(frozen=True)
class RunConfig:
    """One ``bma-gp`` run: every option, parsed, checked and resolved (methods, device, dtype).

    The defaults are the command line's, so ``RunConfig()`` is the bundled CO2 demo.
    """

    # data
    data: str | None = None  # a CSV path; None: the bundled CO2 series
    target: str | None = None
    features: tuple[str, ...] | None = None  # None: every column except the target and the groups
    groups: tuple[str, ...] = ()  # columns with a random intercept (1 | col) each; not smooth inputs
    max_rows: int | None = None
    test_fraction: float = 0.2
    split: Literal["random", "last"] = "random"
    # models
    methods: tuple[str, ...] = METHODS
    blocks: int = 256
    partition: Literal["auto", "sorted", "kmeans"] = "auto"
    kernel: Literal["auto", "seasonal", "rbf", "matern"] = "auto"
    period: float = 1.0  # in units of the first input
    # training
    iters: int = 40
    lr: float = 0.1
    max_cholesky: int = 5000
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float64
    seed: int = 0
    # output
    out: str = "bma_gp_out"
    plot: bool = True
    progress: bool = True
    # the options among blocks, partition, period, lr and max_cholesky given on the command line (argparse dest
    # names): a given option that the run does not use is warned about (unused_options). Not compared: the run is
    # the same
    given: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def dtype_name(self) -> str:
        """``"float64"`` or ``"float32"``, as ``--dtype`` spells it."""
        return str(self.dtype).removeprefix("torch.")

    def kernel_kind(self) -> Literal["seasonal", "rbf", "matern"]:
        """The base kernel ``--kernel`` resolves to: ``auto`` is seasonal for the CO2 demo, rbf otherwise."""
        if self.kernel == "auto":
            return "seasonal" if self.data is None else "rbf"
        return self.kernel

    def uses_blocks(self) -> bool:
        """Whether a method of the run has ``blocks`` blocks or inducing points (blockmean, sgpr)."""
        return "blockmean" in self.methods or "sgpr" in self.methods

    def unused_options(self) -> list[str]:
        """One message per option of ``given`` that the chosen methods or kernel do not use."""
        methods = ", ".join(self.methods)
        messages = []
        if "blocks" in self.given and not self.uses_blocks():
            messages.append(
                f"--blocks has no effect: only the blockmean and sgpr methods use it (this run's methods: {methods})"
            )
        if "partition" in self.given and "blockmean" not in self.methods:
            messages.append(
                f"--partition has no effect: only the blockmean method uses it (this run's methods: {methods})"
            )
        if "period" in self.given and self.kernel_kind() != "seasonal":
            messages.append(
                f"--period has no effect: only the seasonal kernel has a period (this run's kernel: "
                f"{self.kernel_kind()}; choose it with --kernel seasonal)"
            )
        if "lr" in self.given and self.iters == 0:
            messages.append("--lr has no effect: --iters 0 takes no Adam step")
        if "max_cholesky" in self.given and "exact" not in self.methods:
            messages.append(
                "--max-cholesky has no effect: only the exact method factorises its kernel matrix (blockmean and sgpr "
                f"solve in closed form at any size; this run's methods: {methods})"
            )
        return messages
