"""Reconstruction, shared by the `adaround` and `brecq` rounding methods: learn the weights' rounding so that
each block's (or layer's) quantized output matches full precision.

BRECQ (Li et al., ICLR 2021), the reconstruction Q-Diffusion applies to diffusion models: after
calibration and freeze, walk through the network's blocks in execution order and, for each block, train
the AdaRound variables of its quantized layers (AdaRoundWeight, below) to minimise

    || block_q(x_q) - block_fp(x_fp) ||^2  +  round_weight * sum(1 - |2h - 1|^beta)

where x_q is the block's input in the quantized model (earlier blocks already reconstructed, so later
blocks learn to compensate their error) and block_fp(x_fp) the full-precision model's output on the same
calibration input (BRECQ's and Q-Diffusion's "asymmetric" reconstruction). beta anneals from beta_start to
beta_end after a warm-up without the regulariser, as in BRECQ. Granularity "layer" reconstructs each
layer on its own output instead (AdaRound). Scales and zero points stay frozen; activations stay
quantized during reconstruction (QDrop's finding: rounding learned under quantized inputs transfers
better than rounding learned under float ones). Q-Diffusion's second stage (learning activation step
sizes) is not done: qtoolkit's activation ranges come from the Lp search.

The learned rounding is folded into the weights as values on the frozen grid, so the model afterwards is
an ordinary frozen quantized model: save_quantized, load_quantized and the int8 export need nothing new.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from qtoolkit.errors import QtoolkitError
from qtoolkit.models.blocks import RECONSTRUCTION_BLOCKS
from qtoolkit.progress import track
from qtoolkit.quant.capture import CAPTURE_BATCH, concat_batches, execution_order, fp_twins, random_subset, run_until
from qtoolkit.quant.layers import QuantLayer
from qtoolkit.registry import RoundingMethod
from qtoolkit.quant.quantizer import QuantParams

GRANULARITIES = ("block", "layer")

# The rectified sigmoid's stretch, as in the AdaRound paper and BRECQ:
# h = clamp(sigmoid(alpha) (ZETA - GAMMA) + GAMMA, 0, 1) reaches 0 and 1 for finite alpha, so rounding can settle.
ZETA, GAMMA = 1.1, -0.1


class AdaRoundWeight(nn.Module):
    """Stands in for a frozen weight quantizer during reconstruction: soft rounding with a learnable alpha.

    AdaRound (Nagel et al., ICML 2020): round-to-nearest minimises each weight's own error, not the layer's
    output error. AdaRound keeps the frozen scale and zero point and replaces the rounding of w / scale by
    floor(w / scale) + h(alpha), with h a rectified sigmoid in [0, 1] that a regulariser pushes to exactly 0
    or 1 as training goes on. At the end each weight is rounded to floor + (h > 1/2) and written back as a
    value on the quantizer's grid, so that the frozen quantizer reproduces exactly those codes and everything
    downstream (saving, export) stays as it is.
    """
    def __init__(self, weight: torch.Tensor, params: QuantParams):
        super().__init__()
        self.params = params
        scale = params._along_axis(params.scale, weight)
        scaled = weight.detach().float() / scale
        self.register_buffer("floor", torch.floor(scaled))
        # Start where rounding is "as the weight lies": h(alpha) = the fractional part, i.e. the soft
        # quantized weight starts at the float weight itself (inside the clipping range).
        rest = (scaled - self.floor).clamp(0.01, 0.99)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def soft_rounding(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2h - 1|^beta): zero only when every h is exactly 0 or 1; beta anneals from large to small."""
        return (1 - (2 * self.soft_rounding() - 1).abs().pow(beta)).sum()

    def _dequantize(self, rounding: torch.Tensor) -> torch.Tensor:
        p = self.params
        codes = torch.clamp(self.floor + rounding + p._along_axis(p.zero_point, self.floor), p.qmin, p.qmax)
        return p.dequantize(codes)  # float codes: the gradient reaches alpha

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as the layer sees it during reconstruction (the argument is the float weight, unused)."""
        return self._dequantize(self.soft_rounding()).to(weight.dtype)

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        """The learned rounding made final: a weight exactly on the quantizer's grid."""
        return self._dequantize((self.alpha >= 0).float())



