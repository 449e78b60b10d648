"""How fast ptq4dm's int8 graph runs, against FP32 on the same weights (`ptq4dm bench`, benchmarks/int8_speed.py).

Five backends: PyTorch FP32 eager; the float graph (ptq4dm.export of the unquantized twin) on ONNX Runtime
and on OpenVINO; ptq4dm's int8 QDQ graph on ONNX Runtime and on OpenVINO. Two measurements:

- the UNet forward at each batch size: median latency and its spread (interquartile range), speedups
  against PyTorch FP32 eager and against the faster FP32 engine, SQNR of the output against PyTorch FP32
  on the same inputs, and the model's size on disk (float32 state for PyTorch, the ONNX file otherwise);
- end-to-end DDIM sampling through ptq4dm.sampling.sample: median seconds, speedups, SQNR of the final
  samples against PyTorch FP32's (errors compound along the chain here).

Every backend runs with the same number of threads, and the backends take turns within each iteration
(rotating the order), because timings on this machine drift 10-20% between runs (REFERENCE.md): a backend
timed minutes after another would be compared with a different machine state.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..agreement import sqnr_db
from ..errors import Ptq4dmError
from ..export.onnx_graph import export_onnx
from ..models.loading import DiffusionModel
from ..quant.api import quant_units
from ..sampling import NoisePredictor, sample, unet_predictor
from . import load_engine
from .optional import import_optional

EAGER = "pytorch-fp32-eager"


@dataclass
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 16, 64)
    iterations: int = 10
    warmup: int = 1
    threads: int = 2
    sample_steps: int = 20  # 0 skips the sampling measurement
    sample_num: int = 16
    sample_iterations: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        positive = {"batch size": min(self.batch_sizes, default=0), "iterations": self.iterations,
                    "threads": self.threads, "sample num": self.sample_num,
                    "sample iterations": self.sample_iterations}
        for what, value in positive.items():
            if value < 1:
                raise Ptq4dmError(f"{what} must be at least 1, got {value}")
        if self.warmup < 0 or self.sample_steps < 0:
            raise Ptq4dmError("warmup and sample steps cannot be negative")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options, shared by `ptq4dm bench` and benchmarks/int8_speed.py."""
    d = BenchSettings()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(d.batch_sizes))
    parser.add_argument("--iterations", type=int, default=d.iterations, help="timed forwards per backend and batch size")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed forwards per backend and batch size")
    parser.add_argument("--threads", type=int, default=d.threads, help="threads of every backend")
    parser.add_argument("--sample-steps", type=int, default=d.sample_steps, help="DDIM steps of the sampling "
                        "measurement (0 skips it)")
    parser.add_argument("--sample-num", type=int, default=d.sample_num, help="samples drawn, as one batch")
    parser.add_argument("--sample-iterations", type=int, default=d.sample_iterations)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--work", type=Path, default=None, help="keep the exported graphs here (default: a temporary "
                        "folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(batch_sizes=tuple(args.batch_sizes), iterations=args.iterations, warmup=args.warmup,
                         threads=args.threads, sample_steps=args.sample_steps, sample_num=args.sample_num,
                         sample_iterations=args.sample_iterations, seed=args.seed)


@dataclass
class Backend:
    name: str
    eps: NoisePredictor
    size_bytes: int
    fp32_engine: bool  # a float graph on an inference engine: the baseline int8 has to beat


def float_twin(qunet: nn.Module) -> nn.Module:
    """The full-precision model `qunet` was quantized from: the same float weights (quantize keeps them), no quantizers."""
    twin = type(qunet).from_config(qunet.config).eval()
    state = qunet.state_dict()
    twin.load_state_dict({key: state[key] for key in twin.state_dict()}, strict=True)
    return twin


def _file_bytes(onnx_file: Path) -> int:
    """The graph plus its external weights file, if it has one."""
    return sum(f.stat().st_size for f in onnx_file.parent.glob(onnx_file.name + "*"))


def build_backends(qunet: nn.Module, sample_shape: tuple[int, ...], work: Path, threads: int) -> list[Backend]:
    if not quant_units(qunet):
        raise Ptq4dmError("the benchmark compares a ptq4dm-quantized model with its FP32 original: pass a model made "
                          "by `ptq4dm quantize` (its run folder or its model/ folder)")
    fp = float_twin(qunet)
    graphs = {"fp32": work / "fp32" / "model.onnx", "int8": work / "int8" / "model.onnx"}
    for precision, unet in (("fp32", fp), ("int8", qunet)):
        graphs[precision].parent.mkdir(parents=True, exist_ok=True)
        export_onnx(unet, sample_shape, graphs[precision])
    eager_bytes = sum(t.numel() * t.element_size() for t in fp.state_dict().values())
    backends = [Backend(EAGER, unet_predictor(fp), eager_bytes, fp32_engine=False)]
    for precision in ("fp32", "int8"):
        for engine in ("onnxruntime", "openvino"):
            backends.append(Backend(f"{engine}-{precision}", load_engine(engine, graphs[precision], threads),
                                    _file_bytes(graphs[precision]), fp32_engine=precision == "fp32"))
    return backends


def _spread(seconds: list[float]) -> dict:
    """Median and interquartile range, in milliseconds."""
    q1, median, q3 = np.percentile(np.array(seconds) * 1e3, [25, 50, 75])
    return {"median_ms": float(median), "q1_ms": float(q1), "q3_ms": float(q3), "iqr_ms": float(q3 - q1)}


