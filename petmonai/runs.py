"""Run folders: atomic file writes, provenance, logging.

Everything a run writes goes through :func:`atomic_write_text` / :func:`atomic_write_csv`
(temporary file in the same folder, then ``os.replace``), so a crash never leaves a
half-written file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from petmonai.errors import PetmonaiError

LOGGER_NAME = "petmonai"
_UMASK = os.umask(0)
os.umask(_UMASK)


def cache_root() -> Path:
    """Where petmonai keeps what it can rebuild (synthetic cohorts, registrations):
    ``$PETMONAI_CACHE``, else ``~/.cache/petmonai``."""
    return Path(os.environ.get("PETMONAI_CACHE") or Path.home() / ".cache" / "petmonai").expanduser()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def staged_folder(output: str | Path):
    """A folder written whole or not at all: the block fills a temporary folder beside ``output``,
    which then replaces ``output`` (an earlier one goes only once the new one is in); on an error
    the temporary folder is removed and ``output`` is as it was.

    >>> import tempfile
    >>> with staged_folder(Path(tempfile.mkdtemp()) / "out") as tmp:
    ...     _ = (tmp / "a.txt").write_text("a")
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.partial-"))
    try:
        yield tmp
        old = output.parent / f".{output.name}.replaced-{os.getpid()}-{time.time_ns()}"
        if output.exists():
            output.rename(old)
        try:
            tmp.rename(output)
        except BaseException:
            if old.exists():
                old.rename(output)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_write_csv(path: str | Path, df: pd.DataFrame) -> Path:
    return atomic_write_text(path, df.to_csv(index=False))


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def refuse_nonempty_folder(path: Path, overwrite: bool) -> None:
    """The error for an output folder that exists and holds files, unless ``overwrite``."""
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise PetmonaiError(f"{path}: exists and is not empty; choose a new folder or pass --overwrite")


def timestamped_dir(prefix: str, root: str | Path = "runs") -> Path:
    """``runs/<prefix>-<YYYYmmdd-HHMMSS>``: a command's output folder when none is given."""
    return Path(root) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(path: str | Path | None, prefix: str = "train3d", overwrite: bool = False,
                    root: str | Path = "runs") -> Path:
    """Create the run folder. An existing non-empty folder is an error unless ``overwrite``."""
    if path is None:
        path = timestamped_dir(prefix, root)
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise PetmonaiError(f"{path}: run folder exists and is not empty; pass --overwrite to replace it "
                                "or --output-dir to choose another")
        # set aside, not deleted: if the new run stops on a user error before it starts, it comes back
        backup = replaced_run_path(path)
        if backup.exists():
            shutil.rmtree(backup)
        path.rename(backup)
    path.mkdir(parents=True, exist_ok=True)
    return path


def replaced_run_path(path: str | Path) -> Path:
    """Where ``--overwrite`` keeps the earlier run folder until the new run has finished."""
    path = Path(path)
    return path.parent / f".{path.name}.replaced"


def settle_replaced_run(path: str | Path, restore: bool) -> bool:
    """The earlier run that ``--overwrite`` set aside: put back (``restore``, after a new run that
    never started) or deleted (after a finished one). True when there was one."""
    path, backup = Path(path), replaced_run_path(path)
    if not backup.exists():
        return False
    if restore:
        shutil.rmtree(path, ignore_errors=True)
        backup.rename(path)
    else:
        shutil.rmtree(backup, ignore_errors=True)
    return True


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def versions() -> dict:
    import ignite
    import monai
    import nibabel
    import numpy
    import sklearn
    import torch

    import petmonai

    return {
        "petmonai": petmonai.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "pytorch-ignite": ignite.__version__,
        "numpy": numpy.__version__,
        "nibabel": nibabel.__version__,
        "pandas": pd.__version__,
        "scikit-learn": sklearn.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def provenance(seed: int, data_fingerprint: str | None, extra: dict | None = None) -> dict:
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "seed": seed,
        "git_commit": git_commit(),
        "data_fingerprint_sha256": data_fingerprint,
        "versions": versions(),
        **(extra or {}),
    }


RUN_TEMPLATE_STEM = "template"  # a run's copy of its own template file: template.nii(.gz)


def keep_template_copy(cfg: dict, run_dir: str | Path) -> Path | None:
    """A config that registers to a template file of its own (``template.image``): copy the file
    into the run folder and point ``cfg`` at the copy, so predict, resume and report use the
    template the models were trained with, wherever the run folder moves. Returns the copy."""
    source = cfg["template"]["image"]
    if not source:
        return None
    source = Path(source).expanduser()
    if not source.is_file():
        raise PetmonaiError(f"{source}: template.image not found")
    suffix = ".nii.gz" if source.name.endswith(".gz") else ".nii"
    copy = Path(run_dir) / f"{RUN_TEMPLATE_STEM}{suffix}"
    atomic_write_bytes(copy, source.read_bytes())
    cfg["template"]["image"] = str(copy.resolve())
    return copy


def read_run_config(run_dir: str | Path) -> dict:
    """A run folder's saved ``config.yaml``, validated, with ``template.image`` on the folder's own
    copy of its template (:func:`keep_template_copy`) if it has one: every command that works on a
    finished run (predict, resume, report) reads its config here.

    The config is checked as one from elsewhere before anything is built from it
    (:func:`petmonai.trust.check_config`: ``--allow-module`` / ``--trust-config``), and a folder
    whose files no longer match the hashes the run recorded gets a warning (:func:`warn_if_changed`)."""
    from petmonai.config import load_config

    run_dir = Path(run_dir)
    path = _run_config_path(run_dir)
    warn_if_changed(run_dir)
    cfg = load_config(path, own=False)
    if cfg["template"]["image"]:
        for suffix in (".nii.gz", ".nii"):
            copy = run_dir / f"{RUN_TEMPLATE_STEM}{suffix}"
            if copy.is_file():
                cfg["template"]["image"] = str(copy.resolve())
    return cfg


