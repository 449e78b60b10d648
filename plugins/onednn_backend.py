"""The `x86-onednn` backend: the frozen quantized graph on oneDNN's int8 kernels, the maintained x86 path.

This is how PT2E deploys int8 on x86 (torchao's X86InductorQuantizer flow), with qtoolkit's own calibration and
rounding: each int8 layer (qtoolkit.export.int8_layers) is written in PT2E's reference form, on plain uint8 /
int8 tensors (no deprecated quantized dtypes),

    x = dequantize_per_tensor(quantize_per_tensor(x, s_x, z_x, 0, 255, uint8))      (quantized_decomposed ops)
    y = conv2d(x, dequantize_per_channel(W_int8, s_w, 0, axis 0), bias)             (or linear)
    [y = dequantize_per_tensor(quantize_per_tensor(y, s_out, z_out))]              with quantize_conv_outputs

and Inductor compiles it with freezing (the weights become constants): its x86 quantization passes replace each
pattern with `onednn.qconv_pointwise` / `qlinear_pointwise` on the prepacked int8 weights, fusing the
quantization of an input into the op that produces it. The other way, calling those oneDNN ops eagerly
from Python (what torchao's lowering writes before compiling), was measured slower on the CIFAR-10
architecture (docs/backends.md): every quantize and layout conversion is then a pass of its own.

Compiled ahead of time (AOTInductor), once per model and machine, for every batch size: the graph is exported
with a dynamic batch and compiled in a child process into a package of native code, which this process loads.
So the process that runs the model holds none of the compiler's objects (torch.compile in the process kept
47 MiB of them, plus one set of packed weights per batch size it compiled). The package is cached under
CACHE_DIR, keyed by a hash of the exported graph, its weights, torch's version, the CPU's instruction set and the
number of threads (the compiled loops are laid out for it), and the next load of the same model takes seconds
instead of the compile's minute or more. The deployment folder itself stays data: the native code is built on
the machine that runs it, from the folder's tensors.
Everything else stays float. A model with timestep groups is compiled from its fixed-grid form
(qtoolkit.export.timestep_tables): the same int8 layers on constant scales, between per-group tables that the
compiled code indexes with each sample's group.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed
from torch import fx, nn

from qtoolkit import hookimpl
from qtoolkit.deploy import loader
from qtoolkit.errors import QtoolkitError
from qtoolkit.export.int8_layers import UINT8, Int8Layer, int8_kernel_problem, lower
from qtoolkit.export.timestep_tables import on_fixed_grids
from qtoolkit.graph.capture import SAMPLE_SHAPE_META, example_inputs, torch_pytree_warning_hidden
from qtoolkit.progress import progress_bar
from qtoolkit.registry import Backend

NAME = "x86-onednn"
INT8 = (-128, 127)
CACHE_DIR = Path.home() / ".cache" / "qtoolkit" / NAME
# Part of the cache key: raise it when what gets compiled changes while the exported graph does not (the compile
# settings, the reference form's lowering, the example batch), so that no package compiled the old way is loaded
# again.
PACKAGE_FORMAT = 3
# The weights go into the package as a file beside the compiled library, not inside it. The loader copies them
# into memory of its own either way; inside the library, the mapped pages they were copied from stayed resident
# besides (46 MiB more at batch 1 on the CIFAR-10 architecture, which put x86-onednn above FP32 eager's peak).
WEIGHTS_BESIDE_THE_LIBRARY = {"aot_inductor.package_constants_in_so": False,
                              "aot_inductor.package_constants_on_disk_format": "binary_blob"}
_decomposed = torch.ops.quantized_decomposed


def _fake_quantize_uint8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    q = _decomposed.quantize_per_tensor.default(x, scale, zero_point, *UINT8, torch.uint8)
    return _decomposed.dequantize_per_tensor.default(q, scale, zero_point, *UINT8, torch.uint8)


class ReferenceInt8Layer(nn.Module):
    """An int8 convolution or linear in PT2E's reference form, which Inductor lowers to oneDNN's int8 kernels."""

    def __init__(self, layer: Int8Layer):
        super().__init__()
        self.kind, self.output = layer.kind, layer.output
        self.input_scale, self.input_zero_point = layer.input_scale, layer.input_zero_point
        self.register_buffer("weight_codes", layer.weight_codes)
        self.register_buffer("weight_scale", layer.weight_scale.float())
        self.register_buffer("weight_zero_point", torch.zeros(len(layer.weight_scale), dtype=torch.int64))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float())
        self.conv = list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _fake_quantize_uint8(x, self.input_scale, self.input_zero_point)
        weight = _decomposed.dequantize_per_channel.default(self.weight_codes, self.weight_scale,
                                                            self.weight_zero_point, 0, *INT8, torch.int8)
        if self.kind == "conv2d":
            y = torch.ops.aten.conv2d.default(x, weight, self.bias, *self.conv)
        else:
            y = torch.ops.aten.linear.default(x, weight, self.bias)
        return y if self.output is None else _fake_quantize_uint8(y, *self.output)


class CompiledInt8Graph(nn.Module):
    """The reference-form graph compiled ahead of time by AOTInductor: one package of native code that runs every
    batch size, called as `(sample, timestep) -> noise`."""

    def __init__(self, package: Path, sample_shape: tuple[int, ...]):
        super().__init__()
        self.package, self.sample_shape = package, tuple(sample_shape)
        self.compiled = torch._inductor.aoti_load_package(str(package))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> torch.Tensor:
        # The native code trusts its inputs' shapes and dtypes (a wrong one reads out of bounds): check them here.
        if sample.dtype != torch.float32 or tuple(sample.shape[1:]) != self.sample_shape:
            raise QtoolkitError(f"the {NAME} model takes float32 samples of shape (batch, "
                                f"{', '.join(map(str, self.sample_shape))}), not {sample.dtype} {tuple(sample.shape)}")
        with torch.no_grad():
            return self.compiled(_compiled_layout(sample), _integer_timesteps(timestep, len(sample)))


def _compiled_layout(sample: torch.Tensor) -> torch.Tensor:
    """The sample in the memory layout the package was compiled for: channels-last, as the int8 convolutions run."""
    return sample.contiguous(memory_format=torch.channels_last) if sample.dim() == 4 else sample.contiguous()


def _integer_timesteps(timestep: torch.Tensor | int, batch: int) -> torch.Tensor:
    """One int64 timestep per sample (what the graph was captured with; a scalar serves the whole batch)."""
    timestep = torch.as_tensor(timestep)
    if timestep.dim() == 0:
        timestep = timestep.expand(batch)
    if timestep.shape != (batch,):
        raise QtoolkitError(f"the {NAME} model takes one timestep per sample or one for all, not timesteps of shape "
                            f"{tuple(timestep.shape)} for a batch of {batch}")
    if timestep.is_floating_point() and not torch.equal(timestep, timestep.round()):
        raise QtoolkitError(f"the {NAME} model takes integer timesteps (it was compiled for them), not {timestep}")
    return timestep.to(torch.int64).contiguous()


def compiled_package(reference: fx.GraphModule, sample_shape: tuple[int, ...]) -> Path:
    """The AOTInductor package of the reference-form graph for this machine and this process's number of threads:
    from CACHE_DIR, or compiled now."""
    threads = torch.get_num_threads()
    sample, timestep = example_inputs(sample_shape, batch=_example_batch(threads))
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), torch_pytree_warning_hidden():
        program = torch.export.export(reference, (_compiled_layout(sample), timestep),
                                      dynamic_shapes=({0: batch}, {0: batch}))
    package = CACHE_DIR / f"{_fingerprint(program, threads)}.pt2"
    if not package.is_file():
        _compile_in_child(program, package, threads)
    return package


def _example_batch(threads: int) -> int:
    """The batch size the graph is exported with. Inductor takes it as the batch's typical size when it decides how
    many loop levels of each kernel to share out among the threads: the batch alone when the example equals the
    number of threads or is at least twice it, which leaves threads idle at smaller batches (batch 1 ran on one
    of two threads, about 10% slower on the CIFAR-10 architecture). One more than the number of threads makes it
    share out the batch and the next level together (channel groups, pixels), which serves every batch size."""
    return threads + 1


def _fingerprint(program: torch.export.ExportedProgram, threads: int) -> str:
    """A hash of everything the compiled code depends on: the graph (the scales are literals in it), its tensors,
    the batch range, how it is compiled, torch's version, the instruction set the code is compiled for and the
    number of threads its loops are laid out for."""
    digest = hashlib.sha256()
    for text in (str(PACKAGE_FORMAT), torch.__version__, platform.machine(), torch.backends.cpu.get_cpu_capability(),
                 str(threads), str(program.graph), str(program.range_constraints)):
        digest.update(text.encode() + b"\0")
    tensors = {**program.state_dict, **program.constants}
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:32]


def _compile_in_child(program: torch.export.ExportedProgram, package: Path, threads: int) -> None:
    """Compile in a child process, so that this one keeps none of the compiler's objects; the package lands in
    the cache whole or not at all. The child compiles for this process's number of threads, not its own default:
    Inductor lays out its loops for the number it compiles with."""
    try:
        package.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QtoolkitError(f"cannot create {NAME}'s package cache {package.parent} ({e.strerror}): make it "
                            "writable, or choose another backend") from None
    with tempfile.TemporaryDirectory(dir=package.parent, prefix=".compiling-") as work:
        program_file, package_file = Path(work, "program.pt2"), Path(work, "package.pt2")
        with torch_pytree_warning_hidden():
            torch.export.save(program, program_file)
        child = f"import sys; from {__name__} import compile_exported; compile_exported(*sys.argv[1:])"
        # The child imports what this process imports, from where it imports it.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        with progress_bar(None, f"compile for {NAME} (once per model and machine)", transient=True):
            done = subprocess.run([sys.executable, "-c", child, str(program_file), str(package_file), str(threads)],
                                  env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            last_line = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            raise QtoolkitError(f"compiling the model for {NAME} failed: {last_line} (choose another backend)")
        os.replace(package_file, package)


def compile_exported(program_file: str, package_file: str, threads: str) -> None:
    """The child's work: the exported program compiled with freezing into an AOTInductor package, for `threads`."""
    torch.set_num_threads(int(threads))
    with torch_pytree_warning_hidden():
        program = torch.export.load(program_file)  # written by the parent a moment ago, in its private directory
    # Inductor's x86 quantization passes run only outside autograd
    with torch.no_grad(), torch._inductor.config.patch(freezing=True, **WEIGHTS_BESIDE_THE_LIBRARY):
        torch._inductor.aoti_compile_and_package(program, package_path=package_file)


