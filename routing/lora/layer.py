"""`FusedLoraLinear`: a base `nn.Linear` plus every loaded adapter's LoRA, stacked in fixed slots."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from routing.lora.backend import LoraBackend, get_backend


@dataclass
class RoutingState:
    """Per-batch routing shared by every fused layer of one model.

    indices: (B, K) long, slot per (row, k), -1 = none. weights: (B, K) float. `None` indices mean
    "no routing set": every layer computes the bare base model. `version` changes whenever the
    state does, so layers know when their prepared (gathered) stacks are stale.
    """

    indices: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    version: int = 0

    def set(self, indices: torch.Tensor | None, weights: torch.Tensor | None) -> None:
        self.indices, self.weights = indices, weights
        self.version += 1

    def bump(self) -> None:
        """Invalidate layer caches (slot contents changed) without changing the routing."""
        self.set(self.indices, self.weights)


class FusedLoraLinear(nn.Module):
    """`y = base(x) + Σ_k w[b,k] · s[i] · B[i] A[i] x[b]` with i = indices[b,k], per batch row b.

    Stacks are preallocated at construction (vLLM `create_lora_weights`): A (max_loras, max_rank,
    in), B (max_loras, out, max_rank), scale (max_loras,); all zeros = an empty slot. Loading an
    adapter copies into a slot (`set_slot`) and never reallocates, so memory is fixed up front.
    """

    def __init__(self, base: nn.Linear, max_loras: int, max_rank: int, routing: RoutingState,
                 backend: LoraBackend | None = None, cache_prepared: bool = True):
        super().__init__()
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras and max_rank must be >= 1, got {max_loras}, {max_rank}")
        self.base = base
        self.max_loras, self.max_rank = max_loras, max_rank
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        kw = dict(dtype=w.dtype, device=w.device)
        self.register_buffer("lora_a", torch.zeros(max_loras, max_rank, self.in_features, **kw), persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, self.out_features, max_rank, **kw), persistent=False)
        self.register_buffer("lora_scale", torch.zeros(max_loras, dtype=torch.float32, device=w.device),
                             persistent=False)
        self.routing = routing
        self.backend = backend if backend is not None else get_backend(w.device)
        # The backend's per-batch gather, kept across decoding steps: B*K*max_rank*(in+out) elements
        # per layer while a batch runs. cache_prepared=False re-gathers every step instead.
        self.cache_prepared = cache_prepared
        self._prepared: object = None
        self._prepared_version = -1

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Copy one adapter's `a` (r, in), `b` (out, r) and `scale` into `slot`, r <= max_rank.

        Ranks below max_rank are zero-padded: rows r.. of A and columns r.. of B are 0, so the
        padded rank components contribute `B[:, j] * (A[j] · x) = 0 * 0 = 0` exactly: the padded
        product equals B[:, :r] @ A[:r] bit for bit up to the summation order of exact zeros.
        """
        self._check_slot(slot)
        r = a.shape[0]
        if a.shape != (r, self.in_features) or b.shape != (self.out_features, r):
            raise ValueError(f"LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a "
                             f"{self.in_features}->{self.out_features} linear")
        if r > self.max_rank:
            raise ValueError(f"rank {r} > max_rank {self.max_rank}")
        with torch.no_grad():
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
            self.lora_a[slot, :r].copy_(a)
            self.lora_b[slot, :, :r].copy_(b)
            self.lora_scale[slot] = float(scale)
        self._prepared_version = -1

    def clear_slot(self, slot: int) -> None:
        """Zero `slot`: a layer the adapter does not target adds exactly nothing for it."""
        self._check_slot(slot)
        with torch.no_grad():
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
            self.lora_scale[slot] = 0.0
        self._prepared_version = -1

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_loras:
            raise IndexError(f"slot {slot} out of range [0, {self.max_loras})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        # a plain nn.Linear is called functionally (skips module-call overhead on every step)
        y = F.linear(x, base.weight, base.bias) if type(base) is nn.Linear else base(x)  # (B, T, out)
        state = self.routing
        if state.indices is None:
            return y
        if x.shape[0] != state.indices.shape[0]:
            raise RuntimeError(f"batch has {x.shape[0]} rows but the routing state has "
                               f"{state.indices.shape[0]}: set routing for exactly this batch")
        if self._prepared_version == state.version:
            prepared = self._prepared
        else:
            prepared = self.backend.prepare(self.lora_a, self.lora_b, self.lora_scale, state.indices, state.weights)
            if self.cache_prepared:
                self._prepared, self._prepared_version = prepared, state.version
        lead = x.shape[:-1]
        x3 = x.reshape(x.shape[0], -1, self.in_features)  # (B, T, in)
        y3 = y.view(y.shape[0], -1, self.out_features)  # (B, T, out), a view: updated in place
        self.backend.apply(y3, x3, prepared)
        return y3.view(*lead, self.out_features)

    def release(self) -> None:
        """Drop the prepared (gathered) stacks; called when a batch's routing ends."""
        self._prepared, self._prepared_version = None, -1

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, max_loras={self.max_loras}, "
                f"max_rank={self.max_rank}, backend={type(self.backend).__name__}")
