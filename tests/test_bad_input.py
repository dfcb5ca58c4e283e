"""Bad input, as a new user types it. Each row is one command line (or one loader call) and the sentence it must
print. A command-line row must exit with code 2 after printing exactly one line, `error: <sentence>`, with no
traceback, having written no file and changed none (the working folder, the fixture's files and weights/ are
checked); a row marked `early` must do so before any model is loaded or trained (the loaders are replaced by
ones that fail the test). A call row must raise ValueError or FileNotFoundError with the sentence in one line.
Paths in braces are the broken files made by the `bad` fixture below. A new method file adds its rows here."""
import os
import pickle
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dcae
import fast_dllm
import hart
import sana

# torch warns about the pickle protocol of the legacy pickle below while it refuses to unpickle it: expected
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
DCAE_DIFFUSERS = os.path.join(FIX, "dcae", "tiny-f16c16-sana-diffusers")
LLADA = os.path.join(FIX, "fast_dllm", "llada_tiny_a")  # a LLaDA folder as published (it has no tokenizer.json)
SANA_PIPE = os.path.join(FIX, "sana", "pipeline_flow_dpm_20step")  # a tiny SANA pipeline folder, without tokenizer/
SANA_PROMPT = "a red circle on a white background"  # a prompt the tiny SANA draws
SANA_CONTROLNET = os.path.join(FIX, "sana", "controlnet_forward", "controlnet")  # a diffusers ControlNet of 2 blocks
DCAR_CASE = os.path.join(FIX, "dcar", "tiny_s0")  # a DC-AR --ckpt folder (config.yaml, dc-ht/, dc-ar/, t5-tiny/)
HART_CASE = os.path.join(FIX, "hart", "tiny_a")  # a HART --ckpt folder (llm/, tokenizer/)
HART_QWEN2 = os.path.join(FIX, "hart", "qwen2_tiny_a")  # a Qwen2 folder without tokenizer.json

# The functions that load or train a model, per file: `early` rows must never reach them.
LOADERS = {
    "dcae": ("load_tiny", "from_pretrained", "train_tiny"),
    "dcar": ("load_tiny", "load_tiny_dcht", "load_tiny_dcae", "load_pipeline", "load_dcht", "load_generator",
             "load_t5_encoder", "train_tiny", "train_tiny_dcht"),
    "fast_dllm": ("load_tiny", "load_checkpoint", "train_tiny"),
    "hart": ("load_tiny", "load_pipeline", "load_hart", "load_hart_tokenizer", "load_qwen2", "train_tiny",
             "train_tiny_tokenizer"),
    "sana": ("load_tiny", "load_tiny_dcae", "load_pipeline", "load_transformer", "load_text_encoder", "load_vae",
             "train_tiny", "load_controlnet", "load_tiny_controlnet", "train_controlnet_tiny"),
    "sana_sprint": ("load_tiny", "load_tiny_dcae", "load_pipeline", "load_transformer", "load_text_encoder",
                    "load_vae", "train_tiny"),
    "svdquant": ("load_tiny", "load_tiny_dcae", "load_pipeline", "load_transformer", "load_text_encoder",
                 "load_vae", "train_tiny", "load_nunchaku", "load_tiny_quantized"),
}


