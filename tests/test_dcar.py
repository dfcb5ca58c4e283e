"""Tests for dcar.py: parity with the official code's outputs on every case folder under fixtures/dcar (DC-HT, T5,
the generator, the residual head, the whole seeded sampling run, one training step), the published manifests on
the meta device, DC-HT's training stages, and the committed tiny default (tokenizer, fidelity, CLI, training)."""
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_close, cases, committed, tiny_fidelity  # also puts the repository root on the path
import dcar
import shapes_score

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "dcar")
CASES = cases("dcar", "io.safetensors", "dc-ht/config.json", "config.yaml", "meta.json")  # parametrize over "case"


@CASES
def test_dcht_parity(case):
    """Encoder output, indices, quantized and normalised latents, residual, losses, and the four decodes."""
    io = load_file(os.path.join(case, "io.safetensors"))
    model = dcar.load_dcht(os.path.join(case, "dc-ht"))
    with torch.no_grad():
        assert_close("tok.encoder_out", model.encoder(io["tok.image"]), io["tok.encoder_out"], atol=1e-5, rtol=1e-5)
        z_q, indices, residual, features, losses = model.encode(io["tok.image"])
        assert torch.equal(indices, io["tok.indices"])
        assert_close("tok.z_quantized", z_q, io["tok.z_quantized"], atol=1e-6, rtol=1e-5)
        assert_close("tok.features", features, io["tok.features"], atol=1e-5, rtol=1e-5)
        assert_close("tok.residual_features", residual, io["tok.residual_features"], atol=1e-5, rtol=1e-5)
        for name in ("quantizer", "commitment", "codebook"):
            assert_close(f"tok.{name}_loss", losses[name], io[f"tok.{name}_loss"], atol=1e-7, rtol=1e-5)
        flat = indices.flatten(1)
        decodes = {"decode_quant": model.decode(z_q), "decode_tokens_discrete": model.decode_tokens(flat),
                   "decode_tokens_hybrid": model.decode_tokens(flat, residual),
                   "decode_continuous": model.decode(features)}
    for name, got in decodes.items():
        assert_close(f"tok.{name}", got, io[f"tok.{name}"], atol=1e-5, rtol=1e-5)
    # hybrid = discrete + residual = the normalised continuous latent: both decodes agree
    assert_close("hybrid vs continuous", decodes["decode_tokens_hybrid"], decodes["decode_continuous"],
                 atol=1e-5, rtol=1e-5)


def test_dcht_manifest_on_meta():
    """The published dc-ht state dict (339 entries) converts to DCHT's names and shapes, key for key."""
    manifest = json.load(open(os.path.join(FIX, "manifests", "dc-ht.json")))
    sd = {k: torch.empty(v["shape"], device="meta") for k, v in manifest["state_dict"].items()}
    assert len(sd) == manifest["num_state_dict_entries"]
    with torch.device("meta"):
        model = dcar.DCHT(dcar.PRESETS["dc-ht"])
    dcar.load_state_dict_strict(model, dcar.convert_original_state_dict(sd), "dc-ht manifest")


def generator_config(case):
    """The fixture's generator config and sampler settings, from its config.yaml (the official schema)."""
    return dcar.dcar_config_from_yaml(dcar.parse_yaml(os.path.join(case, "config.yaml")))


@CASES
def test_text_encoder_parity(case):
    """T5 ids (the tokenizer's, padded to the text length) and the encoder run without a mask."""
    from tokenizers import Tokenizer
    io, meta = load_file(os.path.join(case, "io.safetensors")), json.load(open(os.path.join(case, "meta.json")))
    cfg, _ = generator_config(case)
    tok = Tokenizer.from_file(os.path.join(case, "t5-tiny", "tokenizer.json"))
    ids = dcar.tokenize_t5(tok, meta["prompts"], cfg.text_len)
    assert torch.equal(ids, io["text.input_ids"])
    assert torch.equal((ids != 0).to(torch.uint8), io["text.attention_mask"])
    with torch.no_grad():
        h = dcar.load_t5_encoder(os.path.join(case, "t5-tiny"))(ids)
    assert_close("text.encoder_hidden_states", h, io["text.encoder_hidden_states"], atol=1e-5, rtol=1e-5)


