"""Flax models used by pnjax's experiments."""

from pnjax.models.alexnet import AlexNet
from pnjax.models.lenet import LeNet5
from pnjax.models.mlp import KinkMLP
from pnjax.models.pooling import max_pool
from pnjax.models.resnet import ResNet18

__all__ = ["AlexNet", "KinkMLP", "LeNet5", "ResNet18", "max_pool"]
