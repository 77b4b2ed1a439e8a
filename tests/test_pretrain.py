"""aropd.experiments.pretrain (scripts/pretrain_base.py): a tiny real run, its outputs on reload, and the
committed toy-base model."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from aropd.experiments import pretrain as pb
from aropd.experiments.pretrain import PretrainArgs
from aropd.toy import STEP_TOKENS, TOY_TEMPLATE, make_problem, make_split, read_split, write_splits
from aropd.views import partial_view, render

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(
    hidden=48, layers=2, heads=2, intermediate=96, vocab_size=320, max_positions=512, min_steps=1, max_steps=3,
    long_frac=0.0, tokenizer_problems=300, steps=120, batch_tokens=2048, lr=1e-2, warmup=10, log_every=20,
    eval_batch=8, kl_limit=8, copy_frac=0.0, copy_partial_frac=0.0, prefix_frac=0.0, stop_at=None, probe_every=0,
    # One thread: on a shared 2-core machine two OpenMP threads spin-wait and run several times slower.
    threads=1,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    write_splits(root / "toy", {"train": 16, "val": 16, "test": 12}, seed=5, min_steps=1, max_steps=3)
    result = pb.pretrain(PretrainArgs(**TINY, splits=str(root / "toy"), out=str(root / "model"), seed=3))
    return root, result


def response_ids(tok, problem) -> list[int]:
    """The reference trace + EOS that the student is trained to emit after the prompt."""
    return pb.example(tok, TOY_TEMPLATE, problem, 0.5).reference


def _unigram_entropy(tok, problems) -> float:
    """Entropy (nats) of the response-token frequencies: the best loss of a model that ignores context."""
    counts = Counter(i for p in problems for i in response_ids(tok, p))
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def test_loss_falls_below_what_context_free_prediction_allows(tiny_run):
    root, result = tiny_run
    report = result.report
    # At init the model is near uniform over the vocabulary.
    assert abs(report["first_loss"] - math.log(report["vocab_size"])) < 0.5
    # A model that ignores context cannot beat the unigram entropy of the response tokens (~3.2
    # nats here); beating it clearly means the model reads the prompt and its own prefix.
    bound = _unigram_entropy(result.tokenizer, make_split(2000, seed=11, min_steps=1, max_steps=3))
    assert 1.5 < bound < 3.5
    assert report["final_loss"] < bound - 0.5, (report["final_loss"], bound)
    assert [e["loss"] for e in report["log"]][-1] < report["log"][0]["loss"]


def test_outputs_reload_with_identical_logits_and_ids(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, result = tiny_run
    model_dir = root / "model"
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    t = TOY_TEMPLATE
    p = read_split(root / "toy" / "test.jsonl")[0]
    texts = [p["question"], t.format_trace(p["reasoning"], p["answer"]), t.teacher_user, "#12 +7 on 07. 123+45=168."]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == result.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # Digits are single tokens, so arithmetic stays digit-wise.
    assert tok.convert_ids_to_tokens(tok("1234", add_special_tokens=False)["input_ids"]) == list("1234")
    # Step labels and operations are one token each, so "which operation is next" is a one-token match.
    pieces = tok.convert_ids_to_tokens(tok("#7 -3 on 05=02. #12 +9 on 02=11.", add_special_tokens=False)["input_ids"])
    assert {"#7", "#12"} <= set(pieces) and sum(p in STEP_TOKENS for p in pieces) == 4
    for msgs in (t.student_messages(p["question"]), t.teacher_messages(p["question"], p["reasoning"], p["answer"])):
        assert render(tok, msgs) == render(result.tokenizer, msgs)
    assert tok.eos_token == "<|end|>" and tok.eos_token_id == result.tokenizer.eos_token_id
    # The response is the reference trace and EOS, after the prompt the view renders.
    trace = tok(t.format_trace(p["reasoning"], p["answer"]), add_special_tokens=False)["input_ids"]
    assert response_ids(tok, p) == trace + [tok.eos_token_id]
    ids, labels = pb.encode(tok, t, p, "partial", 0.5)
    prompt = render(tok, t.teacher_messages(p["question"], partial_view(p["reasoning"], 0.5), p["answer"]))
    assert ids == prompt + trace + [tok.eos_token_id] and labels == [-100] * len(prompt) + trace + [tok.eos_token_id]
    ids = torch.tensor([ids])
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_report_is_written_and_consistent(tiny_run):
    root, result = tiny_run
    saved = json.loads((root / "model" / "pretrain.json").read_text())
    assert saved["seed"] == 3 and saved["args"]["steps"] == 120
    assert saved["params"] == sum(p.numel() for p in result.model.parameters())
    assert saved["test"]["n"] == 12 and 0.0 <= saved["test"]["accuracy"] <= 1.0
    # Every tiny test problem is within the training step range: the short group is all of them.
    assert saved["views_by_length"] == {"short": saved["views"]}
    assert sum(b["n"] for b in saved["test"]["by_length"].values()) == 12
    views = saved["views"]
    assert views["kl_full_partial_per_token"] > 0
    # Shown + hidden tokens make up the total.
    total = views["kl_full_partial_hidden_tokens"] * views["hidden_token_fraction"] + views[
        "kl_full_partial_shown_tokens"
    ] * (1 - views["hidden_token_fraction"])
    assert total == pytest.approx(views["kl_full_partial_per_token"], rel=1e-6)
    for v in ("student", "full", "partial"):  # the same for each prompt's NLL: the copy figures are recorded
        f = views["hidden_token_fraction"]
        total = views[f"nll_{v}_hidden_tokens"] * f + views[f"nll_{v}_shown_tokens"] * (1 - f)
        assert total == pytest.approx(views[f"nll_{v}_per_token"], rel=1e-6)
    assert saved["wall_seconds"] > 0 and saved["final_loss"] == pytest.approx(result.report["final_loss"])


def test_kl_matches_a_direct_computation(tiny_run):
    root, result = tiny_run
    tok, model, t = result.tokenizer, result.model.eval(), TOY_TEMPLATE
    problems = read_split(root / "toy" / "test.jsonl")[:3]
    got = pb.view_divergence(model, tok, t, problems, 0.5, batch_size=2)
    total, n = 0.0, 0
    with torch.no_grad():
        for p in problems:
            resp = response_ids(tok, p)
            lps = []
            for reasoning in (p["reasoning"], partial_view(p["reasoning"], 0.5)):
                prompt = render(tok, t.teacher_messages(p["question"], reasoning, p["answer"]))
                logits = model(input_ids=torch.tensor([prompt + resp])).logits[0]
                lps.append(torch.log_softmax(logits[len(prompt) - 1 : -1].double(), -1))
            total += (lps[0].exp() * (lps[0] - lps[1])).sum().item()
            n += len(resp)
    assert got["kl_full_partial_per_token"] == pytest.approx(total / n, rel=1e-4, abs=1e-6)


def test_copy_figures_match_a_naive_per_position_loop(tiny_run):
    """view_divergence (batched, padded, offsets from the tokenizer) against one forward per position,
    each token's place in the trace found by decoding the ids before it."""
    root, result = tiny_run
    tok, model, t = result.tokenizer, result.model.eval(), TOY_TEMPLATE
    problems = read_split(root / "toy" / "test.jsonl")[:3]
    got = pb.view_divergence(model, tok, t, problems, 0.5, batch_size=2)
    open_tag = "<reasoning>"
    sums = {(name, part): 0.0 for name in ("student", "full", "partial", "kl") for part in ("hidden", "shown")}
    n = {"hidden": 0, "shown": 0}
    with torch.no_grad():
        for p in problems:
            resp = response_ids(tok, p)
            prompts = {
                "student": render(tok, t.student_messages(p["question"])),
                "full": render(tok, t.teacher_messages(p["question"], p["reasoning"], p["answer"])),
                "partial": render(tok, t.teacher_messages(p["question"], partial_view(p["reasoning"], 0.5), p["answer"])),
            }
            cut, end = len(open_tag) + len(partial_view(p["reasoning"], 0.5)), len(open_tag) + len(p["reasoning"])
            for k, token in enumerate(resp):
                start = len(tok.decode(resp[:k]))  # where token k begins in the trace text
                part = "hidden" if cut <= start < end and k < len(resp) - 1 else "shown"
                n[part] += 1
                lp = {}
                for view, prompt in prompts.items():
                    logits = model(input_ids=torch.tensor([prompt + resp[:k]])).logits[0, -1]
                    lp[view] = torch.log_softmax(logits.double(), -1)
                    sums[(view, part)] -= lp[view][token].item()
                sums[("kl", part)] += (lp["full"].exp() * (lp["full"] - lp["partial"])).sum().item()
    assert n["hidden"] > 0 and n["shown"] > 0
    assert got["hidden_token_fraction"] == pytest.approx(n["hidden"] / (n["hidden"] + n["shown"]))
    for part in ("hidden", "shown"):
        assert got[f"kl_full_partial_{part}_tokens"] == pytest.approx(sums[("kl", part)] / n[part], rel=1e-4, abs=1e-6)
        for view in ("student", "full", "partial"):
            assert got[f"nll_{view}_{part}_tokens"] == pytest.approx(sums[(view, part)] / n[part], rel=1e-4, abs=1e-6)
    assert got["copy_nll_ratio_hidden"] == pytest.approx(sums[("full", "hidden")] / sums[("student", "hidden")], rel=1e-4)
    assert got["kl_hidden_to_shown_ratio"] == pytest.approx(
        (sums[("kl", "hidden")] / n["hidden"]) / (sums[("kl", "shown")] / n["shown"]), rel=1e-4)


