"""The measurements of ``petmonai bench-scale`` that need a process of their own (run by
:mod:`petmonai.studies.scale`, never by hand):

- ``train``: one fold trained from the on-disk volume cache as training does (``data.cache: disk``), then
  its held-out scans predicted with the prediction views; writes the epoch time, the prediction rate
  and this process's peak resident memory (``ru_maxrss``), so the memory is the training process's alone.
- ``ddp``: under torchrun, the first use of a cohort (empty caches): ``split`` (each rank preprocesses
  its share into the shared cache, :func:`petmonai.training.build_cache`) or ``all`` (the behaviour
  before issue 25: every rank preprocesses every scan itself); rank 0 writes the wall time.

    python -m petmonai.studies.scale_probe train ARGS.json RESULT.json
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def _setup(args: dict):
    from petmonai.config import load_config
    from petmonai.data import content_order, discover, train_rows
    from petmonai.runs import setup_logging
    from petmonai.transforms import build_pipelines

    setup_logging(None)
    cfg = load_config(None, args["overrides"])
    train = content_order(train_rows(discover(args["root"])))
    return cfg, train, build_pipelines(cfg)


def train_probe(args: dict) -> dict:
    """Fold 0 of ``cv.folds``: seconds per epoch and per training scan, held-out volumes/s, peak RSS."""
    import torch

    from petmonai.data import fold_members, make_folds
    from petmonai.models import build_model, load_weights
    from petmonai.runs import BEST_CHECKPOINT, fold_dir_name
    from petmonai.training import build_cache, test_view_scorer, train_fold

    cfg, train, (preprocess, augment) = _setup(args)
    device = torch.device(args["device"])
    cache = build_cache(cfg, train, preprocess)
    cv = cfg["cv"]
    folds = make_folds(train, cv["protocol"], int(cv["folds"]), 1, int(cfg["seed"]), float(cfg["train"]["val_fraction"]))
    run_dir = Path(args["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    info = train_fold(cfg, cache, augment, folds, 0, 0, run_dir, device)
    timing = json.loads((run_dir / fold_dir_name(0, 0) / "timing.json").read_text())
    n_train = timing["train_volumes"] / max(1, info["epochs_run"])
    test = fold_members(folds, 0, 0, "test")
    net = build_model(cfg["model"], cfg)
    load_weights(net, run_dir / fold_dir_name(0, 0) / BEST_CHECKPOINT, device)
    scorer = test_view_scorer(cfg, device)
    if scorer is not None:  # warm-up: the first forward pass allocates
        scorer(net.to(device), cache.volumes(test[:1]))
    t0 = time.perf_counter()
    if scorer is not None:
        scorer(net.to(device), cache.volumes(test))
    predict_s = time.perf_counter() - t0
    epoch_s = timing["train_seconds"] / max(1, info["epochs_run"])
    return {"scans": len(cache), "train_scans": int(n_train), "epochs": int(info["epochs_run"]),
            "epoch_s": epoch_s, "epoch_s_per_scan": epoch_s / max(1, n_train), "predicted": len(test),
            "predict_volumes_per_s": len(test) / predict_s if predict_s > 0 else float("nan"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "on_disk": cache.on_disk}


def ddp_probe(args: dict) -> dict | None:
    """Under torchrun: the wall time of the first preprocessing, ``args["mode"]`` ``split`` or ``all``."""
    import petmonai.training.distributed as dist
    from petmonai.data import VolumeCache, to_items
    from petmonai.data.volume_store import resolve_workers
    from petmonai.training import build_cache

    def run():
        cfg, train, (preprocess, _) = _setup(args)
        dist.barrier()
        t0 = time.perf_counter()
        if args["mode"] == "split":
            cache = build_cache(cfg, train, preprocess)
        else:  # before issue 25: every rank the whole cohort, in its own process (threads)
            cache = VolumeCache(to_items(train), preprocess, num_workers=cfg["data"]["cache_workers"],
                                workers=1, skip_bad=cfg["data"]["skip_bad"])
        dist.barrier()
        seconds = time.perf_counter() - t0
        return {"mode": args["mode"], "world": dist.world_size(), "scans": len(cache), "seconds": seconds,
                "workers_per_rank": resolve_workers(cfg["data"]["preprocess_workers"]) if args["mode"] == "split"
                else 1} if dist.is_main() else None

    return dist.run_parallel("cpu", run)


def main(argv: list[str]) -> None:
    from petmonai.runs import atomic_write_json

    kind, args_path, result_path = argv
    args = json.loads(Path(args_path).read_text())
    result = train_probe(args) if kind == "train" else ddp_probe(args)
    if result is not None:
        atomic_write_json(result_path, result)


if __name__ == "__main__":
    main(sys.argv[1:])