@CASES
def test_generator_parity(case):
    """Logits and hidden states, and the CFG pair with the learned null caption in the second half."""
    io = load_file(os.path.join(case, "io.safetensors"))
    model = dcar.load_generator(os.path.join(case, "dc-ar", "pytorch_model.bin"), generator_config(case)[0])
    assert_close("gen.pos_embed", model.pos_embed, io["gen.pos_embed"], atol=0, rtol=0)
    ids, y, mask = io["gen.input_ids"], io["text.encoder_hidden_states"], io["text.attention_mask"]
    B = ids.shape[0]
    with torch.no_grad():
        logits, hidden = model(ids, y, mask)
        pair_logits, pair_hidden = model(ids.repeat(2, 1), y.repeat(2, 1, 1), mask.repeat(2, 1),
                                         torch.arange(2 * B) >= B)
    assert_close("gen.logits", logits, io["gen.logits"], atol=1e-5, rtol=1e-5)
    assert_close("gen.hidden", hidden, io["gen.hidden"], atol=1e-5, rtol=1e-5)
    assert_close("gen.cfgpair_logits", pair_logits, io["gen.cfgpair_logits"], atol=1e-5, rtol=1e-5)
    assert_close("gen.cfgpair_hidden", pair_hidden, io["gen.cfgpair_hidden"], atol=1e-5, rtol=1e-5)


def test_generator_manifest_on_meta():
    """The published dc-ar-512 generator and its diffusion head, and the t5-base encoder, build key for key and
    shape for shape."""
    p = "diffloss.net."
    for name, build, keep in [("dc-ar-512.json", lambda: dcar.DCAR(dcar.PRESETS["dc-ar-512"]),
                               lambda k: not k.startswith("diffloss.")),
                              ("dc-ar-512.json", lambda: dcar.DiffusionHead(dcar.PRESETS["dc-ar-512"]),
                               lambda k: k.startswith(p)),
                              ("t5-base-encoder.json", lambda: dcar.T5Encoder(dcar.T5Config()), lambda k: True)]:
        manifest = json.load(open(os.path.join(FIX, "manifests", name)))
        sd = {k: torch.empty(v["shape"], device="meta") for k, v in manifest["state_dict"].items() if keep(k)}
        sd = {k[len(p):] if k.startswith(p) else k: v for k, v in sd.items()}
        if name.startswith("t5"):
            sd = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in sd.items()}
            sd = {("embed_tokens.weight" if k in ("shared.weight", "embed_tokens.weight") else k): v
                  for k, v in sd.items()}
        with torch.device("meta"):
            model = build()
        dcar.load_state_dict_strict(model, sd, name)


@CASES
def test_diffusion_head_parity(case):
    """The residual head, its CFG, the respaced schedule, p_mean_variance and the training losses."""
    io = load_file(os.path.join(case, "io.safetensors"))
    cfg, _ = generator_config(case)
    head = dcar.load_diffusion_head(os.path.join(case, "dc-ar", "pytorch_model.bin"), cfg)
    betas, timestep_map = dcar.respace(dcar.cosine_betas(), len(io["diff.timestep_map"]))
    assert torch.equal(betas, io["diff.gen_betas"]) and torch.equal(timestep_map, io["diff.timestep_map"])
    sampling, training = dcar.Diffusion(betas, timestep_map), dcar.Diffusion(dcar.cosine_betas())
    x, c, t = io["diff.x"], io["diff.c"], io["diff.spaced_t"]
    with torch.no_grad():
        assert_close("diff.net_out", head(x, io["diff.t"], c), io["diff.net_out"], atol=1e-5, rtol=1e-5)
        # guided: the first half's x for both halves, (1 + s) eps_c - s eps_u. The case names s in prose only:
        # recover it from the tensors by least squares, then every element must agree with that one scale (how the
        # head uses a given scale is checked by test_sampler_parity, whose guidance meta.json records)
        half, C = len(x) // 2, x.shape[1]
        eps_c, eps_u = head(torch.cat([x[:half], x[:half]]), io["diff.t"], c)[:, :C].chunk(2)
        gap = eps_c - eps_u
        scale = ((io["diff.net_out_cfg"][:half, :C] - eps_c) * gap).sum() / gap.pow(2).sum()
        assert_close("diff.net_out_cfg", head.forward_with_cfg(x[:half], io["diff.t"], c, scale.item()),
                     io["diff.net_out_cfg"], atol=1e-5, rtol=1e-5)
        pmv = sampling.p_mean_variance(head(x, timestep_map[t], c), x, t)
        for name, got in zip(("mean", "variance", "log_variance", "pred_xstart"), pmv):
            assert_close(f"diff.pmv_{name}", got, io[f"diff.pmv_{name}"], atol=1e-5, rtol=1e-5)
        loss, mse, vb = training.training_losses(head, io["diff.train_target"] / cfg.vae_scale, io["diff.train_t"],
                                                 c, io["diff.train_noise"])
    assert_close("diff.train_mse", mse, io["diff.train_mse"], atol=1e-5, rtol=1e-5)
    assert_close("diff.train_vb", vb, io["diff.train_vb"], atol=1e-5, rtol=1e-5)
    assert_close("diff.train_loss", loss, io["diff.train_loss"], atol=1e-5, rtol=1e-5)


