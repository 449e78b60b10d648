"""Recipes: a whole quantization job as data (YAML), with a typed schema checked before any work.

    schema_version: 1
    description: W8A8 of the bundled model, NDTC calibration, bias correction   # optional; default: from the file name
    model: fmnist-ddpm                 # bundled name, model folder, or hub id
    conditioning: {}                   # a conditional network's inputs, e.g. {encoder_hidden_states: {source: random}}
    quantization: {weight_bits: 8, activation_bits: 8}
    calibration: {strategy: ndtc, size: 1024, params: {preset: paper}}
    rounding: null                     # or {method: brecq, params: {iterations: 1000}}
    bias_correction: {enabled: true, samples: 256, per_timestep_group: false}
    backend: auto                      # or none, or a registered backend
    report: {num: 500, steps: 100}

The sections `quantization`, `calibration` and `report` take exactly the fields of the core's settings
(QuantConfig, CalibrationSettings, ReportSettings), with their defaults, and those settings run their own
checks here: the schema has no copy of them to drift. Strategy, rounding method and backend names are looked
up in the plugin registry, so an unknown one is answered with the installed names.

Every problem is one line naming the file, the key's dotted path and what is allowed (an unknown key gets the
closest valid one); a recipe is data, read with yaml.safe_load only.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator,
                      model_validator)

from . import plugins
from .backend_lookup import AUTO, FLOAT_PRECISIONS
from .devices import AUTO as DEVICE_AUTO, check_device_name
from .errors import QtoolkitError
from .ptq import CalibrationSettings, RoundingSettings
from .quant import QuantConfig
from .graph.bias_correction import check_samples as check_bias_samples
from .report import ReportSettings

SCHEMA_VERSION = 1
NO_BACKEND = "none"  # no export: the report samples the fake-quantized model in PyTorch


class Section(BaseModel):
    # strict: YAML already types its scalars, so "8" is a string here, not silently the number 8.
    model_config = ConfigDict(extra="forbid", strict=True)


class SettingsSection(Section):
    """A section whose fields are those of one of the core's settings dataclasses (`settings_type`).

    Validation builds the dataclass, so its own checks (bits, observers, ...) run, and copies its fields back:
    a default the dataclass derives (e.g. QuantConfig's exclude list) shows in the resolved recipe.
    """

    settings_type: ClassVar[type]

    @model_validator(mode="after")
    def _run_settings_checks(self):
        settings = self.settings()
        for f in dataclasses.fields(settings):
            if f.name in type(self).model_fields:
                setattr(self, f.name, getattr(settings, f.name))
        return self

    def settings(self, **extra) -> Any:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self.settings_type)
                  if f.name in type(self).model_fields}
        try:
            return self.settings_type(**values, **extra)
        except QtoolkitError as e:
            raise ValueError(str(e)) from None


def _section_of(settings_type: type, base: type[SettingsSection], skip: tuple[str, ...] = ()) -> type:
    """A pydantic section with the fields, types and defaults of the dataclass `settings_type` (less `skip` and
    those `base` declares itself)."""
    hints = typing.get_type_hints(settings_type)
    fields = {}
    for f in dataclasses.fields(settings_type):
        if f.name in skip or f.name in base.model_fields:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=f.default_factory)
        else:
            default = ...
        fields[f.name] = (hints[f.name], default)
    section = create_model(base.__name__.lstrip("_"), __base__=base, __module__=__name__, **fields)
    section.settings_type = settings_type
    return section


class _Quantization(SettingsSection):
    """What to quantize and how: the fields of qtoolkit.quant.QuantConfig."""


class _Calibration(SettingsSection):
    """Which inputs to calibrate on: the fields of qtoolkit.ptq.CalibrationSettings. The strategy has no
    default (which plugin to use is the recipe's choice); a reused set (`source`) brings its own."""

    strategy: str | None = None

    @field_validator("strategy")
    @classmethod
    def _installed(cls, name: str | None) -> str | None:
        if name is not None:
            _lookup(plugins.calibration_strategy, name)
        return name

    @model_validator(mode="before")
    @classmethod
    def _strategy_or_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("strategy") is None and data.get("source") is None:
            raise ValueError("no strategy given: set calibration.strategy to one of: "
                             f"{', '.join(plugins.names('register_calibration_strategies'))} "
                             "(or calibration.source to another run's calibration/)")
        return data


class _Report(SettingsSection):
    """The comparison with the FP model: the fields of qtoolkit.report.ReportSettings, and whether to make it."""

    enabled: bool = True


Quantization = _section_of(QuantConfig, _Quantization)
Calibration = _section_of(CalibrationSettings, _Calibration)
Report = _section_of(ReportSettings, _Report)


class Rounding(Section):
    """How the frozen weights are rounded: a registered rounding method and its parameters."""

    method: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _installed(cls, name: str) -> str:
        _lookup(plugins.rounding_method, name)
        return name

    @field_validator("params")
    @classmethod
    def _accepted_by_the_method(cls, params: dict, info: ValidationInfo) -> dict:
        if "method" in info.data:  # else the method itself was wrong, and said so
            try:
                plugins.rounding_method(info.data["method"]).settings(dict(params))
            except QtoolkitError as e:
                raise ValueError(str(e)) from None
        return params

    def settings(self) -> RoundingSettings:
        return RoundingSettings(method=self.method, params=dict(self.params))


class BiasCorrection(Section):
    """Shift each layer's bias so its output's channel means match the FP model's on `samples` calibration inputs;
    with per_timestep_group (and quantization.timestep_groups > 1), one shift per timestep group for every layer
    whose output stays float (qtoolkit.graph.timestep_bias)."""

    enabled: bool = True
    samples: int = 256
    per_timestep_group: bool = False

    @field_validator("samples")
    @classmethod
    def _positive(cls, samples: int) -> int:
        try:
            check_bias_samples(samples)
        except QtoolkitError as e:
            raise ValueError(str(e)) from None
        return samples


# What a random or all-zero encoder_hidden_states is long, in tokens, unless the recipe says: CLIP's context
# length, the sequence Stable Diffusion's UNets attend to.
DEFAULT_SEQUENCE_LENGTH = 77
ENCODER_HIDDEN_STATES_FIELDS = {"random": ("seed", "sequence_length"), "zeros": ("sequence_length",),
                                "file": ("path", "key")}


class EncoderHiddenStates(Section):
    """The sequence a cross-attention network attends to (a text encoder's output), the same for every call:
    `random` (standard normal, seeded), `zeros`, or `file` (a tensor of a safetensors file). Its width is the
    network's (cross_attention_dim); `qtoolkit.models.conditioning` makes the tensor."""

    source: Literal["random", "zeros", "file"]
    seed: int | None = Field(default=None, ge=0)  # random; default 0
    sequence_length: int | None = Field(default=None, ge=1)  # random, zeros; default DEFAULT_SEQUENCE_LENGTH
    path: str | None = None  # file: a .safetensors file, relative to the current folder (as `model` is)
    key: str | None = None  # file: the tensor's name in it; default: the file's only tensor

    @model_validator(mode="after")
    def _fields_of_the_source(self):
        taken = ENCODER_HIDDEN_STATES_FIELDS[self.source]
        for name in ("seed", "sequence_length", "path", "key"):
            if name not in taken and getattr(self, name) is not None:
                raise ValueError(f"{name} does not go with source {self.source}, which takes "
                                 f"{' and '.join(taken)}")
        if self.source == "file" and self.path is None:
            raise ValueError("source file needs path: the .safetensors file holding the (1, L, width) tensor")
        if self.source == "random" and self.seed is None:
            self.seed = 0
        if self.source in ("random", "zeros") and self.sequence_length is None:
            self.sequence_length = DEFAULT_SEQUENCE_LENGTH
        return self


class Conditioning(Section):
    """What a conditional network gets on every call, besides the sample and the timestep: the keys are its
    arguments. Empty (the default) for an unconditional network; a conditional one says which keys it needs."""

    encoder_hidden_states: EncoderHiddenStates | None = None  # UNet2DConditionModel
    class_labels: int | None = Field(default=None, ge=0)  # a class index: DiT, UNets with num_class_embeds


class Output(Section):
    """Where the run folder goes; null: runs/<recipe name>-<date>-<time>."""

    folder: str | None = None


class Recipe(Section):
    """A quantization job: the model, how to quantize and calibrate it, where it runs, and what to report."""

    schema_version: Literal[1]
    description: str = ""  # recipe_from_dict fills it from the file name when a recipe has none
    model: str  # a bundled name, a model folder, or a hub id (asked of the model-loader plugins)
    conditioning: Conditioning = Field(default_factory=Conditioning)
    quantization: Quantization = Field(default_factory=Quantization)
    calibration: Calibration
    rounding: Rounding | None = None  # null: round to nearest
    bias_correction: BiasCorrection = Field(default_factory=BiasCorrection)
    # Where the quantized model is exported to and the report's samples are drawn: what a user deploys.
    backend: str = AUTO  # the fastest backend that runs here (qtoolkit.backend_lookup.resolve_backend)
    # What the backend runs the exported graph's unquantized parts in (GroupNorm, SiLU, adds): fp32, or e.g. bf16.
    float_precision: str = FLOAT_PRECISIONS[0]
    threads: int | None = Field(default=None, ge=1)  # the backend's threads (null: its own choice)
    # Where the job makes the int8 model (chains, observers, bias correction, rounding, the report's FP network):
    # auto (the first accelerator present, else the CPU), cpu, cuda, cuda:N, mps. The int8 model runs on the CPU.
    device: str = DEVICE_AUTO
    report: Report = Field(default_factory=Report)
    output: Output = Field(default_factory=Output)

    @field_validator("device")
    @classmethod
    def _device_known(cls, name: str) -> str:
        try:
            return check_device_name(name)
        except QtoolkitError as e:
            raise ValueError(str(e)) from None

    @field_validator("backend")
    @classmethod
    def _backend_installed(cls, name: str) -> str:
        if name not in (AUTO, NO_BACKEND) and name not in plugins.names("register_backends"):
            raise ValueError(f"unknown backend {name!r}: choose {AUTO}, {NO_BACKEND} or one of: "
                             f"{', '.join(plugins.names('register_backends'))}")
        return name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=120)


def _lookup(find, name: str):
    try:
        return find(name)
    except QtoolkitError as e:
        raise ValueError(str(e)) from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """The recipe in the YAML file `path`, with `--set key=value` overrides applied, validated."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise QtoolkitError(f"recipe {path} not found: give a recipe file, e.g. recipes/ddim_fmnist_w8a8.yaml") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise QtoolkitError(f"recipe {path} is not a YAML text file ({e})") from None
    return recipe_from_dict(parse_yaml(text, str(path)), str(path), overrides)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise QtoolkitError(f"{where}: YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise QtoolkitError(f"{source}: not valid YAML ({e})") from None


def recipe_from_dict(data: Any, source: str, overrides: list[str] = ()) -> Recipe:
    """Validate `data` (a recipe as parsed YAML) after applying `overrides`; `source` names it in errors."""
    if not isinstance(data, dict):
        raise QtoolkitError(f"{source}: a recipe is a YAML mapping (schema_version: {SCHEMA_VERSION}, description, "
                            f"model, calibration, ...), got {type(data).__name__}")
    for override in overrides:
        apply_override(data, override)
    if data.get("description") is None:  # optional: what the file is called says what it is
        data = {**data, "description": f"recipe {Path(source).stem}"}
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise QtoolkitError(f"{source}: {one_line(e)}") from None


def apply_override(data: dict, override: str) -> None:
    """`--set a.b=value`: value parsed as a YAML scalar (128 is a number, /path a string, null is null)."""
    key, sep, text = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise QtoolkitError(f"--set {override!r} is not KEY=VALUE: write e.g. --set calibration.size=128")
    value = parse_yaml(text, f"--set {key}")
    *parents, last = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise QtoolkitError(f"--set {key}: {'.'.join(parents[:i + 1])} is {child!r}, not a section with keys")
        node = child
    node[last] = value


def one_line(error: ValidationError) -> str:
    """pydantic's first error as one line: the dotted path of the key and what is wrong or allowed."""
    first = error.errors(include_url=False)[0]
    loc = [str(part) for part in first["loc"]]
    path = ".".join(loc)
    if first["type"] == "extra_forbidden":
        valid = sorted(_fields_at(loc[:-1]))
        close = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys here: {', '.join(valid)}"
        return f"unknown key {path!r}: {hint}"
    if first["type"] == "missing":
        return f"{path}: required key missing"
    message = first["msg"].removeprefix("Value error, ")
    message = message[0].lower() + message[1:] if message else message
    where = f"{path}: " if path else ""
    got = "" if first["type"] in ("value_error", "assertion_error") else f", got {first['input']!r}"
    return f"{where}{message}{got}"


def _fields_at(loc: list[str]) -> list[str]:
    """The keys the schema allows at `loc` (a path of section names from the top)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        annotation = model.model_fields[part].annotation
        if typing.get_origin(annotation) in (Union, types.UnionType):  # an optional section
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        model = annotation
    return list(model.model_fields)
