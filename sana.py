"""SANA 1.0 / 1.5: efficient high-resolution text-to-image with a linear diffusion transformer.

Papers: SANA, arXiv:2410.10629 (v1); SANA 1.5, arXiv:2501.18427 (v1). Official code: github.com/NVlabs/Sana.
Inside: the Linear DiT (ReLU linear self-attention, softmax cross-attention, Mix-FFN, adaLN-single, the 1.5
qk-norm), a Gemma-2 text encoder with the "complex human instruction", the flow-matching training step, the
Flow-DPM-Solver and flow-Euler samplers with classifier-free guidance, and loaders for both published layouts
(diffusers folders and the original NVlabs .pth). The DC-AE autoencoder is copied from dcae.py (section 9).
Run:   python sana.py --prompt "two red circles on a blue background"        # built-in tiny demo model
       python sana.py --prompt "a cyberpunk cat" --ckpt Sana_1600M_1024px_diffusers    # published weights
       python sana.py --train                                                # retrain the tiny demo (CPU)
Shapes: B batch, N image tokens (h*w), L text tokens, D width, H heads, d head dim, C latent channels,
        h/w latent grid (after patchify), sigma the flow time in [0, 1] (t = 1000 sigma for the model).
Deviations from the official code: (1) the model follows diffusers' numerics (float timesteps for Euler, eps
1e-15 in the linear attention) because the parity fixtures were produced with diffusers; (2) CFG dropout in
training swaps in the encoded empty prompt (what inference uses as the unconditional input) instead of the
original's learned null-caption buffer; (3) AdamW instead of CAME, no EMA, no multi-scale bucketing.
"""
import argparse
import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

try:  # Triton kernel on CUDA, PyTorch reference elsewhere
    from kernels.linear_attention import relu_linear_attention
except ImportError:  # this file was copied alone: use the in-file reference

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

    relu_linear_attention = relu_linear_attention_ref

# -----------------------------------------------------------------------------
# 1. config and presets          2. building blocks            3. the Linear DiT
# 4. Gemma-2 text encoder        5. loading published weights  6. training step
# 7. samplers                    8. pipeline (text -> image)   9. copied from dcae.py (skip on first read)
# 10. tiny demo: data, training  11. CLI
# -----------------------------------------------------------------------------


@dataclass
class SanaConfig:
    in_channels: int = 32  # DC-AE f32c32 latent
    out_channels: int = 32  # velocity only (no learned sigma)
    hidden_size: int = 1152  # D
    depth: int = 28
    num_heads: int = 36  # linear self-attention heads; head dim = D / heads = 32 in every published model
    cross_heads: int = 16  # softmax cross-attention heads (the original config's "num_heads")
    caption_channels: int = 2304  # Gemma-2-2B width
    mlp_ratio: float = 2.5  # Mix-FFN hidden = int(2.5 D)
    patch_size: int = 1
    sample_size: int = 32  # latent grid of the training resolution (image px / 32)
    qk_norm: bool = False  # SANA 1.5: RMSNorm over the full D on q and k (self- and cross-attention)
    interpolation_scale: float = None  # None = NoPE; 2K/4K models add a 2-D sincos table
    flow_shift: float = 3.0  # sampling time shift sigma' = s sigma / (1 + (s-1) sigma)


