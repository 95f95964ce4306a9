"""Classifier architectures with the timm-style ``forward_features`` / ``forward_head`` split.

Every network takes inputs scaled to [0, 1] shaped like the dataset's items and standardizes them
itself (per-channel mean/std buffers fitted on the training split), so a served model needs no
separate preprocessing. ``forward_features(x)`` gives the penultimate features f ``[N, D]`` used by
feature-space OOD scorers; ``forward_head(f)`` gives the logits ``[N, K]`` through ``self.head``, an
``nn.Linear`` (ViM and ReAct read its weight and bias).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F


def pick_device(preference: str = "auto") -> torch.device:
    """``cuda`` when available (or asked for), else ``cpu``."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was requested but no CUDA device is available")
    return device


class Classifier(nn.Module):
    """Base class: input standardization, ``forward = forward_head(forward_features(x))``."""

    head: nn.Linear

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        # per-channel for images [C, H, W], per-feature for vectors [D]
        stat_shape = (self.input_shape[0], 1, 1) if len(self.input_shape) == 3 else self.input_shape
        self.register_buffer("input_mean", torch.zeros(stat_shape))
        self.register_buffer("input_std", torch.ones(stat_shape))

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def fit_standardization(self, x: torch.Tensor) -> None:
        """Set the input mean/std from training inputs ``[N, *input_shape]``."""
        dims = (0, 2, 3) if x.ndim == 4 else (0,)
        mean = x.mean(dim=dims).reshape(self.input_mean.shape)
        std = x.std(dim=dims).reshape(self.input_std.shape).clamp_min(1e-3)
        self.input_mean.copy_(mean)
        self.input_std.copy_(std)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class MLP(Classifier):
    """Fully connected ReLU network on the flattened input."""

    def __init__(self, input_shape, num_classes, hidden: tuple[int, ...] = (512, 512), dropout: float = 0.0):
        super().__init__(input_shape, num_classes)
        layers: list[nn.Module] = []
        width = math.prod(self.input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x):
        return self.body(self.standardize(x).flatten(1))


class SmallCNN(Classifier):
    """Two conv blocks and a dense layer; for small grayscale or colour images (>= 8x8)."""

    def __init__(self, input_shape, num_classes, width: int = 32, feature_dim: int = 128):
        super().__init__(input_shape, num_classes)
        if len(self.input_shape) != 3:
            raise ValueError(f"arch 'cnn' needs image inputs [C, H, W], got input shape {self.input_shape}")
        channels = self.input_shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward_features(self, x):
        return self.body(self.standardize(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(Classifier):
    """CIFAR-style ResNet-18 (He et al. 2016): 3x3 stem without max-pool, [2, 2, 2, 2] basic blocks,
    512-d globally pooled features."""

    def __init__(self, input_shape, num_classes, width: int = 64):
        super().__init__(input_shape, num_classes)
        if len(self.input_shape) != 3:
            raise ValueError(f"arch 'resnet18' needs image inputs [C, H, W], got input shape {self.input_shape}")
        self.stem = nn.Sequential(
            nn.Conv2d(self.input_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        blocks, cin = [], width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            for j in range(2):
                blocks.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward_features(self, x):
        out = self.blocks(self.stem(self.standardize(x)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


NETS: dict[str, Callable[..., Classifier]] = {"mlp": MLP, "cnn": SmallCNN, "resnet18": ResNet18}


def build_net(arch: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> Classifier:
    """Instantiate ``NETS[arch]``; ``arch='auto'`` picks ``mlp`` for grayscale/vectors, ``cnn`` for colour."""
    if arch == "auto":
        arch = default_arch(input_shape)
    if arch not in NETS:
        raise ValueError(f"--arch: unknown architecture {arch!r}; expected one of {', '.join(NETS)} or auto")
    return NETS[arch](tuple(input_shape), num_classes, **kwargs)


def default_arch(input_shape: tuple[int, ...]) -> str:
    return "cnn" if len(input_shape) == 3 and input_shape[0] == 3 else "mlp"


def arch_name(net: Classifier) -> str:
    return next(name for name, cls in NETS.items() if type(net) is cls)
