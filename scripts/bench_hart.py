"""Benchmark of hart.py on the CPU (not collected by pytest).

    python scripts/bench_hart.py [--threads 2] [--reps 3] [--seeds 4] [--resolutions 256 512] [--no-published]

1. Tiny models in the same run, batch 24 (the README's prompts, 64x64): images per second of the tiny HART (6 scales
   + 8 residual-diffusion steps) against the tiny SANA (20 Flow-DPM steps with CFG) and, when its weights are there,
   the tiny DC-AR, each with its prompt fidelity on those prompts x `--seeds` seeds (tests/shapes_score.py); and the
   share of HART's time spent in the residual diffusion MLP (the paper: small).
2. The published-size transformer (hart-0.7b-1024px, depth 24, random weights, fp32, batch 1 doubled for CFG): the
   time of each scale's step with the KV cache, at each of `--resolutions` (their scale schedules), and of the 8
   diffusion steps on the last scale: how the cost grows with resolution.
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # shapes_score
import dcar  # noqa: E402
import hart  # noqa: E402
import sana  # noqa: E402
import shapes_score  # noqa: E402
from benchutil import timeit, tiny_table  # noqa: E402


def tiny(seeds, reps):
    prompts = shapes_score.readme_prompts()
    sana_pipe, hart_pipe = sana.load_tiny(), hart.load_tiny()
    runs = [("tiny SANA, 20 Flow-DPM steps + CFG",
             lambda s: sana_pipe.generate(prompts, 64, 64, 20, None, torch.Generator().manual_seed(s))),
            (f"tiny HART, {len(hart.TINY_PATCH_NUMS)} scales + 8 diffusion steps",
             lambda s: hart_pipe.generate(prompts, generator=torch.Generator().manual_seed(s)))]
    if os.path.isfile(dcar.TINY_WEIGHTS):
        dcar_pipe = dcar.load_tiny()
        runs.append((f"tiny DC-AR, {dcar_pipe.steps} rounds + residual head",
                     lambda s: dcar_pipe.generate(prompts, generator=torch.Generator().manual_seed(s))))
    tiny_table(runs, prompts, seeds, reps)
    spent, sample = [], hart.sample_residual

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = sample(*a, **k)
        spent.append(time.perf_counter() - t0)
        return out

    hart.sample_residual = timed
    try:
        total = timeit(lambda: hart_pipe.generate(prompts, generator=torch.Generator().manual_seed(0)), reps)
    finally:
        hart.sample_residual = sample
    diffusion = sorted(spent)[len(spent) // 2]
    print(f"  tiny HART: residual diffusion {diffusion * 1000:.0f} ms of {total * 1000:.0f} ms per batch "
          f"({diffusion / total:.0%})")


@torch.no_grad()
def published(resolutions, reps):
    cfg = hart.PRESETS["hart-0.7b-1024px"]
    torch.manual_seed(0)
    model = hart.HART(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"hart-0.7b-1024px transformer, random weights, fp32, {torch.get_num_threads()} threads ({n / 1e6:.0f} M "
          f"parameters), batch 1 x 2 for CFG, seconds per scale step with the KV cache:")
    T, C, d = cfg.context_token, cfg.hidden_size, model.head_dim
    for res in resolutions:
        pn = hart.PATCH_NUMS[res]
        P, times = pn[-1], []
        cond = torch.randn(2, T, C)
        positions = torch.arange(T).expand(2, T)

        def run_all():
            cache, out = [[None, None] for _ in model.blocks], []
            for k, p in enumerate(pn):
                x = cond if k == 0 else torch.randn(2, p * p, C)
                cos, sin = hart.rope_1d(positions, d) if k == 0 else \
                    hart.rope_2d(hart.scale_grid(p, P)[None] + positions[:, -1, None, None], d)
                t0 = time.perf_counter()
                model.logits(model.run(x, cond, cos, sin, cache=cache), cond)
                out.append(time.perf_counter() - t0)
            return out

        for _ in range(reps):
            times.append(run_all())
        steps = [sorted(t[k] for t in times)[len(times) // 2] for k in range(len(pn))]
        c = torch.randn(2 * P * P, C)
        t_diff = timeit(lambda: hart.sample_residual(model.diffloss.net, c, 4.0, cfg.num_sampling_steps), 1)
        print(f"  {res} px, {len(pn)} scales, {sum(p * p for p in pn)} tokens: total {sum(steps):.2f} s, "
              f"residual diffusion {t_diff:.2f} s ({t_diff / (sum(steps) + t_diff):.0%})")
        print("    " + "  ".join(f"{p}x{p}: {s:.3f}" for p, s in zip(pn, steps)))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], choices=sorted(hart.PATCH_NUMS))
    p.add_argument("--no-published", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tiny(args.seeds, args.reps)
    if not args.no_published:
        published(args.resolutions, max(1, args.reps // 2))
