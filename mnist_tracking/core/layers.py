"""The network's layers as the course report's model section lists them, read from the network itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mnist_tracking.core.model import ConvNet

INPUT_SHAPE = (1, 1, 28, 28)  # one image, as the network takes it


@dataclass(frozen=True)
class Layer:
    name: str  # the module's attribute name, e.g. "conv1"
    kind: str  # its class, e.g. "Conv2d"
    output_shape: tuple[int, ...]  # without the batch dimension
    parameters: int  # trainable parameters of this module alone


@torch.no_grad()
def layers(model: nn.Module, input_shape: tuple[int, ...] = INPUT_SHAPE) -> list[Layer]:
    """Every leaf module in the order the forward pass calls it (forward hooks on an eval-mode pass of zeros), with
    its output shape and parameter count: nothing is written by hand, so the table follows the code."""
    found, hooks = [], []
    for name, module in model.named_modules():
        if name and not list(module.children()):
            def record(module, inputs, output, name=name):
                found.append(Layer(name, type(module).__name__, tuple(output.shape[1:]),
                                   sum(p.numel() for p in module.parameters() if p.requires_grad)))
            hooks.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(input_shape))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return found


def convnet_layers(activation: str) -> list[Layer]:
    """The layers of the project's ConvNet with this activation."""
    return layers(ConvNet(activation))
