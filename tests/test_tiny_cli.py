"""`python <file>.py --prompt ...` with no other argument: the committed tiny model writes a 64x64 PNG in which the
scorer reads the prompt's colour and background (shape and count are each file's fidelity tests)."""
import importlib
import os

import pytest
from PIL import Image

import shapes_score
from conftest import ROOT

RUNS = [  # file, prompt, its committed tiny files
    ("sana", "a red circle on a blue background", ["sana_tiny.safetensors", "dcae_tiny.safetensors"]),
    ("hart", "a blue triangle on a yellow background",
     ["hart_tiny.safetensors", "hart_tiny_tokenizer.safetensors", "hart_tiny_tokenizer.json"]),
    ("dcar", "a red circle on a blue background",
     ["dcar_tiny.safetensors", "dcar_tiny_dcht.safetensors", "dcar_tiny_tokenizer.json"]),
]


@pytest.mark.parametrize("name,prompt,weights", RUNS, ids=[r[0] for r in RUNS])
def test_cli_tiny_default(name, prompt, weights, tmp_path):
    missing = [w for w in weights if not os.path.isfile(os.path.join(ROOT, "weights", w))]
    assert not missing, f"committed weights missing: {missing}"
    out = tmp_path / f"{name}.png"
    importlib.import_module(name).main(["--prompt", prompt, "--out", str(out), "--device", "cpu"])
    scene = shapes_score.read_scene(Image.open(out))
    words = prompt.split()
    assert Image.open(out).size == (64, 64)
    assert (scene["color"], scene["background"]) == (words[1], words[-2]), scene
