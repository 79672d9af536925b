"""Name DeepSpeed's accelerator on machines without CUDA, before anything imports DeepSpeed.

Left to detect it, DeepSpeed (which transformers' Trainer imports whenever it is installed) prints
a warning to stdout, where our commands and benchmarks keep only their JSON.
"""

from __future__ import annotations

import os


def use_cpu_deepspeed_without_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