def test_slipped_trace_by_hand():
    p = {"question": "Working mod 100, apply -2 and +5 in turn from #3 down to #1, starting at 98.",
         "reasoning": "#3 -2 on 98=96. #2 +5 on 96=01. #1 -2 on 01=99.", "answer": "99"}
    # 96 slipped by 50 is 46; on 46, +5 gives 51 (the response's own chain), where the reference has 01
    assert pb.slipped_trace(p, 0) == ("#3 -2 on 98=46. #2 +5 on 46=", 51, 1)
    # 01 slipped is 51; on 51, -2 gives 49, the reference 99
    assert pb.slipped_trace(p, 1) == ("#3 -2 on 98=96. #2 +5 on 96=51. #1 -2 on 51=", 49, 99)
    with pytest.raises(ValueError, match="needs a step after it"):
        pb.slipped_trace(p, 2)


def test_slip_report_matches_a_naive_token_by_token_product(tiny_run):
    """slip_report against the probability of each value as a product over its tokens, one forward per
    token, the slipped text written out here from the problem's own steps."""
    import random

    _, result = tiny_run
    tok, model, t = result.tokenizer, result.model.eval(), TOY_TEMPLATE
    rng = random.Random(7)
    problems = [make_problem(rng, n) for n in (2, 3, 5, 6)]
    got = pb.slip_report(model, tok, t, problems, 0.5)

    def prob(prompt, text, value):
        head = tok("<reasoning>" + text, add_special_tokens=False)["input_ids"]
        ids = tok("<reasoning>" + text + f"{value:02d}", add_special_tokens=False)["input_ids"]
        out = 1.0
        with torch.no_grad():
            for k in range(len(head), len(ids)):
                logits = model(input_ids=torch.tensor([prompt + ids[:k]])).logits[0, -1]
                out *= torch.softmax(logits.double(), -1)[ids[k]].item()
        return out

    want = {}
    for p in problems:
        steps = p["reasoning"].split(" ")  # "#i", "<op>k", "on", "aa=bb." per step
        steps = [" ".join(steps[i : i + 4]) for i in range(0, len(steps), 4)]
        shown = partial_view(p["reasoning"], 0.5).count(".")
        prompts = {"student": render(tok, t.student_messages(p["question"])),
                   "full": render(tok, t.teacher_messages(p["question"], p["reasoning"], p["answer"])),
                   "partial": render(tok, t.teacher_messages(p["question"], partial_view(p["reasoning"], 0.5), p["answer"]))}
        for part, j in (("hidden", shown), ("shown", 0)):
            if (part == "hidden" and j + 1 >= len(steps)) or (part == "shown" and shown < 2):
                continue
            a, b = steps[j].split(" on ")[1].rstrip(".").split("=")
            slipped = f"{(int(b) + 50) % 100:02d}"
            label, op = steps[j + 1].split(" ")[:2]
            text = " ".join(steps[:j] + [steps[j].replace(f"={b}.", f"={slipped}.")]) + f" {label} {op} on {slipped}="
            from aropd.toy import apply_op

            own, ref = apply_op(int(slipped), op[0], int(op[1:])), int(steps[j + 1].split("=")[1].rstrip("."))
            w = want.setdefault(part, {"problems": 0})
            w["problems"] += 1
            for view, prompt in prompts.items():
                for name, value in (("own", own), ("ref", ref)):
                    w[f"p_{name}_{view}"] = w.get(f"p_{name}_{view}", 0.0) + prob(prompt, text, value)
    assert set(got) == set(want) == {"hidden", "shown"}
    for part, w in want.items():
        assert got[part]["problems"] == w["problems"]
        assert got[part] == pytest.approx({k: (v / w["problems"] if k != "problems" else v) for k, v in w.items()},
                                          rel=1e-4, abs=1e-7), part


