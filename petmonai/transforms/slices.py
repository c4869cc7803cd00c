"""2D slice models: axial slices of a volume stacked as channels (array + dictionary twins)."""

from __future__ import annotations

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform

from petmonai.errors import DataError
from petmonai.transforms.base import source_file


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