_600M = dict(hidden_size=1152, depth=28, num_heads=36, cross_heads=16)
_1600M = dict(hidden_size=2240, depth=20, num_heads=70, cross_heads=20)
PRESETS = {  # keys: the published checkpoint names (HF repos under Efficient-Large-Model)
    "Sana_600M_512px": SanaConfig(**_600M, sample_size=16),
    "Sana_600M_1024px": SanaConfig(**_600M, sample_size=32),  # the yaml says flow_shift 4.0, diffusers uses 3.0
    "Sana_1600M_512px": SanaConfig(**_1600M, sample_size=16),
    "Sana_1600M_512px_MultiLing": SanaConfig(**_1600M, sample_size=16),
    "Sana_1600M_1024px": SanaConfig(**_1600M, sample_size=32),
    "Sana_1600M_1024px_MultiLing": SanaConfig(**_1600M, sample_size=32),
    "Sana_1600M_1024px_BF16": SanaConfig(**_1600M, sample_size=32),
    "Sana_1600M_2Kpx_BF16": SanaConfig(**_1600M, sample_size=64, interpolation_scale=1.0),
    "Sana_1600M_4Kpx_BF16": SanaConfig(**_1600M, sample_size=128, interpolation_scale=2.0, flow_shift=6.0),
    "SANA1.5_1.6B_1024px": SanaConfig(**_1600M, sample_size=32, qk_norm=True),
    "SANA1.5_4.8B_1024px": SanaConfig(**{**_1600M, "depth": 60}, sample_size=32, qk_norm=True),
    # the built-in demo: 64x64 shapes images, tiny DC-AE latent, tiny Gemma-2-shaped text encoder
    "tiny": SanaConfig(in_channels=16, out_channels=16, hidden_size=128, depth=4, num_heads=4, cross_heads=4,
                       caption_channels=64, sample_size=4, flow_shift=1.0),
}


@dataclass
class Gemma2Config:  # defaults: gemma-2-2b-it, the text encoder of every published SANA
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_layers: int = 26
    num_heads: int = 8
    num_kv_heads: int = 4  # grouped-query attention
    head_dim: int = 256
    query_pre_attn_scalar: float = 256  # attention scale is its -1/2 power, not head_dim's
    attn_softcap: float = 50.0  # scores -> 50 tanh(scores / 50)
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    sliding_window: int = 4096  # on even layers; inactive at SANA's ~400 tokens


TINY_GEMMA = Gemma2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16)

# The "complex human instruction" (CHI) prepended to every prompt by the 1024px+/1.5 models (sec. 3 of the ref)
CHI = "\n".join([
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    'image generation. Evaluate the level of detail in the user prompt:',
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
])
MAX_TEXT_LEN = 300  # text tokens the DiT sees (model_max_length)
VAE_SCALE = 0.41407  # DC-AE f32c32-sana latent scaling: z = scale * encode(x); decode(z / scale)

# Aspect-ratio bins of the diffusers pipelines (height, width), in units of 1/16 of the base side: the 2K and 4K
# tables hold all 41 entries below; the 512 and 1024 tables lack the 7 in _NOT_IN_SMALL_BINS.
_AR_BINS = [(8, 32), (8, 31), (8, 30), (8, 29), (9, 28), (9, 27), (9, 26), (10, 25), (10, 24), (11, 23), (11, 22),
            (11, 21), (12, 21), (12, 20), (13, 19), (13, 18), (14, 18), (14, 17), (15, 17), (15, 16), (16, 16),
            (16, 15), (17, 15), (17, 14), (18, 14), (18, 13), (19, 13), (20, 12), (21, 12), (22, 11), (23, 11),
            (24, 10), (25, 10), (26, 9), (27, 9), (28, 9), (29, 8), (30, 8), (31, 8), (32, 8)]
_NOT_IN_SMALL_BINS = {(8, 31), (8, 30), (26, 9), (28, 9), (29, 8), (30, 8), (31, 8)}


def aspect_ratio_bin(height, width, base):
    """Snap (height, width) to the closest trained aspect ratio at base resolution base (512/1024/2048/4096)."""
    bins = [hw for hw in _AR_BINS if base >= 2048 or hw not in _NOT_IN_SMALL_BINS]
    best = min(bins, key=lambda hw: abs(round(hw[0] / hw[1], 2) - height / width))  # first wins on ties
    return best[0] * base // 16, best[1] * base // 16


# -----------------------------------------------------------------------------
# 2. building blocks


