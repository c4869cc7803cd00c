"""Multi-process training: 2 CPU processes (gloo) under torchrun on a tiny synthetic cohort.

The run writes a per-rank trace (``PETMONAI_TRACE_DIR``, see :class:`petmonai.training.distributed.RankTrace`):
the scans of every training batch, every validation prediction and metric, and a digest of
the weights at the end of every epoch. The checks: both ranks end every epoch with identical
weights, every training scan is seen exactly once per epoch across the ranks, and the
validation AUC every rank acts on is the AUC of the gathered predictions of both ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from petmonai.training import TRACE_ENV, DistributedBatchSampler, shard, unshard

REPO = Path(__file__).resolve().parents[1]

needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


# ----------------------------------------------------------------- the sampler, without processes

@pytest.mark.parametrize("n,batch_size,world", [(9, 2, 2), (7, 2, 2), (24, 4, 2), (25, 4, 3), (100, 4, 8), (17, 3, 4),
                                                (4, 4, 2), (33, 1, 2)])
def test_distributed_batch_sampler_every_item_once(n, batch_size, world):
    for epoch in (1, 2):
        per_rank = []
        for rank in range(world):
            sampler = DistributedBatchSampler(n, batch_size, world, rank, seed=5)
            sampler.set_epoch(epoch)
            per_rank.append(list(sampler))
        assert len({len(b) for b in per_rank}) == 1  # the same number of steps on every rank (DDP needs it)
        assert all(len(b) == len(DistributedBatchSampler(n, batch_size, world, 0)) for b in per_rank)
        seen = [i for batches in per_rank for batch in batches for i in batch]
        assert sorted(seen) == list(range(n))  # every item exactly once per epoch, no padding
        sizes = [len(batch) for batches in per_rank for batch in batches]
        assert min(sizes) >= 2  # batch norm trains on 2+ samples
        if batch_size >= 4 and n >= 2 * batch_size * world:
            assert max(sizes) <= batch_size  # (smaller sets: fewer, larger batches rather than batches of 1)
    a = DistributedBatchSampler(n, batch_size, world, 0, seed=5)
    a.set_epoch(1)
    b = DistributedBatchSampler(n, batch_size, world, 0, seed=5)
    b.set_epoch(2)
    if n > 4:
        assert list(a) != list(b)  # a new order every epoch


def test_distributed_batch_sampler_refuses_too_few_items():
    from petmonai.errors import PetmonaiError

    with pytest.raises(PetmonaiError, match="processes"):
        DistributedBatchSampler(3, 2, 2, 0)


def test_shard_unshard_round_trip():
    items = list(range(11))
    for world in (1, 2, 3, 5, 12):
        parts = [shard(items, world, r) for r in range(world)]
        assert unshard(parts) == items


# ------------------------------------------------------------------ 2 processes under torchrun

@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """24 training scans: 2 folds of 9 train / 3 val / 12 test, an odd split between 2 ranks."""
    from petmonai.data import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("ddp") / "pet", n_nc=12, n_mci=12, n_test=2, seed=5)


def _torchrun(cohort: Path, base: Path, overrides: list[str]) -> dict:
    """Train on ``cohort`` with 2 CPU processes; the run folder, every rank's trace events and the folds."""
    out, trace = base / "run", base / "trace"
    args = ["--data-root", str(cohort), "--output-dir", str(out), "--device", "cpu", "--seed", "1"]
    for o in overrides:
        args += ["--set", o]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           TRACE_ENV: str(trace), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    # --standalone: a rendezvous on a free local port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "--max_restarts=0", str(REPO / "scripts" / "train3d.py"), *args]
    try:
        proc = subprocess.run(cmd, env=env, cwd=base, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"2-process training did not finish in {err.timeout}s:\n{(err.stdout or b'')[-3000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    events = defaultdict(list)
    for rank in (0, 1):
        for line in (trace / f"rank{rank}.jsonl").read_text().splitlines():
            e = json.loads(line)
            assert e["rank"] == rank and e["world"] == 2
            events[e["event"]].append(e)
    folds = pd.read_csv(out / "folds.csv", dtype={"scan_id": str})
    return {"out": out, "events": events, "folds": folds, "log": proc.stdout + proc.stderr}


@pytest.fixture(scope="module")
def ddp_run(cohort, fast_config, tmp_path_factory):
    return _torchrun(cohort, tmp_path_factory.mktemp("ddp_run"), [
        *fast_config, "cv.folds=2", "train.max_epochs=2", "train.batch_size=2", "train.early_stop_patience=10",
        "train.num_workers=0", "train.keep_resume_checkpoint=true", "report.write=false",
        "report.reference_model=false",
        # validation on both ranks is under test: the default (keep=last, val scans train) validates nothing
        "train.keep=best", "train.train_on_val=false",
        "cv.test_views=evaluator"])  # the val predictions are compared with the evaluator's below


@pytest.fixture(scope="module")
def ddp_default_run(cohort, fast_config, tmp_path_factory):
    """The default recipe: the last epoch kept, validation scans train, held-out scans scored with
    predict.py's views, each rank scoring its share."""
    return _torchrun(cohort, tmp_path_factory.mktemp("ddp_default"), [
        *fast_config, "cv.folds=2", "train.max_epochs=2", "train.batch_size=2", "report.write=false",
        "report.reference_model=false"])


def _by(events, *keys):
    groups = defaultdict(dict)
    for e in events:
        groups[tuple(e[k] for k in keys)][e["rank"]] = e
    return groups


def _members(folds, fold, role):
    part = folds[(folds["repeat"] == 0) & (folds["fold"] == fold) & (folds["role"] == role)]
    return sorted(part["scan_id"])


@pytest.mark.slow
@needs_gloo
def test_ranks_end_with_identical_weights(ddp_run):
    ends = _by(ddp_run["events"]["epoch_end"], "fold", "epoch")
    assert sorted(ends) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for key, ranks in ends.items():
        assert set(ranks) == {0, 1}
        assert ranks[0]["digest"] == ranks[1]["digest"], f"fold/epoch {key}: weights differ between ranks"
    best = _by(ddp_run["events"]["best"], "fold")
    for fold, ranks in best.items():
        assert ranks[0]["digest"] == ranks[1]["digest"], f"fold {fold}: best weights differ between ranks"


@pytest.mark.slow
@needs_gloo
def test_each_training_scan_once_per_epoch_across_ranks(ddp_run):
    batches = defaultdict(lambda: defaultdict(list))
    for e in ddp_run["events"]["train_batch"]:
        batches[(e["fold"], e["epoch"])][e["rank"]].append(e["scan_ids"])
    assert sorted(batches) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for (fold, epoch), ranks in batches.items():
        assert len(ranks[0]) == len(ranks[1]) >= 1  # the same number of steps on both ranks
        seen = [s for r in (0, 1) for batch in ranks[r] for s in batch]
        assert sorted(seen) == _members(ddp_run["folds"], fold, "train"), (fold, epoch)
        assert set(sum(ranks[0], [])).isdisjoint(sum(ranks[1], []))


@pytest.mark.slow
@needs_gloo
def test_validation_metric_is_computed_on_gathered_predictions(ddp_run):
    out, folds = ddp_run["out"], ddp_run["folds"]
    vals = _by(ddp_run["events"]["val"], "fold", "epoch")
    assert sorted(vals) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for (fold, epoch), ranks in vals.items():
        items = ranks[0]["items"] + ranks[1]["items"]
        ids = [i["scan_id"] for i in items]
        assert ranks[0]["items"] and ranks[1]["items"]  # both ranks validated a share
        assert sorted(ids) == _members(folds, fold, "val")  # each val scan once: no padded duplicates
        gathered = roc_auc_score([i["label"] for i in items], [i["prob_mci"] for i in items])
        assert ranks[0]["val_auc"] == ranks[1]["val_auc"]  # one metric, so one early-stop decision
        assert ranks[0]["val_auc"] == pytest.approx(gathered, abs=1e-9), (fold, epoch)
        history = pd.read_csv(out / f"fold_{fold}" / "history.csv")
        assert history.loc[history["epoch"] == epoch, "val_auc"].item() == pytest.approx(gathered, abs=1e-9)
    for fold in (0, 1):  # the predictions written after training: gathered from both ranks, in order
        result = json.loads((out / f"fold_{fold}" / "fold_result.json").read_text())
        preds = pd.read_csv(out / f"fold_{fold}" / "predictions.csv", dtype={"scan_id": str})
        for role in ("val", "test"):
            assert sorted(preds.loc[preds["role"] == role, "scan_id"]) == _members(folds, fold, role)
        val = preds[preds["role"] == "val"].merge(pd.read_csv(out / "datalist.csv", dtype={"scan_id": str}),
                                                  on="scan_id")
        best = vals[(fold, result["best_epoch"])][0]["items"] + vals[(fold, result["best_epoch"])][1]["items"]
        by_id = {i["scan_id"]: i["prob_mci"] for i in best}
        for sid, p in zip(val["scan_id"], val["prob_mci"]):
            assert p == pytest.approx(by_id[sid], abs=1e-5)  # the best checkpoint, evaluated again
        assert result["best_val_auc"] == pytest.approx(roc_auc_score(val["label"], val["prob_mci"]), abs=1e-9)


@pytest.mark.slow
@needs_gloo
def test_only_rank_zero_writes(ddp_run):
    out = ddp_run["out"]
    for name in ("config.yaml", "provenance.json", "datalist.csv", "folds.csv", "metrics.json",
                 "oof_predictions.csv", "train.log", "fold_0/best_model.pt", "fold_0/checkpoint.pt",
                 "fold_1/history.csv", "fold_1/predictions.csv"):
        assert (out / name).is_file(), name
    assert json.loads((out / "provenance.json").read_text())["processes"] == 2
    oof = pd.read_csv(out / "oof_predictions.csv", dtype={"scan_id": str})
    assert len(oof) == 24 and oof["scan_id"].is_unique  # every training scan predicted once, out of fold
    # TensorBoard files carry the writing process's id: one process wrote them all
    events = list(out.glob("fold_*/tensorboard/events.out.tfevents.*"))
    assert events and len({p.name.split(".")[-2] for p in events}) == 1
    assert "2 processes (gloo)" in (out / "train.log").read_text()
    state = torch.load(out / "fold_0" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert len(state["rank_rng"]) == 2  # every rank's random states, for an exact resume
    assert not any(k.startswith("module.") for k in state["model"])  # the plain model, not the DDP wrapper


@pytest.mark.slow
@needs_gloo
def test_default_recipe_on_two_ranks(ddp_default_run):
    """keep=last with train_on_val: both ranks train on train + val scans and end with identical
    weights; the held-out scores, each rank scoring its share with the prediction views, come back
    in order and equal one process scoring the saved model."""
    from petmonai.config import load_config
    from petmonai.training import build_cache, test_view_scorer
    from petmonai.data import train_rows
    from petmonai.models import load_weights
    from petmonai.models import build_model
    from petmonai.transforms import build_pipelines

    out, folds = ddp_default_run["out"], ddp_default_run["folds"]
    batches = defaultdict(list)
    for e in ddp_default_run["events"]["train_batch"]:
        batches[(e["fold"], e["epoch"])] += e["scan_ids"]
    assert sorted(batches) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for (fold, epoch), seen in batches.items():
        assert sorted(seen) == sorted(_members(folds, fold, "train") + _members(folds, fold, "val")), (fold, epoch)
    final = _by(ddp_default_run["events"]["best"], "fold")
    assert sorted(final) == [(0,), (1,)]
    for fold, ranks in final.items():
        assert ranks[0]["digest"] == ranks[1]["digest"], f"fold {fold}: final weights differ between ranks"

    cfg = load_config(out / "config.yaml")
    datalist = pd.read_csv(out / "datalist.csv", dtype={"scan_id": str})
    cache = build_cache(cfg, train_rows(datalist), build_pipelines(cfg)[0])
    scorer = test_view_scorer(cfg, torch.device("cpu"))
    assert scorer is not None  # the default scores held-out scans with the prediction views
    for fold in (0, 1):
        preds = pd.read_csv(out / f"fold_{fold}" / "predictions.csv", dtype={"scan_id": str})
        assert set(preds["role"]) == {"test"} and sorted(preds["scan_id"]) == _members(folds, fold, "test")
        net = build_model(cfg["model"], cfg)
        load_weights(net, out / f"fold_{fold}" / "best_model.pt", torch.device("cpu"))
        again = scorer(net, {sid: cache[sid]["image"] for sid in preds["scan_id"]})
        np.testing.assert_allclose(preds["prob_mci"], again, atol=1e-5)


# ------------------------------------------------ preprocessing: each scan once across the ranks

@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("cache_mode", ["memory"])  # (disk: the same split; tests/test_volume_store.py)
def test_each_scan_preprocessed_once_across_ranks(cohort, fast_config, tmp_path, cache_mode):
    """2 processes split the scans, each preprocesses (registers) its share into the shared on-disk
    cache, then both read all of them: every scan registered exactly once, both ranks hold the same
    volumes, and an unreadable scan is skipped on both."""
    from petmonai.data import discover, train_rows

    root = cohort
    out = tmp_path / "out"
    out.mkdir()
    overrides = [*fast_config, f"template.cache_dir={tmp_path / 'registration'}",
                 f"data.cache_dir={tmp_path / 'volumes'}", "data.skip_bad=true", "data.preprocess_workers=2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "--max_restarts=0", str(REPO / "tests" / "ddp_cache_probe.py"), str(root), str(out), cache_mode,
           *overrides]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    good = sorted(train_rows(discover(root))["scan_id"])
    registrations = [line for p in out.glob("registrations-*.txt") for line in p.read_text().split()]
    assert len(registrations) == len(good) == len(set(registrations))  # each scan once, by one process
    assert len(list(out.glob("registrations-*.txt"))) >= 2  # (the work was shared)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world"] == 2 and sorted(r["scan_ids"]) == good and r["on_disk"] == (cache_mode == "disk")
        assert [Path(s).name for s in r["skipped"]] == ["broken.nii.gz"]
    assert ranks[0]["sums"] == ranks[1]["sums"]
    assert len(list((tmp_path / "volumes").glob("*/*.pt"))) == len(good)
