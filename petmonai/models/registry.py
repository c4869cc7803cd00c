"""Model registry: networks chosen by name from the config.

>>> net = build_model({"name": "resnet18_3d"})
>>> net(torch.zeros(2, 1, 48, 56, 48)).shape
torch.Size([2, 2])

A config ``model`` entry either names a registered model (with optional keyword arguments that
override its defaults) or is a MONAI bundle ``_target_`` entry for a network of the user's own.

What petmonai needs to know about a model beyond building it lives here too (:class:`ModelFacts`):
its Grad-CAM target layer and its default test-time views. A network of the user's own gets
working defaults: Grad-CAM on its last convolution (:func:`saliency_layer`), sliding windows of the
training crop for a 3D crop (:func:`petmonai.inference.views.default_views`); where none works the
error names the ``inference`` key to set.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from monai.networks.nets import resnet18

from petmonai.errors import ConfigError


@dataclass(frozen=True)
class ModelFacts:
    """What petmonai knows about a registered model besides how to build it."""

    saliency_layer: str | None = None  # Grad-CAM target (a module name); None: the network's last convolution
    views: str | None = None           # default test-time views (petmonai.inference.views); None: by the crop


MODELS: dict[str, Callable[..., torch.nn.Module]] = {}
MODEL_FACTS: dict[str, ModelFacts] = {}


def register(name: str, *, saliency_layer: str | None = None, views: str | None = None):
    """Decorator: register a network factory under ``name`` (``model: {name: ...}`` in a config) with
    its facts: Grad-CAM target layer and default test-time view strategy (``None``: the defaults
    any network gets)."""

    def wrap(factory):
        MODELS[name] = factory
        MODEL_FACTS[name] = ModelFacts(saliency_layer=saliency_layer, views=views)
        return factory

    return wrap


def model_facts(model_cfg: dict) -> ModelFacts:
    """The facts of a config's ``model``: the registered model's, or none for a ``_target_`` network.

    >>> model_facts({"name": "sfcn_3d"}).saliency_layer
    'features.block4'
    >>> model_facts({"_target_": "monai.networks.nets.DenseNet121"})
    ModelFacts(saliency_layer=None, views=None)
    """
    if "_target_" in model_cfg:
        return ModelFacts()
    name = model_cfg["name"]
    if name not in MODEL_FACTS:
        raise ConfigError(f"config key 'model.name': unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
    return MODEL_FACTS[name]


def saliency_layer(model_cfg: dict, net: torch.nn.Module) -> str:
    """The Grad-CAM target layer of ``net``: its model's registered one, else its last convolution
    with a spatial kernel (1x1 convolutions, such as a ResNet's shortcut, mix channels only).

    >>> net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.Conv3d(4, 4, 3), torch.nn.Conv3d(4, 8, 1))
    >>> saliency_layer({"_target_": "my_net.Net"}, net)
    '1'
    """
    registered = model_facts(model_cfg).saliency_layer
    if registered is not None:
        return registered
    convolutions = [(name, module) for name, module in net.named_modules()
                    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))]
    spatial = [name for name, module in convolutions if any(k > 1 for k in module.kernel_size)]
    if not convolutions:
        raise ConfigError("inference.saliency_layer: the network has no convolution for Grad-CAM to target; set "
                          "it to one of its modules (e.g. --set inference.saliency_layer=NAME)")
    return (spatial or [name for name, _ in convolutions])[-1]


# layer4 of the ResNet is 2x2x2 voxels for a 48x56x48 volume, too coarse to localise
@register("resnet18_3d", saliency_layer="layer3", views="sliding_window_3d")
def resnet18_3d(in_channels: int = 1, num_classes: int = 2, **kwargs) -> torch.nn.Module:
    """MONAI 3D ResNet-18, trained from scratch; strided 7^3 first convolution + max-pool."""
    kwargs = {"conv1_t_size": 7, "conv1_t_stride": 2, **kwargs}
    return resnet18(spatial_dims=3, n_input_channels=in_channels, num_classes=num_classes, **kwargs)


@register("resnet18_2d", saliency_layer="layer3", views="random_slices_2d")
def resnet18_2d(in_channels: int = 50, num_classes: int = 2, **kwargs) -> torch.nn.Module:
    """MONAI 2D ResNet-18 whose input channels are axial slices (the challenge baseline: 50),
    trained from scratch (no torchvision, no downloaded weights).

    >>> resnet18_2d()(torch.zeros(2, 50, 120, 120)).shape
    torch.Size([2, 2])
    """
    kwargs = {"conv1_t_size": 7, "conv1_t_stride": 2, **kwargs}
    return resnet18(spatial_dims=2, n_input_channels=in_channels, num_classes=num_classes, **kwargs)


class AxialSlices2D(torch.nn.Module):
    """A 2D network on 3D volumes: the axial axis becomes the channels, ``(B, 1, X, Y, Z) -> (B, Z, X, Y)``,
    so a 2D ResNet-18 trains on the 3D model's own inputs (the same registered crop, flips and
    sliding-window test views): the only difference from the 3D model is 2D against 3D convolution.

    A volume deeper than ``depth`` (the training crop's ``crop_size[2]``; e.g. a whole-volume
    evaluation) is centre-cropped along Z to it; a shallower one is an error. Grad-CAM targets
    ``layer3_map``: layer3's output with a unit Z axis ``(B, C, x, y, 1)``, so the map is upsampled
    onto the 3D input (it is constant along Z: the slices are channels, mixed by the first convolution).

    >>> net = AxialSlices2D(depth=28, widen_factor=0.5)
    >>> net(torch.zeros(2, 1, 28, 36, 28)).shape, net(torch.zeros(1, 1, 32, 40, 32)).shape
    (torch.Size([2, 2]), torch.Size([1, 2]))
    """

    def __init__(self, depth: int = 28, num_classes: int = 2, **kwargs):
        super().__init__()
        self.depth = int(depth)
        kwargs = {"conv1_t_size": 7, "conv1_t_stride": 2, **kwargs}
        self.net = resnet18(spatial_dims=2, n_input_channels=self.depth, num_classes=num_classes, **kwargs)
        self.layer3_map = torch.nn.Identity()  # the Grad-CAM hook: sees layer3's output as a 3D map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 1:
            raise ConfigError(f"model resnet18_2d_slices: expected a (batch, 1, X, Y, Z) volume, got {tuple(x.shape)}")
        z = x.shape[-1]
        if z < self.depth:
            raise ConfigError(f"model resnet18_2d_slices: input depth {z} < its {self.depth} input channels "
                              "(crop_size[2] of training); evaluate on views of the training crop")
        start = (z - self.depth) // 2
        x = x[:, 0, :, :, start:start + self.depth].permute(0, 3, 1, 2).contiguous()  # (B, Z, X, Y)
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        x = x if n.no_max_pool else n.maxpool(x)
        x = self.layer3_map(n.layer3(n.layer2(n.layer1(x)))[..., None])[..., 0]
        x = n.avgpool(n.layer4(x)).flatten(1)
        return n.fc(x) if n.fc is not None else x


# layer3_map: layer3 of the 2D ResNet (coarse in-plane, as the 3D ResNet's) on the input's 3D grid
@register("resnet18_2d_slices", saliency_layer="layer3_map", views="sliding_window_3d")
def resnet18_2d_slices(in_channels: int = 28, num_classes: int = 2, **kwargs) -> torch.nn.Module:
    """A 2D ResNet-18 on the 3D model's registered volumes (:class:`AxialSlices2D`): the axial slices of
    each crop are its ``in_channels`` (the crop depth, ``"$@crop_size[2]"`` in configs/train2d_registered.yaml).

    >>> resnet18_2d_slices(in_channels=20)(torch.zeros(2, 1, 20, 24, 20)).shape
    torch.Size([2, 2])
    """
    return AxialSlices2D(depth=in_channels, num_classes=num_classes, **kwargs)


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
            # named blocks: Grad-CAM targets one by name (its registered saliency_layer, features.block4)
            layers[f"block{i}"] = torch.nn.Sequential(conv(c_in, c_out, 3, padding=1), norm(c_out), torch.nn.ReLU())
            if i < len(channels):
                layers[f"pool{i}"] = pool(2)
            c_in = c_out
        self.features = torch.nn.Sequential(layers)
        self.pool = (torch.nn.AdaptiveAvgPool3d if spatial_dims == 3 else torch.nn.AdaptiveAvgPool2d)(1)
        self.classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(dropout), torch.nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


# features.block4: 4x5x4 voxels on the default 32x40x32 grid (6x7x6 at 4 mm); block5 is coarser
@register("sfcn_3d", saliency_layer="features.block4", views="sliding_window_3d")
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


def _resolved_options(model_cfg: dict, full_cfg: dict | None) -> dict:
    """A registered model's options with ``@key`` references and ``$`` expressions (e.g.
    ``in_channels: "$@crop_size[2]"``) resolved against the whole config ``full_cfg``."""
    if not any(isinstance(v, str) and v.startswith(("$", "@")) for v in model_cfg.values()):
        return dict(model_cfg)
    if full_cfg is None:
        raise ConfigError("config key 'model' refers to other config values (@ or $); build_model needs the "
                          "whole config (build_model(cfg['model'], cfg))")
    from petmonai.config import build_component

    return dict(build_component({**full_cfg, "model": model_cfg}, "model"))


def build_model(model_cfg: dict, full_cfg: dict | None = None) -> torch.nn.Module:
    """Instantiate the network described by the config's ``model`` section (``full_cfg``: the whole
    config, which ``@``/``$`` values of the section refer to)."""
    if "_target_" in model_cfg:
        from petmonai.config import build_component

        return build_component({**(full_cfg or {}), "model": model_cfg}, "model")
    options = _resolved_options(model_cfg, full_cfg)
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
    if name.endswith(("_2d", "_2d_slices")):
        return "2D CNN"
    return name.rsplit(".", 1)[-1]


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
