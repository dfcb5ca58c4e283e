"""A miniature GenEval for the synthetic shapes data: read colour, shape and count back from an image.

    read_scene(image)           -> {"background", "color", "shape", "count"} by pixel analysis
    score(image, caption)       -> which of colour / shape / count / background match the caption
    fidelity(images, captions)  -> fraction of images whose colour, shape and count are all right
    report(images, captions)    -> that fraction, per attribute and per shape
    readme_prompts()            -> the README's 24 prompts; second_prompts() the 48 no setting was chosen on;
    all_color_prompts()         -> 48 more with objects of every colour
    render(caption, seed)       -> a rendering of the caption's scene

Pixels are snapped to the nearest palette colour; the most common one is the background, the most common
other one the object colour. Objects are the 4-connected components of that colour (specks dropped). The data draws
triangles apex up, so their centroid sits 1/6 of their height below the centre of their bounding box, while
circles and squares are symmetric; a square fills its bounding box (~1), a circle pi/4 (~0.79). Both cues
survive blur, as a human reading a slightly blurred image would (tests/test_shapes.py checks that). A scene
whose objects disagree reads as "mixed": "three squares" holds only if all three are squares."""
import os
import random
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dcae import COLORS, COUNT_WORDS, SHAPE_COLORS, SHAPES, draw_shapes, random_scene, shapes_caption  # noqa: E402

_NAMES = list(SHAPE_COLORS)
_PALETTE = np.array([SHAPE_COLORS[n] for n in _NAMES], dtype=np.float32)  # (K, 3)


def parse_caption(caption):
    """'two red circles on a blue background' -> dict(count=2, color='red', shape='circle', background='blue')."""
    words = caption.lower().split()
    count = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}[words[0]]
    shape = words[2][:-1] if words[2].endswith("s") else words[2]
    background = words[words.index("background") - 1] if "background" in words else None
    return dict(count=count, color=words[1], shape=shape, background=background)


def _components(mask):
    """4-connected components of a boolean mask, as arrays of (row, col) indices."""
    seen = np.zeros_like(mask, dtype=bool)
    H, W = mask.shape
    comps = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        stack, pix = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            pix.append((r, c))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < H and 0 <= cc < W and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        comps.append(np.array(pix))
    return comps


def read_scene(image):
    """image: (H, W, 3) uint8 array or PIL image."""
    img = np.asarray(image, dtype=np.float32)[..., :3]
    H, W, _ = img.shape
    labels = ((img[:, :, None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)  # (H, W) nearest palette colour
    counts = np.bincount(labels.ravel(), minlength=len(_NAMES))
    bg = int(counts.argmax())
    counts[bg] = 0
    fg = int(counts.argmax())
    min_area = max(6, int(0.004 * H * W))  # anti-aliased edges leave specks of in-between colours
    objects = [c for c in _components(labels == fg) if len(c) >= min_area]
    shapes = []
    for comp in objects:
        top, bottom = comp[:, 0].min(), comp[:, 0].max()
        h = bottom - top + 1
        w = comp[:, 1].max() - comp[:, 1].min() + 1
        fill = len(comp) / (h * w)
        drop = (comp[:, 0].mean() - (top + bottom) / 2) / h  # apex-up triangles are bottom-heavy (1/6 of h)
        shapes.append("triangle" if drop > 0.05 else "square" if fill > 0.87 else "circle")
    shape = shapes[0] if len(set(shapes)) == 1 else "mixed" if shapes else None  # "three squares" = all three
    return dict(background=_NAMES[bg], color=_NAMES[fg] if objects else None, shape=shape, count=len(objects))


def score(image, caption):
    want, got = parse_caption(caption), read_scene(image)
    return {k: want[k] == got[k] for k in ("color", "shape", "count", "background") if want[k] is not None}


def fidelity(images, captions):
    """Fraction of images with colour, shape and count all right (the issue's prompt-fidelity score)."""
    ok = [all(score(img, cap)[k] for k in ("color", "shape", "count")) for img, cap in zip(images, captions)]
    return sum(ok) / len(ok)


def report(images, captions):
    """{"fidelity", "color", "shape", "count", "background": fractions right, "by_shape": {shape: (right, n)}}."""
    scores = [score(img, cap) for img, cap in zip(images, captions)]
    ok = [all(s[k] for k in ("color", "shape", "count")) for s in scores]
    out = {"fidelity": sum(ok) / len(ok)}
    out.update({k: sum(s[k] for s in scores) / len(scores) for k in ("color", "shape", "count", "background")})
    shapes = [parse_caption(c)["shape"] for c in captions]
    out["by_shape"] = {sh: (sum(o for o, s in zip(ok, shapes) if s == sh), shapes.count(sh)) for sh in SHAPES}
    return out


# The first prompt sets were drawn when only these four colours were object colours (any colour is now): they are
# kept as they were, so that scores stay comparable across designs.
FOUR_COLORS = ("red", "green", "blue", "yellow")


def render(caption, seed):
    """A rendering of the caption's scene (uint8 (64, 64, 3)), objects placed from the seed."""
    c = parse_caption(caption)
    return np.asarray(draw_shapes(c["count"], c["color"], c["shape"], c["background"], rng=random.Random(seed)))


def prompts(n, seed, colors=FOUR_COLORS):
    """n captions drawn like the training data (count, colour, shape, background), deterministic from the seed."""
    rng = random.Random(seed)
    return [shapes_caption(*random_scene(rng, colors)) for _ in range(n)]


def readme_prompts():
    """The 24 prompts of the README's fidelity score (the issue's bar is measured on them)."""
    return prompts(24, seed=2026)


def choice_prompts():
    """The prompts on which the tiny model's settings (e.g. its default guidance) were chosen."""
    return prompts(48, seed=99)


def second_prompts():
    """48 prompts that no setting was chosen on: the README's second score."""
    return prompts(48, seed=31337)


def all_color_prompts():
    """48 prompts with objects of any colour (white, black and gray too), that no setting was chosen on."""
    return prompts(48, seed=4242, colors=COLORS)


__all__ = ["parse_caption", "render", "read_scene", "score", "fidelity", "report", "readme_prompts", "choice_prompts",
           "second_prompts", "all_color_prompts", "COUNT_WORDS", "SHAPES"]