def test_probes_leave_the_weights_alone_and_log_each_probed_models_figures(tiny_run, tmp_path):
    root, _ = tiny_run
    # max_steps 1: the longer val problems are the probe's long ones
    short = {**TINY, "steps": 3, "eval_limit": 2, "kl_limit": 2, "splits": str(root / "toy"), "max_steps": 1}
    pb.pretrain(PretrainArgs(**short, out=str(tmp_path / "a"), seed=3))
    probed = pb.pretrain(PretrainArgs(**{**short, "probe_every": 3}, out=str(tmp_path / "b"), seed=3, probe_size=4))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    # The last step is probed: its figures are the final model's on the short val problems.
    (entry,) = [e for e in probed.report["log"] if "probe_accuracy" in e]
    assert entry["step"] == 3
    probe = [p for p in read_split(root / "toy" / "val.jsonl") if len(p["reasoning"]) < 200][:4]
    views = pb.view_divergence(probed.model, probed.tokenizer, TOY_TEMPLATE, probe, 0.5)
    assert entry["probe_copy_ratio"] == pytest.approx(views["copy_nll_ratio_hidden"], rel=1e-6)
    assert entry["probe_kl_ratio"] == pytest.approx(views["kl_hidden_to_shown_ratio"], rel=1e-6)
    long = [p for p in read_split(root / "toy" / "val.jsonl") if pb.n_steps(p) > 1][:8]
    assert len(long) == 8
    long_views = pb.view_divergence(probed.model, probed.tokenizer, TOY_TEMPLATE, long, 0.5)
    assert entry["probe_long_copy_ratio"] == pytest.approx(long_views["copy_nll_ratio_hidden"], rel=1e-6)
    acc = pb.greedy_accuracy(probed.model, probed.tokenizer, TOY_TEMPLATE, probe, TINY["eval_batch"])
    assert entry["probe_accuracy"] == acc["accuracy"]


