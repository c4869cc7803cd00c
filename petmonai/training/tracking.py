"""Experiment tracking in MLflow, through MONAI's ``MLFlowHandler`` (``--set tracking.mlflow=true``).

One MLflow run per training run, named after the run folder, in the experiment ``tracking.experiment``:

    parameters   the resolved config, flattened (``train.lr``, ``preprocess.5._target_``...)
    metrics      per epoch of every fold: ``fold_0/train_loss`` (and ``fold_0/val_auc`` with validation);
                 when training ends, each fold's test metrics (``fold_0/roc_auc``...), the pooled
                 out-of-fold metrics with their 95% CIs (``pooled/roc_auc``, ``pooled/roc_auc_ci_low``...)
                 and the reference model's (``reference/pooled/roc_auc``...)
    artifacts    ``report.md``, its figures (``*.png``) and ``metrics.json``

The store: ``$MLFLOW_TRACKING_URI`` when set, else a SQLite database in the run folder
(``mlflow/mlflow.db``, artifacts beside it in ``mlflow/mlruns``)::

    mlflow ui --backend-store-uri sqlite:///runs/my_run/mlflow/mlflow.db

MLflow is an optional extra (``pip install 'petmonai[mlflow]'``); asking for tracking without it
is a :class:`~petmonai.errors.ConfigError` before training starts. A resumed run logs into its
unfinished MLflow run (MONAI's handler picks the open run of the same name).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import petmonai.training.distributed as dist
from petmonai.errors import ConfigError
from petmonai.runs import fold_dir_name, get_logger

log = get_logger("tracking")


TRACKING_FOLDER = "mlflow"  # in the run folder: mlflow.db and the artifacts (mlruns/)


ARTIFACT_PATTERNS = ("report.md", "metrics.json", "*.png")


MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call


_ACTIVE: list = []  # the tracker of the training run in progress (one at a time)


def tracking_enabled(cfg: dict) -> bool:
    return bool(cfg["tracking"]["mlflow"])


def require_mlflow() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError("tracking.mlflow is true but MLflow is not installed: pip install 'petmonai[mlflow]' "
                          "(or set tracking.mlflow=false)") from None


def flatten_config(node, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.001}, "preprocess": [{"_target_": "X"}]}`` ->
    ``{"train.lr": "0.001", "preprocess.0._target_": "X"}`` (MLflow parameters are strings)."""
    out: dict[str, str] = {}
    if isinstance(node, dict) and node:
        for key, value in node.items():
            out.update(flatten_config(value, f"{prefix}{key}."))
    elif isinstance(node, list) and any(isinstance(v, (dict, list)) for v in node):
        for i, value in enumerate(node):
            out.update(flatten_config(value, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = str(node)[:6000]  # MLflow's longest parameter value
    return out


class RunTracker:
    """The MLflow run of one training run (rank 0 only). :func:`tracked_run` makes it; folds attach
    with :func:`attach_fold`; :meth:`log_results` adds the results and closes the run."""

    def __init__(self, cfg: dict, run_dir: Path):
        require_mlflow()
        from monai.handlers import MLFlowHandler
        from monai.utils import path_to_sqlite_uri

        self.run_dir = Path(run_dir)
        uri = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            store = self.run_dir.resolve() / TRACKING_FOLDER
            store.mkdir(parents=True, exist_ok=True)
            uri = path_to_sqlite_uri(store / "mlflow.db")
        self.handler = MLFlowHandler(tracking_uri=uri, iteration_log=False, epoch_log=True,
                                     # no experiment named: MLflow's own default experiment
                                     experiment_name=str((cfg.get("tracking") or {}).get("experiment") or "Default"),
                                     run_name=self.run_dir.name, close_on_complete=False)
        self.params = flatten_config(cfg)
        self.label, self.evaluator = "", None
        self.handler.epoch_logger = self._log_epoch

    @property
    def run_id(self) -> str | None:
        return self.handler.cur_run.info.run_id if self.handler.cur_run is not None else None

    def attach(self, trainer, evaluator, repeat: int, fold: int) -> None:
        """Log this fold's training loss (and validation AUC) every epoch into the run."""
        from ignite.engine import Events

        self.label, self.evaluator = fold_dir_name(repeat, fold), evaluator
        self.handler.attach(trainer)
        if not trainer.has_event_handler(self._log_params, Events.STARTED):
            trainer.add_event_handler(Events.STARTED, self._log_params)

    def log_metrics(self, values: dict, step: int = 0) -> None:
        import mlflow

        stamp = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric(k, float(v), stamp, step) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for start in range(0, len(metrics), 1000):
            self.handler.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def _log_params(self, engine=None) -> None:
        import mlflow

        logged = set(self.handler.client.get_run(self.run_id).data.params)
        params = [mlflow.entities.Param(k, v) for k, v in self.params.items() if k not in logged]
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.handler.client.log_batch(self.run_id, params=params[start:start + MAX_PARAMS_PER_BATCH])

    def _log_epoch(self, engine) -> None:
        values = {f"{self.label}/{k}": v for k, v in engine.state.metrics.items()}
        if self.evaluator is not None:  # validation ran first, at this epoch's end (ValidationHandler)
            values.update({f"{self.label}/{k}": v for k, v in self.evaluator.state.metrics.items()})
        self.log_metrics(values, step=int(engine.state.epoch))

    def log_results(self, metrics: dict | None, reference: dict | None = None) -> None:
        """The run's test metrics and report as the MLflow run's metrics and artifacts; closes the run."""
        if self.handler.cur_run is None:  # every fold was already finished (a resumed run): open it now
            self.handler.start(_NoEngine())
            self._log_params()
        self.log_metrics(result_metrics(metrics or {}, reference))
        self.handler.artifacts = tuple(str(p) for pattern in ARTIFACT_PATTERNS
                                       for p in sorted(self.run_dir.glob(pattern)) if p.is_file())
        self.handler.complete()
        log.info("MLflow: run %s (%d artifacts) in %s", self.run_id, len(self.handler.artifacts),
                 os.environ.get("MLFLOW_TRACKING_URI") or self.handler.client.tracking_uri)
        self.handler.close()


class _NoEngine:
    """What MLFlowHandler.start reads of an engine, for a run that trained no fold in this process."""

    class state:  # noqa: N801 - mimics ignite's engine.state
        max_epochs = None
        epoch_length = None


def result_metrics(metrics: dict, reference: dict | None = None) -> dict:
    """Flat MLflow metrics of ``metrics.json``: per fold, pooled with CIs, fold means, the reference's."""
    out: dict = {}
    for row in metrics.get("per_fold") or []:
        label = fold_dir_name(int(row["repeat"]), int(row["fold"]))
        out.update({f"{label}/{k}": v for k, v in row.items() if k not in ("repeat", "fold")})
    for name, m in (("", metrics), ("reference/", (reference or {}).get("metrics") or {})):
        out.update({f"{name}pooled/{k}": v for k, v in (m.get("pooled") or {}).items()})
        for key, ci in (m.get("pooled_ci") or {}).items():
            if isinstance(ci, dict) and "ci_low" in ci:
                out.update({f"{name}pooled/{key}_ci_low": ci["ci_low"], f"{name}pooled/{key}_ci_high": ci["ci_high"]})
        out.update({f"{name}fold_mean/{k}": s.get("mean") for k, s in (m.get("fold_summary") or {}).items()})
    return out


@contextlib.contextmanager
def tracked_run(cfg: dict, run_dir: str | Path):
    """The training run's MLflow tracker while it trains (None without ``tracking.mlflow`` and on
    ranks other than 0). An MLflow run left open by a failure is continued by ``--resume``."""
    if not tracking_enabled(cfg):
        yield None
        return
    require_mlflow()
    tracker = RunTracker(cfg, Path(run_dir)) if dist.is_main() else None
    _ACTIVE.append(tracker)
    try:
        yield tracker
    finally:
        _ACTIVE.remove(tracker)


def attach_fold(trainer, evaluator, repeat: int, fold: int) -> None:
    """The hook of :func:`petmonai.training.crossval.train_fold`: a fold's engines log into the
    training run's MLflow run, if it is tracked."""
    tracker = _ACTIVE[-1] if _ACTIVE else None
    if tracker is not None:
        tracker.attach(trainer, evaluator, repeat, fold)
