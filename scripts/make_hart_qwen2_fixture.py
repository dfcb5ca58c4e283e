"""The Qwen2 text-encoder parity fixture of tests/fixtures/hart/qwen2_tiny_a/, made with Hugging Face transformers.

HART encodes its prompts with a Qwen2 decoder (Qwen2-1.5B-Instruct) and keeps `hidden_states[-1]` of the base
`Qwen2Model`: causal attention, the last hidden state after the final RMSNorm, for EVERY position (padded ones
included). This script builds a tiny random Qwen2 with the reference classes, saves it the way
`Qwen2ForCausalLM.save_pretrained(folder, safe_serialization=True)` does, and records what `Qwen2Model` returns for:

    in.*   a right-padded batch of 3 rows of 20 token ids (valid lengths 20, 13, 5; pad id 0)
    sys.*  one row laid out like HART's prompt encoding with the LLM system prompt: 6 system-prompt ids (all
           valid) followed by a prompt of 10 slots right-padded after 4 valid ids (length 16)

The folder holds config.json, generation_config.json and model.safetensors (written by save_pretrained),
io.safetensors (inputs and outputs), runs.json (every call with its arguments, seeds, versions and checks) and a
README.md describing every tensor and the padded-position behaviour of the reference (cited from its source).

The reference is transformers 4.42.2, the version HART pins. It is not a requirement of this project, so run the
script from a separate environment:

    python3 -m venv /tmp/qwenref
    /tmp/qwenref/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    /tmp/qwenref/bin/pip install -q "transformers==4.42.2" safetensors numpy
    /tmp/qwenref/bin/python scripts/make_hart_qwen2_fixture.py

Made with torch 2.13.0+cpu, transformers 4.42.2, safetensors 0.8.0, numpy 1.26.4 (Python 3.11). Everything runs on
the CPU, one thread, float32, with fixed seeds, in a few seconds; a rerun with the same versions rewrites the same
data.
"""
import inspect
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model
from transformers.modeling_attn_mask_utils import AttentionMaskConverter
from transformers.models.qwen2 import modeling_qwen2

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "hart", "qwen2_tiny_a")
TRANSFORMERS_VERSION = "4.42.2"  # pinned by HART

SEED_WEIGHTS = 0
SEED_INPUTS = 1
QK_STD = 0.3  # q/k projections: larger than 1/sqrt(fan_in), so attention is sharp and depends on (RoPE) positions
PAD_ID = 0

# the batch run: right padding, as HART's tokenizer call (padding="max_length") gives it
BATCH_LENGTH = 20
BATCH_VALID = [20, 13, 5]
# the system-prompt run: HART prepends the system prompt's ids (mask 1) to the padded prompt
SYS_PREFIX = 6
SYS_PROMPT_SLOTS = 10
SYS_PROMPT_VALID = 4

CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=160, vocab_size=512, rope_theta=1000000.0, rms_norm_eps=1e-6,
              max_position_embeddings=512, tie_word_embeddings=True, torch_dtype="float32")

SDPA_TOL = 1e-5