def test_views_by_length_split_at_the_training_step_range(tiny_run):
    import random

    from aropd.toy import make_problem

    _, result = tiny_run
    rng = random.Random(1)
    short, long = [make_problem(rng, 2), make_problem(rng, 3)], [make_problem(rng, 4), make_problem(rng, 6)]
    got = pb.views_report(result.model, result.tokenizer, [long[0], *short, long[1]], 0.5, max_steps=3)
    direct = lambda ps: pb.view_divergence(result.model, result.tokenizer, TOY_TEMPLATE, ps, 0.5)  # noqa: E731
    # One pass over all problems batches them differently (other padding), hence the tolerance.
    assert got["views_by_length"]["short"] == pytest.approx(direct(short), rel=1e-4)
    assert got["views_by_length"]["long"] == pytest.approx(direct(long), rel=1e-4)
    assert got["views"] == pytest.approx(direct([long[0], *short, long[1]]))


def test_copy_curriculum_and_continuing_from_a_model(tiny_run, tmp_path):
    """copy_frac 0 is the run without a copy curriculum, bit for bit; copy_frac > 0 changes the data; init
    continues from a saved model with its tokenizer."""
    root, _ = tiny_run
    short = {**TINY, "steps": 4, "eval_limit": 2, "kl_limit": 2, "splits": str(root / "toy")}

    def weights(out, **kw):
        pb.pretrain(PretrainArgs(**{**short, **kw}, out=str(out), seed=3))
        return (out / "model.safetensors").read_bytes()

    plain = weights(tmp_path / "a")
    assert weights(tmp_path / "b", copy_frac=0.0) == plain
    assert weights(tmp_path / "c", copy_frac=0.5) != plain
    cont = weights(tmp_path / "d", init=str(root / "model"))
    assert cont != plain
    report = json.loads((tmp_path / "d" / "pretrain.json").read_text())
    assert report["args"]["init"] == str(root / "model") and report["params"] == tiny_run[1].report["params"]
    # the continued run's seen problems include those of the run it started from
    assert pb.seen_questions(tiny_run[1].report) <= pb.seen_questions(report)
    with pytest.raises(ValueError, match="copy_frac must be in"):
        pb.pretrain(PretrainArgs(**{**short, "copy_frac": 1.0}, out=str(tmp_path / "e")))
    with pytest.raises(ValueError, match=r"stop_at must be in \[1, steps=4\], got 5"):
        pb.pretrain(PretrainArgs(**{**short, "stop_at": 5}, out=str(tmp_path / "f")))
    with pytest.raises(ValueError, match="copy_long_frac must be in .* needs copy_frac > 0, got 0.5 with copy_frac 0.0"):
        pb.pretrain(PretrainArgs(**{**short, "copy_long_frac": 0.5}, out=str(tmp_path / "g")))
    with pytest.raises(ValueError, match="copy_partial_frac must be in .* needs copy_frac > 0, got 0.5 with copy_frac 0.0"):
        pb.pretrain(PretrainArgs(**{**short, "copy_partial_frac": 0.5}, out=str(tmp_path / "i")))
    with pytest.raises(ValueError, match=r"prefix_frac must be in \[0, 1\) and prefix_steps >= 1, got 0.1 and 0"):
        pb.pretrain(PretrainArgs(**{**short, "prefix_frac": 0.1, "prefix_steps": 0}, out=str(tmp_path / "j")))
    with pytest.raises(ValueError, match="snapshot_every must be >= 0"):
        pb.pretrain(PretrainArgs(**{**short, "snapshot_every": -1}, out=str(tmp_path / "h")))


