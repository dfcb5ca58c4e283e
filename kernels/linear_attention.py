"""ReLU linear attention, as SANA's self-attention and DC-AE's LiteMLA use it.

For each (batch, head), with queries Q, keys K, values V of shape (N, d) and phi = ReLU:

    out_n = sum_m phi(q_n)·phi(k_m) v_m  /  (sum_m phi(q_n)·phi(k_m) + eps)
          = phi(q_n) (phi(K)^T V)  /  (phi(q_n) · sum_m phi(k_m) + eps)

The right-hand form costs O(N d^2) instead of O(N^2 d): the (d, d) matrix phi(K)^T V and the d-vector
sum_m phi(k_m) are shared by every query. The official code gets numerator and denominator from a single
matmul by padding V with a row of ones ("the padding trick": [V | 1]^T phi(K) is (d+1, d), its last row is
the key sum). Everything is accumulated in float32 whatever the input dtype, and the epsilon is added to the
denominator only (1e-15 in DC-AE and diffusers' SANA; 1e-8 in the original SANA LiteLA).

Inside:
  relu_linear_attention_ref   plain PyTorch, the specification
  _kv_kernel / _out_kernel    Triton: (1) per (batch, head), reduce phi(K)^T V and sum_m phi(k_m) over N in
                              blocks (two accumulators instead of the padded [V | 1]: no extra column to pad
                              to a power of two), (2) per (batch, head, block of queries), apply both and divide
  relu_linear_attention       public entry: Triton on CUDA, the reference elsewhere

Run `python kernels/linear_attention.py` to validate the kernel against the reference, then benchmark it
(on a GPU; on the CPU the kernel runs in Triton's interpreter, set TRITON_INTERPRET=1, which only validates).
"""
import os
import time

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the reference runs everywhere.
    triton = None


def relu_linear_attention_ref(q, k, v, eps=1e-15):
    """q, k, v: (B, H, N, d) before the ReLU. Returns (B, H, N, d) in the dtype of v."""
    dtype = v.dtype
    q, k, v = torch.relu(q.float()), torch.relu(k.float()), v.float()
    kv = k.transpose(-1, -2) @ v  # (B, H, d, d)  phi(K)^T V
    k_sum = k.sum(dim=-2, keepdim=True)  # (B, H, 1, d)  sum_m phi(k_m)
    num = q @ kv  # (B, H, N, d)
    den = (q * k_sum).sum(dim=-1, keepdim=True)  # (B, H, N, 1)
    return (num / (den + eps)).to(dtype)


