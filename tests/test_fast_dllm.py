"""Parity tests for fast_dllm.py against the official LLaDA / Fast-dLLM outputs stored in tests/fixtures/fast_dllm/
(every case folder with a runs.json, every run it lists, with the arguments it lists), plus loading errors, the CLI,
and the accuracy of the committed tiny model. Bad input is tested in test_bad_input.py."""
import functools
import json
import os
import shutil
import unicodedata

import pytest
import torch
from conftest import assert_close
from safetensors.torch import load_file, save_file

import fast_dllm as fd

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "fast_dllm")
ALL_CASES = sorted(d for d in os.listdir(FIXTURES) if os.path.exists(os.path.join(FIXTURES, d, "runs.json")))


def family(name):
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        return json.load(f)["model_type"]


CASES = [c for c in ALL_CASES if family(c) == "llada"]
DREAM_CASES = [c for c in ALL_CASES if family(c) == "Dream"]
CACHE_OF = {"generate": "none", "generate_with_prefix_cache": "prefix", "generate_with_dual_cache": "dual"}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread avoids OpenMP spin-waits on a busy 2-core machine (conftest restores)."""
    torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def case(name):
    folder = os.path.join(FIXTURES, name)
    model, _ = fd.load_checkpoint(folder)
    assert isinstance(model, fd.Dream) == (family(name) == "Dream")
    with open(os.path.join(folder, "runs.json")) as f:
        runs = json.load(f)
    return model, load_file(os.path.join(folder, "io.safetensors")), runs


def all_runs(cases):
    out = []
    for c in cases:
        with open(os.path.join(FIXTURES, c, "runs.json")) as f:
            out += [(c, r) for r in json.load(f)["runs"]]
    return out


def expected_nfe(io, runs, run):
    """This file counts forwards like upstream @f6b35ec. The June-2025 cached samplers spend one extra forward when a
    block-start forward already filled the block, so for those runs compare with their @f6b35ec twin (same tokens)."""
    r = runs[run]
    if r["impl"] == "june" and r["function"] != "generate":
        return int(io[f"nfe/{run}@f6b35ec"])
    return int(io[f"ncalls/{run}"])  # == nfe wherever both exist; the original LLaDA sampler has only the call count


def sampler_kwargs(kw, model):
    """A run's recorded arguments -> generate()'s; an argument this test does not know fails it, never ignored."""
    known = {"gen_length", "block_length", "steps", "threshold", "factor", "temperature", "remasking", "cfg_scale",
             "mask_id", "attention_mask"}
    assert set(kw) <= known, f"runs.json has sampler arguments this test does not pass on: {set(kw) - known}"
    assert kw["mask_id"] == model.cfg.mask_token_id
    assert kw.get("attention_mask") is None or kw["attention_mask"].startswith("ones_like("), \
        f"unsupported attention_mask {kw['attention_mask']!r} (generate attends to every position)"
    return dict(gen_length=kw["gen_length"], block_length=kw["block_length"], steps=kw["steps"],
                threshold=kw.get("threshold"), factor=kw.get("factor"), temperature=kw["temperature"],
                remasking=kw["remasking"], guidance=kw.get("cfg_scale", 0.0))


@pytest.mark.parametrize("name", ALL_CASES)
def test_plain_and_cached_forward_logits(name):
    """Both families: a plain forward, and the PrefixCache / DualCache forwards from a stale cache (raw logits)."""
    model, io, _ = case(name)
    logits, _ = model(io["logits_input_ids"])
    assert_close("logits", logits, io["logits"], atol=1e-4, rtol=0)
    s, e = int(io["cache_block_start"]), int(io["cache_block_end"])
    _, kv = model(io["cache_x_prev"])  # the stale cache, built at the start of the block
    prefix_kv = [(k[:, :, :s], v[:, :, :s]) for k, v in kv]
    prefix_logits, _ = model(io["cache_x_state"][:, s:], start=s, past=prefix_kv)
    assert_close("PrefixCache logits", prefix_logits, io["cache_prefix_logits"], atol=1e-4, rtol=0)
    dual_logits, _ = model(io["cache_x_state"][:, s:e], start=s, past=kv)
    assert_close("DualCache logits", dual_logits, io["cache_dual_logits"], atol=1e-4, rtol=0)
    # the approximation is real: the cached logits are not the exact ones
    assert not torch.allclose(dual_logits, model(io["cache_x_state"])[0][:, s:e], atol=1e-4)


@pytest.mark.parametrize("name,run", all_runs(CASES))
def test_sampler_tokens_and_nfe(name, run):
    model, io, runs = case(name)
    r = runs["runs"][run]
    if r["torch_manual_seed_before_call"] is not None:  # RNG-exact runs: Gumbel noise / random remasking
        torch.manual_seed(r["torch_manual_seed_before_call"])
    out, nfe = fd.generate(model, io["prompt_ids"], cache=CACHE_OF[r["function"]], **sampler_kwargs(r["kwargs"], model))
    assert torch.equal(out, io[f"out/{run}"])
    assert nfe == expected_nfe(io, runs["runs"], run)


def dream_sampler_kwargs(kw, model):
    """A Dream run's recorded diffusion_generate arguments -> generate()'s; anything else fails the test."""
    known = {"max_new_tokens", "steps", "temperature", "top_p", "top_k", "alg", "alg_temp", "threshold", "eps",
             "block_length", "dual_cache"}
    assert set(kw) <= known, f"runs.json has sampler arguments this test does not pass on: {set(kw) - known}"
    assert kw["top_p"] is None and kw["top_k"] is None and not kw["alg_temp"], "top-p / top-k / alg_temp: not here"
    threshold = kw["threshold"] if kw["alg"] == "confidence_threshold" else None
    return dict(gen_length=kw["max_new_tokens"], block_length=kw.get("block_length") or kw["max_new_tokens"],
                steps=kw["steps"], threshold=threshold, temperature=kw["temperature"], eps=kw["eps"],
                alg=kw["alg"] if threshold is None else "entropy")


@pytest.mark.parametrize("name,run", all_runs(DREAM_CASES))
def test_dream_sampler_tokens_and_forwards(name, run):
    """Dream's own sampler (generation_utils: cache none) and Fast-dLLM's Dream sampler (generation_utils_block:
    PrefixCache, or DualCache), token for token and forward for forward."""
    model, io, runs = case(name)
    r = runs["runs"][run]
    cache = "none" if r["module"] == "generation_utils" else "dual" if r["kwargs"]["dual_cache"] else "prefix"
    out, nfe = fd.generate(model, io["prompt_ids"], cache=cache, **dream_sampler_kwargs(r["kwargs"], model))
    assert torch.equal(out, io[f"out/{run}"])
    assert nfe == int(io[f"ncalls/{run}"]) == r["forward_calls"]


def batch_rules(dream, num_blocks, gen_length):
    rules = [dict(steps=gen_length // 2), dict(steps=num_blocks, threshold=0.7)]
    return rules if dream else rules + [dict(steps=num_blocks, factor=1.0)]


@pytest.mark.parametrize("name", ALL_CASES)
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_batch_rows_match_single_runs(name, cache):
    """A batch of prompts of four different lengths (left-padded) gives every row exactly the tokens that row gets
    alone, with every sampler and rule, for both families (random weights: no easy margins)."""
    model, io, runs = case(name)
    prompt = io["prompt_ids"][0]
    P = len(prompt)
    prompts = [prompt, prompt[P // 3:], prompt[:P - P // 2], prompt[1:P - 1]]
    G, block = runs["G"], runs["block_length"]
    for rule in batch_rules(isinstance(model, fd.Dream), G // block, G):
        kw = dict(gen_length=G, block_length=block, cache=cache, **rule)
        out, _ = fd.generate(model, prompts, **kw)
        assert out.shape == (4, P + G)
        for row, p in zip(out, prompts):
            alone, _ = fd.generate(model, p[None], **kw)
            assert torch.equal(row[P - len(p):], alone[0]), (kw, len(p))
            assert (row[:P - len(p)] == model.cfg.eos_token_id).all(), "left padding with the pad (EOS) id"


@pytest.mark.parametrize("name", CASES)
def test_training_losses(name):
    model, io, runs = case(name)
    mask_id = model.cfg.mask_token_id
    x0, p_mask = io["train/input_ids"], io["train/p_mask"]
    noisy = io["train/noisy_batch"]
    assert torch.equal(noisy == mask_id, io["train/masked_indices"])
    loss = fd.diffusion_loss(model(noisy)[0], x0, noisy, p_mask, mask_id)
    assert loss.item() == pytest.approx(runs["train"]["loss_pretrain"], rel=1e-5)
    noisy, lengths = io["sft/noisy_batch"], io["sft/prompt_lengths"]
    loss = fd.diffusion_loss(model(noisy)[0], x0, noisy, p_mask, mask_id, prompt_lengths=lengths)
    assert loss.item() == pytest.approx(runs["train"]["loss_sft"], rel=1e-5)


def test_forward_process_masks_at_rate_p_and_keeps_prompt():
    torch.manual_seed(0)
    B, L, mask_id = 64, 4000, 99
    x0 = torch.randint(0, 10, (B, L))
    lengths = torch.randint(0, L // 2, (B,))
    noisy, p_mask = fd.forward_process(x0, mask_id, prompt_lengths=lengths)
    assert torch.equal(p_mask, p_mask[:, :1].expand(B, L)), "one masking rate per sequence"
    p = p_mask[:, 0]
    assert (p >= 1e-3).all() and (p <= 1).all() and p.std() > 0.2, "p = (1 - eps) t + eps with t ~ U(0, 1)"
    is_prompt = torch.arange(L)[None] < lengths[:, None]
    assert torch.equal(noisy[is_prompt], x0[is_prompt]), "the prompt is never masked"
    assert ((noisy == mask_id) | (noisy == x0)).all()
    answer = (~is_prompt).sum(1)
    frac = ((noisy == mask_id) & ~is_prompt).sum(1) / answer  # masked fraction of each answer
    sigma = (p * (1 - p) / answer).sqrt()
    assert ((frac - p).abs() <= 5 * sigma + 1e-3).all(), (frac - p).abs().max()


@pytest.mark.parametrize("config,shapes,presets", [
    ("llada_8b_config.json", "llada_8b_state_dict_shapes.json", ("LLaDA-8B-Instruct", "LLaDA-8B-Base")),
    ("dream_v0_7b_config_assumed.json", "dream_v0_7b_state_dict_shapes.json",
     ("Dream-v0-Instruct-7B", "Dream-v0-Base-7B"))])
def test_full_size_model_matches_published_manifest(config, shapes, presets):
    with open(os.path.join(FIXTURES, "manifests", shapes)) as f:
        manifest = json.load(f)
    cfg = fd.config_from_json(os.path.join(FIXTURES, "manifests", config))
    assert all(cfg == fd.PRESETS[p] for p in presets)
    with torch.device("meta"):
        model = fd.build_model(cfg)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest


def test_loading_errors(tmp_path):
    src = os.path.join(FIXTURES, CASES[0])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fd.load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        fd.load_checkpoint(str(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match="'qwen2' checkpoint, not LLaDA or Dream"):
        fd.load_checkpoint(str(other))
    (other / "config.json").write_text(json.dumps({"model_type": "Dream", "hidden_size": 64}))
    with pytest.raises(ValueError, match="has no 'num_hidden_layers': not a complete Dream config"):
        fd.load_checkpoint(str(other))
    # a state dict with one key missing and one extra: both named in the error
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(os.path.join(src, "config.json"), broken / "config.json")
    sd = load_file(os.path.join(src, "model.safetensors"))
    sd["model.transformer.blocks.9.q_proj.weight"] = sd.pop("model.transformer.blocks.1.up_proj.weight")
    save_file(sd, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing: model.transformer.blocks.1.up_proj.weight; "
                                         r"1 unexpected: model.transformer.blocks.9.q_proj.weight"):
        fd.load_checkpoint(str(broken))


def test_loads_in_the_dtype_asked():
    """A bf16 sharded checkpoint loads in float32 by default and in bfloat16 when asked, by name too."""
    sharded = [c for c in ALL_CASES if os.path.exists(os.path.join(FIXTURES, c, "model.safetensors.index.json"))]
    assert {family(c) for c in sharded} == {"llada", "Dream"}, "a sharded case folder of each family"
    for name in sharded:
        model, _ = fd.load_checkpoint(os.path.join(FIXTURES, name), dtype="bfloat16")
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in case(name)[0].parameters()} == {torch.float32}


def test_sampler_argument_errors():
    model, io, _ = case(CASES[0])
    with pytest.raises(ValueError, match="must be a multiple of block_length"):
        fd.generate(model, io["prompt_ids"], gen_length=30, block_length=8)
    with pytest.raises(ValueError, match="must be a positive multiple of the number of blocks"):
        fd.generate(model, io["prompt_ids"], gen_length=32, block_length=8, steps=6)
    with pytest.raises(ValueError, match="exceeds the model.s maximum sequence length"):
        fd.generate(model, io["prompt_ids"], gen_length=model.cfg.max_sequence_length, block_length=8)


def test_dream_tokenizer_matches_the_official_one():
    """Dream-v0 ships the slow Qwen2 files; load_tokenizer builds the same tokenizer from them (ids of the official
    DreamTokenizer on chat markup, digits, whitespace runs, NFC normalisation, CJK, emoji, special tokens)."""
    folder = os.path.join(FIXTURES, "dream_tokenizer")
    with open(os.path.join(folder, "expected.json"), encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    tok = fd.load_tokenizer(folder)
    assert cases
    for c in cases:
        ids = tok.encode(c["text"], add_special_tokens=False).ids
        assert ids == c["ids"], c["text"]
        assert tok.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", c["text"])


def test_chat_template():
    assert fd.chat_template(" Hi \n") == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                         "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_cli_with_a_checkpoint_folder(tmp_path, capsys, monkeypatch):
    """--ckpt runs a published-layout folder; --model names a preset that replaces its config.json."""
    src = os.path.join(FIXTURES, CASES[0])
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(os.path.join(src, "model.safetensors"), folder / "model.safetensors")
    shutil.copy(os.path.splitext(fd.TINY_WEIGHTS)[0] + "_tokenizer.json", folder / "tokenizer.json")
    monkeypatch.setitem(fd.PRESETS, "case-a", fd.config_from_json(os.path.join(src, "config.json")))
    argv = ["--ckpt", str(folder), "--prompt", "sort 8315", "--gen-length", "16", "--block-length", "8"]
    fd.main(argv + ["--model", "case-a", "--out", str(tmp_path / "a.txt")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("device cpu") and "thread" not in lines[0]  # not the tiny model: threads as they are
    assert "16 forward passes" in lines[2] and (tmp_path / "a.txt").read_text() == lines[1] + "\n"
    with pytest.raises(SystemExit):  # without --model the folder's missing config.json is named
        fd.main(argv)
    assert "has no config.json" in capsys.readouterr().err


def test_cli_with_a_dream_folder(tmp_path, capsys):
    """--ckpt runs a Dream folder as published: config.json names the family, the tokenizer comes from the slow
    files (vocab.json, merges.txt, tokenizer_config.json), the prompt goes through Dream's chat template."""
    folder = tmp_path / "dream"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(FIXTURES, DREAM_CASES[0], name), folder / name)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(FIXTURES, "dream_tokenizer", name), folder / name)
    fd.main(["--ckpt", str(folder), "--prompt", "What is 12*7?", "--gen-length", "16", "--block-length", "8",
             "--cache", "dual", "--steps", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("[4 forward passes")  # 2 blocks x (block-start + 1 cached forward)
    with pytest.raises(SystemExit):  # without the tokenizer files: named before anything loads
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            os.remove(folder / name)
        fd.main(["--ckpt", str(folder), "--prompt", "hi"])
    assert "has no tokenizer.json (nor a vocab.json + merges.txt)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# The committed tiny default


@pytest.mark.parametrize("argv", [[], ["--arch", "llada"], ["--arch", "dream", "--cache", "dual", "--threshold", "0.9"]])
def test_cli_tiny_answers(capsys, argv):
    fd.main(["--prompt", "sort 8315"] + argv)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("device cpu") and "1 thread" in lines[0]
    assert lines[1] == "1358" and "forward passes" in lines[2] and "tokens/s" in lines[2]


def test_cli_train_honours_seed(tmp_path, monkeypatch):
    """`--train --seed 1` trains from seed 1 (what train_tiny(seed=1) gives), writing weights and tokenizer."""
    monkeypatch.setattr(fd, "tiny_accuracy", lambda *a, **k: (0.0, 0, 0))  # the 200-problem evaluation: not here
    fd.main(["--train", "--seed", "1", "--train-steps", "2", "--train-out", str(tmp_path / "cli.safetensors")])
    fd.train_tiny(seed=1, out=str(tmp_path / "py.safetensors"), log=lambda *a: None, steps=2)
    cli, py = load_file(str(tmp_path / "cli.safetensors")), load_file(str(tmp_path / "py.safetensors"))
    assert cli.keys() == py.keys() and all(torch.equal(cli[k], py[k]) for k in cli)
    committed = open(os.path.splitext(fd.TINY_WEIGHTS)[0] + "_tokenizer.json").read()
    assert (tmp_path / "cli_tokenizer.json").read_text() == committed  # written beside the weights


@pytest.mark.parametrize("arch", list(fd.TINY_PRESETS))
@pytest.mark.parametrize("sampler", [dict(gen_length=32, block_length=32),  # baseline, 1 token per forward
                                     dict(gen_length=128, block_length=32, cache="dual", threshold=0.9,
                                          batch_size=16)])
def test_tiny_heldout_accuracy(arch, sampler):
    model, tok = fd.load_tiny(fd.TINY_PRESETS[arch][1])
    assert isinstance(model, fd.Dream) == (arch == "dream")
    problems = fd.heldout_problems(200)[:100]  # half of the 200 held-out problems reported in the README
    assert all(fd.is_heldout(p.split()[1]) for p, _ in problems)
    acc, nfe, _ = fd.tiny_accuracy(model, tok, problems, **sampler)
    assert acc >= 0.9
    if "threshold" in sampler:  # parallel decoding really is parallel: far fewer forwards than tokens
        assert nfe < len(problems) * 128 / 8
