"""`TritonBackend`: multi-LoRA shrink/expand kernels reading A and B straight from the slot stacks.

Punica/S-LoRA style: no per-row copy of adapter weights is ever made. One `add_lora` is two launches:

    shrink  h[b, t, k, :] = w[b, k] · scale[i] · x[b, t] @ A[i].T,  i = idx[b, k]   (B, T, K, R) fp32
    expand  y[b, t, :]   += Σ_k h[b, t, k, :] @ B[idx[b, k]].T                      in place, fp32 accumulation

The routing weight and the adapter's scale are applied inside shrink (a pair with idx = -1 loads
nothing and contributes exactly 0). Each program looks its slot up from `idx` and loads that
adapter's tiles directly from the (L, R, in) / (L, out, R) stacks, so the only per-step memory is
`h` (B·T·K·R floats; ×in/512 partial sums when decoding, split-K), and a routing change costs
nothing: no gather, no host sync.

Two forms, chosen by T:
  * prefill (T > 1), segmented: a row's T tokens share its adapters, so each (row, k) is one
    (T × in) @ (in × R) matmul on tensor cores (`tl.dot`, BLOCK_M tokens per program);
  * decode (T == 1), gathered vector (BGMV): one program per (row, k) reduces the row's vector
    against its gathered adapter tile on CUDA cores; `tl.dot` needs M >= 16, and one token has 1.
Ranks below the slot's R are zero-padded (exact); R is padded to a power of two >= 16 with masks.
bf16/fp16 inputs accumulate in fp32; fp32 inputs use IEEE fp32 dots (no TF32), so the fp32 path
matches `TorchReferenceBackend` to float rounding. Rows with no adapter are never written, so a
bare-base row is bit-identical to the base layer's output.

With `TRITON_INTERPRET=1` in the environment *before triton is first imported* (triton.language's
own helpers are decorated at import time, so the mode is fixed per process), the same kernels run
in Triton's interpreter on CPU tensors: that is how the default test suite checks them without a GPU
(`tests/conftest.py` sets it when CUDA is absent).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from routing.lora.backend import LoraBackend

BLOCK_K = 64         # input features per shrink iteration
BLOCK_N = 64         # output features per expand program
DECODE_CHUNK = 512   # input features per decode shrink program (split-K: B*K programs alone idle most SMs)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, idx_ptr, w_ptr, scale_ptr, h_ptr,
                   T, D_IN, R, K, SPLIT, CHUNK,
                   sx_b, sx_t, sa_l, sa_r, sh_s, sh_b, sh_t, sh_k,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                   USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """h[s, b, t, k, :R] = w[b, k] * scale[i] * x[b, t, chunk s] @ A[i, :, chunk s].T, i = idx[b, k].

    Grid (B, K, cdiv(T, BLOCK_M) * SPLIT): input features are split in SPLIT chunks of CHUNK (a
    multiple of BLOCK_K) so that a decode step, B*K programs otherwise, fills the GPU; the expand
    kernel sums the SPLIT partial results (in a fixed order: deterministic, no atomics).
    """
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B*T*in can pass 2**31 at 8B shapes
    k = tl.program_id(1)
    m = tl.program_id(2) // SPLIT
    split = tl.program_id(2) % SPLIT
    slot = tl.load(idx_ptr + b * K + k)
    r_live = tl.where(slot >= 0, R, 0)  # a (row, k) with no adapter loads nothing: h = 0 exactly
    slot = tl.maximum(slot, 0)
    coeff = tl.load(w_ptr + b * K + k).to(tl.float32) * tl.load(scale_ptr + slot).to(tl.float32)
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(split * CHUNK, tl.minimum(split * CHUNK + CHUNK, D_IN), BLOCK_K):
        cols = k0 + offs_k
        x_mask = (offs_m[:, None] < T) & (cols[None, :] < D_IN)
        x = tl.load(x_ptr + b * sx_b + offs_m[:, None] * sx_t + cols[None, :], mask=x_mask, other=0.0)
        a_mask = (offs_r[:, None] < r_live) & (cols[None, :] < D_IN)
        a = tl.load(a_ptr + slot * sa_l + offs_r[:, None] * sa_r + cols[None, :], mask=a_mask, other=0.0)
        if USE_DOT:
            acc += tl.dot(x, tl.trans(a), input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(x[:, None, :].to(tl.float32) * a[None, :, :].to(tl.float32), axis=2)
    h_mask = (offs_m[:, None] < T) & (offs_r[None, :] < R)
    h_ptrs = h_ptr + split * sh_s + b * sh_b + offs_m[:, None] * sh_t + k * sh_k + offs_r[None, :]
    tl.store(h_ptrs, acc * coeff, mask=h_mask)


@triton.jit
def _expand_kernel(h_ptr, b_ptr, idx_ptr, y_ptr,
                   T, D_OUT, R, K, SPLIT,
                   sh_s, sh_b, sh_t, sh_k, sb_l, sb_o, sy_b, sy_t,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KK: tl.constexpr,
                   USE_DOT: tl.constexpr):
    """y[b, t, n] += sum_k (sum_s h[s, b, t, k, :]) . B[idx[b, k], n, :]; grid (B, cdiv(T, BLOCK_M), cdiv(out, BLOCK_N))."""
    b = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1)
    n = tl.program_id(2)
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_kk = tl.arange(0, BLOCK_KK)
    slots = tl.load(idx_ptr + b * K + offs_kk, mask=offs_kk < K, other=-1)
    n_live = tl.sum((slots >= 0).to(tl.int32), axis=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K):
        slot = tl.load(idx_ptr + b * K + k)
        r_live = tl.where(slot >= 0, R, 0)
        slot = tl.maximum(slot, 0)
        h_mask = (offs_m[:, None] < T) & (offs_r[None, :] < r_live)
        h_ptrs = h_ptr + b * sh_b + offs_m[:, None] * sh_t + k * sh_k + offs_r[None, :]
        h = tl.load(h_ptrs, mask=h_mask, other=0.0)
        for s in range(1, SPLIT):
            h += tl.load(h_ptrs + s * sh_s, mask=h_mask, other=0.0)
        w_mask = (offs_n[:, None] < D_OUT) & (offs_r[None, :] < r_live)
        w = tl.load(b_ptr + slot * sb_l + offs_n[:, None] * sb_o + offs_r[None, :], mask=w_mask, other=0.0)
        if USE_DOT:
            acc += tl.dot(h, tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.sum(h[:, None, :] * w[None, :, :].to(tl.float32), axis=2)
    # a row with no adapter is never written: its output stays the base layer's, bit for bit
    y_mask = (offs_m[:, None] < tl.where(n_live > 0, T, 0)) & (offs_n[None, :] < D_OUT)
    y_ptrs = y_ptr + b * sy_b + offs_m[:, None] * sy_t + offs_n[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=y_mask)


def interpreting() -> bool:
    """Triton runs kernels in its CPU interpreter in this process (TRITON_INTERPRET=1 at import)."""
    return bool(triton.knobs.runtime.interpret)


class TritonBackend(LoraBackend):
    """Segmented (prefill) and gathered-vector (decode) shrink/expand kernels; see the module doc.

    `prepare` does nothing (the kernels read the routing tensors as they are), so a routing that
    changes every decoding step costs nothing beyond the two launches per layer.
    """

    def prepare(self, a_stack, b_stack, scale, indices, weights):
        return a_stack, b_stack, scale, indices.contiguous(), weights.contiguous()

    def apply(self, y, x, prepared):
        a_stack, b_stack, scale, idx, weights = prepared
        bsz, t, d_in = x.shape
        _, r, _ = a_stack.shape
        d_out, k = b_stack.shape[1], idx.shape[1]
        if x.stride(-1) != 1:
            x = x.contiguous()
        if y.stride(-1) != 1 or not a_stack.is_contiguous() or not b_stack.is_contiguous():
            raise ValueError("TritonBackend needs y with unit inner stride and contiguous slot stacks")
        block_r = max(16, triton.next_power_of_2(r))
        use_dot = t > 1  # segmented form: BLOCK_M tokens of one row per program, tl.dot (M >= 16)
        block_m = min(64, max(16, triton.next_power_of_2(t))) if use_dot else 1
        split = 1 if use_dot else triton.cdiv(d_in, DECODE_CHUNK)
        chunk = triton.cdiv(triton.cdiv(d_in, split), BLOCK_K) * BLOCK_K
        h = torch.empty((split, bsz, t, k, r), dtype=torch.float32, device=x.device)
        precision = "ieee" if x.dtype == torch.float32 else "tf32"  # ignored for bf16/fp16 inputs
        _shrink_kernel[(bsz, k, triton.cdiv(t, block_m) * split)](
            x, a_stack, idx, weights, scale, h, t, d_in, r, k, split, chunk,
            x.stride(0), x.stride(1), a_stack.stride(0), a_stack.stride(1),
            h.stride(0), h.stride(1), h.stride(2), h.stride(3),
            BLOCK_M=block_m, BLOCK_K=BLOCK_K, BLOCK_R=block_r, USE_DOT=use_dot, DOT_PRECISION=precision)
        _expand_kernel[(bsz, triton.cdiv(t, block_m), triton.cdiv(d_out, BLOCK_N))](
            h, b_stack, idx, y, t, d_out, r, k, split,
            h.stride(0), h.stride(1), h.stride(2), h.stride(3), b_stack.stride(0), b_stack.stride(1),
            y.stride(0), y.stride(1),
            BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_R=block_r, BLOCK_KK=triton.next_power_of_2(k),
            USE_DOT=use_dot)
        return y

    def add_lora(self, y, x, a_stack, b_stack, scale, indices, weights):
        return self.apply(y, x, self.prepare(a_stack, b_stack, scale, indices, weights))
