"""``aropd fit|validate`` — LightningCLI over the distillation module and the privileged data."""

from __future__ import annotations

import os
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from aropd.checkpointing import ResumableCheckpoint, is_sharded_checkpoint, unreadable_checkpoint_reason
from aropd.data import PrivilegedDataModule
from aropd.experiments.runs import fit_end, write_fit_end
from aropd.module import StudentModule
from aropd.precheck import DEFAULT_CLASSES, LINKS

# `--ckpt_path` values that Lightning resolves itself rather than naming a file.
_SPECIAL_CKPT_PATHS = {"last", "best", "hpc", "registry"}


class AropdCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Subclass mode keeps `model.init_args.*` paths for sweeps; these defaults let a suite or
        # recipe config stand alone without naming the classes again.
        parser.set_defaults({group: {"class_path": path} for group, path in DEFAULT_CLASSES.items()})
        for source, target in LINKS:  # values that must stay equal
            parser.link_arguments(source, target)
        parser.add_argument(
            "--cpu_threads", type=int | None, default=None,
            help="torch intra-op threads on CPU (null: torch's default). Tiny models decode fastest with 1: "
            "per-token ops are too small to split, and spinning OpenMP threads stall on a shared machine.",
        )

    def _parse_ckpt_path(self) -> None:
        # Lightning would merge the checkpoint's saved hyperparameters over the parsed config, so an
        # option given on the command line (`--model.init_args.val_max_new_tokens`) was silently
        # replaced by the training run's value. A checkpoint gives weights and training state only;
        # options come from the config and the command line. The file is checked here instead, so a
        # wrong one fails before any model or data is loaded.
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if _local_ckpt_path(ckpt_path):
            if not Path(ckpt_path).exists():
                raise FileNotFoundError(f"--ckpt_path: no such checkpoint: {ckpt_path}")
            if not is_sharded_checkpoint(ckpt_path):
                _read_checkpoint(ckpt_path)

    def before_instantiate_classes(self) -> None:
        threads = self._get(self.config, "cpu_threads")
        if threads:
            torch.set_num_threads(threads)
        # Model paths first: a typo or a hub id without network fails in a second, naming the option,
        # before the module loads anything (a teacher is otherwise loaded only when training starts).
        from aropd.models import check_model_source

        for option, name in _model_sources(self._get(self.config, "model")):
            check_model_source(name, option)

    def instantiate_trainer(self, **kwargs):
        # `--ckpt_path last` needs last.ckpt in a folder that outlives the logger version: unless the
        # config names a ModelCheckpoint, Lightning's default one becomes aropd's ResumableCheckpoint
        # (<default_root_dir>/checkpoints/last.ckpt, written atomically).
        configured = list(self._get(self.config_init, "trainer", default={}).get("callbacks") or [])
        trainer = super().instantiate_trainer(**kwargs)  # (Lightning extends that config list in place)
        if not any(isinstance(c, ModelCheckpoint) for c in configured):
            trainer.callbacks[:] = [
                ResumableCheckpoint() if type(c) is ModelCheckpoint else c for c in trainer.callbacks
            ]
        return trainer

    def before_fit(self) -> None:
        self._check_before_run("fit")

    def before_validate(self) -> None:
        self._check_before_run("validate")

    def _check_before_run(self, stage: str) -> None:
        # Before the trainer runs: its logger creates lightning_logs/version_N and SaveConfigCallback
        # writes config.yaml ahead of the datamodule's setup, so a bad checkpoint or a bad record would
        # otherwise leave an empty run folder behind. The datamodule's setup is idempotent: the
        # trainer's own call then reuses what was built here.
        path = self._resolve_ckpt_path(self._get(self.config_init, "ckpt_path"))
        if path is not None and not is_sharded_checkpoint(path):
            ckpt = _read_checkpoint(path)
            _check_method(ckpt, path, type(self.model))
            _check_lora(ckpt, path, self.model.hparams.get("lora"))
            _check_student_shapes(ckpt, path, self.model.hparams.get("student"))
        if self.datamodule is not None:
            from aropd.sft import SupervisedFineTuning

            trace = getattr(self.datamodule, "teacher_trace", "reference")
            if stage == "fit" and trace != "reference" and isinstance(self.model, SupervisedFineTuning):
                # SFT never reads the teacher views, so the control would silently do nothing
                raise ValueError(f"data.init_args.teacher_trace {trace!r} does nothing with SFT (it has no teacher)")
            self.datamodule.setup(stage)

    def _resolve_ckpt_path(self, ckpt_path: Any) -> str | None:
        if str(ckpt_path) != "last":
            return str(ckpt_path) if _local_ckpt_path(ckpt_path) else None
        # As Lightning resolves "last": the newest last*.ckpt its checkpoint callbacks know of.
        found = set()
        for cb in self.trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                found |= cb._find_last_checkpoints(self.trainer)
        return max(found, key=os.path.getmtime) if found else None

    def after_fit(self) -> None:
        log_dir = self.trainer.log_dir  # a collective under distributed strategies: every rank asks
        if self.trainer.is_global_zero:
            write_fit_end(Path(log_dir), fit_end(self.trainer))
            print(f"TensorBoard logs: {log_dir}  (tensorboard --logdir {log_dir})")


def _local_ckpt_path(ckpt_path: Any) -> bool:
    """A checkpoint named by a local path (not one Lightning resolves, nor a remote fsspec URL)."""
    return bool(ckpt_path) and str(ckpt_path) not in _SPECIAL_CKPT_PATHS and "://" not in str(ckpt_path)