class RMSNorm(nn.Module):
    """y = x / rms(x) * w, in float32 (caption norm, qk-norm)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift  # adaLN: per-sample affine of a parameter-free LayerNorm


class ModulatedNorm(nn.Module):
    """LayerNorm without affine (eps 1e-6) followed by the adaLN shift/scale."""

    def forward(self, x, shift, scale):  # x: (B, N, D), shift/scale: (B, 1, D)
        return modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale).to(x.dtype)


def sincos_2d(dim, h, w, base, interpolation_scale):
    """2-D sincos table (h*w, dim). Grid coordinates span [0, base) whatever h, w are, divided by the scale;
    first half of the channels encodes the column (w) coordinate, second half the row (h) coordinate."""
    def table_1d(pos):  # (n,) -> (n, dim/2): [sin | cos] of pos * omega_i
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        out = pos.double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)
    ys = torch.arange(h, dtype=torch.float32) / (h / base) / interpolation_scale
    xs = torch.arange(w, dtype=torch.float32) / (w / base) / interpolation_scale
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each, row-major like the tokens
    return torch.cat([table_1d(gx.flatten()), table_1d(gy.flatten())], dim=1).float()  # (h*w, dim)


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=p, stride=p)

    def forward(self, x):  # x: (B, C, H, W)
        x = self.proj(x)  # (B, D, h, w)
        B, D, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), row-major over (h, w)
        if self.cfg.interpolation_scale is not None:  # 2K/4K models: table of the actual grid, not the base one
            base = self.cfg.sample_size // self.cfg.patch_size
            x = x + sincos_2d(D, h, w, base, self.cfg.interpolation_scale).to(x)
        return x


class TimestepEmbedder(nn.Module):
    """t (B,) -> 256 sinusoid channels [cos | sin] -> MLP -> (B, D)."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, 128)
        emb = torch.cat([args.cos(), args.sin()], dim=-1).to(self.linear_1.weight.dtype)  # (B, 256)
        return self.linear_2(F.silu(self.linear_1(emb)))


class AdaLNSingle(nn.Module):
    """adaLN-single (PixArt-alpha): one timestep MLP shared by all blocks. Returns the 6D modulation vector
    (per-block tables are added to it) and the D-dim embedding the final layer uses."""

    def __init__(self, dim):
        super().__init__()
        self.emb = nn.ModuleDict({"timestep_embedder": TimestepEmbedder(dim)})
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t):
        t_emb = self.emb["timestep_embedder"](t)  # (B, D)
        return self.linear(F.silu(t_emb)), t_emb  # (B, 6D), (B, D)


class CaptionProjection(nn.Module):
    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, y):  # (B, L, caption_channels) -> (B, L, D)
        return self.linear_2(F.gelu(self.linear_1(y), approximate="tanh"))


class LinearSelfAttention(nn.Module):
    """ReLU linear attention (paper sec. 2.2, eq. 2): O(N d^2) instead of O(N^2 d); no softmax, no scale, no PE."""

    def __init__(self, dim, heads, qk_norm):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.norm_q = RMSNorm(dim) if qk_norm else None  # SANA 1.5: normalizes the whole D-vector, not per head
        self.norm_k = RMSNorm(dim) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # a list only to match the checkpoint key "to_out.0"

    def forward(self, x):  # x: (B, N, D)
        B, N, D = x.shape
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)  # (B, N, D) each
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (t.view(B, N, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
        out = relu_linear_attention(q, k, v)  # phi = ReLU, accumulated in fp32   (B, H, N, d)
        out = self.to_out[0](out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)
        if out.dtype == torch.float16:  # fp16 checkpoints overflow here otherwise
            out = out.clip(-65504, 65504)
        return out


class CrossAttention(nn.Module):
    """Softmax attention from image tokens to text tokens; padded text keys get an additive -10000 bias."""

    def __init__(self, dim, heads, qk_norm):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim) if qk_norm else None
        self.norm_k = RMSNorm(dim) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, y, bias):  # x: (B, N, D), y: (B, L, D), bias: (B, 1, 1, L) or None
        B, N, D = x.shape
        q, k, v = self.to_q(x), self.to_k(y), self.to_v(y)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (t.view(B, -1, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, *, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, N, d), scale 1/sqrt(d)
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, D))


