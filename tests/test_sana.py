"""Tests for sana.py: parity with the diffusers-produced fixtures (every case directory under fixtures/sana is
discovered), meta-device manifests of every published transformer in both layouts, strict loading, the
samplers step by step, the training step, the committed tiny demo model, and what goes beyond the paper's core:
the ControlNets in both layouts and wirings, SANA 1.5's CAME, growth, pruning and best-of-N, and the tiny
ControlNet. `python tests/test_sana.py` prints the tiny model's full scores (docs/sana.md)."""
import glob
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_close, assert_recorded_activations, assert_strict_loading_names_keys, cases, committed, tiny_fidelity  # + the root on sys.path
import sana
import shapes_score

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "sana")
HELD_OUT_SEED = 31337  # shapes scenes apart from every training set's (scripts/bench_sana_controlnet.py's)
TINY = (sana.TINY_WEIGHTS, sana.TINY_DCAE)  # the committed tiny SANA and the DC-AE it decodes with


@cases("sana", "io.safetensors", "transformer", "original/checkpoint.pth")
@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_transformer_parity(case, layout, monkeypatch):
    io = load_file(os.path.join(case, "io.safetensors"))
    if layout == "diffusers":
        model = sana.load_transformer(case)
    else:  # the .pth carries no config: register the fixture's under a preset name for the loader
        cfg = sana.config_from_diffusers(sana.read_json(os.path.join(case, "transformer", "config.json")))
        monkeypatch.setitem(sana.PRESETS, "_fixture", cfg)
        model = sana.load_transformer(os.path.join(case, "original", "checkpoint.pth"), preset="_fixture")
    args = (io["hidden_states"], io["timestep"], io["encoder_hidden_states"], io["encoder_attention_mask"])
    out = assert_recorded_activations(model, io, args)
    assert_close("output", out, io["output"])
    with torch.no_grad():
        assert_close("output_no_mask", model(*args[:3], None), io["output_no_mask"])


MANIFESTS = sorted(glob.glob(os.path.join(FIX, "manifests", "*.json")))
# ControlNet manifests (a checkpoint in CONTROLNET_PRESETS) are checked by test_controlnet_manifest; any other
# manifest by test_manifest, which fails on a checkpoint it has no preset for
CONTROLNET_MANIFESTS = [p for p in MANIFESTS if sana.read_json(p)["checkpoint"] in sana.CONTROLNET_PRESETS]
BASE_MANIFESTS = [p for p in MANIFESTS if p not in CONTROLNET_MANIFESTS]


def to_original(sd):
    """Our (= diffusers) keys -> the NVlabs layout: the inverse of sana.convert_original, q|k|v and k|v fused."""
    renames = [(r"^patch_embed\.", "x_embedder."), (r"^caption_projection\.linear_1\.", "y_embedder.y_proj.fc1."),
               (r"^caption_projection\.linear_2\.", "y_embedder.y_proj.fc2."),
               (r"^time_embed\.emb\.timestep_embedder\.linear_1\.", "t_embedder.mlp.0."),
               (r"^time_embed\.emb\.timestep_embedder\.linear_2\.", "t_embedder.mlp.2."),
               (r"^time_embed\.linear\.", "t_block.1."), (r"^caption_norm\.", "attention_y_norm."),
               (r"^proj_out\.", "final_layer.linear."), (r"^scale_shift_table$", "final_layer.scale_shift_table"),
               (r"^transformer_blocks\.", "blocks."), (r"\.attn1\.norm_q\.", ".attn.q_norm."),
               (r"\.attn1\.norm_k\.", ".attn.k_norm."), (r"\.attn1\.to_out\.0\.", ".attn.proj."),
               (r"\.attn2\.to_q\.", ".cross_attn.q_linear."), (r"\.attn2\.norm_q\.", ".cross_attn.q_norm."),
               (r"\.attn2\.norm_k\.", ".cross_attn.k_norm."), (r"\.attn2\.to_out\.0\.", ".cross_attn.proj."),
               (r"\.ff\.conv_inverted\.", ".mlp.inverted_conv.conv."), (r"\.ff\.conv_depth\.", ".mlp.depth_conv.conv."),
               (r"\.ff\.conv_point\.", ".mlp.point_conv.conv.")]
    fused = {".attn1.to_q.": ".attn.qkv.", ".attn1.to_k.": ".attn.qkv.", ".attn1.to_v.": ".attn.qkv.",
             ".attn2.to_k.": ".cross_attn.kv_linear.", ".attn2.to_v.": ".cross_attn.kv_linear."}
    out, parts = {}, {}
    for key, value in sd.items():
        part = next((f for f in fused if f in key), None)
        if part:  # collected in q, k, v order (k, v for the cross-attention), concatenated below
            parts.setdefault(key.replace(part, fused[part]), []).append((part, value))
            key = None
        else:
            for pattern, repl in renames:
                key = re.sub(pattern, repl, key)
            out[key] = value
    for key, values in parts.items():
        key = re.sub(r"^transformer_blocks\.", "blocks.", key)
        out[key] = torch.cat([v for _, v in sorted(values, key=lambda pv: list(fused).index(pv[0]))])
    return out


def to_original_controlnet(base_sd, ctrl_sd):
    """A base model and a ControlNet in our keys -> the NVlabs ControlNet .pth layout: the base model's keys plus
    controlnet.{i}.copied_block.*, controlnet.0.before_proj.*, controlnet.{i}.after_proj.* (the ControlNet's
    embedders have no place there: the original shares the base model's)."""
    out = to_original(base_sd)
    blocks = to_original({k: v for k, v in ctrl_sd.items() if k.startswith("transformer_blocks.")})
    out.update({re.sub(r"^blocks\.(\d+)\.", r"controlnet.\1.copied_block.", k): v for k, v in blocks.items()})
    out.update({f"controlnet.0.before_proj.{k[len('input_block.'):]}": v for k, v in ctrl_sd.items()
                if k.startswith("input_block.")})
    out.update({re.sub(r"^controlnet_blocks\.(\d+)\.", r"controlnet.\1.after_proj.", k): v
                for k, v in ctrl_sd.items() if k.startswith("controlnet_blocks.")})
    return out


@pytest.mark.parametrize("path", BASE_MANIFESTS, ids=[os.path.basename(p)[:-5] for p in BASE_MANIFESTS])
def test_manifest(path):
    """Full-size preset on the meta device == the published checkpoint's keys and shapes, in both layouts."""
    m = sana.read_json(path)
    cfg = sana.PRESETS[m["checkpoint"]]
    assert sana.config_from_diffusers(m["diffusers_config"]) == sana.replace(cfg, flow_shift=3.0)
    with torch.device("meta"):
        model = sana.SanaTransformer(cfg)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == m["diffusers_state_dict"]
    original = {k: torch.empty(s, device="meta") for k, s in m["original_state_dict"].items()}
    assert {k: list(v.shape) for k, v in sana.convert_original(original).items()} == ours
    sana.load_state_dict_strict(model, sana.convert_original(original), path)  # the strict loader accepts it
    # the tests' inverse mapping (to_original, used for the ControlNet checks) gives back the published layout
    kept = {k: s for k, s in m["original_state_dict"].items() if k not in m["original_dropped_by_converter"]}
    assert {k: list(v.shape) for k, v in to_original(model.state_dict()).items()} == kept


@pytest.mark.parametrize("path", CONTROLNET_MANIFESTS, ids=[os.path.basename(p)[:-5] for p in CONTROLNET_MANIFESTS])
def test_controlnet_manifest(path):
    """A published ControlNet's preset on the meta device == the manifest's diffusers keys and shapes, its config and
    parameter count; in the original layout its .pth (the base model + the controlnet.* keys the manifest's note
    names) splits back into both models, which the strict loader accepts; the .pth's file name gives the preset."""
    m = sana.read_json(path)
    base_cfg, cfg = sana.CONTROLNET_PRESETS[m["checkpoint"]]
    assert sana.config_from_diffusers(m["diffusers_config_assumed"]) == sana.replace(cfg, flow_shift=3.0)
    with torch.device("meta"):
        controlnet, base = sana.SanaControlNet(cfg, "original"), sana.SanaTransformer(base_cfg)
    ours = {k: list(v.shape) for k, v in controlnet.state_dict().items()}
    assert ours == m["diffusers_state_dict"]
    assert sum(p.numel() for p in controlnet.parameters()) == m["num_params"]
    assert sana.controlnet_preset_from_name(m["original_pth"]) == m["checkpoint"]
    original = to_original_controlnet(base.state_dict(), controlnet.state_dict())
    named = re.findall(r"`?(controlnet\.[\w{}.]+)\*", m["note"])  # controlnet.{i}.copied_block. and the others
    assert len(named) == 3, m["note"]
    patterns = [re.escape(n).replace(re.escape("{i}"), r"\d+") for n in named]
    extra = [k for k in original if k.startswith("controlnet.")]
    assert extra and all(any(re.match(p, k) for p in patterns) for k in extra)
    assert all(any(re.match(p, k) for k in extra) for p in patterns)
    base_sd, ctrl_sd = sana.convert_original_controlnet(original)
    assert {k: list(v.shape) for k, v in ctrl_sd.items()} == ours
    assert {k: list(v.shape) for k, v in base_sd.items()} == {k: list(v.shape) for k, v in base.state_dict().items()}
    sana.load_state_dict_strict(controlnet, ctrl_sd, path)
    sana.load_state_dict_strict(base, base_sd, path)


