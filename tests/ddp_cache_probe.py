"""Run by tests/test_distributed.py under torchrun (2 gloo processes): build the preprocessed cache
as training does and count the registrations each process ran (``<out>/registrations-<pid>.txt``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import torch


def main(root: str, out: str, cache_mode: str, *overrides: str) -> None:
    import petmonai.training.distributed as dist
    from petmonai.config import load_config
    from petmonai.data import content_order, discover, train_rows
    from petmonai.training import build_cache
    from petmonai.transforms import build_pipelines
    from petmonai.transforms.spatial.registration import RegisterToTemplate

    optimise = RegisterToTemplate._optimise

    def counted(self, volume, affine):  # appends one line per registration run (forked workers too)
        with open(Path(out) / f"registrations-{os.getpid()}.txt", "a") as fh:
            fh.write(self._key(volume, affine) + "\n")
        return optimise(self, volume, affine)

    RegisterToTemplate._optimise = counted

    def build():
        cfg = load_config(None, [*overrides, f"data.cache={cache_mode}"])
        train = train_rows(discover(root))
        broken = Path(out) / "broken.nii.gz"  # fails in preprocessing (discovery would refuse it)
        broken.write_bytes(b"not a NIfTI file")
        train = content_order(pd.concat([train, train.iloc[:1].assign(image=str(broken), scan_id="NC/broken")],
                                        ignore_index=True))
        cache = build_cache(cfg, train, build_pipelines(cfg)[0])
        digest = {sid: float(torch.as_tensor(cache[sid]["image"]).double().sum()) for sid in cache.scan_ids}
        (Path(out) / f"rank{dist.rank()}.json").write_text(json.dumps(
            {"world": dist.world_size(), "scan_ids": cache.scan_ids, "on_disk": cache.on_disk, "sums": digest,
             "skipped": [s["image"] for s in cache.skipped]}))

    dist.run_parallel("cpu", build)


if __name__ == "__main__":
    main(*sys.argv[1:])
