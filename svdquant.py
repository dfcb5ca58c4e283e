"""SVDQuant: 4-bit weights and 4-bit activations for diffusion transformers, with a 16-bit low-rank branch.

Li, Lin et al., "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion Models",
arXiv 2411.05007. Official code: github.com/mit-han-lab/deepcompressor (the quantizer) and
github.com/mit-han-lab/nunchaku (the inference engine and its checkpoint format). A linear layer Y = X W^T + b
becomes, for a per-input-channel smoothing factor s and a rank-r branch L1 L2 (paper eq. 5-7):

    Y = Q(X / s) Q(R)^T + (X / s) L2^T L1^T + b,      R = W diag(s) - L1 L2

  1. Smoothing (paper Sec. 4.2, from SmoothQuant): dividing X by s and multiplying W's columns by s moves the
     activation outliers into the weights, where they are easier to hold; s = max|X|^alpha / max|W|^beta, with
     (alpha, beta) chosen by a grid search on the layer's output error.
  2. The low-rank branch (Sec. 4.3): the weight's outliers (now including the activations') live in a few
     singular directions; a rank-32 SVD takes them into a 16-bit branch and leaves a residual R with a small,
     even range that 4 bits hold well. Refined by alternating SVD and quantization.
  3. W4A4 (Sec. 4.1): R in INT4 per group of 64 input channels (or NVFP4: E2M1 values with FP8 scales per 16),
     the activations quantized the same way per token at run time, so the GEMM runs on 4-bit tensor cores.
  4. Nunchaku (Sec. 5): the branch alone would cost 57% extra latency (memory-bound); fused into the 4-bit GEMM
     (down-projection with the activation quantization, up-projection in the epilogue) it costs almost nothing.
     `kernels/w4a4_gemm.py` is that kernel in Triton (INT4), which W4A4Linear calls on CUDA; everywhere else it
     runs the plain PyTorch lines below, which are exact.

Inside, top to bottom (sections 1-5 are the whole method; stop there on a first read):
  1. Config and presets: `QuantConfig`, the published precisions, the three methods compared (naive, smooth, svdquant)
  2. Modules: INT4 / NVFP4 quantizers, smoothing and its search, the low-rank branch, `svdquant` (one layer)
  3. Model: `W4A4Linear` (the quantized layer) and which of SANA's layers it replaces
  4. Training-free: calibration on the model's own activations (`quantize_model`, `quantize_pipeline`)
  5. Sampler: SANA's own, unchanged: `generate` runs it with the quantized transformer in the 16-bit one's place
  6. Components, skip on first read: SANA's transformer, Gemma-2, the DC-AE and the sampler, copied from sana.py;
     the kernels, loaded by path
  7. Checkpoint loading: nunchaku's packed layout (pack / unpack) and its single-file SANA format (save and load)
  8. Pipeline: a nunchaku file with its 16-bit base pipeline; PSNR
  9. Beyond the paper's core: merging a LoRA into the 16-bit branch
 10. Tiny default: the committed tiny SANA (sana.py's), quantized; `train_tiny` writes it in nunchaku's format
 11. CLI

Run:
  python svdquant.py --prompt "two red circles on a blue background"     # the tiny SANA, W4A4 (the committed file):
                                                                           # its image, PSNR vs the 16-bit image
  python svdquant.py --prompt "..." --precision nvfp4 --rank 8 --save q.safetensors   # quantized on the spot
  python svdquant.py --prompt "a cat" --ckpt svdq-int4_r32-sana1.6b.safetensors --base Sana_1600M_1024px_BF16_diffusers
  python svdquant.py --prompt "a cat" --ckpt Sana_1600M_1024px_BF16_diffusers --save q.safetensors  # quantize it
  python svdquant.py --train        # quantize the tiny SANA again (./svdquant_tiny.safetensors)
  python scripts/bench_svdquant.py  # memory, per-layer errors, and naive / smoothing / SVDQuant on the tiny model

Shapes: M tokens, K input channels, N output channels, r rank, g group size (64 INT4, 16 NVFP4), G = K / g groups;
        W (N, K), X (M, K), L1 "up" (N, r), L2 "down" (r, K); codes are 4-bit integers held in int8 / uint8.

Deviations from the official code: (1) smoothing and the branch are calibrated on each layer's own output error,
also for the attention's q/k/v (deepcompressor scores q/k/v on the attention block's output; here on the three
projections' outputs, which share s and L2); (2) every layer is calibrated on the inputs of the 16-bit model
(deepcompressor feeds each block the output of the already quantized blocks before it); (3) no GPTQ and no
GELU shift (SANA has no GELU MLP); (4) activations are quantized by nunchaku's kernel's rule, also in calibration:
x / s in the input's dtype, divided by the unrounded group scale, multiplied back by the stored one (deepcompressor's
fake quant divides by the stored one: with NVFP4's E4M3 scales a gain off by up to 2^-4 per group, 0.7-2.4% of
the output on the test cases, docs/svdquant.md), and the GEMM sums in float32 (the engine in 16-bit); (5) the
self-attention's output projection keeps its bias (`attn.out_proj.bias` in the file), which nunchaku's C++ SANA
block declares without one: not checked against the published file, which cannot be downloaded here.
"""
import argparse
import copy
import glob
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
from dataclasses import MISSING, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file


HERE = os.path.dirname(os.path.abspath(__file__))
TINY_SANA = os.path.join(HERE, "weights", "sana_tiny.safetensors")  # committed by `python sana.py --train`
TINY_DCAE = os.path.join(HERE, "weights", "dcae_tiny.safetensors")  # committed by `python dcae.py --train`


# ----------------------------------------------------------------------------------------------------------
# 1. Config and presets
# ----------------------------------------------------------------------------------------------------------


@dataclass
class QuantConfig:
    precision: str = "int4"  # "int4": INT4 codes, 16-bit scales per 64; "nvfp4": E2M1 codes, FP8 scales per 16
    rank: int = 32  # of the low-rank branch; 0 = none
    smooth: bool = True  # search a smoothing factor (False: s = 1)
    num_grids: int = 20  # the (alpha, beta) grid: 0.05, 0.10, ..., 0.95
    lowrank_iters: int = 100  # alternating SVD / quantization refinements of the branch, at most
    early_stop: bool = True  # stop them at the first iterate that does not lower the output error
    calib_tokens: int = 4096  # calibration rows per layer (drawn at random from what the hooks saw)


GROUP_SIZE = {"int4": 64, "nvfp4": 16}
PRESETS = {  # the published checkpoints' settings (nunchaku's svdq-<precision>_r32-<model>.safetensors)
    "svdq-int4_r32": QuantConfig("int4", 32),
    "svdq-fp4_r32": QuantConfig("nvfp4", 32),
}
METHODS = {  # the paper's ablation: what each of the three compared methods keeps of the recipe
    "naive": dict(smooth=False, rank=0),  # round-to-nearest W4A4
    "smooth": dict(rank=0),  # SmoothQuant-style W4A4
    "svdquant": dict(),
}


# ----------------------------------------------------------------------------------------------------------
# 2. Modules: the method (quantizers, smoothing, the low-rank branch)
# ----------------------------------------------------------------------------------------------------------
# Quantizers. Symmetric, per group of g consecutive input channels; weights once, activations per token at run
# time. INT4 (ref A.3): scale = max|group| / 7, codes round-half-even, clamped to [-8, 7] (-8 never occurs).
# NVFP4 (A.4): E2M1 values {0, 0.5, 1, 1.5, 2, 3, 4, 6} x sign, group scales in FP8 E4M3 (max 448); weights add a
# per-tensor scale so that the FP8 scales use their range, activations divide by the unrounded scale.

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # the magnitudes of the 3-bit E2M1 index
FP8_MAX = 448.0  # float8_e4m3fn


def to_groups(x, g):
    """(..., K) -> (..., G, g), zero-padded to a whole number of groups (zeros change no group's max)."""
    return F.pad(x, (0, -x.shape[-1] % g)).unflatten(-1, (-1, g))


def quantize_int4(x, group_size=64):
    """x: (..., K) -> codes (..., K) int8 in [-8, 7], scales (..., G): x ~ codes * scale per group."""
    xg = to_groups(x, group_size)
    scale = xg.abs().amax(-1, keepdim=True) / 7
    codes = torch.round(xg / torch.where(scale > 0, scale, 1)).clamp(-8, 7)  # torch.round: half to even
    return codes.flatten(-2)[..., :x.shape[-1]].to(torch.int8), scale.squeeze(-1)


def round_e2m1(x):
    """x: values in units of their scale -> E2M1 codes (uint8): bit 3 the sign, bits 0-2 the index into E2M1;
    nearest value, ties to the even index (the hardware's cvt.rn), saturating at 6."""
    d = (x.abs().clamp(max=6.0)[..., None] - E2M1.to(x.device)).abs()  # (..., 8)
    index = torch.arange(8, device=x.device)
    tie_break = (d == d.min(-1, keepdim=True).values) * (2 - index % 2)  # nearest first, then even before odd
    idx = tie_break.argmax(-1).to(torch.uint8)
    return idx | ((x < 0) & (idx > 0)).to(torch.uint8) << 3


def decode_e2m1(codes):
    v = E2M1.to(codes.device)[(codes & 7).long()]
    return torch.where(codes >= 8, -v, v)


def quantize_nvfp4_weight(w, group_size=16):
    """w: (N, K) -> codes (N, K) uint8, FP8 group scales (N, G), per-tensor scale (): w ~ e2m1 * scale * wtscale."""
    wg = to_groups(w, group_size)
    wtscale = (w.abs().amax() / (6 * FP8_MAX)).clamp_min(1e-30)  # the largest group scale lands on FP8's max
    scale = (wg.abs().amax(-1, keepdim=True) / 6 / wtscale).to(torch.float8_e4m3fn)
    codes = round_e2m1(wg / (scale.float() * wtscale))
    return codes.flatten(-2)[..., :w.shape[-1]], scale.squeeze(-1), wtscale


def dequantize(codes, scales, precision="int4", wtscale=None):
    """codes (..., K), scales (..., G) -> (..., K) float32."""
    values = codes.float() if precision == "int4" else decode_e2m1(codes)
    out = to_groups(values, GROUP_SIZE[precision]) * scales.float()[..., None]
    out = out.flatten(-2)[..., :codes.shape[-1]]
    return out if wtscale is None else out * wtscale


def fake_quant_weight(w, precision="int4"):
    """What the 4-bit GEMM sees of a weight: quantize, then dequantize. (N, K) -> (N, K)."""
    if precision == "int4":
        return dequantize(*quantize_int4(w, 64))
    codes, scales, wtscale = quantize_nvfp4_weight(w, 16)
    return dequantize(codes, scales, precision, wtscale)


def fake_quant_act(x, precision="int4"):
    """What the 4-bit GEMM sees of an activation, quantized per token at run time. (..., K) -> (..., K)."""
    if precision == "int4":
        return dequantize(*quantize_int4(x, 64))
    xg = to_groups(x, 16)
    scale = (xg.abs().amax(-1, keepdim=True) / 6).clamp(max=FP8_MAX)  # (..., G, 1)
    codes = round_e2m1(xg / torch.where(scale > 0, scale, 1))  # divides by the unrounded scale, as the kernel
    out = decode_e2m1(codes) * scale.to(torch.float8_e4m3fn).float()  # and multiplies back by the FP8 one
    # (deepcompressor divides by the FP8 one and rounds ties to the larger value: deviation (4) in the docstring)
    return out.flatten(-2)[..., :x.shape[-1]]


# Smoothing (paper Sec. 4.2, ref A.1): s_k = max_t |X[t, k]|^alpha / max_n |W[n, k]|^beta. The grid search scores
# every candidate by the layer output's squared error with 4-bit weights and activations, and for SVDQuant with a
# one-shot rank-r branch in place, so that the chosen s already counts on the branch to absorb weight outliers.

def smooth_candidates(num_grids=20):
    """The 39 (alpha, beta) pairs of the official grid: identity, (a, 0) and (a, 1 - a) for a = 1/20 ... 19/20."""
    grid = [i / num_grids for i in range(1, num_grids)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in grid] + [(a, 1 - a) for a in grid]


def smooth_factor(x_max, w_max, alpha, beta):
    """x_max, w_max: (K,) per-input-channel absmax of activations and weights -> s (K,)."""
    s = x_max.pow(alpha) / w_max.pow(beta)
    s[s == 0] = 1
    return s if torch.isfinite(s).all() else torch.ones_like(s)


def svd_branch(w, rank):
    """The best rank-r approximation of w (N, K), by an SVD in float64: up (N, r) = U S, down (r, K) = V^T.
    (The official code takes the full SVD; the reduced one gives the same leading vectors, without the N x N U.)"""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).to(w.dtype), vh[:rank].to(w.dtype)


def output_error(x, y_ref, w_q, up=None, down=None, precision="int4"):
    """Sum of squared differences between y_ref and the quantized layer Q(x) w_q^T + (x down^T) up^T, x already
    divided by s. x: (M, K), y_ref: (M, N), w_q: (N, K) already fake-quantized."""
    y = fake_quant_act(x, precision) @ w_q.T
    if up is not None:
        y = y + (x @ down.T) @ up.T
    return (y - y_ref).pow(2).sum()


