"""``petmonai bench``: training speed and memory measured on this machine, written as Markdown
(docs/benchmarks.md) with a JSON of the raw figures beside it.

    petmonai bench --data-root ../shared/data/pet2023
"""

from __future__ import annotations

import os
from pathlib import Path


def render(r: dict, command: str) -> str:
    m, v = r["machine"], r["versions"]
    return f"""# Benchmarks

Command: `{command}`

Machine: {m['cpu']}, {m['cores']} torch threads, {m['memory_gb']} GB RAM, GPU: {m['gpu'] or 'none'};
torch {v['torch']}, MONAI {v['monai']}, Ignite {v['pytorch-ignite']}, Python {v['python']}.
Device: {r['device']}. Data: {r['volumes']} training volumes, batch shape {r['batch_shape']}.

Load average (1, 5, 15 min) at the start: {r.get('load_before', 'n/a')}, at the end: {r.get('load_after', 'n/a')}.
Every ratio below is measured within one run, so the machine's noise largely cancels; absolute
rates (volumes/s) are only comparable between runs on an equally loaded machine.

## Training ({r.get('model', 'model')}, `{r.get('config', 'the default config')}`)

| figure | value | target |
|---|---|---|
| training volumes/s through the engine and loader (epochs 2-{r['epochs']}) | {r['train_volumes_per_s']:.2f} | |
| data wait fraction of step time after the first epoch | {r['data_wait_fraction']:.1%} | <= 5% |
| engine overhead: MONAI/Ignite trainer vs bare PyTorch loop, same model and batches | {r['engine_overhead']:+.1%} | <= 10% (issue 2), <= 5% (issue 6) |
| bare loop volumes/s at the training crop | {r['bare_volumes_per_s']:.2f} | |
| bare loop volumes/s at 96x96x64 (reference: ~0.8 on this CPU) | {r['bare_volumes_per_s_96x96x64']:.2f} | |
| training-step FLOPs per batch (forward + backward) | {r['step_flops']/1e9:.1f} GFLOP | |
| achieved FLOP/s of the training step | {r['achieved_flops_per_s']/1e9:.1f} GFLOP/s | |
| large fp32 matmul FLOP/s on the same machine, same run | {r['matmul_flops_per_s']/1e9:.1f} GFLOP/s | |
| training step as a fraction of the matmul ceiling | {r['fraction_of_matmul']:.1%} | |
| peak resident memory | {r['peak_rss_gb']:.2f} GB | <= 6 GB |

Engine runs (s): {", ".join(f"{t:.2f}" for t in r["engine_s"])}; bare runs (s): {", ".join(f"{t:.2f}" for t in r["bare_s"])} (alternated; overhead = median of the per-round ratios).

## Data

| figure | value |
|---|---|
| cold preprocessing per volume: NIfTI decode and the config's preprocessing, registrations computed (a fresh, empty registration cache) | {r['cold_preprocess_s_per_volume']*1000:.0f} ms |
| warm preprocessing per volume: the same with every registration read from its cache | {_ms(r.get('warm_preprocess_s_per_volume'))} |
| cached fetch per volume (no decode) | {r['cached_fetch_s_per_volume']*1000:.2f} ms |
| cached volume size in memory | {r['cached_volume_mb']:.2f} MB |

Both preprocessing figures in this process, one worker, in-memory cache (the default `data.cache: memory`).
Preprocessing in worker processes, the on-disk cache (`data.cache: disk`) and how they scale with the
number of scans: [scale.md](scale.md).

Earlier figures: [benchmarks_resnet18.md](benchmarks_resnet18.md) (the 3D ResNet-18 recipe, the loader
variants and the native-grid preprocessing, measured before issue 8 changed the default).

## Inference

The TTA fold ensemble (volumes/s per configuration, the cost of windows, flips and folds) is
measured by `scripts/bench_predict.py`: see [benchmarks_inference.md](benchmarks_inference.md) (the default model)
and [benchmarks_inference_resnet18.md](benchmarks_inference_resnet18.md) (the earlier 3D ResNet-18).

## GPU

{render_gpu(r)}
"""


