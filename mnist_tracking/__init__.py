"""mnist-tracking: the seed ConvNet on MNIST as a reproducible, fully tracked MLflow workflow."""

__version__ = "0.1.0"
