"""PET-specific MONAI transforms (array + dictionary twins) and the config-built pipelines.

The pipeline is split in two, both lists of MONAI dictionary transforms in the config:
``preprocess`` (deterministic: load, orient, resample, normalise, crop; cached once per volume)
and ``augment`` (random, applied per epoch to the cached result, training only).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, RandFlipd, Randomizable, RandSpatialCropd, Transform

from petmonai.errors import ConfigError, DataError


def source_file(img) -> str:
    """The file a (Meta)Tensor was loaded from, for error messages."""
    meta = getattr(img, "meta", None) or {}
    return str(meta.get("filename_or_obj", "<volume>"))


class CheckVolume(Transform):
    """Reject volumes a network must never see: NaN/Inf, empty, or not 3D after channel-first,
    or decoded from a damaged ``.nii.gz`` (``verify_file``: the gzip checksum of the file the
    volume was loaded from is verified, since the NIfTI reader stops before it).

    >>> CheckVolume()(torch.rand(1, 64, 64, 40)).shape
    torch.Size([1, 64, 64, 40])
    """

    def __init__(self, verify_file: bool = True):
        self.verify_file = verify_file

    def __call__(self, img):
        if self.verify_file and source_file(img).endswith(".gz"):  # first: a damaged file explains the rest
            from petmonai.data import verify_gzip

            verify_gzip(source_file(img))
        if img.ndim != 4 or img.shape[0] != 1:
            raise DataError(source_file(img), f"expected one channel and 3 spatial axes, got shape {tuple(img.shape)}")
        data = torch.as_tensor(img)
        if not torch.isfinite(data).all():
            bad = int((~torch.isfinite(data)).sum())
            raise DataError(source_file(img), f"{bad} voxel(s) are NaN or Inf")
        if float(data.max()) <= float(data.min()):
            raise DataError(source_file(img), f"volume is empty: every voxel equals {float(data.min()):g}")
        return img


class CheckVolumed(MapTransform):
    """Dictionary twin of :class:`CheckVolume`."""

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False, verify_file: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.check = CheckVolume(verify_file)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.check(d[key])
        return d


def brain_mask(img: torch.Tensor, fraction: float = 0.3, percentile: float = 99.5) -> torch.Tensor:
    """Voxels above ``fraction`` of a robust maximum: the brain in FDG-PET (skull and air are dark)."""
    data = torch.as_tensor(img).float()
    ref = torch.quantile(data.flatten()[:: max(1, data.numel() // 200_000)], percentile / 100.0)
    return data > fraction * ref


class ScaleIntensityToBrainMean(Transform):
    """Proportional scaling: divide by the mean uptake inside a brain mask, so the brain averages 1.

    The usual count normalisation for FDG-PET when no reference region is segmented; it removes
    dose, weight and scanner calibration differences (uint16 counts vs float SUV).

    >>> out = ScaleIntensityToBrainMean()(torch.rand(1, 32, 32, 32) * 1000)
    >>> round(float(out[brain_mask(out)].mean()), 3)  # doctest: +SKIP
    1.0
    """

    def __init__(self, fraction: float = 0.3, percentile: float = 99.5):
        self.fraction = fraction
        self.percentile = percentile

    def __call__(self, img):
        mask = brain_mask(img, self.fraction, self.percentile)
        if not bool(mask.any()):
            raise DataError(source_file(img), "no brain voxels found for intensity normalisation")
        mean = torch.as_tensor(img).float()[mask].mean()
        return img / mean


class ScaleIntensityToBrainMeand(MapTransform):
    """Dictionary twin of :class:`ScaleIntensityToBrainMean`."""

    def __init__(self, keys: KeysCollection = "image", fraction: float = 0.3, percentile: float = 99.5,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.scaler = ScaleIntensityToBrainMean(fraction, percentile)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key])
        return d


class AboveThreshold:
    """A ``select_fn`` for :class:`monai.transforms.CropForegroundd`: voxels above a value,
    by default only the largest connected blob (the brain, not hot spots at the field of view's edge).

    YAML: ``select_fn: {_target_: petmonai.transforms.AboveThreshold, threshold: 0.3}``
    """

    def __init__(self, threshold: float = 0.3, largest_component: bool = True):
        self.threshold = threshold
        self.largest_component = largest_component

    def __call__(self, img):
        mask = torch.as_tensor(img) > self.threshold
        if not self.largest_component or not bool(mask.any()):
            return mask
        return torch.from_numpy(largest_component(mask.cpu().numpy()))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected blob of a boolean mask (the mask itself if it has one blob or none)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def slice_indices(depth: int, num_slices: int, mode: str = "even", rng: np.random.RandomState | None = None,
                  replace: bool = True, sort: bool = False) -> np.ndarray:
    """Axial slice indices: ``even`` spaced over ``depth`` (centres of ``num_slices`` equal bins), or
    ``random`` draws (with replacement by default, as the challenge baseline drew them).

    >>> slice_indices(10, 5).tolist()
    [1, 3, 5, 7, 9]
    """
    if depth < 1 or num_slices < 1:
        raise ValueError(f"need a volume with slices and at least one slice to draw (depth {depth}, {num_slices})")
    if mode == "even":
        return np.minimum(((np.arange(num_slices) + 0.5) * depth / num_slices).astype(np.int64), depth - 1)
    if mode != "random":
        raise ValueError(f"slice mode '{mode}' is not even or random")
    if not replace and num_slices > depth:
        raise ValueError(f"cannot draw {num_slices} distinct slices from {depth}")
    idx = (rng or np.random).choice(depth, size=num_slices, replace=replace)
    return np.sort(idx) if sort else idx


def take_axial_slices(img, indices: np.ndarray):
    """``(1, X, Y, Z)`` -> ``(len(indices), X, Y)``: the chosen axial slices become the channels."""
    if img.ndim != 4 or img.shape[0] != 1:
        raise DataError(source_file(img), f"axial slices need one channel and 3 spatial axes, got shape {tuple(img.shape)}")
    data = torch.as_tensor(img)[0]
    return data[..., torch.as_tensor(indices, dtype=torch.long)].permute(2, 0, 1).contiguous()


class AxialSlices(Transform):
    """Evenly spaced axial slices of a volume stacked as channels: the evaluation input of the
    2D 50-slice model (training draws them at random: :class:`RandAxialSlices`).

    >>> AxialSlices(50)(torch.rand(1, 128, 128, 64)).shape
    torch.Size([50, 128, 128])
    """

    def __init__(self, num_slices: int = 50):
        self.num_slices = int(num_slices)

    def __call__(self, img):
        return take_axial_slices(img, slice_indices(img.shape[-1], self.num_slices, "even"))


class AxialSlicesd(MapTransform):
    """Dictionary twin of :class:`AxialSlices`."""

    def __init__(self, keys: KeysCollection = "image", num_slices: int = 50, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.slicer = AxialSlices(num_slices)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.slicer(d[key])
        return d


class RandAxialSlices(Randomizable, Transform):
    """``num_slices`` axial slices drawn at random (with replacement by default, unsorted: the
    challenge baseline's training input), stacked as channels. ``sort=True`` keeps them in
    inferior-to-superior order, so each channel stays roughly one brain level.

    >>> RandAxialSlices(50).set_random_state(0)(torch.rand(1, 128, 128, 64)).shape
    torch.Size([50, 128, 128])
    """

    def __init__(self, num_slices: int = 50, replace: bool = True, sort: bool = False):
        self.num_slices, self.replace, self.sort = int(num_slices), bool(replace), bool(sort)
        self._indices = None

    def randomize(self, depth: int) -> None:
        self._indices = slice_indices(depth, self.num_slices, "random", self.R, self.replace, self.sort)

    def __call__(self, img, randomize: bool = True):
        if randomize:
            self.randomize(img.shape[-1])
        return take_axial_slices(img, self._indices)


class RandAxialSlicesd(Randomizable, MapTransform):
    """Dictionary twin of :class:`RandAxialSlices` (one draw per call, shared by all ``keys``)."""

    def __init__(self, keys: KeysCollection = "image", num_slices: int = 50, replace: bool = True, sort: bool = False,
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.slicer = RandAxialSlices(num_slices, replace, sort)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.slicer.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        pass  # the array transform draws

    def __call__(self, data):
        d = dict(data)
        first = True
        for key in self.key_iterator(d):
            d[key] = self.slicer(d[key], randomize=first)
            first = False
        return d


class FastRandSpatialCropd(RandSpatialCropd):
    """MONAI's ``RandSpatialCropd`` with a fast path for plain tensors (the training augmentation
    of cached volumes, where meta-data tracking is off): the same random draws and the same crop,
    taken by slicing, without MONAI's per-call bookkeeping (~27 instead of ~69 us a volume with the
    flip below; docs/benchmarks.md). MetaTensors and ``random_size`` go through MONAI unchanged.

    >>> crop = FastRandSpatialCropd("image", roi_size=[28, 36, 28], random_size=False)
    >>> crop({"image": torch.rand(1, 32, 40, 32)})["image"].shape
    torch.Size([1, 28, 36, 28])
    """

    def __call__(self, data, lazy: bool | None = None):
        d = dict(data)
        first = d[self.first_key(d)]
        if isinstance(first, MetaTensor) or self.cropper.random_size or not self.cropper.random_center:
            return super().__call__(data, lazy)
        self.randomize(first.shape[1:])  # MONAI's own draw: the crop is the one MONAI would take
        box = getattr(self.cropper, "_slices", None)
        for key in self.key_iterator(d):
            d[key] = d[key][(slice(None), *box)] if box is not None else self.cropper(d[key], randomize=False)
        return d


class FastRandFlipd(RandFlipd):
    """MONAI's ``RandFlipd`` with a fast path for plain tensors: the same random draw, then one
    ``torch.flip``. MetaTensors go through MONAI unchanged (their flip is recorded for inversion).

    >>> flip = FastRandFlipd("image", spatial_axis=0, prob=1.0)
    >>> x = torch.arange(4.0).reshape(1, 4, 1, 1)
    >>> flip({"image": x})["image"].flatten().tolist()
    [3.0, 2.0, 1.0, 0.0]
    """

    def __call__(self, data, lazy: bool | None = None):
        d = dict(data)
        if any(isinstance(d[key], MetaTensor) for key in self.key_iterator(d)):
            return super().__call__(data, lazy)
        self.randomize(None)
        axes = self.flipper.spatial_axis
        dims = [1 + a for a in ([axes] if isinstance(axes, int) else axes)] if axes is not None else None
        for key in self.key_iterator(d):
            if self._do_transform:
                d[key] = torch.flip(d[key], dims if dims is not None else list(range(1, d[key].ndim)))
        return d


def build_pipelines(cfg: dict) -> tuple[Compose, Compose]:
    """``(preprocess, augment)`` Compose objects from the config's transform lists."""
    from petmonai.config import build_component

    preprocess = build_component(cfg, "preprocess")
    augment = build_component(cfg, "augment") if cfg.get("augment") else []
    image = (cfg.get("template") or {}).get("image")
    if image:  # a config whose own preprocess list does not pass it on would ignore it silently
        from petmonai.spatial import RegisterToTemplated

        if not any(isinstance(t, RegisterToTemplated) and t.register.template_image is not None for t in preprocess):
            raise ConfigError(f"template.image is set ({image}) but no petmonai.spatial.RegisterToTemplated of "
                              "the preprocess list uses it: add `template_image: \"@template#image\"` to it")
    return Compose(preprocess), Compose(augment)


def build_evaluation(cfg: dict) -> Compose | None:
    """The config's optional ``evaluate`` list: deterministic transforms between the cached volume
    and the network at validation/test time (the 2D model's evenly spaced slices and centre crop).
    ``None`` when absent: the 3D model evaluates the cached volume as it is."""
    from petmonai.config import build_component

    return Compose(build_component(cfg, "evaluate")) if cfg.get("evaluate") else None


__all__ = [
    "CheckVolume", "CheckVolumed", "ScaleIntensityToBrainMean", "ScaleIntensityToBrainMeand",
    "AboveThreshold", "brain_mask", "largest_component", "build_pipelines", "build_evaluation", "AxialSlices", "AxialSlicesd",
    "RandAxialSlices", "RandAxialSlicesd", "slice_indices", "take_axial_slices", "FastRandSpatialCropd",
    "FastRandFlipd",
]
