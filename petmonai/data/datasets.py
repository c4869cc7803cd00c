"""Datasets: the deterministic preprocessing cached once per volume, and fold views of it.

Items are :func:`petmonai.data.discover.to_items` dicts and ``preprocess`` the config's ``preprocess``
transforms in training; here two tiny NIfTI files written to a temporary folder and a short
MONAI pipeline:

>>> import tempfile
>>> from pathlib import Path
>>> import nibabel as nib, numpy as np
>>> from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandFlipd, ScaleIntensityd
>>> tmp = tempfile.TemporaryDirectory()
>>> items = []
>>> for scan_id in ["MCI/3", "NC/1"]:
...     path = Path(tmp.name) / (scan_id.replace("/", "_") + ".nii.gz")
...     nib.save(nib.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), np.eye(4)), path)
...     items.append({"image": str(path), "label": int(scan_id.startswith("MCI")), "scan_id": scan_id})
>>> preprocess = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), ScaleIntensityd("image")])
>>> cache = VolumeCache(items, preprocess)          # decodes every NIfTI once (MONAI CacheDataset)
>>> augment = RandFlipd("image", prob=0.5, spatial_axis=0)
>>> train_ds = cache.subset(["MCI/3", "NC/1"], transform=augment)   # random augmentation per epoch
>>> len(train_ds), tuple(train_ds[0]["image"].shape)
(2, (1, 8, 8, 8))

A file that fails preprocessing is reported by name; with ``skip_bad=True`` it is left out and
listed in ``cache.skipped`` instead:

>>> broken = Path(tmp.name) / "NC_2.nii.gz"
>>> _ = broken.write_bytes(b"not a NIfTI file")
>>> cache = VolumeCache(items + [{"image": str(broken), "label": 0, "scan_id": "NC/2"}], preprocess, skip_bad=True)
>>> cache.scan_ids, [Path(item["image"]).name for item in cache.skipped]
(['MCI/3', 'NC/1'], ['NC_2.nii.gz'])
>>> tmp.cleanup()
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence

from monai.data import CacheDataset, Dataset, get_track_meta, set_track_meta
from monai.transforms import Compose

from petmonai.errors import DataError, PetmonaiError
from petmonai.runs import get_logger

log = get_logger("data")


_DAMAGED = (EOFError, zlib.error, gzip.BadGzipFile)


def describe_failure(err: BaseException) -> str:
    """The innermost useful message of an exception raised inside a MONAI Compose."""
    messages, damaged = [], False
    while err is not None:
        if isinstance(err, DataError):
            return err.problem
        damaged = damaged or isinstance(err, _DAMAGED)
        text = str(err).strip()
        if text and not text.startswith("applying transform"):
            messages.append(f"{type(err).__name__}: {text.splitlines()[-1]}")
        err = err.__cause__ or err.__context__
    if not messages:
        return "preprocessing failed"
    if damaged:  # a truncated or corrupt .nii.gz: say so in words, keep the decoder's message
        return f"damaged compressed data ({messages[-1]}): the file is corrupt or truncated; re-copy or re-export it"
    return messages[-1]


class _GuardedCacheDataset(CacheDataset):
    """CacheDataset that records which items failed instead of aborting the whole fill."""

    def __init__(self, *args, **kwargs):
        self.failures: dict[int, str] = {}
        super().__init__(*args, **kwargs)

    def _load_cache_item(self, idx: int):
        try:
            return super()._load_cache_item(idx)
        except Exception as err:  # reported per file by VolumeCache
            self.failures[idx] = describe_failure(err)
            return None


class VolumeCache:
    """Deterministic preprocessing of every item, run once and kept in memory.

    Items are dicts with ``image`` (path), ``label`` and ``scan_id``.
    """

    def __init__(self, items: Sequence[dict], preprocess: Compose, num_workers: int = 2, skip_bad: bool = False):
        self.items = list(items)
        self.dataset = _GuardedCacheDataset(self.items, transform=preprocess, cache_rate=1.0,
                                            num_workers=max(1, num_workers), progress=False)
        self.skipped = [{"image": self.items[i]["image"], "problem": p} for i, p in sorted(self.dataset.failures.items())]
        if self.skipped and not skip_bad:
            from petmonai.data.discover import bad_files_error

            raise bad_files_error(self.skipped)
        for item in self.skipped:
            log.warning("skipped %s: %s", item["image"], item["problem"])
        failed = set(self.dataset.failures)
        self.index = {item["scan_id"]: i for i, item in enumerate(self.items) if i not in failed}

    def __len__(self) -> int:
        return len(self.index)

    @property
    def scan_ids(self) -> list[str]:
        return list(self.index)

    def __getitem__(self, scan_id: str) -> dict:
        return self.dataset[self.index[scan_id]]

    def subset(self, scan_ids: Sequence[str], transform=None, track_meta: bool = True) -> Dataset:
        """A dataset over some cached volumes, optionally with (random) transforms on top;
        ``track_meta=False``: the transforms run without MONAI's meta tracking (:class:`UntrackedDataset`)."""
        missing = [s for s in scan_ids if s not in self.index]
        if missing:
            raise PetmonaiError(f"scans not in the preprocessed cache: {missing[:5]}")
        view = _CachedView(self.dataset, [self.index[s] for s in scan_ids])
        return (Dataset if track_meta else UntrackedDataset)(view, transform=transform)


class UntrackedDataset(Dataset):
    """A MONAI ``Dataset`` whose transforms run with MONAI's meta-data tracking switched off (the
    setting is restored after every item).

    Training augments cached plain tensors: no affine or transform history is needed, and building
    it (``MetaTensor`` wrapping in every crop and flip) took ~70% of the augmentation time on CPU
    (1.5 -> 0.4 ms a batch of four 32x40x32 volumes; docs/benchmarks.md). The transform is the
    caller's own object, so a loader seeds it as it would in a plain ``Dataset``: the same random
    draws and values.

    >>> import torch; from monai.transforms import RandFlipd
    >>> ds = UntrackedDataset([{"image": torch.zeros(1, 8, 8, 8)}], transform=RandFlipd("image", prob=1.0))
    >>> type(ds[0]["image"])
    <class 'torch.Tensor'>
    """

    def _transform(self, index: int):
        before = get_track_meta()
        set_track_meta(False)
        try:
            return super()._transform(index)
        finally:
            set_track_meta(before)


class _CachedView(Sequence):
    """Items of a cache, each returned as a shallow copy so transforms never alter the cache."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return dict(self.dataset[self.indices[i]])