if triton is not None:

    @triton.jit
    def _kv_kernel(K, V, KV, KS, N, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per (batch, head): KV = relu(K)^T V (D, D) and KS = sum_n relu(k_n) (D,), in fp32.
        bh = tl.program_id(0)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        kv = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        ks = tl.zeros((BLOCK_D,), dtype=tl.float32)
        base = bh * N * D
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            m = (offs_n[:, None] < N) & mask_d[None, :]  # padded tokens load 0 and add nothing
            ptrs = base + offs_n[:, None] * D + offs_d[None, :]
            k = tl.maximum(tl.load(K + ptrs, mask=m, other=0.0).to(tl.float32), 0.0)  # (BLOCK_N, BLOCK_D)
            v = tl.load(V + ptrs, mask=m, other=0.0).to(tl.float32)
            kv += tl.dot(tl.trans(k), v, input_precision="ieee")
            ks += tl.sum(k, axis=0)
        out = bh * D * D + offs_d[:, None] * D + offs_d[None, :]
        tl.store(KV + out, kv, mask=mask_d[:, None] & mask_d[None, :])
        tl.store(KS + bh * D + offs_d, ks, mask=mask_d)

    @triton.jit
    def _out_kernel(Q, KV, KS, O, N, eps, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per (batch, head, block of queries): O = relu(Q) KV / (relu(Q) . KS + eps).
        bh, nb = tl.program_id(0), tl.program_id(1)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        m = (offs_n[:, None] < N) & mask_d[None, :]
        ptrs = bh * N * D + offs_n[:, None] * D + offs_d[None, :]
        q = tl.maximum(tl.load(Q + ptrs, mask=m, other=0.0).to(tl.float32), 0.0)  # (BLOCK_N, BLOCK_D)
        kv = tl.load(KV + bh * D * D + offs_d[:, None] * D + offs_d[None, :],
                     mask=mask_d[:, None] & mask_d[None, :], other=0.0)
        ks = tl.load(KS + bh * D + offs_d, mask=mask_d, other=0.0)
        num = tl.dot(q, kv, input_precision="ieee")  # (BLOCK_N, BLOCK_D)
        den = tl.sum(q * ks[None, :], axis=1)  # (BLOCK_N,)
        out = num / (den[:, None] + eps)
        tl.store(O + ptrs, out.to(O.dtype.element_ty), mask=m)


def relu_linear_attention_triton(q, k, v, eps=1e-15, block_n=64):
    """The Triton path (any device Triton can run on, including the CPU interpreter)."""
    B, H, N, D = q.shape
    q, k, v = (t.contiguous() for t in (q, k, v))
    kv = torch.empty(B * H, D, D, device=q.device, dtype=torch.float32)
    ks = torch.empty(B * H, D, device=q.device, dtype=torch.float32)
    out = torch.empty_like(v)
    block_d = max(16, triton.next_power_of_2(D))  # tl.dot needs dims >= 16
    _kv_kernel[(B * H,)](k, v, kv, ks, N, D=D, BLOCK_N=block_n, BLOCK_D=block_d)
    _out_kernel[(B * H, triton.cdiv(N, block_n))](q, kv, ks, out, N, eps, D=D, BLOCK_N=block_n, BLOCK_D=block_d)
    return out


def relu_linear_attention(q, k, v, eps=1e-15):
    """q, k, v: (B, H, N, d) before the ReLU -> (B, H, N, d). Triton on CUDA, PyTorch elsewhere."""
    if triton is not None and q.is_cuda:
        return relu_linear_attention_triton(q, k, v, eps)
    return relu_linear_attention_ref(q, k, v, eps)


def _bench(fn, *args, reps=20):
    fn(*args)
    if args[0].is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    if args[0].is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


if __name__ == "__main__":
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if triton is None:
        raise SystemExit("Triton is not installed: only the PyTorch reference is available.")
    if device == "cpu" and not interpreted:
        raise SystemExit("No GPU: run with TRITON_INTERPRET=1 to validate the kernel in Triton's interpreter.")
    torch.manual_seed(0)
    # 1) validate against the reference
    for B, H, N, D in [(1, 2, 100, 8), (2, 3, 257, 32), (1, 4, 1024, 32)]:
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(B, H, N, D, device=device).to(dtype) for _ in range(3))
            err = (relu_linear_attention_triton(q, k, v).float() - relu_linear_attention_ref(q, k, v).float()).abs().max()
            print(f"B={B} H={H} N={N:5d} d={D:2d} {str(dtype):15s} max|triton - ref| = {err:.2e}")
    if interpreted:
        raise SystemExit("Kernel validated in Triton's interpreter (CPU); no timing: it is not compiled.")
    # 2) benchmark: SANA-600M self-attention at 1024 px (36 heads of 32, 32x32 latent tokens) and 4K (128x128)
    for N in (1024, 16384):
        q, k, v = (torch.randn(2, 36, N, 32, device=device, dtype=torch.bfloat16) for _ in range(3))
        t_ref, t_tri = _bench(relu_linear_attention_ref, q, k, v), _bench(relu_linear_attention_triton, q, k, v)
        print(f"N={N:6d}: reference {t_ref * 1e3:.3f} ms, triton {t_tri * 1e3:.3f} ms, speed-up x{t_ref / t_tri:.2f}")
