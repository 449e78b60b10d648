"""The one entry point that makes a calibration set, and what it asks of a calibration strategy.

Strategies are plugins (`qtoolkit.hookspecs.register_calibration_strategies`): `generate_calibration_set`
looks the named one up in the plugin registry, checks the arguments and the strategy's parameters, and
runs it on a `CalibrationRequest`. Every strategy yields exactly `num` network inputs (x_t, t), in random
order (so that calibrators which average over batches, e.g. EMA activation ranges, see the whole mix in
every batch).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import numpy as np
import torch

from .. import plugins
from ..errors import QtoolkitError
from ..models.loading import DiffusionModel
from ..sampling import make_scheduler
from .chains import NetworkCost, chain_timesteps, collect_chain_inputs
from .dataset import CalibrationSet, timestep_histogram


@dataclass(frozen=True)
class CalibrationRequest:
    """What every strategy is asked for: `num` inputs of `model`, on the chain of `scheduler` with `steps` steps."""

    model: DiffusionModel
    num: int
    scheduler: str
    steps: int
    seed: int
    batch_size: int
    progress: bool
    strategy: str = ""  # the strategy's registered name, for progress bars
    inputs_per_chain: int = 1
    # A dry run (draw_calibration_timesteps): the chain is not run; collect_from_chain gives zero samples with the
    # timesteps the chain would have fed the network at the strategy's positions.
    dry_run: bool = False

    @property
    def num_train_timesteps(self) -> int:
        return int(self.model.scheduler_config.get("num_train_timesteps", 1000))

    def rng(self) -> np.random.Generator:
        """The strategy's own random draws (timesteps, image choice); x_T comes from `initial_noise(seed)`."""
        return np.random.default_rng(self.seed)

    def collect_from_chain(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, NetworkCost]:
        """x_t and t of the FP chain at chain position `positions[j]` for sample j (see `chains`)."""
        if self.dry_run:
            t = torch.as_tensor(chain_timesteps(self.model, self.scheduler, self.steps)[np.asarray(positions)])
            return torch.zeros(len(positions), *self.model.sample_shape), t, NetworkCost()
        return collect_chain_inputs(self.model, positions, scheduler_kind=self.scheduler, steps=self.steps,
                                    seed=self.seed, batch_size=self.batch_size, desc=f"calibration {self.strategy}",
                                    progress=self.progress, inputs_per_chain=self.inputs_per_chain)


@dataclass
class StrategyOutput:
    x: torch.Tensor
    t: torch.Tensor
    cost: NetworkCost
    parameters: dict  # the strategy's resolved parameters, JSON-ready, for the set's metadata


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def strategy_parameters(strategy) -> list[str]:
    """The keyword parameters a registered strategy's run(request, **params) takes."""
    return list(inspect.signature(strategy.run).parameters)[1:]


def check_calibration(strategy: str, model: DiffusionModel, num: int, *, scheduler: str = "ddim", steps: int = 100,
                      seed: int = 0, batch_size: int = 256, inputs_per_chain: int = 1, progress: bool = True,
                      **strategy_params) -> CalibrationRequest:
    """Every check of `generate_calibration_set`'s arguments, without any network call; returns the request.

    The strategy's parameter names are checked here, and their values by the strategy's own `check`, when it
    registered one (else they are checked when it runs, still before its first network call).
    """
    chosen = plugins.calibration_strategy(strategy)
    accepted = strategy_parameters(chosen)
    unknown = sorted(set(strategy_params) - set(accepted))
    if unknown:
        raise QtoolkitError(f"strategy {strategy!r} takes no parameter {', '.join(map(repr, unknown))}; "
                            f"its parameters: {', '.join(accepted) or 'none'}")
    # A parameter without a default (e.g. a plugin's `t`) must be given: refused here, not as a TypeError later.
    missing = [name for name, p in list(inspect.signature(chosen.run).parameters.items())[1:]
               if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and name not in strategy_params]
    if missing:
        raise QtoolkitError(f"strategy {strategy!r} needs the parameter {', '.join(map(repr, missing))}: "
                            "set it in calibration.params")
    for name, value, lowest in (("num", num, 1), ("steps", steps, 1), ("batch_size", batch_size, 1), ("seed", seed, 0),
                                ("inputs_per_chain", inputs_per_chain, 1)):
        if not _is_int(value) or value < lowest:
            raise QtoolkitError(f"{name} must be an integer >= {lowest}, got {value!r}")
    make_scheduler(scheduler, model.scheduler_config, steps)  # a bad scheduler kind or step count fails here
    request = CalibrationRequest(model, int(num), scheduler, int(steps), int(seed), int(batch_size), progress, strategy,
                                 int(inputs_per_chain))
    if chosen.check is not None:
        chosen.check(request, **strategy_params)
    return request


def draw_calibration_timesteps(strategy: str, model: DiffusionModel, num: int, **settings) -> torch.Tensor:
    """The timesteps generate_calibration_set(strategy, model, num, **settings) will give its inputs, drawn without
    running the FP chain (a strategy that calls the network itself, rather than through collect_from_chain, still
    does): for checks that need the calibration set's timesteps before any network call."""
    request = check_calibration(strategy, model, num, **{**settings, "progress": False})
    params = {k: v for k, v in settings.items() if k not in ("scheduler", "steps", "seed", "batch_size",
                                                               "inputs_per_chain", "progress")}
    dry = dataclasses.replace(request, dry_run=True)
    return plugins.calibration_strategy(strategy).run(dry, **params).t


def generate_calibration_set(strategy: str, model: DiffusionModel, num: int, *, scheduler: str = "ddim", steps: int = 100,
                             seed: int = 0, batch_size: int = 256, inputs_per_chain: int = 1, progress: bool = True,
                             **strategy_params) -> CalibrationSet:
    """`num` calibration inputs of `model` made by the calibration strategy named `strategy` (a plugin),
    deterministic for (seed, batch_size, inputs_per_chain). Bad arguments raise QtoolkitError before any
    network call.

    scheduler/steps: the sampler ("ddpm", "ddim", "dpm-solver") whose chain the inputs come from.
    batch_size: chains run at once. inputs_per_chain: how many inputs one FP chain may give (K); the cost of
    a chain strategy is about num / K * steps sample evaluations. strategy_params: the strategy's own keyword
    parameters (e.g. preset, shape, loc, scale, out_of_range for "ndtc").
    """
    request = check_calibration(strategy, model, num, scheduler=scheduler, steps=steps, seed=seed,
                                batch_size=batch_size, inputs_per_chain=inputs_per_chain, progress=progress,
                                **strategy_params)
    chosen = plugins.calibration_strategy(strategy)
    out = chosen.run(request, **strategy_params)
    if out.x.shape[0] != request.num or out.t.shape != (request.num,):
        raise QtoolkitError(f"calibration strategy {strategy!r} returned {out.x.shape[0]} inputs for {request.num} "
                            "asked: the strategy's plugin is broken")
    meta = {
        "strategy": strategy,
        "num": request.num,
        "parameters": out.parameters,
        "scheduler": {"kind": scheduler, "steps": request.steps} if chosen.uses_sampler else None,
        "num_train_timesteps": request.num_train_timesteps,
        "seed": request.seed,
        "batch_size": request.batch_size,
        "inputs_per_chain": request.inputs_per_chain,
        "cost": out.cost.as_dict(),
        "timestep_histogram": timestep_histogram(out.t),
        "model": str(model.path),
        "sample_shape": list(model.sample_shape),
    }
    return CalibrationSet(x=out.x, t=out.t, cond=None, meta=meta)
