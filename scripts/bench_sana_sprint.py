"""Benchmark of sana_sprint.py on the CPU (not collected by pytest).

    python scripts/bench_sana_sprint.py [--threads 1] [--reps 3] [--seeds 4] [--no-diffusers]

1. The paper's speed/quality frontier in miniature: images per second of the tiny student at 1, 2 and 4 steps
   (and 2 steps through the published intermediate time 1.3) against the tiny teacher (sana.py's tiny SANA) at 20
   Flow-DPM steps with CFG, in the same run, batch 24 (the README's prompts), each with its prompt fidelity
   (tests/shapes_score.py) on those prompts x `--seeds` seeds, per shape, and on the second set's 48 prompts: the
   rows of docs/sana_sprint.md's table.
2. The Sana_Sprint_0.6B transformer forward at 1024 px (batch 1, fp32, 300 text tokens) against diffusers'
   SanaTransformer2DModel(guidance_embeds=True) holding the SAME random weights, timed alternately in the same run:
   ratio = diffusers / ours (> 1: ours is faster). Needs `pip install diffusers` (benchmark only).
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
import sana  # noqa: E402
import sana_sprint  # noqa: E402
import shapes_score  # noqa: E402
from benchutil import timeit, timeit_pair  # noqa: E402


def fidelity_report(run, prompts, seeds):
    """The shapes scorer's report over prompts x seeds; run(seed) draws one image per prompt."""
    images = [img.numpy() for s in range(seeds) for img in run(prompts, s)]
    return shapes_score.report(images, prompts * seeds)


def frontier(seeds, reps):
    prompts, second = shapes_score.readme_prompts(), shapes_score.second_prompts()
    teacher, student = sana.load_tiny(), sana_sprint.load_tiny()
    published = sana_sprint.replace(student, intermediate_time=1.3)  # the same weights, the published 2-step times

    def sprint(pipe, n):
        return lambda p, s: pipe.generate(p, 64, 64, n, None, torch.Generator().manual_seed(s))
    runs = [("teacher, 20 steps + CFG", lambda p, s: teacher.generate(p, 64, 64, 20, None,
                                                                      torch.Generator().manual_seed(s)))]
    runs += [(f"student, {n} step{'s' * (n > 1)}", sprint(student, n)) for n in (1, 2)]
    runs += [("student, 2 steps (1.3)", sprint(published, 2)), ("student, 4 steps", sprint(student, 4))]
    base = None
    print(f"tiny models, batch {len(prompts)} (64x64), fidelity on the README's {len(prompts)} prompts and the second "
          f"set's {len(second)} x {seeds} seeds")
    for name, run in runs:
        ips = len(prompts) / timeit(lambda: run(prompts, 0), reps)
        base = base or ips
        r = fidelity_report(run, prompts, seeds)
        shapes = ", ".join(f"{sh} {right}/{n}" for sh, (right, n) in r["by_shape"].items())
        print(f"  {name:24s} {ips:8.1f} images/s  x{ips / base:5.1f} vs the teacher   fidelity {r['fidelity']:.3f} "
              f"({shapes}); second set {fidelity_report(run, second, seeds)['fidelity']:.3f}")


def transformer_vs_diffusers(reps):
    try:
        from diffusers import SanaTransformer2DModel
    except ImportError:
        print("diffusers is NOT installed: skipping the comparison (pip install diffusers to run it)")
        return
    torch.manual_seed(0)
    cfg = sana_sprint.replace(sana_sprint.PRESETS["Sana_Sprint_0.6B_1024px"], logvar=False)
    ours = sana_sprint.SprintTransformer(cfg).eval()
    theirs = SanaTransformer2DModel(
        in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=28,
        num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152, caption_channels=2304,
        mlp_ratio=2.5, sample_size=32, patch_size=1, interpolation_scale=None, guidance_embeds=True,
        qk_norm="rms_norm_across_heads").eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same keys: same random weights
    x, y = torch.randn(1, 32, 32, 32), torch.randn(1, 300, 2304)
    mask = torch.ones(1, 300, dtype=torch.long)
    mask[:, 40:] = 0  # a typical prompt: most of the 300 tokens are padding
    s, g = torch.tensor([0.9]), torch.tensor([0.45])
    with torch.inference_mode():
        out = ours(x, s, y, mask, g)
        ref = theirs(x, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=s, guidance=g,
                     return_dict=False)[0]
        t_ours, t_theirs = timeit_pair(lambda: ours(x, s, y, mask, g), lambda: theirs(
            x, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=s, guidance=g, return_dict=False), reps)
    print(f"Sana_Sprint_0.6B forward, 1024 px: ours {t_ours:.3f} s, diffusers {t_theirs:.3f} s, speed ratio "
          f"diffusers/ours x{t_theirs / t_ours:.2f}, max|diff| {(out - ref).abs().max():.1e}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--no-diffusers", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}")
    t0 = time.time()
    frontier(args.seeds, args.reps)
    if not args.no_diffusers:
        transformer_vs_diffusers(args.reps)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
