"""The Dream parity fixtures of tests/fixtures/fast_dllm/, made by running the OFFICIAL NVlabs/Fast-dLLM Dream code:

    python scripts/make_dream_fixture.py --official /path/to/Fast-dLLM [--commit HASH]

dream_tiny_a/               2 layers, hidden 64, GQA 4 heads / 2 KV heads, vocab 384; float32 weights in one
                            model.safetensors; prompt 10, 32 new tokens in blocks of 8
dream_tiny_b_bf16_sharded/  3 layers, hidden 96, 6 heads / 2 KV heads, vocab 512; bf16 weights in 2 shards + index
                            (the published Dream-v0-7B layout), upcast to float32 to run; prompt 7, 24 new tokens in
                            one block of 24

dream_tokenizer/            a small byte-level BPE in Dream's slow-tokenizer files (vocab.json, merges.txt,
                            tokenizer_config.json) and expected.json: texts and the ids the official DreamTokenizer
                            gives them

Each checkpoint folder is a Hugging Face checkpoint (config.json, generation_config.json, weights under the published key names)
plus io.safetensors (inputs and the official outputs), runs.json (every official call with all its arguments; the
tests read every parameter from there) and a README.md documenting each tensor and run.

--official is a work tree of https://github.com/NVlabs/Fast-dLLM: this script imports its dream/model package and
calls it (nothing of it is copied here). The commit is read with `git -C <official> rev-parse HEAD`; for a tree
without .git (e.g. one extracted with `git archive`) pass it with --commit. The official code needs
transformers==4.49.0 (what Fast-dLLM's requirements.txt pins) besides torch, safetensors and numpy. These are not
requirements of this project, so run the script from a separate environment, e.g.

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch transformers==4.49.0 safetensors numpy
    /tmp/refvenv/bin/python scripts/make_dream_fixture.py --official /tmp/Fast-dLLM \
        --commit 24cc59e75f20a6384bae8c905965bb090b96388e

Everything runs on the CPU (one thread) in float32 with batch size 1, temperature 0 and fixed seeds, in a few seconds;
a rerun with the same versions rewrites the same data.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import types

import torch
from safetensors.torch import save_file

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "fast_dllm")
MANIFEST_CONFIG = os.path.join(FIXTURES, "manifests", "dream_v0_7b_config_assumed.json")
TRANSFORMERS_VERSION = "4.49.0"  # pinned by Fast-dLLM's requirements.txt
EPS = 1e-3  # DreamGenerationConfig's default eps, passed explicitly so that runs.json holds every parameter
LINEAR_STD = 0.02  # std of the random linear weights and biases ...
QK_STD = 0.3  # ... except q/k projections: larger, so attention is sharp and depends on (RoPE) positions and the cache


@dataclasses.dataclass
class Case:
    name: str
    seed: int  # seeds the weights; seed + 1 seeds the prompt and the other random inputs
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    mask_token_id: int
    special_token_id: int  # bos = eos = pad, as in the published config
    prompt_length: int  # P
    gen_length: int  # G
    block_length: int
    storage_dtype: torch.dtype  # how the weights are stored; the model always runs in float32
    num_shards: int
    lm_head_scale: float  # makes the softmax confident enough (0.1 .. 0.99) for the thresholds to matter


# seeds and head scales chosen so that threshold 0.9 both commits several tokens in one forward and rejects some, and
# maskgit_plus and topk_margin pick differently
CASES = [
    Case("dream_tiny_a", seed=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         intermediate_size=160, vocab_size=384, mask_token_id=377, special_token_id=375, prompt_length=10,
         gen_length=32, block_length=8, storage_dtype=torch.float32, num_shards=1, lm_head_scale=40.0),
    Case("dream_tiny_b_bf16_sharded", seed=4, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
         num_key_value_heads=2, intermediate_size=256, vocab_size=512, mask_token_id=500, special_token_id=498,
         prompt_length=7, gen_length=24, block_length=24, storage_dtype=torch.bfloat16, num_shards=2,
         lm_head_scale=30.0),
]


def upstream_commit(official, commit_arg):
    """The Fast-dLLM commit of the work tree: from git when it is a checkout, else --commit, else refuse."""
    def git(*args):
        done = subprocess.run(["git", "-C", official, *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    # trust git only when `official` is the top of a checkout, not a folder inside some other repository
    top = git("rev-parse", "--show-toplevel")
    from_git = git("rev-parse", "HEAD") if top and os.path.samefile(top, official) else None
    if from_git and commit_arg and not from_git.startswith(commit_arg):
        sys.exit(f"--commit {commit_arg} disagrees with {official}'s HEAD {from_git}")
    if from_git:
        return from_git
    if not commit_arg or len(commit_arg) != 40:
        sys.exit(f"{official} is not a git checkout: pass the full hash of the Fast-dLLM commit it was extracted from "
                 "with --commit")
    return commit_arg


def import_official(official):
    """The official Dream package (Fast-dLLM/dream/model), imported as `model` as dream/eval.py imports it."""
    import transformers
    if transformers.__version__ != TRANSFORMERS_VERSION:
        sys.exit(f"the official Dream code is pinned to transformers=={TRANSFORMERS_VERSION}, "
                 f"found {transformers.__version__}")
    sys.path.insert(0, os.path.join(official, "dream"))
    from model import DreamConfig, DreamModel, generation_utils, generation_utils_block
    modules = {"generation_utils": generation_utils, "generation_utils_block": generation_utils_block}
    return DreamConfig, DreamModel, modules


def config_dict(case):
    """Every key of the (assumed) published Dream-v0-7B config.json, with the tiny sizes substituted."""
    with open(MANIFEST_CONFIG) as f:
        published = json.load(f)
    tiny = dict(published, hidden_size=case.hidden_size, num_hidden_layers=case.num_hidden_layers,
                max_window_layers=case.num_hidden_layers, num_attention_heads=case.num_attention_heads,
                num_key_value_heads=case.num_key_value_heads, intermediate_size=case.intermediate_size,
                vocab_size=case.vocab_size, mask_token_id=case.mask_token_id, bos_token_id=case.special_token_id,
                eos_token_id=case.special_token_id, pad_token_id=case.special_token_id, max_position_embeddings=512,
                rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                torch_dtype=str(case.storage_dtype).removeprefix("torch."))
    assert tiny.keys() == published.keys()
    return tiny


def random_weights(case, keys_and_shapes):
    """Seeded random weights under the published key names (the official DreamModel's state_dict keys)."""
    gen = torch.Generator().manual_seed(case.seed)
    weights = {}
    for key, shape in keys_and_shapes:
        noise = torch.randn(shape, generator=gen)
        if key.endswith("norm.weight"):
            weights[key] = 1 + 0.1 * noise
        elif ".q_proj." in key or ".k_proj." in key:
            weights[key] = QK_STD * noise
        else:
            weights[key] = LINEAR_STD * noise
    weights["lm_head.weight"] *= case.lm_head_scale
    # random heads can rank the mask id first; the official threshold loops would then never finish
    weights["lm_head.weight"][case.mask_token_id] = 0
    return weights


def write_checkpoint(case, folder, config, weights):
    """config.json, generation_config.json and the weights in case.storage_dtype, in one file or in shards with an
    index like the published one. Returns the stored tensors."""
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    # the official DreamModel.from_pretrained (what dream/eval.py calls) refuses a folder without this file
    special = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id")}
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(special, f, indent=2, sort_keys=True)
        f.write("\n")
    stored = {key: value.to(case.storage_dtype).contiguous() for key, value in weights.items()}
    if case.num_shards == 1:
        save_file(stored, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return stored
    names = [f"model-{i + 1:05d}-of-{case.num_shards:05d}.safetensors" for i in range(case.num_shards)]
    weight_map = {key: names[i % case.num_shards] for i, key in enumerate(sorted(stored))}
    for name in names:
        shard = {key: value for key, value in stored.items() if weight_map[key] == name}
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
    total_size = sum(value.numel() * value.element_size() for value in stored.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
    return stored


def load_official(DreamModel, folder, dtype, stored):
    """DreamModel.from_pretrained as dream/eval.py calls it, checked to hold exactly the stored tensors: no missing,
    unexpected or freshly initialised weights (the official from_pretrained override breaks output_loading_info)."""
    model = DreamModel.from_pretrained(folder, torch_dtype=dtype).eval()
    loaded = model.state_dict()
    assert loaded.keys() == stored.keys(), f"{folder}: keys differ from DreamModel's"
    assert all(torch.equal(loaded[key], value.to(dtype)) for key, value in stored.items()), f"{folder}: not loaded"
    return model


class ForwardLog:
    """Counts the model's forward calls during a sampler run and keeps, per call, the absolute position its input
    starts at and the input ids (the samplers call the model on the full sequence, on x[:, s:] with a prefix cache,
    or on x[:, s:e] with a dual cache, where replace_position marks [s, e))."""

    def __init__(self, model, seq_len, max_calls):
        self.model, self.seq_len, self.max_calls = model, seq_len, max_calls
        self.calls = []

    def __enter__(self):
        forward = self.model.forward

        def logged(*args, **kwargs):
            input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            replace = kwargs.get("replace_position")
            start = int(replace[0].nonzero()[0]) if replace is not None else self.seq_len - input_ids.shape[1]
            self.calls.append((start, input_ids[0].clone()))
            if len(self.calls) > self.max_calls:  # e.g. a loop that keeps committing the mask id
                raise RuntimeError(f"more than {self.max_calls} forward calls: the sampler does not finish")
            return forward(*args, **kwargs)

        self.model.forward = logged  # an instance attribute shadows DreamModel.forward for nn.Module.__call__
        return self

    def __exit__(self, *exc):
        del self.model.forward

    def step_of_pos(self, prompt_length, gen_length, mask_id):
        """For each answer position, the index of the forward call whose prediction committed it: the last call
        whose input still shows that position masked (every later input that covers it shows the committed id)."""
        steps = torch.full((gen_length,), -1, dtype=torch.int64)
        for k, (start, ids) in enumerate(self.calls):
            masked = (ids == mask_id).nonzero()[:, 0] + start - prompt_length
            steps[masked[masked >= 0]] = k
        assert (steps >= 0).all(), "an answer position was never masked in any forward input"
        return steps


def run_sampler(model, module, prompt_ids, kwargs):
    """One official diffusion_generate call, bound to the model the way dream/eval.py binds it."""
    model.diffusion_generate = types.MethodType(module.DreamGenerationMixin.diffusion_generate, model)
    model._sample = types.MethodType(module.DreamGenerationMixin._sample, model)
    seq_len = prompt_ids.shape[1] + kwargs["max_new_tokens"]
    # the baseline sampler prints its step count and wall time: keep them out of the log
    with ForwardLog(model, seq_len, max_calls=4 * seq_len) as log, contextlib.redirect_stdout(io.StringIO()):
        out = model.diffusion_generate(prompt_ids, attention_mask=None, output_history=False,
                                       return_dict_in_generate=True, **kwargs).sequences
    return out.clone(), log


def sampler_runs(case):
    """NAME -> (module, diffusion_generate kwargs) for every recorded run, with eval_gsm8k.sh's step counts."""
    G, num_blocks = case.gen_length, case.gen_length // case.block_length
    # threshold runs: steps = number of blocks, as in eval_gsm8k.sh; the baseline asserts that the number of masks is
    # divisible by steps, and with a single block steps=1 would leave its step logic untested, so it takes 4 there
    baseline_thr_steps = num_blocks if num_blocks > 1 else 4
    common = dict(max_new_tokens=G, temperature=0.0, top_p=None, top_k=None, alg_temp=0.0, eps=EPS)
    runs = {
        "baseline_entropy": ("generation_utils", dict(steps=G // 2, alg="entropy", threshold=None)),
        "baseline_maskgit_plus": ("generation_utils", dict(steps=G // 2, alg="maskgit_plus", threshold=None)),
        "baseline_topk_margin": ("generation_utils", dict(steps=G // 2, alg="topk_margin", threshold=None)),
        f"baseline_entropy_steps{G}": ("generation_utils", dict(steps=G, alg="entropy", threshold=None)),
    }
    for threshold in (0.9, 0.6):
        runs[f"baseline_thr{threshold}"] = (
            "generation_utils", dict(steps=baseline_thr_steps, alg="confidence_threshold", threshold=threshold))
    for cache, dual in (("prefix", False), ("dual", True)):
        blocks = dict(block_length=case.block_length, dual_cache=dual)
        runs[f"{cache}_entropy"] = (
            "generation_utils_block", dict(steps=G // 2, alg="entropy", threshold=None, **blocks))
        for threshold in (0.9, 0.6):
            runs[f"{cache}_thr{threshold}"] = (
                "generation_utils_block",
                dict(steps=num_blocks, alg="confidence_threshold", threshold=threshold, **blocks))
    return {name: (module, dict(common, **kwargs)) for name, (module, kwargs) in runs.items()}


def record_runs(case, model, model64, modules, prompt_ids):
    """Every sampler run: twice in float32 (must agree exactly) and once in float64 (tokens must agree).
    Returns the io.safetensors entries and the runs.json entries."""
    P, G, mask_id = case.prompt_length, case.gen_length, case.mask_token_id
    tensors, runs = {}, {}
    for name, (module_name, kwargs) in sampler_runs(case).items():
        module = modules[module_name]
        out, log = run_sampler(model, module, prompt_ids, kwargs)
        again, log_again = run_sampler(model, module, prompt_ids, kwargs)
        out64, _ = run_sampler(model64, module, prompt_ids, kwargs)
        step_of_pos = log.step_of_pos(P, G, mask_id)
        assert torch.equal(out, again) and torch.equal(step_of_pos, log_again.step_of_pos(P, G, mask_id)) \
            and len(log.calls) == len(log_again.calls), f"{name} is not deterministic"
        assert torch.equal(out, out64), f"{name}: float64 gives other tokens"
        assert torch.equal(out[:, :P], prompt_ids) and not (out == mask_id).any(), f"{name} left or wrote a mask id"
        per_forward = torch.bincount(step_of_pos, minlength=len(log.calls))
        if module_name == "generation_utils_block":  # each block-start (full-sequence) forward commits one token:
            block_starts = [k for k, (start, ids) in enumerate(log.calls) if len(ids) == P + G]
            firsts = range(0, G, case.block_length)  # the block's first position
            assert [step_of_pos[f].item() for f in firsts] == block_starts and per_forward[block_starts].eq(1).all()
        tensors[f"out/{name}"] = out
        tensors[f"ncalls/{name}"] = torch.tensor([len(log.calls)])
        tensors[f"step_of_pos/{name}"] = step_of_pos
        runs[name] = {"module": module_name, "kwargs": kwargs, "forward_calls": len(log.calls),
                      "max_tokens_unmasked_in_one_forward": per_forward.max().item(),
                      "masks_left_in_output": int((out[:, P:] == mask_id).sum())}
        if kwargs["threshold"] == 0.9:  # must both commit in parallel and reject: more forwards than if all passed
            assert runs[name]["max_tokens_unmasked_in_one_forward"] > 1, f"{name}: no parallel commit"
            all_pass = kwargs["steps"] * (2 if module_name == "generation_utils_block" else 1)
            assert len(log.calls) > all_pass, f"{name}: the threshold never rejected a token"
    return tensors, runs


def cache_logits(model, x_prev, x_state, s, e):
    """The two cached forwards of the block sampler, on a cache built from x_prev and queried with x_state:
    prefix cache (positions [:s], input x_state[:, s:]) and dual cache (all positions, input x_state[:, s:e])."""
    prefix_cache = [tuple(kv[:, :s] for kv in layer) for layer in model(x_prev, use_cache=True).past_key_values]
    prefix = model(x_state[:, s:], past_key_values=prefix_cache, use_cache=True).logits
    replace = torch.zeros_like(x_prev, dtype=torch.bool)
    replace[:, s:e] = True
    full_cache = model(x_prev, use_cache=True).past_key_values  # fresh: the dual path writes into it in place
    dual = model(x_state[:, s:e], past_key_values=full_cache, use_cache=True, dual_cache=True,
                 replace_position=replace).logits
    return prefix, dual


def record_cache(case, model, generated, gen):
    """Cache isolation: a cache built from x_prev (the state at the start of block [s, e): `generated` before s,
    masks from s on) and queried with x_state (x_prev with about half of the block filled in from `generated`).
    Case a uses its second block; a single-block case the whole answer."""
    P, mask_id = case.prompt_length, case.mask_token_id
    s = P + case.block_length if case.gen_length > case.block_length else P
    e = s + case.block_length
    x_prev = generated.clone()
    x_prev[:, s:] = mask_id
    x_state = x_prev.clone()
    half = s + torch.randperm(e - s, generator=gen)[:(e - s) // 2]
    x_state[:, half] = generated[:, half]
    with torch.no_grad():
        # check of the cached calls themselves: queried with x_prev, both must reproduce the uncached logits
        full = model(x_prev).logits
        prefix, dual = cache_logits(model, x_prev, x_prev, s, e)
        assert torch.allclose(prefix, full[:, s:], atol=1e-5) and torch.allclose(dual, full[:, s:e], atol=1e-5)
        prefix, dual = cache_logits(model, x_prev, x_state, s, e)
    return {"cache_x_prev": x_prev, "cache_x_state": x_state, "cache_block_start": torch.tensor([s]),
            "cache_block_end": torch.tensor([e]), "cache_prefix_logits": prefix, "cache_dual_logits": dual}


def make_case(case, DreamConfig, DreamModel, modules, commit):
    folder = os.path.join(FIXTURES, case.name)
    os.makedirs(folder, exist_ok=True)
    P, G, mask_id = case.prompt_length, case.gen_length, case.mask_token_id
    config = config_dict(case)

    # weights: keys and shapes from the official model itself, written to disk, loaded back the official way
    with torch.device("meta"):
        keys_and_shapes = [(k, v.shape) for k, v in DreamModel(DreamConfig(**config)).state_dict().items()]
    stored = write_checkpoint(case, folder, config, random_weights(case, keys_and_shapes))
    model = load_official(DreamModel, folder, torch.float32, stored)
    model64 = load_official(DreamModel, folder, torch.float64, stored)

    # random inputs below the special ids (never bos/eos/pad or mask)
    gen = torch.Generator().manual_seed(case.seed + 1)
    prompt_ids = torch.randint(0, case.special_token_id, (1, P), generator=gen)
    answer = torch.randint(0, case.special_token_id, (1, G), generator=gen)
    answer[torch.rand(1, G, generator=gen) < 0.6] = mask_id
    logits_input_ids = torch.cat([prompt_ids, answer], dim=1)
    with torch.no_grad():
        logits = model(logits_input_ids).logits
        logits_diff64 = (model64(logits_input_ids).logits - logits).abs().max().item()
    tensors = {"prompt_ids": prompt_ids, "logits_input_ids": logits_input_ids, "logits": logits}

    run_tensors, runs = record_runs(case, model, model64, modules, prompt_ids)
    tensors.update(run_tensors)
    tensors.update(record_cache(case, model, tensors["out/prefix_entropy"], gen))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "io.safetensors"))

    import transformers
    record = {"case": case.name,
              "upstream": {"repo": "NVlabs/Fast-dLLM", "commit": commit, "transformers": transformers.__version__,
                           "torch": torch.__version__},
              "seed_weights": case.seed, "seed_inputs": case.seed + 1, "P": P, "G": G,
              "block_length": case.block_length, "mask_id": mask_id, "storage_dtype": config["torch_dtype"],
              "compute_dtype": "float32", "lm_head_scale": case.lm_head_scale,
              "checks": {"deterministic_twice": True, "float64_tokens_identical": True,
                         "logits_max_abs_diff_float64": logits_diff64},
              "runs": runs}
    with open(os.path.join(folder, "runs.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(readme(case, record, tensors, config))
    return record


# what the official code does that an implementation must reproduce; each point was checked by running it
NOTES = [
    "- Shifted logits: both samplers read the prediction for position i from output row i-1 "
    "(`torch.cat([logits[:, :1], logits[:, :-1]], 1)`, row 0 duplicated). In the cached forwards the shift is "
    "applied to the slice, so the block's first position would read its own row; it never matters, as row 0 of a "
    "full forward predicts a prompt position and the block start is committed before any cached forward. `logits` "
    "above is the raw, unshifted output.",
    "- The modified modeling file ignores `position_ids` (and the samplers' `tok_idx`): positions are always 0..L-1 "
    "(with a prefix cache of length s the new tokens get s.., with a dual cache the block gets s..e-1).",
    "- The KV cache is a list over layers of (k, v), each [B, L, kv_dim], stored before RoPE; RoPE is applied to all "
    "keys at every forward. The dual-cache path writes the block's new k/v into the given cache tensors in place.",
    "- Softmax confidences are computed in the model dtype (float32 here), not float64.",
    "- `generation_utils` (no cache, no blocks): entropy / maskgit_plus / topk_margin use timesteps "
    "`linspace(1, eps, steps+1)` from i=0 and commit `int(n * (1 - s/t))` of the n masked positions at step i (all "
    "that are left at the last step), chosen by top-k of the confidence (negative entropy, top-1 probability, "
    "top1 - top2 margin) over the whole answer. `confidence_threshold` asserts masks % steps == 0; each step has a "
    "quota of masks/steps plus the tokens rejected in the step before, keeps the top-1 and rejects every other "
    "candidate with confidence < threshold; a rejection on the last step adds one more step (whose quota is the "
    "rejected count), so forward calls can exceed `steps`.",
    "- `generation_utils_block` (Fast-dLLM, always cached): per block, one full-sequence forward (builds the cache and "
    "commits exactly the block's first position, greedily, whatever the alg), then a while loop of cached forwards "
    "(prefix: input x[:, s:], cache cut to [:s]; dual: input x[:, s:e], full cache + replace_position) that always "
    "runs at least once and stops when the block has no mask left. `confidence_threshold`: within the block, keep "
    "the top-1 and every other masked position with confidence >= threshold. Any other alg (also maskgit_plus, "
    "topk_margin, origin) is treated as entropy: timesteps `linspace(1, eps, steps_per_block+1)`, the loop starts at "
    "i=1, commits `int(n * (1 - s/t))` of the block's n masks and all that are left at i = steps_per_block-1, so a "
    "block costs steps_per_block forwards; with steps_per_block = 1 the loop breaks before committing anything and "
    "leaves the block masked (such runs are not recorded).",
    "- The block sampler's `block_length` defaults to 32 and `dream/eval.py` does not pass it; these runs pass it.",
    "- The samplers take mask/special ids from config.json (`DreamGenerationConfig.from_model_config`), not from "
    "generation_config.json.",
]


def readme(case, record, tensors, config):
    """The case's README.md: provenance, checkpoint layout, every tensor of io.safetensors, every run, notes."""
    P, G, V = case.prompt_length, case.gen_length, case.vocab_size
    up, runs = record["upstream"], record["runs"]
    s, e = tensors["cache_block_start"].item(), tensors["cache_block_end"].item()
    if case.num_shards == 1:
        weights = "float32 in a single `model.safetensors`"
    else:
        weights = (f"**bfloat16** in {case.num_shards} shards `model-0000i-of-0000{case.num_shards}.safetensors` + "
                   "`model.safetensors.index.json` (`metadata.total_size`, `weight_map`), the published Dream-v0-7B "
                   "layout; the official runs load them with `torch_dtype=torch.float32` (bf16 values upcast), so "
                   "all compute is float32")
    example = next(iter(runs))

    def shape(key):
        tensor = tensors[key.replace("<run>", example)]
        return f"[{', '.join(map(str, tensor.shape))}] {str(tensor.dtype).removeprefix('torch.')}"

    rows = [
        ("prompt_ids", "prompt fed to every sampler: random ids below the special ids (no bos/eos/pad/mask)"),
        ("logits_input_ids", "prompt + answer of random ids, ~60% of the answer set to the mask id"),
        ("logits", "`model(logits_input_ids).logits`: one plain bidirectional forward, RAW (not shifted)"),
        ("cache_x_prev", f"state at the start of block [s, e) = [{s}, {e}): `out/prefix_entropy` before s, masks "
                         "from s on"),
        ("cache_x_state", "cache_x_prev with about half of the block [s, e) filled in from `out/prefix_entropy`"),
        ("cache_block_start", "s"),
        ("cache_block_end", "e (exclusive)"),
        ("cache_prefix_logits", "pkv = `model(cache_x_prev, use_cache=True).past_key_values` cut to `[:, :s]` on every "
                                "layer (layout [B, L, kv_dim], k and v before RoPE), then `model(cache_x_state[:, s:], "
                                "past_key_values=pkv, use_cache=True).logits` (positions s..L-1)"),
        ("cache_dual_logits", "pkv = a fresh full `model(cache_x_prev, use_cache=True).past_key_values`, "
                              "replace_position = bool [1, L] true on [s, e); `model(cache_x_state[:, s:e], "
                              "past_key_values=pkv, use_cache=True, dual_cache=True, replace_position=...).logits`"),
        ("out/<run>", "`diffusion_generate(...).sequences`: prompt + generated ids"),
        ("ncalls/<run>", "number of model forward calls (counted by wrapping `model.forward`; the Dream samplers "
                         "return no counter of their own)"),
        ("step_of_pos/<run>", "per answer position, the 0-based index of the forward call whose prediction committed "
                              "it (from the inputs of successive calls); `bincount` = tokens committed per forward"),
    ]
    common = ("max_new_tokens", "temperature", "top_p", "top_k", "alg_temp", "eps")
    run_rows = [f"| `{name}` | `{run['module']}` | "
                + ", ".join(f"{k}={v}" for k, v in run["kwargs"].items() if k not in common)
                + f" | {run['forward_calls']} | {run['max_tokens_unmasked_in_one_forward']} |"
                for name, run in runs.items()]
    same_caches = all(torch.equal(tensors[f"out/prefix_{r}"], tensors[f"out/dual_{r}"])
                      and runs[f"prefix_{r}"]["forward_calls"] == runs[f"dual_{r}"]["forward_calls"]
                      for r in ("entropy", "thr0.9", "thr0.6"))
    single_block = (["", "Single block: the prefix cache holds only the prompt and the dual cache replaces the whole "
                     "answer, so here the prefix and dual runs give the same tokens and forward counts."]
                    if same_caches else [])
    lines = [
        f"# Fast-dLLM / Dream parity fixture `{case.name}`",
        "",
        f"Produced by `scripts/make_dream_fixture.py`, which runs the official {up['repo']} Dream code (commit "
        f"`{up['commit']}`, `dream/model/`) on the CPU with torch {up['torch']}, transformers {up['transformers']}, "
        "float32 compute, batch size 1, temperature 0. Rerun from an environment with transformers "
        f"{up['transformers']}: `python scripts/make_dream_fixture.py --official /path/to/Fast-dLLM --commit "
        f"{up['commit']}`.",
        "",
        "## Checkpoint directory",
        "",
        f"- `config.json`: every key of `../manifests/dream_v0_7b_config_assumed.json` with tiny values: "
        f"hidden_size={case.hidden_size}, num_hidden_layers={case.num_hidden_layers}, num_attention_heads="
        f"{case.num_attention_heads}, num_key_value_heads={case.num_key_value_heads} (head_dim "
        f"{case.hidden_size // case.num_attention_heads}), intermediate_size={case.intermediate_size}, vocab_size={V}, "
        f"mask_token_id={case.mask_token_id}, bos/eos/pad={case.special_token_id}, rope_theta={config['rope_theta']}, "
        f"rms_norm_eps={config['rms_norm_eps']}, max_position_embeddings={config['max_position_embeddings']}, "
        f"tie_word_embeddings=false, torch_dtype={config['torch_dtype']}.",
        "- `generation_config.json`: the special ids only; the official `DreamModel.from_pretrained` refuses a folder "
        "without one.",
        f"- Weights: {weights}.",
        "- Keys are exactly the official `DreamModel.state_dict()` keys, i.e. the published names "
        "(`model.embed_tokens.weight`, `model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}`, "
        "`model.layers.{i}.self_attn.o_proj.weight`, `model.layers.{i}.mlp.{gate,up,down}_proj.weight`, "
        "`model.layers.{i}.{input,post_attention}_layernorm.weight`, `model.norm.weight`, `lm_head.weight`); no rotary "
        "buffers. The model loaded with `DreamModel.from_pretrained(dir, torch_dtype=torch.float32)` holds exactly "
        "these tensors, key for key (no missing or unexpected keys).",
        f"- Random weights (seed {case.seed}): linears and biases N(0, {LINEAR_STD}), except the q/k projections and "
        f"their biases, N(0, {QK_STD}), so that attention is sharp and position (RoPE) and cache errors show; norm "
        f"weights 1 + 0.1·N(0, 1); `lm_head` scaled by {case.lm_head_scale} so that confidences span roughly 0.1-0.99 "
        "and the thresholds trigger both parallel commits and rejections; the mask id's `lm_head` row is zero so that "
        "it is never predicted. The generated ids are meaningless (often repetitive) but deterministic.",
        "",
        "## io.safetensors",
        "",
        f"P={P}, G={G} (max_new_tokens), block_length={case.block_length}, mask id {case.mask_token_id}, vocab {V}.",
        "",
        "| key | shape / dtype | what produced it |",
        "|---|---|---|",
        *[f"| `{key}` | {shape(key)} | {text} |" for key, text in rows],
        "",
        "## Sampler runs",
        "",
        "Each is one call, bound as `dream/eval.py` binds it (`model.diffusion_generate = types.MethodType("
        "<module>.DreamGenerationMixin.diffusion_generate, model)` and the same for `_sample`): "
        "`model.diffusion_generate(prompt_ids, attention_mask=None, output_history=False, "
        "return_dict_in_generate=True, **kwargs).sequences` with the kwargs of `runs.json`; besides those in the table "
        f"every run passes max_new_tokens={G}, temperature=0.0, top_p=None, top_k=None, alg_temp=0.0, eps={EPS}. Every "
        "run was executed twice with identical outputs and forward calls, and once more with the model in float64 "
        "with identical tokens. No output contains the mask id.",
        "",
        "| run | module | kwargs (besides the common ones) | forward calls | max tokens committed by one forward |",
        "|---|---|---|---|---|",
        *run_rows,
        *single_block,
        "",
        "## Behaviours of the official code that matter for parity",
        "",
        *NOTES,
        "",
        "These points were checked against the official code at the commit above: besides direct checks, a separate "
        "replay written from them alone (model forwards only) reproduced every `out/<run>` and `ncalls/<run>` of both "
        "Dream cases exactly.",
        "",
        f"Suggested tolerances: logits atol 5e-4 (|logits| reach {tensors['logits'].abs().max().item():.0f}; the "
        "float64 and float32 runs of the same model differ by up to "
        f"{record['checks']['logits_max_abs_diff_float64']:.1e}); tokens and forward counts exactly.",
        "",
    ]
    return "\n".join(lines)


# The Dream tokenizer: Dream-v0 ships the slow Qwen2 files (vocab.json, merges.txt, tokenizer_config.json) and the
# official tokenization_dream.py. A small byte-level BPE trained here stands in for the 151k-token vocabulary; the
# official DreamTokenizer encodes these texts (chat markup, contractions, digits, whitespace runs, accents to
# normalise, CJK, emoji, special tokens) and fast_dllm.py's tokenizer must give the same ids.
TOKENIZER_TEXTS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 12*7?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "The quick brown fox's 12345 jumps!!\n\n\n  spaced   out\t\ttabs; it'll end.\r\n",
    "Grüße aus Köln — naïve café, 東京タワー, 🙂🚀",
    "Cafe\u0301 is NFC-normalised first",
    "<|mask|><|mask|>x<|endoftext|>",
]
TOKENIZER_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]


def make_tokenizer_case(official, commit):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    sys.path.insert(0, os.path.join(official, "dream"))
    from model.tokenization_dream import DreamTokenizer
    folder = os.path.join(FIXTURES, "dream_tokenizer")
    os.makedirs(folder, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(TOKENIZER_TEXTS[1:3] * 50, trainer)
    bpe.model.save(folder)  # vocab.json, merges.txt
    n = bpe.get_vocab_size()
    added = {str(n + i): dict(content=t, lstrip=False, rstrip=False, normalized=False, single_word=False, special=True)
             for i, t in enumerate(TOKENIZER_SPECIALS)}
    config = dict(added_tokens_decoder=added, bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                  unk_token="<|endoftext|>", errors="replace", clean_up_tokenization_spaces=False,
                  model_max_length=4096, tokenizer_class="DreamTokenizer")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    official_tok = DreamTokenizer.from_pretrained(folder)
    cases = [dict(text=t, ids=official_tok.encode(t, add_special_tokens=False)) for t in TOKENIZER_TEXTS]
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump(dict(upstream=dict(repo="NVlabs/Fast-dLLM", commit=commit, file="dream/model/tokenization_dream.py",
                                     transformers=TRANSFORMERS_VERSION), cases=cases), f, ensure_ascii=False, indent=1)
    print(f"dream_tokenizer: {n} BPE tokens + {len(TOKENIZER_SPECIALS)} special, {len(cases)} texts")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="a work tree of NVlabs/Fast-dLLM")
    parser.add_argument("--commit", help="its commit, needed when it is not a git checkout")
    args = parser.parse_args()
    official = os.path.abspath(args.official)
    commit = upstream_commit(official, args.commit)
    torch.set_num_threads(1)
    DreamConfig, DreamModel, modules = import_official(official)
    for case in CASES:
        record = make_case(case, DreamConfig, DreamModel, modules, commit)
        print(case.name)
        for name, run in record["runs"].items():
            print(f"  {name:26s} forward calls {run['forward_calls']:3d}, "
                  f"max tokens per forward {run['max_tokens_unmasked_in_one_forward']}")
    make_tokenizer_case(official, commit)


if __name__ == "__main__":
    main()
