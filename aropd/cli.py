"""``aropd fit|validate`` — LightningCLI over the distillation module and the privileged data."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from aropd.checkpointing import ResumableCheckpoint
from aropd.data import PrivilegedDataModule
from aropd.module import StudentModule


class AropdCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Subclass mode keeps `model.init_args.*` paths for sweeps; these defaults let a suite or
        # recipe config stand alone without naming the classes again.
        parser.set_defaults({
            "model": {"class_path": "aropd.module.PrivilegedDistillation"},
            "data": {"class_path": "aropd.data.PrivilegedDataModule"},
        })
        # The data is tokenized for the student and cut to its rollout budget: these must stay equal.
        parser.link_arguments("model.init_args.student", "data.init_args.tokenizer")
        parser.link_arguments("model.init_args.max_new_tokens", "data.init_args.max_new_tokens")
        parser.add_argument(
            "--cpu_threads", type=int | None, default=None,
            help="torch intra-op threads on CPU (null: torch's default). Tiny models decode fastest with 1: "
            "per-token ops are too small to split, and spinning OpenMP threads stall on a shared machine.",
        )

    def before_instantiate_classes(self) -> None:
        threads = self._get(self.config, "cpu_threads")
        if threads:
            torch.set_num_threads(threads)

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

    def after_fit(self) -> None:
        log_dir = self.trainer.log_dir  # a collective under distributed strategies: every rank asks
        if self.trainer.is_global_zero:
            print(f"TensorBoard logs: {log_dir}  (tensorboard --logdir {log_dir})")


def main(args: list[str] | None = None) -> AropdCLI:
    return AropdCLI(
        StudentModule,
        PrivilegedDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        # `--trainer.max_step 5` must be an error, not silently `max_steps`.
        parser_kwargs={"allow_abbrev": False},
        args=args,
        auto_configure_optimizers=False,
    )


def entry() -> None:
    """Console-script entry point (``aropd``): like ``main`` but returns nothing for ``sys.exit``."""
    main()


if __name__ == "__main__":
    entry()
