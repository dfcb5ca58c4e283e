"""Makes tests/fixtures/dcae/tiled-f8c4-sana-diffusers/: diffusers' tiled encode and decode, the reference of
dcae.py's tiling (tests/test_dcae.py::test_tiling_matches_diffusers).

    pip install diffusers        # the reference (not a project requirement)
    python scripts/make_dcae_tiling_fixture.py [--out tests/fixtures/dcae/tiled-f8c4-sana-diffusers]

A tiny SANA-style AutoencoderDC (f8, 4 latent channels: ResBlocks, then an EfficientViT block with 5x5 multi-scale
aggregation at the latent's resolution, stride-2 conv down, interpolate + conv up, RMSNorm) with seeded random weights, and tiles of 32 pixels
overlapping by 8 (latent tiles of 4 cells every 3), so that a 56x80 image spans 3 x 4 tiles (its latent 7 x 10,
3 x 4 latent tiles) whose last row and column are smaller than the others. The weights are stored in float16 (the
values the reference ran with, in float32), to keep the folder small. The folder holds what
`AutoencoderDC.save_pretrained` writes, `call.json` (the tile settings, in our terms and in diffusers'), and
`tiled.safetensors`: the inputs, diffusers' tiled outputs and, for comparison, its untiled ones.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(
    in_channels=3, latent_channels=4, attention_head_dim=32,
    encoder_block_types=["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
    decoder_block_types=["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
    encoder_block_out_channels=[8, 16, 16, 32], decoder_block_out_channels=[8, 16, 16, 32],
    encoder_layers_per_block=[1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1],
    encoder_qkv_multiscales=[[], [], [], [5]], decoder_qkv_multiscales=[[], [], [], [5]],
    upsample_block_type="interpolate", downsample_block_type="conv",
    decoder_norm_types=["rms_norm"] * 4, decoder_act_fns=["silu"] * 4,
    encoder_out_shortcut=True, decoder_in_shortcut=True, decoder_conv_act_fn="relu", scaling_factor=1.0,
)
TILE, OVERLAP = 32, 8  # pixels; f = 8
IMAGE = (56, 80)  # height, width: 3 x 4 tiles of 32 every 24


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "dcae", "tiled-f8c4-sana-diffusers"))
    args = p.parse_args()
    try:
        import diffusers
        from diffusers import AutoencoderDC
    except ImportError:
        sys.exit("diffusers is not installed: `pip install diffusers` (the reference this fixture records)")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = AutoencoderDC(**CONFIG).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms away from their identity init, so that every parameter matters
        for name, t in model.state_dict().items():
            if "norm" in name:
                t.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(t.shape, generator=g))
    model.half().float()  # float16 values: what the folder stores
    x = torch.rand(1, 3, *IMAGE, generator=g) * 2 - 1
    z = torch.randn(1, 4, IMAGE[0] // 8, IMAGE[1] // 8, generator=g)
    with torch.no_grad():
        untiled = {"latent_untiled": model.encode(x).latent, "image_untiled": model.decode(z).sample}
        model.enable_tiling(tile_sample_min_height=TILE, tile_sample_min_width=TILE,
                            tile_sample_stride_height=TILE - OVERLAP, tile_sample_stride_width=TILE - OVERLAP)
        tiled = {"latent": model.encode(x).latent, "image": model.decode(z).sample}
    os.makedirs(args.out, exist_ok=True)
    model.half().save_pretrained(args.out)  # config.json + diffusion_pytorch_model.safetensors (float16)
    tensors = {"x": x, "z": z, **tiled, **untiled}  # diffusers' outputs may be channels-last views
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(args.out, "tiled.safetensors"))
    call = {"tile": TILE, "overlap": OVERLAP,
            "diffusers_enable_tiling": {"tile_sample_min_height": TILE, "tile_sample_min_width": TILE,
                                        "tile_sample_stride_height": TILE - OVERLAP,
                                        "tile_sample_stride_width": TILE - OVERLAP},
            "diffusers": diffusers.__version__, "torch": torch.__version__, "threads": 1}
    with open(os.path.join(args.out, "call.json"), "w") as f:
        json.dump(call, f, indent=1)
    diff = {k: (tiled[k] - untiled[k + "_untiled"]).abs().max().item() for k in tiled}
    readme = f"""# DC-AE tiling fixture: `tiled-f8c4-sana-diffusers`

Made by `python scripts/make_dcae_tiling_fixture.py` (diffusers {diffusers.__version__}, torch {torch.__version__},
CPU, 1 thread, float32). A tiny SANA-style `AutoencoderDC` (f8, 4 latent channels; `config.json` holds its kwargs),
weights from `torch.manual_seed(0)` (diffusers' init) with every norm weight 1 + 0.2 N(0, 1) and bias 0.2 N(0, 1)
(`torch.Generator().manual_seed(1)`), rounded to float16 and saved so by `save_pretrained` (the reference ran
in float32 on these values).

`call.json`: the tile settings, {TILE} pixels overlapping by {OVERLAP} (our `tile` / `overlap`), which are diffusers'
`enable_tiling(tile_sample_min_height={TILE}, tile_sample_min_width={TILE}, tile_sample_stride_height={TILE - OVERLAP},
tile_sample_stride_width={TILE - OVERLAP})`.

`tiled.safetensors`:

| key | shape | what |
|---|---|---|
| `x` | {list(x.shape)} | an image, uniform in [-1, 1]: 3 x 4 tiles, the last row and column smaller |
| `z` | {list(z.shape)} | a standard-normal latent: 3 x 4 latent tiles of 4 cells every 3 |
| `latent` | {list(tiled["latent"].shape)} | `encode(x).latent` with tiling on |
| `image` | {list(tiled["image"].shape)} | `decode(z).sample` with tiling on |
| `latent_untiled`, `image_untiled` | | the same calls with tiling off |

Tiled against untiled (diffusers), max |difference|: latent {diff["latent"]:.3f}, image {diff["image"]:.3f}: the
seams of a random-weight model are large, so the test that matches `latent` and `image` checks the tiling itself.
"""
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(readme)
    size = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    print(f"wrote {args.out} ({size / 1e3:.0f} kB); tiled vs untiled max |diff|: {diff}")


if __name__ == "__main__":
    main()
