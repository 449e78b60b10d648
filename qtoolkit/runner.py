"""Run a recipe: check everything first, then quantize, export, report, into one run folder.

`prepare(recipe)` loads the model and runs every check the job has (the quantization config against the model's
layers, the strategy's and rounding method's parameters, the backend on this machine, what the report can compute)
without a single network evaluation; `run(job, out)` then does the work and writes, atomically:

    recipe.yaml       the recipe as it ran: every default filled in, the backend `auto` chose
    versions.json     qtoolkit, torch, python, and each plugin the run used, with its version
    model/ calibration/ ptq.json calibration_timesteps.png     (qtoolkit.ptq.run_ptq)
    export/           what the backend runs (not with backend: none): the ONNX export, or for a PyTorch int8
                      backend (fbgemm, qnnpack, x86-onednn) the deployment folder (qtoolkit.deploy)
    report.md report.json per_timestep_sqnr.png samples_*.png  (qtoolkit.report)
    speed.md speed.json   the int8 model's UNet forward against FP32 eager at batch 1 and 16 (not with backend: none)
    stages.json           each stage's wall time, processes, threads and CPU capability

`qtoolkit run` and `qtoolkit quantize` (which builds a recipe from its flags) both come here.
"""

from __future__ import annotations

import copy
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import yaml
from torch import fx

from . import __version__, plugins
from .deploy import TORCH_FORMAT, export_deployment
from .devices import device_of, resolve_device
from .distributed import from_main_process, is_main_process, rank_and_world
from .engines import FLOAT_PRECISIONS, load_engine, resolve_backend
from .engines.benchmark import forward_speed, forward_table
from .errors import QtoolkitError
from .export import export_model
from .graph.listing import counts_line, planned_ops, quantization_listing
from .graph.serialization import load_quantized_model
from .io import atomic_write_text, partial_dir, resumable_dir
from .models import DiffusionModel, load_diffusion_model
from .models.conditioning import apply_conditioning
from .progress import progress_bar, timed
from .ptq import PTQ_RECORD, CalibrationSettings, RoundingSettings, check_ptq, run_ptq, strategy_of
from .quant import QuantConfig
from .recipe import NO_BACKEND, Recipe
from .registry import Backend
from .report import ReportSettings, compare_to_fp, plan_report, write_report
from .sampling import unet_predictor


@dataclass
class Job:
    """A recipe with everything checked and resolved: what `run` does, nothing left to fail on bad input."""

    recipe: Recipe
    model: DiffusionModel
    config: QuantConfig
    calibration: CalibrationSettings
    rounding: RoundingSettings | None
    bias_correction: int | None  # calibration inputs bias correction uses; None: off
    bias_per_group: bool  # bias correction per timestep group
    backend: Backend | None  # None: the report samples the fake-quantized model in PyTorch
    report: ReportSettings | None
    plan: Any  # what the report can compute for this model (qtoolkit.report.plan_report)
    graph: fx.GraphModule  # the model's captured FP graph, which the job quantizes


def prepare(recipe: Recipe) -> Job:
    """Load the recipe's model onto the recipe's device and check the whole job against it, before any work."""
    device = resolve_device(recipe.device)  # an absent device: one line before anything loads
    model = apply_conditioning(load_diffusion_model(recipe.model), recipe.conditioning)
    model.unet.to(device)
    config = recipe.quantization.settings()
    calibration = recipe.calibration.settings()
    rounding = recipe.rounding.settings() if recipe.rounding is not None else None
    bias_correction = recipe.bias_correction.samples if recipe.bias_correction.enabled else None
    bias_per_group = recipe.bias_correction.enabled and recipe.bias_correction.per_timestep_group
    graph = check_ptq(model, config, calibration, rounding, bias_correction, bias_per_group)
    backend = None if recipe.backend == NO_BACKEND else resolve_backend(recipe.backend, config)
    if backend is not None and (reason := backend.cannot_run(config)):
        raise QtoolkitError(f"backend {backend.name} cannot run this recipe's quantization: {reason}")
    if backend is None and recipe.float_precision != FLOAT_PRECISIONS[0]:
        raise QtoolkitError(f"float_precision {recipe.float_precision} is what a backend runs the exported graph's "
                            f"float parts in, and backend is {NO_BACKEND}: choose a backend, or float_precision "
                            f"{FLOAT_PRECISIONS[0]}")
    if backend is not None:
        precisions = backend.float_precisions()
        if recipe.float_precision not in precisions:
            raise QtoolkitError(f"backend {backend.name} runs the float parts in {', '.join(precisions) or 'nothing'} "
                                f"on this machine, not {recipe.float_precision!r}: set float_precision to one of these")
    report = recipe.report.settings() if recipe.report.enabled else None
    plan = plan_report(model, report) if report is not None else None
    return Job(recipe, model, config, calibration, rounding, bias_correction, bias_per_group, backend, report, plan,
               graph)


