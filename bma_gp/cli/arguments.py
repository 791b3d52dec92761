"""The command line of ``bma-gp``: the parser, its value types, and the parsed :class:`RunConfig`."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Sequence

import torch

from bma_gp._version import __version__
from bma_gp.cli.config import METHODS, PROG, RunConfig
from bma_gp.partition_builders import _SEED_RANGE, _SEED_REASON
from bma_gp.partition_builders import _seed as _checked_seed

__all__ = ["build_parser", "parse_config"]


# ---------------------------------------------------------------------------- value types
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


#: The most Adam steps --iters takes: the progress bar takes the length of range(iters), a C ssize_t (a larger
#: count ended in an OverflowError traceback).
_MAX_ITERS = sys.maxsize


def _iters(text: str) -> int:
    value = _non_negative_int(text)
    if value > _MAX_ITERS:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer up to {_MAX_ITERS}, got {value}")
    return value


def _seed(text: str) -> int:
    """``--seed``: an integer in the range :func:`~bma_gp.partition_builders.kmeans_partition` takes, checked by the
    same helper. torch's CPU generator (the split, the inducing points, k-means) keeps only the low 32 bits of a
    seed, so seeds 2**32 apart (and -2**63 and 0) gave the same run; the range is that of the bits kept."""
    low, high = _SEED_RANGE
    expected = (
        f"expected an integer from {low} to {high} (2**32 - 1; {_SEED_REASON}, so larger or negative seeds would "
        "repeat these runs)"
    )
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
    try:
        return _checked_seed(value, "--seed")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, got {value}") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {value}")
    return value


# ---------------------------------------------------------------------------- parser
class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, except where the help already says its default in words or the default is
    None ("(default: all) (default: None)" contradicted itself)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or "(default" in text:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``bma-gp`` (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fit exact, block mean and inducing-point Gaussian processes to a data set and compare "
        "them on held-out points. Without --data it uses the Mauna Loa CO2 series bundled with the package.",
        formatter_class=_DefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="CSV", help="a CSV file with a header line (default: the bundled CO2 series)")
    data.add_argument("--target", metavar="COL", help="the column to predict (required with --data)")
    data.add_argument(
        "--features",
        metavar="COL",
        nargs="+",
        action="extend",
        help="input columns (default: every column except the target and the --group columns); ISO dates become "
        "decimal years. Repeating the option adds columns; name each column once",
    )
    data.add_argument(
        "--group",
        action="append",
        dest="groups",
        metavar="COL",
        help="add a random intercept for the levels of COL, lme4's (1 | COL), to every model; repeat it for "
        "several (crossed or nested) groupings. Text labels and whole numbers are levels; the column is "
        "not an input of the smooth kernel. Levels seen only in held-out rows are predicted as new "
        "levels (effect 0)",
    )
    data.add_argument(
        "--max-rows", type=_positive_int, metavar="N", help="use a random subset of at most N rows (default: all rows)"
    )
    data.add_argument("--test-fraction", type=_fraction, default=0.2, help="share of rows held out for testing")
    data.add_argument(
        "--split",
        choices=("random", "last"),
        default="random",
        help="hold out a random subset, or the rows with the largest first input (extrapolation)",
    )
    model = parser.add_argument_group("models")
    model.add_argument(
        "--method",
        action="append",
        metavar="NAME",
        help=f"methods to run: all or any of {', '.join(METHODS)}; repeat the option or give a "
        "comma list (default: all)",
    )
    model.add_argument(
        "--blocks", type=_positive_int, default=256, help="number of blocks (blockmean) and of inducing points (sgpr)"
    )
    model.add_argument(
        "--partition",
        choices=("auto", "sorted", "kmeans"),
        default="auto",
        help="how blockmean groups the training inputs: sorted runs along the first input, "
        "k-means clusters, or auto (sorted for one input column, k-means otherwise)",
    )
    model.add_argument(
        "--kernel",
        choices=("auto", "seasonal", "rbf", "matern"),
        default="auto",
        help="base kernel: seasonal = long-term RBF + periodic x RBF + short-term Matern "
        "(one input column), rbf / matern = ARD kernels; auto: seasonal for the CO2 demo, rbf otherwise",
    )
    model.add_argument(
        "--period",
        type=_positive_float,
        default=1.0,
        help="initial period of the seasonal kernel, in units of the input (years for CO2)",
    )
    train = parser.add_argument_group("training")
    train.add_argument("--iters", type=_iters, default=40, help="Adam steps on the marginal likelihood")
    train.add_argument("--lr", type=_positive_float, default=0.1, help="Adam learning rate")
    train.add_argument(
        "--max-cholesky",
        type=_non_negative_int,
        default=5000,
        help="largest training set the exact GP factorises with Cholesky while training (beyond: "
        "GPyTorch's CG/Lanczos); predictions use Cholesky up to max(this, 10000) for accurate variances",
    )
    train.add_argument("--device", default="auto", help="torch device: auto (cuda when available), cpu, cuda, cuda:1")
    train.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="floating point precision")
    train.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="random seed (split, inducing points, k-means): an integer from 0 to 2**32 - 1 (torch's generator "
        "keeps 32 bits of a seed)",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out",
        metavar="DIR",
        default="bma_gp_out",
        help="directory for fits.png and results.json (created if missing)",
    )
    output.add_argument("--no-plot", action="store_true", help="skip the plot (matplotlib is then not needed)")
    output.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    # argparse takes only -1 and -1.5 for negative numbers: --lr -1e-3 or --period -inf ended in "expected one
    # argument". Every number is a value here (no option starts with a digit), so its type names the fix
    parser._negative_number_matcher = re.compile(r"^-\.?\d|^-(inf|infinity|nan)$", re.IGNORECASE)
    return parser


# ---------------------------------------------------------------------------- resolution
#: The options only some methods or kernels use (their dest names); RunConfig.unused_options says when one given
#: has no effect.
_WARN_IF_UNUSED = ("blocks", "partition", "period", "lr", "max_cholesky")
_NOT_GIVEN = object()


def _parse_methods(values: Sequence[str] | None, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    if not values:
        return METHODS
    chosen: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name == "all":
                names = list(METHODS)
            elif name in METHODS:
                names = [name]
            else:
                parser.error(f"argument --method: unknown method {name!r}; choose all or any of {', '.join(METHODS)}")
            chosen += [n for n in names if n not in chosen]
    if not chosen:
        parser.error(f"argument --method: no method given; choose all or any of {', '.join(METHODS)}")
    return tuple(name for name in METHODS if name in chosen)


def _resolve_device(text: str, parser: argparse.ArgumentParser) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"argument --device: {text!r} is not a torch device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("argument --device: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"argument --device: {text!r} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    elif device.type != "cpu":
        parser.error(f"argument --device: {text!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def _check_groups(
    groups: Sequence[str] | None,
    data: str | None,
    target: str | None,
    features: Sequence[str] | None,
    parser: argparse.ArgumentParser,
) -> tuple[str, ...]:
    """The ``--group`` columns, checked against the other column options (the data are not read yet)."""
    if not groups:
        return ()
    if data is None:
        parser.error(
            "argument --group: the bundled CO2 series has no grouping columns; "
            "use --group with your own CSV (--data FILE --target COL)"
        )
    for i, name in enumerate(groups):
        if name in groups[:i]:
            parser.error(f"argument --group: column {name!r} is given twice; name each grouping once")
        if name == target:
            parser.error(f"argument --group: column {name!r} is the --target; a grouping must be another column")
        if features is not None and name in features:
            parser.error(
                f"argument --group: column {name!r} is also in --features; a grouping gets a random "
                "intercept, not a smooth kernel: drop it from --features"
            )
    return tuple(groups)


def parse_config(argv: Sequence[str] | None, parser: argparse.ArgumentParser | None = None) -> RunConfig:
    """Parse and check the command line ``argv`` (default ``sys.argv[1:]``) into a :class:`RunConfig`.

    Checks that need no data happen here: the methods, the device, ``--target`` / ``--features`` /
    ``--group`` without ``--data`` (and the reverse), a feature named twice (repeated ``--features``
    options add up) or also the ``--target``, a ``--group`` column that is also the target, a feature or
    another ``--group``, and an ``--out`` that names a file. ``RunConfig.given`` records which of ``--blocks``,
    ``--partition``, ``--period``, ``--lr`` and ``--max-cholesky`` were given, for the run's warning about one it does
    not use.

    Args:
        argv: the arguments, without the program name.
        parser: the parser to use and to report errors with (default: :func:`build_parser`).

    Raises:
        SystemExit: with status 2 after argparse's usage message for bad arguments, 0 after ``--help``.
    """
    parser = build_parser() if parser is None else parser
    # argparse sets the default of an option only when the namespace lacks it: a placeholder that is still there
    # after parsing is an option not given (RunConfig.given; the run warns about a given option it does not use)
    args = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(_WARN_IF_UNUSED, _NOT_GIVEN)))
    given = frozenset(name for name in _WARN_IF_UNUSED if getattr(args, name) is not _NOT_GIVEN)
    for name in _WARN_IF_UNUSED:
        if name not in given:
            setattr(args, name, parser.get_default(name))
    methods = _parse_methods(args.method, parser)
    device = _resolve_device(args.device, parser)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"argument --out: {args.out!r} is a file; give a directory (it is created if missing)")
    if args.data is None and (args.target is not None or args.features is not None):
        parser.error("--target and --features need --data (the bundled CO2 series has fixed columns)")
    if args.data is not None and args.target is None:
        parser.error("--data needs --target COL, the column to predict")
    for i, name in enumerate(args.features or ()):
        if name in args.features[:i]:
            parser.error(f"argument --features: column {name!r} is given twice; name each input column once")
        if name == args.target:
            parser.error(
                f"argument --features: column {name!r} is the --target; the column to predict cannot be an input: "
                "drop it from --features"
            )
    groups = _check_groups(args.groups, args.data, args.target, args.features, parser)
    return RunConfig(
        data=args.data,
        target=args.target,
        features=None if args.features is None else tuple(args.features),
        groups=groups,
        max_rows=args.max_rows,
        test_fraction=args.test_fraction,
        split=args.split,
        methods=methods,
        blocks=args.blocks,
        partition=args.partition,
        kernel=args.kernel,
        period=args.period,
        iters=args.iters,
        lr=args.lr,
        max_cholesky=args.max_cholesky,
        device=device,
        dtype=torch.float64 if args.dtype == "float64" else torch.float32,
        seed=args.seed,
        out=args.out,
        plot=not args.no_plot,
        progress=not args.no_progress,
        given=given,
    )
