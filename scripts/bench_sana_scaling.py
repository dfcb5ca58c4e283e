"""SANA 1.5's inference-time scaling on the tiny SANA (not collected by pytest):

    python scripts/bench_sana_scaling.py [--threads 2] [--seeds 4]

For N = 1, 2, 4, 8, 16 candidates per prompt (sana.best_of_n: N noises, then the judge's knockout tournament),
the prompt fidelity of the winners on the README's 24 prompts x `--seeds` seeds, and the time per prompt. The
judge is `sana.shapes_judge`, the project's shapes scorer (it prefers the image with more of colour, shape, count
and background right), standing in offline for the paper's VLM judge. It is also the metric, so these
figures are what a perfect judge would reach: an upper bound for a real judge, as in the paper's oracle rows.
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # shapes_score
import sana  # noqa: E402
import shapes_score  # noqa: E402


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe, prompts = sana.load_tiny(), shapes_score.readme_prompts()
    print(f"tiny SANA, 20 Flow-DPM steps, guidance {pipe.guidance_scale}, README's {len(prompts)} prompts x "
          f"{args.seeds} seeds; judge = the shapes scorer")
    for n in (1, 2, 4, 8, 16):
        images, t0 = [], time.time()
        for seed in range(args.seeds):
            for prompt in prompts:
                g = torch.Generator().manual_seed(seed)
                images.append(sana.best_of_n(pipe, prompt, n, sana.shapes_judge, 64, 64, g).numpy())
        seconds = (time.time() - t0) / len(images)
        r = shapes_score.report(images, prompts * args.seeds)
        shapes = ", ".join(f"{sh} {right}/{total}" for sh, (right, total) in r["by_shape"].items())
        print(f"  N = {n:2d}: fidelity {r['fidelity']:.3f} ({shapes}), {seconds:.2f} s per prompt")
