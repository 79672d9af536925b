"""Batched multi-LoRA kernels: one interface, one implementation per platform.

Every `FusedLoraLinear` calls `backend.add_lora(...)` and never touches a kernel itself (vLLM's
punica wrapper split). `get_backend(device)` is the single selection point: today CPU and CUDA both
get `TorchReferenceBackend`; a Triton backend (SGMV/BGMV-style shrink/expand kernels) slots in there
and is tested against this reference.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class LoraBackend(ABC):
    """Adds per-row weighted LoRA deltas from preallocated slot stacks to a base layer's output."""

    @abstractmethod
    def add_lora(self, y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                 scale: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Add every row's (weighted, K-way) LoRA delta to `y` in place and return `y`.

        Shapes: `y` (B, T, out) and `x` (B, T, in), T tokens per row (T == 1 when decoding);
        `a_stack` (L, R, in); `b_stack` (L, out, R); `scale` (L,); `indices` (B, K) long, -1 = no
        adapter (padding, or a bare-base row); `weights` (B, K) float. L slots, max rank R (smaller
        ranks are zero-padded), K adapters per row at most.

        Semantics::

            for b in range(B):
                for k in range(K):
                    i = indices[b, k]
                    if i >= 0:
                        y[b] += weights[b, k] * scale[i] * (x[b] @ A[i].T) @ B[i].T
            return y

        Implementations must not loop over rows in Python.
        """

    def prepare(self, a_stack: torch.Tensor, b_stack: torch.Tensor, scale: torch.Tensor,
                indices: torch.Tensor, weights: torch.Tensor) -> object:
        """Per-(layer, routing state) work that does not depend on `x`, done once per batch.

        The routing state is constant through one `generate` call, so a layer caches what this
        returns and passes it to `apply` on every decoding step. Default: nothing to cache.
        """
        return (a_stack, b_stack, scale, indices, weights)

    def apply(self, y: torch.Tensor, x: torch.Tensor, prepared: object) -> torch.Tensor:
        """`add_lora` on a `prepare`d state. Same Semantics as `add_lora`."""
        return self.add_lora(y, x, *prepared)


class TorchReferenceBackend(LoraBackend):
    """Gather the rows' slots, then two batched matmuls (shrink to rank, expand to `out`).

    The K adapters of a row are concatenated along the rank axis, so a row's K-way fusion is one
    rank-(K*R) LoRA: `h = x @ A_cat.T` (B, T, K*R), then `y += h @ B_cat.T`. Weights and scales
    are folded into the gathered A, so the per-step work is exactly two `bmm` calls, and the gather
    itself (`prepare`) runs once per batch, not once per decoding step. Padding entries (-1) point
    at slot 0 with coefficient 0: adding an exact 0 leaves `y` bit-identical (for finite `x`).
    """

    def prepare(self, a_stack, b_stack, scale, indices, weights):
        """Returns (a_t, b_t), or None when no row uses an adapter (then `apply` is a no-op).

        a_t: (B, in, K*R), column block k of row b = coeff[b, k] * A[indices[b, k]].T, with
        coeff = weights * scale (0 for -1). b_t: (B, K*R, out), row block k = B[indices[b, k]].T.
        Both are made contiguous in the layout `bmm` reads: for decoding (T == 1) that is ~2.5x
        faster on CPU than bmm on transposed views of (B, K*R, in) / (B, out, K*R) gathers.
        """
        valid = indices >= 0  # (B, K)
        if not bool(valid.any()):
            return None
        bsz, k = indices.shape
        _, r, d_in = a_stack.shape
        d_out = b_stack.shape[1]
        idx = indices.clamp(min=0)  # (B, K)
        zero = torch.zeros((), dtype=scale.dtype, device=scale.device)
        coeff = torch.where(valid, weights.to(scale.dtype) * scale[idx], zero)  # (B, K)
        a = a_stack[idx] * coeff.to(a_stack.dtype)[:, :, None, None]  # (B, K, R, in)
        a_t = a.permute(0, 3, 1, 2).reshape(bsz, d_in, k * r).contiguous()  # (B, in, K*R)
        b_t = b_stack[idx].permute(0, 1, 3, 2).reshape(bsz, k * r, d_out).contiguous()  # (B, K*R, out)
        return a_t, b_t

    def apply(self, y, x, prepared):
        if prepared is None:
            return y
        a_t, b_t = prepared
        h = torch.bmm(x, a_t)  # (B, T, K*R)
        y.baddbmm_(h, b_t)  # (B, T, out) += (B, T, K*R) @ (B, K*R, out)
        return y

    def add_lora(self, y, x, a_stack, b_stack, scale, indices, weights):
        return self.apply(y, x, self.prepare(a_stack, b_stack, scale, indices, weights))


def get_backend(device: torch.device | str) -> LoraBackend:
    """The backend for `device`: the selection point for platform kernels.

    CPU and CUDA both get `TorchReferenceBackend` for now. A Triton backend goes here
    (`if device.type == "cuda" and triton is importable: return TritonBackend()`), tested
    against `TorchReferenceBackend`.
    """
    return TorchReferenceBackend()
