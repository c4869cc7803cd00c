"""Training and evaluation engines: MONAI ``SupervisedTrainer``/``SupervisedEvaluator`` (Ignite).

>>> trainer, evaluator = build_engines(net, train_loader, val_loader, fold_dir, train_cfg, device)  # doctest: +SKIP
>>> trainer.run()  # doctest: +SKIP

The optimiser, learning-rate schedule and loss are the config's ``_target_`` entries
``train.optimizer``, ``train.scheduler`` and ``train.loss`` (:func:`build_optimizer`,
:func:`build_scheduler`, :func:`training_loss`). Mixed precision runs on CUDA only (bf16 where
the GPU supports it, else fp16 with a gradient scaler); on CPU the same code runs in plain fp32.
The other speed switches of ``train:``
(``channels_last``, ``cudnn_benchmark``, ``compile``) are read here too; every one of them also
runs on CPU. Under torchrun (:mod:`petmonai.training.distributed`) the trainer's network is wrapped in
``DistributedDataParallel`` and only rank 0 writes files.
"""

from __future__ import annotations

import functools
import inspect
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
from monai.engines.utils import default_prepare_batch
from monai.engines.workflow import Workflow
from monai.handlers import (
    ROCAUC,
    CheckpointSaver,
    EarlyStopHandler,
    LrScheduleHandler,
    StatsHandler,
    TensorBoardStatsHandler,
    ValidationHandler,
    stopping_fn_from_metric,
)
from monai.inferers import SimpleInferer

import petmonai.training.distributed as dist
from petmonai.errors import ConfigError, PetmonaiError
from petmonai.models import spatial_dims
from petmonai.runs import BEST_CHECKPOINT, LOGGER_NAME, atomic_write_csv


def amp_settings(device: torch.device, enabled: bool = True) -> tuple[bool, dict]:
    """``(amp, amp_kwargs)`` for MONAI engines: bf16 if supported, else fp16; off on CPU."""
    if not enabled or device.type != "cuda":
        return False, {}
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return True, {"dtype": dtype}


def cuda_auto_switch(train_cfg: dict, key: str, device: torch.device) -> bool:
    """A ``train`` switch that is ``auto`` (on CUDA only), ``true`` or ``false``."""
    value = train_cfg[key]
    if value == "auto":
        return device.type == "cuda"
    if not isinstance(value, bool):
        raise PetmonaiError(f"config key 'train.{key}': auto, true or false, got {value!r}")
    return value


def channels_last(device: torch.device, train_cfg: dict) -> bool:
    """Whether model and inputs use ``torch.channels_last_3d``: ``auto`` on CUDA only, or true/false."""
    return cuda_auto_switch(train_cfg, "channels_last", device)


