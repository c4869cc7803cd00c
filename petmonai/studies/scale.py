"""``petmonai bench-scale``: how preprocessing, training and prediction scale with the number of scans.

For each cohort size N (synthetic phantoms): the cohort's generation time; preprocessing cold (empty
registration and volume caches in a temporary folder), with the registrations cached, and warm (every
volume in the on-disk cache), with 1 and 2 worker processes; the on-disk cache's bytes per scan; and in a
training process of its own (:mod:`petmonai.studies.scale_probe`) reading the on-disk cache: seconds
per epoch, held-out volumes predicted per second and peak resident memory. Optionally two gloo
processes under torchrun preprocess a cohort for the first time, split (issue 25) and each doing
everything (before). The issue's targets are checked from these figures (:data:`TARGETS`).

>>> results = bench_scale("runs/scale", sizes=(100, 400, 1600))  # doctest: +SKIP
>>> results["targets"]["preprocess_per_scan_constant"]["ok"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from petmonai.runs import (
    atomic_write_json,
    atomic_write_text,
    forget_file_hashes,
    get_logger,
)
from petmonai.studies.scale_report import (
    DEFAULT_SIZES,
    plot_scale,
    render_docs,
    render_table,
)

log = get_logger("scale")

#: the issue's targets: per-scan costs within 20% from the smallest to the largest N, 1 -> 2 workers at
#: least 80% efficient, peak training memory (disk cache) within 20%; under 2-process torchrun the first
#: preprocessing in at most 60% of the wall time it took when every rank preprocessed every scan
TARGETS = {"constant_within": 0.20, "worker_efficiency": 0.80, "torchrun_time_share": 0.60}
#: every measurement's settings; the registration check's threshold is off: it was set on real scans (docs/
#: experiments.md) and rejects 1 of the first 100 phantoms (seed 0), which the benchmark would otherwise
#: have to leave out (the scan is registered, and costs, all the same)
FIXED = ["train.progress_bar=false", "report.write=false", "report.reference_model=false",
         "template.min_correlation=0"]


def _env(cache: Path) -> dict:
    import petmonai

    repo = str(Path(petmonai.__file__).resolve().parents[1])
    return {**os.environ, "PETMONAI_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([repo, os.environ.get(
        "PYTHONPATH", "")]), "WORLD_SIZE": "1"}


def _overrides(base: list[str], cache: Path, *more: str) -> list[str]:
    return [*base, *FIXED, f"template.cache_dir={cache / 'registration'}", f"data.cache_dir={cache / 'volumes'}",
            *more]


def time_preprocessing(root: Path, overrides: list[str], workers: int) -> tuple[float, int]:
    """Seconds to bring every scan of ``root`` into the on-disk cache with ``workers`` single-threaded
    worker processes (one too: a like-for-like 1 -> 2 comparison), the input files hashed anew; and
    the scans preprocessed now."""
    from petmonai.config import load_config
    from petmonai.data import discover, to_items, train_rows
    from petmonai.data.volume_store import preprocess_scans
    from petmonai.training import volume_store
    from petmonai.transforms import build_pipelines

    cfg = load_config(None, [*overrides, "data.cache=disk"])
    items = to_items(train_rows(discover(root)))
    preprocess, store = build_pipelines(cfg)[0], volume_store(cfg)
    forget_file_hashes()
    t0 = time.perf_counter()
    fill = preprocess_scans(items, preprocess, workers, store, in_process=False)
    if fill.failures:
        from petmonai.errors import PetmonaiError

        raise PetmonaiError(f"bench-scale: {len(fill.failures)} synthetic scans failed: {fill.failures}")
    return time.perf_counter() - t0, fill.computed


def measure_preprocessing(root: Path, n: int, base: list[str], work: Path, workers=(1, 2)) -> dict:
    """Cold, registrations cached, and warm, per worker count: seconds per scan; cache bytes per scan."""
    out: dict = {}
    for w in workers:
        cache = work / f"cache-w{w}"
        cold, computed = time_preprocessing(root, _overrides(base, cache), w)
        registered, _ = time_preprocessing(root, _overrides(base, cache, f"data.cache_dir={cache / 'volumes2'}"), w)
        warm, again = time_preprocessing(root, _overrides(base, cache), w)
        if computed != n or again:
            from petmonai.errors import PetmonaiError

            raise PetmonaiError(f"bench-scale: {computed} of {n} scans preprocessed cold, {again} again when warm")
        out[f"cold_s_per_scan_w{w}"] = cold / n
        out[f"registered_s_per_scan_w{w}"] = registered / n
        out[f"warm_s_per_scan_w{w}"] = warm / n
        entries = list((cache / "volumes").glob("*/*.pt"))
        out["cache_bytes_per_scan"] = sum(p.stat().st_size for p in entries) / max(1, len(entries))
    if len(workers) > 1:
        lo, hi = min(workers), max(workers)
        out["worker_efficiency"] = out[f"cold_s_per_scan_w{lo}"] * lo / (out[f"cold_s_per_scan_w{hi}"] * hi)
    return out


def _probe(kind: str, args: dict, cache: Path, torchrun: int = 0, timeout: float | None = None) -> dict:
    """Run :mod:`petmonai.studies.scale_probe` in a process of its own (under torchrun with ``torchrun``
    processes); its result."""
    with tempfile.TemporaryDirectory(prefix="petmonai-scale-") as tmp:
        args_path, result_path = Path(tmp) / "args.json", Path(tmp) / "result.json"
        args_path.write_text(json.dumps(args))
        launcher = [sys.executable]
        env = _env(cache)
        if torchrun:
            env.pop("WORLD_SIZE")
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={torchrun}",
                         "--max_restarts=0", "-m"]
        else:
            launcher += ["-m"]
        cmd = [*launcher, "petmonai.studies.scale_probe", kind, str(args_path), str(result_path)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0 or not result_path.is_file():
            from petmonai.errors import PetmonaiError

            raise PetmonaiError(f"bench-scale: the {kind} probe failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(result_path.read_text())


def measure_size(n: int, base: list[str], work: Path, options: dict) -> dict:
    """Every figure of one cohort size ``n``."""
    from petmonai.data import generate_cohort

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    root = generate_cohort(work / "pet", n_nc=n // 2, n_mci=n - n // 2, n_test=0, seed=int(options["seed"]))
    row = {"n": n, "generate_s_per_scan": (time.perf_counter() - t0) / n}
    log.info("N=%d: cohort generated (%.2f s/scan); preprocessing cold and warm", n, row["generate_s_per_scan"])
    row.update(measure_preprocessing(root, n, base, work, options["workers"]))
    cache = work / f"cache-w{min(options['workers'])}"  # warm: training reads the on-disk cache
    args = {"root": str(root), "device": options["device"], "run_dir": str(work / "run"),
            "overrides": _overrides(base, cache, "data.cache=disk", f"train.max_epochs={options['epochs']}")}
    row.update(_probe("train", args, cache))
    log.info("N=%d: %s", n, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    return row


def measure_torchrun(n: int, base: list[str], work: Path, seed: int, processes: int = 2) -> dict:
    """First use of an ``n``-scan cohort by ``processes`` gloo processes: split vs every rank everything."""
    from petmonai.data import generate_cohort

    root = generate_cohort(work / "pet", n_nc=n // 2, n_mci=n - n // 2, n_test=0, seed=seed)
    out = {"n": n, "processes": processes}
    for mode in ("split", "all"):
        cache = work / f"cache-{mode}"  # empty: the first use
        args = {"root": str(root), "mode": mode, "overrides": _overrides(base, cache)}
        out[f"{mode}_s"] = _probe("ddp", args, cache, torchrun=processes)["seconds"]
    out["speedup"] = out["all_s"] / out["split_s"]
    return out


def check_targets(rows: list[dict], ddp: dict | None) -> dict:
    """The issue's targets from the smallest and the largest N."""
    small, large = rows[0], rows[-1]
    tol = TARGETS["constant_within"]

    def ratio(key):
        return large[key] / small[key] if small.get(key) else float("nan")

    w = "cold_s_per_scan_w1"
    checks = {
        "preprocess_per_scan_constant": {"value": ratio(w), "target": f"<= {1 + tol:.2f}", "ok": ratio(w) <= 1 + tol},
        "epoch_per_scan_constant": {"value": ratio("epoch_s_per_scan"), "target": f"<= {1 + tol:.2f}",
                                    "ok": ratio("epoch_s_per_scan") <= 1 + tol},
        "disk_cache_peak_rss_flat": {"value": ratio("peak_rss_mb"), "target": f"<= {1 + tol:.2f}",
                                     "ok": ratio("peak_rss_mb") <= 1 + tol},
    }
    if "worker_efficiency" in large:
        eff = large["worker_efficiency"]
        checks["worker_efficiency"] = {"value": eff, "target": f">= {TARGETS['worker_efficiency']:.2f}",
                                       "ok": eff >= TARGETS["worker_efficiency"]}
    if ddp:
        share = ddp["split_s"] / ddp["all_s"]
        checks["torchrun_first_use_time_share"] = {"value": share, "target": f"<= {TARGETS['torchrun_time_share']:.2f}",
                                                   "ok": share <= TARGETS["torchrun_time_share"]}
    return checks


