"""How well the tiny ControlNet steers the tiny SANA (not collected by pytest).

    python scripts/bench_sana_controlnet.py [--scenes 96] [--scales 0 0.5 1 1.5]

Held-out shapes scenes (seeded apart from every training set) are rendered; each scene's Sobel edge map
(`sana.edge_map`) is the control image, and its caption the prompt. For each conditioning scale the tiny SANA
generates one image per scene (`sana.steer_scenes`: the same noise at every scale; scale 0 = no control) and the
table reports:
  - IoU: of the object masks of the control scene and the output (`sana.control_iou`; 1 = every object pixel where
    the control put one), the mean over scenes;
  - fidelity: the shapes scorer's prompt fidelity of the outputs (colour, shape and count all right), so that
    following the edges is not bought with the prompt.
Needs weights/sana_controlnet_tiny.safetensors (`python sana.py --train-controlnet`).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # shapes_score
import sana  # noqa: E402
import shapes_score  # noqa: E402

SCENE_SEED = 31337  # apart from train_tiny's (seed * 1_000_003 + i), finetune_tiny's and train_controlnet_tiny's
# (tests/test_sana.py's HELD_OUT_SEED)


def main(n, scales):
    torch.set_num_threads(2)
    pipe, controlnet = sana.load_tiny(), sana.load_tiny_controlnet()
    x, captions = sana.shapes_batch(n, seed=SCENE_SEED)  # held-out scenes: (n, 3, 64, 64) in [-1, 1], captions
    scenes = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
    print("| conditioning scale | IoU with the control scene | prompt fidelity | s / image |")
    print("|---|---|---|---|")
    for scale in scales:
        t0 = time.time()
        images = sana.steer_scenes(pipe, controlnet, x, captions, scale)
        dt = (time.time() - t0) / n
        iou = np.mean([sana.control_iou(s, img) for s, img in zip(scenes, images)])
        fid = shapes_score.fidelity(list(images), captions)
        print(f"| {scale:g}{' (no control)' if not scale else ''} | {iou:.3f} | {fid:.3f} | {dt:.3f} |", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--scenes", type=int, default=96)
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    a = p.parse_args()
    main(a.scenes, a.scales)
