"""The GPU paths on a GPU: mixed precision, channels_last_3d, pinned memory, augmentation on the
device, and the TTA ensemble, against the same computation on CPU.

These need CUDA and skip without it (CI has no GPU; tests/test_gpu_paths.py runs the same switches on
CPU there). They use the native-grid preprocessing (no SimpleITK registration), so a GPU machine
needs only torch, MONAI, Ignite and nibabel.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from petmonai.training import amp_settings, memory_format
from petmonai.models import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = torch.device("cuda")
NATIVE = ["--config", "configs/experiments/native.yaml"]


def test_amp_and_channels_last_forward_match_fp32():
    """The default network's logits under AMP and channels_last_3d equal plain fp32 within bf16/fp16
    rounding (a wrong layout or a dtype mix-up would change them entirely)."""
    torch.manual_seed(0)
    net = build_model({"name": "sfcn_3d"}).to(CUDA).eval()
    x = torch.randn(4, 1, 28, 36, 28, device=CUDA)
    with torch.no_grad():
        torch.backends.cudnn.allow_tf32 = False
        ref = net(x).float()
        fmt = memory_format(CUDA, {"channels_last": True})
        net_cl = net.to(memory_format=fmt)
        assert fmt == torch.channels_last_3d
        cl = net_cl(x.contiguous(memory_format=fmt)).float()
        enabled, kwargs = amp_settings(CUDA, True)
        assert enabled and kwargs["dtype"] in (torch.bfloat16, torch.float16)
        with torch.autocast("cuda", **kwargs):
            amp = net_cl(x.contiguous(memory_format=fmt)).float()
        torch.backends.cudnn.allow_tf32 = True
    assert torch.allclose(cl, ref, atol=1e-4)
    scale = ref.abs().max().item()
    assert (amp - ref).abs().max().item() < 0.05 * max(scale, 1.0)


@pytest.mark.slow
def test_training_and_prediction_on_cuda(tiny_cohort, fast_config, tmp_path):
    """A CV run on CUDA with every GPU switch on trains finite models; predict.py on CUDA (AMP) gives
    the probabilities of predict.py on CPU (fp32) for the same run, and the same labels."""
    from petmonai.commands import train3d_main
    from petmonai.inference import predict

    out = tmp_path / "run"
    args = [*NATIVE, "--data-root", str(tiny_cohort), "--output-dir", str(out), "--device", "cuda"]
    for o in [*fast_config, "model.name=sfcn_3d", "train.amp=true", "train.channels_last=auto",
              "train.augment_on_device=true", "train.max_epochs=4", "report.write=false",
              "report.reference_model=false"]:
        args += ["--set", o]
    assert train3d_main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_fold"]) == 2
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert oof["prob_mci"].between(0, 1).all() and np.isfinite(oof["prob_mci"]).all()

    results = {}
    for device, amp in (("cuda", "auto"), ("cpu", "false")):
        result = predict(out, [tiny_cohort / "Test"], tmp_path / device / "submission.csv",
                         options={"device": device, "amp": amp})
        results[device] = pd.read_csv(result.paths["probabilities"]).set_index("uuid")
        assert result is not None
    gpu, cpu = results["cuda"], results["cpu"]
    assert list(gpu.index) == list(cpu.index) and len(gpu) == 3
    assert np.abs(gpu["prob_mci"] - cpu["prob_mci"]).max() < 0.02
