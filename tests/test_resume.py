"""Crash and resume, and determinism: a killed run continues to the same result."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from petmonai.commands import train3d_main

REPO = Path(__file__).resolve().parents[1]


# the shipped recipes that train in seconds on the tiny cohort, with inputs small enough for it; every
# other setting (scheduler, augmentation, keep, train_on_val, test views) is the config's own.
# 3 folds: 8 training scans a fold, a multiple of the batch size (the case that was not exact)
SMALL_3D = ["spacing=[8.0, 8.0, 8.0]", "spatial_size=[24, 28, 24]", "crop_size=[20, 24, 20]"]
SMALL_2D = ["spacing=[4.8, 4.8, 4.8]", "spatial_size=[40, 40, 32]", "crop_size=[36, 36]", "num_slices=8",
            "model.in_channels=8"]
RECIPES = {  # name: (--config, overrides, epochs, killed after this many epochs of fold 1)
    "train3d": (None, SMALL_3D, 6, 2),  # the default: one-cycle stepped per batch, Fast* transforms, keep last
    "train2d_baseline": ("train2d_baseline", SMALL_2D, 3, 1),  # cosine per epoch, keep best, early stopping
}


def train_args(cohort, out, fast_config, epochs=4, recipe="train3d", folds=2):
    config, small, _, _ = RECIPES[recipe]
    args = ["--data-root", str(cohort), "--output-dir", str(out), "--device", "cpu", "--seed", "7"]
    args += ["--config", config] if config else []
    overrides = [*fast_config, *small, f"cv.folds={folds}", f"train.max_epochs={epochs}", "train.early_stop_patience=10",
                 "report.write=false", "report.reference_model=false"]
    for o in overrides:
        args += ["--set", o]
    return args


def comparable(metrics_path: Path) -> str:
    """The file's text: identical runs write identical bytes (NaN included, which == would not equate)."""
    text = metrics_path.read_text()
    json.loads(text)
    return text


