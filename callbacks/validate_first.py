"""``ValidateBeforeTraining``: one validation at step 0, so every run's curve starts at the base model."""

from __future__ import annotations

from typing import Any

import lightning as L


class ValidateBeforeTraining(L.Callback):
    """Runs the fit's validation once before the first training step.

    Lightning validates only after training batches (``val_check_interval``), so a run's
    ``val/<benchmark>/accuracy`` curve starts one interval in, and the base model's point has to be
    found in a separate ``aropd validate``. With this callback the curve has a point at step 0, logged
    like any in-fit validation (every logger, ``val/...`` tags at step 0) and with its results file
    under ``<log_dir>/val/step_0/``. The sanity check cannot stand in: it logs nothing, writes no
    results and stops after ``num_sanity_val_steps`` batches.

    How: Lightning has no public call that validates inside a running ``fit`` (``trainer.validate``
    refuses while fit runs). This uses the route the training loop itself takes between batches:
    ``trainer.fit_loop.epoch_loop.val_loop.run()`` with the trainer's stage switched to validating
    and back, the same two steps as Lightning's ``_TrainingEpochLoop``. Every validation hook runs
    as usual (the diagnostics' figures, LongRolloutAccuracy). No checkpoint is written at step 0:
    ``ModelCheckpoint`` does not save before the first step.

    It does not run when the fit resumes past step 0 (that run has its step-0 point already), when
    the fit has no validation batches, or twice in one fit; whether it ran is its ``state_dict``.
    """

    def __init__(self, enabled: bool = True) -> None:
        """
        Args:
            enabled: Off: the callback does nothing.
        """
        self.enabled = enabled
        self.validated = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or self.validated or trainer.global_step > 0:
            return
        loop = trainer.fit_loop.epoch_loop.val_loop
        trainer.validating = True  # so that trainer._active_loop (and self.log) is the validation loop
        try:
            loop.run()  # sets its data up, and returns at once without validation batches
        finally:
            trainer.training = True
        self.validated = True

    def state_dict(self) -> dict[str, Any]:
        return {"validated": self.validated}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validated = bool(state_dict.get("validated", False))
