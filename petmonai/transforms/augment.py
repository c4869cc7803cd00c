"""Fast random augmentation: MONAI's RandSpatialCropd / RandFlipd with the same draws, by plain slicing."""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from monai.transforms import RandFlipd, RandSpatialCropd


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
