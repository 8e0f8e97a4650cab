"""Cheap facts about this machine's accelerators, for checks that run before torch is imported.

Importing torch takes about 1.2 s on a 2-core machine, most of `stillhouse validate`'s budget. A machine without
GPU device files can't have a CUDA (or ROCm) device, so there the answer needs no torch; where they exist, torch
counts the devices (visibility settings such as CUDA_VISIBLE_DEVICES are torch's to apply).
"""

from __future__ import annotations

import glob
import os


def may_have_gpus() -> bool:
    """False only when this machine certainly has no GPU torch could use: no NVIDIA or AMD device files."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False  # every device hidden: torch.cuda.device_count() is 0 whatever is installed
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd") or os.path.exists("/dev/dxg"))


def cuda_device_count() -> int:
    """`torch.cuda.device_count()`, without importing torch where no GPU can be."""
    if not may_have_gpus():
        return 0
    import torch

    return torch.cuda.device_count()


def cuda_available() -> bool:
    """`torch.cuda.is_available()`, without importing torch where no GPU can be."""
    if not may_have_gpus():
        return False
    import torch

    return torch.cuda.is_available()
