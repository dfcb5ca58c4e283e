"""Shared test set-up and helpers.

Makes the repository root importable (`import dcae`) and this folder too
(`import shapes_score`, `from conftest import assert_close`), from pytest or from `python tests/<file>.py`.
Holds the helpers the test files share: assert_close, assert_recorded_activations,
assert_strict_loading_names_keys, cases, committed, kernel, tiny_fidelity.
Runs Triton kernels in Triton's CPU interpreter when there is no GPU: TRITON_INTERPRET must be set before
Triton is first imported, and any root file may import it, so it is set here, before any test module loads.
Every test gets back the thread count and determinism flag it started with (training sets its own)."""
import functools
import glob
import os
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def kernel(name):
    """kernels/<name>.py loaded by its path, as the root files load it (the same module object): a package named
    `kernels` elsewhere on sys.path, such as Hugging Face's, is never reached."""
    import importlib.util
    module_name = f"_efficient_genai_kernels_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, "kernels", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def assert_close(name, got, want, atol=1e-4, rtol=1e-4):
    """allclose, failing with the name, the max and mean absolute difference and the reference's scale."""
    got, want = got.float(), want.float()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, reference {tuple(want.shape)}"
    diff = (got - want).abs()
    assert torch.allclose(got, want, atol=atol, rtol=rtol), \
        f"{name}: max abs diff {diff.max():.3e}, mean {diff.mean():.3e} (|reference| max {want.abs().max():.3e})"


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Training entry points set the thread count and deterministic algorithms of their recipe: undo it."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def cases(method, *required, forbidden=(), key=None):
    """pytest's parametrize over the case folders of tests/fixtures/<method>/ that hold every path in `required`
    (default: io.safetensors), none in `forbidden`, and, if `key` is given, that tensor in required[0]."""
    from safetensors import safe_open
    required = required or ("io.safetensors",)
    dirs = sorted(d for d in glob.glob(os.path.join(HERE, "fixtures", method, "*")) if os.path.isdir(d))
    dirs = [d for d in dirs if all(os.path.exists(os.path.join(d, r)) for r in required)
            and not any(os.path.exists(os.path.join(d, f)) for f in forbidden)]
    if key:
        dirs = [d for d in dirs if key in safe_open(os.path.join(d, required[0]), "pt").keys()]
    return pytest.mark.parametrize("case", dirs, ids=[os.path.basename(d) for d in dirs])


def committed(*paths):
    """Marks a test that needs committed weight files: where one is missing the test fails, naming it (a clone
    without its weights is broken, not a reason to skip)."""
    def mark(test):
        missing = [os.path.relpath(p, ROOT) for p in paths if not os.path.isfile(p)]
        if not missing:
            return test

        @functools.wraps(test)
        def fail(*args, **kwargs):
            pytest.fail(f"committed weights missing: {', '.join(missing)}")
        return fail
    return mark


def tiny_fidelity(generate, prompts, seeds):
    """(fidelity, images, captions) of the shapes scorer over prompts x seeds. `generate(prompts, generator)` returns
    one (H, W, 3) uint8 image per prompt; one generator per seed draws the noise of the whole batch of prompts."""
    import shapes_score
    images, captions = [], []
    for seed in seeds:
        images += [np.asarray(img) for img in generate(prompts, torch.Generator().manual_seed(seed))]
        captions += prompts
    return shapes_score.fidelity(images, captions), images, captions


def assert_strict_loading_names_keys(m, case, tmp_path, monkeypatch):
    """A SANA-family transformer (`m` is sana or sana_sprint) loaded from the case's original .pth with one key
    missing and one unexpected: the loader names both, in diffusers' names; a path that does not exist raises."""
    sd = m.read_weights(os.path.join(case, "original", "checkpoint.pth"))
    sd.pop("blocks.1.attn.proj.bias")
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "bad.pth")
    cfg = m.config_from_diffusers(m.read_json(os.path.join(case, "transformer", "config.json")))
    monkeypatch.setitem(m.PRESETS, "_fixture", cfg)
    with pytest.raises(ValueError, match=r"1 missing: transformer_blocks\.1\.attn1\.to_out\.0\.bias; "
                                         r"1 unexpected: transformer_blocks\.0\.extra\.weight"):
        m.load_transformer(str(tmp_path / "bad.pth"), preset="_fixture")
    with pytest.raises(FileNotFoundError):
        m.load_transformer(str(tmp_path / "nope"))


def assert_recorded_activations(model, io, args):
    """Run `model(*args)` with forward hooks on the modules whose activations the fixture recorded
    (io["debug.<module>[.i]"]), compare each in the order the modules ran (the first diverging module fails first),
    and return the output. Text-side activations are compared up to the batch's last real token, where the model
    stops (it skips the text padding after it)."""
    acts, hooks = {}, []
    for name, mod in model.named_modules():
        if f"debug.{name}" in io or f"debug.{name}.0" in io:
            def hook(m, inp, out, name=name):
                for i, o in enumerate(out if isinstance(out, tuple) else (out,)):
                    acts[f"debug.{name}" + (f".{i}" if isinstance(out, tuple) else "")] = o
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        out = model(*args)
    for h in hooks:
        h.remove()
    recorded = {k for k in io if k.startswith("debug.")}
    assert recorded <= set(acts), f"fixture activations no module produced: {sorted(recorded - set(acts))}"
    for name in (k for k in acts if k in recorded):  # a dict keeps insertion order: the order the hooks fired
        want = io[name]
        if name.startswith("debug.caption"):
            want = want[:, :acts[name].shape[1]]
        assert_close(name, acts[name], want)
    return out
