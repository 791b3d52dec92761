# torch.linalg.eigh / cholesky of a 256 x 256 SPD matrix on 2 threads and on 1, alternating (session 33).
# Run: python eigh_threads.py   (quiet machine, and beside a full pytest -n 2 run; OMP_WAIT_POLICY=PASSIVE too)
import time, torch, statistics
a = torch.randn(256, 256, dtype=torch.float64); a = a @ a.T + 256 * torch.eye(256, dtype=torch.float64)
for th in (2, 1, 2, 1):
    torch.set_num_threads(th)
    ts = []
    for _ in range(15):
        t = time.perf_counter(); torch.linalg.eigh(a); ts.append(time.perf_counter() - t)
    ch = []
    for _ in range(15):
        t = time.perf_counter(); torch.linalg.cholesky(a); ch.append(time.perf_counter() - t)
    print(th, "eigh median %.1f ms max %.1f ms" % (1e3 * statistics.median(ts), 1e3 * max(ts)), "chol median %.2f ms max %.2f" % (1e3*statistics.median(ch), 1e3*max(ch)))
