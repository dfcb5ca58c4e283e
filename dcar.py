"""DC-AR: a deep-compression hybrid tokenizer (DC-HT) and hybrid masked autoregressive text-to-image generation.

Wu et al., "DC-AR: Efficient Masked Autoregressive Image Generation with Deep Compression Hybrid Tokenizer",
ICCV 2025, arXiv 2507.04947. Official code (inference only): github.com/dc-ai-projects/DC-AR. Two ideas:

  1. DC-HT (paper Sec. 3.1): a DC-AE f32 (32x per side: a 512 px image is 16x16 = 256 tokens) whose latent,
     per pixel, is L2-normalised and snapped to the nearest L2-normalised code of one 16384-code codebook; what
     the code misses, the residual normalize(z) - z_q, stays continuous. The decoder reads discrete + residual,
     which is exactly the normalised latent, and is fine-tuned to read the discrete part alone as well.
  2. Hybrid generation (Sec. 3.2): a masked transformer (MaskGIT-style, conditioned on T5 by cross-attention)
     predicts the discrete tokens in a few parallel rounds; a small diffusion MLP, conditioned per token on the
     transformer's last hidden state, then samples the residual tokens.

Inside, top to bottom (sections 1-5 are the whole method; the rest is what it uses and plumbing):
  1. Config and presets: `DCHTConfig`, `DCARConfig`; presets for the published dc-ht and dc-ar-512
  2. Modules: the hybrid quantizer, the generator's attention / MLP / block, the residual diffusion head (MAR's
     adaLN MLP) and its IDDPM schedule, respacing, learned-range posterior and hybrid loss
  3. Model: `DCAR` (the masked generator, with its 2-D sin-cos table) and `DCHT`
  4. Training (not released): MaskGIT masking, the MLM loss, caption dropout, the residual diffusion loss on
     every token; DC-HT's staged adaptation (continuous warm-up, codebook, decoder fine-tune)
  5. Sampler: the hybrid masked AR `generate`, in the official draw order
  6. Components, skip on first read: the kernel loader, the T5 encoder, the DC-AE and its helpers (copied from
     dcae.py), the shapes data (copied from dcae.py), the CLI's helpers
  7. Checkpoint loading: the dc-ht folder as published, dc-ar's pytorch_model.bin (weights_only), T5 folders,
     the official inference yaml and the folder it describes
  8. Pipeline: `DCARPipeline` (prompt -> T5 -> sampler -> DC-HT decode)
  9. Tiny default: the tiny DC-HT from the tiny DC-AE, the tiny generator, their training recipe (docs/dcar.md)
 10. CLI

Run:
  python dcar.py --prompt "two red circles on a blue background"      # the tiny default model, a 64x64 PNG
  python dcar.py --prompt "a photo of a cat" --ckpt dc-ar-512/pytorch_model.bin --tokenizer dc-ht --text-encoder t5-base
  python dcar.py --train                 # retrain the tiny DC-HT, then the tiny generator (./dcar_tiny*)
  torchrun --nproc_per_node 2 dcar.py --train --train-steps 20     # the same on 2 processes (DDP)

Shapes: B batch, C latent channels = codebook dim (32), h/w latent grid (the image / 32), N = h*w tokens in
        row-major order, V codebook size (the mask token is id V), D generator width, L text tokens (300, padded),
        M rows of the diffusion head (one per token, batch_mul times in training).

Deviations from the official code: (1) the official code needs xformers for the cross-attention; here each
image attends to its caption's valid tokens through a boolean mask (the same attention, on any device); (2) the
sampler takes an explicit generator where the release draws from torch's global one (the same numbers on the
CPU, in the same order); (3) training is not released: the MLM loss's label smoothing and unmasked-token weight
and the diffusion loss's weight are 1d-tokenizer's defaults and 1 (config fields, unverified), and DC-HT's
stages follow the paper's description with a mean-squared-error reconstruction loss only (the perceptual and
adversarial terms of DC-AE practice are left out); (4) the tiny default's DC-HT is an f8 one on 64x64 images
(section 9), and its T5 is trained with the generator.
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
from dataclasses import MISSING, asdict, dataclass, fields, replace

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
TINY_WEIGHTS = os.path.join(HERE, "weights", "dcar_tiny.safetensors")
TINY_DCHT = os.path.join(HERE, "weights", "dcar_tiny_dcht.safetensors")  # written beside it by the same run


# ----------------------------------------------------------------------------------------------------------
# 1. Config and presets
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DCHTConfig:
    codebook_size: int = 16384  # V
    codebook_dim: int = 32  # C, the DC-AE latent channels
    commit_beta: float = 0.25
    # the DC-AE f32 of DC-HT ("dc-ae-f32-in-1.0" stage table, LayerNorm2d where DC-AE has RMSNorm2d)
    widths: tuple = (128, 256, 512, 512, 1024, 1024)
    encoder_depths: tuple = (0, 4, 8, 2, 2, 2)
    decoder_depths: tuple = (0, 5, 10, 2, 2, 2)
    encoder_blocks: tuple = ("ResBlock",) * 3 + ("EViT",) * 3
    decoder_blocks: tuple = ("ResBlock",) * 3 + ("EViT",) * 3
    decoder_norms: tuple = ("bn",) * 3 + ("ln",) * 3
    decoder_acts: tuple = ("relu",) * 3 + ("silu",) * 3
    ae: object = None  # a whole DCAEConfig instead of the stage table above (the tiny DC-HT: the tiny DC-AE's)

    def dcae(self):
        if self.ae is not None:
            return self.ae
        return DCAEConfig(latent_channels=self.codebook_dim, widths=self.widths, encoder_depths=self.encoder_depths,
                          decoder_depths=self.decoder_depths, encoder_blocks=self.encoder_blocks,
                          decoder_blocks=self.decoder_blocks, decoder_norms=self.decoder_norms,
                          decoder_acts=self.decoder_acts, decoder_head_act="relu", encoder_norm="ln",
                          decoder_head_norm="ln", downsample="pixel_unshuffle", upsample="pixel_shuffle")


@dataclass
class DCARConfig:
    hidden_size: int = 1152  # D
    depth: int = 28
    num_heads: int = 16  # head dim 72
    mlp_hidden: int = 4608
    codebook_size: int = 16384  # V; the mask token is id V
    seq_len: int = 256  # N = (512 / 32)^2
    context_dim: int = 768  # T5-base width
    text_len: int = 300  # T5 tokens, always padded to this length
    token_dim: int = 32  # C of the residual tokens
    diffusion_width: int = 1024
    diffusion_depth: int = 6
    vae_scale: float = 0.107  # residual tokens = diffusion output x this


PRESETS = {"dc-ht": DCHTConfig(), "dc-ar-512": DCARConfig()}  # mit-han-lab/dc-ht, mit-han-lab/dc-ar-512


# ----------------------------------------------------------------------------------------------------------
# 2. Modules
# ----------------------------------------------------------------------------------------------------------


class HybridQuantizer(nn.Module):
    """DC-HT's quantizer: per latent pixel, the L2-normalised vector snaps to the nearest L2-normalised code;
    the discrete part is that code, the continuous residual is what it misses (in the normalised space)."""

    def __init__(self, codebook_size, dim, beta=0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(codebook_size, dim)

    def codebook(self):
        return F.normalize(self.embedding.weight, dim=-1)  # (V, C)

    def forward(self, z):
        """z: (B, C, h, w) encoder output -> z_q (B, C, h, w) (straight-through), indices (B, h, w),
        residual (B, N, C), the normalised latent (B, C, h, w) and the losses."""
        z = F.normalize(z.permute(0, 2, 3, 1), dim=-1)  # (B, h, w, C)
        codes = self.codebook()
        d = z.pow(2).sum(-1, keepdim=True) - 2 * z @ codes.T + codes.pow(2).sum(-1)  # (B, h, w, V)
        indices = d.argmin(-1)
        z_q = codes[indices]  # (B, h, w, C)
        commitment = self.beta * (z_q.detach() - z).pow(2).mean()
        codebook = (z_q - z.detach()).pow(2).mean()
        residual = (z - z_q).flatten(1, 2)  # (B, N, C), row-major
        z_q = z + (z_q - z).detach()  # straight-through
        return (z_q.permute(0, 3, 1, 2), indices, residual, z.permute(0, 3, 1, 2),
                dict(quantizer=commitment + codebook, commitment=commitment, codebook=codebook))

    def lookup(self, indices, residual=None):
        """indices (B, N) row-major over a square grid, residual (B, N, C) or None -> latent (B, C, h, w)."""
        x = self.codebook()[indices]  # (B, N, C)
        if residual is not None:
            x = x + residual
        side = int(round(indices.shape[1] ** 0.5))
        return x.unflatten(1, (side, side)).permute(0, 3, 1, 2)


class SelfAttention(nn.Module):
    """Softmax self-attention over the image tokens, q and k each through a full-width LayerNorm (affine, eps 1e-5)
    before the head split; no mask, no position encoding here (the table is added to the input)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, N, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Image tokens attend to their own caption's valid tokens only (the official xformers block-diagonal mask);
    no norm on either side."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_linear, self.kv_linear, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, y, mask):  # x (B, N, D), y (B, L, D), mask (B, L) bool
        B, N, D = x.shape
        q = self.q_linear(x).view(B, N, self.heads, -1).transpose(1, 2)  # (B, H, N, d)
        k, v = (t.view(B, -1, self.heads, D // self.heads).transpose(1, 2) for t in self.kv_linear(y).chunk(2, -1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden, out=None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Self-attention, cross-attention, MLP; no timestep, no adaLN: the mask tokens tell the model what to do."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(D, cfg.num_heads)
        self.cross_attn = CrossAttention(D, cfg.num_heads)
        self.norm2 = nn.LayerNorm(D, eps=1e-6, elementwise_affine=False)
        self.mlp = MLP(D, cfg.mlp_hidden)

    def forward(self, x, y, mask):
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(x, y, mask)
        return x + self.mlp(self.norm2(x))


class CaptionEmbedder(nn.Module):
    """T5 features -> width D; `y_embedding`, a caption of text_len random vectors (a buffer, as PixArt's: drawn
    at init, never trained), stands in for dropped captions, substituted before the projection (CFG's
    unconditional input)."""

    def __init__(self, cfg):
        super().__init__()
        self.register_buffer("y_embedding", torch.randn(cfg.text_len, cfg.context_dim) / cfg.context_dim ** 0.5)
        self.y_proj = MLP(cfg.context_dim, cfg.hidden_size, cfg.hidden_size)

    def forward(self, y, drop):  # y (B, L, context_dim), drop (B,) bool
        y = torch.where(drop[:, None, None], self.y_embedding[None, :y.shape[1]].to(y.dtype), y)
        return self.y_proj(y)


def timestep_embedding(t, dim=256, max_period=10000):
    """t (M,) original timesteps 0..999 -> (M, dim): [cos | sin] of t * 10000^(-i / (dim/2)) (cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


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


class HeadFinalLayer(nn.Module):
    def __init__(self, width, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(width, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


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


# The residual diffusion (IDDPM, as MAR uses it): a cosine schedule of 1000 steps for training, respaced to 32 for
# sampling, a learned variance interpolated between beta_t and the posterior's, and the hybrid loss (epsilon MSE +
# the variational bound with the mean frozen). Constants are float64, cast to float32 where they meet tensors.

def cosine_betas(steps=1000, max_beta=0.999):
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
                        dtype=torch.float64)


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


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) of a Gaussian discretized to 256 bins over [-1, 1] (IDDPM's decoder term)."""
    cdf = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    mid = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, mid))


