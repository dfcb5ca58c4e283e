"""HART: a hybrid tokenizer, a scalable-resolution autoregressive transformer and residual diffusion.

Tang et al., "HART: Efficient Visual Generation with Hybrid Autoregressive Transformer", ICLR 2025,
arXiv 2410.10812. Official code (inference only, a CUDA extension to build): github.com/mit-han-lab/hart.
Three ideas:

  1. A hybrid tokenizer (paper Sec. 3.1): VAR's multi-scale residual quantizer, whose K scales of discrete codes
     (1x1 up to 64x64 at 1024 px) sum, through small convolutions phi, to the latent; what the codes miss, the
     residual, stays a continuous token. One decoder, trained to read both, decodes the discrete sum alone or
     discrete + residual.
  2. A scalable-resolution AR transformer (Sec. 3.2): VAR's next-scale prediction, scale by scale, each scale's
     tokens in parallel; conditioned on Qwen2 text features that are also the first tokens of the sequence;
     relative (rotary) positions and a sinusoidal level embedding, so that scales can be added for larger images.
  3. Residual diffusion (Sec. 3.3): a 37M-parameter MLP (MAR's) samples the continuous residual token of every
     last-scale position in 8 steps, conditioned on the transformer's hidden state there.

Inside, top to bottom (sections 1-5 are the whole method; the rest can be skipped on first read):
  1. Config and presets: `HARTTokenizerConfig`, `HARTConfig`, `Qwen2Config`; the published hart-0.7b-1024px
  2. Modules: the multi-scale hybrid quantizer (phi, its sharing rule), the 1-D/2-D rotary positions, the
     attention (0.25/sqrt(d), k without bias), the block (plain or per-block AdaLN), the head
  3. Model: `HART` (teacher forcing with the block-causal mask; one scale at a time with a KV cache) and
     `HybridTokenizer`
  4. Training (not released): the tokenizer's alternating discrete / continuous decoding, the transformer's
     cross-entropy plus the residual diffusion loss on its own samples (MAR's last-scale subsampling)
  5. Sampler: `generate` (guidance ramp over scales, top-k / top-p, more_smooth, the residual diffusion on the
     last scale: `sample_residual`)
  6. Components, skip on first read: the kernel loader; every marked copy (RMSNorm; the residual diffusion MLP
     and its IDDPM schedule, copied from dcar.py, DC-AR having taken them from HART; the DC-AE of dcae.py, the
     tiny tokenizer's; the loading helpers; the shapes data); the tokenizer's LDM encoder and decoder; the Qwen2
     text encoder and its prompt encoding
  7. Checkpoint loading: the published `llm/` (EMA weights, as sample.py) and `tokenizer/` folders, Qwen2 folders
  8. Pipeline: `HARTPipeline` (prompts -> Qwen2 features -> `generate` -> uint8 images), `load_pipeline`
  9. Tiny default: the tiny tokenizer, Qwen2 and transformer, and their training recipe (`train_tiny`)
 10. CLI

Run:
  python hart.py --prompt "two red circles on a blue background"      # the tiny default model, a 64x64 PNG
  python hart.py --prompt "a photo of a cat" --ckpt hart-0.7b-1024px --text-encoder Qwen2-VL-1.5B-Instruct
  python hart.py --train                 # retrain the tiny tokenizer, then the tiny transformer (./hart_tiny*)
  torchrun --nproc_per_node 2 hart.py --train --train-steps 20     # the same on 2 processes (DDP)

Shapes: B batch, Cv latent channels = codebook dim (32), V codebook size (4096), K scales, pn_k the side of scale k
        (pn_K = P = the latent side, image / 16), l = pn_k^2 tokens of one scale, L = sum_k pn_k^2, T context
        slots (300 Qwen2 tokens, padded), C width (1536), H heads, d head dim (64), W the diffusion MLP's width,
        M rows of the diffusion MLP (one per last-scale token; batch_mul times in training).

Deviations from the official code: (1) no CUDA extension: RMSNorm in PyTorch (the kernel's formula), attention
by PyTorch's scaled_dot_product_attention with a boolean block-causal mask; (2) the sampler takes explicit
generators (one for the discrete draws, one for the diffusion noise) where the release uses the model's
generator and torch's global one (the same numbers on the CPU, in the same order); (3) top-k is capped at V (the
release fixes it at 600 / 300 and fails below 600 codes; the tiny model has 256); (4) training is not released:
the last-scale subsampling ratio is drawn from a torch generator instead of scipy's truncated normal with
numpy's shuffle, the cross-entropy on every predicted token and the tokenizer's loss (MSE + VQ, no perceptual or
adversarial term) are this file's choices; (5) the tiny tokenizer is HART's quantizer on the encoder and decoder of
the committed tiny DC-AE (as HART starts from VAR's trained tokenizer, the tiny one starts from a trained
autoencoder), and the tiny Qwen2 is trained with the transformer (section 9).
"""
import argparse
import importlib.util
import json
import math
import os
import random
import re
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_DCAE = os.path.join(HERE, "weights", "dcae_tiny.safetensors")  # committed by `python dcae.py --train`
TINY_WEIGHTS = os.path.join(HERE, "weights", "hart_tiny.safetensors")


# ----------------------------------------------------------------------------------------------------------
# 1. Config and presets
# ----------------------------------------------------------------------------------------------------------

# Scale schedules (latent side = image / 16): each image size has its own list of scale sides.
PATCH_NUMS = {256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
              1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)}


@dataclass
class HARTTokenizerConfig:
    vocab_size: int = 4096  # V
    z_channels: int = 32  # Cv
    ch: int = 160
    ch_mult: tuple = (1, 1, 2, 2, 4)  # downsampling 2^(len - 1) = 16
    num_res_blocks: int = 2  # per encoder level (the decoder has one more)
    quant_conv_ks: int = 3
    quant_resi: float = 0.5  # phi(h) = (1 - r) h + r conv(h)
    share_quant_resi: int = 4  # four phi convolutions shared by all scales
    beta: float = 0.25  # the VQ commitment weight
    ae: object = None  # a DCAEConfig: DC-AE's encoder and decoder instead of LDM's (the tiny tokenizer, section 9)


@dataclass
class HARTConfig:
    hidden_size: int = 1536  # C (config.json: embed_dim)
    depth: int = 24
    num_heads: int = 24  # d = 64
    mlp_ratio: float = 4.0  # SwiGLU hidden: int(C * 4 * 2/3 + 255) // 256 * 256 = 4096
    disable_aln: bool = True  # False: per-block AdaLN from the max-pooled context
    context_token: int = 300  # T
    context_dim: int = 1536  # the text encoder's width
    patch_nums: tuple = PATCH_NUMS[1024]
    codebook_size: int = 4096  # V
    token_dim: int = 32  # Cv
    diffusion_width: int = 1024  # W
    diffusion_depth: int = 6
    num_sampling_steps: int = 8
    diffusion_batch_mul: int = 4
    cond_drop_rate: float = 0.1
    norm_eps: float = 1e-6
    vae_scale: float = 0.6  # residual tokens = diffusion output x this

    @property
    def mlp_hidden(self):
        return int(self.hidden_size * self.mlp_ratio * 2 / 3 + 255) // 256 * 256


@dataclass
class Qwen2Config:
    """The text encoder's network, Hugging Face Qwen2 field names; defaults: Qwen2-1.5B(-Instruct)."""
    hidden_size: int = 1536
    num_hidden_layers: int = 28
    num_attention_heads: int = 12  # head_dim 128
    num_key_value_heads: int = 2  # grouped-query attention
    intermediate_size: int = 8960
    vocab_size: int = 151936
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


PRESETS = {
    # mit-han-lab/hart-0.7b-1024px: llm/ (732M with the 37M diffusion MLP) and tokenizer/ (109M)
    "hart-0.7b-1024px": HARTConfig(),
    # the same parameter count with per-block AdaLN: the loader picks it when the weights say so (section 7)
    "hart-0.7b-1024px-depth16-adaln": HARTConfig(depth=16, disable_aln=False),
    "hart-0.7b-1024px-tokenizer": HARTTokenizerConfig(),
    "Qwen2-1.5B-Instruct": Qwen2Config(),  # the text encoder (mit-han-lab/Qwen2-VL-1.5B-Instruct)
}


# ----------------------------------------------------------------------------------------------------------
# 2. Modules
# ----------------------------------------------------------------------------------------------------------
# The hybrid quantizer (paper Sec. 3.1, VAR's multi-scale residual quantization). The latent f (B, Cv, P, P) is
# coded coarse to fine: at scale k the rest (f minus what earlier scales explain), area-downsampled to pn_k x pn_k,
# snaps to its nearest codes; their embeddings, bicubic-upsampled to P x P and passed through phi_k, join f_hat
# and leave the rest. At the last scale (pn_K = P) there is no resampling and no phi, and what the last codes miss
# is the continuous residual token: f = sum_{k<K} phi_k(up(e_k)) + e_K + residual, exactly.


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h): a small refinement of each scale's upsampled codes."""

    def __init__(self, dim, ratio):
        super().__init__(dim, dim, 3, padding=1)
        self.ratio = ratio

    def forward(self, h):
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class SharedPhi(nn.Module):
    """n phi convolutions shared by the K scales: scale k uses the one whose tick is nearest to k / (K - 1), ticks
    evenly spaced over [1/(3n), 1 - 1/(3n)] for n = 4 (VAR's special case), [1/(2n), 1 - 1/(2n)] otherwise."""

    def __init__(self, dim, ratio, n):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(dim, ratio) for _ in range(n))
        m = 3 if n == 4 else 2
        self.ticks = np.linspace(1 / m / n, 1 - 1 / m / n, n)  # numpy's rounding decides the ties (k/(K-1) = 1/2)

    def forward(self, h, k, K):
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - k / (K - 1))))](h)


def upsample(h, side):  # every upsampling: bicubic, align_corners False
    return F.interpolate(h, size=(side, side), mode="bicubic")


def downsample(f, side):  # every downsampling: area
    return F.interpolate(f, size=(side, side), mode="area")


class MultiScaleQuantizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.beta = cfg.beta
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)  # the codebook (V, Cv)
        self.quant_resi = SharedPhi(cfg.z_channels, cfg.quant_resi, cfg.share_quant_resi)

    def nearest(self, z):
        """z (N, Cv) -> code ids (N,) by the squared distance |z|^2 + |e|^2 - 2 z.e in float32."""
        z, e = z.detach(), self.embedding.weight.detach()
        d = z.square().sum(1, keepdim=True) + e.square().sum(1)
        return d.addmm_(z, e.T, alpha=-2, beta=1).argmin(1)

    def encode(self, f, patch_nums):
        """f (B, Cv, P, P) -> ids [(B, pn_k^2) row-major for each scale], and the rest before the last scale's codes
        are removed (B, P^2, Cv) (training's `last_layer_gt`): residual token = it - codebook[last ids]."""
        B, C, P, _ = f.shape
        K, rest = len(patch_nums), f.detach().clone()
        ids = []
        for k, pn in enumerate(patch_nums):
            z = downsample(rest, pn) if k < K - 1 else rest
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn)
            h = upsample(self.embedding(idx).transpose(1, 2).reshape(B, C, pn, pn), P)
            if k < K - 1:
                h = self.quant_resi(h, k, K)
            else:
                last_rest = rest.clone()
            rest = rest - h
            ids.append(idx)
        return ids, last_rest.permute(0, 2, 3, 1).reshape(B, P * P, C)

    def add_scale(self, f_hat, h, k, K):
        """f_hat (B, Cv, P, P) += scale k's embeddings h (B, Cv, pn, pn): upsampled and through phi, except at the
        last scale (added as they are: discrete + residual)."""
        if k == K - 1:
            return f_hat + h
        return f_hat + self.quant_resi(upsample(h, f_hat.shape[-1]), k, K)

    def next_scale_inputs(self, ids, patch_nums):
        """Teacher forcing: ids of every scale -> the transformer's inputs for scales 1..K-1, (B, L - 1, Cv): the
        running f_hat after scale k, area-downsampled to pn_{k+1}, row-major (VAR's idxBl_to_var_input)."""
        B, C, P, K = ids[0].shape[0], self.embedding.weight.shape[1], patch_nums[-1], len(patch_nums)
        f_hat, out = self.embedding.weight.new_zeros(B, C, P, P), []
        for k in range(K - 1):
            pn = patch_nums[k]
            f_hat = self.add_scale(f_hat, self.embedding(ids[k]).transpose(1, 2).reshape(B, C, pn, pn), k, K)
            out.append(downsample(f_hat, patch_nums[k + 1]).flatten(2).transpose(1, 2))
        return torch.cat(out, 1)

    def forward(self, f, patch_nums, continuous):
        """The tokenizer's training pass: f_hat over every scale (phi at the last one too, as the release trains)
        plus, when `continuous`, the whole remaining rest. -> f_hat with a straight-through gradient to f, and the
        VQ loss: mean over scales of beta |sg(f_hat) - f|^2 + |f_hat - sg(f)|^2."""
        B, C, P, _ = f.shape
        K, f_hat, rest, vq = len(patch_nums), torch.zeros_like(f), f.detach().clone(), 0.0
        for k, pn in enumerate(patch_nums):
            idx = self.nearest(downsample(rest, pn).permute(0, 2, 3, 1).reshape(-1, C))
            h = self.quant_resi(upsample(self.embedding(idx.view(B, pn, pn)).permute(0, 3, 1, 2), P), k, K)
            f_hat = f_hat + h
            rest = rest - h
            vq = vq + F.mse_loss(f_hat.detach(), f) * self.beta + F.mse_loss(f_hat, f.detach())
        if continuous:
            f_hat = f_hat + rest
        return (f_hat.detach() - f.detach()) + f, vq / K