def memory_format(device: torch.device, train_cfg: dict, dims: int = 3) -> torch.memory_format:
    """The layout of model and batches: ``channels_last_3d`` (3D) / ``channels_last`` (2D) or contiguous."""
    if not channels_last(device, train_cfg):
        return torch.contiguous_format
    return torch.channels_last_3d if dims == 3 else torch.channels_last


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_cpu_allocator() -> bool:
    """Keep freed activation buffers in the process instead of handing them back to the kernel.

    glibc serves every allocation above 128 KiB-32 MiB (adaptive) with a fresh ``mmap``, so each
    training step re-faults (and zeroes) hundreds of MB of pages: a third of the CPU time was
    system time. Raising the mmap and trim thresholds lets ``malloc`` reuse those blocks
    (measured: ~20% faster 3D ResNet-18 steps on 2 cores, half the system time, for ~0.5 GB more
    peak resident memory; docs/benchmarks_resnet18.md). Returns ``False`` (and does nothing) where the C library is not glibc.

    >>> tune_cpu_allocator()
    True
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and friends: no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(mallopt(_M_TRIM_THRESHOLD, 512 * 1024 * 1024))


def configure_backends(device: torch.device, train_cfg: dict) -> None:
    """cuDNN autotuning on CUDA (``train.cudnn_benchmark``): picks the fastest convolution
    algorithms for the fixed input shape, at the price of bit-for-bit reproducibility. Call after
    ``set_determinism``, which turns it off. ``train.cpu_allocator: tuned`` (the default) applies
    :func:`tune_cpu_allocator`."""
    allocator = str(train_cfg["cpu_allocator"])
    if allocator not in ("tuned", "default"):
        raise ConfigError(f"train.cpu_allocator: {allocator!r} is not one of: tuned, default")
    if allocator == "tuned":
        tune_cpu_allocator()
    if device.type == "cuda" and bool(train_cfg["cudnn_benchmark"]):
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False


def prepare_batch(batchdata, device=None, non_blocking: bool = False,
                  memory_format: torch.memory_format = torch.contiguous_format, **kwargs):
    """MONAI's default batch preparation (image, label to the device), the image laid out in
    ``memory_format`` (``channels_last_3d`` on GPU)."""
    image, *rest = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
    return (laid_out(image, memory_format), *rest)


def laid_out(image: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``image`` in ``memory_format`` where its rank has that layout (``channels_last_3d``: 5, ``channels_last``:
    4), else as it is: a 2D network on 3D volumes (models.AxialSlices2D) gets 5-D batches."""
    if (memory_format is torch.channels_last_3d and image.ndim == 5) or (memory_format is torch.channels_last
                                                                          and image.ndim == 4):
        return image.contiguous(memory_format=memory_format)
    return image


class MixUpBatch:
    """mixup (Zhang et al., ICLR 2018) of a training batch: each scan is blended with a partner from
    the same batch, images and one-hot labels alike, with a weight drawn from Beta(alpha, alpha) per
    scan (torch's global generator, which every fold seeds). MONAI's ``MixUp`` fixes the batch size
    and mixes only image-shaped labels, hence this class.

    >>> mix = MixUpBatch(alpha=0.4)
    >>> image, target = mix(torch.randn(4, 1, 8, 8, 8), torch.tensor([0, 1, 1, 0]))
    >>> tuple(target.shape), bool(torch.allclose(target.sum(1), torch.ones(4)))
    ((4, 2), True)
    """

    def __init__(self, alpha: float, num_classes: int = 2):
        if not alpha > 0:
            raise ConfigError(f"train.mixup_alpha: {alpha} must be > 0 (0 switches mixup off)")
        self.beta = torch.distributions.Beta(float(alpha), float(alpha))
        self.num_classes = num_classes

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = image.shape[0]
        weight = self.beta.sample((n,)).to(image.device)
        partner = torch.randperm(n).to(image.device)
        target = torch.nn.functional.one_hot(label.long(), self.num_classes).float()
        w_image = weight.view(n, *([1] * (image.ndim - 1)))
        return (w_image * image + (1 - w_image) * image[partner],
                weight[:, None] * target + (1 - weight[:, None]) * target[partner])


def mixup_batch(batchdata, device=None, non_blocking: bool = False, *, mixup: MixUpBatch, **kwargs):
    """:func:`prepare_batch`, then ``mixup`` of the batch (training only)."""
    image, label, *rest = prepare_batch(batchdata, device, non_blocking, **kwargs)
    image, label = mixup(image, label)
    return (image, label, *rest)


def train_entry(train_cfg: dict, name: str, runtime: dict | None = None, partial: bool = False):
    """The ``_target_`` entry ``train.<name>`` built (``partial``: as a factory still waiting for the
    arguments only training knows, the network's parameters or the optimiser). The entry may refer
    to the ``train`` section (``@train#lr``) and to ``runtime`` values (``@steps_per_epoch``)."""
    from petmonai.config import build_component

    entry = {k: v for k, v in train_cfg[name].items() if k != "_interval_"}  # petmonai's key, not an argument
    if partial:
        entry["_mode_"] = "callable"
    return build_component({"train": {**train_cfg, name: entry}}, f"train#{name}", runtime)


