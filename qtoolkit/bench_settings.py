"""The settings of the int8 benchmark (`qtoolkit bench`, benchmarks/int8_speed.py) and the command-line options
that set them, apart from the benchmark itself (qtoolkit.engines.benchmark) so that `qtoolkit --help` lists them
without importing torch.

Foundation layer: imports errors (and typer) only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from .errors import QtoolkitError

# The peers' int8 recipes the benchmark compares with, by name (qtoolkit.engines.peers builds each).
PEER_NAMES = ("pytorch-bf16-compile", "openvino-int8-nncf", "onnxruntime-int8-static", "pt2e-x86-inductor")


@dataclass
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 16, 64)
    iterations: int = 10
    warmup: int = 1
    threads: int = 2
    sample_steps: int = 20  # 0 skips the sampling measurement
    sample_num: int = 16
    sample_iterations: int = 3
    quality_steps: int = 20  # DDIM steps of the per-step SQNR chains
    quality_num: int = 8  # held-out chains for the per-step SQNR (0 skips it)
    peers: tuple[str, ...] = PEER_NAMES
    backends: tuple[str, ...] = ()  # only these of qtoolkit's own backends (and FP32 eager, always); empty: all
    memory: bool = True  # peak memory of each backend, in a process of its own (Linux)
    memory_repeats: int = 3  # fresh processes per backend; the median is reported
    seed: int = 0

    def __post_init__(self) -> None:
        positive = {"batch size": min(self.batch_sizes, default=0), "iterations": self.iterations,
                    "threads": self.threads, "sample num": self.sample_num,
                    "sample iterations": self.sample_iterations, "memory repeats": self.memory_repeats}
        for what, value in positive.items():
            if value < 1:
                raise QtoolkitError(f"{what} must be at least 1, got {value}")
        if self.warmup < 0 or self.sample_steps < 0 or self.quality_num < 0:
            raise QtoolkitError("warmup, sample steps and quality num cannot be negative")
        if self.quality_num and self.quality_steps < 1:
            raise QtoolkitError(f"quality steps must be at least 1, got {self.quality_steps}")
        unknown = [name for name in self.peers if name not in PEER_NAMES]
        if unknown:
            raise QtoolkitError(f"unknown peer {unknown[0]!r}: choose among {', '.join(PEER_NAMES)}")


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in _name_list(text)]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers, e.g. 1,16,64") from None


def _options(defaults: BenchSettings) -> dict[str, tuple[type, Any, Any]]:
    """The benchmark's options: parameter name -> (type, default, typer option)."""
    d = defaults
    return {
        "batch_sizes": (str, ",".join(map(str, d.batch_sizes)),
                        typer.Option(help="batch sizes of the UNet forward, comma-separated")),
        "iterations": (int, d.iterations, typer.Option(help="timed forwards per backend and batch size")),
        "warmup": (int, d.warmup, typer.Option(help="untimed forwards before each timed one (warm caches, as in a "
                                               "sampler's back-to-back calls)")),
        "threads": (int, d.threads, typer.Option(help="threads of every backend")),
        "sample_steps": (int, d.sample_steps, typer.Option(help="DDIM steps of the sampling measurement (0 skips "
                                                           "it)")),
        "sample_num": (int, d.sample_num, typer.Option(help="samples drawn, as one batch")),
        "sample_iterations": (int, d.sample_iterations, typer.Option(help="timed sampling runs per backend")),
        "quality_steps": (int, d.quality_steps, typer.Option(help="DDIM steps of the held-out chains of the "
                                                             "per-step SQNR")),
        "quality_num": (int, d.quality_num, typer.Option(help="held-out chains of the per-step SQNR (0 skips it)")),
        "peers": (str, ",".join(d.peers), typer.Option(help="the peers' recipes to compare with, comma-separated "
                                                       f"(default: all of {', '.join(PEER_NAMES)}; none: --peers '')")),
        "backends": (str, ",".join(d.backends), typer.Option(help="only these of qtoolkit's backends, comma-separated "
                                                             "(e.g. torch-int8-fbgemm,openvino-int8; default: all that "
                                                             "run here); FP32 eager is always timed")),
        "memory": (bool, d.memory, typer.Option("--memory/--no-memory", help="measure each backend's peak memory "
                                                "(one fresh process per backend, which rebuilds it)")),
        "memory_repeats": (int, d.memory_repeats, typer.Option(help="fresh processes per backend for the peak "
                                                               "memory; the median is reported")),
        "seed": (int, d.seed, typer.Option(help="seed of the inputs and held-out chains")),
    }


def bench_options(**defaults):
    """Decorator of a typer command: adds the benchmark's options (`qtoolkit bench`, benchmarks/int8_speed.py),
    which the command receives as one BenchSettings `settings`. `defaults` changes the options' defaults."""
    options = _options(BenchSettings(**defaults))

    def decorate(command):
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "settings"]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                   annotation=Annotated[kind, option])
                 for name, (kind, default, option) in options.items()]

        def with_settings(**kwargs):
            values = {name: kwargs.pop(name) for name in options}
            values["batch_sizes"] = tuple(_int_list(values["batch_sizes"]))
            values["peers"] = tuple(_name_list(values["peers"]))
            values["backends"] = tuple(_name_list(values["backends"]))
            return command(settings=BenchSettings(**values), **kwargs)

        with_settings.__name__, with_settings.__doc__ = command.__name__, command.__doc__
        with_settings.__signature__ = inspect.Signature(own + added)
        return with_settings
    return decorate
