"""The peers' own recipes on the same FP model, for the benchmark: what a user would get without qtoolkit.

Each peer is built from the float model (and, for the int8 ones, the same calibration inputs qtoolkit was
calibrated on), with the tool's *default* calibration and settings, as its documentation shows them:

- pytorch-bf16-compile: torch.compile with freezing under bf16 autocast (REFERENCE.md: CPU compile needs
  freezing to pay off at batch 1);
- openvino-int8-nncf: `nncf.quantize` of the FP32 graph (its default preset and subset of 300 inputs), run
  as OpenVINO runs it when not told otherwise: its float parts in bf16 on CPUs with bf16 support;
- onnxruntime-int8-static: `quantize_static` of the FP32 graph, QDQ format, u8 activations and per-channel s8
  weights (ORT's x86 int8 kernels want u8 activations), Conv / MatMul / Gemm only (quantizing every op type of
  the dynamo export fails at load: REFERENCE.md, Known traps);
- pt2e-x86-inductor: torchao's PT2E flow with X86InductorQuantizer's default config, then torch.compile with
  freezing. torch.export cannot trace one graph for batches below and above 64 (diffusers' Upsample2D
  branches there), so this peer exports, calibrates and compiles one static-shape graph per batch size, on
  first use (the benchmark's warm-up), and is fed float timesteps (PT2E's observers reject int64).

Every builder takes the benchmark's BackendSources (qtoolkit.engines.sources) and returns (noise predictor,
bytes on disk or in memory of the deployed weights).
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..backend_lookup import backend_for_runtime
from ..calibration import CalibrationSet
from ..export.onnx_graph import INPUT_NAMES
from ..models.loading import Denoiser
from ..optional import import_optional
from ..sampling import NoisePredictor
from . import load_engine
from .sources import BackendSources

NNCF_FILE = "model.xml"


def _batches(calibration: CalibrationSet, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The calibration inputs in batches of exactly `batch` (the set is tiled when smaller than one batch)."""
    n = max(len(calibration) // batch, 1) * batch
    index = torch.arange(n) % len(calibration)
    for start in range(0, n, batch):
        i = index[start:start + batch]
        yield calibration.x[i], calibration.t[i]


def _feeds(calibration: CalibrationSet, batch: int) -> Iterator[dict[str, np.ndarray]]:
    """The calibration inputs as the exported graph's input feeds (qtoolkit.export.onnx_graph.INPUT_NAMES)."""
    for x, t in _batches(calibration, batch):
        yield dict(zip(INPUT_NAMES, (x.numpy(), t.numpy())))


def _bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def _compiled(module: nn.Module) -> Callable:
    """torch.compile with freezing (weights folded as constants), static shapes: one graph per batch size."""
    compiled = torch.compile(module, dynamic=False)

    def run(*args):
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            return compiled(*args)
    return run


def bf16_compile(sources: BackendSources) -> tuple[NoisePredictor, int]:
    fp_network = sources.fp_network()
    run = _compiled(Denoiser(fp_network))

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run(x, t).float()
    return eps, sum(p.numel() * 2 for p in fp_network.parameters())  # what freezing keeps: bf16 weights


def nncf_openvino(sources: BackendSources) -> tuple[NoisePredictor, int]:
    ov = import_optional("openvino", "the openvino-int8-nncf peer")
    nncf = import_optional("nncf", "the openvino-int8-nncf peer")

    quantized = nncf.quantize(ov.Core().read_model(str(sources.graph("fp32"))),
                              nncf.Dataset(list(_feeds(sources.calibration, 1))))
    path = sources.work / "openvino-int8-nncf" / NNCF_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    # The peer runs as NNCF's documentation shows it: OpenVINO left to pick its float precision, which is the
    # most reduced one the CPU has (the backend lists FP32 first).
    # The peers are comparisons with named tools, not plugins: each runs on the backend of its tool's runtime.
    runtime = backend_for_runtime("openvino")
    eps = load_engine(runtime.name, path, sources.threads, runtime.float_precisions()[-1])
    return eps, _bytes([path, path.with_suffix(".bin")])


def onnxruntime_static(sources: BackendSources) -> tuple[NoisePredictor, int]:
    quantization = import_optional("onnxruntime.quantization", "the onnxruntime-int8-static peer")

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = _feeds(sources.calibration, 16)

        def get_next(self):
            return next(self.batches, None)

    path = sources.work / "onnxruntime-int8-static" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    quantization.quantize_static(str(sources.graph("fp32")), str(path), Reader(), quant_format=quantization.QuantFormat.QDQ,
                                 activation_type=quantization.QuantType.QUInt8,
                                 weight_type=quantization.QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    return load_engine(backend_for_runtime("onnxruntime").name, path, sources.threads), _bytes([path])


def _constant_bytes(graph_module: torch.fx.GraphModule) -> int:
    """Bytes of the tensors a converted PT2E graph holds (int8 weights after convert_pt2e folds them)."""
    tensors = {node.target: operator.attrgetter(node.target)(graph_module)
               for node in graph_module.graph.nodes if node.op == "get_attr"}
    return sum(t.numel() * t.element_size() for t in tensors.values() if isinstance(t, torch.Tensor))


def pt2e_x86_inductor(sources: BackendSources) -> tuple[NoisePredictor, int]:
    import_optional("torchao", "the pt2e-x86-inductor peer")
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq  # registers inductor passes

    calibration = sources.calibration
    graph = Denoiser(sources.fp_network()).eval()  # plain tensor out; fed float timesteps below
    by_batch: dict[int, Callable] = {}
    sizes: list[int] = []

    def build(batch: int) -> Callable:
        example = next(_batches(calibration, batch))
        example = (example[0], example[1].float())
        with torch.no_grad():
            exported = torch.export.export(graph, example).module()
            quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
            prepared = prepare_pt2e(exported, quantizer)
            for x, t in _batches(calibration, batch):
                prepared(x, t.float())
            converted = move_exported_model_to_eval(convert_pt2e(prepared))
        sizes.append(_constant_bytes(converted))
        return _compiled(converted)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if len(x) not in by_batch:
            by_batch[len(x)] = build(len(x))
        return by_batch[len(x)](x, t.float())

    by_batch[1] = build(1)  # one graph now, so that the model's size is known before any timing
    return eps, sizes[0]


# Name -> builder(sources) -> (eps, size in bytes).
PEERS: dict[str, Callable[[BackendSources], tuple[NoisePredictor, int]]] = {
    "pytorch-bf16-compile": bf16_compile,
    "openvino-int8-nncf": nncf_openvino,
    "onnxruntime-int8-static": onnxruntime_static,
    "pt2e-x86-inductor": pt2e_x86_inductor,
}
# The peers that quantize the exported FP32 ONNX graph (BackendSources writes it only when a backend needs it).
PEERS_OF_THE_FP32_GRAPH = ("openvino-int8-nncf", "onnxruntime-int8-static")