def test_seen_questions_hold_every_problem_a_continued_run_trained_on(tiny_run, tmp_path, monkeypatch):
    import shutil

    root, first = tiny_run
    trained_on = []
    real_encode = pb.encode

    def recording(tok, template, problem, *a, **kw):  # encode is the training path only (evaluation uses example)
        trained_on.append(problem["question"])
        return real_encode(tok, template, problem, *a, **kw)

    monkeypatch.setattr(pb, "encode", recording)
    start = shutil.copytree(root / "model", tmp_path / "start")
    args = PretrainArgs(**{**TINY, "steps": 6, "eval_limit": 2, "kl_limit": 2, "copy_frac": 0.4, "copy_long_frac": 0.5,
                           "copy_partial_frac": 0.5, "prefix_frac": 0.2, "long_frac": 0.1, "long_steps": (5, 7)},
                        splits=str(root / "toy"), out=str(tmp_path / "b"), seed=4, init=str(start))
    report = pb.pretrain(args).report
    assert report["init_report"]["args"] == first.report["args"]
    shutil.rmtree(start)  # the continued run's report alone says what both runs drew
    seen = pb.seen_questions(report)
    assert len(trained_on) > 100 and set(trained_on) <= seen
    assert pb.seen_questions(first.report) <= seen
    # Prefix and long copy examples draw their problems apart from the stream: a replay of the
    # stream alone (the draws of tokenizer_problems + examples_seen + look-ahead) misses them.
    exclude = {r["question"] for s in ("train", "val", "test") for r in read_split(root / "toy" / f"{s}.jsonl")}
    stream = iter(pb.ProblemStream(4, 1, 3, 0.1, (5, 7), exclude))
    stream_only = {next(stream)["question"] for _ in range(300 + report["examples_seen"] + 2 * pb.POOL)}
    assert not set(trained_on) <= stream_only


