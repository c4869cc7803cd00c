"""Preprocessing at scale: every scan preprocessed once, in worker processes, into an on-disk cache.

:func:`preprocess_scans` runs the deterministic ``preprocess`` pipeline over the scans that are not
cached yet, in ``workers`` processes (forked where the platform allows, each with one torch thread)
or, with one worker, in this process. Each result is either handed back (the in-memory cache) or
written to a :class:`VolumeStore` (the on-disk cache): one ``.pt`` file per scan under
``<cache_dir>/<preprocessing digest>/<file SHA-256>.pt``, written to a temporary file and renamed,
so a killed run leaves whole entries only and the next run computes just the missing ones.

The key of an entry is the SHA-256 of the input file's bytes and the digest of the resolved
``preprocess`` stages (:func:`preprocessing_digest`: every argument after ``@``/``$`` resolution,
the contents of the files they name, and the petmonai/MONAI/torch versions): a changed setting or
a changed file never reads a stale entry. Only what preprocessing produced is stored (the
``image`` and any key it added), never the item's ``label`` or ``scan_id``: two copies of one file
share an entry.

>>> import tempfile, nibabel as nib, numpy as np
>>> from pathlib import Path
>>> from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
>>> tmp = Path(tempfile.mkdtemp())
>>> nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp / "a.nii.gz")
>>> items = [{"image": str(tmp / "a.nii.gz"), "label": 0, "scan_id": "a"}]
>>> store = VolumeStore(tmp / "volumes", "0123abcd")
>>> fill = preprocess_scans(items, Compose([LoadImaged("image"), EnsureChannelFirstd("image")]), store=store)
>>> fill.computed, fill.failures, tuple(store.load(store.key(items[0]["image"]))["image"].shape)
(1, {}, (1, 4, 4, 4))
>>> preprocess_scans(items, None, store=store).computed  # already there: nothing to compute
0
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from petmonai.errors import ConfigError, DataError, PetmonaiError
from petmonai.runs import atomic_write_bytes, atomic_write_json, cache_root, sha256_file

#: bump when what an entry holds, or how it is written, changes: every earlier entry is then unused
STORE_FORMAT = 1

#: entries of preprocessing stages that say where a cache is, not what the volume becomes
_NOT_IN_KEY = ("cache_dir",)


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


def default_volume_dir() -> Path:
    """``$PETMONAI_CACHE/volumes``, else ``~/.cache/petmonai/volumes``."""
    return cache_root() / "volumes"


def resolve_workers(value, processes_per_node: int | None = None) -> int:
    """``data.preprocess_workers``: a positive number, or ``auto``: the cores this process may run on
    (``os.sched_getaffinity``) divided between the processes of a torchrun node (``LOCAL_WORLD_SIZE``)."""
    if isinstance(value, str):
        if value != "auto":
            raise ConfigError(f"data.preprocess_workers: 'auto' or a positive number, not {value!r}")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        per_node = processes_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        return max(1, cores // max(1, per_node))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"data.preprocess_workers: 'auto' or a positive number, not {value!r}")
    return value


def _canonical(obj):
    """JSON-able form of resolved config entries: files they name stand for their contents."""
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))
                if k not in _NOT_IN_KEY}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (bool, int, float)) or obj is None:
        return obj
    text = obj if isinstance(obj, str) else repr(obj)
    if isinstance(obj, str) and len(obj) < 4096 and os.path.isfile(obj):
        return {"file": os.path.basename(obj), "sha256": sha256_file(obj)}
    return text


def preprocessing_digest(entries: Sequence) -> tuple[str, dict]:
    """The key of a preprocessing configuration: ``(hex digest, the description it was computed from)``.

    ``entries``: the resolved ``preprocess`` stages (:func:`petmonai.config.resolved_entries`)."""
    import monai

    import petmonai

    description = {"format": STORE_FORMAT, "stages": _canonical(list(entries)),
                   "versions": {"petmonai": petmonai.__version__, "monai": monai.__version__,
                                "torch": torch.__version__.split("+")[0]}}
    text = json.dumps(description, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest(), description


def to_bytes(produced: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(produced, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def produced_entries(item: dict, out: dict) -> dict:
    """What preprocessing made of ``item``: the entries it changed or added, as plain tensors (no
    MONAI meta data), in the form both caches keep and a ``weights_only`` load reads back."""
    from monai.utils import convert_to_tensor

    changed = {k: v for k, v in out.items() if k not in item or v is not item[k]}
    return convert_to_tensor(changed, convert_numeric=False, track_meta=False)


class VolumeStore:
    """The on-disk cache of one preprocessing configuration: ``<root>/<digest[:16]>/<file sha256>.pt``.

    Args:
        root: the cache folder (``data.cache_dir``); every configuration has a subfolder.
        digest: :func:`preprocessing_digest` of the configuration.
        description: written once as ``preprocess.json`` beside the entries (what they were made with).
    """

    def __init__(self, root: str | Path, digest: str, description: dict | None = None):
        self.folder = Path(root).expanduser() / digest[:16]
        self.digest = digest
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if description is not None and not (self.folder / "preprocess.json").is_file():
                atomic_write_json(self.folder / "preprocess.json", {"digest": digest, **description})
        except OSError as err:
            raise PetmonaiError(f"{self.folder}: the volume cache cannot be written ({err.strerror}); "
                                "set data.cache_dir or PETMONAI_CACHE to a writable folder") from None

    @staticmethod
    def key(path: str | Path) -> str | None:
        """The entry of an input file: its SHA-256 (None for a file that cannot be read)."""
        try:
            return sha256_file(path)
        except OSError:
            return None

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def has(self, key: str | None) -> bool:
        return key is not None and self.path(key).is_file()

    def save(self, key: str, data: bytes) -> None:
        try:
            atomic_write_bytes(self.path(key), data)
        except OSError as err:
            raise PetmonaiError(f"{self.path(key)}: cannot write to the volume cache ({err.strerror})") from None

    def load(self, key: str) -> dict:
        path = self.path(key)
        try:
            return from_bytes(path.read_bytes())
        except Exception as err:  # a file damaged or removed behind our back: say which
            raise PetmonaiError(f"{path}: unreadable volume-cache entry ({type(err).__name__}: {err}); delete it "
                                "and run again to preprocess that scan anew") from None

    def entries(self) -> list[Path]:
        return sorted(self.folder.glob("*.pt"))


@dataclass
class Fill:
    """What :func:`preprocess_scans` did: ``produced`` (index -> entries; without a store),
    ``failures`` (index -> problem), ``computed`` (scans preprocessed now), ``keys`` (index -> key)."""

    produced: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)
    computed: int = 0
    workers: int = 1


_WORKER: dict = {}


def _init_worker(preprocess, store) -> None:
    """One thread per worker process (torch and ITK): one process per core, no oversubscription."""
    torch.set_num_threads(1)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    except ImportError:  # (a preprocessing without registration needs no SimpleITK)
        pass
    _WORKER.update(preprocess=preprocess, store=store)


def _preprocess_one(index: int, item: dict, key: str | None, as_bytes: bool = True):
    """``(index, produced entries or bytes or None, problem or None)``; with a store the result goes to
    disk and only ``(index, None, None)`` comes back."""
    try:
        produced = produced_entries(item, _WORKER["preprocess"](dict(item)))
    except Exception as err:  # reported per file by the caller
        return index, None, describe_failure(err)
    store = _WORKER["store"]
    if store is not None and key is not None:
        store.save(key, to_bytes(produced))
        return index, None, None
    return index, (to_bytes(produced) if as_bytes else produced), None


def _context():
    """fork where there is one (no pickling of the pipeline, no re-imports); else spawn."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _progress(total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="scan", desc="preprocessing", disable=not show, leave=False,
                dynamic_ncols=True, file=sys.stderr)


