"""Tests for hart.py: parity with the official code's outputs on every case folder under fixtures/hart (the
hybrid tokenizer, both transformer variants in teacher forcing with the diffusion loss replayed draw for draw, and
the seeded sampling runs), Qwen2 against transformers, the published manifests on the meta device, training, and
the committed tiny default (fidelity, CLI). Every run parameter of a parity test comes from the case's files
(runs.json, config.json)."""
import glob
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_close, cases, committed, tiny_fidelity  # also puts the repository root on the path
import hart

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hart")
CASES = cases("hart", "runs.json", "tokenizer")  # the official code's outputs: tokenizer/, llm/, llm_adaln/
QWEN2_CASES = cases("hart", "runs.json", "model.safetensors")  # transformers' Qwen2Model
CASE_DIRS = CASES.args[1]


def runs(case):
    return json.load(open(os.path.join(case, "runs.json")))


VARIANTS = [(case, name) for case in CASE_DIRS for name in runs(case) if not name.startswith("_")]
TINY_TOKENIZER = os.path.splitext(hart.TINY_WEIGHTS)[0] + "_tokenizer.safetensors"
TINY_FILES = (hart.TINY_WEIGHTS, TINY_TOKENIZER, os.path.splitext(hart.TINY_WEIGHTS)[0] + "_tokenizer.json")


def patch_nums(case):
    """The case's scale schedule, from its tokenizer's config.json (v_patch_nums)."""
    return tuple(json.load(open(os.path.join(case, "tokenizer", "config.json")))["v_patch_nums"])


@CASES
def test_tokenizer_parity(case):
    """Latent, the codes of every scale, the rest before the last codes, the continuous residual, f_hat scale by
    scale (discrete and hybrid), both decodes, the teacher-forcing inputs and the training forward on both paths."""
    io = load_file(os.path.join(case, "io.safetensors"))
    vae, pn = hart.load_hart_tokenizer(os.path.join(case, "tokenizer")), patch_nums(case)
    K, P = len(pn), pn[-1]
    with torch.no_grad():
        image = io["tok.image_in"]
        assert_close("tok.latent_f", vae.latent(image), io["tok.latent_f"], atol=1e-5, rtol=1e-5)
        ids, rest = vae.encode(image, pn)
        for k in range(K):
            assert torch.equal(ids[k], io[f"tok.idx_s{k:02d}"]), f"scale {k}"
        assert_close("tok.last_layer_gt", rest, io["tok.last_layer_gt"], atol=1e-5, rtol=1e-5)
        codebook = vae.quantize.embedding.weight
        residual = (rest - codebook[ids[-1]]).transpose(1, 2).reshape(image.shape[0], -1, P, P)
        assert_close("tok.residual_continuous", residual, io["tok.residual_continuous"], atol=1e-5, rtol=1e-5)
        f_hat = torch.zeros_like(residual)
        for k, p in enumerate(pn):
            f_hat = vae.quantize.add_scale(f_hat, codebook[ids[k]].transpose(1, 2).reshape(-1, f_hat.shape[1], p, p),
                                           k, K)
        assert_close("tok.fhat_discrete", f_hat, io["tok.fhat_discrete"], atol=1e-5, rtol=1e-5)
        assert_close("tok.fhat_hybrid", f_hat + residual, io["tok.fhat_hybrid"], atol=1e-5, rtol=1e-5)
        assert_close("tok.image_dec_discrete", vae.decode(f_hat), io["tok.image_dec_discrete"], atol=1e-5, rtol=1e-5)
        assert_close("tok.image_dec_hybrid", vae.decode(f_hat + residual), io["tok.image_dec_hybrid"], atol=1e-5,
                     rtol=1e-5)
        assert_close("tf_in", vae.quantize.next_scale_inputs(ids, pn), io["tf_in.x_BLCv_wo_first_l"], atol=1e-5,
                     rtol=1e-5)
        for skip, continuous in ((0, True), (1, False)):  # skip_continuous_prob 0.0 / 1.0
            out, vq = vae(image, pn, continuous)
            assert_close(f"tok.train_fwd_out_skip{skip}", out, io[f"tok.train_fwd_out_skip{skip}"], atol=1e-5,
                         rtol=1e-5)
            assert_close(f"tok.train_fwd_vqloss_skip{skip}", vq, io[f"tok.train_fwd_vqloss_skip{skip}"][0], atol=1e-6,
                         rtol=1e-5)