def _call_entry(factory, name: str, *args, **kwargs):
    try:
        return factory(*args, **kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"config key 'train.{name}': cannot build it ({type(err).__name__}: {err})") from None


def training_loss(train_cfg: dict) -> torch.nn.Module:
    """``train.loss`` (default: cross-entropy with ``train.label_smoothing``; it takes mixup's soft targets too)."""
    smoothing = float(train_cfg["label_smoothing"])
    if not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing: {smoothing} is not in [0, 1)")
    return train_entry(train_cfg, "loss")


def build_optimizer(net: torch.nn.Module, train_cfg: dict, device: torch.device) -> torch.optim.Optimizer:
    """``train.optimizer`` over the network's parameters, fused (one kernel over all parameters) on
    CPU and CUDA where its class takes ``fused`` and the entry does not set it: on 2 CPU cores the
    per-tensor AdamW update of the 33M-parameter 3D ResNet-18 took ~100 ms per step, the fused one ~20 ms.

    >>> from petmonai.config import default_config
    >>> build_optimizer(torch.nn.Linear(2, 2), default_config()["train"], torch.device("cpu")).defaults["fused"]
    True
    """
    factory = train_entry(train_cfg, "optimizer", partial=True)
    kwargs = {}
    target = factory.func if isinstance(factory, functools.partial) else factory
    if "fused" not in train_cfg["optimizer"] and "fused" in inspect.signature(target).parameters:
        fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in net.parameters())
        kwargs["fused"] = fused or None
    return _call_entry(factory, "optimizer", net.parameters(), **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: dict, steps_per_epoch: int):
    """``train.scheduler`` on ``optimizer``, and whether it steps every iteration (its ``_interval_``)
    rather than every epoch. It may refer to ``@steps_per_epoch``, the training batches of an epoch."""
    factory = train_entry(train_cfg, "scheduler", {"steps_per_epoch": steps_per_epoch}, partial=True)
    return _call_entry(factory, "scheduler", optimizer), train_cfg["scheduler"]["_interval_"] == "iteration"


class PetTrainer(SupervisedTrainer):
    """SupervisedTrainer whose gradient scaler is active only for fp16 (bf16 needs none) and is
    kept across ``run()`` calls, so a resumed run restores its state."""

    def run(self) -> None:  # type: ignore[override]
        if self.amp and getattr(self, "scaler", None) is None:
            self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_kwargs.get("dtype") == torch.float16)
        Workflow.run(self)