def candidate_name(job: Job, strategy: str) -> str:
    """The quantized model's name in the report, e.g. W8A8-ndtc-bc."""
    name = f"W{job.config.weight_bits or 'fp'}A{job.config.activation_bits or 'fp'}-{strategy}"
    if job.rounding is not None:
        name += f"-{job.rounding.method}"
    if job.bias_correction is not None:
        name += "-bcg" if job.bias_per_group else "-bc"
    return name


def run(job: Job, out: Path, *, overwrite: bool = False, command: str = "", resume: bool = False) -> str | None:
    """Do the job into the run folder `out`; returns the report's text.

    The work happens in a folder beside `out` (qtoolkit.io.resumable_dir) that becomes `out` only when everything
    succeeded. A run interrupted after its calibration set or its quantized model keeps that folder, and
    `resume=True` continues from it, with the same recipe, to the same results.

    Under torchrun every process takes its share of each stage (qtoolkit.distributed); rank 0 writes the run
    folder and exports, the others work in a scratch folder and read rank 0's (so: one node, one file system).
    """
    out = Path(out)
    main = is_main_process()
    folder = resumable_dir(out, overwrite, resume) if main else tempfile.TemporaryDirectory(prefix="qtoolkit-rank-")
    if main and resume:
        _check_same_recipe(job, partial_dir(out) / "recipe.yaml")
    try:
        with folder as work:
            return _do(job, Path(work), out, command, resume)
    except BaseException:
        if main and partial_dir(out).is_dir():
            print(f"qtoolkit: the stages this run finished are kept in {partial_dir(out)}: the same command with "
                  "--resume continues from them", file=sys.stderr)
        raise


def _do(job: Job, work: Path, out: Path, command: str, resume: bool) -> str | None:
    """The job's stages, written to `work` (rank 0's becomes the run folder `out`)."""
    main = is_main_process()
    shared = Path(from_main_process(str(work)))  # rank 0's work folder
    if main:
        atomic_write_text(work / "recipe.yaml", _resolved_recipe(job))  # first: what --resume checks against
    started, seconds = time.perf_counter(), {}
    qgraph, calibration = run_ptq(job.model, job.config, job.calibration, work, rounding=job.rounding,
                                  bias_correction=job.bias_correction, bias_per_group=job.bias_per_group,
                                  overwrite=True, fp_graph=job.graph,
                                  resume_from=shared if resume else None)
    listing = quantization_listing(qgraph, planned_ops(job.graph, job.config))
    if main:  # under torchrun, rank 0 speaks for all
        print(f"quantized model ({out}/model) in {time.perf_counter() - started:.0f} s")
        print(counts_line(listing))
    eps, where = unet_predictor(qgraph), "PyTorch (fake-quant simulation)"
    if job.backend is not None:
        with timed(seconds, "export"):
            if main:
                _export(job, qgraph, work, out)
            from_main_process(None)  # every process waits for rank 0's export, then loads it
            eps = load_engine(job.backend.name, shared / "export", job.recipe.threads, job.recipe.float_precision)
        where = f"{job.backend.name} ({job.recipe.float_precision} float parts), from {out}/export"
    name = candidate_name(job, strategy_of(calibration))
    text = None
    if job.report is not None:
        results = compare_to_fp(job.model, {name: eps}, job.report, work, plan=job.plan)
        if main:
            text = write_report(results, work, f"qtoolkit report: {name} on {job.recipe.model}, sampled on {where}",
                                command, quantized_ops=listing)
            seconds.update({f"report: {part}": spent for part, spent in results["seconds"].items()})
    if main and job.backend is not None:
        with timed(seconds, "speed table"):
            text = (text or "") + "\n" + _speed_table(job, eps, qgraph, work)
    if main:
        (work / "versions.json").write_text(json.dumps(versions(job, strategy_of(calibration)), indent=2) + "\n")
        _write_stages(work, seconds, time.perf_counter() - started, resume)
    return text


