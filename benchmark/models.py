"""Architectures. Every model takes inputs in [0,1] and normalises inside ``forward``.

A :class:`Network` is ``head(pool(neck(maps(normalise(x)))))``:

* ``backbone.forward_maps`` gives the last convolutional feature maps,
* an optional ``neck`` (a defense's module on those maps, e.g. FSR) keeps their shape,
* ``backbone.forward_pool`` turns maps into the penultimate feature vector (``features``),
* ``head`` maps features to logits (a defense may replace it: prototypes, cosine, ...).

``model.features(x)`` returns the penultimate features; ``model(x)`` returns logits.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.errors import UsageError


class Backbone(nn.Module):
    """Feature extractor with a map stage and a pooling stage."""

    feature_dim: int
    map_channels: int

    def forward_maps(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_pool(self, maps: Tensor) -> Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(maps, 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_pool(self.forward_maps(x))


class Network(nn.Module):
    """Normalisation + backbone (+ neck) + head.

    Args:
        backbone: the feature extractor.
        head: features → logits.
        mean: per-channel mean used to normalise inputs in [0,1].
        std: per-channel std.
        neck: optional shape-preserving module applied to the backbone's maps.
        preprocess: optional shape-preserving input preprocessing on [0,1] inputs, before
            the normalisation (a defense's :meth:`~defenses.Defense.make_preprocess`; wrapped
            in :class:`attacks.bpda.NonDifferentiable` when it has no useful gradient).
    """

    def __init__(self, backbone: Backbone, head: nn.Module, *, mean: Sequence[float],
                 std: Sequence[float], neck: Optional[nn.Module] = None,
                 preprocess: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.preprocess = preprocess
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def maps(self, x: Tensor) -> Tensor:
        """Backbone feature maps of x (before the neck)."""
        if self.preprocess is not None:
            x = self.preprocess(x)
        return self.backbone.forward_maps(self.normalize(x))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (what the head sees)."""
        m = self.maps(x)
        if self.neck is not None:
            m = self.neck(m)
        return self.backbone.forward_pool(m)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class EmbeddedBackbone(Backbone):
    """``backbone`` whose pooled features pass through ``embed`` (same maps; d unchanged).

    A defense whose official network ends in a different feature layer (OC: Linear → PReLU;
    PCL: a linear layer before the classifier) appends it this way, so that
    ``model.features`` is the layer its loss, the attacks and the feature metrics see.
    """

    def __init__(self, backbone: Backbone, embed: nn.Module) -> None:
        super().__init__()
        self.inner, self.embed = backbone, embed
        self.feature_dim, self.map_channels = backbone.feature_dim, backbone.map_channels

    def forward_maps(self, x: Tensor) -> Tensor:
        return self.inner.forward_maps(x)

    def forward_pool(self, maps: Tensor) -> Tensor:
        return self.embed(self.inner.forward_pool(maps))


# ---------------------------------------------------------------- small nets for CPU runs
class TinyNet(Backbone):
    """Test-sized net: one conv, 2×2 pooled maps, a 32-d feature layer."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.map_channels, self.feature_dim = 8, 32
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4, 32)

    def forward_maps(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x))

    def forward_pool(self, maps: Tensor) -> Tensor:
        return F.relu(self.fc(torch.flatten(F.adaptive_avg_pool2d(maps, 2), 1)))


class SmallCNN(Backbone):
    """Four 3×3 conv+BN+ReLU (32-64-128-128, max-pool after the first two), 256-d features.

    About 0.77M parameters; cheap on CPU because the wide convs run at 1/4 resolution.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.map_channels, self.feature_dim = 128, 256

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.convs = nn.Sequential(*conv(in_channels, 32), nn.MaxPool2d(2), *conv(32, 64),
                                   nn.MaxPool2d(2), *conv(64, 128), *conv(128, 128))
        self.fc = nn.Linear(128 * 16, 256)

    def forward_maps(self, x: Tensor) -> Tensor:
        return self.convs(x)

    def forward_pool(self, maps: Tensor) -> Tensor:
        return F.relu(self.fc(torch.flatten(F.adaptive_avg_pool2d(maps, 4), 1)))