def mci_probability(output: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decollated engine output -> (P(positive class) per scan, label per scan), both on the predictions' device
    (ROCAUC indexes one with the other, and gathers them across processes on the GPU)."""
    probs = torch.stack([torch.softmax(torch.as_tensor(o["pred"]).float(), dim=0)[1] for o in output])
    labels = torch.as_tensor([int(o["label"]) for o in output], device=probs.device)
    return probs, labels


def step_loss(output: dict) -> torch.Tensor:
    """The training step's loss from the trainer's (not decollated) output."""
    return output["loss"]


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
    ``train_cfg["keep"] == "last"`` also keeps the final weights (the validation AUC is still
    logged every epoch, but chooses no checkpoint and stops nothing): with ~6 validation scans a
    fold, the best-AUC epoch is mostly chance. Optimiser, schedule and loss are the ``_target_``
    entries ``train_cfg["optimizer"]``, ``["scheduler"]`` and ``["loss"]``.

    Speed switches of ``train_cfg``: ``channels_last`` (the network is converted in place),
    ``compile`` (``torch.compile`` of the training network), ``amp`` (CUDA only). With several
    processes the trainer trains a ``DistributedDataParallel`` wrapper of ``net``; the evaluator,
    checkpoints and ``trainer.history`` use ``net`` itself. Files are written by rank 0 only.
    """
    fold_dir = Path(fold_dir)
    keep = str(train_cfg["keep"])
    if keep not in ("best", "last"):
        raise ConfigError(f"config key 'train.keep': '{keep}' is not best or last")
    fmt = memory_format(device, train_cfg, spatial_dims(net))
    if fmt is not torch.contiguous_format:
        net.to(memory_format=fmt)
    trainer = _make_trainer(net, train_loader, fold_dir, train_cfg, device, fmt)
    evaluator = None
    if val_loader is not None:
        evaluator = _make_evaluator(net, val_loader, trainer, fold_dir, train_cfg, device, fmt, keep)
        ValidationHandler(validator=evaluator, interval=1, epoch_level=True).attach(trainer)
    if evaluator is None or keep == "last":
        CheckpointSaver(save_dir=str(fold_dir), save_dict={"model": net}, save_final=True,
                        final_filename=BEST_CHECKPOINT).attach(trainer)
    _route_engine_logs()
    trainer.history = EpochHistory(fold_dir / "history.csv", trainer.optimizer, evaluator, write=dist.is_main())
    trainer.history.attach(trainer)
    if progress_bar is None:
        progress_bar = bool(train_cfg["progress_bar"]) and sys.stderr.isatty()
    if progress_bar and dist.is_main():
        ProgressBar(persist=False).attach(trainer, output_transform=step_loss)
    return trainer, evaluator


ENGINE_LOG = f"{LOGGER_NAME}.engine"


def _make_trainer(net: torch.nn.Module, train_loader, fold_dir: Path, train_cfg: dict, device: torch.device,
                  fmt: torch.memory_format) -> PetTrainer:
    """The trainer: optimiser, LR schedule (per epoch or per iteration), loss, mixup, AMP, DDP,
    epoch stats (rank 0), a new shuffling order per epoch under torchrun."""
    amp, amp_kwargs = amp_settings(device, train_cfg["amp"])
    alpha = float(train_cfg["mixup_alpha"])
    batch_fn = (functools.partial(mixup_batch, memory_format=fmt, mixup=MixUpBatch(alpha)) if alpha
                else functools.partial(prepare_batch, memory_format=fmt))
    optimizer = build_optimizer(net, train_cfg, device)
    scheduler, per_iteration = build_scheduler(optimizer, train_cfg, max(1, len(train_loader)))
    handlers = [LrScheduleHandler(lr_scheduler=scheduler, print_lr=False, epoch_level=not per_iteration)]
    if dist.is_main():
        handlers += [
            StatsHandler(name=ENGINE_LOG, output_transform=lambda x: None, iteration_log=False),
            # every 10th step: a per-step scalar write cost ~3% of a small network's step time
            TensorBoardStatsHandler(log_dir=str(fold_dir / "tensorboard"), tag_name="train_loss_iteration",
                                    output_transform=step_loss, iteration_log=10),
        ]
    trainer = PetTrainer(
        device=device,
        max_epochs=int(train_cfg["max_epochs"]),
        train_data_loader=train_loader,
        network=dist.wrap_ddp(net, device, sync_bn=bool(train_cfg["sync_bn"])),
        optimizer=optimizer,
        loss_function=training_loss(train_cfg),
        optim_set_to_none=True,  # frees gradients instead of zero-filling 33M floats every step
        decollate=False,  # nothing uses per-scan training outputs: skip splitting every batch
        inferer=SimpleInferer(),
        amp=amp,
        amp_kwargs=amp_kwargs,
        non_blocking=device.type == "cuda",
        prepare_batch=batch_fn,
        key_train_metric={"train_loss": Average(output_transform=step_loss)},
        metric_cmp_fn=lambda current, best: current < best,  # a loss: lower is better
        train_handlers=handlers,
        compile=bool(train_cfg["compile"]),
        compile_kwargs=dict(train_cfg["compile_kwargs"] or {}),
    )
    trainer.optimizer_scheduler = scheduler  # kept for resumable checkpoints
    trainer.plain_network = net  # the module inside DDP / torch.compile: checkpoints, evaluation
    sampler = getattr(train_loader, "batch_sampler", None)
    if hasattr(sampler, "set_epoch"):  # petmonai.training.distributed.DistributedBatchSampler: a new order per epoch
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: sampler.set_epoch(engine.state.epoch))
    if dist.world_size() > 1:  # every rank validates and saves rank 0's batch-norm statistics
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: dist.broadcast_buffers(net))
    return trainer


