"""BIDS datasets (PET-BIDS) in and out: a cohort as neuroimaging data are shared.

A BIDS dataset has ``dataset_description.json`` and ``sub-<id>/[ses-<id>/]pet/
sub-<id>[_ses-<id>][_trc-<tracer>]..._pet.nii[.gz]`` files, each with a ``_pet.json`` sidecar.
:func:`discover_bids` makes the same datalist as the challenge layout (:mod:`petmonai.data.discover`),
one row per PET file; here a synthetic cohort written as BIDS by :func:`write_bids`::

    >>> import tempfile
    >>> from pathlib import Path
    >>> from petmonai.data.discover import discover
    >>> from petmonai.data.bids import write_bids
    >>> from petmonai.data.synthetic import generate_cohort
    >>> tmp = tempfile.TemporaryDirectory()
    >>> challenge = generate_cohort(Path(tmp.name) / "pet", n_nc=2, n_mci=2, n_test=1, seed=0)
    >>> bids = write_bids(discover(challenge), Path(tmp.name) / "bids")
    >>> df = discover(bids)                      # --data-root BIDS_DIR
    >>> df[["scan_id", "split", "class_name", "subject", "session", "tracer"]]  # doctest: +NORMALIZE_WHITESPACE
                    scan_id  split class_name         subject session tracer
    0  sub-036S1154_ses-01_trc-FDG  train        MCI  sub-036S1154      01    FDG
    1  sub-036S9555_ses-01_trc-FDG  train         NC  sub-036S9555      01    FDG
    2  sub-105S1728_ses-01_trc-FDG   test              sub-105S1728      01    FDG
    3  sub-153S6478_ses-01_trc-FDG  train         NC  sub-153S6478      01    FDG
    4  sub-153S9667_ses-01_trc-FDG  train        MCI  sub-153S9667      01    FDG
    >>> tmp.cleanup()

Reading (:func:`petmonai.data.discover.discover_bids`, through ``discover``): the subject
(``sub-<id>``, the ``subject`` column, which groups the folds) and session come from the entities. The class comes from ``participants.tsv`` (per subject) or the subject's
``sub-<id>_sessions.tsv`` (per session), column ``diagnosis`` by default (``data.label_column``);
sessions without a label (empty or ``n/a``) form the prediction set (``split`` ``test``). The site
comes from a ``site`` column (sessions, then participants), else from the sidecar
(``InstitutionName``, else ``Manufacturer`` + ``ManufacturersModelName``). ``data.tracer`` keeps the
files whose ``trc-`` entity (else the sidecar's ``TracerName``) matches.

Why a reader of its own and not pybids/ancpbids: a PET cohort needs four things from BIDS (file
names, two TSV tables, a JSON sidecar); the parsing is 30 lines of this module, with every bad
input reported as one error naming the file and row, and no dependency that indexes the whole
dataset in a database first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd

from petmonai.data.classes import parse_label
from petmonai.errors import DataError, PetmonaiError
from petmonai.runs import (
    atomic_write_json,
    atomic_write_text,
    get_logger,
    refuse_nonempty_folder,
    staged_folder,
)

log = get_logger("data")

BIDS_VERSION = "1.9.0"

LABEL_COLUMN = "diagnosis"
"""Default ``data.label_column``: the column of ``participants.tsv``/``sessions.tsv`` holding a scan's class."""

PET_FILE = re.compile(r"^(?P<stem>sub-(?P<sub>[A-Za-z0-9]+)(?P<entities>(?:_[a-z]+-[A-Za-z0-9]+)*))_pet"
                      r"\.nii(?:\.gz)?$")
"""A PET-BIDS image file name: ``sub-<label>[_<key>-<label>]..._pet.nii[.gz]``."""


def is_bids(root: str | Path) -> bool:
    """A folder is a BIDS dataset when it holds ``dataset_description.json`` and ``sub-*`` folders."""
    root = Path(root)
    return (root / "dataset_description.json").is_file() and any(p.is_dir() for p in root.glob("sub-*"))


def parse_pet_name(name: str) -> dict | None:
    """The entities of a PET-BIDS file name (``{"sub": "01", "ses": "2", "trc": "FDG", ...}``), ``stem``
    (the name without ``_pet.nii[.gz]``), or None when ``name`` is no PET-BIDS file."""
    match = PET_FILE.match(name)
    if match is None:
        return None
    entities = dict(part.split("-", 1) for part in match.group("entities").split("_") if part)
    return {"sub": match.group("sub"), **entities, "stem": match.group("stem")}