def search_smoothing(w, x, cfg):
    """The (alpha, beta) grid search. w: (N, K); x: (M, K) calibration inputs. Returns (s (K,), (alpha, beta))."""
    x_max, w_max, y_ref = x.abs().amax(0), w.abs().amax(0), x @ w.T
    best = None
    for alpha, beta in smooth_candidates(cfg.num_grids):
        s = smooth_factor(x_max, w_max, alpha, beta)
        w_hat = w * s
        up = down = None
        if cfg.rank:
            up, down = svd_branch(w_hat, cfg.rank)
            w_hat = w_hat - up @ down
        err = output_error(x / s, y_ref, fake_quant_weight(w_hat, cfg.precision), up, down, cfg.precision)
        if best is None or err < best[0]:
            best = (err, s, (alpha, beta))
    return best[1], best[2]


# The low-rank branch (paper Sec. 4.3, ref A.2). The plain SVD of W_hat is optimal before quantization; after
# it, the residual's rounding errors deserve a say. So alternate: L_1 = SVD_r(W_hat),
# L_{k+1} = SVD_r(W_hat - Q(W_hat - L_k)) (the branch absorbs what quantization of the residual loses), and keep the
# iterate of least output error, stopping at the first one that does not improve (cfg.early_stop, the official
# default; without it all cfg.lowrank_iters iterates run).

def lowrank_branch(w_hat, x, y_ref, cfg):
    """w_hat: (N, K) smoothed weight; x: (M, K) smoothed inputs; y_ref: (M, N). Returns (up, down, iterations)."""
    quantized, best = 0, None
    for it in range(cfg.lowrank_iters):
        up, down = svd_branch(w_hat - quantized, cfg.rank)
        quantized = fake_quant_weight(w_hat - up @ down, cfg.precision)
        err = output_error(x, y_ref, quantized, up, down, cfg.precision)
        if best is not None and err > best[0]:
            if cfg.early_stop:
                break
            continue
        best = (err, up, down, it + 1)
    return best[1], best[2], best[3]


@dataclass
class Quantized:
    """One layer (or one group of layers sharing an input) after `svdquant`, in float32, unpadded."""
    codes: torch.Tensor  # (N, K) int8 (INT4) or uint8 (E2M1 codes)
    scales: torch.Tensor  # (N, G) float32 (INT4) or float8_e4m3fn (NVFP4)
    wtscale: torch.Tensor  # () NVFP4's per-tensor scale; None for INT4
    smooth: torch.Tensor  # (K,) s: the GEMM's input is x / s
    up: torch.Tensor  # (N, r) L1, or None
    down: torch.Tensor  # (r, K) L2 / s: acts on the raw input x (so the branch needs no division), or None
    alpha_beta: tuple
    iterations: int  # of the branch's refinement


@torch.no_grad()
def svdquant(w, x, cfg):
    """SVDQuant of one linear layer (paper Sec. 4, ref A): w (N, K) float32, x (M, K) its calibration inputs.
    With cfg.smooth False and cfg.rank 0 this is naive W4A4; with rank 0 alone, smoothing-only W4A4."""
    w, x = w.float(), x.float()
    cfg = replace(cfg, rank=min(cfg.rank, *w.shape))  # a rank above min(N, K) adds nothing
    s, ab = search_smoothing(w, x, cfg) if cfg.smooth else (torch.ones(w.shape[1]), (0.0, 0.0))
    w_hat = w * s  # (N, K): X W^T = (X / s) (W diag s)^T
    up = down = None
    iterations = 0
    if cfg.rank:
        up, down, iterations = lowrank_branch(w_hat, x / s, x @ w.T, cfg)
        w_hat = w_hat - up @ down
        down = down / s  # the engine feeds the branch the raw x
    if cfg.precision == "int4":
        codes, scales = quantize_int4(w_hat, 64)
        wtscale = None
    else:
        codes, scales, wtscale = quantize_nvfp4_weight(w_hat, 16)
    return Quantized(codes, scales, wtscale, s, up, down, ab, iterations)


# ----------------------------------------------------------------------------------------------------------
# 3. Model: the quantized layer, and which of SANA's layers it replaces
# ----------------------------------------------------------------------------------------------------------


def pack_nibbles(codes):
    """(N, K) 4-bit codes -> (N, ceil(K / 2)) uint8, two per byte, the even k in the low nibble."""
    c = F.pad(codes.to(torch.uint8) & 15, (0, codes.shape[-1] % 2))
    return c[:, 0::2] | c[:, 1::2] << 4


def unpack_nibbles(packed, K, signed):
    """Inverse of pack_nibbles: (N, ceil(K / 2)) uint8 -> (N, K) int8 (INT4, sign-extended) or uint8 (E2M1)."""
    c = torch.stack([packed & 15, packed >> 4], -1).flatten(-2)[:, :K]
    return (c.to(torch.int8) - 16 * (c >= 8).to(torch.int8)) if signed else c


class W4A4Linear(nn.Module):
    """A quantized nn.Linear (or 1x1 convolution): Y = Q(X / s) Q(R)^T + (X L2') L1^T + b, with R held in 4 bits
    (two codes a byte), its group scales, s, the 16-bit branch (L2' = L2 / s acts on the raw X) and the bias.
    On CUDA the Triton kernel runs it (`w4a4_gemm`, kernels/w4a4_gemm.py, loaded in section 6); elsewhere the
    PyTorch lines below, which are exact (float32; X / s rounded to the input's dtype, as in nunchaku's engine)."""

    def __init__(self, in_features, out_features, rank, precision="int4", bias=True, conv=False):
        super().__init__()
        self.in_features, self.out_features, self.precision, self.conv = in_features, out_features, precision, conv
        G = math.ceil(in_features / GROUP_SIZE[precision])
        int4 = precision == "int4"
        self.register_buffer("qweight", torch.zeros(out_features, math.ceil(in_features / 2), dtype=torch.uint8))
        self.register_buffer("wscales", torch.zeros(out_features, G, dtype=torch.float32 if int4 else
                                                    torch.float8_e4m3fn))
        self.register_buffer("wtscale", None if int4 else torch.ones(()))
        self.register_buffer("smooth", torch.ones(in_features))
        self.register_buffer("proj_down", torch.zeros(in_features, rank))  # (K, r) = (L2 / s)^T
        self.register_buffer("proj_up", torch.zeros(out_features, rank))  # (N, r) = L1
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_quantized(cls, q, bias=None, conv=False):
        N, K = q.codes.shape
        layer = cls(K, N, 0 if q.up is None else q.up.shape[1], "int4" if q.wtscale is None else "nvfp4",
                    bias is not None, conv)
        layer.qweight.copy_(pack_nibbles(q.codes))
        layer.wscales.copy_(q.scales)
        layer.smooth.copy_(q.smooth)
        if q.wtscale is not None:
            layer.wtscale.copy_(q.wtscale)
        if q.up is not None:
            layer.proj_down.copy_(q.down.T)
            layer.proj_up.copy_(q.up)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def weight_dequantized(self):
        """R, the 4-bit residual in float32 (N, K)."""
        codes = unpack_nibbles(self.qweight, self.in_features, signed=self.precision == "int4")
        return dequantize(codes, self.wscales, self.precision, self.wtscale)

    def forward(self, x):  # x: (..., K), or (B, K, h, w) for a 1x1 convolution
        if self.conv:
            return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.linear(x)

    def linear(self, x):  # (..., K) -> (..., N)
        if w4a4_gemm is not None and x.is_cuda and self.precision == "int4":  # the fused Triton kernel
            y = w4a4_gemm(x.reshape(-1, self.in_features), self.qweight, self.wscales, self.smooth, self.proj_down,
                          self.proj_up, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        dtype, x = x.dtype, x.float()
        x_s = (x / self.smooth.float()).to(dtype).float()  # X / s rounded to the input's dtype, as the engine has it
        y = fake_quant_act(x_s, self.precision) @ self.weight_dequantized().T  # the 4-bit GEMM
        y = y + (x @ self.proj_down.float()) @ self.proj_up.float().T  # the 16-bit branch, on the raw x
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype)


# Which of a SANA block's layers are quantized (ref D), grouped by shared input: q, k and v share s and the branch's
# down projection. 16-bit stay: the text's K/V, the depthwise convolution, the norms' tables, and, outside the
# blocks, the embeddings and the final layer.
QUANTIZED = [("attn1.to_q", "attn1.to_k", "attn1.to_v"), ("attn1.to_out.0",), ("attn2.to_q",), ("attn2.to_out.0",),
             ("ff.conv_inverted",), ("ff.conv_point",)]


def weight_2d(module):
    """(N, K) of an nn.Linear or a 1x1 nn.Conv2d."""
    return module.weight.reshape(module.weight.shape[0], -1)


def quantized_sana(cfg, precision, rank, device="cpu"):
    """A SanaTransformer whose blocks hold empty W4A4Linears where `QUANTIZED` says (the rest as built)."""
    with torch.device(device):
        model = SanaTransformer(cfg)
        for block in model.transformer_blocks:
            for group in QUANTIZED:
                for name in group:
                    m = block.get_submodule(name)
                    N, K = weight_2d(m).shape
                    layer = W4A4Linear(K, N, rank, precision, m.bias is not None, conv=isinstance(m, nn.Conv2d))
                    parent, _, child = name.rpartition(".")
                    setattr(block.get_submodule(parent), child, layer)
    return model


# ----------------------------------------------------------------------------------------------------------
# 4. Training-free: calibration on the model's own activations
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def collect_inputs(model, run, names, max_rows, generator):
    """Runs `run()` (the 16-bit pipeline on calibration prompts) with forward hooks on the named layers, and keeps
    up to max_rows of each one's inputs, drawn at random. Returns {name: (M, K) float32}."""
    seen, hooks = {n: [] for n in names}, []
    for name in names:
        def hook(module, args, name=name):
            x = args[0]
            x = x.permute(0, 2, 3, 1) if x.dim() == 4 else x  # 1x1 convolution: channels last
            seen[name].append(x.reshape(-1, x.shape[-1]).float().cpu())
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, xs in seen.items():
        x = torch.cat(xs)
        out[name] = x[torch.randperm(len(x), generator=generator)[:max_rows]]
    return out


@torch.no_grad()
def quantize_model(model, run, cfg, log=print, seed=0):
    """Quantizes a SANA transformer in place: calibration inputs from `run()`, then `svdquant` on each group of
    `QUANTIZED`, each replaced by its W4A4Linear. Returns {layer name: (alpha, beta), iterations}."""
    groups = [tuple(f"transformer_blocks.{i}.{n}" for n in g)
              for i in range(len(model.transformer_blocks)) for g in QUANTIZED]
    inputs = collect_inputs(model, run, [g[0] for g in groups], cfg.calib_tokens, torch.Generator().manual_seed(seed))
    report, t0 = {}, time.time()
    for group in groups:
        modules = [model.get_submodule(n) for n in group]
        w = torch.cat([weight_2d(m).float() for m in modules])  # (sum N, K): one s and one down for the group
        q = svdquant(w, inputs[group[0]], cfg)
        start = 0
        for name, m in zip(group, modules):
            n = m.weight.shape[0]
            part = replace(q, codes=q.codes[start:start + n], scales=q.scales[start:start + n],
                           up=None if q.up is None else q.up[start:start + n])
            layer = W4A4Linear.from_quantized(part, m.bias, conv=isinstance(m, nn.Conv2d))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to(m.weight.device))
            start += n
        report[group[0]] = (q.alpha_beta, q.iterations)
    log(f"quantized {sum(map(len, groups))} layers in {time.time() - t0:.1f}s")
    return report


@torch.no_grad()
def quantize_pipeline(pipe, cfg, prompts, steps=20, seed=0, log=print):
    """A quantized copy of pipe.transformer (pipe keeps its 16-bit one): calibration = the 16-bit copy sampling
    `prompts` in pipe's sampler (the official recipe: the evaluation protocol's sampler, inputs cached over all
    steps), then `quantize_model` on it."""
    transformer = copy.deepcopy(pipe.transformer)
    g = torch.Generator().manual_seed(seed)
    side = transformer.cfg.sample_size * pipe.vae.cfg.compression

    def run():
        generate(pipe, transformer, prompts, side, side, steps, None, g)
    quantize_model(transformer, run, cfg, log, seed)
    return transformer


# ----------------------------------------------------------------------------------------------------------
# 5. Sampler: SANA's own, with the quantized layers in the 16-bit ones' places
# ----------------------------------------------------------------------------------------------------------
# SVDQuant changes no sampler. `quantize_model` put W4A4Linears in the 16-bit layers' places, so the quantized
# transformer takes the same inputs and returns the same velocity, and SANA's pipeline (section 6, copied from
# sana.py) samples with it as it does with the 16-bit one. Only the transformer's GEMMs are 4-bit: the Gemma-2 text
# encoder and the DC-AE stay 16-bit, shared by both.