# the console shows a run's course, train.log its details: the per-epoch lines of the training engines
# (MONAI's StatsHandler: "Epoch[3] Metrics -- ...", "Key metric: ... best value ...") and any record
# logged with ``extra=FILE_ONLY`` go to train.log only; warnings and errors go to both
FILE_ONLY = {"console": False}
DETAIL_LOGGERS = (f"{LOGGER_NAME}.engine",)


class ConsoleFilter(logging.Filter):
    """Passes a record to the console unless it is a detail (see :data:`FILE_ONLY`) below WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if getattr(record, "console", True) is False:
            return False
        return not any(record.name == n or record.name.startswith(n + ".") for n in DETAIL_LOGGERS)


def _run_config_path(run_dir: Path) -> Path:
    if not run_dir.is_dir():
        raise PetmonaiError(f"{run_dir}: run folder not found")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise PetmonaiError(f"{run_dir}: no config.yaml; is this a training run folder?")
    return path


def check_run_folder(run_dir: str | Path) -> None:
    """What :func:`read_run_config` checks, for a command that reads a run folder without building
    its config (the report): the trust check of its ``config.yaml`` (if it has one) and the
    recorded hashes."""
    from petmonai.config import read_yaml, upgrade_legacy_names
    from petmonai.trust import check_config

    run_dir = Path(run_dir)
    warn_if_changed(run_dir)
    path = run_dir / "config.yaml"
    if path.is_file():
        check_config(upgrade_legacy_names(read_yaml(path)), path, own=False)


# tamper evidence: provenance.json records the sha256 of config.yaml as written and of each fold's
# kept checkpoint; predict, report and resume warn when the folder no longer matches
CONFIG_HASH_KEY = "config_sha256"
CHECKPOINT_HASHES_KEY = "checkpoints_sha256"
_HASHED: dict[tuple, str] = {}
_WARNED: set[tuple[str, str]] = set()


def sha256_file(path: str | Path) -> str:
    """The file's SHA-256 (hex), remembered per path, size and modification time."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


def forget_file_hashes() -> None:
    """Forget the SHA-256 digests :func:`sha256_file` remembered (a benchmark timing a first read)."""
    _HASHED.clear()


def sha256_text(text: str) -> str:
    """The SHA-256 (hex) of ``text`` as :func:`atomic_write_text` writes it (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def record_checkpoint_hash(run_dir: str | Path, checkpoint: str | Path) -> None:
    """Add ``checkpoint``'s SHA-256 to the run's ``provenance.json`` (under its path in the folder)."""
    run_dir = Path(run_dir)
    path = run_dir / "provenance.json"
    prov = json.loads(path.read_text()) if path.is_file() else {}
    hashes = dict(prov.get(CHECKPOINT_HASHES_KEY) or {})
    hashes[Path(checkpoint).relative_to(run_dir).as_posix()] = sha256_file(checkpoint)
    atomic_write_json(path, {**prov, CHECKPOINT_HASHES_KEY: dict(sorted(hashes.items()))})


def changed_run_files(run_dir: str | Path) -> list[str]:
    """The run's files that differ from the hashes its ``provenance.json`` recorded (config.yaml,
    kept checkpoints), each as ``name (what)``; a run that recorded none gives none."""
    run_dir = Path(run_dir)
    try:
        prov = json.loads((run_dir / "provenance.json").read_text())
    except (OSError, ValueError):
        return []
    recorded = {"config.yaml": prov.get(CONFIG_HASH_KEY), **(prov.get(CHECKPOINT_HASHES_KEY) or {})}
    changed = []
    for name, digest in recorded.items():
        if not digest:
            continue
        path = run_dir / name
        if not path.is_file():
            changed.append(f"{name} (missing)")
        elif sha256_file(path) != digest:
            changed.append(f"{name} (changed)")
    return changed


def warn_if_changed(run_dir: str | Path) -> list[str]:
    """Log a warning (once per file) when the run folder no longer matches what the run wrote."""
    changed = changed_run_files(run_dir)
    new = [c for c in changed if (str(Path(run_dir).resolve()), c) not in _WARNED]
    if new:
        _WARNED.update((str(Path(run_dir).resolve()), c) for c in new)
        get_logger("runs").warning(
            "%s does not match what its run wrote (provenance.json): %s; the folder was edited or replaced after "
            "training, so it may not be the run it says it is", run_dir, ", ".join(new))
    return changed


def setup_logging(run_dir: str | Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """Logging for the ``petmonai`` logger tree: a quiet console (stdout, :class:`ConsoleFilter`) and,
    with ``run_dir``, everything in ``<run_dir>/train.log``."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    console.addFilter(ConsoleFilter())
    logger.addHandler(console)
    if run_dir is not None:
        file_handler = logging.FileHandler(Path(run_dir) / "train.log")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)



# figures: rendered in memory, written atomically
def _new_figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig, path: str | Path) -> Path:
    """PNG rendered in memory, then written atomically (temporary file, rename) with the usual permissions."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


# the run folder's layout: one fold's folder and its files
BEST_CHECKPOINT = "best_model.pt"      # the kept weights of a fold
FOLD_PREDICTIONS = "predictions.csv"   # a fold's test and val predictions
FOLD_RESULT = "fold_result.json"       # written last: the fold is finished
RESUME_CHECKPOINT = "checkpoint.pt"    # resumable state, rewritten every epoch, removed when the fold ends


def fold_dir_name(repeat: int, fold: int) -> str:
    return f"fold_{fold}" if repeat == 0 else f"repeat_{repeat}/fold_{fold}"
