"""The report `qtoolkit quantize` writes: how far the quantized model is from its FP original.

Three views, from cheap and local to global: noise-prediction error per timestep on a held-out FP chain,
agreement of final samples drawn from the same seeds (PSNR/SSIM), and distribution metrics of both
sample sets against real data (FID with bootstrap CI, KID ± std, IS, precision/recall), with the FP
model's own numbers beside them as the yardstick for "within sampling noise".
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .step_error import SSIM_WINDOW, per_timestep_error, sample_agreement, ssim_window  # noqa: E402
from .distributed import is_main_process  # noqa: E402
from .errors import QtoolkitError  # noqa: E402
from .evaluation import (FEATURE_NETWORKS, describe_adaptation, evaluate_images, feature_extractor,  # noqa: E402
                         load_reference)
from .graph.listing import counts_line  # noqa: E402
from .images import load_samples, save_grid, save_samples  # noqa: E402
from .io import atomic_write_text  # noqa: E402
from .models.loading import DiffusionModel  # noqa: E402
from .progress import timed  # noqa: E402
from .metrics import embed_images  # noqa: E402
from .metrics.inception import WEIGHTS_FILENAME, cached_weights_path  # noqa: E402
from .sampling import NoisePredictor, make_scheduler, sample, unet_predictor  # noqa: E402

CACHE_DIR = Path.home() / ".cache" / "qtoolkit" / "fp-samples"
# A model folder may ship its FP samples for the report's settings (the bundled model does): a fresh clone
# then need not spend minutes drawing them. The JSON says exactly which samples the .npz holds.
SHIPPED_SAMPLES = "fp_samples.json"
REFERENCE = "fmnist-test"
# What every report computes, whatever the model: the views that need nothing but the two networks.
ALWAYS_COMPUTED = "per-step SQNR and PSNR/SSIM against FP"


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


@dataclass(frozen=True)
class ReportPlan:
    """What a report computes for one model, decided before any work.

    sample_shape: the model's images (C, H, W). metrics: whether FID/KID/IS/precision/recall are computed
    (against `reference`, a description of the reference set as the metrics see it; None when skipped).
    notes: one line for every view skipped or adapted, and why. The per-step SQNR and PSNR/SSIM against FP
    are always computed.
    """

    sample_shape: tuple[int, int, int]
    metrics: bool
    reference: str | None
    notes: tuple[str, ...]


def _metrics_obstacle(channels: int, settings: ReportSettings) -> str | None:
    """Why the distribution metrics cannot be computed for this model and these settings, or None."""
    if channels != 1:
        return (f"the model draws {channels}-channel images and the reference set (Fashion-MNIST) has 1 channel, "
                "so no feature network compares them meaningfully")
    if settings.num < 2:
        return f"they need at least 2 samples per model, and report.num is {settings.num}"
    if settings.features == "inception":
        if importlib.util.find_spec("pytorch_fid") is None:
            return ("InceptionV3 features need the pytorch-fid package (`pip install -c constraints.txt pytorch-fid`); "
                    "or use the classifier features")
        if not cached_weights_path().is_file():
            return f"InceptionV3 features need their weights file {cached_weights_path()} (fetch {WEIGHTS_FILENAME} " \
                   "from pytorch-fid's releases); or use the classifier features"
    try:
        load_reference(REFERENCE, num=2, data_root=settings.data_root)
    except QtoolkitError as e:
        return f"the reference set cannot be read: {e}"
    return None


def plan_report(model: DiffusionModel, settings: ReportSettings) -> ReportPlan:
    """Decide what the report can compute for `model` (cheap: no sampling). Bad settings raise QtoolkitError;
    views that cannot be computed for this model become notes."""
    make_scheduler(settings.scheduler, model.scheduler_config, settings.steps)  # checks scheduler and steps
    if settings.features not in FEATURE_NETWORKS:
        raise QtoolkitError(f"report.features is {settings.features!r}: use "
                            f"{' or '.join(map(repr, FEATURE_NETWORKS))}")
    for field, least in (("num", 1), ("error_num", 1), ("bootstrap", 0)):
        if getattr(settings, field) < least:
            raise QtoolkitError(f"report.{field} must be at least {least}, got {getattr(settings, field)}")
    shape = tuple(model.sample_shape)
    channels, size = shape[0], shape[-1]
    notes = []
    if ssim_window(size, size) < SSIM_WINDOW:
        notes.append(f"SSIM uses a {ssim_window(size, size)}x{ssim_window(size, size)} window: the model's "
                     f"{size}x{size} images are smaller than the usual {SSIM_WINDOW}x{SSIM_WINDOW}")
    obstacle = _metrics_obstacle(channels, settings)
    if obstacle is not None:
        notes.append(f"FID/KID/IS/precision/recall skipped: {obstacle}; {ALWAYS_COMPUTED} are computed")
        return ReportPlan(shape, False, None, tuple(notes))
    adaptation = describe_adaptation(size) if settings.features == "classifier" else None
    if adaptation is not None:
        notes.append(f"the model draws {size}x{size} images: {adaptation}; FP and quantized are measured alike, "
                     "but the metrics are not comparable with figures measured at 32x32")
    return ReportPlan(shape, True, f"Fashion-MNIST test split at {size}x{size}", tuple(notes))


def _model_digest(model: DiffusionModel) -> str:
    """Weights, sample shape and schedule (the scheduler config decides e.g. x_0 clipping): what the FP samples
    depend on. The shape counts: two UNets with the same weights can differ in sample_size."""
    h = hashlib.sha256(json.dumps([model.scheduler_config, list(model.sample_shape)], sort_keys=True,
                                  default=str).encode())
    # The conditioning too (a conditional model's samples depend on it); none for an unconditional one.
    for name, tensor in [*sorted(model.unet.state_dict().items()), *sorted(model.conditioning.items())]:
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _serves(held: dict, wanted: dict, deterministic: bool) -> bool:
    """Do samples drawn with the settings `held` (including "num") serve a request for `wanted`? Sample i depends
    only on (seed, i) for a deterministic sampler, so a larger set serves a smaller request as its first ones."""
    if any(held.get(key) != value for key, value in wanted.items() if key != "num"):
        return False
    return held.get("num") == wanted["num"] or (deterministic and held.get("num", 0) > wanted["num"])


def _draw_settings(model: DiffusionModel, settings: ReportSettings, batch_size: int) -> dict:
    """Everything the FP samples depend on."""
    return {"model_digest": _model_digest(model), "scheduler": settings.scheduler, "steps": settings.steps,
            "seed": settings.seed, "batch_size": batch_size, "num": settings.num}


def shipped_fp_samples(model: DiffusionModel, wanted: dict, deterministic: bool) -> torch.Tensor | None:
    """The samples a model folder ships (SHIPPED_SAMPLES) if they are the ones `wanted` describes, else None."""
    description = Path(model.path) / SHIPPED_SAMPLES
    if not description.is_file():
        return None
    held = json.loads(description.read_text())
    if not _serves(held, wanted, deterministic):
        return None
    return load_samples(description.parent / held["file"])[0][:wanted["num"]]


def ship_fp_samples(model: DiffusionModel, settings: ReportSettings, batch_size: int = 256) -> Path:
    """Store the FP samples for `settings` in the model's folder (SHIPPED_SAMPLES and its .npz), where
    `fp_samples` finds them on any machine; returns the description's path."""
    x = fp_samples(model, settings, batch_size)
    folder = Path(model.path)
    described = {**_draw_settings(model, settings, batch_size), "file": SHIPPED_SAMPLES.replace(".json", ".npz"),
                 "drawn_by": "qtoolkit.sampling.sample(model, scheduler, steps, num, seed, batch_size) in float32 "
                             f"with torch {torch.__version__} on {torch.get_num_threads()} CPU threads",
                 "model_digest_of": "the UNet's state dict, its sample shape and the scheduler config (qtoolkit.report._model_digest)"}
    save_samples(folder / described["file"], x, described, compress=True)
    atomic_write_text(folder / SHIPPED_SAMPLES, json.dumps(described, indent=2) + "\n")
    return folder / SHIPPED_SAMPLES


