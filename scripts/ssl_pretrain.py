"""Prototype (issue 8): self-supervised pretraining of the SFCN encoder on unlabeled scans.

Prespecified: the 63 readable Test scans whose subject is not in Train, preprocessed as the default;
masked autoencoding: 4x4x4-voxel cubes masked with p=0.4, the SFCN encoder (features.*) codes the
whole masked volume, a small decoder reconstructs the unmasked volume (MSE inside the template brain);
random left-right flip + intensity scale 0.9-1.1; AdamW 1e-3, cosine, batch 8, seed 0; 300 epochs planned,
100 run (the command below): ~10 s an epoch on the shared 2-core CPU, loss flat after ~50.
    python scripts/ssl_pretrain.py RUN_DIR OUT.pt [EPOCHS]     # RUN_DIR: a default run (its preprocessing)
    PYTHONPATH=scripts python scripts/train3d.py --config configs/experiments/ssl_pretrained.yaml \
        --set model.path=OUT.pt --data-root ../shared/data/pet2023 ...
Fine-tuning uses the default recipe unchanged; only the encoder's starting weights differ.
"""
import sys, time
import numpy as np, torch
import torch.nn.functional as F
from petmonai.data import discover
from petmonai.inference import load_run, collect_inputs, prepare_all
from petmonai.models import SFCN


def pretrained_sfcn(path: str) -> torch.nn.Module:
    """The default SFCN with its encoder (features.*) loaded from ``path``; the classifier starts fresh."""
    net = SFCN()
    missing, unexpected = net.load_state_dict(torch.load(path, map_location="cpu"), strict=False)
    assert not unexpected and all(k.startswith("classifier") for k in missing), (missing, unexpected)
    return net


def main() -> None:
    run_dir, out = sys.argv[1], sys.argv[2]
    epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    torch.manual_seed(0); np.random.seed(0)
    d = discover("../shared/data/pet2023", skip_bad=True)
    train_subjects = set(d[d.split == "train"].subject)
    pool = d[(d.split == "test") & ~d.subject.isin(train_subjects)]
    run = load_run(run_dir, {"folds": "all"}, with_models=False)
    prepared, bad = prepare_all(collect_inputs(list(pool.image)), run, skip_bad=True)
    x = torch.stack([p.volume for p in prepared]).float()  # (N,1,32,40,32)
    print(f"{len(x)} scans, {len(bad)} skipped, shape {tuple(x.shape)}", flush=True)
    brain = (x.abs().sum(0, keepdim=True) > 0).float()[0]  # template brain (masked outside)

    class MAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = SFCN()  # only .features used
            ch = [64, 64, 32, 16, 8]
            ups = []
            for a, b in zip(ch[:-1], ch[1:]):
                ups += [torch.nn.ConvTranspose3d(a, b, 2, stride=2), torch.nn.BatchNorm3d(b), torch.nn.ReLU()]
            self.dec = torch.nn.Sequential(*ups, torch.nn.Conv3d(8, 1, 3, padding=1))
        def forward(self, v):
            z = self.enc.features(v)
            return F.interpolate(self.dec(z), size=v.shape[2:], mode="trilinear", align_corners=False)

    net = MAE()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    steps_per = int(np.ceil(len(x) / 8)); sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per)
    t0 = time.time()
    for ep in range(epochs):
        perm = torch.randperm(len(x)); tot = 0.0
        for i in range(0, len(x), 8):
            v = x[perm[i:i + 8]].clone()
            flip = torch.rand(len(v)) < 0.5
            v[flip] = v[flip].flip(2)
            v = v * (0.9 + 0.2 * torch.rand(len(v), 1, 1, 1, 1))
            m = (torch.rand(len(v), 1, 8, 10, 8) < 0.4).float()
            m = m.repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4)
            rec = net(v * (1 - m))
            loss = (((rec - v) ** 2) * brain).sum() / (brain.sum() * len(v))
            opt.zero_grad(); loss.backward(); opt.step(); sched.step(); tot += loss.item() * len(v)
        if ep % 25 == 0 or ep == epochs - 1:
            print(f"epoch {ep} loss {tot / len(x):.4f} ({time.time() - t0:.0f}s)", flush=True)
    torch.save({k: v for k, v in net.enc.state_dict().items() if k.startswith("features.")}, out)
    print("saved", out)


if __name__ == "__main__":
    main()