# ----------------------------------------------------------------------------------------------------------
# 3. Model
# ----------------------------------------------------------------------------------------------------------


class FinalLayer(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(dim, out)

    def forward(self, x):
        return self.linear(self.norm(x))


def sincos_pos_embed(side, dim, base=16):
    """The 2-D sin-cos table (side^2, dim) of the stored `pos_embed`, row-major: the first half of the channels
    encodes the column, the second the row, each as [sin(p w_k) | cos(p w_k)], w_k = 10000^(-k / (dim / 4)), at
    positions p = index x base / side (PixArt's base_size: integers 0..15 for the published 16x16 grid)."""
    w = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    pos = torch.arange(side, dtype=torch.float64) * (base / side)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    half = lambda pos: torch.cat([torch.sin(pos.reshape(-1, 1) * w), torch.cos(pos.reshape(-1, 1) * w)], 1)  # noqa: E731
    return torch.cat([half(cols), half(rows)], dim=1).float()


class DCAR(nn.Module):
    """The masked generator: token ids (B, N), V = [MASK] -> logits over the V codes (B, N, V) and the last hidden
    states (B, N, D), which condition the residual diffusion head."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.x_embedder = nn.Embedding(cfg.codebook_size + 1, D)
        side = int(round(cfg.seq_len ** 0.5))
        self.pos_embed = nn.Parameter(sincos_pos_embed(side, D)[None], requires_grad=False)  # (1, N, D), stored
        self.y_embedder = CaptionEmbedder(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.codebook_size)  # no logit for the mask id

    def forward(self, ids, y, mask, drop=None):
        """ids (B, N); y (B, L, context_dim) T5 features; mask (B, L) 1 = a real caption token; drop (B,) bool:
        rows whose caption is replaced by the stored null caption (still cut to the real caption's length)."""
        drop = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device) if drop is None else drop
        x = self.x_embedder(ids) + self.pos_embed  # (B, N, D)
        y = self.y_embedder(y, drop)  # (B, L, D)
        for block in self.blocks:
            x = block(x, y, mask.bool())
        return self.final_layer(x), x


class DCHT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        ae = cfg.dcae()
        self.encoder, self.decoder = Encoder(ae), Decoder(ae)
        self.quantize = HybridQuantizer(cfg.codebook_size, cfg.codebook_dim, cfg.commit_beta)

    def encode(self, image):
        """image (B, 3, H, W) in [-1, 1] -> (z_q, indices, residual, normalised latent, losses)."""
        return self.quantize(self.encoder(image))

    def decode(self, latent):
        return self.decoder(latent)

    def decode_tokens(self, indices, residual=None):
        """indices (B, N), residual (B, N, C) or None (discrete only) -> image (B, 3, H, W)."""
        return self.decoder(self.quantize.lookup(indices, residual))


# ----------------------------------------------------------------------------------------------------------
# 4. Training: the masked-token and residual diffusion losses, DC-HT's stages
# ----------------------------------------------------------------------------------------------------------
# Not released: the losses are the released modules' (MaskGIT's masking and MLM loss, MAR's diffusion loss), the
# weights of the ones the release leaves open are config fields.


class Draws:
    """The random numbers of training and sampling, drawn from one generator in the official order (the release
    draws from torch's global generator; on the CPU a torch.Generator with the same seed gives the same numbers).
    Tests replace it with one that replays recorded draws."""

    def __init__(self, generator=None):
        self.g = generator

    def rand(self, *shape):  # caption dropout (in the sampler a fixed 0 / 1 test per CFG pass), the masking order
        return torch.rand(shape, generator=self.g)

    def uniform(self, *shape):  # Gumbel noise; the masking ratio's t (training)
        return torch.empty(shape).uniform_(0, 1, generator=self.g)

    def randn(self, *shape):  # diffusion noise
        return torch.randn(shape, generator=self.g)

    def randint(self, high, n):  # diffusion timesteps (training)
        return torch.randint(0, high, (n,), generator=self.g)


@dataclass
class TrainConfig:
    label_smoothing: float = 0.1  # (unverified: 1d-tokenizer's default)
    unmasked_weight: float = 0.1  # loss weight of the tokens left visible (unverified: 1d-tokenizer's default)
    cond_drop: float = 0.1  # caption dropout (the yaml's class_label_dropout): the null caption gets a meaning
    batch_mul: int = 4  # diffusion head rows per token (the yaml's diffusion.batch_mul)
    diffusion_weight: float = 1.0  # CE + this x diffusion loss (unverified: not in the release)


def mask_tokens(ids, mask_id, draws):
    """MaskGIT's masking: t ~ U(0, 1) per sample, round(N arccos(t) / (pi / 2)) tokens (at least 1) masked at
    random positions. ids (B, N) -> masked ids (B, N), masks (B, N) bool."""
    B, N = ids.shape
    ratio = (torch.acos(draws.uniform(B)) / (math.pi / 2)).clamp(1e-6, 1.0)
    count = (N * ratio).round().clamp(min=1)
    masks = draws.rand(B, N).argsort(dim=-1) < count[:, None]
    return torch.where(masks, torch.full_like(ids, mask_id), ids), masks


def mlm_loss(logits, targets, masks, label_smoothing=0.1, unmasked_weight=0.1):
    """Cross-entropy with label smoothing, weight 1 on masked tokens and `unmasked_weight` on visible ones,
    normalised by the weights' sum. logits (B, N, V), targets (B, N), masks (B, N) bool."""
    loss = F.cross_entropy(logits.transpose(1, 2), targets, label_smoothing=label_smoothing, reduction="none")
    w = masks.float() + unmasked_weight * (1 - masks.float())
    return (loss * w).sum() / (w.sum() + 1e-8)


def training_loss(model, head, ids, residual, y, mask, tc, draws):
    """One step's loss (paper Sec. 3): mask the target tokens, run the generator (captions dropped at random),
    cross-entropy on the codes, and the head's diffusion loss on every token's residual (/ vae_scale), conditioned
    on the hidden states of the masked input. ids (B, N) DC-HT codes, residual (B, N, C). -> dict of losses."""
    cfg = model.cfg
    masked, masks = mask_tokens(ids, cfg.codebook_size, draws)
    drop = draws.rand(ids.shape[0]) < tc.cond_drop
    logits, hidden = model(masked, y, mask, drop)
    ce = mlm_loss(logits, ids, masks, tc.label_smoothing, tc.unmasked_weight)
    c = hidden.reshape(-1, hidden.shape[-1]).repeat(tc.batch_mul, 1)  # (batch_mul B N, D), tiled
    x0 = (residual.reshape(-1, residual.shape[-1]) / cfg.vae_scale).repeat(tc.batch_mul, 1)
    diffusion = Diffusion(cosine_betas())
    t = draws.randint(diffusion.T, len(x0))
    diff = diffusion.training_losses(head, x0, t, c, draws.randn(*x0.shape))[0].mean()
    return dict(loss=ce + tc.diffusion_weight * diff, ce=ce, diffusion=diff, logits=logits, masked=masked,
                masks=masks)


# DC-HT's staged adaptation (paper Sec. 3.1; no tokenizer training code is released, so the stages follow the
# paper's description and the release's switches: `skip_continuous_prob` and `finetune_decoder`):
#   "continuous": the autoencoder alone, the decoder fed the normalised continuous latent (the warm-up);
#   "discrete":   the codebook learns (commitment + codebook losses), the decoder fed the quantised latent;
#   "decoder":    encoder and codebook frozen, the decoder fed the discrete-only latent or discrete + residual
#                 (= the continuous latent), each with probability 1/2, so that it decodes both inputs.
# The reconstruction loss is the mean squared error (the paper's perceptual and adversarial terms: unverified).
DCHT_STAGES = ("continuous", "discrete", "decoder")


def dcht_trainable(model, stage):
    """The parameters a stage trains (and requires_grad set accordingly)."""
    model.requires_grad_(stage != "decoder")
    if stage == "decoder":
        model.decoder.requires_grad_(True)
    if stage == "continuous":
        model.quantize.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def dcht_loss(model, images, stage, generator=None, continuous_prob=0.5):
    """One stage's loss on images (B, 3, H, W) in [-1, 1]. -> dict(loss, recon, quantizer)."""
    z_q, _, _, z, losses = model.encode(images)
    if stage == "continuous":
        latent, quantizer = z, torch.zeros(())
    elif stage == "discrete":
        latent, quantizer = z_q, losses["quantizer"]
    else:  # decoder: per sample, the discrete-only latent or the continuous one (= discrete + residual)
        cont = torch.rand(images.shape[0], generator=generator) < continuous_prob
        latent, quantizer = torch.where(cont[:, None, None, None], z, z_q).detach(), torch.zeros(())
    recon = F.mse_loss(model.decode(latent), images)
    return dict(loss=recon + quantizer, recon=recon, quantizer=quantizer)


# ----------------------------------------------------------------------------------------------------------
# 5. Sampler: hybrid masked autoregressive generation
# ----------------------------------------------------------------------------------------------------------


def gumbel(u):
    """Gumbel noise -log(-log u), both logs clamped at 1e-20 (MaskGIT's)."""
    return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))


