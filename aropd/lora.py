"""LoRA students through ``peft``: the adapter options, the teachers that share the student's weights,
adapter-only checkpoints and the merged export.

The adapter is injected into the student in place (``peft.functional.inject_adapter_in_model``, the
API peft offers to integrations), so the student stays the transformers causal LM it was: rollouts,
``completion_hidden``, the chunked loss and FSDP2's shard units see the same modules as without LoRA.

Teachers under LoRA hold no second copy of the base model (:class:`AdapterTeacher`):

- frozen: the student's own model with the adapter switched off, i.e. exactly the base model;
- EMA: a second adapter ``ema`` in the student, ``θ_T ← (1 − α) θ_T + α θ_S`` over the adapter's
  weights only, made the active adapter for the teacher's forward.

A checkpoint holds the adapters (the student's and the EMA one), not the frozen base, which
``configure_model`` loads again from ``model.init_args.student``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

STUDENT_ADAPTER = "default"  # peft's default name: the adapter that trains
EMA_ADAPTER = "ema"
# Llama / Qwen2 / Mistral attention and MLP projections: LoRA on every linear layer of the decoder,
# which the LoRA and QLoRA papers found matches full fine-tuning better than attention alone.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRA:
    """A low-rank adapter on the student's decoder layers (``peft``'s LoRA); the base weights stay frozen."""

    rank: int = 16
    """Rank r of each adapter's low-rank update ``B·A``."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by ``alpha / rank``."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training (teacher forwards never use it)."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Names of the linear layers inside each decoder layer that get an adapter (the default fits Llama/Qwen/Mistral)."""

    def __post_init__(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            problems.append("target_modules is empty: name at least one linear layer")
        if problems:
            raise ValueError("lora: " + "; ".join(problems))

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none")


def adaptable_names(model: nn.Module) -> set[str]:
    """Last names of the linear layers inside the decoder layers: what ``target_modules`` may name.

    The embeddings and the output layer are left out on purpose: the loss applies the teacher's output
    layer per chunk, outside any teacher forward, so a teacher sharing the student's model needs it unadapted.
    """
    from aropd.sharding import decoder_layers

    return {name.rsplit(".", 1)[-1] for layer in decoder_layers(model) for name, m in layer.named_modules()
            if isinstance(m, nn.Linear)}


def target_problems(lora: LoRA, model: nn.Module) -> list[str]:
    unknown = sorted(set(lora.target_modules) - adaptable_names(model))
    if not unknown:
        return []
    return [f"lora.target_modules: {unknown} name no linear layer in {type(model).__name__}'s decoder layers "
            f"(there are: {sorted(adaptable_names(model))})"]


def add_lora(model: nn.Module, lora: LoRA) -> nn.Module:
    """Inject the trainable adapter into ``model`` in place; every base weight is frozen. Returns ``model``."""
    from peft.functional import cast_adapter_dtype, inject_adapter_in_model

    problems = target_problems(lora, model)
    if problems:
        raise ValueError("; ".join(problems))
    inject_adapter_in_model(lora.peft_config(), model, adapter_name=STUDENT_ADAPTER)
    # A bf16 base gets fp32 adapters (peft's autocast): the adapter is the master copy that AdamW and
    # the EMA step update, and bf16 would round their small steps away (docs/recipes.md).
    cast_adapter_dtype(model, STUDENT_ADAPTER, autocast_adapter_dtype=True)
    return model


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def is_adapted(model: nn.Module) -> bool:
    # peft_config first: peft is imported only for a model peft has touched (it is an optional extra)
    return getattr(model, "peft_config", None) is not None and bool(adapter_layers(model))


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is an adapter weight (peft names them ``…lora_A.<adapter>.weight`` etc.)."""
    return ".lora_" in key


def adapter_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The weights of one adapter, in module order (the same order for every adapter of ``model``)."""
    return [p for n, p in model.named_parameters() if is_adapter_key(n) and f".{adapter}." in n]


@contextlib.contextmanager
def adapter_in_use(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """Run ``model`` with ``adapter`` active instead of the student's (None: no adapter, the base model),
    in eval mode (no adapter dropout), then switch the student's adapter back on.

    peft's switches also set ``requires_grad`` (the active adapter trains); the student's adapter is
    made trainable again on the way out, so the optimizer's parameters are unchanged.
    """
    from peft.functional import set_adapter

    layers, was_training = adapter_layers(model), model.training
    model.eval()
    try:
        if adapter is None:
            for layer in layers:
                layer.enable_adapters(False)
        else:
            set_adapter(model, adapter, inference_mode=True)
        yield
    finally:
        if adapter is None:
            for layer in layers:
                layer.enable_adapters(True)
        else:
            set_adapter(model, STUDENT_ADAPTER)
        model.train(was_training)


class AdapterTeacher(nn.Module):
    """A teacher that is the student's own model with another adapter in use: the EMA adapter, or none.

    It stands where a teacher model stands (``completion_hidden`` calls ``teacher.base_model(...)``, the
    loss ``teacher.get_output_embeddings()``) and holds no weights of its own: the student is kept out
    of its submodules, so nothing is saved, sharded or moved twice. The output layer is the student's,
    which LoRA leaves unadapted (:func:`adaptable_names`).
    """

    def __init__(self, student: nn.Module, adapter: str | None) -> None:
        super().__init__()
        self._student = (student,)  # in a tuple: not a submodule
        self.adapter = adapter
        if adapter is not None and adapter not in student.peft_config:
            self._copy_student_adapter(adapter)

    def _copy_student_adapter(self, name: str) -> None:
        """Add adapter ``name`` to the student, equal to the student's adapter and frozen."""
        from peft.functional import cast_adapter_dtype, inject_adapter_in_model, set_adapter

        student = self._student[0]
        config = copy.deepcopy(student.peft_config[STUDENT_ADAPTER])
        with warnings.catch_warnings():  # "multiple adapters in the model": wanted here
            warnings.filterwarnings("ignore", message=".*multiple adapters")
            inject_adapter_in_model(config, student, adapter_name=name)
        cast_adapter_dtype(student, name, autocast_adapter_dtype=True)
        set_adapter(student, STUDENT_ADAPTER)  # injecting made the new one active and trainable
        with torch.no_grad():
            for t, s in zip(adapter_parameters(student, name), adapter_parameters(student, STUDENT_ADAPTER)):
                t.copy_(s)

    @property
    def base_model(self):
        return functools.partial(self._base_forward)

    def _base_forward(self, **inputs: Any):
        student = self._student[0]
        with adapter_in_use(student, self.adapter):
            return student.base_model(**inputs)

    def get_output_embeddings(self) -> nn.Module:
        return self._student[0].get_output_embeddings()

    def ema_pairs(self) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
        """(teacher adapter weights, the student adapter's) in matching order, for the EMA update."""
        student = self._student[0]
        return adapter_parameters(student, self.adapter), [p.detach() for p in adapter_parameters(student, STUDENT_ADAPTER)]

    def describe(self) -> str:
        if self.adapter is None:
            return "the base model: the student with its adapter switched off (no second copy of the weights)"
        return f"the student's base weights with the EMA adapter {self.adapter!r} (an EMA of the adapter only)"


# ---- checkpoints ----------------------------------------------------------------------------------
def drop_base_weights(state_dict: dict[str, Any], prefix: str = "student.") -> int:
    """Remove the frozen base weights under ``prefix`` from a checkpoint's state dict; returns how many."""
    base = [k for k in state_dict if k.startswith(prefix) and not is_adapter_key(k)]
    for k in base:
        del state_dict[k]
    return len(base)


def restore_base_weights(state_dict: dict[str, Any], module: nn.Module, prefix: str = "student.") -> None:
    """Fill a checkpoint's missing base weights from ``module`` (the base just loaded), so a strict load
    checks the adapters' names and shapes. A checkpoint that holds base weights is left as it is."""
    if any(k.startswith(prefix) and not is_adapter_key(k) for k in state_dict):
        return
    for k, v in module.state_dict().items():
        if k.startswith(prefix) and not is_adapter_key(k):
            state_dict[k] = v


def load_sharded_adapters(module: nn.Module, optimizers: list, path: Path, weights_only: bool | None = None) -> dict[str, Any]:
    """Restore a sharded LoRA checkpoint (adapters, optimizer state) into the FSDP2-sharded ``module``;
    returns the rest of the checkpoint (loop state, callbacks, hyperparameters).

    As Lightning's ``ModelParallelStrategy.load_checkpoint``, but asking ``torch.distributed.checkpoint``
    for the adapter keys only: the checkpoint has no frozen base, which ``configure_model`` just loaded,
    and DCP fails on any key it is asked for and does not hold. Every adapter key must be there.
    """
    from lightning.fabric.utilities.load import _METADATA_FILENAME
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
    )

    state = {k: v for k, v in get_model_state_dict(module).items() if is_adapter_key(k)}
    load({"state_dict": state}, checkpoint_id=path)
    module.load_state_dict(state, strict=False)  # the base keys are not in `state`: they stay as loaded
    for i, optimizer in enumerate(optimizers):
        key = f"optimizer_{i}"
        optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
        load(optimizer_state, checkpoint_id=path)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=optimizer_state[key],
                                 options=StateDictOptions(cpu_offload=True))
    return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)


