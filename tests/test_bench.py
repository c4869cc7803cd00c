"""The benchmark code paths (petmonai bench) run on CPU; the GPU section renders from its figures."""

import math

import torch

from petmonai.studies import benchmark_precision, benchmark_training, dense_bf16_peak
from petmonai.config import load_config
from petmonai.data import discover

from petmonai.commands.bench import render, render_gpu

CPU = torch.device("cpu")


def test_dense_bf16_peak_table():
    assert dense_bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert dense_bf16_peak("NVIDIA H200") == 989e12
    assert dense_bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert dense_bf16_peak("Some Future GPU") is None and dense_bf16_peak(None) is None


def test_precision_benchmark_runs_on_cpu(fast_config, tmp_path):
    cfg = load_config(overrides=fast_config)
    batches = [{"image": torch.randn(2, 1, 20, 24, 20), "label": torch.tensor([0, 1])} for _ in range(2)]
    p = benchmark_precision(cfg, batches, CPU, tmp_path, rounds=1, reference_shape=(20, 24, 20), reference_batches=1)
    assert p["amp_dtype"].startswith("none") and p["gpu"] is None
    assert p["amp_speedup"] > 0 and p["fraction_of_bf16_matmul"] > 0
    assert p["amp_speedup_reference"] > 0 and p["amp_volumes_per_s_reference"] > 0
    assert p["fraction_of_dense_bf16_peak"] is None
    text = render_gpu({"precision": {**p, "gpu": "NVIDIA H100 80GB HBM3",
                                                         "fraction_of_dense_bf16_peak": 0.123,
                                                         "peak_gpu_memory_gb": {False: 3.0, True: 1.5}}})
    assert "12.3%" in text and "AMP 1.50 GB" in text and ">= 2x" in text and "at 20x24x20" in text
    assert "No GPU" in render_gpu({"precision": None})


def test_training_benchmark_on_the_synthetic_cohort(tiny_cohort, fast_config, tmp_path):
    cfg = load_config(overrides=fast_config)
    r = benchmark_training(cfg, discover(tiny_cohort), CPU, epochs=2, rounds=1, tmp_dir=tmp_path)
    assert 0 <= r["data_wait_fraction"] < 1
    assert math.isfinite(r["engine_overhead"]) and r["train_volumes_per_s"] > 0
    assert 0 < r["fraction_of_matmul"] and r["peak_rss_gb"] > 0 and r["precision"] is None
    # cold: registrations computed into a fresh cache; warm: read from it (faster)
    assert r["cold_preprocess_s_per_volume"] > r["warm_preprocess_s_per_volume"] > 0
    text = render(r, "petmonai bench")
    assert "data wait fraction" in text and "No GPU in this run" in text
    assert "fresh, empty registration cache" in text and "read from its cache" in text
