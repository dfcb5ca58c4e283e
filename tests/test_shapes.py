"""The synthetic shapes data and the scorer that reads scenes back (tests/shapes_score.py)."""
import random

import numpy as np
import torch
from PIL import ImageFilter

import dcae
from shapes_score import fidelity, parse_caption, read_scene, score


def scenes(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = dcae.random_scene(rng)
        out.append((dcae.draw_shapes(*scene, rng=rng), dcae.shapes_caption(*scene), scene))
    return out


def test_data_is_deterministic_and_in_range():
    x1, c1 = dcae.shapes_batch(8, seed=3)
    x2, c2 = dcae.shapes_batch(8, seed=3)
    x3, _ = dcae.shapes_batch(8, seed=4)
    assert torch.equal(x1, x2) and c1 == c2 and not torch.equal(x1, x3)
    assert x1.shape == (8, 3, 64, 64) and x1.min() >= -1 and x1.max() <= 1


def test_caption_round_trip():
    assert dcae.shapes_caption(2, "red", "circle", "blue") == "two red circles on a blue background"
    assert parse_caption("a green triangle on a white background") == dict(
        count=1, color="green", shape="triangle", background="white")


def test_scorer_reads_back_every_ground_truth_scene():
    data = scenes(150, seed=11)
    for img, caption, (count, color, shape, background) in data:
        assert read_scene(img) == dict(background=background, color=color, shape=shape, count=count), caption
    assert fidelity([d[0] for d in data], [d[1] for d in data]) == 1.0


def test_scorer_reads_blurred_scenes():
    # A generator's or autoencoder's output is never pixel-sharp; shapes must still be read as a person would.
    data = scenes(150, seed=13)
    blurred = [img.filter(ImageFilter.GaussianBlur(1.5)) for img, _, _ in data]
    assert fidelity(blurred, [d[1] for d in data]) >= 0.95


def test_scorer_rejects_wrong_captions():
    data = scenes(60, seed=12)
    wrong = []
    for _, caption, (count, color, shape, background) in data:
        other = dcae.SHAPES[(dcae.SHAPES.index(shape) + 1) % 3]
        wrong.append(dcae.shapes_caption(count % 3 + 1, color, other, background))
    assert fidelity([d[0] for d in data], wrong) == 0.0
    blank = np.full((64, 64, 3), 245, dtype=np.uint8)  # an empty white image has no objects
    assert score(blank, "a red circle on a white background") == dict(color=False, shape=False, count=False,
                                                                       background=True)


def test_scorer_needs_every_object_to_match():
    """One square and one circle is not "two squares" (nor "two circles"), whatever the order they are found in."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (64, 64), dcae.SHAPE_COLORS["white"])
    draw = ImageDraw.Draw(img)
    draw.rectangle([6, 6, 24, 24], fill=dcae.SHAPE_COLORS["red"])
    draw.ellipse([36, 36, 56, 56], fill=dcae.SHAPE_COLORS["red"])
    for image in (img, img.transpose(Image.Transpose.ROTATE_180)):
        assert read_scene(image) == dict(background="white", color="red", shape="mixed", count=2)
        assert not score(image, "two red squares on a white background")["shape"]
        assert not score(image, "two red circles on a white background")["shape"]


def test_objects_keep_their_gap_and_stay_inside():
    """Every placement of every count keeps the objects' bounding boxes `gap` apart and inside the image, with
    radii in the count's range (the redraw, not an overlap, is what happens when a scene runs out of room)."""
    rng = random.Random(11)
    for count in (1, 2, 3):
        lo, hi = dcae.RADIUS[count]
        for _ in range(300):
            boxes = dcae.place_objects(count, rng)
            assert len(boxes) == count
            assert all(lo <= r <= hi and r < cx < 1 - r and r < cy < 1 - r for cx, cy, r in boxes)
            for i, (ax, ay, ar) in enumerate(boxes):
                for bx, by, br in boxes[:i]:
                    assert abs(ax - bx) > ar + br + 0.06 or abs(ay - by) > ar + br + 0.06
