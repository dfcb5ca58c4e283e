"""Triton kernels against their PyTorch references, on the CPU through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU), and how the root files find them: by path, so
that another package named `kernels` (Hugging Face's, which transformers 5 and diffusers import) is never shadowed
by the project's folder, nor answers in its place."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, kernel

la = kernel("linear_attention")

triton_ok = la.triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not triton_ok, reason="needs Triton (on a GPU, or its CPU interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,N,D", [(1, 1, 7, 8), (2, 3, 100, 8), (1, 4, 257, 32), (2, 2, 64, 32)])
def test_linear_attention_triton_matches_reference(B, H, N, D, dtype):
    g = torch.Generator().manual_seed(B * 1000 + N)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = q.to(device), k.to(device), v.to(device)
    out = la.relu_linear_attention_triton(q, k, v)
    ref = la.relu_linear_attention_ref(q, k, v)
    assert out.dtype == dtype and out.shape == (B, H, N, D)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)  # bf16: 1 ulp
    torch.testing.assert_close(out.float(), ref.float(), **tol)


def test_reference_is_normalised_relu_kernel_attention():
    # The linear form must equal the quadratic definition: softmax-free attention with ReLU features.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 16, generator=g) for _ in range(3))
    scores = torch.relu(q.double()) @ torch.relu(k.double()).transpose(-1, -2)  # (B, H, N, N)
    expected = (scores @ v.double()) / (scores.sum(-1, keepdim=True) + 1e-15)
    torch.testing.assert_close(la.relu_linear_attention_ref(q, k, v).double(), expected, atol=1e-5, rtol=1e-5)


def test_public_entry_falls_back_without_triton(monkeypatch):
    """With Triton missing (or no GPU) the public entry answers with the reference, and never calls the kernel."""
    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton kernel was called")
    monkeypatch.setattr(la, "relu_linear_attention_triton", no_kernel)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 33, 8, generator=g) for _ in range(3))
    want = la.relu_linear_attention_ref(q, k, v)
    assert torch.equal(la.relu_linear_attention(q, k, v), want)  # no GPU here, or not a CUDA tensor
    monkeypatch.setattr(la, "triton", None)  # Triton not installed
    assert torch.equal(la.relu_linear_attention(q, k, v), want)


@pytest.mark.parametrize("name", ["dcae", "sana"])
def test_root_file_copied_alone_uses_its_own_reference(name, tmp_path):
    """A root file copied without kernels/ imports, and its linear attention is its in-file reference, which
    computes what kernels/linear_attention.py's reference computes (checked in a second process, bit for bit)."""
    shutil.copy(os.path.join(ROOT, f"{name}.py"), tmp_path)
    code = (f"import {name} as m, torch; assert m.LINEAR_ATTENTION is None; "
            f"assert m.relu_linear_attention is m.relu_linear_attention_ref; "
            f"g = torch.Generator().manual_seed(0); q, k, v = torch.randn(3, 1, 2, 40, 8, generator=g); "
            f"torch.save(m.relu_linear_attention(q, k, v), 'out.pt')")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-1500:]
    q, k, v = torch.randn(3, 1, 2, 40, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), la.relu_linear_attention_ref(q, k, v))


ROOT_FILES = ("dcae", "sana", "sana_sprint", "hart", "dcar", "svdquant")


def test_root_files_load_the_kernel_beside_them_not_another_kernels_package(tmp_path):
    """A package named `kernels` ahead on sys.path (a stand-in for Hugging Face's: it defines CUDAProperties, what
    diffusers imports from it) stays importable from the repository root, and every root file still takes its
    kernels from the kernels/ folder beside it."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("class CUDAProperties: pass\n")
    code = ("from kernels import CUDAProperties; import importlib, os; "
            f"files = {{n: importlib.import_module(n).LINEAR_ATTENTION.__file__ for n in {ROOT_FILES!r}}}; "
            "import svdquant; files['w4a4'] = svdquant.W4A4_GEMM.__file__; "
            "print(sorted(set(os.path.relpath(f) for f in files.values())))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert run.returncode == 0, run.stderr[-1500:]
    assert run.stdout.strip() == "['kernels/linear_attention.py', 'kernels/w4a4_gemm.py']", run.stdout


@pytest.mark.parametrize("package,name", [("diffusers", "AutoencoderDC"), ("transformers", "AutoConfig")])
def test_hugging_face_imports_next_to_a_root_file(package, name):
    """The real packages, where installed: diffusers (0.42 imports `kernels`) and transformers import from the
    repository root, in the same process as a root file."""
    pytest.importorskip(package)
    code = f"import sana; from {package} import {name}; print(sana.LINEAR_ATTENTION.__file__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-1500:]
    assert os.path.samefile(run.stdout.strip(), os.path.join(ROOT, "kernels", "linear_attention.py"))


# The W4A4 GEMM of SVDQuant (kernels/w4a4_gemm.py)

wg = kernel("w4a4_gemm")


@pytest.mark.skipif(not triton_ok, reason="needs Triton (on a GPU, or its CPU interpreter)")
@pytest.mark.parametrize("M,K,N,r", [(5, 64, 16, 16), (37, 200, 72, 8), (33, 130, 40, 0), (64, 256, 96, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_w4a4_triton_matches_reference(M, K, N, r, bias):
    """Sizes that are not multiples of the tiles (32) or of the group (64); rank 0 = no branch."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qweight, wscales, smooth, down, up, b = wg.random_layer(N, K, r, device, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K)).to(device) * 3
    x[:, 3] *= 40  # an outlier channel
    args = (x, qweight, wscales, smooth, down, up, b if bias else None)
    got, want = wg.w4a4_gemm_triton(*args), wg.w4a4_gemm_ref(*args)
    assert got.shape == (M, N)
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)
    if r:  # the unfused path leaves the branch out: exactly the branch's share is missing
        branch = (x @ down) @ up.T
        torch.testing.assert_close(wg.w4a4_gemm_triton(*args, fuse_lora=False), want - branch,
                                   atol=1e-4 * want.abs().max().item(), rtol=1e-4)
        torch.testing.assert_close(wg.w4a4_unfused(*args), want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)


