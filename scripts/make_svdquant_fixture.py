"""More nunchaku-checkpoint cases for tests/fixtures/svdquant/, made by running the OFFICIAL deepcompressor (its
quantizer and its nunchaku converter) with the call sequence the shared cases' READMEs give (shared/fixtures/svdquant/
tiny_nunchaku_ckpt_*/README.md, "Provenance"):

    python scripts/make_svdquant_fixture.py --official /path/to/deepcompressor [--commit HASH] [--check-shared DIR]

tiny_nunchaku_ckpt_int4_r24/  INT4, a bf16 nn.Linear(192 -> 136), branch rank 24 (nunchaku stores it as 32)
tiny_nunchaku_ckpt_nvfp4_r8/  NVFP4, a bf16 nn.Linear(256 -> 136), branch rank 8 (stored as 16)

Both have a rank that is not a multiple of 16 and an output width that is not a multiple of 128 (the packing tile),
so the converter pads both. Each folder has the shared cases' files: inputs, outputs (the 16-bit layer's and
deepcompressor's fake-quant outputs), packed_nunchaku (the converter's output), unpacked (the plain tensors the packed
ones must unpack to), meta.json and a README.

--official is a tree of github.com/mit-han-lab/deepcompressor (the shared cases used commit
69f3473f5e1c1504bae35cc50c7858ef900a9b17); this script imports it and calls it, copying nothing. Its Python needs, besides what this project has (torch,
safetensors, diffusers, transformers): omniconfig, toml, docstring_parser, psutil, scipy. Install them beside the
project, e.g. `pip install --target /tmp/dcdeps --no-deps omniconfig toml docstring_parser psutil scipy` and run with
PYTHONPATH=/tmp/dcdeps. deepcompressor builds a CUDA extension at import for one op, rounding to the nearest codebook
value (FP4 and FP8 values); as the shared cases did, a CPU stand-in with the same rule (quantize.cu's
nearest_neighbor: ties to the larger value) takes its place. INT4 never calls it.

--check-shared DIR (the shared svdquant folder) first re-runs its two tiny_nunchaku_ckpt_* cases from their
inputs.safetensors and meta.json and checks that every packed byte, unpacked tensor and output comes out equal. It
does (2026-12-07, deepcompressor 69f3473, torch 2.13 CPU). Everything runs on the CPU in about a minute.
"""
import argparse
import json
import os
import subprocess
import sys
import types

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "svdquant")
PREFIX = "transformer_blocks.0.ff.inverted_conv"  # the shared cases' (SANA's GLUMBConv inverted_conv)
MODULE_KEY = "ffn_up_proj"
CASES = {  # name: (precision, N, K, rank, seed)
    "tiny_nunchaku_ckpt_int4_r24": ("int4", 136, 192, 24, 11),
    "tiny_nunchaku_ckpt_nvfp4_r8": ("nvfp4", 136, 256, 8, 4),
}


def install_codebook_stand_in():
    """deepcompressor.csrc.load builds a CUDA extension; its one op, rounding to the nearest value of a sorted
    codebook, in torch: lo = the last value <= x (or the first), hi = the next; lval if 2x < lval + hval, else hval."""
    def round_to_nearest_in_codebook_cuda(tensor, codebook, inplace=False, bnb=False):
        x, c = tensor.contiguous().reshape(-1), codebook.contiguous()
        lo = (torch.searchsorted(c, x, right=True) - 1).clamp(min=0)
        hi = (lo + 1).clamp(max=len(c) - 1)
        y = torch.where(x + x < c[lo] + c[hi], c[lo], c[hi]).reshape(tensor.shape)
        return tensor.copy_(y) if inplace else y
    sys.modules["deepcompressor.csrc.load"] = types.SimpleNamespace(
        _C=types.SimpleNamespace(round_to_nearest_in_codebook_cuda=round_to_nearest_in_codebook_cuda))