class Replay:
    """Hands the sampler the recorded draws, in order, checking each one's kind and shape."""

    def __init__(self, io, prefix):
        keys = sorted(k for k in io if k.startswith(prefix + "rng."))
        self.draws = [(k.split(".")[-1], io[k]) for k in keys]
        self.i = 0

    def next(self, kinds, shape):
        kind, value = self.draws[self.i]
        assert kind in kinds and tuple(value.shape) == tuple(shape), (self.i, kind, tuple(value.shape), shape)
        self.i += 1
        return value

    def rand(self, *shape):
        return self.next(("rand",), shape)

    def uniform(self, *shape):
        return self.next(("uniform_",), shape)

    def randn(self, *shape):
        return self.next(("randn", "randn_like"), shape)

    def randint(self, high, n):
        value = self.next(("randint",), (n,))
        assert 0 <= value.min() and value.max() < high
        return value


@CASES
def test_sampler_parity(case):
    """The whole seeded sampling run with the recorded draws injected: every round's transformer input and raw
    logits, the final tokens, the residual tokens, and the decoded image; every draw used, in order."""
    io, meta = load_file(os.path.join(case, "io.safetensors")), json.load(open(os.path.join(case, "meta.json")))
    cfg, _ = generator_config(case)
    path = os.path.join(case, "dc-ar", "pytorch_model.bin")
    model, head = dcar.load_generator(path, cfg), dcar.load_diffusion_head(path, cfg)
    with torch.no_grad():
        y = dcar.load_t5_encoder(os.path.join(case, "t5-tiny"))(io["sample.text_input_ids"])
    mask = (io["sample.text_input_ids"] != 0).long()
    seen = {}

    def trace(step, ids, logits):
        seen[step] = (ids, logits)
    replay = Replay(io, "sample.")
    ids, residual = dcar.generate(model, head, y, mask, meta["sample_steps"], meta["guidance_scale"],
                                  meta["randomize_temperature"], replay, len(io["diff.timestep_map"]), trace)
    assert replay.i == len(replay.draws) and [k for k, _ in replay.draws] == meta["rng_sequence_sample"]
    for step, (step_ids, logits) in seen.items():
        assert torch.equal(step_ids, io[f"sample.step{step:02d}.input_ids"]), step
        assert_close(f"step {step} logits", logits, io[f"sample.step{step:02d}.raw_logits"], atol=1e-4, rtol=1e-4)
    assert torch.equal(ids, io["sample.ids"])
    assert_close("sample.residual_features", residual, io["sample.residual_features"], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        image = dcar.load_dcht(os.path.join(case, "dc-ht")).decode_tokens(ids, residual)
    assert_close("sample.image", (image * 0.5 + 0.5).clamp(0, 1), io["sample.image"], atol=1e-4, rtol=1e-4)


def train_config(case, io):
    """The case's training settings: caption dropout and the diffusion head's rows per token from its config.yaml
    (class_label_dropout, diffusion.batch_mul), the MLM loss's label smoothing and unmasked-token weight from the
    name of its loss tensor (`train.mlm_loss_ls<x>_unmasked<y>`: the release has no training config). -> (TrainConfig,
    that key)."""
    gen = dcar.parse_yaml(os.path.join(case, "config.yaml"))["model"]["generator"]
    key = next(k for k in io if k.startswith("train.mlm_loss_"))
    ls, unmasked = map(float, re.fullmatch(r"train\.mlm_loss_ls([\d.]+)_unmasked([\d.]+)", key).groups())
    return dcar.TrainConfig(label_smoothing=ls, unmasked_weight=unmasked, cond_drop=gen["class_label_dropout"],
                            batch_mul=gen["diffusion"]["batch_mul"]), key


@CASES
def test_training_step_parity(case):
    """Masking, the generator in train mode with caption dropout, the MLM loss and the diffusion loss on batch_mul
    rows per token, with the recorded draws replayed; every setting comes from the case's files (train_config)."""
    io, meta = load_file(os.path.join(case, "io.safetensors")), json.load(open(os.path.join(case, "meta.json")))
    cfg, _ = generator_config(case)
    tc, key = train_config(case, io)
    path = os.path.join(case, "dc-ar", "pytorch_model.bin")
    model, head = dcar.load_generator(path, cfg).train(), dcar.load_diffusion_head(path, cfg).train()
    replay = Replay(io, "train.")  # its shape checks hold the diffusion timesteps to B N batch_mul rows
    out = dcar.training_loss(model, head, io["train.target_tokens"], io["train.residual_target"],
                             io["text.encoder_hidden_states"], io["text.attention_mask"], tc, replay)
    assert replay.i == len(replay.draws) and [k for k, _ in replay.draws] == meta["rng_sequence_train"]
    assert torch.equal(out["masked"], io["train.masked_tokens"]) and torch.equal(out["masks"], io["train.masks"].bool())
    assert_close("train.logits", out["logits"], io["train.logits"], atol=1e-5, rtol=1e-5)
    assert_close(key, out["ce"], io[key], atol=1e-6, rtol=1e-5)
    assert_close("train.diff_loss", out["diffusion"], io["train.diff_loss"], atol=1e-5, rtol=1e-5)


@CASES
def test_training_step_follows_the_cases_batch_mul(case, tmp_path):
    """A case as a contributor would add it: this one copied with a smaller `diffusion.batch_mul` in its config.yaml
    (the largest proper divisor m of the recorded M). The head's rows are M tiles of the B N tokens (MAR's
    `.repeat(batch_mul, 1)`), so the recorded timesteps and noises split into k = M / m sets of m tiles: the step
    run on the copy must draw B N m of each (Replay's shape checks fail on any other batch_mul, a code default
    included), and its diffusion losses over the k sets must average to the recorded loss (a mean over all rows)."""
    import shutil
    io = load_file(os.path.join(case, "io.safetensors"))
    big = int(re.search(r"\n\s+batch_mul:\s*(\d+)", open(os.path.join(case, "config.yaml")).read()).group(1))
    if big == 1:
        pytest.skip("batch_mul 1 has no smaller setting to derive")
    m = big // next(p for p in range(2, big + 1) if big % p == 0)  # the largest proper divisor
    new = shutil.copytree(case, tmp_path / "case")
    text = open(new / "config.yaml").read()
    open(new / "config.yaml", "w").write(re.sub(r"(\n\s+batch_mul:\s*)\d+", rf"\g<1>{m}", text, count=1))
    cfg, _ = generator_config(new)
    tc, key = train_config(new, io)
    path = os.path.join(new, "dc-ar", "pytorch_model.bin")
    model, head = dcar.load_generator(path, cfg).train(), dcar.load_diffusion_head(path, cfg).train()
    losses = []
    for part in range(big // m):  # the recorded draws with only this set's tiles of the timesteps and noises
        rows = io["train.target_tokens"].numel() * m
        sub = {k: v[part * rows:(part + 1) * rows] if k.split(".")[-1] in ("randint", "randn_like") else v
               for k, v in io.items() if k.startswith("train.rng.")}
        replay = Replay(sub, "train.")
        out = dcar.training_loss(model, head, io["train.target_tokens"], io["train.residual_target"],
                                 io["text.encoder_hidden_states"], io["text.attention_mask"], tc, replay)
        assert replay.i == len(replay.draws)
        assert_close(key, out["ce"], io[key], atol=1e-6, rtol=1e-5)  # the token loss does not depend on it
        losses.append(out["diffusion"])
    assert len(losses) > 1 and losses[0] != losses[1]
    assert_close("train.diff_loss (mean over the sets)", torch.stack(losses).mean(), io["train.diff_loss"],
                 atol=1e-5, rtol=1e-5)


@CASES
def test_pipeline_parity(case):
    """The case folder as a --ckpt folder: config.yaml names the checkpoints and the sampler's settings (they must
    be the run's, as meta.json records them), and the pipeline with the recorded draws gives the run's image."""
    io, meta = load_file(os.path.join(case, "io.safetensors")), json.load(open(os.path.join(case, "meta.json")))
    pipe = dcar.load_pipeline(case)
    assert (pipe.steps, pipe.guidance, pipe.temperature) == (meta["sample_steps"], meta["guidance_scale"],
                                                             meta["randomize_temperature"])
    assert pipe.diffusion_steps == len(io["diff.timestep_map"])
    images = pipe.generate(meta["prompts"], draws=Replay(io, "sample."))
    want = (io["sample.image"] * 255).round().permute(0, 2, 3, 1)
    assert (images.float() - want).abs().max() <= 1, "more than one level of 255 off"


@CASES
def test_pos_embed_is_the_sincos_table(case):
    """A new generator starts with the case's stored 2-D sin-cos table."""
    stored = load_file(os.path.join(case, "io.safetensors"))["gen.pos_embed"]
    assert_close("pos_embed", dcar.DCAR(generator_config(case)[0]).pos_embed, stored, atol=1e-6, rtol=1e-5)


@CASES
@pytest.mark.parametrize("stage", dcar.DCHT_STAGES)
def test_dcht_stages_train(case, stage):
    """Each stage of DC-HT's adaptation trains what it should (the decoder stage leaves encoder and codebook
    alone) and lowers its loss on a fixed batch over a few steps."""
    model = dcar.load_dcht(os.path.join(case, "dc-ht")).train()
    side = load_file(os.path.join(case, "io.safetensors"))["tok.image"].shape[-1]
    ramp = torch.linspace(-0.8, 0.8, side)
    images = torch.stack([torch.stack([ramp[None].expand(side, side), ramp[:, None].expand(side, side),
                                       torch.full((side, side), 0.3 * s)]) for s in (-1, 1)])  # learnable images
    params = dcar.dcht_trainable(model, stage)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(10):
        out = dcar.dcht_loss(model, images, stage, torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.9 * losses[0], losses
    moved = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    want = {"continuous": {"encoder", "decoder"}, "discrete": {"encoder", "decoder", "quantize"},
            "decoder": {"decoder"}}[stage]
    assert moved == want, moved


@CASES
def test_cli_with_the_case_folder(case, tmp_path, capsys):
    """`python dcar.py --prompt ... --ckpt DIR` on a case folder (the published layout, described by its yaml)."""
    from PIL import Image
    out = tmp_path / "dcar.png"
    prompt = json.load(open(os.path.join(case, "meta.json")))["prompts"][0]
    dcar.main(["--prompt", prompt, "--ckpt", case, "--out", str(out), "--device", "cpu"])
    side = load_file(os.path.join(case, "io.safetensors"))["sample.image"].shape[-1]
    assert Image.open(out).size == (side, side) and "wrote" in capsys.readouterr().out


# ---- the tiny default -------------------------------------------------------------------------------------------
TINY_FILES = (dcar.TINY_WEIGHTS, dcar.TINY_DCHT, os.path.splitext(dcar.TINY_WEIGHTS)[0] + "_tokenizer.json")


def dcht_reconstruction(seeds=(0, 1, 2, 3)):
    """The tiny DC-HT's reconstructions of renderings of the README's prompts, through the hybrid path (discrete +
    residual) and the discrete path alone: (fidelity, PSNR in dB) of each."""
    dcht = dcar.load_tiny_dcht()
    captions = shapes_score.readme_prompts() * len(seeds)
    images = [shapes_score.render(c, 1000 * s + i) for s in seeds for i, c in enumerate(shapes_score.readme_prompts())]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = {}
    with torch.no_grad():
        _, indices, residual, _, _ = dcht.encode(x)
        for name, res in (("hybrid", residual), ("discrete", None)):
            y = dcht.decode_tokens(indices.flatten(1), res).clamp(-1, 1)
            psnr = 10 * torch.log10(4 / (y - x).pow(2).mean()).item()
            rec = list(((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
            out[name] = (shapes_score.fidelity(rec, captions), psnr)
    return out


@committed(dcar.TINY_DCHT)
def test_tiny_dcht_reconstructs_the_prompts():
    """The generator cannot beat its tokenizer: the hybrid path must reconstruct the README's scenes right (measured
    0.958 of 96, 26.4 dB; two images of slack), the discrete path alone less well (measured 0.792, 24.5 dB: the
    residual is what it misses)."""
    rec = dcht_reconstruction()
    assert rec["hybrid"][0] >= 90 / 96 and rec["hybrid"][1] >= 25.5, rec
    assert rec["discrete"][0] >= 0.72 and rec["discrete"][1] < rec["hybrid"][1] - 1, rec


@committed(*TINY_FILES)
def test_tiny_prompt_fidelity():
    """The README's 24 prompts on seeds 0 and 1 guard the level reached, far below the issue's 0.8: measured 5 of 48
    right and colour right on 37 of 48 (colours and backgrounds mostly right, shapes and counts mostly not: see
    docs/dcar.md). The bars sit one image below each: 4 of 48 and 36 of 48."""
    pipe = dcar.load_tiny()
    score, images, captions = tiny_fidelity(lambda prompts, g: pipe.generate(prompts, generator=g).numpy(),
                                            shapes_score.readme_prompts(), seeds=[0, 1])
    colour = sum(shapes_score.score(i, c)["color"] for i, c in zip(images, captions))
    assert len(images) == 48 and score >= 4 / 48 and colour >= 36, (score * 48, colour)


@committed(dcar.TINY_WEIGHTS)
def test_tiny_prompt_in_capitals_draws_the_lower_case_image():
    """"A Red Circle On A White Background" is the lower-case caption to the tiny model (its capitals were <unk>,
    and the picture lost its colour): the same token ids in the committed and a freshly built tokenizer, and the
    same image from the same seed."""
    pipe = dcar.load_tiny()
    upper, lower = "A Red Circle On A White Background", "a red circle on a white background"
    for tok in (pipe.tokenizer, dcar.build_tiny_tokenizer()):
        ids = tok.encode(upper).ids
        assert ids == tok.encode(lower).ids and 2 not in ids  # 2: <unk>
    images = [pipe.generate([p], generator=torch.Generator().manual_seed(0))[0] for p in (upper, lower)]
    assert torch.equal(*images)


@committed(dcar.TINY_WEIGHTS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tiny_runs_in_16_bits_on_the_cpu(dtype):
    """--dtype float16 / bfloat16 on the CPU (both offered by --help) draws the float32 image up to rounding and the
    few tokens it flips: it stopped with "mat1 and mat2 must have the same dtype" (the head, the tokenizer in
    float32, the residual MLP)."""
    prompt = ["a red circle on a white background"]
    ref, img = (dcar.load_tiny(dtype=d).generate(prompt, generator=torch.Generator().manual_seed(0))[0].float()
                for d in ("float32", dtype))
    assert (img - ref).abs().mean() < 25, (img - ref).abs().mean()


def test_tiny_tokenizer_reads_every_caption():
    """Every training caption tokenizes without <unk>, ends in </s> and fits the text length."""
    tok = dcar.build_tiny_tokenizer()
    _, captions = dcar.shapes_batch(200, seed=5)
    ids = dcar.tokenize_t5(tok, captions, dcar.TINY_TEXT_LEN)
    assert not (ids == 2).any() and ((ids == 1).sum(1) == 1).all() and (ids[:, -1] == 0).all()
    for c in captions:
        dcar.check_tiny_prompt(c)


@committed(dcar.TINY_DCAE)
def test_tiny_training_learns_and_is_deterministic(tmp_path):
    """Two short runs from the same seed give bit-identical weights (DC-HT and generator), and the generator's loss
    falls on the way."""
    runs, logs = [], []
    for i in range(2):
        log = []
        dcar.train_tiny(seed=0, out=str(tmp_path / f"run{i}" / "dcar_tiny.safetensors"), log=log.append,
                        steps=30, dcht_steps=2, batch=16, n_images=64, bf16=False)
        runs.append({**load_file(str(tmp_path / f"run{i}" / "dcar_tiny.safetensors")),
                     **{f"dcht.{k}": v for k, v in load_file(str(tmp_path / f"run{i}" / "dcar_tiny_dcht.safetensors")).items()}})
        logs.append(log)
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    losses = [float(line.split("loss ")[1].split()[0]) for line in logs[0] if line.startswith("generator")]
    assert len(losses) == 2 and losses[-1] < 0.8 * losses[0], losses