def test_strict_loading_names_keys(tmp_path, monkeypatch):
    assert_strict_loading_names_keys(sana, os.path.join(FIX, "transformer_sana10"), tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="AutoencoderDC"):  # a folder of another model
        sana.load_transformer(os.path.join(FIX, "pipeline_flow_dpm_20step", "vae"))


def test_sharded_and_variant_folders(tmp_path):
    """Shards listed by *.index.json, and a folder holding only a bf16 variant, load like the single file."""
    case = os.path.join(FIX, "transformer_sana10")
    sd = load_file(os.path.join(case, "transformer", "diffusion_pytorch_model.safetensors"))
    keys = sorted(sd)
    from safetensors.torch import save_file
    for folder, files in [("sharded", {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:20],
                                       "diffusion_pytorch_model-00002-of-00002.safetensors": keys[20:]}),
                          ("variant", {"diffusion_pytorch_model.bf16.safetensors": keys})]:
        d = tmp_path / folder
        os.makedirs(d)
        with open(os.path.join(case, "transformer", "config.json")) as f:
            (d / "config.json").write_text(f.read())
        dtype = torch.bfloat16 if folder == "variant" else torch.float32
        for name, ks in files.items():
            save_file({k: sd[k].to(dtype) for k in ks}, str(d / name))
        if folder == "sharded":
            index = {"weight_map": {k: n for n, ks in files.items() for k in ks}}
            (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        model = sana.load_transformer(str(d))
        got = model.state_dict()
        assert all(torch.equal(got[k], sd[k].to(dtype).float()) for k in keys)


# ControlNet. The fixture runs diffusers' wiring (SanaControlNetModel + SanaTransformer2DModel); the original
# wiring (NVlabs SanaMSControlNet) is another function of the same weights, checked against a transcription of the
# official forward and by where each tensor goes (sana.py, section 9, says both).

def controlnet_case(case):
    """The case's inputs (B, ...) and its run parameters, all read from io.safetensors: the conditioning scale
    and the number of control samples (controlnet_block_sample<i>)."""
    io = load_file(os.path.join(case, "io.safetensors"))
    n = len([k for k in io if re.fullmatch(r"controlnet_block_sample\d+", k)])
    args = (io["hidden_states"], io["timestep"], io["encoder_hidden_states"])
    return io, args, io["encoder_attention_mask"], io["controlnet_cond"], io["conditioning_scale"].item(), n


def original_controlnet_checkpoint(case, path, monkeypatch):
    """The case's transformer and ControlNet written as one NVlabs ControlNet .pth (the tests' inverse mapping), its
    configs registered as the preset "_fixture"."""
    base_cfg = sana.read_transformer_config(os.path.join(case, "transformer"))
    cfg = sana.config_from_diffusers(sana.read_json(os.path.join(case, "controlnet", "config.json")))
    monkeypatch.setitem(sana.CONTROLNET_PRESETS, "_fixture", (base_cfg, cfg))
    base = load_file(os.path.join(case, "transformer", "diffusion_pytorch_model.safetensors"))
    ctrl = load_file(os.path.join(case, "controlnet", "diffusion_pytorch_model.safetensors"))
    torch.save({"state_dict": to_original_controlnet(base, ctrl)}, path)
    return base, ctrl


@cases("sana", "io.safetensors", "controlnet", "transformer")
def test_controlnet_parity(case):
    """diffusers layout: every control sample (x the case's conditioning scale), and the transformer's output with
    them and without."""
    io, args, mask, cond, scale, n = controlnet_case(case)
    transformer = sana.load_transformer(case)
    controlnet, base = sana.load_controlnet(case)
    assert base is None and controlnet.wiring == "diffusers" and controlnet.cfg.depth == n
    with torch.no_grad():
        samples = controlnet(*args, cond, mask, scale)
        for i in range(n):
            assert_close(f"controlnet_block_sample{i}", samples[i], io[f"controlnet_block_sample{i}"])
        assert_close("output", transformer(*args, mask, controls=samples), io["output"])
        assert_close("output_without_controlnet", transformer(*args, mask), io["output_without_controlnet"])


@cases("sana", "io.safetensors", "controlnet", "transformer")
def test_controlnet_parity_original_layout(case, tmp_path, monkeypatch):
    """The case written as an original .pth loads back key for key: the base model and every ControlNet weight the
    original holds are the case's; the ControlNet's embedders are the base model's (the original shares them).
    With the case's own embedders put back, the diffusers wiring reproduces every sample and the output."""
    io, args, mask, cond, scale, n = controlnet_case(case)
    path = str(tmp_path / "checkpoint.pth")
    base_sd, ctrl_sd = original_controlnet_checkpoint(case, path, monkeypatch)
    controlnet, transformer = sana.load_controlnet(path, preset="_fixture")
    assert controlnet.wiring == "original" and controlnet.cfg.depth == n
    assert all(torch.equal(v, base_sd[k]) for k, v in transformer.state_dict().items())
    shared = sana.SHARED_EMBEDDERS
    for k, v in controlnet.state_dict().items():
        assert torch.equal(v, base_sd[k] if k.startswith(shared) else ctrl_sd[k]), k
    with torch.no_grad():
        assert_close("output_without_controlnet", transformer(*args, mask), io["output_without_controlnet"])
        controlnet.load_state_dict({k: v for k, v in ctrl_sd.items() if k.startswith(shared)}, strict=False)
        controlnet.wiring = "diffusers"
        samples = controlnet(*args, cond, mask, scale)
        for i in range(n):
            assert_close(f"controlnet_block_sample{i}", samples[i], io[f"controlnet_block_sample{i}"])
        assert_close("output", transformer(*args, mask, controls=samples), io["output"])


def official_controlnet_forward(base, ctrl, x, t, y, mask, cond):
    """NVlabs SanaMSControlNet.forward (diffusion/model/nets/sana_multi_scale_controlnet.py) written out with our
    modules, the original's shared embedders being the base model's: base block 0 first; then for i = 1..n control
    block i-1 (the first on x + before_proj(x_embedder(control))) and base block i on x + after_proj(control);
    then the other base blocks and the final layer."""
    p, n = base.cfg.patch_size, ctrl.cfg.depth
    B, _, H, W = x.shape
    hw = (H // p, W // p)
    t6, t_emb = base.time_embed(t)
    y = base.caption_norm(base.caption_projection(y))
    bias = ((1 - mask.float()) * -10000.0)[:, None, None, :]
    c = base.patch_embed(cond)  # forward_controlnet: the x_embedder
    x = base.transformer_blocks[0](base.patch_embed(x), y, bias, t6, hw)
    for i in range(1, n + 1):
        c = ctrl.transformer_blocks[i - 1](x + ctrl.input_block(c) if i == 1 else c, y, bias, t6, hw)
        x = base.transformer_blocks[i](x + ctrl.controlnet_blocks[i - 1](c), y, bias, t6, hw)
    for block in base.transformer_blocks[n + 1:]:
        x = block(x, y, bias, t6, hw)
    shift, scale = (base.scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)
    x = base.proj_out(base.norm_out(x, shift, scale)).view(B, hw[0], hw[1], p, p, -1).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, -1, H, W)


@cases("sana", "io.safetensors", "controlnet", "transformer")
def test_controlnet_original_wiring_is_the_official_forward(case, tmp_path, monkeypatch):
    """The original .pth runs the original wiring: the output is the transcribed official forward's (conditioning
    scale 1, the original has none), and it is not what the diffusers wiring makes of the same weights."""
    io, args, mask, cond, _, _ = controlnet_case(case)
    path = str(tmp_path / "checkpoint.pth")
    original_controlnet_checkpoint(case, path, monkeypatch)
    controlnet, transformer = sana.load_controlnet(path, preset="_fixture")
    with torch.no_grad():
        out = transformer(*args, mask, controls=controlnet.controls(*args, cond, mask))
        assert_close("official forward", out, official_controlnet_forward(transformer, controlnet, *args, mask, cond))
        controlnet.wiring = "diffusers"
        other = transformer(*args, mask, controls=controlnet.controls(*args, cond, mask))
    assert (out - other).abs().max() > 0.1, "the two wirings should differ on these weights"


# The cases whose original/checkpoint.pth the fixture maker wrote (from diffusers' conversion mapping, not the tests'
# to_original) and whose model has no position table (the published ControlNets have none; with one, sana.py embeds
# the control with it, which the official forward does not)
ORIGINAL_CASES = [d for d in sorted(glob.glob(os.path.join(FIX, "*"))) if os.path.isfile(os.path.join(d, "original",
                  "checkpoint.pth")) and sana.read_transformer_config(os.path.join(d, "transformer"))
                  .interpolation_scale is None]


@pytest.mark.parametrize("case", ORIGINAL_CASES, ids=[os.path.basename(d) for d in ORIGINAL_CASES])
def test_original_controlnet_pth_built_from_the_original_checkpoint(case, tmp_path, monkeypatch):
    """An NVlabs ControlNet .pth built without the tests' inverse mapping: the case's original checkpoint, plus
    controlnet.0.copied_block.* = its own last block's keys (ControlSanaMSBlock's copied_block is a copy of a base
    block under the same names; the last one, so that a copy read as base block 0 shows) and random
    controlnet.0.before_proj / after_proj. load_controlnet gives the case's diffusers-layout transformer as the base
    model (whose output is the case's), its last block as the ControlNet's block, its embedders, the projections as
    written; and the original wiring's output is the transcribed official forward on modules built here from the
    diffusers layout."""
    import copy
    import types
    base_cfg = sana.read_transformer_config(os.path.join(case, "transformer"))
    monkeypatch.setitem(sana.CONTROLNET_PRESETS, "_fixture", (base_cfg, sana.replace(base_cfg, depth=1)))
    sd = torch.load(os.path.join(case, "original", "checkpoint.pth"), weights_only=True)["state_dict"]
    last, D, g = f"blocks.{base_cfg.depth - 1}.", base_cfg.hidden_size, torch.Generator().manual_seed(0)
    pth = dict(sd)
    pth.update({"controlnet.0.copied_block." + k[len(last):]: v.clone() for k, v in sd.items() if k.startswith(last)})
    proj = {name: (torch.randn(D, D, generator=g) / D**0.5, torch.randn(D, generator=g))
            for name in ("before", "after")}
    for name, (weight, bias) in proj.items():
        pth[f"controlnet.0.{name}_proj.weight"], pth[f"controlnet.0.{name}_proj.bias"] = weight, bias
    torch.save({"state_dict": pth}, tmp_path / "checkpoint.pth")
    controlnet, transformer = sana.load_controlnet(str(tmp_path / "checkpoint.pth"), preset="_fixture")
    reference = sana.load_transformer(case)
    assert controlnet.wiring == "original" and controlnet.cfg.depth == 1
    ref = reference.state_dict()
    assert transformer.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) for k, v in transformer.state_dict().items())
    block = reference.transformer_blocks[-1]
    for k, v in controlnet.transformer_blocks[0].state_dict().items():
        assert torch.equal(v, block.state_dict()[k]), k
    for k, v in controlnet.state_dict().items():
        if k.startswith(sana.SHARED_EMBEDDERS):
            assert torch.equal(v, ref[k]), k
    linears = []
    for name, module in (("before", controlnet.input_block), ("after", controlnet.controlnet_blocks[0])):
        assert torch.equal(module.weight, proj[name][0]) and torch.equal(module.bias, proj[name][1]), name
        linears.append(torch.nn.Linear(D, D))
        linears[-1].load_state_dict(dict(weight=proj[name][0], bias=proj[name][1]))
    official = types.SimpleNamespace(cfg=controlnet.cfg, transformer_blocks=[copy.deepcopy(block)],
                                     input_block=linears[0], controlnet_blocks=[linears[1]])
    io = load_file(os.path.join(case, "io.safetensors"))
    args, mask = (io["hidden_states"], io["timestep"], io["encoder_hidden_states"]), io["encoder_attention_mask"]
    cond = torch.randn(args[0].shape, generator=g)
    with torch.no_grad():
        assert_close("output", transformer(*args, mask), io["output"])
        out = transformer(*args, mask, controls=controlnet.controls(*args, cond, mask))
        assert_close("official forward", out, official_controlnet_forward(reference, official, *args, mask, cond))
        assert (out - io["output"]).abs().max() > 0.1, "the ControlNet should change the output"