class Pickled:
    """An object whose unpickling would run code: weights_only=True must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo this should never run",))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    paths = {}

    def path(name):
        paths[name] = str(d / name)
        return d / name

    save_file({"w": torch.zeros(1000)}, str(path("whole.safetensors")))
    save_file({"w": torch.zeros(3)}, str(path("meta_not_json.safetensors")), metadata={"config": "{not json"})
    data = (d / "whole.safetensors").read_bytes()
    path("cut.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download
    path("cut.json").write_text('{"_class_name": "AutoencoderDC", "latent_')
    torch.save({"w": torch.zeros(1000)}, str(path("whole.pth")))
    data = (d / "whole.pth").read_bytes()
    path("cut.pth").write_bytes(data[: len(data) // 2])
    torch.save({"w": torch.zeros(3), "obj": Pickled()}, str(path("code.pth")))
    with open(path("code.bin"), "wb") as f:  # a legacy (non-zip) pickle, as old pytorch_model.bin files are
        pickle.dump({"obj": Pickled()}, f)
    path("text.pth").write_text("this is not a checkpoint\n")
    path("text.png").write_text("this is not an image\n")
    Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).save(path("scene.png"))  # a 64x64 control image
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path("small.png"))  # smaller than a latent cell
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(path("photo_input.png"))  # the user's, untagged
    paths["photo.png"] = str(d / "photo.png")  # an --out whose <out>_input.png is the user's
    path("folder").mkdir()
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # a PNG claiming 20000x20000 RGB, with no pixels
    path("huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                                 + chunk(b"IEND", b""))
    # DC-AE folders: a config.json cut short, and whole config + weights cut short
    path("list.json").write_text("[1, 2, 3]\n")  # JSON, but not an object
    path("deep.json").write_text("[" * 200_000 + "]" * 200_000)  # deeper than Python's recursion limit
    for name, config, weights in [("dcae_cut_config", "cut.json", None), ("dcae_cut_weights", None, "cut"),
                                  ("dcae_list_config", "list.json", None), ("dcae_deep_config", "deep.json", None)]:
        f = path(name)
        f.mkdir()
        src = open(os.path.join(DCAE_DIFFUSERS, "config.json")).read()
        (f / "config.json").write_text(src if config is None else (d / config).read_text())
        w = open(os.path.join(DCAE_DIFFUSERS, "diffusion_pytorch_model.safetensors"), "rb").read()
        (f / "diffusion_pytorch_model.safetensors").write_bytes(w if weights is None else w[: len(w) // 2])
    # LLaDA folders (with a tokenizer.json, so that the CLI reaches the weights): whole, a config.json cut short,
    # weights cut short, a pytorch_model.bin holding code, a text file as pytorch_model.bin
    tokenizer = open(os.path.splitext(fast_dllm.TINY_WEIGHTS)[0] + "_tokenizer.json").read()
    config = open(os.path.join(LLADA, "config.json")).read()
    weights = open(os.path.join(LLADA, "model.safetensors"), "rb").read()
    for name, files in [
        ("llada", {"config.json": config, "model.safetensors": weights}),
        ("llada_cut_config", {"config.json": config[: len(config) // 2], "model.safetensors": weights}),
        ("llada_cut_weights", {"config.json": config, "model.safetensors": weights[: len(weights) // 2]}),
        ("llada_code_bin", {"config.json": config, "pytorch_model.bin": (d / "code.bin").read_bytes()}),
        ("llada_text_bin", {"config.json": config, "pytorch_model.bin": (d / "text.pth").read_bytes()}),
        ("llada_bool_layers", {"config.json": re.sub(r'"n_layers": \d+', '"n_layers": true', config),
                               "model.safetensors": weights}),  # true == 1: it used to load 1 layer of the 2
    ]:
        f = path(name)
        f.mkdir()
        for file, content in {"tokenizer.json": tokenizer, **files}.items():
            (f / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    path("fast_dllm_tiny.safetensors").write_bytes(open(fast_dllm.TINY_WEIGHTS, "rb").read())  # no tokenizer beside
    # SANA pipeline folders (the tiny one of the fixtures, with the tiny word-level tokenizer): whole, the
    # transformer's config.json cut short, its weights cut short
    config = open(os.path.join(SANA_PIPE, "transformer", "config.json")).read()
    weights = open(os.path.join(SANA_PIPE, "transformer", "diffusion_pytorch_model.safetensors"), "rb").read()
    for name, cfg, w in [("sana_pipe", config, weights), ("sana_cut_config", config[: len(config) // 2], weights),
                         ("sana_cut_weights", config, weights[: len(weights) // 2]),
                         ("sana_str_layers", re.sub(r'"num_layers": \d+', '"num_layers": "2"', config), weights),
                         ("sana_no_layers", re.sub(r'"num_layers": \d+,', '', config), weights)]:
        f = path(name)
        (f / "transformer").mkdir(parents=True)
        (f / "transformer" / "config.json").write_text(cfg)
        (f / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(w)
        for sub in ("text_encoder", "vae", "scheduler"):
            os.symlink(os.path.join(SANA_PIPE, sub), f / sub)
        (f / "tokenizer").mkdir()
        sana.build_tiny_tokenizer().save(str(f / "tokenizer" / "tokenizer.json"))
    # DC-AR --ckpt folders: the fixture's with one part missing, or its generator replaced by code or by another
    # model's weights
    for name, change in [("dcar_no_t5", "t5-tiny"), ("dcar_code_bin", "dc-ar"), ("dcar_wrong_bin", "dc-ar")]:
        f = path(name)
        f.mkdir()
        for part in ("config.yaml", "dc-ht", "dc-ar", "t5-tiny"):
            if part != change:
                os.symlink(os.path.join(DCAR_CASE, part), f / part)
        if name != "dcar_no_t5":
            (f / "dc-ar").mkdir()
            (f / "dc-ar" / "pytorch_model.bin").write_bytes((d / "code.bin").read_bytes() if name == "dcar_code_bin"
                                                           else (d / "whole.pth").read_bytes())
    path("bad.yaml").write_text("model:\n  generator\n")
    # HART --ckpt folders: the fixture's, its EMA weights replaced by code or by another model's weights, a config
    # with a flag this file does not implement; a Qwen2 folder with a tokenizer.json (and the wrong width)
    for name in ("hart_ckpt", "hart_code_bin", "hart_wrong_bin", "hart_gpt2"):
        f = path(name)
        f.mkdir()
        os.symlink(os.path.join(HART_CASE, "tokenizer"), f / "tokenizer")
        if name == "hart_ckpt":
            os.symlink(os.path.join(HART_CASE, "llm"), f / "llm")
            continue
        (f / "llm").mkdir()
        config = open(os.path.join(HART_CASE, "llm", "config.json")).read()
        (f / "llm" / "config.json").write_text(config.replace('"llama"', '"gpt2"') if name == "hart_gpt2" else config)
        (f / "llm" / "ema_model.bin").write_bytes((d / "code.bin").read_bytes() if name == "hart_code_bin"
                                                  else (d / "whole.pth").read_bytes())
    f = path("hart_qwen2")
    f.mkdir()
    for file in os.listdir(HART_QWEN2):
        os.symlink(os.path.join(HART_QWEN2, file), f / file)
    hart.build_tiny_tokenizer().save(str(f / "tokenizer.json"))
    # weights holding a NaN (a training run that diverged): the tiny SANA (its tokenizer beside), a DC-AE folder and
    # a LLaDA folder
    def with_nan(src, dst):
        with safe_open(src, "pt") as f:
            meta = f.metadata()
        sd = load_file(src)
        first = sorted(k for k, v in sd.items() if v.is_floating_point())[0]
        sd[first] = sd[first].clone()
        sd[first].view(-1)[0] = float("nan")
        save_file(sd, str(dst), metadata=meta)
    with_nan(sana.TINY_WEIGHTS, path("sana_nan.safetensors"))
    (d / "sana_nan_tokenizer.json").write_bytes(open(os.path.splitext(sana.TINY_WEIGHTS)[0] + "_tokenizer.json",
                                                     "rb").read())
    path("dcae_nan").mkdir()
    (d / "dcae_nan" / "config.json").write_text(open(os.path.join(DCAE_DIFFUSERS, "config.json")).read())
    with_nan(os.path.join(DCAE_DIFFUSERS, "diffusion_pytorch_model.safetensors"),
             d / "dcae_nan" / "diffusion_pytorch_model.safetensors")
    path("llada_nan").mkdir()
    for file in ("config.json", "tokenizer.json"):
        (d / "llada_nan" / file).write_bytes((d / "llada" / file).read_bytes())
    with_nan(os.path.join(LLADA, "model.safetensors"), d / "llada_nan" / "model.safetensors")
    # training folders for `sana.py --train --data`: one good scene with its caption, then one broken thing each
    for name, files in [("data_ok", {"a.png": "scene.png", "a.txt": SANA_PROMPT}),
                        ("data_no_caption", {"a.png": "scene.png", "a.txt": SANA_PROMPT, "b.png": "scene.png"}),
                        ("data_bad_image", {"a.png": "text.png", "a.txt": SANA_PROMPT}),
                        ("data_bad_caption", {"a.png": "scene.png", "a.txt": "a purple hexagon on a white background"}),
                        ("data_bad_jsonl", {"a.png": "scene.png", "metadata.jsonl": '{"file_name": "a.png"}\n'})]:
        f = path(name)
        f.mkdir()
        for file, content in files.items():
            (f / file).write_bytes((d / content).read_bytes() if content.endswith(".png") else content.encode())
    paths["sana_transformer_only"] = os.path.join(FIX, "sana", "transformer_sana10")
    paths["svdquant_tiny"] = os.path.join(WEIGHTS, "svdquant_tiny.safetensors")
    paths["dcae_diffusers"] = DCAE_DIFFUSERS
    paths["unwritable"] = "/proc/out.png"  # not writable even for root
    return paths


WEIGHTS = os.path.join(os.path.dirname(FIX), "..", "weights")  # the committed tiny weights


def files_as_they_are(*folders):
    """{path: (size, modification time in ns)} of every file under the folders (links not followed): a file
    written, rewritten or removed shows."""
    return {os.path.join(root, name): (os.lstat(os.path.join(root, name)).st_size,
                                       os.lstat(os.path.join(root, name)).st_mtime_ns)
            for folder in folders for root, _, names in os.walk(folder) for name in names}


def fill(args, bad):
    return [re.sub(r"\{([\w.]+)\}", lambda m: bad[m[1]], a) for a in args]


CLI = [  # (file, argv, sentence, early)
    # dcae.py
    ("dcae", ["--device", "banana"], "unknown device 'banana'", True),
    ("dcae", ["--device", "mps"], "no Apple GPU", True),
    ("dcae", ["--dtype", "float8"], "dtype 'float8' is not one of float32, bfloat16, float16", True),
    ("dcae", ["--image", "/no/such.png"], "image /no/such.png does not exist", True),
    ("dcae", ["--image", "{text.png}"], "cannot read", False),
    ("dcae", ["--image", "{folder}"], "is a folder: give an image file", True),
    ("dcae", ["--image", "/dev/zero"], "image /dev/zero is not a regular file: give an image file", True),
    ("dcae", ["--image", "{huge.png}"], "has more than the 178,956,970 pixels Pillow reads (a guard against "
                                        "decompression bombs): resize it", False),
    ("dcae", ["--out", "{folder}"], "is a folder; give a file name", True),
    ("dcae", ["--out", "rec.xyz"], "the file name must end in .png", True),
    ("dcae", ["--out", "{unwritable}"], "cannot write to the folder /proc", True),
    ("dcae", ["--out", "/no/such/folder/rec.png"], "the folder /no/such/folder does not exist", True),
    ("dcae", ["--ckpt", "/no/such/folder"], "checkpoint folder /no/such/folder does not exist", False),
    ("dcae", ["--ckpt", "{whole.safetensors}"], "is a file; give the checkpoint folder", False),
    ("dcae", ["--ckpt", "{dcae_cut_config}"], "config.json is not valid JSON", False),
    ("dcae", ["--ckpt", "{dcae_cut_weights}"], "is not a readable safetensors file", False),
    ("dcae", ["--ckpt", "{dcae_list_config}"], "config.json holds a JSON list, not the object {...} of a config",
     False),
    ("dcae", ["--ckpt", "{dcae_deep_config}"], "config.json is nested too deeply to be a config", False),
    ("dcae", ["--ckpt", "{dcae_diffusers}", "--model", "dc-ae-f99"], "unknown preset 'dc-ae-f99'", True),
    ("dcae", ["--model", "dc-ae-f32c32-sana-1.0"], "give --ckpt too", True),
    ("dcae", ["--train", "--train-steps", "0"], "--train-steps must be at least 1", True),
    ("dcae", ["--train", "--train-out", "/proc/dcae.safetensors"], "cannot write to the folder /proc", True),
    ("dcae", ["--ckpt", "{dcae_nan}"], "holds NaN or inf in 1 tensor(s) (", False),
    ("dcae", ["--image", "{scene.png}", "--out", "{scene.png}"], "is the input image, which the reconstruction would "
                                                                  "overwrite", True),
    ("dcae", ["--out", "{photo.png}"], "photo_input.png exists and is not a synthetic input drawn by dcae.py", True),
    ("dcae", ["--train", "--image", "{scene.png}"], "--image does nothing with --train, which writes --train-out: "
                                                    "leave it out", True),
    ("dcae", ["--train", "--out", "x.png"], "--out does nothing with --train", True),
    ("dcae", ["--gan"], "--gan does nothing without --train: leave it out", True),
    ("dcae", ["--train-steps", "3"], "--train-steps does nothing without --train", True),
    ("dcae", ["--train-out", "x.safetensors"], "--train-out does nothing without --train", True),
    ("dcae", ["--train", "--dtype", "bfloat16"], "--dtype does nothing with --train, whose recipe trains in float32 "
     "on every CPU", True),
    ("fast_dllm", ["--train", "--dtype", "float32"], "--dtype does nothing with --train, whose recipe trains in "
     "float32 on every CPU", True),
    ("sana", ["--train", "--dtype", "float16"], "with --train, --dtype is float32 or bfloat16 (autocast over float32 "
     "weights), not 'float16'", True),
    ("hart", ["--train", "--dtype", "float16"], "with --train, --dtype is float32 or bfloat16", True),
    ("dcar", ["--train", "--dtype", "banana"], "with --train, --dtype is float32 or bfloat16", True),
    ("dcae", ["--tile", "60"], "the tile size must be a positive multiple of 8 pixels, the compression of this DC-AE, "
     "not 60", False),
    ("dcae", ["--tile", "64", "--tile-overlap", "64"], "the tile overlap must be a multiple of 8 pixels smaller than "
     "the tile (64), not 64", False),
    ("dcae", ["--tile", "64", "--tile-overlap", "12"], "the tile overlap must be a multiple of 8 pixels smaller than "
     "the tile (64), not 12", False),
    ("dcae", ["--tile", "-8"], "the tile size must be a positive multiple of 8 pixels", False),
    ("dcae", ["--train", "--tile"], "--tile does nothing with --train", True),
    # dcar.py
    ("dcar", ["--device", "banana"], "unknown device 'banana'", True),
    ("dcar", ["--dtype", "float8"], "dtype 'float8' is not one of float32, bfloat16, float16", True),
    ("dcar", ["--prompt", "  "], "the prompt is empty", True),
    ("dcar", ["--prompt", SANA_PROMPT, "--steps", "0"], "--steps must be at least 1", True),
    ("dcar", ["--prompt", SANA_PROMPT, "--guidance", "nan"], "--guidance must be a finite number, not nan", True),
    ("dcar", ["--prompt", "a purple hexagon on a white background"], 'does not know "purple", "hexagon"', True),
    ("dcar", ["--prompt", "a red circle"], "'a red circle' is not one", True),
    ("dcar", ["--prompt", SANA_PROMPT, "--out", "{folder}"], "is a folder; give a file name", True),
    ("dcar", ["--prompt", SANA_PROMPT, "--out", "x.txt"], "the file name must end in .png", True),
    ("dcar", ["--prompt", "a cat", "--ckpt", "/no/such/folder"], "--ckpt /no/such/folder does not exist", True),
    ("dcar", ["--prompt", "a cat", "--ckpt", "{folder}"], "has neither config.yaml nor pytorch_model.bin", False),
    ("dcar", ["--prompt", "a cat", "--ckpt", "{whole.pth}"], "dc-ht not found (give --tokenizer and --text-encoder "
                                                             "where", False),
    ("dcar", ["--prompt", "a cat", "--ckpt", "{dcar_no_t5}"], "t5-tiny not found (named in ", False),
    ("dcar", ["--prompt", SANA_PROMPT, "--tokenizer", "{folder}"], "--tokenizer and --text-encoder go with --ckpt",
     True),
    ("dcar", ["--prompt", "a cat", "--ckpt", "{whole.pth}", "--text-encoder", "/no/t5"],
     "--text-encoder /no/t5 does not exist", True),
    ("dcar", ["--prompt", "a cat", "--ckpt", "{whole.pth}", "--tokenizer", os.path.join(DCAR_CASE, "dc-ht"),
              "--text-encoder", HART_QWEN2], "config.json describes a 'qwen2' model, not a T5: DC-AR's text encoder is "
                                             "t5-base", False),
    ("dcar", ["--prompt", "a cat", "--ckpt", "{dcar_code_bin}"], "holds pickled Python objects besides tensors; it "
                                                                 "was not loaded", False),
    ("dcar", ["--prompt", "a cat", "--ckpt", "{dcar_wrong_bin}"], "does not fit the model: ", False),
    ("dcar", ["--train", "--train-steps", "0"], "--train-steps must be at least 1", True),
    ("dcar", ["--prompt", SANA_PROMPT, "--steps", "1000"], "--steps must be at most 64, the tokens this model "
                                                           "generates (each round commits at least one), not 1000",
     False),
    ("svdquant", ["--prompt", SANA_PROMPT, "--steps", "100000"], "--steps must be between 1 and 1000", True),
    ("dcar", ["--prompt", SANA_PROMPT, "--guidance", "1e30"], "--guidance must be between 0 and 100", True),
    ("dcar", ["--prompt", SANA_PROMPT, "--guidance", "-5"], "--guidance must be between 0 and 100", True),
    ("dcar", ["--train", "--steps", "5"], "--steps does nothing with --train, which writes --train-out", True),
    ("dcar", ["--prompt", SANA_PROMPT, "--train-out", "x.safetensors"], "--train-out does nothing without --train",
     True),
    ("dcar", ["--train", "--train-out", "/proc/d.safetensors"], "cannot write to the folder /proc", True),
    ("dcar", ["--train", "--train-out", "t.png"], "the file name must end in .safetensors", True),
    # sana.py
    ("sana", ["--device", "banana"], "unknown device 'banana'", True),
    ("sana", ["--device", "mps"], "no Apple GPU", True),
    ("sana", ["--dtype", "float8"], "dtype 'float8' is not one of float32, bfloat16, float16", True),
    ("sana", ["--prompt", "  "], "the prompt is empty", True),
    ("sana", ["--prompt", SANA_PROMPT, "--steps", "0"], "--steps must be between 1 and 1000 (the models sample in "
                                                        "20), not 0", True),
    ("sana", ["--prompt", SANA_PROMPT, "--guidance", "nan"], "--guidance must be a finite number, not nan", True),
    ("sana", ["--prompt", SANA_PROMPT, "--guidance", "inf"], "--guidance must be a finite number, not inf", True),
    ("sana", ["--prompt", SANA_PROMPT, "--height", "0"], "--height must be a positive number of pixels, not 0", True),
    ("sana", ["--prompt", SANA_PROMPT, "--width", "-64"], "--width must be a positive number of pixels, not -64", True),
    ("sana", ["--prompt", SANA_PROMPT, "--height", "72"], "positive multiples of 16 for this model, got 72x64", True),
    ("sana", ["--prompt", SANA_PROMPT, "--height", "100000", "--width", "100000"],
     "a 100000x100000 image needs about 3,000.0 GB of memory", True),  # its DC-AE decoding in tiles (auto)
    ("sana", ["--prompt", SANA_PROMPT, "--height", "100000", "--width", "100000", "--tile", "0"],
     "a 100000x100000 image needs about 6,400.0 GB of memory", True),
    ("sana", ["--prompt", SANA_PROMPT, "--tile", "60"], "the tile size must be a positive multiple of 8 pixels, the "
     "compression of this DC-AE, not 60", True),
    ("sana", ["--prompt", SANA_PROMPT, "--tile", "64", "--tile-overlap", "64"], "the tile overlap must be a multiple "
     "of 8 pixels smaller than the tile (64), not 64", True),
    ("sana", ["--train", "--tile"], "--tile does nothing with --train", True),
    ("sana", ["--prompt", "a purple hexagon on a white background"], 'the tiny model does not know "purple", "hexagon"',
     True),
    ("sana", ["--prompt", "a red circle"], "the tiny model draws only prompts of the form \"a/two/three <colour> "
                                           "<shape>[s] on a <colour> background\" with the colours white, black", True),
    ("sana", ["--prompt", "a red circle"], "'a red circle' is not one", True),
    ("sana", ["--prompt", SANA_PROMPT, "--out", "{folder}"], "is a folder; give a file name", True),
    ("sana", ["--prompt", SANA_PROMPT, "--out", "img.xyz"], "the file name must end in .png", True),
    ("sana", ["--prompt", SANA_PROMPT, "--out", "{unwritable}"], "cannot write to the folder /proc", True),
    ("sana", ["--prompt", SANA_PROMPT, "--out", "/no/such/folder/img.png"], "the folder /no/such/folder does not exist",
     True),
    ("sana", ["--prompt", SANA_PROMPT, "--ckpt", "{text.pth}"], "is a file; give the diffusers pipeline folder", True),
    ("sana", ["--prompt", SANA_PROMPT, "--ckpt", "/no/such/folder"], "checkpoint folder /no/such/folder does not exist",
     True),
    ("sana", ["--prompt", SANA_PROMPT, "--ckpt", "{sana_transformer_only}"], "has no text_encoder/ subfolder", True),
    ("sana", ["--prompt", SANA_PROMPT, "--ckpt", "{sana_cut_config}"], "config.json is not valid JSON", True),
    ("sana", ["--prompt", SANA_PROMPT, "--ckpt", "{sana_str_layers}"], "transformer/config.json: depth is '2', not an "
                                                                       "integer", True),
    ("sana", ["--prompt", SANA_PROMPT, "--ckpt", "{sana_no_layers}"], "transformer/config.json is not a complete "
                                                                      "SanaTransformer2DModel config (KeyError: "
                                                                      "'num_layers')", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--ckpt", "{sana_str_layers}"], "depth is '2', not an integer", True),
    ("sana", ["--prompt", SANA_PROMPT, "--ckpt", "{sana_cut_weights}"], "is not a readable safetensors file", False),
    ("sana", ["--prompt", SANA_PROMPT, "--ckpt", "{sana_pipe}", "--height", "17"], "positive multiples of 2", True),
    ("sana", ["--prompt", SANA_PROMPT, "--ckpt", "{sana_pipe}", "--model", "Sana_9B"], "unknown preset 'Sana_9B'", True),
    ("sana", ["--prompt", SANA_PROMPT, "--model", "Sana_600M_512px"], "give --ckpt too", True),
    ("sana", ["--prompt", SANA_PROMPT, "--samples", "0"], "--samples must be at least 1, not 0", True),
    ("sana", ["--prompt", SANA_PROMPT, "--samples", "4", "--ckpt", "{sana_pipe}"], "--samples needs a judge, and a "
     "published model has none offline", True),
    ("sana", ["--prompt", SANA_PROMPT, "--grow", "6"], "--grow goes with --train", True),
    ("sana", ["--train", "--grow", "4"], "--grow must be more than the model's 4 blocks and at most 4 times as many "
                                         "(16), not 4", True),
    ("sana", ["--train", "--grow", "1000"], "--grow must be more than the model's 4 blocks and at most 4 times as "
                                            "many (16), not 1000", True),
    ("sana", ["--prompt", SANA_PROMPT, "--steps", "100000"], "--steps must be between 1 and 1000 (the models sample "
                                                             "in 20), not 100000", True),
    ("sana", ["--prompt", SANA_PROMPT, "--tiny-weights", "/no/such.safetensors"], "/no/such.safetensors is missing",
     True),
    ("sana", ["--prompt", SANA_PROMPT, "--tiny-weights", "{text.pth}"], "is not a PyTorch checkpoint", True),
    ("sana", ["--prompt", SANA_PROMPT, "--tiny-weights", "{sana_nan.safetensors}"], "holds NaN or inf in 1 tensor(s) "
                                                                                  "(embed_tokens.weight)", False),
    ("sana", ["--prompt", SANA_PROMPT, "--ckpt", "{sana_pipe}", "--tiny-weights", "{text.pth}"],
     "--tiny-weights is the tiny model's; --ckpt loads a published one", True),
    ("sana", ["--prompt", SANA_PROMPT, "--prune-to", "0"], "--prune-to must be between 1 and the model's 4 blocks, "
                                                           "not 0", True),
    ("sana", ["--train", "--train-steps", "0"], "--train-steps must be at least 1", True),
    ("sana", ["--prompt", SANA_PROMPT, "--optimizer", "came"], "--optimizer goes with --train", True),
    ("sana", ["--train-controlnet", "--optimizer", "came"], "--optimizer goes with --train alone", True),
    ("sana", ["--train", "--train-out", "/proc/sana.safetensors"], "cannot write to the folder /proc", True),
    ("sana", ["--prompt", SANA_PROMPT, "--conditioning-scale", "nan"], "--conditioning-scale must be a finite number, "
                                                                       "not nan", True),
    ("sana", ["--prompt", SANA_PROMPT, "--controlnet", "{whole.safetensors}"], "--controlnet goes with --control IMAGE",
     True),
    ("sana", ["--prompt", SANA_PROMPT, "--ckpt", "{sana_pipe}", "--control", "{scene.png}"],
     "--control with --ckpt needs --controlnet", True),
    ("sana", ["--prompt", SANA_PROMPT, "--control", "{scene.png}", "--controlnet", "/no/such.safetensors"],
     "ControlNet /no/such.safetensors does not exist", True),
    ("sana", ["--prompt", SANA_PROMPT, "--control", "/no/such.png", "--controlnet", "{whole.safetensors}"],
     "image /no/such.png does not exist", True),
    ("sana", ["--prompt", SANA_PROMPT, "--control", "{text.png}", "--controlnet", "{whole.safetensors}"], "cannot read",
     True),
    ("sana", ["--prompt", SANA_PROMPT, "--control", "{folder}", "--controlnet", "{whole.safetensors}"],
     "is a folder: give an image file", True),
    ("sana", ["--prompt", SANA_PROMPT, "--control", "{huge.png}", "--controlnet", "{whole.safetensors}"],
     "has more than the 178,956,970 pixels", True),
    ("sana", ["--prompt", SANA_PROMPT, "--control", "{small.png}", "--controlnet", "{whole.safetensors}"],
     "is 8x8: smaller than 16", True),
    ("sana", ["--prompt", SANA_PROMPT, "--control", "{scene.png}", "--controlnet", "{whole.safetensors}", "--height",
              "32"], "the control image is 64x64 and sets the output size, not 64x32", True),
    ("sana", ["--prompt", SANA_PROMPT, "--control", "{scene.png}", "--controlnet", "{whole.safetensors}"],
     "is not a tiny ControlNet written by `python sana.py --train-controlnet`", False),
    ("sana", ["--prompt", SANA_PROMPT, "--ckpt", "{sana_pipe}", "--control", "{scene.png}", "--controlnet",
              "{code.pth}"], "cannot tell which ControlNet", False),
    ("sana", ["--prompt", SANA_PROMPT, "--ckpt", "{sana_pipe}", "--control", "{scene.png}", "--controlnet",
              SANA_CONTROLNET], "a ControlNet of 2 blocks needs a base model of more than 2 blocks, not 2", False),
    ("sana", ["--prompt", SANA_PROMPT, "--control", "{scene.png}", "--out", "{scene.png}"],
     "is the --control image, which the result would overwrite", True),
    ("sana", ["--prompt", SANA_PROMPT, "--guidance", "1e30"], "--guidance must be between 0 and 100 (published models "
                                                              "use about 4.5), not 1e+30", True),
    ("sana", ["--prompt", SANA_PROMPT, "--guidance", "-5"], "--guidance must be between 0 and 100", True),
    ("sana", ["--train", "--data", "/no/such/folder"], "--data /no/such/folder is not a folder of images", True),
    ("sana", ["--train", "--data", "{folder}"], "holds no images (.png, .jpg", True),
    ("sana", ["--train", "--data", "{data_no_caption}"], "data_no_caption/b.png has no caption: put b.txt beside it, "
     "or list it in metadata.jsonl (file_name, text)", True),
    ("sana", ["--train", "--data", "{data_bad_image}"], "data_bad_image/a.png as an image", True),
    ("sana", ["--train", "--data", "{data_bad_caption}"], 'data_bad_caption/a.png: the tiny model does not know '
     '"purple", "hexagon"', True),
    ("sana", ["--train", "--data", "{data_bad_jsonl}"], "metadata.jsonl, line 1: not a JSON object with file_name and "
     "text", True),
    ("sana", ["--train", "--data", "{data_ok}", "--lora-rank", "0"], "--lora-rank must be at least 1, not 0", True),
    ("sana", ["--train", "--data", "{data_ok}", "--lora-alpha", "nan"], "--lora-alpha must be a positive number", True),
    ("sana", ["--train", "--data", "{data_ok}", "--lora-targets", "banana"], "'banana' names no layer of the "
     "transformer", True),
    ("sana", ["--train", "--data", "{data_ok}", "--lora-targets", "conv_depth"], "conv_depth is not a linear layer",
     True),
    ("sana", ["--train", "--data", "{data_ok}", "--full-finetune", "--lora-rank", "8"], "--lora-rank does nothing "
     "with --train --data, which fine-tunes all the weights", True),
    ("sana", ["--train", "--data", "{data_ok}", "--prompt", SANA_PROMPT], "--prompt does nothing with --train --data",
     True),
    ("sana", ["--train", "--data", "{data_ok}", "--train-out", "/proc/l.safetensors"], "cannot write to the folder "
     "/proc", True),
    ("sana", ["--train", "--lora-rank", "8"], "--lora-rank does nothing without --data DIR", True),
    ("sana", ["--train-controlnet", "--data", "{data_ok}"], "--data does nothing with --train-controlnet", True),
    ("sana", ["--train", "--lora", "{whole.safetensors}"], "--lora does nothing with --train", True),
    ("sana", ["--prompt", SANA_PROMPT, "--data", "{data_ok}"], "--data does nothing without --train", True),
    ("sana", ["--prompt", SANA_PROMPT, "--lora-scale", "0.5"], "--lora-scale does nothing without --lora", True),
    ("sana", ["--prompt", SANA_PROMPT, "--lora", "/no/such.safetensors"], "/no/such.safetensors not found", True),
    ("sana", ["--prompt", SANA_PROMPT, "--lora", "{whole.safetensors}"], "w is not a LoRA key", True),
    ("sana", ["--prompt", SANA_PROMPT, "--lora", os.path.join(FIX, "sana", "lora_saved_by_peft", "lora.safetensors")],
     "transformer_blocks.0.attn1.to_k is (192, 192) in this model, the LoRA's is (32, 32): a LoRA for another "
     "model?", False),  # the fixture's LoRA is for a transformer of width 32
    ("svdquant", ["--prompt", SANA_PROMPT, "--lora-scale", "0.5"], "--lora-scale does nothing without --lora", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--lora", "{whole.safetensors}"], "w is not a LoRA key", True),
    ("sana", ["--prompt", SANA_PROMPT, "--conditioning-scale", "0.5"], "--conditioning-scale does nothing without "
                                                                       "--control: leave it out", True),
    ("sana", ["--prompt", SANA_PROMPT, "--negative", "a purple hexagon"], 'the tiny model does not know "purple" of '
                                                                          "--negative, which its tokenizer would drop",
     True),
    ("sana", ["--prompt", SANA_PROMPT, "--train-steps", "3"], "--train-steps does nothing without --train or "
                                                              "--train-controlnet", True),
    ("sana", ["--train", "--prompt", SANA_PROMPT], "--prompt does nothing with --train or --train-controlnet, which "
                                                   "write --train-out", True),
    ("sana", ["--train-controlnet", "--tiny-weights", "{whole.safetensors}"], "--tiny-weights does nothing with "
                                                                              "--train", True),
    ("sana", ["--train", "--train-controlnet"], "--train and --train-controlnet train different models", True),
    ("sana", ["--train-controlnet", "--train-steps", "0"], "--train-steps must be at least 1", True),
    ("sana", ["--train-controlnet", "--train-out", "/proc/c.safetensors"], "cannot write to the folder /proc", True),
    # sana_sprint.py
    ("sana_sprint", ["--device", "banana"], "unknown device 'banana'", True),
    ("sana_sprint", ["--dtype", "float8"], "dtype 'float8' is not one of float32, bfloat16, float16", True),
    ("sana_sprint", ["--prompt", "  "], "the prompt is empty", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--steps", "0"], "--steps must be 1, 2, 3 or 4", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--steps", "20"], "--steps must be 1, 2, 3 or 4 (SANA-Sprint is a 1-4 "
                                                                "step model), not 20", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--guidance", "nan"], "--guidance must be a finite number, not nan", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--guidance", "inf"], "--guidance must be a finite number", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--intermediate-time", "2"], "--intermediate-time must be in (0, pi/2), "
                                                                           "not 2.0", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--intermediate-time", "nan"], "--intermediate-time must be in (0, pi/2)",
     True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--steps", "1", "--intermediate-time", "1.1"], "--intermediate-time sets "
                                                           "the second of two text-to-image steps", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--strength", "0"], "--strength must be in (0, 1], not 0.0", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--strength", "1.5"], "--strength must be in (0, 1], not 1.5", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--strength", "nan"], "--strength must be in (0, 1], not nan", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--height", "0"], "--height must be a positive number of pixels", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--height", "100000", "--width", "100000"],
     "a 100000x100000 image needs about 3,000.0 GB of memory", True),  # its DC-AE decoding in tiles (auto)
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--height", "100000", "--width", "100000", "--tile", "0"],
     "a 100000x100000 image needs about 6,400.0 GB of memory", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--tile", "60"], "the tile size must be a positive multiple of 8 pixels, the "
     "compression of this DC-AE, not 60", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--tile", "64", "--tile-overlap", "64"], "the tile overlap must be a multiple "
     "of 8 pixels smaller than the tile (64), not 64", True),
    ("sana_sprint", ["--train", "--tile"], "--tile does nothing with --train", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--height", "72"], "positive multiples of 16 for this model, got 72x64",
     True),
    ("sana_sprint", ["--prompt", "a purple hexagon on a white background"], 'does not know "purple", "hexagon"', True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--image", "/no/such.png"], "image /no/such.png does not exist", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--image", "{text.png}"], "cannot read", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--image", "/dev/zero"], "is not a regular file", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--image", "{huge.png}"], "has more than the 178,956,970 pixels", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--out", "{folder}"], "is a folder; give a file name", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--guidance", "-5"], "--guidance must be between 0 and 100", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--guidance", "1e30"], "--guidance must be between 0 and 100", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--strength", "0.3"], "--strength does nothing without --image: leave "
                                                                    "it out", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--train-out", "x.safetensors"], "--train-out does nothing without "
                                                                               "--train", True),
    ("sana_sprint", ["--train", "--prompt", SANA_PROMPT], "--prompt does nothing with --train", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--image", "{scene.png}", "--out", "{scene.png}"],
     "is the --image it starts from, which the result would overwrite", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--ckpt", "{text.pth}"], "is a file; give the diffusers pipeline folder",
     True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--ckpt", "/no/such/folder"], "checkpoint folder /no/such/folder does "
                                                                            "not exist", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--ckpt", "{sana_pipe}"], "it is a SANA flow model, not a SANA-Sprint "
                                                                       "model (use sana.py for it)", True),
    ("sana_sprint", ["--prompt", SANA_PROMPT, "--model", "Sana_Sprint_0.6B_1024px"], "give --ckpt too", True),
    ("sana_sprint", ["--train", "--train-steps", "0"], "--train-steps must be at least 1", True),
    ("sana_sprint", ["--train", "--train-out", "/proc/s.safetensors"], "cannot write to the folder /proc", True),
    # svdquant.py
    ("svdquant", ["--device", "banana"], "unknown device 'banana'", True),
    ("svdquant", ["--dtype", "float8"], "dtype 'float8' is not one of float32, bfloat16, float16", True),
    ("svdquant", ["--prompt", "  "], "the prompt is empty", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--steps", "0"], "--steps must be between 1 and 1000", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--guidance", "nan"], "--guidance must be a finite number, not nan", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--rank", "-1"], "--rank must be 0 (no branch) or more, not -1", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--height", "0"], "--height must be a positive number of pixels", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--height", "100000", "--width", "100000"],
     "a 100000x100000 image needs about 3,000.0 GB of memory", True),  # its DC-AE decoding in tiles (auto)
    ("svdquant", ["--prompt", SANA_PROMPT, "--height", "100000", "--width", "100000", "--tile", "0"],
     "a 100000x100000 image needs about 6,400.0 GB of memory", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--tile", "60"], "the tile size must be a positive multiple of 8 pixels, the "
     "compression of this DC-AE, not 60", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--tile", "64", "--tile-overlap", "64"], "the tile overlap must be a multiple "
     "of 8 pixels smaller than the tile (64), not 64", True),
    ("svdquant", ["--train", "--tile"], "--tile does nothing with --train", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--height", "72"], "positive multiples of 16 for this model, got 72x64",
     True),
    ("svdquant", ["--prompt", "a purple hexagon on a white background"], 'does not know "purple", "hexagon"', True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--out", "{folder}"], "is a folder; give a file name", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--save", "{folder}"], "is a folder; give a file name, e.g. ", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--save", "q.png"], "--save q.png: the file name must end in .safetensors",
     True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--ckpt", "/no/such/file"], "--ckpt /no/such/file does not exist", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--ckpt", "{whole.safetensors}"], "holds the transformer only: give --base",
     True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--ckpt", "{whole.safetensors}", "--base", "{sana_pipe}"],
     "has no 'config' metadata: not a nunchaku single-file checkpoint", True),
    ("svdquant", ["--train", "--train-steps", "0"], "--train-steps must be at least 1", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--ckpt", "{meta_not_json.safetensors}", "--base", "{sana_pipe}"],
     "meta_not_json.safetensors: its 'config' metadata is not a SANA transformer config (JSONDecodeError: ", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--guidance", "1e30"], "--guidance must be between 0 and 100", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--guidance", "-5"], "--guidance must be between 0 and 100", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--base", "{sana_pipe}"], "--base goes with a nunchaku --ckpt file", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--ckpt", "{svdquant_tiny}", "--base", "{sana_pipe}", "--save",
                  "q.safetensors"], "--save does nothing with a nunchaku --ckpt, which is quantized already", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--ckpt", "{svdquant_tiny}", "--base", "{sana_pipe}", "--rank", "8"],
     "--rank does nothing with a nunchaku --ckpt", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--ckpt", "{svdquant_tiny}", "--base", "{sana_pipe}", "--precision",
                  "nvfp4"], "--precision does nothing with a nunchaku --ckpt", True),
    ("svdquant", ["--prompt", SANA_PROMPT, "--train-steps", "2"], "--train-steps does nothing without --train", True),
    ("svdquant", ["--train", "--save", "q.safetensors"], "--save does nothing with --train", True),
    ("svdquant", ["--train", "--train-out", "/proc/s.safetensors"], "cannot write to the folder /proc", True),
    # fast_dllm.py
    ("fast_dllm", ["--device", "banana"], "unknown device 'banana'", True),
    ("fast_dllm", ["--device", "mps"], "no Apple GPU", True),
    ("fast_dllm", ["--dtype", "float8"], "dtype 'float8' is not one of float32, bfloat16, float16", True),
    ("fast_dllm", ["--steps", "0"], "steps 0 must be a positive multiple of the number of blocks 1", True),
    ("fast_dllm", ["--steps", "-5"], "steps -5 must be a positive multiple", True),
    ("fast_dllm", ["--gen-length", "0"], "gen_length 0 must be at least 1", True),
    ("fast_dllm", ["--block-length", "0"], "block_length 0 must be at least 1", True),
    ("fast_dllm", ["--gen-length", "40"], "gen_length 40 must be a multiple of block_length 32", True),
    ("fast_dllm", ["--threshold", "1.5"], "threshold 1.5 must be in (0, 1]", True),
    ("fast_dllm", ["--threshold", "-1"], "threshold -1.0 must be in (0, 1]", True),
    ("fast_dllm", ["--threshold", "nan"], "threshold nan must be in (0, 1]", True),
    ("fast_dllm", ["--threshold", "0.9", "--factor", "1"], "give either a threshold or a factor", True),
    ("fast_dllm", ["--factor", "0"], "factor 0.0 must be a positive number", True),
    ("fast_dllm", ["--factor", "-2"], "factor -2.0 must be a positive number", True),
    ("fast_dllm", ["--factor", "nan"], "factor nan must be a positive number", True),
    ("fast_dllm", ["--temperature", "-1"], "temperature -1.0 must be 0 (greedy) or a positive number", True),
    ("fast_dllm", ["--temperature", "nan"], "temperature nan must be 0 (greedy)", True),
    ("fast_dllm", ["--guidance", "nan"], "guidance nan must be 0 (off) or a positive number", True),
    ("fast_dllm", ["--guidance", "1", "--cache", "dual"], "only implemented for the LLaDA baseline sampler", True),
    ("fast_dllm", ["--arch", "dream", "--guidance", "1"], "only implemented for the LLaDA baseline sampler", True),
    ("fast_dllm", ["--arch", "dream", "--factor", "1"], "the factor rule is LLaDA's; Dream's samplers take a threshold",
     True),
    ("fast_dllm", ["--arch", "dream", "--cache", "prefix", "--steps", "1"], "needs at least 2 steps per block", True),
    ("fast_dllm", ["--arch", "dream", "--threshold", "0.9", "--steps", "5"],
     "gen_length 32 must be a multiple of steps 5", True),
    ("fast_dllm", ["--arch", "dream", "--ckpt", "x"], "--arch picks a tiny model", True),
    ("fast_dllm", ["--arch", "dream", "--cache", "dual", "--alg", "topk_margin"],
     "alg 'topk_margin' is for Dream's own sampler (cache none)", True),
    ("fast_dllm", ["--prompt", "  "], "the prompt is empty", True),
    ("fast_dllm", ["--prompt", "hello"], "the tiny model only sorts 3 to 6 digits 0-9", True),
    ("fast_dllm", ["--prompt", "sort 31"], "the tiny model only sorts 3 to 6 digits 0-9", True),
    ("fast_dllm", ["--prompt", "sort \uff18\uff13\uff11\uff15"], "only sorts 3 to 6 digits 0-9", True),  # full-width
    ("fast_dllm", ["--prompt", "sort \u0668\u0663\u0661\u0665"], "only sorts 3 to 6 digits 0-9", True),  # Arabic-Indic
    ("fast_dllm", ["--out", "{folder}"], "is a folder; give a file name", True),
    ("fast_dllm", ["--out", "answer.png"], "the file name must end in .txt", True),
    ("fast_dllm", ["--out", "/proc/answer.txt"], "cannot write to the folder /proc", True),
    # hart.py
    ("hart", ["--device", "banana"], "unknown device 'banana'", True),
    ("hart", ["--dtype", "float8"], "dtype 'float8' is not one of float32, bfloat16, float16", True),
    ("hart", ["--prompt", "  "], "the prompt is empty", True),
    ("hart", ["--prompt", SANA_PROMPT, "--guidance", "nan"], "--guidance must be a finite number, not nan", True),
    ("hart", ["--prompt", SANA_PROMPT, "--top-k", "0"], "--top-k must be at least 1, not 0", True),
    ("hart", ["--prompt", SANA_PROMPT, "--top-p", "1.5"], "--top-p must be in [0, 1), not 1.5", True),
    ("hart", ["--prompt", "a purple hexagon on a white background"], 'does not know "purple", "hexagon"', True),
    ("hart", ["--prompt", "a red circle"], "'a red circle' is not one", True),
    ("hart", ["--prompt", SANA_PROMPT, "--out", "{folder}"], "is a folder; give a file name", True),
    ("hart", ["--prompt", SANA_PROMPT, "--out", "x.txt"], "the file name must end in .png", True),
    ("hart", ["--prompt", SANA_PROMPT, "--text-encoder", "{folder}"], "--text-encoder goes with --ckpt", True),
    ("hart", ["--prompt", "a cat", "--ckpt", "/no/such/folder"], "--ckpt /no/such/folder does not exist", True),
    ("hart", ["--prompt", "a cat", "--ckpt", "{folder}"], "no tokenizer/ folder beside", False),
    ("hart", ["--prompt", "a cat", "--ckpt", "{hart_ckpt}"], "no Qwen2 text encoder given: pass --text-encoder",
     False),
    ("hart", ["--prompt", "a cat", "--ckpt", "{hart_ckpt}", "--text-encoder", "{folder}"], "has no config.json",
     False),
    ("hart", ["--prompt", "a cat", "--ckpt", "{hart_ckpt}", "--text-encoder", HART_QWEN2], "tokenizer.json not found",
     False),
    ("hart", ["--prompt", "a cat", "--ckpt", "{hart_ckpt}", "--text-encoder", "{hart_qwen2}"],
     "is 64 wide; the transformer reads 32", False),
    ("hart", ["--prompt", "a cat", "--ckpt", "{hart_code_bin}", "--text-encoder", "{hart_qwen2}"],
     "ema_model.bin holds pickled Python objects besides tensors; it was not loaded", False),
    ("hart", ["--prompt", "a cat", "--ckpt", "{hart_wrong_bin}", "--text-encoder", "{hart_qwen2}"],
     "ema_model.bin does not fit the model: ", False),
    ("hart", ["--prompt", "a cat", "--ckpt", "{hart_gpt2}", "--text-encoder", "{hart_qwen2}"],
     "has attn_type='gpt2'; this implementation supports only 'llama'", False),
    ("hart", ["--train", "--train-steps", "0"], "--train-steps must be at least 1", True),
    ("hart", ["--prompt", SANA_PROMPT, "--guidance", "1e30"], "--guidance must be between 0 and 100", True),
    ("hart", ["--prompt", SANA_PROMPT, "--guidance", "-5"], "--guidance must be between 0 and 100", True),
    ("hart", ["--train", "--top-k", "5"], "--top-k does nothing with --train, which writes --train-out", True),
    ("hart", ["--prompt", SANA_PROMPT, "--train-steps", "5"], "--train-steps does nothing without --train", True),
    ("hart", ["--train", "--train-out", "/proc/h.safetensors"], "cannot write to the folder /proc", True),
    ("hart", ["--train", "--train-out", "t.png"], "the file name must end in .safetensors", True),
    ("fast_dllm", ["--out", "/no/such/folder/answer.txt"], "the folder /no/such/folder does not exist", True),
    ("fast_dllm", ["--model", "LLaDA-8B-Instruct"], "give --ckpt too", True),
    ("fast_dllm", ["--ckpt", "{llada}"], "give --prompt", True),
    ("fast_dllm", ["--ckpt", "{llada}", "--prompt", "hi", "--model", "LLaDA-9B"], "unknown preset 'LLaDA-9B'", True),
    ("fast_dllm", ["--ckpt", LLADA, "--prompt", "hi"], "has no tokenizer.json", True),
    ("fast_dllm", ["--ckpt", "/no/such/folder", "--prompt", "hi"], "checkpoint folder /no/such/folder does not exist",
     False),
    ("fast_dllm", ["--ckpt", "{text.pth}", "--prompt", "hi"], "is a file; give the checkpoint folder", False),
    ("fast_dllm", ["--ckpt", "{llada_cut_config}", "--prompt", "hi"], "config.json is not valid JSON", False),
    ("fast_dllm", ["--ckpt", "{llada_cut_weights}", "--prompt", "hi"], "is not a readable safetensors file", False),
    ("fast_dllm", ["--ckpt", "{llada_code_bin}", "--prompt", "hi"], "holds pickled Python objects besides tensors; "
                                                                    "it was not loaded", False),
    ("fast_dllm", ["--ckpt", "{llada_text_bin}", "--prompt", "hi"], "is not a PyTorch checkpoint (neither a zip archive nor a pickle)", False),
    ("fast_dllm", ["--ckpt", "{llada}", "--prompt", "hi", "--model", "tiny-sort"],
     "with another shape: model.transformer.blocks.0.attn_norm.weight (64,) (model: (96,))", False),
    ("fast_dllm", ["--train", "--train-steps", "0"], "--train-steps must be at least 1", True),
    ("fast_dllm", ["--train", "--train-out", "{folder}"], "is a folder; give a file name", True),
    ("fast_dllm", ["--train", "--train-out", "/proc/fd.safetensors"], "cannot write to the folder /proc", True),
    # --seed beyond torch's 64 bits, refused before loading (it failed with "Overflow when unpacking long long" after)
    *[(name, [*argv, "--seed", str(2**70)], f"--seed must be between 0 and 2**63 - 1, not {2**70}", True)
      for name, argv in [("dcae", []), ("dcar", ["--prompt", SANA_PROMPT]), ("fast_dllm", []), ("hart", ["--train"]),
                         ("sana", ["--prompt", SANA_PROMPT]), ("sana", ["--train"]),
                         ("sana_sprint", ["--prompt", SANA_PROMPT]), ("svdquant", ["--prompt", SANA_PROMPT]),
                         ("fast_dllm", ["--train"])]],
    ("fast_dllm", ["--ckpt", "{llada_nan}", "--prompt", "hi"], "holds NaN or inf in 1 tensor(s) (", False),
    ("fast_dllm", ["--ckpt", "{llada_bool_layers}", "--prompt", "hi"], "config.json: n_layers is True, not an integer",
     True),
    ("fast_dllm", ["--guidance", "1e30", "--cache", "none"], "guidance 1e+30 must be 0 (off) or a positive number up "
                                                             "to 100", True),
    ("fast_dllm", ["--steps", "33"], "steps 33 must be at most gen_length 32", True),
    ("fast_dllm", ["--steps", "1000000"], "steps 1000000 must be at most gen_length 32", True),
    ("fast_dllm", ["--gen-length", "8", "--block-length", "8"], "the tiny model answers in 32, 64, 128 tokens, the "
                                                                "lengths it was trained at: --gen-length 8 is not one",
     True),
    ("fast_dllm", ["--gen-length", "4"], "--gen-length 4 is not one", True),
    ("fast_dllm", ["--alg", "entropy"], "--alg orders Dream's tokens; LLaDA's samplers order them by confidence", True),
    ("fast_dllm", ["--train", "--prompt", "sort 8315"], "--prompt does nothing with --train, which writes --train-out",
     True),
    ("fast_dllm", ["--train", "--cache", "dual"], "--cache does nothing with --train", True),
    ("fast_dllm", ["--train-steps", "3"], "--train-steps does nothing without --train: leave it out", True),
]

CALLS = [  # (file, call, sentence)
    ("dcae", lambda m, b: m.read_weights(b["cut.safetensors"]), "is not a readable safetensors file"),
    ("dcae", lambda m, b: m.read_weights(b["cut.pth"]), "cut.pth is a zip archive cut short"),
    ("dcae", lambda m, b: m.read_weights(b["code.pth"]), "holds pickled Python objects besides tensors"),
    ("dcae", lambda m, b: m.read_weights(b["code.bin"]), "holds pickled Python objects besides tensors"),
    ("dcae", lambda m, b: m.read_weights(b["text.pth"]), "is not a PyTorch checkpoint (neither a zip archive nor"),
    ("dcae", lambda m, b: m.read_json(b["cut.json"]), "cut.json is not valid JSON"),
    ("dcae", lambda m, b: m.get_preset("dc-ae-f99"), "unknown preset 'dc-ae-f99'; known: dc-ae-f32c32-in-1.0"),
    ("dcae", lambda m, b: m.from_pretrained(b["dcae_diffusers"], config="junk"), "unknown preset 'junk'"),
    ("dcae", lambda m, b: m.from_pretrained(b["dcae_diffusers"], config=3), "config must be a DCAEConfig"),
    ("dcae", lambda m, b: m.from_pretrained(b["dcae_diffusers"], dtype="float8"), "dtype 'float8' is not one of"),
    ("dcae", lambda m, b: m.from_pretrained(b["dcae_diffusers"], device="banana"), "unknown device 'banana'"),
    ("dcae", lambda m, b: m.from_pretrained(b["whole.safetensors"]), "is a file; give the checkpoint folder"),
    ("dcae", lambda m, b: m.load_tiny(b["whole.safetensors"]), "is not a tiny DC-AE written by"),
    ("dcae", lambda m, b: m.load_tiny(b["text.pth"]), "is not a readable safetensors file"),
    ("dcae", lambda m, b: m.load_state_dict_strict(torch.nn.Linear(2, 3), {"weight": torch.zeros(3, 4),
                                                                           "bias": torch.zeros(3)}, "w.pt"),
     "w.pt does not fit the model: 1 with another shape: weight (3, 4) (model: (3, 2))"),
    # dcar.py
    ("dcar", lambda m, b: m.load_tiny(dcae.TINY_WEIGHTS), "does not fit the model: "),
    ("dcar", lambda m, b: m.load_tiny("/no/such.safetensors"),
     "is missing: it comes with the repository's weights/ folder, or "
     "`python dcar.py --train --train-out /no/such.safetensors` makes it"),
    ("dcar", lambda m, b: m.load_tiny_dcht(b["whole.safetensors"]), "is not a tiny DC-HT written by"),
    ("dcar", lambda m, b: m.load_tiny_dcht("/no/such.safetensors"),
     "`python dcar.py --train` writes it beside its --train-out"),
    ("dcar", lambda m, b: m.parse_yaml(b["bad.yaml"]), "bad.yaml:2 is not a `key: value` line"),
    ("dcar", lambda m, b: m.dcar_config_from_yaml({"model": {}}), "the config has no 'generator' where DC-AR's "
                                                                  "inference yaml has it"),
    ("dcar", lambda m, b: m.load_dcht(b["folder"]), "config.json not found"),
    ("dcar", lambda m, b: m.load_generator(b["code.pth"], m.TINY), "holds pickled Python objects besides tensors"),
    # sana.py
    ("sana", lambda m, b: m.load_transformer(b["code.pth"], preset="Sana_600M_512px"),
     "code.pth holds pickled Python objects besides tensors; it was not loaded"),
    ("sana", lambda m, b: m.load_transformer(b["code.bin"], preset="Sana_600M_512px"),
     "code.bin holds pickled Python objects besides tensors; it was not loaded"),
    ("sana", lambda m, b: m.load_transformer(b["text.pth"], preset="Sana_600M_512px"),
     "text.pth is not a PyTorch checkpoint"),
    ("sana", lambda m, b: m.load_transformer(b["code.pth"]), "cannot tell which model"),
    ("sana", lambda m, b: m.load_transformer(b["sana_pipe"], preset="Sana_9B"),
     "unknown preset 'Sana_9B'; known: Sana_600M_512px"),
    ("sana", lambda m, b: m.load_transformer(b["sana_pipe"], dtype="float8"), "dtype 'float8' is not one of"),
    ("sana", lambda m, b: m.load_transformer(b["sana_pipe"], device="banana"), "unknown device 'banana'"),
    ("sana", lambda m, b: m.load_transformer(b["sana_cut_weights"]),
     "diffusion_pytorch_model.safetensors is not a readable safetensors file"),
    ("sana", lambda m, b: m.load_pipeline(b["sana_cut_config"]), "transformer/config.json is not valid JSON"),
    ("sana", lambda m, b: m.load_pipeline(b["sana_cut_weights"]), "is not a readable safetensors file"),
    ("sana", lambda m, b: m.load_pipeline(b["text.pth"]), "is a file; give the diffusers pipeline folder"),
    ("sana", lambda m, b: m.load_pipeline(b["sana_transformer_only"]), "has no text_encoder/ subfolder"),
    ("sana", lambda m, b: m.load_text_encoder(os.path.join(b["sana_pipe"], "vae")), "not a Gemma-2 text encoder"),
    ("sana", lambda m, b: m.load_vae(os.path.join(b["sana_pipe"], "transformer")), "not an AutoencoderDC"),
    ("sana", lambda m, b: m.load_tiny(dcae.TINY_WEIGHTS), "is not a tiny SANA written by `python sana.py --train`"),
    ("sana", lambda m, b: m.load_tiny(b["whole.safetensors"]), "is not a tiny SANA written by"),
    ("sana", lambda m, b: m.load_tiny("/no/such.safetensors"), "/no/such.safetensors is missing"),
    ("sana", lambda m, b: m.load_tiny(dtype="float8"), "dtype 'float8' is not one of"),
    ("sana", lambda m, b: m.get_preset("Sana_9B"), "unknown preset 'Sana_9B'; known: Sana_600M_512px"),
    ("sana", lambda m, b: m.check_tiny_prompt("a purple hexagon on a white background"),
     'does not know "purple", "hexagon"'),
    ("sana", lambda m, b: m.load_controlnet("/no/such.pth"), "ControlNet /no/such.pth does not exist"),
    ("sana", lambda m, b: m.load_controlnet(b["code.pth"]), "cannot tell which ControlNet"),
    ("sana", lambda m, b: m.load_controlnet(b["code.pth"], preset="Sana_600M_1024px_ControlNet_HED"),
     "code.pth holds pickled Python objects besides tensors; it was not loaded"),
    ("sana", lambda m, b: m.load_controlnet(b["folder"]), "config.json not found"),
    ("sana", lambda m, b: m.load_controlnet(os.path.join(b["sana_pipe"], "transformer")),
     "holds a SanaTransformer2DModel, not a SanaControlNetModel"),
    ("sana", lambda m, b: m.load_controlnet(SANA_CONTROLNET, dtype="float8"), "dtype 'float8' is not one of"),
    ("sana", lambda m, b: m.load_tiny_controlnet("/no/such.safetensors"),
     "is missing: it comes with the repository's weights/ folder, or "
     "`python sana.py --train-controlnet --train-out /no/such.safetensors`"),
    ("sana", lambda m, b: m.load_tiny_controlnet(b["whole.safetensors"]), "is not a tiny ControlNet written by"),
    ("sana", lambda m, b: m.load_tiny_controlnet(b["text.pth"]), "is not a readable safetensors file"),
    ("sana", lambda m, b: m.SanaControlNet(m.PRESETS["tiny"], wiring="nvlabs"),
     "wiring must be 'diffusers' or 'original', not 'nvlabs'"),
    # sana_sprint.py
    ("sana_sprint", lambda m, b: m.load_transformer(b["code.pth"], preset="Sana_Sprint_0.6B_1024px"),
     "code.pth holds pickled Python objects besides tensors; it was not loaded"),
    ("sana_sprint", lambda m, b: m.load_transformer(b["code.pth"]), "cannot tell which model"),
    ("sana_sprint", lambda m, b: m.load_transformer(b["sana_pipe"]), "not a SANA-Sprint model"),
    ("sana_sprint", lambda m, b: m.load_pipeline(b["sana_pipe"]), "not a SANA-Sprint model"),
    ("sana_sprint", lambda m, b: m.load_pipeline(b["sana_transformer_only"]), "has no text_encoder/ subfolder"),
    ("sana_sprint", lambda m, b: m.load_tiny(dcae.TINY_WEIGHTS), "is not a tiny SANA-Sprint written by"),
    ("sana_sprint", lambda m, b: m.load_tiny("/no/such.safetensors"),
     "is missing: it comes with the repository's weights/ folder, or "
     "`python sana_sprint.py --train --train-out /no/such.safetensors`"),
    ("sana_sprint", lambda m, b: m.get_preset("Sana_Sprint_9B"), "unknown preset 'Sana_Sprint_9B'; known: "
                                                               "Sana_Sprint_0.6B_1024px"),
    ("sana_sprint", lambda m, b: m.check_tiny_prompt("a red circle"), "'a red circle' is not one"),
    # svdquant.py
    ("svdquant", lambda m, b: m.load_nunchaku(b["whole.safetensors"]), "has no 'config' metadata"),
    ("svdquant", lambda m, b: m.load_nunchaku(b["cut.safetensors"]), "is not a readable safetensors file"),
    ("svdquant", lambda m, b: m.load_nunchaku(b["meta_not_json.safetensors"]),
     "meta_not_json.safetensors: its 'config' metadata is not a SANA transformer config (JSONDecodeError: "),
    ("svdquant", lambda m, b: m.load_nunchaku("/no/such.safetensors"), "weights file /no/such.safetensors not found"),
    ("svdquant", lambda m, b: m.load_tiny_quantized("/no/such.safetensors"),
     "is missing: it comes with the repository's weights/ folder, or "
     "`python svdquant.py --train --train-out /no/such.safetensors`"),
    ("svdquant", lambda m, b: m.get_preset("Sana_9B"), "unknown preset 'Sana_9B'; known: Sana_600M_512px"),
    # hart.py
    ("hart", lambda m, b: m.load_tiny("/no/such.safetensors"),
     "is missing: it comes with the repository's weights/ folder, or "
     "`python hart.py --train --train-out /no/such.safetensors`"),
    ("hart", lambda m, b: m.load_tiny(dcae.TINY_WEIGHTS), "does not fit the model: "),
    ("hart", lambda m, b: m.load_tiny(dtype="float8"), "dtype 'float8' is not one of"),
    ("hart", lambda m, b: m.load_hart_tokenizer(b["folder"]), "has no config.json"),
    ("hart", lambda m, b: m.load_hart(os.path.join(HART_CASE, "tokenizer"), m.PRESETS["hart-0.7b-1024px-tokenizer"]),
     "describes a 'hart_autoencoder_with_disc' model, not 'hart_transformer_t2i'"),
    ("hart", lambda m, b: m.load_qwen2(os.path.join(HART_CASE, "llm")),
     "describes a 'hart_transformer_t2i' model, not 'qwen2'"),
    ("hart", lambda m, b: m.load_hart(b["folder"], m.PRESETS["hart-0.7b-1024px-tokenizer"]), "has no config.json"),
    ("hart", lambda m, b: m.load_hart(os.path.join(b["hart_wrong_bin"], "llm"), m.PRESETS["hart-0.7b-1024px-tokenizer"]),
     "does not fit the model: 63 missing: blocks.0.attn.proj.bias, "),
    ("hart", lambda m, b: m.check_tiny_prompt("three red circles"), "'three red circles' is not one"),
    # fast_dllm.py
    ("fast_dllm", lambda m, b: m.load_checkpoint(b["llada_cut_config"]), "config.json is not valid JSON"),
    ("fast_dllm", lambda m, b: m.load_checkpoint(b["llada_cut_weights"]),
     "model.safetensors is not a readable safetensors file"),
    ("fast_dllm", lambda m, b: m.load_checkpoint(b["llada_code_bin"]),
     "pytorch_model.bin holds pickled Python objects besides tensors; it was not loaded, since unpickling them could "
     "run code"),
    ("fast_dllm", lambda m, b: m.load_checkpoint(b["llada_text_bin"]), "pytorch_model.bin is not a PyTorch checkpoint"),
    ("fast_dllm", lambda m, b: m.load_checkpoint(b["text.pth"]), "is a file; give the checkpoint folder"),
    ("fast_dllm", lambda m, b: m.load_checkpoint(b["folder"]), "has no config.json: not a LLaDA or Dream checkpoint folder"),
    ("fast_dllm", lambda m, b: m.load_checkpoint(b["llada"], config="junk"), "unknown preset 'junk'; known: LLaDA-8B-Base"),
    ("fast_dllm", lambda m, b: m.load_checkpoint(b["llada"], config=3), "config must be a LLaDAConfig, a DreamConfig or a preset name"),
    ("fast_dllm", lambda m, b: m.load_checkpoint(b["llada"], config="tiny-sort"),
     "with another shape: model.transformer.blocks.0.attn_norm.weight (64,) (model: (96,))"),
    ("fast_dllm", lambda m, b: m.load_checkpoint(b["llada"], dtype="float8"), "dtype 'float8' is not one of"),
    ("fast_dllm", lambda m, b: m.load_checkpoint(b["llada"], device="banana"), "unknown device 'banana'"),
    ("fast_dllm", lambda m, b: m.get_preset("LLaDA-9B"), "unknown preset 'LLaDA-9B'; known: LLaDA-8B-Base"),
    ("fast_dllm", lambda m, b: m.config_from_json(b["cut.json"]), "cut.json is not valid JSON"),
    ("fast_dllm", lambda m, b: m.config_from_json(b["list.json"]), "list.json holds a JSON list, not the object"),
    ("fast_dllm", lambda m, b: m.config_from_json(b["deep.json"]), "deep.json is nested too deeply to be a config"),
    ("sana", lambda m, b: m.read_json(b["deep.json"]), "deep.json is nested too deeply to be a config"),
    ("hart", lambda m, b: m.read_json(b["list.json"]), "list.json holds a JSON list"),
    ("fast_dllm", lambda m, b: m.load_tiny(dcae.TINY_WEIGHTS), "is not a tiny model written by `python fast_dllm.py"),
    ("fast_dllm", lambda m, b: m.load_tiny(b["whole.safetensors"]), "is not a tiny model written by"),
    ("fast_dllm", lambda m, b: m.load_tiny(b["text.pth"]), "is not a readable safetensors file"),
    ("fast_dllm", lambda m, b: m.load_tiny(b["fast_dllm_tiny.safetensors"]), "fast_dllm_tiny_tokenizer.json not found"),
    ("fast_dllm", lambda m, b: m.load_tiny("/no/such.safetensors"),
     "is missing: it comes with the repository's weights/ folder, or "
     "`python fast_dllm.py --train --train-out /no/such.safetensors`"),
    ("fast_dllm", lambda m, b: m.load_tiny(dtype="float8"), "dtype 'float8' is not one of"),
    ("fast_dllm", lambda m, b: m.check_tiny_prompt("sort \uff18\uff13\uff11\uff15"), "only sorts 3 to 6 digits 0-9"),
]


def _run_cli(module, argv, capsys, monkeypatch, early):
    if early:
        def refuse(*a, **k):
            raise AssertionError("the input was checked only after loading or training a model")
        for name in LOADERS[module.__name__]:
            monkeypatch.setattr(module, name, refuse)
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name,argv,sentence,early", CLI, ids=[f"{r[0]} {' '.join(r[1])}" for r in CLI])
def test_cli_refuses_in_one_sentence(name, argv, sentence, early, bad, capsys, monkeypatch, tmp_path):
    if argv[:2] == ["--device", "mps"] and torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU")
    monkeypatch.chdir(tmp_path)  # a relative --out lands here
    before = files_as_they_are(os.path.dirname(bad["whole.safetensors"]), WEIGHTS)
    code, err = _run_cli(__import__(name), fill(argv, bad), capsys, monkeypatch, early)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert sentence in err, err
    assert "Traceback" not in err
    assert not os.listdir(tmp_path), f"a refused run wrote {os.listdir(tmp_path)}"
    assert files_as_they_are(os.path.dirname(bad["whole.safetensors"]), WEIGHTS) == before, "a refused run changed a file"


@pytest.mark.parametrize("name,call,sentence", CALLS, ids=[f"{r[0]}-{i}" for i, r in enumerate(CALLS)])
def test_call_refuses_in_one_sentence(name, call, sentence, bad):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        call(__import__(name), bad)
    assert sentence in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cuda_device_without_a_gpu(capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for name in LOADERS:
        code, err = _run_cli(__import__(name), ["--device", "cuda"], capsys, monkeypatch, early=True)
        assert code == 2 and err == "error: device 'cuda': PyTorch sees no CUDA GPU on this machine\n", err


def test_loaders_take_dtype_names(bad):
    """dtype="float16" given as a string does the right thing."""
    model = dcae.from_pretrained(bad["dcae_diffusers"], dtype="float16")
    assert next(model.parameters()).dtype == torch.float16


def test_sana_loaders_take_dtype_names(bad):
    """dtype="float16" / "bfloat16" given as a string does the right thing in every sana.py loader."""
    for pipe, dtype in [(sana.load_pipeline(bad["sana_pipe"], dtype="float16"), torch.float16),
                        (sana.load_tiny(dtype="bfloat16"), torch.bfloat16)]:
        for part in (pipe.transformer, pipe.text_encoder, pipe.vae):
            assert {p.dtype for p in part.parameters()} == {dtype}


def test_sana_long_prompt_is_not_echoed_whole(capsys, monkeypatch):
    """A 10,000-character prompt outside the tiny model's grammar is refused in a short line, early."""
    code, err = _run_cli(sana, ["--prompt", "x" * 10_000], capsys, monkeypatch, early=True)
    assert code == 2 and 'does not know "' + "x" * 20 + '": it draws only' in err and len(err) < 500, err[:1000]


