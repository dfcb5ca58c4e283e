"""DC-AE: Deep Compression Autoencoder for efficient high-resolution diffusion models.

Chen et al., "Deep Compression Autoencoder for Efficient High-Resolution Diffusion Models", ICLR 2025,
arXiv 2410.10733. A deterministic convolutional autoencoder that compresses images 32x, 64x or 128x per side
(f32c32: a 1024x1024 image becomes a 32x32x32 latent) and still reconstructs them well. Two ideas make it work:

  1. Residual autoencoding (paper Sec. 3.2): every down/up-sampling block learns a residual on top of a
     parameter-free shortcut, space-to-channel + channel averaging going down, channel duplication +
     channel-to-space going up. The network only has to learn what the shortcut cannot carry.
  2. Decoupled high-resolution adaptation (Sec. 3.3): train at low resolution, adapt only the layers around
     the latent at high resolution, then refine only the decoder head with a GAN loss (section 4).

Inside, top to bottom (sections 1-4 are the whole method; an autoencoder has no sampler and no pipeline):
  1. Config and presets: `DCAEConfig`, one preset per published checkpoint, with its latent scaling factor
  2. Modules: RMSNorm2d, ResBlock, LiteMLA (ReLU linear attention), GLUMBConv, EfficientViT block, and the
     residual down/up-sampling blocks (the heart of the method: `DownBlock`, `UpBlock`)
  3. Model: Encoder, Decoder, DCAE
  4. Training: the losses, the paper's three phases, one training step
  ---- skip on first read ----
  5. Components: the linear-attention kernel loader, device/dtype and file-reading helpers, torchrun set-up
  6. Checkpoint loading: both published layouts (mit-han-lab and diffusers), strict key check
  7. Tiny default: synthetic "shapes" data (the training data of every tiny demo in this project),
     `train_tiny` (runs under torchrun too), `load_tiny`
  8. CLI: main = parse, check, load, run, write

Run:
  python dcae.py                                   # reconstruct a synthetic image with the tiny default model
  python dcae.py --image in.png --out rec.png      # reconstruct your image, print its PSNR
  python dcae.py --image in.png --ckpt DIR         # with a published checkpoint folder (either layout)
  python dcae.py --train                           # retrain the tiny default (./dcae_tiny.safetensors)
  torchrun --nproc_per_node 2 dcae.py --train --train-steps 20    # the same on 2 processes (DDP)

From Python:
  model = from_pretrained("dc-ae-f32c32-sana-1.1-diffusers", device="cuda")  # a downloaded folder; or load_tiny()
  z = model.encode(x)          # x: (B, 3, H, W) in [-1, 1]; z: (B, c, H/f, W/f), the raw latent
  x_rec = model.decode(z)      # a diffusion model works on z * model.cfg.scaling_factor

Shapes: B batch, C channels (widths[i] at stage i), H/W image height/width, f spatial compression
        (2^(stages - 1)), c latent channels, h/w = H/f, W/f the latent grid, T heads x head dim d (LiteMLA).

Deviations from the official code: (1) parameter names follow diffusers' AutoencoderDC, and a mit-han-lab
file is renamed on load (section 6); (2) the training code was never released: the three phases follow the
paper and the maintainers' description, with a Laplacian-pyramid loss standing in for LPIPS (section 4).
"""
import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
import zipfile
from dataclasses import MISSING, asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_WEIGHTS = os.path.join(HERE, "weights", "dcae_tiny.safetensors")


# ----------------------------------------------------------------------------------------------------------
# 1. Config and presets
# ----------------------------------------------------------------------------------------------------------
# Block types per stage: "ResBlock", "EViT" (EfficientViT block, no multi-scale aggregation) or "EViTS5"
# (EfficientViT block with one extra 5x5 aggregation scale). Widths/depths are listed from the highest
# resolution (stage 0) to the lowest; the spatial compression is 2^(stages - 1).


@dataclass
class DCAEConfig:
    latent_channels: int = 32
    widths: tuple = (128, 256, 512, 512, 1024, 1024)
    encoder_depths: tuple = (2, 2, 2, 3, 3, 3)
    decoder_depths: tuple = (3, 3, 3, 3, 3, 3)
    encoder_blocks: tuple = ("ResBlock",) * 3 + ("EViTS5",) * 3
    decoder_blocks: tuple = ("ResBlock",) * 3 + ("EViTS5",) * 3
    decoder_norms: tuple = ("rms",) * 6  # "rms" (RMSNorm2d) or "bn" (BatchNorm2d, eval-mode running stats)
    decoder_acts: tuple = ("silu",) * 6  # "silu" or "relu"
    decoder_head_act: str = "relu"  # activation before the last conv (relu in 1.0, silu in lite / 1.5)
    encoder_norm: str = "rms"  # of every encoder block ("ln": LayerNorm2d, as DC-HT's)
    decoder_head_norm: str = "rms"  # before the last conv
    downsample: str = "conv"  # "conv" (stride-2 3x3) or "pixel_unshuffle" (3x3 conv then space-to-channel)
    upsample: str = "interpolate"  # "interpolate" (nearest x2 then 3x3) or "pixel_shuffle"
    encoder_out_shortcut: bool = True  # channel-averaging shortcut around the encoder head
    decoder_in_shortcut: bool = True  # channel-duplicating shortcut around the decoder stem
    in_channels: int = 3
    head_dim: int = 32  # LiteMLA head dimension
    scaling_factor: float = 1.0  # diffusion models use latent * scaling_factor; the AE itself never does

    @property
    def compression(self):
        return 2 ** (len(self.widths) - 1)


def _in_mix(latent, stages, sf):
    """in / mix 1.0: pixel-(un)shuffle resampling, ResBlocks (BatchNorm + ReLU in the decoder) at the three
    highest resolutions, EfficientViT blocks below; stage 0 is empty (the stem goes straight to H/2)."""
    k = stages - 3
    return DCAEConfig(
        latent_channels=latent, widths=(128, 256, 512, 512, 1024, 1024, 2048, 2048)[:stages],
        encoder_depths=(0, 4, 8) + (2,) * k, decoder_depths=(0, 5, 10) + (2,) * k,
        encoder_blocks=("ResBlock",) * 3 + ("EViT",) * k, decoder_blocks=("ResBlock",) * 3 + ("EViT",) * k,
        decoder_norms=("bn",) * 3 + ("rms",) * k, decoder_acts=("relu",) * 3 + ("silu",) * k,
        downsample="pixel_unshuffle", upsample="pixel_shuffle", scaling_factor=sf,
    )


def _v15(widths):
    n = len(widths)
    return DCAEConfig(
        latent_channels=128, widths=widths, encoder_depths=(0, 5, 10) + (4,) * (n - 3),
        decoder_depths=(0, 5, 10) + (4,) * (n - 3), encoder_blocks=("ResBlock",) * n,
        decoder_blocks=("ResBlock",) * n, decoder_norms=("rms",) * n, decoder_acts=("silu",) * n,
        decoder_head_act="silu", downsample="pixel_unshuffle", upsample="pixel_shuffle",
        encoder_out_shortcut=False, decoder_in_shortcut=False,
    )


PRESETS = {
    # ImageNet-only ("in") and mixture-trained ("mix") DC-AE 1.0: same architecture, different scaling factor.
    "dc-ae-f32c32-in-1.0": _in_mix(32, 6, 0.3189),
    "dc-ae-f64c128-in-1.0": _in_mix(128, 7, 0.2889),
    "dc-ae-f128c512-in-1.0": _in_mix(512, 8, 0.4883),
    "dc-ae-f32c32-mix-1.0": _in_mix(32, 6, 0.4552),
    "dc-ae-f64c128-mix-1.0": _in_mix(128, 7, 0.4538),
    "dc-ae-f128c512-mix-1.0": _in_mix(512, 8, 0.3620),
    # The autoencoder of SANA (1.1 only retrains the decoder weights).
    "dc-ae-f32c32-sana-1.0": DCAEConfig(scaling_factor=0.41407),
    "dc-ae-f32c32-sana-1.1": DCAEConfig(scaling_factor=0.41407),
    # DC-AE-Lite: the sana-1.1 encoder with a cheaper, all-ResBlock decoder without a full-resolution stage.
    "dc-ae-lite-f32c32-sana-1.1": DCAEConfig(
        decoder_depths=(0, 3, 5, 4, 4, 4), decoder_blocks=("ResBlock",) * 6, decoder_head_act="silu",
        upsample="pixel_shuffle", scaling_factor=0.41407,
    ),
    # DC-AE 1.5 (structured latent space, arXiv 2508.00413): all ResBlocks, no stem/head shortcuts. The
    # scaling factor is not published; calibrate it on your data (1 / std of the latents) before diffusion.
    "dc-ae-f32c128-1.5": _v15((128, 256, 512, 512, 1024, 1024)),
    "dc-ae-f64c128-1.5": _v15((128, 256, 512, 512, 1024, 1024, 1024)),
    # The tiny default of this project: f8c4 on 64x64 synthetic shapes (section 7), in/mix-style resampling.
    "tiny-f8c4-shapes": DCAEConfig(
        latent_channels=4, widths=(16, 32, 64, 128), encoder_depths=(0, 1, 1, 2), decoder_depths=(0, 1, 2, 3),
        encoder_blocks=("ResBlock",) * 3 + ("EViTS5",), decoder_blocks=("ResBlock",) * 3 + ("EViTS5",),
        decoder_norms=("rms",) * 4, decoder_acts=("silu",) * 4, downsample="pixel_unshuffle",
        upsample="pixel_shuffle",
    ),
}
# The Hugging Face repo of DC-AE-Lite is named without the "-sana-1.1" of its registry name.
PRESETS["dc-ae-lite-f32c32"] = PRESETS["dc-ae-lite-f32c32-sana-1.1"]