@cases("sana", "io.safetensors", "controlnet", "transformer")
@pytest.mark.parametrize("wiring", ["original", "diffusers"])
def test_controlnet_wiring_puts_each_tensor_where_its_code_does(case, wiring):
    """Recorded inputs of every block: control block 0 reads (original) the base model's tokens after its block 0
    or (diffusers) the ControlNet's own patch embedding of x, plus input_block(patch_embed(control)); sample i goes in
    after base block i (original) or i + 1 (diffusers); nothing else is added."""
    io, args, mask, cond, scale, n = controlnet_case(case)
    transformer = sana.load_transformer(case)
    controlnet, _ = sana.load_controlnet(case)
    controlnet.wiring = wiring
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = (inputs[0], output)
        return hook

    handles = [b.register_forward_hook(record(f"base{i}")) for i, b in enumerate(transformer.transformer_blocks)]
    handles += [b.register_forward_hook(record(f"ctrl{i}")) for i, b in enumerate(controlnet.transformer_blocks)]
    handles.append(transformer.norm_out.register_forward_hook(record("final")))
    with torch.no_grad():
        samples = []
        controls = controlnet.controls(*args, cond, mask, scale)
        if callable(controls):
            def keep(tokens):
                samples.extend(controls(tokens))
                return list(samples)
            transformer(*args, mask, controls=keep)
        else:
            samples = controls
            transformer(*args, mask, controls=samples)
        for h in handles:
            h.remove()
        start = seen["base0"][1] if wiring == "original" else controlnet.patch_embed(args[0])
        start = start + controlnet.input_block(controlnet.patch_embed(cond))
        assert_close("control block 0 input", seen["ctrl0"][0], start)
    after = {i + (0 if wiring == "original" else 1): s for i, s in enumerate(samples)}  # block index: its sample
    depth = transformer.cfg.depth
    assert len(samples) == n and max(after) < depth
    for i in range(depth):
        out = seen[f"base{i}"][1] + after.get(i, 0)
        assert_close(f"input after base block {i}", seen[f"base{i + 1}" if i + 1 < depth else "final"][0], out)


@cases("sana", "io.safetensors", "controlnet", "transformer")
def test_zeroed_controlnet_leaves_the_output_unchanged(case):
    """A ControlNet whose controlnet_blocks are zero (as SanaControlNet.from_transformer starts) adds exact zeros,
    in either wiring: the output is the base model's, bit for bit."""
    io, args, mask, cond, scale, _ = controlnet_case(case)
    transformer = sana.load_transformer(case)
    controlnet, _ = sana.load_controlnet(case)
    for linear in controlnet.controlnet_blocks:
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
    with torch.no_grad():
        plain = transformer(*args, mask)
        for wiring in ("diffusers", "original"):
            controlnet.wiring = wiring
            assert torch.equal(transformer(*args, mask, controls=controlnet.controls(*args, cond, mask, scale)), plain)
        fresh = sana.SanaControlNet.from_transformer(transformer, controlnet.cfg.depth)
        assert torch.equal(transformer(*args, mask, controls=fresh.controls(*args, cond, mask)), plain)
    assert_close("output_without_controlnet", plain, io["output_without_controlnet"])


def test_controlnet_strict_loading_names_keys(tmp_path, monkeypatch):
    case = os.path.join(FIX, "controlnet_forward")
    path = tmp_path / "checkpoint.pth"
    original_controlnet_checkpoint(case, str(path), monkeypatch)
    sd = torch.load(path)["state_dict"]
    sd.pop("controlnet.1.after_proj.bias")
    sd["controlnet.3.before_proj.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ValueError, match=r"does not fit the _fixture ControlNet: 1 missing: controlnet_blocks\.1\."
                                         r"bias; 1 unexpected: controlnet\.3\.before_proj\.weight"):
        sana.load_controlnet(str(path), preset="_fixture")
    sd = load_file(os.path.join(case, "controlnet", "diffusion_pytorch_model.safetensors"))
    sd.pop("input_block.bias")
    folder = tmp_path / "controlnet"
    os.makedirs(folder)
    (folder / "config.json").write_text(open(os.path.join(case, "controlnet", "config.json")).read())
    from safetensors.torch import save_file
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit the model: 1 missing: input_block\.bias"):
        sana.load_controlnet(str(tmp_path))  # the folder above controlnet/, as a pipeline folder
    with pytest.raises(ValueError, match="holds a SanaTransformer2DModel, not a SanaControlNetModel"):
        sana.load_controlnet(os.path.join(case, "transformer"))
    with pytest.raises(ValueError, match="cannot tell which ControlNet"):
        sana.load_controlnet(str(path))


