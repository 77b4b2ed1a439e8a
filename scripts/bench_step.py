"""Training-step benchmark: time per phase, tokens per second and peak memory, per method.

    python scripts/bench_step.py [--steps 12] [--warmup 2] [--methods ar_opd full_opd partial_opd sft]
    python scripts/bench_step.py --diagnostics [--repeats 3]    # diagnostics overhead (ar_opd)
    python scripts/bench_step.py --processes 1 2                # FSDP2 over gloo: tokens/s, peak RSS per process
    python scripts/bench_step.py --loss-memory                  # chunked vs. unchunked loss at a 150k vocabulary
    python scripts/bench_step.py --loss-timing [--loss-repeats 5]  # fused vs. previous vs. single-view loss time
    python scripts/bench_step.py --vs-trl [--pairs 5 --steps 10]   # paired step time against TRL's SDFT trainer

Each method runs in its own process (so peak RSS is its own) on the tests' tiny random model.
Figures are medians over the measured steps; the machine is shared, so compare ratios in one run.

``--diagnostics`` compares, on ``ar_opd`` with a TensorBoard logger and logging every step, "off"
(no diagnostics callbacks, ``support_top_p: null``) with "on" (the four callbacks as
``configs/diagnostics.yaml`` sets them: every scalar every step, the support-mismatch figure every
50 steps — ``--figure-every 1`` to draw it every step too — and ``support_top_p: 0.9``): the runs
alternate off/on ``--repeats`` times and the step times are pooled per mode. A step is timed from
the batch's start to the end of the last ``on_train_batch_end`` callback, so the diagnostics' own
work is inside it. Wall and process CPU time are both shown: on a busy machine the CPU time is the
steadier of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("aropd/rollout", "aropd/teacher_scoring", "aropd/student_forward_and_loss")
TRL_VENV = ROOT / ".venv-trl"  # TRL's own venv (gitignored): its pins must not touch aropd's
PEER_DIR = ROOT / "build/peer"  # the comparison's model, prompts and TRL's output folder (gitignored)
# TRL's teacher prompt: the user turn "{prompt}\n\n{privileged_context}" (SDFTConfig.teacher_prompt_template),
# whose privileged context run_opd.py words "{reasoning} Answer: {answer}"; no system message.
PEER_TEMPLATE = {"system": "", "teacher_user": "{question}\n\n{trace}", "trace": "{reasoning} Answer: {answer}"}


def diagnostics_callbacks(figure_every: int | None = None) -> list:
    """The aropd.callbacks entries of configs/diagnostics.yaml, as configured there."""
    import importlib

    import yaml

    cfg = yaml.safe_load((ROOT / "configs/diagnostics.yaml").read_text())
    out = []
    for entry in cfg["trainer"]["callbacks"]:
        module, _, name = entry["class_path"].rpartition(".")
        if module != "aropd.callbacks":
            continue
        kwargs = dict(entry.get("init_args") or {})
        if figure_every is not None and "figure_every_n_steps" in kwargs:
            kwargs["figure_every_n_steps"] = figure_every
        out.append(getattr(importlib.import_module(module), name)(**kwargs))
    return out


def run_one(method: str, steps: int, warmup: int, extra: list[str], diagnostics: str | None = None,
            threads: int = 2, figure_every: int | None = None, peer: dict | None = None) -> dict:
    """One method's run in this process. ``peer`` (``{"model", "prompts"}``): the TRL comparison's
    settings instead of the tiny model's (see :func:`vs_trl`)."""
    import functools
    import tempfile

    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.profilers import SimpleProfiler

    from aropd.data import PrivilegedDataModule

    torch.set_num_threads(threads)
    L.seed_everything(0)
    step_times, tokens, widths = [], [], []

    cpu_times: list[float] = []  # process CPU time (all threads): less sensitive to a busy machine

    class Clock(L.Callback):
        def on_train_batch_start(self, *a):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step_times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.c0)
            rec = outputs.get("record") if isinstance(outputs, dict) else None
            tokens.append(float(rec.mask.sum()) if rec is not None else float(batch.reference_mask.sum()))
            decoded = int(rec.mask.sum(-1).max()) if rec is not None else 0  # decode steps of the rollout
            widths.append({"student": batch.student_ids.shape[1], "full": batch.full_ids.shape[1],
                           "partial": batch.partial_ids.shape[1], "decoded": decoded})

    tiny = str(ROOT / "aropd/assets/tiny-llama")
    args: dict = dict(max_new_tokens=64)
    data_args: dict = dict(tokenizer=tiny, batch_size=8, max_new_tokens=64)
    trainer_args: dict = {}
    if peer is not None:  # TRL SDFT's settings in run_opd.py: frozen teacher, AdamW lr 1e-5, clip 1.0; fused
        # AdamW, as transformers' Trainer picks it with torch >= 2.8 (optim="adamw_torch_fused")
        from aropd.rollout import LeanDecode
        from aropd.teachers import FrozenTeacher

        args = dict(student=peer["model"], max_new_tokens=128, teacher=FrozenTeacher(), engine=LeanDecode(),
                    optimizer=functools.partial(torch.optim.AdamW, lr=1e-5, weight_decay=0.0, fused=True))
        data_args = dict(tokenizer=peer["model"], train=[peer["prompts"]], template=PEER_TEMPLATE, batch_size=8,
                         max_new_tokens=128)
        trainer_args = dict(gradient_clip_val=1.0)
    callbacks: list = [Clock()]
    logger = False
    if diagnostics is not None:  # the diagnostics overhead: on vs. off, both with a TensorBoard logger
        if diagnostics == "on":  # before the clock, whose on_train_batch_end then ends the step
            callbacks = [*diagnostics_callbacks(figure_every), *callbacks]
        logger = TensorBoardLogger(tempfile.mkdtemp(prefix="aropd_bench_"), name="", version="")
    args.update(json.loads(extra[0]) if extra else {})
    model = method_module(method, **{"student": tiny, **args})
    data = PrivilegedDataModule(**data_args)
    profiler = SimpleProfiler()
    trainer = L.Trainer(
        max_steps=steps + warmup, accelerator="cpu", logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, profiler=profiler, callbacks=callbacks,
        log_every_n_steps=1, **trainer_args,
    )
    trainer.fit(model, data)
    m = slice(warmup, None)
    phases = {k.split("/")[-1]: statistics.median(v[warmup:]) for k, v in profiler.recorded_durations.items()
              if k in PHASES and len(v) > warmup}
    back = [k for k in profiler.recorded_durations if k.endswith(".backward")]
    if back:
        phases["backward"] = statistics.median(profiler.recorded_durations[back[0]][warmup:])
    step = statistics.median(step_times[m])
    return {
        "method": method,
        "diagnostics": diagnostics,
        "step_s": step,
        "step_times_s": step_times[m],
        "cpu_times_s": cpu_times[m],
        "phases_s": phases,
        "tokens_per_s": statistics.median(t / s for t, s in zip(tokens[m], step_times[m])),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # per measured step, for the TRL comparison
        "phase_times_s": {k.split("/")[-1]: v[warmup:] for k, v in profiler.recorded_durations.items() if k in PHASES},
        "tokens": tokens[m],
        "widths": widths[m],
    }