def fp_samples(model: DiffusionModel, settings: ReportSettings, batch_size: int = 256) -> torch.Tensor:
    """The FP model's samples for these settings: the ones the model folder ships, or else cached on disk, so
    that every report and study run reuses them (a cached larger set serves a smaller request when the
    sampler is deterministic; e.g. the model card's 2,000 serve a report's 500)."""
    wanted = _draw_settings(model, settings, batch_size)
    deterministic = settings.scheduler != "ddpm"
    shipped = shipped_fp_samples(model, wanted, deterministic)
    if shipped is not None:
        return shipped
    prefix = f"{wanted['model_digest']}-{settings.scheduler}{settings.steps}-s{settings.seed}-b{batch_size}"
    for path in CACHE_DIR.glob(f"{prefix}-n*.npz"):
        if _serves({**wanted, "num": int(path.stem.rsplit("-n", 1)[1])}, wanted, deterministic):
            return load_samples(path)[0][:settings.num]
    x = sample(model, settings.scheduler, settings.steps, settings.num, settings.seed, batch_size)
    if is_main_process():  # under torchrun every process drew its share and holds them all
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


# The keys of compare_to_fp's results that are not candidates.
RESULT_KEYS = ("settings", "plan", "notes", "per_timestep", "fp", "quantized_ops", "seconds")