@torch.no_grad()
def generate(model, head, y, mask, steps=12, guidance=4.5, temperature=1.5, draws=None, diffusion_steps=32,
             trace=None, callback=None):
    """Hybrid masked AR (paper Sec. 3.2; the official `generate`): `steps` MaskGIT rounds over the discrete tokens,
    then the residual tokens by the diffusion head on the last round's hidden states.
    y (B, L, context_dim) T5 features, mask (B, L). Returns ids (B, N) and residual tokens (B, N, C).

    Round s, r = (s + 1) / steps: CFG on the logits (l_c + g (l_c - l_u), the unconditional half with the learned
    null caption), divided by the softmax temperature 0.5 + 0.8 (1 - r); candidates argmax(l + tau G), tau =
    temperature (1 - r); confidence = the candidate's logit + tau G' (a second draw); then the least confident
    floor(N arccos(r) / (pi / 2)) positions (counted on the first sample, at least 1, fewer than still masked)
    are masked again, except in the last round. callback(step, ids) runs after each round."""
    draws = draws or Draws()
    cfg = model.cfg
    B, N, V = y.shape[0], cfg.seq_len, cfg.codebook_size
    ids = torch.full((B, N), V, dtype=torch.long, device=y.device)
    y2, mask2 = torch.cat([y, y]), torch.cat([mask, mask])
    drop = torch.arange(2 * B, device=y.device) >= B
    for step in range(steps):
        r = (step + 1) / steps
        tau = temperature * (1 - r)
        draws.rand(2 * B)
        logits, hidden = model(torch.cat([ids, ids]), y2, mask2, drop)  # (2B, N, V), (2B, N, D)
        if trace is not None:
            trace(step, torch.cat([ids, ids]), logits)
        l_c, l_u = logits.chunk(2)
        logits = (l_c + guidance * (l_c - l_u)) / (0.5 + 0.8 * (1 - r))
        is_mask = ids == V
        sampled = (logits + tau * gumbel(draws.uniform(B, N, V).to(y.device))).argmax(-1)
        score = logits.gather(-1, sampled[..., None])[..., 0]
        sampled = torch.where(is_mask, sampled, ids)
        score = torch.where(is_mask, score, torch.full_like(score, float("inf")))
        confidence = score + tau * gumbel(draws.uniform(B, N).to(y.device))
        if step == steps - 1:
            ids = sampled
        else:
            mask_len = math.floor(N * math.acos(r) / (math.pi / 2))
            mask_len = max(1, min(int(is_mask[0].sum()) - 1, mask_len))
            cut = confidence.sort(dim=-1).values[:, mask_len - 1:mask_len]
            ids = torch.where(confidence <= cut, torch.full_like(sampled, V), sampled)
        if callback:
            callback(step, ids)
    # the residual tokens: ancestral sampling of the head on the last round's hidden states, CFG on epsilon
    betas, timestep_map = respace(cosine_betas(), diffusion_steps)
    diffusion = Diffusion(betas, timestep_map)
    c = hidden.reshape(2 * B * N, -1)
    x = draws.randn(B * N, cfg.token_dim).to(y.device)
    x = torch.cat([x, x])
    for i in reversed(range(diffusion_steps)):
        t = torch.full((2 * B * N,), i, dtype=torch.long, device=y.device)
        out = head.forward_with_cfg(x[:B * N], timestep_map[t], c, guidance)
        mean, _, log_var, _ = diffusion.p_mean_variance(out, x, t)
        noise = draws.randn(2 * B * N, cfg.token_dim).to(y.device)
        x = mean + (i > 0) * torch.exp(0.5 * log_var) * noise
    return ids, (x[:B * N] * cfg.vae_scale).view(B, N, -1)