class GLUMBConv(nn.Module):
    """Mix-FFN (paper sec. 2.2): 1x1 conv -> SiLU -> 3x3 depthwise conv -> GLU -> 1x1 conv. The depthwise conv
    gives the token mixing with neighbours that replaces positional embeddings (NoPE)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.conv_inverted = nn.Conv2d(dim, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x):  # x: (B, D, h, w)
        x = self.conv_depth(F.silu(self.conv_inverted(x)))  # (B, 2 hidden, h, w)
        value, gate = x.chunk(2, dim=1)  # first half value, second half gate
        return self.conv_point(value * F.silu(gate))  # (B, D, h, w)


class SanaBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.scale_shift_table = nn.Parameter(torch.randn(6, D) / D**0.5)
        self.norm1, self.norm2 = ModulatedNorm(), ModulatedNorm()
        self.attn1 = LinearSelfAttention(D, cfg.num_heads, cfg.qk_norm)
        self.attn2 = CrossAttention(D, cfg.cross_heads, cfg.qk_norm)
        self.ff = GLUMBConv(D, int(D * cfg.mlp_ratio))

    def forward(self, x, y, bias, t6, hw):  # x: (B, N, D), y: (B, L, D), t6: (B, 6D), hw = (h, w)
        B, N, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table[None] + t6.view(B, 6, D)).chunk(6, 1)
        x = x + gate1 * self.attn1(self.norm1(x, shift1, scale1))  # (B, N, D)
        x = x + self.attn2(x, y, bias)  # cross-attention: no norm, no modulation, no gate
        h = self.norm2(x, shift2, scale2).transpose(1, 2).reshape(B, D, *hw)  # (B, D, h, w) for the convs
        return x + gate2 * self.ff(h).flatten(2).transpose(1, 2)  # (B, N, D)


# -----------------------------------------------------------------------------
# 3. the Linear DiT (module names = the diffusers checkpoint keys)


class SanaTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg)
        self.time_embed = AdaLNSingle(D)
        self.caption_projection = CaptionProjection(cfg.caption_channels, D)
        self.caption_norm = RMSNorm(D)  # the "y_norm": keeps text tokens at the scale of image tokens
        self.transformer_blocks = nn.ModuleList([SanaBlock(cfg) for _ in range(cfg.depth)])
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D**0.5)
        self.norm_out = ModulatedNorm()
        self.proj_out = nn.Linear(D, cfg.patch_size**2 * cfg.out_channels)

    def forward(self, x, t, y, mask=None):
        """x: (B, C, H, W) noisy latent; t: (B,) = 1000 sigma; y: (B, L, caption_channels); mask: (B, L) 1 = keep.
        Returns the flow velocity v = eps - x0, (B, C_out, H, W)."""
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        h, w = H // p, W // p
        x = self.patch_embed(x)  # (B, N, D)
        t6, t_emb = self.time_embed(t.expand(B))  # (B, 6D), (B, D)
        y = self.caption_norm(self.caption_projection(y))  # (B, L, D)
        bias = None
        if mask is not None:  # additive -10000 (not -inf): a fully padded row still gets a softmax
            bias = ((1 - mask.to(x.dtype)) * -10000.0)[:, None, None, :]  # (B, 1, 1, L)
        for block in self.transformer_blocks:
            x = block(x, y, bias, t6, (h, w))
        # final layer: modulated by the D-dim t embedding (not the 6D vector)
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        x = self.proj_out(self.norm_out(x, shift, scale))  # (B, N, p*p*C)
        x = x.view(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(B, -1, h * p, w * p)


# -----------------------------------------------------------------------------
# 4. Gemma-2 text encoder (the decoder stack of gemma-2-2b-it; SANA uses its last hidden state)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm scales by (1 + w), w initialised at 0."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class GemmaAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, H, Hkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, Hkv * d, bias=False)
        self.v_proj = nn.Linear(D, Hkv * d, bias=False)
        self.o_proj = nn.Linear(H * d, D, bias=False)

    def forward(self, x, cos, sin, bias):  # x: (B, T, D), cos/sin: (T, d), bias: (B, 1, T, T)
        B, T, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(B, T, c.num_heads, c.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin  # RoPE
        rep = c.num_heads // c.num_kv_heads  # grouped-query attention: each kv head serves `rep` q heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, T, d)
        scores = (q @ k.transpose(-1, -2)) * c.query_pre_attn_scalar**-0.5  # (B, H, T, T)
        scores = c.attn_softcap * torch.tanh(scores / c.attn_softcap)  # logit soft-capping
        probs = torch.softmax(scores + bias, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.o_proj((probs @ v).transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class GemmaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaLayer(nn.Module):
    """Gemma-2 "sandwich" norms: each sub-layer is normalized before and after, then added."""

    def __init__(self, cfg):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.rms_eps
        self.input_layernorm, self.post_attention_layernorm = GemmaRMSNorm(D, eps), GemmaRMSNorm(D, eps)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = GemmaRMSNorm(D, eps), GemmaRMSNorm(D, eps)
        self.self_attn = GemmaAttention(cfg)
        self.mlp = GemmaMLP(cfg)

    def forward(self, x, cos, sin, bias):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, bias))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([GemmaLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_eps)

    def forward(self, ids, mask):
        """ids, mask: (B, T) right-padded, mask 1 = token. Returns the last hidden state (B, T, D), final norm
        applied. Padded positions are computed too (causal: they see the real tokens); SANA carries them along."""
        c = self.cfg
        B, T = ids.shape
        x = self.embed_tokens(ids)
        x = x * torch.tensor(c.hidden_size**0.5, dtype=x.dtype)  # Gemma scales embeddings by sqrt(D)
        inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim)
        ang = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None]  # (T, d/2)
        ang = torch.cat([ang, ang], dim=-1).to(ids.device)  # (T, d)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        pos = torch.arange(T, device=ids.device)
        causal = pos[None, :] <= pos[:, None]  # (T, T) query row, key column
        local = causal & (pos[:, None] - pos[None, :] < c.sliding_window)  # even layers: sliding window
        keep = mask.bool()[:, None, None, :]  # (B, 1, 1, T): padded keys are never attended
        biases = [torch.zeros((), dtype=x.dtype, device=x.device).masked_fill(~(m & keep), float("-inf"))
                  for m in (local, causal)]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, biases[i % 2])
        return self.norm(x)


def load_tokenizer(path):
    from tokenizers import Tokenizer  # a Rust wheel; imported here so the DiT works without it
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return Tokenizer.from_file(path)


def tokenize(tok, texts, length, bos_id=2, pad_id=0):
    """Right-padded, truncated to `length` tokens, BOS first (as Gemma's tokenizer does). Returns ids, mask (B, T)."""
    ids = torch.full((len(texts), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(texts), length, dtype=torch.long)
    for i, text in enumerate(texts):
        t = tok.encode(text).ids  # the tokenizer's post-processor adds BOS; add it if it does not
        t = (t if t[:1] == [bos_id] else [bos_id] + t)[:length]
        ids[i, :len(t)], mask[i, :len(t)] = torch.tensor(t), 1
    return ids, mask


@torch.no_grad()
def encode_prompts(text_encoder, tok, prompts, max_len=MAX_TEXT_LEN, chi=CHI):
    """Prompts -> (B, max_len, D) embeddings and (B, max_len) mask, as the SANA pipelines do (ref sec. 3).
    With the CHI: tokenize CHI + prompt to n_chi + max_len - 2 tokens, then keep BOS and the last max_len - 1
    positions (the end of the instruction, the prompt, the padding). Without it: plain max_len padding."""
    prompts = [p.lower().strip() for p in prompts]  # diffusers' text preprocessing (clean_caption=False)
    if chi:
        n_chi = len(tokenize(tok, [chi], 10**6)[1].nonzero())  # tokens of the instruction, BOS included
        ids, mask = tokenize(tok, [chi + p for p in prompts], n_chi + max_len - 2)
    else:
        ids, mask = tokenize(tok, prompts, max_len)
    device = text_encoder.embed_tokens.weight.device
    ids, mask = ids.to(device), mask.to(device)
    emb = text_encoder(ids, mask)  # (B, T, D)
    if chi:
        select = [0] + list(range(-max_len + 1, 0))
        emb, mask = emb[:, select], mask[:, select]
    return emb, mask


# -----------------------------------------------------------------------------
# 5. loading published weights: diffusers folders and the original NVlabs .pth


def _short(keys, n=8):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def load_strict(model, sd, what):
    """Load or raise one ValueError naming missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        msg = [f"missing keys: {_short(missing)}" if missing else "",
               f"unexpected keys: {_short(unexpected)}" if unexpected else "",
               f"wrong shapes: {'; '.join(shapes[:4])}" if shapes else ""]
        raise ValueError(f"{what} does not fit the model: " + "; ".join(m for m in msg if m))
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def read_json(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    with open(path) as f:
        return json.load(f)


def load_safetensors_dir(folder):
    """All weights of a diffusers/transformers folder: one file, shards listed by an *.index.json, or the
    fp16/bf16 variant when it is the only one there."""
    index = sorted(glob.glob(os.path.join(folder, "*.safetensors.index*.json")), key=len)
    if index:
        shards = sorted(set(read_json(index[0])["weight_map"].values()))
        return {k: v for s in shards for k, v in load_file(os.path.join(folder, s)).items()}
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")), key=len)  # plain name before variants
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    return load_file(files[0])


def config_from_diffusers(c):
    """SanaTransformer2DModel config.json -> SanaConfig."""
    if c.get("guidance_embeds") or c.get("attention_bias") or c.get("norm_elementwise_affine"):
        raise ValueError("this transformer config uses options no published SANA 1.0/1.5 model uses "
                         "(guidance_embeds / attention_bias / norm_elementwise_affine)")
    D = c["num_attention_heads"] * c["attention_head_dim"]
    if c["num_cross_attention_heads"] * c["cross_attention_head_dim"] != D:
        raise ValueError("cross-attention width differs from the model width")
    return SanaConfig(in_channels=c["in_channels"], out_channels=c.get("out_channels") or c["in_channels"],
                      hidden_size=D, depth=c["num_layers"], num_heads=c["num_attention_heads"],
                      cross_heads=c["num_cross_attention_heads"], caption_channels=c["caption_channels"],
                      mlp_ratio=c.get("mlp_ratio", 2.5), patch_size=c.get("patch_size", 1),
                      sample_size=c["sample_size"], qk_norm=c.get("qk_norm") is not None,
                      interpolation_scale=c.get("interpolation_scale"))


ORIGINAL_RENAMES = [  # (regex on the NVlabs key, diffusers key or None = drop), applied in order (ref sec. 4)
    (r"^y_embedder\.y_embedding$", None),  # learned null caption for training-time CFG dropout; unused here
    (r"^pos_embed$", None),  # sincos buffer: recomputed for the actual grid
    (r"^x_embedder\.", "patch_embed."),
    (r"^y_embedder\.y_proj\.fc1\.", "caption_projection.linear_1."),
    (r"^y_embedder\.y_proj\.fc2\.", "caption_projection.linear_2."),
    (r"^t_embedder\.mlp\.0\.", "time_embed.emb.timestep_embedder.linear_1."),
    (r"^t_embedder\.mlp\.2\.", "time_embed.emb.timestep_embedder.linear_2."),
    (r"^t_block\.1\.", "time_embed.linear."),
    (r"^attention_y_norm\.", "caption_norm."),
    (r"^final_layer\.linear\.", "proj_out."),
    (r"^final_layer\.scale_shift_table$", "scale_shift_table"),
    (r"^blocks\.", "transformer_blocks."),
    (r"\.attn\.qkv\.", ".attn1.to_qkv."),  # fused q|k|v rows, split below
    (r"\.attn\.q_norm\.", ".attn1.norm_q."),
    (r"\.attn\.k_norm\.", ".attn1.norm_k."),
    (r"\.attn\.proj\.", ".attn1.to_out.0."),
    (r"\.cross_attn\.q_linear\.", ".attn2.to_q."),
    (r"\.cross_attn\.kv_linear\.", ".attn2.to_kv."),  # fused k|v rows, split below
    (r"\.cross_attn\.q_norm\.", ".attn2.norm_q."),
    (r"\.cross_attn\.k_norm\.", ".attn2.norm_k."),
    (r"\.cross_attn\.proj\.", ".attn2.to_out.0."),
    (r"\.mlp\.inverted_conv\.conv\.", ".ff.conv_inverted."),
    (r"\.mlp\.depth_conv\.conv\.", ".ff.conv_depth."),
    (r"\.mlp\.point_conv\.conv\.", ".ff.conv_point."),
]
FUSED = {".attn1.to_qkv.": (".attn1.to_q.", ".attn1.to_k.", ".attn1.to_v."),
         ".attn2.to_kv.": (".attn2.to_k.", ".attn2.to_v.")}


def convert_original(sd):
    """NVlabs .pth state dict -> our (= diffusers) keys: renames, drops, and splits of the fused projections."""
    import re
    out = {}
    for key, value in sd.items():
        for pattern, repl in ORIGINAL_RENAMES:
            if re.search(pattern, key):
                key = None if repl is None else re.sub(pattern, repl, key)
                if key is None:
                    break
        if key is None:
            continue
        fused = next((f for f in FUSED if f in key), None)
        if fused:  # split along the output rows: q|k|v or k|v
            for part, chunk in zip(FUSED[fused], value.chunk(len(FUSED[fused]), dim=0)):
                out[key.replace(fused, part)] = chunk
        else:
            out[key] = value
    return out


def preset_from_name(path):
    """The preset whose name is in the file/folder name (longest match), e.g. SANA1.5_4.8B_1024px.pth."""
    base = os.path.basename(os.path.normpath(path))
    names = [n for n in PRESETS if n in base]
    return max(names, key=len) if names else None


def load_transformer(path, preset=None, dtype=torch.float32, device="cpu"):
    """A diffusers transformer/ folder (or the pipeline folder above it) or an original .pth file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "transformer")):
            path = os.path.join(path, "transformer")
        c = read_json(os.path.join(path, "config.json"))
        if c.get("_class_name") != "SanaTransformer2DModel":
            raise ValueError(f"{path} holds a {c.get('_class_name', 'non-diffusers model')}, "
                             f"not a SanaTransformer2DModel")
        cfg, sd = config_from_diffusers(c), load_safetensors_dir(path)
        if preset:
            cfg = replace(cfg, flow_shift=PRESETS[preset].flow_shift)
    else:
        preset = preset or preset_from_name(path)
        if preset not in PRESETS:
            raise ValueError(f"cannot tell which model {path} is: pass --model (one of {', '.join(PRESETS)})")
        cfg = PRESETS[preset]
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        sd = convert_original(obj.get("state_dict", obj))
    with torch.device("meta"):
        model = SanaTransformer(cfg)
    load_strict(model, sd, f"transformer weights {path}")
    return model.to(device=device, dtype=dtype).eval()


