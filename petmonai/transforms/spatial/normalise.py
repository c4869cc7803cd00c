"""Intensity and region transforms on the template grid: SUVR, template brain mask, parcels."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from petmonai.errors import DataError
from petmonai.transforms.base import source_file
from petmonai.transforms.spatial.template import Template, mni_fdg_template


def _check_grid(img, template: Template, what: str) -> None:
    if tuple(img.shape[1:]) != template.shape:
        raise DataError(source_file(img), f"{what} needs the volume on the template grid {template.shape} "
                                          f"(put RegisterToTemplated before it), got {tuple(img.shape[1:])}")


class ReferenceRegionNormalise(Transform):
    """SUVR: divide a registered volume by its mean uptake in a reference region of the template
    (``pons`` or ``cerebellum``, spared in MCI/AD; ``brain``: proportional scaling by the whole brain).

    >>> out = ReferenceRegionNormalise("pons")(registered)  # doctest: +SKIP
    """

    def __init__(self, region: str = "pons", voxel: float = 4.0, fwhm: float = 8.0):
        self.region_name, self.voxel, self.fwhm = region, float(voxel), float(fwhm)
        mni_fdg_template(self.voxel, self.fwhm).region(region)  # an unknown region fails when the config is built

    def __call__(self, img):
        template = mni_fdg_template(self.voxel, self.fwhm)
        _check_grid(img, template, "reference-region normalisation")
        mask = torch.as_tensor(template.region(self.region_name), device=img.device)
        mean = torch.as_tensor(img).float()[0][mask].mean()
        if not torch.isfinite(mean) or mean <= 0:
            raise DataError(source_file(img), f"no uptake in the {self.region_name} reference region "
                                              f"(mean {float(mean):.3g}): registration or scan is wrong")
        return img / mean


class ReferenceRegionNormalised(MapTransform):
    """Dictionary twin of :class:`ReferenceRegionNormalise`."""

    def __init__(self, keys: KeysCollection = "image", region: str = "pons", voxel: float = 4.0, fwhm: float = 8.0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.normalise = ReferenceRegionNormalise(region, voxel, fwhm)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalise(d[key])
        return d


class MaskToTemplateBrain(Transform):
    """Zero a registered volume outside the template brain (grown by ``margin`` voxels): after
    registration the same voxels are kept for every scan, whatever the scanner's field of view."""

    def __init__(self, margin: int = 1, voxel: float = 4.0, fwhm: float = 8.0):
        self.margin, self.voxel, self.fwhm = int(margin), float(voxel), float(fwhm)

    def __call__(self, img):
        template = mni_fdg_template(self.voxel, self.fwhm)
        _check_grid(img, template, "the template brain mask")
        keep = torch.as_tensor(template.brain(self.margin), device=img.device)[None]
        return img * keep.to(img.dtype)