# ----------------------------------------------------------------------------------------------------------
# 6. Components: skip on first read
# ----------------------------------------------------------------------------------------------------------
# The kernel loader, T5's encoder, the DC-AE of dcae.py with its loading and device helpers, the shapes data of
# the tiny default, and the CLI's helpers: all but T5 copied from dcae.py and sana.py.


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


@dataclass
class T5Config:  # defaults: google-t5/t5-base's encoder
    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6


class T5LayerNorm(nn.Module):
    """RMS norm without mean and bias, the variance in fp32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


def t5_buckets(q_len, k_len, num_buckets, max_distance):
    """T5's bidirectional relative-position buckets (q_len, k_len): half the buckets for each sign; exact up to
    num_buckets / 4, logarithmic beyond, up to max_distance."""
    rel = torch.arange(k_len)[None, :] - torch.arange(q_len)[:, None]
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    n = rel.abs()
    exact = half // 2
    large = exact + (torch.log(n.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return bucket + torch.where(n < exact, n, large.clamp(max=half - 1))


class T5Attention(nn.Module):
    def __init__(self, cfg, relative_bias):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.cfg = cfg.num_heads, cfg
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads) if relative_bias else None

    def position_bias(self, n):
        buckets = t5_buckets(n, n, self.cfg.num_buckets, self.cfg.max_distance).to(self.o.weight.device)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, H, n, n)

    def forward(self, x, bias):  # x (B, n, d_model); no 1/sqrt(d) scale: T5 folds it into its init
        B, n, _ = x.shape
        q, k, v = (f(x).view(B, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = (q @ k.transpose(-1, -2) + bias).float().softmax(-1).to(v.dtype)
        return self.o((scores @ v).transpose(1, 2).reshape(B, n, -1))


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, cfg, relative_bias):
        super().__init__()
        self.SelfAttention, self.layer_norm = T5Attention(cfg, relative_bias), T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseReluDense(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wi, self.wo = nn.Linear(cfg.d_model, cfg.d_ff, bias=False), nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.wo(F.relu(self.wi(x)))


class T5FeedForwardLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.DenseReluDense, self.layer_norm = T5DenseReluDense(cfg), T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):  # the checkpoint's names: layer.0 = self-attention, layer.1 = feed-forward
    def __init__(self, cfg, relative_bias):
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(cfg, relative_bias), T5FeedForwardLayer(cfg)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Encoder(nn.Module):
    """T5's encoder; the first block's relative-position bias serves every block. DC-AR runs it on the full padded
    length without an attention mask (pad tokens are attended to), and so does this class."""

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.block = nn.ModuleList(T5Block(cfg, relative_bias=i == 0) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, ids):  # (B, L) -> (B, L, d_model)
        x = self.embed_tokens(ids)
        bias = self.block[0].layer[0].SelfAttention.position_bias(ids.shape[1])
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


def tokenize_t5(tok, prompts, length):
    """prompts -> ids (B, length): the tokenizer's ids (with its </s>), cut to `length`, padded with 0 (pad)."""
    out = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = tok.encode(p).ids[:length]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


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


# Copied from dcae.py: Encoder
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


# Copied from dcae.py: Decoder
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


# Copied from dcae.py: _RENAMES
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


# Copied from dcae.py: convert_original_state_dict
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


# Copied from dcae.py: check_config
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


# Copied from dcae.py: DCAE
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


_STAGE_TABLES = {"dc-ae-f32-in-1.0", "dc-ae-f32-mix-1.0"}  # both select DCHTConfig's default stage table
_BLOCKS = {"ResBlock": "ResBlock", "EViT_GLU": "EViT"}
_NORMS = {"bn2d": "bn", "ln2d": "ln"}


def dcht_config_from_json(c):
    """DC-HT's config.json (transformers, model_type dc_ht) -> DCHTConfig. Accepts the fixtures' extra key
    `tiny_dc_ae_arch`, which replaces the stage table."""
    if c.get("quantizer_type") != "hybrid_vq" or not c.get("codebook_l2_norm", False):
        raise ValueError("not a DC-HT config: DC-HT's quantizer is hybrid_vq with an L2-normalised codebook")
    cfg = DCHTConfig(codebook_size=c["codebook_size"], codebook_dim=c["codebook_embed_dim"],
                     commit_beta=c.get("commit_loss_beta", 0.25))
    arch = c.get("tiny_dc_ae_arch")
    if arch is None:
        if c.get("model_name") not in _STAGE_TABLES:
            raise ValueError(f"DC-HT model_name {c.get('model_name')!r} is not one of {sorted(_STAGE_TABLES)}")
        return cfg
    if arch["encoder_width_list"] != arch["decoder_width_list"]:
        raise ValueError("DC-HT's encoder and decoder widths differ")
    return replace(cfg, widths=tuple(arch["encoder_width_list"]), encoder_depths=tuple(arch["encoder_depth_list"]),
                   decoder_depths=tuple(arch["decoder_depth_list"]),
                   encoder_blocks=tuple(_BLOCKS[b] for b in arch["encoder_block_type"]),
                   decoder_blocks=tuple(_BLOCKS[b] for b in arch["decoder_block_type"]),
                   decoder_norms=tuple(_NORMS[n] for n in arch["decoder_norm"]),
                   decoder_acts=tuple(arch["decoder_act"]))


def load_dcht(folder, *, device="cpu", dtype=torch.float32):
    """The published dc-ht folder (config.json + model.safetensors or pytorch_model.bin), strictly."""
    path = os.path.join(folder, "config.json")
    try:
        cfg = check_config(dcht_config_from_json(read_json(path)), path)
    except (KeyError, TypeError, AttributeError) as e:  # a field missing, or of a kind no config holds
        raise ValueError(f"{path} is not a complete DC-HT config ({type(e).__name__}: {str(e)[:80]})") from None
    names = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(folder, n))]
    if not names:
        raise FileNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin")
    sd = read_weights(os.path.join(folder, names[0]))
    sd = convert_original_state_dict(sd)
    with torch.device("meta"):
        model = DCHT(cfg)
    load_state_dict_strict(model, sd, os.path.join(folder, names[0]))
    return model.to(device=device, dtype=dtype).eval()


def t5_config_from_json(c):
    if c.get("is_gated_act") or c.get("feed_forward_proj", "relu") != "relu":
        raise ValueError("this T5 has a gated feed-forward (T5 v1.1 / flan); DC-AR's text encoder is t5-base's relu one")
    return T5Config(vocab_size=c["vocab_size"], d_model=c["d_model"], d_kv=c["d_kv"], d_ff=c["d_ff"],
                    num_layers=c["num_layers"], num_heads=c["num_heads"],
                    num_buckets=c["relative_attention_num_buckets"],
                    max_distance=c.get("relative_attention_max_distance", 128), eps=c.get("layer_norm_epsilon", 1e-6))