def make_inputs(N, K, seed):
    """The shared cases' data recipe (their README): W = randn(N, K) / sqrt(K) with 4 weight entries x8;
    bias = 0.1 randn(N); activations = randn x c, c a log-normal(0, 0.5) per-channel factor with 4 outlier channels
    x30; x_calib (8, 32, K), x_test (1, 16, K). All float32 (cast to bf16 for the module)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    w.view(-1)[torch.randperm(N * K, generator=g)[:4]] *= 8
    bias = 0.1 * torch.randn(N, generator=g)
    c = torch.exp(0.5 * torch.randn(K, generator=g))
    c[torch.randperm(K, generator=g)[:4]] *= 30
    return dict(weight=w, bias=bias, x_calib=torch.randn(8, 32, K, generator=g) * c,
                x_test=torch.randn(1, 16, K, generator=g) * c)


def quant_config(official, precision, rank):
    """The official YAMLs (configs/model/sana-1.6b.yaml + configs/svdquant/<precision>.yaml and the __default__.yaml
    files above them) through the official omniconfig parser, quant section only; the one override: the rank."""
    from omniconfig import ConfigParser
    from deepcompressor.app.diffusion.nn.struct import DiffusionModelStruct
    from deepcompressor.app.diffusion.quant.config import DiffusionQuantConfig
    cwd = os.getcwd()
    os.chdir(os.path.join(official, "examples", "diffusion"))  # omniconfig reads config paths below the cwd
    try:
        DiffusionQuantConfig.set_key_map(DiffusionModelStruct._get_default_key_map())
        parser = ConfigParser("quant")
        parser.add_config(DiffusionQuantConfig, scope="quant", prefix="")
        quant = parser.parse_known_args(["configs/model/sana-1.6b.yaml", f"configs/svdquant/{precision}.yaml"])[0]
    finally:
        os.chdir(cwd)
    quant.wgts.low_rank.rank = rank
    return quant


@torch.inference_mode()
def run_official(official, precision, inputs, rank):
    """Steps 1-4 of the shared READMEs on a bf16 nn.Linear, then the nunchaku converter. -> dict of results."""
    from deepcompressor.app.diffusion.quant.quantizer import DiffusionActivationQuantizer, DiffusionWeightQuantizer
    from deepcompressor.backend.nunchaku.convert import convert_to_nunchaku_w4x4y16_linear_state_dict
    from deepcompressor.calib.smooth import ActivationSmoother, smooth_linear_modules
    from deepcompressor.data.cache import TensorCache, TensorsCache
    from deepcompressor.data.utils.reshape import LinearReshapeFn
    from deepcompressor.quantizer.processor import Quantizer
    quant = quant_config(official, precision, rank)
    N, K = inputs["weight"].shape
    linear = nn.Linear(K, N).to(torch.bfloat16)
    linear.weight.copy_(inputs["weight"])
    linear.bias.copy_(inputs["bias"])
    x_calib, x_test = inputs["x_calib"].bfloat16(), inputs["x_test"].bfloat16()
    cache = TensorsCache({0: TensorCache(data=[x_calib[i:i + 1] for i in range(len(x_calib))], channels_dim=-1,
                                         reshape=LinearReshapeFn())})
    y_fp = linear(x_test).float()
    # 1. smoothing: the (alpha, beta) grid search; W becomes W s, x / s by a hook
    s = smooth_linear_modules(None, linear, scale=None, config=quant.smooth.proj,
                              weight_quantizer=Quantizer(quant.wgts, key=MODULE_KEY, low_rank=quant.wgts.low_rank),
                              input_quantizer=Quantizer(quant.ipts, channels_dim=-1, key=MODULE_KEY),
                              inputs=cache, eval_inputs=cache, eval_module=linear, develop_dtype=torch.float32)
    ActivationSmoother(s, channels_dim=-1).as_hook().register(linear)
    # 2. the low-rank branch, subtracted from the weight and run by a hook
    branch = DiffusionWeightQuantizer(quant.wgts, key=MODULE_KEY).calibrate_low_rank(
        input_quantizer=DiffusionActivationQuantizer(quant.ipts, key=MODULE_KEY, channels_dim=-1), modules=[linear],
        inputs=cache, eval_inputs=cache, eval_module=linear)
    linear.weight.data.sub_(branch.get_effective_weight().view(linear.weight.shape))
    branch.as_hook().register(linear)
    # 3. the residual's range and its quantization; the weight becomes the dequantized residual
    wq = DiffusionWeightQuantizer(quant.wgts, key=MODULE_KEY)
    wq.calibrate_dynamic_range(module=linear, inputs=cache, eval_inputs=cache, eval_module=linear)
    result = wq.quantize(linear.weight.data, inputs=cache.front(), return_with_dequant=True, return_with_quant=True)
    linear.weight.data = result.data
    scales = result.scale.state_dict("w.scale")
    # 4. dynamic activation fake quant; the layer's output with all hooks
    DiffusionActivationQuantizer(quant.ipts, key=MODULE_KEY, channels_dim=-1).as_hook(is_output=False).register(linear)
    y_q = linear(x_test).float()
    fp4 = precision == "nvfp4"
    packed = convert_to_nunchaku_w4x4y16_linear_state_dict(
        weight=linear.weight.data, scale=scales["w.scale.0"], subscale=scales["w.scale.1"] if fp4 else None,
        bias=linear.bias.data, smooth=s, lora=(branch.a.weight.data, branch.b.weight.data), shift=None,
        smooth_fused=False, float_point=fp4)
    # the plain tensors the packed ones stand for (unpadded)
    G = scales["w.scale.1" if fp4 else "w.scale.0"].shape[2]
    unpacked = dict(bias=linear.bias.data.clone(), smooth=s.bfloat16(),
                    lora_down=(branch.a.weight.double() / s.double()).bfloat16().T.contiguous(),
                    lora_up=branch.b.weight.data.clone(), lowrank_a_smoothed_domain=branch.a.weight.data.clone(),
                    w_dequant_residual=linear.weight.data.clone())
    if fp4:
        from deepcompressor.backend.utils import fp_quantize  # the converter's E2M1 index (bit 3 = sign)
        sub = scales["w.scale.1"].float().view(N, G)
        unpacked["wcodes_e2m1_index"] = fp_quantize(
            (result.data.float() / scales["w.scale.0"].float().view(()) / sub.repeat_interleave(K // G, 1))).to(
            torch.uint8)
        unpacked["wtscale"] = scales["w.scale.0"].float().view(1)
        unpacked["wscales_fp8"] = sub.to(torch.float8_e4m3fn)
    else:
        scale = scales["w.scale.0"].float().view(N, G)  # the converter's codes: round(residual / scale)
        unpacked["wcodes"] = (result.data.float() / scale.repeat_interleave(K // G, 1)).round().to(torch.int8)
        unpacked["wscales"] = scales["w.scale.0"].view(N, G).bfloat16()
    return dict(y_fp=y_fp, y_q=y_q, packed=packed, unpacked=unpacked, scales=scales, quant=quant)


def quantization_config(precision):
    """The `quantization_config` metadata in the form nunchaku's merge tool writes it (as the shared cases have)."""
    if precision == "int4":
        part = {"dtype": "int4", "scale_dtype": None, "group_size": 64}
        return {"method": "svdquant", "weight": part, "activation": part}
    return {"method": "svdquant", "weight": {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"],
                                             "group_size": 16},
            "activation": {"dtype": "fp4_e2m1_all", "scale_dtype": "fp8_e4m3_nan", "group_size": 16}}


