"""Training of the bundled models: the Fashion-MNIST DDPM and the feature classifier for metrics.

Layer: denoising (a tool beside calibration and evaluation: how the bundled models were made). May import
sampling, metrics, models, data and the foundation.
"""
