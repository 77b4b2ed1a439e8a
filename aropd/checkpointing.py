"""Exact resume: atomic checkpoints, a stable ``last.ckpt`` and a training loader that resumes mid-epoch.

What a checkpoint holds, and where from:

- student, EMA teacher (``teacher_model`` is a submodule), optimizer, LR scheduler and loop
  progress (epoch, batch index, global step): Lightning; with a LoRA student, its adapter and EMA
  adapter instead of the frozen base (``StudentModule.on_save_checkpoint``, ``aropd/lora.py``);
- the data position: :class:`ResumableDataLoader` (Lightning saves and restores any train loader
  with ``state_dict``/``load_state_dict``);
- the rollout randomness: nothing to save. Each rollout draws from a stream seeded by
  (run seed, epoch, batch index, rank), and those counters are the loop progress above.

Writes are atomic: a checkpoint is written under a hidden name in the same folder, synced to disk,
and published under its real name in one ``rename`` (a file) or one symlink swap (a sharded
checkpoint folder). A kill at any moment leaves either the previous checkpoint or the new one,
never a torn one; leftovers of an interrupted write are removed by the next publish.
"""

from __future__ import annotations

import os
import pickle
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader


# ---- atomic publish -----------------------------------------------------------------------------
def staging_path(path: Path) -> Path:
    """A hidden sibling of ``path`` to write into before publishing (unique per call)."""
    path = Path(path)
    return path.parent / f".{path.name}.{time.time_ns()}-{os.getpid()}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for root, _, files in os.walk(path):
            for f in files:
                _fsync(Path(root) / f)
            _fsync(Path(root))
    else:
        _fsync(path)


def _is_ours(sibling: Path, name: str) -> bool:
    return sibling.name.startswith(f".{name}.")


def publish(staging: Path, path: Path) -> None:
    """Make the finished ``staging`` (file or folder) visible as ``path`` atomically, then tidy up.

    A file replaces ``path`` with ``os.replace``. A folder is published as a relative symlink
    ``path → .name.<stamp>`` swapped in with ``os.replace`` (a folder cannot replace a folder in
    one step); the folder the old link pointed to is removed afterwards. Loading follows the link.
    """
    staging, path = Path(staging), Path(path)
    _fsync_tree(staging)
    if staging.is_dir():
        if path.is_dir() and not path.is_symlink():  # a plain folder from elsewhere: move it aside first
            os.replace(path, staging_path(path))
        link = path.parent / f".{path.name}.link-{time.time_ns()}-{os.getpid()}"
        os.symlink(staging.name, link)
        os.replace(link, path)
    else:
        os.replace(staging, path)
    _fsync(path.parent)
    # Leftovers: the folder the previous link pointed to, and stagings of interrupted writes.
    current = path.resolve() if path.is_symlink() else None
    for sibling in path.parent.iterdir():
        if _is_ours(sibling, path.name) and sibling != current:
            _remove_path(sibling)


