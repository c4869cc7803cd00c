"""The GPU speed switches of ``train:`` run on CPU too: mixed precision (off on CPU, so identical
to ``amp: false``), ``channels_last``, ``torch.compile``, cuDNN autotuning, and the random
augmentation on the training device (``augment_on_device``)."""

from __future__ import annotations

import json

import pytest
import torch
from monai.data import DataLoader

from petmonai.config import default_config, load_config
from petmonai.data import VolumeCache
from petmonai.training import amp_settings, build_engines, channels_last, configure_backends, memory_format, prepare_batch
from petmonai.errors import PetmonaiError
from petmonai.transforms import build_pipelines

CPU = torch.device("cpu")
TRAIN = default_config()["train"]  # the resolved train section: the code has no defaults of its own


def tiny_net() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, stride=2, bias=False), torch.nn.BatchNorm3d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))


def tiny_data(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(1, 12, 14, 12, generator=g) + (i % 2), "label": i % 2, "scan_id": f"s{i}"}
            for i in range(n)]


def train_tiny(tmp_path, epochs: int = 2, **switches):
    """Train the tiny network through the package's engines; its final weights and validation AUCs."""
    torch.manual_seed(0)
    net = tiny_net()
    data = tiny_data()
    cfg = {**TRAIN, "max_epochs": epochs, "lr": 1e-2, "weight_decay": 0.0, "early_stop_patience": 10,
           "progress_bar": False, **switches}
    trainer, evaluator = build_engines(net, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4),
                                       tmp_path, cfg, CPU, progress_bar=False)
    trainer.run()
    weights = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    return net, weights, [row["val_auc"] for row in trainer.history.rows]


def test_amp_on_cpu_is_identical_to_amp_off(tmp_path):
    assert amp_settings(CPU, True) == (False, {})
    _, with_amp, auc_amp = train_tiny(tmp_path / "amp", amp=True)
    _, without, auc_off = train_tiny(tmp_path / "fp32", amp=False)
    assert with_amp.keys() == without.keys()
    assert all(torch.equal(with_amp[k], without[k]) for k in with_amp)
    assert auc_amp == auc_off


