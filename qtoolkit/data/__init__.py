"""Real datasets for calibration and evaluation, read from local files (Debian's dataset-fashion-mnist).

Layer: foundation (datasets on disk, no network). May import errors and io only.
"""

from .fashion_mnist import DEFAULT_ROOT, FASHION_MNIST_CLASSES, load_fashion_mnist

__all__ = ["DEFAULT_ROOT", "FASHION_MNIST_CLASSES", "load_fashion_mnist"]
