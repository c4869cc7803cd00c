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


def train_args(cohort, out, fast_config, epochs=4):
    args = ["--data-root", str(cohort), "--output-dir", str(out), "--device", "cpu", "--seed", "7"]
    for o in [*fast_config, f"train.max_epochs={epochs}", "train.early_stop_patience=10"]:
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


def test_sigkill_mid_fold_then_resume(uninterrupted, tiny_cohort, fast_config, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train3d.py"),
                             *train_args(tiny_cohort, out, fast_config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait until the second fold has finished at least one epoch, then kill without warning
    marker = out / "fold_1" / "checkpoint.pt"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()
    assert not (out / "fold_1" / "fold_result.json").exists()

    assert train3d_main(["--resume", str(out)]) == 0
    assert "resumed after epoch" in (out / "train.log").read_text()
    assert comparable(out / "metrics.json") == comparable(uninterrupted / "metrics.json")


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