# The transformer. Positions are rotary (base 10000, rotate-half): the T context tokens get 1-D positions (the
# prompt's token index; padding repeats the last one), the tokens of scale k the 2-D positions (row, col) x P/pn_k,
# fractional, so that every scale spans the same P x P grid, offset by the last context position. The 2-D table is
# [theta_row, theta_row, theta_col, theta_col] (each d/4 wide) used with the ordinary rotate-half, so element j
# pairs with j + d/2: a row angle with a column angle. Not a textbook 2-D RoPE, but the release's (parity).

def rope_1d(positions, head_dim, base=10000.0):
    """positions (B, n) -> cos, sin (B, n, d): angles p * base^(-2i/d), i < d/2, repeated [a, a]."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    a = positions.float()[..., None] * inv
    a = torch.cat([a, a], -1)
    return a.cos(), a.sin()


def rope_2d(positions, head_dim, base=10000.0):
    """positions (B, n, 2) (row, col) -> cos, sin (B, n, d): [a_row, a_row, a_col, a_col], a = p * base^(-4i/d)."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 4, device=positions.device).float() / head_dim)
    a = positions.float()[..., None] * inv  # (B, n, 2, d/4)
    a = torch.cat([a, a], -1).flatten(-2)
    return a.cos(), a.sin()


def scale_grid(pn, P, device=None):
    """The (row, col) of the pn x pn tokens of one scale on the P x P grid, row-major: (pn^2, 2)."""
    r = torch.arange(pn, device=device)
    grid = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)
    return grid / pn * P


def rotate(x, cos, sin):  # x (B, H, n, d), cos/sin (B, n, d)
    cos, sin = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# The transformer's layers. RMSNorm (normalise in float32, cast back, then scale) is a marked copy of fast_dllm.py's,
# in section 6 with the rest of what HART uses but did not invent.


class Attention(nn.Module):
    """Multi-head attention, softmax scale 0.25/sqrt(d) (VAR's), fused qkv without bias plus separate q and v
    biases (k has none: a zero buffer). With a cache (a [k, v] list), this call's keys and values are appended
    and the queries see everything cached so far."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, 0.25 / math.sqrt(dim // heads)
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))  # in the published files
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin, mask=None, cache=None):  # x (B, n, C), mask (n, n_keys) bool
        B, n, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = F.linear(x, self.qkv_proj.weight, bias).view(B, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # (B, H, n, d)
        if cache is not None:
            if cache[0] is not None:
                k, v = torch.cat((cache[0], k), 2), torch.cat((cache[1], v), 2)
            cache[:] = [k, v]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, n, C))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """x += Attn(N(x)); x += MLP(N(x)) with ONE RMSNorm N (with weight) before both. With per-block AdaLN
    (disable_aln False): c = max over the T context rows of the conditioning (padding included), SiLU -> Linear
    -> (g1, g2, s1, s2, b1, b2): x += g1 Attn(N(x)(1 + s1) + b1); x += g2 MLP(N(x)(1 + s2) + b2)."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.hidden_size
        self.attn = Attention(C, cfg.num_heads)
        self.ffn = SwiGLU(C, cfg.mlp_hidden)
        self.ln_wo_grad = RMSNorm(C, cfg.norm_eps)  # the release's name; it does have a weight
        if not cfg.disable_aln:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x, cond, cos, sin, mask=None, cache=None):  # x (B, n, C), cond (B, T, C)
        if not hasattr(self, "ada_lin"):
            x = x + self.attn(self.ln_wo_grad(x), cos, sin, mask, cache)
            return x + self.ffn(self.ln_wo_grad(x))
        g1, g2, s1, s2, b1, b2 = self.ada_lin(cond.max(1, keepdim=True).values).view(-1, 1, 6, x.shape[-1]).unbind(2)
        x = x + self.attn(self.ln_wo_grad(x) * (s1 + 1) + b1, cos, sin, mask, cache) * g1
        return x + self.ffn(self.ln_wo_grad(x) * (s2 + 1) + b2) * g2


class HeadNorm(nn.Module):
    """Before the logits: RMSNorm(x) (1 + scale) + shift, (scale, shift) = Linear(SiLU(max-pooled context))."""

    def __init__(self, C, eps):
        super().__init__()
        self.ln_wo_grad = RMSNorm(C, eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x, cond):
        scale, shift = self.ada_lin(cond.max(1, keepdim=True).values).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


class LevelEmbedder(nn.Module):
    """The level (scale index; the context is level 0) as a DiT timestep: 256-d [cos | sin] -> MLP."""

    def __init__(self, C):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, C), nn.SiLU(), nn.Linear(C, C))

    def forward(self, levels):  # (n,) -> (n, C)
        return self.mlp(timestep_embedding(levels).to(self.mlp[0].weight.dtype))


# The residual diffusion MLP (paper Sec. 3.3; MAR's "SimpleMLPAdaLN", 37M parameters at full size) and its IDDPM
# schedule are in section 6: DC-AR took both from HART, so this file holds them as marked copies of dcar.py's
# `DiffusionHead` (noisy residual token, timestep and the transformer's hidden state -> epsilon and a variance
# interpolation, one token at a time, through adaLN residual blocks) and `Diffusion` (the 1000-step cosine schedule,
# respaced to 8 steps to sample, the network fed the original step indices), with `timestep_embedding` (DiT's
# sinusoid, which LevelEmbedder uses too). `sample_residual` (section 5) and `hart_losses` (section 4) use them.


# ----------------------------------------------------------------------------------------------------------
# 3. Model
# ----------------------------------------------------------------------------------------------------------


class HART(nn.Module):
    """The text-conditioned next-scale transformer with its residual diffusion MLP (`diffloss.net`). The sequence
    is [T context tokens; the tokens of scales 1..K-1]: scale 0 (1x1) has no input of its own, its logits come
    from the last context slot. Module names = the published checkpoint's keys."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_size
        self.context_norm = RMSNorm(cfg.context_dim, cfg.norm_eps)
        self.context_embed = nn.Linear(cfg.context_dim, C)
        self.word_embed = nn.Linear(cfg.token_dim, C)
        self.lvl_embed = LevelEmbedder(C)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head_nm = HeadNorm(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.codebook_size)
        self.decoder_norm = RMSNorm(C, cfg.norm_eps)
        self.diffloss = nn.Module()
        self.diffloss.net = DiffusionHead(cfg)

    def embed_context(self, context):  # text features (B, T, context_dim) -> (B, T, C): tokens AND condition
        return self.context_embed(self.context_norm(context))

    def run(self, x, cond, cos, sin, mask=None, cache=None):
        for i, block in enumerate(self.blocks):
            x = block(x, cond, cos, sin, mask, None if cache is None else cache[i])
        return x

    def logits(self, h, cond):  # (B, n, C) -> (B, n, V) in float32; the norm in float32, the head in its own dtype
        return self.head(self.head_nm(h.float(), cond).to(self.head.weight.dtype)).float()

    def forward(self, context, positions, x_in, keep=None):
        """Teacher forcing. context (B, T, context_dim) text features; positions (B, T) their rotary positions;
        x_in (B, L - 1, Cv) the inputs of scales 1..K-1 (HybridTokenizer.next_scale_inputs); keep (B, P^2) bool,
        the same count per row: the last scale's tokens that stay (MAR-style subsampling), None = all.
        -> hidden (B, T + n - 1, C) over [context; kept image tokens] and the condition (B, T, C). Token a sees
        token b when level(a) >= level(b): whole scales at once, the context as level 0."""
        cfg = self.cfg
        pn, T, P, B = cfg.patch_nums, cfg.context_token, cfg.patch_nums[-1], context.shape[0]
        cond = self.embed_context(context)
        x = torch.cat([cond, self.word_embed(x_in)], 1)  # (B, T + L - 1, C)
        levels = torch.cat([torch.zeros(T, dtype=torch.long)] +
                           [torch.full((p * p,), k, dtype=torch.long) for k, p in enumerate(pn) if k > 0])
        grid = torch.cat([scale_grid(p, P) for p in pn[1:]]).to(x.device)  # (L - 1, 2)
        grid = grid[None] + positions[:, -1, None, None]  # offset by the last context position
        if keep is not None:
            keep_all = torch.cat([keep.new_ones(B, x.shape[1] - keep.shape[1]), keep], 1)
            x = x[keep_all].view(B, -1, x.shape[-1])
            grid = grid[keep_all[:, T:]].view(B, -1, 2)
            levels = levels[:x.shape[1]]  # only last-scale tokens go: the levels of what stays come first
        levels = levels.to(x.device)
        x = x + self.lvl_embed(levels)
        (cos_c, sin_c), (cos_i, sin_i) = rope_1d(positions, self.head_dim), rope_2d(grid, self.head_dim)
        mask = levels[:, None] >= levels[None, :]
        h = self.run(x, cond, torch.cat([cos_c, cos_i], 1), torch.cat([sin_c, sin_i], 1), mask)
        return h, cond

    @property
    def head_dim(self):
        return self.cfg.hidden_size // self.cfg.num_heads


class HybridTokenizer(nn.Module):
    """The hybrid tokenizer (the published `tokenizer/`, keys under `vae.`): image (B, 3, 16P, 16P) in [-1, 1]
    <-> latent f (B, Cv, P, P) <-> multi-scale codes + the residual token."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.ae is None:  # the published one: LDM's convolutional encoder and decoder (section 6)
            self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        else:  # the tiny one: the DC-AE's (section 6)
            self.encoder, self.decoder = DCAEEncoder(cfg.ae), DCAEDecoder(cfg.ae)
        pad = cfg.quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, padding=pad)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, padding=pad)
        self.quantize = MultiScaleQuantizer(cfg)

    def latent(self, image):
        return self.quant_conv(self.encoder(image))

    def encode(self, image, patch_nums):
        """-> ids [(B, pn_k^2)], the rest before the last codes (B, P^2, Cv) (residual = it - codebook[ids[-1]])."""
        return self.quantize.encode(self.latent(image), patch_nums)

    def decode(self, f_hat):  # (B, Cv, P, P) -> image in [-1, 1]
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def forward(self, image, patch_nums, continuous):
        """Training: -> reconstruction (unclamped) through the continuous (f itself) or the discrete path, VQ loss."""
        f_hat, vq = self.quantize(self.latent(image), patch_nums, continuous)
        return self.decoder(self.post_quant_conv(f_hat)), vq


