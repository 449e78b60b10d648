"""Training of the bundled models: the Fashion-MNIST DDPM and the feature classifier for metrics."""
