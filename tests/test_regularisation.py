"""Training-time regularisers of ``train:``: mixup of batches and label smoothing."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader

from petmonai.config import default_config
from petmonai.training import MixUpBatch, build_engines, training_loss
from petmonai.errors import ConfigError

TRAIN = default_config()["train"]


def test_mixup_blends_each_scan_with_a_partner():
    image = torch.randn(4, 1, 3, 4, 3, generator=torch.Generator().manual_seed(1))
    label = torch.tensor([0, 1, 1, 0])
    torch.manual_seed(0)
    mixed, target = MixUpBatch(alpha=0.4)(image, label)
    torch.manual_seed(0)  # the same draws, in the same order: a weight per scan, then the partners
    w, partner = torch.distributions.Beta(0.4, 0.4).sample((4,)), torch.randperm(4)
    onehot = torch.nn.functional.one_hot(label, 2).float()
    assert torch.allclose(mixed, w.view(4, 1, 1, 1, 1) * image + (1 - w.view(4, 1, 1, 1, 1)) * image[partner])
    assert torch.allclose(target, w[:, None] * onehot + (1 - w[:, None]) * onehot[partner])
    assert torch.allclose(target.sum(1), torch.ones(4)) and ((0 <= w) & (w <= 1)).all()
    assert not torch.equal(mixed, image)
    with pytest.raises(ConfigError, match="mixup_alpha"):
        MixUpBatch(alpha=0.0)


def test_label_smoothing_option():
    assert training_loss(TRAIN).label_smoothing == 0.0
    assert training_loss({**TRAIN, "label_smoothing": 0.1}).label_smoothing == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="label_smoothing"):
        training_loss({**TRAIN, "label_smoothing": 1.5})


def _train(tmp_path, **switches):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool3d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2))
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.randn(1, 8, 8, 8, generator=g) + (i % 2), "label": i % 2} for i in range(8)]
    cfg = {**TRAIN, "max_epochs": 2, "lr": 1e-2, "weight_decay": 0.0, "keep": "last", "progress_bar": False, **switches}
    trainer, _ = build_engines(net, DataLoader(data, batch_size=4), None, tmp_path, cfg, torch.device("cpu"),
                               progress_bar=False)
    trainer.run()
    return [p.detach().clone() for p in net.parameters()], trainer.state.metrics["train_loss"]


def test_training_with_mixup_and_smoothing_runs_and_differs(tmp_path):
    plain, loss_plain = _train(tmp_path / "a")
    again, _ = _train(tmp_path / "b")
    mixed, loss_mixed = _train(tmp_path / "c", mixup_alpha=0.4, label_smoothing=0.1)
    assert all(torch.equal(a, b) for a, b in zip(plain, again))
    assert not all(torch.equal(a, b) for a, b in zip(plain, mixed))
    assert torch.isfinite(torch.tensor([loss_plain, loss_mixed])).all()
