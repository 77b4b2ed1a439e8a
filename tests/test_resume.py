"""Exact resume: atomic checkpoint writes, the data position, and SIGKILL → ``--ckpt_path last``."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DistributedSampler

from aropd.checkpointing import AtomicCheckpointIO, ResumableCheckpoint, ResumableDataLoader, publish, remove, staging_path
from test_distributed import env, finish, fit_cmd, kill_when, read_losses, start

ROOT = Path(__file__).resolve().parents[1]


def test_a_kill_during_a_checkpoint_write_leaves_the_last_good_one(tmp_path):
    ckpt, began = tmp_path / "last.ckpt", tmp_path / "began"
    child = subprocess.Popen([sys.executable, "-c", r"""
import sys, time, torch
from aropd.checkpointing import AtomicCheckpointIO

class Slow:  # pickling it stalls the write half-way
    def __reduce__(self):
        open(sys.argv[2], "w").close()
        time.sleep(600)
        return (int, (0,))

io = AtomicCheckpointIO()
io.save_checkpoint({"step": 1, "w": torch.ones(3)}, sys.argv[1])
io.save_checkpoint({"step": 2, "w": torch.zeros(100000), "slow": Slow()}, sys.argv[1])
""", str(ckpt), str(began)], cwd=ROOT, env=env())
    t0 = time.time()
    while not began.exists():
        assert child.poll() is None and time.time() - t0 < 120, "the child never started its second write"
        time.sleep(0.05)
    child.kill()  # SIGKILL mid-write
    child.wait()
    torn = [p for p in tmp_path.iterdir() if p.name.startswith(".last.ckpt.")]
    assert torn, "the interrupted write should have left its staging file"
    io = AtomicCheckpointIO()
    assert io.load_checkpoint(ckpt)["step"] == 1  # the last good checkpoint, whole
    io.save_checkpoint({"step": 3}, ckpt)
    assert io.load_checkpoint(ckpt)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["began", "last.ckpt"]  # leftovers tidied


def test_sharded_checkpoint_folders_are_published_by_a_link_swap(tmp_path):
    last = tmp_path / "last.ckpt"

    def write(step: int) -> Path:
        d = staging_path(last)
        d.mkdir()
        (d / ".metadata").write_text(str(step))
        (d / "__0_0.distcp").write_text("x")
        return d

    first = write(1)
    publish(first, last)
    assert last.is_symlink() and (last / ".metadata").read_text() == "1"
    torn = write(2)  # a write killed before its publish: invisible
    (torn / ".metadata").unlink()
    assert (last / ".metadata").read_text() == "1"
    publish(write(3), last)
    assert (last / ".metadata").read_text() == "3"
    assert not first.exists() and not torn.exists()  # the replaced folder and the torn one are gone
    assert len(list(tmp_path.iterdir())) == 2  # last.ckpt and the folder it points to
    remove(last)
    assert list(tmp_path.iterdir()) == []


class SeenBatches(L.LightningModule):
    """Records the examples of every batch; the parameter never changes (the data order is the point)."""

    def __init__(self, n: int = 10) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.n, self.seen = n, []

    def train_dataloader(self):
        sampler = DistributedSampler(range(self.n), num_replicas=1, rank=0, shuffle=True, seed=3)
        return ResumableDataLoader(list(range(self.n)), batch_size=4, sampler=sampler, drop_last=True)

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch_idx, batch.tolist()))
        return self.w * batch.float().sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(root: Path, max_steps: int, *callbacks) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, callbacks=list(callbacks))


@pytest.mark.parametrize("resume_at", [2, 3, 5], ids=["epoch_end", "mid_epoch", "mid_later_epoch"])
def test_the_loader_resumes_where_it_stopped(tmp_path, resume_at):
    """2 batches per epoch (10 examples, batch 4, drop_last): resumes at an epoch's end or inside one
    see exactly the batches the uninterrupted run saw from there on, in later epochs' orders too."""
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "all", every_n_train_steps=1, save_top_k=-1)
    whole = SeenBatches()
    _trainer(tmp_path, 7, every).fit(whole)
    assert len(whole.seen) == 7 and whole.seen[0][2] != whole.seen[2][2]
    ckpt = next((tmp_path / "all").glob(f"*step={resume_at}.ckpt"))
    assert torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    resumed = SeenBatches()
    _trainer(tmp_path / "r", 7).fit(resumed, ckpt_path=ckpt)
    assert resumed.seen == whole.seen[resume_at:]


