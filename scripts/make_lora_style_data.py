"""A folder of images in a style the tiny SANA never saw, for `python sana.py --train --data DIR` (LoRA):

    python scripts/make_lora_style_data.py /tmp/outlined            # 1,024 images, a .txt caption beside each
    python scripts/make_lora_style_data.py /tmp/outlined --jsonl    # the captions in metadata.jsonl instead
    python sana.py --train --data /tmp/outlined --lora-rank 8 --train-out outlined.safetensors
    python sana.py --prompt "two red circles on a blue background" --lora outlined.safetensors

The style: the shapes of the tiny model's data (sana.py's draw_shapes: the same scenes, sizes and placement) drawn
OUTLINED, a ring of the object's colour around the background colour, where the training data fills them. The
captions are the tiny model's ("two red circles on a blue background"): what changes is how, not what, it draws.
Images are written at 128x128, twice the model's resolution, so that the loader's resize runs as it would on a
user's photos. The tiny DC-AE keeps most of the style (an 8x8x4 latent holds a 5 px ring: the hollowness below,
0.23 on these images at 64 px, is 0.18 after a round trip; thinner rings are lost, thicker ones leave small holes).
1,024 scenes by default, many more captions than a handful of images covers (docs/sana.md, "LoRA", has the counts
tried).

outline_score(image) is the style's measure, the "hollowness": of the pixels inside the objects' outer contours,
the share that is not object colour (about 0.2 for these outlines at 64 px, where a triangle's hole is a few
pixels; 0 for filled shapes). filled(image) fills those holes with the object colour, so that the shapes scorer
(tests/shapes_score.py, which reads a shape from how much of its box it fills) reads the scene of an outlined image;
docs/sana.md ("LoRA") reports both on generated images.
"""
import argparse
import json
import os
import random
import sys

import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sana  # noqa: E402

OUTLINE = 0.08  # the ring's width, as a fraction of the image side (5 px at 64 px)


def draw_outlined(count, color, shape, background, size=128, rng=None, supersample=4):
    """sana.draw_shapes' scene (the same rng draws, the same geometry) with each object drawn as an outline."""
    rng = rng or random.Random(0)
    S = size * supersample
    img = Image.new("RGB", (S, S), sana.SHAPE_COLORS[background])
    draw = ImageDraw.Draw(img)
    ink, width = sana.SHAPE_COLORS[color], round(OUTLINE * S)
    for cx, cy, r in sana.place_objects(count, rng):
        cx, cy, r = cx * S, cy * S, r * S
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=ink, width=width)
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], outline=ink, width=width)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], outline=ink, width=width)
    return img.resize((size, size), Image.BOX)


def write_folder(out, n=1024, seed=0, size=128, jsonl=False):
    """n outlined scenes drawn like the tiny model's training data (sana.random_scene) into `out`: 0000.png ... with
    0000.txt beside each, or one metadata.jsonl (file_name, text). Returns the captions."""
    os.makedirs(out, exist_ok=True)
    rng = random.Random(seed)
    captions = []
    for i in range(n):
        scene = sana.random_scene(rng)
        draw_outlined(*scene, size=size, rng=rng).save(os.path.join(out, f"{i:04d}.png"))
        captions.append(sana.shapes_caption(*scene))
        if not jsonl:
            with open(os.path.join(out, f"{i:04d}.txt"), "w") as f:
                f.write(captions[-1] + "\n")
    if jsonl:
        with open(os.path.join(out, "metadata.jsonl"), "w") as f:
            for i, c in enumerate(captions):
                f.write(json.dumps({"file_name": f"{i:04d}.png", "text": c}) + "\n")
    return captions


def object_masks(image):
    """(the object-colour mask, the mask of its holes) of a scene: pixels snapped to the palette, the object colour
    read as sana.read_scene reads it; holes are the non-object regions that do not reach the image's border."""
    img = np.asarray(image, dtype=np.float32)[..., :3]
    labels = ((img[:, :, None, :] - sana._PALETTE) ** 2).sum(-1).argmin(-1)  # (H, W) nearest palette colour
    counts = np.bincount(labels.ravel(), minlength=len(sana._NAMES))
    counts[counts.argmax()] = 0  # the background
    ink = labels == counts.argmax()
    holes = np.zeros_like(ink)
    H, W = ink.shape
    for comp in sana._components(~ink):
        r, c = comp[:, 0], comp[:, 1]
        if not (r.min() == 0 or c.min() == 0 or r.max() == H - 1 or c.max() == W - 1):
            holes[r, c] = True
    return ink, holes


def outline_score(image):
    """Hollowness: of the pixels inside the objects' outer contours, the share that is not object colour (0: filled
    shapes, ~0.2: the outlines this script draws, at 64 px)."""
    ink, holes = object_masks(image)
    return float(holes.sum() / max(1, holes.sum() + ink.sum()))


def filled(image):
    """The scene with its holes painted in the object colour (uint8 (H, W, 3)): what the shapes scorer reads."""
    img = np.array(image, dtype=np.uint8)[..., :3]
    ink, holes = object_masks(img)
    if ink.any():
        img[holes] = np.median(img[ink], axis=0).astype(np.uint8)
    return img


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the folder to write")
    p.add_argument("--n", type=int, default=1024, help="images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="pixels a side (default: %(default)s)")
    p.add_argument("--jsonl", action="store_true", help="captions in metadata.jsonl, not a .txt per image")
    a = p.parse_args()
    caps = write_folder(a.out, a.n, a.seed, a.size, a.jsonl)
    print(f"wrote {len(caps)} outlined scenes to {a.out}, e.g. {caps[0]!r}")
