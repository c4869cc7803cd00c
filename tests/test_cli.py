"""The ``petmonai`` command line: one home for every command, the scripts as thin wrappers, a quiet
console, the pipeline preview and a wheel that carries the shipped configs."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from petmonai.commands import COMMANDS, command, main, train3d_main
from petmonai.commands.cli import load_commands
from petmonai.config import load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "scripts").glob("*.py"))


def test_every_script_is_a_thin_wrapper_of_a_command():
    commands = load_commands()
    import petmonai.commands as package

    for script in SCRIPTS:
        tree = ast.parse(script.read_text())
        imports = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "petmonai.commands"]
        assert len(imports) == 1 and len(imports[0].names) == 1, f"{script.name}: not a wrapper of petmonai.commands"
        assert getattr(package, imports[0].names[0].name).command in commands, script.name
        code = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        assert len(code) <= 4, f"{script.name}: {len(code)} statements; the logic belongs in petmonai.commands"


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in ("train", "predict", "audit", "report", "compare", "experiments", "bench", "bench-predict",
                 "export-preprocessed", "preprocess", "build-template", "anchor-folds", "show-pipeline"):
        assert re.search(rf"^\s+{re.escape(name)}\b", out, re.M), name


@pytest.mark.parametrize("name", ["train", "audit", "preprocess", "export-preprocessed", "build-template",
                                  "show-pipeline", "compare", "experiments", "bench"])
def test_config_overrides_are_spelled_alike(name):
    """--set KEY=VALUE, repeatable, lands in the same place for every command that takes a config."""
    from petmonai.commands.registry import build_parser

    parser = build_parser(load_commands()[name], prog=name)
    action = {a.dest: a for a in parser._actions}["overrides"]
    assert action.option_strings == ["--set"] and action.default == [] and action.metavar == "KEY.PATH=VALUE"


def test_a_new_command_takes_a_few_lines(capsys):
    def options(parser):
        parser.add_argument("--name", default="world")

    @command("hello-test", "Say hello.", options)
    def hello(args):
        print(f"hello {args.name} from {args.invocation}")

    try:
        assert main(["hello-test", "--name", "you"]) == 0
        assert capsys.readouterr().out == "hello you from petmonai hello-test --name you\n"
    finally:
        COMMANDS.pop("hello-test")


def test_a_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "run folder not found" in err


def test_train_is_quiet_on_a_console_without_a_terminal(tiny_cohort, fast_config, tmp_path, capsys):
    """No per-epoch lines on the console (they go to train.log), one line per fold with its epochs
    and final loss, no 'nan' for the validation AUC that a run without validation scans never computes."""
    out = tmp_path / "run"
    args = ["train", "--data-root", tiny_cohort, "--output-dir", out, "--device", "cpu", "--seed", "1",
            "--max-epochs", "3", "--set", "report.reference_model=false"]
    for o in fast_config:
        args += ["--set", o]
    assert main(args) == 0
    console = capsys.readouterr().out.splitlines()
    log = (out / "train.log").read_text()
    assert len(re.findall(r"Epoch\[\d+\] Metrics", log)) == 2 * 3  # 2 folds x 3 epochs, in the file
    assert not [line for line in console if "Epoch[" in line or "Key metric" in line]
    folds = [line for line in console if re.search(r"repeat 0 fold \d: 3 epochs, final train loss \d\.\d{3}", line)]
    assert len(folds) == 2, console
    assert not [line for line in console if re.search(r"\bnan\b", line, re.I)], console
    assert len(console) <= 30, "\n".join(console)
    assert len(log.splitlines()) > len(console)  # the file keeps the details


def test_scripts_keep_their_options(tiny_cohort, fast_config, tmp_path):
    """scripts/train3d.py takes the options it always took (a wrapper of petmonai train)."""
    out = tmp_path / "run"
    args = ["--data-root", str(tiny_cohort), "--output-dir", str(out), "--cv", "subject", "--folds", "2",
            "--max-epochs", "1", "--device", "cpu", "--seed", "3", "--skip-bad", "--set", "report.write=false",
            "--set", "report.reference_model=false"]
    for o in fast_config:
        args += ["--set", o]
    assert train3d_main(args) == 0
    cfg = load_config(out / "config.yaml")
    assert cfg["train"]["max_epochs"] == 1 and cfg["seed"] == 3 and cfg["data"]["skip_bad"] is True
    assert cfg["data"]["root"] == str(tiny_cohort) and cfg["cv"]["folds"] == 2


def test_show_pipeline(tiny_cohort, tmp_path, capsys):
    """Every preprocess step of the config, the figure written and the same figures printed."""
    from petmonai.transforms import build_pipelines

    image = tiny_cohort / "Test" / "1.nii.gz"
    png = tmp_path / "preview.png"
    small = ["spacing=[8.0, 8.0, 8.0]", "spatial_size=[24, 28, 24]", "crop_size=[20, 24, 20]"]
    args = ["show-pipeline", "--image", str(image), "--output", str(png)]
    for o in small:
        args += ["--set", o]
    assert main(args) == 0
    table = capsys.readouterr().out.splitlines()
    steps = build_pipelines(load_config(overrides=small))[0].transforms
    rows = [line for line in table if re.match(r"\s*\d+\s", line)]
    assert [row.split()[1] for row in rows] == [type(t).__name__ for t in steps]
    assert rows[-1].split()[2] == "1x24x28x24"  # the cached volume's shape
    assert " mm " in rows[0] and "none (no affine)" in rows[-1]  # EnsureTyped(track_meta=False) drops it
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*.tmp"))

    assert main(args) == 2 and "exists" in capsys.readouterr().err  # no silent overwrite
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    missing = ["show-pipeline", "--image", str(tmp_path / "none.nii.gz"), "--output", str(tmp_path / "x.png")]
    assert main(missing) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.nii.gz: not found" in err


def test_preview_of_a_phantom_step_by_step(tmp_path):
    """The volume after each step: a 4D (X, Y, Z, 1) file described by its volume, not a slab."""
    import nibabel as nib
    import numpy as np
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd, Spacingd

    from petmonai.data import make_phantom
    from petmonai.transforms import pipeline_table, plot_pipeline, preview_pipeline

    volume = make_phantom(0, shape=(64, 64, 30), voxel_size=(4.0, 4.0, 5.0))
    path = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(volume[..., None], np.diag([4.0, 4.0, 5.0, 1.0])), str(path))
    pipeline = [LoadImaged("image", image_only=True), EnsureChannelFirstd("image"),
                Spacingd("image", pixdim=(8.0, 8.0, 10.0)), ScaleIntensityd("image")]
    steps = preview_pipeline(pipeline, path)
    whole = Compose(pipeline)({"image": str(path)})["image"]  # the same transforms in one go
    assert [s.shape[:3] for s in steps[:2]] == [(64, 64, 30), (1, 64, 64)] and steps[-1].shape == tuple(whole.shape)
    np.testing.assert_array_equal(steps[-1].slices[1], whole[0].numpy()[:, whole.shape[2] // 2, :])
    assert steps[0].spacing == pytest.approx((4.0, 4.0, 5.0)) and steps[2].spacing == pytest.approx((8.0, 8.0, 10.0))
    assert steps[0].vmax == pytest.approx(float(volume.max())) and steps[0].vmin == pytest.approx(float(volume.min()))
    assert steps[0].slices[2].shape == (64, 64)  # the (X, Y, Z, 1) file's axial slice, not a slab of x = 0
    assert steps[3].vmin == pytest.approx(0.0) and steps[3].vmax == pytest.approx(1.0)
    assert all(s.seconds >= 0 for s in steps)
    assert len(pipeline_table(steps).splitlines()) == 1 + len(steps)
    assert plot_pipeline(steps, tmp_path / "p.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_wheel_ships_the_configs(tmp_path):
    """`pip install .` (not editable) must carry the shipped configs: commands find them through the package."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "petmonai", src / "petmonai", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("petmonai-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "petmonai" / "configs").rglob("*.yaml")}
    assert "petmonai/configs/train3d.yaml" in shipped and any("/experiments/" in s for s in shipped)
    assert shipped <= names, sorted(shipped - names)
    assert "petmonai/commands/cli.py" in names
    assert re.search(r"^petmonai = petmonai\.commands\.cli:main$", entry_points, re.M)
    assert re.search(r"^petmonai-train3d = petmonai\.commands\.cli:train3d_main$", entry_points, re.M)
