"""Harmonisation: make scans from different scanners look alike before the network sees them.

On the shared data every training site holds one class, so whatever tells scanners apart (slice
thickness and so resolution, background noise, field of view) also tells the classes apart.
These transforms remove such cues; each is a MONAI dictionary transform for the ``preprocess``
list of a config (see ``configs/experiments/`` and docs/experiments.md)::

    - _target_: petmonai.transforms.harmonise.SmoothToResolutiond     # before Spacingd: needs the file's voxel size
      keys: image
      target_fwhm: 9.0
    - _target_: petmonai.transforms.harmonise.MaskToBraind            # after intensity normalisation
      keys: image

:func:`petmonai.audit.preprocessed_separability` is the matching audit check: after preprocessing, does any simple
property of the volumes (shape, voxel size, intensity range, background) still separate the classes?
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import GaussianSmooth, MapTransform, Transform

from petmonai.errors import DataError
from petmonai.transforms.base import (
    FWHM_PER_SIGMA,
    brain_mask,
    largest_component,
    source_file,
)


def voxel_size(img) -> list[float]:
    """Voxel size (mm) of a MetaTensor, per spatial axis."""
    pixdim = getattr(img, "pixdim", None)
    if pixdim is None:
        raise DataError(source_file(img), "no voxel size: put SmoothToResolutiond before EnsureTyped(track_meta=false)")
    return [float(v) for v in torch.as_tensor(pixdim).flatten()[: img.ndim - 1]]


def smoothing_sigma(voxels: Sequence[float], target_fwhm: float, native_fwhm: float) -> list[float]:
    """Gaussian sigma (voxels) per axis that brings a scan of ``native_fwhm`` resolution sampled at
    ``voxels`` to ``target_fwhm``. A voxel of width v blurs like a kernel of FWHM ~v, so the
    scan's effective FWHM on that axis is sqrt(native^2 + v^2); Gaussians add in quadrature.

    >>> [round(s, 2) for s in smoothing_sigma([2.0, 2.0, 3.3], target_fwhm=9.0, native_fwhm=7.0)]
    [1.12, 1.12, 0.59]
    """
    out = []
    for v in voxels:
        current = math.hypot(native_fwhm, v)
        extra = math.sqrt(max(target_fwhm**2 - current**2, 0.0))
        out.append(extra / FWHM_PER_SIGMA / v)
    return out


class SmoothToResolution(Transform):
    """Smooth a volume to one effective resolution (FWHM in mm) whatever its voxel size, so slice
    thickness no longer shows in the image (the shared data: 2.4 mm vs 3.3 mm slices by protocol).

    Runs on the file's own grid (before resampling), reading the voxel size from the MetaTensor.
    ``native_fwhm`` is the scanners' assumed resolution (FDG-PET: ~6-8 mm); choose ``target_fwhm``
    above the coarsest effective resolution in the data.

    >>> from monai.data import MetaTensor
    >>> img = MetaTensor(torch.rand(1, 32, 32, 20), affine=torch.diag(torch.tensor([2.0, 2.0, 3.3, 1.0])))
    >>> SmoothToResolution(9.0)(img).shape
    torch.Size([1, 32, 32, 20])
    """

    def __init__(self, target_fwhm: float = 9.0, native_fwhm: float = 7.0):
        if target_fwhm <= 0 or native_fwhm < 0:
            raise ValueError("target_fwhm must be positive and native_fwhm not negative")
        self.target_fwhm, self.native_fwhm = float(target_fwhm), float(native_fwhm)

    def __call__(self, img):
        sigma = smoothing_sigma(voxel_size(img), self.target_fwhm, self.native_fwhm)
        if max(sigma) <= 0:
            return img
        return GaussianSmooth(sigma=sigma)(img)


class SmoothToResolutiond(MapTransform):
    """Dictionary twin of :class:`SmoothToResolution`."""

    def __init__(self, keys: KeysCollection = "image", target_fwhm: float = 9.0, native_fwhm: float = 7.0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.smooth = SmoothToResolution(target_fwhm, native_fwhm)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.smooth(d[key])
        return d


class MaskToBrain(Transform):
    """Zero everything outside the brain (the largest blob above ``fraction`` of a robust maximum,
    grown by ``margin`` voxels): background noise, reconstruction-circle edges and scalp differ by
    scanner and protocol, not by diagnosis.

    >>> img = torch.zeros(1, 20, 20, 20); img[0, 5:15, 5:15, 5:15] = 1.0; img[0, 0, 0, 0] = 0.2
    >>> float(MaskToBrain(margin=1)(img)[0, 0, 0, 0])
    0.0
    """

    def __init__(self, fraction: float = 0.3, margin: int = 2):
        self.fraction, self.margin = float(fraction), int(margin)

    def __call__(self, img):
        from scipy import ndimage

        mask = brain_mask(img, self.fraction).cpu().numpy()[0]
        if not mask.any():
            raise DataError(source_file(img), "no brain voxels found for the brain mask")
        mask = ndimage.binary_fill_holes(largest_component(mask))
        if self.margin > 0:
            mask = ndimage.binary_dilation(mask, iterations=self.margin)
        keep = torch.as_tensor(mask, device=img.device)[None]
        return img * keep.to(img.dtype)


class MaskToBraind(MapTransform):
    """Dictionary twin of :class:`MaskToBrain`."""

    def __init__(self, keys: KeysCollection = "image", fraction: float = 0.3, margin: int = 2,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask = MaskToBrain(fraction, margin)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.mask(d[key])
        return d
