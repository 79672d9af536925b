"""Where a model runs and in which precision: one rule for every deployment that holds a model.

`auto` means the GPU when one was assigned to the process (Ray's `num_gpus`) and CUDA works, in
bfloat16 (float16 on GPUs without bf16); otherwise the CPU in float32. An explicit `cuda` on a
machine without CUDA is a start-up configuration error naming the deployment (`PlacementError`),
never a crash inside a request. This module never imports ray: whether Ray assigned a GPU is the
caller's knowledge (`serve_app.placement.gpu_assigned`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

DeviceName = Literal["auto", "cpu", "cuda"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PlacementError(ValueError):
    """A device/dtype request this machine cannot honour; the message names who asked."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def cuda_dtype() -> torch.dtype:
    """bfloat16 where the GPU supports it (Ampere and later), else float16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_placement(device: str = "auto", dtype: str = "auto", *, gpu_assigned: bool, who: str) -> Placement:
    """The placement for `who` (a deployment or command name, used in error messages).

    `gpu_assigned`: the process was given a GPU (Ray `num_gpus`, or a CLI run on a GPU machine).
    float16/bfloat16 on the CPU are allowed when asked for explicitly (slow, but valid).
    """
    if device not in DEVICES:
        raise PlacementError(f"{who}: device {device!r} is not one of {DEVICES}")
    if dtype != "auto" and dtype not in DTYPES:
        raise PlacementError(f"{who}: dtype {dtype!r} is not one of {('auto', *DTYPES)}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise PlacementError(f"{who}: device 'cuda' was asked for, but CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use device 'auto' or 'cpu'")
    on_cuda = device == "cuda" or (device == "auto" and gpu_assigned and cuda)
    if on_cuda:
        # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU, so index 0 is the replica's own.
        resolved = torch.device("cuda", 0)
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise PlacementError(f"{who}: dtype 'bfloat16' was asked for, but {torch.cuda.get_device_name(0)} "
                                 "does not support it; use 'float16' or 'auto'")
        return Placement(resolved, cuda_dtype() if dtype == "auto" else DTYPES[dtype])
    return Placement(torch.device("cpu"), torch.float32 if dtype == "auto" else DTYPES[dtype])
