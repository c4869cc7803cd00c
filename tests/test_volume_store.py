"""Preprocessing at scale (issue 25): worker processes, the on-disk volume cache, its keys and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd

from petmonai.config import load_config, resolved_entries
from petmonai.data import VolumeCache, discover, to_items, train_rows
from petmonai.data.volume_store import (
    VolumeStore,
    preprocess_scans,
    preprocessing_digest,
    resolve_workers,
)
from petmonai.errors import ConfigError, PetmonaiError
from petmonai.transforms import build_pipelines

REPO = Path(__file__).resolve().parents[1]


def _fast_cfg(fast_config, tmp_path: Path, *more: str) -> dict:
    return load_config(None, [*fast_config, f"template.cache_dir={tmp_path / 'registration'}",
                              f"data.cache_dir={tmp_path / 'volumes'}", *more])


def _simple_items(folder: Path, n: int) -> list[dict]:
    items = []
    for i in range(n):
        path = folder / f"s{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.random.default_rng(i).random((6, 6, 6), dtype=np.float32), np.eye(4)), path)
        items.append({"image": str(path), "label": i % 2, "scan_id": f"S/{i}"})
    return items


SIMPLE = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), ScaleIntensityd("image")])


def test_workers_equal_serial_bit_for_bit(tiny_cohort, fast_config, tmp_path):
    """Worker processes (cold registration cache), the in-process path and the disk cache all give the
    volumes of the earlier serial preprocessing (MONAI CacheDataset in this process), bit for bit."""
    from monai.data import CacheDataset

    items = to_items(train_rows(discover(tiny_cohort)))[:6]
    cfg = _fast_cfg(fast_config, tmp_path)
    preprocess = build_pipelines(cfg)[0]
    parallel = VolumeCache(items, preprocess, workers=2)  # registers every scan, in 2 processes
    assert parallel.workers == 2 and parallel.computed == 6
    assert len(list((tmp_path / "registration").glob("*.json"))) == 6
    fresh = build_pipelines(_fast_cfg(fast_config, tmp_path / "again"))[0]  # an empty registration cache
    serial = CacheDataset(items, transform=fresh, cache_rate=1.0, num_workers=2, progress=False)
    in_process = VolumeCache(items, preprocess, workers=1)
    from petmonai.training import volume_store

    disk = VolumeCache(items, preprocess, workers=2, store=volume_store(cfg), in_memory=False)
    assert disk.on_disk and disk.computed == 6
    for i, item in enumerate(items):
        expected = torch.as_tensor(serial[i]["image"])
        for cache in (parallel, in_process, disk):
            got = cache[item["scan_id"]]
            assert torch.equal(got["image"], expected), item["scan_id"]
            assert got["label"] == item["label"] and got["scan_id"] == item["scan_id"]


def test_bad_scans_reported_from_workers(tmp_path):
    items = _simple_items(tmp_path, 3)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a NIfTI file")
    items.append({"image": str(broken), "label": 0, "scan_id": "S/broken"})
    with pytest.raises(PetmonaiError, match="broken.nii.gz"):
        VolumeCache(items, SIMPLE, workers=2)
    cache = VolumeCache(items, SIMPLE, workers=2, skip_bad=True,
                        store=VolumeStore(tmp_path / "volumes", "f" * 64), in_memory=False)
    assert cache.scan_ids == ["S/0", "S/1", "S/2"]
    assert [Path(s["image"]).name for s in cache.skipped] == ["broken.nii.gz"]
    assert len(cache.store.entries()) == 3  # a failure is not stored


def test_key_follows_settings_and_file_contents(fast_config, tmp_path):
    base = _fast_cfg(fast_config, tmp_path)
    digest = preprocessing_digest(resolved_entries(base, "preprocess"))[0]
    smoother = _fast_cfg(fast_config, tmp_path, "preprocess.smooth.target_fwhm=10.0")
    assert preprocessing_digest(resolved_entries(smoother, "preprocess"))[0] != digest
    spacing = _fast_cfg(fast_config, tmp_path, "spacing=[6.0, 6.0, 6.0]")  # referenced by several stages
    assert preprocessing_digest(resolved_entries(spacing, "preprocess"))[0] != digest
    elsewhere = _fast_cfg(fast_config, tmp_path / "other")  # another registration cache: the same volumes
    assert preprocessing_digest(resolved_entries(elsewhere, "preprocess"))[0] == digest

    items = _simple_items(tmp_path, 2)
    store = VolumeStore(tmp_path / "volumes", digest)
    assert preprocess_scans(items, SIMPLE, store=store).computed == 2
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), np.float32), np.eye(4)), items[0]["image"])  # the file changes
    again = preprocess_scans(items, SIMPLE, store=store)
    assert again.computed == 1 and not torch.equal(store.load(again.keys[0])["image"],
                                                   store.load(again.keys[1])["image"])


def test_resume_after_kill_computes_only_missing_scans(tmp_path):
    """A preprocessing killed (SIGKILL) half way leaves whole entries only; the next run computes just
    the scans that are missing."""
    items = _simple_items(tmp_path, 8)
    root = tmp_path / "volumes"
    script = f"""