def test_edge_map_marks_the_object_outlines():
    """White edges on black, exactly along the outlines of the shapes scenes: every edge pixel is within one pixel
    of an object/background boundary and every boundary pixel has an edge within one pixel."""
    x, _ = sana.shapes_batch(8, seed=5)
    edges = sana.edge_map(x)
    assert edges.shape == x.shape and set(edges.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(edges[:, 0], edges[:, 1]) and torch.equal(edges[:, 0], edges[:, 2])
    for img, e in zip(x, edges):
        mask = torch.from_numpy(sana.object_mask(((img + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()))
        near = lambda m: torch.nn.functional.max_pool2d(m[None, None].float(), 3, 1, 1)[0, 0] > 0  # noqa: E731
        boundary = near(mask) & near(~mask)
        edge = e[0] > 0
        assert edge.any() and not (edge & ~near(boundary)).any() and not (boundary & ~near(edge)).any()


def test_control_iou():
    x, _ = sana.shapes_batch(2, seed=9)
    a, b = (((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    assert sana.control_iou(a, a) == 1.0
    blank = a.copy()
    blank[:] = a[0, 0]  # the background colour alone: no object
    assert sana.control_iou(a, blank) == 0.0
    ma, mb = sana.object_mask(a), sana.object_mask(b)
    assert sana.control_iou(a, b) == pytest.approx((ma & mb).sum() / (ma | mb).sum())


@cases("sana", "io.safetensors", "text_encoder", forbidden=("transformer",))
def test_text_encoder_parity(case):
    io = load_file(os.path.join(case, "io.safetensors"))
    te = sana.load_text_encoder(os.path.join(case, "text_encoder"))
    with torch.no_grad():
        h = te(io["input_ids"], io["attention_mask"])
    assert_close("last_hidden_state", h, io["last_hidden_state"])
    sel = io["select_index"].tolist()
    assert sel == [0] + list(range(-len(sel) + 1, 0))
    assert_close("prompt_embeds", h[:, sel], io["prompt_embeds"])
    assert torch.equal(io["attention_mask"][:, sel], io["prompt_attention_mask"])


SAMPLERS = {"DPMSolverMultistepScheduler": (sana.flow_dpm_schedule, sana.sample_flow_dpm),
            "FlowMatchEulerDiscreteScheduler": (sana.flow_euler_schedule, sana.sample_flow_euler)}


@cases("sana", "io.safetensors", "scheduler", "transformer")
def test_sampler_parity(case):
    """The reference pipeline call of call.json (steps, guidance) with the scheduler of scheduler/: every
    transformer call and every step."""
    io = load_file(os.path.join(case, "io.safetensors"))
    call = sana.read_json(os.path.join(case, "call.json"))  # every case has one: a missing file fails the test
    assert call["num_inference_steps"] == len(io["scheduler_timesteps"])
    f = sana.DCAEConfig().compression  # the published DC-AE f32c32: the reference call's pixel sizes assume it
    assert (call["height"], call["width"]) == tuple(f * n for n in io["latents_init"].shape[-2:])
    sched = sana.read_json(os.path.join(case, "scheduler", "scheduler_config.json"))
    schedule, sampler = SAMPLERS[sched["_class_name"]]
    shift = sched.get("flow_shift") or sched.get("shift")
    sigmas, timesteps = schedule(call["num_inference_steps"], shift)
    assert_close("scheduler_sigmas", sigmas, io["scheduler_sigmas"], atol=1e-6)
    assert torch.equal(timesteps.float(), io["scheduler_timesteps"])
    model = sana.load_transformer(case)
    calls = []

    def recording_model(x, t, y, mask):
        out = model(x, t, y, mask)
        calls.append((x, t, out))
        return out

    def check_step(i, x):
        x_in, t, out = calls[i]
        assert_close(f"step{i}.input", x_in, io[f"step{i}.input"])
        assert torch.equal(t.float(), io[f"step{i}.timestep"]), f"step{i}.timestep"
        assert_close(f"step{i}.output", out, io[f"step{i}.output"])
        assert_close(f"latents_after_step{i}", x, io[f"latents_after_step{i}"])

    if "te_input_ids" in io:  # the pipeline case starts from token ids: run the text encoder too
        te = sana.load_text_encoder(os.path.join(case, "text_encoder"))
        with torch.no_grad():
            n = io["prompt_embeds"].shape[1]
            sel = [0] + list(range(-n + 1, 0))
            assert_close("prompt_embeds", te(io["te_input_ids"], io["te_attention_mask"])[:, sel], io["prompt_embeds"])
            assert_close("negative_prompt_embeds", te(io["te_neg_input_ids"], io["te_neg_attention_mask"]),
                         io["negative_prompt_embeds"])
    cond = (io["prompt_embeds"], io["prompt_attention_mask"])
    uncond = (io["negative_prompt_embeds"], io["negative_prompt_attention_mask"])
    with torch.no_grad():
        velocity = sana.guided_velocity(recording_model, cond, uncond, call["guidance_scale"])
        x = sampler(velocity, io["latents_init"], sigmas, timesteps, callback=check_step)
    assert len(calls) == len(timesteps)
    assert_close("final_latents", x, io["final_latents"])
    if "decoded_image" in io:
        vae = sana.load_vae(os.path.join(case, "vae"))
        with torch.no_grad():
            assert_close("decoded_image", vae.decode(x / sana.VAE_SCALE), io["decoded_image"])


def test_sampler_parity_reads_the_case_call(tmp_path):
    """The run parameters come from the case's call.json: without it the case fails, and another guidance scale
    than the one the reference ran with makes the parity check fail."""
    import shutil
    src = sorted(d for d in glob.glob(os.path.join(FIX, "*")) if all(  # a sampler case, as test_sampler_parity's
        os.path.exists(os.path.join(d, f)) for f in ("call.json", "io.safetensors", "scheduler", "transformer")))[0]
    case = tmp_path / "case"
    shutil.copytree(src, case)
    call = sana.read_json(str(case / "call.json"))
    (case / "call.json").write_text(json.dumps({**call, "guidance_scale": call["guidance_scale"] + 1.0}))
    with pytest.raises(AssertionError):
        test_sampler_parity(str(case))
    os.remove(case / "call.json")
    with pytest.raises(FileNotFoundError):
        test_sampler_parity(str(case))


def test_aspect_ratio_bins():
    assert sana.aspect_ratio_bin(1024, 1024, 1024) == (1024, 1024)
    assert sana.aspect_ratio_bin(720, 1280, 1024) == (768, 1344)  # 0.5625 -> "0.57"
    assert sana.aspect_ratio_bin(100, 10000, 512) == (256, 1024)
    assert sana.aspect_ratio_bin(4000, 1000, 4096) == (8192, 2048)
    assert sana.aspect_ratio_bin(3600, 1000, 2048) == (3712, 1024)  # "3.62" exists only in the 2K/4K tables
    assert sana.aspect_ratio_bin(3600, 1000, 1024) == (2048, 512)


def test_training_step_learns():
    """The flow-matching loss falls when fitting one batch of a tiny model."""
    torch.manual_seed(0)
    cfg = sana.SanaConfig(in_channels=4, out_channels=4, hidden_size=32, depth=2, num_heads=2, cross_heads=2,
                          caption_channels=16, sample_size=4)
    model = sana.SanaTransformer(cfg)
    x0, y = torch.randn(8, 4, 4, 4), torch.randn(8, 5, 16)
    mask = torch.ones(8, 5, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        g = torch.Generator().manual_seed(step % 4)  # 4 fixed noise draws: a learnable target
        loss = sana.training_loss(model, x0, y, mask, y[:1] * 0, mask[:1], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) < 0.6 * sum(losses[:4]), losses


def test_training_loss_time_shifts_alternate_over_the_batch():
    """A tuple of shifts is taken by the batch's samples in turn (the tiny recipe's (3, 1)): with the same draws,
    the even samples see the times of shift 3 and the odd ones the unshifted times; a single shift moves them all."""
    x0, y = torch.randn(6, 4, 4, 4), torch.randn(6, 5, 16)
    mask = torch.ones(6, 5, dtype=torch.long)
    seen = {}

    def model(x, t, y, m):  # records the model times 1000 sigma, predicts zero velocity
        seen[key] = t.clone()
        return torch.zeros_like(x)

    for key in [1.0, 3.0, (3.0, 1.0)]:
        sana.training_loss(model, x0, y, mask, y[:1], mask[:1], torch.Generator().manual_seed(0), shift=key)
    u = seen[1.0] / 1000
    assert torch.allclose(seen[3.0], 1000 * sana.shift_sigma(u, 3.0))
    assert torch.allclose(seen[(3.0, 1.0)][0::2], seen[3.0][0::2])
    assert torch.equal(seen[(3.0, 1.0)][1::2], seen[1.0][1::2])
    assert (seen[3.0] > seen[1.0]).all()  # the shift moves every time towards noise


@committed(sana.TINY_DCAE)
def test_tiny_recipe_trains_with_both_shifts(tmp_path, monkeypatch):
    """train_tiny's loss (and finetune_tiny's, which --grow and pruning use) draws its times at the recipe's shifts
    (3, 1), not at the sampler's 3 alone: one step of each, with the loss's shift recorded."""
    shifts, loss = [], sana.training_loss

    def recording_loss(*args, shift=1.0, **kwargs):
        shifts.append(shift)
        return loss(*args, shift=shift, **kwargs)

    monkeypatch.setattr(sana, "training_loss", recording_loss)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    pipe = sana.train_tiny(out=str(tmp_path / "t.safetensors"), log=lambda *a: None, steps=1, batch=4, n_images=8)
    sana.finetune_tiny(pipe, 1, log=lambda *a: None, batch=4, n_images=8)
    torch.set_num_threads(threads)  # both set the recipe's 2 threads and deterministic algorithms
    torch.use_deterministic_algorithms(deterministic)
    assert shifts == [(3.0, 1.0)] * 2 and pipe.transformer.cfg.flow_shift == 3.0, shifts


class RecordingEncoder(torch.nn.Module):
    """Wraps a text encoder and keeps the token ids it was called with."""

    def __init__(self, te):
        super().__init__()
        self.te, self.calls, self.embed_tokens = te, [], te.embed_tokens

    def forward(self, ids, mask):
        self.calls.append((ids, mask))
        return self.te(ids, mask)


def test_initialize_weights_follows_the_official_recipe():
    torch.manual_seed(0)
    model = sana.initialize_weights(sana.SanaTransformer(sana.PRESETS["tiny"]))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.bias is None or not m.bias.any() for m in linears)
    w = model.transformer_blocks[0].attn1.to_q.weight  # xavier-uniform: bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= (6 / sum(w.shape)) ** 0.5 and w.std() > 0.5 * (2 / sum(w.shape)) ** 0.5
    for lin in (model.time_embed.linear, model.caption_projection.linear_2):
        assert abs(lin.weight.std().item() - 0.02) < 0.002
    conv = model.patch_embed.proj.weight.flatten(1)  # like a Linear of fan_in C p^2
    assert conv.abs().max() <= (6 / sum(conv.shape)) ** 0.5
    assert torch.all(model.caption_norm.weight == 0.01)  # y_norm_scale_factor


def test_encode_prompts_chi_selection():
    """CHI + prompt padded to n_chi + max_len - 2, then BOS + the last max_len - 1 positions (ref sec. 3)."""
    tok = sana.build_tiny_tokenizer()
    te = RecordingEncoder(sana.load_text_encoder(os.path.join(FIX, "pipeline_flow_dpm_20step", "text_encoder")))
    v = tok.get_vocab()
    emb, mask = sana.encode_prompts(te, tok, ["Two blue squares "], max_len=6, chi="red circle on a ")  # joined with no separator, like the CHI
    ids, full_mask = te.calls[-1]
    assert ids.shape == (1, 5 + 6 - 2)  # n_chi = 5 with BOS
    want = [2, v["red"], v["circle"], v["on"], v["a"], v["two"], v["blue"], v["squares"], 0]  # lower-cased
    assert ids[0].tolist() == want
    sel = [0, -5, -4, -3, -2, -1]
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    with torch.no_grad():
        assert torch.equal(emb, te.te(ids, full_mask)[:, sel])
    emb, mask = sana.encode_prompts(te, tok, [""], max_len=6, chi=None)  # the unconditional input
    assert te.calls[-1][0][0].tolist() == [2, 0, 0, 0, 0, 0] and mask[0].tolist() == [1, 0, 0, 0, 0, 0]


def make_pipeline_folder(tmp_path):
    """The tiny diffusers-layout pipeline fixture plus a tokenizer/ (the tiny word-level one) = a pipeline folder."""
    src = os.path.join(FIX, "pipeline_flow_dpm_20step")
    for sub in ("transformer", "text_encoder", "vae", "scheduler"):
        os.symlink(os.path.join(src, sub), tmp_path / sub)
    os.makedirs(tmp_path / "tokenizer")
    sana.build_tiny_tokenizer().save(str(tmp_path / "tokenizer" / "tokenizer.json"))
    return str(tmp_path)


def test_cli_with_pipeline_folder(tmp_path, capsys):
    folder = make_pipeline_folder(tmp_path)
    out = tmp_path / "img.png"
    sana.main(["--ckpt", folder, "--prompt", "a red circle", "--height", "16", "--width", "24", "--steps", "3",
               "--device", "cpu", "--out", str(out)])
    from PIL import Image
    assert Image.open(out).size == (24, 16)
    pipe = sana.load_pipeline(folder)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a, b = pipe.generate(["a red circle"], 16, 16, 3, 4.5, g()), pipe.generate(["a red circle"], 16, 16, 3, 4.5, g())
    assert torch.equal(a, b)  # the explicit generator makes sampling reproducible


# The tiny committed demo. Prompt fidelity = colour, shape and count all read back right by the shapes scorer.

def test_tiny_grammar_takes_every_training_caption_and_is_in_the_help(capsys):
    scenes = [(n, c, s, b) for n in (1, 2, 3) for c in sana.COLORS for s in sana.SHAPES
              for b in sana.COLORS if b != c]
    for scene in scenes:
        sana.check_tiny_prompt(sana.shapes_caption(*scene).upper())  # encode_prompts lower-cases
    with pytest.raises(SystemExit):
        sana.main(["--help"])
    assert sana.TINY_GRAMMAR in " ".join(capsys.readouterr().out.split())


def tiny_sampler(guidance=None, steps=20):
    """The committed tiny pipeline as conftest.tiny_fidelity's generate(prompts, generator): 64x64 images."""
    pipe = sana.load_tiny()
    return lambda prompts, g: pipe.generate(prompts, 64, 64, steps, guidance, g)


@committed(*TINY)
def test_tiny_prompt_fidelity():
    """docs/sana.md's score (24 prompts x 4 seeds: 0.823, above the issue's bar of 0.8) on its first two seeds
    (measured 0.875, 42 of 48 images; the bar leaves two images of slack for other CPUs' numerics), with colours
    checked exactly: what fails is a few squares and counts, never a colour (see docs/sana.md)."""
    score, images, captions = tiny_fidelity(tiny_sampler(), shapes_score.readme_prompts(), seeds=[0, 1])
    assert score >= 40 / 48, score
    assert all(shapes_score.score(img, cap)["color"] for img, cap in zip(images, captions))


@committed(*TINY)
def test_tiny_draws_white_objects(tmp_path):
    """The issue's example: white is an object colour too now (it was only a background before)."""
    from PIL import Image
    out = tmp_path / "white.png"
    sana.main(["--prompt", "a white square on a red background", "--out", str(out), "--device", "cpu"])
    scene = shapes_score.read_scene(Image.open(out))
    assert (scene["color"], scene["background"], scene["count"]) == ("white", "red", 1), scene


@committed(sana.TINY_DCAE)
def test_tiny_training_is_deterministic(tmp_path):
    """Two short runs from the same seed give bit-identical weights (the committed ones come from `--train`)."""
    runs = []
    for i in range(2):
        sana.train_tiny(seed=0, out=str(tmp_path / f"run{i}" / "sana_tiny.safetensors"), log=lambda *a: None,
                        steps=3, batch=8, n_images=16)
        runs.append(load_file(str(tmp_path / f"run{i}" / "sana_tiny.safetensors")))
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def fidelity_from_noise_level(n=96, seed=7, levels=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), steps=20, guidance=None):
    """Where the tiny model loses fidelity: real scenes are encoded, noised to sigma0 (x = (1 - sigma0) z +
    sigma0 eps), then denoised with 20 Euler steps + CFG and decoded. sigma0 = 0 is the autoencoder alone (its own
    score), sigma0 = 1 full generation; the drop between two levels is what the DiT gets wrong there."""
    pipe = sana.load_tiny()
    x, captions = sana.shapes_batch(n, seed=seed)
    with torch.no_grad():
        z0 = pipe.vae.encode(x) * pipe.vae_scale
        cond = sana.encode_prompts(pipe.text_encoder, pipe.tokenizer, captions, pipe.max_len, None)
        uncond = sana.encode_prompts(pipe.text_encoder, pipe.tokenizer, [""] * n, pipe.max_len, None)
        scale = pipe.guidance_scale if guidance is None else guidance
        velocity = sana.guided_velocity(pipe.transformer, cond, uncond, scale)
        eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
        out = {}
        for s0 in levels:
            sigmas = torch.linspace(s0, 0, steps + 1)
            z = sana.sample_flow_euler(velocity, (1 - s0) * z0 + s0 * eps, sigmas, 1000 * sigmas[:-1])
            img = ((pipe.vae.decode(z / pipe.vae_scale).clamp(-1, 1) + 1) * 127.5).round().byte()
            out[s0] = shapes_score.fidelity(list(img.permute(0, 2, 3, 1).numpy()), captions)
    return out


def print_report(name, images, captions):
    r = shapes_score.report(images, captions)
    shapes = ", ".join(f"{sh} {right}/{n}" for sh, (right, n) in r["by_shape"].items())
    print(f"{name}: fidelity {r['fidelity']:.3f} over {len(images)} images | colour {r['color']:.2f}, shape "
          f"{r['shape']:.2f}, count {r['count']:.2f}, background {r['background']:.2f} | {shapes}")


def came_reference():
    """came-pytorch's CAME (the package the official recipe installs), if this machine has it."""
    try:
        from came_pytorch import CAME
    except ImportError:
        pytest.skip("came-pytorch is not installed (pip install came-pytorch): the reference is optional")
    return CAME


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.LayerNorm(32), torch.nn.SiLU(), torch.nn.Linear(32, 5))


def fit(model, opt, steps=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 12, generator=g), torch.randn(64, 5, generator=g)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_came_matches_came_pytorch():
    """On Linear weights, biases and norms (where came-pytorch and the official CAMEWrapper agree), the same steps.
    With weight decay, whose order (before the step) the official code fixes."""
    Reference = came_reference()
    ours, ref = mlp(), mlp()
    fit(ours, sana.CAME(ours.parameters(), lr=1e-2, weight_decay=0.01))
    fit(ref, Reference(ref.parameters(), lr=1e-2, weight_decay=0.01))
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert_close(name, a, b, atol=1e-6, rtol=1e-5)


def test_came_learns_and_its_8_bit_state_tracks_it():
    """CAME fits a small regression; CAME-8bit (every weight matrix in 8 bits: min_8bit_size 0, blocks of 8 rows)
    follows it closely with about a third of the state bytes of the matrices' momentum."""
    runs = {}
    for eight_bit in (False, True):
        model = mlp()
        opt = sana.CAME(model.parameters(), lr=1e-2, eight_bit=eight_bit, block_size=8, min_8bit_size=0)
        runs[eight_bit] = (fit(model, opt, steps=40), opt.state_bytes(), model)
    (l32, b32, m32), (l8, b8, m8) = runs[False], runs[True]
    assert l32[-1] < 0.5 * l32[0], l32
    assert abs(l8[-1] - l32[-1]) < 0.05 * l32[-1], (l8[-1], l32[-1])
    momentum = sum(p.numel() for p in m32.parameters() if p.dim() == 2)
    assert b32 - b8 == momentum * 3 - sum(8 * -(-p.shape[0] // 8) for p in m8.parameters() if p.dim() == 2), (b32, b8)


def test_came_quantization_error_is_half_a_step():
    opt = sana.CAME([torch.nn.Parameter(torch.zeros(1))], lr=1.0, eight_bit=True, block_size=4)
    x = torch.randn(10, 3) * torch.arange(1, 11)[:, None]  # blocks of very different ranges
    q = opt.quantize(x)
    assert q["codes"].dtype == torch.uint8 and len(q["lo"]) == 3
    step = torch.cat([s.expand(min(4, 10 - 4 * i)) for i, s in enumerate(q["step"])])[:, None]
    assert ((opt.dequantize(q) - x).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(opt.dequantize(opt.quantize(torch.zeros(5, 2))), torch.zeros(5, 2))  # a constant block


def test_tournament_finds_the_judges_favourite():
    """With a judge that prefers the larger number, every order and count of candidates yields the maximum (the
    odd one out passes free); with no preference (ties) the first candidate wins."""
    import random
    rng = random.Random(0)
    for n in range(1, 18):
        values = rng.sample(range(100), n)
        assert sana.tournament(values, lambda a, b: a >= b) == max(values)
    assert sana.tournament(["a", "b", "c"], lambda a, b: True) == "a"


@committed(*TINY)
def test_best_of_n_returns_the_judges_pick():
    """Best of 4 with a judge that prefers fewer red pixels returns the least red of the 4 images the same generator
    draws (the candidates are the pipeline's own batch), at the first seed where that one is unique and not the
    first (so that the test can tell a right pick from a default)."""
    pipe = sana.load_tiny()
    prompt = "two red circles on a blue background"
    red = lambda img: int(((img[..., 0] > 150) & (img[..., 2] < 100)).sum())  # noqa: E731
    for seed in range(16):
        candidates = pipe.generate([prompt] * 4, 64, 64, generator=torch.Generator().manual_seed(seed))
        least = min(range(4), key=lambda i: red(candidates[i]))
        if least > 0 and sorted(red(c) for c in candidates)[1] > red(candidates[least]):
            break
    else:
        pytest.fail("no seed of 16 has a unique least-red candidate after the first")
    best = sana.best_of_n(pipe, prompt, 4, lambda a, b, p: red(a) <= red(b), 64, 64,
                          torch.Generator().manual_seed(seed))
    assert torch.equal(best, candidates[least])


@committed(*TINY)
def test_cli_samples_writes_the_judges_pick(tmp_path):
    """`--samples 4`: the image written is the shapes judge's tournament winner among the 4 candidates that the seed's
    noise gives."""
    from PIL import Image
    prompt, out = "two gray squares on a white background", tmp_path / "best.png"
    sana.main(["--prompt", prompt, "--samples", "4", "--seed", "3", "--out", str(out), "--device", "cpu"])
    candidates = sana.load_tiny().generate([prompt] * 4, 64, 64, generator=torch.Generator().manual_seed(3)).numpy()
    right = [sum(shapes_score.score(c, prompt).values()) for c in candidates]
    written = np.asarray(Image.open(out))
    assert any(np.array_equal(written, c) for c in candidates)
    assert sum(shapes_score.score(written, prompt).values()) == max(right), right


@committed(*TINY)
def test_cli_grow_trains_and_writes_a_deeper_model(tmp_path):
    """`--train --grow 5`: the committed 4-block model grown to 5 blocks and trained, written where --train-out says;
    `--tiny-weights` then samples it."""
    from PIL import Image
    grown = tmp_path / "grown.safetensors"
    sana.main(["--train", "--grow", "5", "--train-steps", "2", "--train-out", str(grown)])
    pipe = sana.load_tiny(str(grown))
    assert pipe.transformer.cfg.depth == 5
    base = sana.load_tiny().transformer.state_dict()
    moved = [k for k, v in pipe.transformer.state_dict().items() if k in base and not torch.equal(v, base[k])]
    assert moved  # it trained
    out = tmp_path / "grown.png"
    sana.main(["--prompt", "a red circle on a blue background", "--tiny-weights", str(grown), "--out", str(out),
               "--device", "cpu"])
    assert Image.open(out).size == (64, 64)


def test_grow_depth_copies_exactly_the_layers_it_says():
    """Partial preservation: every weight outside the blocks and the first `preserve` blocks are the trained
    model's; the later blocks are new (none equals the trained model's block in the same place)."""
    small = sana.load_tiny().transformer
    grown = sana.grow_depth(small, 6, preserve=3)
    assert grown.cfg.depth == 6 and len(grown.transformer_blocks) == 6
    old, new = small.state_dict(), grown.state_dict()
    for k, v in new.items():
        i = int(k.split(".")[1]) if k.startswith("transformer_blocks.") else None
        if i is None or i < 3:
            assert torch.equal(v, old[k]), k
        elif i == 3:
            assert not torch.equal(v, old[k]), k
    with pytest.raises(ValueError, match="cannot grow a 4-block model to 4 blocks"):
        sana.grow_depth(small, 4)


class PassThrough(torch.nn.Module):
    """A block that returns its input: SANA 1.5's importance measure must give it 0."""

    def forward(self, x, *args):
        return x


@committed(*TINY)
def test_block_importance_of_an_identity_block_is_zero():
    pipe = sana.load_tiny()
    pipe.transformer.transformer_blocks[1] = PassThrough()
    importance = sana.block_importance(pipe, ["two red circles on a blue background"], 64, 64, 4,
                                       torch.Generator().manual_seed(0))
    assert importance.shape == (4,) and abs(importance[1].item()) < 1e-6
    assert (importance[[0, 2, 3]] > 1e-3).all(), importance


@committed(*TINY)
def test_pruning_removes_the_least_important_blocks():
    """Pruning keeps the most important blocks in their order, and the pruned model still runs."""
    pipe = sana.load_tiny()
    blocks = list(pipe.transformer.transformer_blocks)
    keep = sana.prune_blocks(pipe.transformer, 2, torch.tensor([0.3, 0.1, 0.5, 0.2]))
    assert keep == [0, 2] and pipe.transformer.cfg.depth == 2
    assert list(pipe.transformer.transformer_blocks) == [blocks[0], blocks[2]]
    assert pipe.generate(["a red circle on a white background"], 64, 64, 2).shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="cannot prune a 2-block model to 3 blocks"):
        sana.prune_blocks(pipe.transformer, 3, torch.zeros(2))


@committed(*TINY)
def test_finetune_tiny_trains_the_pruned_model():
    """A few fine-tune steps move every kept weight (the text encoder's too) and keep the pipeline usable."""
    pipe = sana.load_tiny()
    sana.prune_blocks(pipe.transformer, 3, torch.tensor([0.3, 0.1, 0.5, 0.2]))
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe = sana.finetune_tiny(pipe, 3, log=lambda *a: None, batch=8, n_images=32, bf16=False)
    after = pipe.transformer.state_dict()
    assert after.keys() == before.keys() and not torch.equal(after["proj_out.weight"], before["proj_out.weight"])
    assert pipe.generate(["a red circle on a white background"], 64, 64, 2).shape == (1, 64, 64, 3)


@pytest.mark.parametrize("eight_bit", [False, True])
def test_came_first_step_on_a_rank_one_gradient(eight_bit):
    """Where the factored moments are exact (g = a b^T makes g^2 and (u - m)^2 rank one), the paper's equations give
    the first step in closed form: u = g / sqrt((1 - b2) g^2) is clipped to sign(g) (RMS 1), m = (1 - b1) sign(g),
    the instability (u - m)^2 = b1^2, so the step is lr (1 - b1) / (b1 sqrt(1 - b3)) sign(g) for every element.
    A non-factored tensor (a bias) steps by m alone: lr (1 - b1) sign(g)."""
    lr, (b1, b2, b3) = 1e-3, (0.9, 0.999, 0.9999)
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, -0.25, 1.0, 2.0])
    w, bias = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(4))
    w.grad, bias.grad = torch.outer(a, b), b.clone()
    sana.CAME([w, bias], lr=lr, betas=(b1, b2, b3), eight_bit=eight_bit, min_8bit_size=0, block_size=2).step()
    step = lr * (1 - b1) / (b1 * (1 - b3) ** 0.5)
    assert_close("factored step", w, -step * torch.outer(a, b).sign(), atol=1e-9, rtol=1e-5)
    assert_close("bias step", bias, -lr * (1 - b1) * b.sign(), atol=1e-9, rtol=1e-5)


@committed(sana.TINY_DCAE)
def test_train_tiny_takes_came(tmp_path, monkeypatch, capsys):
    """train_tiny(optimizer="came8bit") (--train --optimizer came8bit) steps with SANA 1.5's CAME-8bit at its
    TINY_LR, its momentum held in uint8, and says so in the weights' metadata; an unknown optimizer, or --optimizer
    without --train, is refused in one sentence."""
    made, make = [], sana.make_optimizer

    def recording(name, params, lr):
        made.append((name, lr, make(name, params, lr)))
        return made[-1][2]

    monkeypatch.setattr(sana, "make_optimizer", recording)
    out = str(tmp_path / "came.safetensors")
    sana.train_tiny(out=out, log=lambda *a: None, steps=2, batch=4, n_images=8, optimizer="came8bit")
    (name, lr, opt), = made
    assert (name, lr) == ("came8bit", sana.TINY_LR["came8bit"]) and isinstance(opt, sana.CAME) and opt.eight_bit
    assert any(isinstance(s["exp_avg"], dict) and s["exp_avg"]["codes"].dtype == torch.uint8
               for s in opt.state.values())
    meta = sana.read_metadata(out)
    assert meta["optimizer"] == "came8bit" and float(meta["lr"]) == sana.TINY_LR["came8bit"]
    with pytest.raises(ValueError, match="the optimizer must be adamw, came or came8bit, not 'adam'"):
        sana.train_tiny(out=out, optimizer="adam")
    with pytest.raises(SystemExit):
        sana.main(["--prompt", "a red circle on a blue background", "--optimizer", "came"])
    assert "--optimizer goes with --train" in capsys.readouterr().err


@committed(*TINY)
def test_generate_runs_the_controlnet_on_both_cfg_halves():
    """The ControlNet wraps the model the sampler calls (control_model): under CFG it sees the batch [uncond, cond]
    with the same control latent in both halves, the DC-AE encoding of the control image x vae_scale (as diffusers'
    SanaControlNetPipeline); a freshly initialized ControlNet (zero projections) leaves the images exactly as without
    it; one control image serves every prompt."""
    pipe = sana.load_tiny()
    controlnet = sana.SanaControlNet.from_transformer(pipe.transformer, 2)
    x, captions = sana.shapes_batch(2, seed=3)
    control = sana.edge_map(x)
    calls, forward = [], controlnet.forward

    def recording(*args, **kwargs):
        calls.append(args)
        return forward(*args, **kwargs)

    controlnet.forward = recording
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    steered = pipe.generate(captions, 64, 64, 3, generator=g(),
                            model=sana.control_model(pipe, controlnet, control, 64, 64))
    assert len(calls) == 3 and torch.equal(steered, pipe.generate(captions, 64, 64, 3, generator=g()))
    x_in, _, _, c = calls[0][:4]
    assert x_in.shape[0] == 4 and torch.equal(x_in[:2], x_in[2:]) and torch.equal(c[:2], c[2:])
    with torch.no_grad():
        assert_close("control latent", c[:2], pipe.vae.encode(control) * pipe.vae_scale)
    calls.clear()
    pipe.generate(captions, 64, 64, 1, model=sana.control_model(pipe, controlnet, control[:1], 64, 64))
    assert_close("one control for every prompt", calls[0][3], c[[0, 0, 0, 0]], atol=1e-5)
    with pytest.raises(ValueError, match=r"the control image must be \(1 or one per prompt, 3, 64, 64\)"):
        sana.control_model(pipe, controlnet, control[:, :, :32], 64, 64)
    with pytest.raises(ValueError, match="2 control images for 3 prompts"):
        pipe.generate(captions + captions[:1], 64, 64, 1, model=sana.control_model(pipe, controlnet, control, 64, 64))


@committed(*TINY)
def test_train_controlnet_tiny_reduces_the_loss(tmp_path):
    """30 steps (lr 1e-2 to show it in so few) lower the flow loss of the frozen tiny SANA steered by the ControlNet,
    on scenes it did not train on, with their edge maps as the control, at fixed noise (measured 0.325 -> 0.239); the
    base model does not move, and the file written loads back as the ControlNet returned."""
    pipe = sana.load_tiny()
    x, captions = sana.shapes_batch(16, seed=123)
    with torch.no_grad():
        z, c = (pipe.vae.encode(v) * pipe.vae_scale for v in (x, sana.edge_map(x)))
        ids, mask = sana.tokenize(pipe.tokenizer, captions, sana.TINY_TEXT_LEN)
        y = pipe.text_encoder(ids, mask)

    def loss(controlnet):
        def model(x, t, y, m):
            return pipe.transformer(x, t, y, m, controls=controlnet.controls(x, t, y, c, m))
        with torch.no_grad():
            return sana.training_loss(model, z, y, mask, y[:1], mask[:1], torch.Generator().manual_seed(0),
                                      uncond_prob=0.0, shift=pipe.transformer.cfg.flow_shift).item()

    before = loss(sana.SanaControlNet.from_transformer(pipe.transformer, 2))
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    out = str(tmp_path / "controlnet.safetensors")
    controlnet = sana.train_controlnet_tiny(pipe, 30, out=out, log=lambda *a: None, batch=16, lr=1e-2, n_images=64,
                                            bf16=False, threads=1)
    after = loss(controlnet)
    assert after < 0.9 * before, (before, after)
    assert all(torch.equal(v, base[k]) for k, v in pipe.transformer.state_dict().items())
    loaded = sana.load_tiny_controlnet(out)
    assert loaded.wiring == "original" and loaded.cfg.depth == 2
    assert all(torch.equal(v, controlnet.state_dict()[k]) for k, v in loaded.state_dict().items())


@committed(*TINY)
def test_cli_tiny_control(tmp_path):
    """`--control scene.png --controlnet tiny.safetensors`: the edges of the scene steer the tiny model; the output
    has the control image's size."""
    from PIL import Image
    controlnet = sana.train_controlnet_tiny(sana.load_tiny(), 2, out=str(tmp_path / "cn.safetensors"),
                                            log=lambda *a: None, batch=4, n_images=8, bf16=False, threads=1)
    x, captions = sana.shapes_batch(1, seed=4)
    Image.fromarray(((x[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / "scene.png")
    out = tmp_path / "out.png"
    sana.main(["--prompt", captions[0], "--steps", "2", "--device", "cpu", "--out", str(out), "--control",
               str(tmp_path / "scene.png"), "--controlnet", str(tmp_path / "cn.safetensors")])
    assert Image.open(out).size == (64, 64) and controlnet.cfg.depth == 2


@committed(*TINY, sana.TINY_CONTROLNET)
def test_committed_tiny_controlnet_steers_the_layout():
    """The committed tiny ControlNet on 16 held-out scenes (seed 0): the outputs' objects land where the control
    scene's are. scripts/bench_sana_controlnet.py measured a mean IoU of 0.892 with control and 0.200 without on 96
    scenes; the bars leave room for 16 scenes and other CPUs' numerics."""
    pipe, controlnet = sana.load_tiny(), sana.load_tiny_controlnet()
    x, captions = sana.shapes_batch(16, seed=HELD_OUT_SEED)
    scenes = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
    iou = {scale: float(np.mean([sana.control_iou(s, img) for s, img in
                                 zip(scenes, sana.steer_scenes(pipe, controlnet, x, captions, scale))]))
           for scale in (0.0, 1.0)}
    assert iou[1.0] > 0.75 and iou[0.0] < 0.4, iou


def test_cli_published_controlnet_pth(tmp_path, monkeypatch, capsys):
    """--ckpt FOLDER --controlnet X.pth: the .pth (the fixture case in the original layout, named after a
    registered preset) carries its base model, which replaces the folder's; a diffusers ControlNet folder of as many
    blocks as the folder's base model is refused in one sentence."""
    from PIL import Image
    folder = make_pipeline_folder(tmp_path)
    pth = tmp_path / "_fixture.pth"
    original_controlnet_checkpoint(os.path.join(FIX, "controlnet_forward"), str(pth), monkeypatch)
    Image.fromarray(torch.zeros(16, 24, 3, dtype=torch.uint8).numpy()).save(tmp_path / "control.png")
    out = tmp_path / "img.png"
    sana.main(["--ckpt", folder, "--prompt", "a red circle", "--steps", "2", "--device", "cpu", "--out", str(out),
               "--control", str(tmp_path / "control.png"), "--controlnet", str(pth)])
    assert Image.open(out).size == (24, 16) and "carries its base model" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sana.main(["--ckpt", folder, "--prompt", "a red circle", "--steps", "2", "--device", "cpu", "--out", str(out),
                   "--control", str(tmp_path / "control.png"), "--controlnet", os.path.join(FIX, "controlnet_forward")])
    assert "a ControlNet of 2 blocks needs a base model of more than 2 blocks, not 2" in capsys.readouterr().err


if __name__ == "__main__":  # the full scores of docs/sana.md: python tests/test_sana.py [--choose]
    import sys
    import time
    t0 = time.time()
    guidance = sana.load_tiny().guidance_scale
    if "--choose" in sys.argv:  # how the default guidance was chosen: on prompts apart from the README's
        for g in (1.5, 2.0, 2.5, 3.0, 4.0):
            _, images, captions = tiny_fidelity(tiny_sampler(g), shapes_score.choice_prompts(), [0, 1, 2, 3])
            print_report(f"choice set (48 prompts x 4 seeds), guidance {g}", images, captions)
        sys.exit()
    _, images, captions = tiny_fidelity(tiny_sampler(), shapes_score.readme_prompts(), seeds=[0, 1, 2, 3])
    print_report(f"README prompts (24 x 4 seeds, 20 Flow-DPM steps, guidance {guidance})", images, captions)
    _, images, captions = tiny_fidelity(tiny_sampler(), shapes_score.second_prompts(), seeds=[0, 1, 2, 3])
    print_report("second set, no setting chosen on it (48 x 4 seeds)", images, captions)
    _, images, captions = tiny_fidelity(tiny_sampler(), shapes_score.all_color_prompts(), seeds=[0, 1, 2, 3])
    print_report("all-colour set, objects of every colour (48 x 4 seeds)", images, captions)
    print(f"({time.time() - t0:.0f}s)")
    print("fidelity when denoising encoded real scenes from noise level sigma0 (0 = the DC-AE alone):",
          ", ".join(f"{s0:.1f}: {f:.3f}" for s0, f in fidelity_from_noise_level().items()))


# LoRA (section 9): interop with diffusers/peft both ways (fixtures by scripts/make_sana_lora_fixture.py), the data
# folder, the fine-tune, the memory estimate.

@cases("sana", "io.safetensors", "transformer", "lora.safetensors")
def test_lora_parity(case):
    """The case's LoRA (written by sana.py and loaded by diffusers, or saved by diffusers/peft) on its transformer:
    sana.py's output is diffusers', at lora scale 1 and at call.json's scale, and the LoRA changes the output."""
    io = load_file(os.path.join(case, "io.safetensors"))
    scale = sana.read_json(os.path.join(case, "call.json"))["lora_scale"]
    args = (io["hidden_states"], io["timestep"], io["encoder_hidden_states"], io["encoder_attention_mask"])
    path = os.path.join(case, "lora.safetensors")
    for key, s in (("output", 1.0), ("output_scaled", scale)):
        model = sana.apply_lora(sana.load_transformer(case), sana.read_lora(path), s, path)
        with torch.no_grad():
            assert_close(key, model(*args), io[key], atol=2e-5, rtol=1e-5)
    assert (io["output"] - io["output_base"]).abs().max() > 0.1


def test_lora_file_is_what_save_lora_writes(tmp_path):
    """sana.py's LoRA format has not drifted from the file diffusers loaded: the case's LoRA, put on the model and
    saved again with call.json's settings, gives the same tensors and the same peft config."""
    from safetensors import safe_open
    case = os.path.join(FIX, "lora_written_by_sana")
    call = sana.read_json(os.path.join(case, "call.json"))
    path = os.path.join(case, "lora.safetensors")
    model = sana.apply_lora(sana.load_transformer(case), sana.read_lora(path), 1.0, path)
    sana.save_lora(model, str(tmp_path / "again.safetensors"), call["rank"], call["lora_alpha"], call["targets"])
    old, new = load_file(path), load_file(str(tmp_path / "again.safetensors"))
    assert sorted(old) == sorted(new) and all(torch.equal(old[k], new[k]) for k in old)
    meta = [safe_open(p, "pt").metadata() for p in (path, str(tmp_path / "again.safetensors"))]
    assert meta[0] == meta[1] and json.loads(meta[0][sana.LORA_METADATA])["transformer.r"] == call["rank"]


def test_read_lora_alpha_rules(tmp_path):
    """alpha / r from peft's config (lora_alpha, alpha_pattern), and alpha = r (scale 1) in a file without one."""
    from safetensors.torch import save_file
    sd = {"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 8),
          "transformer.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.ones(2, 8)}
    sd.update({k.replace("lora_A", "lora_B"): torch.ones(8, 2) for k in list(sd)})
    save_file(sd, str(tmp_path / "plain.safetensors"))
    assert {s for _, _, s in sana.read_lora(str(tmp_path / "plain.safetensors")).values()} == {1.0}
    config = {"transformer.lora_alpha": 4, "transformer.alpha_pattern": {"attn2.to_k": 1}}
    save_file(sd, str(tmp_path / "meta.safetensors"), {sana.LORA_METADATA: json.dumps(config)})
    scales = {k: s for k, (_, _, s) in sana.read_lora(str(tmp_path / "meta.safetensors")).items()}
    assert scales == {"transformer_blocks.0.attn1.to_q": 2.0, "transformer_blocks.0.attn2.to_k": 0.5}


def style_folder(tmp_path, n=8, jsonl=False):
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(FIX), "..", "..", "scripts"))
    import make_lora_style_data
    folder = str(tmp_path / ("jsonl" if jsonl else "txt"))
    return folder, make_lora_style_data.write_folder(folder, n=n, seed=0, jsonl=jsonl)


def test_image_folder_conventions(tmp_path):
    """A .txt beside each image and a metadata.jsonl give the same pairs; images come resized and centre-cropped."""
    (a, caps), (b, _) = style_folder(tmp_path), style_folder(tmp_path, jsonl=True)
    pa, pb = sana.read_image_folder(a), sana.read_image_folder(b)
    assert [c for _, c in pa] == [c for _, c in pb] == caps
    from PIL import Image
    Image.new("RGB", (120, 60), (255, 0, 0)).save(tmp_path / "wide.png")
    x = sana.load_training_image(str(tmp_path / "wide.png"), 64)
    assert x.shape == (3, 64, 64) and torch.allclose(x[0], torch.ones(64, 64), atol=0.01)


@committed(*TINY)
def test_lora_finetune_learns_and_loads(tmp_path, capsys):
    """`--train --data` on 8 outlined scenes: the LoRA lowers the loss on them (fixed noise and times), only the
    LoRA trains, the file loads back with --lora, and it changes the image."""
    folder, caps = style_folder(tmp_path)
    out = str(tmp_path / "style.safetensors")
    sana.main(["--train", "--data", folder, "--lora-rank", "8", "--train-steps", "40", "--train-out", out])
    assert "fine-tune step 40/40" in capsys.readouterr().out
    pipe = sana.load_tiny()
    x = torch.stack([sana.load_training_image(p, 64) for p, _ in sana.read_image_folder(folder)])
    with torch.no_grad():
        z = pipe.vae.encode(x) * pipe.vae_scale
        y, mask = sana.encode_prompts(pipe.text_encoder, pipe.tokenizer, caps, pipe.max_len, None)
        g = torch.Generator().manual_seed(0)
        sigma, eps = torch.rand(4, len(z), generator=g) * 0.8 + 0.1, torch.randn(4, *z.shape, generator=g)

        def loss(model):
            return sum(torch.nn.functional.mse_loss(model((1 - s[:, None, None, None]) * z + s[:, None, None, None] * e,
                                                          1000 * s, y, mask), e - z) for s, e in zip(sigma, eps))
        before = loss(pipe.transformer)
        image = pipe.generate([caps[0]], 64, 64, generator=torch.Generator().manual_seed(0))
        sana.apply_lora(pipe.transformer, sana.read_lora(out), 1.0, out)
        after = loss(pipe.transformer)
        assert after < 0.97 * before, (before, after)
        adapted = pipe.generate([caps[0]], 64, 64, generator=torch.Generator().manual_seed(0))
    assert (image.float() - adapted.float()).abs().mean() > 1
    assert all(".lora_" in k for k in load_file(out))
    sana.main(["--prompt", caps[0], "--lora", out, "--lora-scale", "0.5", "--out", str(tmp_path / "a.png")])
    assert os.path.isfile(tmp_path / "a.png")


def test_lora_step_bytes():
    """The memory estimate counts the frozen weights, 16 bytes per LoRA parameter and activations that grow with
    the batch."""
    cfg = sana.PRESETS["tiny"]
    one, two = (sana.lora_step_bytes(cfg, 64, 64, torch.float32, rank=8, batch=b, text_len=10, f=8) for b in (1, 2))
    model = sana.SanaTransformer(cfg)
    assert one["weights"] == 4 * sum(p.numel() for p in model.parameters())
    assert one["lora"] == 16 * cfg.depth * 6 * 8 * 2 * cfg.hidden_size  # q, k, v of 2 attentions, (r, D) + (D, r)
    assert 1.8 * one["activations"] < two["activations"] < 2.2 * one["activations"]


def test_gradient_checkpointing_gives_the_same_gradients_and_saves_memory():
    """Checkpointed blocks rerun in the backward pass: the LoRA's gradients are those of a plain step; and the forward
    does checkpoint (the estimate for Sana_1600M at 1024 px, which counts what autograd saves outside the blocks,
    drops below a fifth; a forward that ignored the flag would let the hooks see every block's tensors)."""
    torch.manual_seed(0)
    model = sana.initialize_weights(sana.SanaTransformer(sana.PRESETS["tiny"]))
    params = sana.add_lora(model, sana.TINY_LORA_TARGETS, rank=4, alpha=4.0)
    for p in params:  # lora_B starts at 0 (the LoRA is off): give it weights so that every gradient flows
        torch.nn.init.normal_(p, std=0.02)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 700.0]), torch.randn(2, 10, model.cfg.caption_channels)
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        model(x, t, y).square().mean().backward()
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    cfg = sana.PRESETS["Sana_1600M_1024px"]
    plain, ckpt = (sana.lora_step_bytes(cfg, 1024, 1024, checkpointing=c)["activations"] for c in (False, True))
    assert ckpt < plain / 5, (plain, ckpt)


def test_lora_finetune_of_a_published_pipeline_folder(tmp_path, capsys):
    """--ckpt FOLDER --train --data DIR (diffusers' recipe, here with gradient checkpointing) writes a LoRA only for
    the folder's transformer, which --ckpt FOLDER --lora reads back and which changes the model's output."""
    folder = make_pipeline_folder(tmp_path)
    data, caps = style_folder(tmp_path, n=4)
    out = str(tmp_path / "mine.safetensors")
    sana.main(["--ckpt", folder, "--train", "--data", data, "--train-steps", "3", "--gradient-checkpointing",
               "--device", "cpu", "--dtype", "float32", "--train-out", out])
    assert "fine-tune step 3/3" in capsys.readouterr().out
    layers = sana.read_lora(out)
    pipe = sana.load_pipeline(folder)
    assert set(layers) == set(sana.lora_targets(pipe.transformer, sana.LORA_TARGETS))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    before = pipe.generate([caps[0]], 16, 16, 2, 4.5, g())
    sana.apply_lora(pipe.transformer, layers, 1.0, out)
    assert not torch.equal(before, pipe.generate([caps[0]], 16, 16, 2, 4.5, g()))
    sana.main(["--ckpt", folder, "--prompt", caps[0], "--lora", out, "--steps", "2", "--device", "cpu",
               "--out", str(tmp_path / "a.png")])
    assert os.path.isfile(tmp_path / "a.png")
