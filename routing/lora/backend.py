"""Batched multi-LoRA kernels: one interface, one implementation per platform.

Every `FusedLoraLinear` calls `backend.prepare(...)` once per routing state and `backend.apply(...)`
on every forward, and never touches a kernel itself (vLLM's punica wrapper split).
`get_backend(device)` is the single selection point: `TritonBackend` (routing/lora/triton_backend.py,
SGMV/BGMV-style kernels) on CUDA, `CpuLoraBackend` elsewhere, which picks per call between
`DenseSlotsBackend` (two matmuls over all slots), `TorchReferenceBackend` (the readable reference:
gather each row's adapters, two bmm) and `SlotGroupedBackend` (one matmul pair per slot in use) by
a rule measured in bench/lora_backends.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import weakref
from dataclasses import dataclass, field

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


class SlotGroupedBackend(LoraBackend):
    """One shrink and one expand matmul per adapter slot in use (SGMV done with torch ops).

    The (row, k) pairs routed to slot i are gathered as activations, `x[rows]` (n_i, T, in), and
    multiplied by A[i] and B[i] read in place from the stacks; results are scattered back with
    `index_add_`. Extra memory is activations only, at most B*T*(in + R + out) per slot at a time,
    never a per-row copy of adapter weights, so it stays flat as batch x K x rank grows. The Python
    loop runs over the slots used (<= L), not over rows. `prepare` is the host-side grouping (one
    `unique`/`sort` on B*K indices), cached with the routing state like the gather's.
    """

    def prepare(self, a_stack, b_stack, scale, indices, weights):
        """(a_stack, b_stack, [(slot, rows (n,), coeff (n,)), ...]) or None when no row has an adapter."""
        valid = indices >= 0
        if not bool(valid.any()):
            return None
        rows = torch.arange(indices.shape[0], device=indices.device)[:, None].expand_as(indices)[valid]
        slots, coeff = indices[valid], (weights.to(scale.dtype) * scale[indices.clamp(min=0)])[valid]
        order = torch.argsort(slots, stable=True)
        rows, slots, coeff = rows[order], slots[order], coeff[order]
        used, counts = torch.unique_consecutive(slots, return_counts=True)
        groups = [(int(slot), r, c.to(a_stack.dtype)) for slot, r, c in
                  zip(used.tolist(), rows.split(counts.tolist()), coeff.split(counts.tolist()))]
        return a_stack, b_stack, groups

    def apply(self, y, x, prepared):
        if prepared is None:
            return y
        a_stack, b_stack, groups = prepared
        for slot, rows, coeff in groups:
            h = torch.matmul(x[rows], a_stack[slot].T)  # (n, T, R): A read in place, transposed view
            h.mul_(coeff[:, None, None])
            y.index_add_(0, rows, torch.matmul(h, b_stack[slot].T))  # (n, T, out)
        return y

    def add_lora(self, y, x, a_stack, b_stack, scale, indices, weights):
        return self.apply(y, x, self.prepare(a_stack, b_stack, scale, indices, weights))


class DenseSlotsBackend(LoraBackend):
    """Every slot at once: two dense matmuls against all L slots, each row's coefficients as a mask.

    `h = x @ A_all.T` (rows, L*R) with A_all = the (L*R, in) view of the A stack (no copy); `h` is
    scaled by each row's coefficient per slot (0 for slots it does not use, so they add exact
    zeros), then `y += h @ B_all` with B_all the (L*R, out) layout of the B stack. The only work
    per routing state is an (rows, L) coefficient matrix; nothing per row is gathered and there is
    no Python loop. It pays L*R instead of K*R rank columns per token, which on the CPU is cheaper
    than any gather or per-slot loop while L*R stays small against the layer's width
    (`CpuLoraBackend`'s rule); the (L*R, out) layout is built once per change of the slots'
    contents (the B stack's in-place version counter) and kept: one more copy of the B stack.
    """

    def __init__(self) -> None:
        # id(b_stack) -> (the stack itself, weakly; its in-place version; its (L*R, out) layout)
        self._b_all: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}

    def _b_layout(self, b_stack: torch.Tensor) -> torch.Tensor:
        if b_stack.is_inference():   # made under inference_mode: no version counter, so never kept
            return b_stack.permute(0, 2, 1).reshape(-1, b_stack.shape[1])
        cached = self._b_all.get(id(b_stack))
        if cached is None or cached[0]() is not b_stack or cached[1] != b_stack._version:
            layout = b_stack.permute(0, 2, 1).reshape(-1, b_stack.shape[1]).contiguous()   # (L*R, out)
            self._b_all = {k: v for k, v in self._b_all.items() if v[0]() is not None}   # forget dead stacks
            cached = self._b_all[id(b_stack)] = (weakref.ref(b_stack), b_stack._version, layout)
        return cached[2]

    def prepare(self, a_stack, b_stack, scale, indices, weights):
        """(A_all (L*R, in), B_all (L*R, out), coeff (rows, L, 1)) or None when no row has an adapter."""
        valid = indices >= 0
        if not bool(valid.any()):
            return None
        slots = a_stack.shape[0]
        per_slot = torch.zeros((indices.shape[0], slots), dtype=scale.dtype, device=scale.device)
        per_slot.scatter_add_(1, indices.clamp(min=0), torch.where(valid, weights.to(scale.dtype), 0.0))
        coeff = (per_slot * scale).to(a_stack.dtype)[:, :, None]
        return a_stack.reshape(-1, a_stack.shape[2]), self._b_layout(b_stack), coeff

    def apply(self, y, x, prepared):
        if prepared is None:
            return y
        a_all, b_all, coeff = prepared
        rows, t, _ = x.shape
        h = torch.matmul(x, a_all.T)                                   # (rows, T, L*R)
        h = (h.view(rows, t, coeff.shape[1], -1) * coeff[:, None]).view(rows * t, -1)
        y.view(rows * t, -1).addmm_(h, b_all)
        return y

    def add_lora(self, y, x, a_stack, b_stack, scale, indices, weights):
        return self.apply(y, x, self.prepare(a_stack, b_stack, scale, indices, weights))


@dataclass
class _Routed:
    """One layer's routing state: its arguments, how many forwards used it, what each backend built."""

    args: tuple
    uses: int = 0
    built: dict[LoraBackend, object] = field(default_factory=dict)


class CpuLoraBackend(LoraBackend):
    """The CPU rule: per call, all slots densely, the per-row gather, or one matmul per slot,
    whichever measured better.

    `bench/lora_backends.py` (bench/RESULTS.md: 1 thread, 16 slots, tiny and SmolLM2-135M layer
    shapes, B in {1, 16, 64}, K in {1, 3}, R in {8, 16}, T in {1, 64, 256}) found:
      * prefill (T >= K*R): the gather is fastest (dense pays all L*R columns on every token; grouping
        loops), and its copy, B*K*R*(in+out), is no larger than the activations B*T*(in+out) it
        multiplies; it is used and freed per call;
      * decode on a routing reused across steps (a static batch): the gather, kept, is fastest, so it
        is kept up to REUSED_GATHER_MAX_BYTES per projection (bounded memory held through the batch;
        SmolLM2's 16 rows x K=3 x rank 8 is 3.1 MiB);
      * decode on a routing new this step (the engine's packed pass, one row per token): dense, two
        matmuls over all slots, is as fast as the gather at 1 row and up to 24x faster at 64, and
        1.3-19x faster than grouping (single rows at rank 16 aside), at 16 slots of rank <= 16,
        while the slots' rank columns L*R <= DENSE_MAX_COLUMNS and one projection's work
        rows*L*R*(in+out) <= DENSE_MAX_MACS (past those, measured with more slots and 320 rows,
        grouping wins); outside dense's bounds the gather while one projection's copy
        is <= GATHER_MAX_BYTES, grouping above (up to 4.7x faster at B=64, K=3, R=16, and its extra
        memory is activations only, flat in B*K*R*(in+out)).
    `prepare` is only the routing itself; what each path needs is built lazily and cached in it.
    Plain torch ops, so it is also CUDA's fallback when triton is missing.
    """

    GATHER_MAX_BYTES = 2 * 2**20
    REUSED_GATHER_MAX_BYTES = 4 * 2**20
    DENSE_MAX_COLUMNS = 256
    DENSE_MAX_MACS = 2**25

    def __init__(self) -> None:
        self.gather, self.grouped, self.dense = TorchReferenceBackend(), SlotGroupedBackend(), DenseSlotsBackend()

    def choose(self, indices: torch.Tensor, slots: int, r: int, d_in: int, d_out: int, tokens: int,
               itemsize: int = 4, reused: bool = False) -> LoraBackend:
        """The backend for a (B, K) routing over `slots` rank-`r` slots of a d_in->d_out layer with
        `tokens` per row; `reused`: this routing state already served a forward (a static batch)."""
        bsz, k = indices.shape
        if k * r <= tokens:
            return self.gather                        # prefill
        copy = bsz * k * r * (d_in + d_out) * itemsize
        if reused and copy <= self.REUSED_GATHER_MAX_BYTES:
            return self.gather                        # kept through a static batch
        if slots * r <= self.DENSE_MAX_COLUMNS and bsz * tokens * slots * r * (d_in + d_out) <= self.DENSE_MAX_MACS:
            return self.dense
        return self.gather if copy <= self.GATHER_MAX_BYTES else self.grouped

    def prepare(self, a_stack, b_stack, scale, indices, weights):
        return _Routed((a_stack, b_stack, scale, indices, weights))

    def apply(self, y, x, prepared):
        a_stack, b_stack, _, indices, _ = prepared.args
        slots, r, d_in = a_stack.shape
        reused, prepared.uses = prepared.uses > 0, prepared.uses + 1
        backend = self.choose(indices, slots, r, d_in, b_stack.shape[1], x.shape[1], a_stack.element_size(), reused)
        if backend is self.gather and indices.shape[1] * r <= x.shape[1]:  # prefill: gather, use, free
            return self.gather.add_lora(y, x, *prepared.args)
        if backend not in prepared.built:
            prepared.built[backend] = backend.prepare(*prepared.args)
        return backend.apply(y, x, prepared.built[backend])

    def add_lora(self, y, x, a_stack, b_stack, scale, indices, weights):
        return self.apply(y, x, self.prepare(a_stack, b_stack, scale, indices, weights))


def get_backend(device: torch.device | str) -> LoraBackend:
    """The backend for `device`: `TritonBackend` on CUDA (when triton imports and is not in
    interpreter mode), `CpuLoraBackend`'s measured rule everywhere else."""
    if torch.device(device).type == "cuda":
        try:
            from routing.lora.triton_backend import TritonBackend, interpreting
        except ImportError:
            return CpuLoraBackend()
        if not interpreting():
            return TritonBackend()
    return CpuLoraBackend()
