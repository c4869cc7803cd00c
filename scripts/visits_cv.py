#!/usr/bin/env python
"""Prototype (issue 8): train every fold also on the other visits of its training subjects.

15 Test scans are visits of Train subjects (same header subject id). Each joins a fold's training
side with its subject's label when that subject is on the training side, and is left out of the
fold otherwise; held-out scans and their predictions are the teacher run's folds unchanged.

    PYTHONPATH=. python scripts/visits_cv.py DATA_ROOT FOLDS_CSV WORK_DIR
    # then: python scripts/train3d.py --data-root WORK_DIR/datalist.csv --folds-file WORK_DIR/folds.csv ...
"""

import sys
from pathlib import Path

import pandas as pd

from petmonai.data import discover


def main(data_root: str, folds_csv: str, work_dir: str) -> None:
    work = Path(work_dir)
    data = discover(data_root, skip_bad=True)
    train = data[data["split"] == "train"]
    label_of = train.groupby("subject")["class_name"].agg(lambda s: s.iloc[0])
    visits = data[(data["split"] == "test") & data["subject"].isin(label_of.index)]
    rows = [{"image": r.image, "label": r.class_name, "subject": r.subject, "site": r.site} for r in train.itertuples()]
    for r in visits.itertuples():  # a name of its own: Test uuids may equal Train file stems
        link = work / "visits" / f"v{r.uuid}.nii.gz"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(r.image)
        rows.append({"image": str(link), "label": label_of[r.subject], "subject": r.subject, "site": r.site})
    pd.DataFrame(rows).to_csv(work / "datalist.csv", index=False)

    folds = pd.read_csv(folds_csv, dtype={"scan_id": str, "subject": str, "site": str}, keep_default_na=False)
    extra = []
    for (repeat, fold), part in folds.groupby(["repeat", "fold"]):
        role_of = part[part["role"] != "test"].groupby("subject")["role"].first()
        for r in visits.itertuples():
            if r.subject in role_of.index:
                extra.append({"repeat": repeat, "fold": fold, "scan_id": f"{label_of[r.subject]}/v{r.uuid}",
                              "subject": r.subject, "site": r.site, "label": int(label_of[r.subject] == "MCI"),
                              "role": role_of[r.subject], "protocol": part["protocol"].iloc[0]})
    out = pd.concat([folds, pd.DataFrame(extra)]).sort_values(["repeat", "fold", "role", "scan_id"], kind="stable")
    out.to_csv(work / "folds.csv", index=False)
    print(f"{len(visits)} visits; {len(extra)} extra fold rows over {folds.groupby(['repeat', 'fold']).ngroups} folds")


if __name__ == "__main__":
    main(*sys.argv[1:4])
