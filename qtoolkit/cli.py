"""qtoolkit: post-training quantization of diffusion models, from a YAML recipe or from flags."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

# Only what the options and their help need is imported here, none of it torch: `qtoolkit --help` answers in
# well under a second (tests/test_cli.py checks that it imports no torch). Each command imports what it runs.
from . import plugins
from .bench_settings import BenchSettings, bench_options
from .errors import QtoolkitError
from .registry import KINDS
from .scheduler_names import SCHEDULER_CLASSES
from .training.config import TrainConfig

app = typer.Typer(name="qtoolkit", help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
recipe_app = typer.Typer(help="Show or check a recipe without running it.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

TORCH_ENGINE = "torch"
SCHEDULER_NAMES = ", ".join(SCHEDULER_CLASSES)

# Options several commands share, declared once.
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace an existing output folder")]
Resume = Annotated[bool, typer.Option("--resume", help="continue an interrupted run of the same recipe from the "
                                      "stages it finished (its calibration set, its quantized model)")]
Sets = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="override a recipe key, repeatable; VALUE is read as YAML, e.g. "
    "--set calibration.size=128 --set model=/path/to/model --set rounding.method=brecq")]
RecipeFile = Annotated[Path, typer.Argument(help="a YAML recipe, e.g. recipes/ddim_fmnist_w8a8.yaml")]
DataRoot = Annotated[Optional[str], typer.Option(help="folder of the Fashion-MNIST IDX files (default: "
                                                 "$QTOOLKIT_FASHION_MNIST or the Debian package's folder)")]


def _command_line(ctx: typer.Context) -> str:
    """The command as typed, which reports quote."""
    return " ".join(["qtoolkit", *ctx.obj["argv"]])


# -- recipes ---------------------------------------------------------------------------------------------------------

@app.command()
def run(ctx: typer.Context, recipe: RecipeFile, set_: Sets = None,
        out: Annotated[Optional[Path], typer.Option(help="the run folder (default: the recipe's output.folder, else "
                                                    "runs/<recipe name>-<date>-<time>)")] = None,
        overwrite: Overwrite = False, resume: Resume = False) -> None:
    """Run a recipe: quantize, export to the backend, report against FP; all checked before any work."""
    from .recipe import load_recipe

    loaded = load_recipe(recipe, set_ or [])
    folder = out or (Path(loaded.output.folder) if loaded.output.folder else None)
    if folder is None:
        folder = _interrupted_run(recipe.stem) if resume else Path(f"runs/{recipe.stem}-{datetime.now():%Y%m%d-%H%M%S}")
    _run_recipe(loaded, folder, overwrite, _command_line(ctx), resume)


def _interrupted_run(stem: str) -> Path:
    """The run folder of the latest interrupted run of recipe `stem` in runs/ (its default place)."""
    partials = sorted(Path("runs").glob(f".{stem}-*.partial"))  # named by date and time: the last is the latest
    if not partials:
        raise QtoolkitError(f"nothing to resume: no interrupted run of {stem} in runs/; pass --out with the run "
                            "folder the interrupted run was writing")
    return partials[-1].with_name(partials[-1].name[1:-len(".partial")])


def _run_recipe(recipe, out: Path, overwrite: bool, command: str, resume: bool = False) -> None:
    from .io import check_new_output
    from .runner import prepare, run as run_job

    check_new_output(out, overwrite)
    job = prepare(recipe)
    for note in getattr(job.plan, "notes", []):
        logging.getLogger(__name__).warning("report: %s", note)
    text = run_job(job, out, overwrite=overwrite, command=command, resume=resume)
    print(text if text is not None else f"run folder written to {out} (no report: report.enabled is false)")


@recipe_app.command("show")
def recipe_show(recipe: RecipeFile, set_: Sets = None) -> None:
    """Print the resolved recipe (every default filled in) as YAML."""
    from .recipe import load_recipe

    print(load_recipe(recipe, set_ or []).to_yaml(), end="")


@recipe_app.command("validate")
def recipe_validate(recipe: RecipeFile, set_: Sets = None) -> None:
    """Check a recipe (schema, plugin names, the model and every setting against it) without running it."""
    from .recipe import load_recipe
    from .runner import prepare

    job = prepare(load_recipe(recipe, set_ or []))
    backend = job.backend.name if job.backend is not None else "none (fake-quant simulation)"
    print(f"{recipe}: valid; model {job.recipe.model} {tuple(job.model.sample_shape)}, backend {backend}")


@app.command()
def plan(recipe: RecipeFile, set_: Sets = None,
         as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False) -> None:
    """Dry run: which ops the recipe's quantization section quantizes and which stay in float, and why.
    Captures the model's graph; no calibration."""
    import torch

    from .graph import capture
    from .graph.listing import counts_line, groups_line, plan_listing, planned_ops
    from .models.conditioning import apply_conditioning
    from .models.loading import load_diffusion_model
    from .quant.timestep_groups import BoundaryRequest
    from .recipe import load_recipe

    loaded = load_recipe(recipe, set_ or [])
    config = loaded.quantization.settings()
    model = apply_conditioning(load_diffusion_model(loaded.model), loaded.conditioning)
    graph = capture(model.denoiser(), model.sample_shape)
    listing = plan_listing(planned_ops(graph, config), config)
    if config.grouped:
        num_timesteps = int(model.scheduler_config.get("num_train_timesteps", 1000))
        rule = plugins.timestep_boundaries(config.timestep_boundaries)
        boundaries = None if rule.data_driven else \
            rule.choose(BoundaryRequest(config.timestep_groups, num_timesteps, torch.zeros(0, dtype=torch.long)))
        listing["timestep_groups"] = {"groups": config.timestep_groups, "rule": rule.name, "boundaries": boundaries,
                                      "line": groups_line(config.timestep_groups, rule.name, boundaries, num_timesteps)}
    if as_json:
        print(json.dumps({"recipe": str(recipe), "model": loaded.model, **listing}, indent=2))
        return
    table = Table(title=f"{recipe}: quantization plan of {loaded.model}")
    for column in ("module path", "op", "plan"):  # the graph node names are in --json
        table.add_column(column, overflow="fold")  # a narrow terminal wraps a path rather than cutting it
    for op in listing["ops"]:
        what = f"quantized ({op['scheme']})" if op["quantized"] else f"[dim]float: {op['rule']}[/dim]"
        table.add_row(op["path"] or "<network>", op["kind"], what)
    console = Console()
    console.print(table)
    console.print(counts_line(listing), markup=False)
    if "timestep_groups" in listing:
        console.print(listing["timestep_groups"]["line"], markup=False)