def get_preset(name):
    """The config of a published checkpoint by name; a Hugging Face repo id works too (the org/ prefix and a
    -diffusers / _diffusers suffix are dropped). One sentence naming the known presets otherwise."""
    key = str(name).split("/")[-1].removesuffix("-diffusers").removesuffix("_diffusers")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {str(name)[:80]!r}; known: {', '.join(PRESETS)}")
    return PRESETS[key]


# ----------------------------------------------------------------------------------------------------------
# 2. Modules. Parameter names follow diffusers' AutoencoderDC, so its files load without renames.
# ----------------------------------------------------------------------------------------------------------
# Sums and activations are written in place where their input is a fresh activation (`f(x).add_(x)`,
# `SiLU(inplace=True)`): the same values, and one activation fewer to allocate, which on the CPU costs about as
# much as the arithmetic (the fresh memory's page faults). Autograd keeps what backward needs, so training is
# unchanged.


class RMSNorm2d(nn.Module):
    """RMSNorm over channels at every pixel, with weight AND bias, accumulated in fp32 (eps 1e-5)."""

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):  # (B, C, H, W)
        xf = x.float()
        # mean over channels of x^2 as |x|^2 / C: vector_norm reads x once, where pow then mean would write x^2 first
        ms = torch.linalg.vector_norm(xf, dim=1, keepdim=True).square() / xf.shape[1]  # (B, 1, H, W)
        y = xf * torch.rsqrt(ms + self.eps)
        return y.mul_(self.weight.float()[:, None, None]).add_(self.bias.float()[:, None, None]).to(x.dtype)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels at every pixel (mean and variance), with weight and bias (eps 1e-5): DC-HT's."""

    def forward(self, x):  # (B, C, H, W)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def make_norm(kind, channels):
    return {"rms": RMSNorm2d, "ln": LayerNorm2d, "bn": nn.BatchNorm2d}[kind](channels)


def make_act(kind):  # in place: every caller passes a fresh activation
    return {"silu": nn.SiLU(inplace=True), "relu": nn.ReLU(inplace=True)}[kind]


class ResBlock(nn.Module):
    """x + norm(conv2(act(conv1(x)))): no pre-norm, conv2 without bias, nothing after the sum."""

    def __init__(self, channels, norm="rms", act="silu"):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.nonlinearity = make_act(act)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = make_norm(norm, channels)

    def forward(self, x):
        return self.norm(self.conv2(self.nonlinearity(self.conv1(x)))).add_(x)


class MultiScaleQKV(nn.Module):
    """Aggregates q, k, v over a scale x scale neighbourhood: depthwise conv, then a grouped 1x1 conv
    that mixes the d channels of each (head, q|k|v) group."""

    def __init__(self, channels, scale, head_dim):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, scale, padding=scale // 2, groups=channels, bias=False)
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=channels // head_dim, bias=False)

    def forward(self, x):
        return self.proj_out(self.proj_in(x))


class LiteMLA(nn.Module):
    """Lightweight multi-scale linear attention (EfficientViT): ReLU linear attention with head dim d = 32.

    The 1x1 qkv projection is stored as three Linear weights to_q | to_k | to_v (diffusers' layout), but these
    are NOT queries, keys and values: they are the first, second and third thirds of the original qkv conv's
    output channels. Heads are consecutive groups of 3d channels laid out [q | k | v] (paper Fig. 4).
    """

    def __init__(self, channels, head_dim=32, scales=(), norm="rms"):
        super().__init__()
        self.d = head_dim
        inner = channels  # heads = channels / d
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(MultiScaleQKV(3 * inner, s, head_dim) for s in scales)
        self.to_out = nn.Linear(inner * (1 + len(scales)), channels, bias=False)
        self.norm_out = make_norm(norm, channels)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        w_qkv = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])  # (3T, C): the fused 1x1 conv
        qkv = F.conv2d(x, w_qkv[:, :, None, None])  # (B, 3T, H, W)
        qkv = torch.cat([qkv] + [agg(qkv) for agg in self.to_qkv_multiscale], dim=1)  # (B, 3T', H, W)
        qkv = qkv.flatten(2).unflatten(1, (-1, 3 * self.d)).transpose(2, 3)  # (B, heads, N, 3d): [q | k | v]
        q, k, v = qkv.split(self.d, dim=3)  # (B, heads, N, d) each, views (no copy in either memory layout)
        if H * W > self.d:  # linear form, O(N d^2)
            out = relu_linear_attention(q, k, v)
        else:  # tiny feature maps: the quadratic form, as the official code switches (same math)
            q, k = torch.relu(q.float()), torch.relu(k.float())
            scores = q @ k.transpose(2, 3)  # (B, heads, N queries, N keys)
            out = ((scores / (scores.sum(dim=3, keepdim=True) + 1e-15)) @ v.float()).to(v.dtype)
        out = out.transpose(1, 2).reshape(B, H, W, -1).permute(0, 3, 1, 2)  # (B, T', H, W), channels-last
        return self.norm_out(F.conv2d(out, self.to_out.weight[:, :, None, None]))


class GLUMBConv(nn.Module):
    """Gated MBConv: 1x1 expand to 2 x 4C + SiLU, 3x3 depthwise, value * SiLU(gate), 1x1 project, RMSNorm."""

    def __init__(self, channels, expand=4, norm="rms"):
        super().__init__()
        hidden = channels * expand
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = make_norm(norm, channels)

    def forward(self, x):
        x = self.conv_depth(F.silu(self.conv_inverted(x), inplace=True))
        value, gate = x.chunk(2, dim=1)
        return self.norm(self.conv_point(value * F.silu(gate)))


class EfficientViTBlock(nn.Module):
    """Global context by linear attention, then local mixing by GLUMBConv; post-norm inside each branch."""

    def __init__(self, channels, head_dim=32, scales=(), norm="rms"):
        super().__init__()
        self.attn = LiteMLA(channels, head_dim, scales, norm)
        self.conv_out = GLUMBConv(channels, norm=norm)

    def forward(self, x):
        x = self.attn(x).add_(x)
        return self.conv_out(x).add_(x)


def make_block(kind, channels, cfg, norm="rms", act="silu"):
    if kind == "ResBlock":
        return ResBlock(channels, norm, act)
    return EfficientViTBlock(channels, cfg.head_dim, (5,) if kind == "EViTS5" else (), norm)


class DownBlock(nn.Module):
    """x2 downsampling: a learned conv plus (residual autoencoding, paper Eq. 2) the parameter-free
    space-to-channel shortcut, averaged over consecutive channel groups to match the output width."""

    def __init__(self, c_in, c_out, kind, shortcut=True):
        super().__init__()
        self.kind, self.shortcut = kind, shortcut
        if kind == "pixel_unshuffle":
            self.conv = nn.Conv2d(c_in, c_out // 4, 3, padding=1)
        else:
            self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.group = c_in * 4 // c_out

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H/2, W/2)
        y = self.conv(x)
        if self.kind == "pixel_unshuffle":
            y = F.pixel_unshuffle(y, 2)
        if self.shortcut:
            s = F.pixel_unshuffle(x, 2)  # (B, 4 C_in, H/2, W/2)
            y = y.add_(s.unflatten(1, (-1, self.group)).mean(dim=2))
        return y


