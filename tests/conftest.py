"""Shared test set-up and helpers.

Makes the repository root importable (`import dcae`, `import kernels.linear_attention`) and this folder too
(`import shapes_score`, `from conftest import assert_close`), from pytest or from `python tests/<file>.py`.
Runs Triton kernels in Triton's CPU interpreter when there is no GPU: TRITON_INTERPRET must be set before
Triton is first imported, and any root file may import it, so it is set here, before any test module loads.
Every test gets back the thread count and determinism flag it started with (training sets its own)."""
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
