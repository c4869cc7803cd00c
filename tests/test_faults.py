"""Fault injection on inputs (issue 7): every kind of bad file or folder, through the commands.

Every fault is generated here from a small synthetic volume. Given a bad input, a command either

* stops with ONE line on stderr, ``error: <file>: <problem>``, exit status 2, no traceback and
  no partial output (no run folder, no audit files, no submission), or
* with ``--skip-bad`` goes on, names every file it left out (console and a CSV), and drops
  nothing silently: files in = files used + files listed as skipped.

File faults come in two levels:

``header``  seen when files are listed (:func:`petmonai.data.discover.read_header`): audit, train and
            predict stop (or skip) before any voxel is decoded.
``voxel``   seen when volumes are decoded (``VolumeCache`` / ``CheckVolume``): train and predict
            stop (or skip); the audit reads headers only, so it counts such a file as a scan.

Folder faults (an empty class folder, an empty ``Test``, two files with one uuid, a file name
without integer uuid, a header without ``db_name``) are tested one by one below.

Cost: header faults never decode anything; voxel faults decode 5 small volumes; one real
``train3d --skip-bad`` run (tiny network, 1 epoch, 2 folds) serves the end-to-end checks and
the predict checks.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import gzip
import importlib.util
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from petmonai.audit import NO_DB_NAME
from petmonai.commands import audit_main, train3d_main

REPO = Path(__file__).resolve().parents[1]

QUICK = [  # on top of conftest's fast_config: a tiny network, one epoch, no report
    "train.max_epochs=1", "report.write=false", "report.reference_model=false",
    "model={_target_: monai.networks.nets.ResNet, block: basic, layers: [1, 1, 1, 1], "
    "block_inplanes: [8, 16, 32, 64], spatial_dims: 3, n_input_channels: 1, num_classes: 2, "
    "conv1_t_size: 3, conv1_t_stride: 2}",
]


# ---------------------------------------------------------------------------------------------
# the faults


@dataclass(frozen=True)
class Source:
    """A good volume to corrupt: float32 (X, Y, Z) voxels, their affine, and the cohort's own
    ``.nii.gz`` bytes of it."""

    data: np.ndarray
    affine: np.ndarray
    gz: bytes


def save(path: Path, data: np.ndarray, src: Source, subject: str | None = None) -> Path:
    """Write ``data`` as NIfTI; ``subject`` goes into ``db_name`` (None: a unique id from the name)."""
    img = nib.Nifti1Image(np.asarray(data), src.affine)
    if subject is None:
        subject = f"900_S_{int(path.name.split('.')[0]) % 10000:04d}"
    if subject:
        img.header["db_name"] = subject.encode()
    nib.save(img, str(path))
    return path


def _truncated_nii(path, src):
    raw = save(path, src.data, src).read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _header_only(path, src):
    save(path, src.data, src)
    offset = int(nib.load(str(path)).dataobj.offset)  # 352: the header and its extension flag
    assert offset > 0
    path.write_bytes(path.read_bytes()[:offset])


def _not_nifti(path, src):  # e.g. a screenshot renamed to .nii
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)


def _not_gzip(path, src):  # a text file named .nii.gz
    path.write_text("subject,scan\n002_S_0001,PET\n" * 20)


def _empty_file(path, src):
    path.write_bytes(b"")


def _truncated_gz(path, src):
    raw = save(path, src.data, src).read_bytes()
    path.write_bytes(raw[: int(len(raw) * 0.6)])


def _corrupt_gz(path, src):
    """64 bytes flipped inside the deflate stream of a cohort file. nibabel stops reading when it
    has the voxels, before the gzip checksum: alone, it returns wrong voxels without any error."""
    raw = bytearray(src.gz)
    start = int(len(raw) * 0.6)
    raw[start:start + 64] = bytes(b ^ 0xFF for b in raw[start:start + 64])
    path.write_bytes(bytes(raw))


def _with_nan(path, src):
    data = src.data.copy()
    data[60:64, 60:64, 30] = np.nan
    save(path, data, src)


def _with_inf(path, src):
    data = src.data.copy()
    data[64, 64, 30] = np.inf
    save(path, data, src)


@dataclass(frozen=True)
class Fault:
    name: str
    file: str          # integer uuid stem, so that predict accepts the name and reaches the content
    level: str         # header | voxel
    problem: str       # regular expression the message must match
    make: Callable[[Path, Source], None]
    unreadable: bool = False  # made unreadable after writing (see block_reading)


FILE_FAULTS = [
    Fault("truncated-nii", "81.nii", "header", r"truncated: \d+ bytes, but the header declares", _truncated_nii),
    Fault("header-only", "82.nii", "header", r"header only: .* holds none of the", _header_only),
    Fault("not-nifti", "83.nii", "header", r"not a readable NIfTI file", _not_nifti),
    Fault("not-gzip", "84.nii.gz", "header", r"not a readable NIfTI file .*not a gzip file", _not_gzip),
    Fault("empty-file", "85.nii", "header", r"not a readable NIfTI file .*[Ee]mpty file", _empty_file),
    Fault("2d-image", "86.nii.gz", "header", r"2D image of shape \(128, 128\)",
          lambda p, s: save(p, s.data[:, :, 30], s)),
    Fault("5d-image", "87.nii.gz", "header", r"shape \(128, 128, \d+, 1, 2\): expected 3D",
          lambda p, s: save(p, np.stack([s.data[..., None]] * 2, -1), s)),
    Fault("3-frames", "88.nii.gz", "header", r"shape \(128, 128, \d+, 3\): expected 3D, or 4D with one frame",
          lambda p, s: save(p, np.stack([s.data] * 3, -1), s)),
    Fault("unreadable", "89.nii.gz", "header", r"permission denied", lambda p, s: save(p, s.data, s),
          unreadable=True),
    Fault("truncated-gz", "91.nii.gz", "voxel", r"damaged compressed data .*EOFError", _truncated_gz),
    Fault("corrupt-gz", "92.nii.gz", "voxel", r"damaged compressed data .*(CRC check failed|zlib|invalid)",
          _corrupt_gz),
    Fault("nan", "93.nii.gz", "voxel", r"16 voxel\(s\) are NaN or Inf", _with_nan),
    Fault("inf", "94.nii.gz", "voxel", r"1 voxel\(s\) are NaN or Inf", _with_inf),
    Fault("all-zero", "95.nii.gz", "voxel", r"volume is empty: every voxel equals 0",
          lambda p, s: save(p, np.zeros_like(s.data), s)),
]
HEADER_FAULTS = [f for f in FILE_FAULTS if f.level == "header"]
VOXEL_FAULTS = [f for f in FILE_FAULTS if f.level == "voxel"]


def block_reading(paths, monkeypatch) -> str:
    """Make files unreadable. ``chmod 000`` where that works; where it does not stop reading (as
    root, e.g. in CI), ``open`` raises PermissionError for them as the OS would. Returns which."""
    paths = [Path(p) for p in paths]
    for p in paths:
        os.chmod(p, 0)
    try:
        with open(paths[0], "rb"):
            readable = True
    except PermissionError:
        readable = False
    how = "chmod 000"
    if readable:  # root ignores the mode bits
        for p in paths:
            os.chmod(p, 0o644)
        blocked = {os.path.realpath(p) for p in paths}
        real_open = builtins.open

        def guarded_open(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(file)) in blocked:
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
        how = "open() patched (running as root)"
    for p in paths:  # the fault is real: opening the file, plain or through gzip, fails
        with pytest.raises(PermissionError):
            open(p, "rb")
        with pytest.raises(PermissionError):
            gzip.open(p).read(1)
    return how


def restore_reading(paths) -> None:
    for p in paths:
        if Path(p).exists():
            os.chmod(p, 0o644)


def write_faults(faults, folder: Path, src: Source, monkeypatch) -> dict[Path, Fault]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for fault in faults:
        path = folder / fault.file
        fault.make(path, src)
        written[path] = fault
    unreadable = [p for p, f in written.items() if f.unreadable]
    if unreadable:
        block_reading(unreadable, monkeypatch)
    return written


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def source(tiny_cohort) -> Source:
    path = tiny_cohort / "Train" / "NC" / "1.nii.gz"
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    return Source(data.reshape(data.shape[:3]), img.affine, path.read_bytes())


def small_layout(src: Path, dst: Path, per_class: int = 2, n_test: int = 1) -> Path:
    """A copy of a few files of the cohort: enough for the commands to reach every check.
    (Resolved: the datalist holds resolved paths, and messages name files as the datalist does.)"""
    dst = dst.resolve()
    for folder, n in (("Train/NC", per_class), ("Train/MCI", per_class), ("Test", n_test)):
        (dst / folder).mkdir(parents=True)
        for f in sorted((src / folder).glob("*.nii.gz"), key=lambda p: int(p.name.split(".")[0]))[:n]:
            shutil.copy(f, dst / folder / f.name)
    return dst


def n_nifti(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.name.endswith((".nii", ".nii.gz")))


def run(main, args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code: int, err: str, *needles, problem: str | None = None) -> str:
    """Exit 2 and exactly one stderr line ``error: ...`` holding every needle (and the problem)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    if problem:
        assert re.search(problem, lines[0]), (problem, lines[0])
    return lines[0]