def test_sana_prompt_longer_than_the_text_length_is_cut_with_a_note(bad, tmp_path, capsys):
    """A prompt longer than the 300 text tokens a published model reads: one note says it was cut, then the
    image is made; the prompt is echoed shortened."""
    sana.main(["--ckpt", bad["sana_pipe"], "--prompt", "red " * 400, "--height", "16", "--width", "16", "--steps", "2",
               "--out", str(tmp_path / "img.png")])
    out = capsys.readouterr().out
    assert "note: the prompt is 102 tokens too long for this model, which reads 300 text tokens" in out, out
    assert (tmp_path / "img.png").exists() and "red " * 16 not in out


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit greyscale PNG (0..65535) reads as the same picture in 8 bits, not as a white image."""
    grey = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 0..65520
    Image.fromarray(grey).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    x = dcae.load_image(str(tmp_path / "deep.png"), 16)  # (1, 3, 64, 64) in [-1, 1]
    want = torch.from_numpy(np.round(grey / 257.0)).float() / 127.5 - 1
    assert torch.allclose(x[0, 0], want) and torch.equal(x[0, 0], x[0, 2])


def test_fast_dllm_out_writes_the_answer(tmp_path, monkeypatch, capsys):
    """fast_dllm.py --out FILE writes the answer there (it used to be ignored without --train)."""
    monkeypatch.chdir(tmp_path)
    fast_dllm.main(["--prompt", "sort 8315", "--out", "answer.txt"])
    answer = capsys.readouterr().out.splitlines()[1]
    assert (tmp_path / "answer.txt").read_text() == answer + "\n" and answer == "1358"


def test_fast_dllm_loaders_take_dtype_names(bad):
    """dtype="float16" given as a string does the right thing in both fast_dllm loaders."""
    model, _ = fast_dllm.load_tiny(dtype="float16")
    llada, _ = fast_dllm.load_checkpoint(bad["llada"], dtype="float16")
    assert {p.dtype for m in (model, llada) for p in m.parameters()} == {torch.float16}


def test_fast_dllm_long_prompt_is_echoed_short(capsys, monkeypatch):
    """A 10,000-character prompt is refused with its first 60 characters, not echoed whole."""
    code, err = _run_cli(fast_dllm, ["--prompt", "sort " + "1" * 10_000], capsys, monkeypatch, early=True)
    assert code == 2 and err.endswith(f"(got 'sort {'1' * 55}')\n") and len(err) < 200, err


class Trained(Exception):
    """Raised by a stand-in train_tiny: the test needs where it was told to write, not a trained model."""


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_train_writes_beside_not_over_the_committed_weights(name, tmp_path, monkeypatch, capsys):
    """--train without --train-out writes the committed file's name in the working folder, never the committed
    weights; run from weights/ itself, it refuses in one sentence naming them."""
    module = __import__(name)

    def record(*args, out=None, **kwargs):
        raise Trained(out)
    monkeypatch.setattr(module, "train_tiny", record)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Trained) as e:
        module.main(["--train", "--train-steps", "1"])
    assert e.value.args[0] == os.path.basename(module.TINY_WEIGHTS), e.value.args
    monkeypatch.chdir(os.path.dirname(module.TINY_WEIGHTS))
    code, err = _run_cli(module, ["--train", "--train-steps", "1"], capsys, monkeypatch, early=True)
    assert code == 2 and err == (f"error: --train would write over the committed weights {module.TINY_WEIGHTS} (the "
                                 f"working folder is theirs): run it from another folder, or give --train-out "
                                 f"{module.TINY_WEIGHTS} to replace them\n"), err


def test_interrupted_save_keeps_the_old_weights(tmp_path, monkeypatch):
    """save_weights writes whole or not at all: a save interrupted half-way (Ctrl-C, a full disk) leaves the file
    that was there, and no temporary file."""
    out = tmp_path / "tiny.safetensors"
    dcae.save_weights({"w": torch.ones(3)}, str(out))
    before = out.read_bytes()

    def half_then_interrupt(tensors, path, metadata=None):
        open(path, "wb").write(b"\0" * 10)
        raise KeyboardInterrupt
    monkeypatch.setattr(dcae, "save_file", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        dcae.save_weights({"w": torch.zeros(3)}, str(out))
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["tiny.safetensors"]


def test_dcae_rewrites_its_own_synthetic_input_only(tmp_path, monkeypatch, capsys):
    """dcae.py without --image writes its synthetic input beside --out: a second run rewrites it (the PNG says
    dcae.py drew it), while a file of the same name that it did not draw is refused and left as it was."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        dcae.main(["--out", "rec.png"])
    assert (tmp_path / "rec.png").exists() and dcae.drawn_here(str(tmp_path / "rec_input.png"))
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "other_input.png")
    before = (tmp_path / "other_input.png").read_bytes()
    code, err = _run_cli(dcae, ["--out", "other.png"], capsys, monkeypatch, early=True)
    assert code == 2 and "other_input.png exists and is not a synthetic input" in err, err
    assert (tmp_path / "other_input.png").read_bytes() == before and not (tmp_path / "other.png").exists()


