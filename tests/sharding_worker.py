"""One rank of tests/test_distributed.py's sharding check (run with RANK, WORLD_SIZE, MASTER_ADDR/PORT, OUT).

For an untied model (the committed tiny Llama), a tied one, and the untied one with activation
checkpointing on the student: shard student and teacher with
aropd.sharding, run the dual-view loss on this rank's half of a fixed batch, and compare with an
unsharded copy on the whole batch: the mean of the ranks' losses, every gradient, the EMA update
(a lerp over DTensors) and a synced generate whose ranks stop at different lengths.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aropd.loss import distillation_loss  # noqa: E402
from aropd.models import load_causal_lm  # noqa: E402
from aropd.sharding import is_tied, reshard_all, shard_causal_lm  # noqa: E402
from aropd.targets import AnchoredResidual
from aropd.types import TeacherScores  # noqa: E402
from aropd.teachers import EMATeacher, completion_hidden  # noqa: E402

B, L, T = 4, 7, 6


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    views = torch.randint(5, 300, (2 * B, L + 3), generator=g)  # full rows, then partial rows
    vmask = torch.ones_like(views)
    vmask[B + 1, :4] = 0
    comp = torch.randint(5, 300, (B, T), generator=g)
    cmask = torch.ones_like(comp)
    cmask[1, 3:] = 0
    return ids, mask, views, vmask, comp, cmask


def loss_and_backward(student, teacher, rows: list[int]) -> torch.Tensor:
    ids, mask, views, vmask, comp, cmask = batch()
    vrows = rows + [B + r for r in rows]
    with torch.no_grad():
        th = completion_hidden(teacher, views[vrows], vmask[vrows], comp[rows].repeat(2, 1), cmask[rows].repeat(2, 1))
    sh = completion_hidden(student, ids[rows], mask[rows], comp[rows], cmask[rows])
    n = len(rows)
    loss, _ = distillation_loss(
        sh, TeacherScores(full=th[:n], partial=th[n:]), student.get_output_embeddings(),
        teacher.get_output_embeddings(), comp[rows], cmask[rows], AnchoredResidual(lam=0.8, clip=5.0), chunk_size=2,
    )
    loss.backward()
    return loss.detach()


def tied_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def check(student, rank: int, world: int, mesh, activation_checkpointing: bool = False) -> dict:
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    tied = is_tied(student)
    if activation_checkpointing:  # what ShardingOptions(activation_checkpointing=True) does; the reference recomputes nothing
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shard_causal_lm(student, mesh)
    shard_causal_lm(teacher, mesh)
    per = B // world
    loss = loss_and_backward(student, teacher, list(range(rank * per, (rank + 1) * per)))
    ref_loss = loss_and_backward(ref_student, ref_teacher, list(range(B)))
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss)
    grads = {}
    for (name, p), (_, q) in zip(student.named_parameters(), ref_student.named_parameters()):
        grads[name] = (p.grad.full_tensor() - q.grad).abs().max().item()
    teacher_grads = [p.grad for p in teacher.parameters()]
    reshard_all(teacher)  # what FSDP2Strategy.post_backward does
    from torch.distributed.tensor import DTensor

    plain = [n for n, p in teacher.named_parameters() if not isinstance(p, DTensor)]
    with torch.no_grad():  # a stand-in optimizer step, the same on both sides
        for p, q in zip(student.parameters(), ref_student.parameters()):
            p.add_(p.grad, alpha=-0.1)
            q.add_(q.grad, alpha=-0.1)
    EMATeacher(0.3).update(teacher, student)
    EMATeacher(0.3).update(ref_teacher, ref_student)
    ema = max((p.full_tensor() - q).abs().max().item() for p, q in zip(teacher.parameters(), ref_teacher.parameters()))
    ids, mask = batch()[:2]
    rows = list(range(rank * per, (rank + 1) * per))
    out = student.generate(input_ids=ids[rows], attention_mask=mask[rows], max_new_tokens=3 + 4 * rank,
                           do_sample=False, synced_gpus=True, pad_token_id=0)
    return {
        "tied": tied, "loss_mean": float(torch.stack(losses).mean()), "ref_loss": float(ref_loss),
        "grad_maxdiff": max(grads.values()), "n_grads": len(grads), "teacher_grads_none": all(g is None for g in teacher_grads),
        "teacher_plain_after_reshard": plain, "ema_maxdiff": ema, "generated": list(out.shape),
    }


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    tiny = str(ROOT / "aropd/assets/tiny-llama")
    results = [check(load_causal_lm(tiny).train(), rank, world, mesh),
               check(tied_model().train(), rank, world, mesh),
               check(load_causal_lm(tiny).train(), rank, world, mesh, activation_checkpointing=True)]
    Path(os.environ["OUT"], f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
