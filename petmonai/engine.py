"""Training and evaluation engines: MONAI ``SupervisedTrainer``/``SupervisedEvaluator`` (Ignite).

>>> trainer, evaluator = build_engines(net, train_loader, val_loader, fold_dir, train_cfg, device)
>>> trainer.run()

Mixed precision runs on CUDA only (bf16 where the GPU supports it, else fp16 with a gradient
scaler); on CPU the same code runs in plain fp32.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from ignite.engine import Events
from ignite.handlers import ProgressBar
from ignite.metrics import Average
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.workflow import Workflow
from monai.handlers import (
    CheckpointSaver,
    EarlyStopHandler,
    LrScheduleHandler,
    ROCAUC,
    StatsHandler,
    TensorBoardStatsHandler,
    ValidationHandler,
    from_engine,
    stopping_fn_from_metric,
)
from monai.inferers import SimpleInferer

from petmonai.errors import PetmonaiError
from petmonai.runs import LOGGER_NAME, atomic_write_csv

BEST_CHECKPOINT = "best_model.pt"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PetmonaiError("--device cuda: no CUDA GPU is visible to torch (use --device cpu or auto)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise PetmonaiError(f"unknown device '{name}' (auto, cpu or cuda)")
    return torch.device(name)


def amp_settings(device: torch.device, enabled: bool = True) -> tuple[bool, dict]:
    """``(amp, amp_kwargs)`` for MONAI engines: bf16 if supported, else fp16; off on CPU."""
    if not enabled or device.type != "cuda":
        return False, {}
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return True, {"dtype": dtype}


class PetTrainer(SupervisedTrainer):
    """SupervisedTrainer whose gradient scaler is active only for fp16 (bf16 needs none) and is
    kept across ``run()`` calls, so a resumed run restores its state."""

    def run(self) -> None:  # type: ignore[override]
        if self.amp and getattr(self, "scaler", None) is None:
            self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_kwargs.get("dtype") == torch.float16)
        Workflow.run(self)


def mci_probability(output: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decollated engine output -> (P(MCI) per scan, label per scan)."""
    probs = torch.stack([torch.softmax(torch.as_tensor(o["pred"]).float(), dim=0)[1] for o in output])
    labels = torch.as_tensor([int(o["label"]) for o in output])
    return probs, labels


