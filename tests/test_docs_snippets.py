"""The ```python blocks of README.md and docs/*.md run as written and do what the text around them says.

A new user copies these blocks first, so each page's blocks run in order in one namespace (as a reader
pastes them into one session), in a temporary working directory, with :class:`~bma_gp.ClosedFormFallbackWarning`
turned into an error (every block is documented as closed form). After a block, the checks in ``CHECKS`` assert
what its prose claims (types, closed-form paths, printed values). ``tests/test_docstring_examples.py`` covers
the docstrings; this file covers the Markdown pages.

Markers: an HTML comment on the line(s) just before a block (invisible when rendered; several may precede
one block; every one except ``output`` gives its reason in parentheses):

``<!-- snippet: skip (REASON) -->``
    the block is not run (it needs CUDA, hours, or data that is not shipped);
``<!-- snippet: replace OLD -> NEW (REASON) -->``
    the block runs with every ``OLD`` replaced by ``NEW`` (``OLD`` must occur), e.g. a smaller ``n``;
``<!-- snippet: setup (REASON)`` / code lines / ``-->``
    the code runs first, in the page's namespace: names the block takes from the prose around it;
``<!-- snippet: output -->`` before a ```text block
    that block is the standard output of the python block before it: the text must match, whole numbers
    exactly and the others to 2 % (threads and BLAS change the last digits).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gpytorch
import pytest
import torch
from linear_operator.operators import DiagLinearOperator

import bma_gp.cli
from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, ClosedFormFallbackWarning
from closed_form_guard import closed_forms_only

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: at least this many blocks run in all (a marker that skips everything, or a parser that finds nothing, fails)
MIN_BLOCKS_RUN = 12
#: one intra-op thread: the blocks are small, and the gp.md tutorial's printed output is from one thread
pytestmark = pytest.mark.usefixtures("one_thread")

_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!-- snippet: (\w+)(.*?)(-->)?$")
_REASON = re.compile(r"^\s*\((.+)\)\s*$")
_REPLACE = re.compile(r"^\s+(.+?) -> (.+?) \((.+)\)\s*$")


@dataclass
class Block:
    page: str
    line: int  # line of the block's first code line in the page (1-based)
    code: str
    skip: str | None = None
    setup: list[str] = field(default_factory=list)
    replace: list[tuple[str, str]] = field(default_factory=list)
    output: str | None = None  # the ```text block marked as this block's output


def parse(path: Path) -> tuple[list[Block], list[str]]:
    """The python blocks of a page, with their markers; and the problems with the markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: list[tuple[str, str, int]] = []  # (kind, rest, line) of markers not yet attached
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = _MARKER.match(line)
        if marker:
            kind, rest, closed = marker.group(1), marker.group(2), marker.group(3)
            start = i
            if not closed:  # a setup marker: code lines up to "-->"
                body = []
                i += 1
                while i < len(lines) and lines[i].strip() != "-->":
                    body.append(lines[i])
                    i += 1
                rest = rest + "\n" + "\n".join(body)
            pending.append((kind, rest, start + 1))
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence and fence.group(1) in ("python", "text"):
            end = i + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            code = "\n".join(lines[i + 1 : end]) + "\n"
            if fence.group(1) == "python":
                block = Block(path.name, i + 2, code)
                for kind, rest, at in pending:
                    where = f"{path.name}:{at}"
                    head, _, body = rest.partition("\n")
                    if kind == "skip":
                        reason = _REASON.match(head)
                        if not reason:
                            problems.append(f"{where}: skip marker without a (reason)")
                        block.skip = reason.group(1) if reason else ""
                    elif kind == "replace":
                        parts = _REPLACE.match(head)
                        if not parts:
                            problems.append(f"{where}: replace marker is not 'replace OLD -> NEW (reason)'")
                        elif parts.group(1) not in code:
                            problems.append(f"{where}: replace marker's {parts.group(1)!r} is not in the block")
                        else:
                            block.replace.append((parts.group(1), parts.group(2)))
                    elif kind == "setup":
                        if not _REASON.match(head) or not body.strip():
                            problems.append(f"{where}: setup marker needs a (reason) and code lines")
                        block.setup.append(body)
                    else:
                        problems.append(f"{where}: marker {kind!r} before a python block (skip, replace, setup)")
                blocks.append(block)
            else:
                for kind, _, at in pending:
                    if kind != "output" or not blocks:
                        problems.append(f"{path.name}:{at}: marker {kind!r} before a text block (only 'output')")
                    else:
                        blocks[-1].output = code
            pending = []
            i = end + 1
            continue
        if line.strip() and pending:
            problems.append(f"{path.name}:{pending[0][2]}: snippet marker not followed by a code block")
            pending = []
        i += 1
    if pending:
        problems.append(f"{path.name}:{pending[0][2]}: snippet marker at the end of the page")
    return blocks, problems


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def assert_output_matches(printed: str, shown: str, where: str) -> None:
    """Text equal up to whitespace; whole numbers exactly, the others to 2 % (or 1e-3)."""
    got, want = printed.split(), shown.split()
    assert [_NUMBER.sub("#", w) for w in got] == [_NUMBER.sub("#", w) for w in want], (
        f"{where}: the printed output differs from the page's:\n{printed}\n--- page:\n{shown}"
    )
    for a, b in zip(_NUMBER.findall(printed), _NUMBER.findall(shown), strict=True):
        if re.fullmatch(r"[-+]?\d+", b):
            assert int(a) == int(b), f"{where}: printed {a}, the page says {b}"
        else:
            assert math.isclose(float(a), float(b), rel_tol=0.02, abs_tol=1e-3), f"{where}: printed {a}, page {b}"


