"""Fashion-MNIST from the IDX files that Debian's `dataset-fashion-mnist` installs.

Images come back as float32 tensors in [-1, 1], zero-padded (i.e. padded with -1, the
background value) from 28x28 to 32x32 so that a UNet can halve the resolution three times.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import QtoolkitError

DEFAULT_ROOT = Path(os.environ.get("QTOOLKIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW_TO_FIX = (
    "install it with `sudo apt-get install dataset-fashion-mnist` "
    "or point --data-root / QTOOLKIT_FASHION_MNIST at a folder holding the IDX files"
)
# IDX type codes (http://yann.lecun.com/exdb/mnist/): only unsigned bytes occur in (Fashion-)MNIST.
_UBYTE = 0x08


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise QtoolkitError(f"Fashion-MNIST file {stem}(.gz) not found in {root}: {_HOW_TO_FIX}")


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a uint8 array, checking its header against its size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise QtoolkitError(f"cannot read {path} ({e}): the file is corrupt or truncated; {_HOW_TO_FIX}") from None
    if len(raw) < 4:
        raise QtoolkitError(f"{path} is too short to be an IDX file; {_HOW_TO_FIX}")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    header = 4 + 4 * ndim
    if zero != 0 or dtype != _UBYTE or ndim == 0 or len(raw) < header:
        raise QtoolkitError(f"{path} does not start with a uint8 IDX header; {_HOW_TO_FIX}")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise QtoolkitError(
            f"{path} holds {len(raw) - header} bytes of data but its header promises {expected}: "
            f"the file is corrupt or truncated; {_HOW_TO_FIX}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def to_model_range(images_uint8: np.ndarray | torch.Tensor, size: int = 32) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, size, size) in [-1, 1], padded with the background value -1."""
    x = torch.tensor(np.asarray(images_uint8), dtype=torch.float32).unsqueeze(1) / 127.5 - 1.0
    pad = size - x.shape[-1]
    if pad < 0 or pad % 2:
        raise QtoolkitError(f"cannot pad {x.shape[-1]}x{x.shape[-1]} images to {size}x{size}: pick an even size >= 28")
    return torch.nn.functional.pad(x, (pad // 2,) * 4, value=-1.0)


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None, size: int = 32, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images, labels): images float32 (N, 1, size, size) in [-1, 1], labels int64 (N,)."""
    if split not in _FILES:
        raise QtoolkitError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    root = Path(root) if root is not None else DEFAULT_ROOT
    if not root.is_dir():
        raise QtoolkitError(f"Fashion-MNIST folder {root} does not exist: {_HOW_TO_FIX}")
    image_stem, label_stem = _FILES[split]
    images = read_idx(_find(root, image_stem))
    labels = read_idx(_find(root, label_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise QtoolkitError(
            f"Fashion-MNIST {split} files in {root} disagree: images {images.shape}, labels {labels.shape}; {_HOW_TO_FIX}"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return to_model_range(images, size), torch.as_tensor(labels.astype(np.int64))