def _write_stages(work: Path, seconds: dict, total: float, resume: bool) -> None:
    """stages.json: each stage's wall time, and what it ran on (benchmarks/job_profile.py prints it as a table)."""
    quantized = json.loads((work / PTQ_RECORD).read_text())["seconds"]
    stages = {"stages": {**quantized, **seconds}, "total": round(total, 1), "resumed": resume,
              "processes": rank_and_world()[1], "threads": torch.get_num_threads(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    atomic_write_text(work / "stages.json", json.dumps(stages, indent=2) + "\n")


def _resolved_recipe(job: Job) -> str:
    """The recipe as it runs: every default filled in, and the backend `auto` chose."""
    return job.recipe.model_copy(update={"backend": job.backend.name if job.backend else NO_BACKEND}).to_yaml()


def _check_same_recipe(job: Job, recorded: Path) -> None:
    """A resumed run must be the same job as the one it continues (recorded: the recipe that one wrote)."""
    if recorded.is_file() and recorded.read_text() != _resolved_recipe(job):
        before, now = yaml.safe_load(recorded.read_text()), yaml.safe_load(_resolved_recipe(job))
        changed = ", ".join(sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key)))
        raise QtoolkitError(f"the interrupted run in {recorded.parent} was made with another recipe (it differs in: "
                            f"{changed}): resume with the same recipe and --set options, or pass --overwrite to start "
                            "again")


def _export(job: Job, qgraph: fx.GraphModule, work: Path, out: Path) -> None:
    """The backend's files, always made on the CPU from the model folder's contents, whatever device made it."""
    with progress_bar(1, f"export for {job.backend.name}", unit="graph") as bar:
        if job.backend.export_format == TORCH_FORMAT:
            export_deployment(work / "model", work / "export", overwrite=True)
        else:
            on_cpu = qgraph if device_of(qgraph).type == "cpu" else load_quantized_model(work / "model").unet
            export_model(DiffusionModel(on_cpu, job.model.scheduler_config, out / "model",
                                        shape=job.model.sample_shape), work / "export", overwrite=True)
        bar.advance()


def _speed_table(job: Job, eps, qgraph: fx.GraphModule, tmp: Path) -> str:
    """The int8 model's UNet forward against FP32 eager, side by side (speed.md, speed.json): a quick look;
    `qtoolkit bench` is the full benchmark."""
    size = sum(f.stat().st_size for f in (tmp / "export").rglob("*.safetensors")) or \
        sum(f.stat().st_size for f in (tmp / "export").glob("model.onnx*"))
    fp_network = job.model.denoiser()
    if device_of(fp_network).type != "cpu":  # the int8 model runs on the CPU: so does the FP32 it is timed against
        fp_network = copy.deepcopy(fp_network).cpu()
    with progress_bar(1, f"speed: {job.backend.name} against FP32 eager", unit="table") as bar:
        rows = forward_speed(fp_network, job.backend.name, eps, size, job.model.sample_shape, qgraph)
        bar.advance()
    table = "\n".join([f"UNet forward on {job.backend.name} against PyTorch FP32 eager, {torch.get_num_threads()} "
                        "threads, median of 5, random inputs (`qtoolkit bench --model RUN_FOLDER` for the full "
                        "benchmark):", "", *forward_table(rows)]) + "\n"
    (tmp / "speed.md").write_text(table)
    (tmp / "speed.json").write_text(json.dumps(rows, indent=2) + "\n")
    return table


def versions(job: Job, strategy: str) -> dict:
    """Versions of what made the run: qtoolkit, torch, python, and every plugin whose record it used."""
    registry = plugins.registry()
    used = {("register_calibration_strategies", strategy),
            ("register_observers", job.config.weight_observer), ("register_observers", job.config.activation_observer),
            ("register_rounding_methods", job.rounding.method if job.rounding else None),
            ("register_backends", job.backend.name if job.backend else None)}
    used |= {("register_model_loaders", name) for name, loader in registry.records["register_model_loaders"].items()
             if loader.claims(job.recipe.model)}
    owners = {registry.owners[hook][name] for hook, name in used if name in registry.owners[hook]}
    return {"qtoolkit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "plugins": [info.as_dict() for info in plugins.plugin_infos() if info.name in owners]}
