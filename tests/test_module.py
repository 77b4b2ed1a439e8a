import lightning as L
import pytest
import torch

from aropd.data import PrivilegedDataModule
from aropd.models import build_tiny_llama, train_tiny_tokenizer
from aropd.module import PrivilegedDistillation
from aropd.loss import Probes
from aropd.rollout import completion_mask
from aropd.targets import AnchoredResidual, FullView, PartialView
from aropd.teachers import EMATeacher, SeparateTeacher, completion_hidden, score_views
from aropd.types import Rollout


@pytest.fixture(scope="module")
def module(tiny_path):
    m = PrivilegedDistillation(student=tiny_path)
    m.configure_model()
    return m


@pytest.fixture(scope="module")
def batch(tiny_path):
    dm = PrivilegedDataModule(tokenizer=tiny_path, batch_size=4)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _unpadded_logprobs(model, prompt, completion):
    ids = torch.cat([prompt, completion]).unsqueeze(0)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) + len(completion) - 1]
    return logits.log_softmax(-1)


def test_completion_positions_align_with_unpadded_forward(module, batch):
    """Left padding must not move positions: row t predicts completion token t, as without padding."""
    model = module.student.eval()
    g = torch.Generator().manual_seed(0)
    completion = torch.randint(5, 300, (batch.student_ids.shape[0], 6), generator=g)
    cmask = torch.ones_like(completion)
    with torch.no_grad():
        h = completion_hidden(model, batch.student_ids, batch.student_mask, completion, cmask)
        batched = model.get_output_embeddings()(h).log_softmax(-1)
        for b in range(completion.shape[0]):
            prompt = batch.student_ids[b][batch.student_mask[b].bool()]
            ref = _unpadded_logprobs(model, prompt, completion[b])
            assert torch.allclose(batched[b], ref, atol=1e-4)
    assert batch.student_mask[:, 0].min() == 0  # the batch really is left-padded somewhere


def _rollout(batch, completion):
    return Rollout(prompt_ids=batch.student_ids, prompt_mask=batch.student_mask, completion_ids=completion,
                   completion_mask=torch.ones_like(completion))


def test_dual_view_batched_forward_equals_separate_forwards(module, batch):
    t = module.teacher_model
    completion = torch.randint(5, 300, (batch.full_ids.shape[0], 5))
    cmask = torch.ones_like(completion)
    r = _rollout(batch, completion)
    both = score_views(t, batch, r, frozenset({"full", "partial"}), 0)
    only_full = score_views(t, batch, r, frozenset({"full"}), 0)
    with torch.no_grad():
        full = completion_hidden(t, batch.full_ids, batch.full_mask, completion, cmask)
        part = completion_hidden(t, batch.partial_ids, batch.partial_mask, completion, cmask)
    assert torch.allclose(both.full, full, atol=1e-4) and torch.allclose(both.partial, part, atol=1e-4)
    assert torch.allclose(only_full.full, full, atol=1e-4) and only_full.partial is None
    assert not torch.allclose(full, part, atol=1e-3)  # the views really differ


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[2, 7, 7], [5, 2, 2], [5, 6, 7], [9, 3, 2]])
    assert completion_mask(ids, [2]).tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]]
    assert completion_mask(ids, [2, 3]).tolist()[3] == [1, 1, 0]


