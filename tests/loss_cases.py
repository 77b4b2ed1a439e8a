"""Random inputs of the distillation loss, shared by the loss tests."""

from __future__ import annotations

import torch


def loss_inputs(batch: int, positions: int, hidden: int, vocab: int, seed: int):
    """``(generator, student_h [B, T, H], teacher_h [2B, T, H] (full rows, then partial), student
    head, frozen teacher head, ids [B, T])``, all drawn from ``seed``; the generator is returned so a
    test can draw more from the same stream."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the heads' initialisation
    student_h = torch.randn(batch, positions, hidden, generator=g)
    teacher_h = torch.randn(2 * batch, positions, hidden, generator=g)
    s_head, t_head = torch.nn.Linear(hidden, vocab, bias=False), torch.nn.Linear(hidden, vocab, bias=False)
    t_head.requires_grad_(False)
    ids = torch.randint(0, vocab, (batch, positions), generator=g)
    return g, student_h, teacher_h, s_head, t_head, ids
