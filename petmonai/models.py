"""Model registry: networks chosen by name from the config.

>>> net = build_model({"name": "resnet18_3d"})
>>> net(torch.zeros(2, 1, 48, 56, 48)).shape
torch.Size([2, 2])

A config ``model`` entry either names a registered model (with optional keyword arguments that
override its defaults) or is a MONAI bundle ``_target_`` entry for a network of the user's own.
"""

from __future__ import annotations

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


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