# -- plugins ---------------------------------------------------------------------------------------------------------

@app.command("plugins")
def list_plugins(as_json: Annotated[bool, typer.Option("--json", help="print a JSON list instead of a table")] = False
                 ) -> None:
    """List the installed plugins: version, where each comes from, what it registers."""
    infos = plugins.plugin_infos()
    if as_json:
        print(json.dumps([info.as_dict() for info in infos], indent=2))
        return
    table = Table(title=f"qtoolkit plugins (entry-point group {plugins.ENTRY_POINT_GROUP!r})")
    for column in ("plugin", "version", "distribution", "module", "registers"):
        table.add_column(column)
    for info in infos:
        registers = "\n".join(f"{KINDS[hook][2]}: {', '.join(names)}" for hook, names in info.registered.items() if names)
        table.add_row(info.name, info.version, info.distribution, info.module, registers)
    Console().print(table)


# -- the flag-only form of a recipe ------------------------------------------------------------------------------------

def _bits(text: str) -> int | None:
    """A bit width on the command line: an integer, or "off" (full precision)."""
    if text.lower() in ("off", "none", "fp", "32"):
        return None
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a bit width: use 2..8 or 'off'") from None


def _params(pairs: list[str] | None, option: str) -> dict:
    """KEY=VALUE options as a dict; each VALUE is read as YAML (0.6 a number, reference-code a string)."""
    from .recipe import parse_yaml

    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise QtoolkitError(f"{option} {pair!r} is not KEY=VALUE, e.g. preset=reference-code or iterations=200")
        params[key] = parse_yaml(value, f"{option} {key}")
    return params


