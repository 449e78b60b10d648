"""QuantConfig: what to quantize and how, validated on construction and serialisable to JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from .. import plugins
from ..errors import QtoolkitError
from .observers import observer_for
from .overflow import FIXED_WEIGHT_BITS, WEIGHTS_7BIT, check_choice, resolve_overflow_fix
from .quantizer import check_bits

GRANULARITIES = ("per_channel", "per_tensor")
MAX_TIMESTEP_GROUPS = 64

# The graph rules that keep ops in full precision (qtoolkit.graph.patterns says what each matches and why):
# NVIDIA ModelOpt's diffusion defaults, found on the captured graph instead of by module name.
FLOAT_RULES = ("timestep-path", "first-layer", "last-layer", "shortcut")
SHORTCUT_RULE = "shortcut"


def default_keep_float(split_shortcuts: bool) -> list[str]:
    """FLOAT_RULES, less the shortcut convolutions when split_shortcuts asks to quantize them (per part)."""
    return [rule for rule in FLOAT_RULES if not (split_shortcuts and rule == SHORTCUT_RULE)]


def boundary_rule(name: str | None):
    """The installed timestep boundary rule `name` (None: the one a plugin registers as the default)."""
    if name is not None:
        return plugins.timestep_boundaries(name)  # unknown: one line naming the installed ones
    records = plugins.registry().records["register_timestep_boundaries"]
    defaults = [record for record in records.values() if record.default]
    if len(defaults) != 1:
        raise QtoolkitError(f"timestep_boundaries is not set and {len(defaults) or 'no'} installed rules are registered "
                            f"as the default: set timestep_boundaries to one of: {', '.join(sorted(records)) or 'none'}")
    return defaults[0]


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
    weight_observer / activation_observer: a registered observer (plugins, hook register_observers) that can
        observe weights / activations; None (default): the one a plugin registers as that role's default, which
        construction fills in. Built in: "mse" (the default for both; PTQ4DM's Lp range search, per channel on
        the weight itself, on a streaming histogram of all calibration batches for activations), "minmax", and
        "percentile" for activations.
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
    split_shortcuts: Q-Diffusion's shortcut splitting. A convolution that reads the raw channel concatenation of
        two feature maps (a UNet decoder's features and the encoder's skip: a graph pattern, see
        qtoolkit.graph.patterns.concat_split) gets one input scale and zero point per part. The int8 export runs
        such a layer as two integer convolutions, one per part, summed. Off by default; not with
        quantize_conv_outputs (an int32 bias grid needs one input scale).
    keep_float: the graph rules whose ops stay in full precision (FLOAT_RULES; default all of them, less
        "shortcut" with split_shortcuts, which quantizes those convolutions per part); [] to quantize every op
        the patterns select, as PTQ4DM's code did.
    overflow_fix: "auto" (default), "none", "weight-pairs" or "weights-7bit": how 8-bit weights keep x86 CPUs without
        VNNI, whose int8 kernels add pairs of u8 x s8 products in a saturating int16, computing the deployed model
        exactly (qtoolkit.quant.overflow says why): "weight-pairs" limits the pairs of codes the kernels add to
        128, "weights-7bit" puts every weight on the 7-bit grid [-63, 63] (asymmetric weights, which the pair
        limit does not cover, get it for "weight-pairs"). "auto" is resolved on construction from
        target_cpu; the resolved value is what the config holds, saves and reports. Only W8A8 can saturate:
        any other quantization resolves to "none".
    target_cpu: for "auto": "host" (default: the CPU this runs on, including FBGEMM_ENABLE_INSTRUCTIONS /
        ONEDNN_MAX_CPU_ISA forcing its AVX2 code), "any" (right on every CPU: the fix) or "vnni" (VNNI/AMX CPUs
        and ARM only: no fix).
    timestep_groups: 1 (default): one activation scale and zero point per quantizer, for every timestep. G > 1
        (up to 64): the timesteps [0, T) are split into G contiguous groups and every activation quantizer gets one
        scale and zero point per group, observed on that group's calibration inputs only; the network picks its
        group from the timestep it is called with (qtoolkit.quant.timestep_groups). Weights keep one set.
    timestep_boundaries: the rule that places the groups' boundaries (a plugin, hook register_timestep_boundaries):
        "even" (equal timestep ranges; the rule the built-in plugin registers as the default, which construction
        fills in when timestep_groups > 1) or "min-step" (where the layers' observed ranges change, from one
        full-precision pass over the calibration set).
    include / exclude: fnmatch patterns on the module path of each op (e.g. "down_blocks.*.resnets.*.conv1";
        an attention's path is its attention module's). An op is quantized when its path matches an include
        pattern, no exclude pattern, and no keep_float rule matches it. Every pattern must match an op.
    """

    weight_bits: int | None = 8
    activation_bits: int | None = 8
    weight_granularity: str = "per_channel"
    weight_symmetric: bool = True
    activation_symmetric: bool = False
    weight_observer: str | None = None  # None: the registered default (filled in on construction)
    activation_observer: str | None = None
    mse_p: float = 2.4
    percentile: float = 99.99
    quantize_attention_matmuls: bool = False
    quantize_conv_outputs: bool = False
    split_shortcuts: bool = False
    overflow_fix: str = "auto"  # resolved on construction: "none", "weight-pairs" or "weights-7bit"
    target_cpu: str = "host"
    timestep_groups: int = 1
    timestep_boundaries: str | None = None  # None: the registered default rule, filled in when timestep_groups > 1
    keep_float: list[str] | None = None  # None: default_keep_float(split_shortcuts)
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        check_bits(self.activation_bits, "activation_bits")
        check_choice(self.weight_granularity, GRANULARITIES, "weight_granularity")
        self.overflow_fix = resolve_overflow_fix(self.overflow_fix, self.target_cpu, self.weight_bits,
                                                 self.activation_bits, self.weight_symmetric)
        self.weight_observer = observer_for("weight", self.weight_observer).name
        self.activation_observer = observer_for("activation", self.activation_observer).name
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
        self._check_timestep_groups()
        if self.keep_float is None:
            self.keep_float = default_keep_float(self.split_shortcuts)
        if isinstance(self.keep_float, str) or any(rule not in FLOAT_RULES for rule in self.keep_float):
            raise QtoolkitError(f"keep_float = {self.keep_float!r} must be a list of rules among {', '.join(FLOAT_RULES)}")
        self.keep_float = list(self.keep_float)
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
                raise QtoolkitError(f"{name} = {patterns!r} must be a list of non-empty name patterns, e.g. ['conv_in']")
            setattr(self, name, list(patterns))

    def _check_timestep_groups(self) -> None:
        groups = self.timestep_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= MAX_TIMESTEP_GROUPS:
            raise QtoolkitError(f"timestep_groups = {groups!r} must be an integer from 1 (one scale for every "
                                f"timestep) to {MAX_TIMESTEP_GROUPS}")
        if groups > 1 or self.timestep_boundaries is not None:
            self.timestep_boundaries = boundary_rule(self.timestep_boundaries).name
        if groups > 1 and self.activation_bits is None:
            raise QtoolkitError("timestep_groups gives activations one scale per group of timesteps, and this config "
                                "quantizes no activation: set activation_bits, or timestep_groups 1")
        if groups > 1 and self.split_shortcuts:
            raise QtoolkitError("timestep_groups cannot be combined with split_shortcuts yet (a split input's two "
                                "ranges per group): turn one of them off")

    @property
    def grouped(self) -> bool:
        """Whether activations have one scale and zero point per timestep group."""
        return self.timestep_groups > 1

    @property
    def weight_grid_bits(self) -> int | None:
        """The bits of the weights' integer grid: weight_bits, or 7 where overflow_fix keeps 8-bit weights off
        the values that saturate."""
        return FIXED_WEIGHT_BITS if self.overflow_fix == WEIGHTS_7BIT else self.weight_bits

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        if not isinstance(data, dict):
            raise QtoolkitError(f"a quantization config must be a JSON object, got {type(data).__name__}")
        # A config saved before overflow_fix existed was quantized on full 8-bit grids: "auto" could resolve to
        # another grid than its frozen scales were computed on.
        data = {"overflow_fix": "none", **data}
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
