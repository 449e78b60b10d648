"""The post-training quantization job behind `qtoolkit run` and `qtoolkit quantize`.

Method (which inputs to calibrate on: a calibration strategy; how to round the weights: a rounding method;
both plugins, looked up by name) meets model plumbing here, and nowhere else: capture the FP network's graph
and check the whole job against it, make the calibration set, calibrate a quantized copy of the graph, freeze
it, round and bias-correct it, and save it as a pipeline folder that `qtoolkit sample` loads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch
from torch import fx

from . import plugins
from .calibration import (CalibrationSet, check_calibration, draw_calibration_timesteps, generate_calibration_set,
                          plot_timestep_histogram)
from .calibration.dataset import META_FILE, TENSORS_FILE
from .devices import device_of
from .distributed import from_main_process, is_main_process, my_batches
from .errors import QtoolkitError
from .graph import calibrate, capture, freeze, plan, quant_config_of, quantize, save_quantized
from .graph.bias_correction import check_samples as check_bias_samples
from .graph.bias_correction import correct_bias
from .graph.quantize import merge_observations
from .graph.serialization import load_quantized_model
from .graph.timestep_ranges import choose_timestep_boundaries
from .io import atomic_dir, atomic_write_text
from .models.loading import DiffusionModel, model_reference, write_pipeline_files
from .progress import timed, track
from .quant import QuantConfig
from .quant.timestep_groups import BoundaryRequest, check_coverage, group_counts


PTQ_RECORD = "ptq.json"  # what run_ptq did; written last, so its presence marks a finished quantized model


@dataclass
class CalibrationSettings:
    """Which calibration set to make: a calibration strategy (a plugin) and its parameters. A job names its
    strategy; there is no default."""

    strategy: str
    size: int = 1024  # the paper's calibration set size
    scheduler: str = "ddim"
    steps: int = 100
    seed: int = 0
    batch_size: int = 256
    inputs_per_chain: int = 1  # FP chains give up to this many inputs each (1: one chain per input)
    params: dict = field(default_factory=dict)  # strategy parameters, e.g. {"preset": "reference-code"}
    source: str | None = None  # a saved calibration set (another run's calibration/) to reuse instead


@dataclass
class RoundingSettings:
    """How the frozen weights are rounded: a rounding method (a plugin) and its parameters."""

    method: str
    params: dict = field(default_factory=dict)


def _check_source(source: str) -> None:
    folder = Path(source)
    for name in (TENSORS_FILE, META_FILE):
        if not (folder / name).is_file():
            raise QtoolkitError(f"the calibration source {folder} is not a calibration set ({name} is missing): "
                                "give another run's calibration/ folder")


def check_ptq(model: DiffusionModel, config: QuantConfig, calib: CalibrationSettings,
              rounding: RoundingSettings | None = None, bias_correction: int | None = None,
              bias_per_group: bool = False) -> fx.GraphModule:
    """Every check of a PTQ job, before any calibration: the calibration strategy, its settings and parameters
    (or the reused set), the rounding method and its parameters, the bias-correction sample count (none of them
    runs the network), then the model's graph can be captured and the config's patterns match its ops. Returns
    the captured FP graph."""
    if calib.source is not None:
        _check_source(calib.source)
    else:
        check_calibration(calib.strategy, model, calib.size, scheduler=calib.scheduler, steps=calib.steps,
                          seed=calib.seed, batch_size=calib.batch_size, inputs_per_chain=calib.inputs_per_chain,
                          progress=False, **calib.params)
    if rounding is not None:
        plugins.rounding_method(rounding.method).settings(dict(rounding.params))
        if config.weight_bits is None:
            raise QtoolkitError(f"rounding method {rounding.method!r} rounds quantized weights, and this job "
                                "quantizes none: set weight bits, or drop the rounding")
    if bias_correction is not None:
        check_bias_samples(bias_correction)
    if bias_per_group and (bias_correction is None or not config.grouped):
        raise QtoolkitError("bias correction per timestep group needs bias correction and timestep groups: set "
                            "quantization.timestep_groups > 1 (and bias_correction enabled), or per_timestep_group false")
    if config.grouped:
        _check_group_coverage(model, config, calib)
    # Last: capturing traces the network (and checks the graph at two batch sizes), the only check that runs it.
    graph = capture(model.denoiser(), model.sample_shape)
    plan(graph, config)  # include/exclude patterns against this graph's ops
    return graph


def num_train_timesteps(model: DiffusionModel) -> int:
    return int(model.scheduler_config.get("num_train_timesteps", 1000))


def _check_group_coverage(model: DiffusionModel, config: QuantConfig, calib: CalibrationSettings) -> None:
    """Every timestep group will hold enough calibration inputs: the strategy's timesteps drawn without running
    the chain (or a reused set's own), split by the boundary rule."""
    if calib.source is not None:
        timesteps = CalibrationSet.load(calib.source).t
    else:
        timesteps = draw_calibration_timesteps(calib.strategy, model, calib.size, scheduler=calib.scheduler,
                                               steps=calib.steps, seed=calib.seed, batch_size=calib.batch_size,
                                               inputs_per_chain=calib.inputs_per_chain, **calib.params)
    check_coverage(BoundaryRequest(config.timestep_groups, num_train_timesteps(model), timesteps.long()),
                   plugins.timestep_boundaries(config.timestep_boundaries))


def make_calibration_set(model: DiffusionModel, settings: CalibrationSettings, progress: bool = True) -> CalibrationSet:
    if settings.source is not None:
        calibration = CalibrationSet.load(settings.source)
        if tuple(calibration.x.shape[1:]) != tuple(model.sample_shape):
            raise QtoolkitError(f"the calibration set {settings.source} holds inputs of shape "
                                f"{tuple(calibration.x.shape[1:])}, but this model takes {tuple(model.sample_shape)}: "
                                "reuse a set made for this model")
        return calibration
    return generate_calibration_set(settings.strategy, model, settings.size, scheduler=settings.scheduler,
                                    steps=settings.steps, seed=settings.seed, batch_size=settings.batch_size,
                                    inputs_per_chain=settings.inputs_per_chain, progress=progress, **settings.params)


def strategy_of(calibration: CalibrationSet) -> str:
    """The strategy a calibration set was made with (a reused set carries its own)."""
    return str(calibration.meta.get("strategy", "unknown"))


def quantized_graph(model: DiffusionModel, config: QuantConfig) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(the captured FP graph of `model`, a quantized copy of it, not yet calibrated): the FP graph stays the
    reference that rounding and bias correction compare against."""
    graph = capture(model.denoiser(), model.sample_shape)
    return graph, quantize(graph, config)


@torch.no_grad()
def calibrate_and_freeze(qgraph: fx.GraphModule, calibration: CalibrationSet, batch_size: int = 256,
                         progress: bool = True) -> fx.GraphModule:
    """Observe the calibration set in batches (under torchrun, each process its share, merged) and freeze."""
    starts, device = range(0, len(calibration), batch_size), device_of(qgraph)
    with calibrate(qgraph):
        for b in track(my_batches(len(starts)), "calibrate", unit="batch", disable=not progress):
            qgraph(calibration.x[starts[b]:starts[b] + batch_size].to(device),
                   calibration.t[starts[b]:starts[b] + batch_size].to(device))
    merge_observations(qgraph)
    return freeze(qgraph)


def observe_calibration_set(qgraph: fx.GraphModule, fp_graph: fx.GraphModule, calibration: CalibrationSet,
                            num_timesteps: int, batch_size: int = 256, progress: bool = True) -> dict | None:
    """Calibrate the quantized graph on the calibration set and freeze it; with timestep groups, the boundary rule
    places the groups first. Returns what was chosen for the groups (rule, boundaries, calibration inputs per
    group), or None without groups."""
    groups = None
    if quant_config_of(qgraph).grouped:
        boundaries = choose_timestep_boundaries(qgraph, fp_graph, calibration.x, calibration.t, num_timesteps)
        groups = {"rule": quant_config_of(qgraph).timestep_boundaries, "boundaries": boundaries,
                  "calibration_inputs": group_counts(boundaries, calibration.t)}
    calibrate_and_freeze(qgraph, calibration, batch_size, progress)
    return groups


def round_on_calibration(qgraph: fx.GraphModule, fp_graph: fx.GraphModule, calibration: CalibrationSet,
                         rounding: RoundingSettings, progress: bool = True):
    """The rounding method's pass over the frozen `qgraph` against the FP graph on the calibration inputs; returns
    (resolved settings, JSON-ready summary)."""
    method = plugins.rounding_method(rounding.method)
    settings = method.settings(dict(rounding.params))
    device = device_of(qgraph)
    summary = method.apply(qgraph, fp_graph, (calibration.x.to(device), calibration.t.to(device)), settings,
                           progress=progress)
    # Not sharded under torchrun: a gradient descent split over processes would end elsewhere for every process
    # count. Every process runs it (deterministic on the CPU, so they agree), and takes rank 0's result, so that
    # a nondeterministic kernel (some GPU ones are) cannot leave the processes with different models.
    qgraph.load_state_dict(from_main_process(qgraph.state_dict()))
    return settings, from_main_process(summary)


def save_quantized_pipeline(qgraph: fx.GraphModule, model: DiffusionModel, out: Path, provenance: dict,
                            overwrite: bool = False) -> None:
    """A pipeline folder (unet/ quantized, scheduler/, model_index.json) that load_diffusion_model reads."""
    with atomic_dir(out, overwrite) as tmp:
        save_quantized(qgraph, tmp / "unet", model, extra_config=provenance)
        write_pipeline_files(tmp, model.scheduler_config)


def _json_ready(settings) -> dict:
    return asdict(settings) if is_dataclass(settings) else dict(settings)


def run_ptq(model: DiffusionModel, config: QuantConfig, calib: CalibrationSettings, out: Path, *,
            rounding: RoundingSettings | None = None, bias_correction: int | None = None,
            bias_per_group: bool = False, overwrite: bool = False, progress: bool = True,
            fp_graph: fx.GraphModule | None = None,
            resume_from: Path | None = None) -> tuple[fx.GraphModule, CalibrationSet]:
    """Quantize `model` with `config`, calibrated on `calib` (then its weights rounded by `rounding`, if given,
    and bias-corrected on `bias_correction` calibration inputs, if given, per timestep group with
    `bias_per_group`); write the model, the calibration
    set and ptq.json (what was done, with every setting resolved) to `out`.

    Every check (`check_ptq`, and `out` free unless `overwrite` or resuming) runs before calibration; `fp_graph`,
    the graph check_ptq returned for this model, saves capturing it again. Returns the frozen quantized graph and
    its calibration set.

    Each stage is written as soon as it is done, atomically: calibration/, then model/ and ptq.json (last: it
    marks the model finished). `resume_from`, a folder an interrupted call wrote to (usually `out` itself),
    gives the stages it finished, loaded instead of redone: the whole quantized model when its ptq.json is
    there, else the calibration set. Both load exactly as they were made, so a resumed job ends as an
    uninterrupted one does.
    """
    if out.exists() and not overwrite and resume_from is None:
        raise QtoolkitError(f"{out} already exists: choose another output folder or allow overwriting")
    if fp_graph is None:
        fp_graph = check_ptq(model, config, calib, rounding, bias_correction, bias_per_group)
    if resume_from is not None and (resume_from / PTQ_RECORD).is_file():
        if is_main_process():
            print(f"resumed: the quantized model {resume_from}/model, made before the interruption")
        return load_quantized_model(resume_from / "model").unet, CalibrationSet.load(resume_from / "calibration")
    qgraph = quantize(fp_graph, config)
    seconds, resumed = {}, []
    if resume_from is not None and (resume_from / "calibration" / META_FILE).is_file():
        if is_main_process():
            print(f"resumed: the calibration set {resume_from}/calibration, made before the interruption")
        calibration = CalibrationSet.load(resume_from / "calibration")
        resumed.append("calibration_set")
    else:
        with timed(seconds, "calibration_set"):
            calibration = make_calibration_set(model, calib, progress)
        calibration.save(out / "calibration", overwrite=True)
    with timed(seconds, "observe_and_freeze"):
        groups = observe_calibration_set(qgraph, fp_graph, calibration, num_train_timesteps(model), calib.batch_size,
                                         progress)
    provenance = {"base_model": model_reference(model.path), "calibration": asdict(calib),
                  "calibration_cost": calibration.meta["cost"], "seconds": seconds}
    if groups is not None:
        provenance["timestep_groups"] = groups
    if resumed:
        provenance["resumed"] = resumed
    if rounding is not None:
        with timed(seconds, "rounding"):
            settings, summary = round_on_calibration(qgraph, fp_graph, calibration, rounding, progress)
        provenance["rounding"] = {"method": rounding.method, "params": _json_ready(settings), "summary": summary}
    if bias_correction is not None:
        with timed(seconds, "bias_correction"):
            layers = correct_bias(qgraph, fp_graph, (calibration.x, calibration.t), samples=bias_correction,
                                  seed=calib.seed, progress=progress, per_group=bias_per_group)
        provenance["bias_correction"] = {"samples": bias_correction, "seed": calib.seed,
                                         "per_timestep_group": bias_per_group, "layers": layers}
    save_quantized_pipeline(qgraph, model, out / "model", provenance, overwrite=True)
    plot_timestep_histogram({strategy_of(calibration): calibration}, out / "calibration_timesteps.png")
    atomic_write_text(out / PTQ_RECORD, json.dumps({"quant_config": config.to_dict(), **provenance}, indent=2) + "\n")
    return qgraph, calibration
