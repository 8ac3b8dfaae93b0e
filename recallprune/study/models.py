"""Models of the study: an MLP of LeNet-300-100 shape, a small CNN, CIFAR ResNet-20/56,
VGG-11/16 (CIFAR variants, batch norm) and any torchvision classification model by name."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._extras import study_imports

MODELS = ("mlp", "cnn", "resnet20", "resnet56", "vgg11", "vgg16")


def scaled(size: int, width: float) -> int:
    """A layer size times the width multiplier, at least 1."""
    return max(1, int(round(size * width)))


class MLP(nn.Module):
    """LeNet-300-100: two hidden layers of 300 and 100 units (times ``width``)."""

    def __init__(self, in_features: int, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        hidden1, hidden2 = scaled(300, width), scaled(100, width)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.fc3 = nn.Linear(hidden2, num_classes)

    def forward(self, x):
        x = torch.relu(self.fc1(self.flatten(x)))
        return self.fc3(torch.relu(self.fc2(x)))


class SmallCNN(nn.Module):
    """Two 3x3 convolutions of 32 and 64 channels and a hidden layer of 128 units (times
    ``width``)."""

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        channels1, channels2, hidden = scaled(32, width), scaled(64, width), scaled(128, width)
        self.conv1 = nn.Conv2d(in_channels, channels1, 3, padding=1)
        self.conv2 = nn.Conv2d(channels1, channels2, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(channels2 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): depth 6n + 2, stages of 16, 32, 64 channels."""

    def __init__(self, depth: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


_VGG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
}


class CifarVGG(nn.Module):
    def __init__(self, name: str, in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in _VGG[name]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class _RepeatChannels(nn.Module):
    """Grey images for models that expect three channels."""

    def forward(self, x):
        return x.expand(-1, 3, -1, -1)


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0
) -> nn.Module:
    """A model by name for inputs of ``input_shape`` (without the batch dimension);
    ``width`` multiplies the hidden sizes of ``mlp`` and the channels of ``cnn``."""
    if not (isinstance(width, int | float) and not isinstance(width, bool) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    if width != 1 and name not in ("mlp", "cnn"):
        raise ValueError(f"width applies to the mlp and cnn models only, not {name!r}")
    if name == "mlp":
        return MLP(math.prod(input_shape), num_classes, width)
    image = len(input_shape) == 3
    if name in ("cnn", "resnet20", "resnet56", "vgg11", "vgg16") and not image:
        raise ValueError(
            f"model {name!r} needs image inputs [C, H, W]; this dataset has inputs of shape "
            f"{list(input_shape)}: use --model mlp"
        )
    if name == "cnn":
        return SmallCNN(input_shape[0], num_classes, width)
    if name in ("resnet20", "resnet56"):
        return CifarResNet(int(name[6:]), input_shape[0], num_classes)
    if name in ("vgg11", "vgg16"):
        if min(input_shape[1:]) < 32:
            raise ValueError(f"model {name!r} pools five times and needs images of at least 32x32")
        return CifarVGG(name, input_shape[0], num_classes)
    with study_imports(f"model {name!r}"):
        import torchvision

    available = set(torchvision.models.list_models(module=torchvision.models))
    tv_name = name.removeprefix("torchvision:")
    if tv_name not in available:
        raise ValueError(
            f"unknown model {name!r}; choose one of {', '.join(MODELS)} or a torchvision "
            f"classification model (e.g. resnet18, mobilenet_v3_small)"
        )
    if not image:
        raise ValueError(f"torchvision model {tv_name!r} needs image inputs")
    model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes)
    if input_shape[0] == 1:
        model = nn.Sequential(_RepeatChannels(), model)
    return model


def output_layer_name(model: nn.Module) -> str:
    """The name of the model's last Linear layer (its classifier), left dense by default."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("the model has no Linear output layer")
    return names[-1]