# ---- export ---------------------------------------------------------------------------------------
def merge_adapter(model: nn.Module, adapter: str = STUDENT_ADAPTER) -> nn.Module:
    """Fold ``adapter`` into the base weights and take every adapter out: a plain transformers model."""
    for name, layer in [(n, m) for n, m in model.named_modules() if m in set(adapter_layers(model))]:
        layer.merge(adapter_names=[adapter])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def checkpoint_contents(path: str | Path) -> dict[str, Any]:
    """A checkpoint file or sharded checkpoint folder as one full checkpoint (weights and hyperparameters)."""
    from aropd.checkpointing import AtomicCheckpointIO

    return AtomicCheckpointIO().load_checkpoint(path, map_location="cpu", weights_only=False)


def export_merged(ckpt_path: str | Path, out: str | Path, adapter: str = STUDENT_ADAPTER,
                  student: str | None = None, dtype: str | None = None) -> Path:
    """Write the checkpoint's student (``adapter="ema"``: its EMA teacher) with the adapter merged, as a
    plain transformers folder with the tokenizer, which ``aropd validate`` and vLLM load.

    The base model, the LoRA options and the dtype come from the checkpoint's hyperparameters unless given.
    """
    from aropd.models import load_causal_lm, load_tokenizer

    ckpt = checkpoint_contents(ckpt_path)
    hp = ckpt.get("hyper_parameters") or {}
    lora = LoRA(**hp["lora"]) if isinstance(hp.get("lora"), dict) else hp.get("lora")
    if lora is None:
        raise ValueError(f"{ckpt_path}: not a LoRA checkpoint (its hyperparameters have no lora options)")
    student = student or hp["student"]
    model = add_lora(load_causal_lm(student, dtype or hp.get("dtype", "float32")), lora)
    state = {k[len("student."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("student.") and is_adapter_key(k)}
    if adapter != STUDENT_ADAPTER:
        if not any(f".{adapter}." in k for k in state):
            raise ValueError(f"{ckpt_path}: holds no adapter {adapter!r} (an EMA adapter exists only with EMATeacher)")
        state = {k.replace(f".{adapter}.", f".{STUDENT_ADAPTER}."): v for k, v in state.items() if f".{adapter}." in k}
    state = {k: v for k, v in state.items() if f".{STUDENT_ADAPTER}." in k}
    missing = [k for k in model.state_dict() if is_adapter_key(k) and k not in state]
    if missing:
        raise ValueError(f"{ckpt_path}: the adapter does not fit the lora options ({len(missing)} weights missing, e.g. {missing[0]})")
    model.load_state_dict(state, strict=False)
    merge_adapter(model, STUDENT_ADAPTER)
    out = Path(out)
    model.save_pretrained(out)
    load_tokenizer(student).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """``aropd-merge CKPT OUT``: the LoRA checkpoint's merged model as a plain transformers folder."""
    p = argparse.ArgumentParser(prog="aropd-merge", description=export_merged.__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="a LoRA run's checkpoint (e.g. runs/<name>/checkpoints/last.ckpt; a sharded folder too)")
    p.add_argument("out", help="folder to write (config, safetensors weights, tokenizer)")
    p.add_argument("--adapter", default=STUDENT_ADAPTER, choices=[STUDENT_ADAPTER, EMA_ADAPTER],
                   help="the student's adapter (default) or the EMA teacher's")
    p.add_argument("--student", default=None, help="the base model, if it moved since training (default: as trained)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: as trained")
    a = p.parse_args(argv)
    out = export_merged(a.ckpt, a.out, a.adapter, a.student, a.dtype)
    print(f"merged model written to {out}  (aropd validate --model.init_args.student {out} ...)")