def candidate_results(results: dict) -> dict:
    """The candidates' entries of compare_to_fp's results, by name."""
    return {name: r for name, r in results.items() if name not in RESULT_KEYS}


def compare_to_fp(model: DiffusionModel, candidates: dict[str, NoisePredictor], settings: ReportSettings,
                  out: Path, sampled: set[str] | None = None, plan: ReportPlan | None = None) -> dict:
    """Every view `plan` (default: `plan_report(model, settings)`) allows, for every candidate against the FP
    model; figures go to `out`. The results hold the plan's notes and any found on the way (a candidate whose
    samples hold NaN/inf), so a report written from them says what was not computed.

    Candidates not in `sampled` (default: all are) get only the per-timestep view, a cheap screen
    without sampling or FID. Under torchrun every process must call it; rank 0 gets the results, the others {}.
    """
    plan = plan or plan_report(model, settings)
    out.mkdir(parents=True, exist_ok=True)
    # Under torchrun the samples are drawn by all processes (qtoolkit.sampling.sample shares the batches out);
    # rank 0, alone, runs the per-step error (one batch of chains: splitting it would change the batch it runs
    # at) while the others start on their share of the samples, and computes the metrics.
    main = is_main_process()
    fp = unet_predictor(model.denoiser())
    seconds: dict = {}  # each part's wall time: the job's stage table (qtoolkit run's stages.json)
    if main:
        with timed(seconds, "per_step_error"):
            errors = per_timestep_error(model, fp, candidates, scheduler=settings.scheduler, steps=settings.steps,
                                        num=settings.error_num, seed=settings.seed + 1)
        plot_per_timestep(errors, out / "per_timestep_sqnr.png",
                          f"per-step error on {settings.error_num} held-out {settings.scheduler}-{settings.steps} chains")
    notes = list(plan.notes)
    metrics = _metrics_of(plan, settings)
    with timed(seconds, "fp_samples"):
        fp_x = fp_samples(model, settings)
    if not main:
        for name, eps in candidates.items():
            if sampled is None or name in sampled:
                sample(model, settings.scheduler, settings.steps, settings.num, settings.seed, eps=eps)
        return {}
    with timed(seconds, "fp_metrics"):
        fp_metrics = metrics(fp_x) if metrics else None
    results = {"settings": asdict(settings), "plan": asdict(plan), "notes": notes, "per_timestep": errors,
               "fp": {"metrics": fp_metrics}, "seconds": seconds}
    save_grid(fp_x[:64], out / "samples_fp.png")
    for name, eps in candidates.items():
        sqnr = np.array(errors[name]["sqnr_db"])
        results[name] = {"metrics": None, "agreement": None,
                         "sqnr_db_mean": float(np.mean(sqnr)), "sqnr_db_min": float(np.min(sqnr))}
        if sampled is None or name in sampled:
            with timed(seconds, f"samples {name}"):
                q_x = sample(model, settings.scheduler, settings.steps, settings.num, settings.seed, eps=eps)
            save_grid(q_x[:64], out / f"samples_{name.replace(' ', '_')}.png")
            if not torch.isfinite(q_x).all():
                notes.append(f"{name}: its samples hold NaN/inf (the quantized model diverged): sample metrics and "
                             "PSNR/SSIM against FP skipped")
                continue
            with timed(seconds, f"metrics {name}"):
                results[name]["metrics"] = metrics(q_x) if metrics else None
            results[name]["agreement"] = sample_agreement(fp_x, q_x)
    return results


def _metrics_of(plan: ReportPlan, settings: ReportSettings):
    """images -> distribution metrics against the plan's reference, or None when the plan skips them."""
    if not plan.metrics:
        return None
    size = plan.sample_shape[-1]
    extractor = feature_extractor(settings.features, resolution=size)
    reference = load_reference(REFERENCE, data_root=settings.data_root, size=size)

    @functools.cache  # the reference's features, computed on the first call: every candidate compares with them
    def embedded_reference():
        return embed_images(reference, extractor)

    return lambda images: evaluate_images(images, embedded_reference(), extractor, settings.bootstrap, settings.seed)