# ----------------------------------------------------------------------------- what the prose says


def _readme_operator(ns: dict, out: str) -> None:
    M, x, y = ns["M"], ns["x"], ns["y"]
    k = M.B.shape[-1]
    root = M.matrix_inv_sqrt()
    assert isinstance(root, BlockMeanLinearOperator)  # "M^{-1/2} is again a block mean operator"
    with closed_forms_only(k + 1):  # "closed form: one k x k Cholesky"
        assert torch.allclose(M.solve(x), y)
        assert torch.allclose(root @ ns["z"], y, rtol=1e-8, atol=1e-10)  # M^{-1/2} M^{-1/2} x = M^{-1} x
        assert torch.isfinite(M.logdet())
    assert (M @ y - x).abs().max() < 1e-8  # the printed residual


def _readme_sum(ns: dict, out: str) -> None:
    S, M, M2, noise, x = ns["S"], ns["M"], ns["M2"], ns["noise"], ns["x"]
    assert isinstance(S, BlockMeanSumLinearOperator)
    assert isinstance(M2 + noise + M, BlockMeanSumLinearOperator)  # "in either order"
    # one capacitance of size k_1 + k_2 + m less the eliminated diagonal grouping (M2's 50 levels): 1000
    with closed_forms_only(M.B.shape[-1] + 1):
        assert torch.allclose(S @ S.solve(x), x, rtol=1e-8, atol=1e-8)
        quad, logdet = S.inv_quad_logdet(x, logdet=True)
    assert torch.allclose(quad, x @ S.solve(x))
    assert f"{quad.item():.4f}"[:6] in out


def _readme_gp(ns: dict, out: str) -> None:
    torch.manual_seed(0)
    x = torch.rand(400, 3)
    y = torch.sin(3 * x[:, 0]) + x[:, 1] + 0.1 * torch.randn(400)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ns["GP"](x, y, likelihood)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    with closed_forms_only(len(x)):  # "every solve and log-determinant is closed form"
        assert isinstance(model.covar_module(x).evaluate_kernel(), BlockMeanLinearOperator)
        (-mll(model(x), y)).backward()
        model.eval()
        with torch.no_grad():
            pred = likelihood(model(torch.rand(7, 3)))
    assert pred.mean.shape == (7,) and bool((pred.variance > 0).all())


def _optimizer_loop(ns: dict, out: str) -> None:
    opt, model = ns["opt"], ns["model"]
    assert type(opt).__name__ == "BlockMeanAdagrad" and opt.global_state["step"] == len(ns["batches"])
    assert all(opt.state[p]["sum"].gt(0).any() for p in model.parameters())


def _optimizer_imports(ns: dict, out: str) -> None:
    import optim

    # "or: from optim import ...": the same classes
    assert optim.BlockMeanAdagrad is ns["BlockMeanAdagrad"] and optim.FullMatrixAdagrad is ns["FullMatrixAdagrad"]
    _optimizer_loop(ns, out)


def _gp_block_mean(ns: dict, out: str) -> None:
    model, likelihood, mll = ns["model"], ns["likelihood"], ns["mll"]
    train_x, train_y, test_x = ns["train_x"], ns["train_y"], ns["test_x"]
    pred = ns["pred"]
    assert pred.mean.shape == (len(test_x),) and bool((pred.variance > 0).all())
    assert (pred.mean - torch.sin(test_x[:, 0])).abs().max() < 0.2  # it learnt the signal
    # "no CG, no Lanczos and no n x n Cholesky" in training and in prediction
    with closed_forms_only(len(train_x)):
        model.train()
        assert isinstance(model.covar_module(train_x).evaluate_kernel(), BlockMeanLinearOperator)
        (-mll(model(train_x), train_y)).backward()
        model.eval()
        with torch.no_grad():
            again = likelihood(model(test_x))
            again.confidence_region()
    assert torch.allclose(again.mean, pred.mean, atol=1e-5)


