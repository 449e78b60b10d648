"""What timestep groups cost the deployed int8 model: G groups against one, side by side, on the same calibration set.

The bundled model (or --model) is quantized W8A8 with quantized convolution outputs (what fbgemm and qnnpack run;
--input-only: without) once per entry of --groups, calibrated on one saved calibration set and bias-corrected (per timestep group with
G > 1: the recipe's setting). Each is written as each backend of --backends reads it (a deployment folder for the
PyTorch backends, the ONNX export for the others), loaded as a user loads it (qtoolkit.engines.load_engine) and
timed at every batch size, the G models of one backend called interleaved in rotation (median and IQR of
--iterations turns, one timestep per batch as a sampler sends); then each one's peak resident memory while serving
that batch, measured alone in a fresh process above its baseline after imports (weights, packed kernels and
activations together), median of --repeats.

    python benchmarks/timestep_groups_speed.py --calibration runs/tgroups-fmnist/calibration/ndtc-preset-paper-s0 \
        --backends fbgemm x86-onednn openvino
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qtoolkit import plugins
from qtoolkit.calibration import CalibrationSet
from qtoolkit.deploy import export_deployment
from qtoolkit.engines import load_engine
from qtoolkit.export import export_model
from qtoolkit.graph.bias_correction import correct_bias
from qtoolkit.models import load_diffusion_model
from qtoolkit.ptq import num_train_timesteps, observe_calibration_set, quantized_graph, save_quantized_pipeline
from qtoolkit.quant import QuantConfig

PEAK_PREFIX = "peak-mib: "


def quantized_folder(model, calibration: CalibrationSet, groups: int, out: Path, conv_outputs: bool) -> Path:
    config = QuantConfig(quantize_conv_outputs=conv_outputs, timestep_groups=groups)
    fp_graph, qgraph = quantized_graph(model, config)
    observe_calibration_set(qgraph, fp_graph, calibration, num_train_timesteps(model), progress=False)
    correct_bias(qgraph, fp_graph, (calibration.x, calibration.t), progress=False, per_group=groups > 1)
    save_quantized_pipeline(qgraph, model, out / f"G{groups}-model", provenance={"benchmark": "timestep_groups_speed"})
    return out / f"G{groups}-model"


def exported(model_folder: Path, backend: str, out: Path) -> Path:
    """The model as `backend` reads it: a deployment folder, or the ONNX export."""
    if plugins.backend(backend).export_format == "torch":
        export_deployment(model_folder, out)
    else:
        export_model(load_diffusion_model(str(model_folder)), out)
    return out


def inputs(sample_shape, batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed + batch)
    return (torch.randn(batch, *sample_shape, generator=generator),
            torch.randint(0, 1000, (1,), generator=generator).repeat(batch))


def peak_in_child(folder: Path, backend: str, sample_shape, batch: int, threads: int) -> float:
    """Peak resident MiB of a fresh process serving one batch of the loaded `folder`, above its resident memory
    before the load (after the imports): as the bench's memory probe (qtoolkit.engines.memory) measures it, the
    high-water mark reset after a warm-up call, so the load's own transient peak (the graph capture) is not
    counted but the model's weights, packed kernels and activations are."""
    code = (f"import torch, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import timestep_groups_speed as b; from qtoolkit.engines import load_engine; "
            f"torch.set_num_threads({threads}); import diffusers, qtoolkit_plugins.torch_int8_backend; "
            f"x, t = b.inputs({tuple(sample_shape)!r}, {batch}, 0); "
            f"base = b.status_mib('VmRSS'); m = load_engine({backend!r}, {str(folder)!r}, {threads}); "
            f"m(x, t); b.reset_peak(); m(x, t); "
            f"print(b.PEAK_PREFIX + str(b.status_mib('VmHWM') - base))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(next(line for line in done.stdout.splitlines() if line.startswith(PEAK_PREFIX))[len(PEAK_PREFIX):])


def status_mib(field: str) -> float:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith(f"{field}:")).split()[1]) / 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set size (VmHWM) becomes the current one


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-ddpm")
    p.add_argument("--calibration", type=Path, required=True, help="a saved calibration set (a run's calibration/)")
    p.add_argument("--groups", type=int, nargs="+", default=[1, 8])
    p.add_argument("--backends", nargs="+", default=["fbgemm"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per memory figure")
    p.add_argument("--input-only", action="store_true",
                   help="quantize only the layers' inputs, not the convolution outputs (x86-onednn, openvino, "
                        "onnxruntime; fbgemm and qnnpack need the outputs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_diffusion_model(a.model)
    calibration = CalibrationSet.load(a.calibration)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        quantized = {g: quantized_folder(model, calibration, g, Path(work), not a.input_only) for g in a.groups}
        for backend in a.backends:
            folders = {g: exported(quantized[g], backend, Path(work) / f"{backend}-G{g}") for g in a.groups}
            models = {g: load_engine(backend, folder, a.threads) for g, folder in folders.items()}
            rows += timed(models, folders, backend, model.sample_shape, a)
            del models
    print(f"{a.model} W8A8{' (inputs only)' if a.input_only else ''}, {a.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, median of "
          f"{a.iterations} interleaved calls\n")
    print(f"| backend | timestep groups | batch | median ms | IQR ms | vs G={a.groups[0]} | peak MiB | vs G={a.groups[0]} "
          "| files MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if (b["backend"], b["batch"], b["groups"]) == (r["backend"], r["batch"], a.groups[0]))
        print(f"| {r['backend']} | {r['groups']} | {r['batch']} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | "
              f"{r['median_ms'] / base['median_ms']:.3f}x | {r['peak_mib']:.1f} | {r['peak_mib'] / base['peak_mib']:.2f}x | "
              f"{r['files_mb']:.2f} |")
    if a.json:
        a.json.write_text(json.dumps({"command": " ".join(sys.argv), "cpu_capability":
                                      torch.backends.cpu.get_cpu_capability(), "rows": rows}, indent=2) + "\n")


def timed(models: dict, folders: dict, backend: str, sample_shape, a) -> list[dict]:
    """One backend's G models at each batch size: interleaved calls, then each one's peak memory alone."""
    rows = []
    with torch.no_grad():
        for batch in a.batch_sizes:
            x, t = inputs(sample_shape, batch, 0)
            seconds = {g: [] for g in models}
            for turn in range(a.iterations):
                order = list(models)[turn % len(models):] + list(models)[:turn % len(models)]
                for g in order:
                    models[g](x, t)  # warm: the timed call finds this model's weights in the caches
                    start = time.perf_counter()
                    models[g](x, t)
                    seconds[g].append(time.perf_counter() - start)
            for g in models:
                ms = sorted(1000 * s for s in seconds[g])
                peaks = [peak_in_child(folders[g], backend, sample_shape, batch, a.threads) for _ in range(a.repeats)]
                rows.append({"backend": backend, "groups": g, "batch": batch, "median_ms": statistics.median(ms),
                             "iqr_ms": ms[3 * len(ms) // 4] - ms[len(ms) // 4], "peak_mib": statistics.median(peaks),
                             "files_mb": sum(f.stat().st_size for f in folders[g].rglob("*") if f.is_file()) / 2**20})
    return rows


if __name__ == "__main__":
    main()
