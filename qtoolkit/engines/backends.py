"""The backends the benchmark compares, each a noise predictor built from one set of sources.

Engine backends are every registered backend (a plugin, see qtoolkit.engines) that can run on this machine,
named ENGINE-GRAPH ("openvino-int8": qtoolkit's int8 graph on OpenVINO), with a -PRECISION suffix for each
other float precision the engine can run the graph's float parts in here (e.g. bf16, on CPUs that have it):
"openvino-bf16" is the float graph in bf16, a float baseline beside torch.compile BF16, and
"openvino-int8-bf16" qtoolkit's int8 graph with its unquantized parts in bf16.

A backend is built from the FP32 network the quantized graph was made from, the two exported ONNX graphs (the
float network's captured graph and qtoolkit's int8 QDQ form of the quantized graph; each written only when a
chosen backend is built from it), the deployment folder of the PyTorch int8 backends and, for the peers' int8
recipes, the calibration set qtoolkit was calibrated on. BackendSources keeps all of them in one work folder,
so that a fresh process can rebuild any single backend from it: the memory probe (qtoolkit.engines.memory)
measures each backend alone in its own process, where nothing the other backends hold counts against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..calibration import CalibrationSet
from ..deploy.folder import WEIGHTS_FILE as DEPLOYMENT_WEIGHTS
from ..errors import QtoolkitError
from ..sampling import NoisePredictor, unet_predictor
from . import ONNX_FORMAT, TORCH_FORMAT, engine_names, load_engine, resolve_backend
from .peers import PEERS, PEERS_OF_THE_FP32_GRAPH
from .sources import DEPLOYMENT_DIR, PRECISIONS, BackendSources

EAGER = "pytorch-fp32-eager"
TORCH_INT8 = "torch-int8"


@dataclass
class Backend:
    name: str
    eps: NoisePredictor
    size_bytes: int
    fp32_engine: bool  # a float graph on an inference engine: the baseline int8 has to beat


def engine_backends() -> dict[str, tuple[str, str, str]]:
    """Engine backend name -> (engine, graph precision, float precision): the float graph, then the int8 graph, on
    every ONNX engine that can run here with FP32 float parts, then with each other float precision it offers."""
    engines = {name: resolve_backend(name).float_precisions() for name in engine_names()
               if resolve_backend(name).export_format == ONNX_FORMAT}
    engines = {name: precisions for name, precisions in engines.items() if precisions}  # runnable here
    backends = {}
    for graph in PRECISIONS:
        for engine in engines:
            backends[f"{engine}-{graph}"] = (engine, graph, "fp32")
        for engine, precisions in engines.items():
            for reduced in precisions[1:]:
                backends[f"{engine}-{reduced}" if graph == "fp32" else f"{engine}-{graph}-{reduced}"] = \
                    (engine, graph, reduced)
    return backends


def torch_int8_backends(config=None) -> dict[str, str]:
    """"torch-int8-NAME" -> NAME for every PyTorch int8 backend (export format "torch") that can run here and runs
    models quantized with `config` (a QuantConfig; None: any)."""
    backends = [resolve_backend(name) for name in engine_names()]
    return {f"{TORCH_INT8}-{b.name}": b.name for b in backends if b.export_format == TORCH_FORMAT
            and b.float_precisions() and (config is None or not b.cannot_run(config))}


def backend_names(peers: tuple[str, ...] = (), config=None) -> list[str]:
    """FP32 eager, the ONNX engine backends, PyTorch's int8 backends that run `config`'s quantization, then the
    peers, in the benchmark's order."""
    return [EAGER, *engine_backends(), *torch_int8_backends(config), *peers]


def onnx_graphs_of(names: list[str]) -> tuple[str, ...]:
    """The exported ONNX graphs (of PRECISIONS) that the backends `names` are built from."""
    engines = engine_backends()
    needed = {engines[name][1] for name in names if name in engines}
    if set(names) & set(PEERS_OF_THE_FP32_GRAPH):
        needed.add("fp32")
    return tuple(precision for precision in PRECISIONS if precision in needed)


def _file_bytes(onnx_file: Path) -> int:
    """The graph plus its external weights file, if it has one."""
    return sum(f.stat().st_size for f in onnx_file.parent.glob(onnx_file.name + "*"))


def require_calibration(peers: tuple[str, ...], calibration: CalibrationSet | None) -> None:
    """The peers' recipes calibrate on the inputs qtoolkit was calibrated on: there must be a set when there are peers."""
    if peers and calibration is None:
        raise QtoolkitError("the peers' int8 recipes calibrate on the inputs qtoolkit was calibrated on: give the "
                          "calibration set (a `qtoolkit quantize` run folder has it in calibration/), or no peers")


def build_backend(name: str, sources: BackendSources) -> Backend:
    if name == EAGER:
        fp = sources.fp_network()
        return Backend(name, unet_predictor(fp), sum(t.numel() * t.element_size() for t in fp.state_dict().values()),
                       fp32_engine=False)
    engines = engine_backends()
    if name in engines:
        engine, precision, float_precision = engines[name]
        graph = sources.graph(precision)
        return Backend(name, load_engine(engine, graph, sources.threads, float_precision), _file_bytes(graph),
                       fp32_engine=(precision, float_precision) == ("fp32", "fp32"))
    torch_backends = torch_int8_backends()
    if name in torch_backends:
        folder = sources.work / DEPLOYMENT_DIR
        return Backend(name, load_engine(torch_backends[name], folder, sources.threads),
                       (folder / DEPLOYMENT_WEIGHTS).stat().st_size, fp32_engine=False)  # the tensors file
    if name not in PEERS:
        raise QtoolkitError(f"unknown backend {name!r}: choose among {', '.join(backend_names(tuple(PEERS)))}")
    require_calibration((name,), sources.calibration)
    eps, size = PEERS[name](sources)
    return Backend(name, eps, size, fp32_engine=False)