class UpBlock(nn.Module):
    """x2 upsampling: a learned conv plus the channel-duplicating + channel-to-space shortcut."""

    def __init__(self, c_in, c_out, kind, shortcut=True):
        super().__init__()
        self.kind, self.shortcut = kind, shortcut
        self.conv = nn.Conv2d(c_in, c_out * 4 if kind == "pixel_shuffle" else c_out, 3, padding=1)
        self.repeats = c_out * 4 // c_in

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, 2H, 2W)
        if self.kind == "pixel_shuffle":
            y = F.pixel_shuffle(self.conv(x), 2)
        else:
            y = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        if self.shortcut:  # repeat each channel in place (c0 c0 .. c1 c1 ..), not tiling
            y = y.add_(F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2))
        return y


# ----------------------------------------------------------------------------------------------------------
# 3. Model
# ----------------------------------------------------------------------------------------------------------
# Memory layout: the encoder and the decoder run channels-last ((B, H, W, C) in memory, the same (B, C, H, W)
# tensors to every op), and hand back ordinary contiguous tensors. oneDNN's CPU convolutions (and cuDNN's tensor
# cores) compute in that layout, so each conv saves two reorders of its input and output; every module reads the
# same either way (docs/dcae.md has the timings).


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        W, D, S = cfg.widths, cfg.encoder_depths, len(cfg.widths)
        # Stem: a plain conv at full resolution, or (stage 0 empty) a downsampling conv straight to W[1].
        if D[0] > 0:
            self.conv_in = nn.Conv2d(cfg.in_channels, W[0], 3, padding=1)
        else:
            self.conv_in = DownBlock(cfg.in_channels, W[1], cfg.downsample, shortcut=False)
        stages = []
        for i in range(S):
            blocks = [make_block(cfg.encoder_blocks[i], W[i], cfg, cfg.encoder_norm) for _ in range(D[i])]
            if i < S - 1 and D[i] > 0:
                blocks.append(DownBlock(W[i], W[i + 1], cfg.downsample))
            stages.append(nn.Sequential(*blocks))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = nn.Conv2d(W[-1], cfg.latent_channels, 3, padding=1)
        self.out_group = W[-1] // cfg.latent_channels if cfg.encoder_out_shortcut else 0

    def forward(self, x):  # (B, 3, H, W) -> (B, c, H/f, W/f)
        x = self.conv_in(x.contiguous(memory_format=torch.channels_last))  # channels-last: see the note above Encoder
        for stage in self.down_blocks:
            x = stage(x)
        z = self.conv_out(x)
        if self.out_group:  # averaging shortcut: consecutive groups of W[-1]/c channels
            z = z + x.unflatten(1, (-1, self.out_group)).mean(dim=2)
        return z.contiguous()


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        W, D, S = cfg.widths, cfg.decoder_depths, len(cfg.widths)
        self.conv_in = nn.Conv2d(cfg.latent_channels, W[-1], 3, padding=1)
        self.in_repeats = W[-1] // cfg.latent_channels if cfg.decoder_in_shortcut else 0
        stages = []
        for i in range(S):  # built low index first to match the checkpoint; run from S-1 down to 0
            blocks = [UpBlock(W[i + 1], W[i], cfg.upsample)] if i < S - 1 and D[i] > 0 else []
            blocks += [make_block(cfg.decoder_blocks[i], W[i], cfg, cfg.decoder_norms[i], cfg.decoder_acts[i])
                       for _ in range(D[i])]
            stages.append(nn.Sequential(*blocks))
        self.up_blocks = nn.ModuleList(stages)
        head = W[0] if D[0] > 0 else W[1]
        self.norm_out = make_norm(cfg.decoder_head_norm, head)
        self.conv_act = make_act(cfg.decoder_head_act)
        if D[0] > 0:
            self.conv_out = nn.Conv2d(head, cfg.in_channels, 3, padding=1)
        else:
            self.conv_out = UpBlock(head, cfg.in_channels, cfg.upsample, shortcut=False)

    def forward(self, z):  # (B, c, h, w) -> (B, 3, h f, w f)
        z = z.contiguous(memory_format=torch.channels_last)  # channels-last: see the note above Encoder
        x = self.conv_in(z)
        if self.in_repeats:  # duplicating shortcut: each latent channel repeated W[-1]/c times
            x = x + z.repeat_interleave(self.in_repeats, dim=1)
        for stage in reversed(self.up_blocks):
            x = stage(x)
        return self.conv_out(self.conv_act(self.norm_out(x))).contiguous()


class DCAE(nn.Module):
    """encode: image in [-1, 1] (B, 3, H, W) -> raw latent; decode: raw latent -> image (unclamped).

    Both take `tile`, the side of a square tile in pixels: an image (or the image of a latent) larger than that on
    either side then goes through tile by tile, neighbours overlapping by `overlap` pixels that are cross-faded as
    diffusers' AutoencoderDC does under enable_tiling() (its defaults: tile 512, overlap 64). The activations then
    take the memory of one tile, whatever the image size; both numbers are multiples of f.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _check(self, x):
        f = self.cfg.compression
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected images of shape (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {x.shape[3]}x{x.shape[2]} is not a multiple of {f}, "
                             f"the spatial compression of this DC-AE")

    def encode(self, x, tile=None, overlap=None):  # (B, 3, H, W) -> (B, c, H/f, W/f)
        self._check(x)
        f = self.cfg.compression
        overlap = self.tile_overlap(tile, overlap, f) if tile else None
        if tile and max(x.shape[2:]) > tile:
            stride = tile - overlap  # pixels between tile starts
            z = self.tiled(self.encoder, x, tile, stride, overlap // f, stride // f)
            return z[:, :, :x.shape[2] // f, :x.shape[3] // f]
        return self.encoder(x)

    def decode(self, z, tile=None, overlap=None):  # (B, c, h, w) -> (B, 3, h f, w f)
        f = self.cfg.compression
        overlap = self.tile_overlap(tile, overlap, f) if tile else None
        if tile and max(z.shape[2:]) * f > tile:
            return self.tiled(self.decoder, z, tile // f, (tile - overlap) // f, overlap, tile - overlap)
        return self.decoder(z)

    def forward(self, x):
        return self.decode(self.encode(x))

    @staticmethod
    def tile_overlap(tile, overlap, f):
        """The overlap to tile with (None: 64 pixels, or one latent cell if more), after one sentence (ValueError) for
        a tile or an overlap that is not a multiple of f, or an overlap as large as the tile."""
        overlap = max(64, f) if overlap is None else overlap
        if tile <= 0 or tile % f:
            raise ValueError(f"the tile size must be a positive multiple of {f} pixels, the compression of this "
                             f"DC-AE, not {tile}")
        if overlap < 0 or overlap % f or overlap >= tile:
            raise ValueError(f"the tile overlap must be a multiple of {f} pixels smaller than the tile ({tile}), "
                             f"not {overlap}")
        return overlap

    @staticmethod
    def tiled(net, x, tile, stride, blend, keep):
        """net over the tiles x[:, :, i:i + tile, j:j + tile], i and j multiples of `stride` (the last tiles are
        smaller); each output tile is cross-faded over `blend` rows and columns into its upper and left neighbours,
        cut to its first `keep` rows and columns, and stitched. diffusers' tiled_encode / tiled_decode, holding
        one row of tiles at a time instead of all of them."""
        rows, above = [], []
        for i in range(0, x.shape[2], stride):
            row = []
            for j in range(0, x.shape[3], stride):
                t = net(x[:, :, i:i + tile, j:j + tile])
                if above:
                    DCAE.blend(above[len(row)], t, blend, dim=2)
                if row:
                    DCAE.blend(row[-1], t, blend, dim=3)
                row.append(t)
            rows.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
            above = row
        return torch.cat(rows, dim=2)

    @staticmethod
    def blend(a, b, extent, dim):
        """Cross-fades the first `extent` rows (dim 2) or columns (dim 3) of tile b from the last ones of tile a, in
        place: b_y <- a_(y - extent) (1 - y / extent) + b_y y / extent (diffusers' blend_v / blend_h)."""
        extent = min(a.shape[dim], b.shape[dim], extent)
        for y in range(extent):
            b.select(dim, y).copy_(a.select(dim, y - extent) * (1 - y / extent) + b.select(dim, y) * (y / extent))


# ----------------------------------------------------------------------------------------------------------
# 4. Training: the losses, the paper's three phases, one step
# ----------------------------------------------------------------------------------------------------------
# The AE training code was never released; the paper and the maintainers (efficientvit issue #143) give:
#   phase 1  low-resolution full training: all weights, L1 + LPIPS
#   phase 2  high-resolution latent adaptation: only the layers around the latent (encoder's last stage and
#            head, decoder's stem and first stage), L1 + LPIPS at high resolution. Cheap, and it removes the
#            generalisation penalty when a high-compression AE meets larger images than it was trained on.
#   phase 3  low-resolution local refinement: only the decoder head, L1 + LPIPS + GAN, latent space frozen.
# LPIPS needs a pretrained VGG/AlexNet that cannot be downloaded here, so a Laplacian-pyramid L1 loss
# (Bojanowski et al. 2018) stands in for it: it weighs edges and textures at every scale, which is what
# LPIPS adds on top of L1, with no network. Pass a callable as `perceptual` to use the real LPIPS.


def psnr(x, y):
    """PSNR in dB of images in [-1, 1] (computed on [0, 1], clamped), per image."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def laplacian_pyramid_loss(x, y, levels=4):
    """Mean L1 distance between the Laplacian pyramids of x and y, every level weighted per pixel alike."""
    loss = 0.0
    for _ in range(levels - 1):
        xd, yd = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        band_x = x - F.interpolate(xd, scale_factor=2, mode="nearest")  # detail lost by downsampling
        band_y = y - F.interpolate(yd, scale_factor=2, mode="nearest")
        loss = loss + F.l1_loss(band_x, band_y)
        x, y = xd, yd
    return loss + F.l1_loss(x, y)


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (pix2pix): one real/fake logit per overlapping patch."""

    def __init__(self, channels=32, layers=3):
        super().__init__()
        mods, c = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        mods.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)


