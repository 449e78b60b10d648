"""The job on an accelerator against the same job on the CPU: every stage's time side by side, and the figures
checked to agree within float reassociation.

    python benchmarks/device_check.py                        # the demo recipe, device cuda against cpu
    python benchmarks/device_check.py --device mps --set report.num=100

Both runs use one recipe; only `device` differs. The int8 model runs on the CPU backends in both, so what differs is
how the int8 model was made (chains, observers, bias correction on the device, where floats are added in
another order) and the report's FP reference. Tolerances, stated here and printed: the per-step SQNR (mean and
minimum) and the samples' PSNR against FP within TOLERANCE_DB, and FID within its own bootstrap interval.
Exit code 1 when a figure is outside them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE_DB = 0.5


def run(recipe: str, device: str, sets: list[str], out: Path) -> dict:
    overrides = [arg for pair in [f"device={device}", *sets] for arg in ("--set", pair)]
    subprocess.run([sys.executable, "-m", "qtoolkit.cli", "run", recipe, *overrides, "--out", str(out)], check=True)
    report = json.loads((out / "report.json").read_text())
    name = next(key for key in report if key.startswith("W"))
    return {"stages": json.loads((out / "stages.json").read_text()), "figures": report[name]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "ddim_fmnist_w8a8.yaml"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="device-check-"))
    cpu = run(args.recipe, "cpu", args.sets, scratch / "cpu")
    accelerated = run(args.recipe, args.device, args.sets, scratch / args.device.replace(":", "-"))

    print(f"\n| stage (seconds) | cpu | {args.device} |\n|---|---|---|")
    for stage, seconds in cpu["stages"]["stages"].items():
        print(f"| {stage} | {seconds:.1f} | {accelerated['stages']['stages'].get(stage, float('nan')):.1f} |")
    print(f"| **job** | **{cpu['stages']['total']:.1f}** | **{accelerated['stages']['total']:.1f}** |\n")
    a, b = cpu["figures"], accelerated["figures"]
    checks = [("step SQNR mean (dB)", a["sqnr_db_mean"], b["sqnr_db_mean"], TOLERANCE_DB),
              ("step SQNR min (dB)", a["sqnr_db_min"], b["sqnr_db_min"], TOLERANCE_DB)]
    if a["agreement"] and b["agreement"]:
        checks.append(("PSNR vs FP (dB)", a["agreement"]["psnr_db_mean"], b["agreement"]["psnr_db_mean"], TOLERANCE_DB))
    if a["metrics"] and b["metrics"] and a["metrics"].get("fid_ci_low") is not None:
        half_width = (a["metrics"]["fid_ci_high"] - a["metrics"]["fid_ci_low"]) / 2
        checks.append(("FID", a["metrics"]["fid"], b["metrics"]["fid"], half_width))
    failed = False
    print(f"| figure | cpu | {args.device} | difference | tolerance |\n|---|---|---|---|---|")
    for label, on_cpu, on_device, tolerance in checks:
        failed |= abs(on_cpu - on_device) > tolerance
        print(f"| {label} | {on_cpu:.3f} | {on_device:.3f} | {on_device - on_cpu:+.3f} | {tolerance:.3f} |")
    print("\nagree within the tolerances" if not failed else "\nOUTSIDE the tolerances")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
