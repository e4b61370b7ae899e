"""Downstream classifiers of the evaluation protocol, and the one input normalisation they all share.

- ``"cnn"``: the CNN of DPDM's ``train_downstream_classifiers.py`` (nv-tlabs/DPDM), also DPImageBench's
  ``mnist_cnn.py``: three 3x3 convolutions (32, 64, 128 channels; max-pool after the first two, dropout 0.5), then
  ``Linear(.., 128) -> ReLU -> Dropout(0.5) -> Linear(128, num_classes)``. Its 128-d penultimate activation is the
  feature space of ``fd_classifier``. ~0.2 M parameters, fast on a CPU.
- ``"resnet"``: a small ResNet (3 stages of one basic block, 16/32/64 channels, BatchNorm, global average pool) for
  32x32 RGB images such as CIFAR-10.
- ``"dpib_resnet"``, ``"dpib_wrn"``, ``"dpib_resnext"``: the three downstream classifiers of DPImageBench
  (2019ChenGong/DPImageBench, ``evaluation/classifier/{resnet,wrn,resnext}.py``), with the depth and width that its
  ``evaluation/evaluator.py`` (``Evaluator.cal_acc``) builds for every data set but CIFAR-10/100, MNIST included:
  ResNet-110 (basic blocks, 16/32/64 channels; 1.73 M parameters for 1x28x28 and 10 classes), WRN-40-4 (dropout
  0.3; 8.95 M) and ResNeXt-29 8x64d (cardinality 8, widen factor 4; 34.4 M). DPImageBench reports the mean (and
  std) of their three accuracies; :data:`DPIB_CLASSIFIERS` lists them. They are written here from those
  definitions (same layers, shapes and initialisation: a DPImageBench state dict loads into them in order and
  gives the same logits); global average pooling replaces ``AvgPool2d(image_size // 4)``, identical whenever the
  last feature map is ``image_size / 4`` wide (28 -> 7, 32 -> 8).

All take float images ``[B, C, H, W]`` in [-1, 1] (``uint8 / 127.5 - 1``, as DPDM and DPImageBench do); use
:func:`to_model_input`. :func:`training_recipe` gives the optimiser settings each one is trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserInputError

#: DPImageBench's three downstream classifiers, in the order of its ``Evaluator.acc_models``.
DPIB_CLASSIFIERS = ("dpib_resnet", "dpib_wrn", "dpib_resnext")
CLASSIFIERS = ("cnn", "resnet", *DPIB_CLASSIFIERS)


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


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False)


def _dpib_init(model: nn.Module) -> None:
    """DPImageBench's initialisation of all three: convolutions He-normal on fan-out (``N(0, 2 / (k * k * c_out))``),
    BatchNorm scale 1 and shift 0. The linear layers differ per architecture and are set by each class."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DPIBResNet(nn.Module):
    """DPImageBench's ``ResNet`` (the CIFAR ResNet of He et al. 2016): a 3x3 stem of 16 channels, then three stages
    of ``(depth - 2) / 6`` post-activation basic blocks (16/32/64 channels, stride 2 into stages 2 and 3, 1x1
    convolution + BatchNorm shortcuts where the shape changes), global average pool, one linear layer.

    ``depth=110`` is what DPImageBench trains on MNIST (``ResNet(in_c, img_size, num_classes)`` with its defaults;
    ResNet-164 is its CIFAR choice). The linear layer keeps PyTorch's default initialisation, as there.
    """

    def __init__(self, *, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, depth: int = 110):
        super().__init__()
        del image_size  # global average pooling handles any size
        if depth < 8 or (depth - 2) % 6:
            raise UserInputError(f"DPIBResNet needs depth = 6n + 2 (n >= 1), e.g. 20, 56, 110; got {depth}.")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(_conv3x3(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU())
        stages, cin = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [_BasicBlock(cin, width, stride)] + [_BasicBlock(width, width, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(64, num_classes)
        self.feature_dim = 64
        _dpib_init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _PreActBlock(nn.Module):
    """Wide-ResNet block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus the input; where the shape changes, the
    shortcut is a 1x1 convolution of the pre-activated input (Zagoruyko & Komodakis 2016, as in DPImageBench)."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.drop_rate = float(drop_rate)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        out = self.conv2(F.dropout(out, p=self.drop_rate, training=self.training))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class DPIBWideResNet(nn.Module):
    """DPImageBench's ``WideResNet``: a 3x3 stem of 16 channels, three stages of ``(depth - 4) / 6`` pre-activation
    blocks (``16k / 32k / 64k`` channels for widen factor ``k``, stride 2 into stages 2 and 3, dropout between the
    two convolutions of a block), a final BN-ReLU, global average pool and one linear layer (default weight
    initialisation, zero bias).

    ``depth=40, widen_factor=4, drop_rate=0.3`` (WRN-40-4) is what DPImageBench trains on MNIST; WRN-28-10 is its
    CIFAR choice.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        depth: int = 40,
        widen_factor: int = 4,
        drop_rate: float = 0.3,
    ):
        super().__init__()
        del image_size  # global average pooling handles any size
        if depth < 10 or (depth - 4) % 6:
            raise UserInputError(f"DPIBWideResNet needs depth = 6n + 4 (n >= 1), e.g. 16, 28, 40; got {depth}.")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = _conv3x3(in_channels, 16)
        stages, cin = [], 16
        for width, stride in zip(widths, (1, 2, 2), strict=True):
            blocks = [_PreActBlock(cin, width, stride, drop_rate)]
            blocks += [_PreActBlock(width, width, 1, drop_rate) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, num_classes)
        self.feature_dim = cin
        _dpib_init(self)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.stages(self.stem(x)))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _ResNeXtBlock(nn.Module):
    """ResNeXt bottleneck (type C): 1x1 to ``D = cardinality * cout / widen_factor`` channels, a grouped 3x3
    (``cardinality`` groups, carrying the stride), 1x1 back to ``cout``; BN after each, ReLU after the first two and
    after the sum; 1x1 convolution + BN shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, cardinality: int, widen_factor: int):
        super().__init__()
        d = cardinality * cout // widen_factor
        self.conv_reduce = nn.Conv2d(cin, d, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(d)
        self.conv_group = _conv3x3(d, d, stride, groups=cardinality)
        self.bn_group = nn.BatchNorm2d(d)
        self.conv_expand = nn.Conv2d(d, cout, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_reduce(self.conv_reduce(x)))
        out = F.relu(self.bn_group(self.conv_group(out)))
        return F.relu(self.bn_expand(self.conv_expand(out)) + self.shortcut(x))


class DPIBResNeXt(nn.Module):
    """DPImageBench's ``ResNeXt`` (Xie et al. 2017, CIFAR variant): a 3x3 stem of 64 channels, three stages of
    ``(depth - 2) // 9`` bottlenecks with ``64k / 128k / 256k`` output channels (``k`` = widen factor; stride 2 into
    stages 2 and 3), global average pool, one linear layer (He-normal on fan-in, zero bias).

    ``depth=29, cardinality=8, widen_factor=4`` (ResNeXt-29 8x64d: group widths 64/128/256) is what DPImageBench
    trains on MNIST. Its ``dropRate=0.3`` argument is stored but never applied there, so there is no dropout here.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        depth: int = 29,
        cardinality: int = 8,
        widen_factor: int = 4,
    ):
        super().__init__()
        del image_size  # global average pooling handles any size
        n = (depth - 2) // 9
        if n < 1:
            raise UserInputError(f"DPIBResNeXt needs depth >= 11 ((depth - 2) // 9 blocks per stage); got {depth}.")
        self.stem = nn.Sequential(_conv3x3(in_channels, 64), nn.BatchNorm2d(64), nn.ReLU())
        stages, cin = [], 64
        for width, stride in ((64 * widen_factor, 1), (128 * widen_factor, 2), (256 * widen_factor, 2)):
            blocks = [_ResNeXtBlock(cin, width, stride, cardinality, widen_factor)]
            blocks += [_ResNeXtBlock(width, width, 1, cardinality, widen_factor) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)
        self.feature_dim = cin
        _dpib_init(self)
        nn.init.kaiming_normal_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