@app.command()
def quantize(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="the run folder")],
    model: Annotated[str, typer.Option(help="bundled name, model folder or hub id")] = "fmnist-ddpm",
    wbits: Annotated[str, typer.Option(help="weight bits 2..8 or 'off'")] = "8",
    abits: Annotated[str, typer.Option(help="activation bits 2..8 or 'off'")] = "8",
    config: Annotated[Optional[Path], typer.Option(help="QuantConfig JSON or YAML (observers, granularity, "
                                                   "include/exclude...); the flags here override it")] = None,
    exclude: Annotated[Optional[str], typer.Option(help="comma-separated module path patterns kept in full "
                                                   "precision, besides the --keep-float rules")] = None,
    keep_float: Annotated[Optional[str], typer.Option(help="comma-separated graph rules whose ops stay in full "
                                                      "precision, replacing the default (timestep-path, first-layer, "
                                                      "last-layer, shortcut); '' quantizes every op")] = None,
    quantize_attention: Annotated[bool, typer.Option("--quantize-attention", help="also quantize the Q.K^T and "
                                                     "softmax.V operands")] = False,
    quantize_conv_outputs: Annotated[bool, typer.Option("--quantize-conv-outputs", help="also quantize convolution "
                                                        "outputs and biases (int32), so that ONNX Runtime runs the "
                                                        "exported convolutions in int8 (QLinearConv)")] = False,
    split_shortcuts: Annotated[bool, typer.Option("--split-shortcuts", help="Q-Diffusion's shortcut splitting: the "
                                                  "decoder's skip-concatenation shortcuts get one input range for "
                                                  "their own features and one for the skip")] = False,
    calib: Annotated[Optional[str], typer.Option(help="calibration strategy, a registered name (`qtoolkit plugins` "
                                                 "lists them); not needed with --calib-from")] = None,
    calib_size: Annotated[Optional[int], typer.Option(help="calibration inputs [default: the strategy's "
                                                      "settings' default]")] = None,
    calib_scheduler: Annotated[Optional[str], typer.Option(help=f"sampler of the FP chains calibration inputs "
                                                           f"come from: {SCHEDULER_NAMES}")] = None,
    calib_steps: Annotated[Optional[int], typer.Option(help="steps of the FP chains calibration inputs come "
                                                       "from")] = None,
    inputs_per_chain: Annotated[Optional[int], typer.Option(help="calibration inputs taken from each FP chain")] = None,
    calib_param: Annotated[Optional[list[str]], typer.Option(metavar="KEY=VALUE", help="strategy parameter, "
                                                             "repeatable: e.g. preset=reference-code, loc=0.6")] = None,
    seed: Annotated[Optional[int], typer.Option(help="calibration seed")] = None,
    calib_from: Annotated[Optional[Path], typer.Option(metavar="DIR", help="reuse a saved calibration set "
                                                       "(another run's calibration/) instead of --calib")] = None,
    rounding: Annotated[Optional[str], typer.Option(help="after calibration, learn the weights' rounding with this "
                                                    "registered method (e.g. brecq, adaround); default: round to "
                                                    "nearest")] = None,
    rounding_param: Annotated[Optional[list[str]], typer.Option(metavar="KEY=VALUE", help="rounding method "
                                                                "parameter, repeatable: e.g. iterations=200")] = None,
    bias_correction: Annotated[bool, typer.Option(help="after calibration (and rounding), shift every layer's bias "
                                                  "so that its output's channel means match the FP model's")] = True,
    bias_samples: Annotated[Optional[int], typer.Option(help="calibration inputs used by bias correction")] = None,
    backend: Annotated[Optional[str], typer.Option(help="export to this registered backend and draw the report's "
                                                   "samples on it; auto: the fastest one here; none: the fake-quant "
                                                   "simulation in PyTorch")] = None,
    float_precision: Annotated[Optional[str], typer.Option(help="what the backend runs the graph's unquantized parts "
                                                           "in: fp32 or bf16")] = None,
    threads: Annotated[Optional[int], typer.Option(help="the backend's threads (default: its own choice)")] = None,
    report: Annotated[bool, typer.Option(help="compare with the FP model (report.md, report.json)")] = True,
    eval_num: Annotated[Optional[int], typer.Option(help="samples per model in the report")] = None,
    eval_steps: Annotated[Optional[int], typer.Option(help="sampling steps of the report")] = None,
    eval_scheduler: Annotated[Optional[str], typer.Option(help=f"sampler of the report: {SCHEDULER_NAMES}")] = None,
    data_root: DataRoot = None,
    overwrite: Overwrite = False,
    resume: Resume = False,
) -> None:
    """Post-training quantization from flags: the flag-only form of a recipe (`qtoolkit run` does the work)."""
    from .recipe import parse_yaml, recipe_from_dict

    quantization = {"weight_bits": _bits(wbits), "activation_bits": _bits(abits)}
    if config is not None:
        if not config.is_file():
            raise QtoolkitError(f"--config {config} not found: give a QuantConfig JSON or YAML file")
        written = parse_yaml(config.read_text(), str(config))
        if not isinstance(written, dict):
            raise QtoolkitError(f"--config {config}: a quantization config is a mapping of QuantConfig keys")
        quantization = {**written, **quantization}
    for value, key in ((exclude, "exclude"), (keep_float, "keep_float")):
        if value is not None:
            quantization[key] = [p.strip() for p in value.split(",") if p.strip()]
    for flag, key in ((quantize_attention, "quantize_attention_matmuls"), (quantize_conv_outputs, "quantize_conv_outputs"),
                      (split_shortcuts, "split_shortcuts")):
        if flag:
            quantization[key] = True
    calibration = _given(strategy=calib, size=calib_size, scheduler=calib_scheduler, steps=calib_steps,
                         inputs_per_chain=inputs_per_chain, seed=seed, params=_params(calib_param, "--calib-param"),
                         source=None if calib_from is None else str(calib_from))
    recipe = {
        "schema_version": 1,
        "description": "built by `qtoolkit quantize` from its flags",
        "model": model,
        "quantization": quantization,
        "calibration": calibration,
        "rounding": None if rounding is None else {"method": rounding,
                                                   "params": _params(rounding_param, "--rounding-param")},
        "bias_correction": _given(enabled=bias_correction, samples=bias_samples),
        "report": _given(enabled=report, num=eval_num, steps=eval_steps, scheduler=eval_scheduler, data_root=data_root),
        **_given(backend=backend, float_precision=float_precision, threads=threads),
    }
    if rounding is None and rounding_param:
        raise QtoolkitError("--rounding-param sets a parameter of --rounding: name the method too, e.g. "
                            "--rounding brecq --rounding-param iterations=200")
    _run_recipe(recipe_from_dict(recipe, "qtoolkit quantize"), out, overwrite, _command_line(ctx), resume)