class MaskToTemplateBraind(MapTransform):
    """Dictionary twin of :class:`MaskToTemplateBrain`."""

    def __init__(self, keys: KeysCollection = "image", margin: int = 1, voxel: float = 4.0, fwhm: float = 8.0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask = MaskToTemplateBrain(margin, voxel, fwhm)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.mask(d[key])
        return d


def template_parcels(n: int = 64, voxel: float = 4.0, fwhm: float = 8.0, grid=None, seed: int = 0) -> np.ndarray:
    """See :func:`_template_parcels`; cached per process (the k-means takes seconds)."""
    return _template_parcels(int(n), float(voxel), float(fwhm), None if grid is None else tuple(int(g) for g in grid),
                             int(seed))


@lru_cache(maxsize=16)
def _template_parcels(n: int, voxel: float, fwhm: float, grid, seed: int) -> np.ndarray:
    """Integer label map (0 = outside, 1..n) that splits the template's grey matter into ``n``
    compact parcels: k-means of the left hemisphere's voxel positions, mirrored to the right, so
    parcel ``k`` and ``k + n/2`` are left/right twins. Data-free (no fold can leak into it).
    ``grid``: pad/crop the map as ``ResizeWithPadOrCropd(spatial_size=grid)`` pads/crops the volumes.

    >>> labels = template_parcels(64)  # doctest: +SKIP
    >>> means = np.bincount(labels.ravel(), weights=volume.ravel()) / np.bincount(labels.ravel())  # doctest: +SKIP
    """
    from sklearn.cluster import KMeans

    if n < 2 or n % 2:
        raise ValueError(f"parcels come in left/right pairs: an even number >= 2, not {n}")
    t = mni_fdg_template(voxel, fwhm)
    ijk = np.argwhere(t.grey > 0.5)
    xyz = ijk @ t.affine[:3, :3].T + t.affine[:3, 3]
    left = xyz[:, 0] < 0
    centres = KMeans(n // 2, n_init=4, random_state=seed).fit(xyz[left]).cluster_centers_
    centres = np.concatenate([centres, centres * np.array([-1.0, 1.0, 1.0])])
    nearest = ((xyz[:, None, :] - centres[None]) ** 2).sum(-1)
    # a voxel takes the nearest parcel of its own hemisphere (the midline does not mix them)
    nearest[left, n // 2:] = np.inf
    nearest[~left, : n // 2] = np.inf
    labels = np.zeros(t.shape, np.int64)
    labels[tuple(ijk.T)] = nearest.argmin(1) + 1
    if grid is not None and tuple(grid) != t.shape:
        from monai.transforms import ResizeWithPadOrCrop

        labels = np.asarray(ResizeWithPadOrCrop(spatial_size=list(grid))(torch.as_tensor(labels)[None]))[0]
    return labels.astype(np.int64)  # shared (cached): never edit in place


def parcel_means(volume: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean of ``volume`` in each parcel 1..labels.max() (the region-level features)."""
    labels, volume = np.asarray(labels).ravel(), np.asarray(volume, np.float64).reshape(-1)
    if volume.size != labels.size:
        raise ValueError(f"volume of {volume.size} voxels on a parcel map of {labels.size}: not the template grid")
    n = int(labels.max())
    sums = np.bincount(labels, weights=volume, minlength=n + 1)[1:]
    counts = np.bincount(labels, minlength=n + 1)[1:]
    return sums / np.maximum(counts, 1)


class ParcelAverage(Transform):
    """Replace every grey-matter voxel of a registered volume by the mean of its parcel
    (:func:`template_parcels`) and zero the rest: the network sees regional uptake only, no
    voxel-scale texture (noise and reconstruction differ by scanner, not by diagnosis).

    >>> out = ParcelAverage(64)(registered)  # doctest: +SKIP
    """

    def __init__(self, n: int = 64, voxel: float = 4.0, fwhm: float = 8.0):
        self.n, self.voxel, self.fwhm = int(n), float(voxel), float(fwhm)

    def __call__(self, img):
        template = mni_fdg_template(self.voxel, self.fwhm)
        _check_grid(img, template, "parcel averaging")
        labels = template_parcels(self.n, self.voxel, self.fwhm, grid=img.shape[1:])
        means = parcel_means(torch.as_tensor(img).float().cpu().numpy()[0], labels)
        table = torch.as_tensor(np.concatenate([[0.0], means]), dtype=img.dtype, device=img.device)
        out = table[torch.as_tensor(labels, device=img.device)][None]
        return MetaTensor(out, meta=dict(img.meta)) if isinstance(img, MetaTensor) else out


class ParcelAveraged(MapTransform):
    """Dictionary twin of :class:`ParcelAverage`."""

    def __init__(self, keys: KeysCollection = "image", n: int = 64, voxel: float = 4.0, fwhm: float = 8.0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.average = ParcelAverage(n, voxel, fwhm)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.average(d[key])
        return d
