"""Benchmark: DC-AE f32c32 encode + decode at 512x512 on the CPU, ours against diffusers' AutoencoderDC.

    pip install diffusers        # the baseline (not a project requirement)
    python scripts/bench_dcae.py [--model dc-ae-f32c32-sana-1.0] [--size 512] [--reps 3] [--threads 2]

Both models get the same random weights (ours are loaded into diffusers' module tree, which has the same
keys), and are timed in the same run, alternating, median of --reps. Also prints the decoder's achieved
GFLOP/s (FLOPs counted by torch.utils.flop_counter) against this machine's fp32 matmul peak, measured here.
"""
import argparse
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dcae  # noqa: E402
from benchutil import matmul_peak, timeit, timeit_pair  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="dc-ae-f32c32-sana-1.0")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = dcae.PRESETS[args.model]
    ours = dcae.DCAE(cfg).eval()
    for m in ours.modules():  # non-trivial norm statistics, so both models compute something real
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(1, 3, args.size, args.size) * 2 - 1
    print(f"{args.model} at {args.size}x{args.size}, {args.threads} threads, float32, CPU")

    try:
        import json
        from diffusers import AutoencoderDC
    except ImportError:
        AutoencoderDC = None
        print("diffusers is not installed: `pip install diffusers` to time the baseline; timing ours only")

    with torch.no_grad():
        z = ours.encode(x)
        if AutoencoderDC is None:
            t_enc, t_dec = timeit(lambda: ours.encode(x), args.reps), timeit(lambda: ours.decode(z), args.reps)
            print(f"ours:      encode {t_enc:.3f} s  decode {t_dec:.3f} s  total {t_enc + t_dec:.3f} s")
        else:
            manifest = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "dcae", "manifests", f"{args.model}.json")
            kwargs = json.load(open(manifest))["diffusers_format"]["config_json_init_kwargs"]
            ref = AutoencoderDC(**kwargs).eval()
            ref.load_state_dict(ours.state_dict())
            err = (ref.decode(z).sample - ours.decode(z)).abs().max().item()
            t_enc, r_enc = timeit_pair(lambda: ours.encode(x), lambda: ref.encode(x).latent, args.reps)
            t_dec, r_dec = timeit_pair(lambda: ours.decode(z), lambda: ref.decode(z).sample, args.reps)
            print(f"ours:      encode {t_enc:.3f} s  decode {t_dec:.3f} s  total {t_enc + t_dec:.3f} s")
            print(f"diffusers: encode {r_enc:.3f} s  decode {r_dec:.3f} s  total {r_enc + r_dec:.3f} s "
                  f"(max |diff| of decodes {err:.1e})")
            print(f"speed ratio diffusers / ours: encode x{r_enc / t_enc:.2f}, decode x{r_dec / t_dec:.2f}, "
                  f"total x{(r_enc + r_dec) / (t_enc + t_dec):.2f}")

        with FlopCounterMode(display=False) as counter:
            ours.decode(z)
        flops = counter.get_total_flops()
    peak = matmul_peak()
    achieved = flops / t_dec / 1e9
    print(f"decoder: {flops / 1e9:.1f} GFLOP in {t_dec:.3f} s = {achieved:.1f} GFLOP/s; "
          f"fp32 matmul peak {peak:.1f} GFLOP/s -> {100 * achieved / peak:.1f}% of peak")


if __name__ == "__main__":
    main()