def _given(**values) -> dict:
    """The options the user gave (not None, not empty): the rest take the recipe schema's defaults."""
    return {key: value for key, value in values.items() if value is not None and value != {}}


# -- training, sampling, evaluation, export, benchmark ---------------------------------------------------------------

_TRAIN = TrainConfig()


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="run folder; an existing one is resumed")] = Path("runs/train-fmnist-ddpm"),
    steps: Annotated[int, typer.Option(help="total optimizer steps to reach")] = _TRAIN.steps,
    batch_size: Annotated[int, typer.Option(help="training batch size")] = _TRAIN.batch_size,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = _TRAIN.lr,
    seed: Annotated[int, typer.Option(help="seed of initialization, data order and noise")] = _TRAIN.seed,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = _TRAIN.checkpoint_every,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast (--no-bf16: plain fp32)")] = _TRAIN.bf16,
    device: Annotated[str, typer.Option(help="torch device")] = _TRAIN.device,
    data_root: DataRoot = None,
) -> None:
    """Train (or resume) the bundled Fashion-MNIST DDPM."""
    from .training.ddpm import train_ddpm

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
                      bf16=bf16, device=device)
    print(f"EMA model written to {train_ddpm(out, cfg, data_root)}")


@app.command("train-classifier")
def train_classifier(
    out: Annotated[Path, typer.Option(help="where the classifier goes")] = Path("runs/fmnist-classifier"),
    epochs: Annotated[int, typer.Option(help="training epochs")] = 6,
    seed: Annotated[int, typer.Option(help="seed of initialization and data order")] = 0,
    data_root: DataRoot = None,
    overwrite: Overwrite = False,
) -> None:
    """Train the Fashion-MNIST feature classifier that `eval` and reports embed samples with."""
    from .training.classifier import train_classifier as train_it

    accuracy = train_it(out, epochs=epochs, seed=seed, data_root=data_root, overwrite=overwrite)
    print(f"test accuracy {accuracy:.4f}; classifier written to {out}")