def test_snapshots_are_the_models_that_stop_at_gives(tiny_run, tmp_path):
    root, _ = tiny_run
    short = {**TINY, "steps": 4, "eval_limit": 2, "kl_limit": 2, "splits": str(root / "toy"), "copy_frac": 0.3}
    pb.pretrain(PretrainArgs(**short, out=str(tmp_path / "a"), seed=3, snapshot_every=2))
    pb.pretrain(PretrainArgs(**{**short, "stop_at": 2}, out=str(tmp_path / "b"), seed=3))
    weights = lambda d: (d / "model.safetensors").read_bytes()  # noqa: E731
    assert sorted(p.name for p in (tmp_path / "a" / "snapshots").iterdir()) == ["step-2", "step-4"]
    assert weights(tmp_path / "a" / "snapshots" / "step-2") == weights(tmp_path / "b")
    assert weights(tmp_path / "a" / "snapshots" / "step-4") == weights(tmp_path / "a")
    assert (tmp_path / "a" / "snapshots" / "step-2" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json").read_bytes()


def test_curriculum_shares_and_the_long_copy_problems():
    import random
    from itertools import islice

    from aropd.toy import check_reasoning

    rng = random.Random(0)
    exclude = {make_split(1, seed=s, min_steps=7, max_steps=7)[0]["question"] for s in range(50)}
    args = PretrainArgs(**{**TINY, "copy_frac": 0.4, "copy_long_frac": 0.5, "long_steps": (7, 9), "mix": (0.5, 0.5, 0.0)})
    stream = pb.ProblemStream(1, 1, 3, 0.0, (7, 9), exclude)
    draws = list(islice(pb.curriculum(iter(stream), rng, args, exclude), 4000))
    kinds = Counter(k for k, _ in draws)
    assert kinds["partial"] == 0 and abs(kinds["copy"] / 4000 - 0.4) < 0.03
    assert abs(kinds["student"] / kinds["full"] - 1) < 0.15
    copies = [p for k, p in draws if k == "copy"]
    long = [p for p in copies if pb.n_steps(p) > 3]
    assert abs(len(long) / len(copies) - 0.5) < 0.05
    assert {pb.n_steps(p) for p in long} == {7, 8, 9}
    assert all(pb.n_steps(p) <= 3 for k, p in draws if k != "copy")
    assert not {p["question"] for p in long} & exclude
    # Copy problems carry scrambled traces: nearly all are wrong worked solutions (a random chain can
    # happen to be right: 1 in 100 per step).
    wrong = sum(bool(check_reasoning(p)) for p in long)
    assert wrong / len(long) > 0.95
    # With no long share, the copy problems are the stream's (the run without it is unchanged).
    plain = PretrainArgs(**{**TINY, "copy_frac": 0.4})
    again = list(islice(pb.curriculum(iter(pb.ProblemStream(1, 1, 3, 0.0, (7, 9), exclude)), random.Random(0), plain,
                                      exclude), 500))
    assert all(pb.n_steps(p) <= 3 for _, p in again)


def test_prefix_and_partial_copy_examples():
    import random
    from itertools import islice

    from aropd.toy import check_reasoning

    exclude = {make_split(1, seed=s, min_steps=7, max_steps=7)[0]["question"] for s in range(50)}
    args = PretrainArgs(**{**TINY, "copy_frac": 0.4, "copy_partial_frac": 0.5, "prefix_frac": 0.2, "long_steps": (7, 9)})
    stream = pb.ProblemStream(1, 2, 3, 0.0, (7, 9), exclude)  # 2-3 steps: the partial view shows one whole
    draws = list(islice(pb.curriculum(iter(stream), random.Random(0), args, exclude), 5000))
    kinds = Counter(k for k, _ in draws)
    # prefix first (0.2), then of the rest a 0.4 copy share, half of it partial-view copies
    assert abs(kinds["prefix"] / 5000 - 0.2) < 0.02
    assert abs(kinds["copy"] / 5000 - 0.16) < 0.02 and abs(kinds["copy_partial"] / 5000 - 0.16) < 0.02
    prefixes = [p for k, p in draws if k == "prefix"]
    assert {pb.n_steps(p) for p in prefixes} == {7, 8, 9} and not {p["question"] for p in prefixes} & exclude
    assert all(not check_reasoning(p) for p in prefixes)  # worked solutions: a prefix is the real trace
    # A partial copy: the steps the partial view shows whole are random, the rest follow from them.
    partial_copies = [p for k, p in draws if k == "copy_partial"]
    assert sum(bool(check_reasoning(p)) for p in partial_copies) / len(partial_copies) > 0.95
    for p in partial_copies:
        steps = p["reasoning"].split(" #")
        shown = partial_view(p["reasoning"], 0.5).count(".")
        value = int(steps[shown].split(" on ")[1][:2])  # the input of the first step not shown whole
        for step in steps[shown:]:
            op = step.split()[1]
            value = (value + int(op[1:]) * (1 if op[0] == "+" else -1)) % 100
        assert p["answer"] == f"{value:02d}"

    # the prefix example's target: the student prompt, then the first steps of the trace, no EOS
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOY_BASE)
    prob = {"question": "Working mod 100, apply +6 and +5 in turn from #78 down to #1, starting at 62.",
            "reasoning": "#78 +6 on 62=68. #77 +5 on 68=73. #76 +6 on 73=79.", "answer": "79"}
    ids, labels = pb.encode(tok, TOY_TEMPLATE, prob, "student", 0.5, prefix_steps=2)
    ex = pb.example(tok, TOY_TEMPLATE, prob, 0.5)
    target = [t for t in labels if t != -100]
    assert ids == ex.student + target and labels[: len(ex.student)] == [-100] * len(ex.student)
    assert tok.decode(target) == "<reasoning>#78 +6 on 62=68. #77 +5 on 68=73."
    assert target == ex.reference[: len(target)] and tok.eos_token_id not in target

    # A partial copy example's target is the steps its partial view shows whole, after the partial prompt.
    args = PretrainArgs(**{**TINY, "copy_frac": 0.99, "copy_partial_frac": 1.0})
    ten = make_problem(random.Random(7), 10)
    kind, scrambled = next(pb.curriculum(iter([ten]), random.Random(0), args, set()))
    assert kind == "copy_partial" and partial_view(scrambled["reasoning"], 0.5).count(".") == 5
    ids, labels = pb.encode(tok, TOY_TEMPLATE, scrambled, "partial", 0.5, 5)
    target = [t for t in labels if t != -100]
    assert ids[: len(ids) - len(target)] == pb.example(tok, TOY_TEMPLATE, scrambled, 0.5).partial
    assert tok.decode(target) == "<reasoning>" + " #".join(scrambled["reasoning"].split(" #")[:5])
    assert tok.decode(target).endswith(" #6 " + scrambled["reasoning"].split(" #6 ")[1].split(" #5")[0])