def write_case(folder, precision, N, K, rank, seed, inputs, r, commit):
    os.makedirs(folder, exist_ok=True)
    out_key = "y_svdquant_w4a4_deepcompressor" if precision == "int4" else "y_svdquant_nvfp4_deepcompressor"
    stored = {k: v.bfloat16() if k in ("weight", "x_calib") else v for k, v in inputs.items()}  # as the module saw them
    save_file({k: v.contiguous() for k, v in stored.items()}, os.path.join(folder, "inputs.safetensors"))
    save_file({"y_fp": r["y_fp"], out_key: r["y_q"]}, os.path.join(folder, "outputs.safetensors"))
    packed = {f"{PREFIX}.{k}": v.contiguous() for k, v in r["packed"].items()}
    save_file(packed, os.path.join(folder, "packed_nunchaku.safetensors"),
              metadata={"quantization_config": json.dumps(quantization_config(precision))})
    save_file({k: v.contiguous() for k, v in r["unpacked"].items()}, os.path.join(folder, "unpacked.safetensors"))
    lr = r["quant"].wgts.low_rank
    meta = {"K_in": K, "N_out": N, "rank": rank, "rank_stored": r["packed"]["lora_up"].shape[1], "seed": seed,
            "model_dtype": "torch.bfloat16", "prefix": PREFIX,
            "config_files": ["configs/model/sana-1.6b.yaml", f"configs/svdquant/{precision}.yaml"],
            "module_key": MODULE_KEY, "official": "mit-han-lab/deepcompressor", "official_commit": commit,
            "maker": "scripts/make_svdquant_fixture.py",
            "packed_shapes": {k: [list(v.shape), str(v.dtype)] for k, v in packed.items()},
            "scale_state_keys": {k: [list(v.shape), str(v.dtype)] for k, v in r["scales"].items()},
            "lowrank_num_iters": lr.num_iters, "lowrank_early_stop": lr.early_stop}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(readme(os.path.basename(folder), precision, N, K, rank, meta, packed, r, commit))
    for f in os.listdir(folder):
        os.chmod(os.path.join(folder, f), 0o644)


