"""Downstream classifiers of the evaluation protocol, and the one input normalisation they all share.

- ``"cnn"``: the CNN of DPDM's ``train_downstream_classifiers.py`` (nv-tlabs/DPDM), also DPImageBench's
  ``mnist_cnn.py``: three 3x3 convolutions (32, 64, 128 channels; max-pool after the first two, dropout 0.5), then
  ``Linear(.., 128) -> ReLU -> Dropout(0.5) -> Linear(128, num_classes)``. Its 128-d penultimate activation is the
  feature space of ``fd_classifier``. ~0.2 M parameters, fast on a CPU.
- ``"resnet"``: a small ResNet (3 stages of one basic block, 16/32/64 channels, BatchNorm, global average pool) for
  32x32 RGB images such as CIFAR-10.

Both take float images ``[B, C, H, W]`` in [-1, 1] (``uint8 / 127.5 - 1``, as DPDM and DPImageBench do); use
:func:`to_model_input`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserInputError

CLASSIFIERS = ("cnn", "resnet")


def to_model_input(x: torch.Tensor) -> torch.Tensor:
    """``uint8`` images ``[B, H, W, C]`` -> float ``[B, C, H, W]`` in [-1, 1] (channels-last memory, faster on CPU)."""
    x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last)


def _cnn_side(size: int) -> int:
    """Spatial side after the CNN's conv/pool stack (valid 3x3 convolutions, 2x2 pools)."""
    return ((size - 2) // 2 - 2) // 2 - 2


class SmallCNN(nn.Module):
    """DPDM's downstream CNN for MNIST-like images; ``features`` returns the 128-d penultimate activation."""

    def __init__(self, *, in_channels: int = 1, image_size: int = 28, num_classes: int = 10):
        super().__init__()
        side = _cnn_side(int(image_size))
        if side < 1:
            raise UserInputError(f"The 'cnn' classifier needs images of at least 16x16 pixels, got {image_size}.")
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(32, 64, 3),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(64, 128, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(128 * side * side, 128),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(128, num_classes)
        self.feature_dim = 128

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-8 (16/32/64 channels) for 32x32 RGB images; ``features`` returns the 64-d pooled activation."""

    def __init__(self, *, in_channels: int = 3, image_size: int = 32, num_classes: int = 10):
        super().__init__()
        del image_size  # global average pooling handles any size
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.Sequential(_BasicBlock(16, 16, 1), _BasicBlock(16, 32, 2), _BasicBlock(32, 64, 2))
        self.head = nn.Linear(64, num_classes)
        self.feature_dim = 64

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_classifier(name: str, *, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """A fresh classifier ``name`` (one of :data:`CLASSIFIERS`), in channels-last memory format."""
    if name == "cnn":
        model = SmallCNN(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    elif name == "resnet":
        model = SmallResNet(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    else:
        raise UserInputError(f"Unknown classifier {name!r}; choose one of {', '.join(CLASSIFIERS)}.")
    return model.to(memory_format=torch.channels_last)