def float_precisions() -> tuple[str, ...]:
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return ("fp32",) if x86 and torch.backends.mkldnn.is_available() else ()


def reference_graph(qgraph: fx.GraphModule) -> fx.GraphModule:
    """The frozen graph with each int8 layer in PT2E's reference form, the graph that is compiled. With timestep
    groups the layers run on fixed grids between their groups' tables (qtoolkit.export.timestep_tables): the
    compiled code holds each layer's scales as literals."""
    return lower(on_fixed_grids(qgraph), ReferenceInt8Layer)[0]


def lower_graph(qgraph: fx.GraphModule) -> nn.Module:
    sample_shape = qgraph.meta[SAMPLE_SHAPE_META]
    return CompiledInt8Graph(compiled_package(reference_graph(qgraph), sample_shape), sample_shape)


@hookimpl
def register_backends(register):
    register(Backend(name=NAME, load=loader(NAME), float_precisions=float_precisions, export_format="torch",
                     auto_priority=20, runtime_version=lambda: torch.__version__, runtime="torch", lower=lower_graph,
                     unsupported=int8_kernel_problem, runs_timestep_groups=True,
                     description="PyTorch int8 (oneDNN, x86, AOTInductor): int8 convolutions and linears on plain "
                                 "uint8/int8 tensors; takes float convolution outputs; compiled once per model and "
                                 "machine, then cached"))