def test_amp_settings_on_cuda_pick_bf16_else_fp16(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_settings(cuda, True) == (True, {"dtype": torch.bfloat16})
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert amp_settings(cuda, True) == (True, {"dtype": torch.float16})
    assert amp_settings(cuda, False) == (False, {})


def test_channels_last_switch_runs_on_cpu(tmp_path):
    assert channels_last(CPU, TRAIN) is False and channels_last(torch.device("cuda"), TRAIN) is True  # auto
    assert channels_last(CPU, {"channels_last": True}) is True
    with pytest.raises(PetmonaiError, match="channels_last"):
        channels_last(CPU, {"channels_last": "sometimes"})
    net, weights, aucs = train_tiny(tmp_path / "cl", channels_last=True)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    _, reference, ref_aucs = train_tiny(tmp_path / "plain", channels_last=False)
    for k in weights:  # the same computation in another memory layout: equal up to rounding
        assert torch.allclose(weights[k].float(), reference[k].float(), atol=1e-4), k
    assert aucs == pytest.approx(ref_aucs, abs=1e-6)


def test_prepare_batch_lays_out_images_channels_last():
    batch = {"image": torch.randn(2, 1, 6, 7, 6), "label": torch.tensor([0, 1])}
    image, label = prepare_batch(batch, CPU, False, memory_format=torch.channels_last_3d)
    assert image.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(image, batch["image"])
    assert torch.equal(label, batch["label"])
    image, _ = prepare_batch(batch, CPU, False)
    assert image.is_contiguous()
    assert memory_format(CPU, {"channels_last": "auto"}) == torch.contiguous_format


def test_cudnn_benchmark_only_on_cuda():
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        configure_backends(CPU, {**TRAIN, "cudnn_benchmark": True})
        assert torch.backends.cudnn.benchmark is False
        configure_backends(torch.device("cuda"), {**TRAIN, "cudnn_benchmark": False})
        assert torch.backends.cudnn.benchmark is False
        configure_backends(torch.device("cuda"), {**TRAIN, "cudnn_benchmark": True})
        assert torch.backends.cudnn.benchmark is True and torch.backends.cudnn.deterministic is False
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before


@pytest.mark.slow
def test_compile_switch_runs_on_cpu(tmp_path):
    """torch.compile (inductor) of a tiny network: compiling takes ~20 s on a small CPU."""
    net, weights, aucs = train_tiny(tmp_path / "compiled", compile=True)
    _, reference, ref_aucs = train_tiny(tmp_path / "eager", compile=False)
    for k in weights:
        assert torch.allclose(weights[k].float(), reference[k].float(), atol=1e-4), k
    assert aucs == pytest.approx(ref_aucs, abs=1e-6)
    saved = torch.load(tmp_path / "compiled" / "best_model.pt", map_location="cpu", weights_only=True)
    assert set(saved) == set(net.state_dict())  # the plain module's keys, not `_orig_mod.`


def test_augment_on_device_draws_the_same_augmentation(tiny_cohort, fast_config):
    """With the cache moved to the (here: CPU) device first, the random transforms see the same
    volumes and draw the same numbers as in the loader."""
    from petmonai.training import make_loader, training_dataset

    cfg = load_config(overrides=fast_config)
    preprocess, augment = build_pipelines(cfg)
    files = sorted((tiny_cohort / "Train" / "MCI").iterdir())[:3]
    cache = VolumeCache([{"image": str(p), "label": 1, "scan_id": p.name} for p in files], preprocess)
    ids = cache.scan_ids
    before = cache[ids[0]]["image"].clone()
    outputs = []
    for on_device in (False, True):
        augment.set_random_state(seed=11)
        ds = training_dataset(cache, ids, augment, CPU, on_device)
        outputs.append([ds[i]["image"] for i in range(len(ds))])
        loader = make_loader(ds, 2, True, 0, CPU, seed=1, pin_memory=False)
        assert tuple(next(iter(loader))["image"].shape[2:]) == tuple(cfg["crop_size"])
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    assert torch.equal(cache[ids[0]]["image"], before)  # the cache is never altered
    with pytest.raises(PetmonaiError, match="not in the preprocessed cache"):
        training_dataset(cache, ["nope"], augment, CPU, True)


@pytest.mark.slow
def test_gpu_switches_train_end_to_end_on_cpu(tiny_cohort, fast_config, tmp_path):
    """channels_last, augment_on_device, amp and cudnn_benchmark all on, through the command line."""
    from petmonai.commands import train3d_main

    out = tmp_path / "run"
    args = ["--data-root", str(tiny_cohort), "--output-dir", str(out), "--device", "cpu", "--seed", "2"]
    for o in [*fast_config, "train.channels_last=true", "train.augment_on_device=true", "train.amp=true",
              "train.cudnn_benchmark=true", "train.num_workers=1", "report.write=false",
              "report.reference_model=false"]:
        args += ["--set", o]
    assert train3d_main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_fold"]) == 2
    from petmonai.models import load_weights
    from petmonai.models import build_model

    run_model = load_config(out / "config.yaml")["model"]  # the run's own network (the default's)
    load_weights(build_model(run_model), out / "fold_0" / "best_model.pt", CPU)  # plain keys


def test_cpu_allocator_option():
    from petmonai.training import tune_cpu_allocator
    from petmonai.errors import ConfigError

    assert tune_cpu_allocator() is True  # glibc (CI and this machine): both thresholds accepted
    configure_backends(CPU, {**TRAIN, "cpu_allocator": "default"})
    with pytest.raises(ConfigError, match="cpu_allocator"):
        configure_backends(CPU, {**TRAIN, "cpu_allocator": "fast"})


def test_prefetch_thread_switch():
    from petmonai.training import prefetch_thread
    from petmonai.errors import PetmonaiError

    assert prefetch_thread(TRAIN, CPU) is False and prefetch_thread(TRAIN, torch.device("cuda")) is True  # auto
    assert prefetch_thread({"prefetch_thread": True}, CPU) is True
    with pytest.raises(PetmonaiError, match="prefetch_thread"):
        prefetch_thread({"prefetch_thread": "sometimes"}, CPU)


def test_validation_labels_follow_the_predictions_device():
    """ROCAUC indexes the labels with the predictions' order: on a GPU both must live there (a CPU
    label tensor crashed keep=best validation on CUDA). The meta device stands in for CUDA here."""
    from petmonai.training import mci_probability

    output = [{"pred": torch.zeros(2, device="meta"), "label": torch.tensor(i % 2)} for i in range(3)]
    probs, labels = mci_probability(output)
    assert probs.device.type == "meta" and labels.device == probs.device
    probs, labels = mci_probability([{"pred": torch.tensor([0.0, 1.0]), "label": 1}])
    assert labels.tolist() == [1] and probs.item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())