def readme(name, precision, N, K, rank, meta, packed, r, commit):
    rows = "\n".join(f"| `{k}` | {list(v.shape)} | {v.dtype} |" for k, v in packed.items())
    plain = "\n".join(f"| {k} | {list(v.shape)} {v.dtype} |" for k, v in r["unpacked"].items())
    out_key = "y_svdquant_w4a4_deepcompressor" if precision == "int4" else "y_svdquant_nvfp4_deepcompressor"
    return f"""# svdquant case: {name}  (K_in={K}, N_out={N}, rank={rank}, bf16 model)

Made by `python scripts/make_svdquant_fixture.py` (its docstring says how to run it): a bf16 nn.Linear({K}->{N})
quantized by the OFFICIAL deepcompressor ({commit}) with the {precision} SVDQuant settings of the official YAMLs
(`{meta["config_files"][0]}` + `{meta["config_files"][1]}` and their `__default__.yaml`s, parsed by the official
omniconfig parser; the one override: `quant.wgts.low_rank.rank = {rank}`), then written in nunchaku's format by the
OFFICIAL converter `deepcompressor.backend.nunchaku.convert.convert_to_nunchaku_w4x4y16_linear_state_dict` -- the
call sequence of the shared cases' READMEs (shared/fixtures/svdquant/tiny_nunchaku_ckpt_*/README.md, "Provenance"),
which the maker reproduces byte for byte on the shared cases (`--check-shared`). Data: the shared cases' recipe,
seed {meta["seed"]} (`make_inputs`).

What this case adds: the rank ({rank}) is not a multiple of 16, so the converter stores the branch with
{meta["rank_stored"]} columns, zero-filled ({rank} true ones); N = {N} is not a multiple of 128, so the output
channels are padded to {-(-N // 128) * 128} (codes 0, scales and bias 1, up-branch rows 0); K = {K} pads to
{-(-K // 128) * 128} (codes 0, smooth 1, down-branch columns 0).

## packed_nunchaku.safetensors (legacy key names; shapes nominal, memory tiled as in shared/ref/svdquant.md B)
| key | shape | dtype |
|---|---|---|
{rows}

## unpacked.safetensors (what the packed tensors stand for, unpadded, true rank)
| key | shape, dtype |
|---|---|
{plain}

`lora_down` is (a / s)^T as the converter computes it (float64, then bf16); `lowrank_a_smoothed_domain` is
deepcompressor's a (the branch acts on x / s there); `w_dequant_residual` is the layer's weight after step 3.

## other files
`inputs.safetensors`: weight [N,K] and x_calib [8,32,K] in bf16 (what the bf16 module got; the maker draws them in
fp32 and the run casts them), bias and x_test [1,16,K] in fp32 (x_test is cast to bf16 for the run).
`outputs.safetensors`: y_fp (the bf16 layer), {out_key} (deepcompressor's bf16 fake-quant forward, all hooks).
`meta.json`: shapes, settings, the stored rank and the commit.

CPU substitution, as in the shared cases: deepcompressor's CUDA codebook op (FP4/FP8 rounding) is replaced by a torch
function with its rule (nearest, ties to the larger value); nothing here is an output of nunchaku's CUDA kernels.
"""


