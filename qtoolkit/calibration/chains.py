"""Collect network inputs from the full-precision model's own denoising chains.

One runner serves every strategy that takes x_t from the FP chain (ndtc, uniform, random): the
strategy says, per calibration sample, at which chain position to keep x_t; the runner runs
`qtoolkit.sampling.denoise` once per batch of samples and keeps, for each sample, the very tensor
the loop feeds the network at that position, labelled with the timestep fed alongside it.

Reproducibility contract (what tests re-run to check the pairing):
- sample j starts from `initial_noise(num, sample_shape, seed)[j]`;
- samples are grouped in order of their chain position (stable sort), `batch_size` per batch,
  so a batch needing only early, noisy steps stops early;
- batch b's stochastic steps (DDPM) draw from `chain_generator(seed, b)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..models.loading import DiffusionModel
from ..progress import progress_bar
from ..sampling import denoise, initial_noise, make_scheduler, unet_predictor


@dataclass
class NetworkCost:
    """Network evaluations spent: one sample through the network counts 1, one (batched) call counts 1."""

    sample_evaluations: int = 0
    batched_calls: int = 0

    def as_dict(self) -> dict:
        return {"sample_evaluations": self.sample_evaluations, "batched_calls": self.batched_calls}


class _ChainDone(Exception):
    """Raised from the step callback once a batch's last wanted input is kept, before its network call."""


def chain_generator(seed: int, batch_index: int) -> torch.Generator:
    """The generator for the stochastic steps of chain batch `batch_index` (unused by deterministic DDIM)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + batch_index + 1)


def chain_timesteps(model: DiffusionModel, scheduler_kind: str, steps: int) -> np.ndarray:
    """The integer timesteps the network receives, in chain order (position 0 = pure noise)."""
    return make_scheduler(scheduler_kind, model.scheduler_config, steps).timesteps.numpy().astype(np.int64)


def _model_device(model: DiffusionModel) -> torch.device:
    first_parameter = next(model.unet.parameters(), None)
    return first_parameter.device if first_parameter is not None else torch.device("cpu")


def collect_chain_inputs(model: DiffusionModel, positions: np.ndarray, *, scheduler_kind: str, steps: int, seed: int,
                         batch_size: int, desc: str, progress: bool) -> tuple[torch.Tensor, torch.Tensor, NetworkCost]:
    """x_t (N, C, H, W) float32 and t (N,) int64 where sample j is kept at chain position `positions[j]`."""
    num = len(positions)
    x_T = initial_noise(num, model.sample_shape, seed)
    kept_x = torch.empty_like(x_T)
    kept_t = torch.empty(num, dtype=torch.long)
    cost = NetworkCost()
    unet_eps = unet_predictor(model.unet)

    def counted_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cost.sample_evaluations += x.shape[0]
        cost.batched_calls += 1
        return unet_eps(x, t)

    order = np.argsort(positions, kind="stable")
    batches = [order[start:start + batch_size] for start in range(0, num, batch_size)]
    # A batch visits positions 0 .. its largest one; the bar counts those visits.
    with progress_bar(sum(int(positions[rows].max()) + 1 for rows in batches), desc, unit="step",
                      disable=not progress) as bar:
        device = _model_device(model)
        for b, rows in enumerate(batches):
            rows_t = torch.as_tensor(rows)
            wanted = torch.as_tensor(positions[rows])
            last_wanted = int(wanted.max())

            def keep(i: int, t: int, x_t: torch.Tensor) -> None:
                bar.advance()
                here = wanted == i
                kept_x[rows_t[here]] = x_t[here.to(x_t.device)].float().cpu()
                kept_t[rows_t[here]] = t
                if i == last_wanted:
                    raise _ChainDone  # every sample of this batch is kept: the rest of the chain is not needed

            try:
                denoise(counted_eps, make_scheduler(scheduler_kind, model.scheduler_config, steps), x_T[rows_t].to(device),
                        generator=chain_generator(seed, b), on_step=keep)
            except _ChainDone:
                pass
    return kept_x, kept_t, cost
