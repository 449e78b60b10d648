"""Capture a noise-prediction network into an FX GraphModule with torch.export.

Why torch.export and not torch.fx.symbolic_trace: symbolic tracing fails on diffusers' UNets ("'len' is not
supported in symbolic tracing"), and torch.ao's FX quantization workflow built on it is deprecated. torch.export
traces the real Python code with fake tensors, so any network torch can run without data-dependent control flow
is captured, and its pre-dispatch graph keeps the high-level ops qtoolkit quantizes (aten.conv2d, aten.linear,
aten.scaled_dot_product_attention) with each node's source module path in `node.meta["nn_module_stack"]`.

Batch sizes. torch.export proves the graph for a range of batch sizes: an example batch of 2 (batch 0 and 1
are specialised, so it never proves 1), and below any Python branch on the batch size (diffusers' Upsample2D
adds `.contiguous()` from batch 64 on, so the proof stops at 63). The branches that exist only for memory
layout compute the same numbers, so the captured graph is checked against the network itself at batch 1 and
just above the proven range, and if it agrees there it runs at every batch size; if it does not (a network
whose computation depends on the batch size), capture refuses with the batch that differs.
"""

from __future__ import annotations

import contextlib
import copy
import re
import traceback
import warnings

import torch
from torch import fx, nn
from torch.export import Dim

from ..devices import device_of
from ..errors import QtoolkitError

EXAMPLE_BATCH = 2
# Capture checks the graph at these batch sizes, besides just above the range torch.export proved.
CHECKED_BATCHES = (1,)
# The graph must serve at least this batch (the default sampling and calibration batch is 256).
MIN_SUPPORTED_BATCH = 256
INPUT_NAMES = ("sample", "timestep")
# Ops of the captured graph that only assert what torch.export already checked (dtype, device, layout).
_ASSERT_OPS = (torch.ops.aten._assert_tensor_metadata.default,)


@contextlib.contextmanager
def torch_pytree_warning_hidden():
    """Hide the FutureWarning torch 2.13 emits from its own use of a deprecated pytree API (LeafSpec) when a
    graph is exported, copied or pickled: nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
        yield


def copy_graph(graph: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of a captured or quantized graph (its meta, e.g. the QuantConfig, included)."""
    with torch_pytree_warning_hidden():
        return copy.deepcopy(graph)


def example_inputs(sample_shape: tuple[int, ...], batch: int, seed: int = 0,
                   num_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *sample_shape, generator=generator),
            torch.randint(0, num_timesteps, (batch,), generator=generator))


SAMPLE_SHAPE_META = "qtoolkit_sample_shape"  # the graph's meta entry holding its (C, H, W)


def capture(denoiser: nn.Module, sample_shape: tuple[int, ...], check_batches: bool = True) -> fx.GraphModule:
    """The FX graph of `denoiser` (called as `denoiser(sample, timestep) -> noise`, e.g. DiffusionModel.denoiser()),
    valid for every batch size; parameters keep their module paths (`network.conv_in.weight`).

    check_batches=False skips the check at batch 1 and above the proven range: for re-capturing a network whose
    graph was checked when it was first captured (loading a saved quantized model)."""
    denoiser = denoiser.eval()
    # Captured where the network is: the graph keeps the device of the tensors its ops create (e.g. the
    # timestep embedding's arange), so a graph runs on the device it was captured on.
    device = device_of(denoiser)
    example = tuple(x.to(device) for x in example_inputs(sample_shape, EXAMPLE_BATCH))
    batch = {0: Dim.AUTO}
    with torch_pytree_warning_hidden():
        try:
            program = torch.export.export(denoiser, example, dynamic_shapes={name: batch for name in INPUT_NAMES})
        except Exception as e:  # torch raises many types; each becomes one line naming what failed and where
            raise QtoolkitError(_capture_failure(denoiser, e)) from None
    graph_module = program.module()
    _drop_batch_guards(graph_module)
    if check_batches:
        _check_batches(graph_module, denoiser, sample_shape, upper=_proven_batch_limit(program))
    graph_module.meta[SAMPLE_SHAPE_META] = tuple(sample_shape)
    return graph_module