def test_extract_answer():
    assert pb.extract_answer("<reasoning>#1 1+2=3.</reasoning><answer>3</answer>") == 3
    assert pb.extract_answer("<answer> 07 </answer>") == 7
    assert pb.extract_answer("<answer>x</answer>") is None
    assert pb.extract_answer("no tags 3") is None


# ---- the committed toy base model (aropd/assets/toy-base, the quickstart's student) ----------------

TOY_BASE = ROOT / "aropd" / "assets" / "toy-base"


def _report() -> dict:
    return json.loads((TOY_BASE / "pretrain.json").read_text())


def test_committed_toy_base_meets_the_bar_and_is_the_scripts_default_output():
    report = _report()
    assert 0.20 <= report["test"]["accuracy"] <= 0.60 and report["test"]["n"] == 128
    assert report["params"] <= 10_000_000
    assert sum(f.stat().st_size for f in TOY_BASE.iterdir()) < 20e6
    # An artifact pretrained once: up to an hour of one CPU thread, both runs together.
    assert report["threads"] == 1 and report["wall_seconds"] + report["init_report"]["wall_seconds"] <= 60 * 60
    # The teacher views really differ on the base model where the partial view hides the trace, on the
    # short problems (the ones both views copy), and far more there than where it shows it.
    short = report["views_by_length"]["short"]
    assert short["kl_full_partial_hidden_tokens"] > 0.05
    assert short["kl_full_partial_hidden_tokens"] > 3 * short["kl_full_partial_shown_tokens"]
    # Made by two runs of scripts/pretrain_base.py: PretrainArgs' defaults, then `--long-stage --init
    # runs/toy-base-stage1` from their model.
    defaults = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(PretrainArgs()).items()}
    assert report["init_report"]["args"] == defaults
    assert report["args"] == {**defaults, **pb.LONG_STAGE, "init": "runs/toy-base-stage1"}


