from __future__ import annotations

import asyncio

import numpy as np
import torch
from ray import serve

from routing.catalog import Catalog
from routing.encoder import Encoder

from .config import AppArgs
from .placement import replica_placement


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128)
class Embedder:
    """The sentence encoder named by the catalog; concurrent requests are encoded as one batch."""

    def __init__(self, args: dict):
        cfg = AppArgs(**args)
        torch.set_num_threads(cfg.torch_threads)
        placement = replica_placement(cfg, "Embedder")  # PlacementError (start-up) for cuda without CUDA
        enc = Catalog.load(cfg.catalog, verify=False).encoder
        self.encoder = Encoder(enc["name"], enc["prefix"], device=placement.device, dtype=placement.dtype)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def embed(self, texts: list[str]) -> list[np.ndarray]:
        return list(await asyncio.to_thread(self.encoder.encode, texts))
