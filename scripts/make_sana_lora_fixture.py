"""The LoRA interop cases of tests/fixtures/sana/, made with diffusers and peft (neither is a project requirement;
the tests read only what this writes):

    pip install diffusers peft && python scripts/make_sana_lora_fixture.py

Both cases put a LoRA on the transformer of tests/fixtures/sana/transformer_sana10 (diffusers' SanaTransformer2DModel,
2 blocks) and record diffusers' output on that case's inputs, at lora scale 1 and at call.json's lora_scale
(attention_kwargs={"scale": s}, how a diffusers pipeline takes it):

lora_written_by_sana/  the LoRA file written by sana.py (add_lora, random lora_B as after training, save_lora), read
                       by diffusers' own loading path: SanaLoraLoaderMixin.lora_state_dict (the file and its
                       lora_adapter_metadata) then load_lora_into_transformer, what SanaPipeline.load_lora_weights runs.
lora_saved_by_peft/    a LoRA made by peft (transformer.add_adapter(LoraConfig), init_lora_weights=False so that B is
                       not zero) with an alpha_pattern, saved by SanaPipeline.save_lora_weights with its peft config:
                       the file diffusers' SANA LoRA training script writes.

Each case holds transformer/ (the base, copied), lora.safetensors, io.safetensors (the inputs, `output`,
`output_scaled` and `output_base` without the LoRA), call.json (the LoRA's settings, the scale, the versions) and a
README.md. Everything runs on the CPU in float32 in a few seconds.
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sana  # noqa: E402

FIX = os.path.join(ROOT, "tests", "fixtures", "sana")
BASE = os.path.join(FIX, "transformer_sana10")
SCALE = 0.5
INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask")


def diffusers_outputs(transformer, io):
    """{output, output_scaled}: the adapted transformer on the inputs, at lora scale 1 and SCALE."""
    kw = {k: io[k] for k in INPUTS}
    with torch.no_grad():
        return {"output": transformer(**kw, return_dict=False)[0].contiguous(),
                "output_scaled": transformer(**kw, attention_kwargs={"scale": SCALE},
                                             return_dict=False)[0].contiguous()}


def write_case(name, lora_file, call, io, outputs, readme):
    out = os.path.join(FIX, name)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(os.path.join(BASE, "transformer"), os.path.join(out, "transformer"))
    shutil.copy(lora_file, os.path.join(out, "lora.safetensors"))
    save_file({**{k: io[k].contiguous() for k in INPUTS}, "output_base": io["output"], **outputs},
              os.path.join(out, "io.safetensors"))
    with open(os.path.join(out, "call.json"), "w") as f:
        json.dump(call, f, indent=1)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(readme)
    print(f"wrote {out}")


def main():
    import diffusers
    import peft
    from diffusers import SanaPipeline, SanaTransformer2DModel
    from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    io = load_file(os.path.join(BASE, "io.safetensors"))
    versions = {"diffusers": diffusers.__version__, "peft": peft.__version__, "torch": torch.__version__}
    tmp = os.path.join(FIX, "_lora_tmp")
    os.makedirs(tmp, exist_ok=True)

    # (a) written by sana.py, read by diffusers
    targets, rank, alpha = ("to_q", "to_k", "to_v", "to_out.0", "ff.conv_inverted"), 4, 8.0
    model = sana.load_transformer(BASE)
    add = sana.add_lora(model, targets, rank, alpha)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in add:  # as after training: B is no longer zero
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.shape[0] != rank else 1 / rank))
    path = os.path.join(tmp, "sana.safetensors")
    sana.save_lora(model, path, rank, alpha, targets)
    transformer = SanaTransformer2DModel.from_pretrained(os.path.join(BASE, "transformer")).eval()
    state_dict, metadata = SanaLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
    SanaLoraLoaderMixin.load_lora_into_transformer(state_dict, transformer, metadata=metadata)
    call = {"lora_scale": SCALE, "rank": rank, "lora_alpha": alpha, "targets": list(targets), **versions}
    write_case("lora_written_by_sana", path, call, io, diffusers_outputs(transformer, io),
               "# lora_written_by_sana: a LoRA file written by sana.py, loaded by diffusers\n\n"
               "Made by `python scripts/make_sana_lora_fixture.py` (its docstring says how). `lora.safetensors` was "
               "written by `sana.save_lora` for the transformer of `transformer/` (transformer_sana10's) with the "
               f"LoRA of call.json (targets {', '.join(targets)}; rank {rank}, alpha {alpha}; lora_B random), then "
               "loaded by diffusers' `SanaLoraLoaderMixin.lora_state_dict(..., return_lora_metadata=True)` and "
               "`load_lora_into_transformer` (what `SanaPipeline.load_lora_weights` runs) into "
               "`SanaTransformer2DModel.from_pretrained(transformer/)`, float32, CPU, `torch.no_grad()`.\n\n"
               "io.safetensors: the inputs of transformer_sana10; `output` = the adapted transformer's, "
               f"`output_scaled` = the same with `attention_kwargs={{'scale': {SCALE}}}` (call.json's lora_scale), "
               "`output_base` = transformer_sana10's output without a LoRA.\n")

    # (b) made and saved by diffusers/peft, read by sana.py
    transformer = SanaTransformer2DModel.from_pretrained(os.path.join(BASE, "transformer")).eval()
    config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv_inverted",
                                                           "conv_point"], alpha_pattern={"attn2.to_k": 6},
                        init_lora_weights=False)
    transformer.add_adapter(config)
    path = os.path.join(tmp, "peft.safetensors")
    SanaPipeline.save_lora_weights(tmp, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
                                   weight_name="peft.safetensors")
    call = {"lora_scale": SCALE, "rank": 4, "lora_alpha": 2, "alpha_pattern": {"attn2.to_k": 6},
            "targets": sorted(config.target_modules), **versions}
    write_case("lora_saved_by_peft", path, call, io, diffusers_outputs(transformer, io),
               "# lora_saved_by_peft: a LoRA made and saved by diffusers/peft, for sana.py to load\n\n"
               "Made by `python scripts/make_sana_lora_fixture.py` (its docstring says how): "
               "`SanaTransformer2DModel.from_pretrained(transformer/)` (transformer_sana10's), "
               "`add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=[to_q, to_k, to_v, to_out.0, "
               "conv_inverted, conv_point], alpha_pattern={'attn2.to_k': 6}, init_lora_weights=False))`, saved by "
               "`SanaPipeline.save_lora_weights(transformer_lora_layers=get_peft_model_state_dict(transformer), "
               "transformer_lora_adapter_metadata=peft_config['default'].to_dict())` as `lora.safetensors`; "
               "float32, CPU, `torch.no_grad()`.\n\n"
               "io.safetensors: the inputs of transformer_sana10; `output` = the adapted transformer's, "
               f"`output_scaled` = the same with `attention_kwargs={{'scale': {SCALE}}}` (call.json's lora_scale), "
               "`output_base` = transformer_sana10's output without a LoRA.\n")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
