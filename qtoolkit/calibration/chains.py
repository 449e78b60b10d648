"""Collect network inputs from the full-precision model's own denoising chains.

One runner serves every strategy that takes x_t from the FP chain (ndtc, uniform, random, ...): the
strategy says, per calibration sample, at which chain position to keep x_t; the runner runs
`qtoolkit.sampling.denoise` over batches of chains and keeps, for each sample, the very tensor the loop
feeds the network at that position, labelled with the timestep fed alongside it.

One chain can give several samples (`inputs_per_chain` = K): a chain visits every position on its way,
so taking K inputs from it costs no more than taking its latest one. The inputs of one chain are
correlated (the same x_T, seen at K steps), which is the price; K = 1 gives every sample its own chain.

Reproducibility contract (what tests re-run to check the pairing):
- the samples are ranked by chain position (stable sort: rank r is sample `order[r]`);
- there are C = max(ceil(num / K), the most samples wanted at one position) chains; chain c holds the
  samples of ranks c, c + C, c + 2C, ... (so every chain spans the range of positions, and no chain
  holds one position twice) and starts from `initial_noise(num, sample_shape, seed)[order[c]]`;
- chains run in order, `batch_size` per batch, so a batch needing only early, noisy steps stops early;
- batch b's stochastic steps (DDPM) draw from `chain_generator(seed, b)`.
Under torchrun, rank r runs batches r, r + W, ... and every rank gathers all kept inputs (qtoolkit.distributed):
the same set, whatever the number of processes.
With K = 1, chain c is the sample of rank c and starts from its own noise: one chain per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..devices import device_of
from ..distributed import gather_by_batch, my_batches
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

    def counting(self, eps):
        """`eps`, adding each call it makes to this count."""
        def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            self.sample_evaluations += x.shape[0]
            self.batched_calls += 1
            return eps(x, t)
        return counted


class _ChainDone(Exception):
    """Raised from the step callback once a batch's last wanted input is kept, before its network call."""


def chain_generator(seed: int, batch_index: int) -> torch.Generator:
    """The generator for the stochastic steps of chain batch `batch_index` (unused by deterministic DDIM)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + batch_index + 1)


def chain_timesteps(model: DiffusionModel, scheduler_kind: str, steps: int) -> np.ndarray:
    """The integer timesteps the network receives, in chain order (position 0 = pure noise)."""
    return make_scheduler(scheduler_kind, model.scheduler_config, steps).timesteps.numpy().astype(np.int64)


def chain_assignment(positions: np.ndarray, inputs_per_chain: int) -> tuple[np.ndarray, np.ndarray]:
    """(chain of each sample, sample whose noise starts each chain), as the module's contract says."""
    num = len(positions)
    order = np.argsort(positions, kind="stable")
    most_at_one_position = int(np.unique(positions, return_counts=True)[1].max())
    num_chains = max(-(-num // inputs_per_chain), most_at_one_position)
    chain_of = np.empty(num, dtype=np.int64)
    chain_of[order] = np.arange(num) % num_chains
    return chain_of, order[:num_chains]


def collect_chain_inputs(model: DiffusionModel, positions: np.ndarray, *, scheduler_kind: str, steps: int, seed: int,
                         batch_size: int, desc: str, progress: bool,
                         inputs_per_chain: int = 1) -> tuple[torch.Tensor, torch.Tensor, NetworkCost]:
    """x_t (N, C, H, W) float32 and t (N,) int64 where sample j is kept at chain position `positions[j]`,
    up to `inputs_per_chain` samples from each chain."""
    num = len(positions)
    noise = initial_noise(num, model.sample_shape, seed)
    kept_x = torch.empty_like(noise)
    kept_t = torch.empty(num, dtype=torch.long)
    unet_eps = unet_predictor(model.denoiser())

    chain_of, chain_starts = chain_assignment(positions, inputs_per_chain)
    batches = [np.arange(start, min(start + batch_size, len(chain_starts)))
               for start in range(0, len(chain_starts), batch_size)]
    samples_of = [np.flatnonzero((chain_of >= chains[0]) & (chain_of <= chains[-1])) for chains in batches]
    mine = list(my_batches(len(batches)))
    kept, spent = {}, {}
    # A batch visits positions 0 .. its largest one; the bar counts those visits.
    with progress_bar(sum(int(positions[samples_of[b]].max()) + 1 for b in mine), desc, unit="step",
                      disable=not progress) as bar:
        device = device_of(model.unet)
        for b in mine:
            spent[b] = NetworkCost()
            kept[b] = _run_chain_batch(spent[b].counting(unet_eps),
                                       noise[torch.as_tensor(chain_starts[batches[b]])].to(device),
                                       chain_of[samples_of[b]] - batches[b][0], positions[samples_of[b]],
                                       make_scheduler(scheduler_kind, model.scheduler_config, steps),
                                       chain_generator(seed, b), bar.advance)
    total = NetworkCost()
    for samples, x, t, batch_cost in gather_by_batch({b: (samples_of[b], *kept[b], spent[b]) for b in mine}).values():
        kept_x[torch.as_tensor(samples)], kept_t[torch.as_tensor(samples)] = x, t
        total.sample_evaluations += batch_cost.sample_evaluations
        total.batched_calls += batch_cost.batched_calls
    return kept_x, kept_t, total


def _run_chain_batch(eps, x_T: torch.Tensor, rows: np.ndarray, wanted: np.ndarray, scheduler,
                     generator: torch.Generator, advance) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of chains from `x_T`; returns (x_t, t) of each of its samples, sample j kept from chain row
    `rows[j]` at position `wanted[j]`."""
    rows_t, wanted_t = torch.as_tensor(rows), torch.as_tensor(wanted)
    kept_x = torch.empty((len(rows), *x_T.shape[1:]))
    kept_t = torch.empty(len(rows), dtype=torch.long)
    last_wanted = int(wanted_t.max())

    def keep(i: int, t: int, x_t: torch.Tensor) -> None:
        advance()
        here = wanted_t == i
        kept_x[here] = x_t[rows_t[here].to(x_t.device)].float().cpu()
        kept_t[here] = t
        if i == last_wanted:
            raise _ChainDone  # every sample of this batch is kept: the rest of the chain is not needed

    try:
        denoise(eps, scheduler, x_T, generator=generator, on_step=keep)
    except _ChainDone:
        pass
    return kept_x, kept_t
