"""int8 speed on the reference architecture: qtoolkit's QDQ graph on OpenVINO / ONNX Runtime against FP32 and peers.

Builds the DDPM CIFAR-10 UNet2DModel (block_out_channels (128, 256, 256, 256), 2 layers per block, attention
at 16x16; 35.7M parameters, random weights), the model of the speed anchors in shared/REFERENCE.md, so the
table printed here reads against the peers' figures measured on this machine. It is quantized W8A8 with
the default QuantConfig; the calibration inputs are forward-noised Gaussian images at uniform timesteps,
enough for a speed measurement (speed does not depend on the ranges; quality is measured elsewhere).
Then it runs the benchmark behind `qtoolkit bench` (qtoolkit.engines.benchmark), where the peers' recipes
(NNCF, ORT quantize_static, PT2E, torch.compile BF16) calibrate on the same inputs.

    python benchmarks/int8_speed.py --json runs/int8_speed.json        # batch 1, 16, 64; 2 threads
    python benchmarks/int8_speed.py --tiny --batch-sizes 1,2 --iterations 2 --sample-steps 2   # smoke run

Random weights make the per-step SQNR of this script meaningless for quality (the benchmark of the trained
bundled model, `qtoolkit bench --model RUN`, measures that), so it is skipped here by default.
Needs the extras: pip install -c constraints.txt 'qtoolkit[int8,peers]'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from qtoolkit.calibration import CalibrationSet  # first: qtoolkit quiets torchao's import noise before diffusers
from qtoolkit.bench_settings import BenchSettings, bench_options
from qtoolkit.engines.benchmark import format_tables, run_benchmark
from qtoolkit.models.loading import DEFAULT_SCHEDULER_CONFIG, DiffusionModel
from qtoolkit.ptq import calibrate_and_freeze, quantized_graph
from qtoolkit.quant import QuantConfig

from diffusers import UNet2DModel  # noqa: E402  (after qtoolkit, see above)

CIFAR10_DDPM = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
                    flip_sin_to_cos=False, freq_shift=1)
# For a smoke run of the script itself: the same block layout at a fraction of the width.
TINY = {**CIFAR10_DDPM, "block_out_channels": (16, 32, 32, 32), "norm_num_groups": 8}


def calibration_inputs(shape: tuple[int, ...], num: int, seed: int) -> CalibrationSet:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with Gaussian "images" x_0 and uniform t."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (num,), generator=g)
    betas = torch.linspace(DEFAULT_SCHEDULER_CONFIG["beta_start"], DEFAULT_SCHEDULER_CONFIG["beta_end"], 1000)
    abar = torch.cumprod(1 - betas, 0)[t].reshape(-1, 1, 1, 1)
    x0, noise = torch.randn((num, *shape), generator=g).clamp(-1, 1), torch.randn((num, *shape), generator=g)
    return CalibrationSet(x=abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t=t, meta={"strategy": "forward-noised"})


@bench_options(quality_num=0)  # random weights: the per-step SQNR says nothing about quality here
def main(
    settings: BenchSettings,
    tiny: Annotated[bool, typer.Option("--tiny", help="a narrow model, for a smoke run of the script")] = False,
    calib_size: Annotated[int, typer.Option(help="forward-noised calibration inputs")] = 64,
    quantize_conv_outputs: Annotated[bool, typer.Option("--quantize-conv-outputs", help="QuantConfig("
                                                        "quantize_conv_outputs=True): the form ONNX Runtime runs as "
                                                        "QLinearConv")] = False,
    work: Annotated[Optional[Path], typer.Option(help="keep the exported graphs here (default: a temporary "
                                                 "folder)")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the results here")] = None,
) -> None:
    """int8 speed on the DDPM CIFAR-10 architecture (random weights): qtoolkit's graph against FP32 and the peers."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    unet = UNet2DModel(**(TINY if tiny else CIFAR10_DDPM)).eval()
    model = DiffusionModel(unet, dict(DEFAULT_SCHEDULER_CONFIG), Path("random-weights-cifar10-ddpm"))
    calibration = calibration_inputs(model.sample_shape, calib_size, settings.seed)
    config = QuantConfig(quantize_conv_outputs=quantize_conv_outputs)
    qgraph = calibrate_and_freeze(quantized_graph(model, config)[1], calibration, batch_size=16, progress=False)
    result = run_benchmark(DiffusionModel(qgraph, model.scheduler_config, model.path, shape=model.sample_shape),
                           settings, work, calibration, unet)
    result["model_config"] = "tiny" if tiny else "cifar10-ddpm"
    result["quantize_conv_outputs"] = quantize_conv_outputs
    print(format_tables(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