@app.command()
def sample(
    out: Annotated[Path, typer.Option(help="folder for samples.npz, grid.png and meta.json")],
    model: Annotated[str, typer.Option(help="bundled name, model folder or hub id; with --engine other than torch, "
                                       "a folder written by `qtoolkit export`")] = "fmnist-ddpm",
    scheduler: Annotated[str, typer.Option(help=f"sampler: {SCHEDULER_NAMES}")] = "ddim",
    steps: Annotated[int, typer.Option(help="denoising steps")] = 100,
    num: Annotated[int, typer.Option(help="samples to draw")] = 64,
    seed: Annotated[int, typer.Option(help="seed of the initial noise (sample i depends on seed and i only)")] = 0,
    batch_size: Annotated[int, typer.Option(help="samples per batch")] = 250,
    engine: Annotated[str, typer.Option(help="torch runs a model; a registered backend (`qtoolkit plugins`), or auto "
                                        "for the fastest one here, runs a folder written by `qtoolkit "
                                        "export`")] = TORCH_ENGINE,
    threads: Annotated[Optional[int], typer.Option(help="threads of the backend (default: its own choice)")] = None,
    float_precision: Annotated[str, typer.Option(help="what the backend runs the graph's unquantized parts in "
                                                 "(GroupNorm, SiLU, softmax, adds): bf16 is faster on CPUs with bf16 "
                                                 "support and a little less accurate")] = "fp32",
    overwrite: Overwrite = False,
) -> None:
    """Draw samples: a PNG grid and an .npz of the raw samples."""
    from .distributed import is_main_process, rank_and_world
    from .images import save_grid, save_samples
    from .io import atomic_dir, check_new_output
    from .sampling import make_scheduler, sample as draw

    if num < 1:
        raise QtoolkitError(f"--num must be at least 1, got {num}")
    diffusion_model, eps = _model_and_predictor(model, engine, threads, float_precision)
    make_scheduler(scheduler, diffusion_model.scheduler_config, steps)  # validates before any work
    check_new_output(out, overwrite)
    t0 = time.perf_counter()
    x = draw(diffusion_model, scheduler, steps, num, seed, batch_size, eps=eps)
    seconds = time.perf_counter() - t0
    if not is_main_process():  # under torchrun, rank 0 writes what all ranks drew
        return
    meta = {"model": model, "engine": engine, "float_precision": float_precision, "scheduler": scheduler,
            "steps": steps, "num": num, "seed": seed, "batch_size": batch_size, "processes": rank_and_world()[1],
            "seconds": round(seconds, 1)}
    with atomic_dir(out, overwrite) as tmp:
        save_samples(tmp / "samples.npz", x, meta)
        save_grid(x[:64], tmp / "grid.png")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{num} samples in {seconds:.1f} s -> {out}/samples.npz, {out}/grid.png")


