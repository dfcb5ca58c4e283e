"""Benchmark of svdquant.py on the CPU (not collected by pytest).

    python scripts/bench_svdquant.py [--threads 2] [--seeds 4] [--precision int4] [--rank 16] [--skip-tiny]
    python scripts/bench_svdquant.py --prompt "a yellow circle on a blue background" [--seed 0]

1. Memory: bytes of SANA-1.6B's transformer in nunchaku's packed INT4 r32 layout (the published
   svdq-int4_r32-sana1.6b.safetensors) against bf16, counted from the tensors of a model built on the meta
   device: the W4A4 layers alone, the blocks, and the whole transformer, each as a ratio.
2. Per-layer output error on the tiny SANA: for every quantized layer, the relative L2 error of its output on its
   calibration inputs, naive W4A4 / smoothing only / SVDQuant (median and worst over the layers).
3. The tiny table: each method's images against the 16-bit tiny SANA's on the same seed (PSNR, averaged over
   the images) and prompt fidelity (tests/shapes_score.py) on the README's 24 prompts and the second set's 48,
   x `--seeds` seeds; also how often the scorer reads a quantized image as it reads the 16-bit one.
With --prompt, only the three methods on that one prompt and seed: each one's PSNR against the 16-bit image and
what the scorer reads in it (`svdquant.py --prompt` itself writes the SVDQuant image and prints its PSNR alone).
"""
import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # shapes_score
import shapes_score  # noqa: E402
import svdquant as sq  # noqa: E402


def memory():
    cfg = sq.SANA_PRESETS["Sana_1600M_1024px_BF16"]
    with torch.device("meta"):
        base = sq.SanaTransformer(cfg).state_dict()
    packed = sq.to_nunchaku_sana(sq.quantized_sana(cfg, "int4", 32, device="meta"))
    layers = [f"transformer_blocks.{i}.{n}." for i in range(cfg.depth) for g in sq.QUANTIZED for n in g]
    nunchaku = (".qkv_proj.", ".out_proj.", ".q_linear.", ".inverted_conv.", ".point_conv.")
    rows = [("W4A4 layers", sum(2 * v.numel() for k, v in base.items() if any(k.startswith(n) for n in layers)),
             sum(v.numel() * v.element_size() for k, v in packed.items() if any(n in k for n in nunchaku))),
            ("blocks", sum(2 * v.numel() for k, v in base.items() if k.startswith("transformer_blocks.")),
             sum(v.numel() * v.element_size() for k, v in packed.items() if k.startswith("transformer_blocks."))),
            ("whole transformer", sum(2 * v.numel() for v in base.values()),
             sum(v.numel() * v.element_size() for v in packed.values()))]
    print("SANA-1.6B transformer, bf16 vs nunchaku INT4 r32 (counted from the tensors):")
    for name, b16, q in rows:
        print(f"  {name:18s} {b16 / 1e9:6.3f} GB -> {q / 1e9:6.3f} GB   {b16 / q:.2f}x smaller")


def layer_errors(cfg):
    pipe = sq.load_tiny()
    model = pipe.transformer
    groups = [tuple(f"transformer_blocks.{i}.{n}" for n in g)
              for i in range(len(model.transformer_blocks)) for g in sq.QUANTIZED]
    inputs = sq.collect_inputs(model, lambda: pipe.generate(sq.calibration_prompts(32, 1000), 64, 64, 20, None,
                                                            torch.Generator().manual_seed(0)),
                               [g[0] for g in groups], cfg.calib_tokens, torch.Generator().manual_seed(0))
    errors = {m: [] for m in sq.METHODS}
    for group in groups:
        w = torch.cat([sq.weight_2d(model.get_submodule(n)).float() for n in group])
        x = inputs[group[0]]
        y = x @ w.T
        for method in sq.METHODS:
            q = sq.svdquant(w, x, sq.replace(cfg, **sq.METHODS[method]))
            layer = sq.W4A4Linear.from_quantized(q)
            errors[method].append(((layer(x) - y).norm() / y.norm()).item())
    print(f"per-layer relative output error on the tiny SANA ({len(groups)} layers, {cfg.precision}, rank "
          f"{cfg.rank}): median / worst")
    for method, e in errors.items():
        print(f"  {method:9s} {statistics.median(e):.4f} / {max(e):.4f}")


