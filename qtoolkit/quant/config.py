"""QuantConfig: what to quantize and how, validated on construction and serialisable to JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from fnmatch import fnmatchcase

from ..errors import QtoolkitError
from .observers import ACTIVATION_OBSERVERS, WEIGHT_OBSERVERS
from .quantizer import check_bits

GRANULARITIES = ("per_channel", "per_tensor")

# Layers kept in full precision by default (REFERENCE.md): NVIDIA ModelOpt's diffusion defaults exclude
# the timestep-embedding path (time_embedding, time_emb_proj) and the first and last convolutions. The
# timestep path is tiny (one vector per sample, not per pixel: no speed to gain) but its error shifts
# every feature map at every step, and the sinusoidal embedding is known to lose accuracy at large t in
# low precision. conv_in sees 1-3 input channels (negligible compute) and conv_out writes the predicted
# noise that the sampler consumes directly. ModelOpt also keeps conv_shortcut, and so does qtoolkit: the 1x1
# shortcut convolutions of the resnets that change width (in the decoder they read the raw skip
# concatenation, two parts with different ranges) are a small share of the compute, and quantizing their
# input puts a quantize node where the same tensor also feeds a GroupNorm, which an engine cannot fuse
# into anything. Measured on the bundled model (W8A8 NDTC + bias correction, OpenVINO): keeping them raises
# the mean per-step SQNR from 41.3 to 43.0 dB and runs 3% faster with bf16 float parts, 8-10% slower with
# FP32 float parts, where they run as FP32 convolutions (README).
# Set `exclude=[]` to quantize everything, as PTQ4DM's code did.
SHORTCUT_PATTERN = "*conv_shortcut"
DEFAULT_EXCLUDE = ("time_embedding.*", "*time_emb_proj", "conv_in", "conv_out", SHORTCUT_PATTERN)


def default_exclude(split_shortcuts: bool) -> list[str]:
    """DEFAULT_EXCLUDE, less the shortcut convolutions when split_shortcuts asks to quantize them (per part)."""
    return [p for p in DEFAULT_EXCLUDE if not (split_shortcuts and p == SHORTCUT_PATTERN)]


@dataclass
class QuantConfig:
    """How to quantize a diffusion model (defaults: W8A8 as evaluated in PTQ4DM, int8-exportable).

    weight_bits / activation_bits: 2..8, or None to keep weights / activations in full precision.
    weight_granularity: "per_channel" (one scale per output channel; default, as in PTQ4DM's code and
        what int8 backends support for weights) or "per_tensor". Activations are always per tensor: a
        per-channel activation scale would sit on the reduction axis of the integer GEMM.
    weight_symmetric: True (default): signed, zero point 0, so the int8 GEMM needs no weight zero-point term.
    activation_symmetric: False (default): unsigned with a zero point, so one-sided activations (after
        SiLU, softmax) use the whole grid and int8 backends get the u8 activations they want.
    weight_observer: "mse" (default; Lp search per channel on the weight itself) or "minmax".
    activation_observer: "mse" (default; Lp search on a streaming histogram of all calibration batches),
        "percentile" or "minmax".
    mse_p: the p of the Lp error minimised by the "mse" observers; 2.4 as chosen in PTQ4DM (paper
        Table 4, and its reference code); 2.0 gives plain MSE.
    percentile: for the "percentile" activation observer, clip to [100 - percentile, percentile].
    quantize_attention_matmuls: also quantize the operands of Q.K^T (Q, K) and softmax.V (the softmax
        output, V), as Q-Diffusion does. Off by default: PTQ4DM's code keeps them in full precision and
        common int8 toolchains do not run attention in int8.
    quantize_conv_outputs: also quantize the output of every quantized Conv2d (per tensor, like its input)
        and its bias to int32 codes on the grid input scale x weight scale. An engine can then run the whole
        layer as one integer convolution with an 8-bit output: ONNX Runtime fuses DequantizeLinear -> Conv ->
        QuantizeLinear into QLinearConv only in that form, and leaves convolutions in FP32 otherwise. It adds
        one rounding per convolution. PTQ4DM's reference code quantizes layer outputs as well. Off by
        default; needs weight_bits and activation_bits.
    split_shortcuts: Q-Diffusion's shortcut splitting. The 1x1 shortcut convolutions of a UNet's decoder read
        the raw concatenation of the decoder's features and the encoder's skip, two parts with different
        ranges; each part gets its own input scale and zero point (which layers and where they split:
        qtoolkit.models.blocks.skip_concat_splits). The int8 export runs such a layer as two integer
        convolutions, one per part, summed. Off by default; not with quantize_conv_outputs (an int32 bias
        grid needs one input scale).
    include / exclude: fnmatch patterns on module names (e.g. "down_blocks.*.resnets.*.conv1"). A Conv2d or
        Linear layer (or an attention module, for the matmuls) is quantized when it matches an include
        pattern and no exclude pattern. Every pattern must match something in the model. The default
        exclude is DEFAULT_EXCLUDE (less conv_shortcut with split_shortcuts, which quantizes those layers).
    """

    weight_bits: int | None = 8
    activation_bits: int | None = 8
    weight_granularity: str = "per_channel"
    weight_symmetric: bool = True
    activation_symmetric: bool = False
    weight_observer: str = "mse"
    activation_observer: str = "mse"
    mse_p: float = 2.4
    percentile: float = 99.99
    quantize_attention_matmuls: bool = False
    quantize_conv_outputs: bool = False
    split_shortcuts: bool = False
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] | None = None  # None: default_exclude(split_shortcuts)

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        check_bits(self.activation_bits, "activation_bits")
        _check_choice(self.weight_granularity, GRANULARITIES, "weight_granularity")
        _check_choice(self.weight_observer, WEIGHT_OBSERVERS, "weight_observer")
        _check_choice(self.activation_observer, ACTIVATION_OBSERVERS, "activation_observer")
        for name in ("weight_symmetric", "activation_symmetric", "quantize_attention_matmuls", "quantize_conv_outputs",
                     "split_shortcuts"):
            if not isinstance(getattr(self, name), bool):
                raise QtoolkitError(f"{name} = {getattr(self, name)!r} must be true or false")
        if isinstance(self.mse_p, bool) or not isinstance(self.mse_p, (int, float)) or not self.mse_p > 0:
            raise QtoolkitError(f"mse_p = {self.mse_p!r} must be a positive number (2.4 in PTQ4DM, 2 for plain MSE)")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 50 < self.percentile <= 100:
            raise QtoolkitError(f"percentile = {self.percentile!r} must be in (50, 100], e.g. 99.99")
        if self.quantize_attention_matmuls and self.activation_bits is None:
            raise QtoolkitError("quantize_attention_matmuls needs activation_bits: set activation_bits (e.g. 8) "
                              "or turn quantize_attention_matmuls off")
        if self.quantize_conv_outputs and (self.activation_bits is None or self.weight_bits is None):
            raise QtoolkitError("quantize_conv_outputs needs weight_bits and activation_bits (the int32 bias grid is "
                              "input scale x weight scale): set both, or turn quantize_conv_outputs off")
        if self.split_shortcuts and (self.activation_bits is None or self.quantize_conv_outputs):
            raise QtoolkitError("split_shortcuts splits the input quantizer of the skip-concatenation layers: it needs "
                              "activation_bits and cannot be combined with quantize_conv_outputs (one int32 bias grid "
                              "needs one input scale); turn one of them off")
        if self.exclude is None:
            self.exclude = default_exclude(self.split_shortcuts)
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
                raise QtoolkitError(f"{name} = {patterns!r} must be a list of non-empty name patterns, e.g. ['conv_in']")
            setattr(self, name, list(patterns))

    def select(self, names: list[str]) -> list[str]:
        """The names to quantize among `names`; a pattern that matches none of them is an error."""
        for kind, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(fnmatchcase(name, pattern) for name in names):
                    examples = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                    raise QtoolkitError(
                        f"{kind} pattern {pattern!r} matches no quantizable layer of this model "
                        f"(layers are named like: {examples or 'none found'}): fix or remove the pattern"
                    )
        return [name for name in names
                if any(fnmatchcase(name, p) for p in self.include)
                and not any(fnmatchcase(name, p) for p in self.exclude)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        if not isinstance(data, dict):
            raise QtoolkitError(f"a quantization config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QtoolkitError(f"unknown quantization config keys {unknown}: valid keys are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise QtoolkitError(f"quantization config is not valid JSON ({e})") from None
        return cls.from_dict(data)


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise QtoolkitError(f"{name} = {value!r} is not known: choose one of {', '.join(choices)}")
