"""The int8 arithmetic of x86 CPUs without VNNI, and the quantization grid that keeps it exact.

An int8 convolution or linear multiplies uint8 activation codes by int8 weight codes and sums the products in int32.
CPUs with VNNI (AVX-512 VNNI, AMX) do that in one instruction, exactly. Without VNNI (AVX2-only CPUs such as AMD
Zen 2/3 and older Intel; AVX-512 without VNNI, such as Skylake-SP), fbgemm, oneDNN, ONNX Runtime and OpenVINO use
`vpmaddubsw`, which adds each *pair* of products into a saturating int16 first: 255 x 127 x 2 = 64,770 does not fit
in 32,767, so a layer whose activations and weights both use their full 8-bit range clips silently, and the deployed
model is no longer the model the fake-quant simulation measured (10-20 dB of per-step SQNR on test UNets).

The fix is part of the quantization, so the simulation models it exactly (QuantConfig.overflow_fix):

- "weight-pairs": 8-bit weights whose codes, taken two by two as the kernels pair them, never sum to more than
  128 in magnitude with the same sign: 255 x 128 = 32,640 fits. Only the pairs of two large same-sign weights
  move (to the nearest pair on the limit); every other weight keeps its 8-bit code. The kernels pair adjacent
  input channels at each kernel tap (fbgemm, ONNX Runtime's MLAS and oneDNN in PyTorch and OpenVINO lay a
  convolution's weights out as (tap, input channel) with channels innermost), or, where a part has an odd
  number of input channels, adjacent elements of that flattened order: `limit_pairs` holds both.
- "weights-7bit": 8-bit weights on the 7-bit grid [-63, 63]: 255 x 63 x 2 = 32,130 fits, whatever the pairing.
  NNCF's OverflowFix and OpenVINO's documented workaround do this; it costs more than the pair limit (every
  weight loses a bit), and less than 7-bit activations (PyTorch's and ONNX Runtime's `reduce_range`).
- "none": full 8-bit grids: exact on CPUs with VNNI and on ARM (qnnpack and ARM int8 kernels widen before adding).
- "auto" (the default) chooses from QuantConfig.target_cpu: "host" (the CPU the job runs on), "any" (a model that
  must be right everywhere: always the fix) or "vnni" (a model for VNNI/AMX CPUs only: never the fix).

Either fix leaves the codes int8, so every backend runs them unchanged.

`int8_products_saturate()` reads the host from /proc/cpuinfo's flags, and from the two variables that force the
int8 libraries onto their AVX2 code on any CPU (FBGEMM_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA), so that a VNNI or
AMX machine can reproduce what an AVX2 user gets.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

import torch

from ..errors import QtoolkitError

log = logging.getLogger(__name__)

AUTO = "auto"
NONE = "none"
WEIGHT_PAIRS = "weight-pairs"
WEIGHTS_7BIT = "weights-7bit"
OVERFLOW_FIXES = (AUTO, NONE, WEIGHT_PAIRS, WEIGHTS_7BIT)
TARGET_CPUS = ("host", "any", "vnni")
# The weight grid that cannot saturate a u8 x s8 pair sum in int16: 255 x 63 x 2 <= 32,767.
FIXED_WEIGHT_BITS = 7
# The largest magnitude of the sum of two same-sign weight codes that an int16 holds against any pair of u8
# activation codes: 255 x 128 = 32,640 <= 32,767 (and -32,640 >= -32,768); 129 would not fit.
PAIR_LIMIT = 128

# The CPU flags (Linux /proc/cpuinfo names) of an int8 dot product that accumulates in int32 without an int16 step.
# AVX-VNNI (avx_vnni, 256-bit, Alder Lake and later) is not among them: fbgemm has no kernel for it and uses
# vpmaddubsw there, so those CPUs count as saturating (the fix costs little; a wrong model costs much more).
VNNI_FLAGS = ("avx512_vnni", "amx_int8")
# The values of the libraries' ISA-forcing variables that select code without VNNI (case-insensitive).
FBGEMM_ENV, ONEDNN_ENV = "FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"
FBGEMM_WITHOUT_VNNI = ("AVX2", "AVX512", "AVX512_256")
ONEDNN_WITHOUT_VNNI = ("SSE41", "AVX", "AVX2", "AVX512_CORE")
FORCED_AVX2 = {FBGEMM_ENV: "AVX2", ONEDNN_ENV: "AVX2"}  # what a VNNI/AMX machine sets to run the AVX2 paths


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where there is none to read (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def int8_capability() -> tuple[bool, str]:
    """(whether the host's x86 int8 kernels saturate u8 x s8 pair sums in int16, the capability in words)."""
    if not _is_x86():
        return False, f"{platform.machine()} (no x86 int16 pair step)"
    forced = [f"{name}={os.environ[name]}" for name, values in ((FBGEMM_ENV, FBGEMM_WITHOUT_VNNI),
                                                                 (ONEDNN_ENV, ONEDNN_WITHOUT_VNNI))
              if os.environ.get(name, "").upper() in values]
    if forced:
        return True, f"int8 kernels forced onto code without VNNI by {' and '.join(forced)}"
    flags = _cpu_flags()
    if flags is None:  # no flags to read: assume the common case without VNNI, which the fix makes exact
        return True, f"{_aten_capability()} (VNNI unknown: no /proc/cpuinfo)"
    vnni = [flag for flag in VNNI_FLAGS if flag in flags]
    if vnni:
        return False, f"{_aten_capability()} with {', '.join(vnni)}"
    return True, f"{_aten_capability()} without VNNI"


def _aten_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def int8_products_saturate() -> bool:
    """Whether this CPU's x86 int8 kernels saturate full-range 8-bit products (see the module docstring)."""
    return int8_capability()[0]


def check_choice(value, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise QtoolkitError(f"{name} = {value!r} is not known: choose one of {', '.join(choices)}")


def resolve_overflow_fix(fix: str, target_cpu: str, weight_bits: int | None, activation_bits: int | None,
                         weight_symmetric: bool = True) -> str:
    """The overflow fix that `fix` means for this quantization and target CPU: "auto" becomes "weight-pairs" where
    the target's kernels would saturate full 8-bit grids, else "none". A quantization that cannot saturate (weights
    or activations below 8 bits, or not quantized: 255 x 127 x 2 needs both at 8) needs no fix. The pair limit is
    one of signed codes: asymmetric weights get the 7-bit grid instead."""
    check_choice(fix, OVERFLOW_FIXES, "overflow_fix")
    check_choice(target_cpu, TARGET_CPUS, "target_cpu")
    if weight_bits != 8 or activation_bits != 8:
        return NONE
    if fix == AUTO:
        saturates = {"host": int8_products_saturate, "any": lambda: True, "vnni": lambda: False}[target_cpu]()
        fix = WEIGHT_PAIRS if saturates else NONE
    if fix == WEIGHT_PAIRS and not weight_symmetric:
        return WEIGHTS_7BIT
    return fix


def _pairs(index: torch.Tensor) -> torch.Tensor:
    """(P, 2): consecutive elements of `index`, two by two (an odd last one pairs with the kernels' zero padding)."""
    return index[:index.numel() // 2 * 2].reshape(-1, 2)


@functools.cache
def pairings(in_channels: int, taps: int, parts: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The pairs of weight elements that x86 kernels add in one int16, as (P, 2) indices into one output channel's
    weights flattened from (in_channels, *kernel) (taps = the kernel's size, 1 for a linear). `parts`: the input
    channel boundaries of the kernels that run the weight: (0, in_channels), or (0, split, in_channels) for a
    split layer, which runs as one kernel per part.

    First pairing: adjacent input channels of a part at the same tap, as fbgemm, MLAS and oneDNN pack them
    (channels innermost, a part's odd last channel against zero padding). Second, only for a part with an odd
    number of channels: adjacent elements of the part's (tap, channel) order, as an im2col GEMM over that order
    pairs them (fbgemm, MLAS), crossing taps."""
    element = torch.arange(in_channels * taps).reshape(in_channels, taps)
    by_channel, flattened = [], []
    for start, end in zip(parts, parts[1:]):
        part = element[start:end]
        by_channel.append(_pairs(part[:(end - start) // 2 * 2].reshape(-1, 2, taps).transpose(1, 2).reshape(-1)))
        if (end - start) % 2:
            flattened.append(_pairs(part.t().reshape(-1)))
    return tuple(torch.cat(pairing) for pairing in (by_channel, flattened) if pairing)


def limit_pairs(codes: torch.Tensor, targets: torch.Tensor, parts: tuple[int, ...], qmax: int) -> torch.Tensor:
    """Symmetric weight codes (float, (out, in, *kernel) or (out, in), on [-qmax, qmax]) with every pair of
    `pairings` within PAIR_LIMIT: a pair of same-sign codes whose magnitudes sum to more moves to the nearest
    pair on the limit, sharing the excess of `targets` (the unrounded codes, weight / scale) equally, without either
    code growing. Pairs within the limit keep their codes. Moving codes towards zero never breaks another pair's
    limit, so holding the pairings one after the other holds them all."""
    rows = codes.reshape(codes.shape[0], -1).clone()
    size = targets.reshape(codes.shape[0], -1).abs().clamp(max=qmax)
    for pairs in pairings(codes.shape[1], rows.shape[1] // codes.shape[1], parts):
        first, second = pairs[:, 0].to(rows.device), pairs[:, 1].to(rows.device)
        a, b = rows[:, first], rows[:, second]
        over = (a * b > 0) & ((a + b).abs() > PAIR_LIMIT)
        if not bool(over.any()):
            continue
        excess = size[:, first] + size[:, second] - PAIR_LIMIT
        # Nearest to the targets on the limit, but no code grows: a pairing held before stays held.
        kept = torch.maximum(torch.minimum(torch.round(size[:, first] - excess / 2), a.abs()), PAIR_LIMIT - b.abs())
        rows[:, first] = torch.where(over, a.sign() * kept, a)
        rows[:, second] = torch.where(over, b.sign() * (PAIR_LIMIT - kept), b)
    return rows.reshape(codes.shape)


def _can_saturate(config) -> bool:
    return config.overflow_fix == NONE and config.weight_bits == 8 and config.activation_bits == 8


def int8_arithmetic(config) -> str:
    """What a deployed model quantized with `config` (a QuantConfig) assumes of the CPU's int8 arithmetic, in words
    (the deployment folder and the ONNX export record it)."""
    if config.overflow_fix == WEIGHTS_7BIT:
        return ("8-bit weights on the 7-bit grid [-63, 63] (overflow_fix weights-7bit): no u8 x s8 pair sum can "
                "saturate int16, exact on every CPU")
    if config.overflow_fix == WEIGHT_PAIRS:
        return (f"8-bit weights whose same-sign codes sum to at most {PAIR_LIMIT} in every pair of adjacent input "
                "channels (overflow_fix weight-pairs): no u8 x s8 pair sum can saturate int16 in fbgemm, oneDNN "
                "(PyTorch, OpenVINO) or ONNX Runtime, exact on every CPU")
    if _can_saturate(config):
        return ("full 8-bit weights and activations (overflow_fix none): exact on CPUs with AVX-512 VNNI or AMX and "
                "on ARM; x86 CPUs without VNNI saturate u8 x s8 pair sums in int16 (fbgemm, oneDNN, ONNX Runtime, "
                "OpenVINO; not qnnpack)")
    return ("weights or activations below 8 bits, or in float: no u8 x s8 pair sum can saturate int16, exact on "
            "every CPU")


def saturation_warning(config, backend: str) -> str | None:
    """One line for a user about to run a model quantized with `config` (a QuantConfig) on this CPU through an int8
    backend that saturates without VNNI, when its products would clip here; None when the model is exact here."""
    if not _can_saturate(config):
        return None
    saturates, capability = int8_capability()
    if not saturates:
        return None
    return (f"this model assumes int8 products that cannot saturate (quantization.overflow_fix: none), but on this CPU "
            f"({capability}) {backend}'s int8 kernels saturate them: its outputs will differ from the model that was "
            "measured; re-quantize it with quantization.overflow_fix: auto (or weight-pairs, or target_cpu: any)")


def warn_if_saturating(config, backend) -> None:
    """One warning line when `backend` (a qtoolkit.registry.Backend) would run a model quantized with `config` (a
    QuantConfig) with int8 products that saturate on this CPU: its outputs would not be the model that was measured."""
    if config is not None and backend.saturates_without_vnni:
        message = saturation_warning(config, backend.name)
        if message:
            log.warning(message)
