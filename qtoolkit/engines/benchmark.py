"""How fast qtoolkit's int8 graph runs, against FP32 and against the peers' own recipes, on the same weights
(`qtoolkit bench`, benchmarks/int8_speed.py).

Backends: PyTorch FP32 eager; the float graph (qtoolkit.export of the FP32 network) on ONNX Runtime and on
OpenVINO; qtoolkit's int8 QDQ graph on ONNX Runtime and on OpenVINO; its int8 deployment folder on PyTorch's own
kernels (torch-int8-fbgemm, torch-int8-qnnpack, torch-int8-x86-onednn: those that run the model's quantization);
`--backends` keeps only some of these; and the peers of qtoolkit.engines.peers
(torch.compile BF16, NNCF, ORT quantize_static, PT2E), calibrated on the same inputs as qtoolkit. Three
measurements:

- the UNet forward at each batch size: median latency and its spread (interquartile range), speedups
  against PyTorch FP32 eager and against the faster FP32 engine, effective GOP/s (2 x the multiply-accumulates of
  the FP model's Conv/Linear layers and attention matmuls, per second), SQNR of the output against PyTorch FP32 on the same
  inputs, and the model's size (float32 state for PyTorch, the files on disk for the engines);
- peak memory: each backend alone in a fresh process (qtoolkit.engines.memory), its peak resident memory above
  that of a process with the same libraries imported, while it serves each batch size;
- quality on the model's own inputs: the noise-prediction SQNR against PyTorch FP32 at every step of
  held-out FP DDIM chains (the same x_t for all, so errors do not compound);
- end-to-end DDIM sampling through qtoolkit.sampling.sample: median seconds, speedups, SQNR of the final
  samples against PyTorch FP32's (errors compound along the chain here).

Every backend runs with the same number of threads, and the backends take turns within each iteration
(rotating the order), because timings on this machine drift 10-20% between runs (REFERENCE.md): a backend
timed minutes after another would be compared with a different machine state.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from ..bench_settings import BenchSettings
from ..calibration import CalibrationSet
from ..errors import QtoolkitError
from ..graph import QuantizedAttention, quant_config_of
from ..graph.patterns import ATTENTION, CONV, LINEAR
from ..models.loading import DiffusionModel
from ..optional import import_optional
from ..progress import progress_bar
from ..sampling import sample, unet_predictor
from ..step_error import per_timestep_error, sqnr_db
from . import memory, resolve_backend
from .backends import (EAGER, Backend, backend_names, build_backend, engine_backends, onnx_graphs_of,
                       require_calibration)
from .sources import BackendSources


def unet_macs(graph: fx.GraphModule) -> int:
    """Multiply-accumulates of one sample in a captured network graph (float or quantized, its batch dynamic or
    1): convolutions and linear layers plus the attention matmuls (Q K^T and A V), where nearly all of a UNet's
    work is; normalisations and activations are left out. Counted from the shapes the capture recorded on each
    node, so it holds for any network."""
    batch = _at_batch_1(next(n for n in graph.graph.nodes if n.op == "placeholder").meta["val"].shape[0])
    total = 0
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target in (CONV, LINEAR):
            weight = _shape(graph, node.args[1])
            per_output = math.prod(weight[1:]) if node.target == CONV else weight[-1]
            total += _at_batch_1(node.meta["val"].numel()) * per_output
        elif (node.op == "call_function" and node.target == ATTENTION) or \
                (node.op == "call_module" and isinstance(graph.get_submodule(node.target), QuantizedAttention)):
            query, key, value = (_shape(graph, arg) for arg in node.args[:3])
            rows = _at_batch_1(math.prod(query[:-1])) * key[-2]  # one per (query, key) pair
            total += rows * (query[-1] + value[-1])
    return total // batch


def _shape(graph: fx.GraphModule, node: fx.Node) -> torch.Size:
    """The shape of a node's value; a quantizer node (no recorded value) has its input's."""
    while "val" not in node.meta and node.op == "call_module":
        node = node.args[0]
    return node.meta["val"].shape


def _at_batch_1(size) -> int:
    """A size of the captured graph, symbolic in the batch size or not, at batch size 1."""
    if isinstance(size, torch.SymInt):
        expression = size.node.expr
        return int(expression.subs({symbol: 1 for symbol in expression.free_symbols}))
    return int(size)


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
def time_forward(backends: list[Backend], sample_shape: tuple[int, ...], settings: BenchSettings,
                 macs_per_sample: int) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(settings.seed)
    for batch in settings.batch_sizes:
        x = torch.randn(batch, *sample_shape, generator=generator)
        # One timestep for the whole batch, as a sampler calls the network (a model with timestep groups then runs
        # each layer once, on its group's scales, as it does when sampling).
        t = torch.randint(0, 1000, (1,), generator=generator).repeat(batch)
        outputs = {}
        seconds: dict[str, list[float]] = {b.name: [] for b in backends}
        for order in _rotations(backends, settings.iterations):
            for backend in order:
                # Untimed calls first in every turn: the timed one finds the caches holding this backend's weights
                # and buffers, as a sampler's back-to-back calls do, not the previous backend's.
                for _ in range(settings.warmup):
                    backend.eps(x, t)
                start = time.perf_counter()
                out = backend.eps(x, t)
                seconds[backend.name].append(time.perf_counter() - start)
                outputs.setdefault(backend.name, out)
        batch_rows = [{"backend": b.name, "batch": batch, **_spread(seconds[b.name]), "fp32_engine": b.fp32_engine,
                       "gops": 2 * macs_per_sample * batch / (np.median(seconds[b.name]) * 1e9),
                       "sqnr_db_vs_fp32": sqnr_db(outputs[EAGER], outputs[b.name]), "size_mb": b.size_bytes / 2**20}
                      for b in backends]
        _add_speedups(batch_rows)
        rows += batch_rows
    return rows


def time_sampling(backends: list[Backend], model: DiffusionModel, settings: BenchSettings) -> list[dict]:
    """End-to-end DDIM sampling of sample_num images as one batch, through the same scheduler loop for all."""
    seconds: dict[str, list[float]] = {b.name: [] for b in backends}
    samples = {}
    for backend in backends:  # warm-up at the sampling batch: compiled backends build its graph here, not in a timed run
        sample(model, "ddim", 1, settings.sample_num, settings.seed, batch_size=settings.sample_num, eps=backend.eps,
               progress=False)
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


def step_quality(backends: list[Backend], model: DiffusionModel, settings: BenchSettings) -> list[dict]:
    """Noise-prediction SQNR against PyTorch FP32 at every step of held-out FP DDIM chains."""
    eager = next(b for b in backends if b.name == EAGER)
    errors = per_timestep_error(model, eager.eps, {b.name: b.eps for b in backends if b is not eager},
                                steps=settings.quality_steps, num=settings.quality_num)
    rows = []
    for b in backends:
        if b is not eager:
            sqnr = np.array(errors[b.name]["sqnr_db"])
            rows.append({"backend": b.name, "steps": settings.quality_steps, "num": settings.quality_num,
                         "sqnr_db_mean": float(sqnr.mean()), "sqnr_db_min": float(sqnr.min()),
                         "sqnr_db_median": float(np.median(sqnr)), "sqnr_db": sqnr.tolist()})
    return rows


def peak_memory(forward: list[dict], sources: BackendSources, settings: BenchSettings) -> str | None:
    """Add each backend's peak MiB (at each batch size) to the forward rows; say why when it cannot be measured."""
    if not memory.supported():
        return "peak memory needs Linux's /proc (not available here)"
    names = list(dict.fromkeys(r["backend"] for r in forward))
    with progress_bar(len(names) * settings.memory_repeats, "peak memory", unit="process") as progress:
        peaks = memory.measure(sources.work, names, list(settings.batch_sizes), settings.threads, settings.seed,
                               progress, repeats=settings.memory_repeats)
    for r in forward:
        r["peak_mib"] = peaks[(r["backend"], r["batch"])]
    return None


