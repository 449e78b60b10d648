from .fashion_mnist import DEFAULT_ROOT, FASHION_MNIST_CLASSES, load_fashion_mnist

__all__ = ["DEFAULT_ROOT", "FASHION_MNIST_CLASSES", "load_fashion_mnist"]
