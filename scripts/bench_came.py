"""CAME and CAME-8bit (sana.CAME, the official recipe's optimizer and SANA 1.5's 8-bit variant) on the CPU:

    python scripts/bench_came.py [--steps 300] [--threads 2]

1. The tiny SANA trained from scratch (the tiny recipe's model, init, data and loss; batch 64, a 100-step warm-up,
   no EMA) with AdamW (lr 3e-3, the tiny recipe's), CAME and CAME-8bit (lr 5e-4: CAME has no bias correction, and
   with beta3 = 0.9999 its instability statistics are still a small fraction of their value after a few hundred
   steps, so its early steps are several times larger than Adam's at the same lr) from the same seed on the same
   batches: the loss every 50 steps (a mean over the 50), and each optimizer's state bytes.
2. The optimizer state bytes of the SANA1.5_4.8B_1024px transformer, from one step with gradients on the meta
   device (nothing is allocated): AdamW (two float32 moments), CAME, CAME-8bit.
The tiny recipe itself (EMA, cosine decay, 2,800 steps) trains with CAME or CAME-8bit by `python sana.py --train
--optimizer came|came8bit` (sana.train_tiny(optimizer=...), at the lr of this run); docs/sana.md has the figures.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import sana  # noqa: E402

OPTIMIZERS = {  # name: (make, the tiny run's lr); the CAMEs as `sana.py --train --optimizer came|came8bit` makes them
    "AdamW": (lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0), 3e-3),
    "CAME": (lambda params, lr: sana.make_optimizer("came", params, lr), sana.TINY_LR["came"]),
    "CAME-8bit": (lambda params, lr: sana.make_optimizer("came8bit", params, lr), sana.TINY_LR["came8bit"]),
}


def adamw_bytes(opt):
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)


def tiny(steps, batch=64, n_images=2048):
    vae = sana.load_tiny_dcae()
    z, caps = sana.shapes_latents(vae, n_images, seed=0)
    z = z * vae.cfg.scaling_factor
    ids, mask = sana.tokenize(sana.build_tiny_tokenizer(), caps, sana.TINY_TEXT_LEN)
    null_ids, null_mask = sana.tokenize(sana.build_tiny_tokenizer(), [""], sana.TINY_TEXT_LEN)
    print(f"tiny SANA from scratch, batch {batch}, {steps} steps: mean loss per 50 steps")
    for name, (make, lr) in OPTIMIZERS.items():
        torch.manual_seed(0)
        te, model = sana.Gemma2(sana.TINY_GEMMA), sana.initialize_weights(sana.SanaTransformer(sana.PRESETS["tiny"]),
                                                                          y_norm_scale=1.0)
        torch.nn.init.zeros_(model.proj_out.weight)
        torch.nn.init.zeros_(model.proj_out.bias)
        joint = sana.JointLoss(model, te)
        params = list(model.parameters()) + list(te.parameters())
        opt = make(params, lr)
        g, losses = torch.Generator().manual_seed(0), []
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * min(1, (step + 1) / 100)
            idx = torch.randint(len(z), (batch,), generator=g)
            loss = joint(z[idx], ids[idx], mask[idx], null_ids, null_mask, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
        means = [sum(losses[i:i + 50]) / len(losses[i:i + 50]) for i in range(0, steps, 50)]
        state = opt.state_bytes() if isinstance(opt, sana.CAME) else adamw_bytes(opt)
        print(f"  {name:10s} lr {lr:.0e}  {' '.join(f'{m:.3f}' for m in means)} | state {state / 1e6:.2f} MB")


def meta_4_8b():
    with torch.device("meta"):
        model = sana.SanaTransformer(sana.PRESETS["SANA1.5_4.8B_1024px"])
    n = sum(p.numel() for p in model.parameters())
    print(f"SANA1.5_4.8B_1024px ({n / 1e9:.2f} B parameters), optimizer state on the meta device:")
    print(f"  {'AdamW':10s} {8 * n / 1e9:6.1f} GB (two float32 moments)")
    for name in ("CAME", "CAME-8bit"):
        opt = OPTIMIZERS[name][0](model.parameters(), 1e-4)
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        opt.step()
        print(f"  {name:10s} {opt.state_bytes() / 1e9:6.1f} GB")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    meta_4_8b()
    tiny(args.steps)