# ----------------------------------------------------------------------------------------------------------
# 4. Training (not released; the model's forward, the paper and MAR's recipe)
# ----------------------------------------------------------------------------------------------------------
# The tokenizer: VAR's multi-scale quantization with phi at every scale, then the decoder reads either f itself
# (continuous path) or the discrete f_hat, alternating 50/50 ("alternating training", Sec. 3.1), so that one
# decoder serves both. Loss: MSE(reconstruction) + the VQ loss (the paper adds perceptual and GAN terms).
# The transformer: cross-entropy on every predicted code, plus the residual diffusion loss on the last scale,
# where the target is what the transformer's OWN sampled codes miss: the MLP learns to fix the AR model's
# mistakes, not only the quantization residual. As in MAR, part of the last scale's tokens is left out of the
# sequence (ratio from a normal(1, 0.25) truncated to [0.5, 1], at least 32 kept).


def tokenizer_loss(vae, images, patch_nums, continuous):
    out, vq = vae(images, patch_nums, continuous)
    recon = F.mse_loss(out, images)
    return recon + vq, recon, vq


def last_scale_keep(B, n, generator=None, device=None):
    """Which of the n last-scale tokens stay, (B, n) bool, the same count in every row: ceil(r n) are left out,
    r from a normal(1, 0.25) truncated to [0.5, 1], but at least 32 stay (the release's slice bound; below 32
    tokens that bound is negative and 2n - 32 go, or none)."""
    lo = 0.5 * (1 + math.erf(-2 / math.sqrt(2)))  # the normal's CDF at -2 sigma
    u = lo + (0.5 - lo) * torch.rand((), generator=generator, dtype=torch.float64)
    r = 1 + 0.25 * math.sqrt(2) * torch.erfinv(2 * u - 1).item()
    drop = min(math.ceil(n * r), n - 32)
    drop = drop if drop >= 0 else max(0, n + drop)
    order = torch.rand(B, n, generator=generator).argsort(1)[:, :drop]
    return torch.ones(B, n, dtype=torch.bool).scatter_(1, order, False).to(device)


def hart_losses(model, codebook, context, positions, x_in, ids, last_rest, keep=None, generator=None, rng=None):
    """One training step's losses. context (B, T, context_dim), positions (B, T), x_in (B, L - 1, Cv) and ids
    [(B, pn_k^2)] of the tokenizer, last_rest (B, P^2, Cv) the rest before the last codes, keep (B, P^2) or None.
    `generator` draws the caption dropout, the diffusion timesteps and noise (in the release's order), `rng` the
    codes the model samples for the diffusion target (top-k 600, top-p 0.96)."""
    cfg = model.cfg
    B, T, V, Cv = context.shape[0], cfg.context_token, cfg.codebook_size, cfg.token_dim
    drop = (torch.randn(B, generator=generator) < cfg.cond_drop_rate).to(context.device)  # randn: ~54% at 0.1
    context = torch.where(drop[:, None, None], torch.zeros_like(context), context)
    h, cond = model(context, positions, x_in, keep)
    logits = model.logits(h[:, T - 1:], cond)  # (B, 1 + n, V): scale 0 from the last context slot
    last_ids, last_rest = ids[-1], last_rest
    if keep is not None:
        last_ids, last_rest = last_ids[keep].view(B, -1), last_rest[keep].view(B, -1, Cv)
    targets = torch.cat(list(ids[:-1]) + [last_ids], 1)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    n = last_ids.shape[1]
    with torch.no_grad():
        sampled = sample_top_k_top_p(logits[:, -n:].detach().clone(), min(600, V), 0.96, rng)
    e = codebook[sampled]  # (B, n, Cv)
    c = model.decoder_norm(h[:, -n:] + model.word_embed(e)).reshape(B * n, -1)
    x0 = (last_rest - e).reshape(B * n, Cv) / cfg.vae_scale
    x0, cm = x0.repeat(cfg.diffusion_batch_mul, 1), c.repeat(cfg.diffusion_batch_mul, 1)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    rows = Diffusion(cosine_betas()).training_losses(model.diffloss.net, x0, t, cm, noise)[0]
    return dict(loss=ce + rows.mean(), ce=ce, diffusion=rows.mean(), rows=rows, sampled=sampled, c=c, x0=x0,
                t=t, noise=noise, logits=logits)


# ----------------------------------------------------------------------------------------------------------
# 5. Sampler
# ----------------------------------------------------------------------------------------------------------


def sample_top_k_top_p(logits, top_k, top_p, generator=None):
    """logits (B, l, V), filtered IN PLACE (the release's; more_smooth reads them afterwards): all but the top_k
    set to -inf, then, if top_p > 0, the smallest ones whose probabilities sum to at most 1 - top_p. -> one
    multinomial draw per row (B, l)."""
    B, l, V = logits.shape
    if top_k > 0:
        logits.masked_fill_(logits < logits.topk(top_k, sorted=False, dim=-1)[0].amin(-1, keepdim=True), -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(-1).cumsum_(-1) <= 1 - top_p
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(-1, order, remove), -torch.inf)
    probs = logits.softmax(-1).view(-1, V)
    where = generator.device if generator is not None else probs.device  # a CPU generator samples on the CPU
    return torch.multinomial(probs.to(where), 1, replacement=True, generator=generator).view(B, l).to(logits.device)


@torch.no_grad()
def generate(model, vae, context, positions, guidance=4.5, top_k=None, top_p=0.0, more_smooth=False,
             generator=None, noise_generator=None, trace=None, callback=None):
    """Next-scale prediction with CFG (the release's autoregressive_infer_cfg). context (B, T, context_dim),
    positions (B, T) -> images (B, 3, 16P, 16P) in [0, 1].

    The batch runs as [cond; uncond], the unconditional context all zeros at positions 0. At scale k < K-1 the new
    tokens (the context at k = 0) go through the blocks with the KV cache; the logits are guided,
    l = (1 + t) l_c - t l_u with t = guidance r, r = k / (K - 1) (so scale 0 is unguided; guidance 0 is off),
    and filtered (top_k: the release's 600 below scale 7, 300 after, capped at V, unless given; top_p off at 0);
    one code per token is drawn. Its embedding (or, with more_smooth, a Gumbel-softmax mixture of the codebook at
    temperature max(0.27 (1 - 0.95 r), 0.005)) joins f_hat; f_hat, area-downsampled to the next scale, is the
    next input. The last scale reuses r = (K-2)/(K-1); then the residual diffusion samples a continuous token per
    position (condition: the hidden state + the embedding of the HARD sampled code), guided with the same t,
    which is added to the last codes with no phi.
    `generator` draws the codes and Gumbel noise, `noise_generator` (default: seeded like `generator`) the
    diffusion noise. `trace`, a dict, collects each scale's codes and guided logits and the diffusion's inputs;
    callback(k, f_hat) runs after each scale k."""
    cfg = model.cfg
    pn, K, P, V, B = cfg.patch_nums, len(cfg.patch_nums), cfg.patch_nums[-1], cfg.codebook_size, context.shape[0]
    if noise_generator is None:
        noise_generator = torch.Generator().manual_seed(generator.initial_seed()) if generator is not None else None
    codebook = vae.quantize.embedding.weight.to(context.dtype)
    cond = model.embed_context(torch.cat([context, torch.zeros_like(context)]))  # (2B, T, C)
    positions = torch.cat([positions, torch.zeros_like(positions)])
    lvl = model.lvl_embed(torch.arange(K, device=context.device))  # (K, C)
    x = cond + lvl[0]
    f_hat = context.new_zeros(B, cfg.token_dim, P, P, dtype=vae.quantize.embedding.weight.dtype)  # the tokenizer's
    cache = [[None, None] for _ in model.blocks]
    for k in range(K):
        if k == 0:
            cos, sin = rope_1d(positions, model.head_dim)
        else:
            cos, sin = rope_2d(scale_grid(pn[k], P, context.device)[None] + positions[:, -1, None, None],
                               model.head_dim)
        h = model.run(x, cond, cos, sin, cache=cache)
        logits = model.logits(h, cond)
        r = k / (K - 1) if k < K - 1 else (K - 2) / (K - 1)
        t = guidance * r
        logits = (1 + t) * logits[:B] - t * logits[B:]
        if k == 0:
            logits = logits[:, -1:]
        if trace is not None:
            trace[f"logits_cfg_s{k:02d}"] = logits.clone()
        kk = min(top_k if top_k is not None else 600 if k < 7 else 300, V)
        idx = sample_top_k_top_p(logits, kk, top_p, generator)  # (B, l)
        if more_smooth:
            tau = max(0.27 * (1 - r * 0.95), 0.005)
            where = generator.device if generator is not None else logits.device
            g = -torch.empty(logits.shape, device=where).exponential_(generator=generator).log().to(logits.device)
            emb = ((logits * (1 + r) + g) / tau).softmax(-1).to(codebook.dtype) @ codebook[None]
        else:
            emb = codebook[idx]  # (B, l, Cv)
        if trace is not None:
            trace[f"idx_s{k:02d}"] = idx
        if k < K - 1:
            h_k = emb.transpose(1, 2).reshape(B, -1, pn[k], pn[k]).to(f_hat.dtype)  # (B, Cv, pn, pn)
            f_hat = vae.quantize.add_scale(f_hat, h_k, k, K)
            x = model.word_embed(downsample(f_hat, pn[k + 1]).flatten(2).transpose(1, 2).to(context.dtype)) + lvl[k + 1]
            x = torch.cat([x, x])
        else:
            c = model.decoder_norm(h + model.word_embed(codebook[idx]).repeat(2, 1, 1)).flatten(0, 1)  # (2B P^2, C)
            residual = sample_residual(model.diffloss.net, c, t, cfg.num_sampling_steps, noise_generator)
            residual = residual * cfg.vae_scale
            if trace is not None:
                trace.update({"diff.z": c, "diff.out": residual, "diff.cfg": t})
            tokens = emb + residual.view(B, P * P, -1)
            f_hat = vae.quantize.add_scale(f_hat, tokens.transpose(1, 2).reshape(B, -1, P, P).to(f_hat.dtype), k, K)
        if callback:
            callback(k, f_hat)
    return (vae.decode(f_hat.float()) + 1) / 2


@torch.no_grad()
def sample_residual(net, c, guidance, steps, generator=None):
    """The residual tokens of every last-scale position: c (2M, C) = the conditions [cond; uncond] -> (M, Cv) in
    the net's scaled units. Ancestral IDDPM sampling over `steps` respaced steps, x0 clipped to [-1, 1], from one
    noise shared by both halves; epsilon guided (1 + g) eps_c - g eps_u (at exactly g = 1 the release switches to
    unguided sampling of both halves, and so does this). One randn for the start, then one per step (the last
    step's is drawn and multiplied by 0), as the release draws them."""
    betas, timestep_map = respace(cosine_betas(), steps)
    diffusion = Diffusion(betas, timestep_map)
    M, C = c.shape[0] // 2, net.input_proj.in_features
    if guidance != 1.0:
        x = torch.randn(M, C, generator=generator).to(c.device, c.dtype)
        x, fn = torch.cat([x, x]), lambda x, t: net.forward_with_cfg(x[:M], t, c, guidance)
    else:
        x, fn = torch.randn(2 * M, C, generator=generator).to(c.device, c.dtype), lambda x, t: net(x, t, c)
    for i in reversed(range(steps)):
        t = torch.full((2 * M,), i, dtype=torch.long, device=c.device)
        mean, _, log_var, _ = diffusion.p_mean_variance(fn(x, timestep_map.to(c.device)[t]), x, t)
        noise = torch.randn(x.shape, generator=generator).to(c.device, c.dtype)
        x = mean + (i > 0) * torch.exp(0.5 * log_var) * noise
    return x[:M]


# ----------------------------------------------------------------------------------------------------------
# 6. Components: skip on first read
# ----------------------------------------------------------------------------------------------------------
# What HART uses but did not invent: the kernel loader, marked copies of other files' code (the copy test checks
# them verbatim), the tokenizer's LDM autoencoder, the Qwen2 text encoder, and the loading and command-line helpers.


# Copied from dcae.py: load_kernel
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


# Copied from fast_dllm.py: RMSNorm
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32, cast back, *then* scale (both families' order; it matters in bf16).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# The residual diffusion MLP (paper Sec. 3.3; MAR's "SimpleMLPAdaLN") and its IDDPM schedule: DC-AR took both from
# HART, so they are copied from dcar.py. The net predicts epsilon and a variance interpolation for one token at a
# time; sampling respaces the 1000-step cosine schedule to 8 steps and feeds the net the original indices.


