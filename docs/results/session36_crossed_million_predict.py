"""Prediction of crossed random intercepts at n = 10^6 (session 34's recommender data: ``GroupKernel(users) +
GroupKernel(items)``, float64, the initial hyperparameters): three calls of the predictive mean and variance at
100,000 new (user, item) pairs, and the process's peak memory. Session 36 times it in two checkouts, one process each,
alternating, to compare the level form before and after it read ``A_Er``'s nonzeros from the tables' cells; the
variances are saved to compare them:

    git worktree add --detach /tmp/before ce21b17
    for i in 1 2 3; do
      PYTHONPATH=/tmp/before python docs/results/session36_crossed_million_predict.py /tmp/v_before.pt
      PYTHONPATH=. python docs/results/session36_crossed_million_predict.py /tmp/v_after.pt
    done
"""

import resource
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from session34_crossed_million import Model, crossed_ids, new_pairs  # noqa: E402

import bma_gp  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    n, users, items, t = 1_000_000, 20_000, 2_000, 100_000
    u, it, popularity = crossed_ids(n, users, items)
    x = torch.stack([u.double(), it.double()], -1)
    y = torch.randn(n, dtype=torch.float64)
    model = Model(x, y, users, items).double().eval()
    xt = new_pairs(t, users, popularity)
    times = []
    with torch.no_grad():
        model(xt[:2]).mean  # the training-side factorisation and caches
        for _ in range(3):
            start = time.perf_counter()
            post = model.likelihood(model(xt))
            variance = post.mean, post.variance
            times.append(time.perf_counter() - start)
    torch.save(variance[1], sys.argv[1])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    where = bma_gp.__file__.rsplit("/bma_gp", 1)[0]
    print(f"{where}: mean and variance at {t} points {', '.join(f'{s:.2f}' for s in times)} s; peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