@pytest.fixture(scope="module")
def uninterrupted(tiny_cohort, fast_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "whole"
    assert train3d_main(train_args(tiny_cohort, out, fast_config)) == 0
    return out


def test_same_seed_same_metrics(uninterrupted, tiny_cohort, fast_config, tmp_path):
    again = tmp_path / "again"
    assert train3d_main(train_args(tiny_cohort, again, fast_config)) == 0
    assert comparable(again / "metrics.json") == comparable(uninterrupted / "metrics.json")


def kill_mid_fold(args, out: Path, fold: int = 1, after_epochs: int = 2) -> None:
    """Run train3d.py in a child process and SIGKILL it once fold ``fold`` has trained ``after_epochs``
    epochs, before that fold finishes."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train3d.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history, checkpoint = out / f"fold_{fold}" / "history.csv", out / f"fold_{fold}" / "checkpoint.pt"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        try:  # history.csv is written just before the checkpoint: both, or the kill may precede the first
            if len(history.read_text().splitlines()) > after_epochs and checkpoint.is_file():  # header + epochs
                break
        except OSError:
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()
    assert not (out / f"fold_{fold}" / "fold_result.json").exists(), "killed after the fold finished"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_sigkill_mid_fold_then_resume_is_exact(recipe, tiny_cohort, fast_config, tmp_path):
    """A shipped recipe killed (SIGKILL) in the middle of a fold and resumed writes the same bytes as
    an uninterrupted run: out-of-fold predictions, metrics and every fold's predictions."""
    _, _, epochs, kill_after = RECIPES[recipe]
    whole, out = tmp_path / "whole", tmp_path / "killed"
    assert train3d_main(train_args(tiny_cohort, whole, fast_config, epochs, recipe, folds=3)) == 0
    kill_mid_fold(train_args(tiny_cohort, out, fast_config, epochs, recipe, folds=3), out, after_epochs=kill_after)

    assert train3d_main(["--resume", str(out)]) == 0
    assert "resumed after epoch" in (out / "train.log").read_text()
    for name in ("oof_predictions.csv", "metrics.json", *(f"fold_{k}/predictions.csv" for k in range(3))):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name


@pytest.mark.parametrize("n", [8, 9, 6])  # a multiple of the batch, one over (drop_last), neither
@pytest.mark.parametrize("prefetch", [False, True])
def test_loader_epoch_order_resumes_from_the_saved_generator(n, prefetch):
    """Ignite takes len(loader) batches an epoch; a checkpoint saves the loader's generator after
    them. A loader restored from that state shuffles the next epoch as the uninterrupted one does
    (torch's sampler drew its last permutation lazily, at the next epoch's start: after the save)."""
    from petmonai.training import make_loader

    data = [{"x": torch.tensor([float(i)])} for i in range(n)]

    def ignite_epoch(loader, iterator):
        """One epoch as Ignite runs it: the previous iterator is asked once more, then a new one."""
        if iterator is not None:
            assert next(iterator, None) is None
        iterator = iter(loader)
        return [next(iterator)["x"].flatten().tolist() for _ in range(len(loader))], iterator

    whole = make_loader(data, 4, True, 0, torch.device("cpu"), seed=5, prefetch=prefetch)
    first, iterator = ignite_epoch(whole, None)
    saved = whole.generator.get_state()  # what TrainingState saves at the end of the epoch
    second, _ = ignite_epoch(whole, iterator)

    resumed = make_loader(data, 4, True, 0, torch.device("cpu"), seed=5, prefetch=prefetch)
    resumed.generator.set_state(saved)
    assert ignite_epoch(resumed, None)[0] == second
    assert first != second


def test_resume_refuses_a_non_run(tmp_path, capsys):
    assert train3d_main(["--resume", str(tmp_path)]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_finished_folds_drop_their_resumable_checkpoint(tiny_cohort, fast_config, tmp_path):
    """A finished fold is read back from fold_result.json, so its ~0.4 GB checkpoint.pt goes."""
    from petmonai.commands import train3d_main

    out = tmp_path / "run"
    args = ["--data-root", str(tiny_cohort), "--output-dir", str(out), "--device", "cpu"]
    for o in [*fast_config, "train.max_epochs=1", "report.write=false", "report.reference_model=false"]:
        args += ["--set", o]
    assert train3d_main(args) == 0
    assert (out / "fold_0" / "fold_result.json").is_file() and (out / "fold_0" / "best_model.pt").is_file()
    assert not list(out.glob("fold_*/checkpoint.pt"))


def test_prefetching_loader_gives_the_same_batches(tiny_cohort, fast_config):
    """ThreadDataLoader (augmentation in a background thread) = the plain loader: order and draws."""
    from monai.data import ThreadDataLoader

    from petmonai.config import load_config
    from petmonai.training import make_loader
    from petmonai.data import VolumeCache
    from petmonai.transforms import build_pipelines

    cfg = load_config(overrides=fast_config)
    preprocess, augment = build_pipelines(cfg)
    files = sorted((tiny_cohort / "Train" / "NC").iterdir())[:5]
    cache = VolumeCache([{"image": str(p), "label": 0, "scan_id": p.name} for p in files], preprocess)
    epochs = {}
    for prefetch in (False, True):
        augment.set_random_state(seed=7)
        loader = make_loader(cache.subset(cache.scan_ids, augment), 2, True, 0, torch.device("cpu"), seed=3,
                             prefetch=prefetch)
        assert isinstance(loader, ThreadDataLoader) == prefetch
        epochs[prefetch] = [b["image"].clone() for _ in range(2) for b in loader]
    assert len(epochs[True]) == len(epochs[False]) == 4  # 5 scans, batches of 2, a lone last one dropped
    for a, b in zip(epochs[False], epochs[True]):
        assert torch.equal(a, b)
