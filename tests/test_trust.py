"""What a config may run (petmonai.trust) and the run folder's tamper evidence (petmonai.runs)."""

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from petmonai.commands import train3d_main
from petmonai.config import default_config_path, load_config, shipped_configs
from petmonai.errors import ConfigError
from petmonai.runs import changed_run_files, read_run_config
from petmonai.trust import check_config, config_problems, trust_policy

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ the check


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_passes(name):
    cfg = load_config(default_config_path(name))  # checks, as every load does
    assert config_problems(cfg) == []


def test_the_exported_configs_loading_passes():
    from petmonai.commands.export import LOAD_PREPROCESSED

    assert config_problems({"preprocess": LOAD_PREPROCESSED}) == []


REFUSED = {
    "module outside": ({"_target_": "os.remove", "path": "x"}, "_target_", "--allow-module os"),
    "MONAI short name outside the allowed parts": ({"_target_": "run", "config_file": "x.json"}, "_target_",
                                                   "monai.bundle"),
    "not a MONAI name": ({"_target_": "open", "file": "x", "mode": "w"}, "_target_", "MONAI component"),
    "attribute path out of an allowed module": ({"_target_": "torch.nn.modules.module.torch.load", "f": "x"},
                                                "_target_", "torch.serialization"),
    "petmonai's file writers": ({"_target_": "petmonai.runs.atomic_write_text", "path": "x", "text": "y"},
                                "_target_", "petmonai.runs"),
    "file-writing transform": ({"_target_": "SaveImaged", "keys": "image"}, "_target_", "writes files"),
    "object path as an argument": ({"_target_": "LoadImaged", "keys": "image", "reader": "shutil.rmtree",
                                    "path": "/"}, "reader", "shutil"),
    "builtin as an argument": ({"_target_": "LoadImaged", "keys": "image", "reader": "open"}, "reader", "builtin"),
    "expression": ({"_target_": "RandFlipd", "keys": "image", "prob": "$__import__('os').getpid() and 0.5"},
                   "prob", "allowed forms"),
    "function call on a module": ({"_target_": "LoadImaged", "keys": "image", "dtype": "$np.load('x')"}, "dtype",
                                  "allowed forms"),
    "not a dtype": ({"_target_": "LoadImaged", "keys": "image", "dtype": "$torch.load"}, "dtype", "allowed forms"),
    "macro": ({"_target_": "RandFlipd", "keys": "%/tmp/other.yaml#keys"}, "keys", "macro"),
    "debug mode": ({"_target_": "RandFlipd", "keys": "image", "_mode_": "debug"}, "_mode_", "debug"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_entries_are_named(case):
    entry, key, says = REFUSED[case]
    cfg = {"augment": [{"_target_": "RandFlipd", "keys": "image", "prob": 0.5}, entry]}
    with pytest.raises(ConfigError) as err:
        check_config(cfg, "elsewhere/config.yaml")
    message = str(err.value)
    assert message.startswith("elsewhere/config.yaml: config not trusted, nothing was built: ")
    assert f"augment.1.{key} " in message and says in message and "--trust-config" in message
    assert "augment.0" not in message
    with trust_policy(trust_config=True):
        check_config(cfg, "elsewhere/config.yaml")


@pytest.mark.parametrize("value", ["$@spacing[0]", "$@template#transform", "$@a::b[1][-2]", "$np.float32",
                                   "$numpy.uint8", "$torch.float32", "$ torch.bfloat16", "@spacing", "image"])
def test_allowed_forms(value):
    assert config_problems({"preprocess": [{"_target_": "monai.transforms.Identityd", "keys": value}]}) == []


def test_allowed_targets():
    cfg = {"model": {"_target_": "monai.networks.nets.ResNet", "block": "basic"},
           "preprocess": [{"_target_": "petmonai.transforms.base.AboveThreshold"}, {"_target_": "torch.nn.Identity"},
                          {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader"}]}
    assert config_problems(cfg) == []


def test_allow_module_names_must_be_module_names():
    with pytest.raises(ConfigError, match="not a Python module name"):
        with trust_policy(allow_modules=["my scanner; rm"]):
            pass


# ------------------------------------------------------------------------ the README's own transform


def readme_example(tmp_path: Path) -> Path:
    """The README's own-transform example as files: my_scanner.py (docs/extending.md, where the README
    points) and my_config.yaml (the README's, the same as the docs')."""
    docs = (REPO / "docs" / "extending.md").read_text()
    pattern = r"```yaml\n(# my_config.yaml.*?)```"
    config = re.search(pattern, (REPO / "README.md").read_text(), re.S).group(1)
    assert config == re.search(pattern, docs, re.S).group(1)
    module = re.search(r"```python\n# my_scanner.py\n(.*?)```", docs, re.S).group(1)
    (tmp_path / "my_scanner.py").write_text(module)
    path = tmp_path / "my_config.yaml"
    path.write_text(config.replace("/path/to/petmonai/configs/train3d.yaml", str(default_config_path())))
    return path


def test_readme_own_transform_passes_from_the_users_config(tmp_path, monkeypatch):
    """The README's config names its module in its own allow_modules: list: the user's word."""
    from petmonai.transforms import build_pipelines

    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(readme_example(tmp_path))
    assert cfg["allow_modules"] == ["my_scanner"]
    preprocess, _ = build_pipelines(cfg)
    assert "ClipHotVoxelsd" in [type(t).__name__ for t in preprocess.transforms]
    sys.modules.pop("my_scanner", None)


def test_readme_own_transform_without_the_header_needs_allow_module(tmp_path):
    path = readme_example(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw.pop("allow_modules")
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"preprocess.clip._target_ 'my_scanner.ClipHotVoxelsd' is outside the "
                                          r"allowed modules \(my_scanner\); to run it, pass --allow-module my_scanner"):
        load_config(path)
    assert "my_scanner" not in sys.modules  # refused before anything was imported
    with trust_policy(allow_modules=["my_scanner"]):
        assert load_config(path)["preprocess"]["clip"]["_target_"] == "my_scanner.ClipHotVoxelsd"


def test_a_run_folders_header_needs_the_users_confirmation(tmp_path):
    """allow_modules: in a run folder's config is the other person's word, not the user's."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(readme_example(tmp_path))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="the config lists allow_modules: my_scanner, which only you can confirm"):
        read_run_config(run)
    with trust_policy(allow_modules=["my_scanner"]):
        assert read_run_config(run)["allow_modules"] == ["my_scanner"]


# ----------------------------------------------------------------- a run folder from elsewhere, end to end


@pytest.fixture(scope="module")
def finished_run(tiny_cohort, fast_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "run"
    args = ["--data-root", str(tiny_cohort), "--output-dir", str(out), "--device", "cpu"]
    for o in [*fast_config, "train.max_epochs=1", "report.write=false", "report.reference_model=false"]:
        args += ["--set", o]
    assert train3d_main(args) == 0
    return out


def test_the_run_records_the_hashes_of_its_config_and_checkpoints(finished_run, tmp_path):
    from petmonai.runs import sha256_file

    prov = json.loads((finished_run / "provenance.json").read_text())
    assert prov["config_sha256"] == sha256_file(finished_run / "config.yaml")
    assert prov["checkpoints_sha256"] == {f"fold_{k}/best_model.pt": sha256_file(finished_run / f"fold_{k}/best_model.pt")
                                          for k in (0, 1)}
    assert changed_run_files(finished_run) == []

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    with open(copy / "config.yaml", "a") as fh:
        fh.write("# edited\n")
    shutil.copy(copy / "fold_0" / "best_model.pt", copy / "fold_1" / "best_model.pt")
    (copy / "fold_0" / "best_model.pt").unlink()
    assert changed_run_files(copy) == ["config.yaml (changed)", "fold_0/best_model.pt (missing)",
                                       "fold_1/best_model.pt (changed)"]


def plant(run: Path, witness: Path) -> None:
    """A file-writing expression in the run's config, which evaluates to the dtype it replaces."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["preprocess"]["load"]["dtype"] = f"$__import__('pathlib').Path({str(witness)!r}).write_text('ran') and np.float32"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_planted_expression_is_refused_by_predict_report_and_resume(finished_run, tiny_cohort, tmp_path, capsys):
    run, witness = tmp_path / "theirs", tmp_path / "witness.txt"
    shutil.copytree(finished_run, run)
    plant(run, witness)
    out = tmp_path / "pred" / "submission.csv"
    commands = {
        "predict": lambda *extra: load_script("predict").main(["--run-dir", str(run), "--input",
                                                                str(tiny_cohort / "Test"), "--output", str(out),
                                                                "--threads", "1", *extra]),
        "report": lambda *extra: load_script("report").main([str(run), "--no-figures", *extra]),
        "resume": lambda *extra: train3d_main(["--resume", str(run), *extra]),
    }
    for name, command in commands.items():
        assert command() == 2, name
        captured = capsys.readouterr()
        assert "config not trusted, nothing was built: preprocess.load.dtype" in captured.err, name
        assert "--trust-config" in captured.err and not witness.exists(), name
        if name == "predict":  # the tamper warning (once per folder and file in a process)
            assert "does not match what its run wrote (provenance.json): config.yaml (changed)" in captured.out
    assert not out.exists()

    assert commands["predict"]("--trust-config") == 0  # accepted as it is: the expression runs
    assert witness.read_text() == "ran" and out.is_file()


def test_unlisted_target_in_a_run_folder_is_refused_until_allowed(finished_run, tmp_path, capsys):
    run = tmp_path / "theirs"
    shutil.copytree(finished_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["preprocess"]["theirs"] = {"_target_": "their_lab.transforms.Normalised", "_before_": "to_tensor", "keys": "image"}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert load_script("report").main([str(run), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert "'their_lab.transforms.Normalised' is outside the allowed modules (their_lab.transforms)" in err
    assert "--allow-module their_lab.transforms" in err
    # allowed, the check passes and the report (which builds nothing) is written
    assert load_script("report").main([str(run), "--no-figures", "--allow-module", "their_lab.transforms"]) == 0
    assert (run / "report.md").is_file()


@pytest.mark.parametrize("text, allowed", [
    ("$@train#max_epochs * @steps_per_epoch", True), ("$@spacing[0] / 2", True), ("$@a + 1.5", True),
    ("$@a * __import__('os').getpid()", False), ("$@a.__class__", False), ("$2 ** 100000000", False),
])
def test_arithmetic_of_config_values_is_the_only_other_expression(text, allowed):
    from petmonai.trust import _expression_problem

    assert (_expression_problem(text) is None) is allowed