def trainable_parameters(model, phase):
    """Which weights each phase of the paper trains (Sec. 3.3): 1 everything, 2 both sides of the latent, 3 the
    decoder's head; and 4, phase 3's refinement widened to the whole decoder (ours, for the tiny model: the
    encoder stays frozen, so its latents, and any diffusion model trained on them, stay as they are)."""
    if phase == 1:
        return list(model.parameters())
    if phase == 2:  # around the latent
        enc, dec = model.encoder, model.decoder
        mods = [enc.down_blocks[-1], enc.conv_out, dec.conv_in, dec.up_blocks[-1]]
        return [p for m in mods for p in m.parameters()]
    if phase == 3:
        return list(model.decoder.norm_out.parameters()) + list(model.decoder.conv_out.parameters())
    return list(model.decoder.parameters())  # phase 4


def train_step(model, x, opt, perceptual=laplacian_pyramid_loss, perceptual_weight=0.3, mse_weight=10.0,
               disc=None, disc_opt=None, gan_weight=0.1):
    """One reconstruction step: L1 + MSE + perceptual (+ hinge GAN on the decoder head when `disc` is given).

    The MSE term is ours: it speeds up the convergence of short CPU runs such as the tiny default's (docs/dcae.md
    gives the figure); at full scale the paper's L1 + LPIPS is the objective.
    """
    rec = model(x)
    loss = F.l1_loss(rec, x) + mse_weight * F.mse_loss(rec, x) + perceptual_weight * perceptual(rec, x)
    if disc is not None:
        loss = loss - gan_weight * disc(rec).mean()  # generator hinge loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if disc is not None:
        d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean()
        disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        disc_opt.step()
    return loss.item(), rec.detach()


# ----------------------------------------------------------------------------------------------------------
# 5. Components: skip on first read
# ----------------------------------------------------------------------------------------------------------
# What the method uses but did not invent: the linear-attention kernel loaded by path (with the pure-PyTorch
# reference it falls back to), device/dtype choice, weight-file readers that fail in one sentence, a strict
# state-dict loader, torchrun set-up. The other files carry marked copies of these.


def load_kernel(name):
    """The module kernels/<name>.py beside this file, loaded by its path under a name of its own (so that another
    package called `kernels` on sys.path, such as Hugging Face's, neither hides it nor is hidden by it), or None
    where this file was copied alone. The path taken is the module's __file__."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", f"{name}.py")
    if not os.path.isfile(path):
        return None
    module_name = f"_efficient_genai_kernels_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # before running it: Triton's JIT and dataclasses look the module up
        spec.loader.exec_module(module)
    return sys.modules[module_name]


# Copied from kernels/linear_attention.py: relu_linear_attention_ref
def relu_linear_attention_ref(q, k, v, eps=1e-15):
    """q, k, v: (B, H, N, d) before the ReLU. Returns (B, H, N, d) in the dtype of v."""
    dtype = v.dtype
    q, k, v = torch.relu(q.float()), torch.relu(k.float()), v.float()
    kv = k.transpose(-1, -2) @ v  # (B, H, d, d)  phi(K)^T V
    k_sum = k.sum(dim=-2, keepdim=True)  # (B, H, 1, d)  sum_m phi(k_m)
    num = q @ kv  # (B, H, N, d)
    den = (q * k_sum).sum(dim=-1, keepdim=True)  # (B, H, N, 1)
    return (num / (den + eps)).to(dtype)


LINEAR_ATTENTION = load_kernel("linear_attention")  # Triton on CUDA, the reference elsewhere
relu_linear_attention = LINEAR_ATTENTION.relu_linear_attention if LINEAR_ATTENTION else relu_linear_attention_ref


# best_dtype (section 8 prints the choice).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device=None):
    """'cpu', 'cuda', 'cuda:N' or 'mps' as given (one sentence if this machine has no such device), or the first
    available of cuda, mps, cpu when None or empty."""
    if not device:
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = str(device).partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: PyTorch sees no CUDA GPU on this machine")
        if index and not (index.isdigit() and int(index) < torch.cuda.device_count()):
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif kind == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r}: PyTorch sees no Apple GPU (mps) on this machine")
    elif kind != "cpu" or index:
        raise ValueError(f"unknown device {str(device)[:40]!r}; use cpu, cuda, cuda:N or mps")
    return str(device)


def best_dtype(device):
    """(dtype, why) for a device: bfloat16 on CUDA GPUs with bf16 tensor cores, float16 on older ones, float32
    elsewhere (CPU bfloat16 is fast only with AVX512-BF16/AMX, and mps is safest in float32)."""
    if str(device).startswith("cuda"):
        major = torch.cuda.get_device_capability(device)[0]
        return (torch.bfloat16, "bf16 tensor cores") if major >= 8 else (torch.float16, "GPU without bf16")
    return torch.float32, f"the default on {str(device).split(':')[0]}"


def resolve_dtype(dtype=None, device="cpu"):
    """A torch dtype or its name (float32, bfloat16, float16); None or empty: the best for the device."""
    if dtype is None or dtype == "":
        return best_dtype(device)[0]
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {str(dtype)[:40]!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def read_json(path):
    """A JSON config as a dict; one sentence naming the file when it is missing, cut short, nested too deep to
    read, or not a JSON object."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); was the download interrupted?") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a config") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not the object {{...}} of a config")
    return obj


def check_config(cfg, source):
    """`cfg`, a config dataclass read from `source`, if each field holds the kind of value of its default (an
    integer for an int, a list of strings for a tuple of str); otherwise one sentence naming the first that does
    not, which would fail deep inside the model, or build another one than the weights'."""
    kinds = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}

    def fits(want, got):
        if want is None:
            return True
        if isinstance(want, (bool, int, float)):
            ok = (bool,) if isinstance(want, bool) else (int, float) if isinstance(want, float) else (int,)
            return isinstance(got, ok) and isinstance(got, bool) == isinstance(want, bool)
        if isinstance(want, (tuple, list)):
            return isinstance(got, (tuple, list)) and all(fits(want[0] if want else None, g) for g in got)
        return isinstance(got, type(want))
    for f in fields(cfg):
        value, want = getattr(cfg, f.name), f.default
        if want is not MISSING and not fits(want, value):
            like = f"a list like {list(want)}" if isinstance(want, tuple) else kinds.get(type(want), "another kind")
            raise ValueError(f"{source}: {f.name} is {repr(value)[:40]}, not {like}")
    return cfg