def load_t5_encoder(folder, *, device="cpu", dtype=torch.float32):
    """A T5 folder as published (config.json + model.safetensors; a full T5Model or an encoder alone): its encoder,
    strictly (the decoder's weights, if any, are not read)."""
    c = read_json(os.path.join(folder, "config.json"))
    if c.get("model_type", "t5") != "t5" or "d_model" not in c:  # e.g. a Qwen2 or Gemma folder
        raise ValueError(f"{os.path.join(folder, 'config.json')} describes a {c.get('model_type')!r} model, not a T5: "
                         f"DC-AR's text encoder is t5-base")
    try:
        cfg = check_config(t5_config_from_json(c), os.path.join(folder, "config.json"))
    except (KeyError, TypeError, AttributeError) as e:  # a field missing, or of a kind no config holds
        raise ValueError(f"{os.path.join(folder, 'config.json')} is not a complete T5 config ({type(e).__name__}: "
                         f"{str(e)[:80]})") from None
    sd = read_weights(os.path.join(folder, "model.safetensors"))
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.") and "embed_tokens" not in k}
    enc["embed_tokens.weight"] = sd.get("encoder.embed_tokens.weight", sd.get("shared.weight"))
    with torch.device("meta"):
        model = T5Encoder(cfg)
    load_state_dict_strict(model, enc, os.path.join(folder, "model.safetensors"))
    return model.to(device=device, dtype=dtype).eval()


def load_generator(path, cfg, *, device="cpu", dtype=torch.float32):
    """The dc-ar pytorch_model.bin (a plain state dict, read with weights_only=True) without its diffusion head
    (diffloss.*; see load_diffusion_head)."""
    sd = read_weights(path)
    with torch.device("meta"):
        model = DCAR(cfg)
    load_state_dict_strict(model, {k: v for k, v in sd.items() if not k.startswith("diffloss.")}, path)
    return model.to(device=device, dtype=dtype).eval()


def load_diffusion_head(path, cfg, *, device="cpu", dtype=torch.float32):
    """The residual diffusion head of the same file (its diffloss.net.* tensors)."""
    sd = read_weights(path)
    with torch.device("meta"):
        head = DiffusionHead(cfg)
    p = "diffloss.net."
    load_state_dict_strict(head, {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}, path)
    return head.to(device=device, dtype=dtype).eval()


