"""One whole-process on-policy distillation run with TRL on CPU, instrumented for per-step timing.

TRL's side of the paired comparison (``scripts/bench_step.py --vs-trl`` runs it in TRL's own venv,
``.venv-trl``). Kept as it was written for the first side-by-side measurement of aropd against TRL's
SDFT trainer, so the figures stay comparable with it.

Usage:
  .venv-trl/bin/python scripts/peer/run_opd.py --trainer gkd|distill|sdft [--model build/peer/tiny]
      [--prompts build/peer/prompts.jsonl] [--steps 10] [--bs 8] [--new 128] [--teacher-kind base|ema] [--json OUT.json]

student = --model, teacher = a separate frozen copy loaded from the same folder.
Timing: step = on_step_begin..on_step_end (rollout + teacher fwd + student fwd/bwd + optimizer),
rollout = time inside GenerationMixin.generate, teacher = time inside the teacher's forward,
rest = step - rollout - teacher (student fwd + bwd + loss + optimizer + bookkeeping).
"""
import argparse
import json
import os
import statistics
import sys
import time

T_PROC0 = time.perf_counter()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from transformers.generation.utils import GenerationMixin  # noqa: E402

import trl  # noqa: E402
import accelerate  # noqa: E402

T_IMPORT = time.perf_counter()

# ---------------------------------------------------------------- instrumentation
ACC = {"gen": 0.0, "teacher": 0.0, "gen_calls": 0, "new_tokens": [], "real_tokens": [], "prompt_len": [], "teacher_len": []}
EOS_IDS = []
_orig_generate = GenerationMixin.generate


def _timed_generate(self, *args, **kwargs):
    inp = kwargs.get("input_ids", args[0] if args else None)
    t0 = time.perf_counter()
    out = _orig_generate(self, *args, **kwargs)
    ACC["gen"] += time.perf_counter() - t0
    ACC["gen_calls"] += 1
    seq = out.sequences if hasattr(out, "sequences") else out
    if inp is not None:
        ACC["prompt_len"].append(int(inp.shape[1]))
        ACC["new_tokens"].append(int(seq.shape[1] - inp.shape[1]))
        comp = seq[:, inp.shape[1]:]
        is_eos = torch.isin(comp, torch.tensor(EOS_IDS or [-1]))
        before = is_eos.long().cumsum(-1) - is_eos.long()
        ACC["real_tokens"].append(int((before == 0).sum()))
    return out


GenerationMixin.generate = _timed_generate


def hook_teacher(module):
    state = {}

    def pre(mod, args, kwargs):
        state["t0"] = time.perf_counter()
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            ACC["teacher_len"].append(int(ids.shape[1]))

    def post(mod, args, kwargs, out):
        ACC["teacher"] += time.perf_counter() - state["t0"]

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post, with_kwargs=True)


class StepTimer(TrainerCallback):
    def __init__(self):
        self.steps = []
        self._t0 = None
        self._snap = None
        self.logs = []

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()
        self._snap = (ACC["gen"], ACC["teacher"], len(ACC["new_tokens"]))
        self._c0 = time.process_time()

    def on_step_end(self, args, state, control, **kw):
        dt = time.perf_counter() - self._t0
        g = ACC["gen"] - self._snap[0]
        t = ACC["teacher"] - self._snap[1]
        nt = ACC["new_tokens"][self._snap[2]:]
        rt = ACC["real_tokens"][self._snap[2]:]
        self.steps.append({"step": state.global_step, "step_s": dt, "rollout_s": g, "teacher_s": t,
                           "rest_s": dt - g - t, "gen_len": nt, "real_tokens": sum(rt),
                           "cpu_s": time.process_time() - self._c0})

    def on_log(self, args, state, control, logs=None, **kw):
        if logs:
            self.logs.append({k: (float(v) if isinstance(v, (int, float)) else str(v)) for k, v in logs.items()})


# ---------------------------------------------------------------- data
def load_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def solution(r):
    return f"{r['reasoning']} Answer: {r['answer']}"


def build_dataset(kind, rows):
    if kind == "gkd":
        return Dataset.from_list([
            {"messages": [{"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": solution(r)}]} for r in rows])
    if kind == "distill":
        return Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}]} for r in rows])
    if kind == "sdft":
        return Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                                   "privileged_context": solution(r)} for r in rows])
    raise ValueError(kind)