def _gp_groups(ns: dict, out: str) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 6, (50, 1)).double()
    model = ns["GroupedGP"](ids, torch.randn(50, dtype=torch.float64), gpytorch.likelihoods.GaussianLikelihood(), 6)
    model = model.double()
    K = model.covar_module(ids).evaluate_kernel()
    assert isinstance(K, BlockMeanLinearOperator)
    v = model.covar_module.var
    same = (ids == ids.T).double()
    assert torch.allclose(K.to_dense(), v * same)  # (1 | g): C = v I over the groups
    with pytest.raises(ValueError, match="whole numbers"):  # "Ids must be whole numbers in [0, num_groups)"
        model.covar_module(torch.tensor([[0.0], [6.0]], dtype=torch.float64)).to_dense()


def _gp_tutorial(ns: dict, out: str) -> None:
    model, likelihood, mll, x, y = ns["model"], ns["likelihood"], ns["mll"], ns["x"], ns["y"]
    model.train()
    assert isinstance(likelihood(model(x)).lazy_covariance_matrix, BlockMeanSumLinearOperator)
    with closed_forms_only(200):  # training stays closed form: capacitance of 10 inducing points + 65 schools
        (-mll(model(x), y)).backward()


def _mixed_model(ns: dict, out: str) -> None:
    torch.manual_seed(0)
    n = 300
    x = torch.cat([torch.rand(n, 2), torch.randint(0, 4, (n, 1)), torch.randint(0, 7, (n, 1))], -1).double()
    y = torch.sin(3 * x[:, 0]) + x[:, 2] / 4 + 0.1 * torch.randn(n, dtype=torch.float64)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ns["MixedGP"](x, y, likelihood, 2, [4, 7], torch.rand(16, 2, dtype=torch.float64)).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    with closed_forms_only(n):
        assert isinstance(likelihood(model(x)).lazy_covariance_matrix, BlockMeanSumLinearOperator)
        (-mll(model(x), y)).backward()
        model.eval()
        with torch.no_grad():
            pred = likelihood(model(x[:5]))
    assert bool((pred.variance > 0).all())


def _mixed_slopes(ns: dict, out: str) -> None:
    model, likelihood, test_x, predictive = ns["model"], ns["likelihood"], ns["test_x"], ns["predictive"]
    S = model.covar_module.slope_covar.detach()
    assert torch.allclose(S, S.T) and bool((torch.linalg.eigvalsh(S) > 0).all())
    noise = likelihood.noise.detach()
    truth = torch.tensor([0.05, 0.05 + 10 * 0.45 / 19, 0.5], dtype=torch.float64)  # "0.05, 0.29, 0.5"
    assert torch.allclose(noise[[0, 10, 19]], truth, rtol=0.25)
    # "group 20: the fixed effects, prior variance + mean noise" (the mean over the levels trained on)
    z = torch.tensor([1.0, test_x[1, 0].item()], dtype=torch.float64)
    with torch.no_grad():
        fixed = model.mean_module(test_x[1:, :1])
    assert torch.allclose(predictive.mean[1], fixed[0])
    assert torch.allclose(predictive.variance[1], z @ S @ z + noise[:20].mean())


def _mixed_chunked(ns: dict, out: str) -> None:
    # "a drop-in replacement (same arguments, parameters, trace term and predictions)"
    x, smooth, inducing, likelihood, levels = ns["x"], ns["smooth"], ns["inducing"], ns["likelihood"], ns["levels"]
    reference = gpytorch.kernels.InducingPointKernel(smooth, inducing, likelihood, active_dims=(0, 1))
    for j, k in enumerate(levels):
        reference = reference + ns["GroupKernel"](k, active_dims=[2 + j]).double()
    covar = ns["covar"].double()  # as MixedGP(...).double() converts it
    reference.load_state_dict(covar.state_dict())
    ours = covar(x).evaluate_kernel()
    assert isinstance(ours, BlockMeanSumLinearOperator)
    assert torch.allclose(ours.to_dense(), reference(x).to_dense(), rtol=1e-9, atol=1e-10)