def gemma_config_from_json(c):
    if c.get("model_type") != "gemma2":
        raise ValueError(f"text encoder is a {c.get('model_type')}, not gemma2")
    return Gemma2Config(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                        intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
                        num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"],
                        head_dim=c["head_dim"], query_pre_attn_scalar=c["query_pre_attn_scalar"],
                        attn_softcap=c.get("attn_logit_softcapping") or 1e9, rms_eps=c["rms_norm_eps"],
                        rope_theta=c.get("rope_theta") or c.get("rope_parameters", {}).get("rope_theta", 1e4),
                        sliding_window=c.get("sliding_window") or 4096)


def load_text_encoder(folder, dtype=torch.float32, device="cpu"):
    """A transformers Gemma2Model (or Gemma2ForCausalLM) folder: config.json + safetensors."""
    cfg = gemma_config_from_json(read_json(os.path.join(folder, "config.json")))
    sd = {k.removeprefix("model."): v for k, v in load_safetensors_dir(folder).items() if k != "lm_head.weight"}
    with torch.device("meta"):
        model = Gemma2(cfg)
    load_strict(model, sd, f"text encoder weights {folder}")
    return model.to(device=device, dtype=dtype).eval()


# -----------------------------------------------------------------------------
# 6. training step: rectified flow (paper sec. 2.4), x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0