def common_args(a):
    return dict(
        output_dir=f"{a.out_dir}/{a.trainer}", max_steps=a.steps, per_device_train_batch_size=a.bs,
        gradient_accumulation_steps=1, learning_rate=1e-5, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", bf16=False, fp16=False, gradient_checkpointing=a.gc,
        seed=0, dataloader_num_workers=0, disable_tqdm=True, use_cpu=True, temperature=1.0,
        **({"generation_kwargs": {"min_new_tokens": a.min_new}} if a.min_new else {}),
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trainer", required=True, choices=["gkd", "distill", "sdft"])
    p.add_argument("--model", default="build/peer/tiny")
    p.add_argument("--prompts", default="build/peer/prompts.jsonl")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--teacher-kind", default="base", choices=["base", "ema"])
    p.add_argument("--sdft-mode", default="full_logits", choices=["full_logits", "topk_logits", "sampled_token"])
    p.add_argument("--gc", action="store_true", help="gradient checkpointing on (TRL's default; GKD then generates "
                   "without KV cache)")
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--min-new", type=int, default=0, help="generation min_new_tokens (forces equal lengths)")
    p.add_argument("--out-dir", default="build/peer/out")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    torch.manual_seed(0)
    rows = load_rows(a.prompts)
    ds = build_dataset(a.trainer, rows)
    tok = AutoTokenizer.from_pretrained(a.model)
    EOS_IDS.append(tok.eos_token_id)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    student = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    timer = StepTimer()

    if a.trainer == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer
        teacher = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        teacher.requires_grad_(False).eval()
        hook_teacher(teacher)
        cfg = GKDConfig(**common_args(a), lmbda=1.0, beta=0.0, max_new_tokens=a.new, max_length=1024)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds,
                             processing_class=tok, callbacks=[timer])
    elif a.trainer == "distill":
        from trl import DistillationConfig, DistillationTrainer
        teacher = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        teacher.requires_grad_(False).eval()
        hook_teacher(teacher.model)  # DistillationTrainer calls the teacher backbone; lm_head is in the chunked loss
        cfg = DistillationConfig(**common_args(a), beta=0.0, max_completion_length=a.new, top_k=0, top_p=1.0)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds,
                                      processing_class=tok, callbacks=[timer])
    else:
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer
        alpha = 1.0 if a.sdft_mode == "sampled_token" else 0.0
        cfg = SDFTConfig(**common_args(a), distillation_mode=a.sdft_mode, distillation_alpha=alpha,
                         teacher_model_kind=a.teacher_kind, num_generations=1,
                         max_completion_length=a.new, max_prompt_length=512)
        trainer = SDFTTrainer(model=student, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
        hook_teacher(trainer.teacher_model)

    T_INIT = time.perf_counter()
    out = trainer.train()
    T_TRAIN = time.perf_counter()

    st = timer.steps
    def med(k, xs=st):
        v = [s[k] for s in xs]
        return {"median": statistics.median(v), "min": min(v), "max": max(v)} if v else None
    steady = st[1:] if len(st) > 1 else st
    res = {
        "trainer": a.trainer, "model": a.model, "steps": a.steps, "bs": a.bs, "max_new": a.new,
        "sdft_mode": a.sdft_mode if a.trainer == "sdft" else None,
        "teacher_kind": a.teacher_kind if a.trainer == "sdft" else None,
        "gradient_checkpointing": a.gc,
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(), "tag": a.tag, "min_new": a.min_new,
        "peak_rss_mb": __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 1024,
        "import_s": T_IMPORT - T_PROC0, "init_s": T_INIT - T_IMPORT, "train_s": T_TRAIN - T_INIT,
        "proc_s_to_end_of_train": T_TRAIN - T_PROC0,
        "step_all": med("step_s"), "step_excl_first": med("step_s", steady),
        "rollout_excl_first": med("rollout_s", steady), "teacher_excl_first": med("teacher_s", steady),
        "rest_excl_first": med("rest_s", steady),
        "gen_len_all": [x for s in st for x in s["gen_len"]],
        "prompt_len_padded": ACC["prompt_len"], "teacher_len_padded": ACC["teacher_len"][: len(st)],
        "per_step": st, "train_output": {k: float(v) for k, v in out.metrics.items()},
        "logs": timer.logs,
    }
    line = (f"[{a.trainer}] steps={len(st)} step median {res['step_all']['median']:.3f}s "
            f"(min {res['step_all']['min']:.3f} max {res['step_all']['max']:.3f}); excl first: "
            f"step {res['step_excl_first']['median']:.3f} rollout {res['rollout_excl_first']['median']:.3f} "
            f"teacher {res['teacher_excl_first']['median']:.3f} rest {res['rest_excl_first']['median']:.3f}; "
            f"import {res['import_s']:.1f}s init {res['init_s']:.1f}s train {res['train_s']:.1f}s")
    print(line, flush=True)
    if a.json:
        if a.json.endswith(".jsonl"):  # one line per run, appended (for repeated whole-process timing)
            with open(a.json, "a") as f:
                f.write(json.dumps(res) + "\n")
        else:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