def preprocess_scans(items: Sequence[dict], preprocess, workers: int = 1, store: VolumeStore | None = None,
                     progress: bool = False, threads: int = 1, skip: Sequence[int] = (),
                     in_process: bool | None = None) -> Fill:
    """Preprocess each of ``items`` not yet in ``store`` (all of them without a store).

    Args:
        items: dicts with ``image`` (path), ``label`` and ``scan_id``.
        preprocess: the deterministic pipeline (a callable on one item).
        workers: processes; 1: in this process (with ``threads`` threads, as MONAI's CacheDataset).
        store: the on-disk cache the results go to; None: they come back in ``Fill.produced``.
        progress: a progress bar (scans/s, ETA) on stderr.
        skip: indices known to fail (another rank reported them): neither computed nor returned.
        in_process: False: worker processes even for one worker (a benchmark's like-for-like 1 -> 2
            workers); default: in this process for one worker.
    """
    fill = Fill()
    todo = []
    for i, item in enumerate(items):
        key = store.key(item["image"]) if store is not None else None
        fill.keys[i] = key
        if i not in skip and not (store is not None and store.has(key)):
            todo.append(i)
    fill.workers = max(1, min(int(workers), len(todo)))
    local = fill.workers == 1 if in_process is None else in_process
    with _progress(len(todo), progress and len(todo) > 0) as bar:
        for index, produced, problem in _run(items, todo, fill, preprocess, store, threads, local):
            if problem is not None:
                fill.failures[index] = problem
            elif produced is not None:
                fill.produced[index] = from_bytes(produced) if isinstance(produced, bytes) else produced
            fill.computed += problem is None
            bar.update(1)
    return fill


def _run(items, todo, fill: Fill, preprocess, store, threads: int, local: bool):
    """The results of ``todo``, as they complete: in this process (``local``) or in ``fill.workers`` processes."""
    if not todo:
        return
    if local:
        saved = dict(_WORKER)
        _WORKER.update(preprocess=preprocess, store=store)
        try:
            with concurrent.futures.ThreadPoolExecutor(max(1, int(threads))) as pool:
                futures = [pool.submit(_preprocess_one, i, items[i], fill.keys[i], False) for i in todo]
                for future in concurrent.futures.as_completed(futures):
                    yield future.result()
        finally:
            _WORKER.clear()
            _WORKER.update(saved)
        return
    with concurrent.futures.ProcessPoolExecutor(fill.workers, mp_context=_context(), initializer=_init_worker,
                                                initargs=(preprocess, store)) as pool:
        futures = [pool.submit(_preprocess_one, i, items[i], fill.keys[i]) for i in todo]
        try:
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