@dataclass
class ReconstructionSettings:
    """BRECQ / AdaRound settings. Defaults follow BRECQ and Q-Diffusion (round_weight 0.01, beta 20 -> 2,
    20% warm-up, Adam), except the iteration count: Q-Diffusion runs 20,000 per block on a GPU; 1,000 keeps
    a CPU run in minutes for a small model and already settles most roundings (raise it if you can)."""

    granularity: str = "block"
    iterations: int = 1000
    samples: int = 256        # calibration inputs used (a seeded random subset of the calibration set)
    batch_size: int = 32
    lr: float = 1e-3
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2       # fraction of iterations without the rounding regulariser
    seed: int = 0

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise QtoolkitError(f"reconstruction granularity {self.granularity!r} is not known: choose block or layer")
        for name in ("iterations", "samples", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QtoolkitError(f"reconstruction {name} = {value!r} must be a positive integer")
        for name in ("lr", "round_weight", "beta_start", "beta_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise QtoolkitError(f"reconstruction {name} = {value!r} must be a non-negative number")
        if not 0 <= self.warmup < 1:
            raise QtoolkitError(f"reconstruction warmup = {self.warmup!r} must be a fraction in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, granularity: str) -> "ReconstructionSettings":
        """The settings of a rounding method's parameters `data`; the method decides the granularity."""
        valid = [f.name for f in fields(cls) if f.name != "granularity"]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise QtoolkitError(f"unknown rounding parameter(s) {', '.join(map(repr, unknown))}: valid are "
                                f"{', '.join(valid)}")
        return cls(granularity=granularity, **data)

    def beta(self, iteration: int) -> float | None:
        """The regulariser's exponent at `iteration`, or None during the warm-up (no regulariser)."""
        start = self.warmup * self.iterations
        if iteration < start:
            return None
        progress = (iteration - start) / max(self.iterations - start, 1)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1.0 - progress)


def reconstruction_units(model: nn.Module, granularity: str,
                         block_types: tuple[type, ...]) -> dict[str, list[QuantLayer]]:
    """Unit name -> its layers with quantized weights. A block is the outermost module of `block_types`
    around a layer; a layer inside none (or every layer, for granularity "layer") is its own unit."""
    blocks = [name for name, m in model.named_modules() if isinstance(m, block_types)] if granularity == "block" else []
    units: dict[str, list[QuantLayer]] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer) and m.weight_quantizer is not None:
            outer = [b for b in blocks if name.startswith(b + ".")]
            units.setdefault(min(outer, key=len) if outer else name, []).append(m)
    return units


def _select(value: Any, rows: torch.Tensor, num: int) -> Any:
    """The rows `rows` of every per-sample tensor (dim 0 of size `num`) inside `value`."""
    if torch.is_tensor(value):
        return value[rows] if value.ndim > 0 and value.shape[0] == num else value
    if isinstance(value, (tuple, list)):
        return type(value)(_select(v, rows, num) for v in value)
    if isinstance(value, dict):
        return {k: _select(v, rows, num) for k, v in value.items()}
    return value


def _output_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # BRECQ's loss: squared error summed over dim 1 (channels), averaged over the rest, so that
    # round_weight = 0.01 weighs the regulariser as it does there.
    return (output - target).pow(2).sum(1).mean()


def _first_tensor(output: Any) -> torch.Tensor:
    return output if torch.is_tensor(output) else output[0]


def _mean_squared_error(block: nn.Module, args: tuple, kwargs: dict, target: torch.Tensor) -> float:
    num, total = len(target), 0.0
    with torch.no_grad():
        for start in range(0, num, CAPTURE_BATCH):
            rows = torch.arange(start, min(start + CAPTURE_BATCH, num))
            out = _first_tensor(block(*_select(args, rows, num), **_select(kwargs, rows, num)))
            total += float((out - target[rows]).pow(2).sum())
    return total / target.numel()


def _reconstruct_unit(block: nn.Module, layers: list[QuantLayer], args: tuple, kwargs: dict, target: torch.Tensor,
                      settings: ReconstructionSettings, generator: torch.Generator) -> None:
    """Train the AdaRound variables of `layers` on the block's output; fold the result into the weights."""
    frozen = {layer: layer.weight_quantizer for layer in layers}
    rounders = {layer: AdaRoundWeight(layer.weight, layer.weight_params) for layer in layers}
    num = len(target)
    try:
        for layer, rounder in rounders.items():
            layer.weight_quantizer = rounder
        optimizer = torch.optim.Adam([r.alpha for r in rounders.values()], lr=settings.lr)
        for iteration in range(settings.iterations):
            rows = torch.randint(num, (min(settings.batch_size, num),), generator=generator)
            with torch.enable_grad():
                out = _first_tensor(block(*_select(args, rows, num), **_select(kwargs, rows, num)))
                loss = _output_error(out, target[rows])
                beta = settings.beta(iteration)
                if beta is not None:
                    loss = loss + settings.round_weight * sum(r.regularizer(beta) for r in rounders.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            for layer, rounder in rounders.items():
                layer.weight.copy_(rounder.hard_weight().to(layer.weight.dtype))
    finally:
        for layer, quantizer in frozen.items():
            layer.weight_quantizer = quantizer


def reconstruct(qmodel: nn.Module, fp_model: nn.Module, inputs: tuple[torch.Tensor, ...],
                settings: ReconstructionSettings | None = None, block_types: tuple[type, ...] | None = None,
                progress: bool = True) -> list[dict]:
    """BRECQ / AdaRound on a frozen quantized model, in place; returns one summary per unit.

    qmodel: the output of freeze(model) (scales fixed); fp_model: the full-precision model it was made from
    (same module names); inputs: the calibration inputs as the models' positional arguments, each with the
    samples in dim 0 (for a UNet: (x_t, t)). block_types: the block classes (default: diffusers' blocks,
    qtoolkit.models.blocks.RECONSTRUCTION_BLOCKS). Each summary has the unit's name, its layers, and its output mean squared error
    on the reconstruction inputs with round-to-nearest and with the learned rounding.
    """
    settings = settings or ReconstructionSettings()
    block_types = RECONSTRUCTION_BLOCKS if block_types is None else block_types
    units = reconstruction_units(qmodel, settings.granularity, block_types)
    if not units:
        raise QtoolkitError("reconstruction learns the rounding of quantized weights, and this model has none: "
                          "quantize with weight_bits set (e.g. 8 or 4)")
    if not all(layer.is_frozen for layers in units.values() for layer in layers):
        raise QtoolkitError("reconstruction needs fixed scales: calibrate the model and call freeze(model) first")
    fp_modules = fp_twins(fp_model, units)
    generator = torch.Generator().manual_seed(settings.seed)  # draws the subset, then the training batches
    inputs = random_subset(inputs, settings.samples, generator)
    batch_sizes = [len(x) for x in torch.split(inputs[0], CAPTURE_BATCH)]

    q_modules = dict(qmodel.named_modules())
    order = execution_order(qmodel, list(units), inputs)
    requires_grad = {p: p.requires_grad for p in qmodel.parameters()}
    qmodel.requires_grad_(False)
    summaries = []
    try:
        for name in track(order, f"reconstruct ({settings.granularity})", unit="unit", disable=not progress):
            block, layers = q_modules[name], units[name]
            args, kwargs = concat_batches(run_until(qmodel, block, inputs, want_output=False), batch_sizes)
            target = concat_batches(run_until(fp_model, fp_modules[name], inputs, want_output=True), batch_sizes)
            nearest = _mean_squared_error(block, args, kwargs, target)
            _reconstruct_unit(block, layers, args, kwargs, target, settings, generator)
            summaries.append({"unit": name, "layers": [layer.quant_name for layer in layers],
                              "mse_nearest": nearest, "mse_learned": _mean_squared_error(block, args, kwargs, target)})
    finally:
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
    return summaries


def rounding_method(name: str, granularity: str, description: str) -> RoundingMethod:
    """The record of a reconstruction at `granularity` ("layer": AdaRound, "block": BRECQ), which the adaround and
    brecq plugins register: the method fixes the granularity, the recipe's params set the rest."""
    return RoundingMethod(name=name, apply=reconstruct, description=description,
                          settings=lambda params: ReconstructionSettings.from_dict(params, granularity=granularity))