def _cli_exam(ns: dict, out: str) -> None:
    lines = Path("exam.csv").read_text().splitlines()
    assert lines[0] == "standLRT,school,normexam" and len(lines) == 4060
    argv = ["--data", "exam.csv", "--target", "normexam", "--group", "school", "--method", "blockmean"]
    argv += ["--blocks", "8", "--iters", "1", "--max-rows", "300", "--no-plot", "--no-progress", "--out", "out"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        assert bma_gp.cli.main(argv) == 0
    assert "random intercepts (1 | school)" in buffer.getvalue()


#: (page, text that occurs in exactly one python block of it) -> what that block's prose says, as asserts
CHECKS: dict[tuple[str, str], Callable[[dict, str], None]] = {
    ("README.md", "z = M.matrix_inv_sqrt() @ x"): _readme_operator,
    ("README.md", "S = noise + M + M2"): _readme_sum,
    ("README.md", "kmeans_partition(x, 200, seed=0)"): _readme_gp,
    ("README.md", "from optim import BlockMeanAdagrad"): _optimizer_loop,
    ("optimizer.md", "from bma_gp.optim import BlockMeanAdagrad"): _optimizer_imports,
    ("gp.md", "class BlockMeanGP"): _gp_block_mean,
    ("gp.md", "class GroupedGP"): _gp_groups,
    ("gp.md", "class SmoothPlusSchool"): _gp_tutorial,
    ("mixed.md", "class MixedGP"): _mixed_model,
    ("mixed.md", "class SlopesGP"): _mixed_slopes,
    ("mixed.md", "covar = ChunkedInducingPointKernel"): _mixed_chunked,
    ("cli.md", "data = load_exam()"): _cli_exam,
}

PARSED = {path.name: parse(path) for path in PAGES}
RAN: dict[str, int] = {}


def test_markers_are_well_formed_and_every_check_finds_its_block():
    problems = [problem for _, page_problems in PARSED.values() for problem in page_problems]
    assert not problems, "\n".join(problems)
    for (page, text), _ in CHECKS.items():
        found = [b for b in PARSED[page][0] if text in b.code]
        assert len(found) == 1, f"CHECKS key {text!r} matches {len(found)} python blocks of {page}"
        assert found[0].skip is None, f"{page}:{found[0].line} is skipped but has a check"
    for blocks, _ in PARSED.values():
        for block in blocks:
            assert block.skip is None or block.skip.strip(), f"{block.page}:{block.line}: skip without a reason"


def test_parser_refuses_markers_without_reasons(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- snippet: skip -->\n```python\nraise SystemExit\n```\n\n"
        "<!-- snippet: replace 10 -> 1 (small) -->\n```python\nn = 5\n```\n\n"
        "<!-- snippet: setup ()\n-->\n```python\nn = 5\n```\n\n"
        "<!-- snippet: skip (needs CUDA) -->\nSome prose.\n\n"
        "<!-- snippet: output -->\n```text\n5\n```\n"
    )
    blocks, problems = parse(page)
    assert [b.line for b in blocks] == [3, 8, 14]
    assert blocks[0].skip == "" and blocks[2].setup == [""]
    assert len(problems) == 4, problems
    assert "skip marker without a (reason)" in problems[0]
    assert "'10' is not in the block" in problems[1]
    assert "setup marker needs a (reason)" in problems[2]
    assert "not followed by a code block" in problems[3]
    assert blocks[2].output == "5\n"  # the output marker attaches the text block to the python block before it


@pytest.mark.slow
@pytest.mark.parametrize("page", [name for name, (blocks, _) in PARSED.items() if blocks])
def test_page_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks, _ = PARSED[page]
    namespace: dict = {"__name__": f"snippets_{page.replace('.', '_')}"}
    torch.manual_seed(0)
    ran = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)  # every block is documented as closed form
        for block in blocks:
            if block.skip is not None:
                continue
            for code in block.setup:
                exec(compile(code, f"{page} (setup before line {block.line})", "exec"), namespace)
            code = block.code
            for old, new in block.replace:
                code = code.replace(old, new)
            # pad with newlines so that a traceback's line numbers are the page's
            compiled = compile("\n" * (block.line - 1) + code, str(ROOT / page), "exec")
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                exec(compiled, namespace)
            where = f"{page}:{block.line}"
            if block.output is not None:
                assert_output_matches(stdout.getvalue(), block.output, where)
            for (check_page, text), check in CHECKS.items():
                if check_page == page and text in block.code:
                    check(namespace, stdout.getvalue())
            ran += 1
    assert ran > 0
    RAN[page] = ran