def pet_files(root: Path) -> list[tuple[Path, dict]]:
    """Every ``sub-*/[ses-*/]pet/*_pet.nii[.gz]`` of the dataset with its entities, in (subject, session,
    name) order. A file whose ``sub-``/``ses-`` entity disagrees with its folders is an error naming it."""
    out = []
    for path in sorted(root.glob("sub-*/pet/*_pet.nii*")) + sorted(root.glob("sub-*/ses-*/pet/*_pet.nii*")):
        entities = parse_pet_name(path.name)
        if entities is None:
            continue
        folders = path.relative_to(root).parts[:-2]
        expected = {"sub": folders[0][4:], "ses": folders[1][4:] if len(folders) > 1 else None}
        if entities["sub"] != expected["sub"] or entities.get("ses") != expected["ses"]:
            raise DataError(path, f"its name's sub-/ses- entities do not match its folders {'/'.join(folders)}")
        out.append((path, entities))
    return sorted(out, key=lambda pe: (pe[1]["sub"], pe[1].get("ses") or "", pe[0].name))


def read_tsv(path: Path, key: str) -> pd.DataFrame:
    """A BIDS table as text (``n/a`` kept as written); :class:`DataError` naming the file when it cannot be
    read or lacks its ``key`` column (``participant_id``, ``session_id``)."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as err:  # pandas raises several types for a malformed table
        raise DataError(path, f"not a readable tab-separated table ({type(err).__name__}: {err})") from None
    table.columns = [str(c).strip() for c in table.columns]
    if key not in table.columns:
        raise DataError(path, f"no '{key}' column (columns: {', '.join(table.columns)}); BIDS needs it")
    return table.apply(lambda col: col.str.strip())


def sidecar_path(image: Path) -> Path:
    """The JSON sidecar's path of a NIfTI file: ``..._pet.nii.gz`` -> ``..._pet.json``."""
    return image.with_name(re.sub(r"\.nii(\.gz)?$", ".json", image.name))


def read_sidecar(image: Path) -> dict | None:
    """The ``_pet.json`` beside a PET file, or None when there is none; :class:`DataError` if it is no JSON object."""
    path = sidecar_path(image)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(path, f"not a readable JSON sidecar ({err})") from None
    if not isinstance(data, dict):
        raise DataError(path, "a sidecar must be a JSON object")
    return data


def sidecar_site(sidecar: dict | None) -> str:
    """A site from the sidecar: ``InstitutionName``, else ``Manufacturer`` + ``ManufacturersModelName``."""
    sidecar = sidecar or {}
    if str(sidecar.get("InstitutionName") or "").strip():
        return str(sidecar["InstitutionName"]).strip()
    scanner = [str(sidecar.get(k) or "").strip() for k in ("Manufacturer", "ManufacturersModelName")]
    return " ".join(s for s in scanner if s)