def _make_evaluator(net: torch.nn.Module, val_loader, trainer, fold_dir: Path, train_cfg: dict, device: torch.device,
                    fmt: torch.memory_format, keep: str) -> SupervisedEvaluator:
    """The validation evaluator (ROC AUC each epoch); with ``keep: best`` also the best checkpoint
    and early stopping, kept for resuming in ``evaluator._handlers_for_resume``."""
    amp, amp_kwargs = amp_settings(device, train_cfg["amp"])
    handlers = []
    if dist.is_main():
        handlers += [StatsHandler(name=ENGINE_LOG, output_transform=lambda x: None, iteration_log=False,
                                  global_epoch_transform=lambda _: trainer.state.epoch),
                     TensorBoardStatsHandler(log_dir=str(fold_dir / "tensorboard"), output_transform=lambda x: None,
                                             global_epoch_transform=lambda _: trainer.state.epoch,
                                             iteration_log=False)]
    if keep == "best":
        best_checkpoint = CheckpointSaver(
            save_dir=str(fold_dir), save_dict={"model": net}, save_key_metric=True, key_metric_n_saved=1,
            key_metric_filename=BEST_CHECKPOINT, key_metric_greater_or_equal=True)
        early_stop = EarlyStopHandler(patience=int(train_cfg["early_stop_patience"]), trainer=trainer,
                                      score_function=stopping_fn_from_metric("val_auc"))
        handlers += [best_checkpoint, early_stop]
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=val_loader,
        network=net,  # not the DDP wrapper: ranks may hold different numbers of validation scans
        inferer=SimpleInferer(),
        # ROCAUC all-gathers its predictions across ranks before computing: one AUC on every rank
        key_val_metric={"val_auc": ROCAUC(output_transform=mci_probability)},
        amp=amp,
        amp_kwargs=amp_kwargs,
        non_blocking=device.type == "cuda",
        prepare_batch=functools.partial(prepare_batch, memory_format=fmt),
        metric_cmp_fn=lambda current, best: current >= best,  # ties: keep the later, longer-trained epoch
        val_handlers=handlers,
    )
    if keep == "best":
        evaluator._handlers_for_resume = {"early_stop": early_stop, "best_checkpoint": best_checkpoint}
    return evaluator


def _route_engine_logs() -> None:
    """MONAI's StatsHandler gives its logger a console handler of its own; route it to the run's log instead."""
    engine_logger = logging.getLogger(ENGINE_LOG)
    for handler in list(engine_logger.handlers):
        engine_logger.removeHandler(handler)
    engine_logger.propagate = True


class EpochHistory:
    """Appends one row per epoch (loss, validation AUC, learning rate, seconds) to ``history.csv``
    (kept in memory only with ``write=False``: the ranks other than 0)."""

    def __init__(self, path: Path, optimizer, evaluator=None, write: bool = True):
        self.path, self.optimizer, self.evaluator, self.write = Path(path), optimizer, evaluator, write
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
        if self.write:
            atomic_write_csv(self.path, pd.DataFrame(self.rows))


