"""The preprocessing, augmentation and evaluation pipelines a config describes."""

from __future__ import annotations
from monai.transforms import Compose
from petmonai.errors import ConfigError


def build_pipelines(cfg: dict) -> tuple[Compose, Compose]:
    """``(preprocess, augment)`` Compose objects from the config's transform lists."""
    from petmonai.config import build_component

    preprocess = build_component(cfg, "preprocess")
    augment = build_component(cfg, "augment") if cfg.get("augment") else []
    image = (cfg.get("template") or {}).get("image")
    if image:  # a config whose own preprocess list does not pass it on would ignore it silently
        from petmonai.transforms.spatial.registration import RegisterToTemplated

        if not any(isinstance(t, RegisterToTemplated) and t.register.template_image is not None for t in preprocess):
            raise ConfigError(f"template.image is set ({image}) but no petmonai.transforms.spatial.registration.RegisterToTemplated of "
                              "the preprocess list uses it: add `template_image: \"@template#image\"` to it")
    return Compose(preprocess), Compose(augment)


def build_evaluation(cfg: dict) -> Compose | None:
    """The config's optional ``evaluate`` list: deterministic transforms between the cached volume
    and the network at validation/test time (the 2D model's evenly spaced slices and centre crop).
    ``None`` when absent: the 3D model evaluates the cached volume as it is."""
    from petmonai.config import build_component

    return Compose(build_component(cfg, "evaluate")) if cfg.get("evaluate") else None
