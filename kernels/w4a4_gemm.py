"""The W4A4 GEMM of SVDQuant, with its 16-bit low-rank branch fused in (Nunchaku, arXiv 2411.05007 Sec. 5).

For a layer with INT4 weight codes Cw (N, K) and per-group scales Sw (N, K / 64), smoothing factor s (K,), branch
down (K, r) and up (N, r), and bias b (N,), on an input X (M, K):

    Y = Q(X / s) Q(R)^T + (X down) up^T + b,        Q: symmetric INT4 per group of 64 (absmax / 7, round half even)

        = sum_g  (Ca_g Cw_g^T) * Sa_g Sw_g^T   +   (X down) up^T + b

The 4-bit GEMM multiplies integer codes and applies both groups' scales to each 64-wide partial sum (int32,
exact); the branch is a rank-r product. Run separately, the branch costs as much time as the 4-bit GEMM itself
(the paper measures +57%), not because of its FLOPs (r / K of them) but because it reads X again and writes and
re-reads a 16-bit output. Nunchaku fuses it in two places, and so does this file:

  1. prologue (`_quantize_kernel`): one pass over X computes both X / s -> INT4 codes + scales, and X down (fp32);
  2. epilogue (`_gemm_kernel`): the tile of Y that the 4-bit GEMM holds in registers gets (X down) up^T and b added
     before it is written, once.

Inside:
  w4a4_gemm_ref        plain PyTorch, the specification (float32; the quantizers are svdquant.py's, copied)
  _quantize_kernel     Triton: per block of rows, activation codes and scales per 64 channels, and X down
  _gemm_kernel         Triton: per (rows, columns) tile, int8 x int8 -> int32 per group, scaled into fp32; the
                       branch and the bias in the epilogue. Weights are read packed, two codes a byte.
  w4a4_gemm            public entry: Triton on CUDA, the reference elsewhere

Run `python kernels/w4a4_gemm.py` to validate the kernels against the reference and, on a GPU, to time them
against a bf16 torch.matmul of the same shape and against the unfused path (the same kernels with the branch
left to two torch.matmul calls). On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), which
only validates.
"""
import os
import time
import warnings

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the reference runs everywhere.
    triton = None

GROUP = 64  # INT4 group size along K


# Copied from svdquant.py: to_groups
def to_groups(x, g):
    """(..., K) -> (..., G, g), zero-padded to a whole number of groups (zeros change no group's max)."""
    return F.pad(x, (0, -x.shape[-1] % g)).unflatten(-1, (-1, g))


# Copied from svdquant.py: quantize_int4
def quantize_int4(x, group_size=64):
    """x: (..., K) -> codes (..., K) int8 in [-8, 7], scales (..., G): x ~ codes * scale per group."""
    xg = to_groups(x, group_size)
    scale = xg.abs().amax(-1, keepdim=True) / 7
    codes = torch.round(xg / torch.where(scale > 0, scale, 1)).clamp(-8, 7)  # torch.round: half to even
    return codes.flatten(-2)[..., :x.shape[-1]].to(torch.int8), scale.squeeze(-1)


# Copied from svdquant.py: unpack_nibbles
def unpack_nibbles(packed, K, signed):
    """Inverse of pack_nibbles: (N, ceil(K / 2)) uint8 -> (N, K) int8 (INT4, sign-extended) or uint8 (E2M1)."""
    c = torch.stack([packed & 15, packed >> 4], -1).flatten(-2)[:, :K]
    return (c.to(torch.int8) - 16 * (c >= 8).to(torch.int8)) if signed else c


def w4a4_gemm_ref(x, qweight, wscales, smooth, down, up, bias=None):
    """x (M, K); qweight (N, ceil(K / 2)) uint8, two INT4 codes a byte (even k low); wscales (N, G); smooth (K,);
    down (K, r); up (N, r); bias (N,) or None. Returns (M, N) float32."""
    K = x.shape[-1]
    x = x.float()
    ca, sa = quantize_int4(x / smooth.float(), GROUP)  # (M, K), (M, G)
    cw = unpack_nibbles(qweight, K, signed=True)  # (N, K)
    a = (to_groups(ca.float(), GROUP) * sa[..., None]).flatten(-2)  # dequantized, zero-padded to G * 64
    w = (to_groups(cw.float(), GROUP) * wscales.float()[..., None]).flatten(-2)
    y = a @ w.T + (x @ down.float()) @ up.float().T
    return y if bias is None else y + bias.float()


