"""The preprocessing, augmentation and evaluation pipelines a config describes (named stages,
:func:`petmonai.config.pipeline_entries`, built in order)."""

from __future__ import annotations

from monai.transforms import Compose

from petmonai.errors import ConfigError


def build_pipelines(cfg: dict) -> tuple[Compose, Compose]:
    """``(preprocess, augment)`` Compose objects from the config's pipelines."""
    from petmonai.config import build_component

    preprocess = build_component(cfg, "preprocess")
    augment = build_component(cfg, "augment")
    image = cfg["template"]["image"]
    if image:  # a config whose own preprocess stages do not pass it on would ignore it silently
        from petmonai.transforms.spatial.registration import RegisterToTemplated

        if not any(isinstance(t, RegisterToTemplated) and t.register.template_image is not None for t in preprocess):
            raise ConfigError(f"template.image is set ({image}) but no petmonai.transforms.RegisterToTemplated of the "
                              "preprocess stages uses it: add `template_image: \"@template#image\"` to it")
    return Compose(preprocess), Compose(augment)


def build_evaluation(cfg: dict) -> Compose | None:
    """The config's ``evaluate`` pipeline: deterministic transforms between the cached volume and the
    network at validation/test time (the 2D model's evenly spaced slices and centre crop).
    ``None`` when it is empty: the 3D model evaluates the cached volume as it is."""
    from petmonai.config import build_component, pipeline_entries

    return Compose(build_component(cfg, "evaluate")) if pipeline_entries(cfg, "evaluate") else None
