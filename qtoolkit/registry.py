"""The records plugins register, one type per hook of `qtoolkit.hookspecs`, and the lookups the core uses.

A record is plain data: a name (what recipes and the command line use), the callables that do the work,
and a one-line description for `qtoolkit plugins`. The core never imports a plugin; it asks for a name
here, and an unknown name is an error listing the installed ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .errors import QtoolkitError

if TYPE_CHECKING:
    from torch import nn

# The records name the core's types of the layers above (qtoolkit.calibration.StrategyOutput,
# qtoolkit.models.DiffusionModel, qtoolkit.sampling.NoisePredictor) in their docstrings only: this foundation
# module imports nothing of the core but its errors.


@dataclass(frozen=True)
class CalibrationStrategy:
    """Which calibration inputs to make. `run(request, **params) -> StrategyOutput`.

    uses_sampler: False when the inputs do not come from the chosen sampler's chain (e.g. forward-noised
    real images); the calibration set then records no sampler.
    check(request, **params): optional; raises QtoolkitError on bad parameter values without any network
    call, so that a job is refused before its first expensive step (`run` checks them too).
    """

    name: str
    run: Callable[..., Any]  # -> qtoolkit.calibration.StrategyOutput
    description: str = ""
    uses_sampler: bool = True
    check: Callable[..., None] | None = None


@dataclass(frozen=True)
class RoundingMethod:
    """How a frozen model's weights are rounded onto their grid.

    settings(params: dict) -> Any: checks the recipe's parameters before any work (raise QtoolkitError) and
    returns them resolved (every default filled in) as a dict or a dataclass, which the run records.
    apply(qmodel, fp_model, inputs: (x, t), settings, progress=bool) -> JSON-ready summary.
    """

    name: str
    settings: Callable[[dict], Any]
    apply: Callable[..., Any]
    description: str = ""


@dataclass(frozen=True)
class Backend:
    """Where an exported quantized model runs. load(graph_file, threads, float_precision) -> NoisePredictor,
    graph_file being the graph of an exported folder (`qtoolkit.engines.load_engine` finds it in the folder).

    float_precisions() -> the precisions this machine can run the graph's float parts in, FP32 first
    ("fp32", "bf16"); empty when the backend cannot run here (its runtime is not installed: import it
    lazily, so that listing the plugins does not need it). export_format: what `qtoolkit export` writes
    for it. auto_priority: "backend: auto" picks the runnable backend with the highest one.
    runtime_version() -> the version of the runtime it runs on, for benchmark records. runtime: the Python
    package of that runtime (e.g. "openvino"), so that another tool's output for that runtime (the bench's
    peers) finds a backend to run on.

    export_format "onnx": `load` reads the folder's ONNX graph. "torch": `load` reads a deployment folder
    (qtoolkit.deploy), and lower(frozen quantized graph) -> the module `(sample, timestep) -> noise` on the
    backend's int8 kernels. unsupported(QuantConfig) -> why the backend cannot run models quantized that way
    (e.g. kernels that need quantized convolution outputs), or None; "auto" skips such backends.
    saturates_without_vnni: whether its x86 int8 kernels add pairs of u8 x s8 products in a saturating int16 on
    CPUs without VNNI (fbgemm, oneDNN, ONNX Runtime and OpenVINO do; qnnpack does not): loading a model quantized
    with overflow_fix "none" on such a CPU then warns (qtoolkit.quant.overflow).
    runs_timestep_groups: whether it runs models whose activations have one scale per timestep group
    (QuantConfig.timestep_groups > 1): the network picks its group's scales from the timestep it is called with.
    The ONNX export carries them as the graph's own nodes (per-group tables around Q/DQ pairs with constant
    parameters: qtoolkit.export.timestep_tables), so an "onnx" backend whose runtime runs the export runs them.
    """

    name: str
    load: Callable[..., Any]  # -> qtoolkit.sampling.NoisePredictor
    float_precisions: Callable[[], tuple[str, ...]]
    description: str = ""
    export_format: str = "onnx"
    auto_priority: int = 0
    runtime_version: Callable[[], str] = lambda: "unknown"
    runtime: str = ""
    lower: Callable[..., Any] | None = None
    unsupported: Callable[[Any], str | None] = lambda config: None
    saturates_without_vnni: bool = True
    runs_timestep_groups: bool = False

    def cannot_run(self, config) -> str | None:
        """Why this backend cannot run models quantized with `config` (a QuantConfig), or None."""
        if getattr(config, "timestep_groups", 1) > 1 and not self.runs_timestep_groups:
            return ("it does not declare that it runs timestep groups (quantization.timestep_groups > 1): choose "
                    "a backend that does (every built-in one: see `qtoolkit plugins`), or set timestep_groups 1")
        return self.unsupported(config)


@dataclass(frozen=True)
class ModelLoader:
    """How a model string becomes a model. claims(source: str) -> bool without loading; load(source) -> model.

    describe and build (both or neither) let a quantized model of this loader's networks be saved and loaded
    without the original source (qtoolkit.graph.save_quantized / load_quantized); a diffusers network needs
    neither (it is rebuilt from its diffusers config). describe(network) -> a JSON-ready dict of what build needs
    to rebuild that network's architecture, or None when the network is not one of this loader's;
    build(config) -> the network, from that dict (its weights need not be loaded: the saved ones replace them).
    """

    name: str
    claims: Callable[[str], bool]
    load: Callable[[str], Any]  # -> qtoolkit.models.loading.DiffusionModel
    description: str = ""
    describe: Callable[["nn.Module"], dict | None] | None = None
    build: Callable[[dict], "nn.Module"] | None = None

    def __post_init__(self) -> None:
        if (self.describe is None) != (self.build is None):
            raise ValueError(f"model loader {self.name!r}: give both describe and build (a saved quantized model is "
                             "described by one and rebuilt by the other), or neither")


OBSERVER_ROLES = ("activation", "weight")  # what a quantizer observes: a stream of activations, or a weight


@dataclass(frozen=True)
class Observer:
    """How a quantizer chooses its range from what it observed. factory(role, axis, config) -> a
    `qtoolkit.quant.observers.Observer` (streaming, mergeable statistics that compute QuantParams).

    kind: the tensors it observes, "activation" (a per-tensor stream over all calibration batches), "weight"
    (a layer's weight, per channel along `axis` or per tensor) or "both"; `factory` gets the role it is made
    for ("activation" or "weight"), the channel axis (None: per tensor; activations always are) and the
    QuantConfig (its `mse_p` and `percentile` parameterise the built-ins). default_for: the roles for which
    this observer is used when a QuantConfig names none (at most one installed observer per role).
    A QuantConfig names it in `weight_observer` / `activation_observer`.
    """

    name: str
    kind: str
    factory: Callable[..., Any]
    description: str = ""
    default_for: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in (*OBSERVER_ROLES, "both"):
            raise ValueError(f"observer {self.name!r}: kind {self.kind!r} must be one of {', '.join(OBSERVER_ROLES)}"
                             " or both")
        if isinstance(self.default_for, str) or not set(self.default_for) <= set(self.roles):
            raise ValueError(f"observer {self.name!r}: default_for {self.default_for!r} must be a tuple of the roles "
                             f"it observes ({', '.join(self.roles)})")

    @property
    def roles(self) -> tuple[str, ...]:
        return OBSERVER_ROLES if self.kind == "both" else (self.kind,)


@dataclass(frozen=True)
class TimestepBoundaries:
    """Where the timestep groups of a QuantConfig with timestep_groups > 1 begin and end. choose(request) -> the
    G - 1 boundaries, increasing integers inside (0, T): group g holds the timesteps [b[g-1], b[g]) (b[-1] = 0,
    b[G-1] = T). `request` is a `qtoolkit.quant.timestep_groups.BoundaryRequest`: the number of groups, T, the
    calibration set's timesteps, the fewest inputs a group may hold and, for a data-driven rule, each activation
    quantizer's observed range at every calibration timestep (`request.ranges()`, computed on first use: one
    full-precision pass over the calibration set). `data_driven`: whether `choose` reads those ranges.
    `default`: the rule a QuantConfig with timestep groups uses when it names none (at most one installed rule).
    A QuantConfig names it in `timestep_boundaries`.
    """

    name: str
    choose: Callable[[Any], Any]
    description: str = ""
    data_driven: bool = False
    default: bool = False


KINDS = {  # hook name -> (record type, what the records are called, their key in `qtoolkit plugins --json`)
    "register_calibration_strategies": (CalibrationStrategy, "calibration strategy", "calibration_strategies"),
    "register_rounding_methods": (RoundingMethod, "rounding method", "rounding_methods"),
    "register_backends": (Backend, "backend", "backends"),
    "register_model_loaders": (ModelLoader, "model loader", "model_loaders"),
    "register_observers": (Observer, "observer", "observers"),
    "register_timestep_boundaries": (TimestepBoundaries, "timestep boundary rule", "timestep_boundaries"),
}


class PluginConflict(QtoolkitError):
    """Two plugins register the same name for the same hook."""


@dataclass
class Registry:
    """Every record of every loaded plugin, by hook and name, with the plugin that registered it."""

    records: dict[str, dict[str, Any]] = field(default_factory=lambda: {hook: {} for hook in KINDS})
    owners: dict[str, dict[str, str]] = field(default_factory=lambda: {hook: {} for hook in KINDS})

    def check(self, records: list[tuple[str, Any]], plugin: str) -> None:
        """Can `plugin` add these (hook, record) pairs? Wrong record types, nameless records and names already
        taken (by another plugin or twice by this one) are errors."""
        seen: dict[str, set[str]] = {hook: set() for hook in KINDS}
        for hook, record in records:
            record_type, kind, _ = KINDS[hook]
            if not isinstance(record, record_type):
                raise TypeError(f"{hook} registered {record!r}, but takes qtoolkit.registry.{record_type.__name__}")
            if not isinstance(record.name, str) or not record.name:
                raise ValueError(f"{hook} registered a {kind} without a name")
            first = self.owners[hook].get(record.name) or (plugin if record.name in seen[hook] else None)
            if first is not None:
                raise PluginConflict(f"{kind} {record.name!r} is registered twice, by plugin {first!r} and by "
                                     f"plugin {plugin!r}: uninstall one of them, or choose the plugins to load "
                                     "with QTOOLKIT_LOAD_PLUGINS")
            seen[hook].add(record.name)

    def add(self, hook: str, record: Any, plugin: str) -> None:
        """File a record `check` accepted."""
        self.records[hook][record.name] = record
        self.owners[hook][record.name] = plugin

    def get(self, hook: str, name: str) -> Any:
        found = self.records[hook].get(name)
        if found is None:
            kind = KINDS[hook][1]
            installed = ", ".join(sorted(self.records[hook])) or "none installed"
            raise QtoolkitError(f"unknown {kind} {name!r}: choose one of: {installed}")
        return found
