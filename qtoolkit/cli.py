"""The `qtoolkit` command line: one subcommand per job, each a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .distributed import init_from_env, shutdown
from .engines import ENGINES, FLOAT_PRECISIONS
from .errors import QtoolkitError


def _add_train(sub):
    from .training.ddpm import TrainConfig

    p = sub.add_parser("train", help="train (or resume) the bundled Fashion-MNIST DDPM")
    d = TrainConfig()
    p.add_argument("--out", type=Path, default=Path("runs/train-fmnist-ddpm"), help="run folder; an existing one is resumed")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps to reach")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in plain fp32 (bf16 autocast is the default)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--data-root", default=None, help="folder of the Fashion-MNIST IDX files")

    def run(a):
        from .training.ddpm import train_ddpm

        cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                          checkpoint_every=a.checkpoint_every, bf16=a.bf16, device=a.device)
        print(f"EMA model written to {train_ddpm(a.out, cfg, a.data_root)}")
    p.set_defaults(run=run)


def _add_train_classifier(sub):
    p = sub.add_parser("train-classifier", help="train the Fashion-MNIST feature classifier used by `eval`")
    p.add_argument("--out", type=Path, default=Path("runs/fmnist-classifier"))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--overwrite", action="store_true")

    def run(a):
        from .training.classifier import train_classifier

        acc = train_classifier(a.out, epochs=a.epochs, seed=a.seed, data_root=a.data_root, overwrite=a.overwrite)
        print(f"test accuracy {acc:.4f}; classifier written to {a.out}")
    p.set_defaults(run=run)


def _add_sample(sub):
    p = sub.add_parser("sample", help="draw samples: a PNG grid and an .npz of the raw samples")
    p.add_argument("--model", default="fmnist-ddpm", help="bundled name or a diffusers model folder")
    p.add_argument("--scheduler", default="ddim", choices=["ddpm", "ddim", "dpm-solver"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--engine", default="torch", choices=["torch", *ENGINES],
                   help="torch runs a model folder; openvino and onnxruntime run a folder written by `qtoolkit export`")
    p.add_argument("--threads", type=int, default=None, help="threads of the openvino / onnxruntime engine "
                   "(default: the engine's own choice)")
    p.add_argument("--float-precision", default="fp32", choices=FLOAT_PRECISIONS, help="what the engine runs the "
                   "graph's unquantized parts in (GroupNorm, SiLU, softmax, adds): bf16 is faster on CPUs with bf16 "
                   "support and a little less accurate (--engine openvino only)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")

    def run(a):
        from .distributed import is_main_process, rank_and_world
        from .images import save_grid, save_samples
        from .io import atomic_dir, check_new_output
        from .sampling import make_scheduler, sample

        if a.num < 1:
            raise QtoolkitError(f"--num must be at least 1, got {a.num}")
        model, eps = _model_and_predictor(a.model, a.engine, a.threads, a.float_precision)
        make_scheduler(a.scheduler, model.scheduler_config, a.steps)  # validates before any work
        check_new_output(a.out, a.overwrite)
        t0 = time.perf_counter()
        x = sample(model, a.scheduler, a.steps, a.num, a.seed, a.batch_size, eps=eps)
        seconds = time.perf_counter() - t0
        if not is_main_process():  # under torchrun, rank 0 writes what all ranks drew
            return
        meta = {"model": str(a.model), "engine": a.engine, "float_precision": a.float_precision,
                "scheduler": a.scheduler, "steps": a.steps, "num": a.num,
                "seed": a.seed, "batch_size": a.batch_size, "processes": rank_and_world()[1],
                "seconds": round(seconds, 1)}
        with atomic_dir(a.out, a.overwrite) as tmp:
            save_samples(tmp / "samples.npz", x, meta)
            save_grid(x[:64], tmp / "grid.png")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{a.num} samples in {seconds:.1f} s -> {a.out}/samples.npz, {a.out}/grid.png")
    p.set_defaults(run=run)


def _model_and_predictor(model_arg: str, engine: str, threads: int | None, float_precision: str):
    """What `sample` draws from: a model folder on torch, or an exported folder on an int8 engine."""
    from .export import is_exported_folder, load_exported
    from .models import load_diffusion_model

    if engine == "torch":
        if threads is not None:
            raise QtoolkitError("--threads sets the threads of --engine openvino or onnxruntime; the torch engine "
                              "follows OMP_NUM_THREADS")
        if float_precision != "fp32":
            raise QtoolkitError(f"--float-precision {float_precision} sets the float parts of an exported graph on "
                              "--engine openvino; the torch engine runs the model as it is")
        if is_exported_folder(model_arg):
            raise QtoolkitError(f"{model_arg} holds an exported ONNX graph: sample it with --engine "
                              f"{' or --engine '.join(ENGINES)}")
        return load_diffusion_model(model_arg), None
    if not is_exported_folder(model_arg):
        raise QtoolkitError(f"--engine {engine} runs a folder written by `qtoolkit export`, and {model_arg} is not one: "
                          f"run `qtoolkit export --model {model_arg} --format onnx --out EXPORTED` first")
    from .engines import load_engine

    exported = load_exported(model_arg)
    return exported, load_engine(engine, exported.onnx_file, threads, float_precision)


def _add_export(sub):
    p = sub.add_parser("export", help="export a (quantized) model to ONNX with its own int8 scales, for the engines")
    p.add_argument("--model", required=True, help="a `qtoolkit quantize` run folder, a quantized or FP model folder")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="onnx: QuantizeLinear/DequantizeLinear graph")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")

    def run(a):
        from .export import export_model
        from .io import check_new_output
        from .models import load_diffusion_model

        check_new_output(a.out, a.overwrite)
        t0 = time.perf_counter()
        description = export_model(load_diffusion_model(a.model), a.out, a.overwrite)
        quantization = description["quantization"]
        what = "FP32 graph" if quantization is None else (
            f"int8 QDQ graph of {quantization['quantized_layers']} quantized layers "
            f"({description['quantize_linear_nodes']} QuantizeLinear, {description['dequantize_linear_nodes']} "
            "DequantizeLinear)")
        print(f"{what} written to {a.out} in {time.perf_counter() - t0:.0f} s; "
              f"sample it with `qtoolkit sample --model {a.out} --engine openvino`")
    p.set_defaults(run=run)


def _add_bench(sub):
    from .engines.benchmark import add_arguments

    p = sub.add_parser("bench", help="time qtoolkit's int8 engines against FP32 and the peers' recipes (UNet forward, "
                       "per-step SQNR, DDIM sampling)")
    p.add_argument("--model", required=True, help="a model quantized by `qtoolkit quantize` (run folder or model/)")
    p.add_argument("--calibration", type=Path, default=None, help="the calibration set the peers calibrate on "
                   "(default: calibration/ of the `qtoolkit quantize` run folder)")
    p.add_argument("--fp-model", default=None, help="the full-precision model it was quantized from: the FP32 "
                   "reference and what the peers quantize (default: the base model its run folder's ptq.json names)")
    add_arguments(p)

    def run(a):
        from .calibration import CalibrationSet
        from .engines.benchmark import format_tables, run_benchmark, settings_from_args
        from .io import atomic_write_text
        from .models import load_diffusion_model

        settings = settings_from_args(a)
        model = load_diffusion_model(a.model)
        calibration = None
        if settings.peers:
            # A run folder holds model/ and calibration/ side by side; --model may name either level.
            found = [d / "calibration" for d in (Path(a.model), model.path.parent) if (d / "calibration").is_dir()]
            folder = a.calibration or next(iter(found), None)
            if folder is None:
                raise QtoolkitError(f"no calibration set beside {a.model} for the peers to calibrate on: pass "
                                  "--calibration DIR (a `qtoolkit quantize` run's calibration/), or --peers alone "
                                  "to compare with FP32 only")
            calibration = CalibrationSet.load(folder)
        fp_model = load_diffusion_model(a.fp_model or _base_model_of(a.model, model.path))
        result = run_benchmark(model, settings, a.work, calibration, fp_model.unet)
        print(format_tables(result))
        if a.json:
            atomic_write_text(a.json, json.dumps(result, indent=2) + "\n")
    p.set_defaults(run=run)


def _base_model_of(model_arg: str, model_path: Path) -> str:
    """The FP model a `qtoolkit quantize` run started from, as its ptq.json records it (beside model/)."""
    from .models.loading import BUNDLED

    records = [d / "ptq.json" for d in (Path(model_arg), model_path.parent) if (d / "ptq.json").is_file()]
    if not records:
        raise QtoolkitError(f"no ptq.json beside {model_arg} says which full-precision model it was quantized from: "
                          "pass --fp-model (a bundled name or a model folder)")
    base = json.loads(records[0].read_text()).get("base_model")
    if not base or not (base in BUNDLED or Path(base).exists()):
        raise QtoolkitError(f"{records[0]} names the full-precision model {base!r}, which is not on this machine: "
                          "pass --fp-model (a bundled name or a model folder)")
    return base


def _add_eval(sub):
    p = sub.add_parser("eval", help="FID, KID, IS and precision/recall of a sample set against a reference set")
    p.add_argument("samples", type=Path, help="folder written by `qtoolkit sample`, or its samples.npz")
    p.add_argument("--reference", default="fmnist-test",
                   help="fmnist-test, fmnist-train, or another sample folder/.npz (default: the Fashion-MNIST test split)")
    p.add_argument("--features", default="classifier", choices=["classifier", "inception"],
                   help="embedding: the bundled Fashion-MNIST classifier, or InceptionV3 (pytorch-fid weights)")
    p.add_argument("--classifier", default="fmnist-classifier", help="classifier folder for --features classifier")
    p.add_argument("--inception-weights", type=Path, default=None, help="local pt_inception-2015-12-05-*.pth")
    p.add_argument("--num-reference", type=int, default=None, help="use the first N reference images (default: all)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the FID interval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")

    def run(a):
        from .evaluation import evaluate_samples

        results = evaluate_samples(a.samples, reference=a.reference, features=a.features, classifier=a.classifier,
                                   inception_weights=a.inception_weights, num_reference=a.num_reference,
                                   bootstrap=a.bootstrap, seed=a.seed, data_root=a.data_root)
        from .metrics import format_table
        print(format_table(results))
        if a.json:
            from .io import atomic_write_text
            atomic_write_text(a.json, json.dumps(results, indent=2) + "\n")
    p.set_defaults(run=run)


def _bits(text: str) -> int | None:
    """A bit width on the command line: an integer, or "off" (full precision)."""
    if text.lower() in ("off", "none", "fp", "32"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a bit width: use 2..8 or 'off'") from None


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, e.g. preset=reference-code or loc=0.6")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_quantize(sub):
    p = sub.add_parser("quantize", help="post-training quantization: calibrate, freeze, save, report")
    p.add_argument("--model", default="fmnist-ddpm")
    p.add_argument("--wbits", type=_bits, default=8, help="weight bits 2..8 or 'off' (default 8)")
    p.add_argument("--abits", type=_bits, default=8, help="activation bits 2..8 or 'off' (default 8)")
    p.add_argument("--config", type=Path, default=None,
                   help="QuantConfig JSON (observers, granularity, include/exclude...); --wbits/--abits override it")
    p.add_argument("--exclude", nargs="*", default=None, help="layer name patterns kept in full precision "
                   "(default: the timestep-embedding path, conv_in, conv_out and the 1x1 conv_shortcut layers; "
                   "with --split-shortcuts the shortcuts are quantized)")
    p.add_argument("--quantize-attention", action="store_true", help="also quantize the Q.K^T and softmax.V operands")
    p.add_argument("--quantize-conv-outputs", action="store_true", help="also quantize convolution outputs and "
                   "biases (int32), so that ONNX Runtime runs the exported convolutions in int8 (QLinearConv)")
    p.add_argument("--split-shortcuts", action="store_true", help="Q-Diffusion's shortcut splitting: the decoder's "
                   "skip-concatenation shortcuts get one input range for their own features and one for the skip")
    p.add_argument("--reconstruct", choices=["block", "layer"], default=None,
                   help="after calibration, learn the weights' rounding: block = BRECQ (as in Q-Diffusion), "
                   "layer = AdaRound layer by layer (default: round to nearest)")
    p.add_argument("--recon-iters", type=int, default=1000, help="reconstruction iterations per block/layer")
    p.add_argument("--recon-samples", type=int, default=256, help="calibration inputs used by reconstruction")
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=True,
                   help="after calibration (and reconstruction), shift every layer's bias so that its output's "
                   "channel means match the FP model's on the calibration inputs (default: on)")
    p.add_argument("--bias-samples", type=int, default=256, help="calibration inputs used by bias correction")
    p.add_argument("--calib", default="ndtc", help="calibration strategy: ndtc, uniform, random, last-step, real-data")
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--calib-scheduler", default="ddim", choices=["ddpm", "ddim", "dpm-solver"])
    p.add_argument("--calib-steps", type=int, default=100, help="steps of the FP chain calibration inputs come from")
    p.add_argument("--calib-param", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="strategy parameter, repeatable: e.g. preset=reference-code, loc=0.6, shape=-2")
    p.add_argument("--seed", type=int, default=0, help="calibration seed")
    p.add_argument("--calib-from", type=Path, default=None, metavar="DIR",
                   help="reuse a saved calibration set (another run's calibration/) instead of the --calib options")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip the comparison with FP")
    p.add_argument("--eval-num", type=int, default=500, help="samples per model in the report")
    p.add_argument("--eval-steps", type=int, default=100)
    p.add_argument("--eval-scheduler", default="ddim", choices=["ddpm", "ddim", "dpm-solver"])
    p.add_argument("--data-root", default=None)

    def run(a):
        from .models import load_diffusion_model
        from .ptq import CalibrationSettings, run_ptq, strategy_of
        from .quant import QuantConfig, ReconstructionSettings
        from .quant.reconstruction import METHOD_NAMES
        from .report import ReportSettings, compare_to_fp, write_report
        from .sampling import make_scheduler, unet_predictor

        text = a.config.read_text() if a.config else "{}"
        QuantConfig.from_json(text)  # the file's own errors first, reported as such
        base = json.loads(text)  # as written: keys it leaves out take their defaults after the overrides
        overrides = {"weight_bits": a.wbits, "activation_bits": a.abits}
        if a.exclude is not None:
            overrides["exclude"] = a.exclude
        if a.quantize_attention:
            overrides["quantize_attention_matmuls"] = True
        if a.quantize_conv_outputs:
            overrides["quantize_conv_outputs"] = True
        if a.split_shortcuts:
            overrides["split_shortcuts"] = True
        config = QuantConfig.from_dict({**base, **overrides})
        calib = CalibrationSettings(strategy=a.calib, size=a.calib_size, scheduler=a.calib_scheduler,
                                    steps=a.calib_steps, seed=a.seed, params=dict(a.calib_param),
                                    source=None if a.calib_from is None else str(a.calib_from))
        reconstruction = None if a.reconstruct is None else ReconstructionSettings(
            granularity=a.reconstruct, iterations=a.recon_iters, samples=a.recon_samples, seed=a.seed)
        if reconstruction is not None and config.weight_bits is None:
            raise QtoolkitError("--reconstruct learns the rounding of quantized weights: it needs --wbits (e.g. 8 or 4)")
        model = load_diffusion_model(a.model)
        if a.report:
            make_scheduler(a.eval_scheduler, model.scheduler_config, a.eval_steps)
            if a.eval_num < 2:
                raise QtoolkitError(f"--eval-num must be at least 2, got {a.eval_num}")
        t0 = time.perf_counter()
        qunet, calibration = run_ptq(model, config, calib, a.out, reconstruction=reconstruction,
                                     bias_correction=a.bias_samples if a.bias_correction else None,
                                     overwrite=a.overwrite, data_root=a.data_root)
        print(f"quantized model written to {a.out}/model in {time.perf_counter() - t0:.0f} s")
        if reconstruction is not None:
            units = json.loads((a.out / "ptq.json").read_text())["reconstruction"]["units"]
            improved = sum(u["mse_learned"] < u["mse_nearest"] for u in units)
            print(f"reconstruction ({a.reconstruct}): learned rounding lowered the output error of {improved} of "
                  f"{len(units)} units against round-to-nearest (per unit in {a.out}/ptq.json)")
        if a.report:
            settings = ReportSettings(scheduler=a.eval_scheduler, steps=a.eval_steps, num=a.eval_num, data_root=a.data_root)
            name = f"W{a.wbits or 'fp'}A{a.abits or 'fp'}-{strategy_of(calibration)}"
            if reconstruction is not None:
                name += f"-{METHOD_NAMES[a.reconstruct]}"
            if a.bias_correction:
                name += "-bc"
            results = compare_to_fp(model, {name: unet_predictor(qunet)}, settings, a.out)
            print(write_report(results, a.out, f"qtoolkit report: {name} on {a.model}", " ".join(["qtoolkit", *a.argv])))
    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtoolkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_train_classifier, _add_sample, _add_eval, _add_quantize, _add_export, _add_bench):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="qtoolkit: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:  # `torchrun ... -m qtoolkit.cli -- sample --num 8`: the `--` keeps torchrun off our options
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    args.argv = argv  # reports quote the command that made them
    try:
        init_from_env()
        args.run(args)
    except QtoolkitError as e:
        print(f"qtoolkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qtoolkit: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