import time, pandas as pd
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Lambdad, ScaleIntensityd
from petmonai.data.volume_store import VolumeStore, preprocess_scans
slow = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), ScaleIntensityd("image"),
                Lambdad("image", lambda x: (time.sleep(0.4), x)[1])])
items = pd.read_json({str(tmp_path / 'items.json')!r}).to_dict("records")
preprocess_scans(items, slow, workers=1, store=VolumeStore({str(root)!r}, "e" * 64))
"""
    pd.DataFrame(items).to_json(tmp_path / "items.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    store = VolumeStore(root, "e" * 64)
    deadline = time.monotonic() + 120
    while len(store.entries()) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(store.entries())
    assert 2 <= done < 8
    fill = preprocess_scans(items, SIMPLE, workers=2, store=store)
    assert fill.computed == 8 - done and not fill.failures
    for i, item in enumerate(items):  # every entry whole and equal to a fresh preprocessing
        assert torch.equal(store.load(fill.keys[i])["image"], SIMPLE(dict(item))["image"].as_tensor())


def test_preprocess_workers_setting():
    assert resolve_workers(3) == 3
    assert resolve_workers("auto", processes_per_node=1) == len(os.sched_getaffinity(0))
    assert resolve_workers("auto", processes_per_node=64) == 1
    for bad in (0, "many", True):
        with pytest.raises(ConfigError, match="preprocess_workers"):
            resolve_workers(bad)


@pytest.mark.slow
def test_training_with_disk_cache_equals_memory(tiny_cohort, fast_config, tmp_path):
    """The same run with ``data.cache: disk`` (items read from disk every step) and ``memory``:
    identical out-of-fold probabilities on CPU."""
    from petmonai.commands import train3d_main

    oof = {}
    for mode in ("memory", "disk"):
        out = tmp_path / mode
        args = ["--data-root", str(tiny_cohort), "--output-dir", str(out), "--device", "cpu", "--seed", "1"]
        for o in [*fast_config, "train.max_epochs=1", "report.write=false", "report.reference_model=false",
                  f"data.cache={mode}", f"data.cache_dir={tmp_path / 'volumes'}"]:
            args += ["--set", o]
        assert train3d_main(args) == 0
        oof[mode] = pd.read_csv(out / "oof_predictions.csv", dtype={"scan_id": str})
    assert len(list((tmp_path / "volumes").glob("*/*.pt"))) == len(oof["disk"])
    pd.testing.assert_frame_equal(oof["memory"], oof["disk"], check_exact=True)


@pytest.mark.parametrize("on_disk", [False, True])
def test_the_loader_seeds_the_augmentation_as_the_cachedataset_did(tmp_path, on_disk):
    """MONAI's DataLoader seeds the Randomizables of a dataset's attributes in order (set_rnd): the
    cache's deterministic preprocessing takes the first seed and the augmentation the next, as with
    the MONAI CacheDataset the cache used to be (else every training run's draws would change)."""
    from monai.data.utils import set_rnd
    from monai.transforms import RandFlipd

    preprocess = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), ScaleIntensityd("image")])
    store = VolumeStore(tmp_path / "v", "d" * 16, {}) if on_disk else None
    cache = VolumeCache(_simple_items(tmp_path, 2), preprocess, store=store, in_memory=not on_disk)
    augment, expected = Compose([RandFlipd("image", prob=0.5)]), Compose([RandFlipd("image", prob=0.5)])
    set_rnd(cache.subset(cache.scan_ids, augment), 7)
    expected.set_random_state(seed=8)
    assert str(augment.transforms[0].R.get_state()) == str(expected.transforms[0].R.get_state())
    old = Compose([RandFlipd("image", prob=0.5)])
    set_rnd(old, 7)
    assert str(augment.transforms[0].R.get_state()) != str(old.transforms[0].R.get_state())  # the test can fail


def test_preprocess_command_fills_the_cache_that_training_reads(tiny_cohort, fast_config, tmp_path, capsys):
    """``petmonai preprocess`` once: every training scan in the on-disk cache; a second call and the
    training's cache (same config, ``data.cache: disk``) compute nothing; a missing folder is one error."""
    from petmonai.commands import main
    from petmonai.training import build_cache

    sets = [f"--set={s}" for s in [*fast_config, f"template.cache_dir={tmp_path / 'registration'}",
                                   f"data.cache_dir={tmp_path / 'volumes'}"]]
    assert main(["preprocess", "--data-root", str(tiny_cohort), *sets]) == 0
    first = capsys.readouterr().out
    assert "12 scans preprocessed in" in first and "(12 now, 0 already there;" in first
    assert len(list((tmp_path / "volumes").glob("*/*.pt"))) == 12
    assert main(["preprocess", "--data-root", str(tiny_cohort), *sets]) == 0
    assert "(0 now, 12 already there;" in capsys.readouterr().out
    cfg = _fast_cfg(fast_config, tmp_path, "data.cache=disk")
    cache = build_cache(cfg, train_rows(discover(tiny_cohort)), build_pipelines(cfg)[0])
    assert cache.computed == 0 and len(cache) == 12 and len(list((tmp_path / "registration").glob("*.json"))) == 12
    assert main(["preprocess", "--data-root", str(tmp_path / "missing"), *sets]) == 2
    assert "missing" in capsys.readouterr().err