def _remove_path(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    elif p.is_dir():
        shutil.rmtree(p, ignore_errors=True)


def remove(path: Path) -> None:
    """Remove a checkpoint published by :func:`publish` (its link and the folder behind it)."""
    path = Path(path)
    if path.is_symlink():
        target = path.resolve()
        path.unlink()
        if _is_ours(target, path.name):
            _remove_path(target)
    else:
        _remove_path(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes a hidden file, fsyncs it and renames it over the checkpoint.

    Remote (fsspec) paths fall back to the plain write.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_path(path)
        try:
            with open(staging, "wb") as f:
                torch.save(checkpoint, f)
            publish(staging, path)
        except BaseException as e:
            staging.unlink(missing_ok=True)
            os_error = _os_error_in(e)
            if os_error is None:
                raise
            # torch's zip writer turns a failed write (a full disk, a quota) into "[enforce fail at
            # inline_container.cc] unexpected pos", the real cause only chained: surface the cause
            # with the checkpoint it was writing.
            raise OSError(os_error.errno, f"{os_error.strerror or os_error} (writing the checkpoint)", str(path)) from e

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if is_sharded_checkpoint(path):
            return load_sharded_weights(Path(path))
        try:
            if map_location is None:
                return super().load_checkpoint(path, weights_only=weights_only)
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
            # torch names neither the file nor what it expected ("PytorchStreamReader failed reading zip archive").
            raise ValueError(f"{path}: {unreadable_checkpoint_reason(path, e)}") from e

    def remove_checkpoint(self, path) -> None:
        remove(Path(path))


def _os_error_in(e: BaseException) -> OSError | None:
    """The first ``OSError`` with an errno in ``e`` or the exceptions it was raised from or during."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def unreadable_checkpoint_reason(path, error: BaseException) -> str:
    """Why ``path`` could not be read as a checkpoint, in words: what it is, and what was expected."""
    expected = (
        "expected a Lightning checkpoint (a torch zip archive written by `aropd fit`, or a sharded checkpoint folder)"
    )
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(4)
        size = p.stat().st_size
    except OSError as e:
        return f"cannot be read ({e}); {expected}"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(p):
        return (
            f"truncated or damaged: a zip archive without its end ({size} bytes; a copy or a write cut short?); "
            + expected
        )
    if not zipfile.is_zipfile(p):
        return f"not a checkpoint: the file starts with {head!r}, not a zip archive; {expected}"
    first_line = str(error).splitlines()[0] if str(error) else ""
    return f"not a readable checkpoint ({type(error).__name__}: {first_line}); {expected}"


def is_sharded_checkpoint(path) -> bool:
    """A ``torch.distributed.checkpoint`` folder (what ``FSDP2Strategy`` writes), or a link to one."""
    p = Path(path)
    return p.is_dir() and (p / ".metadata").is_file()


def load_sharded_weights(path: Path) -> dict[str, Any]:
    """A sharded checkpoint folder as one process's full checkpoint, weights only.

    Lets a single-process ``aropd validate`` (or ``fit`` from its weights) read what several ranks
    wrote. The optimizer state stays behind: in the folder it is keyed by parameter name, the way
    only a sharded strategy restores it; resume a sharded run with the sharded strategy (any number
    of processes: torch.distributed.checkpoint reshards on load).
    """
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    checkpoint = _load_distributed_checkpoint(path)
    for key in [k for k in checkpoint if k.startswith("optimizer_")]:
        del checkpoint[key]
    return checkpoint


# ---- last.ckpt in one place across runs ---------------------------------------------------------
class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps ``last.ckpt`` in ``<default_root_dir>/checkpoints``, written atomically.

    Lightning's default folder is per logger version (``lightning_logs/version_N/checkpoints``), so a
    resumed run, which logs to version N+1, would not find the last checkpoint. Here the folder is
    stable, so ``aropd fit ... --ckpt_path last`` resumes from the newest ``last*.ckpt`` in it.
    ``aropd fit`` adds this callback when the config has no ``ModelCheckpoint``; it saves after each
    validation (and at the end of each epoch) unless ``every_n_train_steps`` etc. say otherwise.
    By default it writes only ``last.ckpt`` (``save_top_k=0``; a second full copy per save would double
    the disk time of a sharded 8B checkpoint), which is then also ``best_model_path``.
    It also makes the trainer's default ``TorchCheckpointIO`` atomic (:class:`AtomicCheckpointIO`);
    ``aropd.sharding.FSDP2Strategy`` publishes sharded checkpoint folders atomically itself.
    """

    def __init__(
        self,
        dirpath=None,
        save_last: bool = True,
        save_top_k: int = 0,
        every_n_train_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            dirpath: Folder of the checkpoints (None: ``<default_root_dir>/checkpoints``).
            save_last: Keep ``last.ckpt``.
            save_top_k: Ranked copies besides ``last.ckpt`` (0: none, only the latest is kept).
            every_n_train_steps: Save every this many optimizer steps instead of after each
                validation: a cadence independent of how often (or how long) validation runs, which
                bounds the work a preemption loses. Each save replaces ``last.ckpt``, so the folder
                holds one checkpoint however many were saved. None: after each validation.
            kwargs: The rest of ``ModelCheckpoint``'s options.
        """
        super().__init__(dirpath=dirpath, save_last=save_last, save_top_k=save_top_k,
                         every_n_train_steps=every_n_train_steps, **kwargs)

    def _stable_dir(self, trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._stable_dir(trainer)
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    def _save_last_on_epoch_cadence(self, trainer) -> None:
        # Lightning (2.6) writes last.ckpt after a validation or an epoch only when it saved a top-k
        # copy at that step; with save_top_k=0 there is none, so last.ckpt would wait for the end of
        # fit. Save it here instead, on the same conditions Lightning's top-k save has. After a save
        # at this step (by Lightning or the cadence) `_should_skip_saving_checkpoint` is true: one write.
        if (self.save_top_k == 0 and self.save_last and self._every_n_epochs >= 1
                and (trainer.current_epoch + 1) % self._every_n_epochs == 0
                and not self._should_skip_saving_checkpoint(trainer)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_on_epoch_cadence(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_on_epoch_cadence(trainer)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.monitor is None and self.save_top_k == 0 and self.last_model_path:
            # Nothing to rank by: the latest is the "best", as Lightning's default top-1 would have it
            # (so `ckpt_path="best"` and `checkpoint_callback.best_model_path` keep working), one file.
            self.best_model_path = self.last_model_path

    def _find_last_checkpoints(self, trainer) -> set[str]:
        self._stable_dir(trainer)
        return super()._find_last_checkpoints(trainer)


# ---- the data position --------------------------------------------------------------------------
class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position Lightning saves in the checkpoint and restores mid-epoch.

    It counts the batches its current iterator has handed out; after ``load_state_dict`` the next
    iterator skips that many (read and dropped in order, so every sampler and collate function sees
    what it saw before) if it iterates the same epoch, as a resume inside an epoch does. Use a
    sampler whose order is fixed by (seed, epoch), e.g. ``DistributedSampler`` with explicit
    ``num_replicas``/``rank``: Lightning then leaves the sampler alone and sets its epoch before
    the first batch is read. Lightning fetches ahead only from loaders without a length, so the
    count is the number of batches the loop has started.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch, self._handed_out = 0, 0
        self._resume: dict[str, int] | None = None

    def _shuffler(self):
        return getattr(self.batch_sampler, "sampler", None) or self.sampler

    def __iter__(self):
        return self._iterate()

    def _iterate(self):
        # A generator: nothing is read until the first batch is asked for, after Lightning set the epoch.
        self._epoch = int(getattr(self._shuffler(), "epoch", 0))
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume is not None and resume["epoch"] == self._epoch else 0
        self._handed_out = 0
        it = super().__iter__()
        for _ in range(skip):
            if next(it, None) is None:
                return
            self._handed_out += 1
        for batch in it:
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch, done = self._epoch, self._handed_out
        if done >= len(self):  # saved at the end of an epoch: resume at the start of the next one
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state.get("epoch", 0)), "batches": int(state.get("batches", 0))}