class BidsLabels:
    """The label sources of a dataset: ``participants.tsv`` (per subject) and ``sessions.tsv`` (per session)."""

    def __init__(self, root: Path, classes: tuple[str, str], column: str, needed: bool):
        self.root, self.classes, self.column = root, classes, column
        self.participants_path = root / "participants.tsv"
        self.participants = (read_tsv(self.participants_path, "participant_id")
                             if self.participants_path.is_file() else None)
        table = self.participants if self.participants is not None else pd.DataFrame(columns=["participant_id"])
        sites = table["site"] if "site" in table.columns else [""] * len(table)
        self.subject_sites: dict[str, str] = {}  # participant_id -> site of its first row: indexed once, not per scan
        for pid, site in zip(table["participant_id"], sites):
            self.subject_sites.setdefault(pid, site)
        self.sessions: dict[str, tuple[Path, pd.DataFrame]] = {}
        for path in sorted(root.glob("sub-*/sub-*_sessions.tsv")):
            self.sessions[path.parent.name] = (path, read_tsv(path, "session_id"))
        self.subject_labels = self._subject_labels()
        has_session_labels = any(column in t.columns for _, t in self.sessions.values())
        if needed and self.subject_labels is None and not has_session_labels:
            raise self._no_labels_error()

    def _no_labels_error(self) -> DataError:
        where = "participants.tsv (per subject) or sub-<id>/sub-<id>_sessions.tsv (per session)"
        if self.participants is None:
            return DataError(self.participants_path, f"not found, and no sessions.tsv has a '{self.column}' column: "
                                                     f"the classes come from {where}, column '{self.column}' "
                                                     "(data.label_column)")
        return DataError(self.participants_path, f"no '{self.column}' column (columns: "
                                                 f"{', '.join(self.participants.columns)}) and no sessions.tsv has "
                                                 f"one; set --set data.label_column=COLUMN or add it")

    def _subject_labels(self) -> dict[str, tuple[int | None, str]] | None:
        """participant_id -> (label, where); one subject listed twice with two labels is an error."""
        if self.participants is None or self.column not in self.participants.columns:
            return None
        out: dict[str, tuple[int | None, str]] = {}
        for i, (pid, value) in enumerate(zip(self.participants["participant_id"], self.participants[self.column])):
            where = f"{self.participants_path}, row {i + 2}"
            label = parse_label(value, self.classes, where)
            if pid in out and out[pid][0] != label:
                raise PetmonaiError(f"{where}: {pid} is listed again with another {self.column} ('{value}'; "
                                    f"first at {out[pid][1]}): labels are per subject in participants.tsv")
            out.setdefault(pid, (label, where))
        return out

    def row(self, subject: str, session: str | None, image: Path) -> dict:
        """``label`` (None: unlabelled) and ``site`` ('' unknown) of one scan."""
        if self.participants is not None and subject not in self.subject_sites:
            raise DataError(image, f"subject {subject} has no row in {self.participants_path}")
        label, where = (self.subject_labels or {}).get(subject, (None, ""))
        site = self.subject_sites.get(subject, "")
        path, table = self.sessions.get(subject, (None, None))
        if session is not None and table is not None:
            matches = [i for i, s in enumerate(table["session_id"]) if s in (f"ses-{session}", session)]
            if matches:
                rec = table.iloc[matches[0]]
                site = rec.get("site", "") or site
                if self.column in table.columns:
                    here = f"{path}, row {matches[0] + 2}"
                    own = parse_label(rec[self.column], self.classes, here)
                    if label is not None and own is not None and own != label:
                        raise PetmonaiError(f"{here}: {self.column} '{rec[self.column]}' of {subject} ses-{session} "
                                            f"differs from the subject's '{self.classes[label]}' ({where}): labels "
                                            "are per subject there; keep the label in one of the two tables")
                    label = own if own is not None else label
        return {"label": label, "site": "" if site.lower() == "n/a" else site}

    def subjects_without_files(self, subjects: set[str]) -> list[str]:
        if self.participants is None:
            return []
        return sorted(set(self.subject_sites) - subjects)


def scan_tracer(entities: dict, sidecar: dict | None) -> str:
    """A PET file's tracer: its ``trc-`` entity, else the sidecar's ``TracerName`` ('' when neither names one)."""
    return entities.get("trc") or str((sidecar or {}).get("TracerName") or "")


def keeps_tracer(entities: dict, sidecar: dict | None, tracer: str | None) -> bool:
    if tracer in (None, ""):
        return True
    return scan_tracer(entities, sidecar).lower() == str(tracer).lower()


# ---------------------------------------------------------------------------------------------------------------
# writing: a datalist (challenge layout, CSV, synthetic cohort) as a BIDS dataset


def bids_label(text: str) -> str:
    """A BIDS label (letters and digits only) from any id: ``031_S_0294`` -> ``031S0294``."""
    label = re.sub(r"[^A-Za-z0-9]", "", str(text))
    if not label:
        raise PetmonaiError(f"'{text}' holds no letter or digit: it cannot name a BIDS subject or session")
    return label