def train_args(root, out, fast_config, *extra) -> list:
    args = ["--data-root", root, "--output-dir", out, "--device", "cpu", "--seed", "1", *extra]
    for override in [*fast_config, *QUICK]:
        args += ["--set", override]
    return args


def load_predict_script():
    spec = importlib.util.spec_from_file_location("predict_script_faults", REPO / "scripts" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PREDICT_FAST = ["--device", "cpu", "--flips", "none", "--windows", "center",
                "--set", "inference.optimize=none", "--set", "inference.threads=1"]


@pytest.fixture()
def no_training(monkeypatch):
    """``train3d`` up to the training itself (config, run folder, discovery, audit, provenance);
    records the datalist it would train on."""
    seen = {}

    def stub(cfg, datalist, run_dir, device, synthetic, log, resume=False):
        seen["datalist"] = datalist
        return {"stub": True}

    monkeypatch.setattr("petmonai.commands.workflows.finish_training", stub)
    return seen


# ---------------------------------------------------------------------------------------------
# one bad file at a time


@pytest.mark.parametrize("fault", HEADER_FAULTS, ids=[f.name for f in HEADER_FAULTS])
def test_header_fault_stops_audit_and_train_or_is_skipped(fault, source, tiny_cohort, tmp_path, fast_config,
                                                          capsys, monkeypatch):
    root = small_layout(tiny_cohort, tmp_path / "data")
    bad = root / "Train" / "MCI" / fault.file
    write_faults([fault], bad.parent, source, monkeypatch)
    n_in = n_nifti(root)

    code, _, err = run(audit_main, ["--data-root", root, "--output-dir", tmp_path / "audit"], capsys)
    assert_one_error(code, err, bad, "--skip-bad", problem=fault.problem)
    assert not (tmp_path / "audit").exists()

    code, _, err = run(train3d_main, train_args(root, tmp_path / "run", fast_config), capsys)
    assert_one_error(code, err, bad, problem=fault.problem)
    assert not (tmp_path / "run").exists()  # no half-made run folder to trip over next time

    code, out, err = run(audit_main, ["--data-root", root, "--output-dir", tmp_path / "audit", "--skip-bad"], capsys)
    assert code == 0 and "Traceback" not in err
    listed = [line for line in out.splitlines() if line.startswith("skipped: ")]
    assert len(listed) == 1 and listed[0].startswith(f"skipped: {bad}: ") and re.search(fault.problem, listed[0])
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert [s["image"] for s in report["skipped_files"]] == [str(bad)]
    assert report["n_scans"] + len(report["skipped_files"]) == n_in


@pytest.mark.parametrize("fault", VOXEL_FAULTS, ids=[f.name for f in VOXEL_FAULTS])
def test_voxel_fault_stops_train(fault, source, tiny_cohort, tmp_path, fast_config, capsys, monkeypatch):
    root = small_layout(tiny_cohort, tmp_path / "data")
    bad = root / "Train" / "MCI" / fault.file
    write_faults([fault], bad.parent, source, monkeypatch)

    code, _, err = run(train3d_main, train_args(root, tmp_path / "run", fast_config), capsys)
    assert_one_error(code, err, bad, "--skip-bad", problem=fault.problem)
    assert not (tmp_path / "run").exists()

    # the audit reads headers only: it neither stops nor drops the file (train/predict check voxels)
    code, out, err = run(audit_main, ["--data-root", root], capsys)
    assert code == 0 and not err.strip()
    assert "Train MCI: 3 scans" in out


def test_all_bad_files_named_in_one_message(source, tiny_cohort, tmp_path, fast_config, capsys, monkeypatch):
    """Several bad files: one error line names each of them, so one round of fixing is enough."""
    root = small_layout(tiny_cohort, tmp_path / "data")
    header = write_faults(HEADER_FAULTS[:3], root / "Train" / "NC", source, monkeypatch)
    for faults in (header, None):
        if faults is None:  # then, the header faults fixed, three voxel faults
            for path in header:
                path.unlink()
            faults = write_faults(VOXEL_FAULTS[2:], root / "Train" / "NC", source, monkeypatch)
        code, _, err = run(train3d_main, train_args(root, tmp_path / "run", fast_config), capsys)
        line = assert_one_error(code, err, *faults, "--skip-bad")
        for fault in faults.values():
            assert re.search(fault.problem, line), fault.name
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# folder faults


def test_empty_class_folder(tiny_cohort, tmp_path, fast_config, capsys):
    root = small_layout(tiny_cohort, tmp_path / "data")
    nc = root / "Train" / "NC"
    for f in nc.iterdir():
        f.unlink()
    (nc / "notes.txt").write_text("scan list\n")  # not a volume: said, and still no volume in the class
    for skip in ([], ["--skip-bad"]):
        code, out, err = run(audit_main, ["--data-root", root, *skip], capsys)
        assert_one_error(code, err, nc, problem="class folder holds no .nii or .nii.gz file")
        assert "ignored 1 entry not named *.nii or *.nii.gz: notes.txt" in out
    code, _, err = run(train3d_main, train_args(root, tmp_path / "run", fast_config, "--skip-bad"), capsys)
    assert_one_error(code, err, nc, problem="holds no .nii")
    assert not (tmp_path / "run").exists()


def test_duplicate_uuid(tiny_cohort, tmp_path, fast_config, capsys):
    root = small_layout(tiny_cohort, tmp_path / "data")
    gz = root / "Train" / "MCI" / "1.nii.gz"
    plain = root / "Train" / "MCI" / "1.nii"
    nib.save(nib.load(str(gz)), str(plain))
    for skip in ([], ["--skip-bad"]):  # not an unreadable file: ambiguous, so never skipped
        code, _, err = run(audit_main, ["--data-root", root, *skip], capsys)
        assert_one_error(code, err, plain, gz, problem="duplicate uuid in train")
    code, _, err = run(train3d_main, train_args(root, tmp_path / "run", fast_config, "--skip-bad"), capsys)
    assert_one_error(code, err, plain, gz, problem="one file per uuid")
    assert not (tmp_path / "run").exists()


def test_empty_test_folder(tiny_cohort, tmp_path, fast_config, capsys, no_training):
    root = small_layout(tiny_cohort, tmp_path / "data", n_test=0)
    assert (root / "Test").is_dir() and not any((root / "Test").iterdir())
    code, out, err = run(audit_main, ["--data-root", root], capsys)
    assert code == 0 and "Test: 0 scans" in out and "NOTE: no Test scans" in out
    code, _, err = run(train3d_main, train_args(root, tmp_path / "run", fast_config), capsys)
    assert code == 0 and not err.strip()  # training needs no Test scans
    assert len(no_training["datalist"]) == 4 and set(no_training["datalist"]["split"]) == {"train"}


def test_non_numeric_test_stem(tiny_cohort, tmp_path, fast_config, capsys, no_training):
    root = small_layout(tiny_cohort, tmp_path / "data")
    named = root / "Test" / "scan_a.nii.gz"
    shutil.copy(root / "Test" / "1.nii.gz", named)
    code, out, err = run(audit_main, ["--data-root", root, "--output-dir", tmp_path / "audit"], capsys)
    assert code == 0
    warning = [line for line in out.splitlines() if line.startswith("WARNING: 1 Test file(s) are not named")]
    assert warning and str(named) in warning[0] and "predict.py refuses them" in warning[0]
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert report["test"]["non_integer_uuid"] == [str(named.resolve())]
    code, _, err = run(train3d_main, train_args(root, tmp_path / "run", fast_config), capsys)
    assert code == 0  # a Test file name does not matter for training
    assert "test/scan_a" in set(no_training["datalist"]["scan_id"])


def test_missing_db_name_is_its_own_subject_and_said(source, tiny_cohort, tmp_path, capsys):
    root = small_layout(tiny_cohort, tmp_path / "data")
    anonymous = save(root / "Train" / "MCI" / "70.nii.gz", source.data, source, subject="")
    assert "db_name" not in nib.load(str(anonymous)).header or not nib.load(str(anonymous)).header["db_name"].item()
    code, out, err = run(audit_main, ["--data-root", root, "--output-dir", tmp_path / "audit"], capsys)
    assert code == 0
    assert any(line.startswith("WARNING: 1 scan(s) have no subject id") and NO_DB_NAME in line
               for line in out.splitlines())
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert report["unknown_subjects"]["files"] == [str(anonymous.resolve())]
    assert report["unknown_subjects"]["warning"] == NO_DB_NAME
    assert str(anonymous.resolve()) in (tmp_path / "audit" / "audit.md").read_text()
    assert report["train"]["classes"]["MCI"]["subjects_unknown_id"] == 1


# ---------------------------------------------------------------------------------------------
# end to end: train3d --skip-bad with every fault at once, then predict with its run


@pytest.fixture(scope="module")
def skip_bad_run(source, tiny_cohort, fast_config, tmp_path_factory):
    """The full tiny cohort plus every file fault (alternating between the classes; two in Test),
    a file without ``db_name`` and a stray text file, trained with ``--skip-bad``."""
    base = tmp_path_factory.mktemp("faults_e2e").resolve()
    root = base / "data"
    for folder in ("Train", "Test"):
        shutil.copytree(tiny_cohort / folder, root / folder)
    faults: dict[Path, Fault] = {}
    with pytest.MonkeyPatch.context() as mp:
        for i, fault in enumerate(FILE_FAULTS):
            faults.update(write_faults([fault], root / "Train" / ("MCI", "NC")[i % 2], source, mp))
        for fault in (FILE_FAULTS[2], VOXEL_FAULTS[2]):  # not NIfTI, NaN
            faults.update(write_faults([fault], root / "Test", source, mp))
        anonymous = save(root / "Train" / "MCI" / "70.nii.gz", source.data, source, subject="")
        (root / "Train" / "NC" / "notes.txt").write_text("scan list\n")
        n_train_in, n_test_in = n_nifti(root / "Train"), n_nifti(root / "Test")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = train3d_main([str(a) for a in train_args(root, base / "run", fast_config, "--skip-bad")])
    restore_reading(faults)
    return {"root": root, "run": base / "run", "code": code, "out": out.getvalue(), "err": err.getvalue(),
            "faults": faults, "anonymous": anonymous, "n_train_in": n_train_in, "n_test_in": n_test_in}


def test_skip_bad_training_goes_on_and_lists_every_skipped_file(skip_bad_run):
    r = skip_bad_run
    assert r["code"] == 0, r["err"]
    assert "Traceback" not in r["err"] and "error:" not in r["err"]
    run_dir = r["run"]
    assert (run_dir / "metrics.json").is_file()

    header_skips = pd.read_csv(run_dir / "skipped_headers.csv")
    voxel_skips = pd.read_csv(run_dir / "skipped.csv")
    listed = {**dict(zip(header_skips["image"], header_skips["problem"])),
              **dict(zip(voxel_skips["image"], voxel_skips["problem"]))}
    test_nan = next(p for p, f in r["faults"].items() if p.parent.name == "Test" and f.level == "voxel")
    expected = {str(p): f for p, f in r["faults"].items() if p != test_nan}
    assert set(listed) == set(expected)  # every bad file, and nothing else
    for image, fault in expected.items():
        assert re.search(fault.problem, listed[image]), (image, listed[image])
        assert (image in set(header_skips["image"])) == (fault.level == "header")
        assert f"skipped {image}: " in r["out"]  # named on the console too
    assert "ignored 1 entry not named *.nii or *.nii.gz: notes.txt" in r["out"]

    # nothing silently dropped: files in = used + skipped, per split
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"scan_id": str})
    used = set(folds["scan_id"])
    train_skipped = [i for i in listed if "/Train/" in i]
    assert len(used) + len(train_skipped) == r["n_train_in"]
    assert len(pd.read_csv(run_dir / "oof_predictions.csv")) == len(used)
    datalist = pd.read_csv(run_dir / "datalist.csv", dtype=str, keep_default_na=False)
    test_rows = datalist[datalist["split"] == "test"]
    test_skipped = [i for i in header_skips["image"] if "/Test/" in i]
    assert len(test_rows) + len(test_skipped) == r["n_test_in"]
    # a Test volume with NaN voxels is not decoded by training: it stays listed, for predict to check
    assert str(test_nan.resolve()) in set(test_rows["image"])
    assert not {f"{Path(i).parent.name}/{Path(i).name.split('.')[0]}" for i in train_skipped} & used


