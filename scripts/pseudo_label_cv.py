"""PROTOTYPE (docs/experiments.md, "Self-training on the unlabeled Test scans"; removed after the
experiment): self-training with pseudo-labelled unlabeled scans, inside cross-validation.

For every fold of a finished run (the teacher), that fold's own model scores the unlabeled Test
scans that are not other visits of any training subject (63 scans of 41 subjects; Test/97 skipped).
Those with |P(MCI) - 0.5| >= BAND join that fold's training scans with the hard label the model
gave them, and the fold is trained again from scratch with the run's config, on the run's folds
(the held-out scans unchanged). No held-out scan and no label of a held-out subject is read.

    PYTHONPATH=. python scripts/pseudo_label_cv.py TEACHER_RUN OUTPUT_RUN BAND
    e.g. PYTHONPATH=. python scripts/pseudo_label_cv.py runs/views/subject_s0 runs/pseudo/subject_all 0.0
"""
import sys
from pathlib import Path
import numpy as np, pandas as pd, torch
from petmonai.data import discover, train_rows
from petmonai.runs import read_run_config, setup_logging
from petmonai.crossval import build_cache, run_cross_validation, fold_dir_name
from petmonai.transforms import build_pipelines
from petmonai.models import build_model
from petmonai.engine import load_weights
from petmonai.inference import HeldOutViews
from petmonai.splits import fold_ids

teacher, out, band = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
log = setup_logging(out)
cpu = torch.device("cpu")
cfg = read_run_config(teacher)
dl = discover("../shared/data/pet2023", skip_bad=True)
train = train_rows(dl)
test = dl[(dl.split == "test") & ~dl.subject.isin(set(train.subject))].reset_index(drop=True)
cfg["data"]["skip_bad"] = True
pre, _ = build_pipelines(cfg)
cache = build_cache(cfg, test, pre)
test = test[test.scan_id.isin(cache.scan_ids)].reset_index(drop=True)
log.info("unlabeled pool: %d scans of %d subjects", len(test), test.subject.nunique())
folds = pd.read_csv(teacher / "folds.csv", dtype={"scan_id": str, "subject": str, "site": str}, keep_default_na=False)
scorer = HeldOutViews(cfg, cpu, amp=False)
vols = {sid: cache[sid]["image"] for sid in test.scan_id}
extra, extra_folds, table = [], [], []
for r, f in fold_ids(folds):
    net = build_model(cfg["model"], cfg)
    load_weights(net, teacher / fold_dir_name(r, f) / "best_model.pt", cpu)
    p = scorer(net, vols)
    for (_, row), prob in zip(test.iterrows(), p):
        table.append({"repeat": r, "fold": f, "scan_id": row.scan_id, "prob_mci": float(prob)})
        if abs(prob - 0.5) < band:
            continue
        lab = int(prob >= 0.5)
        new = row.copy()
        new["scan_id"] = f"pseudo_r{r}f{f}/{row.uuid}"
        new["split"], new["label"], new["class_name"] = "train", lab, ("MCI" if lab else "NC")
        extra.append(new)
        extra_folds.append({"repeat": r, "fold": f, "scan_id": new["scan_id"], "subject": row.subject,
                            "site": row.site, "label": lab, "role": "train", "protocol": folds.protocol.iloc[0]})
    sel = [e for e in extra_folds if e["repeat"] == r and e["fold"] == f]
    log.info("repeat %d fold %d: %d pseudo-labelled (%d MCI)", r, f, len(sel), sum(e["label"] for e in sel))
pd.DataFrame(table).to_csv(out / "teacher_test_probs.csv", index=False)
datalist = pd.concat([dl[dl.split == "train"], pd.DataFrame(extra)], ignore_index=True)
folds2 = pd.concat([folds, pd.DataFrame(extra_folds)], ignore_index=True)
folds2.to_csv(out / "folds_in.csv", index=False)
cfg["cv"]["folds_file"] = str(out / "folds_in.csv")
cfg["report"]["reference_model"] = False
cfg["train"]["progress_bar"] = False
res = run_cross_validation(cfg, datalist, out, cpu)
log.info("RESULT %s", res["metrics"]["headline"]["text"])
