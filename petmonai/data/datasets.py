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
>>> cache = VolumeCache(items, preprocess)          # decodes every NIfTI once, kept in memory
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

import copy
from collections.abc import Mapping, Sequence

from monai.data import Dataset, get_track_meta, set_track_meta

from petmonai.data.volume_store import VolumeStore, describe_failure, preprocess_scans
from petmonai.errors import PetmonaiError
from petmonai.runs import get_logger

log = get_logger("data")

__all__ = ["UntrackedDataset", "VolumeCache", "describe_failure"]


class VolumeCache:
    """Deterministic preprocessing of every item, run once and kept in memory or on disk.

    Items are dicts with ``image`` (path), ``label`` and ``scan_id``.

    Args:
        items: the scans.
        preprocess: the deterministic pipeline (the config's ``preprocess`` stages).
        num_workers: threads preprocessing in this process when ``workers`` is 1 (``data.cache_workers``).
        skip_bad: leave out (and list in ``skipped``) the scans that fail, instead of raising.
        workers: processes preprocessing the scans not cached yet (``data.preprocess_workers``).
        store: the on-disk cache (:class:`petmonai.data.volume_store.VolumeStore`); None: memory only.
        in_memory: with a store, also hold every volume in memory (read from the store once) rather
            than reading each item from disk when it is asked for.
        failures: index -> problem of scans already known to fail (another process reported them).
        progress: a progress bar while preprocessing.
    """

    def __init__(self, items: Sequence[dict], preprocess, num_workers: int = 2, skip_bad: bool = False,
                 workers: int = 1, store: VolumeStore | None = None, in_memory: bool = True,
                 failures: dict | None = None, progress: bool = False):
        self.items, self.store = list(items), store
        # kept (besides describing the cache): MONAI's DataLoader seeds every Randomizable it finds in a
        # dataset's attributes in order (monai.data.utils.set_rnd); this deterministic Compose takes the
        # first seed, so the augmentation gets the next one, as when this cache was a CacheDataset
        self.preprocess = preprocess
        fill = preprocess_scans(self.items, preprocess, workers, store, progress, threads=num_workers,
                                skip=sorted(failures or {}))
        self.computed, self.workers, self.keys = fill.computed, fill.workers, fill.keys
        all_failures = {**(failures or {}), **fill.failures}
        self.skipped = [{"image": self.items[i]["image"], "problem": p} for i, p in sorted(all_failures.items())]
        if self.skipped and not skip_bad:
            from petmonai.data.discover import bad_files_error

            raise bad_files_error(self.skipped)
        for item in self.skipped:
            log.warning("skipped %s: %s", item["image"], item["problem"])
        self.index = {item["scan_id"]: i for i, item in enumerate(self.items) if i not in all_failures}
        self.produced: dict | None = None  # index -> entries preprocessing produced (in memory)
        if store is None or in_memory:
            self.produced = {i: fill.produced[i] if i in fill.produced else store.load(fill.keys[i])
                             for i in self.index.values()}

    def __len__(self) -> int:
        return len(self.index)

    @property
    def scan_ids(self) -> list[str]:
        return list(self.index)

    @property
    def on_disk(self) -> bool:
        """True when items are read from the on-disk cache whenever they are asked for."""
        return self.produced is None

    def item(self, index: int) -> dict:
        """The preprocessed item at position ``index`` of ``items`` (read from disk without ``in_memory``)."""
        if self.produced is None:
            return {**self.items[index], **self.store.load(self.keys[index])}
        return {**self.items[index], **copy.deepcopy(self.produced[index])}

    def __getitem__(self, scan_id: str) -> dict:
        return self.item(self.index[scan_id])

    def volumes(self, scan_ids: Sequence[str] | None = None) -> Mapping:
        """scan_id -> preprocessed image, read when asked for (the whole set never held at once on disk)."""
        return _Volumes(self, self.scan_ids if scan_ids is None else list(scan_ids))

    def subset(self, scan_ids: Sequence[str], transform=None, track_meta: bool = True) -> Dataset:
        """A dataset over some cached volumes, optionally with (random) transforms on top;
        ``track_meta=False``: the transforms run without MONAI's meta tracking (:class:`UntrackedDataset`)."""
        missing = [s for s in scan_ids if s not in self.index]
        if missing:
            raise PetmonaiError(f"scans not in the preprocessed cache: {missing[:5]}")
        view = _CachedView(self, [self.index[s] for s in scan_ids])
        return (Dataset if track_meta else UntrackedDataset)(view, transform=transform)


class _Volumes(Mapping):
    """scan_id -> image of a :class:`VolumeCache`, each read when it is looked up."""

    def __init__(self, cache: VolumeCache, scan_ids: list[str]):
        self.cache, self.scan_ids = cache, scan_ids

    def __getitem__(self, scan_id: str):
        if scan_id not in self.scan_ids:
            raise KeyError(scan_id)
        return self.cache[scan_id]["image"]

    def __iter__(self):
        return iter(self.scan_ids)

    def __len__(self) -> int:
        return len(self.scan_ids)


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
    """Items of a cache, each returned as a new dict so transforms never alter the cache."""

    def __init__(self, cache: VolumeCache, indices):
        self.cache, self.indices = cache, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.cache.item(self.indices[i])