ALL_METHODS = ["ar_opd", "full_opd", "partial_opd", "sft"]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=ALL_METHODS, help="(with --vs-trl, OPD methods only; default there: ar_opd full_opd)")
    p.add_argument("--model-args", default="", help="JSON of extra PrivilegedDistillation args")
    p.add_argument("--diagnostics", action="store_true", help="diagnostics on vs. off (ar_opd); see the docstring")
    p.add_argument("--repeats", type=int, default=3, help="off/on run pairs with --diagnostics")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is steadier on a busy machine)")
    p.add_argument("--figure-every", type=int, default=None,
                   help="with --diagnostics: the support-mismatch figure's interval (default: the YAML's)")
    p.add_argument("--processes", type=int, nargs="+", default=None,
                   help="tokens/s and peak memory of ar_opd under FSDP2 with these process counts (e.g. 1 2); see scale()")
    p.add_argument("--global-batch", type=int, default=8, help="with --processes: prompts per step over all ranks")
    p.add_argument("--threads-per-process", type=int, default=1,
                   help="with --processes: torch threads per rank (more than the free cores stalls OpenMP)")
    p.add_argument("--loss-memory", action="store_true",
                   help="peak memory of the chunked vs. unchunked loss at a 150k vocabulary; see loss_memory()")
    p.add_argument("--loss-timing", action="store_true",
                   help="loss forward + backward time, fused vs. previous vs. single view; see loss_timing()")
    p.add_argument("--loss-repeats", type=int, default=5, help="with --loss-timing: timed runs per setting")
    p.add_argument("--vs-trl", action="store_true",
                   help="paired step comparison with TRL 1.16.0's SDFT trainer (own venv, .venv-trl); see vs_trl()")
    p.add_argument("--pairs", type=int, default=5, help="with --vs-trl: rounds of one process per system")
    p.add_argument("--_scale_child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_loss_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_diag", default=None, choices=["on", "off"], help=argparse.SUPPRESS)
    p.add_argument("--_peer", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._scale_child is not None:  # one process count's run (Lightning re-runs this command for each rank)
        run_scale(a._scale_child, a.steps, a.warmup, a.threads_per_process, a.global_batch)
        return []
    if a._loss_child is not None:
        print("RESULT " + json.dumps(run_loss_memory(**json.loads(a._loss_child))))
        return []
    if a.processes:
        return scale(a.processes, a.steps, a.warmup, a.threads_per_process, a.global_batch)
    if a.loss_memory:
        return loss_memory()
    if a.loss_timing:
        return loss_timing(repeats=a.loss_repeats, threads=a.threads)
    if a.vs_trl:
        return vs_trl(a.pairs, a.steps, a.methods if a.methods != ALL_METHODS else ["ar_opd", "full_opd"])
    if a._child:
        extra = [a.model_args] if a.model_args else []
        peer = {"model": str(PEER_DIR / "tiny"), "prompts": str(PEER_DIR / "prompts.jsonl")} if a._peer else None
        print("RESULT " + json.dumps(run_one(a._child, a.steps, a.warmup, extra, a._diag, a.threads, a.figure_every,
                                             peer)))
        return []

    def child(method: str, diag: str | None = None) -> dict:
        cmd = [sys.executable, __file__, "--steps", str(a.steps), "--warmup", str(a.warmup), "--_child", method,
               "--threads", str(a.threads)]
        if a.figure_every is not None:
            cmd += ["--figure-every", str(a.figure_every)]
        if a.model_args:
            cmd += ["--model-args", a.model_args]
        if diag:
            cmd += ["--_diag", diag]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
        return json.loads(line[-1][7:])

    if a.diagnostics:
        return diagnostics_overhead([child("ar_opd", mode) for _ in range(a.repeats) for mode in ("off", "on")])
    results = [child(method) for method in a.methods]
    print(f"{'method':<12} {'step s':>8} {'rollout':>8} {'teacher':>8} {'fwd+loss':>8} {'backward':>8} {'tok/s':>8} {'peak MB':>8}")
    for r in results:
        ph = r["phases_s"]
        cells = [ph.get(k, float("nan")) for k in ("rollout", "teacher_scoring", "student_forward_and_loss", "backward")]
        print(f"{r['method']:<12} {r['step_s']:>8.3f} " + " ".join(f"{c:>8.3f}" for c in cells)
              + f" {r['tokens_per_s']:>8.0f} {r['peak_rss_mb']:>8.0f}")
    return results


def diagnostics_overhead(runs: list[dict]) -> list[dict]:
    """Pool the step times of the off and on runs; print medians and the on/off ratios."""
    modes = ("off", "on")
    pool = lambda key, mode: [t for r in runs if r["diagnostics"] == mode for t in r[key]]  # noqa: E731
    wall = {mode: statistics.median(pool("step_times_s", mode)) for mode in modes}
    cpu = {mode: statistics.median(pool("cpu_times_s", mode)) for mode in modes}
    per_run = {mode: [round(r["step_s"], 3) for r in runs if r["diagnostics"] == mode] for mode in modes}
    print(f"{'diagnostics':<12} {'step s':>8} {'cpu s':>8} {'steps':>6}  per-run median step s")
    for mode in modes:
        print(f"{mode:<12} {wall[mode]:>8.3f} {cpu[mode]:>8.3f} {len(pool('step_times_s', mode)):>6}  {per_run[mode]}")
    ratio, cpu_ratio = wall["on"] / wall["off"], cpu["on"] / cpu["off"]
    print(f"overhead: step time on/off = {ratio:.3f} ({100 * (ratio - 1):+.1f} %), "
          f"CPU time on/off = {cpu_ratio:.3f} ({100 * (cpu_ratio - 1):+.1f} %)  [budget: +10 %]")
    return [{"off_s": wall["off"], "on_s": wall["on"], "ratio": ratio, "cpu_ratio": cpu_ratio, "runs": runs}]


# ---- paired comparison with TRL's SDFT trainer ----------------------------------------------------
def trl_python() -> Path | None:
    """The python of TRL's venv, made on first use (torch 2.13.0 first, so TRL's resolve keeps it, then
    trl 1.16.0); None, with the reason printed, when that cannot be installed."""
    py = TRL_VENV / "bin/python"
    check = [str(py), "-c", "import trl, torch; assert trl.__version__ == '1.16.0', trl.__version__"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    for cmd in ([sys.executable, "-m", "venv", str(TRL_VENV)],
                [str(py), "-m", "pip", "install", "-q", "torch==2.13.0"],
                [str(py), "-m", "pip", "install", "-q", "trl==1.16.0"], check):
        print("$ " + " ".join(cmd), flush=True)
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            print(f"skipping the TRL comparison: TRL 1.16.0 could not be installed in {TRL_VENV.name} "
                  f"(`{' '.join(cmd)}` exited {run.returncode}):\n{run.stderr[-2000:]}")
            return None
    return py


def vs_trl(pairs: int, steps: int, methods: list[str]) -> list[dict]:
    """aropd's training step against TRL 1.16.0's ``SDFTTrainer(distillation_mode="full_logits")``.

    Both train the same seeded 5.0M-parameter Llama (vocabulary 8,192) that ``scripts/peer/build_tiny.py``
    builds, batch 8, 128 new tokens at temperature 1, top-p 1, top-k 0, fp32, forward KL over the full
    vocabulary, a frozen teacher, fused AdamW lr 1e-5, gradient clipping 1.0, one torch thread, no
    validation, checkpoints or diagnostics. TRL runs ``scripts/peer/run_opd.py --trainer sdft`` (one
    teacher view: the prompt with the privileged context); aropd runs each of ``methods`` with
    ``LeanDecode``: ``ar_opd`` scores two teacher views (full and partial) and builds its target from
    both, ``full_opd`` one. Every process runs ``steps`` steps, the first of which is left out (thread
    pools, allocator, lazy imports); the systems alternate process by process, the order reversed each
    round, so a busy machine slows them alike. Step wall time, process CPU time and the split into
    rollout, teacher and the rest (student forward, loss, backward and optimizer: step minus rollout
    minus teacher, on both sides) are pooled over the rounds; the table shows medians and aropd / TRL.
    """
    import tempfile

    py = trl_python()
    if py is None:
        return []
    PEER_DIR.mkdir(parents=True, exist_ok=True)
    if not (PEER_DIR / "tiny/config.json").exists() or not (PEER_DIR / "prompts.jsonl").exists():
        subprocess.run([str(py), str(ROOT / "scripts/peer/build_tiny.py")], cwd=PEER_DIR, check=True,
                       capture_output=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    def trl_run() -> list[dict]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "sdft.json"
            cmd = [str(py), str(ROOT / "scripts/peer/run_opd.py"), "--trainer", "sdft", "--model",
                   str(PEER_DIR / "tiny"), "--prompts", str(PEER_DIR / "prompts.jsonl"), "--out-dir",
                   str(PEER_DIR / "out"), "--steps", str(steps), "--bs", "8", "--new", "128", "--threads", "1",
                   "--json", str(out)]
            run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if run.returncode:
                sys.exit(f"TRL SDFT failed:\n{run.stderr[-3000:]}")
            res = json.loads(out.read_text())
        teacher_w = res["teacher_len_padded"]
        return [{"step_s": s["step_s"], "cpu_s": s["cpu_s"], "rollout_s": s["rollout_s"], "teacher_s": s["teacher_s"],
                 "rest_s": s["rest_s"], "decoded": max(s["gen_len"]), "tokens": s["real_tokens"],
                 "prompt_w": res["prompt_len_padded"][i], "teacher_w": teacher_w[i] - max(s["gen_len"])}
                for i, s in enumerate(res["per_step"])][1:]

    def aropd_run(method: str) -> list[dict]:
        cmd = [sys.executable, __file__, "--steps", str(steps - 1), "--warmup", "1", "--_child", method,
               "--threads", "1", "--_peer"]
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        line = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            sys.exit(f"aropd {method} failed:\n{run.stderr[-3000:]}")
        r = json.loads(line[-1][7:])
        ph = r["phase_times_s"]
        rows = []
        for i, (step, cpu) in enumerate(zip(r["step_times_s"], r["cpu_times_s"])):
            roll, teach = ph["rollout"][i], ph["teacher_scoring"][i]
            w = r["widths"][i]
            rows.append({"step_s": step, "cpu_s": cpu, "rollout_s": roll, "teacher_s": teach,
                         "rest_s": step - roll - teach, "decoded": w["decoded"], "tokens": r["tokens"][i],
                         "prompt_w": w["student"],
                         "teacher_w": max(w["full"], w["partial"]) if method == "ar_opd" else w["full"]})
        return rows

    systems = ["trl", *methods]
    pooled: dict[str, list[dict]] = {k: [] for k in systems}
    rounds: list[dict] = []
    for i in range(pairs):
        order = systems if i % 2 == 0 else systems[::-1]
        medians = {}
        for name in order:
            load = os.getloadavg()[0]
            rows = trl_run() if name == "trl" else aropd_run(name)
            pooled[name] += rows
            medians[name] = statistics.median(r["step_s"] for r in rows)
            print(f"round {i + 1}/{pairs} {name:<9} median step {medians[name]:6.2f} s over {len(rows)} steps, "
                  f"load {load:.2f} before", flush=True)
        rounds.append(medians)
    load = os.getloadavg()
    keys = ("step_s", "cpu_s", "rollout_s", "teacher_s", "rest_s")
    med = {k: {f: statistics.median(r[f] for r in pooled[k]) for f in (*keys, "decoded", "tokens", "prompt_w",
                                                                          "teacher_w")} for k in systems}
    print(f"\n{pairs} rounds x {steps} steps per process (first left out), medians of the pooled steps; "
          f"1 torch thread; load average (1/5/15 min) at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
          f"on {os.cpu_count()} CPUs")
    print(f"{'system':<9} {'step s':>7} {'cpu s':>7} {'rollout':>8} {'teacher':>8} {'rest':>7} {'steps':>6} "
          f"{'decoded':>8} {'tokens':>7} {'prompt':>7} {'teacher':>8}  step / TRL  cpu / TRL")
    for k in systems:
        m = med[k]
        ratio = "" if k == "trl" else (f"  {m['step_s'] / med['trl']['step_s']:>9.2f}"
                                       f"  {m['cpu_s'] / med['trl']['cpu_s']:>9.2f}")
        print(f"{k:<9} {m['step_s']:>7.2f} {m['cpu_s']:>7.2f} {m['rollout_s']:>8.2f} {m['teacher_s']:>8.2f} "
              f"{m['rest_s']:>7.2f} {len(pooled[k]):>6} {m['decoded']:>8.0f} {m['tokens']:>7.0f} {m['prompt_w']:>7.0f} "
              f"{m['teacher_w']:>8.0f}{ratio}")
    for k in methods:
        per_round = [r[k] / r["trl"] for r in rounds]
        print(f"{k} / TRL step, per round: " + " ".join(f"{x:.2f}" for x in per_round))
    print("rest = step - rollout - teacher (student forward, loss, backward, optimizer); decoded = decode steps "
          "(longest completion), tokens = completion tokens before EOS per batch; prompt, teacher = padded "
          "widths of the student prompt and of the teacher's prompt part")
    return [{"system": k, **med[k], "steps": len(pooled[k])} for k in systems] + [{"rounds": rounds, "load": load}]


# ---- scale: 1 vs. N processes, and the memory-bounded loss ---------------------------------------
def method_module(method: str, **kwargs):
    """The module of a method name, as its ``configs/methods/<method>.yaml`` composes it."""
    from aropd.module import PrivilegedDistillation
    from aropd.sft import SupervisedFineTuning
    from aropd.targets import AnchoredResidual, FullView, PartialView

    if method == "sft":
        return SupervisedFineTuning(**kwargs)
    targets = {"ar_opd": AnchoredResidual, "full_opd": FullView, "partial_opd": PartialView}
    return PrivilegedDistillation(target=targets[method](), **kwargs)


def run_scale(processes: int, steps: int, warmup: int, threads: int, global_batch: int) -> None:
    """ar_opd under ``FSDP2Strategy`` on ``processes`` CPU processes (gloo), the global batch split over
    them, ``threads`` torch threads each; each rank prints its step times, tokens and peak RSS."""
    import lightning as L
    import torch

    from aropd.data import PrivilegedDataModule
    from aropd.module import PrivilegedDistillation
    from aropd.rollout import SamplingConfig
    from aropd.sharding import FSDP2Strategy

    torch.set_num_threads(threads)
    L.seed_everything(0)
    step_times, tokens = [], []

    class Clock(L.Callback):
        def on_train_batch_start(self, *a):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step_times.append(time.perf_counter() - self.t0)
            tokens.append(float(outputs["record"].mask.sum()))

    tiny = str(ROOT / "aropd/assets/tiny-llama")
    model = PrivilegedDistillation(student=tiny, max_new_tokens=64)
    data = PrivilegedDataModule(tokenizer=tiny, batch_size=global_batch // processes, max_new_tokens=64)
    trainer = L.Trainer(
        max_steps=steps + warmup, accelerator="cpu", devices=processes, strategy=FSDP2Strategy(), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()],
    )
    trainer.fit(model, data)
    print("RESULT " + json.dumps({
        "rank": trainer.global_rank, "processes": processes, "step_times_s": step_times[warmup:],
        "tokens": tokens[warmup:], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }), flush=True)


def scale(process_counts: list[int], steps: int, warmup: int, threads: int, global_batch: int) -> list[dict]:
    """Tokens per second (completion tokens of all ranks per step, over the slowest rank's step time)
    and peak RSS per process, for each process count, at the same global batch (each rank gets
    ``global_batch / processes`` prompts and ``threads`` threads). On CPU over gloo this shows what
    splitting a batch over processes costs and gains (all-gathers, reduce-scatters, synced decoding
    against one process's work); on a shared machine, compare processes only within one run."""
    results = []
    for n in process_counts:
        cmd = [sys.executable, __file__, "--_scale_child", str(n), "--steps", str(steps), "--warmup", str(warmup),
               "--threads", str(threads), "--global-batch", str(global_batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        ranks = [json.loads(l[7:]) for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if len(ranks) != n:
            sys.exit(f"{n} processes failed:\n{out.stderr[-3000:]}")
        per_step = [
            (sum(r["tokens"][i] for r in ranks), max(r["step_times_s"][i] for r in ranks))
            for i in range(min(len(r["tokens"]) for r in ranks))
        ]
        results.append({
            "processes": n, "step_s": statistics.median(t for _, t in per_step),
            "tokens_per_s": statistics.median(tok / t for tok, t in per_step),
            "peak_rss_mb_per_process": max(r["peak_rss_mb"] for r in ranks),
            "peak_rss_mb_total": sum(r["peak_rss_mb"] for r in ranks),
        })
    print(f"{'processes':>9} {'step s':>8} {'tok/s':>8} {'peak MB/proc':>13} {'peak MB total':>14}")
    for r in results:
        print(f"{r['processes']:>9} {r['step_s']:>8.3f} {r['tokens_per_s']:>8.0f} {r['peak_rss_mb_per_process']:>13.0f}"
              f" {r['peak_rss_mb_total']:>14.0f}")
    return results


def _rss_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _previous_distillation_loss():
    """The loss as it was before the fused pass (each chunk checkpointed, autograd over the vocabulary),
    kept as the reference in tests/test_loss.py."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_loss import _reference_distillation_loss

    return _reference_distillation_loss


def _loss_inputs(batch: int, tokens: int, hidden: int, vocab: int):
    import torch

    torch.manual_seed(0)
    s_head = torch.nn.Linear(hidden, vocab, bias=False)
    t_head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    student_h = torch.randn(batch, tokens, hidden, requires_grad=True)
    teacher_h = torch.randn(2 * batch, tokens, hidden)
    ids = torch.randint(0, vocab, (batch, tokens))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    return s_head, t_head, student_h, teacher_h, ids, mask


def run_loss_memory(impl: str, chunk: int | None, vocab: int, tokens: int, hidden: int, out: str,
                    top_p: float | None) -> dict:
    """One loss forward + backward (student and both teacher views, diagnostics included) from hidden
    states through 150k-wide output layers, by the fused pass (``impl="fused"``) or the previous one;
    peak RSS above the level before the call (Linux VmHWM, reset through /proc/self/clear_refs so
    set-up and imports do not count)."""
    import torch

    from aropd.loss import Probes, distillation_loss
    from aropd.targets import AnchoredResidual
    from aropd.types import TeacherScores

    torch.set_num_threads(2)
    loss_fn = distillation_loss if impl == "fused" else _previous_distillation_loss()
    s_head, t_head, student_h, teacher_h, ids, mask = _loss_inputs(1, tokens, hidden, vocab)
    target = AnchoredResidual(lam=0.8, clip=5.0)
    probes = Probes(sampled=True, shift=True, residual=True, support_top_p=top_p)

    def run(n: int):
        scores = TeacherScores(full=teacher_h[:1, :n], partial=teacher_h[1:, :n])
        loss, _ = loss_fn(student_h[:, :n], scores, s_head, t_head, ids[:, :n], mask[:, :n],
                          target, chunk_size=chunk, probes=probes)
        loss.backward()
        return loss

    run(2)  # thread pools and allocator warmed outside the measurement
    student_h.grad, s_head.weight.grad = None, None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    loss = run(tokens)
    seconds = time.perf_counter() - t0
    peak = _rss_mb("VmHWM") - before
    torch.save({"loss": loss.detach(), "grad_hidden": student_h.grad, "grad_head": s_head.weight.grad}, out)
    return {"impl": impl, "chunk": chunk, "peak_mb": peak, "seconds": seconds, "loss": float(loss)}


def loss_memory(vocab: int = 150_000, tokens: int = 256, hidden: int = 64,
                settings=(("previous", None), ("previous", 64), ("fused", None), ("fused", 64), ("fused", 32)),
                top_p: float | None = 0.9) -> list[dict]:
    """Peak memory of the loss, fused and previous, unchunked vs. chunked, at a 150k vocabulary (one
    process per setting; the first is the reference the others are compared with).

    One sequence of ``tokens`` completion positions; an fp32 [tokens, vocab] tensor is
    ``tokens · vocab · 4`` bytes (146 MiB here). Values and gradients must agree with the reference."""
    import tempfile

    import torch

    results, saved = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl, chunk in settings:
            out = str(Path(tmp) / f"{impl}-{chunk}.pt")
            args = dict(impl=impl, chunk=chunk, vocab=vocab, tokens=tokens, hidden=hidden, out=out, top_p=top_p)
            # glibc keeps freed small blocks (and, past its adaptive threshold, blocks of tens of MB) in
            # its heap, so RSS would show the allocator's history; served by mmap, every block goes back
            # to the system when freed, and peak RSS follows the live tensors.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
            run = subprocess.run([sys.executable, __file__, "--_loss_child", json.dumps(args)],
                                 capture_output=True, text=True, cwd=ROOT, env=env)
            line = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                sys.exit(f"{impl} chunk {chunk} failed:\n{run.stderr[-3000:]}")
            results.append(json.loads(line[-1][7:]))
            saved[impl, chunk] = torch.load(out)
    ref = saved[settings[0]]
    base = results[0]["peak_mb"]
    print(f"loss at vocab {vocab}, {tokens} positions, hidden {hidden}, support_top_p {top_p}; "
          f"one fp32 [{tokens}, {vocab}] tensor = {tokens * vocab * 4 / 2**20:.0f} MiB")
    print(f"{'path':>9} {'chunk':>6} {'peak MB':>8} {'vs first':>9} {'seconds':>8} {'|Δloss|':>9}"
          f" {'|Δgrad| max':>12}")
    for r in results:
        got = saved[r["impl"], r["chunk"]]
        r["ratio"] = r["peak_mb"] / base
        r["loss_diff"] = float((got["loss"] - ref["loss"]).abs())
        r["grad_diff"] = max(float((got[k] - ref[k]).abs().max()) for k in ("grad_hidden", "grad_head"))
        name = "none" if r["chunk"] is None else str(r["chunk"])
        print(f"{r['impl']:>9} {name:>6} {r['peak_mb']:>8.0f} {r['ratio']:>9.3f} {r['seconds']:>8.2f}"
              f" {r['loss_diff']:>9.1e} {r['grad_diff']:>12.1e}")
    return results


def loss_timing(repeats: int = 5, threads: int = 2,
                sizes=((8192, 8, 128, 256), (150_000, 1, 256, 64)), chunk: int | None = 256) -> list[dict]:
    """Forward + backward time of the loss alone (from hidden states, no diagnostics), per ``(vocab,
    batch, positions, hidden)``: the fused pass and the previous one on AR-OPD's target (both views,
    forward KL), the fused pass on a single view (``FullView``), and a single-view reference — TRL SDFT's
    ``full_logits`` loss (log-softmax of both, ``F.kl_div(..., log_target=True)`` summed over the
    vocabulary, plain autograd, unchunked) toward one view.

    The four alternate within each repeat (so a busy machine slows them alike); medians over
    ``repeats`` of wall and process CPU time, and ratios to the fused pass."""
    import torch
    import torch.nn.functional as F

    from aropd.loss import distillation_loss, sequence_weights
    from aropd.targets import AnchoredResidual, FullView
    from aropd.types import TeacherScores

    torch.set_num_threads(threads)
    previous = _previous_distillation_loss()
    results = []
    for vocab, batch, tokens, hidden in sizes:
        s_head, t_head, student_h, teacher_h, ids, mask = _loss_inputs(batch, tokens, hidden, vocab)
        scores = TeacherScores(full=teacher_h[:batch], partial=teacher_h[batch:])
        ar = AnchoredResidual(lam=0.8, clip=5.0)

        def single_view_reference():  # TRL SDFT's full_logits loss (compute_full_logit_self_distillation_loss)
            with torch.no_grad():
                t_lp = t_head(scores.full).float().log_softmax(-1)
            s_lp = s_head(student_h).float().log_softmax(-1)
            per = F.kl_div(s_lp, t_lp, reduction="none", log_target=True).sum(-1)
            return (per * sequence_weights(mask)).sum()

        impls = {
            "fused": lambda: distillation_loss(student_h, scores, s_head, t_head, ids, mask, ar, chunk_size=chunk)[0],
            "previous": lambda: previous(student_h, scores, s_head, t_head, ids, mask, ar, chunk_size=chunk)[0],
            "fused 1 view": lambda: distillation_loss(student_h, scores, s_head, t_head, ids, mask, FullView(),
                                                      chunk_size=chunk)[0],
            "1-view ref": single_view_reference,
        }
        wall: dict[str, list[float]] = {k: [] for k in impls}
        cpu: dict[str, list[float]] = {k: [] for k in impls}
        for r in range(repeats + 1):  # the first round warms up
            for name, fn in impls.items():
                student_h.grad, s_head.weight.grad = None, None
                t0, c0 = time.perf_counter(), time.process_time()
                fn().backward()
                if r:
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
        med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in impls}
        print(f"loss forward + backward: vocab {vocab}, batch {batch}, {tokens} positions, hidden {hidden}, "
              f"chunk {chunk}, {threads} threads, median of {repeats}")
        print(f"{'':>13} {'wall s':>8} {'cpu s':>8} {'wall / fused':>13} {'cpu / fused':>12}")
        for name, (w, c) in med.items():
            print(f"{name:>13} {w:>8.3f} {c:>8.3f} {w / med['fused'][0]:>13.2f} {c / med['fused'][1]:>12.2f}")
        results.append({"vocab": vocab, "batch": batch, "tokens": tokens, "hidden": hidden, "chunk": chunk,
                        "median_wall_s": {k: v[0] for k, v in med.items()},
                        "median_cpu_s": {k: v[1] for k, v in med.items()}})
    return results


if __name__ == "__main__":
    main()
