"""A deployment's placement from its `AppArgs` and what Ray gave the replica.

`routing.devices` holds the rule and never imports ray; this is the one place that asks Ray whether
the replica was assigned a GPU (its deployment's `ray_actor_options.num_gpus`).
"""

from __future__ import annotations

import ray

from routing.devices import Placement, resolve_placement

from .config import AppArgs


def gpu_assigned() -> bool:
    """Ray assigned this worker at least one GPU; False outside Ray (where `ray.get_gpu_ids()` would
    start a local Ray instance just to answer)."""
    return ray.is_initialized() and bool(ray.get_gpu_ids())


def replica_placement(cfg: AppArgs, who: str) -> Placement:
    """`cfg.device`/`cfg.dtype` resolved for deployment `who`; raises `PlacementError` at start-up."""
    return resolve_placement(cfg.device, cfg.dtype, gpu_assigned=gpu_assigned(), who=who)