def test_skip_bad_training_uses_a_file_without_subject_as_its_own_subject(skip_bad_run):
    run_dir, anonymous = skip_bad_run["run"], skip_bad_run["anonymous"]
    datalist = pd.read_csv(run_dir / "datalist.csv", dtype=str, keep_default_na=False)
    row = datalist[datalist["image"] == str(anonymous.resolve())].iloc[0]
    assert row["subject"] == "file:train/MCI/70" and row["subject_source"] == "file"
    folds = pd.read_csv(run_dir / "folds.csv", dtype=str)
    assert "file:train/MCI/70" in set(folds["subject"])
    audit = json.loads((run_dir / "audit.json").read_text())
    assert str(anonymous.resolve()) in audit["unknown_subjects"]["files"]
    assert any(NO_DB_NAME in w for w in audit["warnings"])
    assert NO_DB_NAME in skip_bad_run["out"]  # said in the training log as well


def test_predict_bad_inputs_stop_or_are_skipped(skip_bad_run, source, tiny_cohort, tmp_path, capsys, monkeypatch):
    script = load_predict_script()
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in (tiny_cohort / "Test").glob("*.nii.gz"):
        shutil.copy(f, inputs / f.name)
    n_good = len(list(inputs.iterdir()))
    faults = write_faults(FILE_FAULTS, inputs, source, monkeypatch)
    out = tmp_path / "out" / "submission.csv"
    args = ["--run-dir", skip_bad_run["run"], "--input", inputs, "--output", out, *PREDICT_FAST]

    code, _, err = run(script.main, args, capsys)
    line = assert_one_error(code, err, *faults, "nothing written", "--skip-bad")
    for path, fault in faults.items():
        assert re.search(fault.problem, line), fault.name
    assert not out.exists() and not (out.parent / "submission.probabilities.csv").exists()

    code, stdout, err = run(script.main, [*args, "--skip-bad"], capsys)
    assert code == 0 and "Traceback" not in err, err
    submission = pd.read_csv(out)
    skipped = pd.read_csv(out.parent / "submission.skipped.csv")
    assert len(submission) == n_good and len(submission) + len(skipped) == n_good + len(faults)
    problems = dict(zip(skipped["file"], skipped["problem"]))
    assert set(problems) == {str(p) for p in faults}
    for path, fault in faults.items():
        assert re.search(fault.problem, problems[str(path)]), fault.name
        assert f"skipped: {path}: " in stdout
    assert f"{n_good + len(faults)} input volume(s): {n_good} predicted, {len(faults)} skipped" in stdout


