"""Timing helpers shared by the benchmark scripts tests/bench_*.py (not a test module)."""
import statistics
import time

import torch


def timeit(fn, reps):
    """Median wall time of fn() over `reps` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_pair(fa, fb, reps):
    """Median times of two functions measured alternately, so that drifts of the machine hit both alike."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def matmul_peak(sizes=(1024, 2048, 4096), reps=5):
    """Best fp32 GFLOP/s of square matmuls with the current thread count: this machine's practical peak."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best
