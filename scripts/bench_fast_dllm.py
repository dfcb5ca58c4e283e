"""Fast-dLLM's Tables 1 and 2 in miniature, on the committed tiny sorting models (not collected by pytest).

Part 1, per model (tiny LLaDA, tiny Dream) and generation length (block 32; the answer always fits in the first
block, the rest is EOS padding as with GSM8K answers): the model's baseline sampler (1 token per forward), +PrefixCache,
+DualCache, +parallel decoding (threshold 0.9), and parallel + PrefixCache / DualCache, on the same held-out problems.
Part 2: batches. The baseline and parallel + DualCache at batch 1, 4 and 16 (prompts of mixed lengths, left-padded).
Runs are interleaved problem group by problem group, so that machine load hits every method alike. Throughput =
generated non-EOS tokens / wall time (as in the paper); speed-ups are against the model's baseline in the same run.

    python scripts/bench_fast_dllm.py [--n 48] [--lengths 32 128] [--batch-length 128] [--archs llada dream]
                                    [--threads 1] [--device cpu]

Cost grows with --n (rounded up to a multiple of 16): most of it is the non-parallel samplers at length 128.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fast_dllm as fd  # noqa: E402

METHODS = {  # name -> sampler arguments (steps default to gen_length, or to #blocks with a threshold)
    "baseline": dict(cache="none"),
    "+PrefixCache": dict(cache="prefix"),
    "+DualCache": dict(cache="dual"),
    "+parallel (0.9)": dict(cache="none", threshold=0.9),
    "parallel+PrefixCache (Fast-dLLM)": dict(cache="prefix", threshold=0.9),
    "parallel+DualCache": dict(cache="dual", threshold=0.9),
}
BATCH_METHODS = ("baseline", "parallel+DualCache")
BATCH_SIZES = (1, 4, 16)


def timed(model, tok, problems, batch_size, device, **kw):
    t0 = time.perf_counter()
    acc, nfe, tokens = fd.tiny_accuracy(model, tok, problems, batch_size, **kw)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return dict(correct=acc * len(problems), nfe=nfe, tokens=tokens, time=time.perf_counter() - t0)


def add(total, part):
    for k, v in part.items():
        total[k] = total.get(k, 0) + v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=48, help="held-out problems per setting (rounded up to 16s)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--batch-length", type=int, default=128, help="generation length of the batch table")
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--archs", nargs="+", default=list(fd.TINY_PRESETS), choices=list(fd.TINY_PRESETS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = -(-args.n // 16) * 16
    problems = fd.heldout_problems(n)  # the first n of the README's 200: one RNG stream
    groups = [problems[i:i + 16] for i in range(0, n, 16)]
    print(f"{n} held-out problems, block {args.block_length}, device {args.device}, {args.threads} thread(s)")
    for arch in args.archs:
        model, tok = fd.load_tiny(fd.TINY_PRESETS[arch][1], device=args.device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for gen_length in args.lengths:
            stats = {m: {} for m in METHODS}
            for group in groups:
                for name, kw in METHODS.items():
                    add(stats[name], timed(model, tok, group, 1, args.device, gen_length=gen_length,
                                           block_length=args.block_length, **kw))
            base = stats["baseline"]["tokens"] / stats["baseline"]["time"]
            print(f"\ntiny {arch} ({params:.2f}M params), gen_length {gen_length}, batch 1")
            print("| method | accuracy % | avg forwards | tokens/s | speedup |\n|---|---|---|---|---|")
            for name, s in stats.items():
                tps = s["tokens"] / s["time"]
                print(f"| {name} | {100 * s['correct'] / n:.1f} | {s['nfe'] / n:.1f} | {tps:.1f} | "
                      f"{tps / base:.1f}x |")
        stats = {(m, b): {} for m in BATCH_METHODS for b in BATCH_SIZES}
        for group in groups:
            for name in BATCH_METHODS:
                for b in BATCH_SIZES:
                    add(stats[name, b], timed(model, tok, group, b, args.device, gen_length=args.batch_length,
                                              block_length=args.block_length, **METHODS[name]))
        base = stats["baseline", 1]["tokens"] / stats["baseline", 1]["time"]
        print(f"\ntiny {arch}, gen_length {args.batch_length}, batches of prompts of mixed lengths")
        print("| method | batch | accuracy % | forwards per problem | tokens/s | speedup |\n|---|---|---|---|---|---|")
        for (name, b), s in stats.items():
            tps = s["tokens"] / s["time"]
            print(f"| {name} | {b} | {100 * s['correct'] / n:.1f} | {s['nfe'] / n:.2f} | {tps:.1f} | "
                  f"{tps / base:.1f}x |")


if __name__ == "__main__":
    main()
