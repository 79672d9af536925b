"""`FusedLoraModel`: any HF causal LM with its target linears swapped for `FusedLoraLinear`.

Adapters are peft LoRA directories (`adapter_config.json` + `adapter_model.safetensors`) copied
into fixed slots; a batch's per-row routing (`with model.routing(rows):`) picks slots and weights
for every fused layer at once. Only what the fused math serves exactly is accepted; everything
else (DoRA and other variants, pickled weights, ranks above the slot size, ...) raises
`AdapterLoadError` at load time rather than being approximated.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from routing.adapter_config import AdapterLoadError, adapter_failure, read_adapter_config
from routing.lora.backend import LoraBackend, get_backend
from routing.lora.layer import FusedLoraLinear, RoutingState

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    slot: int
    path: Path
    modules: int  # fused layers the adapter targets (others hold zeros in its slot)
    max_rank: int  # largest rank over its modules


def _pattern_value(patterns: dict, module: str, default):
    """peft's `get_pattern_key`: the first pattern that matches a dotted suffix of `module`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class FusedLoraModel(nn.Module):
    """Wraps a HF causal LM; every `nn.Linear` whose name ends in a target becomes fused.

    Args:
        model: the base causal LM (Llama, Qwen2, Mistral, ...), in eval mode.
        max_loras: adapter slots per layer (resident adapters at once).
        max_rank: slot rank; adapters with smaller ranks are zero-padded (exact).
        target_modules: module-name suffixes to fuse; an adapter may target any subset.
        backend: the `LoraBackend`; default `get_backend(device of the model)`.
        cache_prepared: keep each layer's gathered per-row stacks for the whole batch (one gather
            per `generate` instead of one per step); costs B*K*max_rank*(in+out) elements per layer
            while the batch runs. Memory: the slots themselves are max_loras*max_rank*(in+out) per layer.
    """

    def __init__(self, model: nn.Module, max_loras: int = 8, max_rank: int = 16,
                 target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, backend: LoraBackend | None = None,
                 cache_prepared: bool = True):
        super().__init__()
        self.model = model
        self.max_loras, self.max_rank = max_loras, max_rank
        self.target_modules = tuple(target_modules)
        self.routing_state = RoutingState()
        device = next(model.parameters()).device
        self.backend = backend if backend is not None else get_backend(device)
        self.layers: dict[str, FusedLoraLinear] = {}
        targets = [(name, mod) for name, mod in model.named_modules()
                   if isinstance(mod, nn.Linear) and self._is_target(name)]
        if not targets:
            raise ValueError(f"no nn.Linear in the model ends in any of {self.target_modules}")
        for name, linear in targets:
            fused = FusedLoraLinear(linear, max_loras, max_rank, self.routing_state, self.backend, cache_prepared)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fused)
            self.layers[name] = fused
        self._adapters: dict[str, LoadedAdapter] = {}

    def _is_target(self, name: str) -> bool:
        return any(name == t or name.endswith("." + t) for t in self.target_modules)

    # ---- adapters -------------------------------------------------------------------------------

    @property
    def slots(self) -> dict[str, int]:
        """Loaded adapter name -> slot."""
        return {name: a.slot for name, a in self._adapters.items()}

    @property
    def adapters(self) -> dict[str, LoadedAdapter]:
        return dict(self._adapters)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_adapter(self, name: str, path: str | Path) -> int:
        """Load the peft LoRA directory `path` into a free slot as `name`; returns the slot.

        Honours r, lora_alpha, use_rslora (scale alpha/sqrt(r), else alpha/r), rank_pattern and
        alpha_pattern (peft's suffix-regex matching), and per-adapter target modules: layers the
        adapter does not target hold zeros in its slot. Everything is read and checked before
        any slot is written, so a failed load changes nothing. Raises `AdapterLoadError`.
        """
        path = Path(path)
        if name in self._adapters:
            raise AdapterLoadError(f"adapter {name!r} is already loaded (slot {self._adapters[name].slot}); "
                                   "unload it first")
        deltas = self._read_adapter(name, path)
        used = {a.slot for a in self._adapters.values()}
        free = [s for s in range(self.max_loras) if s not in used]
        if not free:
            raise AdapterLoadError(f"cannot load adapter {name!r}: all {self.max_loras} slots are in use "
                                   f"({sorted(self._adapters)}); unload one first")
        slot = free[0]
        for module, layer in self.layers.items():
            if module in deltas:
                a, b, scale = deltas[module]
                layer.set_slot(slot, a, b, scale)
            else:
                layer.clear_slot(slot)
        self.routing_state.bump()
        self._adapters[name] = LoadedAdapter(name, slot, path, len(deltas),
                                             max(a.shape[0] for a, _, _ in deltas.values()))
        return slot

    def unload_adapter(self, name: str) -> None:
        """Free `name`'s slot (zeroed, so a stale index can only ever add 0)."""
        if name not in self._adapters:
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {sorted(self._adapters)})")
        slot = self._adapters.pop(name).slot
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self.routing_state.bump()

    def _read_adapter(self, name: str, path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """module name -> (A (r, in), B (out, r), scale), validated against the fused layers."""
        fail = adapter_failure(name, path)
        cfg = read_adapter_config(path, name)
        weights_file = path / "adapter_model.safetensors"
        if not weights_file.is_file():
            if (path / "adapter_model.bin").is_file():
                raise fail("only adapter_model.bin, a pickle, which is refused (loading it can run arbitrary "
                           "code); re-save with save_pretrained(..., safe_serialization=True)")
            raise fail("no adapter_model.safetensors")

        r_default, alpha_default = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        rslora = bool(cfg.get("use_rslora", False))

        pairs: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(weights_file), framework="pt", device="cpu") as f:
            for key in f.keys():
                m = _KEY_RE.match(key)
                if m is None:
                    raise fail(f"tensor {key!r} is not a LoRA A/B weight (DoRA magnitude, bias, embedding "
                               "or modules_to_save weights cannot be served by the fused layers)")
                pairs.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(key)
        if not pairs:
            raise fail("adapter_model.safetensors holds no LoRA weights")

        deltas = {}
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise fail(f"module {module!r} has lora_{'A' if 'A' in ab else 'B'} without its pair")
            layer = self.layers.get(module)
            if layer is None:
                raise fail(f"targets {module!r}, which is not a fused layer of this model (fused suffixes: "
                           f"{self.target_modules}); wrong base model, or add it to target_modules")
            a, b = ab["A"], ab["B"]
            r = a.shape[0]
            if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r:
                raise fail(f"module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not pair")
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise fail(f"module {module!r}: LoRA is {a.shape[1]}->{b.shape[0]} but the base layer is "
                           f"{layer.in_features}->{layer.out_features} (adapter trained on another base?)")
            if r > self.max_rank:
                raise fail(f"module {module!r} has rank {r} > max_rank {self.max_rank}; raise max_rank")
            r_cfg = int(_pattern_value(rank_pattern, module, r_default))
            if r_cfg != r:
                raise fail(f"module {module!r}: weights have rank {r} but the config says r={r_cfg}")
            alpha = float(_pattern_value(alpha_pattern, module, alpha_default))
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            if not (a.is_floating_point() and b.is_floating_point()):
                raise fail(f"module {module!r}: weights are {a.dtype}/{b.dtype}, not floating point")
            deltas[module] = (a, b, scale)
        return deltas

    # ---- routing --------------------------------------------------------------------------------

    def _routing_tensors(self, rows: Sequence[Sequence[tuple[str, float]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices (B, K) long, -1 = none; weights (B, K)) for `rows` = [[(name, weight), ...], ...]."""
        k = max([1, *(len(r) for r in rows)])
        indices = torch.full((len(rows), k), -1, dtype=torch.long)
        weights = torch.zeros((len(rows), k), dtype=torch.float32)
        for b, row in enumerate(rows):
            for j, (name, w) in enumerate(row):
                if name not in self._adapters:
                    raise KeyError(f"row {b}: adapter {name!r} is not loaded (loaded: {sorted(self._adapters)})")
                if not math.isfinite(float(w)):
                    raise ValueError(f"row {b}: weight {w!r} for {name!r} is not finite")
                indices[b, j] = self._adapters[name].slot
                weights[b, j] = float(w)
        return indices.to(self.device), weights.to(self.device)

    @contextlib.contextmanager
    def routing(self, rows: Sequence[Sequence[tuple[str, float]]]) -> Iterator[None]:
        """Route batch row b through the adapters in `rows[b]` = [(name, weight), ...].

        An empty row is the bare base model; weights are used as given (not renormalised). The
        state is shared by every fused layer and holds until the block exits (one `generate`
        call), then the previous state comes back. Not thread-safe: one batch at a time.
        """
        state = self.routing_state
        previous = (state.indices, state.weights)
        state.set(*self._routing_tensors(rows))
        try:
            yield
        finally:
            state.set(*previous)
            for layer in self.layers.values():
                layer.release()

    def set_routing(self, rows: Sequence[Sequence[tuple[str, float]]], repeats: Sequence[int] | None = None) -> None:
        """Route the next forward passes' rows until the next call: the engine's per-pass form of
        `routing`, where the rows change whenever a sequence joins or leaves the batch. `repeats[b]`
        batch rows take `rows[b]`'s route (the engine's packed pass: one row per token). Setting the
        routing the layers already hold keeps their prepared state."""
        indices, weights = self._routing_tensors(rows)
        if repeats is not None:
            counts = torch.tensor(list(repeats), device=indices.device)
            indices, weights = indices.repeat_interleave(counts, dim=0), weights.repeat_interleave(counts, dim=0)
        state = self.routing_state
        if (state.indices is not None and state.indices.shape == indices.shape
                and torch.equal(state.indices, indices) and torch.equal(state.weights, weights)):
            return
        state.set(indices, weights)

    # ---- pass-through ---------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)