def read_weights(path):
    """The tensors of one weights file: .safetensors, or a PyTorch file (.pth/.pt/.bin) read with
    weights_only=True, which never runs code. One sentence naming the file when it cannot be read."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} not found")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except Exception as e:  # safetensors' SafetensorError: a cut header or data section
            raise ValueError(f"{path} is not a readable safetensors file ({e}); was the download "
                             f"interrupted?") from None
    with open(path, "rb") as f:
        head = f.read(2)  # a legacy pickle starts with its protocol opcode 0x80, a zip with "PK"
    is_zip = zipfile.is_zipfile(path)  # torch.save's format
    if not is_zip and head == b"PK":
        raise ValueError(f"{path} is a zip archive cut short; was the download interrupted?")
    if not (is_zip or head[:1] == b"\x80"):
        raise ValueError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:  # a zip file is memory-mapped: a 10 GB checkpoint is not read into memory twice
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError...
        if "Weights only load failed" in str(e):
            raise ValueError(f"{path} holds pickled Python objects besides tensors; it was not loaded, since "
                             f"unpickling them could run code (re-save it as safetensors)") from None
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({str(e)[:80].strip()}); was the "
                         f"download interrupted?") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict (a dict of tensors)")
    return sd


def read_metadata(path):
    """The string metadata of a .safetensors file ({} when it has none)."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} not found")
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # SafetensorError
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def save_weights(tensors, path, metadata=None):
    """safetensors' save_file, whole or not at all: the tensors go to a temporary file beside `path`, renamed over
    it once complete, so an interrupted run (Ctrl-C, a full disk) leaves the file that was there before."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_state_dict(own, sd, source, what="the model"):
    """own: {name: shape} expected; sd: the tensors found. One ValueError naming the missing, unexpected and
    mis-shaped keys (with both shapes) unless names and shapes match exactly."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k} {tuple(sd[k].shape)} (model: {tuple(own[k])})" for k in sorted(set(own) & set(sd))
             if tuple(sd[k].shape) != tuple(own[k])]
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
        parts = [f"{len(missing)} missing: {show(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {show(unexpected)}" if unexpected else "",
                 f"{len(wrong)} with another shape: {show(wrong)}" if wrong else ""]
        raise ValueError(f"{source} does not fit {what}: " + "; ".join(p for p in parts if p))


