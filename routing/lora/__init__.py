"""Fused multi-LoRA serving: many peft LoRA adapters in fixed slots of one base model.

`FusedLoraModel` swaps a causal LM's target linears for `FusedLoraLinear`; `AdapterStore` keeps
the adapters a batch needs resident (LRU); `generate` runs one mixed batch, each row routed to one
adapter, a weighted K-way fusion, or the bare base (the static path: peft-exactness tests, Successive
Halving, benchmarks; serving runs the continuous-batching engine of `routing.engine` over the same fused
layers). Kernels sit behind `LoraBackend`.
"""

from routing.lora.backend import (CpuLoraBackend, DenseSlotsBackend, LoraBackend, SlotGroupedBackend,
                                  TorchReferenceBackend, get_backend)
from routing.lora.generate import Generation, generate
from routing.lora.layer import FusedLoraLinear, RoutingState
from routing.adapter_config import AdapterLoadError, read_adapter_config
from routing.lora.model import DEFAULT_TARGET_MODULES, FusedLoraModel, LoadedAdapter
from routing.lora.store import AdapterStore, CapacityError

__all__ = [
    "DEFAULT_TARGET_MODULES", "AdapterLoadError", "AdapterStore", "CapacityError", "CpuLoraBackend",
    "DenseSlotsBackend", "FusedLoraLinear", "FusedLoraModel", "Generation", "LoadedAdapter", "LoraBackend", "RoutingState",
    "SlotGroupedBackend", "TorchReferenceBackend",
    "generate", "get_backend", "read_adapter_config",
]
