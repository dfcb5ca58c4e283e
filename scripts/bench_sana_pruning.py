"""SANA 1.5's depth pruning on the tiny SANA (not collected by pytest).

    python scripts/bench_sana_pruning.py [--steps 200] [--seeds 4]

Block importance (1 - the mean cosine similarity of each block's input and output tokens) is measured while the
committed tiny SANA samples 16 calibration prompts (a set apart from the README's, 20 steps, both CFG halves);
the model is pruned to each depth (the most important blocks kept, in order), and its prompt fidelity on the
README's 24 prompts x `--seeds` seeds is measured as pruned, then after a short fine-tune (`--steps` steps of the
tiny recipe's loss, batch 128, lr 1e-3, fresh shapes latents; the text encoder trains along), against the unpruned
model, and against the unpruned model fine-tuned the same way (so that the fine-tune's own effect shows). Also:
the fidelity without each single block, to check that the importance ranks the damage.
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # shapes_score
import sana  # noqa: E402
import shapes_score  # noqa: E402


def fidelity(pipe, seeds):
    prompts = shapes_score.readme_prompts()
    images = [img for s in range(seeds) for img in pipe.generate(prompts, 64, 64, 20, None,
                                                                  torch.Generator().manual_seed(s)).numpy()]
    return shapes_score.fidelity(images, prompts * seeds)


def drop(i, depth):
    """The tiny SANA without block i (an importance that ranks block i last)."""
    pipe = sana.load_tiny()
    sana.prune_blocks(pipe.transformer, depth - 1, torch.tensor([float(j != i) for j in range(depth)]))
    return pipe


def main(steps, seeds):
    torch.set_num_threads(2)
    pipe = sana.load_tiny()
    calibration = shapes_score.prompts(16, seed=7)
    t0 = time.time()
    importance = sana.block_importance(pipe, calibration, 64, 64, 20, torch.Generator().manual_seed(0))
    print(f"importance of blocks 0..{len(importance) - 1}: {', '.join(f'{v:.3f}' for v in importance)} "
          f"({time.time() - t0:.1f}s)")
    print("fidelity without one block (no fine-tune): " + ", ".join(
        f"block {i} {fidelity(drop(i, len(importance)), seeds):.3f}" for i in range(len(importance))))
    print(f"| depth | blocks kept | fidelity as pruned | after {steps} fine-tune steps |")
    print("|---|---|---|---|")
    for depth in range(len(importance), 0, -1):
        pipe = sana.load_tiny()
        keep = sana.prune_blocks(pipe.transformer, depth, importance)
        before = fidelity(pipe, seeds)
        t0 = time.time()
        pipe = sana.finetune_tiny(pipe, steps, log=lambda *a: None)
        print(f"| {depth} | {keep} | {before:.3f} | {fidelity(pipe, seeds):.3f} ({time.time() - t0:.0f}s) |",
              flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args()
    main(args.steps, args.seeds)
