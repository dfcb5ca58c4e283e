"""Benchmark of dcar.py on the CPU (not collected by pytest).

    python scripts/bench_dcar.py [--threads 2] [--reps 3] [--seeds 4] [--no-published]

1. The paper's throughput claim in miniature: images per second of the tiny DC-AR (hybrid masked AR, its default
   rounds) against the tiny SANA (20 Flow-DPM steps with CFG) in the same run, batch 24 (the README's prompts), each
   with its prompt fidelity on those prompts x `--seeds` seeds (tests/shapes_score.py). scripts/bench_hart.py puts
   the tiny HART in the same table.
2. The published-size dc-ar-512 generator at 512 px with random weights: one CFG forward of the masked transformer
   (batch 1, doubled for guidance: 2 x 256 tokens, 300 text tokens) and one call of the residual head on its 512
   tokens, and the whole 12-round sampler's transformer time estimated from them.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # shapes_score
import dcar  # noqa: E402
import sana  # noqa: E402
import shapes_score  # noqa: E402
from benchutil import timeit, tiny_table  # noqa: E402


def tiny(seeds, reps):
    prompts = shapes_score.readme_prompts()
    sana_pipe, dcar_pipe = sana.load_tiny(), dcar.load_tiny()
    runs = [("tiny SANA, 20 Flow-DPM steps + CFG",
             lambda s: sana_pipe.generate(prompts, 64, 64, 20, None, torch.Generator().manual_seed(s))),
            (f"tiny DC-AR, {dcar_pipe.steps} rounds + residual head",
             lambda s: dcar_pipe.generate(prompts, generator=torch.Generator().manual_seed(s)))]
    tiny_table(runs, prompts, seeds, reps)


def published(reps):
    cfg = dcar.PRESETS["dc-ar-512"]
    torch.manual_seed(0)
    model, head = dcar.DCAR(cfg).eval(), dcar.DiffusionHead(cfg).eval()
    ids = torch.randint(0, cfg.codebook_size + 1, (2, cfg.seq_len))
    y, mask = torch.randn(2, cfg.text_len, cfg.context_dim), torch.zeros(2, cfg.text_len, dtype=torch.long)
    mask[:, :20] = 1
    drop = torch.tensor([False, True])
    with torch.no_grad():
        t_gen = timeit(lambda: model(ids, y, mask, drop), reps)
        c = torch.randn(2 * cfg.seq_len, cfg.hidden_size)
        x, t = torch.randn(cfg.seq_len, cfg.token_dim), torch.full((2 * cfg.seq_len,), 500)
        t_head = timeit(lambda: head.forward_with_cfg(x, t, c, 4.5), reps)
    n = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in head.parameters())
    print(f"dc-ar-512 at 512 px, random weights, fp32, {torch.get_num_threads()} threads ({n / 1e6:.0f} M parameters):")
    print(f"  masked transformer, one CFG forward (2 x {cfg.seq_len} tokens): {t_gen:.2f} s; 12 rounds: {12 * t_gen:.1f} s")
    print(f"  residual head, one CFG call ({2 * cfg.seq_len} rows): {t_head * 1000:.0f} ms; 32 steps: {32 * t_head:.1f} s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--no-published", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tiny(args.seeds, args.reps)
    if not args.no_published:
        published(args.reps)