def training_loss(model, x0, y, mask, null_y, null_mask, generator=None, cfg_dropout=0.1):
    """One flow-matching loss. x0: (B, C, H, W) scaled latents; y: (B, L, Dy) text states, mask: (B, L).
    sigma ~ logit-normal(0, 1) (SD3's time sampling, the official "logit_normal" weighting); with probability
    cfg_dropout a caption is replaced by the unconditional one so the model also learns v(x, t, null) for CFG."""
    B = x0.shape[0]
    g = dict(generator=generator, device=x0.device)
    drop = torch.rand(B, **g) < cfg_dropout
    y = torch.where(drop[:, None, None], null_y.expand_as(y), y)
    mask = torch.where(drop[:, None], null_mask.expand_as(mask), mask)
    sigma = torch.sigmoid(torch.randn(B, **g))  # (B,)
    eps = torch.randn(x0.shape, **g)
    s = sigma[:, None, None, None]
    x_t = (1 - s) * x0 + s * eps
    v = model(x_t, 1000 * sigma, y, mask)  # the model sees t = 1000 sigma
    return F.mse_loss(v.float(), (eps - x0).float())


# -----------------------------------------------------------------------------
# 7. samplers on the flow ODE dx/dsigma = v, from sigma ~ 1 (noise) to 0 (data)