@pytest.mark.parametrize("name", ["sana", "sana_sprint", "hart", "dcar", "svdquant"])
def test_nan_image_is_refused_not_drawn_black(name):
    """A decoder that puts out NaN (weights broken after loading, a guidance scale that overflows the dtype) makes
    the pipeline refuse in one sentence: the image used to come out black, written with exit code 0."""
    module = __import__(name)
    pipe = (sana if name == "svdquant" else module).load_tiny()  # svdquant samples with the tiny SANA's pipeline
    decoder = (pipe.dcht if name == "dcar" else pipe.vae).decoder  # HART's and DC-AR's codebooks feed the sampler too
    with torch.no_grad():
        for p in decoder.parameters():
            p.fill_(float("nan"))
    g = torch.Generator().manual_seed(0)
    run = {"sana": lambda: pipe.generate([SANA_PROMPT], 64, 64, 2, generator=g),
           "svdquant": lambda: module.Sana.generate(pipe, [SANA_PROMPT], 64, 64, 2, generator=g),
           "sana_sprint": lambda: pipe.generate([SANA_PROMPT], 64, 64, 1, generator=g),
           "hart": lambda: pipe.generate([SANA_PROMPT], generator=g),
           "dcar": lambda: pipe.generate([SANA_PROMPT], 2, generator=g)}[name]
    with pytest.raises(ValueError) as e:
        run()
    assert str(e.value) == "the image came out NaN or inf: broken weights, or a guidance scale too large for the dtype"