@torch.no_grad()
def generate(pipe, transformer, prompts, height, width, steps=20, guidance_scale=None, generator=None, callback=None):
    """uint8 images (B, height, width, 3) of `transformer` (quantized, or the 16-bit one) in the sampler of `pipe`,
    a SANA pipeline: Gemma-2 encodes the prompts, x_T ~ N(0, I) comes from `generator`, `steps` steps of the
    Flow-DPM-Solver run on the guided velocity v = v_u + w (v_c - v_u) (w = guidance_scale, 1 = off; None: the
    pipeline's own), and the DC-AE decodes x_0; callback(i, x) after each step."""
    return replace(pipe, transformer=transformer).generate(prompts, height, width, steps, guidance_scale, generator,
                                                           callback=callback)


# ----------------------------------------------------------------------------------------------------------
# 6. Components: skip on first read
# ----------------------------------------------------------------------------------------------------------
# SANA 1.0 / 1.5 as sana.py has it (the transformer, the Gemma-2 text encoder, the DC-AE, the Flow-DPM sampler,
# their loaders and the tiny default's), which svdquant quantizes and runs, and the kernels loaded by path.
# Nothing here is SVDQuant's but `w4a4_gemm`, its fused kernel (kernels/w4a4_gemm.py).


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
W4A4_GEMM = load_kernel("w4a4_gemm")  # the fused Triton GEMM on CUDA; the exact PyTorch path everywhere else
w4a4_gemm = W4A4_GEMM.w4a4_gemm if W4A4_GEMM else None


# Copied from sana.py: SanaConfig
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


# Copied from sana.py: _600M
_600M = dict(hidden_size=1152, depth=28, num_heads=36, cross_heads=16)


# Copied from sana.py: _1600M
_1600M = dict(hidden_size=2240, depth=20, num_heads=70, cross_heads=20)


# Copied from sana.py: PRESETS with PRESETS->SANA_PRESETS
SANA_PRESETS = {  # keys: the published checkpoint names (HF repos under Efficient-Large-Model)
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
    # the tiny default (section 10): 64x64 shapes images, tiny DC-AE latent, tiny Gemma-2-shaped text encoder
    "tiny": SanaConfig(in_channels=4, out_channels=4, hidden_size=192, depth=4, num_heads=6, cross_heads=6,
                       caption_channels=64, sample_size=8, patch_size=2, flow_shift=3.0),
}


# Copied from sana.py: RMSNorm
class RMSNorm(nn.Module):
    """y = x / rms(x) * w, in float32 (caption norm, qk-norm)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


# Copied from sana.py: ModulatedNorm
class ModulatedNorm(nn.Module):
    """LayerNorm without affine (eps 1e-6) followed by the adaLN shift/scale: a per-sample affine."""

    def forward(self, x, shift, scale):  # x: (B, N, D), shift/scale: (B, 1, D)
        return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=1e-6), 1 + scale).to(x.dtype)  # LN(x)(1+scale)+shift


# Copied from sana.py: sincos_2d
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


# Copied from sana.py: PatchEmbed
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


# Copied from sana.py: TimestepEmbedder
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


# Copied from sana.py: CombinedTimestepEmbedding
class CombinedTimestepEmbedding(nn.Module):
    """diffusers' PixArtAlphaCombinedTimestepSizeEmbeddings without the size conditions SANA does not use: only
    the timestep embedder, under the checkpoint's key level "emb"."""

    def __init__(self, dim):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)

    def forward(self, t):
        return self.timestep_embedder(t)


# Copied from sana.py: AdaLNSingle
class AdaLNSingle(nn.Module):
    """adaLN-single (PixArt-alpha): one timestep MLP shared by all blocks. Returns the 6D modulation vector
    (per-block tables are added to it) and the D-dim embedding the final layer uses."""

    def __init__(self, dim):
        super().__init__()
        self.emb = CombinedTimestepEmbedding(dim)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t):
        t_emb = self.emb(t)  # (B, D)
        return self.linear(F.silu(t_emb)), t_emb  # (B, 6D), (B, D)


# Copied from sana.py: CaptionProjection
class CaptionProjection(nn.Module):
    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, y):  # (B, L, caption_channels) -> (B, L, D)
        return self.linear_2(F.gelu(self.linear_1(y), approximate="tanh"))


# Copied from sana.py: LinearSelfAttention
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


# Copied from sana.py: CrossAttention
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


