"""``ResumableCheckpoint``'s save cadence: after each validation, or every N optimizer steps, one file kept."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from aropd.checkpointing import ResumableCheckpoint


class Validated(L.LightningModule):
    """A model that validates after every training batch and notes the step of every checkpoint made."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.saved_at: list[int] = []

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(16, 2), batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(2, 2), batch_size=2)

    def training_step(self, batch, batch_idx):
        return (self.w * batch).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/x", (self.w * batch).sum())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_save_checkpoint(self, checkpoint) -> None:
        self.saved_at.append(checkpoint["global_step"])


def _fit(root: Path, ckpt: ResumableCheckpoint, max_steps: int = 4) -> Validated:
    model = Validated()
    L.Trainer(max_steps=max_steps, val_check_interval=1, num_sanity_val_steps=0, accelerator="cpu", logger=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
              callbacks=[ckpt]).fit(model)
    return model


def test_a_step_cadence_keeps_only_the_latest_checkpoint(tmp_path):
    model = _fit(tmp_path, ResumableCheckpoint(every_n_train_steps=2))
    assert model.saved_at == [2, 4]  # on the cadence, not after each of the four validations
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["last.ckpt"]  # each save replaced the previous one; no staging leftovers
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


def test_without_a_cadence_it_saves_after_each_validation(tmp_path):
    # (save_on_train_epoch_end=False: with validation after every batch, Lightning would otherwise
    # take the interval for "once per epoch" and save only at the epoch's end.)
    model = _fit(tmp_path, ResumableCheckpoint(save_on_train_epoch_end=False))
    assert model.saved_at == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]


def test_the_cadence_is_validated():
    with pytest.raises(Exception, match="every_n_train_steps"):
        ResumableCheckpoint(every_n_train_steps=-1)