def within_fp_noise(fp: dict, q: dict) -> dict:
    """Is the quantized model's FID inside the FP model's bootstrap interval (None: no interval was drawn), and
    its KID within 2 std?"""
    fid_ok = None if fp["fid_ci_low"] is None else \
        fp["fid_ci_low"] <= q["fid"] <= fp["fid_ci_high"] or q["fid"] <= fp["fid"]
    kid_ok = abs(q["kid_mean"] - fp["kid_mean"]) <= 2 * max(fp["kid_std"], q["kid_std"])
    return {"fid": None if fid_ok is None else bool(fid_ok), "kid": bool(kid_ok)}


def _verdict(name: str, verdict: dict) -> str:
    fid = {True: "within", False: "OUTSIDE", None: "not tested against"}[verdict["fid"]]
    return (f"{name}: FID {fid} the FP bootstrap interval; "
            f"KID {'within' if verdict['kid'] else 'OUTSIDE'} 2 std of FP.")


def write_report(results: dict, out: Path, title: str, command: str, quantized_ops: dict | None = None) -> str:
    """report.json plus a Markdown summary (returned, for the console), with every note of what was skipped
    or adapted. quantized_ops: qtoolkit.graph.listing.quantization_listing of the quantized model, written to
    report.json as "quantized_ops" and counted in the summary; None (a float run) writes neither."""
    s, plan = results["settings"], results["plan"]
    fp = results["fp"]["metrics"]
    reference = f"features: {s['features']}, reference: {plan['reference']}" if plan["metrics"] else \
        "distribution metrics skipped (see the notes)"
    lines = [f"# {title}", "", f"Command: `{command}`", "",
             f"{s['num']} samples per model, {s['scheduler']}-{s['steps']}, seeds from {s['seed']}, {reference}.", "",
             COMPARISON_HEADER, comparison_row("FP", fp, None, None)]
    for name, r in candidate_results(results).items():
        lines.append(comparison_row(name, r["metrics"], r["agreement"], (r["sqnr_db_mean"], r["sqnr_db_min"])))
        if r["metrics"] is None or fp is None:
            continue
        r["within_fp_noise"] = within_fp_noise(fp, r["metrics"])
        lines += ["", _verdict(name, r["within_fp_noise"])]
    if quantized_ops is not None:
        results["quantized_ops"] = quantized_ops
        lines += ["", f"{len(quantized_ops['ops'])} quantizable ops ({counts_line(quantized_ops)}); each with its "
                      "scales or float rule in report.json's quantized_ops."]
        groups = quantized_ops.get("timestep_groups")
        if groups is not None:
            lines += ["", f"Activations quantized per timestep group: {groups['groups']} groups ({groups['rule']}), "
                          f"boundaries at t = {', '.join(map(str, groups['boundaries']))}."]
    if results["notes"]:
        lines += ["", "Notes:", *(f"- {note}" for note in results["notes"])]
    lines += ["", "![per-step SQNR](per_timestep_sqnr.png)", ""]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "report.md", text)
    return text


COMPARISON_HEADER = (
    "| model | FID [95% CI] | KID (± std) | IS | precision | recall | PSNR vs FP (dB) | SSIM vs FP | pixel shift vs FP "
    "| step SQNR mean / min (dB) |\n"
    "|---|---|---|---|---|---|---|---|---|---|")


def _cell(spec: str, *values) -> str:
    """`spec` formatted with `values`, or '-' when one was not measured (None)."""
    return "-" if any(v is None for v in values) else spec.format(*values)


def comparison_row(name: str, m: dict | None, agreement: dict | None, sqnr: tuple[float, float] | None) -> str:
    """One table row; any view not measured for this model shows as '-'."""
    m, agreement = m or {}, agreement or {}
    fid = _cell("{:.4g}", m.get("fid"))
    if m.get("fid_ci_low") is not None:
        fid += _cell(" [{:.4g}, {:.4g}]", m["fid_ci_low"], m["fid_ci_high"])
    cells = [fid, _cell("{:.3g} ± {:.2g}", m.get("kid_mean"), m.get("kid_std")), _cell("{:.2f}", m.get("is_mean")),
             _cell("{:.3f}", m.get("precision")), _cell("{:.3f}", m.get("recall")),
             _cell("{:.1f}", agreement.get("psnr_db_mean")), _cell("{:.3f}", agreement.get("ssim_mean")),
             _cell("{:+.4f}", agreement.get("mean_shift")),
             _cell("{:.1f} / {:.1f}", *(sqnr or (None, None)))]
    return "| " + " | ".join([name, *cells]) + " |"
