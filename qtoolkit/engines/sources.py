"""What every backend of the benchmark is built from, in one work folder (qtoolkit.engines.backends builds them).

The FP32 network, the exported ONNX graphs, the deployment folder and the calibration set are written once under
`work`, so that a fresh process can rebuild any single backend from it: the memory probe (qtoolkit.engines.memory)
measures each backend alone in its own process.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from torch import fx, nn

from ..calibration import CalibrationSet
from ..deploy.folder import save_deployment
from ..errors import QtoolkitError
from ..export.onnx_graph import export_onnx, network_graph
from ..graph import quant_ops
from ..graph.serialization import quantized_metadata
from ..models.loading import DiffusionModel, load_diffusion_model, save_diffusion_model

DEPLOYMENT_DIR = "torch-int8"  # the deployment folder the PyTorch int8 backends load (qtoolkit.deploy)
PRECISIONS = ("fp32", "int8")
FP_MODEL_DIR = "fp32-model"
CALIBRATION_DIR = "calibration"
SOURCES_FILE = "sources.json"


@dataclass
class BackendSources:
    """What every backend is built from, under `work`. The FP32 model is loaded from disk on first use only,
    so that a process building an engine backend does not hold it."""
    work: Path
    sample_shape: tuple[int, ...]
    threads: int
    calibration: CalibrationSet | None = None
    fp_model: nn.Module | None = None

    def graph(self, precision: str) -> Path:
        return self.work / precision / "model.onnx"

    def fp_network(self) -> nn.Module:
        if self.fp_model is None:
            self.fp_model = load_diffusion_model(self.work / FP_MODEL_DIR).unet
        return self.fp_model

    @classmethod
    def prepare(cls, qgraph: fx.GraphModule, fp_network: nn.Module, scheduler_config: dict,
                sample_shape: tuple[int, ...], work: Path, threads: int,
                calibration: CalibrationSet | None = None,
                onnx_graphs: tuple[str, ...] = PRECISIONS) -> "BackendSources":
        """Write the FP32 network, the deployment folder, the exported ONNX graphs of `onnx_graphs` (onnx_graphs_of
        the backends to build: an export takes most of the time here) and the calibration set under `work`,
        overwriting a previous run's and removing its other graphs, so that no backend is built from a stale one.

        `fp_network` is the network the frozen quantized graph `qgraph` was made from: the FP32 reference and what
        the peers quantize. (The quantized graph's own float weights are no stand-in for it: bias correction and
        reconstruction change them.)
        """
        if not quant_ops(qgraph):
            raise QtoolkitError("the benchmark compares a qtoolkit-quantized model with its FP32 original: pass a "
                                "model made by `qtoolkit quantize` (its run folder or its model/ folder)")
        # The quantized graph holds every float tensor of the network it was captured from, under `network.`
        # (the Denoiser's child that capture traces).
        q_state = qgraph.state_dict()
        if any(q_state.get(f"network.{key}") is None or q_state[f"network.{key}"].shape != t.shape
               for key, t in fp_network.state_dict().items()):
            raise QtoolkitError(f"the full-precision model ({type(fp_network).__name__}) does not have the quantized "
                                "model's architecture: give the model it was quantized from")
        sources = cls(work, tuple(sample_shape), threads, calibration, fp_network.eval())
        for precision in PRECISIONS:
            if precision not in onnx_graphs:
                shutil.rmtree(sources.graph(precision).parent, ignore_errors=True)
                continue
            graph = qgraph if precision == "int8" else network_graph(
                DiffusionModel(fp_network, scheduler_config, work, shape=tuple(sample_shape)))
            sources.graph(precision).parent.mkdir(parents=True, exist_ok=True)
            export_onnx(graph, sample_shape, sources.graph(precision))
        save_diffusion_model(fp_network, scheduler_config, work / FP_MODEL_DIR, overwrite=True)
        fp_model = DiffusionModel(fp_network, scheduler_config, work / FP_MODEL_DIR, shape=tuple(sample_shape))
        save_deployment(qgraph, quantized_metadata(qgraph, fp_model), scheduler_config, work / DEPLOYMENT_DIR,
                        source="benchmark", overwrite=True)
        if calibration is not None:
            calibration.save(work / CALIBRATION_DIR, overwrite=True)
        (work / SOURCES_FILE).write_text(json.dumps({"sample_shape": list(sample_shape)}) + "\n")
        return sources

    @classmethod
    def reopen(cls, work: Path, threads: int) -> "BackendSources":
        """The sources `prepare` wrote, as another process finds them."""
        if not (work / SOURCES_FILE).is_file():
            raise QtoolkitError(f"{work} holds no benchmark sources: BackendSources.prepare writes them")
        sample_shape = tuple(json.loads((work / SOURCES_FILE).read_text())["sample_shape"])
        calibration = CalibrationSet.load(work / CALIBRATION_DIR) if (work / CALIBRATION_DIR).is_dir() else None
        return cls(work, sample_shape, threads, calibration)
