"""Basic PET transforms (array + dictionary twins): the volume check, brain masks, helpers.

The pipelines are built from the config's named stages (:mod:`petmonai.transforms.pipeline`):
``preprocess`` (deterministic: load, orient, resample, normalise, crop; cached once per volume)
and ``augment`` (random, applied per epoch to the cached result, training only).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from petmonai.errors import DataError

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548

# MONAI's LoadImaged builds every image reader it has; with pydicom installed (petmonai's DICOM
# conversion needs it) its GPU DICOM reader warns twice on every machine without nvImageCodec, on
# every load stage built. petmonai's pipelines read NIfTI, never DICOM: keep the console clean.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")


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


class AboveThreshold:
    """A ``select_fn`` for :class:`monai.transforms.CropForegroundd`: voxels above a value,
    by default only the largest connected blob (the brain, not hot spots at the field of view's edge).

    YAML: ``select_fn: {_target_: petmonai.transforms.base.AboveThreshold, threshold: 0.3}``
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
