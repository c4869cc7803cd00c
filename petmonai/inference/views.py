"""Test-time views: how one preprocessed volume becomes a batch of network inputs.

A *view strategy* (:class:`ViewStrategy`) turns a preprocessed volume ``(C, X, Y, Z)`` into every
view the fold ensemble scores, ``(N, C, ...)``. :class:`SlidingWindowFlips3D` (windows of the
training crop x test-time flips) serves the 3D models, :class:`RandomSlices2D` (the challenge
baseline's random slice draws) the 2D slice model; :func:`register_views` adds one of your own.
``predict.py`` (:mod:`petmonai.inference.predictor`) and the cross-validation (``cv.test_views: inference``)
use the same strategies.

>>> strategy = SlidingWindowFlips3D({"crop_size": [28, 36, 28]}, {"windows": "grid", "overlap": 0.5, "flips": "lr"})
>>> strategy.views(torch.zeros(1, 32, 40, 32)).shape
torch.Size([16, 1, 28, 36, 28])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from petmonai.errors import ConfigError
from petmonai.runs import get_logger

log = get_logger("predict")


VIEW_STRATEGIES: dict[str, type] = {}


"""Name -> view strategy class. A strategy turns one preprocessed volume into network inputs."""


def register_views(name: str):
    """Class decorator: register a view strategy under ``name`` (``inference.views: name``). A model
    makes it its default where the model registers (``register("my_model", views=name)``,
    :mod:`petmonai.models.registry`)."""

    def wrap(cls):
        cls.name = name
        VIEW_STRATEGIES[name] = cls
        return cls

    return wrap


def default_views(cfg: dict) -> str:
    """``views: auto``: the view strategy the run's model registered; for a model that registered
    none (a ``_target_`` network of your own) sliding windows of the training crop when the crop is
    3D, else an error that names ``inference.views``.

    >>> default_views({"model": {"name": "resnet18_2d"}, "crop_size": [120, 120]})
    'random_slices_2d'
    >>> default_views({"model": {"_target_": "my_net.Net"}, "crop_size": [28, 36, 28]})
    'sliding_window_3d'
    """
    from petmonai.models import model_facts, model_label

    registered = model_facts(cfg["model"]).views
    if registered is not None:
        return registered
    if len(cfg["crop_size"]) == 3:
        return "sliding_window_3d"
    raise ConfigError(f"inference.views: model {model_label(cfg['model'])} has no default test-time views and its "
                      f"crop_size {cfg['crop_size']} is not 3D; set inference.views (known: "
                      f"{', '.join(sorted(VIEW_STRATEGIES))})")


class ViewStrategy:
    """Test-time views of one preprocessed volume.

    Subclasses set ``defaults`` (their own option keys and default values) and implement
    :meth:`views`, which returns every view as one batch ``(N, C, ...)`` of network inputs, and
    :meth:`labels`, one short description per view (e.g. ``"flip=0 window=3"``). The ensemble feeds
    the same views to every fold model. ``rng`` is seeded per volume (from its uuid), so random
    strategies give the same views every time. A new strategy plugs in like this (the 2D slice
    model's :class:`RandomSlices2D` is a complete example)::

        @register_views("my_views")          # inference.views: my_views; a model's default: register(..., views="my_views")
        class MyViews(ViewStrategy):
            defaults = {"passes": 4}
            def views(self, volume, rng):                        # -> (passes, C, ...)
                return torch.stack([volume for _ in range(self.options["passes"])])
            def labels(self, volume_shape):
                return [f"pass={i}" for i in range(self.options["passes"])]

    and ``predict.py``, the fold ensemble, the threshold and every output stay as they are.
    """

    name = "base"
    defaults: dict = {}

    def __init__(self, cfg: dict, options: dict):
        self.cfg, self.options = cfg, options

    def views(self, volume: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        raise NotImplementedError

    def labels(self, volume_shape: Sequence[int]) -> list[str]:
        raise NotImplementedError

    def describe(self, volume_shape: Sequence[int] | None = None) -> dict:
        return {"views": self.name}

    def prepare_network(self, net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return net

    def example_input(self) -> torch.Tensor:
        """A batch of the shape the views have (to check an optimised network against the plain one)."""
        raise NotImplementedError


FLIP_PRESETS = {"none": [()], "lr": [(), (0,)], "all": None}


def parse_flips(spec) -> list[tuple[int, ...]]:
    """Test-time flips as tuples of spatial axes (0 = left-right, 1 = posterior-anterior,
    2 = inferior-superior); the identity ``()`` is always included.

    >>> parse_flips("lr")
    [(), (0,)]
    >>> len(parse_flips("all"))
    8
    >>> parse_flips("0,1,0+1")   # also a YAML list: [[], [0], [1], [0, 1]]
    [(), (0,), (1,), (0, 1)]
    """
    if spec is None:
        spec = "none"
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key == "all":
            return [c for n in range(4) for c in itertools.combinations(range(3), n)]
        if key in FLIP_PRESETS:
            return list(FLIP_PRESETS[key])
        items = [part.strip() for part in key.split(",") if part.strip()]
        combos = []
        for item in items:
            if item in ("id", "identity", "-", "none"):
                combos.append(())
                continue
            try:
                combos.append(tuple(int(a) for a in item.split("+")))
            except ValueError:
                raise ConfigError(f"flips '{spec}': expected none, lr, all, or axis combinations like "
                                  "'0,1,0+1' (axes 0, 1, 2)") from None
    elif isinstance(spec, (list, tuple)):
        combos = []
        for item in spec:
            axes = [item] if isinstance(item, int) else list(item or [])
            if not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
                raise ConfigError(f"flips {spec!r}: each entry must be a list of axes (0, 1, 2)")
            combos.append(tuple(axes))
    else:
        raise ConfigError(f"flips {spec!r}: expected none, lr, all, or a list of axis lists")
    out: list[tuple[int, ...]] = [()]
    for combo in combos:
        if any(a not in (0, 1, 2) for a in combo):
            raise ConfigError(f"flips {spec!r}: axis must be 0, 1 or 2 (spatial axes)")
        norm = tuple(sorted(set(combo)))
        if norm not in out:
            out.append(norm)
    return out


def flips_form_group(flips: Sequence[tuple[int, ...]]) -> bool:
    """True when composing any two flips gives a flip of the set: then the ensemble is
    invariant to those flips of its input."""
    as_sets = {frozenset(f) for f in flips}
    return all((a ^ b) in as_sets for a in as_sets for b in as_sets)


def window_starts(size: int, roi: int, overlap: float = 0.5, mode: str = "grid") -> list[int]:
    """Start positions of the windows along one axis: mirror-symmetric, so that
    ``starts == [size - roi - s for s in starts]`` (what makes flips and windows commute).

    ``grid``: windows ``roi * (1 - overlap)`` apart (as MONAI's sliding window) covering the axis,
    the first at 0 and the last at ``size - roi``; ``center``: one centred window (two, one voxel
    apart, when the margin is odd).

    >>> window_starts(48, 40, 0.5)
    [0, 8]
    >>> window_starts(100, 30, 0.5)
    [0, 14, 28, 42, 56, 70]
    >>> window_starts(48, 40, mode="center")
    [4]
    """
    span = size - roi
    if span <= 0:
        return [0]
    if mode == "center":
        return sorted({span // 2, span - span // 2})
    if mode != "grid":
        raise ConfigError(f"inference.windows: '{mode}' is not grid, center or whole")
    if not 0 <= overlap < 1:
        raise ConfigError(f"inference.overlap: {overlap} must be in [0, 1)")
    interval = max(1, int(roi * (1 - overlap)))
    n = math.ceil(span / interval) + 1
    if n % 2 == 1 and span % 2 == 1:
        n += 1  # an odd count needs a centred middle window, impossible with an odd margin
    first_half = [math.floor(k * span / (n - 1) + 0.5) for k in range((n + 1) // 2)]
    starts = sorted(set(first_half) | {span - s for s in first_half})
    return starts


@register_views("sliding_window_3d")
class SlidingWindowFlips3D(ViewStrategy):
    """Sliding windows of the training crop size (``crop_size``) over the preprocessed volume
    (``spatial_size``) times test-time flips: ``n_windows * n_flips`` views per volume.

    The window grid is mirror-symmetric and a flip of a window is the window at the mirrored
    position of the flipped volume, so with a flip set that is a group (``none``, ``lr``, ``all``)
    the ensemble gives the same probability for a volume and its flipped copy.
    """

    defaults = {
        "windows": "grid",    # grid: sliding windows covering the volume; center: one centred window;
                              # whole: the whole preprocessed volume (as the training evaluator saw it)
        "overlap": 0.5,       # fraction of the crop shared by neighbouring windows (MONAI semantics)
        "flips": "lr",        # none | lr (training flips left-right) | all (8) | e.g. "0,1,0+1"
    }

    def __init__(self, cfg: dict, options: dict):
        super().__init__(cfg, options)
        if "crop_size" not in cfg:
            raise ConfigError("sliding_window_3d views need 'crop_size' in the run config")
        self.roi = [int(s) for s in cfg["crop_size"]]
        self.mode = str(options["windows"])
        if self.mode not in ("grid", "center", "whole"):
            raise ConfigError(f"inference.windows: '{self.mode}' is not grid, center or whole")
        self.overlap = float(options["overlap"])
        self.flips = parse_flips(options["flips"])
        if not flips_form_group(self.flips):
            log.warning("test-time flips %s are not closed under composition: the ensemble is not exactly "
                        "flip-invariant (use none, lr or all)", self.flips)

    def window_slices(self, shape: Sequence[int]) -> list[tuple[slice, ...]]:
        if self.mode == "whole":
            return [tuple(slice(0, int(s)) for s in shape)]
        per_axis = [window_starts(int(s), r, self.overlap, self.mode) for s, r in zip(shape, self.roi)]
        return [tuple(slice(a, a + r) for a, r in zip(starts, self.roi)) for starts in itertools.product(*per_axis)]

    def pad_widths(self, shape: Sequence[int]) -> list[int]:
        """``torch.nn.functional.pad`` widths (last axis first) that centre a volume of spatial ``shape``
        in one at least the crop size; ``[]`` when none is needed (or with ``windows: whole``)."""
        pads = []
        for s, r in reversed(list(zip(shape, self.roi))):
            extra = 0 if self.mode == "whole" else max(0, r - int(s))
            pads += [extra // 2, extra - extra // 2]
        return pads if any(pads) else []

    def _pad(self, volume: torch.Tensor) -> torch.Tensor:
        pads = self.pad_widths(volume.shape[1:])
        return torch.nn.functional.pad(volume, pads) if pads else volume

    def views(self, volume: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        volume = self._pad(volume)
        windows = self.window_slices(volume.shape[1:])
        out = []
        for flip in self.flips:
            flipped = torch.flip(volume, [a + 1 for a in flip]) if flip else volume
            out += [flipped[(slice(None), *w)] for w in windows]
        return torch.stack(out)

    def labels(self, volume_shape: Sequence[int]) -> list[str]:
        spatial = [max(int(s), r) for s, r in zip(volume_shape[-3:], self.roi)]
        n_windows = len(self.window_slices(spatial))
        return [f"flip={'+'.join(map(str, f)) or 'none'} window={w}" for f in self.flips for w in range(n_windows)]

    def describe(self, volume_shape: Sequence[int] | None = None) -> dict:
        shape = list(volume_shape[-3:]) if volume_shape is not None else list(self.cfg["spatial_size"])
        spatial = [max(int(s), r) for s, r in zip(shape, self.roi)]
        windows = self.window_slices(spatial)
        return {
            "views": self.name, "windows": self.mode, "overlap": self.overlap, "crop_size": self.roi,
            "volume_size": spatial, "n_windows": len(windows),
            "window_starts": [[w[i].start for i in range(3)] for w in windows],
            "flips": [list(f) for f in self.flips], "n_flips": len(self.flips),
            "n_views": len(windows) * len(self.flips), "flip_invariant": flips_form_group(self.flips),
        }

    def prepare_network(self, net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        # channels-last 3D convolutions are ~10-20 % faster on CPU (oneDNN) and exact in fp32; a 2D network
        # on these 3D views (models.AxialSlices2D) has no 3D weights to lay out
        from petmonai.models import spatial_dims

        return net.to(memory_format=torch.channels_last_3d) if device.type == "cpu" and spatial_dims(net) == 3 else net

    def example_input(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.rand(2, 1, *self.roi, generator=generator) * 2.0


def _slice_settings(cfg: dict) -> tuple[int, bool]:
    """(number of slices, whether training sorted its random draws) of a 2D slice run's config."""
    n = cfg.get("num_slices", (cfg.get("model") or {}).get("in_channels"))
    if n is None:
        raise ConfigError("2D slice views need 'num_slices' (or model.in_channels) in the run config")
    from petmonai.config import pipeline_entries

    sort = any(str(t["_target_"]).endswith("RandAxialSlicesd") and bool(t.get("sort", False))
               for t in pipeline_entries(cfg, "augment"))
    return int(n), sort


@register_views("random_slices_2d")
class RandomSlices2D(ViewStrategy):
    """The 2D slice model's test-time views: ``passes`` draws of ``num_slices`` axial slices (at
    random as in training, with replacement, or evenly spaced) cropped in plane to the training
    crop (at random, or centred). The challenge baseline averaged 10 random passes; ``slices:
    even, crop: center, passes: 1`` is the single view the cross-validation evaluated.
    """

    defaults = {
        "passes": 10,          # views per volume
        "slices": "random",    # random (as training drew them) | even (evenly spaced, as evaluation)
        "crop": "random",      # random | center: where the in-plane crop of crop_size lies
    }

    def __init__(self, cfg: dict, options: dict):
        super().__init__(cfg, options)
        if "crop_size" not in cfg or len(cfg["crop_size"]) != 2:
            raise ConfigError("random_slices_2d views need a 2-element 'crop_size' (in-plane) in the run config")
        self.roi = [int(c) for c in cfg["crop_size"]]
        self.num_slices, self.sort = _slice_settings(cfg)
        self.passes = int(options["passes"])
        self.slices, self.crop = str(options["slices"]), str(options["crop"])
        if self.passes < 1:
            raise ConfigError("inference.passes must be at least 1")
        if self.slices not in ("random", "even"):
            raise ConfigError(f"inference.slices: '{self.slices}' is not random or even")
        if self.crop not in ("random", "center"):
            raise ConfigError(f"inference.crop: '{self.crop}' is not random or center")

    def views(self, volume: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        from petmonai.transforms import slice_indices, take_axial_slices

        rng = rng if rng is not None else np.random.default_rng(0)
        x, y = (int(s) for s in volume.shape[1:3])
        pad = [max(0, r - s) for s, r in zip((x, y), self.roi)]
        out = []
        for _ in range(self.passes):
            idx = slice_indices(int(volume.shape[-1]), self.num_slices, self.slices, rng, True, self.sort)
            img = take_axial_slices(volume, idx)
            if any(pad):
                img = torch.nn.functional.pad(img, [pad[1] // 2, pad[1] - pad[1] // 2, pad[0] // 2, pad[0] - pad[0] // 2])
            sx, sy = (int(s) for s in img.shape[1:])
            if self.crop == "random":
                ox, oy = int(rng.integers(0, sx - self.roi[0] + 1)), int(rng.integers(0, sy - self.roi[1] + 1))
            else:
                ox, oy = (sx - self.roi[0]) // 2, (sy - self.roi[1]) // 2
            out.append(img[:, ox:ox + self.roi[0], oy:oy + self.roi[1]])
        return torch.stack(out)

    def labels(self, volume_shape: Sequence[int]) -> list[str]:
        return [f"pass={i} slices={self.slices} crop={self.crop}" for i in range(self.passes)]

    def describe(self, volume_shape: Sequence[int] | None = None) -> dict:
        return {"views": self.name, "n_views": self.passes, "passes": self.passes, "slices": self.slices,
                "crop": self.crop, "num_slices": self.num_slices, "sorted": self.sort, "crop_size": self.roi}

    def example_input(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.rand(2, self.num_slices, *self.roi, generator=generator) * 2.0