def bench_scale(output: str | Path, sizes=DEFAULT_SIZES, workers=(1, 2), epochs: int = 2, device: str = "cpu",
                overrides=(), seed: int = 0, torchrun_size: int | None = None, command: str = "petmonai bench-scale",
                docs: str | Path | None = None, keep: bool = False) -> dict:
    """Measure every size, write ``scale.json``, ``scale.md`` and ``scale.png`` into ``output`` (and with
    ``docs``, that Markdown page too); ``torchrun_size``: the cohort size of the torchrun comparison
    (0: none; None: the smallest size). Returns the results."""
    from petmonai.studies.bench import machine

    output, sizes = Path(output), sorted(int(n) for n in sizes)
    output.mkdir(parents=True, exist_ok=True)
    options = {"seed": seed, "workers": sorted(int(w) for w in workers), "device": device, "epochs": int(epochs)}
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=output))
    rows = [measure_size(n, list(overrides), work / f"n{n}", options) for n in sizes]
    size = sizes[0] if torchrun_size is None else int(torchrun_size)
    ddp = measure_torchrun(size, list(overrides), work / "torchrun", seed) if size else None
    results = {"command": command, "machine": machine(), "cores": len(os.sched_getaffinity(0)), "options": options,
               "overrides": list(overrides), "rows": rows, "torchrun": ddp, "targets": check_targets(rows, ddp)}
    atomic_write_json(output / "scale.json", results)
    atomic_write_text(output / "scale.md", render_table(results))
    plot_scale(results, output / "scale.png")
    if docs:  # the page, and its figure beside it
        atomic_write_text(docs, render_docs(results))
        plot_scale(results, Path(docs).parent / "scale.png")
    if not keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return results