def _proven_batch_limit(program: torch.export.ExportedProgram) -> int | None:
    """The largest batch torch.export proved the graph for; None when it proved every batch size."""
    uppers = [r.upper for r in program.range_constraints.values()]
    finite = [int(u) for u in uppers if u.is_finite and bool(u < 2**62)]
    return min(finite) if finite else None


def _capture_failure(denoiser: nn.Module, error: Exception) -> str:
    """One line: which network, what torch.export said, and the user's source line it stopped at."""
    network = getattr(denoiser, "network", denoiser)
    message = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    where = ""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/torch/" not in f.filename]
    user_frames = [f for f in frames if "/qtoolkit/" not in f.filename]
    if user_frames:
        frame = user_frames[-1]
        where = f" at {frame.filename}:{frame.lineno} ({frame.line})"
    else:
        located = re.search(r'File "([^"]+)", line (\d+)', str(error))
        if located:
            where = f" at {located.group(1)}:{located.group(2)}"
    return (f"torch.export cannot capture {type(network).__name__}{where}: {type(error).__name__}: {message[:300]}; "
            "qtoolkit quantizes the captured graph, so the network's forward must be traceable (no Python control "
            "flow on tensor values, no unsupported ops): rewrite that line (e.g. torch.where / torch.cond instead "
            "of an `if` on a tensor) or quantize a network torch.export can capture")


def _drop_batch_guards(graph_module: fx.GraphModule) -> None:
    """Remove the checks torch.export adds on the batch range it proved; _check_batches stands in for them."""
    for node in list(graph_module.graph.nodes):
        if (node.op == "call_module" and node.target == "_guards_fn") or \
                (node.op == "call_function" and node.target in _ASSERT_OPS):
            graph_module.graph.erase_node(node)
    for key, hook in list(graph_module._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del graph_module._forward_pre_hooks[key]
    if hasattr(graph_module, "_guards_fn"):
        delattr(graph_module, "_guards_fn")
    graph_module.graph.lint()
    graph_module.recompile()


@torch.no_grad()
def _check_batches(graph_module: fx.GraphModule, denoiser: nn.Module, sample_shape: tuple[int, ...],
                   upper: int | None) -> None:
    """The graph computes what the network computes at batch 1 and just above the proven batch range."""
    batches = list(CHECKED_BATCHES)
    if upper is not None and upper < MIN_SUPPORTED_BATCH:
        batches.append(upper + 1)
    for batch in batches:
        inputs = tuple(x.to(device_of(denoiser)) for x in example_inputs(sample_shape, batch, seed=batch))
        expected, got = denoiser(*inputs), graph_module(*inputs)
        tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=tolerance):
            raise QtoolkitError(
                f"the captured graph of {type(getattr(denoiser, 'network', denoiser)).__name__} differs from the "
                f"network at batch {batch} (torch.export proved it for batches 2..{upper}: the network computes "
                "differently from that batch on): remove the branch on the batch size from the network's forward")


def module_path(node: fx.Node) -> str:
    """The path of the module whose code produced `node`, relative to the captured network (e.g.
    `down_blocks.1.resnets.0.conv1`); "" for code of the network's own forward."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _relative(path)


def module_paths(node: fx.Node) -> list[str]:
    """Every module around `node`, outermost first, as paths relative to the network."""
    return [path for path, _class_name in module_stack(node)]


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """(path relative to the network, class name, e.g. "ResnetBlock2D") of every module around `node`, outermost
    first."""
    stack = ((_relative(path), type_name.rpartition(".")[2])
             for path, type_name in (node.meta.get("nn_module_stack") or {}).values())
    return [(path, class_name) for path, class_name in stack if path]


def _relative(path: str) -> str:
    # Paths are those of the Denoiser wrapper: its network is the child `network`.
    return path[len("network."):] if path.startswith("network.") else ("" if path == "network" else path)
