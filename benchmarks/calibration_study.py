"""The PTQ4DM calibration study on the bundled model: which calibration inputs give the best quantized model?

For every calibration strategy (same budget: --calib-size inputs, same FP chain settings) and every
bit-width pair, the model is quantized, calibrated and frozen, then compared with the FP model through
`qtoolkit.report.compare_to_fp`: per-timestep noise-prediction SQNR on held-out chains, PSNR/SSIM of
same-seed samples, and FID (bootstrap CI) / KID (± std) / IS against the Fashion-MNIST test split.
Calibration sets are made once per (strategy, seed), saved under --out/calibration/ and reused across bit
widths and by a re-run with the same --out (a study that was cut off resumes there); FP samples are cached.
With --rounding METHOD (a rounding method plugin, e.g. brecq or adaround), every quantized model also gets a
row with that rounding learned on its calibration set; with --bias-correction, a row with bias correction on
its calibration set (after the rounding, if any); with --bias-per-group, a row with bias correction per timestep group
(+bcg, for the models with timestep groups). --inputs-per-chain K takes up to K calibration inputs from
each FP chain (about K times cheaper; compare K = 1 and K = 4 to see what it costs in quality). --quant KEY=VALUE sets a QuantConfig field for every
model (e.g. quantize_conv_outputs=true, overflow_fix=none); --calib-param KEY=VALUE a strategy parameter (e.g.
preset=paper); --scheduler the sampler of the calibration chains and of evaluation (ddim or ddpm).
--timestep-groups G[:RULE] ... quantizes every model once per entry, with G timestep groups whose boundaries the
rule places (QuantConfig.timestep_groups / timestep_boundaries; default 1: one scale for every timestep), all on the
same calibration set: e.g. --timestep-groups 1 4:even 8:even 4:min-step 8:min-step.
Writes study.md (the table), study.json and one folder of figures per bit width to --out.

    python benchmarks/calibration_study.py --out runs/study
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from pathlib import Path

from qtoolkit.calibration import CalibrationSet
from qtoolkit.graph import copy_graph
from qtoolkit.io import atomic_write_text
from qtoolkit.models import load_diffusion_model
from qtoolkit.ptq import (CalibrationSettings, RoundingSettings, check_ptq, make_calibration_set, num_train_timesteps,
                          observe_calibration_set, quantized_graph, round_on_calibration)
from qtoolkit.graph.bias_correction import correct_bias
from qtoolkit.quant import QuantConfig
from qtoolkit.report import COMPARISON_HEADER, ReportSettings, candidate_results, compare_to_fp, comparison_row
from qtoolkit.sampling import unet_predictor

STRATEGIES = ["ndtc", "uniform", "random", "first-n", "real-data"]


def parse_bits(text: str) -> tuple[int | None, int | None]:
    """W8A8, W4A8, ...; "fp" keeps that side in full precision (W8Afp: weights only)."""
    w, a = text.upper().lstrip("W").split("A")
    return tuple(None if bits == "FP" else int(bits) for bits in (w, a))


def parse_param(text: str) -> tuple[str, object]:
    """KEY=VALUE, the value read as JSON when it is JSON (numbers, true/false), else as a string."""
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_groups(text: str) -> tuple[int, str]:
    """G or G:RULE (RULE a timestep boundary rule; default even)."""
    groups, _, rule = text.partition(":")
    return int(groups), rule or "even"


def groups_label(groups: int, rule: str) -> str:
    return "" if groups == 1 else f" G{groups}-{rule}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-ddpm")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--bits", nargs="+", default=["W8A8", "W8A6", "W6A6", "W4A8"])
    p.add_argument("--strategies", nargs="+", default=STRATEGIES)
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--inputs-per-chain", type=int, default=1, help="calibration inputs taken from one FP chain")
    p.add_argument("--steps", type=int, default=100, help="steps of the calibration chains and of evaluation")
    p.add_argument("--scheduler", default="ddim", help="sampler of the calibration chains and of evaluation")
    p.add_argument("--quant", type=parse_param, nargs="*", default=[], metavar="KEY=VALUE",
                   help="QuantConfig fields for every model, e.g. quantize_conv_outputs=true overflow_fix=none")
    p.add_argument("--calib-param", type=parse_param, nargs="*", default=[], metavar="KEY=VALUE",
                   help="the calibration strategy's parameters, e.g. preset=paper")
    p.add_argument("--eval-num", type=int, default=500)
    p.add_argument("--error-num", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="calibration seeds; all get the per-step SQNR, the first also samples + FID/KID/IS/PSNR")
    p.add_argument("--sample-bits", nargs="*", default=None,
                   help="bit widths that get samples + FID/KID/IS/PSNR (default: all); others get per-step SQNR only")
    p.add_argument("--sample-rows", nargs="*", default=None, metavar="ROW",
                   help="sample only these rows (names without bit widths and seed, e.g. 'ndtc+bc'); default all")
    p.add_argument("--rounding", default=None, metavar="METHOD",
                   help="also report each model after this rounding method (e.g. brecq, adaround)")
    p.add_argument("--rounding-param", type=parse_param, nargs="*", default=[], metavar="KEY=VALUE",
                   help="the rounding method's parameters, e.g. iterations=1000 (the seed is the calibration seed's)")
    p.add_argument("--bias-correction", action="store_true",
                   help="also report each model after bias correction (qtoolkit.quant.correct_bias)")
    p.add_argument("--bias-samples", type=int, default=256, help="calibration inputs used by bias correction")
    p.add_argument("--bias-per-group", action="store_true",
                   help="with timestep groups, also a row with bias correction per timestep group (+bcg)")
    p.add_argument("--timestep-groups", type=parse_groups, nargs="+", default=[(1, "even")], metavar="G[:RULE]",
                   help="timestep groups of the activation scales and their boundary rule, one model per entry")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    model = load_diffusion_model(a.model)
    settings = ReportSettings(scheduler=a.scheduler, steps=a.steps, num=a.eval_num, error_num=a.error_num)
    calib_settings = {(s, seed): CalibrationSettings(strategy=s, size=a.calib_size, scheduler=a.scheduler,
                                                     steps=a.steps, seed=seed, inputs_per_chain=a.inputs_per_chain,
                                                     params=dict(a.calib_param))
                      for s in a.strategies for seed in a.seeds}
    rounding = {seed: RoundingSettings(a.rounding, {**dict(a.rounding_param), "seed": seed}) for seed in a.seeds} \
        if a.rounding else {}
    def config_of(bits: str, groups: int, rule: str) -> QuantConfig:
        wbits, abits = parse_bits(bits)
        return QuantConfig(weight_bits=wbits, activation_bits=abits, timestep_groups=groups, timestep_boundaries=rule,
                           **dict(a.quant))

    for (strategy, seed), calib in calib_settings.items():  # every check before the first network call
        for bits in a.bits:
            for groups, rule in a.timestep_groups:
                check_ptq(model, config_of(bits, groups, rule), calib, rounding.get(seed),
                          a.bias_samples if a.bias_correction else None)
    calibration_sets = {key: stored_calibration_set(model, calib, a.out) for key, calib in calib_settings.items()}
    sample_bits = set(a.bits if a.sample_bits is None else a.sample_bits)
    results = {}
    for bits in a.bits:
        candidates = {}
        for ((strategy, seed), calibration), (groups, rule) in itertools.product(calibration_sets.items(),
                                                                                 a.timestep_groups):
            fp_graph, qgraph = quantized_graph(model, config_of(bits, groups, rule))
            observe_calibration_set(qgraph, fp_graph, calibration, num_train_timesteps(model))
            name = f"{bits} {strategy}{groups_label(groups, rule)}"
            candidates[f"{name} s{seed}"] = unet_predictor(qgraph)
            if a.rounding:
                qgraph = copy_graph(qgraph)
                round_on_calibration(qgraph, fp_graph, calibration, rounding[seed])
                name += f"+{a.rounding}"
                candidates[f"{name} s{seed}"] = unet_predictor(qgraph)
            if a.bias_correction:
                corrected = copy_graph(qgraph)
                correct_bias(corrected, fp_graph, (calibration.x, calibration.t), samples=a.bias_samples, seed=seed)
                candidates[f"{name}+bc s{seed}"] = unet_predictor(corrected)
            if a.bias_per_group and groups > 1:
                corrected = copy_graph(qgraph)
                correct_bias(corrected, fp_graph, (calibration.x, calibration.t), samples=a.bias_samples, seed=seed,
                             per_group=True)
                candidates[f"{name}+bcg s{seed}"] = unet_predictor(corrected)
        sampled = {name for name in candidates if name.endswith(f" s{a.seeds[0]}") and
                   (not a.sample_rows or name.removeprefix(f"{bits} ").rsplit(" s", 1)[0] in a.sample_rows)} \
            if bits in sample_bits else set()
        results[bits] = compare_to_fp(model, candidates, settings, a.out / bits, sampled=sampled)
        print(format_study(results), flush=True)

    seconds = time.perf_counter() - t_start
    command = shlex.join(["python", *sys.argv])
    text = (f"# Calibration study on {a.model}\n\nCommand: `{command}`\n\nWall time: {seconds / 60:.1f} min "
            f"(2-core CPU). Calibration: {a.calib_size} inputs per strategy, {a.scheduler.upper()}-{a.steps} chains, up to "
            f"{a.inputs_per_chain} input(s) per chain; evaluation: "
            f"{a.eval_num} {a.scheduler.upper()}-{a.steps} samples per model, per-step SQNR on {a.error_num} held-out chains.\n\n"
            f"{format_study(results)}\n")
    atomic_write_text(a.out / "study.md", text)
    atomic_write_text(a.out / "study.json", json.dumps({"command": command, "seconds": seconds, "results": results},
                                                       indent=2) + "\n")
    print(text)


def stored_calibration_set(model, settings: CalibrationSettings, out: Path) -> CalibrationSet:
    """The set from out/calibration/<strategy>-s<seed> when one made with these settings is there, else a new
    one, saved there."""
    params = "".join(f"-{key}-{value}" for key, value in sorted(settings.params.items()))
    folder = out / "calibration" / f"{settings.strategy}{params}-s{settings.seed}"
    if folder.is_dir():
        stored = CalibrationSet.load(folder)
        meta = stored.meta
        if (meta.get("strategy"), meta.get("num"), meta.get("seed"), meta.get("scheduler"), meta.get("inputs_per_chain", 1)) \
                == (settings.strategy, settings.size, settings.seed, {"kind": settings.scheduler, "steps": settings.steps},
                    settings.inputs_per_chain):
            print(f"reusing the calibration set in {folder}", flush=True)
            return stored
        raise SystemExit(f"{folder} holds a calibration set made with other settings: use another --out or remove it")
    calibration = make_calibration_set(model, settings)
    calibration.save(folder)
    return calibration


def format_study(results: dict) -> str:
    rows = [COMPARISON_HEADER]
    for i, per_bits in enumerate(results.values()):
        if i == 0:
            rows.append(comparison_row("FP", per_bits["fp"]["metrics"], None, None))
        for name, r in candidate_results(per_bits).items():
            rows.append(comparison_row(name, r["metrics"], r["agreement"], (r["sqnr_db_mean"], r["sqnr_db_min"])))
    return "\n".join(rows)


if __name__ == "__main__":
    main()