# Copied from dcar.py: timestep_embedding
def timestep_embedding(t, dim=256, max_period=10000):
    """t (M,) original timesteps 0..999 -> (M, dim): [cos | sin] of t * 10000^(-i / (dim/2)) (cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# Copied from dcar.py: HeadResBlock
class HeadResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), (shift, scale, gate) from the condition (adaLN)."""

    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


# Copied from dcar.py: HeadFinalLayer
class HeadFinalLayer(nn.Module):
    def __init__(self, width, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(width, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


# Copied from dcar.py: DiffusionHead
class DiffusionHead(nn.Module):
    """The residual diffusion MLP (MAR's "SimpleMLPAdaLN"), one token at a time: noisy residual x (M, C), original
    timestep t (M,), condition c (M, D) the generator's hidden state -> [epsilon | variance interpolation] (M, 2C)."""

    def __init__(self, cfg):
        super().__init__()
        W, C = cfg.diffusion_width, cfg.token_dim
        self.time_embed = nn.Module()
        self.time_embed.mlp = nn.Sequential(nn.Linear(256, W), nn.SiLU(), nn.Linear(W, W))
        self.cond_embed = nn.Linear(cfg.hidden_size, W)
        self.input_proj = nn.Linear(C, W)
        self.res_blocks = nn.ModuleList(HeadResBlock(W) for _ in range(cfg.diffusion_depth))
        self.final_layer = HeadFinalLayer(W, 2 * C)

    def forward_with_cfg(self, x, t, c, scale):
        """Guided: x (M, C) for both halves of c (2M, D) = [conditional; unconditional]; epsilon
        (1 + scale) eps_c - scale eps_u, the variance half per branch. -> (2M, 2C)."""
        out = self(torch.cat([x, x]), t, c)
        eps, rest = out.chunk(2, dim=-1)
        eps_c, eps_u = eps.chunk(2)
        guided = (1 + scale) * eps_c - scale * eps_u
        return torch.cat([torch.cat([guided, guided]), rest], dim=-1)

    def forward(self, x, t, c):
        dtype = self.input_proj.weight.dtype  # the sampler's x and timestep features are float32, the head may not be
        y = self.time_embed.mlp(timestep_embedding(t).to(dtype)) + self.cond_embed(c.to(dtype))
        x = self.input_proj(x.to(dtype))
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


# Copied from dcar.py: cosine_betas
def cosine_betas(steps=1000, max_beta=0.999):
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
                        dtype=torch.float64)


# Copied from dcar.py: respace
def respace(betas, count):
    """IDDPM's space_timesteps(T, str(count)): `count` evenly strided original steps (a float stride, rounded half
    to even as Python rounds), and the betas that keep their cumulative products. -> (betas, timestep_map)."""
    stride, idx, keep = (len(betas) - 1) / (count - 1), 0.0, []
    for _ in range(count):
        keep.append(round(idx))
        idx += stride
    alpha_bar, last, new = torch.cumprod(1 - betas, 0), 1.0, []
    for i in keep:
        new.append(1 - alpha_bar[i].item() / last)
        last = alpha_bar[i].item()
    return torch.tensor(new, dtype=torch.float64), torch.tensor(keep)


# Copied from dcar.py: Diffusion
class Diffusion:
    def __init__(self, betas, timestep_map=None):
        self.betas, self.T = betas, len(betas)
        self.timestep_map = torch.arange(self.T) if timestep_map is None else timestep_map
        ab = torch.cumprod(1 - betas, 0)
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        self.sqrt_ab, self.sqrt_1m_ab = ab.sqrt(), (1 - ab).sqrt()
        self.sqrt_recip_ab, self.sqrt_recipm1_ab = (1 / ab).sqrt(), (1 / ab - 1).sqrt()
        var = betas * (1 - ab_prev) / (1 - ab)  # the posterior's
        self.post_log_var = torch.log(torch.cat([var[1:2], var[1:]]))  # clipped: var[0] = 0
        self.coef1, self.coef2 = betas * ab_prev.sqrt() / (1 - ab), (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)
        self.log_betas = torch.log(betas)

    @staticmethod
    def at(arr, t):  # float64 constants at steps t (M,) -> float32 (M, 1)
        return arr.to(t.device)[t].float()[:, None]

    def q_sample(self, x0, t, noise):
        return self.at(self.sqrt_ab, t) * x0 + self.at(self.sqrt_1m_ab, t) * noise

    def q_posterior(self, x0, x_t, t):
        return self.at(self.coef1, t) * x0 + self.at(self.coef2, t) * x_t, self.at(self.post_log_var, t)

    def p_mean_variance(self, out, x, t, clip=True):
        """out (M, 2C) = [epsilon | v] of the network at x (M, C), step t (M,) -> mean, variance, log-variance,
        predicted x0. Learned range: log var = f log beta_t + (1 - f) log posterior var, f = (v + 1) / 2."""
        eps, v = out.chunk(2, dim=-1)
        f = (v + 1) / 2
        log_var = f * self.at(self.log_betas, t) + (1 - f) * self.at(self.post_log_var, t)
        x0 = self.at(self.sqrt_recip_ab, t) * x - self.at(self.sqrt_recipm1_ab, t) * eps
        x0 = x0.clamp(-1, 1) if clip else x0
        mean = self.q_posterior(x0, x, t)[0]
        return mean, log_var.exp(), log_var, x0

    def training_losses(self, net, x0, t, c, noise):
        """Per row: epsilon MSE + the variational bound (KL to the true posterior in bits; at t = 0 the discretized
        decoder NLL) with the network's mean frozen, so that the bound trains the variance only."""
        x_t = self.q_sample(x0, t, noise)
        out = net(x_t, self.timestep_map.to(t.device)[t], c)
        eps, v = out.chunk(2, dim=-1)
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        mean, _, log_var, _ = self.p_mean_variance(torch.cat([eps.detach(), v], -1), x_t, t, clip=False)
        kl = 0.5 * (-1 + log_var - true_log_var + (true_log_var - log_var).exp() + (true_mean - mean) ** 2
                    * (-log_var).exp())
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        vb = torch.where(t == 0, nll.mean(-1), kl.mean(-1)) / math.log(2.0)
        mse = (noise - eps).pow(2).mean(-1)
        return mse + vb, mse, vb


# Copied from dcar.py: discretized_gaussian_log_likelihood
def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) of a Gaussian discretized to 256 bins over [-1, 1] (IDDPM's decoder term)."""
    cdf = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    mid = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, mid))


# The tokenizer's convolutional encoder and decoder: LDM's (taming-transformers names), GroupNorm(32, eps 1e-6),
# SiLU, self-attention at the coarsest level and in the middle.


def group_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels: softmax(q^T k / sqrt(C)) v, q/k/v from one 1x1 conv."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # (B, HW, C)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):  # stride-2 conv3x3 after padding one pixel on the right and bottom only
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):  # nearest 2x, then conv3x3
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def level(blocks, attn, resample=None, name="downsample"):
    m = nn.Module()
    m.block, m.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    if resample is not None:
        setattr(m, name, resample)
    return m


def run_level(lvl, h, resample):
    """One level: each ResBlock, followed by its attention block where the level has them, then the resampling."""
    for i, block in enumerate(lvl.block):
        h = block(h)
        if len(lvl.attn):
            h = lvl.attn[i](h)
    return getattr(lvl, resample)(h) if hasattr(lvl, resample) else h


def middle(channels):
    m = nn.Module()
    m.block_1, m.attn_1 = ResnetBlock(channels, channels), AttnBlock(channels)
    m.block_2 = ResnetBlock(channels, channels)
    return m


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths, n = [cfg.ch * m for m in cfg.ch_mult], len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down, cin = nn.ModuleList(), cfg.ch
        for i, w in enumerate(widths):
            blocks = [ResnetBlock(cin if b == 0 else w, w) for b in range(cfg.num_res_blocks)]
            attn = [AttnBlock(w) for _ in range(cfg.num_res_blocks)] if i == n - 1 else []
            self.down.append(level(blocks, attn, Downsample(w) if i < n - 1 else None))
            cin = w
        self.mid = middle(cin)
        self.norm_out, self.conv_out = group_norm(cin), nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            h = run_level(lvl, h, "downsample")
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """`up` is indexed by resolution level (0 = finest) and runs coarse to fine; 3 ResBlocks per level."""

    def __init__(self, cfg):
        super().__init__()
        widths, n = [cfg.ch * m for m in cfg.ch_mult], len(cfg.ch_mult)
        cin = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = middle(cin)
        up = []
        for i in reversed(range(n)):
            w = widths[i]
            blocks = [ResnetBlock(cin if b == 0 else w, w) for b in range(cfg.num_res_blocks + 1)]
            attn = [AttnBlock(w) for _ in range(cfg.num_res_blocks + 1)] if i == n - 1 else []
            up.insert(0, level(blocks, attn, Upsample(w) if i > 0 else None, "upsample"))
            cin = w
        self.up = nn.ModuleList(up)
        self.norm_out, self.conv_out = group_norm(cin), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for lvl in reversed(self.up):
            h = run_level(lvl, h, "upsample")
        return self.conv_out(F.silu(self.norm_out(h)))


# The DC-AE of dcae.py: the tiny tokenizer's encoder and decoder (section 9), started from the committed tiny DC-AE.


# Copied from dcae.py: DCAEConfig
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


# Copied from dcae.py: RMSNorm2d
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


# Copied from dcae.py: LayerNorm2d
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels at every pixel (mean and variance), with weight and bias (eps 1e-5): DC-HT's."""

    def forward(self, x):  # (B, C, H, W)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


# Copied from dcae.py: make_norm
def make_norm(kind, channels):
    return {"rms": RMSNorm2d, "ln": LayerNorm2d, "bn": nn.BatchNorm2d}[kind](channels)


# Copied from dcae.py: make_act
def make_act(kind):  # in place: every caller passes a fresh activation
    return {"silu": nn.SiLU(inplace=True), "relu": nn.ReLU(inplace=True)}[kind]


# Copied from dcae.py: ResBlock
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


# Copied from dcae.py: MultiScaleQKV
class MultiScaleQKV(nn.Module):
    """Aggregates q, k, v over a scale x scale neighbourhood: depthwise conv, then a grouped 1x1 conv
    that mixes the d channels of each (head, q|k|v) group."""

    def __init__(self, channels, scale, head_dim):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, scale, padding=scale // 2, groups=channels, bias=False)
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=channels // head_dim, bias=False)

    def forward(self, x):
        return self.proj_out(self.proj_in(x))


# Copied from dcae.py: LiteMLA
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


# Copied from dcae.py: GLUMBConv
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


# Copied from dcae.py: EfficientViTBlock
class EfficientViTBlock(nn.Module):
    """Global context by linear attention, then local mixing by GLUMBConv; post-norm inside each branch."""

    def __init__(self, channels, head_dim=32, scales=(), norm="rms"):
        super().__init__()
        self.attn = LiteMLA(channels, head_dim, scales, norm)
        self.conv_out = GLUMBConv(channels, norm=norm)

    def forward(self, x):
        x = self.attn(x).add_(x)
        return self.conv_out(x).add_(x)


# Copied from dcae.py: make_block
def make_block(kind, channels, cfg, norm="rms", act="silu"):
    if kind == "ResBlock":
        return ResBlock(channels, norm, act)
    return EfficientViTBlock(channels, cfg.head_dim, (5,) if kind == "EViTS5" else (), norm)


# Copied from dcae.py: DownBlock
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


# Copied from dcae.py: UpBlock
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


# Copied from dcae.py: Encoder with Encoder->DCAEEncoder
class DCAEEncoder(nn.Module):
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
        x = self.conv_in(x.contiguous(memory_format=torch.channels_last))  # channels-last: see the note above DCAEEncoder
        for stage in self.down_blocks:
            x = stage(x)
        z = self.conv_out(x)
        if self.out_group:  # averaging shortcut: consecutive groups of W[-1]/c channels
            z = z + x.unflatten(1, (-1, self.out_group)).mean(dim=2)
        return z.contiguous()


# Copied from dcae.py: DCAE with Encoder->DCAEEncoder, Decoder->DCAEDecoder
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
        self.encoder = DCAEEncoder(cfg)
        self.decoder = DCAEDecoder(cfg)

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