def test_w4a4_reference_is_the_layer_equation():
    """The reference against the layer written out: quantize x / s per token group, dequantize both, add the
    branch on the raw x and the bias (float64 for the check)."""
    qweight, wscales, smooth, down, up, b = wg.random_layer(24, 100, 8, seed=3)
    x = torch.randn(9, 100, generator=torch.Generator().manual_seed(4))
    xs = (x / smooth).double()
    xg = torch.nn.functional.pad(xs, (0, 28)).view(9, 2, 64)
    sa = xg.abs().amax(-1, keepdim=True) / 7
    xq = (torch.round(xg / sa).clamp(-8, 7) * sa).view(9, 128)[:, :100]
    lo, hi = (qweight & 15).to(torch.int64), (qweight >> 4).to(torch.int64)
    codes = torch.stack([lo, hi], -1).view(24, -1)[:, :100]
    codes = torch.where(codes >= 8, codes - 16, codes).double()
    w = codes * wscales.double().repeat_interleave(64, dim=1)[:, :100]
    want = xq @ w.T + (x.double() @ down.double()) @ up.double().T + b.double()
    torch.testing.assert_close(wg.w4a4_gemm_ref(x, qweight, wscales, smooth, down, up, b).double(), want,
                               atol=1e-4, rtol=1e-5)


def test_w4a4_public_entry_falls_back(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton kernel was called")
    monkeypatch.setattr(wg, "w4a4_gemm_triton", no_kernel)
    layer = wg.random_layer(16, 64, 16)
    x = torch.randn(4, 64)
    assert torch.equal(wg.w4a4_gemm(x, *layer), wg.w4a4_gemm_ref(x, *layer))
    monkeypatch.setattr(wg, "triton", None)
    assert torch.equal(wg.w4a4_gemm(x, *layer), wg.w4a4_gemm_ref(x, *layer))


@pytest.mark.skipif(not triton_ok, reason="needs Triton (on a GPU, or its CPU interpreter)")
def test_w4a4_self_check(monkeypatch):
    """The first use on a device checks the kernel against the reference: a working kernel passes; one that
    fails to build, or computes something else, is set aside with a warning that says why."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(wg, "_CHECKED", {})
    assert wg.kernel_works(device)
    monkeypatch.setattr(wg, "_CHECKED", {})

    def broken(*args, **kwargs):
        raise RuntimeError("PTX too old")
    monkeypatch.setattr(wg, "w4a4_gemm_triton", broken)
    with pytest.warns(UserWarning, match="failed its self-check .*RuntimeError: PTX too old"):
        assert not wg.kernel_works(device)
    monkeypatch.setattr(wg, "_CHECKED", {})
    monkeypatch.setattr(wg, "w4a4_gemm_triton", lambda *a, **k: wg.w4a4_gemm_ref(*a, **k) + 1)
    with pytest.warns(UserWarning, match="max difference"):
        assert not wg.kernel_works(device)


def test_w4a4_reference_is_svdquants_layer():
    """svdquant's W4A4Linear (its own PyTorch lines) and the kernel's reference agree on a quantized layer."""
    import svdquant as sq
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(40, 150, generator=g), torch.randn(64, 150, generator=g)
    layer = sq.W4A4Linear.from_quantized(sq.svdquant(w, x, sq.QuantConfig("int4", 8, num_grids=4, lowrank_iters=2)),
                                         torch.randn(40, generator=g))
    want = layer(x)
    got = wg.w4a4_gemm_ref(x, layer.qweight, layer.wscales, layer.smooth, layer.proj_down, layer.proj_up, layer.bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
