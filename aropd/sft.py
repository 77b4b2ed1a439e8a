"""SFT, the off-policy baseline: cross-entropy on the reference solution; no rollout, no teacher."""

from __future__ import annotations

from aropd.loss import sft_loss
from aropd.module import StudentModule
from aropd.teachers import completion_hidden
from aropd.types import PrivilegedBatch


class SupervisedFineTuning(StudentModule):
    """Trains the student on the reference responses (cut to ``max_new_tokens``); validates as the others do."""

    def __init__(self, student: str = "aropd/assets/tiny-llama", **kwargs) -> None:
        """
        Args:
            student: Hub id, local folder or ``folder/file.gguf`` of the student causal LM.
        """
        super().__init__(student=student, **kwargs)

    @property
    def method_name(self) -> str:
        return "sft"

    def training_step(self, batch: PrivilegedBatch, batch_idx: int):
        hidden = completion_hidden(
            self.student, batch.student_ids, batch.student_mask, batch.reference_ids, batch.reference_mask
        )
        loss = sft_loss(
            hidden, self.student.get_output_embeddings(), batch.reference_ids, batch.reference_mask,
            self.hparams.loss_chunk_size,
        )
        self.check_finite(loss, **{"student output": hidden})
        self.log_train(loss, batch.reference_mask)
        return loss