def run_benchmark(model: DiffusionModel, settings: BenchSettings, work: Path | None,
                  calibration: CalibrationSet | None, fp_network: nn.Module) -> dict:
    """Benchmark the quantized `model` (its network a frozen quantized graph) against `fp_network`, the FP32
    network it was quantized from, and the peers, which quantize that FP32 network and calibrate on
    `calibration` (needed when settings.peers is not empty). `work` keeps the exported graphs (None: a
    temporary folder)."""
    require_calibration(settings.peers, calibration)  # before any export
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with contextlib.ExitStack() as stack:
            names = backend_names(settings.peers, quant_config_of(model.unet))
            unknown = [name for name in settings.backends if name not in names]
            if unknown:
                raise QtoolkitError(f"backend {unknown[0]!r} does not run this model here: choose among "
                                    f"{', '.join(n for n in names if n != EAGER and n not in settings.peers)}")
            if settings.backends:
                names = [n for n in names if n == EAGER or n in settings.backends or n in settings.peers]
            folder = Path(work or stack.enter_context(tempfile.TemporaryDirectory(prefix="qtoolkit-bench-")))
            sources = BackendSources.prepare(model.unet, fp_network, model.scheduler_config, model.sample_shape,
                                             folder, settings.threads, calibration, onnx_graphs_of(names))
            backends = [build_backend(name, sources) for name in names]
            macs = unet_macs(model.unet)
            forward = time_forward(backends, model.sample_shape, settings, macs)
            quality = step_quality(backends, model, settings) if settings.quality_num else []
            sampling = time_sampling(backends, model, settings) if settings.sample_steps else []
            del backends  # free this process's engines before the probes build their own
            memory_note = peak_memory(forward, sources, settings) if settings.memory else "not measured (--no-memory)"
    finally:
        torch.set_num_threads(threads_before)
    return {"model": str(model.path), "sample_shape": list(model.sample_shape), "settings": asdict(settings),
            "macs_per_sample": macs, "versions": _versions(settings.peers), "forward": forward, "quality": quality,
            "sampling": sampling, "memory_note": memory_note}


