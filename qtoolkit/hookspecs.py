"""What a qtoolkit plugin can extend: one hook per kind of named implementation.

Every hook receives a `register` callable; a plugin calls it once per implementation it provides, with
the record type of `qtoolkit.registry` for that kind (the record carries the name recipes use):

    from qtoolkit import hookimpl
    from qtoolkit.registry import CalibrationStrategy

    @hookimpl
    def register_calibration_strategies(register):
        register(CalibrationStrategy(name="fixed-t", run=fixed_t, description="one chosen timestep"))

Plugins are modules named by entry points in the group "qtoolkit" (see `qtoolkit.plugins`); the built-ins
in plugins/ are declared the same way in qtoolkit's own pyproject.toml and load through the same path.
A name registered twice, by any two plugins, is an error that names both.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("qtoolkit")
hookimpl = pluggy.HookimplMarker("qtoolkit")


@hookspec
def register_calibration_strategies(register):
    """Register calibration strategies: which (x_t, t) inputs the quantized model is calibrated on.

    Call `register(CalibrationStrategy(name, run, ...))` once per strategy. `run(request, **params)` gets a
    `qtoolkit.calibration.CalibrationRequest` (the model, how many inputs, the sampler whose chain they may
    come from, a seed, `request.collect_from_chain(positions)`) and the recipe's `calibration.params`, and
    returns a `StrategyOutput` of exactly `request.num` inputs. A recipe names it in `calibration.strategy`.
    """


@hookspec
def register_rounding_methods(register):
    """Register rounding methods: how the weights of a calibrated, frozen model are rounded onto their grid.

    Call `register(RoundingMethod(name, settings, apply, ...))` once per method. `settings(params)` checks the
    recipe's `rounding.params` before any work and returns what `apply(qmodel, fp_model, inputs, settings,
    progress)` needs; `apply` changes the frozen model's weights in place (scales stay frozen) and returns a
    JSON-ready summary for the run's record. A recipe names it in `rounding.method`.
    """


@hookspec
def register_backends(register):
    """Register backends: where a quantized model runs in integer arithmetic (and what it is exported to).

    Call `register(Backend(name, load, float_precisions, ...))` once per backend. `load(exported, threads,
    float_precision)` turns a folder written by `qtoolkit export` into a noise predictor eps(x, t);
    `float_precisions()` says which precisions this machine can run the graph's float parts in (empty: the
    backend cannot run here). A recipe names it in `backend`; `qtoolkit bench` times every registered one.
    A backend with export_format "torch" runs PyTorch deployment folders (qtoolkit.deploy) and gives
    `lower(frozen quantized graph) -> module` (the fbgemm, qnnpack and x86-onednn plugins); `unsupported(config)`
    says why a backend cannot run a quantization, so that "auto" passes it over.
    """


@hookspec
def register_model_loaders(register):
    """Register model loaders: how a recipe's `model` string (a bundled name, a folder, a hub id) becomes a model.

    Call `register(ModelLoader(name, claims, load, ...))` once per loader. `claims(source)` says, without
    loading anything, whether this loader reads `source`; `load(source)` returns a
    `qtoolkit.models.DiffusionModel`. Exactly one loader may claim a source: two that claim the same one are an
    error naming both. A loader of networks that are not diffusers models also gives `describe(network)` and
    `build(config)`, so that a quantized model of them is saved and loaded without its source (docs/plugins.md).
    """


@hookspec
def register_observers(register):
    """Register observers: how a quantizer turns the tensors it saw during calibration into a scale and zero point.

    Call `register(Observer(name, kind, factory, ...))` once per observer. `kind` is "activation", "weight" or
    "both"; `factory(role, axis, config)` returns a fresh `qtoolkit.quant.observers.Observer` (observe, merge,
    has_data, compute_params(bits, symmetric)) for one quantizer of that role ("activation": per tensor, axis
    None; "weight": per channel along `axis`, or per tensor). `default_for` names the roles it serves when a
    QuantConfig names no observer. A recipe names it in `quantization.weight_observer` / `activation_observer`.
    """


@hookspec
def register_timestep_boundaries(register):
    """Register timestep boundary rules: how the timesteps [0, T) are split into a QuantConfig's timestep groups
    (each group gets its own activation scales and zero points, qtoolkit.quant.timestep_groups).

    Call `register(TimestepBoundaries(name, choose, ...))` once per rule. `choose(request)` gets a
    `qtoolkit.quant.timestep_groups.BoundaryRequest` and returns the G - 1 boundaries. A recipe names it in
    `quantization.timestep_boundaries`.
    """
