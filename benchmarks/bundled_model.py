"""Publish a trained run as the bundled `fmnist-ddpm` model, with its model card.

Copies the EMA weights of a `qtoolkit train` run into the package, draws 2,000 DDIM-100 samples,
evaluates them against the Fashion-MNIST test split (FID with bootstrap CI, KID, IS, precision/recall,
plus the IS of the real test split for scale), plots the loss curve and a sample grid, and writes
the model card (README.md) next to the weights, with the FP samples a report with default settings
compares against (fp_samples.npz/.json: a fresh clone need not draw them).

    python benchmarks/bundled_model.py --run runs/train-fmnist-ddpm --num 2000
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from qtoolkit.evaluation import evaluate_images, feature_extractor, load_reference  # noqa: E402
from qtoolkit.images import save_grid  # noqa: E402
from qtoolkit.metrics import format_table  # noqa: E402
from qtoolkit.models.loading import BUNDLED, load_diffusion_model  # noqa: E402
from qtoolkit.report import ReportSettings, fp_samples, ship_fp_samples  # noqa: E402
from qtoolkit.training.ddpm import FMNIST_UNET_CONFIG  # noqa: E402

HUB = BUNDLED["fmnist-ddpm"]


def plot_loss(log_path: Path, out: Path) -> None:
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (batch 128)")
    ax.set_ylabel("noise-prediction MSE (mean of 50 steps)")
    ax.set_title("fmnist-ddpm training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/train-fmnist-ddpm"))
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads-note", default="2 threads", help="how the training run used the CPU, for the card")
    p.add_argument("--seed", type=int, default=ReportSettings().seed,
                   help="sampling seed (default: the reports' seed, so `qtoolkit quantize` reuses these FP samples)")
    a = p.parse_args()

    state = torch.load(a.run / "checkpoint.pt", map_location="cpu", weights_only=True)
    train_cfg = json.loads((a.run / "train_config.json").read_text())
    tmp = HUB.with_name(HUB.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(a.run / "model", tmp)
    plot_loss(a.run / "log.jsonl", tmp / "loss.png")
    shutil.copy(a.run / "log.jsonl", tmp / "train_log.jsonl")

    model = load_diffusion_model(tmp)
    t0 = time.perf_counter()
    x = fp_samples(model, ReportSettings(scheduler="ddim", steps=a.steps, num=a.num, seed=a.seed))
    sample_seconds = time.perf_counter() - t0
    save_grid(x[:100], tmp / "samples.png", ncol=10)
    extractor = feature_extractor("classifier")
    test = load_reference("fmnist-test")
    results = evaluate_images(x, test, extractor)
    real = evaluate_images(load_reference("fmnist-train", a.num), test, extractor)
    table = format_table(results)
    print(table)
    n_params = sum(p.numel() for p in model.unet.parameters())
    card = f"""# fmnist-ddpm: the bundled Fashion-MNIST DDPM

A diffusers `UNet2DModel` ({n_params / 1e6:.2f}M parameters) trained by qtoolkit as DDPM (T = 1000, linear betas
1e-4..0.02, epsilon prediction) on the 60,000 Fashion-MNIST training images, padded to 32x32, in [-1, 1].
Weights are the EMA (decay {train_cfg['ema_decay']}) copy. Layout: `DDPMPipeline.from_pretrained(<this folder>)` works.
The scheduler config sets `clip_sample` false: samples are drawn without clipping the predicted x_0 (with
clipping they lose their speckle but score worse on the classifier features; see FMNIST_SCHEDULER_CONFIG).

Architecture (`qtoolkit.training.ddpm.FMNIST_UNET_CONFIG`): {json.dumps(FMNIST_UNET_CONFIG)}.
It has the parts that make diffusion PTQ hard: ResNet blocks with GroupNorm + SiLU, skip concatenations,
self-attention at 16x16 and the sinusoidal timestep embedding.

## Training
- Command: `qtoolkit train --out runs/train-fmnist-ddpm --steps {int(state['step'])}` (the run was started
  with `--steps {train_cfg['steps']}` and published at step {int(state['step'])}; `qtoolkit train` resumes it).
- Steps: {int(state['step'])} of batch {train_cfg['batch_size']} ({int(state['step']) * train_cfg['batch_size'] / 60000:.1f} epochs),
  AdamW lr {train_cfg['lr']} (warm-up {train_cfg['warmup_steps']} steps), grad clip {train_cfg['grad_clip']},
  bf16 autocast = {train_cfg['bf16']}, seed {train_cfg['seed']}.
- Wall time: {float(state['wall_seconds']) / 3600:.2f} h by the checkpoint's clock, on a 2-core AMD EPYC (Zen 4) CPU
  ({a.threads_note}).
- Loss curve: `loss.png`; raw log: `train_log.jsonl`.

![loss](loss.png)

## Quality ({a.num} DDIM-{a.steps} samples, seed {a.seed}, vs the 10,000-image test split)
Features: the bundled Fashion-MNIST classifier (`fmnist-classifier`). Sampling (or reading the FP-sample
cache, `~/.cache/qtoolkit`) took {sample_seconds / 60:.1f} min.

```
{table}
```

For scale, {a.num} real *training* images against the test split with the same features:
FID {real['fid']:.2f}, KID {real['kid_mean']:.4f} ± {real['kid_std']:.4f}, IS {real['is_mean']:.2f}.
IS of the samples is {100 * results['is_mean'] / results['is_reference_mean']:.0f}% of the IS of the real test split
({results['is_reference_mean']:.2f}).

Measured by: `python benchmarks/bundled_model.py --run runs/train-fmnist-ddpm --num {a.num} --steps {a.steps}`

![samples](samples.png)
"""
    (tmp / "README.md").write_text(card)
    ship_fp_samples(model, ReportSettings())
    (tmp / "quality.json").write_text(json.dumps({"samples": results, "train_vs_test": real,
                                                  "sample_seconds": sample_seconds}, indent=2) + "\n")
    old = HUB.with_name(HUB.name + ".old")
    if HUB.exists():
        HUB.rename(old)
    tmp.rename(HUB)
    shutil.rmtree(old, ignore_errors=True)
    print(f"published to {HUB}")


if __name__ == "__main__":
    main()