def test_committed_toy_base_counts_long_problems_down_to_the_last_step():
    """A long problem finishes only if its greedy trace names every step label from the question's ``#n``
    down to ``#1``, in order. Labels are single tokens and the highest are the rarest in pretraining:
    an early base wrote ``#37`` for ``#78`` (1 of these 24 started right), then, with the first labels
    learnt, skipped among ``#70``-``#90`` (15 of 24 whole, 1 of the 6 with 70 steps or more)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aropd.data import pad

    tok = AutoTokenizer.from_pretrained(TOY_BASE)
    model = AutoModelForCausalLM.from_pretrained(TOY_BASE).eval()
    long = [p for s in ("val", "test") for p in read_split(ROOT / "aropd/assets/toy" / f"{s}.jsonl") if pb.n_steps(p) > 12]
    assert len(long) == 24
    whole = []
    for i in range(0, len(long), 8):
        chunk = long[i : i + 8]
        ids, mask = pad([pb.example(tok, TOY_TEMPLATE, p, 0.5).student for p in chunk], tok.pad_token_id, left=True)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1024, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for p, o in zip(chunk, out):
            labels = [int(x) for x in re.findall(r"#(\d+) ", tok.decode(o[ids.shape[1]:], skip_special_tokens=True))]
            whole.append((pb.n_steps(p), labels == list(range(pb.n_steps(p), 0, -1))))
    assert sum(ok for _, ok in whole) >= 20, whole  # measured: 24 of 24
    assert sum(ok for n, ok in whole if n >= 70) >= 4, whole  # measured: 6 of 6


def test_toy_base_tokenizer_gives_the_length_knobs_token_counts():
    from transformers import AutoTokenizer

    from aropd.toy import approx_response_tokens, make_problem

    tok = AutoTokenizer.from_pretrained(TOY_BASE)
    rng = __import__("random").Random(0)
    for steps in (1, 2, 8, 20, 57, 90):
        p = make_problem(rng, steps)
        assert len(response_ids(tok, p)) == approx_response_tokens(steps), steps


@pytest.mark.slow
def test_committed_toy_base_reproduces_its_reported_accuracy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = _report()
    tok = AutoTokenizer.from_pretrained(TOY_BASE)
    model = AutoModelForCausalLM.from_pretrained(TOY_BASE)
    problems = read_split(ROOT / "aropd" / "assets" / "toy" / "test.jsonl")
    got = pb.greedy_accuracy(model, tok, TOY_TEMPLATE, problems, report["args"]["eval_batch"])
    assert got["accuracy"] == report["test"]["accuracy"]


@pytest.mark.slow
def test_committed_toy_base_copy_figures_reproduce():
    """The copy figures in the committed pretrain.json are what view_divergence finds on that model now."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = _report()
    a = report["args"]
    tok = AutoTokenizer.from_pretrained(TOY_BASE)
    model = AutoModelForCausalLM.from_pretrained(TOY_BASE)
    problems = read_split(ROOT / a["splits"] / "test.jsonl")[: a["kl_limit"]]
    got = pb.views_report(model, tok, problems, a["partial_ratio"], a["max_steps"])
    assert set(got["views"]) == set(report["views"]) and set(got["views_by_length"]) == {"short", "long"}
    for part, figures in report["after_slip"].items():
        assert got["after_slip"][part] == pytest.approx(figures, rel=1e-4), part
    # The hindsight shortcut: right after a slip in the steps the partial view hides, the full view
    # still gives the reference's next result (measured 0.83), which the response's own steps do not
    # lead to (0.014); the partial view and the student follow the response (0.47 and 0.50 against
    # 0.02). Where the partial view shows the next step, both views give the reference's.
    hidden, shown = report["after_slip"]["hidden"], report["after_slip"]["shown"]
    assert hidden["problems"] >= 50 and shown["problems"] >= 40
    assert hidden["p_ref_full"] > 0.5 and hidden["p_ref_full"] > 10 * hidden["p_own_full"]
    for view in ("partial", "student"):
        assert hidden[f"p_own_{view}"] > 10 * hidden[f"p_ref_{view}"], view
    assert shown["p_ref_partial"] > 0.5 and shown["p_ref_full"] > 0.5
    # Means of thousands of fp32 log-probs: another torch or transformers build sums them in another order and
    # moves them by up to 1.5e-7 nats (a few parts in 1e4 of the smallest, 0.0006).
    for key, value in report["views"].items():
        assert got["views"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    for group, figures in report["views_by_length"].items():
        assert got["views_by_length"][group] == pytest.approx(figures, rel=1e-4, abs=1e-6), group
    # This base's full view copies the example trace, short and long: it predicts the tokens the
    # partial view hides far better than the question alone (the bar: at most half the student's NLL;
    # measured 0.05 on the short problems, 0.002 on the long, 0.007 over all). Its partial view copies
    # the steps it shows, so the views agree there and disagree where only the full view has the
    # trace: KL on hidden tokens is 80 times that on shown ones on the short problems (the bar:
    # several). Over all tokens the long traces hold half the hidden ones, so both groups must pass.
    views, short, long = report["views"], report["views_by_length"]["short"], report["views_by_length"]["long"]
    for group in (views, short, long):
        assert group["copy_nll_ratio_hidden"] <= 0.5
        assert group["nll_full_hidden_tokens"] < 0.5 * group["nll_partial_hidden_tokens"]
        assert group["kl_hidden_to_shown_ratio"] >= 3