def load_state_dict_strict(model, sd, source):
    """Put `sd` into `model` (which may live on the meta device) if names and shapes match exactly and every value
    is finite; otherwise one ValueError naming the missing, unexpected and mis-shaped keys (with both shapes), or
    the tensors holding NaN or inf (which would draw black images and empty answers)."""
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, sd, source)
    broken = [k for k, v in sd.items() if v.is_floating_point() and not v.is_meta and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f"{source} holds NaN or inf in {len(broken)} tensor(s) ({', '.join(broken[:3])}): the "
                         f"weights are broken (a training run that diverged, or a faulty conversion)")
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def ddp_setup(device="cpu"):
    """Under torchrun, join the process group (gloo for CPU training, nccl for CUDA) and return (rank, world
    size); in one plain process, (0, 1). As in nanoGPT's train.py, every rank runs the same script on its own
    data, DistributedDataParallel averages the gradients, and rank 0 alone logs and writes the weights."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    return dist.get_rank(), world


# ----------------------------------------------------------------------------------------------------------
# 6. Checkpoint loading
# ----------------------------------------------------------------------------------------------------------
# mit-han-lab layout: config.json = {"model_name": ...} + model.safetensors with efficientvit module names.
# diffusers layout:   config.json = AutoencoderDC kwargs + diffusion_pytorch_model.safetensors (our names).
# Original -> ours: drop the OpSequential/ResidualBlock levels ("op_list.", "main."), rename the stems and
# heads, collapse ConvLayer wrappers, and cut the fused 1x1 qkv conv into to_q | to_k | to_v.


def config_from_diffusers(cfg):
    """`AutoencoderDC` config.json (diffusers) -> DCAEConfig."""
    n = len(cfg["encoder_block_out_channels"])
    per_stage = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n  # noqa: E731
    assert list(cfg["encoder_block_out_channels"]) == list(cfg["decoder_block_out_channels"])

    def blocks(types, scales):
        return tuple(t if t == "ResBlock" else ("EViTS5" if 5 in s else "EViT")
                     for t, s in zip(per_stage(types), scales))

    return DCAEConfig(
        latent_channels=cfg["latent_channels"], widths=tuple(cfg["encoder_block_out_channels"]),
        encoder_depths=tuple(cfg["encoder_layers_per_block"]), decoder_depths=tuple(cfg["decoder_layers_per_block"]),
        encoder_blocks=blocks(cfg["encoder_block_types"], cfg["encoder_qkv_multiscales"]),
        decoder_blocks=blocks(cfg["decoder_block_types"], cfg["decoder_qkv_multiscales"]),
        decoder_norms=tuple({"rms_norm": "rms", "batch_norm": "bn"}[x] for x in per_stage(cfg["decoder_norm_types"])),
        decoder_acts=per_stage(cfg["decoder_act_fns"]), decoder_head_act=cfg.get("decoder_conv_act_fn", "relu"),
        downsample=cfg["downsample_block_type"], upsample=cfg["upsample_block_type"],
        encoder_out_shortcut=cfg.get("encoder_out_shortcut", True), decoder_in_shortcut=cfg.get("decoder_in_shortcut", True),
        in_channels=cfg.get("in_channels", 3), head_dim=cfg.get("attention_head_dim", 32),
        scaling_factor=cfg.get("scaling_factor") or 1.0,
    )


def config_from_efficientvit(cfg):
    """A resolved efficientvit `DCAEConfig` (dict, as in the official model zoo) -> DCAEConfig."""
    enc, dec = cfg["encoder"], cfg["decoder"]
    n = len(enc["width_list"])
    per_stage = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n  # noqa: E731
    block = {"ResBlock": "ResBlock", "EViT_GLU": "EViT", "EViTGLU": "EViT", "EViTS5_GLU": "EViTS5", "EViTS5GLU": "EViTS5"}
    return DCAEConfig(
        latent_channels=cfg["latent_channels"], widths=tuple(enc["width_list"]),
        encoder_depths=tuple(enc["depth_list"]), decoder_depths=tuple(dec["depth_list"]),
        encoder_blocks=tuple(block[b] for b in per_stage(enc["block_type"])),
        decoder_blocks=tuple(block[b] for b in per_stage(dec["block_type"])),
        decoder_norms=tuple({"trms2d": "rms", "rms2d": "rms", "bn2d": "bn"}[x] for x in per_stage(dec["norm"])),
        decoder_acts=per_stage(dec["act"]), decoder_head_act=dec["out_act"],
        downsample={"Conv": "conv", "ConvPixelUnshuffle": "pixel_unshuffle"}[enc["downsample_block_type"]],
        upsample={"InterpolateConv": "interpolate", "ConvPixelShuffle": "pixel_shuffle"}[dec["upsample_block_type"]],
        encoder_out_shortcut=enc.get("out_shortcut") is not None, decoder_in_shortcut=dec.get("in_shortcut") is not None,
        in_channels=cfg.get("in_channels", 3), scaling_factor=cfg.get("scaling_factor") or 1.0,
    )


_RENAMES = [  # applied in order, after "main." and "op_list." are dropped
    ("encoder.project_in.conv.", "encoder.conv_in."), ("decoder.project_in.conv.", "decoder.conv_in."),
    ("encoder.project_out.0.conv.", "encoder.conv_out."), ("decoder.project_out.0.", "decoder.norm_out."),
    ("decoder.project_out.2.conv.", "decoder.conv_out."),
    ("encoder.stages.", "encoder.down_blocks."), ("decoder.stages.", "decoder.up_blocks."),
    ("context_module.", "attn."), ("local_module.", "conv_out."),
    ("aggreg.0.0.", "to_qkv_multiscale.0.proj_in."), ("aggreg.0.1.", "to_qkv_multiscale.0.proj_out."),
    ("inverted_conv.conv.", "conv_inverted."), ("depth_conv.conv.", "conv_depth."),
    ("point_conv.conv.", "conv_point."), ("point_conv.norm.", "norm."),
    ("conv1.conv.", "conv1."), ("conv2.conv.", "conv2."), ("conv2.norm.", "norm."),
    ("proj.conv.", "to_out."), ("proj.norm.", "norm_out."), ("conv.conv.", "conv."),
]


def convert_original_state_dict(sd):
    """mit-han-lab (efficientvit) state dict -> our (diffusers) names."""
    out = {}
    for key, value in sd.items():
        k = key.replace("main.", "").replace("op_list.", "")
        for old, new in _RENAMES:
            k = k.replace(old, new)
        if k.endswith("attn.qkv.conv.weight"):  # (3T, C, 1, 1) -> three (T, C)
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[k.replace("qkv.conv.weight", f"to_{name}.weight")] = part[:, :, 0, 0]
        elif k.endswith("attn.to_out.weight"):  # (C, T', 1, 1) -> (C, T')
            out[k] = value[:, :, 0, 0]
        else:
            out[k] = value
    return out


def from_pretrained(path, config=None, *, device="cpu", dtype=torch.float32):
    """Load a published DC-AE folder as downloaded, in either layout (detected from its files).

    `config` (a DCAEConfig or a preset name) overrides the architecture; a mit-han-lab folder whose model name
    is not a published one needs it. Returns the model in eval mode.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    if isinstance(config, str):
        config = get_preset(config)
    if config is not None and not isinstance(config, DCAEConfig):
        raise ValueError(f"config must be a DCAEConfig or a preset name, not {type(config).__name__}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"{path} is a file; give the checkpoint folder as downloaded (config.json + weights)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: not a DC-AE checkpoint folder")
    raw = read_json(os.path.join(path, "config.json"))
    diffusers_file = os.path.join(path, "diffusion_pytorch_model.safetensors")
    original_file = os.path.join(path, "model.safetensors")
    if raw.get("_class_name") == "AutoencoderDC" and os.path.isfile(diffusers_file):
        try:
            cfg = check_config(config or config_from_diffusers(raw), os.path.join(path, "config.json"))
        except (KeyError, TypeError, AttributeError) as e:  # a field missing, or of a kind no config holds
            raise ValueError(f"{os.path.join(path, 'config.json')} is not a complete AutoencoderDC config "
                             f"({type(e).__name__}: {str(e)[:80]})") from None
        sd = read_weights(diffusers_file)
    elif "model_name" in raw and os.path.isfile(original_file):
        cfg = config or get_preset(raw["model_name"])
        sd = convert_original_state_dict(read_weights(original_file))
    else:
        kind = raw.get("_class_name") or raw.get("model_type") or raw.get("architectures") or "unknown"
        raise ValueError(f"{path} is not a DC-AE checkpoint (config.json describes {kind!r}; expected an "
                         f"AutoencoderDC diffusers folder or a mit-han-lab folder with model.safetensors)")
    with torch.device("meta"):
        model = DCAE(cfg)
    load_state_dict_strict(model, sd, path)
    return model.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------------------
# 7. Tiny default: synthetic shapes, train_tiny, load_tiny
# ----------------------------------------------------------------------------------------------------------
# 1-3 objects of one shape and colour on a plain background, with a caption: the training data of every tiny
# demo in this project, deterministic from the seed.

SHAPE_COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (240, 210, 30),
                "white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
COLORS = ("white", "black", "gray", "red", "green", "blue", "yellow")  # of the objects and of the background
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("a", "two", "three")
RADIUS = {1: (0.16, 0.25), 2: (0.14, 0.19), 3: (0.14, 0.19)}  # object radius per count, as a fraction of the size


def shapes_caption(count, color, shape, background):
    noun = shape if count == 1 else shape + "s"
    return f"{COUNT_WORDS[count - 1]} {color} {noun} on a {background} background"


def place_objects(count, rng, gap=0.06):
    """(cx, cy, r) in [0, 1] for `count` objects whose bounding boxes stay `gap` apart (so they can be counted);
    a scene with no room left for the next object is drawn again from the start."""
    lo, hi = RADIUS[count]
    while True:
        boxes = []
        for _ in range(count):
            for _attempt in range(100):
                r = rng.uniform(lo, hi)
                cx, cy = rng.uniform(r + 0.01, 1 - r - 0.01), rng.uniform(r + 0.01, 1 - r - 0.01)
                if all(abs(cx - bx) > r + br + gap or abs(cy - by) > r + br + gap for bx, by, br in boxes):
                    boxes.append((cx, cy, r))
                    break
            else:  # no room for this object after 100 tries: draw the scene again
                break
        if len(boxes) == count:
            return boxes


def draw_shapes(count, color, shape, background, size=64, rng=None, supersample=4):
    """Renders the scene anti-aliased (drawn at `supersample` x the size, then box-filtered)."""
    rng = rng or random.Random(0)
    S = size * supersample
    img = Image.new("RGB", (S, S), SHAPE_COLORS[background])
    draw = ImageDraw.Draw(img)
    fill = SHAPE_COLORS[color]
    for cx, cy, r in place_objects(count, rng):
        cx, cy, r = cx * S, cy * S, r * S
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":  # the circle's bounding box
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return img.resize((size, size), Image.BOX)


def random_scene(rng, colors=COLORS):
    """(count, color, shape, background) drawn uniformly; the background differs from the object colour."""
    color = rng.choice(colors)
    background = rng.choice([b for b in COLORS if b != color])
    return rng.randint(1, 3), color, rng.choice(SHAPES), background


def shapes_batch(n, seed, size=64):
    """n images (n, 3, size, size) in [-1, 1] and their captions, deterministic from the seed."""
    rng = random.Random(seed)
    images, captions = [], []
    for _ in range(n):
        scene = random_scene(rng)
        images.append(np.asarray(draw_shapes(*scene, size=size, rng=rng)))
        captions.append(shapes_caption(*scene))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, captions


# What a --train run says, so that anyone can rerun it on their own CPU: this CPU and the precision first, then the
# plan with the time it took where it was timed, then one progress line per phase with an ETA, and, once ten steps
# are timed, how long the whole run will take on this CPU (a slow CPU learns it in the first minute, and that
# --train-steps shortens it).


def cpu_summary(threads, world=1):
    """One line: the ISA torch's kernels use here (ATEN_CPU_CAPABILITY can lower it), native bfloat16, the cores
    and the threads a --train run uses."""
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return (f"CPU: {torch.backends.cpu.get_cpu_capability()} kernels, "
            f"{'native bfloat16 (AVX512-BF16/AMX)' if bf16 else 'no native bfloat16'}, {os.cpu_count()} cores; "
            f"training on {threads} thread(s) x {world} process(es)")


def format_time(seconds):  # 75.2 -> "1 min 15 s"
    s = round(seconds)
    return f"{s // 3600} h {s // 60 % 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s" if s >= 60 \
        else f"{s} s"


class TrainProgress:
    """The plan and the progress of a training run. `plan`: its phases as (name, steps, seconds a step took on
    `reference`, the CPU the recipe was timed on); work without steps (encoding a dataset) is a phase of 1 step.
    step(i, **metrics) after each step of the current phase (phase(name)) updates one line in place when the log
    is print to a terminal, or logs a line every `every` steps (and the last) otherwise."""

    def __init__(self, plan, reference, log=print, every=100):
        self.plan, self.log, self.every = list(plan), log, every
        self.live = log is print and sys.stdout.isatty()
        self.t0, self.scale, self.phase_index, self.last_draw = time.time(), None, -1, 0.0
        log("plan: " + ", then ".join(f"{name} ({n:,} steps)" if n > 1 else name for name, n, _ in plan) +
            f"; about {format_time(sum(n * s for _, n, s in plan))} on {reference}")

    def phase(self, name):
        self.phase_index = [p[0] for p in self.plan].index(name)
        self.name, self.steps, self.ref = self.plan[self.phase_index]
        self.t_first = time.time()

    def remaining(self, i, per_step):
        """Seconds left after step i of this phase: its steps at the measured pace, the later phases' at the
        reference's pace times this CPU's ratio to it (1 until measured)."""
        later = sum(n * s for _, n, s in self.plan[self.phase_index + 1:])
        return (self.steps - 1 - i) * per_step + later * (self.scale or 1.0)

    def step(self, i, **metrics):
        now = time.time()
        if i == 0:
            self.t_first = now  # the first step pays for warm-up: the pace counts from its end
        per_step = (now - self.t_first) / i if i else self.ref * (self.scale or 1.0)
        if self.scale is None and i == 10 and self.ref > 0:
            self.scale = per_step / self.ref
            self.draw(None)
            self.log(f"this CPU: {per_step:.3g} s a step in {self.name}, {self.scale:.2f}x the reference's: the run "
                     f"will take about {format_time(now - self.t0 + self.remaining(i, per_step))} in all "
                     f"(--train-steps N shortens every phase to N steps)")
        line = " | ".join([f"{self.name} step {i + 1:,}/{self.steps:,}" if self.steps > 1 else f"{self.name} done"] +
                          [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()] +
                          [f"{format_time(now - self.t0)} elapsed, ETA {format_time(self.remaining(i, per_step))}"])
        last = i == self.steps - 1
        if self.live and (last or now - self.last_draw > 0.25):
            self.draw(line, end="\n" if last else "")
        elif not self.live and (i % self.every == 0 or last):
            self.log(line)
            if self.log is print:  # a pipe or a file holds print's lines in its buffer: show them now
                sys.stdout.flush()

    def draw(self, line, end=""):
        """Rewrites the terminal's progress line (None: ends it, for a line of its own to follow)."""
        if self.live and line is None and self.last_draw:
            print()
        elif self.live and line is not None:
            print("\r" + line + "\x1b[K", end=end, flush=True)
        self.last_draw = 0.0 if line is None or end else time.time()


# The tiny default recipe: (phase, steps, batch, resolution, lr). Phase 2 adapts to 128 px; phase 4 refines the
# whole decoder with the encoder frozen (a superset of phase 3's head), with the reconstruction loss only unless
# --gan: the GAN trades PSNR for sharpness, and the tiny model's bars are PSNR and the shapes read back from its
# reconstructions (docs/dcae.md gives both, and the designs this recipe replaced).
TINY_RECIPE = ((1, 1300, 16, 64, 1.5e-3), (2, 40, 8, 128, 2e-4), (4, 500, 16, 64, 5e-4))
TINY_THREADS = 2  # the recipe's: the result depends on the thread count
TINY_REFERENCE = "a 2-core Xeon with AMX"  # where TINY_STEP_SECONDS were measured
# phase -> seconds a step there: measured by scripts/time_tiny_recipes.py
TINY_STEP_SECONDS = {1: 0.376, 2: 0.437, 4: 0.315}


def train_tiny(seed=0, out=TINY_WEIGHTS, log=print, *, steps=None, recipe=TINY_RECIPE, gan=False):
    """Trains the tiny default DC-AE on synthetic shapes, deterministically from the seed on the recipe's 2
    threads, in float32 on every CPU (bfloat16 autocast saves only ~15% a step with AVX512-BF16 and costs ~9x
    without it); `steps` replaces every phase's count of the recipe (a quick check). Under torchrun each rank
    draws its own images."""
    rank, world = ddp_setup()
    # the recipe's threads, shared among the processes: more threads than cores stall OpenMP
    threads = max(1, TINY_THREADS // world)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    log = log if rank == 0 else (lambda *a: None)
    log(cpu_summary(threads, world))
    log("precision: float32 on every CPU (bfloat16 autocast would save ~15% a step with native bfloat16, and cost "
        "~9x without it)")
    progress = TrainProgress([(f"phase {phase}", steps or n, TINY_STEP_SECONDS.get(phase, 0.0))
                              for phase, n, *_ in recipe], TINY_REFERENCE, log)
    torch.manual_seed(seed)
    cfg = PRESETS["tiny-f8c4-shapes"]
    model = DCAE(cfg)
    disc = PatchDiscriminator() if gan else None
    t0 = time.time()
    for phase, phase_steps, batch, res, lr in recipe:
        phase_steps = steps or phase_steps
        params = trainable_parameters(model, phase)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        net = nn.parallel.DistributedDataParallel(model) if world > 1 else model  # averages the gradients
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=phase_steps, pct_start=0.05)
        use_disc = disc if phase >= 3 else None  # the GAN refines the decoder only
        if use_disc is not None and world > 1:
            use_disc = nn.parallel.DistributedDataParallel(disc)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=lr, betas=(0.5, 0.9)) if use_disc else None
        progress.phase(f"phase {phase}")
        for i in range(phase_steps):
            data_seed = (seed * 1_000_003 + phase * 100_003 + i) * world + rank  # one stream per rank
            x, _ = shapes_batch(batch, seed=data_seed, size=res)
            loss, rec = train_step(net, x, opt, disc=use_disc, disc_opt=disc_opt)
            sched.step()
            progress.step(i, loss=float(loss), psnr=f"{psnr(rec, x).mean():.2f} dB")
    model.eval()
    # Latent scaling factor, as published models carry one: 1 / std of the latents of held-out images.
    with torch.no_grad():
        x, _ = shapes_batch(256, seed=seed + 10_000)
        cfg = replace(cfg, scaling_factor=round(1.0 / model.encode(x).std().item(), 4))
    model.cfg = cfg
    if rank == 0:
        meta = {"config": json.dumps(asdict(cfg)), "seed": str(seed), "recipe": json.dumps(recipe)}
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        # fp16 storage halves the file and costs nothing measurable (PSNR equal to 1e-3 dB)
        save_weights({k: v.half().contiguous() for k, v in model.state_dict().items()}, out, metadata=meta)
        log(f"saved {out} ({os.path.getsize(out) / 1e6:.2f} MB) in {time.time() - t0:.0f}s")
    if world > 1:
        dist.destroy_process_group()
    return model