# Copied from dcae.py: Decoder with Decoder->DCAEDecoder
class DCAEDecoder(nn.Module):
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


# The text encoder: Qwen2's base decoder (causal attention, grouped-query, q/k/v biases), its last hidden state
# (after the final norm) as the context. Every one of the T slots is used, padding included, so the padded
# positions' states matter: they attend, causally, to the real tokens before them (padding keys are masked).


class Qwen2Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.input_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.self_attn = nn.ModuleDict(dict(
            q_proj=nn.Linear(D, self.heads * hd), k_proj=nn.Linear(D, self.kv_heads * hd),
            v_proj=nn.Linear(D, self.kv_heads * hd), o_proj=nn.Linear(self.heads * hd, D, bias=False)))
        self.post_attention_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.mlp = SwiGLU(D, cfg.intermediate_size)

    def forward(self, h, cos, sin, mask):  # h (B, n, D), mask (B, 1, n, n) bool
        B, n, D = h.shape
        a, at = self.input_layernorm(h), self.self_attn
        split = lambda t, heads: t.view(B, n, heads, -1).transpose(1, 2)  # noqa: E731  (B, heads, n, hd)
        q, k = rotate(split(at.q_proj(a), self.heads), cos, sin), rotate(split(at.k_proj(a), self.kv_heads), cos, sin)
        y = F.scaled_dot_product_attention(q, k, split(at.v_proj(a), self.kv_heads), attn_mask=mask, enable_gqa=True)
        h = h + at.o_proj(y.transpose(1, 2).reshape(B, n, D))
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Encoder(nn.Module):
    """ids (B, n), mask (B, n) 1 = a real token -> the last hidden state (B, n, D) (Hugging Face's
    `hidden_states[-1]` of Qwen2Model, positions 0..n-1)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, ids, mask):
        n = ids.shape[1]
        cos, sin = rope_1d(torch.arange(n, device=ids.device)[None], self.cfg.head_dim, self.cfg.rope_theta)
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        attend = causal & mask.bool()[:, None, None, :]  # (B, 1, n, n)
        attend = attend | ~attend.any(-1, keepdim=True)  # a query with no real key before it: all keys (no NaN)
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h, cos, sin, attend)
        return self.norm(h)


# HART prompts Qwen2 with a fixed "enhance this prompt" instruction before the user's prompt (sample.py's default
# use_llm_system_prompt): the instruction's tokens are encoded with the prompt and dropped from the output.
SYSTEM_PROMPT = """Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for image generation.

Examples:
- User Prompt: A cat sleeping -> A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.
- User Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.

Please generate only the enhanced description for the prompt below and DO NOT include any additional sentences. Start your response with "Enhanced Prompt:".

User Prompt:\n"""  # noqa: E501  (hart/utils/constants.py, with its literal backslash-n)


def tokenize_prompts(tok, prompts, length, pad_id):
    """Each prompt cut to `length` tokens and padded at the end with pad_id -> ids (B, length), mask (B, length)
    (= ids != pad_id, as the release computes it), rotary positions (B, length) = cumsum(mask) - 1."""
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        row = tok.encode(p).ids[:length]
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    mask = ids != pad_id
    return ids, mask, mask.cumsum(1) - 1


def encode_prompts(text_encoder, tok, prompts, length, pad_id, system_prompt=None):
    """-> context (B, T, D) float32, rotary positions (B, T). With a system prompt, Qwen2 reads [system; prompt]
    and only the last T positions are kept."""
    ids, mask, positions = tokenize_prompts(tok, prompts, length, pad_id)
    if system_prompt:
        sys_ids = torch.tensor(tok.encode(system_prompt).ids[:length], dtype=torch.long).expand(len(prompts), -1)
        ids, mask = torch.cat([sys_ids, ids], 1), torch.cat([torch.ones_like(sys_ids, dtype=torch.bool), mask], 1)
    device = text_encoder.embed_tokens.weight.device
    context = text_encoder(ids.to(device), mask.to(device))[:, -length:]
    return context.float(), positions.to(device)


# Loading helpers shared by every root file (copied from dcae.py).


# Copied from dcae.py: DTYPES
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Copied from dcae.py: resolve_device
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


# Copied from dcae.py: best_dtype
def best_dtype(device):
    """(dtype, why) for a device: bfloat16 on CUDA GPUs with bf16 tensor cores, float16 on older ones, float32
    elsewhere (CPU bfloat16 is fast only with AVX512-BF16/AMX, and mps is safest in float32)."""
    if str(device).startswith("cuda"):
        major = torch.cuda.get_device_capability(device)[0]
        return (torch.bfloat16, "bf16 tensor cores") if major >= 8 else (torch.float16, "GPU without bf16")
    return torch.float32, f"the default on {str(device).split(':')[0]}"


# Copied from dcae.py: resolve_dtype
def resolve_dtype(dtype=None, device="cpu"):
    """A torch dtype or its name (float32, bfloat16, float16); None or empty: the best for the device."""
    if dtype is None or dtype == "":
        return best_dtype(device)[0]
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {str(dtype)[:40]!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


# Copied from dcae.py: read_json
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


# Copied from dcae.py: read_metadata
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


# Copied from dcae.py: save_weights
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


# Copied from dcae.py: read_weights
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


# Copied from dcae.py: check_state_dict
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


# Copied from dcae.py: load_state_dict_strict
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


# Copied from sana.py: load_tokenizer
def load_tokenizer(path):
    """A tokenizer.json (Hugging Face `tokenizers`)."""
    from tokenizers import Tokenizer  # a Rust wheel; imported here so the DiT works without it
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path} not found")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception
        raise ValueError(f"{path} is not a readable tokenizer.json ({str(e)[:100]})") from None


# Copied from dcae.py: ddp_setup
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


# The synthetic shapes data of dcae.py (the tiny model's training data) and the tiny model's checks.


# Copied from dcae.py: SHAPE_COLORS
SHAPE_COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (240, 210, 30),
                "white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}

# Copied from dcae.py: COLORS
COLORS = ("white", "black", "gray", "red", "green", "blue", "yellow")  # of the objects and of the background

# Copied from dcae.py: SHAPES
SHAPES = ("circle", "square", "triangle")

# Copied from dcae.py: COUNT_WORDS
COUNT_WORDS = ("a", "two", "three")

# Copied from dcae.py: RADIUS
RADIUS = {1: (0.16, 0.25), 2: (0.14, 0.19), 3: (0.14, 0.19)}  # object radius per count, as a fraction of the size


# Copied from dcae.py: shapes_caption
def shapes_caption(count, color, shape, background):
    noun = shape if count == 1 else shape + "s"
    return f"{COUNT_WORDS[count - 1]} {color} {noun} on a {background} background"


# Copied from dcae.py: place_objects
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


# Copied from dcae.py: draw_shapes
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


# Copied from dcae.py: random_scene
def random_scene(rng, colors=COLORS):
    """(count, color, shape, background) drawn uniformly; the background differs from the object colour."""
    color = rng.choice(colors)
    background = rng.choice([b for b in COLORS if b != color])
    return rng.randint(1, 3), color, rng.choice(SHAPES), background


# Copied from dcae.py: shapes_batch
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


# Copied from sana.py: check_tiny_prompt
def check_tiny_prompt(prompt):
    """The tiny model knows only captions like its training data's; its tokenizer would silently drop any other
    word. Refuse anything else in one sentence that names the unknown words and states the grammar."""
    words = re.findall(r"\w+|[^\w\s]+", prompt.lower())  # as the tokenizer's Whitespace pre-tokenizer splits
    unknown = list(dict.fromkeys(w for w in words if w not in TINY_WORDS))
    if unknown:
        named = ", ".join(f'"{w[:20]}"' for w in unknown[:5]) + (f" and {len(unknown) - 5} more" * (len(unknown) > 5))
        raise ValueError(f"the tiny model does not know {named}: it draws only {TINY_GRAMMAR}")
    colors, shapes, many = "|".join(COLORS), "|".join(SHAPES), "|".join(COUNT_WORDS[1:])
    caption = (rf"(?:{COUNT_WORDS[0]} (?:{colors}) (?:{shapes})|(?:{many}) (?:{colors}) (?:{shapes})s) "
               rf"on a (?:{colors}) background")
    if not re.fullmatch(caption, " ".join(words)):
        raise ValueError(f"the tiny model draws only {TINY_GRAMMAR}; {prompt.strip()[:60]!r} is not one")


# Copied from sana.py: tiny_dcae_config
def tiny_dcae_config(path=TINY_DCAE):
    """The tiny DC-AE's config, from its file's metadata (no weights read)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: it comes with the repository's weights/ folder, or "
                                f"`python dcae.py --train --train-out {path}` makes it")
    try:
        meta = json.loads(read_metadata(path)["config"])
        return DCAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()})
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a tiny DC-AE written by `python dcae.py --train` (its metadata has no "
                         f"DC-AE config)") from None


# Copied from sana.py: load_tiny_dcae
def load_tiny_dcae(path=TINY_DCAE, *, device="cpu", dtype=torch.float32):
    """The committed tiny DC-AE. Built on the CPU, not the meta device: the random initialization it draws before
    its weights arrive is part of train_tiny's random stream, which the committed tiny SANA comes from."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    model = DCAE(tiny_dcae_config(path))
    load_state_dict_strict(model, read_weights(path), path)
    return model.to(device=device, dtype=dtype).eval()


# Copied from dcae.py: pick_device_dtype
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


# Copied from dcae.py: check_out_path
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


# Copied from dcae.py: train_out_path
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


# Copied from dcae.py: refuse_unused
def refuse_unused(args, flags, mode):
    """One sentence for the first of `flags` (e.g. "--gan") that the command line set away from its default although
    it does nothing in this `mode` (e.g. "without --train"): a flag silently ignored would look obeyed."""
    defaults = vars(build_parser().parse_args([]))
    given = [f for f in flags if vars(args)[f[2:].replace("-", "_")] != defaults[f[2:].replace("-", "_")]]
    if given:
        raise ValueError(f"{given[0]} does nothing {mode}: leave it out")


# ----------------------------------------------------------------------------------------------------------
# 7. Checkpoint loading
# ----------------------------------------------------------------------------------------------------------
# The published mit-han-lab/hart-0.7b-1024px: llm/ (config.json "hart_transformer_t2i", pytorch_model.bin and
# ema_model.bin, whose EMA weights sample.py uses) and tokenizer/ (config.json "hart_autoencoder_with_disc",
# pytorch_model.bin, keys under `vae.`, the discriminator's `disc.*` ignored). The text encoder is a Hugging Face
# Qwen2 folder. .bin files are read with weights_only=True.

# Flags of the release's classes that this file implements in one setting only (the published one).
_HART_FIXED = {"attn_type": "llama", "mlp_type": "llama", "use_timestep_embed": True, "use_context_norm": True,
               "sep_aln_pooling_mode": "max", "shared_aln": False, "use_cross_attn": False, "attn_l2_norm": False,
               "sampler": "iddpm", "diffusion_head_repeats": 1}
_TOKENIZER_FIXED = {"quantizer_type": "var_hybrid", "using_znorm": False, "double_decoder": False}


def _check_fixed(c, fixed, path):
    for key, want in fixed.items():
        if key in c and c[key] != want:
            raise ValueError(f"{path} has {key}={c[key]!r}; this implementation supports only {want!r}")


def _config_json(folder, model_types):
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no config.json")
    c = read_json(path)
    kind = c.get("model_type") if isinstance(c, dict) else type(c).__name__
    if kind not in model_types:
        raise ValueError(f"{path} describes a {kind!r} model, not {' or '.join(map(repr, model_types))}")
    return c, path


def _weights(folder, names):
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return read_weights(path), path
    raise FileNotFoundError(f"{folder} has none of {', '.join(names)}")


def tokenizer_config_from_json(folder):
    c, path = _config_json(folder, ("hart_autoencoder_with_disc", "hart_autoencoder"))
    _check_fixed(c, _TOKENIZER_FIXED, path)
    try:
        return HARTTokenizerConfig(vocab_size=c["vocab_size"], z_channels=c["z_channels"], ch=c["ch"],
                                   ch_mult=tuple(c["ch_mult"]), quant_conv_ks=c.get("quant_conv_ks", 3),
                                   quant_resi=c.get("quant_resi", 0.5), share_quant_resi=c.get("share_quant_resi", 4),
                                   beta=c.get("beta", 0.25))
    except KeyError as e:
        raise ValueError(f"{path} has no {e.args[0]!r}: not a complete HART tokenizer config") from None


def hart_config_from_json(folder, tokenizer_cfg):
    c, path = _config_json(folder, ("hart_transformer_t2i",))
    _check_fixed(c, _HART_FIXED, path)
    try:
        return HARTConfig(hidden_size=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"],
                          mlp_ratio=c.get("mlp_ratio", 4.0), disable_aln=c["disable_aln"],
                          context_token=c["context_token"], context_dim=c["context_dim"],
                          patch_nums=tuple(c["patch_nums"]), codebook_size=tokenizer_cfg.vocab_size,
                          token_dim=tokenizer_cfg.z_channels, diffusion_width=c["diff_width"],
                          diffusion_depth=c["diff_depth"], num_sampling_steps=int(c["num_sampling_steps"]),
                          diffusion_batch_mul=c.get("diffusion_batch_mul", 4),
                          cond_drop_rate=c.get("cond_drop_rate", 0.1), norm_eps=c.get("norm_eps", 1e-6))
    except KeyError as e:
        raise ValueError(f"{path} has no {e.args[0]!r}: not a complete HART transformer config") from None


def tokenizer_state_dict(sd):
    """The published tokenizer's keys -> HybridTokenizer's: without the `vae.` prefix, the discriminator
    (`disc.*`) and the codebook-usage statistics (`quantize.ema_vocab_hit_SV`), which inference does not use."""
    sd = {k[4:] if k.startswith("vae.") else k: v for k, v in sd.items() if not k.startswith("disc.")}
    sd.pop("quantize.ema_vocab_hit_SV", None)
    return sd


def load_hart_tokenizer(folder, *, device="cpu", dtype=torch.float32):
    """The published tokenizer/ folder -> HybridTokenizer in eval mode."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    cfg = tokenizer_config_from_json(folder)
    sd, path = _weights(folder, ("pytorch_model.bin", "model.safetensors"))
    sd = tokenizer_state_dict(sd)
    with torch.device("meta"):
        model = HybridTokenizer(cfg)
    load_state_dict_strict(model, sd, path)
    return model.to(device=device, dtype=dtype).eval()