if triton is not None:

    @triton.jit
    def _round_half_even(v):
        r = tl.floor(v + 0.5)
        odd_tie = (r - v == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0)
        return tl.where(odd_tie, r - 1.0, r)

    @triton.jit
    def _quantize_kernel(X, S, DOWN, CA, SA, LA, M, K, R, G,
                         BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr):
        # One program per BLOCK_M rows. Per 64-channel group: x / s -> absmax / 7 -> codes (int8) and scale; and
        # the same x tile (unsmoothed) times down, accumulated over K into LA = X down (fp32). X is read once.
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, GROUP)
        ranks = tl.arange(0, BLOCK_R)
        lora = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for g in range(0, G):
            k = g * GROUP + cols
            m = (rows[:, None] < M) & (k[None, :] < K)
            x = tl.load(X + rows[:, None] * K + k[None, :], mask=m, other=0.0).to(tl.float32)  # (BLOCK_M, GROUP)
            s = tl.load(S + k, mask=k < K, other=1.0).to(tl.float32)
            xs = x / s[None, :]
            scale = tl.max(tl.abs(xs), axis=1) / 7.0  # (BLOCK_M,)
            q = _round_half_even(xs / tl.where(scale > 0, scale, 1.0)[:, None])
            q = tl.minimum(tl.maximum(q, -8.0), 7.0)
            tl.store(CA + rows[:, None] * (G * GROUP) + k[None, :], q.to(tl.int8), mask=rows[:, None] < M)
            tl.store(SA + rows * G + g, scale, mask=rows < M)
            d = tl.load(DOWN + k[:, None] * R + ranks[None, :], mask=(k[:, None] < K) & (ranks[None, :] < R),
                        other=0.0).to(tl.float32)  # (GROUP, BLOCK_R)
            lora += tl.dot(x, d, input_precision="ieee")
        tl.store(LA + rows[:, None] * BLOCK_R + ranks[None, :], lora, mask=rows[:, None] < M)

    @triton.jit
    def _gemm_kernel(CA, SA, QW, SW, LA, UP, BIAS, Y, M, N, R, G,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr,
                     HAS_BIAS: tl.constexpr, FUSE_LORA: tl.constexpr):
        # One program per (BLOCK_M, BLOCK_N) tile of Y. Per group: int8 codes of X (BLOCK_M, 64) times the weight's
        # (64, BLOCK_N), unpacked from bytes in registers; the int32 partial sum is exact, then scaled by both
        # groups' scales into the fp32 accumulator. Epilogue: + (X down) up^T + b, one write.
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, GROUP)
        half = tl.arange(0, GROUP // 2)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, G):
            a = tl.load(CA + rows[:, None] * (G * GROUP) + g * GROUP + kk[None, :], mask=rows[:, None] < M, other=0)
            p = tl.load(QW + cols[:, None] * (G * GROUP // 2) + g * (GROUP // 2) + half[None, :],
                        mask=cols[:, None] < N, other=0)  # (BLOCK_N, GROUP / 2) uint8
            lo, hi = (p & 15).to(tl.int8), (p >> 4).to(tl.int8)
            lo, hi = tl.where(lo >= 8, lo - 16, lo), tl.where(hi >= 8, hi - 16, hi)  # sign-extend 4 bits
            w = tl.reshape(tl.join(lo, hi), (BLOCK_N, GROUP))  # even k from the low nibble
            psum = tl.dot(a, tl.trans(w))  # (BLOCK_M, BLOCK_N) int32
            sa = tl.load(SA + rows * G + g, mask=rows < M, other=0.0)
            sw = tl.load(SW + cols * G + g, mask=cols < N, other=0.0).to(tl.float32)
            acc += psum.to(tl.float32) * sa[:, None] * sw[None, :]
        if FUSE_LORA:
            ranks = tl.arange(0, BLOCK_R)
            la = tl.load(LA + rows[:, None] * BLOCK_R + ranks[None, :], mask=rows[:, None] < M, other=0.0)
            u = tl.load(UP + cols[:, None] * R + ranks[None, :], mask=(cols[:, None] < N) & (ranks[None, :] < R),
                        other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_R)
            acc += tl.dot(la, tl.trans(u), input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * N + cols[None, :], acc, mask=(rows[:, None] < M) & (cols[None, :] < N))


def w4a4_gemm_triton(x, qweight, wscales, smooth, down, up, bias=None, fuse_lora=True, block_m=32, block_n=32):
    """The Triton path (any device Triton runs on, the CPU interpreter included). Returns (M, N) float32; with
    fuse_lora=False the branch is left out (the unfused path adds it with two matmuls)."""
    M, K = x.shape
    N, G, R = qweight.shape[0], -(-K // GROUP), down.shape[1]
    block_r = max(16, triton.next_power_of_2(R))  # tl.dot needs dims >= 16
    dev = x.device
    qw = F.pad(qweight, (0, G * GROUP // 2 - qweight.shape[1])).contiguous()  # whole groups of bytes
    ca = torch.empty(M, G * GROUP, dtype=torch.int8, device=dev)
    sa = torch.empty(M, G, dtype=torch.float32, device=dev)
    la = torch.empty(M, block_r, dtype=torch.float32, device=dev)
    y = torch.empty(M, N, dtype=torch.float32, device=dev)
    _quantize_kernel[(triton.cdiv(M, block_m),)](x.contiguous(), smooth.contiguous(), down.contiguous(), ca, sa, la,
                                                 M, K, R, G, BLOCK_M=block_m, BLOCK_R=block_r, GROUP=GROUP)
    _gemm_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        ca, sa, qw, wscales.contiguous(), la, up.contiguous(), bias if bias is not None else y, y, M, N, R, G,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, GROUP=GROUP, HAS_BIAS=bias is not None,
        FUSE_LORA=fuse_lora)
    return y


_CHECKED = {}  # device -> whether the kernel passed its self-check there


def kernel_works(device):
    """On its first use on a device, the kernel is run against the reference on a small layer of awkward sizes;
    if it fails to compile or disagrees, it is not used there (one warning says why) and the reference runs."""
    key = str(device)
    if key not in _CHECKED:
        try:
            layer = random_layer(48, 200, 16, device)
            x = torch.randn(37, 200, generator=torch.Generator().manual_seed(0)).to(device)
            got, want = w4a4_gemm_triton(x, *layer), w4a4_gemm_ref(x, *layer)
            ok = bool(torch.allclose(got, want, atol=1e-3 * want.abs().max().item(), rtol=1e-3))
            why = "" if ok else f"max difference {(got - want).abs().max().item():.2e} from the reference"
        except Exception as e:  # a Triton, compiler or GPU that cannot build it
            ok, why = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if not ok:
            warnings.warn(f"the Triton W4A4 kernel failed its self-check on {key} ({why}): using the PyTorch path")
        _CHECKED[key] = ok
    return _CHECKED[key]


def w4a4_gemm(x, qweight, wscales, smooth, down, up, bias=None):
    """x (M, K) -> (M, N) float32: Triton on CUDA (once it has passed its self-check there), the PyTorch reference
    elsewhere (INT4, group 64)."""
    if triton is not None and x.is_cuda and kernel_works(x.device):
        return w4a4_gemm_triton(x, qweight, wscales, smooth, down, up, bias)
    return w4a4_gemm_ref(x, qweight, wscales, smooth, down, up, bias)


def random_layer(N, K, r, device="cpu", seed=0):
    """A random INT4 layer in this kernel's format: (qweight, wscales, smooth, down, up, bias)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    codes = torch.randint(-8, 8, (N, K), generator=g).to(torch.uint8) & 15
    codes = F.pad(codes, (0, K % 2))
    qweight = codes[:, 0::2] | codes[:, 1::2] << 4
    wscales = torch.rand(N, -(-K // GROUP), generator=g) * 0.02
    smooth = torch.rand(K, generator=g) + 0.5
    down, up = torch.randn(K, r, generator=g) / K**0.5, torch.randn(N, r, generator=g) * 0.1
    bias = torch.randn(N, generator=g)
    return [t.to(device) for t in (qweight, wscales, smooth, down, up, bias)]


# Copied from kernels/linear_attention.py: _bench
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


def w4a4_unfused(x, qweight, wscales, smooth, down, up, bias=None):
    """The baseline the fusion removes: the 4-bit GEMM alone, then the branch as two separate matmuls."""
    return w4a4_gemm_triton(x, qweight, wscales, smooth, down, up, bias, fuse_lora=False) + (x.float() @ down) @ up.T


if __name__ == "__main__":
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if triton is None:
        raise SystemExit("Triton is not installed: only the PyTorch reference is available.")
    if device == "cpu" and not interpreted:
        raise SystemExit("This benchmark needs a GPU; without one, run with TRITON_INTERPRET=1 to validate the "
                         "kernels in Triton's interpreter.")
    # 1) validate against the reference, on sizes that are not multiples of the tiles or the group
    for M, K, N, r in [(5, 64, 16, 16), (37, 200, 72, 8), (64, 256, 96, 32)]:
        layer = random_layer(N, K, r, device)
        x = torch.randn(M, K, device=device) * 3
        got, want = w4a4_gemm_triton(x, *layer), w4a4_gemm_ref(x, *layer)
        print(f"M={M:3d} K={K:3d} N={N:3d} r={r:2d}  max|triton - ref| / max|ref| = "
              f"{((got - want).abs().max() / want.abs().max()).item():.2e}")
    if interpreted:
        raise SystemExit("Kernels validated in Triton's interpreter (CPU); no timing: they are not compiled.")
    # 2) time SANA-1.6B's FFN up projection at 1024 px (4096 tokens, 2240 -> 11264, rank 32)
    M, K, N, r = 4096, 2240, 11264, 32
    layer = random_layer(N, K, r, device)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    w16 = torch.randn(N, K, device=device, dtype=torch.bfloat16)
    t_bf16 = _bench(torch.matmul, x, w16.T)
    t_fused = _bench(w4a4_gemm_triton, x, *layer)
    t_unfused = _bench(w4a4_unfused, x, *layer)
    print(f"M={M} K={K} N={N} r={r}: bf16 matmul {t_bf16 * 1e3:.3f} ms, W4A4 fused {t_fused * 1e3:.3f} ms "
          f"(x{t_bf16 / t_fused:.2f} vs bf16), unfused {t_unfused * 1e3:.3f} ms (fusion x{t_unfused / t_fused:.2f})")