def _versions(peers: tuple[str, ...]) -> dict:
    """torch, every engine's runtime (by backend name), and the peers' own packages."""
    engines = {engine for engine, _, _ in engine_backends().values()}
    packages = ["nncf"] * ("openvino-int8-nncf" in peers) + ["torchao"] * ("pt2e-x86-inductor" in peers)
    return {"torch": torch.__version__, **{name: resolve_backend(name).runtime_version() for name in sorted(engines)},
            **{name: import_optional(name, "the benchmark").__version__ for name in packages}}


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def forward_table(rows: list[dict]) -> list[str]:
    """The forward-latency rows as a Markdown table."""
    lines = ["| backend | batch | median ms | IQR ms | vs FP32 eager | vs best FP32 engine | GOP/s | SQNR vs FP32 dB "
             "| size MB | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
        lines.append(f"| {r['backend']} | {r['batch']} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | "
                     f"{_speedup(r['speedup_vs_eager'])} | {_speedup(r['speedup_vs_best_fp32_engine'])} | "
                     f"{r['gops']:.0f} | {r['sqnr_db_vs_fp32']:.1f} | {r['size_mb']:.2f} | {peak} |")
    return lines


def forward_speed(fp_network: nn.Module, name: str, eps, size_bytes: int, sample_shape: tuple[int, ...],
                  graph: fx.GraphModule, batch_sizes: tuple[int, ...] = (1, 16), iterations: int = 5) -> list[dict]:
    """The quick side-by-side `qtoolkit run` ends with: the UNet forward of backend `name` (noise predictor `eps`)
    against PyTorch FP32 eager on `fp_network`, at `batch_sizes`, in this process's threads."""
    eager = Backend(EAGER, unet_predictor(fp_network), sum(t.numel() * t.element_size()
                                                           for t in fp_network.state_dict().values()), False)
    settings = BenchSettings(batch_sizes=batch_sizes, iterations=iterations, threads=torch.get_num_threads(),
                             peers=())
    return time_forward([eager, Backend(name, eps, size_bytes, False)], sample_shape, settings, unet_macs(graph))


def format_tables(result: dict) -> str:
    """The results as two Markdown tables (forward latency, then sampling)."""
    memory_note = result["memory_note"] or f"median of {result['settings']['memory_repeats']} processes"
    lines = [f"UNet forward, {result['settings']['threads']} threads, median of {result['settings']['iterations']} "
             f"(IQR = q3 - q1), model {result['model']}", "",
             f"Work: {result['macs_per_sample'] / 1e9:.3g} G multiply-accumulates per sample; SQNR on "
             "random inputs; peak MiB: the backend alone in a fresh process, resident memory above the bare "
             f"process's ({memory_note})", "",
             *forward_table(result["forward"])]
    if result["quality"]:
        first = result["quality"][0]
        lines += ["", f"Noise-prediction SQNR against PyTorch FP32 at each step of {first['num']} held-out FP "
                  f"DDIM-{first['steps']} chains (same x_t for every backend)", "",
                  "| backend | mean dB | median dB | min dB |", "|---|---|---|---|"]
        lines += [f"| {r['backend']} | {r['sqnr_db_mean']:.1f} | {r['sqnr_db_median']:.1f} | {r['sqnr_db_min']:.1f} |"
                  for r in result["quality"]]
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
