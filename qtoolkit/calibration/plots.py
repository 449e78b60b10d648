"""Timestep histograms of calibration sets, for reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import QtoolkitError
from .dataset import CalibrationSet


def plot_timestep_histogram(sets: dict[str, CalibrationSet], path: str | Path, bins: int = 50) -> None:
    """One histogram per set over the training timestep axis [0, T] (noise on the right), written to `path`."""
    if not sets:
        raise QtoolkitError("plot_timestep_histogram needs at least one calibration set")
    # matplotlib on use: the calibration package is imported whenever the plugins load.
    import matplotlib

    matplotlib.use("Agg")  # reports are written on headless machines
    import matplotlib.pyplot as plt
    num_train_timesteps = max(int(s.meta.get("num_train_timesteps", 1000)) for s in sets.values())
    edges = np.linspace(0, num_train_timesteps, bins + 1)
    fig, axes = plt.subplots(len(sets), 1, figsize=(7, 1.8 * len(sets) + 0.6), sharex=True, squeeze=False)
    for ax, (name, calibration) in zip(axes[:, 0], sets.items()):
        ax.hist(calibration.t.numpy(), bins=edges, color="tab:blue")
        ax.set_title(f"{name} ({len(calibration)} samples)", fontsize=9, loc="left")
        ax.set_ylabel("samples")
    axes[-1, 0].set_xlabel("timestep t (0 = clean data, T = pure noise)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
