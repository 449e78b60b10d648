"""Where the quantization job computes: a recipe's `device` (auto, cpu, cuda, cuda:N, mps), resolved once, before
any work, into a torch.device.

The device is where the job *makes* the int8 model (the FP chains, observers, bias correction, rounding, the
report's FP network); the int8 model itself always runs on the CPU backends, and what the job writes (the model
folder, the export, the deployment folder) is the same whatever device made it. Under torchrun with CUDA, rank r
takes `cuda:LOCAL_RANK`, as torch's own convention is.
"""

from __future__ import annotations

import itertools
import os
import re

import torch

from .errors import QtoolkitError

AUTO = "auto"
DEVICE_FORMAT = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_CHOICES = "auto (the first accelerator present, else the CPU), cpu, cuda, cuda:N or mps"


def check_device_name(name: str) -> str:
    """`name` if it names a device kind qtoolkit knows, else one line listing the choices."""
    if not isinstance(name, str) or not DEVICE_FORMAT.fullmatch(name):
        raise QtoolkitError(f"device {name!r} is not one of {DEVICE_CHOICES}")
    return name


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    """The torch.device the recipe's `device` names on this machine; one clear line when it is not there."""
    check_device_name(name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == AUTO:
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise QtoolkitError("device mps was asked for, and torch sees no Apple GPU (MPS) here: set device: cpu, "
                                "or auto (the first accelerator present, else the CPU)")
        return torch.device("mps")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise QtoolkitError(f"device {name} was asked for, and torch {torch.__version__} ({build}) sees no CUDA GPU "
                            "here: set device: cpu, or auto (the first accelerator present, else the CPU)")
    index = local_rank if name == "cuda" else int(name.split(":")[1])
    if index >= torch.cuda.device_count():
        raise QtoolkitError(f"device {name} was asked for (GPU {index}), and torch sees {torch.cuda.device_count()} "
                            f"CUDA GPU(s) here: choose cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are (the CPU for one without any)."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")