def _model_and_predictor(model_arg: str, engine: str, threads: int | None, float_precision: str):
    """What `sample` draws from: a model on torch, an exported folder on a registered backend, or a deployment
    folder on a PyTorch int8 backend."""
    from .deploy import is_deployment_folder
    from .engines import ONNX_FORMAT, engine_names, load_engine
    from .export import is_exported_folder, load_exported
    from .models import load_diffusion_model

    if engine == TORCH_ENGINE:
        backends = " or --engine ".join(n for n in engine_names() if plugins.backend(n).export_format == ONNX_FORMAT)
        if threads is not None:
            raise QtoolkitError("--threads sets the threads of a backend engine; the torch engine follows "
                                "OMP_NUM_THREADS")
        if float_precision != "fp32":
            raise QtoolkitError(f"--float-precision {float_precision} sets the float parts of an exported graph on "
                                f"--engine {backends}; the torch engine runs the model as it is")
        if is_exported_folder(model_arg):
            raise QtoolkitError(f"{model_arg} holds an exported ONNX graph: sample it with --engine {backends}")
        return load_diffusion_model(model_arg), None
    if is_deployment_folder(model_arg):  # `qtoolkit export --format torch`: PyTorch's own int8 kernels
        deployed = load_engine(engine, model_arg, threads, float_precision)
        return deployed, deployed
    if not is_exported_folder(model_arg):
        raise QtoolkitError(f"--engine {engine} runs a folder written by `qtoolkit export`, and {model_arg} is not one: "
                            f"run `qtoolkit export --model {model_arg} --out EXPORTED` first")
    return load_exported(model_arg), load_engine(engine, model_arg, threads, float_precision)


@app.command("eval")
def evaluate(
    samples: Annotated[Path, typer.Argument(help="folder written by `qtoolkit sample`, or its samples.npz")],
    reference: Annotated[str, typer.Option(help="fmnist-test, fmnist-train, or another sample folder/.npz")] =
    "fmnist-test",
    features: Annotated[str, typer.Option(help="embedding: classifier (the bundled Fashion-MNIST classifier) or "
                                          "inception (InceptionV3, pytorch-fid weights)")] = "classifier",
    classifier: Annotated[str, typer.Option(help="classifier folder for --features classifier")] = "fmnist-classifier",
    inception_weights: Annotated[Optional[Path], typer.Option(help="local pt_inception-2015-12-05-*.pth")] = None,
    num_reference: Annotated[Optional[int], typer.Option(help="use the first N reference images (default: all)")]
    = None,
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples for the FID interval")] = 200,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap and KID subsets")] = 0,
    data_root: DataRoot = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the results here")] = None,
) -> None:
    """FID, KID, IS and precision/recall of a sample set against a reference set."""
    from .evaluation import evaluate_samples
    from .io import atomic_write_text
    from .metrics.evaluate import table_rows

    if features not in ("classifier", "inception"):
        raise QtoolkitError(f"--features {features!r} is not known: choose classifier or inception")
    results = evaluate_samples(samples, reference=reference, features=features, classifier=classifier,
                               inception_weights=inception_weights, num_reference=num_reference,
                               bootstrap=bootstrap, seed=seed, data_root=data_root)
    table = Table(title=f"{samples} against {reference}")
    table.add_column("metric")
    table.add_column("value")
    for label, value in table_rows(results):
        table.add_row(label, value)
    Console().print(table)
    for note in results.get("notes", []):
        print(f"note: {note}")
    if json_out:
        atomic_write_text(json_out, json.dumps(results, indent=2) + "\n")


@app.command()
def export(
    model: Annotated[str, typer.Option(help="a `qtoolkit quantize`/`run` folder, a quantized or FP model")],
    out: Annotated[Path, typer.Option(help="the exported folder")],
    format: Annotated[str, typer.Option(help="onnx: a QuantizeLinear/DequantizeLinear graph (openvino, "
                                          "onnxruntime); torch: an int8 deployment folder for PyTorch itself "
                                          "(fbgemm, qnnpack, x86-onednn; qtoolkit.deploy.load)")] = "onnx",
    overwrite: Overwrite = False,
) -> None:
    """Export a (quantized) model with its own int8 scales: ONNX for the ONNX engines, or a deployment folder for
    PyTorch's int8 kernels."""
    from .deploy import TORCH_FORMAT, export_deployment
    from .export import export_model
    from .io import check_new_output
    from .models import load_diffusion_model

    if format not in ("onnx", TORCH_FORMAT):
        raise QtoolkitError(f"--format {format!r} is not known: choose onnx or {TORCH_FORMAT}")
    check_new_output(out, overwrite)
    t0 = time.perf_counter()
    if format == TORCH_FORMAT:
        description = export_deployment(model, out, overwrite)
        engines = [name for name in plugins.names("register_backends")
                   if plugins.backend(name).export_format == TORCH_FORMAT]
        print(f"int8 deployment folder of {description['int8_layers']} int8 layers written to {out} in "
              f"{time.perf_counter() - t0:.0f} s; load it with `qtoolkit.deploy.load({str(out)!r})` or sample it with "
              f"`qtoolkit sample --model {out} --engine auto` (or {', '.join(engines)})")
        return
    description = export_model(load_diffusion_model(model), out, overwrite)
    quantization = description["quantization"]
    what = "FP32 graph" if quantization is None else (
        f"int8 QDQ graph of {quantization['quantized_layers']} quantized layers "
        f"({description['quantize_linear_nodes']} QuantizeLinear, {description['dequantize_linear_nodes']} "
        "DequantizeLinear)")
    onnx_engines = [name for name in plugins.names("register_backends")
                    if plugins.backend(name).export_format != TORCH_FORMAT]
    print(f"{what} written to {out} in {time.perf_counter() - t0:.0f} s; sample it with "
          f"`qtoolkit sample --model {out} --engine {' or '.join(onnx_engines)}`")


