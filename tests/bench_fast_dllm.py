"""Fast-dLLM's Table 1 in miniature, on the committed tiny sorting model (not collected by pytest).

For two generation lengths (block 32; the answer always fits in the first block, the rest is EOS padding as with GSM8K
answers) it runs, on the same held-out problems and interleaved problem by problem so that machine load hits every
method alike: the LLaDA baseline (1 token per forward), +PrefixCache, +DualCache, +parallel decoding (threshold 0.9),
and parallel + PrefixCache / DualCache. Throughput = generated non-EOS tokens / wall time (as in the paper).

    python tests/bench_fast_dllm.py [--n 50] [--lengths 32 128] [--threads 1] [--device cpu]

Cost grows with --n: 1.2-1.5 s per problem on one CPU core (both lengths, all six methods; the non-parallel samplers
at length 128 take most of it) plus a few seconds of start-up. Measured on a 2-core machine shared with other work
(load 2-3): --n 12 took 17 s, the default --n 50 took 79 s, so --n 200 (the README's table) would take about 5 minutes.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fast_dllm as fd  # noqa: E402

METHODS = {  # name -> sampler arguments (steps default to gen_length, or to #blocks with a threshold)
    "LLaDA baseline": dict(cache="none"),
    "+PrefixCache": dict(cache="prefix"),
    "+DualCache": dict(cache="dual"),
    "+parallel (0.9)": dict(cache="none", threshold=0.9),
    "parallel+PrefixCache (Fast-dLLM)": dict(cache="prefix", threshold=0.9),
    "parallel+DualCache": dict(cache="dual", threshold=0.9),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50, help="held-out problems per setting")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = fd.load_tiny(device=args.device)
    problems = fd.heldout_problems(args.n)  # the first n of the README's 200: one RNG stream
    eos = model.cfg.eos_token_id
    print(f"tiny LLaDA ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), {args.n} held-out problems, "
          f"block {args.block_length}, device {args.device}, {args.threads} thread(s)")
    for gen_length in args.lengths:
        stats = {m: dict(correct=0, nfe=0, tokens=0, time=0.0) for m in METHODS}
        for prompt, answer in problems:
            ids = fd.encode_prompt(tok, prompt, fd.tiny_template).to(args.device)
            want = tok.encode(answer, add_special_tokens=False).ids
            for name, kw in METHODS.items():
                t0 = time.perf_counter()
                out, nfe = fd.generate(model, ids, gen_length, args.block_length, **kw)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                s = stats[name]
                s["time"] += time.perf_counter() - t0
                gen = out[0, ids.shape[1]:].tolist()
                s["correct"] += gen == want + [eos] * (gen_length - len(want))
                s["nfe"] += nfe
                s["tokens"] += sum(t != eos for t in gen)
        base_tps = stats["LLaDA baseline"]["tokens"] / stats["LLaDA baseline"]["time"]
        print(f"\ngen_length {gen_length}")
        print("| method | accuracy % | avg forwards | tokens/s | speedup |\n|---|---|---|---|---|")
        for name, s in stats.items():
            tps = s["tokens"] / s["time"]
            print(f"| {name} | {100 * s['correct'] / args.n:.1f} | {s['nfe'] / args.n:.1f} | {tps:.1f} | "
                  f"{tps / base_tps:.1f}x |")


if __name__ == "__main__":
    main()
