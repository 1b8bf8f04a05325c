"""The seed's ConvNet for 28x28 greyscale digits: only the nn.Module."""

from __future__ import annotations

import torch
from torch import nn

from mnist_tracking.core.config import NUM_CLASSES

# The activations the seed compared, by the name users pass on the command line.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "selu": nn.SELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

FEATURE_DIM = 512  # width of the penultimate layer, the features we project


class ConvNet(nn.Module):
    """Two conv blocks and two fully connected layers, as in the seed.

    The network takes pixel intensities in [0, 1] and standardises them itself with the
    training set's mean and std (stored as buffers), so a checkpoint or a served model
    needs no separate preprocessing step.
    """

    def __init__(self, activation: str = "relu", mean: float = 0.0, std: float = 1.0):
        super().__init__()
        act = ACTIVATIONS[activation]
        self.register_buffer("input_mean", torch.tensor(float(mean)))
        self.register_buffer("input_std", torch.tensor(float(std)))

        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool1 = nn.MaxPool2d(2)
        self.dropout1 = nn.Dropout(0.25)

        self.conv3 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.conv4 = nn.Conv2d(64, 64, kernel_size=3, padding=1)
        self.bn4 = nn.BatchNorm2d(64)
        self.pool2 = nn.MaxPool2d(2)
        self.dropout2 = nn.Dropout(0.25)

        # The seed's text says fc1 has 6488 inputs, but its layers produce
        # 64 channels x 7 x 7 = 3136 (28 -> 14 -> 7 after two 2x2 pools): we use 3136.
        self.fc1 = nn.Linear(64 * 7 * 7, FEATURE_DIM)
        self.bn5 = nn.BatchNorm1d(FEATURE_DIM)
        self.dropout3 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)

        # One module per call site, so stateful activations never share anything.
        self.act1, self.act2, self.act3, self.act4, self.act5 = (act() for _ in range(5))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations: fc1 -> bn5 -> activation, before dropout3."""
        x = (x - self.input_mean) / self.input_std  # (N, 1, 28, 28)
        x = self.act1(self.bn1(self.conv1(x)))  # (N, 32, 28, 28)
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.dropout1(self.pool1(x))  # (N, 32, 14, 14)
        x = self.act3(self.bn3(self.conv3(x)))  # (N, 64, 14, 14)
        x = self.act4(self.bn4(self.conv4(x)))
        x = self.dropout2(self.pool2(x))  # (N, 64, 7, 7)
        x = torch.flatten(x, 1)  # (N, 3136)
        return self.act5(self.bn5(self.fc1(x)))  # (N, 512)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores (logits) from penultimate features: (N, 512) -> (N, 10)."""
        return self.fc2(self.dropout3(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))  # (N, 1, 28, 28) -> (N, 10)


MODEL_NAME = ConvNet.__name__  # the "model" of the summary table and the logged params

