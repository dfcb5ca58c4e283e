"""Benchmark of sana.py's Linear DiT on the CPU (not collected by pytest).

    python scripts/bench_sana.py [--threads 2] [--reps 3] [--sizes 512 1024]

1. Sana_600M transformer forward (batch 1, fp32, 300 text tokens) at 512 and 1024 px against diffusers'
   SanaTransformer2DModel holding the SAME random weights, timed in the same run: ratio = diffusers / ours
   (> 1 means ours is faster). Needs `pip install diffusers` (benchmark only; sana.py never imports it).
2. Achieved GFLOP/s of our forward (FLOPs counted by torch's FlopCounterMode) against this machine's fp32
   matmul peak, measured here (best of square matmuls of size 1024-4096).
3. Linear-attention scaling: the time of one self-attention layer at 4x the tokens (1024 -> 4096) divided by
   the time at 1x (linear in N: ~4; softmax attention would be ~16).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sana  # noqa: E402
from benchutil import matmul_peak, timeit, timeit_pair  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        from diffusers import SanaTransformer2DModel
    except ImportError:
        SanaTransformer2DModel = None
        print("diffusers is NOT installed: skipping the comparison (pip install diffusers to run it)")

    cfg = sana.PRESETS["Sana_600M_1024px"]
    ours = sana.SanaTransformer(cfg).eval()
    theirs = None
    if SanaTransformer2DModel is not None:
        theirs = SanaTransformer2DModel(
            in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=28,
            num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152,
            caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1, interpolation_scale=None).eval()
        theirs.load_state_dict(ours.state_dict(), strict=True)  # same keys: same random weights
    peak = matmul_peak()
    print(f"threads={args.threads}  fp32 matmul peak (best square matmul): {peak:.1f} GFLOP/s")

    y = torch.randn(1, 300, 2304)
    mask = torch.ones(1, 300, dtype=torch.long)
    mask[:, 40:] = 0  # a typical prompt: most of the 300 tokens are padding
    t = torch.tensor([999.0])
    for px in args.sizes:
        x = torch.randn(1, 32, px // 32, px // 32)
        with torch.inference_mode():
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as fc:
                out = ours(x, t, y, mask)
            flops = fc.get_total_flops()
            run_ours = lambda: ours(x, t, y, mask)  # noqa: E731
            if theirs is not None:
                run_theirs = lambda: theirs(x, encoder_hidden_states=y, encoder_attention_mask=mask,  # noqa: E731
                                            timestep=t, return_dict=False)
                t_ours, t_theirs = timeit_pair(run_ours, run_theirs, args.reps)
            else:
                t_ours = timeit(run_ours, args.reps)
            line = f"{px:5d} px ({(px // 32) ** 2:5d} tokens): ours {t_ours:7.3f} s, {flops / 1e9:7.1f} GFLOP, " \
                   f"{flops / t_ours / 1e9:6.1f} GFLOP/s = {flops / t_ours / 1e9 / peak:5.1%} of matmul peak"
            if theirs is not None:
                ref = run_theirs()[0]
                line += f" | diffusers {t_theirs:7.3f} s | speed ratio diffusers/ours x{t_theirs / t_ours:.2f}" \
                        f" | max|diff| {(out - ref).abs().max():.1e}"
        print(line)

    attn = ours.transformer_blocks[0].attn1
    times = {}
    for n in (1024, 4096):  # the token counts of 1024 px and 2048 px images
        h = torch.randn(1, n, cfg.hidden_size)
        with torch.inference_mode():
            times[n] = timeit(lambda: attn(h), args.reps)
    print(f"linear self-attention (one layer of Sana_600M, D=1152): 1024 tokens {times[1024] * 1e3:.1f} ms, "
          f"4096 tokens {times[4096] * 1e3:.1f} ms; time(4N) / time(N) = {times[4096] / times[1024]:.2f}")


if __name__ == "__main__":
    main()
