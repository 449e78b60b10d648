"""int8 speed on the reference architecture: qtoolkit's QDQ graph on OpenVINO / ONNX Runtime against FP32 and peers.

Builds the DDPM CIFAR-10 UNet2DModel (block_out_channels (128, 256, 256, 256), 2 layers per block, attention
at 16x16; 35.7M parameters, random weights), the model of the speed anchors in shared/REFERENCE.md, so the
table printed here reads against the peers' figures measured on this machine. It is quantized W8A8 with
the default QuantConfig; the calibration inputs are forward-noised Gaussian images at uniform timesteps,
enough for a speed measurement (speed does not depend on the ranges; quality is measured elsewhere).
Then it runs the benchmark behind `qtoolkit bench` (qtoolkit.engines.benchmark), where the peers' recipes
(NNCF, ORT quantize_static, PT2E, torch.compile BF16) calibrate on the same inputs.

    python benchmarks/int8_speed.py --json runs/int8_speed.json        # batch 1, 16, 64; 2 threads
    python benchmarks/int8_speed.py --tiny --batch-sizes 1 2 --iterations 2 --sample-steps 2   # smoke run

Random weights make the per-step SQNR of this script meaningless for quality (the benchmark of the trained
bundled model, `qtoolkit bench --model RUN`, measures that), so it is skipped here by default.
Needs the extras: pip install -c constraints.txt 'qtoolkit[int8,peers]'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from qtoolkit.calibration import CalibrationSet  # first: qtoolkit quiets torchao's import noise before diffusers
from qtoolkit.engines.benchmark import add_arguments, format_tables, run_benchmark, settings_from_args
from qtoolkit.models.loading import DEFAULT_SCHEDULER_CONFIG, DiffusionModel
from qtoolkit.ptq import calibrate_and_freeze, quantized_copy
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a narrow model, for a smoke run of the script")
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--quantize-conv-outputs", action="store_true", help="QuantConfig(quantize_conv_outputs=True):"
                        " the form ONNX Runtime runs as QLinearConv")
    add_arguments(parser)
    parser.set_defaults(quality_num=0)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    torch.set_num_threads(settings.threads)
    torch.manual_seed(args.seed)
    unet = UNet2DModel(**(TINY if args.tiny else CIFAR10_DDPM)).eval()
    model = DiffusionModel(unet, dict(DEFAULT_SCHEDULER_CONFIG), Path("random-weights-cifar10-ddpm"))
    calibration = calibration_inputs(model.sample_shape, args.calib_size, args.seed)
    config = QuantConfig(quantize_conv_outputs=args.quantize_conv_outputs)
    qunet = calibrate_and_freeze(quantized_copy(unet, config), calibration, batch_size=16, progress=False)
    result = run_benchmark(DiffusionModel(qunet, model.scheduler_config, model.path), settings, args.work, calibration)
    result["model_config"] = "tiny" if args.tiny else "cifar10-ddpm"
    result["quantize_conv_outputs"] = args.quantize_conv_outputs
    print(format_tables(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