def _plan_bids(datalist: pd.DataFrame, tracer: str | None, rename: dict) -> pd.DataFrame:
    """Subject, session (numbered per subject in datalist order) and file name of every scan."""
    plan = datalist.reset_index(drop=True).copy()
    plan["bids_sub"] = [bids_label(s if src != "file" else f"noid{sid}")
                        for s, src, sid in zip(plan["subject"], plan["subject_source"], plan["scan_id"])]
    clash = plan.groupby("bids_sub")["subject"].nunique()
    if (clash > 1).any():
        merged = sorted(plan.loc[plan["bids_sub"] == clash[clash > 1].index[0], "subject"].unique())
        raise PetmonaiError(f"subjects {merged} become one BIDS label; rename them first")
    plan["bids_ses"] = plan.groupby("bids_sub").cumcount() + 1
    width = max(2, len(str(int(plan["bids_ses"].max()))))
    plan["bids_ses"] = plan["bids_ses"].map(lambda n: f"{n:0{width}d}")
    trc = f"_trc-{bids_label(tracer)}" if tracer else ""
    ext = [".nii.gz" if str(p).endswith(".gz") else ".nii" for p in plan["image"]]
    plan["bids_path"] = [f"sub-{s}/ses-{e}/pet/sub-{s}_ses-{e}{trc}_pet{x}"
                         for s, e, x in zip(plan["bids_sub"], plan["bids_ses"], ext)]
    unknown = sorted(set(plan["class_name"]) - set(rename) - {""}) if rename else []
    if unknown:
        raise PetmonaiError(f"--rename gives no new name for class(es) {unknown}")
    plan["diagnosis"] = [rename.get(c, c) if c else "n/a" for c in plan["class_name"]]
    return plan


def _write_tables(plan: pd.DataFrame, out: Path, name: str) -> None:
    atomic_write_json(out / "dataset_description.json", {
        "Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
        "GeneratedBy": [{"Name": "petmonai to-bids", "Description": "written from a petmonai datalist"}]})
    subjects = plan.drop_duplicates("bids_sub")
    participants = pd.DataFrame({"participant_id": "sub-" + subjects["bids_sub"],
                                 "site": subjects["site"].fillna("").replace("", "n/a")})
    atomic_write_text(out / "participants.tsv", participants.to_csv(sep="\t", index=False))
    atomic_write_json(out / "participants.json", {"site": {"Description": "acquisition site"}})
    for sub, part in plan.groupby("bids_sub", sort=True):
        folder = out / f"sub-{sub}"
        sessions = pd.DataFrame({"session_id": "ses-" + part["bids_ses"], "diagnosis": part["diagnosis"]})
        atomic_write_text(folder / f"sub-{sub}_sessions.tsv", sessions.to_csv(sep="\t", index=False))
        scans = pd.DataFrame({"filename": [p.split("/", 1)[1] for p in part["bids_path"]], "source": part["image"]})
        atomic_write_text(folder / f"sub-{sub}_scans.tsv", scans.to_csv(sep="\t", index=False))


def write_bids(datalist: pd.DataFrame, out: str | Path, *, tracer: str | None = "FDG", link: bool = False,
               rename: dict | None = None, overwrite: bool = False, name: str = "petmonai cohort") -> Path:
    """Write the scans of a datalist (:func:`petmonai.data.discover.discover` of the challenge layout, a CSV
    or the synthetic cohort) as a BIDS dataset in ``out``; returns ``out``.

    Subject: the header's ``db_name`` (``031_S_0294`` -> ``sub-031S0294``; a file without one is its own
    subject); sessions ``ses-01``, ``ses-02``... per subject in datalist order; ``trc-<tracer>`` (FDG
    for the challenge); the class in each subject's ``sessions.tsv`` (column ``diagnosis``, ``n/a`` for
    the unlabelled scans; ``rename`` maps class names, e.g. ``{"NC": "CN", "MCI": "AD"}``); the site in
    ``participants.tsv``; ``sub-<id>_scans.tsv`` names each file's source. ``link``: symbolic links to the
    source files instead of copies. Written into a temporary folder beside ``out``, then renamed: nothing
    is left half-written."""
    out = Path(out)
    refuse_nonempty_folder(out, overwrite)
    plan = _plan_bids(datalist, tracer, dict(rename or {}))
    with staged_folder(out) as tmp:
        for src, rel, sub, ses in zip(plan["image"], plan["bids_path"], plan["bids_sub"], plan["bids_ses"]):
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(Path(src).resolve(), target) if link else shutil.copyfile(src, target)
            sidecar = {"Modality": "PT", "TracerName": tracer or "n/a", "SourceFile": str(Path(src).resolve())}
            atomic_write_json(sidecar_path(target), sidecar)
        _write_tables(plan, tmp, name)
    log.info("wrote %d scans of %d subjects as BIDS into %s", len(plan), plan["bids_sub"].nunique(), out)
    return out
