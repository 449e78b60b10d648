"""Sample sets on disk (.npz) and picture grids (PNG)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import QtoolkitError
from .io import atomic_write_bytes


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Model range [-1, 1] -> uint8 (N, H, W, C); values outside the range are clipped, as a viewer would."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor, path: Path, ncol: int = 8, scale: int = 2) -> None:
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + 2) + 2, ncol * (w + 2) + 2, c), 255, np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = pixels[k]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())


def save_samples(path: Path, samples: torch.Tensor, meta: dict, compress: bool = False) -> None:
    """Samples as float32 in model range, unclamped, with the metadata that made them (compressed: for files
    that ship in the repository)."""
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, samples=samples.float().numpy(), meta=np.array(json.dumps(meta)))
    atomic_write_bytes(Path(path), buf.getvalue())


def load_samples(path: Path) -> tuple[torch.Tensor, dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "samples.npz"
    if not path.is_file():
        raise QtoolkitError(f"no sample set at {path}: pass a folder written by `qtoolkit sample` or its samples.npz")
    try:
        with np.load(path, allow_pickle=False) as f:
            samples = torch.from_numpy(f["samples"].astype(np.float32))
            meta = json.loads(str(f["meta"])) if "meta" in f.files else {}
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise QtoolkitError(f"{path} is not a readable qtoolkit sample file ({e}); re-run `qtoolkit sample`") from None
    if samples.ndim != 4:
        raise QtoolkitError(f"{path}: expected samples of shape (N, C, H, W), got {tuple(samples.shape)}")
    return samples, meta
