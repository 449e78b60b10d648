"""The quantization job stage by stage: run a recipe as a user does (`qtoolkit run`, or under torchrun) and print
each stage's wall time from the run folder's stages.json, with the yardsticks the stages are judged against.

    python benchmarks/job_profile.py                         # recipes/ddim_cifar_w8a8.yaml, CIFAR-10 UNet (random weights)
    python benchmarks/job_profile.py --nproc 2               # the same job shared out over 2 torchrun processes
    python benchmarks/job_profile.py --recipe recipes/ddim_fmnist_w8a8.yaml --model fmnist-ddpm
    python benchmarks/job_profile.py --set calibration.size=128 --set report.num=16    # a quick look

Without --model the CIFAR-10 recipe runs on google/ddpm-cifar10-32's architecture with seeded random weights (the
hub is out of reach here; the cost of every stage depends on the architecture, not on the weights). Yardstick:
one FP forward pass over the bias-correction inputs (batch 64), which bias correction should stay within twice.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel

from qtoolkit.models import load_diffusion_model
from qtoolkit.models.loading import DEFAULT_SCHEDULER_CONFIG, save_diffusion_model
from qtoolkit.recipe import load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_speed import CIFAR10_DDPM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def random_cifar_model(folder: Path) -> Path:
    torch.manual_seed(0)
    save_diffusion_model(UNet2DModel(**CIFAR10_DDPM).eval(), dict(DEFAULT_SCHEDULER_CONFIG), folder)
    return folder


@torch.no_grad()
def one_fp_pass(model: str, samples: int, batch: int = 64) -> float:
    """Seconds of one FP forward pass over `samples` inputs, in batches of `batch` (median of 3)."""
    network = load_diffusion_model(model).denoiser()
    shape = load_diffusion_model(model).sample_shape
    x, t = torch.randn(samples, *shape), torch.randint(0, 1000, (samples,))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for i in range(0, samples, batch):
            network(x[i:i + batch], t[i:i + batch])
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "ddim_cifar_w8a8.yaml"))
    parser.add_argument("--model", help="the recipe's model (default: the CIFAR-10 UNet with random weights)")
    parser.add_argument("--nproc", type=int, default=1, help="torchrun processes (default 1: a plain process)")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="run folder (default: a temporary one)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="job-profile-"))
    model = args.model or str(random_cifar_model(scratch / "cifar10-random"))
    out = args.out or scratch / "run"
    sets = [arg for pair in [f"model={model}", *args.sets] for arg in ("--set", pair)]
    launcher = [sys.executable, "-m", "qtoolkit.cli"] if args.nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
         "-m", "qtoolkit.cli", "--"]
    start = time.perf_counter()
    subprocess.run([*launcher, "run", args.recipe, *sets, "--out", str(out)], check=True, env=os.environ)
    wall = time.perf_counter() - start

    stages = json.loads((out / "stages.json").read_text())
    recipe = load_recipe(args.recipe, [f"model={model}", *args.sets])
    samples = min(recipe.bias_correction.samples, recipe.calibration.size)
    fp_pass = one_fp_pass(model, samples)
    print(f"\n{args.recipe} on {model}: {stages['processes']} process(es) x {stages['threads']} threads, CPU "
          f"capability {stages['cpu_capability']}, torch {torch.__version__}\n")
    print("| stage | seconds | share |\n|---|---|---|")
    for stage, seconds in stages["stages"].items():
        print(f"| {stage} | {seconds:.1f} | {seconds / stages['total']:.0%} |")
    print(f"| **job (stages.json total)** | **{stages['total']:.1f}** | |")
    print(f"| command, with start-up and checks | {wall:.1f} | |")
    if "bias_correction" in stages["stages"]:
        ratio = stages["stages"]["bias_correction"] / fp_pass
        print(f"\nBias correction: {stages['stages']['bias_correction']:.1f} s = {ratio:.1f}x one FP pass over its "
              f"{samples} inputs ({fp_pass:.1f} s at batch 64, {torch.get_num_threads()} threads; goal: at most 2x).")


if __name__ == "__main__":
    main()
