"""The report `qtoolkit quantize` writes: how far the quantized model is from its FP original.

Three views, from cheap and local to global: noise-prediction error per timestep on a held-out FP chain,
agreement of final samples drawn from the same seeds (PSNR/SSIM), and distribution metrics of both
sample sets against real data (FID with bootstrap CI, KID ± std, IS, precision/recall), with the FP
model's own numbers beside them as the yardstick for "within sampling noise".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .agreement import per_timestep_error, sample_agreement  # noqa: E402
from .evaluation import evaluate_images, feature_extractor, load_reference  # noqa: E402
from .images import load_samples, save_grid, save_samples  # noqa: E402
from .io import atomic_write_text  # noqa: E402
from .models.loading import DiffusionModel  # noqa: E402
from .sampling import NoisePredictor, sample, unet_predictor  # noqa: E402

CACHE_DIR = Path.home() / ".cache" / "qtoolkit" / "fp-samples"


@dataclass
class ReportSettings:
    scheduler: str = "ddim"
    steps: int = 100
    num: int = 500           # samples per model for FID/KID/IS and PSNR/SSIM
    error_num: int = 64      # held-out chains for the per-timestep error
    seed: int = 10_000       # sampling seeds, apart from calibration seeds
    features: str = "classifier"
    bootstrap: int = 200
    data_root: str | None = None


def _model_digest(model: DiffusionModel) -> str:
    """Weights and schedule (the scheduler config decides e.g. x_0 clipping): what the FP samples depend on."""
    h = hashlib.sha256(json.dumps(model.scheduler_config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.unet.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fp_samples(model: DiffusionModel, settings: ReportSettings, batch_size: int = 256) -> torch.Tensor:
    """The FP model's samples for these settings, cached on disk: every report and study run reuses them.

    Sample i depends only on (seed, i) for a deterministic sampler, so a cached larger set serves any
    smaller request as its first `num` samples (e.g. the model card's 2,000 serve a report's 500).
    """
    prefix = f"{_model_digest(model)}-{settings.scheduler}{settings.steps}-s{settings.seed}-b{batch_size}"
    deterministic = settings.scheduler != "ddpm"
    for path in CACHE_DIR.glob(f"{prefix}-n*.npz"):
        cached_num = int(path.stem.rsplit("-n", 1)[1])
        if cached_num == settings.num or (deterministic and cached_num > settings.num):
            return load_samples(path)[0][:settings.num]
    x = sample(model, settings.scheduler, settings.steps, settings.num, settings.seed, batch_size)
    save_samples(CACHE_DIR / f"{prefix}-n{settings.num}.npz", x, {"model": str(model.path), **asdict(settings)})
    return x


def plot_per_timestep(errors: dict, path: Path, title: str) -> None:
    """Two panels over the chain: each candidate's noise-prediction SQNR, and its signed mean error (the bias a
    sampler adds up step after step)."""
    fig, (ax_sqnr, ax_bias) = plt.subplots(2, 1, figsize=(7, 5.6), sharex=True, height_ratios=(3, 2))
    for name, series in errors.items():
        if name != "t":
            ax_sqnr.plot(errors["t"], series["sqnr_db"], label=name, lw=1.3)
            ax_bias.plot(errors["t"], series["mean_error"], label=name, lw=1.3)
    ax_bias.axhline(0, color="black", lw=0.6)
    ax_bias.set_xlabel("timestep t (0 = data, right = noise)")
    ax_sqnr.set_ylabel("noise-prediction SQNR vs FP (dB)")
    ax_bias.set_ylabel("mean error vs FP")
    ax_sqnr.set_title(title, fontsize=10)
    for ax in (ax_sqnr, ax_bias):
        ax.grid(alpha=0.3)
    ax_sqnr.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_to_fp(model: DiffusionModel, candidates: dict[str, NoisePredictor], settings: ReportSettings,
                  out: Path, sampled: set[str] | None = None) -> dict:
    """All three views for every candidate against the FP model; figures go to `out`.

    Candidates not in `sampled` (default: all are) get only the per-timestep view, a cheap screen
    without sampling or FID.
    """
    out.mkdir(parents=True, exist_ok=True)
    fp = unet_predictor(model.unet)
    errors = per_timestep_error(model, fp, candidates, scheduler=settings.scheduler, steps=settings.steps,
                                num=settings.error_num, seed=settings.seed + 1)
    plot_per_timestep(errors, out / "per_timestep_sqnr.png",
                      f"per-step error on {settings.error_num} held-out {settings.scheduler}-{settings.steps} chains")
    extractor = feature_extractor(settings.features)
    reference = load_reference("fmnist-test", data_root=settings.data_root)
    fp_x = fp_samples(model, settings)
    results = {"settings": asdict(settings), "per_timestep": errors,
               "fp": {"metrics": evaluate_images(fp_x, reference, extractor, settings.bootstrap, settings.seed)}}
    save_grid(fp_x[:64], out / "samples_fp.png")
    for name, eps in candidates.items():
        sqnr = np.array(errors[name]["sqnr_db"])
        results[name] = {"metrics": None, "agreement": None,
                         "sqnr_db_mean": float(np.mean(sqnr)), "sqnr_db_min": float(np.min(sqnr))}
        if sampled is None or name in sampled:
            q_x = sample(model, settings.scheduler, settings.steps, settings.num, settings.seed, eps=eps)
            save_grid(q_x[:64], out / f"samples_{name.replace(' ', '_')}.png")
            results[name]["metrics"] = evaluate_images(q_x, reference, extractor, settings.bootstrap, settings.seed)
            results[name]["agreement"] = sample_agreement(fp_x, q_x)
    return results


def within_fp_noise(fp: dict, q: dict) -> dict:
    """Is the quantized model's FID inside the FP model's bootstrap interval, and its KID within 2 std?"""
    fid_ok = fp["fid_ci_low"] <= q["fid"] <= fp["fid_ci_high"] or q["fid"] <= fp["fid"]
    kid_ok = abs(q["kid_mean"] - fp["kid_mean"]) <= 2 * max(fp["kid_std"], q["kid_std"])
    return {"fid": bool(fid_ok), "kid": bool(kid_ok)}


def write_report(results: dict, out: Path, title: str, command: str) -> str:
    """report.json plus a Markdown summary (returned, for the console)."""
    s = results["settings"]
    fp = results["fp"]["metrics"]
    lines = [f"# {title}", "", f"Command: `{command}`", "",
             f"{s['num']} samples per model, {s['scheduler']}-{s['steps']}, seeds from {s['seed']}, "
             f"features: {s['features']}, reference: Fashion-MNIST test split.", "",
             COMPARISON_HEADER, comparison_row("FP", fp, None, None)]
    for name, r in results.items():
        if name in ("settings", "per_timestep", "fp"):
            continue
        lines.append(comparison_row(name, r["metrics"], r["agreement"], (r["sqnr_db_mean"], r["sqnr_db_min"])))
        if r["metrics"] is None:
            continue
        verdict = within_fp_noise(fp, r["metrics"])
        r["within_fp_noise"] = verdict
        lines.append("")
        lines.append(f"{name}: FID {'within' if verdict['fid'] else 'OUTSIDE'} the FP bootstrap interval; "
                     f"KID {'within' if verdict['kid'] else 'OUTSIDE'} 2 std of FP.")
    lines += ["", "![per-step SQNR](per_timestep_sqnr.png)", ""]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "report.md", text)
    return text


COMPARISON_HEADER = (
    "| model | FID [95% CI] | KID (± std) | IS | precision | recall | PSNR vs FP (dB) | SSIM vs FP | pixel shift vs FP "
    "| step SQNR mean / min (dB) |\n"
    "|---|---|---|---|---|---|---|---|---|---|")


def comparison_row(name: str, m: dict | None, agreement: dict | None, sqnr: tuple[float, float] | None) -> str:
    """One table row; any view not measured for this model shows as '-'."""
    cells = ["-"] * 5
    if m:
        cells = [f"{m['fid']:.4g} [{m['fid_ci_low']:.4g}, {m['fid_ci_high']:.4g}]",
                 f"{m['kid_mean']:.3g} ± {m['kid_std']:.2g}", f"{m['is_mean']:.2f}",
                 f"{m['precision']:.3f}", f"{m['recall']:.3f}"]
    cells += [f"{agreement['psnr_db_mean']:.1f}", f"{agreement['ssim_mean']:.3f}", f"{agreement['mean_shift']:+.4f}"] \
        if agreement else ["-", "-", "-"]
    cells.append(f"{sqnr[0]:.1f} / {sqnr[1]:.1f}" if sqnr else "-")
    return "| " + " | ".join([name, *cells]) + " |"
