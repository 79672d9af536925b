"""What the fused multi-LoRA layers serve exactly, read from an adapter's peft config alone.

Torch-free, so a catalog can refuse an adapter when it is loaded (or a driver before it starts any
work) instead of a Generator refusing it on the first request that routes there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


class AdapterLoadError(ValueError):
    """An adapter directory that cannot be served exactly by the fused layers."""


# Config fields that select a LoRA variant with its own forward math (peft marks them
# `is_lora_variant`); none of them is a plain low-rank delta. `use_dora` has its own message.
_VARIANT_FIELDS = ("velora_config", "alora_invocation_tokens", "monteclora_config", "use_bdlora",
                   "arrow_config", "kasa_config", "use_qalora")
# Fields that make the adapter more than LoRA deltas on the target linears.
_EXTRA_MODULE_FIELDS = ("modules_to_save", "trainable_token_indices", "target_parameters", "layer_replication")
# Initialisations that leave the base weights untouched. PiSSA / OLoRA / CorDA / LoRA-GA / LoftQ
# rewrite the base: such an adapter only works on its own residual base until converted.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def read_adapter_config(path: Path, name: str) -> dict:
    """`path`'s peft config, refused with `AdapterLoadError` (naming adapter `name`) unless the fused
    layers serve what it describes exactly. Reads the config alone, so a driver can check a pool of
    adapters before any base model is loaded; the weights are checked when loaded."""
    fail = adapter_failure(name, path)
    if not path.is_dir():
        raise fail("not a directory")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise fail("no adapter_config.json (not a peft adapter directory)")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise fail(f"adapter_config.json is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise fail("adapter_config.json is not a JSON object")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise fail(f"peft_type is {cfg.get('peft_type')!r}, only LORA adapters are served")
    if cfg.get("use_dora"):
        raise fail("DoRA (use_dora=true) is refused: serving it exactly would need the per-adapter "
                   "magnitude path (its magnitude vector rescales each output by the norm of W + BA, "
                   "which is not an additive low-rank delta), which the fused multi-LoRA layer does "
                   "not have; peft's mixed batches refuse DoRA too. Merge it into a base copy instead")
    for f in _VARIANT_FIELDS:
        if cfg.get(f):
            raise fail(f"LoRA variant {f}={cfg[f]!r} changes the forward math; only plain LoRA is served")
    if cfg.get("fan_in_fan_out"):
        raise fail("fan_in_fan_out=true (Conv1D-style weights) is refused rather than silently transposed")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise fail(f"trains biases (bias={cfg.get('bias')!r}, lora_bias={cfg.get('lora_bias')!r}); "
                   "the fused layers serve weight deltas only")
    for f in _EXTRA_MODULE_FIELDS:
        if cfg.get(f):
            raise fail(f"{f}={cfg[f]!r}: the adapter changes more than LoRA deltas on the target linears")
    init = cfg.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise fail(f"init_lora_weights={init!r} rewrites the base weights, so it only works on its own "
                   "residual base; convert it to a plain LoRA first: save_pretrained(out, "
                   "path_initial_model_for_weight_conversion=<dir of the untrained adapter>)")
    return cfg


def adapter_failure(name: str, path: Path) -> Callable[[str], AdapterLoadError]:
    return lambda msg: AdapterLoadError(f"adapter {name!r} ({path}): {msg}")
