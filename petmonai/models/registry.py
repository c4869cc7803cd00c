"""Model registry: networks chosen by name from the config.

>>> net = build_model({"name": "resnet18_3d"})
>>> net(torch.zeros(2, 1, 48, 56, 48)).shape
torch.Size([2, 2])

A config ``model`` entry either names a registered model (with optional keyword arguments that
override its defaults) or is a MONAI bundle ``_target_`` entry for a network of the user's own.
"""

from __future__ import annotations
from collections import OrderedDict
from collections.abc import Callable
import torch
from monai.networks.nets import resnet18
from petmonai.errors import ConfigError


MODELS: dict[str, Callable[..., torch.nn.Module]] = {}


def register(name: str):
    def wrap(factory):
        MODELS[name] = factory
        return factory

    return wrap


@register("resnet18_3d")
def resnet18_3d(in_channels: int = 1, num_classes: int = 2, **kwargs) -> torch.nn.Module:
    """MONAI 3D ResNet-18, trained from scratch; strided 7^3 first convolution + max-pool."""
    kwargs = {"conv1_t_size": 7, "conv1_t_stride": 2, **kwargs}
    return resnet18(spatial_dims=3, n_input_channels=in_channels, num_classes=num_classes, **kwargs)


@register("resnet18_2d")
def resnet18_2d(in_channels: int = 50, num_classes: int = 2, **kwargs) -> torch.nn.Module:
    """MONAI 2D ResNet-18 whose input channels are axial slices (the challenge baseline: 50),
    trained from scratch (no torchvision, no downloaded weights).

    >>> resnet18_2d()(torch.zeros(2, 50, 120, 120)).shape
    torch.Size([2, 2])
    """
    kwargs = {"conv1_t_size": 7, "conv1_t_stride": 2, **kwargs}
    return resnet18(spatial_dims=2, n_input_channels=in_channels, num_classes=num_classes, **kwargs)


class SFCN(torch.nn.Module):
    """Simple fully convolutional network for small brain-imaging cohorts (after Peng et al. 2021,
    Medical Image Analysis 68:101871): blocks of 3x3x3 convolution, batch norm and ReLU, halved by
    max-pooling between blocks, then global average pooling, dropout and a linear classifier.
    With the default channels it has 0.5 M parameters (the 3D ResNet-18: 33 M), so it can fit
    tens of scans without memorising scanner texture as fast.

    >>> SFCN()(torch.zeros(2, 1, 48, 56, 48)).shape
    torch.Size([2, 2])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, channels=(16, 32, 64, 128, 64),
                 dropout: float = 0.5, spatial_dims: int = 3):
        super().__init__()
        conv, norm, pool = ((torch.nn.Conv3d, torch.nn.BatchNorm3d, torch.nn.MaxPool3d) if spatial_dims == 3
                            else (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.MaxPool2d))
        layers, c_in = OrderedDict(), in_channels
        for i, c_out in enumerate(channels, start=1):
            # named blocks: Grad-CAM targets one by name (inference.saliency_layer, e.g. features.block4)
            layers[f"block{i}"] = torch.nn.Sequential(conv(c_in, c_out, 3, padding=1), norm(c_out), torch.nn.ReLU())
            if i < len(channels):
                layers[f"pool{i}"] = pool(2)
            c_in = c_out
        self.features = torch.nn.Sequential(layers)
        self.pool = (torch.nn.AdaptiveAvgPool3d if spatial_dims == 3 else torch.nn.AdaptiveAvgPool2d)(1)
        self.classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(dropout), torch.nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


@register("sfcn_3d")
def sfcn_3d(in_channels: int = 1, num_classes: int = 2, **kwargs) -> torch.nn.Module:
    """The small 3D :class:`SFCN` (docs/experiments.md: it generalised to unseen sites better
    than the 3D ResNet-18 on the shared data)."""
    return SFCN(in_channels=in_channels, num_classes=num_classes, spatial_dims=3, **kwargs)


def spatial_dims(net: torch.nn.Module) -> int:
    """2 or 3: the dimensionality of the network's first convolution."""
    for module in net.modules():
        if isinstance(module, torch.nn.Conv3d):
            return 3
        if isinstance(module, torch.nn.Conv2d):
            return 2
    return 3


def build_model(model_cfg: dict, full_cfg: dict | None = None) -> torch.nn.Module:
    """Instantiate the network described by the config's ``model`` section."""
    if "_target_" in model_cfg:
        from petmonai.config import build_component

        return build_component({**(full_cfg or {}), "model": model_cfg}, "model")
    options = dict(model_cfg)
    name = options.pop("name", None)
    if name not in MODELS:
        raise ConfigError(f"config key 'model.name': unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
    try:
        return MODELS[name](**options)
    except TypeError as err:
        raise ConfigError(f"config key 'model': bad option for {name}: {err}") from None


def model_label(model_cfg: dict) -> str:
    """A short display name: ``3D CNN`` / ``2D CNN`` for the registered ResNets, else the name.

    >>> model_label({"name": "resnet18_2d"})
    '2D CNN'
    """
    name = str(model_cfg.get("name") or model_cfg.get("_target_", "CNN"))
    if name.endswith("_3d"):
        return "3D CNN"
    if name.endswith("_2d"):
        return "2D CNN"
    return name.rsplit(".", 1)[-1]


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