def hart_state_dict(sd, cfg, source):
    """The published llm/ weights -> (HART's state dict, the config they fit). Depth and plain / per-block AdaLN
    come from the keys (two layouts give the paper's 732M); the release's two persistent buffers (`lvl_1L` and
    the (T + L - 1)^2 training mask, 380 MB at 1024 px) are checked against the config and rebuilt, not loaded."""
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    aln = any(".ada_lin." in k for k in sd if k.startswith("blocks."))
    if blocks and (max(blocks) + 1 != cfg.depth or aln == cfg.disable_aln):
        cfg = replace(cfg, depth=max(blocks) + 1, disable_aln=not aln)
    n = cfg.context_token + sum(p * p for p in cfg.patch_nums) - 1
    sd = dict(sd)
    for key in ("lvl_1L", "attn_bias_for_masking"):
        if key in sd and sd.pop(key).shape[-1] != n:
            raise ValueError(f"{source}: {key} is sized for another sequence than context_token + L - 1 = {n}: the "
                             f"weights were saved for other patch_nums or context_token than the config's")
    return sd, cfg


def load_hart(folder, tokenizer_cfg, *, ema=True, device="cpu", dtype=torch.float32):
    """The published llm/ folder -> HART in eval mode, with the EMA weights (ema_model.bin) when `ema` and present
    (sample.py's default), else pytorch_model.bin."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    cfg = hart_config_from_json(folder, tokenizer_cfg)
    sd, path = _weights(folder, (("ema_model.bin",) if ema else ()) + ("pytorch_model.bin", "model.safetensors"))
    sd, cfg = hart_state_dict(sd, cfg, path)
    with torch.device("meta"):
        model = HART(cfg)
    load_state_dict_strict(model, sd, path)
    return model.to(device=device, dtype=dtype).eval()


def qwen2_config_from_json(folder):
    c, path = _config_json(folder, ("qwen2",))
    _check_fixed(c, {"hidden_act": "silu", "use_sliding_window": False, "rope_scaling": None}, path)
    try:
        return Qwen2Config(**{f.name: c[f.name] for f in fields(Qwen2Config)})
    except KeyError as e:
        raise ValueError(f"{path} has no {e.args[0]!r}: not a complete Qwen2 config") from None


def load_qwen2(folder, *, device="cpu", dtype=torch.float32):
    """A Hugging Face Qwen2 folder (config.json, model.safetensors[.index.json] or pytorch_model.bin, keys with
    or without `model.`; the LM head is not used) -> Qwen2Encoder in eval mode."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    cfg = qwen2_config_from_json(folder)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        sd = {}
        for name in sorted(set((read_json(index).get("weight_map") or {}).values())):
            sd.update(read_weights(os.path.join(folder, name)))
        path = index
    else:
        sd, path = _weights(folder, ("model.safetensors", "pytorch_model.bin"))
    sd = {k[6:] if k.startswith("model.") else k: v for k, v in sd.items() if not k.startswith("lm_head.")}
    with torch.device("meta"):
        model = Qwen2Encoder(cfg)
    load_state_dict_strict(model, sd, path)
    return model.to(device=device, dtype=dtype).eval()


def qwen2_pad_id(folder, tok):
    """The pad token of tokenizer_config.json (Qwen2's is <|endoftext|>), as an id."""
    path = os.path.join(folder, "tokenizer_config.json")
    pad = read_json(path).get("pad_token") if os.path.isfile(path) else None
    pad = pad.get("content") if isinstance(pad, dict) else pad
    pad_id = tok.token_to_id(pad or "<|endoftext|>")
    if pad_id is None:
        raise ValueError(f"{folder}: the tokenizer has no pad token {pad or '<|endoftext|>'!r}")
    return pad_id


# ----------------------------------------------------------------------------------------------------------
# 8. Pipeline
# ----------------------------------------------------------------------------------------------------------


