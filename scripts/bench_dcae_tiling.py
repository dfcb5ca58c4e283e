"""Benchmark: peak memory and time of decoding a 2048 px and a 4096 px latent with the DC-AE, tiled against untiled.

    python scripts/bench_dcae_tiling.py [--model dc-ae-f32c32-sana-1.1] [--sizes 2048 4096] [--tile 512]
                                        [--overlap 64] [--threads 2]

The published architecture with random weights (seeded, so every run decodes with the same ones), float32, on the
CPU. Each decode runs in a process of its own, which reports its peak resident memory (VmHWM, reset after the model
and the latent are made) above what it held before decoding, and the decode's wall time; the untiled decode runs
where it fits in the memory available (estimated from the smaller sizes' measurements, which scale with the pixels).
Prints, per size, both peaks and times, their ratios, and the largest difference between the tiled and the untiled
images (random weights make the seams larger than a trained model's).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dcae  # noqa: E402


def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(args):
    """One decode in this process: prints a JSON line {peak_gb, seconds}; writes the image to --save."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = dcae.DCAE(dcae.PRESETS[args.model]).eval()
    f, c = model.cfg.compression, model.cfg.latent_channels
    z = torch.randn(1, c, args.size // f, args.size // f, generator=torch.Generator().manual_seed(1))
    before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM (the peak) to the current resident size
        fh.write("5")
    with torch.no_grad():
        t0 = time.perf_counter()
        img = model.decode(z, args.tile or None, args.overlap)
        seconds = time.perf_counter() - t0
    peak = status_kb("VmHWM")
    if args.save:
        torch.save(img, args.save)
    print(json.dumps({"peak_gb": (peak - before) / 1e6 * 1.024, "seconds": seconds}))


def run(args, size, tile, save):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", args.model, "--size", str(size),
           "--tile", str(tile), "--overlap", str(args.overlap), "--threads", str(args.threads), "--save", save]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the decode at {size} px (tile {tile}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def available_gb():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) * 1.024 / 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="dc-ae-f32c32-sana-1.1")
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{args.model}, random weights, float32, CPU ({cpu}), {args.threads} threads; tiles of {args.tile} "
          f"overlapping by {args.overlap}; peak = resident memory above the loaded model and latent")
    per_pixel = None  # untiled GB per pixel, from the sizes measured so far
    with tempfile.TemporaryDirectory() as tmp:
        for size in sorted(args.sizes):
            tiled = run(args, size, args.tile, os.path.join(tmp, "tiled.pt"))
            line = f"{size} px: tiled {tiled['peak_gb']:.2f} GB in {tiled['seconds']:.1f} s"
            need = per_pixel * size**2 if per_pixel else None
            if need is not None and need > 0.9 * available_gb():
                print(f"{line}; untiled would need about {need:.0f} GB, {available_gb():.0f} GB available: not run")
                continue
            untiled = run(args, size, 0, os.path.join(tmp, "untiled.pt"))
            per_pixel = untiled["peak_gb"] / size**2
            a, b = (torch.load(os.path.join(tmp, n)) for n in ("tiled.pt", "untiled.pt"))
            diff = (a.clamp(-1, 1) - b.clamp(-1, 1)).abs()  # the images as written, in [-1, 1]
            print(f"{line}; untiled {untiled['peak_gb']:.2f} GB in {untiled['seconds']:.1f} s -> memory x"
                  f"{untiled['peak_gb'] / tiled['peak_gb']:.1f} less, time x{tiled['seconds'] / untiled['seconds']:.2f}"
                  f"; max |tiled - untiled| {diff.max():.3f} (mean {diff.mean():.4f}) of images in [-1, 1] (raw "
                  f"outputs: max {(a - b).abs().max():.3f}, std {b.std():.3f})")


if __name__ == "__main__":
    main()
