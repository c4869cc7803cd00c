"""Multi-process training through :mod:`ignite.distributed` (DDP), launched by ``torchrun``.

    torchrun --nproc_per_node=8 scripts/train3d.py --data-root DATA      # one node, 8 GPUs
    torchrun --nproc_per_node=2 scripts/train3d.py --device cpu ...     # 2 CPU processes (gloo)

The training command runs unchanged: when ``WORLD_SIZE`` > 1 in the environment (torchrun sets
it) :func:`run_parallel` opens an ``idist.Parallel`` process group (``nccl`` on CUDA, ``gloo`` on
CPU) and every process runs the same command. Within it:

- the processes split the scans and preprocess each once into the shared on-disk volume cache
  (``data.cache_dir``, one folder every process sees; :func:`petmonai.training.build_cache`); then
  each holds every volume (``data.cache: memory``) or reads them from disk per step (``disk``);
- the training scans of an epoch are shuffled
  identically on every rank and split between them (:class:`DistributedBatchSampler`): every
  scan once per epoch across ranks, the same number of steps on every rank;
- the model is wrapped in ``DistributedDataParallel`` (gradients averaged over ranks);
  ``train.batch_size`` is per process, so N processes train with an N times larger batch;
- validation and test scans are split between ranks without padding duplicates, and the
  predictions and metrics are gathered (MONAI's ``ROCAUC`` all-gathers its buffers), so every
  rank takes the same early-stopping and checkpoint decisions;
- only rank 0 writes files (run folder, config, checkpoints, TensorBoard, history, predictions,
  metrics, report) and reads the run folder back (resume), sending what it read to the others,
  so the run folder need not be shared between nodes; the data must be at the same path on
  every node.

In a single process every function here is a no-op or the identity.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from petmonai.errors import PetmonaiError

#: per-rank offset of the augmentation seed, so ranks draw different random transforms
RANK_SEED_STRIDE = 10_000


#: with this variable set to a folder, every rank appends what it trained and validated on to
#: ``<folder>/rank<k>.jsonl`` (a debugging and test hook; see tests/test_distributed.py)
TRACE_ENV = "PETMONAI_TRACE_DIR"


def launched_distributed() -> bool:
    """True in a process started by torchrun (or any launcher setting ``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def world_size() -> int:
    import ignite.distributed as idist

    return idist.get_world_size()


def rank() -> int:
    import ignite.distributed as idist

    return idist.get_rank()


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        import ignite.distributed as idist

        idist.barrier()


def backend_for(device_name: str | None) -> str:
    """``nccl`` when training on CUDA, else ``gloo``."""
    wants_cuda = (device_name or "auto") != "cpu" and torch.cuda.is_available()
    return "nccl" if wants_cuda and torch.distributed.is_nccl_available() else "gloo"


def run_parallel(device_name: str | None, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; under torchrun inside an ``idist.Parallel`` process group.

    Every rank returns ``fn``'s result after a final barrier (rank 0 finishes writing first)."""
    if not launched_distributed():
        return fn(*args, **kwargs)
    import ignite.distributed as idist

    result = {}

    def worker(local_rank: int) -> None:
        result["value"] = fn(*args, **kwargs)
        barrier()

    with idist.Parallel(backend=backend_for(device_name)) as parallel:
        parallel.run(worker)
    return result.get("value")


def local_device(device: torch.device) -> torch.device:
    """This process's GPU (``cuda:LOCAL_RANK``) under torchrun; the device unchanged otherwise."""
    if device.type != "cuda" or world_size() == 1:
        return device
    import ignite.distributed as idist

    device = torch.device("cuda", idist.get_local_rank())
    torch.cuda.set_device(device)
    return device


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled; the identity in one process)."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only; every rank gets its result, or raises its error.

    For the steps that touch the file system (run folder, data discovery, reading the run back)."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    payload, error = None, None
    if is_main():
        try:
            payload = ("ok", fn(*args, **kwargs))
        except BaseException as err:  # sent to the other ranks, then raised here as it was
            message = str(err) if isinstance(err, PetmonaiError) else f"{type(err).__name__}: {err}"
            payload, error = ("error", message), err
    payload = broadcast_object(payload)
    if error is not None:
        raise error
    if payload[0] == "error":
        raise PetmonaiError(f"rank 0 failed: {payload[1]}")
    return payload[1]


def read_on_main(path: str | Path) -> bytes | None:
    """A file's bytes as rank 0 reads them (``None`` when it is not there), on every rank."""
    def read():
        p = Path(path)
        return p.read_bytes() if p.is_file() else None

    return on_main(read)


def shard(items: list, world: int | None = None, this_rank: int | None = None) -> list:
    """This rank's share of ``items`` (every ``world``-th item from position ``rank``)."""
    world = world_size() if world is None else world
    this_rank = rank() if this_rank is None else this_rank
    return list(items)[this_rank::world]


def unshard(parts: list[list]) -> list:
    """Inverse of :func:`shard`: ``[shard(x, W, 0), ..., shard(x, W, W-1)]`` -> ``x``."""
    out = [None] * sum(len(p) for p in parts)
    for r, part in enumerate(parts):
        out[r::len(parts)] = part
    return out


def gather_sharded(values) -> list:
    """Per-rank results over :func:`shard` of a list, put back in the list's order on every rank."""
    return unshard([list(p) for p in all_gather_object(list(values))])


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside ``torch.compile`` and ``DistributedDataParallel`` wrappers."""
    for _ in range(4):
        if hasattr(net, "_orig_mod"):
            net = net._orig_mod
        elif isinstance(net, torch.nn.parallel.DistributedDataParallel):
            net = net.module
        else:
            break
    return net


def wrap_ddp(net: torch.nn.Module, device: torch.device, sync_bn: bool = False) -> torch.nn.Module:
    """``DistributedDataParallel(net)`` when there are several processes, else ``net`` itself.

    (Not ``idist.auto_model``: that moves the model to a GPU whenever one is visible, even for a
    ``--device cpu`` run.) ``sync_bn`` (CUDA only) computes batch-norm statistics over the
    batches of all ranks, as one process with the combined batch would."""
    if world_size() == 1:
        return net
    if sync_bn and device.type == "cuda":
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids, output_device=device.index if ids else None)


@torch.no_grad()
def broadcast_module(net: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``net``."""
    if world_size() == 1:
        return
    for tensor in unwrap(net).state_dict().values():
        torch.distributed.broadcast(tensor, src=src)


@torch.no_grad()
def broadcast_buffers(net: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s batch-norm running statistics on every rank (DDP keeps the weights equal,
    but each rank's last training step updates its own running statistics)."""
    if world_size() == 1:
        return
    for buffer in unwrap(net).buffers():
        torch.distributed.broadcast(buffer, src=src)


def state_digest(net: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(unwrap(net).state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu()
        h.update(f"{tuple(t.shape)} {t.dtype}".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DistributedBatchSampler:
    """Batches of one rank: every sample exactly once per epoch across ranks, the same number of
    batches on every rank (DDP needs that), no padding with repeated samples.

    Each epoch the indices are shuffled with ``seed + epoch`` (the same order on every rank), cut
    into near-equal global batches of about ``batch_size * world`` and each global batch is dealt
    out to the ranks, so per-rank batches differ by at most one sample. Batches of one sample
    (batch norm cannot train on them) are avoided by taking fewer, larger global batches.
    """

    def __init__(self, n: int, batch_size: int, world: int, this_rank: int, seed: int = 0, shuffle: bool = True):
        if n < 2 * world:
            raise PetmonaiError(f"{n} training scans cannot be split between {world} processes "
                                "(at least 2 per process per step); use fewer processes")
        self.n, self.batch_size, self.world, self.rank = n, int(batch_size), world, this_rank
        self.seed, self.shuffle, self.epoch = int(seed), shuffle, 0
        steps = max(1, math.ceil(n / (self.batch_size * world)))
        while steps > 1 and n // steps < 2 * world:
            steps -= 1
        self.steps = steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self) -> list[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        out, start = [], 0
        for s in range(self.steps):
            size = self.n // self.steps + (s < self.n % self.steps)
            out.append(order[start:start + size])
            start += size
        return out

    def __iter__(self):
        for batch in self.global_batches():
            yield batch[self.rank::self.world]

    def __len__(self) -> int:
        return self.steps


class RankTrace:
    """Appends JSON lines of what this rank trained and validated on (``PETMONAI_TRACE_DIR``)."""

    def __init__(self, folder: str | Path, tag: dict):
        self.path = Path(folder) / f"rank{rank()}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tag = tag

    @classmethod
    def from_env(cls, tag: dict) -> RankTrace | None:
        folder = os.environ.get(TRACE_ENV)
        return cls(folder, tag) if folder else None

    def record(self, event: str, **data) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"rank": rank(), "world": world_size(), **self.tag, "event": event, **data}) + "\n")

    def attach(self, trainer, evaluator=None) -> None:
        from ignite.engine import Events

        def batch_ids(engine) -> list[str]:
            batch = engine.state.batch
            if isinstance(batch, dict):
                return [str(s) for s in batch["scan_id"]]
            return [str(item["scan_id"]) for item in batch]

        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.record(
            "train_batch", epoch=e.state.epoch, scan_ids=batch_ids(e)))
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: self.record(
            "epoch_end", epoch=e.state.epoch, digest=state_digest(e.network)))
        if evaluator is None:
            return
        seen: list[dict] = []

        def val_batch(engine) -> None:
            ids = batch_ids(engine)
            for sid, out in zip(ids, engine.state.output):
                pred = torch.as_tensor(out["pred"]).float()
                seen.append({"scan_id": sid, "prob_mci": float(torch.softmax(pred, 0)[1]), "label": int(out["label"])})

        def val_done(engine) -> None:
            self.record("val", epoch=trainer.state.epoch, val_auc=engine.state.metrics.get("val_auc"), items=list(seen))
            seen.clear()

        evaluator.add_event_handler(Events.ITERATION_COMPLETED, val_batch)
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, val_done)