def build_engines(
    net: torch.nn.Module,
    train_loader,
    val_loader,
    fold_dir: str | Path,
    train_cfg: dict,
    device: torch.device,
    progress_bar: bool | None = None,
):
    """Trainer and evaluator with their handlers: LR schedule, validation each epoch (ROC AUC),
    best checkpoint by validation AUC, early stopping, console + TensorBoard stats.

    ``val_loader=None`` trains without validation and keeps the final weights as the best.
    """
    fold_dir = Path(fold_dir)
    amp, amp_kwargs = amp_settings(device, train_cfg.get("amp", True))
    max_epochs = int(train_cfg["max_epochs"])
    optimizer = torch.optim.AdamW(net.parameters(), lr=float(train_cfg["lr"]),
                                  weight_decay=float(train_cfg["weight_decay"]))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
    log_name = f"{LOGGER_NAME}.engine"
    tb_dir = fold_dir / "tensorboard"

    trainer_handlers = [
        LrScheduleHandler(lr_scheduler=scheduler, print_lr=False),
        StatsHandler(name=log_name, output_transform=lambda x: None, iteration_log=False),
        TensorBoardStatsHandler(log_dir=str(tb_dir), tag_name="train_loss_iteration",
                                output_transform=from_engine(["loss"], first=True)),
    ]
    trainer = PetTrainer(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=train_loader,
        network=net,
        optimizer=optimizer,
        loss_function=torch.nn.CrossEntropyLoss(),
        inferer=SimpleInferer(),
        amp=amp,
        amp_kwargs=amp_kwargs,
        non_blocking=device.type == "cuda",
        key_train_metric={"train_loss": Average(output_transform=from_engine(["loss"], first=True))},
        metric_cmp_fn=lambda current, best: current < best,  # a loss: lower is better
        train_handlers=trainer_handlers,
    )
    trainer.optimizer_scheduler = scheduler  # kept for resumable checkpoints

    evaluator = None
    if val_loader is not None:
        evaluator = SupervisedEvaluator(
            device=device,
            val_data_loader=val_loader,
            network=net,
            inferer=SimpleInferer(),
            key_val_metric={"val_auc": ROCAUC(output_transform=mci_probability)},
            amp=amp,
            amp_kwargs=amp_kwargs,
            non_blocking=device.type == "cuda",
            metric_cmp_fn=lambda current, best: current >= best,  # ties: keep the later, longer-trained epoch
            val_handlers=[
                StatsHandler(name=log_name, output_transform=lambda x: None, iteration_log=False,
                             global_epoch_transform=lambda _: trainer.state.epoch),
                TensorBoardStatsHandler(log_dir=str(tb_dir), output_transform=lambda x: None,
                                        global_epoch_transform=lambda _: trainer.state.epoch, iteration_log=False),
                CheckpointSaver(save_dir=str(fold_dir), save_dict={"model": net}, save_key_metric=True,
                                key_metric_n_saved=1, key_metric_filename=BEST_CHECKPOINT,
                                key_metric_greater_or_equal=True),
                EarlyStopHandler(patience=int(train_cfg["early_stop_patience"]), trainer=trainer,
                                 score_function=stopping_fn_from_metric("val_auc")),
            ],
        )
        ValidationHandler(validator=evaluator, interval=1, epoch_level=True).attach(trainer)
    else:
        CheckpointSaver(save_dir=str(fold_dir), save_dict={"model": net}, save_final=True,
                        final_filename=BEST_CHECKPOINT).attach(trainer)

    # MONAI's StatsHandler gives its logger a console handler of its own; route it to the run's log instead
    engine_logger = logging.getLogger(log_name)
    for handler in list(engine_logger.handlers):
        engine_logger.removeHandler(handler)
    engine_logger.propagate = True

    EpochHistory(fold_dir / "history.csv", optimizer, evaluator).attach(trainer)

    if progress_bar is None:
        progress_bar = bool(train_cfg.get("progress_bar", True)) and sys.stderr.isatty()
    if progress_bar:
        ProgressBar(persist=False).attach(trainer, output_transform=from_engine(["loss"], first=True))
    return trainer, evaluator


class EpochHistory:
    """Appends one row per epoch (loss, validation AUC, learning rate, seconds) to ``history.csv``."""

    def __init__(self, path: Path, optimizer, evaluator=None):
        self.path, self.optimizer, self.evaluator = Path(path), optimizer, evaluator
        self.rows: list[dict] = []
        self._start, self._lr = 0.0, float("nan")

    def attach(self, trainer) -> None:
        trainer.add_event_handler(Events.EPOCH_STARTED, self._started)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _started(self, engine) -> None:
        self._start = time.perf_counter()
        self._lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trains with

    def _completed(self, engine) -> None:
        val = self.evaluator.state.metrics.get("val_auc", float("nan")) if self.evaluator else float("nan")
        self.rows.append({"epoch": engine.state.epoch, "train_loss": engine.state.metrics.get("train_loss"),
                          "val_auc": val, "lr": self._lr,
                          "seconds": time.perf_counter() - self._start})
        atomic_write_csv(self.path, pd.DataFrame(self.rows))


def load_weights(net: torch.nn.Module, path: str | Path, device: torch.device) -> torch.nn.Module:
    """Load a checkpoint saved by the engine (safe: ``weights_only=True``)."""
    try:
        state = torch.load(str(path), map_location=device, weights_only=True)
    except FileNotFoundError:
        raise PetmonaiError(f"{path}: checkpoint not found") from None
    except Exception as err:
        raise PetmonaiError(f"{path}: cannot load checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a resumable checkpoint holds more than the weights
    net.load_state_dict(state)
    return net


@torch.no_grad()
def predict_probabilities(net: torch.nn.Module, loader, device: torch.device, amp: bool = True) -> np.ndarray:
    """P(MCI) for every item of ``loader``, in order (no augmentation)."""
    use_amp, amp_kwargs = amp_settings(device, amp)
    net.eval()
    out = []
    for batch in loader:
        images = batch["image"].to(device, non_blocking=device.type == "cuda")
        with torch.autocast("cuda", enabled=use_amp, **amp_kwargs):
            logits = net(images)
        out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)