@app.command()
@bench_options()
def bench(
    model: Annotated[str, typer.Option(help="a model quantized by qtoolkit (run folder or its model/)")],
    settings: BenchSettings,
    calibration: Annotated[Optional[Path], typer.Option(help="the calibration set the peers calibrate on (default: "
                                                        "calibration/ of the run folder)")] = None,
    fp_model: Annotated[Optional[str], typer.Option(help="the full-precision model it was quantized from: the FP32 "
                                                    "reference and what the peers quantize (default: the base model "
                                                    "its run folder's ptq.json names)")] = None,
    work: Annotated[Optional[Path], typer.Option(help="keep the exported graphs here (default: a temporary "
                                                 "folder)")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the results here")] = None,
) -> None:
    """Time qtoolkit's int8 backends against FP32 and the peers' recipes (UNet forward, per-step SQNR, sampling)."""
    from .calibration import CalibrationSet
    from .engines.benchmark import format_tables, run_benchmark
    from .io import atomic_write_text
    from .models import load_diffusion_model

    quantized = load_diffusion_model(model)
    calibration_set = None
    if settings.peers:
        # A run folder holds model/ and calibration/ side by side; --model may name either level.
        found = [d / "calibration" for d in (Path(model), quantized.path.parent) if (d / "calibration").is_dir()]
        folder = calibration or next(iter(found), None)
        if folder is None:
            raise QtoolkitError(f"no calibration set beside {model} for the peers to calibrate on: pass "
                                "--calibration DIR (a run's calibration/), or --peers '' to compare with FP32 only")
        calibration_set = CalibrationSet.load(folder)
    fp = load_diffusion_model(fp_model or _base_model_of(model, quantized.path))
    result = run_benchmark(quantized, settings, work, calibration_set, fp.unet)
    print(format_tables(result))
    if json_out:
        atomic_write_text(json_out, json.dumps(result, indent=2) + "\n")


def _base_model_of(model_arg: str, model_path: Path) -> str:
    """The FP model a run started from, as its ptq.json records it (beside model/)."""
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


# -- entry point -------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Run the command line; bad input of any kind is one line `qtoolkit: error: ...` and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="qtoolkit: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m qtoolkit.cli -- sample --num 8`: the `--` keeps torchrun off our options
        argv = argv[1:]
    # Launched by torchrun: join its process group (qtoolkit.distributed imports torch, so only then).
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        if launched:
            from .distributed import init_from_env

            init_from_env()
        return typer.main.get_command(app).main(args=argv, prog_name="qtoolkit", standalone_mode=False,
                                                obj={"argv": argv}) or 0
    except QtoolkitError as e:
        print(f"qtoolkit: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, typer.Abort):
        print("qtoolkit: interrupted", file=sys.stderr)
        return 130
    except typer.TyperException as e:  # usage errors (click's, as typer vendors it): exit code 2
        ctx = getattr(e, "ctx", None)
        see = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print(f"qtoolkit: error: {e.format_message().rstrip('.')}{see}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    finally:
        if launched:
            from .distributed import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main())
