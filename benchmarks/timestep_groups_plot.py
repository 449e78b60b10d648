"""The figures of the timestep-groups study: per-step error over the chain of chosen models of a calibration-study
run (benchmarks/calibration_study.py --timestep-groups ...), and, with --ranges, why groups help where they do:
the activation range (max - min over the calibration inputs at each timestep) of the quantizers whose range moves
most with t, from one FP pass over the run's calibration set.

    python benchmarks/timestep_groups_plot.py runs/tgroups-fmnist/study.json --bits W8A6 \\
        --models "ndtc+bc" "ndtc G8-min-step+bc" "ndtc G8-min-step+bcg" --out docs/tgroups-fmnist-w8a6.png
    python benchmarks/timestep_groups_plot.py --ranges runs/tgroups-fmnist/calibration/ndtc-preset-paper-s0 \\
        --out docs/tgroups-fmnist-ranges.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qtoolkit.calibration import CalibrationSet  # noqa: E402
from qtoolkit.graph import quantize  # noqa: E402
from qtoolkit.graph.capture import capture  # noqa: E402
from qtoolkit.graph.timestep_ranges import activation_ranges  # noqa: E402
from qtoolkit.models import load_diffusion_model  # noqa: E402
from qtoolkit.quant import QuantConfig  # noqa: E402
from qtoolkit.report import plot_per_timestep  # noqa: E402


def plot_study(study: Path, bits: str, models: list[str], out: Path, title: str) -> None:
    result = json.loads(study.read_text())["results"][bits]
    steps = result["per_timestep"]
    errors = {"t": steps["t"]}
    for model in models:
        (name,) = [n for n in steps if n != "t" and n.removeprefix(f"{bits} ").rsplit(" s", 1)[0] == model]
        errors[f"{model.replace('ndtc', 'NDTC')} ({result[name]['sqnr_db_mean']:.1f} / {result[name]['sqnr_db_min']:.1f} dB)"] \
            = steps[name]
    plot_per_timestep(errors, out, title)


def plot_ranges(calibration: Path, model_name: str, out: Path, shown: int) -> None:
    model = load_diffusion_model(model_name)
    graph = capture(model.denoiser(), model.sample_shape)
    qgraph = quantize(graph, QuantConfig(timestep_groups=2))  # grouped quantizers mark what is observed
    data = CalibrationSet.load(calibration)
    timesteps, ranges = activation_ranges(qgraph, graph, data.x, data.t)
    widths = {name: (r[:, 1] - r[:, 0]) for name, r in ranges.items()}
    moving = sorted(widths, key=lambda n: float(widths[n].max() / widths[n].min().clamp(min=1e-12)), reverse=True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in moving[:shown]:
        w = widths[name]
        label = name.removeprefix("quantizers.").replace(".conv2d", "").replace(".linear", "")
        ax.plot(timesteps.tolist(), (w / w.max()).tolist(), label=label, lw=1.2)
    ax.set_xlabel("timestep t (0 = data, right = noise)")
    ax.set_ylabel("activation range at t / its largest")
    ax.set_title(f"{model_name}: the {shown} activation ranges that move most with t", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", nargs="?", type=Path, help="a calibration study's study.json")
    p.add_argument("--bits", default="W8A6")
    p.add_argument("--models", nargs="+", default=[], help="row names without the bit widths and seed")
    p.add_argument("--ranges", type=Path, default=None, help="a calibration set: plot the activation ranges instead")
    p.add_argument("--model", default="fmnist-ddpm")
    p.add_argument("--shown", type=int, default=6)
    p.add_argument("--title", default=None)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.ranges is not None:
        plot_ranges(a.ranges, a.model, a.out, a.shown)
    else:
        plot_study(a.study, a.bits, a.models, a.out, a.title or f"{a.bits}: per-step error against FP")


if __name__ == "__main__":
    main()