def _rotations(backends: list[Backend], iterations: int):
    """Each iteration runs every backend once, starting one further along, so that no backend always goes first."""
    for i in range(iterations):
        k = i % len(backends)
        yield backends[k:] + backends[:k]


def _add_speedups(rows: list[dict]) -> None:
    """Speedup columns for rows of one measurement (same batch size or same sampling run)."""
    eager = next(r["median_ms"] for r in rows if r["backend"] == EAGER)
    best_fp32_engine = min((r["median_ms"] for r in rows if r["fp32_engine"]), default=None)
    for r in rows:
        r["speedup_vs_eager"] = eager / r["median_ms"]
        r["speedup_vs_best_fp32_engine"] = None if best_fp32_engine is None else best_fp32_engine / r["median_ms"]


@torch.no_grad()
def time_forward(backends: list[Backend], sample_shape: tuple[int, ...], settings: BenchSettings) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(settings.seed)
    for batch in settings.batch_sizes:
        x = torch.randn(batch, *sample_shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        outputs = {}
        for backend in backends:
            for _ in range(settings.warmup):
                backend.eps(x, t)
        seconds: dict[str, list[float]] = {b.name: [] for b in backends}
        for order in _rotations(backends, settings.iterations):
            for backend in order:
                start = time.perf_counter()
                out = backend.eps(x, t)
                seconds[backend.name].append(time.perf_counter() - start)
                outputs.setdefault(backend.name, out)
        batch_rows = [{"backend": b.name, "batch": batch, **_spread(seconds[b.name]), "fp32_engine": b.fp32_engine,
                       "sqnr_db_vs_fp32": sqnr_db(outputs[EAGER], outputs[b.name]), "size_mb": b.size_bytes / 2**20}
                      for b in backends]
        _add_speedups(batch_rows)
        rows += batch_rows
    return rows


def time_sampling(backends: list[Backend], model: DiffusionModel, settings: BenchSettings) -> list[dict]:
    """End-to-end DDIM sampling of sample_num images as one batch, through the same scheduler loop for all."""
    seconds: dict[str, list[float]] = {b.name: [] for b in backends}
    samples = {}
    for order in _rotations(backends, settings.sample_iterations):
        for backend in order:
            start = time.perf_counter()
            x = sample(model, "ddim", settings.sample_steps, settings.sample_num, settings.seed,
                       batch_size=settings.sample_num, eps=backend.eps, progress=False)
            seconds[backend.name].append(time.perf_counter() - start)
            samples.setdefault(backend.name, x)
    rows = [{"backend": b.name, "steps": settings.sample_steps, "num": settings.sample_num,
             **_spread(seconds[b.name]), "fp32_engine": b.fp32_engine,
             "sqnr_db_vs_fp32": sqnr_db(samples[EAGER], samples[b.name])} for b in backends]
    _add_speedups(rows)
    return rows


def run_benchmark(model: DiffusionModel, settings: BenchSettings, work: Path | None = None) -> dict:
    """Benchmark the quantized `model` (its .unet frozen by ptq4dm) against its FP32 original."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="ptq4dm-bench-") as tmp:
            backends = build_backends(model.unet, model.sample_shape, Path(work or tmp), settings.threads)
            forward = time_forward(backends, model.sample_shape, settings)
            sampling = time_sampling(backends, model, settings) if settings.sample_steps else []
    finally:
        torch.set_num_threads(threads_before)
    return {"model": str(model.path), "sample_shape": list(model.sample_shape), "settings": asdict(settings),
            "versions": _versions(), "forward": forward, "sampling": sampling}


def _versions() -> dict:
    return {"torch": torch.__version__, **{name: import_optional(name, "the benchmark").__version__
                                          for name in ("onnxruntime", "openvino")}}


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_tables(result: dict) -> str:
    """The results as two Markdown tables (forward latency, then sampling)."""
    lines = [f"UNet forward, {result['settings']['threads']} threads, median of {result['settings']['iterations']} "
             f"(IQR = q3 - q1), model {result['model']}", "",
             "| backend | batch | median ms | IQR ms | vs FP32 eager | vs best FP32 engine | SQNR vs FP32 dB | size MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["forward"]:
        lines.append(f"| {r['backend']} | {r['batch']} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | "
                     f"{_speedup(r['speedup_vs_eager'])} | {_speedup(r['speedup_vs_best_fp32_engine'])} | "
                     f"{r['sqnr_db_vs_fp32']:.1f} | {r['size_mb']:.2f} |")
    if result["sampling"]:
        first = result["sampling"][0]
        lines += ["", f"DDIM sampling, {first['steps']} steps, {first['num']} samples in one batch, median of "
                  f"{result['settings']['sample_iterations']}", "",
                  "| backend | median s | IQR s | vs FP32 eager | vs best FP32 engine | SQNR of samples vs FP32 dB |",
                  "|---|---|---|---|---|---|"]
        for r in result["sampling"]:
            lines.append(f"| {r['backend']} | {r['median_ms'] / 1e3:.2f} | {r['iqr_ms'] / 1e3:.2f} | "
                         f"{_speedup(r['speedup_vs_eager'])} | {_speedup(r['speedup_vs_best_fp32_engine'])} | "
                         f"{r['sqnr_db_vs_fp32']:.1f} |")
    return "\n".join(lines)
