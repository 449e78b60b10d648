"""The post-training quantization job behind `qtoolkit quantize`.

Method (which inputs to calibrate on: `calibration`; how to quantize: `quant`) meets model plumbing
here, and nowhere else: load the FP model, check the config against it, make the calibration set,
calibrate a quantized copy, freeze it, and save it as a pipeline folder that `qtoolkit sample` loads.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .calibration import STRATEGIES, CalibrationSet, generate_calibration_set, plot_timestep_histogram
from .data import load_fashion_mnist
from .errors import QtoolkitError
from .io import atomic_dir
from .progress import track
from .models.loading import DiffusionModel, model_reference, write_pipeline_files
from .quant.bias_correction import check_samples as check_bias_samples
from .quant import (QuantConfig, ReconstructionSettings, calibrate, correct_bias, freeze, quantize, reconstruct,
                    save_quantized)


@dataclass
class CalibrationSettings:
    """Which calibration set to make: a strategy of `qtoolkit.calibration` and its parameters."""

    strategy: str = "ndtc"
    size: int = 1024  # the paper's calibration set size
    scheduler: str = "ddim"
    steps: int = 100
    seed: int = 0
    batch_size: int = 256
    params: dict = field(default_factory=dict)  # strategy parameters, e.g. {"preset": "reference-code"}
    source: str | None = None  # a saved calibration set (another run's calibration/) to reuse instead

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise QtoolkitError(f"unknown calibration strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")


def make_calibration_set(model: DiffusionModel, settings: CalibrationSettings, data_root: str | None = None,
                         progress: bool = True) -> CalibrationSet:
    if settings.source is not None:
        calibration = CalibrationSet.load(settings.source)
        if tuple(calibration.x.shape[1:]) != tuple(model.sample_shape):
            raise QtoolkitError(f"the calibration set {settings.source} holds inputs of shape "
                              f"{tuple(calibration.x.shape[1:])}, but this model takes {tuple(model.sample_shape)}: "
                              "reuse a set made for this model")
        return calibration
    real = load_fashion_mnist("train", data_root)[0] if settings.strategy == "real-data" else None
    return generate_calibration_set(settings.strategy, model, settings.size, scheduler=settings.scheduler,
                                    steps=settings.steps, seed=settings.seed, batch_size=settings.batch_size,
                                    real_images=real, progress=progress, **settings.params)


def strategy_of(calibration: CalibrationSet) -> str:
    """The strategy a calibration set was made with (a reused set carries its own)."""
    return str(calibration.meta.get("strategy", "unknown"))


def quantized_copy(unet: torch.nn.Module, config: QuantConfig) -> torch.nn.Module:
    """A quantized copy of `unet`, not yet calibrated; the FP original stays untouched (it is the reference)."""
    return quantize(copy.deepcopy(unet), config)


@torch.no_grad()
def calibrate_and_freeze(qunet: torch.nn.Module, calibration: CalibrationSet, batch_size: int = 256,
                         progress: bool = True) -> torch.nn.Module:
    with calibrate(qunet):
        for start in track(range(0, len(calibration), batch_size), "calibrate", unit="batch", disable=not progress):
            qunet(calibration.x[start:start + batch_size], calibration.t[start:start + batch_size])
    return freeze(qunet)


def reconstruct_on_calibration(qunet: torch.nn.Module, model: DiffusionModel, calibration: CalibrationSet,
                               settings: ReconstructionSettings, progress: bool = True) -> list[dict]:
    """BRECQ / AdaRound of the frozen `qunet` against the FP UNet, on (a subset of) the calibration inputs."""
    return reconstruct(qunet, model.unet, (calibration.x, calibration.t), settings, progress=progress)


def correct_bias_on_calibration(qunet: torch.nn.Module, model: DiffusionModel, calibration: CalibrationSet,
                                samples: int, seed: int = 0, progress: bool = True) -> list[dict]:
    """Bias correction of the frozen `qunet` against the FP UNet, on (a subset of) the calibration inputs."""
    return correct_bias(qunet, model.unet, (calibration.x, calibration.t), samples=samples, seed=seed, progress=progress)


def save_quantized_pipeline(qunet: torch.nn.Module, model: DiffusionModel, out: Path, provenance: dict,
                            overwrite: bool = False) -> None:
    """A pipeline folder (unet/ quantized, scheduler/, model_index.json) that load_diffusion_model reads."""
    with atomic_dir(out, overwrite) as tmp:
        save_quantized(qunet, tmp / "unet", extra_config=provenance)
        write_pipeline_files(tmp, model.scheduler_config)


def run_ptq(model: DiffusionModel, config: QuantConfig, calib: CalibrationSettings, out: Path, *,
            reconstruction: ReconstructionSettings | None = None, bias_correction: int | None = None,
            overwrite: bool = False, data_root: str | None = None, progress: bool = True) -> tuple[torch.nn.Module, CalibrationSet]:
    """Quantize `model` with `config`, calibrated on `calib` (then reconstructed, if `reconstruction` is given,
    and bias-corrected on `bias_correction` calibration inputs, if it is given); write the model and
    calibration set to `out`.

    Every check (bits, patterns against this model's layers, strategy and its parameters) runs before the
    first network evaluation. Returns the frozen quantized UNet and its calibration set.
    """
    if out.exists() and not overwrite:
        raise QtoolkitError(f"{out} already exists: choose another --out or pass --overwrite")
    qunet = quantized_copy(model.unet, config)  # validates the config against the model's layer names
    if bias_correction is not None:
        check_bias_samples(bias_correction)
    t0 = time.perf_counter()
    calibration = make_calibration_set(model, calib, data_root, progress)
    calibration_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    calibrate_and_freeze(qunet, calibration, calib.batch_size, progress)
    seconds = {"calibration_set": round(calibration_seconds, 1), "observe_and_freeze": round(time.perf_counter() - t0, 1)}
    provenance = {"base_model": model_reference(model.path), "calibration": asdict(calib),
                  "calibration_cost": calibration.meta["cost"], "seconds": seconds}
    if reconstruction is not None:
        t0 = time.perf_counter()
        units = reconstruct_on_calibration(qunet, model, calibration, reconstruction, progress)
        seconds["reconstruction"] = round(time.perf_counter() - t0, 1)
        provenance["reconstruction"] = {"settings": reconstruction.to_dict(), "units": units}
    if bias_correction is not None:
        t0 = time.perf_counter()
        layers = correct_bias_on_calibration(qunet, model, calibration, bias_correction, calib.seed, progress)
        seconds["bias_correction"] = round(time.perf_counter() - t0, 1)
        provenance["bias_correction"] = {"samples": bias_correction, "seed": calib.seed, "layers": layers}
    with atomic_dir(out, overwrite) as tmp:
        save_quantized_pipeline(qunet, model, tmp / "model", provenance)
        calibration.save(tmp / "calibration")
        plot_timestep_histogram({strategy_of(calibration): calibration}, tmp / "calibration_timesteps.png")
        (tmp / "ptq.json").write_text(json.dumps({"quant_config": config.to_dict(), **provenance}, indent=2) + "\n")
    return qunet, calibration