class HARTPipeline:
    """Prompts -> images: Qwen2 features of the padded prompt (with the system prompt for the published model),
    next-scale generation with the residual diffusion, the tokenizer's decoder."""

    def __init__(self, vae, model, text_encoder, tokenizer, pad_id, system_prompt=None, guidance=4.5,
                 more_smooth=True, top_k=None, top_p=0.0):
        self.vae, self.model, self.text_encoder, self.tokenizer = vae, model, text_encoder, tokenizer
        self.pad_id, self.system_prompt, self.text_len = pad_id, system_prompt, model.cfg.context_token
        self.guidance, self.more_smooth, self.top_k, self.top_p = guidance, more_smooth, top_k, top_p

    @torch.no_grad()
    def generate(self, prompts, guidance=None, generator=None, more_smooth=None, top_k=None, top_p=None,
                 callback=None):
        """-> uint8 images (B, H, W, 3) on the CPU; `generator` (a CPU torch.Generator) draws the codes, a second
        one seeded like it the diffusion noise; callback(k, f_hat) after each scale."""
        context, positions = encode_prompts(self.text_encoder, self.tokenizer, prompts, self.text_len, self.pad_id,
                                            self.system_prompt)
        x = generate(self.model, self.vae, context.to(self.model.head.weight.dtype), positions,
                     self.guidance if guidance is None else guidance, self.top_k if top_k is None else top_k,
                     self.top_p if top_p is None else top_p, self.more_smooth if more_smooth is None else more_smooth,
                     generator, callback=callback)
        if not torch.isfinite(x).all():  # it would be written as black
            raise ValueError("the image came out NaN or inf: broken weights, or a guidance scale too large for the "
                             "dtype")
        return (x.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def load_pipeline(ckpt, text_encoder=None, *, device="cpu", dtype=torch.float32):
    """The published folder (llm/ and tokenizer/ inside; or the llm/ folder itself, with ../tokenizer) and a Qwen2
    folder (default: Qwen2-VL-1.5B-Instruct beside the checkpoint) -> HARTPipeline."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    llm = os.path.join(ckpt, "llm") if os.path.isdir(os.path.join(ckpt, "llm")) else ckpt
    tokenizer = os.path.join(os.path.dirname(os.path.abspath(llm)), "tokenizer")
    if not os.path.isdir(tokenizer):
        raise FileNotFoundError(f"{ckpt}: no tokenizer/ folder beside {llm} (the published layout has llm/ and "
                                f"tokenizer/ side by side)")
    if text_encoder is None:
        text_encoder = os.path.join(os.path.dirname(os.path.abspath(llm.rstrip("/"))), "..", "Qwen2-VL-1.5B-Instruct")
        if not os.path.isdir(text_encoder):
            raise FileNotFoundError("no Qwen2 text encoder given: pass --text-encoder DIR (a Hugging Face "
                                    "Qwen2-1.5B(-Instruct) folder with tokenizer.json)")
    vae = load_hart_tokenizer(tokenizer, device=device, dtype=torch.float32)
    model = load_hart(llm, vae.cfg, device=device, dtype=dtype)
    te = load_qwen2(text_encoder, device=device, dtype=dtype)
    tok = load_tokenizer(os.path.join(text_encoder, "tokenizer.json"))
    if te.cfg.hidden_size != model.cfg.context_dim:
        raise ValueError(f"{text_encoder} is {te.cfg.hidden_size} wide; the transformer reads {model.cfg.context_dim}")
    return HARTPipeline(vae, model, te, tok, qwen2_pad_id(text_encoder, tok), system_prompt=SYSTEM_PROMPT)


# ----------------------------------------------------------------------------------------------------------
# 9. Tiny default
# ----------------------------------------------------------------------------------------------------------
# The tiny HART, trained on the synthetic shapes of dcae.py by `python hart.py --train` (within 10 minutes on 2
# CPU cores, reproducible from the seed; `train_tiny`), in two parts and three phases (`--train-steps N`: N each):
#   1. the tiny hybrid tokenizer (`train_tiny_tokenizer`): the committed tiny DC-AE (f8c4: 64x64 images -> 8x8
#      latents of 4 channels) with HART's quantizer (256 codes over 6 scales, started on the latents' own
#      multi-scale rests), in two stages: the codes and phi learn while the decoder alternates 50/50 between f_hat
#      and f (encoder frozen), then the paper's hybrid stage: codes frozen too, the decoder alone
#                                                                    -> weights/hart_tiny_tokenizer.safetensors
#   2. the generator: the tiny Qwen2, transformer and diffusion MLP, trained together on the frozen tokenizer's
#      codes (`tiny_generator_data`, `train_tiny_generator`)        -> weights/hart_tiny.safetensors

TINY_PATCH_NUMS = (1, 2, 3, 4, 6, 8)  # L = 130 tokens
TINY_CODEBOOK = 256
TINY_TOKENIZER_STAGES = (("quantize", 300), ("decoder", 300))
TINY_TEXT_LEN = 8  # the longest caption, "three yellow triangles on a green background", is 7 words
TINY_QWEN2 = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=32, rope_theta=10000.0)
TINY = HARTConfig(hidden_size=128, depth=4, num_heads=4, context_token=TINY_TEXT_LEN, context_dim=64,
                  patch_nums=TINY_PATCH_NUMS, codebook_size=TINY_CODEBOOK, token_dim=4, diffusion_width=128,
                  diffusion_depth=2, diffusion_batch_mul=2, vae_scale=4.0)  # |residual| < 3.7 on 99% of values
TINY_STEPS = 1500
TINY_REFERENCE = "a 2-core Xeon with AMX, in bfloat16"  # where TINY_STEP_SECONDS were measured
# a step of each phase there, in seconds: measured by scripts/time_tiny_recipes.py
TINY_STEP_SECONDS = {"quantize": 0.303, "decoder": 0.311, "code": 21.9, "generator": 0.213}
TINY_GUIDANCE = 3.0
TINY_MORE_SMOOTH = False

TINY_WORDS = sorted(set(COUNT_WORDS) | set(SHAPE_COLORS) | set(SHAPES) | {s + "s" for s in SHAPES}
                    | {"on", "background"})  # the captions' vocabulary
TINY_GRAMMAR = (f'prompts of the form "a/two/three <colour> <shape>[s] on a <colour> background" with the colours '
                f'{", ".join(COLORS)} and the shapes {", ".join(SHAPES)}, e.g. "two red circles on a blue background"')


def build_tiny_tokenizer():
    """Word-level tokenizer over the captions' vocabulary; pad id 0 (as Qwen2's <|endoftext|>, it only pads)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(TINY_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()  # the vocabulary is lower case: "A Red Circle" is the same caption
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


@torch.no_grad()
def init_codebook(vae, images, patch_nums, generator):
    """The codebook started on the latents' own multi-scale rests: the K scales of a continuous pyramid (each
    scale the area-downsampled rest, its bicubic upsampling removed), an equal share of random rest vectors from
    each. Codes then sit where the quantizer will look for them (no dead codes from a random start)."""
    f = vae.latent(images)
    B, C, P, _ = f.shape
    K, V, rest, pool = len(patch_nums), vae.cfg.vocab_size, f.clone(), []
    for k, pn in enumerate(patch_nums):
        z = downsample(rest, pn)
        rest = rest - upsample(z, P)
        z = z.permute(0, 2, 3, 1).reshape(-1, C)
        n = V // K + (k < V % K)
        pool.append(z[torch.randint(len(z), (n,), generator=generator)])
    vae.quantize.embedding.weight.copy_(torch.cat(pool))


class TokenizerLoss(nn.Module):
    """One tokenizer step's loss as a module's forward (DistributedDataParallel then sees one call)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images, continuous):
        return tokenizer_loss(self.vae, images, TINY_PATCH_NUMS, continuous)[0]


def init_tiny_tokenizer(seed, generator):
    """The tiny hybrid tokenizer before training: the committed tiny DC-AE's (f8c4) encoder and decoder around HART's
    quantizer, quant_conv and post_quant_conv as the identity (so the pretrained autoencoder is intact at the
    start), the codebook started on the latents' own multi-scale rests (init_codebook, drawn from `generator`)."""
    ae = load_tiny_dcae()
    cfg = HARTTokenizerConfig(vocab_size=TINY_CODEBOOK, z_channels=ae.cfg.latent_channels, ae=ae.cfg)
    vae = HybridTokenizer(cfg)
    vae.encoder.load_state_dict(ae.encoder.state_dict())
    vae.decoder.load_state_dict(ae.decoder.state_dict())
    with torch.no_grad():
        for conv in (vae.quant_conv, vae.post_quant_conv):
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[:, :, 1, 1] = torch.eye(cfg.z_channels)
    init_codebook(vae, shapes_batch(256, seed=10_000 + seed)[0], TINY_PATCH_NUMS, generator)
    return vae


def save_half(sd, out, metadata):
    """Tensors written as float16 safetensors (the committed tiny files), the folder made if need be."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_weights({k: v.half() for k, v in sd.items()}, out, metadata=metadata)


# Copied from dcae.py: cpu_summary
def cpu_summary(threads, world=1):
    """One line: the ISA torch's kernels use here (ATEN_CPU_CAPABILITY can lower it), native bfloat16, the cores
    and the threads a --train run uses."""
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return (f"CPU: {torch.backends.cpu.get_cpu_capability()} kernels, "
            f"{'native bfloat16 (AVX512-BF16/AMX)' if bf16 else 'no native bfloat16'}, {os.cpu_count()} cores; "
            f"training on {threads} thread(s) x {world} process(es)")


# Copied from dcae.py: format_time
def format_time(seconds):  # 75.2 -> "1 min 15 s"
    s = round(seconds)
    return f"{s // 3600} h {s // 60 % 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s" if s >= 60 \
        else f"{s} s"


# Copied from dcae.py: TrainProgress
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


def train_tiny_tokenizer(seed, out, progress, *, steps=None, stages=TINY_TOKENIZER_STAGES, batch=16, lr=5e-4,
                         rank=0, world=1):
    """The recipe's tokenizer phase, in float32: init_tiny_tokenizer, then its stages, each of its own count of
    steps or of `steps`. Stage "quantize": the codebook and phi learn (VQ loss) while the decoder alternates
    between the discrete and the continuous path (the encoder stays frozen); stage "decoder": the codes frozen
    too, the decoder alone (the release's freeze_codebook_for_hybrid). The continuous / discrete choice of each
    step is drawn from the seed, the same on every rank. The weights end rounded to fp16, as rank 0 writes them
    to `out` with their config in the metadata. `progress` (TrainProgress) shows stage S as phase "tokenizer S"."""
    torch.manual_seed(seed)  # the DC-AE and the quantizer are built, and drawn, before their weights arrive
    g = torch.Generator().manual_seed(seed)  # the path choices and the codebook's start: shared by all ranks
    data = torch.Generator().manual_seed(seed * world + rank + 1)  # the images: one stream per rank
    vae = init_tiny_tokenizer(seed, g)
    for stage, n in stages:
        n = steps or n
        vae.requires_grad_(False)
        for m in (vae.decoder, vae.post_quant_conv) + ((vae.quantize,) if stage == "quantize" else ()):
            m.requires_grad_(True)
        net = loss_fn = TokenizerLoss(vae)
        if world > 1:  # a new wrapper per stage: each stage trains other parameters
            net = nn.parallel.DistributedDataParallel(loss_fn)
        opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        progress.phase(f"tokenizer {stage}")
        for step in range(n):
            images, _ = shapes_batch(batch, seed=int(torch.randint(2 ** 62, (1,), generator=data)))
            continuous = bool(torch.rand((), generator=g) < 0.5)  # alternating training, 50/50
            loss = net(images, continuous)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress.step(step, loss=loss.item())
    vae.requires_grad_(False).eval()
    with torch.no_grad():  # rounded to the fp16 of the file: what load_tiny reads
        for p in vae.parameters():
            p.copy_(p.half())
    if rank == 0 and out:
        config = {**asdict(replace(vae.cfg, ae=None)), "ae": asdict(vae.cfg.ae)}
        save_half(vae.state_dict(), out, {"config": json.dumps(config), "seed": str(seed)})
    return vae


def load_tiny_tokenizer(path, *, device="cpu", dtype=torch.float32):
    """The tiny hybrid tokenizer written by train_tiny_tokenizer (its config in the file's metadata)."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: it comes with the repository's weights/ folder, or "
                                "`python hart.py --train` writes it beside its --train-out")
    try:
        meta = json.loads(read_metadata(path)["config"])
        ae = DCAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.pop("ae").items()})
        cfg = HARTTokenizerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()}, ae=ae)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a tiny HART tokenizer written by `python hart.py --train` (its metadata "
                         f"has no tokenizer config)") from None
    with torch.device("meta"):
        vae = HybridTokenizer(cfg)
    load_state_dict_strict(vae, read_weights(path), path)
    return vae.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def shapes_tokens(vae, n, seed, chunk=256):
    """n shapes images coded once by the frozen tokenizer: the teacher-forcing inputs (n, L - 1, Cv), the codes of
    every scale [(n, pn^2)], the rest before the last codes (n, P^2, Cv), and the captions."""
    x_in, ids, rest, caps = [], [], [], []
    for i in range(0, n, chunk):
        images, c = shapes_batch(min(chunk, n - i), seed=seed * 1_000_003 + i)
        idx, r = vae.encode(images, TINY_PATCH_NUMS)
        x_in.append(vae.quantize.next_scale_inputs(idx, TINY_PATCH_NUMS))
        ids.append(idx)
        rest.append(r)
        caps += c
    return torch.cat(x_in), [torch.cat(s) for s in zip(*ids)], torch.cat(rest), caps


def initialize_weights(text_encoder, model):
    """From scratch (VAR / MAR / DiT practice): N(0, 0.02) linears and embeddings with zero biases; the diffusion
    MLP's adaLN modulations and output zeroed (each residual block starts as the identity, epsilon = 0)."""
    for m in list(text_encoder.modules()) + list(model.modules()):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    net = model.diffloss.net
    modulations = [b.adaLN_modulation[-1] for b in net.res_blocks] + [net.final_layer.adaLN_modulation[-1]]
    for lin in modulations + [net.final_layer.linear]:
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)


class JointLoss(nn.Module):
    """The tiny Qwen2 and HART trained together, as one module whose forward returns the loss."""

    def __init__(self, text_encoder, model, codebook):
        super().__init__()
        self.text_encoder, self.model = text_encoder, model
        self.register_buffer("codebook", codebook, persistent=False)

    def forward(self, text_ids, x_in, ids, rest, keep, generator):
        mask = text_ids != 0
        context = self.text_encoder(text_ids, mask)
        return hart_losses(self.model, self.codebook, context, mask.cumsum(1) - 1, x_in, ids, rest, keep, generator,
                           generator)


def tiny_generator_data(vae, n_images, seed, progress):
    """The generator phase's data: n_images shapes coded once by the frozen tokenizer (shapes_tokens) and their
    captions as word ids, padded with 0 to TINY_TEXT_LEN. -> (tensors, codebook, text tokenizer)."""
    progress.phase("code")
    x_in, ids, rest, caps = shapes_tokens(vae, n_images, seed)
    tok = build_tiny_tokenizer()
    text_ids = torch.stack([torch.tensor(tok.encode(c).ids + [0] * (TINY_TEXT_LEN - len(tok.encode(c).ids)))
                            for c in caps])
    codebook = vae.quantize.embedding.weight.detach().clone()
    resid = rest - codebook[ids[-1]]
    progress.step(0, images=n_images, **{"residual std": resid.std().item(),
                                         "beyond vae_scale": f"{(resid.abs() > TINY.vae_scale).float().mean():.2%}"})
    return dict(text_ids=text_ids, x_in=x_in, ids=ids, rest=rest), codebook, tok


def train_tiny_generator(data, codebook, seed, progress, *, steps, batch, lr, ema_decay, bf16, rank=0, world=1):
    """The recipe's generator phase: the tiny Qwen2, HART and its diffusion MLP from scratch (initialize_weights),
    trained jointly (JointLoss: hart_losses on the Qwen2 features) for `steps` steps of AdamW, linear warmup over
    100 steps then cosine decay to 10% of `lr`, gradients clipped at norm 1, keeping an EMA of the weights.
    -> (text encoder, model) holding the EMA rounded to fp16: what the file gets."""
    te, model = Qwen2Encoder(TINY_QWEN2), HART(TINY)
    initialize_weights(te, model)
    joint = net = JointLoss(te, model, codebook)
    if world > 1:  # averages the gradients
        net = nn.parallel.DistributedDataParallel(joint)
    params = [p for p in joint.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed * world + rank)  # batches, masks, dropout, noise: one stream per rank
    P2 = TINY_PATCH_NUMS[-1] ** 2
    progress.phase("generator")
    for step in range(steps):
        for group in opt.param_groups:  # linear warmup, then cosine decay to 10%
            group["lr"] = lr * min(1, (step + 1) / 100) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        i = torch.randint(len(data["text_ids"]), (batch,), generator=g)
        keep = last_scale_keep(batch, P2, g)
        # fp32 master weights; PyTorch's math attention (its flash kernel's backward is slower on short sequences)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), sdpa_kernel(SDPBackend.MATH):
            out = net(data["text_ids"][i], data["x_in"][i], [s[i] for s in data["ids"]], data["rest"][i], keep, g)
        loss = out["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():  # EMA of the weights: what gets saved
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - min(ema_decay, (step + 1) / (step + 10)))
        progress.step(step, loss=loss.item(), ce=out["ce"].item(), diffusion=out["diffusion"].item())
    with torch.no_grad():  # the EMA, rounded to the fp16 of the file: the pipeline returned is what load_tiny reads
        for e, p in zip(ema, params):
            p.copy_(e.half())
    return te, model


# Copied from sana.py: training_precision
def training_precision(bf16=None):
    """(bf16, why): whether a tiny recipe trains in bfloat16 autocast (float32 master weights): where the CPU computes
    bf16 natively (AVX512-BF16 or AMX) and torch's kernels may use it, which is faster than float32 there; float32
    elsewhere, where bf16 runs ~9x slower. True or False (--dtype with --train) forces either."""
    if bf16 is not None:
        return bf16, "as asked"
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return False, "this CPU has no native bfloat16, which would run ~9x slower than float32"
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False, (f"torch's kernels are limited to {torch.backends.cpu.get_cpu_capability()} here "
                       f"(ATEN_CPU_CAPABILITY), which has no native bfloat16")
    return True, "this CPU computes bfloat16 natively (AVX512-BF16/AMX), faster than float32"


