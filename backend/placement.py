"""Where a process runs its model: device, dtype and preprocessing from the settings, and `--gpu` pinning.

One worker per GPU: `CUDA_VISIBLE_DEVICES=1 python -m backend worker` (or `--gpu 1`, which sets it) makes GPU 1 the
only one the process sees, so EVF_SAM_DEVICE "auto" puts the model on it as `cuda:0`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass

from evf_sam.errors import EvfError

_GPU = re.compile(r"^(\d+|(GPU|MIG)-[0-9A-Za-z-]+)$")


class PlacementError(EvfError):
    """EVF_SAM_DEVICE / --gpu ask for a device this process cannot use."""


@dataclass(frozen=True)
class Placement:
    """What the model is loaded with: `device` ("cpu", "cuda:0", ...), `dtype` ("float32", "bfloat16", ...) and
    `preprocess` (None: resize/normalise on the CPU; "model": on the model's device)."""

    device: str
    dtype: str
    preprocess: str | None


def pin_gpu(gpu: str, environ: MutableMapping[str, str] = os.environ) -> None:
    """Let this process see only `gpu` (an index such as "1" or a GPU/MIG UUID), as CUDA_VISIBLE_DEVICES does.

    Must run before CUDA starts in the process; raises PlacementError for a list, a bad value or a late call."""
    gpu = gpu.strip()
    if not _GPU.match(gpu):
        raise PlacementError(f"--gpu takes one GPU, an index like 1 or a UUID like GPU-5f1c…, got {gpu!r} (run one "
                             "worker per GPU)")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise PlacementError("--gpu must be applied before CUDA starts in this process")
    environ["CUDA_VISIBLE_DEVICES"] = gpu


def resolve(device: str, dtype: str, preprocess: str, *, visible_gpus: int,
            environ: MutableMapping[str, str] = os.environ) -> Placement:
    """EVF_SAM_DEVICE / EVF_SAM_DTYPE / EVF_SAM_PREPROCESS -> the placement, given how many GPUs this process sees.

    "auto" device: the first visible GPU, else the CPU. "auto" dtype: bfloat16 on a GPU, float32 on the CPU. "auto"
    preprocessing: on the GPU when the model is there. Raises PlacementError naming the setting it cannot honour."""
    device = device.strip().lower()
    if device == "auto":
        device = "cuda:0" if visible_gpus else "cpu"
    elif device == "cuda":
        device = "cuda:0"
    if device.startswith("cuda"):
        index = device.partition(":")[2]
        if not index.isdigit():
            raise PlacementError(f"EVF_SAM_DEVICE={device!r} is not a device: use auto, cpu, cuda or cuda:N")
        if int(index) >= visible_gpus:
            seen = environ.get("CUDA_VISIBLE_DEVICES")
            raise PlacementError(
                f"EVF_SAM_DEVICE={device} but this process sees {visible_gpus} CUDA GPU(s)"
                + (f" (CUDA_VISIBLE_DEVICES={seen}: numbering starts at 0 among those)" if seen is not None else ""))
    elif device != "cpu" and not device.startswith("mps"):
        raise PlacementError(f"EVF_SAM_DEVICE={device!r} is not a device: use auto, cpu, cuda or cuda:N")
    on_gpu = device.startswith("cuda")
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu else "float32"
    if preprocess == "auto":
        preprocess = "device" if on_gpu else "cpu"
    return Placement(device=device, dtype=dtype, preprocess="model" if preprocess == "device" else None)


def visible_gpus() -> int:
    """How many CUDA GPUs this process can use (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