@pytest.mark.parametrize("case", ["duplicate-uuid", "non-numeric-stem", "empty-folder"])
def test_predict_input_set_errors(case, skip_bad_run, tiny_cohort, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    if case == "duplicate-uuid":
        shutil.copy(tiny_cohort / "Test" / "1.nii.gz", inputs / "7.nii.gz")
        nib.save(nib.load(str(inputs / "7.nii.gz")), str(inputs / "7.nii"))
        needles, problem = [inputs / "7.nii", inputs / "7.nii.gz"], "duplicate uuid"
    elif case == "non-numeric-stem":
        shutil.copy(tiny_cohort / "Test" / "1.nii.gz", inputs / "1.nii.gz")
        shutil.copy(tiny_cohort / "Test" / "2.nii.gz", inputs / "scan_a.nii.gz")
        needles, problem = [inputs / "scan_a.nii.gz"], "without an integer uuid"
    else:
        needles, problem = [inputs], "holds no .nii or .nii.gz file"
    out = tmp_path / "out" / "submission.csv"
    code, _, err = run(load_predict_script().main, ["--run-dir", skip_bad_run["run"], "--input", inputs,
                                                     "--output", out, "--skip-bad", *PREDICT_FAST], capsys)
    assert_one_error(code, err, *needles, problem=problem)
    assert not out.parent.exists() or not any(out.parent.iterdir())