@torch.no_grad()
def predict_probabilities(net: torch.nn.Module, loader, device: torch.device, amp: bool = True,
                          memory_format: torch.memory_format = torch.contiguous_format) -> np.ndarray:
    """P(positive class, label 1) for every item of ``loader``, in order (no augmentation)."""
    use_amp, amp_kwargs = amp_settings(device, amp)
    net.eval()
    out = []
    for batch in loader:
        images = batch["image"].to(device, non_blocking=device.type == "cuda")
        images = laid_out(images, memory_format)
        with torch.autocast("cuda", enabled=use_amp, **amp_kwargs):
            logits = net(images)
        out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _randomizables(root, depth: int = 4) -> list:
    """Every MONAI ``Randomizable`` reachable from ``root`` (a Compose), in a stable order."""
    from monai.transforms import Randomizable

    found, seen, frontier = [], set(), [root]
    for _ in range(depth):
        nxt = []
        for obj in frontier:
            children = getattr(obj, "transforms", None)
            children = list(children) if isinstance(children, (list, tuple)) else []
            children += [v for k, v in sorted(vars(obj).items()) if isinstance(v, Randomizable)] if hasattr(obj, "__dict__") else []
            for child in children:
                if id(child) in seen:
                    continue
                seen.add(id(child))
                if isinstance(child, Randomizable):
                    found.append(child)
                nxt.append(child)
        frontier = nxt
    return found