_BUILDERS = {
    "cnn": SmallCNN,
    "resnet": SmallResNet,
    "dpib_resnet": DPIBResNet,
    "dpib_wrn": DPIBWideResNet,
    "dpib_resnext": DPIBResNeXt,
}


def _check_name(name: str) -> None:
    if name not in CLASSIFIERS:
        raise UserInputError(f"Unknown classifier {name!r}; choose one of {', '.join(CLASSIFIERS)}.")


def build_classifier(name: str, *, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """A fresh classifier ``name`` (one of :data:`CLASSIFIERS`), in channels-last memory format."""
    _check_name(name)
    model = _BUILDERS[name](in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    return model.to(memory_format=torch.channels_last)


@dataclass(frozen=True)
class TrainingRecipe:
    """How :func:`~dp_diffusers.evaluation.downstream.train_classifier` trains a classifier unless told otherwise.

    Every recipe uses Adam (betas 0.9 / 0.999) and cross-entropy, on unaugmented images.

    Attributes:
        epochs, batch_size, lr: defaults of the training run (overridable per call).
        weight_decay: Adam's (L2) weight decay.
        lr_step_epochs, lr_gamma: ``StepLR``: the learning rate is multiplied by ``lr_gamma`` after every
            ``lr_step_epochs`` epochs; ``None``: constant.
        ema_decay: an exponential moving average of the parameters (not of BatchNorm statistics) with this decay,
            warmed up as ``min(ema_decay, (1 + t) / (10 + t))`` after update ``t``, is what is validated, selected and
            returned; ``None``: the trained weights themselves.
        eval_batch_size: batch size of prediction (memory only; it does not change results).
    """

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    lr_step_epochs: int | None = None
    lr_gamma: float = 1.0
    ema_decay: float | None = None
    eval_batch_size: int = 1000


#: The CNN and the small ResNet: constant-rate Adam; 10 epochs of the CNN take ~2 minutes on 2 CPU cores.
ADAM_RECIPE = TrainingRecipe(epochs=10, batch_size=128, lr=1e-3)

#: DPImageBench's recipe for all three of its classifiers on every data set but CIFAR-10/100 (``Evaluator.cal_acc``
#: in ``evaluation/evaluator.py``): Adam, lr 0.01, no weight decay, ``StepLR(step_size=20, gamma=0.2)`` per epoch,
#: 50 epochs, batch size 256, an EMA of the weights with decay 0.9999 (``evaluation/ema.py``) for validation and test.
#: (Its CIFAR recipe, SGD lr 0.1, momentum 0.9, weight decay 5e-4, StepLR(60, 0.2), 200 epochs, batch size 126, on
#: ResNet-164 / WRN-28-10 / ResNeXt-28, is not reproduced here.) Measured on 1 thread of a 2-core CPU busy with other
#: jobs (CPU time of 20 / 20 / 8 training steps, batch 256 / 256 / 32): one 55,000-image 28x28 epoch takes ~22 min
#: (dpib_resnet), ~1.7 h (dpib_wrn) and ~9 h (dpib_resnext), so 50 epochs of all three need a GPU.
DPIB_RECIPE = TrainingRecipe(
    epochs=50, batch_size=256, lr=0.01, lr_step_epochs=20, lr_gamma=0.2, ema_decay=0.9999, eval_batch_size=256
)

TRAINING_RECIPES = {"cnn": ADAM_RECIPE, "resnet": ADAM_RECIPE, **dict.fromkeys(DPIB_CLASSIFIERS, DPIB_RECIPE)}


def training_recipe(name: str) -> TrainingRecipe:
    """The :class:`TrainingRecipe` of classifier ``name`` (one of :data:`CLASSIFIERS`)."""
    _check_name(name)
    return TRAINING_RECIPES[name]