def test_gradients_reach_only_the_student(tiny_path, batch):
    m = PrivilegedDistillation(student=tiny_path)
    m.configure_model()
    out = m.training_step(batch, 0)
    out["loss"].backward()
    assert all(p.grad is None for p in m.teacher_model.parameters())
    assert all(not p.requires_grad for p in m.teacher_model.parameters())
    grads = [p.grad for p in m.student.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    rec = out["record"]
    assert rec.mask.shape == rec.completion_ids.shape
    assert torch.isfinite(out["loss"])


def test_eos_first_rollout_carries_one_token_and_no_nan(module, batch):
    eos = module.tokenizer.eos_token_id
    n = batch.student_ids.shape[0]
    completion = torch.full((n, 4), module.tokenizer.pad_token_id)
    completion[:, 0] = eos
    r = Rollout(prompt_ids=batch.student_ids, prompt_mask=batch.student_mask, completion_ids=completion,
                completion_mask=completion_mask(completion, [eos]))
    assert r.completion_mask.sum(-1).tolist() == [1] * n
    from aropd.loss import distillation_loss

    scores = score_views(module.teacher_model, batch, r, frozenset({"full", "partial"}), module.tokenizer.pad_token_id)
    sh = completion_hidden(module.student, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    head = module.student.get_output_embeddings()
    every = Probes(sampled=True, shift=True, residual=True, support_top_p=0.9)
    loss, rec = distillation_loss(sh, scores, head, head, completion, r.completion_mask, module.target, probes=every)
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in rec.values())
    assert set(rec) == {"student_lp", "full_lp", "partial_lp", "target_lp", "shift", "residual", "clip_frac", "mismatch"}


class _Snapshots(L.Callback):
    def __init__(self):
        self.student, self.teacher = [], []

    def _snap(self, pl_module):
        self.student.append([p.detach().clone() for p in pl_module.student.parameters()])
        self.teacher.append([p.detach().clone() for p in pl_module.teacher_model.parameters()])

    def on_train_start(self, trainer, pl_module):
        self._snap(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._snap(pl_module)


def test_teacher_changes_only_by_the_ema_rule(tiny_path):
    alpha = 0.25
    m = PrivilegedDistillation(student=tiny_path, teacher=EMATeacher(alpha), optimizer=lambda p: torch.optim.SGD(p, 0.5))
    dm = PrivilegedDataModule(tokenizer=tiny_path, batch_size=4)
    snaps = _Snapshots()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[snaps])
    trainer.fit(m, dm)
    assert len(snaps.teacher) == 4
    for s0, t0 in zip(snaps.student[0], snaps.teacher[0]):
        assert torch.equal(s0, t0)  # the EMA teacher starts as the student
    moved = 0
    for k in range(1, 4):
        for t_prev, t_now, s_now in zip(snaps.teacher[k - 1], snaps.teacher[k], snaps.student[k]):
            assert torch.allclose(t_now, (1 - alpha) * t_prev + alpha * s_now, atol=1e-6)
            moved += int(not torch.equal(t_now, t_prev))
    assert moved > 0


def test_separate_teacher_with_another_vocabulary_fails_at_start(tmp_path, module):
    tok = train_tiny_tokenizer(["completely different text " * 50], vocab_size=300)
    build_tiny_llama(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"teacher '{tmp_path}'.*vocabulary differs"):
        SeparateTeacher(str(tmp_path)).build(module.student, module.tokenizer)


def test_separate_teacher_with_the_same_tokenizer_loads(tiny_path, module):
    teacher = SeparateTeacher(tiny_path).build(module.student, module.tokenizer)
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize(
    "make,option",
    [(lambda p: AnchoredResidual(lam=-1.0), "lam"), (lambda p: AnchoredResidual(lam=float("inf")), "lam"),
     (lambda p: AnchoredResidual(lam=float("nan")), "lam"), (lambda p: AnchoredResidual(clip=0.0), "clip"),
     (lambda p: PrivilegedDistillation(p, divergence="jsd", jsd_beta=2.0), "jsd_beta"),
     (lambda p: PrivilegedDistillation(p, jsd_beta=0.3), "jsd_beta"),  # forward KL takes no β: an option that does nothing
     (lambda p: PrivilegedDistillation(p, skip_tokens=-1), "skip_tokens"),
     (lambda p: PrivilegedDistillation(p, max_new_tokens=0), "max_new_tokens")],
)
def test_bad_options_raise_naming_them(tiny_path, make, option):
    with pytest.raises(ValueError, match=option):
        make(tiny_path)


def test_probes_follow_the_enabled_callbacks_and_the_views_follow_target_and_probes(tiny_path, batch):
    """With no diagnostic on, the step records nothing and scores only the target's view(s)."""
    from aropd.callbacks import ShortcutEvents, SupportMismatch, TeacherReliability

    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((pl_module.probes, outputs["record"], float(outputs["loss"])))

    def fit(target, callbacks):
        seen.clear()
        m = PrivilegedDistillation(student=tiny_path, target=target, max_new_tokens=8)
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, Spy()])
        trainer.fit(m, PrivilegedDataModule(tokenizer=tiny_path, batch_size=2, max_new_tokens=8))
        return seen[0]

    probes, rec, lone = fit(FullView(), [SupportMismatch(enabled=False), ShortcutEvents(enabled=False)])
    assert probes == Probes() and probes.views == frozenset()
    assert all(getattr(rec, f) is None for f in ("student_lp", "full_lp", "shift", "residual", "mismatch"))
    # Scoring the full view alone (narrower padding) trains on the same loss as scoring both.
    _, rec, both = fit(FullView(), [ShortcutEvents()])
    assert rec.full_lp is not None and lone == pytest.approx(both, rel=1e-6)
    probes, rec, _ = fit(AnchoredResidual(), [SupportMismatch(top_p=0.8), ShortcutEvents(), TeacherReliability(top_p=0.8)])
    assert probes == Probes(sampled=True, shift=True, residual=True, support_top_p=0.8)
    assert rec.mismatch.shape == (3, *rec.mask.shape) and rec.residual.shape == rec.mask.shape
    with pytest.raises(ValueError, match="different top_p"):
        fit(AnchoredResidual(), [SupportMismatch(top_p=0.8), TeacherReliability(top_p=0.9)])


def test_score_views_scores_only_the_views_asked_for(module, batch):
    r = _rollout(batch, torch.randint(5, 300, (batch.full_ids.shape[0], 3)))
    assert FullView().views == {"full"} and PartialView().views == {"partial"}
    s = score_views(module.teacher_model, batch, r, PartialView().views, 0)
    assert s.full is None and s.partial.shape[:2] == (batch.full_ids.shape[0], 3)


def test_a_nan_teacher_view_stops_the_run_before_the_optimizer_step_naming_it(tiny_path):
    m = PrivilegedDistillation(student=tiny_path, max_new_tokens=8)
    m.configure_model()
    before = [p.detach().clone() for p in m.student.parameters()]

    def poison_partial_rows(module, inputs, out):  # score_views stacks the full rows, then the partial ones
        return out.index_fill(0, torch.arange(out.shape[0] // 2, out.shape[0]), float("nan"))

    m.teacher_model.model.norm.register_forward_hook(poison_partial_rows)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(FloatingPointError, match="global step 0: the partial-view teacher output is not finite"):
        trainer.fit(m, PrivilegedDataModule(tokenizer=tiny_path, batch_size=2, max_new_tokens=8))
    assert all(torch.equal(a, b) for a, b in zip(before, m.student.parameters()))  # no step was taken
