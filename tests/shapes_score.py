"""A miniature GenEval for the synthetic shapes data: read colour, shape and count back from an image.

    read_scene(image)           -> {"background", "color", "shape", "count"} by pixel analysis (sana.read_scene)
    score(image, caption)       -> which of colour / shape / count / background match the caption (sana.score)
    fidelity(images, captions)  -> fraction of images whose colour, shape and count are all right
    report(images, captions)    -> that fraction, per attribute and per shape
    readme_prompts()            -> the README's 24 prompts; second_prompts() the 48 no setting was chosen on;
    all_color_prompts()         -> 48 more with objects of every colour
    render(caption, seed)       -> a rendering of the caption's scene

The reader lives in sana.py, where it is the tiny model's judge for SANA 1.5's inference-time scaling
(`--samples`); this module imports it and adds the scores and the prompt sets. Pixels are snapped to the nearest
palette colour; the most common one is the background, the most common other one the object colour. Objects are the
4-connected components of that colour (specks dropped). The data draws triangles apex up, so their centroid sits
1/6 of their height below the centre of their bounding box, while circles and squares are symmetric; a square fills
its bounding box (~1), a circle pi/4 (~0.79). Both cues survive blur, as a human reading a slightly blurred image
would (tests/test_shapes.py checks that). A scene whose objects disagree reads as "mixed": "three squares" holds
only if all three are squares."""
import os
import random
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dcae import COLORS, COUNT_WORDS, SHAPES, draw_shapes, random_scene, shapes_caption  # noqa: E402
from sana import parse_caption, read_scene, score  # noqa: E402  the reader: the tiny SANA's judge (--samples)


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
