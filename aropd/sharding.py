"""FSDP2 sharding of the student and the teacher, and the Lightning strategy that drives it.

``FSDP2Strategy`` is Lightning's ``ModelParallelStrategy`` as pure data parallelism (one
``data_parallel`` mesh dimension over every process of every node, no tensor parallelism) plus the
options the module's ``configure_model`` reads when it shards (:func:`shard_causal_lm`), and
checkpoint folders that are published atomically (a kill mid-write leaves the last good one).

Shard units. aropd does not call the causal LM's ``forward`` in training: hidden states come from
``model.base_model(...)`` and log-probs from ``model.get_output_embeddings()`` chunk by chunk
(``aropd/loss.py``). FSDP2 unshards a unit's parameters in that unit's own forward hooks, so every
module that is called directly must be (in) a unit of its own:

    each decoder layer                  fully_shard(layer)
    the base model (embeddings, norm)   fully_shard(base)        ┐ one grouped unit
    the output layer                    fully_shard(head)        ┘ fully_shard([base, head]) if tied
    the causal LM (no parameters left)  fully_shard(model)       the root: one FSDP tree per model

A grouped unit (torch ≥ 2.6's ``fully_shard([a, b])``) is the documented pattern for a head that is
called per chunk outside the model's forward; tied embeddings must share one unit. One dummy forward
through the root right after sharding settles which unit is the root (FSDP2 takes the first unit
to run forward), so the direct calls may come in any order afterwards.

The student and the teacher are separate FSDP trees on the same mesh, with the same units, so the
EMA update lerps matching local shards. A teacher whose parameters do not require grad allocates no
gradients (it only runs under ``no_grad``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

MixedPrecision = Literal["auto", "bf16", "fp32"]


@dataclass
class ShardingOptions:
    """How ``configure_model`` shards the student and the teacher."""

    mixed_precision: MixedPrecision = "auto"
    """``auto``: bf16 compute with fp32 gradient reduction on GPU, fp32 on CPU; ``bf16``; ``fp32``."""
    reshard_after_forward: bool = True
    """Free each unit's gathered parameters after its forward (less memory, one more all-gather in backward)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (the student's only; the teacher has no backward)."""

    def mp_policy(self, device: torch.device):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        bf16 = self.mixed_precision == "bf16" or (self.mixed_precision == "auto" and device.type == "cuda")
        if bf16:
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (the classes it lists in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__} to shard "
            f"(no module of a class in _no_split_modules={sorted(names)})"
        )
    return layers


def is_tied(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight


def shard_causal_lm(model: nn.Module, mesh, options: ShardingOptions | None = None) -> nn.Module:
    """Apply FSDP2 to a transformers causal LM in place (units in the module docstring) and return it."""
    from torch.distributed.fsdp import fully_shard

    options = options or ShardingOptions()
    kw: dict[str, Any] = dict(
        mesh=mesh, reshard_after_forward=options.reshard_after_forward,
        mp_policy=options.mp_policy(torch.device(mesh.device_type)),
    )
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    base, head = model.base_model, model.get_output_embeddings()
    if is_tied(model):
        fully_shard([base, head], **kw)
    else:
        fully_shard(base, **kw)
        fully_shard(head, **kw)
    fully_shard(model, **kw)
    # The first unit to run forward becomes the root: make it the causal LM, whatever is called first later.
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device(mesh.device_type)
    was_training = model.training
    with torch.no_grad():
        model.eval()(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    model.train(was_training)
    return model


def reshard_all(model: nn.Module) -> None:
    """Free every gathered FSDP unit of ``model`` (no-op for units already sharded).

    Needed for the teacher after the student's backward: the loss recomputes the teacher's
    log-probs inside each checkpointed chunk, and FSDP2 does not reshard a unit after a forward
    that runs during backward (it expects that unit's own backward to do it, and the teacher has none).
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def data_parallel_mesh(module) -> Any | None:
    """The 1-D data-parallel mesh when the module runs under a ``ModelParallelStrategy``, else None."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
        return None
    if not isinstance(trainer.strategy, FSDP2Strategy):
        raise TypeError(
            "aropd shards with aropd.sharding.FSDP2Strategy (a ModelParallelStrategy that also frees the "
            "teacher's gathered parameters after each backward): use configs/strategies/fsdp.yaml"
        )
    mesh = module.device_mesh
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() != 1:
        raise ValueError("aropd shards with FSDP only: set tensor_parallel_size=1 (or use aropd.sharding.FSDP2Strategy)")
    return mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh


def sharding_options(module) -> ShardingOptions:
    strategy = module._trainer.strategy
    return getattr(strategy, "sharding", None) or ShardingOptions()


def shard_module(module) -> bool:
    """Shard ``module.student`` and ``module.teacher_model`` (if any) when under a model-parallel strategy.

    Called at the end of ``PrivilegedDistillation.configure_model``, after the teacher was built from
    the unsharded student. Returns whether anything was sharded.
    """
    mesh = data_parallel_mesh(module)
    if mesh is None or is_sharded(module.student):
        return False
    options = sharding_options(module)
    if options.activation_checkpointing:
        module.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shard_causal_lm(module.student, mesh, options)
    # A teacher with weights of its own; a LoRA student's frozen or EMA teacher runs on the student's
    # (sharded) weights and has none (aropd.lora.AdapterTeacher).
    if module.teacher_model is not None and any(True for _ in module.teacher_model.parameters()):
        shard_causal_lm(module.teacher_model, mesh, options)
    return True


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as FSDP2 over all processes (no tensor parallelism), with aropd's sharding options.

    Args:
        mixed_precision: ``auto`` (bf16 params/compute with fp32 gradient reduction on GPU, fp32 on CPU),
            ``bf16`` or ``fp32``. Keep ``trainer.precision`` at its default ``32-true``: FSDP2's
            ``MixedPrecisionPolicy`` does the casting; the sharded master weights stay fp32.
        reshard_after_forward: Free gathered parameters after each unit's forward.
        activation_checkpointing: Recompute the student's decoder layers in backward.
        save_distributed_checkpoint: One file per rank in a checkpoint folder (True) or one full file
            assembled on rank 0 (False). Either way the checkpoint is published atomically.
        process_group_backend: ``nccl`` / ``gloo``; default by device.
        timeout: Collective timeout.
    """

    def __init__(
        self,
        mixed_precision: MixedPrecision = "auto",
        reshard_after_forward: bool = True,
        activation_checkpointing: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend, timeout=timeout,
        )
        self.sharding = ShardingOptions(mixed_precision, reshard_after_forward, activation_checkpointing)

    def setup_environment(self) -> None:
        # Pure FSDP: every process of every node is one data-parallel rank.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        super().post_backward(closure_loss)
        if self.lightning_module is not None:  # the teacher's head stays gathered after the student's backward
            reshard_all(self.lightning_module)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Write into a hidden sibling, then publish it under ``filepath`` in one atomic step (rank 0)."""
        from aropd.checkpointing import publish, staging_path

        path = Path(self.broadcast(str(filepath)))
        if not self._save_distributed_checkpoint:
            # The full state is on rank 0, which writes one file through the CheckpointIO (atomic under
            # ResumableCheckpoint); that also replaces a published folder's link, which the parent's
            # rmtree of an existing sharded checkpoint would refuse.
            if self.is_global_zero:
                self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options)
            return
        staging = Path(self.broadcast(str(staging_path(path))))
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier()
        if self.global_rank == 0:
            publish(staging, path)
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """A LoRA run's sharded checkpoint holds the adapters without the frozen base: load those keys
        (``aropd.lora.load_sharded_adapters``); anything else loads as Lightning loads it."""
        from aropd.checkpointing import is_sharded_checkpoint

        path = Path(self.broadcast(str(checkpoint_path)))
        if getattr(self.lightning_module, "lora", None) is None or not is_sharded_checkpoint(path):
            return super().load_checkpoint(checkpoint_path, weights_only)
        from aropd.lora import load_sharded_adapters

        return load_sharded_adapters(self.model, self.optimizers, path, weights_only)

    def remove_checkpoint(self, filepath) -> None:
        from aropd.checkpointing import remove

        if self.is_global_zero:
            remove(Path(filepath))