def _model_sources(model_config: Any) -> list[tuple[str, str]]:
    """(option, path) of every model the configured module will load: the student, a separate teacher."""
    init = (model_config or {}).get("init_args") or {}
    sources = []
    if isinstance(init.get("student"), str):
        sources.append(("model.init_args.student", init["student"]))
    teacher = init.get("teacher")
    teacher_init = (teacher.get("init_args") if hasattr(teacher, "get") else None) or {}
    if isinstance(teacher_init.get("model"), str):
        sources.append(("model.init_args.teacher.init_args.model", teacher_init["model"]))
    return sources


def _read_checkpoint(path) -> dict[str, Any]:
    """The checkpoint's contents, memory-mapped (the tensors are not read), or an error naming the file."""
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError:
            if not zipfile.is_zipfile(path):
                raise
            # A whole archive holding objects beyond tensors and plain types: the trainer unpickles it
            # in full when it restores, so reading it so here trusts it no further.
            ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise ValueError(f"--ckpt_path {path}: {unreadable_checkpoint_reason(path, e)}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        keys = sorted(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"--ckpt_path {path}: a torch file but not a Lightning checkpoint (no 'state_dict'; holds {keys}); "
            "expected a checkpoint written by `aropd fit`"
        )
    return ckpt


def _check_method(ckpt: dict[str, Any], path, configured: type) -> None:
    """The configured module class must be the one that trained: the module's class is an option like
    any other (not taken from the checkpoint), and another method's state would not load (an
    SFT checkpoint has no teacher for PrivilegedDistillation)."""
    trained = (ckpt.get("hyper_parameters") or {}).get("_class_path")
    name = f"{configured.__module__}.{configured.__qualname__}"
    if trained and trained != name:
        raise ValueError(
            f"--ckpt_path {path} was trained by {trained}, but the config's model is {name}: "
            f"pass `--model {trained}` (or the method config it was trained with)"
        )


def _check_lora(ckpt: dict[str, Any], path, configured: Any) -> None:
    """A LoRA checkpoint needs the LoRA options to load (its adapters have no place otherwise), and the
    other way round; the adapters' shapes are then compared by Lightning's strict load."""
    from aropd.lora import is_adapter_key

    adapted = any(is_adapter_key(k) for k in ckpt["state_dict"])
    if adapted and configured is None:
        raise ValueError(f"--ckpt_path {path} holds a LoRA adapter, but the config trains no adapter: "
                         "compose the LoRA options it was trained with (e.g. --config configs/peft/lora.yaml), "
                         "or export the merged model with `aropd-merge` and validate that")
    if configured is not None and not adapted:
        raise ValueError(f"--ckpt_path {path} holds no LoRA adapter, but the config sets model.init_args.lora: "
                         "drop the LoRA options to load a fully fine-tuned checkpoint")


def _check_student_shapes(ckpt: dict[str, Any], path, student: str | None) -> None:
    """The checkpoint's student weights must fit the configured student, name for name, shape for shape.

    Adapter weights are left out; a LoRA checkpoint without its frozen base (unsharded) has nothing to compare.
    """
    from aropd.lora import is_adapter_key

    # (peft keeps an adapted layer's own weight as `<layer>.base_layer.weight`)
    saved = {k[len("student."):].replace(".base_layer.", "."): tuple(v.shape) for k, v in ckpt["state_dict"].items()
             if k.startswith("student.") and not is_adapter_key(k)}
    if not saved or not student:
        return
    try:
        expected = _causal_lm_shapes(student)
    except Exception:
        return  # no meta-device build for this architecture: Lightning's strict load still compares
    missing = sorted(expected.keys() - saved.keys())
    extra = sorted(saved.keys() - expected.keys())
    differ = sorted(k for k in expected.keys() & saved.keys() if expected[k] != saved[k])
    if not (missing or extra or differ):
        return
    details = [f"{k}: {saved[k]} in the checkpoint, {expected[k]} configured" for k in differ[:3]]
    details += [f"{len(missing)} parameters missing from the checkpoint (e.g. {missing[0]})"] if missing else []
    details += [f"{len(extra)} checkpoint parameters the student lacks (e.g. {extra[0]})"] if extra else []
    raise ValueError(
        f"--ckpt_path {path} holds a different model than model.init_args.student={student!r}: "
        + "; ".join(details)
        + ". Set model.init_args.student to the model the checkpoint was trained from."
    )


def _causal_lm_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of ``name``'s architecture, built on the meta device (no weights read)."""
    from aropd.models import meta_causal_lm

    return {k: tuple(v.shape) for k, v in meta_causal_lm(name).state_dict().items()}


# How every aropd command line is parsed (``aropd`` and ``aropd-prompts``).
CLI_KWARGS: dict = dict(
    subclass_mode_model=True,
    subclass_mode_data=True,
    seed_everything_default=0,
    # `--trainer.max_step 5` must be an error, not silently `max_steps`.
    parser_kwargs={"allow_abbrev": False},
    auto_configure_optimizers=False,
)


# 128 + SIGTERM, the status a shell gives a process the signal ended.
SIGTERM_EXIT = 143


def main(args: list[str] | None = None) -> AropdCLI:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        return AropdCLI(StudentModule, PrivilegedDataModule, save_config_kwargs={"overwrite": True}, args=args,
                        **CLI_KWARGS)
    except SIGTERMException as e:
        # Lightning stops a fit on SIGTERM with a SystemExit that carries no code, so a run a scheduler
        # preempted would exit 0 and look finished to whatever launched it.
        print(f"aropd: stopped by SIGTERM; exit status {SIGTERM_EXIT}", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT) from e


if __name__ == "__main__":
    from aropd.console import entry

    entry()
