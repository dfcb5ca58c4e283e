"""SANA 1.5's depth growth on the tiny SANA (not collected by pytest).

    python scripts/bench_sana_growth.py [--depth 6] [--steps 400] [--seeds 4]

A `--depth`-block tiny SANA trained for `--steps` steps two ways, with the same loop (the tiny recipe's loss, batch
128, lr 3e-3 with its warmup and cosine decay, fresh shapes latents): grown from the committed 4-block model
(sana.grow_depth, "partial preservation": its 4 blocks and every weight outside the blocks copied, the new blocks
newly initialised, its text encoder kept), and from scratch (the tiny recipe's initialization, a new text encoder).
Prints the loss every 100 steps and the prompt fidelity on the README's 24 prompts x `--seeds` seeds.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # shapes_score
import sana  # noqa: E402
from bench_sana_pruning import fidelity  # noqa: E402


def losses(lines):
    return [line.split("loss ")[1].split()[0] for line in lines if line.startswith("step")]


def main(depth, steps, seeds):
    torch.set_num_threads(2)
    tiny = sana.load_tiny()
    grown = sana.tiny_pipeline(sana.grow_depth(tiny.transformer, depth), tiny.text_encoder, tiny.tokenizer, tiny.vae)
    print(f"the committed 4-block model: fidelity {fidelity(tiny, seeds):.3f}; grown to {depth}, untrained: "
          f"{fidelity(grown, seeds):.3f}")
    torch.manual_seed(0)
    model = sana.initialize_weights(sana.SanaTransformer(sana.replace(sana.PRESETS["tiny"], depth=depth)), 1.0)
    torch.nn.init.zeros_(model.proj_out.weight)  # as train_tiny starts it
    torch.nn.init.zeros_(model.proj_out.bias)
    scratch = sana.tiny_pipeline(model, sana.Gemma2(sana.TINY_GEMMA), tiny.tokenizer, tiny.vae)
    print(f"| {depth} blocks, {steps} steps | loss at steps 0, 100, ... | fidelity |")
    print("|---|---|---|")
    for name, pipe in (("grown from 4", grown), ("from scratch", scratch)):
        log = []
        pipe = sana.finetune_tiny(pipe, steps, log=log.append, lr=3e-3)
        print(f"| {name} | {', '.join(losses(log))} | {fidelity(pipe, seeds):.3f} |", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args()
    main(args.depth, args.steps, args.seeds)