# Copied from sana.py: MixFFN
class MixFFN(nn.Module):
    """Mix-FFN ("GLUMBConv" in the official code, paper sec. 2.2): 1x1 conv -> SiLU -> 3x3 depthwise conv -> GLU
    -> 1x1 conv. The depthwise conv mixes neighbouring tokens, which is what lets SANA drop positional embeddings."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.conv_inverted = nn.Conv2d(dim, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x):  # x: (B, D, h, w)
        x = self.conv_depth(F.silu(self.conv_inverted(x)))  # (B, 2 hidden, h, w)
        value, gate = x.chunk(2, dim=1)  # first half value, second half gate
        return self.conv_point(value * F.silu(gate))  # (B, D, h, w)


# Copied from sana.py: SanaBlock
class SanaBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.scale_shift_table = nn.Parameter(torch.randn(6, D) / D**0.5)
        self.norm1, self.norm2 = ModulatedNorm(), ModulatedNorm()
        self.attn1 = LinearSelfAttention(D, cfg.num_heads, cfg.qk_norm)
        self.attn2 = CrossAttention(D, cfg.cross_heads, cfg.qk_norm)
        self.ff = MixFFN(D, int(D * cfg.mlp_ratio))

    def forward(self, x, y, bias, t6, hw):  # x: (B, N, D), y: (B, L, D), t6: (B, 6D), hw = (h, w)
        B, N, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table[None] + t6.view(B, 6, D)).chunk(6, 1)
        x = torch.addcmul(x, gate1, self.attn1(self.norm1(x, shift1, scale1)))  # x + gate1 attn  (B, N, D)
        x = x + self.attn2(x, y, bias)  # cross-attention: no norm, no modulation, no gate
        h = self.norm2(x, shift2, scale2).view(B, *hw, D).permute(0, 3, 1, 2)  # (B, D, h, w), in channels-last memory (a view)
        return torch.addcmul(x, gate2, self.ff(h).flatten(2).transpose(1, 2))  # (B, N, D)


# Copied from sana.py: SanaTransformer
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
        self.gradient_checkpointing = False  # True: blocks keep only their inputs for backward, and rerun there

    def forward(self, x, t, y, mask=None, controls=None):
        """x: (B, C, H, W) noisy latent; t: (B,) = 1000 sigma; y: (B, L, caption_channels); mask: (B, L) 1 = keep.
        controls (a ControlNet's, see SanaControlNet.controls): None; samples (B, N, D), the i-th added right after
        block i + 1 (diffusers' wiring); or a function of the tokens after block 0 that returns the samples to add
        after blocks 0, 1, ... (the original's). Returns the flow velocity v = eps - x0, (B, C_out, H, W)."""
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        h, w = H // p, W // p
        x = self.patch_embed(x)  # (B, N, D)
        t6, t_emb = self.time_embed(t.expand(B))  # (B, 6D), (B, D)
        bias = None
        if mask is not None:  # additive -10000 (not -inf): a fully padded row still gets a softmax
            if mask.any(dim=1).all():  # padding after the batch's last token gets exactly 0 weight: skip it
                L = int(mask.nonzero()[:, 1].max()) + 1  # (most of the 300 text tokens are padding)
                y, mask = y[:, :L], mask[:, :L]
            bias = ((1 - mask.to(x.dtype)) * -10000.0)[:, None, None, :]  # (B, 1, 1, L)
        y = self.caption_norm(self.caption_projection(y))  # (B, L, D)
        for i, block in enumerate(self.transformer_blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, y, bias, t6, (h, w), use_reentrant=False)
            else:
                x = block(x, y, bias, t6, (h, w))
            if callable(controls):  # (i = 0) the original wiring: its ControlNet reads these tokens
                first, *controls = controls(x)
                x = x + first  # and the rest go in after blocks 1, 2, ... below
            elif controls is not None and 0 < i <= len(controls):
                x = x + controls[i - 1]
        # final layer: modulated by the D-dim t embedding (not the 6D vector)
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        x = self.proj_out(self.norm_out(x, shift, scale))  # (B, N, p*p*C)
        x = x.view(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(B, -1, h * p, w * p)


# Copied from sana.py: Gemma2Config
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


# Copied from sana.py: CHI
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


# Copied from sana.py: MAX_TEXT_LEN
MAX_TEXT_LEN = 300  # text tokens the DiT sees (model_max_length)


# Copied from sana.py: GemmaRMSNorm
class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm scales by (1 + w), w initialised at 0."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


# Copied from sana.py: rotate_half
def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


# Copied from sana.py: GemmaAttention
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


# Copied from sana.py: GemmaMLP
class GemmaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


# Copied from sana.py: GemmaLayer
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


# Copied from sana.py: Gemma2
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


# Copied from sana.py: tokenize
def tokenize(tok, texts, length, bos_id=2, pad_id=0):
    """Right-padded, truncated to `length` tokens, BOS first (as Gemma's tokenizer does). Returns ids, mask (B, T)."""
    ids = torch.full((len(texts), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(texts), length, dtype=torch.long)
    for i, text in enumerate(texts):
        t = tok.encode(text).ids  # the tokenizer's post-processor adds BOS; add it if it does not
        t = (t if t[:1] == [bos_id] else [bos_id] + t)[:length]
        ids[i, :len(t)], mask[i, :len(t)] = torch.tensor(t), 1
    return ids, mask


# Copied from sana.py: encode_prompts
@torch.no_grad()
def encode_prompts(text_encoder, tok, prompts, max_len=MAX_TEXT_LEN, chi=CHI):
    """Prompts -> (B, max_len, D) embeddings and (B, max_len) mask, as the SANA pipelines do.
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


# Copied from sana.py: tokens_cut
def tokens_cut(tok, prompt, max_len=MAX_TEXT_LEN, chi=CHI):
    """How many tokens of `prompt` encode_prompts drops for lack of room (0: none)."""
    prompt = prompt.lower().strip()
    if chi:
        n_chi = len(tokenize(tok, [chi], 10**6)[1].nonzero())
        return max(0, int(tokenize(tok, [chi + prompt], 10**6)[1].sum()) - (n_chi + max_len - 2))
    return max(0, int(tokenize(tok, [prompt], 10**6)[1].sum()) - max_len)


# Copied from sana.py: VAE_SCALE
VAE_SCALE = 0.41407  # DC-AE f32c32-sana latent scaling: z = scale * encode(x); decode(z / scale)


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


# Copied from dcae.py: SHAPE_COLORS
SHAPE_COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (240, 210, 30),
                "white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}


# Copied from dcae.py: COLORS
COLORS = ("white", "black", "gray", "red", "green", "blue", "yellow")  # of the objects and of the background


# Copied from dcae.py: SHAPES
SHAPES = ("circle", "square", "triangle")


# Copied from dcae.py: COUNT_WORDS
COUNT_WORDS = ("a", "two", "three")


# Copied from dcae.py: shapes_caption
def shapes_caption(count, color, shape, background):
    noun = shape if count == 1 else shape + "s"
    return f"{COUNT_WORDS[count - 1]} {color} {noun} on a {background} background"


# Copied from dcae.py: random_scene
def random_scene(rng, colors=COLORS):
    """(count, color, shape, background) drawn uniformly; the background differs from the object colour."""
    color = rng.choice(colors)
    background = rng.choice([b for b in COLORS if b != color])
    return rng.randint(1, 3), color, rng.choice(SHAPES), background


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


# Copied from dcae.py: get_preset with PRESETS->SANA_PRESETS
def get_preset(name):
    """The config of a published checkpoint by name; a Hugging Face repo id works too (the org/ prefix and a
    -diffusers / _diffusers suffix are dropped). One sentence naming the known presets otherwise."""
    key = str(name).split("/")[-1].removesuffix("-diffusers").removesuffix("_diffusers")
    if key not in SANA_PRESETS:
        raise ValueError(f"unknown preset {str(name)[:80]!r}; known: {', '.join(SANA_PRESETS)}")
    return SANA_PRESETS[key]


# Copied from sana.py: load_safetensors_dir
def load_safetensors_dir(folder):
    """All weights of a diffusers/transformers folder: one file, shards listed by an *.index.json, or the
    fp16/bf16 variant when it is the only one there."""
    index = sorted(glob.glob(os.path.join(folder, "*.safetensors.index*.json")), key=len)
    if index:
        shards = sorted(set(read_json(index[0])["weight_map"].values()))
        return {k: v for s in shards for k, v in read_weights(os.path.join(folder, s)).items()}
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")), key=len)  # plain name before variants
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    return read_weights(files[0])


# Copied from sana.py: config_from_diffusers
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


# Copied from sana.py: read_transformer_config
def read_transformer_config(folder):
    """The SanaConfig of a diffusers transformer/ folder, from its config.json."""
    c = read_json(os.path.join(folder, "config.json"))
    if c.get("_class_name") != "SanaTransformer2DModel":
        raise ValueError(f"{folder} holds a {c.get('_class_name', 'non-diffusers model')}, "
                         f"not a SanaTransformer2DModel")
    try:
        return check_config(config_from_diffusers(c), os.path.join(folder, "config.json"))
    except (KeyError, TypeError, AttributeError) as e:  # a field missing, or of a kind no config holds
        raise ValueError(f"{os.path.join(folder, 'config.json')} is not a complete SanaTransformer2DModel config "
                         f"({type(e).__name__}: {str(e)[:80]})") from None


# Copied from sana.py: ORIGINAL_RENAMES
ORIGINAL_RENAMES = [  # (regex on the NVlabs key, diffusers key or None = drop), applied in order;
    # the mapping of diffusers' scripts/convert_sana_to_diffusers.py
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


# Copied from sana.py: FUSED
FUSED = {".attn1.to_qkv.": (".attn1.to_q.", ".attn1.to_k.", ".attn1.to_v."),
         ".attn2.to_kv.": (".attn2.to_k.", ".attn2.to_v.")}


# Copied from sana.py: convert_original
def convert_original(sd):
    """NVlabs .pth state dict -> our (= diffusers) keys: renames, drops, and splits of the fused projections."""
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


# Copied from sana.py: preset_from_name with PRESETS->SANA_PRESETS
def preset_from_name(path):
    """The preset whose name is in the file/folder name (longest match), e.g. SANA1.5_4.8B_1024px.pth."""
    base = os.path.basename(os.path.normpath(path))
    names = [n for n in SANA_PRESETS if n in base]
    return max(names, key=len) if names else None


# Copied from sana.py: load_transformer with PRESETS->SANA_PRESETS
def load_transformer(path, preset=None, *, device="cpu", dtype=torch.float32):
    """A diffusers transformer/ folder (or the pipeline folder above it) or an original .pth file. `preset` (a
    name in SANA_PRESETS) gives a .pth its architecture, and a folder its flow shift."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    named = get_preset(preset) if preset else None
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "transformer")):
            path = os.path.join(path, "transformer")
        cfg, sd = read_transformer_config(path), load_safetensors_dir(path)
        if named:
            cfg = replace(cfg, flow_shift=named.flow_shift)
    else:
        cfg = named or SANA_PRESETS.get(preset_from_name(path))
        if cfg is None:
            raise ValueError(f"cannot tell which model {path} is from its name: pass preset= (one of "
                             f"{', '.join(SANA_PRESETS)})")
        sd = convert_original(read_weights(path))
    with torch.device("meta"):
        model = SanaTransformer(cfg)
    load_state_dict_strict(model, sd, path)
    return model.to(device=device, dtype=dtype).eval()


# Copied from sana.py: gemma_config_from_json
def gemma_config_from_json(c):
    """A transformers Gemma2 config.json -> Gemma2Config."""
    return Gemma2Config(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                        intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
                        num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"],
                        head_dim=c["head_dim"], query_pre_attn_scalar=c["query_pre_attn_scalar"],
                        attn_softcap=c.get("attn_logit_softcapping") or 1e9, rms_eps=c["rms_norm_eps"],
                        rope_theta=c.get("rope_theta") or c.get("rope_parameters", {}).get("rope_theta", 1e4),
                        sliding_window=c.get("sliding_window") or 4096)


# Copied from sana.py: load_text_encoder
def load_text_encoder(folder, *, device="cpu", dtype=torch.float32):
    """A transformers Gemma2Model (or Gemma2ForCausalLM) folder: config.json + safetensors."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    c = read_json(os.path.join(folder, "config.json"))
    if c.get("model_type") != "gemma2":
        kind = c.get("model_type") or c.get("_class_name") or "model of unknown type"
        raise ValueError(f"{folder} holds a {kind}, not a Gemma-2 text encoder")
    try:
        cfg = check_config(gemma_config_from_json(c), os.path.join(folder, "config.json"))
    except (KeyError, TypeError, AttributeError) as e:  # a field missing, or of a kind no config holds
        raise ValueError(f"{os.path.join(folder, 'config.json')} is not a complete Gemma-2 config "
                         f"({type(e).__name__}: {str(e)[:80]})") from None
    sd = {k.removeprefix("model."): v for k, v in load_safetensors_dir(folder).items() if k != "lm_head.weight"}
    with torch.device("meta"):
        model = Gemma2(cfg)
    load_state_dict_strict(model, sd, folder)
    return model.to(device=device, dtype=dtype).eval()


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


# Copied from dcae.py: config_from_diffusers with config_from_diffusers->dcae_config_from_diffusers
def dcae_config_from_diffusers(cfg):
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


# Copied from sana.py: read_vae_config
def read_vae_config(folder):
    """The DCAEConfig of a diffusers vae/ folder, from its config.json."""
    c = read_json(os.path.join(folder, "config.json"))
    if c.get("_class_name") != "AutoencoderDC":
        raise ValueError(f"{folder} holds a {c.get('_class_name') or 'model of unknown type'}, not an AutoencoderDC")
    try:
        return check_config(dcae_config_from_diffusers(c), os.path.join(folder, "config.json"))
    except (KeyError, TypeError, AttributeError) as e:  # a field missing, or of a kind no config holds
        raise ValueError(f"{os.path.join(folder, 'config.json')} is not a complete AutoencoderDC config "
                         f"({type(e).__name__}: {str(e)[:80]})") from None


# Copied from sana.py: load_vae
def load_vae(folder, *, device="cpu", dtype=torch.float32):
    """A diffusers AutoencoderDC folder (the vae/ of the SANA pipelines)."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    cfg = read_vae_config(folder)
    with torch.device("meta"):
        model = DCAE(cfg)
    load_state_dict_strict(model, load_safetensors_dir(folder), folder)
    return model.to(device=device, dtype=dtype).eval()


# Copied from sana.py: pipeline_configs with PRESETS->SANA_PRESETS
def pipeline_configs(folder):
    """(SanaConfig, DCAEConfig) of a diffusers pipeline folder, from its config files alone: sizes and memory
    can be checked with them before any weights are read."""
    if not os.path.exists(folder):
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is a file; give the diffusers pipeline folder as downloaded (transformer/ "
                         f"text_encoder/ tokenizer/ vae/), or load an original .pth with sana.load_transformer()")
    for sub in ("transformer", "text_encoder", "tokenizer", "vae"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise ValueError(f"{folder} is not a SANA diffusers folder: it has no {sub}/ subfolder")
    return read_transformer_config(os.path.join(folder, "transformer")), read_vae_config(os.path.join(folder, "vae"))


# Copied from sana.py: shift_sigma
def shift_sigma(sigma, s):
    return s * sigma / (1 + (s - 1) * sigma)  # more steps at high noise for bigger images (SD3 / SANA time shift)


# Copied from sana.py: flow_dpm_schedule
def flow_dpm_schedule(steps, shift):
    """diffusers' DPMSolverMultistepScheduler(use_flow_sigmas=True): sigmas uniform in (0, 0.999], shifted,
    then 0 appended; the model gets floor(1000 sigma) as an int64."""
    sigma = shift_sigma(1 - torch.linspace(1, 1 / 1000, steps + 1, dtype=torch.float64), shift).flip(0)[:-1]
    timesteps = (sigma * 1000).long()  # truncated: the first is 999, not 1000
    return torch.cat([sigma, sigma.new_zeros(1)]).float(), timesteps


# Copied from sana.py: flow_euler_schedule
def flow_euler_schedule(steps, shift):
    """diffusers' FlowMatchEulerDiscreteScheduler(shift): linspace from 1 to the shifted 1/1000 of the training
    grid, shifted again (a quirk), float timesteps 1000 sigma."""
    sigma_min = shift_sigma(torch.tensor(1 / 1000, dtype=torch.float32), shift).item()
    sigma = shift_sigma(torch.linspace(1.0, sigma_min, steps, dtype=torch.float64), shift).float()
    return torch.cat([sigma, sigma.new_zeros(1)]), sigma * 1000


# Copied from sana.py: sample_flow_dpm
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


# Copied from sana.py: sample_flow_euler
def sample_flow_euler(velocity, x, sigmas, timesteps, callback=None):
    for i, t in enumerate(timesteps):
        x = x + (sigmas[i + 1] - sigmas[i]).item() * velocity(x, t)
        if callback:
            callback(i, x)
    return x


# Copied from sana.py: guided_velocity
def guided_velocity(model, cond, uncond, scale):
    """v = v_u + w (v_c - v_u) (CFG), one batched call in the order [uncond, cond]. cond/uncond: (y, mask)."""
    y, mask = torch.cat([uncond[0], cond[0]]), torch.cat([uncond[1], cond[1]])

    def velocity(x, t):
        v_u, v_c = model(torch.cat([x, x]), t.expand(2 * x.shape[0]).to(x.device), y, mask).float().chunk(2)
        return v_u + scale * (v_c - v_u)
    return velocity


# Copied from sana.py: _AR_BINS
_AR_BINS = [(8, 32), (8, 31), (8, 30), (8, 29), (9, 28), (9, 27), (9, 26), (10, 25), (10, 24), (11, 23), (11, 22),
            (11, 21), (12, 21), (12, 20), (13, 19), (13, 18), (14, 18), (14, 17), (15, 17), (15, 16), (16, 16),
            (16, 15), (17, 15), (17, 14), (18, 14), (18, 13), (19, 13), (20, 12), (21, 12), (22, 11), (23, 11),
            (24, 10), (25, 10), (26, 9), (27, 9), (28, 9), (29, 8), (30, 8), (31, 8), (32, 8)]


# Copied from sana.py: _NOT_IN_SMALL_BINS
_NOT_IN_SMALL_BINS = {(8, 31), (8, 30), (26, 9), (28, 9), (29, 8), (30, 8), (31, 8)}


# Copied from sana.py: aspect_ratio_bin
def aspect_ratio_bin(height, width, base):
    """Snap (height, width) to the closest trained aspect ratio at base resolution base (512/1024/2048/4096)."""
    bins = [hw for hw in _AR_BINS if base >= 2048 or hw not in _NOT_IN_SMALL_BINS]
    best = min(bins, key=lambda hw: abs(round(hw[0] / hw[1], 2) - height / width))  # first wins on ties
    return best[0] * base // 16, best[1] * base // 16


# Copied from sana.py: generation_size
def generation_size(cfg, f, height, width, resolution_binning=True):
    """The (height, width) in pixels the model generates for a request: with binning, a published model's
    closest trained aspect ratio at its training resolution (the image is resized to the request after). f: the
    pixels per token (the DC-AE's compression x the patch size); sample_size counts latent cells."""
    base = cfg.sample_size * f // cfg.patch_size
    if resolution_binning and base in (512, 1024, 2048, 4096):
        return aspect_ratio_bin(height, width, base)
    return height, width


# Copied from sana.py: check_size
def check_size(height, width, f):
    """The model makes images whose sides are multiples of f, the pixels per latent cell."""
    if height <= 0 or width <= 0 or height % f or width % f:
        raise ValueError(f"height and width must be positive multiples of {f} for this model, got {height}x{width}")


# Copied from sana.py: generation_bytes
def generation_bytes(cfg, vae_cfg, height, width, dtype, batch=1, tile=None):
    """Roughly the peak memory of one generation in bytes: ten tensors (measured on the CPU: 6-9) of the widest
    activation of its largest phase: a DiT step (2B rows under CFG, N tokens, Mix-FFN's 5D channels), the DC-AE
    decode (widths[i] channels at (H/2^i, W/2^i) pixels, 8x in an EfficientViT stage's GLUMBConv; pixels of one
    tile when it decodes in tiles of side `tile`), or the float32 output image at the size asked."""
    f = vae_cfg.compression * cfg.patch_size
    gh, gw = generation_size(cfg, f, height, width)
    size = torch.finfo(dtype).bits // 8
    dit = 2 * batch * (gh // f) * (gw // f) * 5 * cfg.hidden_size * size
    th, tw = (min(gh, tile), min(gw, tile)) if tile else (gh, gw)
    stages = zip(vae_cfg.widths, vae_cfg.decoder_blocks, vae_cfg.decoder_depths)
    decode = batch * size * max(c * (1 if kind == "ResBlock" else 8) * (th >> i) * (tw >> i)
                                for i, (c, kind, depth) in enumerate(stages) if depth > 0)
    image = batch * 3 * height * width * 4
    return 10 * max(dit, decode, image)


# Copied from sana.py: Sana
@dataclass
class Sana:
    transformer: SanaTransformer
    text_encoder: Gemma2
    tokenizer: object  # tokenizers.Tokenizer
    vae: DCAE
    vae_scale: float = VAE_SCALE
    chi: str = CHI  # None: no complex human instruction (the tiny default)
    max_len: int = MAX_TEXT_LEN
    guidance_scale: float = 4.5  # the diffusers pipelines' default (the tiny default: 2.0)
    vae_tile: int = None  # decode in tiles of this side in pixels (DCAE.decode; None: in one pass)
    vae_tile_overlap: int = None  # their overlap in pixels (None: the DC-AE's default)

    @property
    def compression(self):  # pixels per latent cell side
        return self.vae.cfg.compression * self.transformer.cfg.patch_size

    @torch.no_grad()
    def generate(self, prompts, height, width, steps=20, guidance_scale=None, generator=None, sampler="dpm",
                 negative_prompt="", resolution_binning=True, model=None, callback=None):
        """prompts: list of str -> uint8 images (B, height, width, 3). The initial noise comes from `generator`.
        model(x, t, y, mask) -> v is the network the sampler calls, by default the transformer; a ControlNet
        steers it from outside (control_model, section 9). callback(i, x) after each step (the CLI's progress)."""
        if any(not p.strip() for p in prompts):
            raise ValueError("the prompt is empty")
        f, cfg = self.compression, self.transformer.cfg
        check_size(height, width, f)
        out_hw = (height, width)
        height, width = generation_size(cfg, f, height, width, resolution_binning)
        device = self.transformer.proj_out.weight.device
        dtype = self.transformer.proj_out.weight.dtype
        cond = encode_prompts(self.text_encoder, self.tokenizer, prompts, self.max_len, self.chi)
        # unconditional input: the negative prompt without the CHI ("" = BOS then padding, the mask keeps BOS)
        uncond = encode_prompts(self.text_encoder, self.tokenizer, [negative_prompt] * len(prompts), self.max_len,
                                chi=None)
        cond, uncond = [(y.to(dtype), m) for y, m in (cond, uncond)]
        a = self.vae.cfg.compression  # latent cells per pixel side (f / patch size)
        x = torch.randn(len(prompts), cfg.in_channels, height // a, width // a, generator=generator,
                        device=generator.device if generator else "cpu").to(device)  # fp32 latents
        schedule, solve = {"dpm": (flow_dpm_schedule, sample_flow_dpm),
                           "euler": (flow_euler_schedule, sample_flow_euler)}[sampler]
        sigmas, timesteps = schedule(steps, cfg.flow_shift)
        model = model or self.transformer
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        x = solve(guided_velocity(lambda x, t, y, m: model(x.to(dtype), t, y, m), cond, uncond, scale), x, sigmas,
                  timesteps, callback)
        z = (x / self.vae_scale).to(next(self.vae.parameters()).dtype)
        img = self.vae.decode(z, self.vae_tile, self.vae_tile_overlap).float()
        if img.shape[-2:] != out_hw:  # undo the binning: resize to cover, then center-crop
            r = max(out_hw[0] / img.shape[-2], out_hw[1] / img.shape[-1])
            img = F.interpolate(img, size=(int(img.shape[-2] * r), int(img.shape[-1] * r)), mode="bilinear")
            top, left = (img.shape[-2] - out_hw[0]) // 2, (img.shape[-1] - out_hw[1]) // 2
            img = img[..., top:top + out_hw[0], left:left + out_hw[1]]
        if not torch.isfinite(img).all():  # it would be written as black
            raise ValueError("the image came out NaN or inf: broken weights, or a guidance scale too large for the "
                             "dtype")
        return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


# Copied from sana.py: load_pipeline
def load_pipeline(folder, preset=None, *, device="cpu", dtype=torch.float32):
    """A published diffusers pipeline folder as downloaded: transformer/ text_encoder/ tokenizer/ vae/, and the
    flow shift of scheduler/ when there is one."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    pipeline_configs(folder)  # the folder's layout and configs, checked before any weights are read
    transformer = load_transformer(folder, preset or preset_from_name(folder), device=device, dtype=dtype)
    sched = os.path.join(folder, "scheduler", "scheduler_config.json")
    if os.path.isfile(sched):  # the flow shift the checkpoint ships with
        s = read_json(sched)
        transformer.cfg = replace(transformer.cfg, flow_shift=s.get("flow_shift") or s.get("shift") or 3.0)
    return Sana(transformer, load_text_encoder(os.path.join(folder, "text_encoder"), device=device, dtype=dtype),
                load_tokenizer(os.path.join(folder, "tokenizer", "tokenizer.json")),
                load_vae(os.path.join(folder, "vae"), device=device, dtype=dtype))


# Copied from sana.py: TINY_GEMMA
TINY_GEMMA = Gemma2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16)


# Copied from sana.py: TINY_TEXT_LEN
TINY_TEXT_LEN = 10  # the longest caption, "three yellow triangles on a green background", is 7 words + BOS


# Copied from sana.py: TINY_WORDS
TINY_WORDS = sorted(set(COUNT_WORDS) | set(SHAPE_COLORS) | set(SHAPES) | {s + "s" for s in SHAPES}
                    | {"on", "background"})  # the captions' vocabulary


# Copied from sana.py: TINY_GRAMMAR
TINY_GRAMMAR = (f'prompts of the form "a/two/three <colour> <shape>[s] on a <colour> background" with the colours '
                f'{", ".join(COLORS)} and the shapes {", ".join(SHAPES)}, e.g. "two red circles on a blue background"')


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


# Copied from sana.py: tiny_pipeline
def tiny_pipeline(transformer, text_encoder, tokenizer, vae):
    """The tiny default as a `Sana` pipeline: no CHI, 10 text tokens, guidance 2.0 (chosen on a prompt set apart
    from the README's)."""
    return Sana(transformer.eval(), text_encoder.eval(), tokenizer, vae, vae_scale=vae.cfg.scaling_factor, chi=None,
                max_len=TINY_TEXT_LEN, guidance_scale=2.0)


# Copied from sana.py: read_tiny with TINY_WEIGHTS->TINY_SANA
def read_tiny(path=TINY_SANA):
    """A tiny weights file -> {"transformer": state dict, "text_encoder": state dict}."""
    if not os.path.isfile(path):
        hint = (": it comes with the repository's weights/ folder, or `python sana.py --train --train-out "
                f"{path}` makes it") if os.path.abspath(path) == TINY_SANA else ""
        raise FileNotFoundError(f"{path} is missing{hint}")
    sd = read_weights(path)
    parts = {name: {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
             for name in ("transformer", "text_encoder")}
    if not all(parts.values()):
        raise ValueError(f"{path} is not a tiny SANA written by `python sana.py --train` (it holds no "
                         f"transformer.* and text_encoder.* weights)")
    return parts


# Copied from sana.py: tiny_depth
def tiny_depth(parts):
    """The DiT's blocks in read_tiny's parts: the recipe's 4, or more or fewer when grown (--grow) or pruned."""
    return len({k.split(".")[1] for k in parts["transformer"] if k.startswith("transformer_blocks.")})


# Copied from sana.py: load_tiny with TINY_WEIGHTS->TINY_SANA, PRESETS->SANA_PRESETS
def load_tiny(path=TINY_SANA, *, device="cpu", dtype=torch.float32):
    """The committed tiny default (trained by `python sana.py --train`), or another tiny weights file: the DiT, the
    Gemma-2-shaped text encoder, the word-level tokenizer beside the weights, and the tiny DC-AE."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    parts = read_tiny(path)
    # built on the CPU (3 MB of weights initialize in 30 ms; a first use of the meta device imports PyTorch's
    # Python decompositions, 2 s)
    transformer = SanaTransformer(replace(SANA_PRESETS["tiny"], depth=tiny_depth(parts)))
    text_encoder = Gemma2(TINY_GEMMA)
    load_state_dict_strict(transformer, parts["transformer"], path)
    load_state_dict_strict(text_encoder, parts["text_encoder"], path)
    tokenizer = load_tokenizer(os.path.splitext(path)[0] + "_tokenizer.json")
    return tiny_pipeline(transformer.to(device=device, dtype=dtype), text_encoder.to(device=device, dtype=dtype),
                         tokenizer, load_tiny_dcae(device=device, dtype=dtype))


# Copied from sana.py: pick_device_dtype
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


# Copied from dcae.py: TILE
TILE = 512  # --tile's side alone, as diffusers' enable_tiling()
# Copied from dcae.py: AUTO_TILE_SIDE
AUTO_TILE_SIDE = 2048  # images of more pixels than AUTO_TILE_SIDE^2 are tiled unless --tile 0 (docs/dcae.md: memory)


# Copied from dcae.py: cli_tile
def cli_tile(tile, overlap, f, height, width):
    """--tile / --tile-overlap for an image of height x width: the tile side to encode and decode with (None: in one
    pass), as given (0: never), or TILE above AUTO_TILE_SIDE^2 pixels; one sentence for sizes that a DC-AE of
    compression f cannot tile with."""
    tile = tile if tile is not None else TILE if height * width > AUTO_TILE_SIDE**2 else 0
    DCAE.tile_overlap(tile or TILE, overlap, f)
    return tile or None


# ----------------------------------------------------------------------------------------------------------
# 7. Checkpoint loading: nunchaku's layout
# ----------------------------------------------------------------------------------------------------------
# Nunchaku stores each W4A4 layer padded to multiples of 128 (N and K) and in the order its CUDA kernel reads
# (ref B.3-B.6): the codes in 128 x 64 tiles, each the 4 KiB that one warp loads as its MMA fragments; every
# per-output-channel vector (scales, bias, smooth) permuted within blocks of 128 so that each lane finds its
# accumulator columns side by side; the branch in 16 x 16 tiles. Index names follow the ref: a code C[n, k] has
# n = 128 nt + 16 p + 8 s + l and k = 64 kt + 32 t + 8 j + e, stored in the order (nt, kt, p, l, j, s, t, e),
# eight e to a little-endian 32-bit word.

def pad_to(x, multiples, value=0.0):
    """Pads each dim of x at its end to a multiple of multiples[dim] (None: leave it)."""
    pads = []
    for size, m in reversed(list(zip(x.shape, multiples))):
        pads += [0, 0 if m is None else -size % m]
    return F.pad(x, pads, value=value)


def pack_qweight(codes):
    """(N, K) 4-bit codes (int8 INT4 or uint8 E2M1), N and K multiples of 128 -> int8 (N, K / 2)."""
    N, K = codes.shape
    c = (codes.to(torch.int64) & 15).view(N // 128, 8, 2, 8, K // 64, 2, 4, 8)  # (nt, p, s, l, kt, t, j, e)
    c = c.permute(0, 4, 1, 3, 6, 2, 5, 7).reshape(-1, 8)  # (nt, kt, p, l, j, s, t, e)
    words = (c << (4 * torch.arange(8, device=c.device))).sum(-1)  # e = 0 in bits 0-3
    words = (words - (words >= 2**31) * 2**32).to(torch.int32)  # as a signed int32
    return words.view(torch.int8).view(N, K // 2)


def unpack_qweight(qweight, signed):
    """Inverse of pack_qweight: int8 (N, K / 2) -> (N, K) int8 (INT4, sign-extended) or uint8 (E2M1 codes)."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    words = qweight.contiguous().view(torch.int32).reshape(-1).to(torch.int64) & 0xFFFFFFFF
    c = (words[:, None] >> (4 * torch.arange(8, device=words.device))) & 15  # (words, e)
    c = c.view(N // 128, K // 64, 8, 8, 4, 2, 2, 8).permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(N, K)
    return (c - 16 * (c >= 8)).to(torch.int8) if signed else c.to(torch.uint8)


def pack_vector(v):
    """Per-output-channel values (N, G) (G groups; G = 1 for bias and smooth), N a multiple of 128 -> (G, N):
    blocks of 128 channels, group inside, and n = 128 nt + 16 a + 8 b + 2 c + d at 16 a + 4 c + 2 b + d."""
    N, G = v.shape
    return v.reshape(N // 128, 8, 2, 4, 2, G).permute(0, 5, 1, 3, 2, 4).reshape(G, N)


def unpack_vector(p):
    """Inverse of pack_vector: (G, N) or (N,) -> (N, G)."""
    G, N = (1, p.shape[0]) if p.dim() == 1 else p.shape
    return p.reshape(N // 128, G, 8, 4, 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(N, G)


def pack_fp8_scales(v):
    """NVFP4's FP8 group scales (N, G), G a multiple of 4 -> (G, N): per 128 channels and 64-wide K step, the 4
    scales of one channel in one 32-bit word, n = 128 nt + 32 sp + 8 c + l stored as (nt, kt, l, c, sp, jj)."""
    N, G = v.shape
    return v.view(torch.uint8).reshape(N // 128, 4, 4, 8, G // 4, 4).permute(0, 4, 3, 2, 1, 5) \
        .reshape(G, N).view(v.dtype)


def unpack_fp8_scales(p):
    G, N = p.shape
    return p.view(torch.uint8).reshape(N // 128, G // 4, 8, 4, 4, 4).permute(0, 4, 3, 2, 1, 5) \
        .reshape(N, G).view(p.dtype)


def pack_lowrank(m, rows_outer):
    """A branch matrix (R, C), both multiples of 16, in 16 x 16 tiles: row 8 s + l, column 8 t + 2 j + e inside
    a tile, stored (l, j, s, t, e); tiles row-block-major if rows_outer (up: (N, r)) else column-block-major
    (down: (r, K)). Returns the nominal shape: (N, r) for up, (K, r) for down."""
    R, C = m.shape
    t = m.reshape(R // 16, 2, 8, C // 16, 2, 4, 2)  # (rb, s, l, cb, t, j, e)
    t = t.permute(0, 3, 2, 5, 1, 4, 6) if rows_outer else t.permute(3, 0, 2, 5, 1, 4, 6)
    return t.reshape((R, C) if rows_outer else (C, R))


def unpack_lowrank(p, rows_outer):
    """Inverse of pack_lowrank: the nominal (N, r) / (K, r) -> up (N, r) / down (r, K)."""
    R, C = p.shape if rows_outer else p.shape[::-1]
    t = p.reshape(-1, 8, 4, 2, 2, 2)  # (tile, l, j, s, t, e)
    if rows_outer:
        t = t.reshape(R // 16, C // 16, 8, 4, 2, 2, 2).permute(0, 4, 2, 1, 5, 3, 6)
    else:
        t = t.reshape(C // 16, R // 16, 8, 4, 2, 2, 2).permute(1, 4, 2, 0, 5, 3, 6)
    return t.reshape(R, C)


def to_nunchaku(layer, dtype=torch.bfloat16):
    """A W4A4Linear -> nunchaku's tensors for it (legacy key names, as the single-file SANA checkpoint has them):
    qweight, wscales, [wtscale,] [bias,] smooth, smooth_orig, lora_down, lora_up; padded as the official converter
    pads (scales, smooth and bias with 1, the rest with 0)."""
    int4 = layer.precision == "int4"
    codes = unpack_nibbles(layer.qweight, layer.in_features, signed=int4)
    K_pad = math.ceil(layer.in_features / 128) * 128
    scales = pad_to(layer.wscales.float(), (128, None), 1.0)
    scales = F.pad(scales, (0, K_pad // GROUP_SIZE[layer.precision] - scales.shape[1]), value=1.0)
    out = {"qweight": pack_qweight(pad_to(codes, (128, 128)))}
    if int4:
        out["wscales"] = pack_vector(scales).to(dtype)
    else:
        out["wscales"] = pack_fp8_scales(scales.to(torch.float8_e4m3fn))
        out["wtscale"] = layer.wtscale.reshape(1).to(dtype)
    if layer.bias is not None:
        out["bias"] = pack_vector(pad_to(layer.bias.float(), (128,), 1.0)[:, None]).reshape(-1).to(dtype)
    smooth = pack_vector(pad_to(layer.smooth.float(), (128,), 1.0)[:, None]).reshape(-1).to(dtype)
    out["smooth"], out["smooth_orig"] = smooth, smooth.clone()
    if layer.proj_up.shape[1]:  # the branch, its rank padded to a multiple of 16
        down = pad_to(layer.proj_down.float().T, (16, 128))  # (r_pad, K_pad)
        out["lora_down"] = pack_lowrank(down, rows_outer=False).to(dtype)
        out["lora_up"] = pack_lowrank(pad_to(layer.proj_up.float(), (128, 16)), rows_outer=True).to(dtype)
    return out


def from_nunchaku(sd, in_features, out_features, conv=False):
    """nunchaku's tensors of one layer (as `to_nunchaku` writes them) -> a W4A4Linear, padding cropped: the true
    N and K (the caller's), and the branch's true rank. The converter pads the rank with zero columns to a multiple of
    16 (rank 24 is stored as 32), which the file does not record; the rank kept is that of the last column nonzero in
    down or up, at least r_pad - 15 (what pads to r_pad). Zero columns add nothing, so the output is the same."""
    nvfp4 = sd["wscales"].dtype == torch.float8_e4m3fn
    precision = "nvfp4" if nvfp4 else "int4"
    G = math.ceil(in_features / GROUP_SIZE[precision])
    rank = 0
    if "lora_up" in sd:
        down = unpack_lowrank(sd["lora_down"], rows_outer=False).float()[:, :in_features]  # (r_pad, K)
        up = unpack_lowrank(sd["lora_up"], rows_outer=True).float()[:out_features]  # (N, r_pad)
        used = ((down != 0).any(1) | (up != 0).any(0)).nonzero()
        rank = max(int(used.max()) + 1 if len(used) else 0, up.shape[1] - 15)
    layer = W4A4Linear(in_features, out_features, rank, precision, "bias" in sd, conv)
    codes = unpack_qweight(sd["qweight"], signed=not nvfp4)[:out_features, :in_features]
    layer.qweight = pack_nibbles(codes)
    if nvfp4:
        layer.wscales = unpack_fp8_scales(sd["wscales"])[:out_features, :G]
        layer.wtscale = sd["wtscale"].float().reshape(())
    else:
        layer.wscales = unpack_vector(sd["wscales"]).float()[:out_features, :G]
    if "bias" in sd:
        layer.bias = unpack_vector(sd["bias"]).float()[:out_features, 0]
    layer.smooth = unpack_vector(sd["smooth"]).float()[:in_features, 0]
    if rank:
        layer.proj_down, layer.proj_up = down[:rank].T.contiguous(), up[:, :rank].contiguous()
    return layer


def diffusers_config(cfg):
    """SanaConfig -> the SanaTransformer2DModel config.json that nunchaku's single file carries as metadata."""
    D = cfg.hidden_size
    return {"_class_name": "SanaTransformer2DModel", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "num_attention_heads": cfg.num_heads, "attention_head_dim": D // cfg.num_heads,
            "num_cross_attention_heads": cfg.cross_heads, "cross_attention_head_dim": D // cfg.cross_heads,
            "num_layers": cfg.depth, "caption_channels": cfg.caption_channels, "mlp_ratio": cfg.mlp_ratio,
            "patch_size": cfg.patch_size, "sample_size": cfg.sample_size, "norm_eps": 1e-6,
            "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None,
            "interpolation_scale": cfg.interpolation_scale}


def padded_dims(cfg):
    """(D_pad, H_pad) of nunchaku's SANA: the width padded to 128 per projection (72 heads of 32 for 2240; a single
    pad of the fused 3 x 2240 rows gives 6784, which does not load: nunchaku issue #488), the Mix-FFN hidden to 64."""
    D, H = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    return math.ceil(D / 128) * 128, math.ceil(H / 64) * 64


def stack_rows(layers, rows, conv=False):
    """W4A4Linears that share s and the down projection (q, k and v; the Mix-FFN's value and gate halves) -> one
    W4A4Linear, each part padded with zero rows to `rows` output channels."""
    first = layers[0]
    out = W4A4Linear(first.in_features, rows * len(layers), first.proj_up.shape[1], first.precision,
                     first.bias is not None, conv)
    for name in ("qweight", "wscales", "proj_up", "bias"):
        if getattr(first, name) is not None:
            parts = [pad_to(getattr(m, name).float(), (rows, None) if name != "bias" else (rows,)) for m in layers]
            setattr(out, name, torch.cat(parts).to(getattr(first, name).dtype))
    out.smooth, out.proj_down, out.wtscale = first.smooth, first.proj_down, first.wtscale
    return out


def take_rows(layer, start, size, conv=False):
    """Output channels [start, start + size) of a W4A4Linear, as a W4A4Linear (inverse of stack_rows)."""
    part = W4A4Linear(layer.in_features, size, layer.proj_up.shape[1], layer.precision, layer.bias is not None, conv)
    rows = slice(start, start + size)
    part.qweight, part.wscales, part.proj_up = layer.qweight[rows], layer.wscales[rows], layer.proj_up[rows]
    part.bias = None if layer.bias is None else layer.bias[rows]
    part.smooth, part.proj_down, part.wtscale = layer.smooth, layer.proj_down, layer.wtscale
    return part


def to_nunchaku_sana(model, dtype=torch.bfloat16):
    """A quantized SanaTransformer -> nunchaku's single-file state dict: the blocks' W4A4 layers in the packed
    layout under nunchaku's names (ref B.2), everything else 16-bit under the diffusers names."""
    H = int(model.cfg.hidden_size * model.cfg.mlp_ratio)
    D_pad, H_pad = padded_dims(model.cfg)
    sd = {k: v.to(dtype) for k, v in model.state_dict().items() if not k.startswith("transformer_blocks.")}
    for i, block in enumerate(model.transformer_blocks):
        a1, a2, ff = block.attn1, block.attn2, block.ff
        inv = ff.conv_inverted
        layers = {"attn.qkv_proj": stack_rows([a1.to_q, a1.to_k, a1.to_v], D_pad), "attn.out_proj": a1.to_out[0],
                  "cross_attn.q_linear": a2.to_q, "cross_attn.out_proj": a2.to_out[0],
                  "ff.inverted_conv": stack_rows([take_rows(inv, 0, H), take_rows(inv, H, H)], H_pad),
                  "ff.point_conv": ff.conv_point}
        p = f"transformer_blocks.{i}."
        for name, layer in layers.items():
            sd.update({f"{p}{name}.{k}": v for k, v in to_nunchaku(layer, dtype).items()})
        sd[p + "cross_attn.kv_linear.weight"] = torch.cat([a2.to_k.weight, a2.to_v.weight]).to(dtype)
        sd[p + "cross_attn.kv_linear.bias"] = torch.cat([a2.to_k.bias, a2.to_v.bias]).to(dtype)
        w, b = ff.conv_depth.weight, ff.conv_depth.bias  # (2H, 1, 3, 3), each half padded to H_pad
        w = torch.cat([pad_to(w[:H], (H_pad, None, None, None)), pad_to(w[H:], (H_pad, None, None, None))])
        sd[p + "ff.depth_conv.weight"] = w.permute(0, 2, 3, 1).to(dtype).contiguous()  # (C, 3, 3, 1)
        sd[p + "ff.depth_conv.bias"] = torch.cat([pad_to(b[:H], (H_pad,)), pad_to(b[H:], (H_pad,))]).to(dtype)
        sd[p + "scale_shift_table"] = block.scale_shift_table.to(dtype)
    return sd


def save_nunchaku(model, path, dtype=torch.bfloat16):
    """Writes nunchaku's single-file format: the state dict above and the metadata its loader reads."""
    layer = model.transformer_blocks[0].attn1.to_out[0]
    quant = {"method": "svdquant", "weight": {"dtype": "int4" if layer.precision == "int4" else "fp4_e2m1_all",
                                              "scale_dtype": None if layer.precision == "int4" else
                                              [None, "fp8_e4m3_nan"], "group_size": GROUP_SIZE[layer.precision]},
             "activation": {"dtype": "int4" if layer.precision == "int4" else "fp4_e2m1_all",
                            "scale_dtype": None if layer.precision == "int4" else "fp8_e4m3_nan",
                            "group_size": GROUP_SIZE[layer.precision]}}
    save_weights(to_nunchaku_sana(model, dtype), path, metadata={
        "config": json.dumps(diffusers_config(model.cfg)), "quantization_config": json.dumps(quant),
        "model_class": "NunchakuSanaTransformer2DModel"})


def load_nunchaku(path, *, device="cpu", dtype=torch.float32):
    """nunchaku's single-file SANA checkpoint (the published svdq-int4_r32-sana1.6b.safetensors, or one that
    `save_nunchaku` wrote) -> a quantized SanaTransformer. Strict: missing and unexpected keys are named."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    meta = read_metadata(path)
    if "config" not in meta:
        raise ValueError(f"{path} has no 'config' metadata: not a nunchaku single-file checkpoint (a legacy "
                         f"folder converts with nunchaku.merge_safetensors)")
    try:
        cfg = check_config(config_from_diffusers(json.loads(meta["config"])), f"{path}'s metadata")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: its 'config' metadata is not a SANA transformer config ({type(e).__name__}: "
                         f"{str(e)[:60]})") from None
    sd = read_weights(path)
    precision = "int4" if not any(v.dtype == torch.float8_e4m3fn for v in sd.values()) else "nvfp4"
    rank = next((v.shape[1] for k, v in sd.items() if k.endswith(".lora_up")), 0)
    model = quantized_sana(cfg, precision, rank, device="meta")
    # strict: the file must hold exactly the layout save_nunchaku writes for this config (smooth_orig optional)
    expected = {k: v.shape for k, v in to_nunchaku_sana(model).items()
                if k in sd or not k.endswith(".smooth_orig")}
    check_state_dict(expected, sd, path, f"nunchaku's {precision} r{rank} SANA layout of its config")
    D, H = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    D_pad, H_pad = padded_dims(cfg)
    plain = {}  # the model's 16-bit tensors under its own names
    for i, block in enumerate(model.transformer_blocks):
        p = f"transformer_blocks.{i}."

        def take(name):  # one layer's tensors, without its prefix
            return {k[len(p) + len(name) + 1:]: sd.pop(k) for k in [k for k in sd if k.startswith(f"{p}{name}.")]}
        a1, a2, ff = block.attn1, block.attn2, block.ff
        qkv = from_nunchaku(take("attn.qkv_proj"), D, 3 * D_pad)
        a1.to_q, a1.to_k, a1.to_v = (take_rows(qkv, j * D_pad, D) for j in range(3))
        a1.to_out[0] = from_nunchaku(take("attn.out_proj"), D, D)
        a2.to_q = from_nunchaku(take("cross_attn.q_linear"), D, D)
        a2.to_out[0] = from_nunchaku(take("cross_attn.out_proj"), D, D)
        inv = from_nunchaku(take("ff.inverted_conv"), D, 2 * H_pad)
        ff.conv_inverted = stack_rows([take_rows(inv, 0, H), take_rows(inv, H_pad, H)], H, conv=True)
        ff.conv_point = from_nunchaku(take("ff.point_conv"), H, D, conv=True)
        kv = take("cross_attn.kv_linear")
        plain.update({f"{p}attn2.to_k.weight": kv["weight"][:D], f"{p}attn2.to_v.weight": kv["weight"][D:],
                      f"{p}attn2.to_k.bias": kv["bias"][:D], f"{p}attn2.to_v.bias": kv["bias"][D:]})
        dw = take("ff.depth_conv")
        w, b = dw["weight"].permute(0, 3, 1, 2), dw["bias"]  # (2 H_pad, 1, 3, 3)
        plain[f"{p}ff.conv_depth.weight"] = torch.cat([w[:H], w[H_pad:H_pad + H]])
        plain[f"{p}ff.conv_depth.bias"] = torch.cat([b[:H], b[H_pad:H_pad + H]])
    plain.update(sd)  # what is left: the embeddings, the blocks' tables and the final layer, under diffusers names
    plain.update({f"{name}.{k}": v for name, m in model.named_modules() if isinstance(m, W4A4Linear)
                  for k, v in m.state_dict().items()})  # the layers just built
    load_state_dict_strict(model, plain, path)
    return model.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------------------
# 8. Pipeline: the 16-bit pipeline and its quantized transformer
# ----------------------------------------------------------------------------------------------------------


def load_quantized_pipeline(path, base, preset=None, *, device="cpu", dtype=torch.float32):
    """nunchaku's single-file transformer `path` (the published one, or one `save_nunchaku` wrote) with `base`, the
    16-bit SANA diffusers folder it was quantized from -> (pipe, quantized transformer). pipe holds the text
    encoder, tokenizer, VAE and the 16-bit transformer; `generate(pipe, transformer, ...)` samples the quantized
    one with the flow shift of base's scheduler (a sampler setting, which nunchaku's file does not carry)."""
    pipe = load_pipeline(base, preset, device=device, dtype=dtype)
    transformer = load_nunchaku(path, device=device, dtype=dtype)
    transformer.cfg = replace(transformer.cfg, flow_shift=pipe.transformer.cfg.flow_shift)
    return pipe, transformer


def psnr(a, b):
    """Peak signal-to-noise ratio in dB of two uint8 images (..., H, W, 3)."""
    mse = (a.float() - b.float()).pow(2).mean()
    return float("inf") if mse == 0 else (10 * torch.log10(255.0**2 / mse)).item()


# ----------------------------------------------------------------------------------------------------------
# 9. Beyond the paper's core: LoRA
# ----------------------------------------------------------------------------------------------------------
# LoRA on a quantized model, as nunchaku runs it (paper Sec. 5, "seamless LoRA integration"): a LoRA is one more
# low-rank branch, so it joins the 16-bit branch along the rank, and the fused kernel runs both in one.


@torch.no_grad()
def merge_lora(layer, down, up, strength=1.0):
    """Adds a LoRA (down (r', K), up (N, r'), x -> strength * (x down^T) up^T) to a W4A4Linear's 16-bit branch,
    along the rank (ref D): the 4-bit residual and s stay as they are, no re-quantization. The branch already acts
    on the raw x, so the LoRA's down projection needs no smoothing correction. Returns the layer."""
    layer.proj_down = torch.cat([layer.proj_down, down.T.to(layer.proj_down.dtype)], dim=1)  # (K, r + r')
    layer.proj_up = torch.cat([layer.proj_up, (strength * up).to(layer.proj_up.dtype)], dim=1)  # (N, r + r')
    return layer


# A LoRA file as sana.py writes it (`--train --data`) or diffusers/peft save it: its keys are SanaTransformer2DModel's
# module names, which the quantized model keeps (section 3 swaps W4A4Linears in under the same names).
# Copied from sana.py: LORA_METADATA
LORA_METADATA = "lora_adapter_metadata"  # the safetensors metadata key of peft's LoraConfig (diffusers' lora_base)


# Copied from sana.py: LoRA
class LoRA(nn.Module):
    """A frozen nn.Linear or 1x1 nn.Conv2d, its weight and bias kept under their own key names, plus the update
    y += (alpha / r) B(A(x)) (peft's lora.Linear / lora.Conv2d: A and B are layers of the base's kind, so their keys
    and shapes are peft's). The branch runs in A's dtype (float32 beside a bfloat16 model), as peft's does."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.conv = isinstance(base, nn.Conv2d)
        self.weight, self.bias = base.weight, base.bias
        N, K = base.weight.shape[:2]
        layer = (lambda i, o: nn.Conv2d(i, o, 1, bias=False)) if self.conv else (lambda i, o: nn.Linear(i, o, bias=False))
        self.lora_A, self.lora_B = layer(K, rank), layer(rank, N)
        nn.init.normal_(self.lora_A.weight, std=1 / rank)  # peft's init_lora_weights="gaussian", diffusers' choice
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, x):  # (..., K) -> (..., N), or (B, K, h, w) -> (B, N, h, w)
        y = F.conv2d(x, self.weight, self.bias) if self.conv else F.linear(x, self.weight, self.bias)
        return y + (self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scale).to(y.dtype)


# Copied from sana.py: adaptable
def adaptable(m):
    """LoRA here adapts nn.Linear and 1x1 nn.Conv2d layers (Mix-FFN's conv_inverted and conv_point)."""
    return isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1


# Copied from sana.py: read_lora
def read_lora(path):
    """A LoRA file, sana.py's or one saved by diffusers/peft -> {module name: (A (r, K), B (N, r), alpha / r)}, A and B
    2-D (a convolution's (r, K, 1, 1) flattened). Keys may start with "transformer." (diffusers' save_lora_weights),
    "base_model.model." (peft's save_pretrained) or neither (save_lora_adapter). alpha comes from peft's config in
    the metadata (lora_alpha, alpha_pattern), else equals the rank (diffusers' rule for a file without one: scale 1).
    One sentence for a file that is not such a LoRA."""
    sd = read_weights(path)
    if not path.endswith(".safetensors") or not sd:
        raise ValueError(f"--lora {path} is not a LoRA .safetensors file (diffusers' save_lora_weights writes one)")
    config = json.loads(read_metadata(path).get(LORA_METADATA) or "{}")
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    if config.get("use_dora") or config.get("use_rslora"):
        raise ValueError(f"--lora {path} is a {'DoRA' if config.get('use_dora') else 'rsLoRA'}, which sana.py does "
                         f"not implement (plain LoRA only)")
    pairs = {}
    for key, v in sd.items():
        m = re.fullmatch(r"(?:transformer\.|base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
        if not m:
            raise ValueError(f"--lora {path}: {key} is not a LoRA key (<module>.lora_A.weight / .lora_B.weight)")
        pairs.setdefault(m[1], {})[m[2]] = v.float().flatten(1)
    layers = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
            raise ValueError(f"--lora {path}: {name} needs a lora_A (r, K) and a lora_B (N, r) of the same rank r")
        r = ab["A"].shape[0]
        alpha = next((a for p, a in config.get("alpha_pattern", {}).items() if re.fullmatch(rf"(.*\.)?({p})", name)),
                     config.get("lora_alpha", r))
        layers[name] = (ab["A"], ab["B"], alpha / r)
    return layers


# Copied from sana.py: apply_lora
def apply_lora(model, layers, scale=1.0, path="the LoRA"):
    """Puts the LoRA layers of read_lora(path) on the model's, each update times `scale` (diffusers' lora scale,
    attention_kwargs={"scale": s}); one sentence for a layer the model lacks or a shape that does not fit."""
    own = dict(model.named_modules())
    for name, (A, B, s) in layers.items():
        m = own.get(name)
        if m is None or not adaptable(m):
            raise ValueError(f"--lora {path} adapts {name}, which this model does not have as a linear layer: a LoRA "
                             f"for another model?")
        N, K = m.weight.shape[:2]
        if A.shape[1] != K or B.shape[0] != N:
            raise ValueError(f"--lora {path}: {name} is ({N}, {K}) in this model, the LoRA's is ({B.shape[0]}, "
                             f"{A.shape[1]}): a LoRA for another model?")
        lora = LoRA(m, A.shape[0], 1.0)
        lora.lora_A.weight.data = A.reshape(lora.lora_A.weight.shape).to(m.weight)
        lora.lora_B.weight.data = B.reshape(lora.lora_B.weight.shape).to(m.weight)
        lora.scale = s * scale
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lora.requires_grad_(False))
    return model


def apply_lora_quantized(model, path, scale=1.0):
    """The LoRA of `path` on a quantized SANA: merged into the 16-bit branch of each W4A4Linear it adapts
    (merge_lora, its up projection times alpha / r), and as sana.py's LoRA on the layers kept in 16 bits (the text's
    K/V). Returns the model."""
    layers = read_lora(path)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, W4A4Linear)}
    for name, (A, B, s) in layers.items():
        if name in quantized:
            if A.shape[1] != quantized[name].in_features or B.shape[0] != quantized[name].out_features:
                raise ValueError(f"--lora {path}: {name} does not fit this model: a LoRA for another model?")
            merge_lora(quantized[name], A, s * B, scale)
    return apply_lora(model, {n: v for n, v in layers.items() if n not in quantized}, scale, path)


# ----------------------------------------------------------------------------------------------------------
# 10. Tiny default
# ----------------------------------------------------------------------------------------------------------
# The committed tiny SANA (sana.py's), quantized: its blocks are 192 wide, so the branch gets rank 16 (1/12 of the
# width; the published r32 is 1/70 of SANA-1.6B's 2240), and calibration samples 32 captions of its vocabulary.

TINY_WEIGHTS = os.path.join(HERE, "weights", "svdquant_tiny.safetensors")  # nunchaku's single-file format
TINY_QUANT = QuantConfig("int4", rank=16)
TINY_CALIB_PROMPTS = 32


def calibration_prompts(n, seed):
    """n captions of the tiny vocabulary, drawn like its training data from a seed of their own."""
    rng = random.Random(seed)
    return [shapes_caption(*random_scene(rng)) for _ in range(n)]


def quantize_tiny(method="svdquant", cfg=TINY_QUANT, seed=0, log=print, pipe=None):
    """The tiny SANA pipeline (`pipe`, or a fresh one) with its transformer replaced by a copy quantized by `method`
    (calibrated on TINY_CALIB_PROMPTS captions drawn from seed + 1000)."""
    pipe = pipe or load_tiny()
    pipe.transformer = quantize_pipeline(pipe, replace(cfg, **METHODS[method]),
                                         calibration_prompts(TINY_CALIB_PROMPTS, seed + 1000), seed=seed, log=log)
    return pipe


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


TINY_REFERENCE = "a 2-core Xeon with AMX"  # where TINY_SECONDS was measured
# the calibration and quantization there: measured by scripts/time_tiny_recipes.py
TINY_SECONDS = 21.9


def train_tiny(seed=0, out=TINY_WEIGHTS, log=print, *, steps=None):
    """SVDQuant's "training" is a calibration: quantize the committed tiny SANA with TINY_QUANT and write it in
    nunchaku's format, deterministically from the seed. Its one iterative phase is the refinement of each low-rank
    branch (up to 100 alternations, early stop): `steps` runs exactly that many instead (no early stop). Under
    torchrun every rank computes the same and rank 0 writes. Returns the quantized pipeline."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(max(1, 2 // world))
    log = log if rank == 0 else (lambda *a: None)
    log(cpu_summary(max(1, 2 // world), world))
    log("precision: float32 statistics and SVDs on every CPU; the weights written 4-bit, their branch and scales "
        "float16")
    progress = TrainProgress([("calibrate and quantize", 1, TINY_SECONDS)], TINY_REFERENCE, log)
    torch.manual_seed(seed)
    t0 = time.time()
    cfg = TINY_QUANT if steps is None else replace(TINY_QUANT, lowrank_iters=steps, early_stop=False)
    progress.phase("calibrate and quantize")
    pipe = quantize_tiny("svdquant", cfg, seed, log)
    progress.step(0)
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_nunchaku(pipe.transformer, out, dtype=torch.float16)  # the tiny SANA's own 16-bit type
        log(f"saved {out} ({os.path.getsize(out) / 1e6:.2f} MB) in {time.time() - t0:.0f}s")
    return pipe


def load_tiny_quantized(path=TINY_WEIGHTS, *, device="cpu", dtype=torch.float32):
    """The committed quantized tiny SANA (nunchaku's format, read by the loader of the published checkpoints), with
    the tiny SANA's text encoder and DC-AE."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: it comes with the repository's weights/ folder, or "
                                f"`python svdquant.py --train --train-out {path}` makes it")
    pipe = load_tiny(device=device, dtype=dtype)
    pipe.transformer = load_nunchaku(path, device=device, dtype=dtype)
    return pipe


# ----------------------------------------------------------------------------------------------------------
# 11. CLI
# ----------------------------------------------------------------------------------------------------------
PHOTO_PROMPTS = [  # calibration captions for a published model (the official set is 128 COCO captions)
    "a photo of a cat sitting on a wooden table", "a city street at night with neon signs in the rain",
    "a bowl of fruit on a kitchen counter", "a mountain lake at sunrise with mist", "portrait of an old man smiling",
    "a red sports car on a coastal road", "an astronaut riding a horse, digital art", "a living room with a sofa"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


# Copied from sana.py: available_memory
def available_memory(device):
    """Bytes free for a generation: the GPU's free memory on CUDA, MemAvailable of /proc/meminfo on a Linux CPU,
    None where this is unknown (mps, other systems)."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    if device == "cpu" and os.path.isfile("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


# Copied from sana.py: check_memory
def check_memory(cfg, vae_cfg, height, width, dtype, device, tile=None):
    """Refuse, before anything is loaded, a size whose generation needs more memory than the device has free (its
    DC-AE decoding in tiles of side `tile`, if given)."""
    need, free = generation_bytes(cfg, vae_cfg, height, width, dtype, tile=tile), available_memory(device)
    if free is not None and need > free:
        raise ValueError(f"a {width}x{height} image needs about {need / 1e9:,.1f} GB of memory and {free / 1e9:,.1f} "
                         f"GB is available on {device}: ask for a smaller --height/--width")


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
    p = argparse.ArgumentParser(description="SVDQuant W4A4 for SANA (the tiny built-in model without --ckpt)",
                                epilog=f"The tiny default model (no --ckpt) draws only {TINY_GRAMMAR}.")
    p.add_argument("--prompt", help="what to draw (for the tiny default model, see below)")
    p.add_argument("--ckpt", help="a nunchaku single-file SANA checkpoint (svdq-int4_r32-sana1.6b.safetensors; give "
                   "--base too), or a 16-bit SANA diffusers folder to quantize; default: the tiny model")
    p.add_argument("--model", help=f"preset of a --ckpt/--base folder (its flow shift): {', '.join(SANA_PRESETS)}")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance w: v = v_u + w (v_c - v_u); "
                   "1 = off (default: the model's: 4.5 for the published models, 2.0 for the tiny one)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's training resolution)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's training resolution)")
    p.add_argument("--seed", type=int, default=0, help="random seed (the initial noise; --train)")
    p.add_argument("--device", default="", help="cpu, cuda, cuda:N or mps (default: the first available of cuda, mps, cpu)")
    p.add_argument("--dtype", default="", help="float32, bfloat16 or float16 (default: the best for the "
                   "device); with --train, where the recipe has a choice: float32 or bfloat16 autocast (default: "
                   "bfloat16 where the CPU computes it natively)")
    p.add_argument("--out", default="svdquant.png", help="the quantized model's image (default: %(default)s)")
    p.add_argument("--train", action="store_true", help="retrain the tiny default model from --seed (runs under torchrun too)")
    p.add_argument("--train-out", default=None, help="where --train writes the weights (default: the committed "
                   "file's name in the working folder; the committed weights in weights/ are replaced only when named "
                   "here)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="with --train: N optimisation steps in each phase of the recipe in place of its own counts "
                   "(a quick check)")
    p.add_argument("--save", help="write the quantized transformer here, in nunchaku's single-file format")
    p.add_argument("--base", help="with a nunchaku --ckpt: the 16-bit SANA diffusers folder that supplies the text "
                   "encoder, tokenizer and VAE (and the 16-bit image the PSNR compares with)")
    p.add_argument("--tile", type=int, nargs="?", const=TILE, default=None, metavar="PIXELS",
                   help=f"decode the latents in square tiles of this side, a multiple of the DC-AE's compression, "
                   f"their overlap cross-faded as in diffusers' AutoencoderDC (memory of one tile: docs/dcae.md); "
                   f"alone: {TILE}; 0: never (default: tiles of {TILE} for images of more than {AUTO_TILE_SIDE}x"
                   f"{AUTO_TILE_SIDE} pixels)")
    p.add_argument("--tile-overlap", type=int, default=None, metavar="PIXELS", help="with tiles: the overlap of "
                   "neighbouring tiles, a multiple of the DC-AE's compression (default: 64, or one latent cell if "
                   "larger)")
    p.add_argument("--lora", help="a LoRA .safetensors (sana.py's --train --data, or diffusers'/peft's for a "
                   "SanaTransformer2DModel): merged into the quantized model's 16-bit branches, and put on the 16-bit "
                   "model the PSNR compares with")
    p.add_argument("--lora-scale", type=float, default=1.0, help="with --lora: the weight of its update (default: "
                   "%(default)s)")
    r = p.add_argument_group("research options")
    r.add_argument("--method", default="svdquant", choices=list(METHODS), help="the paper's ablation: naive W4A4, "
                   "smoothing only or SVDQuant, calibrated on the spot (SVDQuant on the tiny model at its recipe's "
                   "rank and precision: the committed file; default: %(default)s)")
    r.add_argument("--rank", type=int, default=None, help="low-rank branch rank (default: 16 for the tiny model, "
                   "32 otherwise)")
    r.add_argument("--precision", default="int4", choices=list(GROUP_SIZE), help="W4A4 format (default: %(default)s)")
    return p


def check_train_args(args):
    if not 0 <= args.seed < 2**63:  # torch takes 64-bit seeds; larger ones failed after the model had loaded
        raise ValueError(f"--seed must be between 0 and 2**63 - 1, not {args.seed}")
    refuse_unused(args, ("--prompt", "--ckpt", "--model", "--steps", "--guidance", "--height", "--width", "--out",
                         "--save", "--base", "--method", "--rank", "--precision", "--tile", "--tile-overlap", "--lora",
                         "--lora-scale"), "with --train, which writes --train-out")
    refuse_unused(args, ("--dtype",), "with --train, whose recipe trains in float32 on every CPU")
    if args.train_steps is not None and args.train_steps < 1:
        raise ValueError("--train-steps must be at least 1")
    args.train_out = check_out_path(train_out_path(args.train_out, TINY_WEIGHTS), (".safetensors",), "--train-out")


def check_args(args):
    """Every refusal that needs no weights, one sentence each, before anything is loaded. Returns (height, width)."""
    if not 0 <= args.seed < 2**63:  # torch takes 64-bit seeds; larger ones failed after the model had loaded
        raise ValueError(f"--seed must be between 0 and 2**63 - 1, not {args.seed}")
    resolve_dtype(args.dtype, resolve_device(args.device))  # --device and --dtype first, one sentence each
    if args.prompt is None or not args.prompt.strip():
        raise ValueError('the prompt is empty: pass --prompt "two red circles on a blue background"')
    if not 1 <= args.steps <= 1000:  # Flow-DPM-Solver converges in 20: 100,000 steps only took hours
        raise ValueError(f"--steps must be between 1 and 1000 (the models sample in 20), not {args.steps}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number, not {args.guidance}")
    if args.guidance is not None and not 0 <= args.guidance <= 100:  # 1 is off; beyond 100 only saturation, or NaN
        raise ValueError(f"--guidance must be between 0 and 100 (published models use about 4.5), not {args.guidance}")
    refuse_unused(args, ("--train-out", "--train-steps"), "without --train")
    if not math.isfinite(args.lora_scale):
        raise ValueError(f"--lora-scale must be a finite number, not {args.lora_scale}")
    if args.lora:
        read_lora(args.lora)  # a file that is not a LoRA: one sentence before the model loads
        if args.save:
            raise ValueError("--save with --lora would write the LoRA merged into the file: save without it, and "
                             "give --lora when sampling")
    else:
        refuse_unused(args, ("--lora-scale",), "without --lora")
    if args.rank is not None and args.rank < 0:
        raise ValueError(f"--rank must be 0 (no branch) or more, not {args.rank}")
    for name, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive number of pixels, not {value}")
    if args.model:
        get_preset(args.model)
    nunchaku_file = bool(args.ckpt) and os.path.isfile(args.ckpt)
    if args.ckpt and not nunchaku_file and not os.path.isdir(args.ckpt):
        raise FileNotFoundError(f"--ckpt {args.ckpt} does not exist")
    if nunchaku_file and not args.base:
        raise ValueError("a nunchaku --ckpt holds the transformer only: give --base, the 16-bit SANA diffusers "
                         "folder of the text encoder, tokenizer and VAE")
    if args.base and not nunchaku_file:
        raise ValueError("--base goes with a nunchaku --ckpt file; a --ckpt folder and the tiny model bring their own "
                         "text encoder and VAE")
    if nunchaku_file:
        refuse_unused(args, ("--save", "--method", "--rank", "--precision"), "with a nunchaku --ckpt, which is "
                      "quantized already")
    if not args.ckpt:
        check_tiny_prompt(args.prompt)
    if nunchaku_file:  # the transformer's config is the file's metadata, the VAE's the base folder's
        meta = read_metadata(args.ckpt)
        if "config" not in meta:
            raise ValueError(f"--ckpt {args.ckpt} has no 'config' metadata: not a nunchaku single-file checkpoint")
        try:
            sana_cfg = check_config(config_from_diffusers(json.loads(meta["config"])), f"--ckpt {args.ckpt}'s metadata")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"--ckpt {args.ckpt}: its 'config' metadata is not a SANA transformer config "
                             f"({type(e).__name__}: {str(e)[:60]})") from None
        vae_cfg = pipeline_configs(args.base)[1]
    else:
        sana_cfg, vae_cfg = pipeline_configs(args.ckpt) if args.ckpt else (SANA_PRESETS["tiny"], tiny_dcae_config())
    side = sana_cfg.sample_size * vae_cfg.compression  # the training resolution
    h, w = args.height or side, args.width or side
    check_size(h, w, vae_cfg.compression * sana_cfg.patch_size)
    args.tile = cli_tile(args.tile, args.tile_overlap, vae_cfg.compression, h, w)  # None: decode in one pass
    device = resolve_device(args.device)
    check_memory(sana_cfg, vae_cfg, h, w, resolve_dtype(args.dtype, device), device, args.tile)
    check_out_path(args.out, IMAGE_EXTENSIONS)
    if args.save:
        check_out_path(args.save, (".safetensors",), "--save")
    return h, w


def models_for(args, device, dtype):
    """(the 16-bit pipeline, the quantized transformer, what the latter is): nunchaku's --ckpt file with its --base
    folder; else the 16-bit model (--ckpt's folder or the tiny one) and, for the tiny recipe, the committed file,
    otherwise its transformer quantized on the spot by --method."""
    if args.ckpt and os.path.isfile(args.ckpt):
        pipe, transformer = load_quantized_pipeline(args.ckpt, args.base, args.model, device=device, dtype=dtype)
        return pipe, transformer, f"nunchaku's file {os.path.basename(args.ckpt)}"
    pipe = load_pipeline(args.ckpt, args.model, device=device, dtype=dtype) if args.ckpt else \
        load_tiny(device=device, dtype=dtype)
    cfg = replace(TINY_QUANT if not args.ckpt else PRESETS["svdq-int4_r32"], precision=args.precision)
    cfg = replace(cfg if args.rank is None else replace(cfg, rank=args.rank), **METHODS[args.method])
    if not args.ckpt and args.method == "svdquant" and cfg == TINY_QUANT and os.path.isfile(TINY_WEIGHTS):
        return pipe, load_nunchaku(TINY_WEIGHTS, device=device, dtype=dtype), "svdquant: the committed weights"
    calib = calibration_prompts(TINY_CALIB_PROMPTS, args.seed + 1000) if not args.ckpt else PHOTO_PROMPTS
    transformer = quantize_pipeline(pipe, cfg, calib, seed=args.seed, log=lambda *a: None)
    return pipe, transformer, f"{args.method}: quantized ({cfg.precision}, rank {cfg.rank})"


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.train:
            check_train_args(args)
            train_tiny(seed=args.seed, out=args.train_out, steps=args.train_steps)
            return
        h, w = check_args(args)
        device, dtype = pick_device_dtype(args.device, args.dtype, tiny=not args.ckpt)
        t0 = time.time()
        pipe, transformer, what = models_for(args, device, dtype)
        pipe.vae_tile, pipe.vae_tile_overlap = args.tile, args.tile_overlap  # --tile, as check_args resolved it
        if args.lora:  # the quantized model's branches and the 16-bit model alike
            apply_lora_quantized(transformer, args.lora, args.lora_scale)
            apply_lora(pipe.transformer, read_lora(args.lora), args.lora_scale, args.lora)
        print(f"{what} ({time.time() - t0:.1f}s)")
        g = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731
        image = generate(pipe, transformer, [args.prompt], h, w, args.steps, args.guidance, g(),
                         StepProgress(args.steps, "quantized model, step"))[0]
        reference = pipe.generate([args.prompt], h, w, args.steps, args.guidance, g(),  # the 16-bit model's
                                  callback=StepProgress(args.steps, "16-bit model, step"))[0]
        print(f"PSNR {psnr(image, reference):.2f} dB against the 16-bit model's image on the same seed")
        Image.fromarray(image.numpy()).save(args.out)
        if args.save:
            save_nunchaku(transformer, args.save)
        print(f"wrote {args.out}" + (f" and {args.save}" if args.save else ""))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