class LeNetsPP(Backbone):
    """LeNets++ of the center-loss paper (Wen et al. 2016): 6 5×5 convs, PReLU, 2-d features.

    No batch norm, so the initialisation sets the signal scale: weights use He et al.'s (2015)
    PReLU initialisation (normal, variance 2/((1 + a²)·fan_in), a = 0.25, PReLU's initial
    slope) and zero biases. PyTorch's default (variance 1/(3·fan_in)) shrinks the activations
    about 2.5× per layer, so on MNIST the 2-d features start at norm ~0.03 (He init: ~3):
    measured, AT then stayed at chance and Adv-DPNP's pull towards prototypes of norm α = 40
    blew the weights up (NaN at epoch 2).
    """

    def __init__(self, in_channels: int, feature_dim: int = 2) -> None:
        super().__init__()
        self.map_channels, self.feature_dim = 128, feature_dim

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 5, padding=2), nn.PReLU(),
                    nn.Conv2d(cout, cout, 5, padding=2), nn.PReLU(), nn.MaxPool2d(2)]

        self.convs = nn.Sequential(*block(in_channels, 32), *block(32, 64), *block(64, 128))
        self.fc = nn.Linear(128 * 3 * 3, feature_dim)
        self.act = nn.PReLU()
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, a=0.25, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)

    def forward_maps(self, x: Tensor) -> Tensor:
        return self.convs(x)

    def forward_pool(self, maps: Tensor) -> Tensor:
        return self.act(self.fc(torch.flatten(F.adaptive_max_pool2d(maps, 3), 1)))


# ---------------------------------------------------------------- CIFAR ResNets
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut: Optional[nn.Module] = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = F.relu(self.bn2(out))
        if self.dropout:
            out = F.dropout(out, self.dropout, self.training)
        return self.conv2(out) + skip


class ResNet18(Backbone):
    """CIFAR ResNet-18 (3×3 stem, no max-pool), 512-d features."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.map_channels = self.feature_dim = 512
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)

    def forward_maps(self, x: Tensor) -> Tensor:
        return self.layers(self.stem(x))


class PreActResNet18(Backbone):
    """Pre-activation ResNet-18 (He et al. 2016) as used by Rice et al.; 512-d features."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.map_channels = self.feature_dim = 512
        self.stem = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)

    def forward_maps(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.layers(self.stem(x))))


class WideResNet(Backbone):
    """WRN-depth-widen (Zagoruyko & Komodakis 2016), pre-activation blocks; WRN-34-10 by default."""

    def __init__(self, in_channels: int, depth: int = 34, widen: int = 10) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.map_channels = self.feature_dim = widths[3]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for cout, stride in zip(widths[1:], [1, 2, 2]):
            for i in range(n):
                layers.append(PreActBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(widths[3])

    def forward_maps(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.layers(self.stem(x))))


ARCHS: dict[str, Callable[[int], Backbone]] = {
    "small-cnn": SmallCNN,
    "lenets++": LeNetsPP,
    "resnet18": ResNet18,
    "preact-resnet18": PreActResNet18,
    "wrn-34-10": WideResNet,
    "tiny": TinyNet,
}


def create_backbone(arch: str, in_channels: int) -> Backbone:
    """Instantiate a backbone by name.

    Raises:
        UsageError: unknown architecture (the message lists the valid ones).
    """
    if arch not in ARCHS:
        raise UsageError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    return ARCHS[arch](in_channels)


def create(arch: str, *, num_classes: int, in_channels: int, mean: Sequence[float],
           std: Sequence[float], head: Optional[nn.Module] = None,
           neck: Optional[nn.Module] = None) -> Network:
    """Backbone + head (default: a linear layer) with normalisation inside the model."""
    backbone = create_backbone(arch, in_channels)
    head = head if head is not None else nn.Linear(backbone.feature_dim, num_classes)
    return Network(backbone, head, mean=mean, std=std, neck=neck)
