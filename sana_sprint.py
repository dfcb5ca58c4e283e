"""SANA-Sprint: one- to four-step text-to-image generation, distilled from a SANA flow model.

Chen et al., "SANA-Sprint: One-Step Diffusion with Continuous-Time Consistency Distillation", arXiv 2503.09641.
Official code: github.com/NVlabs/Sana (train_scripts/train_scm_ladd.py). The backbone is SANA's linear DiT
(sana.py); what Sprint adds turns a 20-step flow model into a 1-4 step one:

  1. TrigFlow without retraining (paper Sec. 3.1): a flow-matching model v(x_s, s) is rewritten, by algebra alone,
     as a TrigFlow model F(x_t, t), x_t = cos(t) x0 + sin(t) z, the parameterization continuous-time consistency
     models need. `trigflow` below is that conversion, line by line.
  2. sCM distillation (Sec. 3.2, Lu & Song 2024): the student learns to jump from any point of the teacher's ODE
     to its end; its training signal needs the time derivative of the student along the ODE, dF/dt, which a
     forward-mode JVP gives in one pass. Dense time, qk-norm and a guidance embedding (no CFG batch at inference)
     keep that derivative stable.
  3. LADD (Sec. 3.3): a latent adversarial loss whose discriminator reads the frozen teacher's hidden states,
     which sharpens the one-step samples that the consistency loss alone leaves soft.

Inside, top to bottom (sections 1-5 are the whole method; the rest is what it uses and plumbing):
  1. Config and presets: `SprintConfig`, one preset per published checkpoint (students and their teachers)
  2. Modules: `TimeGuidanceEmbedding`, the one module Sprint changes in SANA (dense time + guidance embedder)
  3. Model: `SprintTransformer`, SANA's linear DiT with that embedding and the adaptive weight's logvar head
  4. Training: `trigflow` (the flow -> TrigFlow conversion), the dense-time teacher, the sCM loss with its JVP,
     LADD's discriminator heads and hinge losses, `distill_step` (one step of sCM + LADD)
  5. Sampler: `scm_times` and `sample_scm`, the 1-4 step sCM sampler
  ---- skip on first read ----
  6. Components: marked copies of SANA's blocks, the Gemma-2 text encoder, the DC-AE, the shapes data, loaders
  7. Checkpoint loading: diffusers folders and the original NVlabs .pth, strict key check
  8. Pipeline: `SanaSprint` (prompts -> sampler -> image), `load_pipeline`
  9. Beyond the paper's core: `image_to_image`
 10. Tiny default: `train_tiny` distils the committed tiny SANA (weights/sana_tiny.safetensors), `load_tiny`
 11. CLI

Run:
  python sana_sprint.py --prompt "two red circles on a blue background" --steps 1     # tiny default, 64x64 PNG
  python sana_sprint.py --prompt "a cat" --ckpt Sana_Sprint_1.6B_1024px_diffusers --steps 2
  python sana_sprint.py --prompt "..." --ckpt DIR --image in.png --strength 0.6       # image-to-image
  python sana_sprint.py --train               # distil the tiny default again (./sana_sprint_tiny.safetensors)

Shapes: B batch, C latent channels, H/W latent height/width, p patch size, h/w the token grid, N = h*w image tokens,
        L text tokens, D width, d head dim; t the TrigFlow time in [0, pi/2] (t = 0 data, pi/2 noise), s the flow
        time in [0, 1] with s = sin t / (sin t + cos t), sigma_d = 0.5 the data std TrigFlow assumes.

Deviations from the official code: (1) the model follows diffusers' numerics (qk-norm eps 1e-5 in the
cross-attention, which the original runs at 1e-6, and SDPA instead of its fp32 attention), since the parity
fixtures come from diffusers; (2) AdamW instead of CAME; (3) image-to-image starts at t = strength * pi/2 and
spaces the steps evenly from there, where diffusers' img2img pipeline drops whole steps of the text-to-image
schedule; (4) the tiny default's teacher is converted before its brief fine-tune: the dense-time embedding is
fitted to the old one by regression and the new qk-norm weights are set to the RMS of q and k (section 4); the
published teachers were fine-tuned at length from qk-norm weights at 1; (5) the discriminator's negatives are the
generator step's samples, where the official code samples them again with the updated student; (6) the teacher's
unconditional input is the encoded empty prompt (what SANA's inference uses), not the learned null caption.
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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file


HERE = os.path.dirname(os.path.abspath(__file__))
TINY_WEIGHTS = os.path.join(HERE, "weights", "sana_sprint_tiny.safetensors")
TINY_TEACHER = os.path.join(HERE, "weights", "sana_tiny.safetensors")  # committed by `python sana.py --train`
TINY_DCAE = os.path.join(HERE, "weights", "dcae_tiny.safetensors")  # committed by `python dcae.py --train`


# ----------------------------------------------------------------------------------------------------------
# 1. Config and presets
# ----------------------------------------------------------------------------------------------------------
# The published students and their teachers share SANA's two widths (0.6B: D 1152 x 28 blocks; 1.6B: D 2240 x 20),
# all with qk-norm; a teacher has no guidance embedder.


@dataclass
class SprintConfig:
    in_channels: int = 32  # DC-AE f32c32 latent
    out_channels: int = 32
    hidden_size: int = 1152  # D
    depth: int = 28
    num_heads: int = 36  # linear self-attention heads (head dim 32)
    cross_heads: int = 16  # softmax cross-attention heads
    caption_channels: int = 2304  # Gemma-2-2B width
    mlp_ratio: float = 2.5
    patch_size: int = 1
    sample_size: int = 32  # latent grid of the training resolution
    qk_norm: bool = True  # RMSNorm over the full D on q and k: keeps the JVP of training stable
    interpolation_scale: float = None  # None = NoPE
    guidance_embeds: bool = True  # the student's guidance embedder; False: a teacher (guided by CFG instead)
    guidance_embeds_scale: float = 0.1  # the embedder sees 0.1 w
    logvar: bool = True  # the adaptive loss weight's head (training only: not in the diffusers checkpoints)
    sigma_data: float = 0.5  # the data std TrigFlow assumes (latents are scaled to unit std, then by sigma_d)


_600M = dict(hidden_size=1152, depth=28, num_heads=36, cross_heads=16)
_1600M = dict(hidden_size=2240, depth=20, num_heads=70, cross_heads=20)
PRESETS = {  # keys: the published checkpoint names (HF repos under Efficient-Large-Model)
    "Sana_Sprint_0.6B_1024px": SprintConfig(**_600M),
    "Sana_Sprint_1.6B_1024px": SprintConfig(**_1600M),
    "SANA_Sprint_0.6B_1024px_teacher": SprintConfig(**_600M, guidance_embeds=False),
    "SANA_Sprint_1.6B_1024px_teacher": SprintConfig(**_1600M, guidance_embeds=False),
    # the tiny default (section 10): the tiny SANA of sana.py, distilled
    "tiny": SprintConfig(in_channels=4, out_channels=4, hidden_size=192, depth=4, num_heads=6, cross_heads=6,
                         caption_channels=64, sample_size=8, patch_size=2),
}


# ----------------------------------------------------------------------------------------------------------
# 2. Modules
# ----------------------------------------------------------------------------------------------------------
# Sprint keeps SANA's linear DiT and changes one module, the time embedding. SANA's blocks are copied from sana.py
# into section 6 (sana.py explains them); what SprintTransformer needs to know of them: PatchEmbed turns the latent
# into N tokens of width D, CaptionProjection + RMSNorm the text states into L tokens of width D, and each SanaBlock
# computes x + gate1 LinearAttn(adaLN(x)), then x + CrossAttn(x, text), then x + gate2 MixFFN(adaLN(x)), with the
# six adaLN shift/scale/gate vectors from the time embedding (t6) plus the block's own learned table.


class TimeGuidanceEmbedding(nn.Module):
    """Sprint's adaLN-single (paper Sec. 3.1 and 4.1): the flow time s in [0, 1] enters the sinusoid directly (SANA
    feeds 1000 s: the derivative dF/dt of training would be 1000x larger), and the guidance scale w, as 0.1 w,
    through a second embedder of the same form, added. The sum drives every block's modulation and the final
    layer, so one model serves every guidance scale without a CFG batch."""

    def __init__(self, dim, guidance):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)
        self.guidance_embedder = TimestepEmbedder(dim) if guidance else None
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, s, guidance=None):  # s, guidance: (B,)
        emb = self.timestep_embedder(s)  # (B, D)
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("a Sprint student needs the guidance scale (guidance=0.1 w)")
            emb = emb + self.guidance_embedder(guidance)
        return self.linear(F.silu(emb)), emb  # (B, 6D), (B, D)


# ----------------------------------------------------------------------------------------------------------
# 3. Model
# ----------------------------------------------------------------------------------------------------------


class SprintTransformer(nn.Module):
    """SANA's linear DiT with Sprint's time + guidance embedding and the logvar head. A flow model: it predicts
    the velocity v = eps - x0 of x_s = (1 - s) x0 + s eps; `trigflow` turns it into the TrigFlow model."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg)
        self.time_embed = TimeGuidanceEmbedding(D, cfg.guidance_embeds)
        self.caption_projection = CaptionProjection(cfg.caption_channels, D)
        self.caption_norm = RMSNorm(D)
        self.transformer_blocks = nn.ModuleList([SanaBlock(cfg) for _ in range(cfg.depth)])
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D**0.5)
        self.norm_out = ModulatedNorm()
        self.proj_out = nn.Linear(D, cfg.patch_size**2 * cfg.out_channels)
        # the adaptive weight w(t) of the sCM loss (sCM paper Sec. 4.3) reads the time embedding
        self.logvar_linear = nn.Linear(D, 1) if cfg.logvar else None

    def forward(self, x, s, y, mask=None, guidance=None, features=()):
        """x: (B, C, H, W) = x_s; s: (B,) flow time in [0, 1]; y: (B, L, caption_channels); mask: (B, L) 1 = keep;
        guidance: (B,) = 0.1 w (students only). Returns v (B, C, H, W); with `features` (block indices), the
        hidden states (B, N, D) after those blocks instead, computing no further (LADD's discriminator)."""
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        h, w = H // p, W // p
        x = self.patch_embed(x)  # (B, N, D)
        t6, emb = self.time_embed(s.expand(B), None if guidance is None else guidance.expand(B))
        bias = None
        if mask is not None:  # additive -10000 on padded text tokens, as SANA
            if mask.any(dim=1).all():  # padding after the batch's last token gets exactly 0 weight: skip it
                L = int(mask.nonzero()[:, 1].max()) + 1
                y, mask = y[:, :L], mask[:, :L]
            bias = ((1 - mask.to(x.dtype)) * -10000.0)[:, None, None, :]  # (B, 1, 1, L)
        y = self.caption_norm(self.caption_projection(y))  # (B, L, D)
        hidden = []
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, y, bias, t6, (h, w))
            if i in features:
                hidden.append(x)
                if len(hidden) == len(features):
                    return hidden
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        x = self.proj_out(self.norm_out(x, shift, scale))  # (B, N, p*p*C)
        x = x.view(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(B, -1, h * p, w * p)

    def logvar(self, s, guidance=None):  # (B,) -> (B,): the log-variance of the sCM loss at this time
        return self.logvar_linear(self.time_embed(s, guidance)[1]).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------
# 4. Training: TrigFlow, the sCM loss and LADD
# ----------------------------------------------------------------------------------------------------------
# TrigFlow first (paper Sec. 3.1): the conversion that lets a flow model, teacher or student, be read as the
# TrigFlow model F(x_t, t) that continuous-time consistency needs. Then the three stages of training (Sec. 3-4).


def flow_time(t):
    """TrigFlow time t (B,) -> the flow time s of the same noise level: tan t = s / (1 - s)."""
    return torch.sin(t) / (torch.sin(t) + torch.cos(t))


def trigflow(velocity, x, t):
    """The training-free conversion of a flow model into a TrigFlow model (paper Sec. 3.1, eq. 5-6).
    x: (B, C, H, W) = x_t / sigma_d = cos(t) x0/sigma_d + sin(t) eps, t: (B,); velocity(x_s, s) -> v. Returns F
    with dx_t/dt = sigma_d F. The same noise level in flow terms: s = sin t / (sin t + cos t) and
    x_s = (1 - s) x0/sigma_d + s eps = x / (sin t + cos t) = x sqrt(s^2 + (1 - s)^2). Substituting x0 and eps from
    x_s and v = eps - x0/sigma_d into F = cos(t) eps - sin(t) x0/sigma_d gives
    F = ((1 - 2s) x_s + (1 - 2s + 2s^2) v) / sqrt(s^2 + (1 - s)^2)."""
    s = flow_time(t).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    r = torch.sqrt(s**2 + (1 - s) ** 2)  # = 1 / (sin t + cos t)
    x_s = x * r
    v = velocity(x_s, s.flatten())
    return ((1 - 2 * s) * x_s + (1 - 2 * s + 2 * s**2) * v) / r


# The three stages: (a) the teacher: a SANA flow model fine-tuned to read dense time s in [0, 1], with qk-norm
# added; (b) the student, initialized from the teacher plus a guidance embedder, trained with the sCM loss;
# (c) together with LADD, whose discriminator heads read the frozen teacher's hidden states. `distill_step` is
# one step of (b) + (c). Latents x0 are scaled to the data std sigma_d of TrigFlow: x0 = sigma_d * unit-std latent.


def teacher_from_sana(sd, cfg):
    """A SANA transformer's state dict (sana.py / diffusers keys) -> a Sprint teacher (no guidance embedder, no
    logvar head). Its timestep MLP moves from time_embed.emb.timestep_embedder to time_embed.timestep_embedder;
    the qk-norm weights are new, at 1. Fine-tune it with `flow_loss` before distilling: it must learn dense time
    and the qk-norm."""
    cfg = replace(cfg, guidance_embeds=False, logvar=False, qk_norm=True)
    model = SprintTransformer(cfg)
    sd = {k.replace("time_embed.emb.timestep_embedder.", "time_embed.timestep_embedder."): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    new = [k for k in missing if not re.search(r"\.norm_[qk]\.weight$", k)]
    if new or unexpected:
        raise ValueError(f"not a SANA transformer of this config: missing {new[:4]}, unexpected {unexpected[:4]}")
    return model


@torch.no_grad()
def calibrate_qk_norm(model, *inputs):
    """Teacher fine-tune, part zero, for a model trained without qk-norm: set each new norm's weight to the mean
    RMS of the q or k it normalizes on a calibration batch, so that q and k keep their scale and the model starts
    near the function it was trained to be (with weights at 1, every softmax would change temperature).
    inputs: one forward's arguments."""
    rms, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (LinearSelfAttention, CrossAttention)) and m.norm_q is not None:
            for proj, norm in ((m.to_q, m.norm_q), (m.to_k, m.norm_k)):
                hooks.append(proj.register_forward_hook(
                    lambda mod, inp, out, norm=norm: rms.__setitem__(norm, out.float().pow(2).mean(-1).sqrt().mean())))
    model(*inputs)
    for h in hooks:
        h.remove()
    for norm, value in rms.items():
        norm.weight.fill_(value)


def fit_dense_time(embedder, scale=1000.0, steps=400, lr=3e-3):
    """Teacher fine-tune, part one, for a model that read t = 1000 s: fit its timestep MLP by regression so that
    emb(s) reproduces the old emb(1000 s) on a grid of s in [0, 1]. Seconds on the MLP alone, and the fine-tune
    (`flow_loss`) then starts from a model that already denoises. Returns the final mean squared error."""
    old = copy.deepcopy(embedder).requires_grad_(False)
    s = torch.linspace(0, 1, 1001)
    target = old(scale * s)  # (1001, D)
    opt = torch.optim.Adam(embedder.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.mse_loss(embedder(s), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def flow_loss(model, x0, y, mask, null_y, null_mask, generator=None, uncond_prob=0.1, shift=3.0):
    """Teacher fine-tune, part two: SANA's flow-matching loss (sana.py's training_loss) with the model reading the
    flow time s itself, not 1000 s. x0: (B, C, H, W) unit-std latents; y: (B, L, Dy), mask: (B, L)."""
    B = x0.shape[0]
    g = dict(generator=generator, device=x0.device)
    drop = torch.rand(B, **g) < uncond_prob  # CFG dropout: the teacher is sampled with CFG
    y = torch.where(drop[:, None, None], null_y.expand_as(y), y)
    mask = torch.where(drop[:, None], null_mask.expand_as(mask), mask)
    s = torch.sigmoid(torch.randn(B, **g))  # logit-normal, then the time shift
    s = shift * s / (1 + (shift - 1) * s)
    eps = torch.randn(x0.shape, **g)
    x_s = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * eps
    return F.mse_loss(model(x_s, s, y, mask).float(), (eps - x0).float())


def teacher_velocity(teacher, y, mask, null_y, null_mask, w):
    """The teacher's classifier-free-guided velocity v_u + w (v_c - v_u), one batched call; w: (B,)."""
    y2, m2 = torch.cat([null_y.expand_as(y), y]), torch.cat([null_mask.expand_as(mask), mask])

    def velocity(x, s):
        v_u, v_c = teacher(torch.cat([x, x]), torch.cat([s, s]), y2, m2).float().chunk(2)
        return v_u + w.view(-1, 1, 1, 1) * (v_c - v_u)
    return velocity


def scm_time(n, generator=None, p_mean=0.2, p_std=1.6, sigma_data=0.5):
    """sCM's proposal: tau ~ N(P_mean, P_std^2), t = arctan(e^tau / sigma_d): the TrigFlow time of EDM's
    log-normal noise level sigma = e^tau. (n,)"""
    tau = p_mean + p_std * torch.randn(n, generator=generator)
    return torch.atan(torch.exp(tau) / sigma_data)


def scm_target(student, teacher_v, x_t, t, y, mask, guidance, r, c=0.1):
    """What sCM pulls the student towards at (x_t, t) (Lu & Song 2024, Alg. 1; paper Sec. 3.2): F^- + g, returned as
    (F^-, g), F^- the student without gradient and g the normalized tangent. x_t: (B, C, H, W) TrigFlow latents (sigma_d-scaled);
    t: (B,); teacher_v(x_s, s): the guided teacher velocity; guidance: (B,) = 0.1 w; r in [0, 1]: the tangent warm-up.

    The student F must satisfy d f(x_t, t)/dt = 0 along the teacher's ODE, f = cos(t) x_t - sin(t) sigma_d F. The
    gradient of that condition is the tangent
        g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt),
    dx_t/dt = sigma_d F_teacher the teacher's ODE. dF^-/dt, the student's derivative along the ODE, is a forward-mode
    JVP: tangents dx_t/dt / sigma_d for x_t / sigma_d and 1 for t, both multiplied by cos(t) sin(t), which the
    formula needs anyway and which keeps the JVP small near t = pi/2. g is normalized per sample, g / (||g|| + c)."""
    sd = student.cfg.sigma_data
    cos_t, sin_t = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    F_student = lambda x, tt: trigflow(lambda xs, s: student(xs, s, y, mask, guidance), x, tt)  # noqa: E731
    with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # forward AD
        dxt_dt = sd * trigflow(teacher_v, x_t / sd, t)  # (B, C, H, W)
        F_minus, dF_dt = torch.func.jvp(F_student, (x_t / sd, t),
                                        (cos_t * sin_t * dxt_dt / sd, (cos_t * sin_t).flatten()))
        g = -cos_t**2 * (sd * F_minus - dxt_dt) - r * (cos_t * sin_t * x_t + sd * dF_dt)  # dF_dt: x cos t sin t
        g = g / (torch.linalg.vector_norm(g, dim=(1, 2, 3), keepdim=True) + c)
    return F_minus, g


def scm_loss(student, teacher_v, x0, y, mask, guidance, r, generator=None, c=0.1):
    """The continuous-time consistency distillation loss: t from sCM's proposal, x_t = cos(t) x0 + sin(t) z, and
    the student pulled towards `scm_target`, weighted by 1 / (sigma_d tan t) and by a learned log-variance (adaptive
    weighting): mean of w(t) (F - target)^2 / e^logvar + logvar. x0: (B, C, H, W) sigma_d-scaled latents. Returns
    (loss, the unweighted mean squared error)."""
    sd = student.cfg.sigma_data
    t = scm_time(x0.shape[0], generator, sigma_data=sd)  # (B,)
    z = torch.randn(x0.shape, generator=generator) * sd
    x_t = torch.cos(t).view(-1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1) * z
    F_minus, g = scm_target(student, teacher_v, x_t, t, y, mask, guidance, r, c)
    err = (trigflow(lambda xs, s: student(xs, s, y, mask, guidance), x_t / sd, t) - F_minus - g).pow(2)
    weight = 1 / (sd * torch.tan(t)).view(-1, 1, 1, 1)
    logvar = student.logvar(flow_time(t), guidance).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return (weight / logvar.exp() * err + logvar).mean(), err.mean().detach()


class LocalBatchNorm(nn.Module):
    """Batch norm over groups of `group` samples (and all tokens), without running statistics: each group of a
    batch is normalized alone, so the statistics are the same whatever the batch size."""

    def __init__(self, channels, group=8, eps=1e-5):
        super().__init__()
        self.group, self.eps = group, eps
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x):  # (B, C, N)
        B, C, N = x.shape
        g = math.ceil(B / self.group)
        xg = x.view(g, -1, C, N)  # (groups, B / groups, C, N)
        mean, var = xg.mean(dim=(1, 3), keepdim=True), xg.var(dim=(1, 3), keepdim=True, unbiased=False)
        x = ((xg - mean) * torch.rsqrt(var + self.eps)).view(B, C, N)
        return x * self.weight[:, None] + self.bias[:, None]


class DiscriminatorHead(nn.Module):
    """LADD's head on one teacher block (the official DiscHead, from StyleGAN-T): the tokens (B, N, D) as a 1-D
    sequence, a 1x1 convolution and a residual 9-wide one (circular padding, spectral norm, local batch norm,
    LeakyReLU 0.2), then a 1x1 convolution to one real/fake logit per token. No time or text input: the teacher's
    features carry both."""

    def __init__(self, dim, group=8):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm

        def block(k):
            return nn.Sequential(sn(nn.Conv1d(dim, dim, k, padding=k // 2, padding_mode="circular")),
                                 LocalBatchNorm(dim, group), nn.LeakyReLU(0.2))
        self.first, self.residual = block(1), block(9)
        self.cls = sn(nn.Conv1d(dim, 1, 1))

    def forward(self, h):  # h: (B, N, D) -> (B, N) logits
        x = self.first(h.transpose(1, 2))
        x = (self.residual(x) + x) / math.sqrt(2)
        return self.cls(x).squeeze(1)


class Discriminator(nn.Module):
    """LADD (paper Sec. 3.3): the frozen teacher is the feature network, a trainable head per chosen block.
    Latents are noised to a time t_D of their own, so that the teacher sees what it was trained on, and the heads
    judge the teacher's reading of the image at several depths."""

    def __init__(self, teacher, blocks, group=8):
        super().__init__()
        self.teacher, self.blocks = teacher.requires_grad_(False), tuple(blocks)
        self.heads = nn.ModuleList([DiscriminatorHead(teacher.cfg.hidden_size, group) for _ in self.blocks])

    def forward(self, x0, t, y, mask, generator=None):
        """x0: (B, C, H, W) sigma_d-scaled latents, real or generated; t: (B,) TrigFlow time. -> (B, heads x N)."""
        sd = self.teacher.cfg.sigma_data
        t4 = t.view(-1, 1, 1, 1)
        x_t = torch.cos(t4) * x0 + torch.sin(t4) * torch.randn(x0.shape, generator=generator) * sd
        s = flow_time(t)
        x_s = x_t / sd * torch.sqrt(s**2 + (1 - s) ** 2).view(-1, 1, 1, 1)  # the flow input of the same level
        hidden = self.teacher(x_s, s, y, mask, features=self.blocks)
        return torch.cat([head(h) for head, h in zip(self.heads, hidden)], dim=1)


def discriminator_time(n, generator=None, p_mean=-0.6, p_std=1.0, sigma_data=0.5):
    """t_D: sCM's proposal with LADD's own mean and std (more weight on low noise than the sCM loss's)."""
    return scm_time(n, generator, p_mean, p_std, sigma_data)


@dataclass
class DistillConfig:
    guidance: tuple = (4.0, 4.5, 5.0)  # the teacher's CFG scales; the student learns them all through its embedder
    scm_weight: float = 1.0  # scm_lambda
    adv_weight: float = 0.5  # adv_lambda
    tangent_warmup: int = 4000  # r goes 0 -> 1 over these steps
    largest_time_prob: float = 0.5  # LADD's one-step samples start from t = max_time this often
    max_time: float = 1.5708
    head_blocks: tuple = (2, 8, 14, 19)  # 1.6B's; the tiny: (1, 3)
    misaligned_pairs: bool = True  # real latents with another sample's caption are negatives for D too
    grad_clip: float = 0.1  # both players


def distill_step(student, disc, x0, y, mask, null_y, null_mask, opt_g, opt_d, step, dc, generator=None,
                 sync=lambda params: None):
    """One step of sCM + LADD (paper Alg. 1): the student (generator) on the sCM loss plus LADD's adversarial
    loss, then the discriminator heads on the hinge loss. x0: (B, C, H, W) sigma_d-scaled latents; y, mask: their
    captions. sync(params) runs before each update (the gradient average under torchrun). Returns the losses."""
    B, sd = x0.shape[0], student.cfg.sigma_data
    w = torch.tensor(dc.guidance)[torch.randint(len(dc.guidance), (B,), generator=generator)]  # (B,)
    guidance = w * student.cfg.guidance_embeds_scale
    r = min(1.0, step / dc.tangent_warmup)
    teacher_v = teacher_velocity(disc.teacher, y, mask, null_y, null_mask, w)
    loss_scm, mse = scm_loss(student, teacher_v, x0, y, mask, guidance, r, generator)
    # generator: one-step samples, from pure noise (t = max_time) or from the sCM proposal's time
    t = torch.where(torch.rand(B, generator=generator) < dc.largest_time_prob, torch.tensor(dc.max_time),
                    scm_time(B, generator, sigma_data=sd))
    t4 = t.view(-1, 1, 1, 1)
    x_t = torch.cos(t4) * x0 + torch.sin(t4) * torch.randn(x0.shape, generator=generator) * sd
    fake = torch.cos(t4) * x_t - torch.sin(t4) * sd * trigflow(
        lambda xs, s: student(xs, s, y, mask, guidance), x_t / sd, t)  # (B, C, H, W)
    disc.heads.eval()  # no spectral-norm power iteration while the generator trains
    loss_adv = -disc(fake, discriminator_time(B, generator), y, mask, generator).mean()  # hinge generator loss
    loss_g = dc.scm_weight * loss_scm + dc.adv_weight * loss_adv
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    sync(list(student.parameters()))
    torch.nn.utils.clip_grad_norm_(student.parameters(), dc.grad_clip)
    opt_g.step()
    # discriminator: real latents up; down the generated ones (those of the step above, where the official code
    # samples again with the updated student) and, as extra negatives, real latents under another sample's caption
    disc.heads.train()
    negatives, y_neg, mask_neg = fake.detach(), y, mask
    if dc.misaligned_pairs:
        negatives = torch.cat([negatives, torch.roll(x0, 1, dims=0)])
        y_neg, mask_neg = torch.cat([y, y]), torch.cat([mask, mask])
    real = disc(x0, discriminator_time(B, generator), y, mask, generator)
    neg = disc(negatives, discriminator_time(len(negatives), generator), y_neg, mask_neg, generator)
    loss_d = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + neg).mean())
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    sync(list(disc.heads.parameters()))
    torch.nn.utils.clip_grad_norm_(disc.heads.parameters(), dc.grad_clip)
    opt_d.step()
    return dict(scm=loss_scm.item(), mse=mse.item(), adv=loss_adv.item(), d=loss_d.item())


# ----------------------------------------------------------------------------------------------------------
# 5. Sampler: the sCM multistep sampler, 1-4 steps
# ----------------------------------------------------------------------------------------------------------
# The sCM multistep sampler (sCM paper Alg. 2): from pure noise at t = pi/2, each step jumps to the end of the ODE,
# x0 = cos(t) x_t - sin(t) sigma_d F, then re-noises x0 to the next, smaller time with fresh noise. One model, any
# number of steps; guidance is an input of the model, so there is no CFG batch.


def scm_times(steps, max_time=1.5708, intermediate=1.3):
    """The TrigFlow times of an N-step sample, ending at 0: [max, 1.3, 0] for 2 steps (the published default),
    evenly spaced from max_time otherwise. max_time 1.5708 ~ pi/2 (the sCM paper used arctan(80 / 0.5) = 1.5645)."""
    if steps == 2 and intermediate is not None:
        return torch.tensor([max_time, intermediate, 0.0])
    return torch.linspace(max_time, 0, steps + 1)


def sample_scm(F_fn, x, times, sigma_data=0.5, generator=None, callback=None):
    """x: (B, C, H, W) = x_t at times[0] (sigma_d-scaled latents); F_fn(x_t / sigma_d, t) -> F. Returns the last
    step's x0 / sigma_d (unit-std latents). A noise draw happens at every step, the last included (where
    sin(0) = 0 makes it irrelevant), as diffusers' SCMScheduler draws: seeded runs match it draw for draw."""
    for i in range(len(times) - 1):
        s, t = times[i], times[i + 1]
        Fx = F_fn(x / sigma_data, s.expand(x.shape[0])).float() * sigma_data  # (B, C, H, W)
        x0 = torch.cos(s) * x - torch.sin(s) * Fx  # the jump to the end of the ODE
        noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else "cpu")
        x = torch.cos(t) * x0 + torch.sin(t) * (noise.to(x.device) * sigma_data)  # re-noised to the next time
        if callback:
            callback(i, x0)
    return x0 / sigma_data


# ----------------------------------------------------------------------------------------------------------
# 6. Components: skip on first read
# ----------------------------------------------------------------------------------------------------------
# Not Sprint's ideas, copied (tests/test_copies.py holds each marked copy to its original in sana.py, dcae.py or
# kernels/): the linear-attention kernel, SANA's DiT blocks, the Gemma-2 text encoder with the complex human
# instruction, the DC-AE (its decoder for sampling, its encoder for image-to-image and the training latents), the
# shapes data, and the loaders and helpers every root file shares.


# The linear-attention kernel: kernels/linear_attention.py beside this file (Triton on CUDA), or the in-file
# reference where this file was copied alone.
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


# SANA's linear DiT blocks, unchanged (sana.py explains them); SprintTransformer (section 3) stacks them.
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


# The Gemma-2 text encoder with SANA's complex human instruction (CHI).
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


# The DC-AE: its decoder for sampling, its encoder for image-to-image and the training latents.
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


# The synthetic shapes data of the tiny default (dcae.py draws it).
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


# Presets, devices, dtypes and strict loading, shared by every root file.
# Copied from dcae.py: get_preset
def get_preset(name):
    """The config of a published checkpoint by name; a Hugging Face repo id works too (the org/ prefix and a
    -diffusers / _diffusers suffix are dropped). One sentence naming the known presets otherwise."""
    key = str(name).split("/")[-1].removesuffix("-diffusers").removesuffix("_diffusers")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {str(name)[:80]!r}; known: {', '.join(PRESETS)}")
    return PRESETS[key]


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


# SANA's loaders: the transformer's config, the original layout's fused projections, the text encoder, the
# tokenizer and the DC-AE of a diffusers folder.
# Copied from sana.py: read_transformer_config with SanaConfig->SprintConfig
def read_transformer_config(folder):
    """The SprintConfig of a diffusers transformer/ folder, from its config.json."""
    c = read_json(os.path.join(folder, "config.json"))
    if c.get("_class_name") != "SanaTransformer2DModel":
        raise ValueError(f"{folder} holds a {c.get('_class_name', 'non-diffusers model')}, "
                         f"not a SanaTransformer2DModel")
    try:
        return check_config(config_from_diffusers(c), os.path.join(folder, "config.json"))
    except (KeyError, TypeError, AttributeError) as e:  # a field missing, or of a kind no config holds
        raise ValueError(f"{os.path.join(folder, 'config.json')} is not a complete SanaTransformer2DModel config "
                         f"({type(e).__name__}: {str(e)[:80]})") from None


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


# SANA's resolution binning: a published model draws its closest trained aspect ratio.
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


# The tiny SANA's text side and data: its Gemma-2, its prompt grammar, its DC-AE and latents; torchrun set-up.
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


# Copied from sana.py: shapes_latents
def shapes_latents(vae, n, seed, chunk=256):
    """n shapes images encoded once by the frozen DC-AE: latents (n, c, 8, 8) and captions."""
    zs, caps = [], []
    for i in range(0, n, chunk):
        x, c = shapes_batch(min(chunk, n - i), seed=seed * 1_000_003 + i)
        with torch.no_grad():
            zs.append(vae.encode(x))
        caps += c
    return torch.cat(zs), caps


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


# Command-line helpers.
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


# Copied from dcae.py: load_image
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


# ----------------------------------------------------------------------------------------------------------
# 7. Checkpoint loading
# ----------------------------------------------------------------------------------------------------------
# diffusers: the Sana_Sprint_*_diffusers pipeline folder (transformer/ text_encoder/ tokenizer/ vae/ scheduler/); the
#            transformer is a SanaTransformer2DModel with guidance_embeds=True and no logvar head.
# NVlabs:    one .pth (Sana_Sprint_*.pth, SANA_Sprint_*_teacher.pth), renamed on load as diffusers' conversion
#            script does, with its fused q|k|v and k|v projections split; it keeps logvar_linear.
# The readers and loaders this section calls (read_weights, load_state_dict_strict, convert_original,
# load_text_encoder, load_vae...) are SANA's and dcae.py's, copied in section 6.


def config_from_diffusers(c):
    """SanaTransformer2DModel config.json with guidance_embeds=True -> SprintConfig (no logvar head: diffusers
    drops it)."""
    if not c.get("guidance_embeds"):
        raise ValueError("this transformer has no guidance embedder: it is a SANA flow model, not a SANA-Sprint "
                         "model (use sana.py for it)")
    if c.get("attention_bias") or c.get("norm_elementwise_affine"):
        raise ValueError("this transformer config uses options no published SANA-Sprint model uses "
                         "(attention_bias / norm_elementwise_affine)")
    if c.get("qk_norm") not in (None, "rms_norm_across_heads"):
        raise ValueError(f"qk_norm {c['qk_norm']!r} is not the published models' rms_norm_across_heads")
    D = c["num_attention_heads"] * c["attention_head_dim"]
    if c["num_cross_attention_heads"] * c["cross_attention_head_dim"] != D:
        raise ValueError("cross-attention width differs from the model width")
    return SprintConfig(in_channels=c["in_channels"], out_channels=c.get("out_channels") or c["in_channels"],
                        hidden_size=D, depth=c["num_layers"], num_heads=c["num_attention_heads"],
                        cross_heads=c["num_cross_attention_heads"], caption_channels=c["caption_channels"],
                        mlp_ratio=c.get("mlp_ratio", 2.5), patch_size=c.get("patch_size", 1),
                        sample_size=c["sample_size"], qk_norm=c.get("qk_norm") is not None,
                        interpolation_scale=c.get("interpolation_scale"),
                        guidance_embeds_scale=c.get("guidance_embeds_scale", 0.1), logvar=False)


ORIGINAL_RENAMES = [  # (regex on the NVlabs key, diffusers key or None = drop), applied in order;
    # the mapping of diffusers' scripts/convert_sana_sprint_to_diffusers.py; logvar_linear (no rule) keeps its name
    (r"^y_embedder\.y_embedding$", None),  # learned null caption of training-time CFG dropout; unused here
    (r"^pos_embed$", None),  # sincos buffer (zeros in NoPE models)
    (r"^x_embedder\.", "patch_embed."),
    (r"^y_embedder\.y_proj\.fc1\.", "caption_projection.linear_1."),
    (r"^y_embedder\.y_proj\.fc2\.", "caption_projection.linear_2."),
    (r"^t_embedder\.mlp\.0\.", "time_embed.timestep_embedder.linear_1."),
    (r"^t_embedder\.mlp\.2\.", "time_embed.timestep_embedder.linear_2."),
    (r"^cfg_embedder\.mlp\.0\.", "time_embed.guidance_embedder.linear_1."),
    (r"^cfg_embedder\.mlp\.2\.", "time_embed.guidance_embedder.linear_2."),
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


def preset_from_name(path):
    """The preset whose name is in the file/folder name, case-insensitively (the hub spells both Sana_Sprint and
    SANA_Sprint); the longest match wins, so a _teacher file gets the teacher's preset."""
    base = os.path.basename(os.path.normpath(path)).lower()
    names = [n for n in PRESETS if n.lower() in base]
    return max(names, key=len) if names else None


def load_transformer(path, preset=None, *, device="cpu", dtype=torch.float32):
    """A diffusers transformer/ folder (or the pipeline folder above it) or an original .pth file (a student, or a
    teacher when its name says so). `preset` gives a .pth its architecture when its name does not."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "transformer")):
            path = os.path.join(path, "transformer")
        cfg, sd = read_transformer_config(path), load_safetensors_dir(path)
    else:
        cfg = get_preset(preset) if preset else PRESETS.get(preset_from_name(path))
        if cfg is None:
            raise ValueError(f"cannot tell which model {path} is from its name: pass preset= (one of "
                             f"{', '.join(PRESETS)})")
        sd = convert_original(read_weights(path))
        if not any(k.startswith("time_embed.") for k in sd):
            raise ValueError(f"{path} is not a SANA-Sprint checkpoint (no t_embedder/cfg_embedder weights)")
        # the file decides what it carries: a student has the guidance embedder, a published .pth the logvar head
        cfg = replace(cfg, guidance_embeds=any(k.startswith("time_embed.guidance_embedder.") for k in sd),
                      logvar="logvar_linear.weight" in sd)
    with torch.device("meta"):
        model = SprintTransformer(cfg)
    load_state_dict_strict(model, sd, path)
    return model.to(device=device, dtype=dtype).eval()


def pipeline_configs(folder):
    """(SprintConfig, DCAEConfig) of a diffusers Sana_Sprint pipeline folder, from its config files alone."""
    if not os.path.exists(folder):
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is a file; give the diffusers pipeline folder as downloaded (transformer/ "
                         f"text_encoder/ tokenizer/ vae/), or load an original .pth with "
                         f"sana_sprint.load_transformer()")
    for sub in ("transformer", "text_encoder", "tokenizer", "vae"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise ValueError(f"{folder} is not a SANA-Sprint diffusers folder: it has no {sub}/ subfolder")
    return read_transformer_config(os.path.join(folder, "transformer")), read_vae_config(os.path.join(folder, "vae"))


# ----------------------------------------------------------------------------------------------------------
# 8. Pipeline: prompts -> sCM sampler -> image
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SanaSprint:
    """Text to image in 1-4 steps: the prompts through the Gemma-2 text encoder, `sample_scm` on the student read
    as a TrigFlow model, the latents through the DC-AE's decoder. Guidance is the student's input (0.1 w into its
    guidance embedder): one model call per step, no CFG batch."""
    transformer: SprintTransformer
    text_encoder: Gemma2
    tokenizer: object  # tokenizers.Tokenizer
    vae: DCAE
    vae_scale: float = VAE_SCALE
    chi: str = CHI  # None: no complex human instruction (the tiny default)
    max_len: int = MAX_TEXT_LEN
    guidance_scale: float = 4.5  # diffusers' default (the app's is 5.0; training samples 4, 4.5, 5)
    max_time: float = 1.5708
    intermediate_time: float = 1.3
    vae_tile: int = None  # encode and decode in tiles of this side in pixels (DCAE; None: in one pass)
    vae_tile_overlap: int = None  # their overlap in pixels (None: the DC-AE's default)

    @property
    def compression(self):  # pixels per latent cell side
        return self.vae.cfg.compression * self.transformer.cfg.patch_size

    def F(self, y, mask, guidance):
        """The TrigFlow model of the prompts: (x_t / sigma_d, t) -> F."""
        model = self.transformer
        dtype = model.proj_out.weight.dtype
        g = torch.full((y.shape[0],), guidance, device=y.device).to(dtype) * model.cfg.guidance_embeds_scale
        return lambda x, t: trigflow(lambda xs, s: model(xs.to(dtype), s, y, mask, g), x, t)

    def check(self, prompts, steps, height, width):
        """One sentence for a request this model cannot serve."""
        if any(not p.strip() for p in prompts):
            raise ValueError("the prompt is empty")
        if not 1 <= steps <= 4:
            raise ValueError(f"SANA-Sprint samples in 1 to 4 steps, not {steps}")
        check_size(height, width, self.compression)

    def encode(self, prompts):
        """list of str -> y (B, L, caption_channels) in the transformer's dtype, mask (B, L)."""
        y, mask = encode_prompts(self.text_encoder, self.tokenizer, prompts, self.max_len, self.chi)
        return y.to(self.transformer.proj_out.weight.dtype), mask

    def noise(self, n, height, width, generator=None):
        """(n, C, height / a, width / a) unit Gaussian latents in float32, drawn on the generator's device (a seed
        gives the same noise whatever the model's device), then moved to the model's device."""
        a, cfg = self.vae.cfg.compression, self.transformer.cfg
        gen = dict(generator=generator, device=generator.device if generator else "cpu")
        noise = torch.randn(n, cfg.in_channels, height // a, width // a, **gen)  # (n, C, h, w)
        return noise.to(self.transformer.proj_out.weight.device)

    def decode(self, latents, out_hw):
        """Unit-std latents (B, C, h, w) -> uint8 images (B, H, W, 3), (H, W) = out_hw: where the model drew another
        size (resolution binning), resized to cover out_hw, then centre-cropped."""
        z = (latents / self.vae_scale).to(next(self.vae.parameters()).dtype)
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

    @torch.no_grad()
    def generate(self, prompts, height, width, steps=2, guidance_scale=None, generator=None, resolution_binning=True,
                 callback=None):
        """prompts: list of str -> uint8 images (B, height, width, 3), from pure noise at t = max_time in `steps`
        steps of `sample_scm`; guidance_scale: w (None: the pipeline's); callback(i, x0) after each step."""
        self.check(prompts, steps, height, width)
        sd = self.transformer.cfg.sigma_data
        h, w = generation_size(self.transformer.cfg, self.compression, height, width, resolution_binning)
        y, mask = self.encode(prompts)
        x = self.noise(len(prompts), h, w, generator) * sd  # x_t at t = max_time: pure noise, std sigma_d
        times = scm_times(steps, self.max_time, self.intermediate_time if steps == 2 else None)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        latents = sample_scm(self.F(y, mask, scale), x, times.to(x.device), sd, generator, callback)
        return self.decode(latents, (height, width))


def load_pipeline(folder, preset=None, *, device="cpu", dtype=torch.float32):
    """A published Sana_Sprint_*_diffusers folder as downloaded: transformer/ text_encoder/ tokenizer/ vae/ (and
    scheduler/, whose sigma_data is read when it is there)."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    pipeline_configs(folder)  # the folder's layout and configs, checked before any weights are read
    transformer = load_transformer(folder, preset, device=device, dtype=dtype)
    sched = os.path.join(folder, "scheduler", "scheduler_config.json")
    if os.path.isfile(sched):
        transformer.cfg = replace(transformer.cfg, sigma_data=read_json(sched).get("sigma_data", 0.5))
    return SanaSprint(transformer, load_text_encoder(os.path.join(folder, "text_encoder"), device=device, dtype=dtype),
                      load_tokenizer(os.path.join(folder, "tokenizer", "tokenizer.json")),
                      load_vae(os.path.join(folder, "vae"), device=device, dtype=dtype))


# ----------------------------------------------------------------------------------------------------------
# 9. Beyond the paper's core: image-to-image
# ----------------------------------------------------------------------------------------------------------
# Not in the paper: image-to-image (SDEdit) with the same student and sampler, which diffusers offers as
# SanaSprintImg2ImgPipeline. The start image's latent is noised to a time below pi/2, and the sCM sampler runs
# from there.


@torch.no_grad()
def image_to_image(pipe, prompts, image, steps=2, guidance_scale=None, generator=None, strength=0.6, callback=None):
    """image: (B, 3, H, W) in [-1, 1], the picture to start from -> uint8 images (B, H, W, 3). It is encoded, noised
    to t = strength * max_time with the generator's first draw, x_t = cos(t) z + sin(t) sigma_d eps, and `sample_scm`
    runs `steps` steps spaced evenly from there to 0 (diffusers' img2img pipeline drops whole steps of the
    text-to-image schedule instead). strength in (0, 1]: 1 starts from pure noise, near 0 keeps the picture."""
    height, width = image.shape[-2:]
    pipe.check(prompts, steps, height, width)
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], not {strength}")
    sd = pipe.transformer.cfg.sigma_data
    y, mask = pipe.encode(prompts)
    noise = pipe.noise(len(prompts), height, width, generator)
    times = torch.linspace(strength * pipe.max_time, 0, steps + 1)
    vae_dtype = next(pipe.vae.parameters()).dtype
    z = pipe.vae.encode(image.to(device=noise.device, dtype=vae_dtype), pipe.vae_tile, pipe.vae_tile_overlap)
    z = z.float() * pipe.vae_scale * sd  # x0
    x = torch.cos(times[0]) * z + torch.sin(times[0]) * noise * sd  # x_t at the start time
    scale = pipe.guidance_scale if guidance_scale is None else guidance_scale
    latents = sample_scm(pipe.F(y, mask, scale), x, times.to(noise.device), sd, generator, callback)
    return pipe.decode(latents, (height, width))


# ----------------------------------------------------------------------------------------------------------
# 10. Tiny default: the tiny SANA distilled, train_tiny, load_tiny
# ----------------------------------------------------------------------------------------------------------
# The teacher is the tiny SANA that `python sana.py --train` commits (a DiT of width 192 x 4 blocks, a 2-layer
# Gemma-2, the tiny DC-AE); the student starts as its copy. Captions and latents are its training data's.


TINY_TEACHER_STEPS = 100  # the dense-time fine-tune of the teacher
TINY_STEPS = 560  # sCM + LADD; at the constant lr the game collapses not far past this (docs/sana_sprint.md)
TINY_REFERENCE = "a 2-core Xeon with AMX"  # where TINY_STEP_SECONDS were measured
# a step of each phase there, in seconds: measured by scripts/time_tiny_recipes.py
TINY_STEP_SECONDS = {"encode": 32.1, "teacher": 0.288, "student": 0.564}
TINY_DISTILL = DistillConfig(guidance=(1.5, 2.0, 2.5), tangent_warmup=100, head_blocks=(1, 3))
TINY_INTERMEDIATE_TIME = 0.9  # the 2-step sampler's second time, chosen on the shapes scorer's choice set: the
# published 1.3 leaves 8x8 latents so noisy that the second step cannot fix what the first got wrong


def read_tiny_sana(path=TINY_TEACHER):
    """The committed tiny SANA: its DiT's state dict (sana.py keys), its text encoder, its tokenizer."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: it comes with the repository's weights/ folder, or "
                                f"`python sana.py --train --train-out {path}` makes it")
    sd = read_weights(path)
    parts = {name: {k[len(name) + 1:]: v.float() for k, v in sd.items() if k.startswith(name + ".")}
             for name in ("transformer", "text_encoder")}
    if not all(parts.values()):
        raise ValueError(f"{path} is not a tiny SANA written by `python sana.py --train`")
    text_encoder = load_state_dict_strict(Gemma2(TINY_GEMMA), parts["text_encoder"], path)
    return parts["transformer"], text_encoder.eval(), load_tokenizer(os.path.splitext(path)[0] + "_tokenizer.json")


def tiny_pipeline(transformer, text_encoder, tokenizer, vae):
    """The tiny default as a `SanaSprint` pipeline: no CHI, 10 text tokens, guidance 2.0 (the tiny SANA's), and
    its own 2-step intermediate time (TINY_INTERMEDIATE_TIME)."""
    return SanaSprint(transformer.eval(), text_encoder.eval(), tokenizer, vae, vae_scale=vae.cfg.scaling_factor,
                      chi=None, max_len=TINY_TEXT_LEN, guidance_scale=2.0, intermediate_time=TINY_INTERMEDIATE_TIME)


def average_gradients(params, world):
    """Under torchrun: the mean of every rank's gradients (what DistributedDataParallel does, for a step that
    calls the model several ways, as sCM's JVP and LADD do)."""
    if world > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


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


def tiny_teacher(sana_sd, z, y, mask, null_y, null_mask, steps, generator, progress, world=1, lr=1e-4,
                 ema_decay=0.97):
    """Stage (a) on the tiny SANA: dense time (`fit_dense_time`), qk-norm calibrated on a batch
    (`calibrate_qk_norm`), then `steps` of `flow_loss` at batch 128, keeping an EMA of the weights. z: (n, C, H, W)
    unit-std latents, y/mask their captions' states. Returns the teacher frozen. The conversion alone keeps the tiny
    SANA's prompt fidelity; without the calibration it loses much of it (figures: docs/sana_sprint.md). `progress`
    (TrainProgress) shows the steps as its phase "teacher"."""
    teacher = teacher_from_sana(sana_sd, PRESETS["tiny"])
    fit = fit_dense_time(teacher.time_embed.timestep_embedder)
    calib = torch.Generator().manual_seed(0)  # one calibration batch for every rank: the weights must agree
    idx = torch.randint(len(z), (128,), generator=calib)
    s = torch.rand(128, generator=calib).view(-1, 1, 1, 1)
    x_s = (1 - s) * z[idx] + s * torch.randn(z[idx].shape, generator=calib)
    calibrate_qk_norm(teacher, x_s, s.flatten(), y[idx], mask[idx])
    progress.log(f"teacher: dense-time embedding fitted (mse {fit:.2e}), qk-norm calibrated")
    params = list(teacher.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    progress.phase("teacher")
    for step in range(steps):
        idx = torch.randint(len(z), (128,), generator=generator)
        loss = flow_loss(teacher, z[idx], y[idx], mask[idx], null_y, null_mask, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params, world)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - ema_decay)
        progress.step(step, **{"flow loss": loss.item()})
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return teacher.eval().requires_grad_(False)


def train_tiny(seed=0, out=TINY_WEIGHTS, log=print, *, steps=TINY_STEPS, teacher_steps=TINY_TEACHER_STEPS,
               batch=32, lr=2e-4, lr_d=2e-4, ema_decay=0.99, n_images=12288, dc=TINY_DISTILL):
    """Distils the committed tiny SANA into a 1-4 step student, deterministically from the seed on 2 threads, in
    float32 (forward-mode AD through bf16 autocast is not worth its risk at this size): the teacher's conversion
    and `teacher_steps` of dense-time fine-tune (`tiny_teacher`), then `steps` of sCM + LADD, keeping an EMA of
    the student (the official recipe keeps none; at batch 32 the raw weights are noisy). The lrs are constant,
    as the official ones (2e-6 there, over tens of thousands of steps), and the run must stop in time: at 2e-4 the
    adversarial game collapses (the one-step output turns into its input noise) not far past 560 steps; do not
    raise `steps` far past it without lowering the lr. The discriminator's lr is the student's: a faster
    discriminator wins late in the run and the saved student draws noise (docs/sana_sprint.md has the runs).
    Under torchrun each rank draws its own batches and rank 0 writes the weights. Returns the student's
    pipeline."""
    rank, world = ddp_setup()
    torch.set_num_threads(max(1, 2 // world))
    torch.use_deterministic_algorithms(True)
    log = log if rank == 0 else (lambda *a: None)
    log(cpu_summary(max(1, 2 // world), world))
    log("precision: float32 on every CPU (forward-mode AD through bfloat16 autocast is not worth its risk at this "
        "size)")
    progress = TrainProgress([("encode", 1, TINY_STEP_SECONDS["encode"] * n_images / 12288),
                              ("teacher", teacher_steps, TINY_STEP_SECONDS["teacher"]),
                              ("student", steps, TINY_STEP_SECONDS["student"] * batch / 32)], TINY_REFERENCE, log,
                             every=50)
    torch.manual_seed(seed)
    t0 = time.time()
    progress.phase("encode")
    sana_sd, te, tok = read_tiny_sana()
    te.requires_grad_(False)
    vae = load_tiny_dcae()
    z, caps = shapes_latents(vae, n_images, seed)
    z = z * vae.cfg.scaling_factor  # unit-std latents, as the tiny SANA was trained on
    with torch.no_grad():  # the text encoder is frozen: every caption encoded once
        ids, mask = tokenize(tok, caps, TINY_TEXT_LEN)
        y = torch.cat([te(ids[i:i + 1024], mask[i:i + 1024]) for i in range(0, len(ids), 1024)])
        null_ids, null_mask = tokenize(tok, [""], TINY_TEXT_LEN)
        null_y = te(null_ids, null_mask)
    progress.step(0, images=n_images)
    g = torch.Generator().manual_seed(seed * world + rank)  # batches and noise: one stream per rank
    teacher = tiny_teacher(sana_sd, z, y, mask, null_y, null_mask, teacher_steps, g, progress, world)
    # (b) + (c) the student: the teacher plus a guidance embedder whose output starts at 0, and the logvar head
    student = SprintTransformer(PRESETS["tiny"])
    student.load_state_dict(teacher.state_dict(), strict=False)
    nn.init.zeros_(student.time_embed.guidance_embedder.linear_2.weight)
    nn.init.zeros_(student.time_embed.guidance_embedder.linear_2.bias)
    nn.init.zeros_(student.logvar_linear.weight)
    nn.init.zeros_(student.logvar_linear.bias)
    disc = Discriminator(teacher, dc.head_blocks)
    opt_g = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.heads.parameters(), lr=lr_d, betas=(0.0, 0.99), weight_decay=0.0)
    ema = [p.detach().clone() for p in student.parameters()]
    progress.phase("student")
    for step in range(steps):
        idx = torch.randint(len(z), (batch,), generator=g)
        x0 = z[idx] * student.cfg.sigma_data
        losses = distill_step(student, disc, x0, y[idx], mask[idx], null_y, null_mask, opt_g, opt_d, step, dc, g,
                              sync=lambda ps: average_gradients(ps, world))
        with torch.no_grad():  # EMA of the student's weights: what gets saved
            for e, p in zip(ema, student.parameters()):
                e.lerp_(p, 1 - min(ema_decay, (step + 1) / (step + 10)))
        progress.step(step, **{k: float(v) for k, v in losses.items()})
    student.eval()
    with torch.no_grad():  # the EMA, rounded to the fp16 of the file: the pipeline returned is what load_tiny reads
        for e, p in zip(ema, student.parameters()):
            p.copy_(e.half())
    if rank == 0:
        sd = {f"transformer.{k}": v.half() for k, v in student.state_dict().items()}
        sd.update({f"text_encoder.{k}": v.half() for k, v in te.state_dict().items()})
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_weights(sd, out, metadata={"seed": str(seed), "steps": str(steps), "teacher_steps": str(teacher_steps),
                                        "batch": str(batch), "lr": str(lr)})
        tok.save(os.path.splitext(out)[0] + "_tokenizer.json")
        log(f"saved {out} ({os.path.getsize(out) / 1e6:.2f} MB) in {time.time() - t0:.0f}s")
    if world > 1:
        dist.destroy_process_group()
    return tiny_pipeline(student, te, tok, vae)


def load_tiny(path=TINY_WEIGHTS, *, device="cpu", dtype=torch.float32):
    """The committed tiny student (written by `python sana_sprint.py --train`), its text encoder and tokenizer,
    and the tiny DC-AE."""
    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: it comes with the repository's weights/ folder, or "
                                f"`python sana_sprint.py --train --train-out {path}` makes it")
    sd = read_weights(path)
    parts = {name: {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
             for name in ("transformer", "text_encoder")}
    if not all(parts.values()):
        raise ValueError(f"{path} is not a tiny SANA-Sprint written by `python sana_sprint.py --train` (it holds "
                         f"no transformer.* and text_encoder.* weights)")
    transformer, text_encoder = SprintTransformer(PRESETS["tiny"]), Gemma2(TINY_GEMMA)
    load_state_dict_strict(transformer, parts["transformer"], path)
    load_state_dict_strict(text_encoder, parts["text_encoder"], path)
    tokenizer = load_tokenizer(os.path.splitext(path)[0] + "_tokenizer.json")
    return tiny_pipeline(transformer.to(device=device, dtype=dtype), text_encoder.to(device=device, dtype=dtype),
                         tokenizer, load_tiny_dcae(device=device, dtype=dtype))


# ----------------------------------------------------------------------------------------------------------
# 11. CLI
# ----------------------------------------------------------------------------------------------------------
# Every root file takes the same flags, in this order, where they apply: --prompt --ckpt --model --steps
# --guidance --height --width --seed --device --dtype --out --train --train-out --train-steps, then its own, in
# labelled groups. Bad input is refused in one sentence (`error: ...`, exit code 2) before anything is loaded or
# generated. `main` reads: parse, check, load, run, write.


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
    p = argparse.ArgumentParser(description="SANA-Sprint text-to-image in 1-4 steps (the tiny built-in model "
                                "without --ckpt)",
                                epilog=f"The tiny default model (no --ckpt) draws only {TINY_GRAMMAR}.")
    p.add_argument("--prompt", help="what to draw (for the tiny default model, see below)")
    p.add_argument("--ckpt", help="published diffusers pipeline folder (Sana_Sprint_*_diffusers: transformer/ "
                   "text_encoder/ tokenizer/ vae/); default: the tiny model")
    p.add_argument("--model", help=f"preset of the --ckpt transformer: {', '.join(PRESETS)}")
    p.add_argument("--steps", type=int, default=2, help="sampling steps, 1 to 4 (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale w, an input of the student's guidance "
                   "embedder (it reads 0.1 w), not a second pass: the student learned the teacher's CFG velocity "
                   "v_u + w (v_c - v_u) for w in 4-5 (the tiny one 1.5-2.5) and makes one model call per step, so no "
                   "value turns guidance off (1 asks for the teacher's v_c alone, a scale it was not distilled at) "
                   "(default: the model's: 4.5 for the published models, as diffusers; 2.0 for the tiny one)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's training resolution)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's training resolution)")
    p.add_argument("--seed", type=int, default=0, help="random seed (the noise; --train)")
    p.add_argument("--device", default="", help="cpu, cuda, cuda:N or mps (default: the first available of cuda, mps, cpu)")
    p.add_argument("--dtype", default="", help="float32, bfloat16 or float16 (default: the best for the "
                   "device); with --train, where the recipe has a choice: float32 or bfloat16 autocast (default: "
                   "bfloat16 where the CPU computes it natively)")
    p.add_argument("--out", default="sana_sprint.png", help="the image to write (default: %(default)s)")
    p.add_argument("--train", action="store_true", help="retrain the tiny default model from --seed (runs under torchrun too)")
    p.add_argument("--train-out", default=None, help="where --train writes the weights (default: the committed "
                   "file's name in the working folder; the committed weights in weights/ are replaced only when named "
                   "here)")
    p.add_argument("--train-steps", type=int, default=None, metavar="N", help="with --train: N optimisation steps in "
                   "each phase of the recipe in place of its own counts (a quick check)")
    p.add_argument("--tile", type=int, nargs="?", const=TILE, default=None, metavar="PIXELS",
                   help=f"encode and decode through the DC-AE in square tiles of this side, a multiple of its "
                   f"compression, their overlap cross-faded as in diffusers' AutoencoderDC (memory of one tile: "
                   f"docs/dcae.md); alone: {TILE}; 0: never (default: tiles of {TILE} for images of more than "
                   f"{AUTO_TILE_SIDE}x{AUTO_TILE_SIDE} pixels)")
    p.add_argument("--tile-overlap", type=int, default=None, metavar="PIXELS", help="with tiles: the overlap of "
                   "neighbouring tiles, a multiple of the DC-AE's compression (default: 64, or one latent cell if "
                   "larger)")
    research = p.add_argument_group("research options")
    research.add_argument("--intermediate-time", type=float, default=None, help="with --steps 2: the TrigFlow time "
                          "of the second step, in (0, pi/2) (default: the model's: 1.3 for the published models, "
                          f"{TINY_INTERMEDIATE_TIME} for the tiny one)")
    i2i = p.add_argument_group("image-to-image (beyond the paper's core)")
    i2i.add_argument("--image", help="start from this picture instead of pure noise")
    i2i.add_argument("--strength", type=float, default=0.6, help="with --image: how much to change it, in (0, 1]: "
                     "the start time is strength x pi/2 (default: %(default)s)")
    return p


def check_args(args):
    """Every check of the command line that reads no weights, each refused in one sentence, in this order. Returns
    the start image ((1, 3, H, W) in [-1, 1], or None) and the output size (h, w) in pixels."""
    if not 0 <= args.seed < 2**63:  # torch takes 64-bit seeds; larger ones failed after the model had loaded
        raise ValueError(f"--seed must be between 0 and 2**63 - 1, not {args.seed}")
    resolve_dtype(args.dtype, resolve_device(args.device))  # --device and --dtype first, one sentence each
    if args.prompt is None or not args.prompt.strip():
        raise ValueError('the prompt is empty: pass --prompt "two red circles on a blue background"')
    if not 1 <= args.steps <= 4:
        raise ValueError(f"--steps must be 1, 2, 3 or 4 (SANA-Sprint is a 1-4 step model), not {args.steps}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number, not {args.guidance}")
    if args.guidance is not None and not 0 <= args.guidance <= 100:  # beyond 100 only saturation, or NaN
        raise ValueError(f"--guidance must be between 0 and 100 (published models use about 4.5), not {args.guidance}")
    refuse_unused(args, ("--train-out", "--train-steps"), "without --train")
    if args.intermediate_time is not None and not 0 < args.intermediate_time < math.pi / 2:
        raise ValueError(f"--intermediate-time must be in (0, pi/2), not {args.intermediate_time}")
    if args.intermediate_time is not None and (args.steps != 2 or args.image):
        raise ValueError("--intermediate-time sets the second of two text-to-image steps: use it with --steps 2 "
                         "and no --image")
    if not (math.isfinite(args.strength) and 0 < args.strength <= 1):
        raise ValueError(f"--strength must be in (0, 1], not {args.strength}")
    if not args.image:
        refuse_unused(args, ("--strength",), "without --image")
    for name, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive number of pixels, not {value}")
    if args.model:
        get_preset(args.model)
        if not args.ckpt and args.model != "tiny":
            raise ValueError("--model names the preset of a --ckpt; give --ckpt too")
    if not args.ckpt:
        check_tiny_prompt(args.prompt)
    cfg, vae_cfg = pipeline_configs(args.ckpt) if args.ckpt else (PRESETS["tiny"], tiny_dcae_config())
    f = vae_cfg.compression * cfg.patch_size
    image = None
    if args.image:
        image = load_image(args.image, f)  # (1, 3, H, W): its size is the output's
        if args.height or args.width:
            raise ValueError("--image sets the size: leave out --height/--width")
        h, w = image.shape[-2:]
    else:
        side = cfg.sample_size * vae_cfg.compression  # the training resolution
        h, w = args.height or side, args.width or side
    check_size(h, w, f)
    args.tile = cli_tile(args.tile, args.tile_overlap, vae_cfg.compression, h, w)  # None: in one pass
    device = resolve_device(args.device)
    check_memory(cfg, vae_cfg, h, w, resolve_dtype(args.dtype, device), device, args.tile)
    check_out_path(args.out, (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"))
    if args.image and os.path.exists(args.out) and os.path.samefile(args.out, args.image):
        raise ValueError(f"--out {args.out} is the --image it starts from, which the result would overwrite: give "
                         f"another file name")
    return image, h, w


def train_from_args(args):
    """--train: `train_tiny` from --seed into --train-out; --train-steps N replaces both phases' step counts."""
    if not 0 <= args.seed < 2**63:  # torch takes 64-bit seeds; larger ones failed after the model had loaded
        raise ValueError(f"--seed must be between 0 and 2**63 - 1, not {args.seed}")
    refuse_unused(args, ("--prompt", "--ckpt", "--model", "--steps", "--guidance", "--height", "--width", "--out",
                         "--intermediate-time", "--image", "--strength", "--tile", "--tile-overlap"),
                  "with --train, which writes --train-out")
    refuse_unused(args, ("--dtype",), "with --train, whose recipe trains in float32 on every CPU")
    if args.train_steps is not None and args.train_steps < 1:
        raise ValueError("--train-steps must be at least 1")
    out = check_out_path(train_out_path(args.train_out, TINY_WEIGHTS), (".safetensors",), "--train-out")
    train_tiny(seed=args.seed, out=out, steps=args.train_steps or TINY_STEPS,
               teacher_steps=args.train_steps or TINY_TEACHER_STEPS)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.train:
            return train_from_args(args)
        image, h, w = check_args(args)  # everything refused before a weight is read
        device, dtype = pick_device_dtype(args.device, args.dtype, tiny=not args.ckpt)
        t0 = time.time()
        pipe = load_pipeline(args.ckpt, args.model, device=device, dtype=dtype) if args.ckpt else \
            load_tiny(device=device, dtype=dtype)
        print(f"loaded in {time.time() - t0:.1f}s")
        if args.intermediate_time is not None:
            pipe.intermediate_time = args.intermediate_time
        pipe.vae_tile, pipe.vae_tile_overlap = args.tile, args.tile_overlap  # --tile, as check_args resolved it
        cut = tokens_cut(pipe.tokenizer, args.prompt, pipe.max_len, pipe.chi)
        if cut:
            print(f"note: the prompt is {cut} tokens too long for this model, which reads {pipe.max_len} text tokens: "
                  f"its end was cut off")
        t0 = time.time()
        g = torch.Generator().manual_seed(args.seed)
        progress = StepProgress(args.steps)
        if image is None:
            img = pipe.generate([args.prompt], h, w, args.steps, args.guidance, g, callback=progress)[0]
        else:
            img = image_to_image(pipe, [args.prompt], image, args.steps, args.guidance, g, args.strength, progress)[0]
        Image.fromarray(img.numpy()).save(args.out)
        guidance = pipe.guidance_scale if args.guidance is None else args.guidance
        print(f"wrote {args.out}: {args.prompt.strip()[:60]!r} ({w}x{h}, {args.steps} step(s), guidance {guidance}"
              f"{f', from {args.image} at strength {args.strength}' if args.image else ''}, {time.time() - t0:.1f}s)")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