def shift_sigma(sigma, s):
    return s * sigma / (1 + (s - 1) * sigma)  # more steps at high noise for bigger images (SD3 / SANA time shift)


def flow_dpm_schedule(steps, shift):
    """diffusers' DPMSolverMultistepScheduler(use_flow_sigmas=True): sigmas uniform in (0, 0.999], shifted,
    then 0 appended; the model gets floor(1000 sigma) as an int64 (ref sec. 5, pitfall 9)."""
    sigma = shift_sigma(1 - torch.linspace(1, 1 / 1000, steps + 1, dtype=torch.float64), shift).flip(0)[:-1]
    timesteps = (sigma * 1000).long()  # truncated: the first is 999, not 1000
    return torch.cat([sigma, sigma.new_zeros(1)]).float(), timesteps


def flow_euler_schedule(steps, shift):
    """diffusers' FlowMatchEulerDiscreteScheduler(shift): linspace from 1 to the shifted 1/1000 of the training
    grid, shifted again (a quirk), float timesteps 1000 sigma."""
    sigma_min = shift_sigma(torch.tensor(1 / 1000, dtype=torch.float32), shift).item()
    sigma = shift_sigma(torch.linspace(1.0, sigma_min, steps, dtype=torch.float64), shift).float()
    return torch.cat([sigma, sigma.new_zeros(1)]), sigma * 1000