def check_shared(official, shared):
    """Re-runs the shared tiny_nunchaku_ckpt_* cases from their inputs: every tensor must come out equal."""
    for name in ("tiny_nunchaku_ckpt_int4", "tiny_nunchaku_ckpt_nvfp4"):
        d = os.path.join(shared, name)
        meta = json.load(open(os.path.join(d, "meta.json")))
        precision = "nvfp4" if meta["config_files"][-1].endswith("nvfp4.yaml") else "int4"
        r = run_official(official, precision, load_file(os.path.join(d, "inputs.safetensors")), meta["rank"])
        files = {f: load_file(os.path.join(d, f"{f}.safetensors")) for f in ("outputs", "packed_nunchaku", "unpacked")}
        got = {"outputs": dict(y_fp=r["y_fp"], **{k: r["y_q"] for k in files["outputs"] if k != "y_fp"}),
               "packed_nunchaku": {f"{meta['prefix']}.{k}": v for k, v in r["packed"].items()},
               "unpacked": r["unpacked"]}
        for f, want in files.items():
            for k, v in want.items():
                assert k in got[f], (name, f, k)
                same = torch.equal(got[f][k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else got[f][k],
                                   v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v)
                assert same and got[f][k].dtype == v.dtype, f"{name}/{f}.safetensors:{k} differs"
        print(f"{name}: every output, packed and unpacked tensor equal")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", required=True, help="a mit-han-lab/deepcompressor tree")
    p.add_argument("--commit", default=None, help="its commit, where the tree has no .git")
    p.add_argument("--check-shared", default=None, help="shared/fixtures/svdquant: re-run its cases first")
    p.add_argument("--out", default=OUT)
    args = p.parse_args()
    official = os.path.abspath(args.official)
    commit = args.commit or subprocess.run(["git", "-C", official, "rev-parse", "HEAD"], capture_output=True,
                                           text=True, check=True).stdout.strip()
    torch.set_num_threads(1)
    install_codebook_stand_in()
    sys.path.insert(0, official)
    if args.check_shared:
        check_shared(official, args.check_shared)
    for name, (precision, N, K, rank, seed) in CASES.items():
        inputs = make_inputs(N, K, seed)
        r = run_official(official, precision, inputs, rank)
        write_case(os.path.join(args.out, name), precision, N, K, rank, seed, inputs, r, commit)
        rel = ((r["y_q"] - r["y_fp"]).norm() / r["y_fp"].norm()).item()
        print(f"{name}: written; deepcompressor's output {rel:.4f} (relative) from the 16-bit layer's")


if __name__ == "__main__":
    main()