def _ms(seconds) -> str:
    """A per-volume time in ms; 'n/a' in a JSON written before it was measured."""
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


def render_gpu(r: dict) -> str:
    p = r.get("precision")
    if not p:
        return ("No GPU in this run. The CUDA paths (AMP, channels_last_3d, cuDNN benchmark, pinned memory,\n"
                "torch.compile, augmentation on the device) run on CPU in tests/test_gpu_paths.py; on a GPU,\n"
                "tests/test_cuda.py. Figures measured on an H100: gpu.md.")
    frac = f"{p['fraction_of_dense_bf16_peak']:.1%}" if p["fraction_of_dense_bf16_peak"] else "n/a (GPU not in the table)"
    peak_mem = ", ".join(f"{'AMP' if k else 'fp32'} {v:.2f} GB" for k, v in p["peak_gpu_memory_gb"].items())
    return f"""GPU: {p['gpu']}; AMP dtype {p['amp_dtype']}.

| figure | value | target |
|---|---|---|
| AMP vs fp32 speedup, our trainer, same model and batches | {p['amp_speedup']:.2f}x | >= 2x |
| volumes/s with AMP / fp32 | {p['amp_volumes_per_s']:.1f} / {p['fp32_volumes_per_s']:.1f} | |
| AMP vs fp32 speedup at {'x'.join(map(str, p['reference_shape']))} (bare loop, compute-bound) | {p['amp_speedup_reference']:.2f}x | |
| volumes/s at {'x'.join(map(str, p['reference_shape']))} with AMP / fp32 | {p['amp_volumes_per_s_reference']:.1f} / {p['fp32_volumes_per_s_reference']:.1f} | |
| AMP step FLOP/s | {p['amp_step_flops_per_s']/1e12:.1f} TFLOP/s | |
| fraction of the GPU's dense bf16 peak (data sheet) | {frac} | |
| fraction of a large bf16 matmul measured in this run | {p['fraction_of_bf16_matmul']:.1%} | |
| peak GPU memory | {peak_mem} | |

fp32 runs (s): {", ".join(f"{t:.2f}" for t in p["fp32_s"])}; AMP runs (s): {", ".join(f"{t:.2f}" for t in p["amp_s"])}."""


def bench(config=None, data_root=None, device: str = "auto", epochs: int = 3, output: str | Path = "docs/benchmarks.md",
          overrides=(), command: str = "petmonai bench") -> str:
    """Measure training (:func:`petmonai.studies.benchmark_training`) with ``config`` on ``data_root``
    (None: the synthetic cohort); write ``output`` and its JSON atomically; return the Markdown."""
    from petmonai.commands.workflows import resolve_data_root
    from petmonai.config import default_config_path, load_config
    from petmonai.data import discover
    from petmonai.device import resolve_device
    from petmonai.runs import atomic_write_json, atomic_write_text, setup_logging
    from petmonai.studies import benchmark_training

    setup_logging(None)
    config = config or default_config_path()
    named = [f"data.root={data_root}"] if data_root else []
    cfg = load_config(config, [*overrides, "train.progress_bar=false", *named])
    root, _ = resolve_data_root(cfg)
    load_before = tuple(round(x, 2) for x in os.getloadavg())
    results = benchmark_training(cfg, discover(root), resolve_device(device), epochs=epochs)
    results["load_before"], results["load_after"] = load_before, tuple(round(x, 2) for x in os.getloadavg())
    model = cfg["model"]
    results["model"] = str(model.get("name") or model.get("_target_"))
    results["config"] = os.path.relpath(config) if Path(config).is_absolute() else str(config)
    output = Path(output)
    text = render(results, command)
    atomic_write_text(output, text)
    atomic_write_json(output.with_suffix(".json"), results)
    return text