def sample_flow_dpm(velocity, x, sigmas, timesteps, callback=None):
    """Flow-DPM-Solver: DPM-Solver++(2M) (Lu et al. 2022, data prediction, midpoint) on alpha = 1 - sigma,
    lambda = log(alpha / sigma), with x0 = x - sigma v. First and last steps are first order."""
    lam = lambda s: math.log(1 - s) - math.log(s) if s > 0 else math.inf  # noqa: E731
    x0_prev = None
    for i, t in enumerate(timesteps):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = x - s * velocity(x, t)  # data prediction
        h = lam(s_next) - lam(s)
        D = x0
        if x0_prev is not None and i < len(timesteps) - 1:  # 2nd order: extrapolate with the previous x0
            r = (lam(s) - lam(sigmas[i - 1].item())) / h
            D = x0 + 0.5 / r * (x0 - x0_prev)
        x = (s_next / s) * x - (1 - s_next) * math.expm1(-h) * D  # exact on the linear part of the ODE
        x0_prev = x0
        if callback:
            callback(i, x)
    return x


def sample_flow_euler(velocity, x, sigmas, timesteps, callback=None):
    for i, t in enumerate(timesteps):
        x = x + (sigmas[i + 1] - sigmas[i]).item() * velocity(x, t)
        if callback:
            callback(i, x)
    return x


def cfg_velocity(model, cond, uncond, scale):
    """v = v_u + w (v_c - v_u) (CFG), one batched call in the order [uncond, cond]. cond/uncond: (y, mask)."""
    y, mask = torch.cat([uncond[0], cond[0]]), torch.cat([uncond[1], cond[1]])

    def velocity(x, t):
        v_u, v_c = model(torch.cat([x, x]), t.expand(2 * x.shape[0]).to(x.device), y, mask).float().chunk(2)
        return v_u + scale * (v_c - v_u)
    return velocity
