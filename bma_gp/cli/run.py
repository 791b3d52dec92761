"""``main``: one ``bma-gp`` run from the command line to the report.

The steps, each in its own module: :mod:`~bma_gp.cli.arguments` (command line to
:class:`~bma_gp.cli.config.RunConfig`), :mod:`~bma_gp.cli.data` (load, subsample, split,
standardise), :mod:`~bma_gp.cli.models` (build, train, predict) and :mod:`~bma_gp.cli.report`
(table, ``results.json``, ``fits.png``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence

import torch

from bma_gp.cli import report
from bma_gp.cli.arguments import build_parser, parse_config
from bma_gp.cli.config import PROG, RunConfig, UsageError
from bma_gp.cli.data import Problem, load_dataset, split, subsample
from bma_gp.cli.models import TrainingDiverged, base_kernel, fit

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bma-gp`` with the command-line arguments ``argv`` (default ``sys.argv[1:]``).

    Returns:
        0 on success; 1, quietly, when the reader of standard output goes away early (``bma-gp ... | head``); 130
        after Ctrl-C (``KeyboardInterrupt``), with one line on standard error.
        Bad arguments or unusable data end the program like argparse does: a message on standard error and
        ``SystemExit(2)`` (with the usage block for a bad option, one line for the data or the run).
    """
    parser = build_parser()
    config = parse_config(argv, parser)
    try:
        code = _run(config)
        sys.stdout.flush()  # a reader gone early (`bma-gp ... | head`) is found here, not at interpreter exit
        return code
    except UsageError as err:
        message = str(err)
        if message.startswith("argument "):  # an option's value, judged against the data: as argparse says it
            parser.error(message)
        # the data or the run: one line, without argparse's usage block
        parser.exit(2, f"{PROG}: error: {message}\n")
    except BrokenPipeError:
        # the reader of standard output went away (`| head -1`): stop quietly, as shell tools do, with the results
        # written so far kept
        _stdout_to_devnull()
        return 1
    except OSError as err:
        # the system refused a write or a read (a full disk behind a redirected standard output, `> /dev/full`):
        # one line, as for the other failures, and the files a run created removed on the way out, as after them
        _stdout_to_devnull()
        where = f" ({err.filename})" if err.filename else ""
        print(f"{PROG}: error: {err.strerror or err}{where}; nothing more was written.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C: one line and the shell's status for SIGINT (128 + 2), not a traceback from deep inside torch; the
        # output directory a failed run created is removed on the way out, as for any other failure
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


def _stdout_to_devnull() -> None:
    """Point standard output at devnull, so that the interpreter's last flush of what is left in its buffer cannot
    fail again (after a write to it failed)."""
    try:
        sys.stdout.flush()
    except OSError:
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor (a StringIO standing in for stdout): nothing to flush at exit
        pass
    finally:
        os.close(devnull)


def _run(config: RunConfig) -> int:
    with _seeded_global_rng(config):
        return _seeded_run(config)


@contextlib.contextmanager
def _seeded_global_rng(config: RunConfig) -> Iterator[None]:
    """Seed torch's global random generators that the run uses (the CPU one, and ``--device``'s for CUDA) with
    ``--seed``, as ``torch.manual_seed`` did, and give the caller's states back afterwards, also when the run
    raises: ``main`` called from Python leaves the caller's random stream where it was."""
    cuda = [config.device] if config.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(config.seed)
        for device in cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(config.seed)
        yield


def _seeded_run(config: RunConfig) -> int:
    for message in config.unused_options():
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    generator = torch.Generator().manual_seed(config.seed)

    loaded = load_dataset(config)
    dataset = subsample(loaded, config.max_rows, generator)
    n_rows, num_inputs = len(dataset.y), dataset.x.shape[-1]
    kernel_kind = config.kernel_kind()
    if kernel_kind == "seasonal" and num_inputs != 1:
        raise UsageError(
            f"--kernel seasonal needs exactly one input column, the data have {num_inputs} "
            f"({', '.join(dataset.feature_names)}); choose them with --features or use --kernel rbf"
        )
    problem = split(dataset, config.test_fraction, config.split, generator, available=len(loaded.y))
    n_train = len(problem.y_train)
    if config.blocks > n_train and config.uses_blocks():
        raise UsageError(_too_many_blocks(config, n_train, len(loaded.y)))
    period = config.period / float(problem.x_scale[0])
    if kernel_kind == "seasonal":
        _check_period(config, problem, period)
    problem.to(config.device)

    grid = None  # with groupings the plot shows predicted against observed held-out values
    if num_inputs == 1 and config.plot and not problem.group_names:
        both = torch.cat([problem.x_train, problem.x_test])
        lo, hi = float(both.min()), float(both.max())
        grid = torch.linspace(lo, hi, 2000, dtype=config.dtype, device=config.device).unsqueeze(-1)

    created = _check_out(config)  # before training, so an unwritable --out does not cost a run
    try:
        return _fit_and_report(config, problem, kernel_kind, period, generator, grid, n_rows)
    except BaseException:
        _remove_empty(created)  # a failed run leaves no empty directory of its own (--out and its new parents)
        raise


def _too_many_blocks(config: RunConfig, n_train: int, available: int) -> str:
    """The message for ``--blocks`` above the ``n_train`` training rows; ``available``: the usable rows before
    ``--max-rows``, which may be the option to change."""
    default = " (the default)" if "blocks" not in config.given and config.blocks == RunConfig().blocks else ""
    fix = f"choose --blocks <= {n_train}"
    if available - int(round(config.test_fraction * available)) >= config.blocks:  # all the rows would do
        fix += f", or raise --max-rows (now {config.max_rows} of the {available} usable rows)"
    return f"argument --blocks: {config.blocks}{default} exceeds the {n_train} training rows; {fix}"


def _check_period(config: RunConfig, problem: Problem, period: float) -> None:
    """Check that the seasonal kernel with the standardised ``period`` has finite start values and a finite
    covariance between the extreme inputs in ``--dtype``: a period that underflows or overflows there made the
    first step fail (a traceback, or a divergence blamed on ``--lr``).

    Raises:
        UsageError: naming ``--period`` and the span of the input it is measured in.
    """
    both = torch.cat([problem.x_train[:, :1], problem.x_test[:, :1]])
    ends = torch.stack([both.min(), both.max()]).unsqueeze(-1).to(config.dtype)
    kernel = base_kernel("seasonal", 1, period).to(config.dtype)
    with torch.no_grad():
        finite = all(bool(p.isfinite().all()) for p in kernel.parameters())
        finite = finite and bool(kernel(ends).to_dense().isfinite().all())
    if not finite:
        lo, hi = problem.x_original(ends).flatten().tolist()
        raise UsageError(
            f"argument --period: {config.period:g} is too {'small' if period < 1 else 'large'} for the seasonal "
            f"kernel in {config.dtype_name} (its start values or covariance are not finite); give the period in "
            f"units of {problem.feature_names[0]!r}, whose values span {lo:g} to {hi:g}"
        )


def _short_period(config: RunConfig, problem: Problem) -> str | None:
    """The cause of a failed training to name instead of ``--lr`` when ``--period`` is shorter than twice the
    sampling step of the input (the median spacing of its distinct training values): the periodic kernel cannot
    resolve such a period at the data (it aliases), its covariance is nearly singular, and the Cholesky or the
    closed forms fail after a few steps whatever the learning rate. None for a longer period."""
    values = torch.unique(problem.x_train[:, 0].detach().double().cpu())  # sorted
    gaps = values.diff()
    if gaps.numel() == 0:
        return None
    step = float(gaps.median()) * float(problem.x_scale[0])  # in the input's units, as --period is
    if not config.period < 2 * step:
        return None
    return (
        f"--period {config.period:g} is shorter than twice the sampling step of {problem.feature_names[0]!r} (its "
        f"training values are {step:.4g} apart, the median spacing), so the seasonal kernel cannot resolve it at the "
        f"data and its covariance is nearly singular in {config.dtype_name}, whatever --lr is; give a period of at "
        f"least {2 * step:.4g} in units of {problem.feature_names[0]!r}"
    )


def _fit_and_report(
    config: RunConfig,
    problem: Problem,
    kernel_kind: str,
    period: float,
    generator: torch.Generator,
    grid: torch.Tensor | None,
    n_rows: int,
) -> int:
    """Train and evaluate each method, then print the table and write ``results.json`` and ``fits.png``."""
    n_train = len(problem.y_train)
    print(
        f"{PROG}: {problem.name}: {n_rows} rows -> {n_train} train / {len(problem.y_test)} test "
        f"({config.split} split); inputs {', '.join(problem.feature_names)} -> target {problem.target_name}"
    )
    blocks = f"k = {config.blocks}, " if config.uses_blocks() else ""  # no k for an exact-only run
    lr = f" (lr {config.lr})" if config.iters else ""  # no learning rate without a step
    print(
        f"{PROG}: kernel {kernel_kind}, methods {', '.join(config.methods)}, {blocks}"
        f"{config.iters} Adam steps{lr}, {config.device.type} {config.dtype_name}"
    )
    if problem.group_names:
        levels = ", ".join(f"{g} ({k} levels)" for g, k in zip(problem.group_names, problem.num_levels))
        print(f"{PROG}: random intercepts {report.group_terms(problem.group_names)} in every model; {levels}")
        for name, (new_levels, new_rows) in zip(problem.group_names, problem.test_only):
            if new_levels:
                print(
                    f"{PROG}: note: {new_levels} level(s) of {name!r} occur only in held-out rows ({new_rows} rows); "
                    "they are predicted as new levels: effect 0 with the group's variance "
                    "(lme4's allow.new.levels = TRUE)"
                )
    try:
        fits = [fit(method, problem, kernel_kind, period, config, generator, grid) for method in config.methods]
    except TrainingDiverged as err:
        short = _short_period(config, problem) if kernel_kind == "seasonal" else None
        if short is None:
            raise
        raise UsageError(f"{err.where} ({err.reason}): {short}") from err
    print()
    print(report.format_table(fits, problem.target_name, problem.group_names))

    try:
        json_path = report.write_summary(report.summary(config, problem, kernel_kind, fits), config.out)
    except OSError as err:
        raise UsageError(_cannot_write(os.path.join(config.out, "results.json"), err)) from err
    print(f"\n{PROG}: wrote {json_path}")
    if config.plot:
        png_path = os.path.join(config.out, "fits.png")
        try:
            report.plot(problem, fits, grid, png_path)
        except ImportError:
            print(
                f"{PROG}: warning: matplotlib is not installed, no plot written "
                "(pip install bma-gp[examples], or pass --no-plot)",
                file=sys.stderr,
            )
            _note_stale_plot(config.out, "matplotlib is not installed")
        except OSError as err:
            raise UsageError(_cannot_write(png_path, err)) from err
        else:  # (outside the try: a reader of standard output gone away is no failure to write the plot)
            print(f"{PROG}: wrote {png_path}")
    else:
        _note_stale_plot(config.out, "--no-plot")
    return 0


def _note_stale_plot(out: str, reason: str) -> None:
    """Say on standard error that ``out/fits.png`` is from an earlier run, when this run wrote none there."""
    png_path = os.path.join(out, "fits.png")
    if os.path.exists(png_path):
        print(
            f"{PROG}: note: {png_path} is from an earlier run (this run wrote no plot: {reason}); it does not "
            "show the results above",
            file=sys.stderr,
        )


def _cannot_write(path: str, err: OSError) -> str:
    return f"argument --out: cannot write {path!r} ({err.strerror or err}); choose a writable directory with --out"


def _missing_directories(path: str) -> list[str]:
    """The directories ``os.makedirs(path)`` would create, innermost first: ``path`` and each parent up to the first
    that exists (spelled as makedirs walks them; ``.`` and ``..`` steps name no directory of their own)."""
    missing = []
    head = path
    while head and not os.path.isdir(head):
        parent, tail = os.path.split(head)
        if not tail:  # a trailing separator: "new/" is "new"
            parent, tail = os.path.split(parent)
        if tail not in (os.curdir, os.pardir):
            missing.append(head)
        if parent == head:
            break
        head = parent
    return missing


def _remove_empty(directories: Sequence[str]) -> None:
    """Remove the ``directories`` (the run's own, innermost first) that are empty; stop at the first that is not (the
    results so far, or a file another program put there): its parents are not empty either."""
    for directory in directories:
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            continue
        except OSError:
            return


def _check_out(config: RunConfig) -> list[str]:
    """Create the ``--out`` directory and check that the run's files can be written there; returns the directories
    created here (``--out`` and the parents makedirs created with it, innermost first), which a failed run removes
    when they are empty. A check that fails removes them at once.

    Raises:
        UsageError: the directory cannot be created or written to, or an output file's name is taken
            by a directory or a file that cannot be overwritten.
    """
    created = _missing_directories(config.out)
    try:
        _create_out(config)
    except BaseException:
        _remove_empty(created)
        raise
    return created


def _create_out(config: RunConfig) -> None:
    try:
        os.makedirs(config.out, exist_ok=True)
    except OSError as err:
        raise UsageError(f"argument --out: cannot create directory {config.out!r} ({err.strerror})") from err
    for name in ("results.json", "fits.png") if config.plot else ("results.json",):
        path = os.path.join(config.out, name)
        if os.path.isdir(path):
            raise UsageError(
                f"argument --out: {path!r} is a directory, so {name} cannot be written; remove it or choose "
                "another --out"
            )
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise UsageError(
                f"argument --out: {path!r} cannot be overwritten (permission denied); choose a writable "
                "directory with --out"
            )
    try:  # the permissions of the directory (and its file system) decide: create and remove a file
        with tempfile.NamedTemporaryFile(dir=config.out, prefix=f".{PROG}-write-test-"):
            pass
    except OSError as err:
        raise UsageError(
            f"argument --out: cannot write to {config.out!r} ({err.strerror or err}); choose a writable directory"
        ) from err
