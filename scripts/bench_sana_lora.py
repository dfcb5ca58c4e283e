"""LoRA on your own images, measured on the tiny SANA (docs/sana.md, "LoRA"):

    python scripts/bench_sana_lora.py                       # writes the outlined folder, fine-tunes by the CLI, scores
    python scripts/bench_sana_lora.py --lora style.safetensors   # scores a LoRA already trained

1. The style folder: scripts/make_lora_style_data.py's 1,024 outlined scenes (a temporary folder).
2. `python sana.py --train --data DIR --lora-rank 8 --train-out style.safetensors`, timed (the tiny recipe at rank 8).
3. The tiny model with and without the LoRA on the README's 24 prompts x 4 seeds (20 steps): the style score
   (outline_score, the hollowness of the objects) and the prompt fidelity of the scenes with their holes filled
   (filled + tests/shapes_score.py), and, as the ceiling the tiny DC-AE allows, the same scores of the training
   images themselves and of the README's prompts drawn outlined (seeds 0-3), after an encode-decode round trip.
"""
import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "scripts")]
import sana  # noqa: E402
import shapes_score  # noqa: E402
from make_lora_style_data import draw_outlined, filled, outline_score, write_folder  # noqa: E402


def parts(prompt):
    """'two red circles on a blue background' -> (2, 'red', 'circle', 'blue'): draw_outlined's scene."""
    c = shapes_score.parse_caption(prompt)
    return c["count"], c["color"], c["shape"], c["background"]


def scores(images, captions):
    """'hollowness H, fidelity F (circles c/n, squares s/n, triangles t/n)': the mean hollowness, the fidelity of
    the filled scenes and its images right per shape."""
    r = shapes_score.report([filled(i) for i in images], captions)
    shapes = ", ".join(f"{sh}s {right}/{n}" for sh, (right, n) in r["by_shape"].items())
    return f"hollowness {np.mean([outline_score(i) for i in images]):.3f}, fidelity {r['fidelity']:.3f} ({shapes})"


def sample(pipe, prompts, seeds=(0, 1, 2, 3)):
    images = []
    for s in seeds:
        images += list(pipe.generate(prompts, 64, 64, 20, generator=torch.Generator().manual_seed(s)).numpy())
    return images, prompts * len(seeds)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lora", help="score this LoRA instead of training one")
    a = p.parse_args()
    tmp = tempfile.mkdtemp()
    data = os.path.join(tmp, "outlined")
    write_folder(data)
    lora = a.lora
    if lora is None:
        lora = os.path.join(tmp, "style.safetensors")
        t0 = time.time()
        subprocess.run([sys.executable, os.path.join(ROOT, "sana.py"), "--train", "--data", data, "--lora-rank", "8",
                        "--train-out", lora], check=True)
        print(f"fine-tune: {time.time() - t0:.0f} s (torch threads {torch.get_num_threads()})")
    torch.set_num_threads(2)
    pipe = sana.load_tiny()
    pairs = sana.read_image_folder(data)
    x = torch.stack([sana.load_training_image(path, 64) for path, _ in pairs])
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(x)).clamp(-1, 1)
    rec = list(((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    print("training images after the DC-AE:", scores(rec, [c for _, c in pairs]))
    prompts = shapes_score.readme_prompts()
    outlined = [np.asarray(draw_outlined(*parts(p), size=64, rng=random.Random(s))) for s in range(4) for p in prompts]
    with torch.no_grad():
        x = torch.from_numpy(np.stack(outlined)).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = ((pipe.vae.decode(pipe.vae.encode(x)).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    print("the prompts drawn outlined, after the DC-AE (the ceiling):", scores(list(rec.permute(0, 2, 3, 1).numpy()),
                                                                            prompts * 4))
    print("tiny SANA:          ", scores(*sample(pipe, prompts)))
    sana.apply_lora(pipe.transformer, sana.read_lora(lora), 1.0, lora)
    print("tiny SANA + LoRA:   ", scores(*sample(pipe, prompts)))