def random_weights(model, seed):
    """Seeded random weights that are not the default init, so that every parameter matters: matrices
    N(0, 1/fan_in) (q/k projections N(0, QK_STD^2)), 1-D norm weights 1 + 0.1 N(0, 1), biases 0.05 N(0, 1),
    embeddings N(0, 1). Drawn in named_parameters() order (the tied lm_head is the embedding, drawn once)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("embed_tokens.weight"):
                param.copy_(noise)
            elif name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.05 * noise)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.copy_(QK_STD * noise)
            else:
                assert param.dim() == 2, name
                param.copy_(noise / param.shape[1] ** 0.5)


def write_checkpoint(folder):
    """A random Qwen2ForCausalLM saved with save_pretrained; returns the stored tensors (read back from the file)."""
    config = Qwen2Config(**CONFIG)
    model = Qwen2ForCausalLM(config).eval()
    random_weights(model, SEED_WEIGHTS)
    assert model.lm_head.weight is model.model.embed_tokens.weight, "lm_head is not tied"
    model.save_pretrained(folder, safe_serialization=True)
    path = os.path.join(folder, "model.safetensors")
    with safe_open(path, framework="pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}
    expected = {f"model.{key}" for key in model.model.state_dict()}
    assert stored.keys() == expected, f"unexpected keys in {path}: {sorted(stored.keys() ^ expected)}"
    assert all(value.dtype == torch.float32 for value in stored.values())
    return stored


def load_reference(folder, stored, attn_implementation, dtype=torch.float32):
    """Qwen2Model.from_pretrained on the causal-LM folder, checked to hold exactly the stored tensors."""
    model, info = Qwen2Model.from_pretrained(folder, torch_dtype=dtype, attn_implementation=attn_implementation,
                                             output_loading_info=True)
    model.eval()
    assert not any(info.values()), f"loading {folder}: {info}"
    assert model.config._attn_implementation == attn_implementation
    loaded = model.state_dict()
    assert {f"model.{key}" for key in loaded} == stored.keys()
    assert all(torch.equal(loaded[key], stored[f"model.{key}"].to(dtype)) for key in loaded), "weights not loaded"
    return model


def right_padded(gen, valid_lengths, length):
    """Token ids drawn from 1..vocab-1 (never the pad id, as HART's mask is `ids != pad_id`), right-padded with
    PAD_ID, and the matching 0/1 attention mask (int64, as a tokenizer returns it)."""
    ids = torch.randint(1, CONFIG["vocab_size"], (len(valid_lengths), length), generator=gen)
    mask = (torch.arange(length)[None, :] < torch.tensor(valid_lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD_ID), mask


def encode(model, input_ids, attention_mask, **kwargs):
    """The recorded call: hidden_states[-1] of Qwen2Model, checked to be last_hidden_state."""
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)
    last = out.hidden_states[-1]
    assert len(out.hidden_states) == CONFIG["num_hidden_layers"] + 1
    assert torch.equal(last, out.last_hidden_state)
    return last, out


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_run(models, input_ids, attention_mask, valid):
    """Runs the eager model (the recorded output) and the checks that document the reference's behaviour.
    `valid` is, per row, the number of leading positions with mask 1 (the masks are right-padded)."""
    last, out = encode(models["eager"], input_ids, attention_mask, output_attentions=True)
    sdpa, _ = encode(models["sdpa"], input_ids, attention_mask)
    f64, _ = encode(models["eager64"], input_ids, attention_mask)
    bool_mask, _ = encode(models["eager"], input_ids, attention_mask.bool())
    length = input_ids.shape[1]
    arange_pos = torch.arange(length).expand(input_ids.shape[0], -1)
    explicit_arange, _ = encode(models["eager"], input_ids, attention_mask, position_ids=arange_pos)
    cumsum_pos = attention_mask.cumsum(-1) - 1
    with_cumsum, _ = encode(models["eager"], input_ids, attention_mask, position_ids=cumsum_pos)

    assert max_diff(last, sdpa) <= SDPA_TOL, f"eager and sdpa differ by {max_diff(last, sdpa)}"
    assert torch.equal(last, bool_mask), "a bool attention_mask (as HART passes it) changes the output"
    assert torch.equal(last, explicit_arange), "the default position_ids are not arange(L)"
    # cumsum positions only differ from arange at the padded positions (right padding), so only those change
    valid_pos = torch.arange(length)[None, :] < torch.tensor(valid)[:, None]
    assert torch.equal(last[valid_pos], with_cumsum[valid_pos])
    padded_changed = None
    if (~valid_pos).any():
        padded_changed = max_diff(last[~valid_pos], with_cumsum[~valid_pos])
        assert padded_changed > 1e-3, "padded positions do not depend on their position ids"

    # which keys each query attends to: causal, and never a key whose mask is 0, padded queries included
    allowed = (torch.arange(length)[None, :] <= torch.arange(length)[:, None])[None] & attention_mask.bool()[:, None]
    for layer, probs in enumerate(out.attentions):  # [B, heads, L, L], after softmax
        assert torch.all(probs.masked_select(~allowed[:, None]) == 0), f"layer {layer} attends to a masked key"
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)
    return last, {
        "hidden_states_last_equals_last_hidden_state": True,
        "eager_vs_sdpa_max_abs_diff": max_diff(last, sdpa),
        "eager_float32_vs_float64_max_abs_diff": max_diff(last, f64),
        "bool_attention_mask_identical": True,
        "explicit_position_ids_arange_identical": True,
        "cumsum_position_ids_valid_positions_identical": True,
        "cumsum_position_ids_padded_positions_max_abs_diff": padded_changed,
        "attention_probs_zero_on_masked_and_future_keys": True,
    }


def source_ref(obj):
    """`transformers/<file>:<qualified name> (lines a-b)` of the installed reference."""
    lines, start = inspect.getsourcelines(obj)
    root = os.path.dirname(os.path.dirname(transformers.__file__))
    path = os.path.relpath(inspect.getsourcefile(obj), root)
    return f"`{path}`: `{obj.__qualname__}` (lines {start}-{start + len(lines) - 1})"


def call_description(attn_implementation="eager"):
    return (f"Qwen2Model.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="
            f"'{attn_implementation}').eval()(input_ids=..., attention_mask=..., output_hidden_states=True)"
            ".hidden_states[-1]")


def main():
    if transformers.__version__ != TRANSFORMERS_VERSION:
        sys.exit(f"HART pins transformers=={TRANSFORMERS_VERSION}, found {transformers.__version__}")
    torch.set_num_threads(1)
    os.makedirs(FOLDER, exist_ok=True)

    stored = write_checkpoint(FOLDER)
    models = {"eager": load_reference(FOLDER, stored, "eager"),
              "sdpa": load_reference(FOLDER, stored, "sdpa"),
              "eager64": load_reference(FOLDER, stored, "eager", torch.float64)}

    gen = torch.Generator().manual_seed(SEED_INPUTS)
    in_ids, in_mask = right_padded(gen, BATCH_VALID, BATCH_LENGTH)
    sys_prefix = torch.randint(1, CONFIG["vocab_size"], (1, SYS_PREFIX), generator=gen)
    prompt_ids, prompt_mask = right_padded(gen, [SYS_PROMPT_VALID], SYS_PROMPT_SLOTS)
    sys_ids = torch.cat([sys_prefix, prompt_ids], dim=1)
    sys_mask = torch.cat([torch.ones_like(sys_prefix), prompt_mask], dim=1)

    in_last, in_checks = check_run(models, in_ids, in_mask, BATCH_VALID)
    sys_last, sys_checks = check_run(models, sys_ids, sys_mask, [SYS_PREFIX + SYS_PROMPT_VALID])

    tensors = {"in.input_ids": in_ids, "in.attention_mask": in_mask, "out.last_hidden": in_last,
               "sys.input_ids": sys_ids, "sys.attention_mask": sys_mask, "sys.last_hidden": sys_last}
    save_file({key: value.contiguous() for key, value in tensors.items()}, os.path.join(FOLDER, "io.safetensors"),
              metadata={"format": "pt"})

    versions = {"transformers": transformers.__version__, "torch": torch.__version__,
                "python": sys.version.split()[0]}
    record = {
        "fixture": "qwen2_tiny_a",
        "reference": "Hugging Face transformers Qwen2Model (HART's text encoder class)",
        "versions": versions,
        "checkpoint": {"saved_with": "Qwen2ForCausalLM.save_pretrained(folder, safe_serialization=True)",
                       "files": ["config.json", "generation_config.json", "model.safetensors"],
                       "keys": sorted(stored), "dtype": "float32", "config": CONFIG,
                       "seed_weights": SEED_WEIGHTS,
                       "init": {"embed_tokens": "N(0,1)", "q_proj/k_proj weight": f"N(0,{QK_STD}^2)",
                                "other matrices": "N(0,1/fan_in)", "norm weights": "1+0.1*N(0,1)",
                                "biases": "0.05*N(0,1)"}},
        "seed_inputs": SEED_INPUTS,
        "input_order": "torch.Generator().manual_seed(seed_inputs): in.input_ids randint(1, vocab) [3,20], then "
                       "the system prefix randint(1, vocab) [1,6], then the prompt randint(1, vocab) [1,10]; pad "
                       "positions are then overwritten with pad_id",
        "pad_id": PAD_ID,
        "compute_dtype": "float32",
        "device": "cpu",
        "runs": {
            "in": {"call": call_description(),
                   "inputs": {"input_ids": "in.input_ids", "attention_mask": "in.attention_mask"},
                   "outputs": {"hidden_states[-1]": "out.last_hidden"},
                   "valid_lengths": BATCH_VALID, "checks": in_checks},
            "sys": {"call": call_description(),
                    "inputs": {"input_ids": "sys.input_ids", "attention_mask": "sys.attention_mask"},
                    "outputs": {"hidden_states[-1]": "sys.last_hidden"},
                    "system_prefix_length": SYS_PREFIX, "prompt_slots": SYS_PROMPT_SLOTS,
                    "prompt_valid": SYS_PROMPT_VALID,
                    "hart_keeps": f"sys.last_hidden[:, {SYS_PREFIX}:] (the prompt slots, padded ones included)",
                    "checks": sys_checks},
        },
    }
    with open(os.path.join(FOLDER, "runs.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    with open(os.path.join(FOLDER, "README.md"), "w") as f:
        f.write(readme(record, tensors, stored))

    # a fresh load of what was written must give the recorded outputs again
    again = load_reference(FOLDER, stored, "eager")
    assert torch.equal(encode(again, in_ids, in_mask)[0], in_last)
    assert torch.equal(encode(again, sys_ids, sys_mask)[0], sys_last)
    size = sum(os.path.getsize(os.path.join(FOLDER, name)) for name in os.listdir(FOLDER))
    print(f"wrote {FOLDER} ({size / 1024:.0f} KiB): " + ", ".join(sorted(os.listdir(FOLDER))))


def tensor_table(tensors):
    descriptions = {
        "in.input_ids": f"token ids, rows right-padded with {PAD_ID} after {BATCH_VALID} valid ids",
        "in.attention_mask": "1 at valid positions, 0 at padded ones",
        "out.last_hidden": "`hidden_states[-1]` (= `last_hidden_state`, after the final norm) of the eager run on "
                           "in.*, EVERY position including the padded ones",
        "sys.input_ids": f"{SYS_PREFIX} system-prefix ids, then a prompt of {SYS_PROMPT_SLOTS} slots: "
                         f"{SYS_PROMPT_VALID} valid ids and {SYS_PROMPT_SLOTS - SYS_PROMPT_VALID} pads ({PAD_ID})",
        "sys.attention_mask": f"1 for the prefix and the {SYS_PROMPT_VALID} valid prompt ids, 0 for the pads",
        "sys.last_hidden": "`hidden_states[-1]` of the eager run on sys.*, all 16 positions (HART keeps "
                           f"`[:, {SYS_PREFIX}:]`)",
    }
    rows = ["| key | shape | dtype | content |", "|---|---|---|---|"]
    for key, value in tensors.items():
        dtype = str(value.dtype).removeprefix("torch.")
        rows.append(f"| `{key}` | {list(value.shape)} | {dtype} | {descriptions[key]} |")
    return "\n".join(rows)


def readme(record, tensors, stored):
    versions = record["versions"]
    checks_in, checks_sys = record["runs"]["in"]["checks"], record["runs"]["sys"]["checks"]
    layer_keys = sorted(key for key in stored if key.startswith("model.layers.0."))
    other_keys = sorted(key for key in stored if not key.startswith("model.layers."))
    head_dim = CONFIG["hidden_size"] // CONFIG["num_attention_heads"]
    return f"""# qwen2_tiny_a: Qwen2 text-encoder parity fixture (HART)

Made by `scripts/make_hart_qwen2_fixture.py` with Hugging Face transformers {versions['transformers']} (the version
HART pins), torch {versions['torch']}, Python {versions['python']}; CPU, one thread, float32, seeds
{record['checkpoint']['seed_weights']} (weights) and {record['seed_inputs']} (inputs). Rerun (rewrites the same data):

```
python3 -m venv /tmp/qwenref
/tmp/qwenref/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
/tmp/qwenref/bin/pip install -q "transformers==4.42.2" safetensors numpy
/tmp/qwenref/bin/python scripts/make_hart_qwen2_fixture.py
```

The reference is the base decoder `Qwen2Model` (what HART's text encoder runs): causal attention, output
`hidden_states[-1]`, the last decoder layer's output after the final RMSNorm (`model.norm`), identical to
`last_hidden_state`. HART uses the hidden state of EVERY position, padded ones included, so the padded positions
of the outputs below are part of the parity target.

## Files

- `config.json`, `generation_config.json`, `model.safetensors`: written by
  `Qwen2ForCausalLM.save_pretrained(folder, safe_serialization=True)`. The config is a default `Qwen2Config` with
  `{json.dumps(CONFIG)}` (GQA: {CONFIG['num_attention_heads']} query heads, {CONFIG['num_key_value_heads']} KV
  heads, head_dim {head_dim}); the other fields are transformers' defaults (hidden_act silu, attention_dropout 0,
  use_sliding_window false, bos/eos 151643 (unused here: no generation); pad_token_id unset).
- `io.safetensors`: the inputs and outputs below.
- `runs.json`: each run with its call, which io keys are inputs/outputs, seeds, versions and the checks below.

## Weights (`model.safetensors`, float32, {len(stored)} tensors)

Keys are those of `Qwen2ForCausalLM`, i.e. the base model's under the `model.` prefix; `lm_head.weight` is ABSENT
because the head is tied to `model.embed_tokens.weight` (`tie_word_embeddings: true`; save_pretrained drops the
tied copy). `Qwen2Model.from_pretrained(folder)` strips the `model.` prefix. Keys (layer N = 0, 1):

{chr(10).join(f'- `{key}` {list(stored[key].shape)}' for key in other_keys)}
{chr(10).join(f'- `{key.replace("layers.0.", "layers.N.")}` {list(stored[key].shape)}' for key in layer_keys)}

Linear weights are `[out_features, in_features]` (y = x W^T + b). q/k/v projections have biases, o_proj and the
MLP do not. The values are random and NOT the default init, so every parameter matters: embeddings N(0,1),
q_proj/k_proj weights N(0,{QK_STD}^2) (large, so attention is sharp and depends on the RoPE positions), other
matrices N(0,1/fan_in), norm weights 1+0.1*N(0,1), biases 0.05*N(0,1). The embedding row of the pad id {PAD_ID} is
an ordinary random row (pad_token_id is unset, and `padding_idx` would only affect init and gradients anyway).

## Tensors (`io.safetensors`)

{tensor_table(tensors)}

Valid ids are drawn from 1..{CONFIG['vocab_size'] - 1}, never the pad id (HART builds its mask as `ids != pad_id`).
The masks are stored as int64 (what a tokenizer returns); HART passes a bool mask, checked to give bit-identical
outputs.

## What the reference computes (transformers {versions['transformers']}, read from the installed source)

Position ids: `Qwen2Model.forward` is called without `position_ids`, so it uses
`cache_position = torch.arange(0, L)` and `position_ids = cache_position.unsqueeze(0)`: positions 0..L-1 for every
row, whatever the mask. Padded positions keep counting (row with 13 valid ids: pads at positions 13..19; the
sys row: pads at 10..15). The `attention_mask.cumsum(-1) - 1` positions exist only in
`Qwen2ForCausalLM.prepare_inputs_for_generation` (the `generate()` path), which is not used here. (HART computes a
cumsum `context_position_ids` too, but only returns it for its own transformer; it does not pass it to the text
encoder.) Sources: {source_ref(Qwen2Model.forward)};
{source_ref(Qwen2ForCausalLM.prepare_inputs_for_generation)}.

Attention mask: `Qwen2Model._update_causal_mask` (copied from `LlamaModel`) builds an additive float mask
[B, 1, L, L] with `min = torch.finfo(float32).min` (not -inf) where key k > query q (causal) OR
`attention_mask[b, k] == 0`, and 0 elsewhere. So query q attends to keys `k <= q` with mask 1. Consequences:
- valid queries see only earlier-or-equal valid keys (right padding: pads always come after them);
- a PADDED query at position q attends to ALL the valid keys of its row (keys 0..n-1, n = number of valid ids,
  here including the system prefix) and NOT to any padded key, not even its own: its own key/value are masked.
  Its query is its own (pad-id embedding, RoPE position q) and its residual stream carries the pad embedding, so
  each padded position gets a distinct output;
- no row is ever fully masked (key 0 is always valid with right padding), so the `_unmask_unattended` fix-up
  (applied only for sdpa on CUDA, to fully masked rows) never changes anything for these inputs.
The mask is added to the scores `q k^T / sqrt(head_dim)` before a float32 softmax; masked probabilities come out
exactly 0 (checked on `output_attentions` of the eager run, all layers, padded rows included).
With `attn_implementation="sdpa"` the same 4-D mask is passed to `scaled_dot_product_attention`;
`AttentionMaskConverter._ignore_causal_mask_sdpa` drops it for `is_causal=True` only when the mask is all ones
(not the case in either run here). Sources: {source_ref(Qwen2Model._update_causal_mask)};
{source_ref(AttentionMaskConverter._ignore_causal_mask_sdpa)};
{source_ref(AttentionMaskConverter._unmask_unattended)}; {source_ref(modeling_qwen2.Qwen2Attention.forward)}.

Other details of the math ({source_ref(modeling_qwen2.Qwen2DecoderLayer.forward)} and neighbours):
pre-norm layers `h = h + attn(rmsnorm(h)); h = h + mlp(rmsnorm(h))`, then the final `model.norm`; RMSNorm
`weight * (x * rsqrt(mean(x^2) + eps))` computed in float32; MLP `down(silu(gate(x)) * up(x))`; GQA repeats each KV
head for {CONFIG['num_attention_heads'] // CONFIG['num_key_value_heads']} consecutive query heads; RoPE with
`inv_freq = 1 / theta^(arange(0, head_dim, 2) / head_dim)`, angles `position * inv_freq` duplicated as
`cat(freqs, freqs)` over the head dim, applied as `x * cos + rotate_half(x) * sin` with
`rotate_half(x) = cat(-x[half:], x[:half])` (split halves, not interleaved pairs), to q and k after their biases.

## Checks made while writing (values in runs.json)

| check | in | sys |
|---|---|---|
| `hidden_states[-1]` is bit-identical to `last_hidden_state` | yes | yes |
| eager vs sdpa, max abs diff (must be <= {SDPA_TOL}) | {checks_in['eager_vs_sdpa_max_abs_diff']:.3g} | {checks_sys['eager_vs_sdpa_max_abs_diff']:.3g} |
| eager float32 vs float64 weights/compute, max abs diff | {checks_in['eager_float32_vs_float64_max_abs_diff']:.3g} | {checks_sys['eager_float32_vs_float64_max_abs_diff']:.3g} |
| bool attention_mask gives bit-identical output | yes | yes |
| explicit `position_ids = arange(L)` gives bit-identical output | yes | yes |
| `position_ids = cumsum(mask) - 1`: valid positions identical | yes | yes |
| `position_ids = cumsum(mask) - 1`: padded positions change by (max abs) | {checks_in['cumsum_position_ids_padded_positions_max_abs_diff']:.3g} | {checks_sys['cumsum_position_ids_padded_positions_max_abs_diff']:.3g} |
| attention probabilities exactly 0 on future and mask-0 keys | yes | yes |

The stored outputs are from the eager run. A float32 implementation should match them to about 1e-5.
Differences from HART's real setting: HART runs the encoder on CUDA under float16 autocast with the published
bf16 Qwen2-1.5B-Instruct weights; this fixture is float32 on the CPU, to pin down the math exactly.
"""


if __name__ == "__main__":
    main()
