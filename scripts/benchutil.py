"""Timing helpers shared by the benchmark scripts scripts/bench_*.py (not a test module)."""
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


def tiny_table(runs, prompts, seeds, reps):
    """runs: [(name, generate(seed) -> uint8 images)] of tiny models on the same prompts. Prints each one's images
    per second (and its ratio to the first's) and its prompt fidelity over `seeds` seeds."""
    import shapes_score
    print(f"tiny models, batch {len(prompts)} (64x64), fidelity on the README's {len(prompts)} prompts x {seeds} seeds")
    base = None
    for name, run in runs:
        t = timeit(lambda: run(0), reps)
        fid = shapes_score.fidelity([img.numpy() for s in range(seeds) for img in run(s)], prompts * seeds)
        base = base or len(prompts) / t
        print(f"  {name:44s} {len(prompts) / t:7.1f} images/s ({len(prompts) / t / base:4.2f}x)  fidelity {fid:.3f}")
