"""Bias correction: shift each quantized layer's bias so that the mean of its output matches full precision.

Quantization error is not zero-mean. Clipped activation ranges, rounding of skewed (post-SiLU) inputs and the
nonlinearities that earlier layers' errors pass through all move the mean of a layer's output (Nagel et al.,
ICCV 2019, "empirical bias correction"; NNCF applies a form of it by default). A classifier shrugs off such
a shift; a diffusion sampler does not: the network is called at every step of the chain and its small
systematic error is added every time in the same direction, where its random error partly cancels.

For every convolution and linear layer with a bias, in execution order: the per-output-channel mean of its
output in the full-precision model, minus the same mean in the quantized model (earlier layers already
corrected, so each correction also absorbs the mean error its inputs still carry), is added to its bias.
Layers kept in full precision are corrected too: after the last quantized layer, a UNet's GroupNorm, SiLU
and float conv_out still turn the remaining noise into a shift of the predicted noise, which only conv_out's
bias can take back (layers that see no quantization error upstream, e.g. the timestep embedding, get zero). Means are taken over a
seeded random subset of the calibration inputs, and so over the timesteps the calibration strategy chose.

The correction changes only float biases: a corrected model saves, reloads and exports like any other (with
quantize_conv_outputs the bias is rounded to its int32 grid as before).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import QtoolkitError
from ..progress import track
from .capture import CAPTURE_BATCH, execution_order, fp_twins, random_subset, run_until
from .layers import QuantLayer

DEFAULT_SAMPLES = 256


def check_samples(samples: int) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise QtoolkitError(f"bias correction samples = {samples!r} must be a positive integer")


class _ChannelMean:
    """Running per-output-channel mean of a layer's outputs (channels: dim 1 of a convolution's output, the
    last dim of a linear layer's)."""

    def __init__(self, layer: nn.Module):
        self.channel_dim = 1 if isinstance(layer, nn.Conv2d) else -1
        self.total: torch.Tensor | float = 0.0
        self.count = 0

    def add(self, output: torch.Tensor) -> None:
        flat = output.movedim(self.channel_dim, -1).reshape(-1, output.shape[self.channel_dim]).double()
        self.total = self.total + flat.sum(0)
        self.count += flat.shape[0]

    @property
    def value(self) -> torch.Tensor:
        return self.total / self.count


def _fp_means(fp_model: nn.Module, layers: dict[str, nn.Module], inputs: tuple[torch.Tensor, ...]) -> dict:
    """Per-channel output means of the full-precision twins of `layers`, all from the same forward passes."""
    fp_modules = fp_twins(fp_model, layers)
    means = {name: _ChannelMean(layer) for name, layer in layers.items()}
    hooks = [fp_modules[name].register_forward_hook(lambda _m, _a, out, name=name: means[name].add(out))
             for name in layers]
    try:
        with torch.no_grad():
            for start in range(0, len(inputs[0]), CAPTURE_BATCH):
                fp_model(*(x[start:start + CAPTURE_BATCH] for x in inputs))
    finally:
        for hook in hooks:
            hook.remove()
    unseen = [name for name, mean in means.items() if not mean.count]
    if unseen:
        raise QtoolkitError(f"the layer {unseen[0]!r} was not called in a forward pass of the full-precision model: "
                          "pass the model that was quantized")
    return {name: mean.value for name, mean in means.items()}


def correct_bias(qmodel: nn.Module, fp_model: nn.Module, inputs: tuple[torch.Tensor, ...],
                 samples: int = DEFAULT_SAMPLES, seed: int = 0, progress: bool = True) -> list[dict]:
    """Bias correction of a frozen quantized model, in place; returns one summary per layer with a bias.

    qmodel: the output of freeze(model) (after reconstruct, if used); fp_model: the full-precision model it
    was made from (same module names); inputs: the calibration inputs as the models' positional arguments,
    samples in dim 0 (for a UNet: (x_t, t)), of which a seeded random subset of `samples` is used. Each
    summary has the layer's name and the root-mean-square over channels of its output's mean error before
    the correction (after it, that error is zero on these inputs).
    """
    check_samples(samples)
    quantized = [m for m in qmodel.modules() if isinstance(m, QuantLayer)]
    if not quantized or not all(layer.is_frozen for layer in quantized):
        raise QtoolkitError("bias correction needs a quantized model with fixed scales: quantize(model, config), "
                          "calibrate it and call freeze(model) first")
    layers = {name: m for name, m in qmodel.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None}
    inputs = random_subset(inputs, samples, torch.Generator().manual_seed(seed))
    targets = _fp_means(fp_model, layers, inputs)
    summaries = []
    for name in track(execution_order(qmodel, list(layers), inputs), "bias correction", unit="layer",
                      disable=not progress):
        mean = _ChannelMean(layers[name])
        for output in run_until(qmodel, layers[name], inputs, want_output=True):
            mean.add(output)
        error = targets[name] - mean.value
        with torch.no_grad():
            layers[name].bias.add_(error.to(layers[name].bias.dtype))
        summaries.append({"layer": name, "mean_error_rms": float(error.pow(2).mean().sqrt())})
    return summaries
