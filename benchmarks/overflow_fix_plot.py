"""The overflow fixes side by side over the chain: per-step SQNR and mean error against FP of the bias-corrected
models of calibration-study runs (benchmarks/calibration_study.py) at W8A8 (no fix, or overflow_fix=weight-pairs
when the study's command set it), W7A8 (the weights-7bit grid) and W8A7 (7-bit activations), one figure per model.

    python benchmarks/overflow_fix_plot.py docs/overflow-fix-fmnist-study.json docs/overflow-fix-fmnist-pairs-study.json \
        --out docs/overflow-fix-fmnist.png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from qtoolkit.report import plot_per_timestep

LABELS = {("W8A8", "none"): "none (W8A8)", ("W8A8", "weight-pairs"): "weight-pairs (W8A8, pairs within 128)",
          ("W7A8", "none"): "weights-7bit (W7A8 grid)", ("W8A7", "none"): "7-bit activations (W8A7 grid)"}


def _overflow_fix(command: str) -> str:
    """The overflow fix a study's command line set (--quant overflow_fix=...); the studies here all set one."""
    found = re.search(r"overflow_fix=(\S+)", command)
    return found.group(1) if found else "none"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("studies", nargs="+", type=Path, help="study.json files of one model")
    p.add_argument("--out", type=Path, required=True, help="the figure (PNG)")
    p.add_argument("--title", default="per-step error of the overflow fixes (NDTC + bias correction)")
    a = p.parse_args()
    errors = {}
    for path in a.studies:
        study = json.loads(path.read_text())
        fix = _overflow_fix(study["command"])
        for bits, result in study["results"].items():
            steps = result["per_timestep"]
            errors["t"] = steps["t"]
            label = LABELS.get((bits, fix), f"{bits} ({fix})")
            errors.update({label: series for name, series in steps.items() if "+bc " in name})
    plot_per_timestep(errors, a.out, a.title)


if __name__ == "__main__":
    main()