def tiny_table(cfg, seeds):
    sets = {"README (24)": shapes_score.readme_prompts(), "second (48)": shapes_score.second_prompts()}
    pipes = {"16-bit": sq.load_tiny()}
    for method in sq.METHODS:
        t0 = time.time()
        pipes[method] = sq.quantize_tiny(method, sq.replace(cfg, **sq.METHODS[method]), log=lambda *a: None)
        print(f"  {method} quantized in {time.time() - t0:.1f}s", flush=True)
    print(f"tiny SANA, {cfg.precision}, rank {cfg.rank}, 20 steps, guidance 2, {seeds} seeds:")
    for set_name, prompts in sets.items():
        images = {name: torch.cat([p.generate(prompts, 64, 64, 20, None, torch.Generator().manual_seed(s))
                                   for s in range(seeds)]) for name, p in pipes.items()}
        captions = prompts * seeds
        reads = {name: [shapes_score.read_scene(i.numpy()) for i in imgs] for name, imgs in images.items()}
        for name, imgs in images.items():
            r = shapes_score.report([i.numpy() for i in imgs], captions)
            same = sum(a == b for a, b in zip(reads[name], reads["16-bit"])) / len(captions)
            psnr = "" if name == "16-bit" else \
                f"PSNR {sum(sq.psnr(a, b) for a, b in zip(imgs, images['16-bit'])) / len(imgs):5.2f} dB"
            print(f"  {set_name:12s} {name:9s} {psnr:16s} fidelity {r['fidelity']:.3f}  read as the 16-bit one "
                  f"{same:.2f}  {r['by_shape']}", flush=True)


def one_prompt(cfg, prompt, seed):
    """Naive W4A4, smoothing only and SVDQuant, each calibrated as the tiny recipe calibrates (TINY_CALIB_PROMPTS
    captions from seed + 1000), on one prompt: PSNR against the 16-bit image and the scorer's reading."""
    pipe = sq.load_tiny()
    g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    images = {"16-bit": pipe.generate([prompt], 64, 64, 20, None, g())[0]}
    calib = sq.calibration_prompts(sq.TINY_CALIB_PROMPTS, seed + 1000)
    for method in sq.METHODS:
        t0 = time.time()
        q = sq.quantize_pipeline(pipe, sq.replace(cfg, **sq.METHODS[method]), calib, seed=seed, log=lambda *a: None)
        print(f"  {method} quantized in {time.time() - t0:.1f}s", flush=True)
        images[method] = sq.generate(pipe, q, [prompt], 64, 64, 20, None, g())[0]
    print(f"{prompt!r}, seed {seed}, tiny SANA, {cfg.precision}, rank {cfg.rank}:")
    print(f"  {'':9s} {'PSNR vs 16-bit':>15s}  the shapes scorer reads")
    for name, img in images.items():
        scene = shapes_score.read_scene(img.numpy())
        right = all(shapes_score.score(img.numpy(), prompt)[k] for k in ("color", "shape", "count"))
        psnr = "-" if name == "16-bit" else f"{sq.psnr(img, images['16-bit']):.2f} dB"
        print(f"  {name:9s} {psnr:>15s}  {scene['count']} {scene['color']} {scene['shape']} "
              f"({'right' if right else 'wrong'})")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--precision", default="int4", choices=list(sq.GROUP_SIZE))
    p.add_argument("--rank", type=int, default=sq.TINY_QUANT.rank)
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--prompt", help="only the three methods on this prompt of the tiny grammar")
    p.add_argument("--seed", type=int, default=0, help="with --prompt: the seed of its noise and calibration")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.prompt:
        sq.check_tiny_prompt(args.prompt)
        one_prompt(sq.replace(sq.TINY_QUANT, precision=args.precision, rank=args.rank), args.prompt, args.seed)
        print(f"({time.time() - t0:.0f} s)")
        return
    memory()
    if not args.skip_tiny:
        cfg = sq.replace(sq.TINY_QUANT, precision=args.precision, rank=args.rank)
        layer_errors(cfg)
        tiny_table(cfg, args.seeds)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