def _np_state_to_torch(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _np_state_from_torch(d) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


class TrainingState:
    """A resumable checkpoint of one fold, written atomically at the end of every epoch.

    Holds the weights, optimiser, LR schedule, gradient scaler, Ignite engine state, early-stop
    and best-checkpoint bookkeeping, the per-epoch history and every random state (torch, numpy,
    Python, the loader's shuffling generator, each random transform), so a run killed mid-fold
    continues exactly where it stopped. Loaded with ``weights_only=True``: it holds only tensors
    and plain containers. With several processes every rank's random states are gathered into
    the checkpoint (``rank_rng``), rank 0 writes it, and on resume rank 0 reads it and sends it
    to the others.

    >>> state = TrainingState(fold_dir / "checkpoint.pt", trainer, evaluator, augment, generator)  # doctest: +SKIP
    >>> state.attach(trainer); state.restore()   # restore() is a no-op when no checkpoint exists  # doctest: +SKIP
    """

    def __init__(self, path, trainer, evaluator, augment, generator: torch.Generator | None, history=None):
        self.path = Path(path)
        self.trainer, self.evaluator, self.generator, self.history = trainer, evaluator, generator, history
        self.random_transforms = _randomizables(augment) if augment is not None else []

    def attach(self, trainer) -> None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def _handlers(self):
        handlers = getattr(self.evaluator, "_handlers_for_resume", {}) if self.evaluator else {}
        return handlers.get("early_stop"), handlers.get("best_checkpoint")

    def _rng_state(self) -> dict:
        import random

        return {
            "torch": torch.get_rng_state(),
            "numpy": _np_state_to_torch(np.random.get_state()),
            "python": random.getstate(),
            "loader": self.generator.get_state() if self.generator is not None else torch.zeros(0),
            "transforms": [_np_state_to_torch(r.R.get_state()) for r in self.random_transforms],
        }

    def state_dict(self) -> dict:
        """The whole state; with several processes call it on rank 0 while the others call
        :meth:`save` (it gathers every rank's random states)."""
        t = self.trainer
        early, best = self._handlers()
        rng = self._rng_state()
        extra = {"rank_rng": dist.all_gather_object(rng)} if dist.world_size() > 1 else {}
        return {
            "model": dist.unwrap(t.network).state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.optimizer_scheduler.state_dict(),
            "scaler": t.scaler.state_dict() if getattr(t, "scaler", None) is not None else {},
            "engine": {"epoch": t.state.epoch, "iteration": t.state.iteration, "max_epochs": t.state.max_epochs,
                       "finished": bool(t.should_terminate or t.state.epoch >= t.state.max_epochs)},
            "evaluator": {"best_metric": float(getattr(self.evaluator.state, "best_metric", -1.0)),
                          "best_metric_epoch": int(getattr(self.evaluator.state, "best_metric_epoch", -1))}
            if self.evaluator else {},
            "early_stop": {"counter": early._handler.counter,
                           "best_score": early._handler.best_score} if early is not None else {},
            "best_checkpoint": [[float(p), str(f)] for p, f in best._key_metric_checkpoint._saved]
            if best is not None and best._key_metric_checkpoint is not None else [],
            "history": list(self.history.rows) if self.history else [],
            "rng": rng,
            **extra,
        }

    def save(self, engine=None) -> None:
        import io

        from petmonai.runs import atomic_write_bytes

        if not dist.is_main():  # send this rank's random states to rank 0, which writes
            dist.all_gather_object(self._rng_state())
            return
        state = self.state_dict()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())

    def restore(self) -> bool:
        """Load the checkpoint if there is one; returns True when training had already finished."""
        import io
        import random

        if dist.world_size() > 1:
            data = dist.read_on_main(self.path)
            if data is None:
                return False
            source = io.BytesIO(data)
        elif not self.path.is_file():
            return False
        else:
            source = str(self.path)
        try:
            s = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as err:
            raise PetmonaiError(f"{self.path}: cannot load resumable checkpoint ({type(err).__name__}: {err})") from None
        t = self.trainer
        dist.unwrap(t.network).load_state_dict(s["model"])
        t.optimizer.load_state_dict(s["optimizer"])
        t.optimizer_scheduler.load_state_dict(s["scheduler"])
        if s["scaler"]:
            t.scaler = torch.amp.GradScaler("cuda")
            t.scaler.load_state_dict(s["scaler"])
        t.state.iteration = s["engine"]["iteration"]
        t.state.epoch = s["engine"]["epoch"]
        t.state.max_epochs = s["engine"]["max_epochs"]
        if self.evaluator is not None and s["evaluator"]:
            self.evaluator.state.best_metric = s["evaluator"]["best_metric"]
            self.evaluator.state.best_metric_epoch = s["evaluator"]["best_metric_epoch"]
        early, best = self._handlers()
        if early is not None and s["early_stop"]:
            early._handler.counter = s["early_stop"]["counter"]
            early._handler.best_score = s["early_stop"]["best_score"]
        if best is not None and best._key_metric_checkpoint is not None:
            from ignite.handlers.checkpoint import Checkpoint

            best._key_metric_checkpoint._saved = [Checkpoint.Item(p, f) for p, f in s["best_checkpoint"]]
        if self.history is not None:
            self.history.rows = list(s["history"])
        rng = s["rng"]
        per_rank = s.get("rank_rng") or []
        other_world = len(per_rank) != dist.world_size() and (dist.world_size() > 1 or bool(per_rank))
        if dist.world_size() > 1 and not other_world:
            rng = per_rank[dist.rank()]
        elif other_world:
            logging.getLogger(f"{LOGGER_NAME}.engine").warning(
                "%s was written by %d process(es), resumed with %d: random augmentation differs from an "
                "uninterrupted run", self.path, max(1, len(per_rank)), dist.world_size())
        torch.set_rng_state(rng["torch"])
        np.random.set_state(_np_state_from_torch(rng["numpy"]))
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))
        if self.generator is not None and rng["loader"].numel():
            self.generator.set_state(rng["loader"])
        for transform, state in zip(self.random_transforms, rng["transforms"]):
            transform.R.set_state(_np_state_from_torch(state))
        if other_world and dist.rank() > 0:  # rank 0's states restored: the other ranks draw other numbers
            for i, transform in enumerate(self.random_transforms):
                transform.set_random_state(seed=(int(t.state.epoch) * 7919 + dist.RANK_SEED_STRIDE * dist.rank() + i)
                                           % 2**32)
        return bool(s["engine"]["finished"])