def load_tiny(path=TINY_WEIGHTS, *, device="cpu", dtype=torch.float32):
    """The committed tiny default (trained by `python dcae.py --train`)."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: it comes with the repository's weights/ folder, or "
                                f"`python dcae.py --train --train-out {path}` makes it")
    try:
        meta = json.loads(read_metadata(path)["config"])
        cfg = DCAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()})
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a tiny DC-AE written by `python dcae.py --train` (its metadata has no "
                         f"DC-AE config)") from None
    with torch.device("meta"):
        model = DCAE(cfg)
    load_state_dict_strict(model, read_weights(path), path)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def evaluate_tiny(model, n=64, seed=123_456, size=64):
    """Mean PSNR on held-out synthetic images (seeds never used in training)."""
    x, _ = shapes_batch(n, seed=seed, size=size)
    return psnr(model(x.to(next(model.parameters()).device)).float().cpu(), x).mean().item()


# ----------------------------------------------------------------------------------------------------------
# 8. CLI
# ----------------------------------------------------------------------------------------------------------
# Every root file takes the same flags, in this order, where they apply: --prompt --ckpt --model --steps
# --guidance --height --width --seed --device --dtype --out --train --train-out --train-steps, then its own.
# Bad input is refused in one sentence (`error: ...`, exit code 2) before anything is loaded or generated.


def pick_device_dtype(device, dtype, tiny=False):
    """--device / --dtype as given or the best for this machine, printed in one line with the reason. A tiny
    model on the CPU runs on one thread: its layers are too small to share, and a second thread only waits."""
    auto = not device
    device = resolve_device(device)
    why = "asked" if dtype else best_dtype(device)[1]
    dtype = resolve_dtype(dtype, device)
    threads = ""
    if tiny and device == "cpu":
        torch.set_num_threads(1)
        threads = ", 1 thread (a tiny model)"
    print(f"device {device} ({'autodetected' if auto else 'asked'}), dtype {str(dtype)[6:]} ({why}){threads}")
    return device, dtype


def check_out_path(path, extensions, flag="--out"):
    """Refuse an output path that cannot be written, before any work: a folder, a missing or read-only folder,
    or an extension we cannot write."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; give a file name, e.g. {os.path.join(path, 'out' + extensions[0])}")
    if os.path.splitext(path)[1].lower() not in extensions:
        raise ValueError(f"{flag} {path}: the file name must end in {' or '.join(extensions)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist")
    try:  # os.access says yes to root even on a read-only file system: try it
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write to the folder {folder} ({e.strerror})") from None
    return path


def train_out_path(path, committed):
    """--train-out as given, or by default the committed weights' file name in the working folder: --train never
    writes over the committed tiny weights unless --train-out names them."""
    if path:
        return path
    path = os.path.basename(committed)
    if os.path.exists(path) and os.path.samefile(path, committed):
        raise ValueError(f"--train would write over the committed weights {committed} (the working folder is "
                         f"theirs): run it from another folder, or give --train-out {committed} to replace them")
    return path


def refuse_unused(args, flags, mode):
    """One sentence for the first of `flags` (e.g. "--gan") that the command line set away from its default although
    it does nothing in this `mode` (e.g. "without --train"): a flag silently ignored would look obeyed."""
    defaults = vars(build_parser().parse_args([]))
    given = [f for f in flags if vars(args)[f[2:].replace("-", "_")] != defaults[f[2:].replace("-", "_")]]
    if given:
        raise ValueError(f"{given[0]} does nothing {mode}: leave it out")


