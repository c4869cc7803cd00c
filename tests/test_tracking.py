"""MLflow tracking of a training run (petmonai.training.tracking): a tiny run logged, read back."""

from __future__ import annotations

import json

import pytest

from petmonai.errors import ConfigError
from petmonai.training import flatten_config, result_metrics

mlflow = pytest.importorskip("mlflow", reason="the tracking extra: pip install 'petmonai[mlflow]'")


def test_flatten_config():
    flat = flatten_config({"train": {"lr": 0.001, "amp": True}, "spacing": [6.0, 6.0, 6.0],
                           "preprocess": [{"_target_": "LoadImaged", "keys": "image"}], "empty": {}})
    assert flat == {"train.lr": "0.001", "train.amp": "True", "spacing": "[6.0, 6.0, 6.0]",
                    "preprocess.0._target_": "LoadImaged", "preprocess.0.keys": "image", "empty": "{}"}


def test_result_metrics_names():
    metrics = {"per_fold": [{"repeat": 0, "fold": 1, "roc_auc": 0.75}, {"repeat": 1, "fold": 0, "roc_auc": 0.5}],
               "pooled": {"roc_auc": 0.8}, "pooled_ci": {"roc_auc": {"value": 0.8, "ci_low": 0.6, "ci_high": 0.9}},
               "fold_summary": {"roc_auc": {"mean": 0.7}}}
    out = result_metrics(metrics, {"metrics": {"pooled": {"roc_auc": 0.85}}})
    assert out["fold_1/roc_auc"] == 0.75 and out["repeat_1/fold_0/roc_auc"] == 0.5
    assert out["pooled/roc_auc"] == 0.8 and out["pooled/roc_auc_ci_low"] == 0.6 and out["pooled/roc_auc_ci_high"] == 0.9
    assert out["fold_mean/roc_auc"] == 0.7 and out["reference/pooled/roc_auc"] == 0.85


def test_tracked_run_is_logged_and_read_back(tiny_cohort, fast_config, tmp_path, monkeypatch):
    from petmonai.commands import train3d_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "tracked"
    args = ["--data-root", str(tiny_cohort), "--output-dir", str(run), "--device", "cpu", "--seed", "1",
            "--set", "tracking.mlflow=true", "--set", "tracking.experiment=petmonai-test",
            "--set", "report.reference_model=false", "--set", "report.bootstrap=50", "--set", "cv.test_views=evaluator"]
    for o in fast_config:
        args += ["--set", o]
    assert train3d_main(args) == 0

    store = run / "mlflow" / "mlflow.db"
    assert store.is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("petmonai-test")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.run_name == "tracked" and logged.info.status == "FINISHED"
    params = logged.data.params
    assert params["train.max_epochs"] == "2" and params["cv.folds"] == "2" and params["tracking.mlflow"] == "True"
    assert params["preprocess.load._target_"] == "LoadImaged"
    for fold in ("fold_0", "fold_1"):  # every epoch's training loss of every fold
        history = client.get_metric_history(logged.info.run_id, f"{fold}/train_loss")
        assert sorted(m.step for m in history) == [1, 2] and all(m.value > 0 for m in history)

    metrics = json.loads((run / "metrics.json").read_text())
    values = logged.data.metrics
    assert values["pooled/roc_auc"] == pytest.approx(metrics["pooled"]["roc_auc"])
    assert values["pooled/roc_auc_ci_low"] == pytest.approx(metrics["pooled_ci"]["roc_auc"]["ci_low"])
    for row in metrics["per_fold"]:
        assert values[f"fold_{row['fold']}/balanced_accuracy"] == pytest.approx(row["balanced_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"report.md", "metrics.json", "roc.png"} <= artifacts
    report = mlflow.artifacts.download_artifacts(run_id=logged.info.run_id, artifact_path="report.md",
                                                 dst_path=str(tmp_path / "dl"), tracking_uri=f"sqlite:///{store}")
    assert open(report).read() == (run / "report.md").read_text()


def test_tracking_without_mlflow_is_a_config_error(monkeypatch):
    import builtins

    from petmonai.training.tracking import tracked_run

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(ConfigError, match=r"petmonai\[mlflow\]"):
        with tracked_run({"tracking": {"mlflow": True}}, "unused"):
            pass
    with tracked_run({"tracking": {"mlflow": False}}, "unused") as tracker:  # off: no MLflow needed
        assert tracker is None