def test_enough_blocks_ran():
    """Runs after the pages (pytest keeps the file's order): the markers leave at least MIN_BLOCKS_RUN blocks."""
    runnable = sum(1 for blocks, _ in PARSED.values() for b in blocks if b.skip is None)
    assert runnable >= MIN_BLOCKS_RUN
    if set(RAN) == {name for name, (blocks, _) in PARSED.items() if blocks}:  # every page ran in this session
        assert sum(RAN.values()) == runnable


# ----------------------------------------------------------------------------- prose checked beyond the blocks


@pytest.mark.parametrize("n", [40, 41, 900])
def test_negative_multiple_log_determinant_is_closed_form(n):
    """docs/gp.md: a negative multiple ``S * c`` keeps ``S``'s closed forms. Its log-determinant took linear_operator's
    generic path: ``NotPSDError`` up to ``max_cholesky_size`` and, past it, a wrong number from stochastic Lanczos
    quadrature on a negative definite matrix (-1118.8 against 2197.0 at n = 1200). det(c S) = c^n det(S)."""
    partition = bma_gp.Partition.from_labels(torch.arange(n) % 4)
    d = (torch.rand(n, dtype=torch.float64) + 1).requires_grad_(True)
    core = BlockMeanLinearOperator(torch.rand(4, dtype=torch.float64) + 1, torch.eye(4, dtype=torch.float64), partition)
    c = torch.tensor([-2.0, 3.0], dtype=torch.float64).view(2, 1, 1)  # a batch: one negative and one positive factor
    scaled = (core + DiagLinearOperator(d.expand(2, n))) * c
    assert isinstance(scaled, bma_gp.FallbackScaledLinearOperator)
    rhs = torch.randn(2, n, 3, dtype=torch.float64)
    with closed_forms_only(n), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        inv_quad, logdet = scaled.inv_quad_logdet(rhs, logdet=True)
        alone = scaled.logdet()
    dense = c * (core.to_dense() + torch.diag_embed(d.expand(2, n)))
    reference = torch.logdet(dense)  # NaN for the negative factor at odd n, as torch.logdet
    torch.testing.assert_close(logdet, reference, equal_nan=True)
    torch.testing.assert_close(alone, reference, equal_nan=True)
    torch.testing.assert_close(inv_quad, (rhs * torch.linalg.solve(dense, rhs)).sum((-2, -1)))
    (grad,) = torch.autograd.grad(logdet[1] + inv_quad.sum(), d)
    (expected,) = torch.autograd.grad(reference[1] + (rhs * torch.linalg.solve(dense, rhs)).sum(), d)
    torch.testing.assert_close(grad, expected)


# ----------------------------------------------------------------------------- the shell commands the pages show

_TEXT = {path.name: path.read_text(encoding="utf-8").replace("\\\n", " ") for path in PAGES}
_EXAMPLE = re.compile(
    r"(?<![\w/.-])(?:examples/)?(\w+)\.py((?:[ \t]+(?:--?[\w-]+(?:[= ][^\s`|\[\]]+)*|\[[^\]\n]*\]))+)"
)
_CLI = re.compile(r"^(?:\$ )?bma-gp( [^#\n]*)?", re.MULTILINE)


def test_example_flags_in_the_pages_exist():
    """Every ``--flag`` written after ``examples/NAME.py`` (or ``NAME.py``) is an option of that script."""
    checked = 0
    for page, text in _TEXT.items():
        for match in _EXAMPLE.finditer(text):
            script = ROOT / "examples" / f"{match.group(1)}.py"
            if not script.exists():
                continue
            source = script.read_text(encoding="utf-8")
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", match.group(2)):
                assert f'"{flag}"' in source, f"{page}: {script.name} has no option {flag}"
                checked += 1
    assert checked > 50


def test_bma_gp_commands_in_the_pages_parse(tmp_path, monkeypatch):
    """Every ``bma-gp ...`` command line of a code block parses (``--device cuda`` read as cpu: the test has no GPU)."""
    monkeypatch.chdir(tmp_path)  # parsing checks --out, relative to the working directory
    from bma_gp.cli import parse_config

    commands = {cmd.strip() for text in _TEXT.values() for cmd in _CLI.findall(text)}
    for cmd in commands:
        argv = cmd.replace("--device cuda", "--device cpu").split()
        if "--help" in argv or "..." in argv:
            continue
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                parse_config(argv)
            except SystemExit:
                pytest.fail(f"bma-gp {cmd}: {err.getvalue()}")
    assert len(commands) >= 8
    scripts = {m for text in _TEXT.values() for m in re.findall(r"bash (scripts/[\w.-]+\.sh)", text)}
    assert scripts and all((ROOT / s).exists() for s in scripts), scripts