def test_phi_sharing_rule():
    """Scale k of K uses the phi whose tick (linspace(1/12, 11/12, 4)) is nearest to k / (K - 1): for the published
    1024 px schedule (K = 14) the convs 0,0,0,1,1,1,1,2,2,2,2,3,3 (hart.md), for the tiny one (K = 6) 0,0,1,2,3
    (0.2 is nearer 1/12 than 0.36, 0.8 nearer 0.92 than 0.64). The fixture's K = 5 cannot tell some rules apart."""
    torch.manual_seed(0)
    phi, h = hart.SharedPhi(4, 0.5, 4), torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        outs = [conv(h) for conv in phi.qresi_ls]
        for K, want in ((14, [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]), (6, [0, 0, 1, 2, 3])):
            got = [next(i for i, o in enumerate(outs) if torch.equal(phi(h, k, K), o)) for k in range(K - 1)]
            assert got == want, (K, got)


def load_variant(case, name):
    vae = hart.load_hart_tokenizer(os.path.join(case, "tokenizer"))
    return vae, hart.load_hart(os.path.join(case, name), vae.cfg)


@pytest.mark.parametrize("case,name", VARIANTS, ids=[f"{os.path.basename(c)}-{n}" for c, n in VARIANTS])
def test_teacher_forcing_parity(case, name):
    """The training forward with and without the last-scale subsampling (the fixture's keep mask): logits, and the
    diffusion loss replayed draw for draw (the caption-dropout randn, the model's top-k/top-p samples, timesteps,
    noise) from the case's seeds: sampled codes, conditions, targets, per-row losses and their mean."""
    io, tf = load_file(os.path.join(case, "io.safetensors")), runs(case)[name]
    seeds = tf["teacher_forcing_seeds"]
    vae, model = load_variant(case, name)
    model.cfg = hart.replace(model.cfg, cond_drop_rate=tf["cond_drop_rate"])
    pn = model.cfg.patch_nums
    with torch.no_grad():
        ids, rest = vae.encode(io["tok.image_in"], pn)
        for mode in ("nomask", "mar"):
            pre = f"{name}.tf.{mode}"
            keep = io[f"{pre}.keep_mask"]
            out = hart.hart_losses(model, vae.quantize.embedding.weight, io[f"{name}.ctx.context"],
                                   io[f"{name}.ctx.position_ids"], io["tf_in.x_BLCv_wo_first_l"], ids, rest, keep,
                                   torch.Generator().manual_seed(seeds["torch_seed"]),
                                   torch.Generator().manual_seed(seeds["rng_seed"]))
            n = int(keep[0].sum())
            if f"{pre}.logits" in io:
                assert_close(f"{pre}.logits", out["logits"], io[f"{pre}.logits"], atol=1e-4, rtol=1e-4)
            if f"{pre}.logits_last_scale_kept" in io:
                assert_close(f"{pre}.logits_last_scale_kept", out["logits"][:, -n:], io[f"{pre}.logits_last_scale_kept"],
                             atol=1e-4, rtol=1e-4)
            assert torch.equal(out["sampled"], io[f"{pre}.sampled_last_idx"])
            assert torch.equal(out["t"], io[f"{pre}.diff.t"])
            assert torch.equal(out["noise"], io[f"{pre}.diff.noise"])
            assert_close(f"{pre}.diff.c_unique", out["c"], io[f"{pre}.diff.c_unique"], atol=1e-4, rtol=1e-4)
            assert_close(f"{pre}.diff.x_start", out["x0"], io[f"{pre}.diff.x_start"], atol=1e-5, rtol=1e-5)
            assert_close(f"{pre}.diff.loss", out["rows"], io[f"{pre}.diff.loss"], atol=1e-4, rtol=1e-4)
            assert_close(f"{pre}.diff_loss", out["diffusion"], io[f"{pre}.diff_loss"][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case,name", VARIANTS, ids=[f"{os.path.basename(c)}-{n}" for c, n in VARIANTS])
def test_sampling_parity(case, name):
    """Every run of runs.json, its seeds and arguments as given: each scale's codes exactly, the guided logits, the
    diffusion head's conditions, output and guidance, and the image."""
    io = load_file(os.path.join(case, "io.safetensors"))
    vae, model = load_variant(case, name)
    K = len(model.cfg.patch_nums)
    for run, a in runs(case)[name]["sampling"].items():
        pre, trace = f"{name}.{run}", {}
        image = hart.generate(model, vae, io[f"{name}.ctx.context"], io[f"{name}.ctx.position_ids"], a["cfg"],
                              a["top_k"] or None, a["top_p"], a["more_smooth"],
                              torch.Generator().manual_seed(a["g_seed"]), torch.Generator().manual_seed(a["torch_seed"]),
                              trace)
        for k in range(K):
            assert torch.equal(trace[f"idx_s{k:02d}"], io[f"{pre}.idx_s{k:02d}"]), f"{pre} scale {k}"
            if f"{pre}.logits_cfg_s{k:02d}" in io:
                assert_close(f"{pre}.logits_cfg_s{k:02d}", trace[f"logits_cfg_s{k:02d}"], io[f"{pre}.logits_cfg_s{k:02d}"],
                             atol=1e-4, rtol=1e-4)
        M = trace["diff.out"].shape[0]
        assert trace["diff.cfg"] == pytest.approx(io[f"{pre}.diff.cfg"].item(), abs=1e-6)
        # more_smooth's Gumbel-softmax at temperature ~0.1 magnifies float-rounding differences tenfold, and the
        # 8 diffusion steps through random weights magnify the condition's (~2e-6) a hundredfold on a few values
        tol = 1e-3 if a["more_smooth"] else 1e-4
        assert_close(f"{pre}.diff.z", trace["diff.z"], io[f"{pre}.diff.z"], atol=tol, rtol=tol)
        assert_close(f"{pre}.diff.out", trace["diff.out"], io[f"{pre}.diff.out"][:M], atol=1e-3, rtol=1e-3)
        assert (trace["diff.out"] - io[f"{pre}.diff.out"][:M]).abs().mean() < 2e-5
        assert_close(f"{pre}.image", image, io[f"{pre}.image"], atol=1e-3, rtol=1e-3)


@QWEN2_CASES
def test_qwen2_parity(case):
    """The last hidden state of transformers' Qwen2Model, padded positions included, for every run of the case."""
    io = load_file(os.path.join(case, "io.safetensors"))
    model = hart.load_qwen2(case)
    for run in runs(case)["runs"].values():
        with torch.no_grad():
            got = model(io[run["inputs"]["input_ids"]], io[run["inputs"]["attention_mask"]])
        assert_close(run["outputs"]["hidden_states[-1]"], got, io[run["outputs"]["hidden_states[-1]"]], atol=1e-5,
                     rtol=1e-5)


MANIFESTS = sorted(glob.glob(os.path.join(FIX, "manifests", "*_llm*.json")))


@pytest.mark.parametrize("path", MANIFESTS, ids=[os.path.basename(p) for p in MANIFESTS])
def test_transformer_manifest_on_meta(path):
    """Each candidate layout of the published llm/ (depth 24 plain, depth 16 with per-block AdaLN) builds key for
    key from the depth-24 preset: the loader reads depth and AdaLN off the keys. Parameter count as stated."""
    manifest = json.load(open(path))
    sd = {k: torch.empty(v["shape"], device="meta") for k, v in manifest["keys"].items()}
    sd, cfg = hart.hart_state_dict(sd, hart.PRESETS["hart-0.7b-1024px"], path)
    assert (cfg.depth, cfg.disable_aln) == (manifest["config_assumed"]["depth"], manifest["config_assumed"]["disable_aln"])
    with torch.device("meta"):
        model = hart.HART(cfg)
    hart.load_state_dict_strict(model, sd, path)
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params_total"]
    assert sum(p.numel() for p in model.diffloss.parameters()) == manifest["num_params_diffloss"]


def test_tokenizer_manifest_on_meta():
    manifest = json.load(open(os.path.join(FIX, "manifests", "hart-0.7b-1024px_tokenizer.json")))
    sd = {k: torch.empty(v["shape"], device="meta") for k, v in manifest["keys"].items()}
    with torch.device("meta"):
        model = hart.HybridTokenizer(hart.PRESETS["hart-0.7b-1024px-tokenizer"])
    hart.load_state_dict_strict(model, hart.tokenizer_state_dict(sd), "tokenizer manifest")
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params_vae"]


def test_transformer_buffers_must_fit_the_config():
    """A checkpoint whose training mask was built for another schedule is refused, naming the key."""
    case = CASE_DIRS[0]
    vae = hart.load_hart_tokenizer(os.path.join(case, "tokenizer"))
    cfg = hart.hart_config_from_json(os.path.join(case, "llm"), vae.cfg)
    sd = {"lvl_1L": torch.zeros(1, 5)}
    with pytest.raises(ValueError, match="lvl_1L is sized for another sequence"):
        hart.hart_state_dict(sd, cfg, "x")


def test_kv_cache_sampling_matches_teacher_forcing():
    """The sampler runs one scale at a time with the KV cache; teacher forcing runs every scale at once under the
    block-causal mask. Fed the codes the sampler drew (unguided, hard codes), both give the same logits."""
    case = CASE_DIRS[0]
    io = load_file(os.path.join(case, "io.safetensors"))
    vae, model = load_variant(case, "llm")
    pn, T = model.cfg.patch_nums, model.cfg.context_token
    context, positions, trace = io["llm.ctx.context"], io["llm.ctx.position_ids"], {}
    hart.generate(model, vae, context, positions, 0.0, None, 0.0, False, torch.Generator().manual_seed(0),
                  trace=trace)
    ids = [trace[f"idx_s{k:02d}"] for k in range(len(pn))]
    with torch.no_grad():
        h, cond = model(context, positions, vae.quantize.next_scale_inputs(ids, pn))
        logits = model.logits(h[:, T - 1:], cond)
    start = 0
    for k, p in enumerate(pn):
        assert_close(f"scale {k}", logits[:, start:start + p * p], trace[f"logits_cfg_s{k:02d}"], atol=1e-4, rtol=1e-4)
        start += p * p


def test_last_scale_keep():
    """MAR-style subsampling: the same count per row; at 64 tokens exactly 32 kept, at 4096 between 32 and 2048;
    below 32 tokens the release's negative slice bound removes 2n - 32 of them (8 of 20) or none (of 16); the rows
    keep different tokens."""
    g = torch.Generator().manual_seed(0)
    for n, kept in ((64, {32}), (4096, set(range(32, 2049))), (20, {12}), (16, {16})):
        for _ in range(5):
            keep = hart.last_scale_keep(3, n, g)
            counts = set(keep.sum(1).tolist())
            assert len(counts) == 1 and counts <= kept, (n, counts)
    keep = hart.last_scale_keep(2, 4096, g)
    assert not torch.equal(keep[0], keep[1])


def test_top_k_top_p_filter():
    """top-k keeps the k largest; top-p then keeps the smallest set of the largest whose mass exceeds p; the draw
    lands in what is kept."""
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    for k, p, allowed in ((2, 0.0, {0, 1}), (0, 0.7, {0, 1}), (0, 0.4, {0}), (3, 0.9, {0, 1, 2})):
        x = logits.clone()
        draws = {hart.sample_top_k_top_p(x, k, p, torch.Generator().manual_seed(s)).item() for s in range(50)}
        assert draws == allowed, (k, p, draws)
        assert set(torch.isfinite(x[0, 0]).nonzero().flatten().tolist()) == allowed  # filtered in place


# ----------------------------------------------------------------------------------------------------------------
# The committed tiny default


@committed(TINY_TOKENIZER)
def test_tiny_tokenizer_reconstructs_the_prompts():
    """The generator cannot beat its tokenizer. On the README's prompts x 4 seeds (96 scenes), the committed
    tokenizer measured: hybrid path (discrete codes + residual) 94 of 96 right, 27.75 dB; discrete path alone 79 of
    96, 25.53 dB (the residual is what it misses). Bars just below: hybrid at least 94 of 96 and 27.7 dB, and the
    discrete path more than 2 dB below it (measured 2.22)."""
    import shapes_score
    vae = hart.load_tiny_tokenizer(TINY_TOKENIZER)
    prompts = shapes_score.readme_prompts()
    images = torch.stack([torch.from_numpy(np.array(shapes_score.render(c, s))) for s in range(4)
                          for c in prompts]).permute(0, 3, 1, 2).float() / 127.5 - 1
    pn, K, C = hart.TINY_PATCH_NUMS, len(hart.TINY_PATCH_NUMS), vae.cfg.z_channels
    with torch.no_grad():
        ids, rest = vae.encode(images, pn)
        codebook, f_hat = vae.quantize.embedding.weight, torch.zeros(len(images), C, pn[-1], pn[-1])
        for k, p in enumerate(pn):
            f_hat = vae.quantize.add_scale(f_hat, codebook[ids[k]].transpose(1, 2).reshape(-1, C, p, p), k, K)
        residual = (rest - codebook[ids[-1]]).transpose(1, 2).reshape(f_hat.shape)
        out = {}
        for name, f in (("discrete", f_hat), ("hybrid", f_hat + residual)):
            x = vae.decode(f)
            u8 = ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
            out[name] = (round(shapes_score.fidelity(list(u8), prompts * 4) * len(u8)),
                         (10 * torch.log10(4 / (x - images).pow(2).mean())).item())
    assert out["hybrid"][0] >= 94 and out["hybrid"][1] >= 27.7, out
    assert out["discrete"][1] < out["hybrid"][1] - 2.0, out


def tiny_generate(pipe):
    """The committed tiny pipeline at its defaults as conftest.tiny_fidelity's generate(prompts, generator)."""
    return lambda prompts, generator: pipe.generate(prompts, generator=generator).numpy()


@committed(*TINY_FILES)
def test_tiny_prompt_fidelity():
    """The README's 24 prompts on seeds 0 and 1, at the tiny model's defaults. The committed model measured 3 of 48
    images right (colour, shape and count) and 40 of 48 colours right: the bars are 3 of 48 (no lower bar would
    test anything) and 39 of 48 colours. Far below the issue's 0.8: docs/hart.md says why."""
    import shapes_score
    fidelity, images, captions = tiny_fidelity(tiny_generate(hart.load_tiny()), shapes_score.readme_prompts(), (0, 1))
    colour = sum(shapes_score.score(i, c)["color"] for i, c in zip(images, captions))
    assert round(fidelity * len(images)) >= 3 and colour >= 39, (fidelity * len(images), colour)


@committed(hart.TINY_WEIGHTS)
def test_tiny_prompt_in_capitals_draws_the_lower_case_image():
    """"A Red Circle On A White Background" is the lower-case caption to the tiny model (its capitals were <unk>,
    and the picture lost its colour): the same token ids in the committed and a freshly built tokenizer, and the
    same image from the same seed."""
    pipe = hart.load_tiny()
    upper, lower = "A Red Circle On A White Background", "a red circle on a white background"
    for tok in (pipe.tokenizer, hart.build_tiny_tokenizer()):
        ids = tok.encode(upper).ids
        assert ids == tok.encode(lower).ids and 1 not in ids  # 1: <unk>
    images = [pipe.generate([p], generator=torch.Generator().manual_seed(0))[0] for p in (upper, lower)]
    assert torch.equal(*images)


@committed(hart.TINY_WEIGHTS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tiny_runs_in_16_bits_on_the_cpu(dtype):
    """--dtype float16 / bfloat16 on the CPU (both offered by --help) draws the float32 image up to rounding (mean
    0.6 of 255; 4-5 with --more-smooth, whose sharp softmax mixture rounds more): it stopped with "mat1 and mat2
    must have the same dtype" (the head, the tokenizer in float32, the residual MLP, the smooth mixture)."""
    prompt = ["a red circle on a white background"]
    pipes = [hart.load_tiny(dtype=d) for d in ("float32", dtype)]
    for smooth in (False, True):  # --more-smooth mixes the codebook by the softmax of the logits, in float32
        ref, img = (pipe.generate(prompt, generator=torch.Generator().manual_seed(0), more_smooth=smooth)[0].float()
                    for pipe in pipes)
        assert (img - ref).abs().mean() < (8 if smooth else 1), (smooth, (img - ref).abs().mean())  # of 255


def test_tiny_tokenizer_reads_every_caption():
    """Every training caption tokenizes without <unk> and fits the text length."""
    tok = hart.build_tiny_tokenizer()
    _, captions = hart.shapes_batch(200, seed=5)
    for c in captions:
        ids = tok.encode(c).ids
        assert 1 not in ids and 0 not in ids and len(ids) <= hart.TINY_TEXT_LEN
        hart.check_tiny_prompt(c)


@committed(hart.TINY_DCAE)
def test_tiny_training_learns_and_is_deterministic(tmp_path):
    """Two short runs from the same seed give bit-identical weights (tokenizer and transformer), each phase runs the
    steps asked (both tokenizer stages 2, the generator 80, as --train-steps means: N in each phase), and the
    transformer's loss falls on the way."""
    weights, logs = [], []
    for i in range(2):
        log, out = [], tmp_path / f"run{i}" / "hart_tiny.safetensors"
        out.parent.mkdir()
        hart.train_tiny(seed=0, out=str(out), log=log.append, steps=80, tokenizer_steps=2, batch=16, n_images=64,
                        bf16=False)
        tokenizer = load_file(str(out).replace(".safetensors", "_tokenizer.safetensors"))
        weights.append({**load_file(str(out)), **{f"tok.{k}": v for k, v in tokenizer.items()}})
        logs.append(log)
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    steps = [line.split(" | ")[0] for line in logs[0] if line.startswith(("tokenizer", "generator"))]
    assert steps == [  # logged every 100 steps and at the last
        "tokenizer quantize step 1/2", "tokenizer quantize step 2/2", "tokenizer decoder step 1/2",
        "tokenizer decoder step 2/2", "generator step 1/80", "generator step 80/80"]
    losses = [float(line.split("loss ")[1].split()[0]) for line in logs[0] if line.startswith("generator")]
    assert losses[-1] < 0.8 * losses[0], losses