def parse_yaml(path):
    """The nested `key: value` mappings of the official configs (they hold no lists, anchors or multi-line
    values), as dicts; values become bools, ints, floats or strings (quoted ones stay strings)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    root = {}
    stack = [(-1, root)]  # (indent, mapping) of the keys above this line
    for number, line in enumerate(open(path, encoding="utf-8"), 1):
        text = line.split(" #")[0].rstrip()
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        indent = len(text) - len(text.lstrip())
        key, colon, value = text.strip().partition(":")
        if not colon:
            raise ValueError(f"{path}:{number} is not a `key: value` line")
        while stack[-1][0] >= indent:
            stack.pop()
        value = value.strip()
        if not value:
            stack[-1][1][key] = {}
            stack.append((indent, stack[-1][1][key]))
        elif value[0] in "'\"":
            stack[-1][1][key] = value.strip("'\"")
        else:
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    pass
            stack[-1][1][key] = {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value
    return root


def dcar_config_from_yaml(c):
    """The official inference yaml (configs/inference/dc_ar_t2i_512.yaml's schema) -> DCARConfig and the sampler's
    settings (steps, guidance, temperature, diffusion steps)."""
    try:
        m = c["model"]
        gen, vq, diff = m["generator"], m["vq_model"], m["generator"]["diffusion"]
        cfg = DCARConfig(hidden_size=gen["hidden_size"], depth=gen["num_hidden_layers"],
                         num_heads=gen["num_attention_heads"], mlp_hidden=gen["intermediate_size"],
                         codebook_size=vq["codebook_size"], seq_len=gen["image_seq_len"],
                         context_dim=m["context_dim"], text_len=m["text_token_length"], token_dim=vq["token_size"],
                         diffusion_width=diff["width"], diffusion_depth=diff["depth"], vae_scale=diff["vae_scale"])
        sampler = dict(steps=gen["num_steps"], guidance=gen["guidance_scale"],
                       temperature=gen["randomize_temperature"], diffusion_steps=int(diff["num_sampling_steps"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"the config has no {e} where DC-AR's inference yaml has it") from None
    if gen.get("guidance_decay", "constant") != "constant":
        raise ValueError(f"guidance_decay {gen['guidance_decay']!r}: only the published 'constant' is implemented")
    return cfg, sampler


def load_pipeline(ckpt, tokenizer=None, text_encoder=None, *, device="cpu", dtype=torch.float32):
    """A DC-AR generator with its DC-HT and T5, from
      - the published dc-ar-512 `pytorch_model.bin` (or its folder): the `dc-ar-512` preset and the release's
        sampler settings; the dc-ht and t5-base folders are `tokenizer` and `text_encoder`, by default the folders
        `dc-ht` and `t5-base` beside the file;
      - or a folder with the official inference `config.yaml`, which gives the config and sampler settings and names
        the three checkpoints (experiment.tokenizer_checkpoint, experiment.generator_checkpoint, model.text_model)
        as paths relative to the folder (the fixtures' layout); `tokenizer` / `text_encoder` override its paths."""
    yaml_path = os.path.join(ckpt, "config.yaml")
    if os.path.isfile(yaml_path):
        c = parse_yaml(yaml_path)
        cfg, sampler = dcar_config_from_yaml(c)
        check_config(cfg, yaml_path)
        try:
            paths = [os.path.join(ckpt, p) for p in (c["experiment"]["generator_checkpoint"],
                                                     c["experiment"]["tokenizer_checkpoint"], c["model"]["text_model"])]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{yaml_path} has no {e} where DC-AR's inference yaml has it") from None
        named = f" (named in {yaml_path})"
    else:
        weights = os.path.join(ckpt, "pytorch_model.bin") if os.path.isdir(ckpt) else ckpt
        if os.path.isdir(ckpt) and not os.path.isfile(weights):
            raise FileNotFoundError(f"{ckpt} has neither config.yaml nor pytorch_model.bin: give the dc-ar-512 "
                                    f"pytorch_model.bin or a folder with the official inference config.yaml")
        here = os.path.dirname(os.path.abspath(weights))
        cfg, sampler = PRESETS["dc-ar-512"], dict(steps=12, guidance=4.5, temperature=1.5, diffusion_steps=32)
        paths, named = [weights, os.path.join(here, "dc-ht"), os.path.join(here, "t5-base")], " (give --tokenizer " \
            "and --text-encoder where the dc-ht and t5-base folders are not beside the generator)"
    paths[1], paths[2] = tokenizer or paths[1], text_encoder or paths[2]
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found{named}")
    return DCARPipeline(load_dcht(paths[1], device=device, dtype=dtype),
                        load_t5_encoder(paths[2], device=device, dtype=dtype),
                        load_tokenizer(os.path.join(paths[2], "tokenizer.json")),
                        load_generator(paths[0], cfg, device=device, dtype=dtype),
                        load_diffusion_head(paths[0], cfg, device=device, dtype=dtype), cfg.text_len, **sampler)


# ----------------------------------------------------------------------------------------------------------
# 8. Pipeline
# ----------------------------------------------------------------------------------------------------------


class DCARPipeline:
    """Prompts -> images: T5 features of the padded prompt (no attention mask), hybrid masked AR generation, the
    DC-HT decode of discrete + residual tokens, mapped from mean 0.5 / std 0.5 to [0, 1] and clamped."""

    def __init__(self, dcht, text_encoder, tokenizer, model, head, text_len, steps=12, guidance=4.5,
                 temperature=1.5, diffusion_steps=32):
        self.dcht, self.text_encoder, self.tokenizer, self.model, self.head = dcht, text_encoder, tokenizer, model, head
        self.text_len, self.steps, self.guidance = text_len, steps, guidance
        self.temperature, self.diffusion_steps = temperature, diffusion_steps

    @torch.no_grad()
    def generate(self, prompts, steps=None, guidance=None, generator=None, draws=None, callback=None):
        """-> uint8 images (B, H, W, 3) on the CPU; `generator` (a CPU torch.Generator) draws every random number
        (or `draws`, a Draws, hands them over); callback(step, ids) after each round."""
        device = self.model.pos_embed.device
        text = tokenize_t5(self.tokenizer, prompts, self.text_len).to(device)
        y = self.text_encoder(text)
        ids, residual = generate(self.model, self.head, y, (text != 0).long(), steps or self.steps,
                                 self.guidance if guidance is None else guidance, self.temperature,
                                 draws or Draws(generator), self.diffusion_steps, callback=callback)
        x = self.dcht.decode_tokens(ids, residual.to(y.dtype))
        if not torch.isfinite(x).all():  # it would be written as black
            raise ValueError("the image came out NaN or inf: broken weights, or a guidance scale too large for the "
                             "dtype")
        return ((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


# ----------------------------------------------------------------------------------------------------------
# 9. Tiny default
# ----------------------------------------------------------------------------------------------------------
# The tiny DC-AR, trained on the synthetic shapes of dcae.py by `python dcar.py --train` (within 10 minutes on 2
# CPU cores, reproducible from the seed; the recipe and its results: docs/dcar.md), in two parts:
#   1. the tiny DC-HT, built as the paper builds DC-HT: from a trained DC-AE (the committed tiny one, f8c4 on
#      64x64 images), a 64-code codebook started on encoded latents, then the three stages
#                                                            -> weights/dcar_tiny_dcht.safetensors
#   2. on its 8x8 = 64 tokens, the generator, a 2-layer T5 trained with it, and the residual head
#                                                            -> weights/dcar_tiny.safetensors (+ _tokenizer.json)


TINY_DCHT_STAGES = (("continuous", 100), ("discrete", 250), ("decoder", 400))  # steps of batch 16 per stage
TINY_STEPS = 1200  # the generator's, batch 32
TINY_REFERENCE = "a 2-core Xeon with AMX, in bfloat16"  # where TINY_STEP_SECONDS were measured
# a step of each phase there, in seconds: measured by scripts/time_tiny_recipes.py
TINY_STEP_SECONDS = {"continuous": 0.273, "discrete": 0.311, "decoder": 0.218, "tokenize": 20.5,
                     "generator": 0.172}
TINY_SAMPLE_STEPS = 8  # masked AR rounds for 64 tokens (chosen on the choice set: docs/dcar.md)
TINY_GUIDANCE = 2.0  # g of l_c + g (l_c - l_u), chosen on the choice set (docs/dcar.md)
TINY_TEXT_LEN = 10  # the longest caption, "three yellow triangles on a green background", is 7 words + </s>
TINY_T5 = T5Config(vocab_size=32, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, num_buckets=8,
                   max_distance=16)
TINY_CODEBOOK = 64
TINY = DCARConfig(hidden_size=160, depth=4, num_heads=4, mlp_hidden=640, codebook_size=TINY_CODEBOOK, seq_len=64,
                  context_dim=64, text_len=TINY_TEXT_LEN, token_dim=4, diffusion_width=128, diffusion_depth=2,
                  vae_scale=0.3)  # |residual| <= 0.3 on 99% of the tiny DC-HT's residual values (std 0.08)
TINY_TRAIN = TrainConfig(batch_mul=2)  # the release's losses; 2 head rows per token instead of 4 (time)
TINY_WORDS = sorted(set(COUNT_WORDS) | set(SHAPE_COLORS) | set(SHAPES) | {s + "s" for s in SHAPES}
                    | {"on", "background"})  # the captions' vocabulary
TINY_GRAMMAR = (f'prompts of the form "a/two/three <colour> <shape>[s] on a <colour> background" with the colours '
                f'{", ".join(COLORS)} and the shapes {", ".join(SHAPES)}, e.g. "two red circles on a blue background"')



def build_tiny_tokenizer():
    """Word-level tokenizer over the captions' vocabulary, with T5's special ids (pad 0, </s> 1 appended, unk 2)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(TINY_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()  # the vocabulary is lower case: "A Red Circle" is the same caption
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


class StageLoss(nn.Module):
    """One DC-HT stage's loss as a module (DistributedDataParallel sees one call per step)."""

    def __init__(self, model, stage):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, images, generator):
        return dcht_loss(self.model, images, self.stage, generator)


def init_tiny_dcht(seed, codebook_size):
    """DC-HT as the paper builds it: a trained DC-AE (the committed tiny one) and a codebook whose codes start on
    L2-normalised encoded latents, so that none is dead at the start. -> (model, its DCHTConfig)."""
    ae = load_tiny_dcae()
    cfg = DCHTConfig(codebook_size=codebook_size, codebook_dim=ae.cfg.latent_channels, ae=ae.cfg)
    model = DCHT(cfg)
    model.encoder.load_state_dict(ae.encoder.state_dict())
    model.decoder.load_state_dict(ae.decoder.state_dict())
    with torch.no_grad():
        x, _ = shapes_batch(256, seed=seed + 99)
        z = F.normalize(model.encoder(x).permute(0, 2, 3, 1).reshape(-1, ae.cfg.latent_channels), dim=-1)
        model.quantize.embedding.weight.copy_(z[torch.randperm(len(z))[:codebook_size]])
    return model, cfg


@torch.no_grad()
def round_to_fp16(module):
    """Round the float weights to fp16 in place: the model a training run returns is then the one its file holds."""
    for t in module.state_dict().values():
        if t.is_floating_point():
            t.copy_(t.half())


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


def train_tiny_dcht(seed, out, progress, *, steps=None, stages=TINY_DCHT_STAGES, batch=16, lr=5e-4,
                    codebook_size=TINY_CODEBOOK, rank=0, world=1):
    """The tiny DC-HT from the committed tiny DC-AE, in float32: DC-HT's three stages (section 4), each with its own
    AdamW (`steps`: every stage runs that many steps in place of its count, a quick check). Rank 0 writes the weights
    with their config in the metadata; returns the model. `progress` (TrainProgress) shows stage S as phase
    "tokenizer S"."""
    torch.manual_seed(seed)
    model, cfg = init_tiny_dcht(seed, codebook_size)
    model.train()
    g = torch.Generator().manual_seed(seed * world + rank)
    for s, (stage, n) in enumerate(stages):
        n = steps or n
        net = StageLoss(model, stage)
        opt = torch.optim.AdamW(dcht_trainable(model, stage), lr=lr, weight_decay=0.0)
        if world > 1:  # a new wrapper per stage: each stage trains other parameters
            net = nn.parallel.DistributedDataParallel(net)
        progress.phase(f"tokenizer {stage}")
        for i in range(n):
            x, _ = shapes_batch(batch, seed=(seed * 1_000_003 + s * 100_003 + i) * world + rank)
            loss = net(x, g)
            opt.zero_grad(set_to_none=True)
            loss["loss"].backward()
            opt.step()
            progress.step(i, recon=loss["recon"].item(), quantizer=loss["quantizer"].item())
    model.eval().requires_grad_(False)
    round_to_fp16(model)  # what load_tiny_dcht reads
    if rank == 0:
        meta = {"config": json.dumps({**asdict(replace(cfg, ae=None)), "ae": asdict(cfg.ae)}), "seed": str(seed)}
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_weights({k: (v.half() if v.is_floating_point() else v).contiguous()
                      for k, v in model.state_dict().items()}, out, metadata=meta)
        progress.log(f"saved {out} ({os.path.getsize(out) / 1e6:.2f} MB)")
    return model


def load_tiny_dcht(path=TINY_DCHT, *, device="cpu", dtype=torch.float32):
    """The committed tiny DC-HT (its config from the file's metadata)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: it comes with the repository's weights/ folder, or "
                                "`python dcar.py --train` writes it beside its --train-out")
    try:
        meta = json.loads(read_metadata(path)["config"])
        ae = DCAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.pop("ae").items()})
        cfg = DCHTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()}, ae=ae)
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a tiny DC-HT written by `python dcar.py --train` (its metadata has no "
                         f"DC-HT config)") from None
    with torch.device("meta"):
        model = DCHT(cfg)
    load_state_dict_strict(model, read_weights(path), path)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def shapes_tokens(dcht, n, seed, chunk=256):
    """n shapes images tokenized once by the frozen DC-HT: ids (n, N), residual tokens (n, N, C), captions."""
    ids, res, caps = [], [], []
    for i in range(0, n, chunk):
        x, c = shapes_batch(min(chunk, n - i), seed=seed * 1_000_003 + i)
        _, indices, residual, _, _ = dcht.encode(x)
        ids.append(indices.flatten(1))
        res.append(residual)
        caps += c
    return torch.cat(ids), torch.cat(res), caps


def initialize_weights(model, head):
    """From scratch: Xavier-uniform linears with zero biases, N(0, 0.02) token embeddings (MaskGIT / MAR's); the
    head's adaLN modulations and output zeroed (MAR's: each residual block starts as the identity, the head
    predicts epsilon = 0)."""
    for m in list(model.modules()) + list(head.modules()):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(model.x_embedder.weight, std=0.02)
    for block in head.res_blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for lin in (head.final_layer.adaLN_modulation[-1], head.final_layer.linear):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
    return model, head


class JointLoss(nn.Module):
    """The tiny T5, the generator and the head trained together, as one module whose forward returns the loss:
    DistributedDataParallel then sees one call per step."""

    def __init__(self, text_encoder, model, head):
        super().__init__()
        self.text_encoder, self.model, self.head = text_encoder, model, head

    def forward(self, ids, residual, text_ids, tc, draws):
        y = self.text_encoder(text_ids)  # no attention mask, as the release runs T5
        return training_loss(self.model, self.head, ids, residual, y, (text_ids != 0).long(), tc, draws)["loss"]



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


def tiny_token_data(dcht, n_images, seed, progress):
    """The generator's training set: n_images shapes images tokenized once by the frozen DC-HT, and their captions
    by the word-level tokenizer. -> ids (n, N), residual tokens (n, N, C), text ids (n, L), the tokenizer."""
    progress.phase("tokenize")
    ids, residual, caps = shapes_tokens(dcht, n_images, seed)
    tok = build_tiny_tokenizer()
    text_ids = tokenize_t5(tok, caps, TINY_TEXT_LEN)
    progress.step(0, images=n_images, tokens=ids.shape[1], **{"residual std": residual.std().item(), "beyond vae_scale":
                  f"{(residual.abs() > TINY.vae_scale).float().mean():.2%}"})
    return ids, residual, text_ids, tok


def tiny_lr(step, steps, lr, warmup=100):
    """Linear warmup over `warmup` steps, then cosine decay to 10%."""
    return lr * min(1, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / steps))


def train_generator(joint, net, data, g, progress, *, steps, batch, lr, ema_decay, bf16):
    """The joint loop over the tokenized data (ids, residual, text ids): `net` (JointLoss, DDP-wrapped or not) on
    random batches drawn from `g`, AdamW with gradient clipping at 1, an EMA of the weights; at the end the EMA,
    rounded to fp16, replaces the weights (what gets saved)."""
    ids, residual, text_ids = data
    params = [p for p in joint.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    draws = Draws(g)  # batches, masks and noise: one stream per rank
    progress.phase("generator")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = tiny_lr(step, steps, lr)
        idx = torch.randint(len(ids), (batch,), generator=g)
        # fp32 master weights; PyTorch's math attention: on the CPU its flash kernel's backward is slower for these
        # short sequences
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), sdpa_kernel(SDPBackend.MATH):
            loss = net(ids[idx], residual[idx], text_ids[idx], TINY_TRAIN, draws)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - min(ema_decay, (step + 1) / (step + 10)))
        progress.step(step, loss=loss.item())
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e.half())


def save_tiny(parts, tok, out, meta, log, t0):
    """The tiny T5, generator and head in one fp16 file (keys prefixed by part), the tokenizer beside it."""
    sd = {f"{name}.{k}": v.half() for name, m in parts.items() for k, v in m.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_weights(sd, out, metadata=meta)
    tok.save(os.path.splitext(out)[0] + "_tokenizer.json")
    log(f"saved {out} ({os.path.getsize(out) / 1e6:.2f} MB) in {time.time() - t0:.0f}s")


def train_tiny(seed=0, out=TINY_WEIGHTS, log=print, *, steps=TINY_STEPS, dcht_steps=None, batch=32, lr=1e-3,
               n_images=8192, ema_decay=0.995, bf16=None):
    """The whole tiny DC-AR from the seed: the tiny DC-HT (train_tiny_dcht, `dcht_steps` steps per stage when given,
    written beside `out` as *_dcht.safetensors), then the tiny T5, generator and head trained jointly on its tokens
    of shapes images, deterministically on 2 threads, in bf16 autocast where the CPU computes bf16 natively, float32
    elsewhere (`bf16` forces either). Under torchrun each rank draws its own batches and rank 0 writes the weights,
    and the tokenizer beside them. Returns the pipeline, with the weights as saved, on every rank."""
    rank, world = ddp_setup()
    torch.set_num_threads(max(1, 2 // world))  # more threads than cores stall OpenMP
    torch.use_deterministic_algorithms(True)
    log = log if rank == 0 else (lambda *a: None)
    bf16, why = training_precision(bf16)
    log(cpu_summary(max(1, 2 // world), world))
    log(f"precision: the tokenizer in float32, the generator in {'bfloat16 autocast' if bf16 else 'float32'}: {why}")
    progress = TrainProgress([(f"tokenizer {stage}", dcht_steps or n, TINY_STEP_SECONDS[stage])
                              for stage, n in TINY_DCHT_STAGES] +
                             [("tokenize", 1, TINY_STEP_SECONDS["tokenize"] * n_images / 8192),
                              ("generator", steps, TINY_STEP_SECONDS["generator"] * batch / 32)], TINY_REFERENCE, log)
    t0 = time.time()
    dcht = train_tiny_dcht(seed, os.path.splitext(out)[0] + "_dcht.safetensors", progress, steps=dcht_steps,
                           rank=rank, world=world)
    torch.manual_seed(seed)
    ids, residual, text_ids, tok = tiny_token_data(dcht, n_images, seed, progress)
    te, model, head = T5Encoder(TINY_T5), DCAR(TINY), DiffusionHead(TINY)
    initialize_weights(model, head)
    joint = net = JointLoss(te, model, head)
    if world > 1:  # averages the gradients
        net = nn.parallel.DistributedDataParallel(joint)
    g = torch.Generator().manual_seed(seed * world + rank)
    train_generator(joint, net, (ids, residual, text_ids), g, progress, steps=steps, batch=batch, lr=lr,
                    ema_decay=ema_decay, bf16=bf16)
    if rank == 0:
        save_tiny({"text_encoder": te, "generator": model, "head": head}, tok, out,
                  {"seed": str(seed), "steps": str(steps), "batch": str(batch), "lr": str(lr)}, log, t0)
    if world > 1:
        dist.destroy_process_group()
    return DCARPipeline(dcht, te.eval(), tok, model.eval(), head.eval(), TINY_TEXT_LEN, steps=TINY_SAMPLE_STEPS,
                        guidance=TINY_GUIDANCE)


def load_tiny(path=TINY_WEIGHTS, *, device="cpu", dtype=torch.float32):
    """The committed tiny default (trained by `python dcar.py --train`): T5, generator, head, the word-level
    tokenizer beside the weights, and the tiny DC-HT."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: it comes with the repository's weights/ folder, or "
                                f"`python dcar.py --train --train-out {path}` makes it")
    sd = read_weights(path)
    with torch.device("meta"):
        parts = {"text_encoder": T5Encoder(TINY_T5), "generator": DCAR(TINY), "head": DiffusionHead(TINY)}
    for name, module in parts.items():
        load_state_dict_strict(module, {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")},
                               path)
        module.to(device=device, dtype=dtype).eval()
    tok = load_tokenizer(os.path.splitext(path)[0] + "_tokenizer.json")
    tok.normalizer = build_tiny_tokenizer().normalizer  # files written before it lowercased: "A" was <unk>
    dcht = load_tiny_dcht(os.path.splitext(path)[0] + "_dcht.safetensors", device=device, dtype=dtype)
    return DCARPipeline(dcht, parts["text_encoder"], tok, parts["generator"],
                        parts["head"], TINY_TEXT_LEN, steps=TINY_SAMPLE_STEPS, guidance=TINY_GUIDANCE)


# ----------------------------------------------------------------------------------------------------------
# 10. CLI
# ----------------------------------------------------------------------------------------------------------
# The flags of every root file where they apply (--prompt --ckpt --steps --guidance --seed --device --dtype --out
# --train --train-out --train-steps), then its own. DC-AR generates at its one training resolution: no
# --height/--width. Bad input is refused in one sentence (`error: ...`, exit code 2) before anything is loaded.


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


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
    p = argparse.ArgumentParser(description="DC-AR text-to-image (the tiny built-in model without --ckpt)",
                                epilog=f"The tiny default model (no --ckpt) draws only {TINY_GRAMMAR}.")
    p.add_argument("--prompt", help="what to draw (for the tiny default model, see below)")
    p.add_argument("--ckpt", help="the published dc-ar-512 pytorch_model.bin, or a folder with the official "
                   "inference config.yaml and the checkpoints it names; default: the tiny model")
    p.add_argument("--steps", type=int, default=None, help="masked AR rounds (default: the model's, 12 for the "
                   f"published one, {TINY_SAMPLE_STEPS} for the tiny one)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale g, as the official code's: logits "
                   "l = l_c + g (l_c - l_u), the residual head's eps = eps_c + g (eps_c - eps_u); 0 = off (default: "
                   f"the model's: 4.5 for the published one, {TINY_GUIDANCE} for the tiny one)")
    p.add_argument("--seed", type=int, default=0, help="random seed (the sampler's draws; --train)")
    p.add_argument("--device", default="", help="cpu, cuda, cuda:N or mps (default: the first available of cuda, mps, cpu)")
    p.add_argument("--dtype", default="", help="float32, bfloat16 or float16 (default: the best for the "
                   "device); with --train, where the recipe has a choice: float32 or bfloat16 autocast (default: "
                   "bfloat16 where the CPU computes it natively)")
    p.add_argument("--out", default="dcar.png", help="the image to write (default: %(default)s)")
    p.add_argument("--train", action="store_true", help="retrain the tiny default model from --seed (runs under torchrun too)")
    p.add_argument("--train-out", default=None, help="where --train writes the weights (default: the committed "
                   "file's name in the working folder; the committed weights in weights/ are replaced only when named "
                   "here)")
    p.add_argument("--train-steps", type=int, default=None, help="with --train: N optimisation steps in each phase "
                   "of the recipe in place of its own counts (a quick check)")
    parts = p.add_argument_group("the published model's other parts (with --ckpt)")
    parts.add_argument("--tokenizer", help="with --ckpt: the dc-ht folder (default: dc-ht beside the generator, or "
                       "the config.yaml's)")
    parts.add_argument("--text-encoder", help="with --ckpt: the t5-base folder with its tokenizer.json (default: "
                       "t5-base beside the generator, or the config.yaml's)")
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
    """Refuse bad input in one sentence (ValueError / FileNotFoundError) before anything is loaded."""
    if not 0 <= args.seed < 2**63:  # torch takes 64-bit seeds; larger ones failed after the model had loaded
        raise ValueError(f"--seed must be between 0 and 2**63 - 1, not {args.seed}")
    if args.train:
        refuse_unused(args, ("--prompt", "--ckpt", "--steps", "--guidance", "--out", "--tokenizer", "--text-encoder"),
                      "with --train, which writes --train-out")
        if args.train_steps is not None and args.train_steps < 1:
            raise ValueError("--train-steps must be at least 1")
        args.train_out = check_out_path(train_out_path(args.train_out, TINY_WEIGHTS), (".safetensors",), "--train-out")
        train_bf16(args.dtype)
        return
    resolve_dtype(args.dtype, resolve_device(args.device))  # --device and --dtype first, one sentence each
    refuse_unused(args, ("--train-out", "--train-steps"), "without --train")
    if args.prompt is None or not args.prompt.strip():
        raise ValueError('the prompt is empty: pass --prompt "two red circles on a blue background"')
    if args.steps is not None and args.steps < 1:
        raise ValueError("--steps must be at least 1")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number, not {args.guidance}")
    if args.guidance is not None and not 0 <= args.guidance <= 100:  # 0 is off; beyond 100 only saturation, or NaN
        raise ValueError(f"--guidance must be between 0 and 100 (published models use about 4.5), not {args.guidance}")
    for flag, path in (("--ckpt", args.ckpt), ("--tokenizer", args.tokenizer), ("--text-encoder", args.text_encoder)):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path} does not exist")
    if (args.tokenizer or args.text_encoder) and not args.ckpt:
        raise ValueError("--tokenizer and --text-encoder go with --ckpt (the tiny model has its own)")
    if not args.ckpt:
        check_tiny_prompt(args.prompt)
    check_out_path(args.out, IMAGE_EXTENSIONS)


def load(args, device, dtype):
    """The pipeline --ckpt names, or the committed tiny one."""
    t0 = time.time()
    pipe = load_pipeline(args.ckpt, args.tokenizer, args.text_encoder, device=device, dtype=dtype) if args.ckpt \
        else load_tiny(device=device, dtype=dtype)
    print(f"loaded in {time.time() - t0:.1f}s")
    if args.steps is not None and args.steps > pipe.model.cfg.seq_len:  # each round commits at least one token
        raise ValueError(f"--steps must be at most {pipe.model.cfg.seq_len}, the tokens this model generates (each "
                         f"round commits at least one), not {args.steps}")
    if len(pipe.tokenizer.encode(args.prompt).ids) > pipe.text_len:
        print(f"note: the prompt is longer than the {pipe.text_len} text tokens this model reads: its end was cut off")
    return pipe


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        if args.train:
            train_tiny(seed=args.seed, out=args.train_out, steps=args.train_steps or TINY_STEPS,
                       dcht_steps=args.train_steps, bf16=train_bf16(args.dtype))
            return
        device, dtype = pick_device_dtype(args.device, args.dtype, tiny=not args.ckpt)
        pipe = load(args, device, dtype)
        t0 = time.time()
        progress = StepProgress(args.steps or pipe.steps, "round")
        img = pipe.generate([args.prompt], args.steps, args.guidance, torch.Generator().manual_seed(args.seed),
                            callback=progress)[0]
        Image.fromarray(img.numpy()).save(args.out)
        guidance = pipe.guidance if args.guidance is None else args.guidance
        print(f"wrote {args.out}: {args.prompt.strip()[:60]!r} ({img.shape[1]}x{img.shape[0]}, "
              f"{args.steps or pipe.steps} rounds, guidance {guidance}, {time.time() - t0:.1f}s)")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
