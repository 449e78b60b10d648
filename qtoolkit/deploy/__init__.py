"""Real int8 in PyTorch itself: load a deployment folder (`qtoolkit export --format torch`) on a CPU backend.

Layer: integer execution, PyTorch's int8 (below engines, above export). May import export, ptq and everything
below it, never engines.

    import torch, qtoolkit.deploy
    model = qtoolkit.deploy.load("deployed/")           # fbgemm on x86, qnnpack on ARM; or backend="x86-onednn"
    noise = model(torch.randn(4, *model.sample_shape), torch.full((4,), 500))

The backends are plugins (`register_backends` with export_format "torch"): each lowers the frozen quantized graph
to its int8 kernels (Backend.lower). `load` picks the one `backend: auto` would pick for the model's
quantization, on this machine.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import fx, nn

from ..backend_lookup import AUTO, TORCH_FORMAT, resolve_backend
from ..errors import QtoolkitError
from ..quant import QuantConfig
from ..quant.overflow import warn_if_saturating
from .folder import export_deployment, is_deployment_folder, read_deployment, rebuild_frozen_graph

T = TypeVar("T")


class DeployedModel(nn.Module):
    """A lowered int8 graph called as `model(sample, timestep) -> noise`, with what sampling needs besides
    (`sample_shape`, `scheduler_config`: qtoolkit.sampling.sample(model, ..., eps=model) draws from it)."""

    def __init__(self, graph: nn.Module, backend: str, sample_shape: tuple[int, ...], scheduler_config: dict):
        super().__init__()
        self.graph, self.backend = graph, backend
        self.sample_shape, self.scheduler_config = tuple(sample_shape), scheduler_config

    @torch.no_grad()
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        # The integer convolutions run channels-last; giving them the sample that way saves the first conversion.
        return self.graph(sample.contiguous(memory_format=torch.channels_last), timestep)


def torch_backend(name: str, config: QuantConfig):
    """The export-format "torch" backend `name` ("auto": the one for this machine and this quantization)."""
    backend = resolve_backend(name, config, export_format=TORCH_FORMAT)
    if backend.export_format != TORCH_FORMAT:
        raise QtoolkitError(f"the {backend.name} backend runs ONNX exports, not PyTorch deployment folders: choose "
                            f"backend={AUTO!r} or a torch backend")
    reason = backend.cannot_run(config)
    if reason:
        raise QtoolkitError(f"the {backend.name} backend cannot run this model: {reason}")
    return backend


def lower_graph(qgraph: fx.GraphModule, backend: str = AUTO) -> nn.Module:
    """The frozen quantized graph on a torch backend's int8 kernels (called `(sample, timestep) -> noise`)."""
    from ..graph import quant_config_of

    return torch_backend(backend, quant_config_of(qgraph)).lower(qgraph)


def load(folder: str | os.PathLike, backend: str | None = None) -> DeployedModel:
    """The deployment folder's model on `backend` (None or "auto": fbgemm on x86, qnnpack on ARM, x86-onednn
    for a model whose convolution outputs are not quantized), ready to call; refuses damaged folders."""
    def build() -> DeployedModel:
        qgraph, description, scheduler_config = rebuild_frozen_graph(folder)
        config = QuantConfig.from_dict(description["quantized_model"]["quant_config"])
        chosen = torch_backend(backend or AUTO, config)
        warn_if_saturating(config, chosen)
        return DeployedModel(chosen.lower(qgraph), chosen.name, description["sample_shape"], scheduler_config).eval()
    return in_own_arena(build)


def loader(backend: str | None):
    """A torch backend's Backend.load: (deployment folder, threads, float_precision "fp32") -> the model on it
    (backend None: load's choice for the folder's quantization)."""
    def load_folder(folder: str | os.PathLike, threads: int | None = None, float_precision: str = "fp32"):
        if threads is not None:
            torch.set_num_threads(threads)  # PyTorch's thread pool is per process
        return load(folder, backend=backend)
    return load_folder


def in_own_arena(work: Callable[[], T]) -> T:
    """work(), run in a short-lived thread, then the memory it freed given back to the OS.

    Building a model (rebuilding the float graph, packing weights, compiling) allocates several times the
    model's size in temporaries around the objects it keeps. In the calling thread, glibc would leave those
    temporaries' holes in the heap that every later forward allocates its activations from, and the forwards'
    resident memory would grow into them: on the CIFAR-10 architecture, the fbgemm backend's peak at batch 16
    was 115 MiB higher built in the caller's thread than in a thread of its own. glibc gives each thread its own
    malloc arena, so the holes stay in the builder's arena, whose free pages malloc_trim releases after it.
    The builder runs with the caller's number of torch threads, so a forward it runs computes what the
    caller's would."""
    threads = torch.get_num_threads()

    def run() -> T:
        torch.set_num_threads(threads)
        return work()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qtoolkit-build") as pool:
        result = pool.submit(run).result()
    release_freed_memory()
    return result


def release_freed_memory() -> None:
    """Give the memory freed in this process back to the OS now: glibc keeps freed heap memory in the process
    (the deployed model's resident memory stayed 0.5 GB above FP32 eager's on the CIFAR-10 architecture
    without this)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # another C library (musl): nothing to trim
            pass


__all__ = ["DeployedModel", "export_deployment", "is_deployment_folder", "load", "loader", "lower_graph",
           "read_deployment", "TORCH_FORMAT", "in_own_arena"]
