"""Speed and memory measurements, reported as ratios measured in one run (these machines are noisy).

>>> results = benchmark_training(cfg, datalist, device, epochs=3)  # doctest: +SKIP
>>> results["engine_overhead"]    # our Ignite trainer / a bare PyTorch loop, same model and batches  # doctest: +SKIP

``scripts/bench.py`` runs these and writes ``docs/benchmarks.md``.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time

import torch
from ignite.engine import Events

from petmonai.config import default_config
from petmonai.data import train_rows
from petmonai.models import build_model
from petmonai.runs import versions
from petmonai.training import (
    build_cache,
    build_engines,
    build_optimizer,
    configure_backends,
    training_loader,
)
from petmonai.transforms import build_pipelines


def peak_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            mem_gb = int(fh.readline().split()[1]) / 1024**2
    except (OSError, ValueError, IndexError):
        mem_gb = float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": torch.get_num_threads(), "memory_gb": round(mem_gb, 1), "gpu": gpu}


def matmul_flops(device: torch.device, n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a large matmul: the machine's practical ceiling, measured in the same run."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_step_flops(net: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> float:
    """FLOPs of one forward+backward pass, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(shape, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        net(x).sum().backward()
    net.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


class DataWaitTimer:
    """Time the engine spends waiting for its next batch (Ignite GET_BATCH events), per epoch."""

    def __init__(self):
        self.wait, self.epoch_time, self._t0, self._e0 = [], [], 0.0, 0.0
        self._current = 0.0

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._batch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._batch_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_started(self, _):
        self._e0, self._current = time.perf_counter(), 0.0

    def _batch_started(self, _):
        self._t0 = time.perf_counter()

    def _batch_completed(self, _):
        self._current += time.perf_counter() - self._t0

    def _epoch_completed(self, _):
        self.wait.append(self._current)
        self.epoch_time.append(time.perf_counter() - self._e0)


def bare_loop(net, batches, device, lr=3e-4, amp_kwargs: dict | None = None) -> float:
    """A plain PyTorch training loop over pre-made batches; returns seconds. ``amp_kwargs``: run the
    forward pass under ``torch.autocast`` with them (fp16 with a gradient scaler)."""
    train_cfg = {**default_config()["train"], "lr": lr, "weight_decay": 0.01}
    opt = build_optimizer(net, train_cfg, device)  # the trainer's optimiser: the comparison isolates the engine
    loss_fn = torch.nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(device.type, enabled=bool(amp_kwargs) and amp_kwargs.get("dtype") == torch.float16)
    net.train()
    _sync(device)
    t0 = time.perf_counter()
    for batch in batches:
        x, y = batch["image"].to(device), batch["label"].to(device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=bool(amp_kwargs), **(amp_kwargs or {})):
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    _sync(device)
    return time.perf_counter() - t0


def engine_loop(net, batches, device, train_cfg, tmp_dir) -> float:
    """Our MONAI/Ignite trainer (no validation) over the same pre-made batches; returns the seconds
    from the epoch's start to its last iteration (set-up and the final checkpoint write excluded,
    as the bare loop has neither)."""
    cfg = {**train_cfg, "max_epochs": 1, "progress_bar": False}
    trainer, _ = build_engines(net, batches, None, tmp_dir, cfg, device, progress_bar=False)
    marks = {}

    def started(_):
        _sync(device)
        marks["start"] = time.perf_counter()

    def iteration_done(_):
        _sync(device)
        marks["end"] = time.perf_counter()

    trainer.add_event_handler(Events.EPOCH_STARTED, started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, iteration_done)
    trainer.run()
    return marks["end"] - marks["start"]


def _time_cache(cfg: dict, train, preprocess) -> tuple:
    """The cache built cold (a fresh, empty registration cache in a temporary folder; one worker, in
    this process), built again warm (registrations cached) and read back:
    ``(cache, cold s/volume, warm s/volume, cached s/volume, MB/volume)``. ``preprocess``: unused (the
    pipeline is built again around the temporary registration cache)."""
    import copy
    import tempfile

    with tempfile.TemporaryDirectory(prefix="petmonai-bench-registration-") as tmp:
        cold_cfg = copy.deepcopy(cfg)
        cold_cfg["template"]["cache_dir"] = tmp
        cold_cfg["data"].update(cache_workers=1, preprocess_workers=1, cache="memory")
        pipeline = build_pipelines(cold_cfg)[0]
        seconds = []
        for _ in ("cold", "warm"):
            t0 = time.perf_counter()
            cache = build_cache(cold_cfg, train, pipeline)
            seconds.append((time.perf_counter() - t0) / len(cache))
    ids = cache.scan_ids
    t0 = time.perf_counter()
    for sid in ids:
        cache[sid]
    cached = (time.perf_counter() - t0) / len(ids)
    volume_mb = sum(cache[s]["image"].numel() * 4 for s in ids) / len(ids) / 1024**2
    return cache, seconds[0], seconds[1], cached, volume_mb


def _time_epochs(cfg: dict, loader, device, epochs: int, tmp_dir) -> tuple[float, float]:
    """Full epochs through the real loader: ``(volumes/s, data-wait fraction)``, the first epoch left out."""
    tcfg = cfg["train"]
    net = build_model(cfg["model"], cfg).to(device)
    trainer, _ = build_engines(net, loader, None, tmp_dir, {**tcfg, "max_epochs": epochs}, device, progress_bar=False)
    timer = DataWaitTimer()
    timer.attach(trainer)
    trainer.run()
    later = slice(1, None) if epochs > 1 else slice(0, None)
    epoch_time = sum(timer.epoch_time[later])
    wait_fraction = sum(timer.wait[later]) / epoch_time
    return len(loader.dataset) * len(timer.epoch_time[later]) / epoch_time, wait_fraction


def _engine_vs_bare(cfg: dict, batches: list, device, rounds: int, tmp_dir) -> tuple[list, list]:
    """Engine vs bare loop on identical pre-made batches, alternated to share the machine's noise:
    the seconds of each round, ``(engine, bare)``."""
    tcfg = cfg["train"]
    engine_t, bare_t = [], []
    bare_loop(build_model(cfg["model"], cfg).to(device), batches[:2], device)  # warm-up
    for _ in range(rounds):
        engine_t.append(engine_loop(build_model(cfg["model"], cfg).to(device), batches, device, tcfg, tmp_dir))
        bare_t.append(bare_loop(build_model(cfg["model"], cfg).to(device), batches, device, float(tcfg["lr"])))
    return engine_t, bare_t


def _big_input_volumes_per_s(cfg: dict, device, bs: int) -> float:
    """The issue's reference point: volumes/s of a bare step at 96x96x64."""
    big = [{"image": torch.randn(bs, 1, 96, 96, 64), "label": torch.randint(0, 2, (bs,))} for _ in range(3)]
    bare_loop(build_model(cfg["model"], cfg).to(device), big[:1], device)  # warm-up
    return 3 * bs / bare_loop(build_model(cfg["model"], cfg).to(device), big, device)


def benchmark_training(cfg: dict, datalist, device: torch.device, epochs: int = 3, rounds: int = 7,
                       tmp_dir=None) -> dict:
    """Cold vs cached preprocessing, volumes/s, data wait, FLOP/s ratio, engine vs bare loop, memory."""
    import tempfile

    tmp_dir = tmp_dir or tempfile.mkdtemp(prefix="petmonai-bench-")
    configure_backends(device, cfg["train"])  # as training does (the CPU allocator setting)
    preprocess, augment = build_pipelines(cfg)
    cache, cold, warm, cached, volume_mb = _time_cache(cfg, train_rows(datalist), preprocess)
    tcfg = cfg["train"]
    bs = int(tcfg["batch_size"])
    torch.manual_seed(0)
    loader = training_loader(cache, cache.scan_ids, augment, tcfg, device)  # as training
    volumes_per_s, wait_fraction = _time_epochs(cfg, loader, device, epochs, tmp_dir)
    # each timed run long enough (>= 30 batches) that scheduler noise averages out
    batches = [b for b in loader]
    batches = batches * max(1, -(-30 // len(batches)))
    engine_t, bare_t = _engine_vs_bare(cfg, batches, device, rounds, tmp_dir)
    n_volumes = sum(len(b["label"]) for b in batches)
    # achieved FLOP/s relative to a large matmul measured now
    crop = tuple(batches[0]["image"].shape)
    step_flops = training_step_flops(build_model(cfg["model"], cfg).to(device), crop, device)
    bare_step_s = statistics.median(bare_t) / len(batches)
    ceiling = matmul_flops(device)
    big_volumes_per_s = _big_input_volumes_per_s(cfg, device, bs)
    precision = benchmark_precision(cfg, batches, device, tmp_dir) if device.type == "cuda" else None
    return {
        "precision": precision,
        "machine": machine(),
        "versions": versions(),
        "device": str(device),
        "volumes": len(cache.scan_ids),
        "batch_shape": list(crop),
        "cold_preprocess_s_per_volume": cold,
        "warm_preprocess_s_per_volume": warm,
        "cached_fetch_s_per_volume": cached,
        "cached_volume_mb": volume_mb,
        "epochs": epochs,
        "train_volumes_per_s": volumes_per_s,
        "data_wait_fraction": wait_fraction,
        "engine_s": engine_t,
        "bare_s": bare_t,
        # median of per-round ratios: each pair ran back to back, so slow drifts of the machine cancel
        "engine_overhead": statistics.median(e / b for e, b in zip(engine_t, bare_t)) - 1.0,
        "bare_volumes_per_s": n_volumes / statistics.median(bare_t),
        "step_flops": step_flops,
        "achieved_flops_per_s": step_flops / bare_step_s,
        "matmul_flops_per_s": ceiling,
        "fraction_of_matmul": step_flops / bare_step_s / ceiling,
        "bare_volumes_per_s_96x96x64": big_volumes_per_s,
        "peak_rss_gb": peak_rss_gb(),
    }


# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s.
DENSE_BF16_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12,
                   "H100 PCIe": 756e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def dense_bf16_peak(gpu_name: str | None) -> float | None:
    """The data-sheet dense bf16 peak of a GPU named like ``torch.cuda.get_device_name()``."""
    for key, peak in DENSE_BF16_PEAK.items():
        if gpu_name and key.lower() in gpu_name.lower():
            return peak
    return None


def benchmark_precision(cfg: dict, batches: list, device: torch.device, tmp_dir, rounds: int = 5,
                        reference_shape=(96, 96, 64), reference_batches: int = 10) -> dict:
    """Mixed precision vs fp32 through our trainer, same model and batches, alternated: speedup,
    volumes/s, peak GPU memory and the AMP step's FLOP/s against the GPU's dense bf16 peak (and
    against a bf16 matmul measured now). On CPU ``amp`` is ignored, so the speedup is ~1 there:
    the code path runs everywhere, the figure means something on CUDA only."""
    from petmonai.training import amp_settings

    tcfg = cfg["train"]
    n_volumes = sum(len(b["label"]) for b in batches)
    times = {False: [], True: []}
    peak_gpu = {}
    for amp in (False, True):  # warm-up: cuDNN autotuning of each precision's convolutions
        engine_loop(build_model(cfg["model"], cfg).to(device), batches[:2], device, {**tcfg, "amp": amp}, tmp_dir)
    for _ in range(rounds):
        for amp in (False, True):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            net = build_model(cfg["model"], cfg).to(device)
            times[amp].append(engine_loop(net, batches, device, {**tcfg, "amp": amp}, tmp_dir))
            if device.type == "cuda":
                peak_gpu[amp] = torch.cuda.max_memory_allocated(device) / 1024**3
    fp32_s, amp_s = statistics.median(times[False]), statistics.median(times[True])
    enabled, kwargs = amp_settings(device, True)
    step_flops = training_step_flops(build_model(cfg["model"], cfg).to(device), tuple(batches[0]["image"].shape), device)
    amp_flops = step_flops * len(batches) / amp_s
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = dense_bf16_peak(gpu)
    bf16_matmul = matmul_flops(device, n=8192 if device.type == "cuda" else 1024, dtype=torch.bfloat16)
    # where the step is compute-bound: the 96x96x64 reference volume, bare loop, each precision
    bs = int(tcfg["batch_size"])
    big = [{"image": torch.randn(bs, 1, *reference_shape), "label": torch.randint(0, 2, (bs,))}
           for _ in range(reference_batches)]
    big_s = {False: [], True: []}
    for amp in (False, True):
        bare_loop(build_model(cfg["model"], cfg).to(device), big[:2], device, amp_kwargs=kwargs if amp else None)
    for _ in range(rounds):
        for amp in (False, True):
            big_s[amp].append(bare_loop(build_model(cfg["model"], cfg).to(device), big, device,
                                        amp_kwargs=kwargs if amp else None))
    big_fp32, big_amp = statistics.median(big_s[False]), statistics.median(big_s[True])
    return {
        "reference_shape": list(reference_shape),
        "amp_speedup_reference": big_fp32 / big_amp,
        "amp_volumes_per_s_reference": len(big) * bs / big_amp,
        "fp32_volumes_per_s_reference": len(big) * bs / big_fp32,
        "amp_dtype": str(kwargs.get("dtype")) if enabled else "none (fp32: AMP is CUDA only)",
        "fp32_s": times[False],
        "amp_s": times[True],
        "amp_speedup": fp32_s / amp_s,
        "amp_volumes_per_s": n_volumes / amp_s,
        "fp32_volumes_per_s": n_volumes / fp32_s,
        "peak_gpu_memory_gb": peak_gpu,
        "amp_step_flops_per_s": amp_flops,
        "gpu": gpu,
        "dense_bf16_peak_flops_per_s": peak,
        "fraction_of_dense_bf16_peak": amp_flops / peak if peak else None,
        "bf16_matmul_flops_per_s": bf16_matmul,
        "fraction_of_bf16_matmul": amp_flops / bf16_matmul,
    }