def test_resumable_checkpoint_keeps_last_in_one_folder_across_runs(tmp_path):
    first = SeenBatches()
    t = _trainer(tmp_path, 3, ResumableCheckpoint(every_n_train_steps=3))
    t.fit(first)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no top-k copy, no leftovers
    assert isinstance(t.strategy.checkpoint_io, AtomicCheckpointIO)
    assert torch.load(last, weights_only=False)["global_step"] == 3
    assert t.checkpoint_callback.best_model_path == str(last)
    again = SeenBatches()
    t2 = _trainer(tmp_path, 6, ResumableCheckpoint(every_n_train_steps=3))
    t2.fit(again, ckpt_path="last")  # found although a new run (a new logger version) is resuming
    assert again.seen == _whole_run(tmp_path / "w", 6)[3:]  # from inside epoch 1 on


def _whole_run(root: Path, steps: int):
    m = SeenBatches()
    _trainer(root, steps).fit(m)
    return m.seen


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_gives_the_uninterrupted_losses(tmp_path):
    """The quickstart (sampled rollouts, EMA teacher, AdamW, warm-up/cosine schedule, diagnostics),
    checkpointing every 2 steps, SIGKILLed after its step-4 checkpoint (mid-epoch), resumed with
    ``--ckpt_path last``: every per-step loss equals the run that never stopped, to 1e-6 (in fact
    bit for bit: same processes, same thread count, same seeds, same data order)."""
    steps = ("--trainer.max_steps", "6")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    pw = start(fit_cmd(whole, *steps))
    pk = start(fit_cmd(killed, *steps, "--trainer.callbacks+=run_recorders.StallAfterStep",
                       "--trainer.callbacks.step", "4", "--trainer.callbacks.marker", str(tmp_path / "stalled")))
    kill_when(pk, tmp_path / "stalled")
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    finish(start(fit_cmd(killed, *steps, "--ckpt_path", "last")))
    finish(pw)
    lw, lk = read_losses(whole / "rec"), read_losses(killed / "rec")
    assert sorted(lw) == sorted(lk) == [1, 2, 3, 4, 5, 6]
    diffs = [abs(lw[s][0][0] - lk[s][0][0]) for s in lw]
    print("per-step |loss(killed + resumed) - loss(uninterrupted)|:", diffs)
    assert max(diffs) <= 1e-6, diffs
    assert len({lw[s][0][0] for s in lw}) == 6  # the losses really move


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (every write: ENOSPC)")
def test_a_full_disk_on_save_is_an_os_error_naming_the_checkpoint(tmp_path, monkeypatch):
    """torch's zip writer reports a failed write as "[enforce fail at inline_container.cc] unexpected
    pos", the ENOSPC only chained; the error raised is the ENOSPC, with the checkpoint's path last."""
    import builtins
    import errno

    import aropd.checkpointing as ckpt_mod

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    monkeypatch.setattr(ckpt_mod, "open", lambda path, mode="r": builtins.open("/dev/full", mode), raising=False)
    with pytest.raises(OSError) as e:
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(100_000)}, ckpt)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(ckpt)
    assert str(e.value).endswith(f": '{ckpt}'") and "No space left on device" in str(e.value)
    assert "inline_container" not in str(e.value)
    assert list(ckpt.parent.iterdir()) == []  # no staging file left behind


def test_a_damaged_checkpoint_is_named_when_loaded(tmp_path):
    io = AtomicCheckpointIO()
    good = tmp_path / "good.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ValueError, match=rf"{cut}: truncated or damaged.*expected a Lightning checkpoint"):
        io.load_checkpoint(cut)


def test_a_resume_restores_the_training_state_and_keeps_the_command_lines_options(tmp_path, monkeypatch):
    """Resumed from a 1-step checkpoint trained with val_max_new_tokens 24 and rollouts of 48 tokens,
    with 9 and 16 on the command line: the run continues at step 1 (the checkpoint's state) with 9
    and 16 (the command's options), not the trained-with values Lightning's CLI merges back in."""
    from aropd.cli import main

    monkeypatch.chdir(ROOT)
    base = ["fit", "--config", "configs/quickstart.yaml", "--config", "tests/conf/tiny.yaml",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.limit_val_batches", "0"]
    main([*base, "--trainer.max_steps", "1", "--model.init_args.val_max_new_tokens", "24"])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["hyper_parameters"]["max_new_tokens"] == 48
    cli = main([*base, "--trainer.max_steps", "2", "--ckpt_path", str(ckpt),
                "--model.init_args.val_max_new_tokens", "9", "--model.init_args.max_new_tokens", "16"])
    assert cli.trainer.global_step == 2
    assert cli.model.hparams.val_max_new_tokens == 9 and cli.model.hparams.max_new_tokens == 16
    assert cli.model.sampling.max_new_tokens == 16 and cli.datamodule.hparams.max_new_tokens == 16
    assert torch.load(ckpt, weights_only=False)["hyper_parameters"]["val_max_new_tokens"] == 9
