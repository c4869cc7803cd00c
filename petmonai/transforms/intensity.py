"""Intensity normalisation transforms (array + dictionary twins)."""

from __future__ import annotations

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from petmonai.errors import DataError
from petmonai.transforms.base import brain_mask, source_file


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
