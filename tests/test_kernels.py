"""Triton kernels against their PyTorch references, on the CPU through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU)."""
import os

import pytest
import torch

from kernels import linear_attention as la

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


def test_public_entry_falls_back_to_reference_on_cpu():
    q, k, v = (torch.randn(1, 2, 33, 8) for _ in range(3))
    torch.testing.assert_close(la.relu_linear_attention(q, k, v), la.relu_linear_attention_ref(q, k, v))
