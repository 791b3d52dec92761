"""Prediction of crossed random intercepts at n = 10^6 (the recommender data of session34_crossed_million.py:
``GroupKernel(users) + GroupKernel(items)``, float64, Gaussian likelihood, the initial hyperparameters): predictive
mean and variance at ``t`` new (user, item) pairs, the variance's quadratic form level by level (session 35) against
the row chunks it replaced (``_Structured._one_hot_rest_quadratic`` switched off), interleaved in one process.
Run from a checkout, with n, users, items and t:

    PYTHONPATH=. python docs/results/session35_crossed_million_predict.py 1000000 20000 2000 100000
"""

import resource
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from session34_crossed_million import Model, crossed_ids, new_pairs  # noqa: E402

from bma_gp.kernels import sum_prediction_strategy as sps  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    n, users, items, t = (int(a) for a in sys.argv[1:5])
    u, it, popularity = crossed_ids(n, users, items)
    x = torch.stack([u.double(), it.double()], -1)
    y = torch.randn(n, dtype=torch.float64)
    model = Model(x, y, users, items).double().eval()
    xt = new_pairs(t, users, popularity)
    with torch.no_grad():
        start = time.perf_counter()
        model(xt[:2]).mean  # the training-side factorisation and caches
        print(f"setup (first prediction of 2 points) {time.perf_counter() - start:.2f} s")
        variances = {}
        for rep in range(2):
            for form in ("levels", "rows") if rep % 2 == 0 else ("rows", "levels"):
                off = mock.patch.object(sps._Structured, "_one_hot_rest_quadratic", lambda self: None)
                with off if form == "rows" else mock.patch.object(sps, "__name__", sps.__name__):
                    start = time.perf_counter()
                    post = model.likelihood(model(xt))
                    mean, variance = post.mean, post.variance
                    seconds = time.perf_counter() - start
                variances[form] = variance
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print(f"{form:6s}: mean and variance at {t} points {seconds:.2f} s (peak RSS so far {rss:.0f} MB)")
    diff = float(((variances["levels"] - variances["rows"]).abs() / variances["rows"]).max())
    print(f"variances, levels against rows: at most {diff:.1e} relative")


if __name__ == "__main__":
    main()