def load_image(path, multiple):
    """An image file -> (1, 3, H, W) in [-1, 1], centre-cropped to a multiple of the compression. 16-bit images
    are scaled to 8 bits (Pillow would clip them)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"image {path} does not exist")
    if not os.path.isfile(path):  # a folder, or a device such as /dev/zero that would be read forever
        raise ValueError(f"image {path} is {'a folder' if os.path.isdir(path) else 'not a regular file'}: give an "
                         f"image file")
    try:
        img = Image.open(path)
        if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit greyscale: 0..65535
            img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
        img = img.convert("RGB")
    except Image.DecompressionBombError:
        raise ValueError(f"image {path} has more than the {2 * Image.MAX_IMAGE_PIXELS:,} pixels Pillow reads (a "
                         f"guard against decompression bombs): resize it") from None
    except OSError as e:
        raise ValueError(f"cannot read {path} as an image ({e})") from None
    w, h = img.size
    W, H = w - w % multiple, h - h % multiple
    if W == 0 or H == 0:
        raise ValueError(f"image {path} is {w}x{h}: smaller than {multiple}, the compression of this DC-AE")
    if (W, H) != (w, h):  # the model never pads: centre-crop to the nearest multiple
        print(f"note: {w}x{h} is not a multiple of {multiple}; centre-cropped to {W}x{H}")
        left, top = (w - W) // 2, (h - H) // 2
        img = img.crop((left, top, left + W, top + H))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1


SYNTHETIC_INPUT = "dcae.py synthetic input"  # the PNG text of the inputs this file draws: only those are rewritten


def save_image(x, path, software=None):
    """x: (1, 3, H, W) in [-1, 1] -> an image file (a PNG tagged `software` if given). NaN or inf is refused, not
    written as black."""
    if not torch.isfinite(x).all():
        raise ValueError(f"the image came out NaN or inf, so {path} was not written: the weights are broken")
    arr = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    info = PngInfo() if software else None
    if info:
        info.add_text("Software", software)
    Image.fromarray(arr).save(path, pnginfo=info)


def drawn_here(path):
    """Whether the image at `path` is a synthetic input this file wrote (its PNG text says so)."""
    try:
        with Image.open(path) as img:
            return img.info.get("Software") == SYNTHETIC_INPUT
    except OSError:
        return False


TILE = 512  # --tile's side alone, as diffusers' enable_tiling()
AUTO_TILE_SIDE = 2048  # images of more pixels than AUTO_TILE_SIDE^2 are tiled unless --tile 0 (docs/dcae.md: memory)


def build_parser():
    p = argparse.ArgumentParser(description="DC-AE: reconstruct an image (the tiny built-in model without --ckpt)")
    p.add_argument("--ckpt", help="published DC-AE folder (mit-han-lab or diffusers layout); default: the tiny model")
    p.add_argument("--model", help=f"preset for a --ckpt folder whose config does not name one: {', '.join(PRESETS)}")
    p.add_argument("--seed", type=int, default=0, help="random seed (the synthetic image; --train)")
    p.add_argument("--device", default="", help="cpu, cuda, cuda:N or mps (default: the first available of cuda, mps, cpu)")
    p.add_argument("--dtype", default="", help="float32, bfloat16 or float16 (default: the best for the "
                   "device); with --train, where the recipe has a choice: float32 or bfloat16 autocast (default: "
                   "bfloat16 where the CPU computes it natively)")
    p.add_argument("--out", help="the reconstruction to write (default: <image>_rec.png, or shapes_rec.png)")
    p.add_argument("--train", action="store_true", help="retrain the tiny default model from --seed (runs under torchrun too)")
    p.add_argument("--train-out", default=None, help="where --train writes the weights (default: the committed "
                   "file's name in the working folder; the committed weights in weights/ are replaced only when named "
                   "here)")
    p.add_argument("--train-steps", type=int, default=None, help="with --train: N optimisation steps in each phase of "
                   "the recipe in place of its own counts (a quick check)")
    p.add_argument("--image", help="image to reconstruct (default: a synthetic shapes image, written beside --out)")
    p.add_argument("--tile", type=int, nargs="?", const=TILE, default=None, metavar="PIXELS",
                   help=f"encode and decode in square tiles of this side, a multiple of the compression, their overlap "
                   f"cross-faded as in diffusers' AutoencoderDC (memory of one tile: docs/dcae.md); alone: {TILE}; 0: "
                   f"never (default: tiles of {TILE} for images of more than {AUTO_TILE_SIDE}x{AUTO_TILE_SIDE} pixels)")
    p.add_argument("--tile-overlap", type=int, default=None, metavar="PIXELS", help="with tiles: the overlap of "
                   "neighbouring tiles, a multiple of the compression (default: 64, or one latent cell if larger)")
    research = p.add_argument_group("research options")
    research.add_argument("--gan", action="store_true",
                          help="with --train: add the PatchGAN loss in the decoder phases (3, 4)")
    return p


def check_args(args):
    """Refuse bad input in one sentence (ValueError or FileNotFoundError) before anything is loaded or trained, and
    fill in --out's default."""
    if not 0 <= args.seed < 2**63:  # torch takes 64-bit seeds; larger ones failed after the model had loaded
        raise ValueError(f"--seed must be between 0 and 2**63 - 1, not {args.seed}")
    if args.train:
        refuse_unused(args, ("--ckpt", "--model", "--out", "--image", "--tile", "--tile-overlap"),
                      "with --train, which writes --train-out")
        refuse_unused(args, ("--dtype",), "with --train, whose recipe trains in float32 on every CPU")
        if args.train_steps is not None and args.train_steps < 1:
            raise ValueError("--train-steps must be at least 1")
        args.train_out = check_out_path(train_out_path(args.train_out, TINY_WEIGHTS), (".safetensors",), "--train-out")
        return
    refuse_unused(args, ("--train-out", "--train-steps", "--gan"), "without --train")
    if args.image and not os.path.isfile(args.image):
        load_image(args.image, 1)  # its sentence: missing, a folder, or not a regular file
    if args.model and not args.ckpt:
        raise ValueError("--model names the architecture of a --ckpt folder; give --ckpt too")
    if args.model:
        get_preset(args.model)  # an unknown name is refused here, not after the device is set up
    if not args.out:
        args.out = os.path.splitext(os.path.basename(args.image))[0] + "_rec.png" if args.image else "shapes_rec.png"
    check_out_path(args.out, (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"))
    if args.image and os.path.exists(args.out) and os.path.samefile(args.out, args.image):
        raise ValueError(f"--out {args.out} is the input image, which the reconstruction would overwrite: give "
                         f"another file name")
    args.source = None if args.image else os.path.splitext(args.out)[0] + "_input.png"
    if args.source and os.path.exists(args.source) and not drawn_here(args.source):
        raise ValueError(f"{args.source} exists and is not a synthetic input drawn by dcae.py, which would write "
                         f"its input there: give another --out, or pass it as --image")


def cli_tile(tile, overlap, f, height, width):
    """--tile / --tile-overlap for an image of height x width: the tile side to encode and decode with (None: in one
    pass), as given (0: never), or TILE above AUTO_TILE_SIDE^2 pixels; one sentence for sizes that a DC-AE of
    compression f cannot tile with."""
    tile = tile if tile is not None else TILE if height * width > AUTO_TILE_SIDE**2 else 0
    DCAE.tile_overlap(tile or TILE, overlap, f)
    return tile or None


def input_image(args, multiple):
    """(1, 3, H, W) in [-1, 1]: --image, or a synthetic shapes image drawn from --seed (written beside --out, never
    over a file in the working folder)."""
    if args.image:
        return load_image(args.image, multiple)
    x, caption = shapes_batch(1, seed=args.seed)
    save_image(x, args.source, software=SYNTHETIC_INPUT)
    print(f"input: synthetic image '{caption[0]}' -> {args.source}")
    return x


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        if args.train:
            model = train_tiny(seed=args.seed, out=args.train_out, steps=args.train_steps, gan=args.gan)
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"held-out PSNR {evaluate_tiny(model):.2f} dB")
            return
        device, dtype = pick_device_dtype(args.device, args.dtype, tiny=not args.ckpt)
        config = get_preset(args.model) if args.model else None
        model = from_pretrained(args.ckpt, config, device=device, dtype=dtype) if args.ckpt else \
            load_tiny(device=device, dtype=dtype)
        f = model.cfg.compression
        cli_tile(args.tile, args.tile_overlap, f, 0, 0)  # the tile sizes checked before the input is drawn
        x = input_image(args, f)
        tile = cli_tile(args.tile, args.tile_overlap, f, *x.shape[2:])
        with torch.no_grad():
            z = model.encode(x.to(device, dtype), tile, args.tile_overlap)  # (1, c, H/f, W/f)
            rec = model.decode(z, tile, args.tile_overlap).float().cpu()
        save_image(rec, args.out)
        tiled = f", in tiles of {tile} overlapping by {DCAE.tile_overlap(tile, args.tile_overlap, f)}" \
            if tile and max(x.shape[2:]) > tile else ""
        print(f"{tuple(x.shape[2:])} -> latent {tuple(z.shape[1:])}{tiled} -> {args.out}: PSNR "
              f"{psnr(rec, x).item():.2f} dB")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
