"""Forward and backward of the Schur complement's product of one sparse contingency table with itself,
``N diag(c) N^T`` (``bma_gp.block_mean_sum_linear_operator._cells_product``), on random crossings: the median of 7
runs of the product, ``(out * out).sum()`` and its backward pass. Run from a checkout (PYTHONPATH picks the code):

    PYTHONPATH=. python docs/results/session34_cells_product.py
"""

import time

import torch

import bma_gp.block_mean_sum_linear_operator as bms
from bma_gp import Partition

torch.manual_seed(0)
for n, k1, ke in ((20000, 1000, 5000), (200000, 3000, 20000), (73421, 1128, 2972), (500000, 500, 100000)):
    p1 = Partition.from_labels(torch.cat([torch.arange(k1), torch.randint(k1, (n - k1,))]))
    pe = Partition.from_labels(torch.cat([torch.arange(ke), torch.randint(ke, (n - ke,))]))
    cells = bms._Cells.build(p1, pe)
    v = cells.values(torch.rand(n, dtype=torch.float64)).requires_grad_()
    c = torch.rand(ke, dtype=torch.float64, requires_grad=True)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        out = bms._cells_product(cells, v, cells, v, c, k1, k1)
        (out * out).sum().backward()
        times.append(time.perf_counter() - start)
    print(
        f"n = {n}, k_a = {k1}, k_e = {ke}: {cells.count} cells, {cells.pairs(cells)} joined pairs; "
        f"forward + backward {sorted(times)[3] * 1e3:.1f} ms"
    )