def train_tiny(seed=0, out=TINY_WEIGHTS, log=print, *, steps=TINY_STEPS, tokenizer_steps=None, batch=32, lr=1e-3,
               n_images=8192, ema_decay=0.995, bf16=None):
    """The whole tiny HART from the seed, deterministically on 2 threads: the tokenizer phase
    (train_tiny_tokenizer, `tokenizer_steps` in place of each stage's count, written beside `out` as
    *_tokenizer.safetensors), then the generator phase on its codes (tiny_generator_data, train_tiny_generator:
    `steps` steps, in bf16 autocast where the CPU computes bf16 natively, float32 elsewhere; `bf16` forces
    either). Under torchrun each rank draws its own batches and rank 0 writes the files. Returns the pipeline,
    with the weights as saved, on every rank."""
    rank, world = ddp_setup()
    torch.set_num_threads(max(1, 2 // world))  # more threads than cores stall OpenMP
    torch.use_deterministic_algorithms(True)
    log = log if rank == 0 else (lambda *a: None)
    bf16, why = training_precision(bf16)
    log(cpu_summary(max(1, 2 // world), world))
    log(f"precision: the tokenizer in float32, the transformer in {'bfloat16 autocast' if bf16 else 'float32'}: {why}")
    progress = TrainProgress([(f"tokenizer {stage}", tokenizer_steps or n, TINY_STEP_SECONDS[stage])
                              for stage, n in TINY_TOKENIZER_STAGES] +
                             [("code", 1, TINY_STEP_SECONDS["code"] * n_images / 8192),
                              ("generator", steps, TINY_STEP_SECONDS["generator"] * batch / 32)], TINY_REFERENCE, log)
    t0 = time.time()
    base = os.path.splitext(out)[0]
    vae = train_tiny_tokenizer(seed, base + "_tokenizer.safetensors", progress, steps=tokenizer_steps, rank=rank,
                               world=world)
    torch.manual_seed(seed)
    data, codebook, tok = tiny_generator_data(vae, n_images, seed, progress)
    te, model = train_tiny_generator(data, codebook, seed, progress, steps=steps, batch=batch, lr=lr,
                                     ema_decay=ema_decay, bf16=bf16, rank=rank, world=world)
    if rank == 0:
        save_half({f"{name}.{k}": v for name, m in (("text_encoder", te), ("model", model))
                   for k, v in m.state_dict().items()}, out,
                  {"seed": str(seed), "steps": str(steps), "batch": str(batch), "lr": str(lr)})
        tok.save(base + "_tokenizer.json")
        log(f"saved {out} ({os.path.getsize(out) / 1e6:.2f} MB) in {time.time() - t0:.0f}s")
    if world > 1:
        dist.destroy_process_group()
    return HARTPipeline(vae, model.eval(), te.eval(), tok, 0, guidance=TINY_GUIDANCE, more_smooth=TINY_MORE_SMOOTH)


def load_tiny(path=TINY_WEIGHTS, *, device="cpu", dtype=torch.float32):
    """The committed tiny default (trained by `python hart.py --train`): Qwen2 and HART, the hybrid tokenizer and
    the word-level text tokenizer beside them."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: it comes with the repository's weights/ folder, or "
                                f"`python hart.py --train --train-out {path}` makes it")
    sd, base = read_weights(path), os.path.splitext(path)[0]
    with torch.device("meta"):
        parts = {"text_encoder": Qwen2Encoder(TINY_QWEN2), "model": HART(TINY)}
    for name, module in parts.items():
        load_state_dict_strict(module, {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")},
                               path)
        module.to(device=device, dtype=dtype).eval()
    vae = load_tiny_tokenizer(base + "_tokenizer.safetensors", device=device)  # float32: its decoder is cheap
    tok = load_tokenizer(base + "_tokenizer.json")
    tok.normalizer = build_tiny_tokenizer().normalizer  # files written before it lowercased: "A" was <unk>
    return HARTPipeline(vae, parts["model"], parts["text_encoder"], tok, 0, guidance=TINY_GUIDANCE,
                        more_smooth=TINY_MORE_SMOOTH)

# ----------------------------------------------------------------------------------------------------------
# 10. CLI
# ----------------------------------------------------------------------------------------------------------
# The flags of every root file where they apply (--prompt --ckpt --guidance --seed --device --dtype --out --train
# --train-out --train-steps), then HART's own: --text-encoder, and the research options --top-k --top-p
# --more-smooth. The published model generates at 1024 px, the tiny one at 64: its scale schedule fixes the size, so
# no --height/--width. Bad input is refused in one sentence (`error: ...`, exit code 2) before anything is loaded.


# Copied from sana.py: StepProgress
class StepProgress:
    """A sampler's progress on the command line, on stderr (as tqdm's): called after step i (0-based) of `steps`, it
    updates one line in place on a terminal (step, elapsed, ETA from the pace so far), and elsewhere prints a line
    every 10 s and the last: a published model takes minutes an image on a CPU. Python callers pass no callback and
    see nothing."""

    def __init__(self, steps, label="sampling step"):
        self.steps, self.label, self.live = steps, label, sys.stderr.isatty()
        self.t0 = self.shown = time.time()

    def __call__(self, i, *_):
        now, done = time.time(), i + 1
        line = (f"{self.label} {done}/{self.steps} | {format_time(now - self.t0)} elapsed, ETA "
                f"{format_time((now - self.t0) / done * max(0, self.steps - done))}")
        if self.live:
            print("\r" + line + "\x1b[K", end="\n" if done >= self.steps else "", file=sys.stderr, flush=True)
        elif done >= self.steps or now - self.shown >= 10:
            print(line, file=sys.stderr, flush=True)
            self.shown = now


def build_parser():
    p = argparse.ArgumentParser(description="HART text-to-image (the tiny built-in model without --ckpt)",
                                epilog=f"The tiny default model (no --ckpt) draws only {TINY_GRAMMAR}.")
    p.add_argument("--prompt", help="what to draw (for the tiny default model, see below)")
    p.add_argument("--ckpt", help="the published hart-0.7b-1024px folder (llm/ and tokenizer/ inside); default: the "
                   "tiny model")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance w, ramped over the K "
                   "scales as the release does: logits (1 + t) l_c - t l_u with t = w k/(K-1) at scale k, from 0 at "
                   "the first to w (K-2)/(K-1) at the last, which the residual diffusion reuses on its epsilon; 0 = "
                   f"off (default: 4.5 for the published model, {TINY_GUIDANCE} for the tiny one)")
    p.add_argument("--seed", type=int, default=0, help="random seed (the sampler's draws; --train)")
    p.add_argument("--device", default="", help="cpu, cuda, cuda:N or mps (default: the first available of cuda, mps, cpu)")
    p.add_argument("--dtype", default="", help="float32, bfloat16 or float16 (default: the best for the "
                   "device); with --train, where the recipe has a choice: float32 or bfloat16 autocast (default: "
                   "bfloat16 where the CPU computes it natively)")
    p.add_argument("--out", default="hart.png", help="the image to write (default: %(default)s)")
    p.add_argument("--train", action="store_true", help="retrain the tiny default model from --seed (runs under torchrun too)")
    p.add_argument("--train-out", default=None, help="where --train writes the weights (default: the committed "
                   "file's name in the working folder; the committed weights in weights/ are replaced only when named "
                   "here)")
    p.add_argument("--train-steps", type=int, default=None, help="with --train: N optimisation steps in each phase of "
                   "the recipe in place of its own counts (a quick check)")
    p.add_argument("--text-encoder", help="with --ckpt: the Qwen2 folder with tokenizer.json (default: "
                   "Qwen2-VL-1.5B-Instruct beside the checkpoint folder)")
    r = p.add_argument_group("research options", "the release's sampling knobs, at its defaults unless given")
    r.add_argument("--top-k", type=int, default=None, help="keep the k most likely codes at every scale (default: "
                   "the release's 600 below scale 7, 300 after, at most the codebook size)")
    r.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling: keep the most likely codes up to "
                   "this probability mass (default: 0 = off, as the release)")
    r.add_argument("--more-smooth", action=argparse.BooleanOptionalAction, default=None, help="feed the next scale "
                   "a Gumbel-softmax mixture of codes instead of the drawn one (default: on for the published "
                   "model, as its demo; off for the tiny one)")
    return p


# Copied from sana.py: train_bf16
def train_bf16(dtype):
    """--dtype with --train: None (training_precision decides), True (bfloat16 autocast) or False (float32); one
    sentence for another type, which no tiny recipe trains in."""
    if dtype and dtype not in ("float32", "bfloat16"):
        raise ValueError(f"with --train, --dtype is float32 or bfloat16 (autocast over float32 weights), not "
                         f"{dtype[:40]!r}")
    return {"float32": False, "bfloat16": True}.get(dtype)


def check_args(args):
    """Bad input, refused in one sentence (ValueError, FileNotFoundError) before anything is loaded."""
    if not 0 <= args.seed < 2**63:  # torch takes 64-bit seeds; larger ones failed after the model had loaded
        raise ValueError(f"--seed must be between 0 and 2**63 - 1, not {args.seed}")
    if args.train:
        refuse_unused(args, ("--prompt", "--ckpt", "--guidance", "--out", "--text-encoder", "--top-k", "--top-p",
                             "--more-smooth"), "with --train, which writes --train-out")
        if args.train_steps is not None and args.train_steps < 1:
            raise ValueError("--train-steps must be at least 1")
        args.train_out = check_out_path(train_out_path(args.train_out, TINY_WEIGHTS), (".safetensors",), "--train-out")
        train_bf16(args.dtype)
        return
    resolve_dtype(args.dtype, resolve_device(args.device))  # --device and --dtype first, one sentence each
    refuse_unused(args, ("--train-out", "--train-steps"), "without --train")
    if args.prompt is None or not args.prompt.strip():
        raise ValueError('the prompt is empty: pass --prompt "two red circles on a blue background"')
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number, not {args.guidance}")
    if args.guidance is not None and not 0 <= args.guidance <= 100:  # 0 is off; beyond 100 only saturation, or NaN
        raise ValueError(f"--guidance must be between 0 and 100 (published models use about 4.5), not {args.guidance}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, not {args.top_k}")
    if not 0 <= args.top_p < 1:
        raise ValueError(f"--top-p must be in [0, 1), not {args.top_p}")
    for flag, path in (("--ckpt", args.ckpt), ("--text-encoder", args.text_encoder)):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path} does not exist")
    if args.text_encoder and not args.ckpt:
        raise ValueError("--text-encoder goes with --ckpt (the tiny model has its own)")
    if not args.ckpt:
        check_tiny_prompt(args.prompt)
    check_out_path(args.out, (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"))


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        if args.train:
            train_tiny(seed=args.seed, out=args.train_out, steps=args.train_steps or TINY_STEPS,
                       tokenizer_steps=args.train_steps, bf16=train_bf16(args.dtype))
            return
        device, dtype = pick_device_dtype(args.device, args.dtype, tiny=not args.ckpt)
        t0 = time.time()
        pipe = load_pipeline(args.ckpt, args.text_encoder, device=device, dtype=dtype) if args.ckpt \
            else load_tiny(device=device, dtype=dtype)
        print(f"loaded in {time.time() - t0:.1f}s")
        if len(pipe.tokenizer.encode(args.prompt).ids) > pipe.text_len:
            print(f"note: the prompt is longer than the {pipe.text_len} text tokens this model reads: its end was "
                  f"cut off")
        t0 = time.time()
        img = pipe.generate([args.prompt], args.guidance, torch.Generator().manual_seed(args.seed), args.more_smooth,
                            args.top_k, args.top_p, StepProgress(len(pipe.model.cfg.patch_nums), "scale"))[0]
        Image.fromarray(img.numpy()).save(args.out)
        guidance = pipe.guidance if args.guidance is None else args.guidance
        print(f"wrote {args.out}: {args.prompt.strip()[:60]!r} ({img.shape[1]}x{img.shape[0]}, "
              f"{len(pipe.model.cfg.patch_nums)} scales, guidance {guidance}, {time.time() - t0:.1f}s)")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
