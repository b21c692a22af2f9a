"""Evaluate a model on math problems: greedy accuracy, maj@k and pass@k (paper §5; docs/paper.md §6).

Three answer formats, as the paper evaluates them, each with its prompt from engine.PROMPTS (the chain-of-thought
and tool prompts are the paper's; the program-of-thought one is ours, the paper does not give it):
- cot: chain-of-thought; the answer is the last \\boxed{} (reward.extract_answer).
- pot: program-of-thought; the last ```python block is run in the sandbox and its printed output is the answer.
- tool: tool-integrated; the sandbox runs the model's programs as it writes them (engine.complete).
Generation is engine.py's, grading reward.py's (extraction, then sympy-backed equivalence). With K samples per
problem:
- accuracy: the share of correct answers (with --temperature 0 and one sample: greedy accuracy);
- pass@k: the unbiased estimate 1 - C(n-c, k) / C(n, k) from n samples with c correct (Chen et al., 2021);
- maj@k: the most frequent answer among the first k samples is correct (self-consistency; ties: the earliest).
`held_out_metrics` is the same on torchrun ranks, each with its share: sft.py and grpo.py report with it, and
grpo.py prints its before/after table and draws its curves with print_table and plot_curves.

    python evaluate.py                                               # the toy SFT model, greedy CoT
    python evaluate.py --model out/toy/grpo --samples 16 --temperature 0.7
    python evaluate.py --model deepseek-math-7b-rl/ --data gsm8k_test.jsonl --prompt tool --device cuda
"""

import argparse
import json
import math
import os
import sys
import time
from collections import Counter, defaultdict

import numpy as np
import torch

import common
import jsonl
import problem_sets
import reward
from common import count, nonnegative, positive
from engine import PROMPTS, Decoder, add_chat_args, complete, cuts_refused, use_chat_args
from model import Transformer
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# Metrics


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - j) / (n - j) for j in range(k))


def majority_correct(answers, verdicts):
    """Self-consistency: is the most frequent extracted answer correct? Answers are compared after
    reward.normalize; samples without an answer do not vote; ties go to the answer seen first."""
    votes = Counter()
    first = {}
    for a, v in zip(answers, verdicts):
        if a is None:
            continue
        key = reward.normalize(a)
        votes[key] += 1
        first.setdefault(key, v)
    if not votes:
        return False
    best = max(votes.values())
    return next(first[k] for k in first if votes[k] == best)


def summarize(records, ks):
    """Mean accuracy, pass@k and maj@k over records (one per problem, each with n samples' verdicts)."""
    n = len(records)
    m = dict(problems=n, accuracy=sum(sum(r["correct"]) / len(r["correct"]) for r in records) / max(n, 1))
    for k in ks:
        m[f"pass@{k}"] = sum(pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in records) / max(n, 1)
        m[f"maj@{k}"] = sum(majority_correct(r["answers"][:k], r["correct"][:k]) for r in records) / max(n, 1)
    return m


def arithmetic_report(records):
    """For answers written as `a op b = c` lines (the toy's chain of thought; reward.arithmetic_steps): the share
    of lines whose arithmetic is right, and, per distinct fact a op b met in at least 4 lines, how often it is
    right; and how many wrong answers hold a wrong line. RL can only reinforce a fact that its samples sometimes
    get right. None if no answer has such lines."""
    facts, wrong, wrong_with_bad_line = defaultdict(list), 0, 0
    for r in records:
        for text, correct in zip(r["completions"], r["correct"]):
            steps = reward.arithmetic_steps(text)
            for _, fact, right in steps:
                facts[fact].append(right)
            wrong += not correct
            wrong_with_bad_line += not correct and not all(right for _, _, right in steps)
    if not facts:
        return None
    lines = [x for v in facts.values() for x in v]
    rates = [sum(v) / len(v) for v in facts.values() if len(v) >= 4]
    bins = dict(never=lambda p: p == 0, below_half=lambda p: 0 < p < 0.5, half_or_more=lambda p: 0.5 <= p < 1,
                always=lambda p: p == 1)
    return dict(lines=len(lines), lines_right=sum(lines) / len(lines), wrong_answers=wrong,
                wrong_with_bad_line=wrong_with_bad_line, facts=len(rates),
                **{f"facts_{k}": sum(map(f, rates)) for k, f in bins.items()})


def grade(model, tok, problems, prompt="cot", samples=1, temperature=0.0, top_p=1.0, max_new_tokens=512, batch=64,
          seed=0, workers=1, index=None, progress=None, top_k=0, min_p=0.0):
    """Generate `samples` completions per problem and grade them: one record per problem with its completions,
    extracted answers and verdicts. Sample s of problem j draws from stream index[j] * samples + s of `seed`
    (index: the problems' places in the whole set, default 0, 1, ...), so a set graded in parts, or shared out
    over ranks, samples what it would whole. model: a Transformer, or an engine.Decoder kept across calls (a
    compiled step then compiles once). workers > 1 grades in that many forked processes (sympy on hard answers);
    keep 1 inside torchrun, where forking is unsafe. progress: anything with .update(n), told of each sample.
    top_p, top_k, min_p: the sampler's cuts (engine.cut), as rollouts may make them."""
    index = range(len(problems)) if index is None else index
    net = model.model if isinstance(model, Decoder) else model
    was_training = net.training
    net.eval()
    comps = complete(model, tok, [p["question"] for p in problems for _ in range(samples)], prompt, max_new_tokens,
                     temperature, top_p, seed=seed, batch=batch, progress=progress, top_k=top_k, min_p=min_p,
                     streams=[j * samples + s for j in index for s in range(samples)])
    net.train(was_training)
    texts = [c.text for c in comps]
    golds = [p["answer"] for p in problems for _ in range(samples)]
    verdicts = [v == 1.0 for v in reward.batch_rewards(texts, golds, workers=workers)]
    records = []
    for j, p in enumerate(problems):
        s = slice(j * samples, (j + 1) * samples)
        records.append(dict(question=p["question"], gold=p["answer"], completions=texts[s],
                            answers=[reward.extract_answer(t) for t in texts[s]], correct=verdicts[s],
                            **{k: p[k] for k in ("type", "level") if k in p}))
    return records


def metrics_of(records):
    """`summarize` of the records at k = 1 and the powers of 2 up to their samples, and per MATH type and level as
    well where the problems carry them."""
    samples = len(records[0]["correct"]) if records else 1
    ks = sorted({1} | {2 ** i for i in range(1, samples.bit_length()) if 2 ** i <= samples})
    metrics = summarize(records, ks)
    for field in ("type", "level"):
        groups = defaultdict(list)
        for r in records:
            if field in r:
                groups[str(r[field])].append(r)
        if groups:
            metrics[f"by_{field}"] = {g: summarize(rs, ks) for g, rs in sorted(groups.items())}
    return metrics


def evaluate(model, tok, problems, **kw):
    """(metrics_of the records, the records) of `grade` (kw: its options)."""
    records = grade(model, tok, problems, **kw)
    return metrics_of(records), records


def held_out_metrics(model, tok, problems, d, **kw):
    """`evaluate` (kw: its options) with each rank on its share of `problems` and a full model (common.gathered
    under FSDP); returns the metrics as means over all of them."""
    mine = problems[d.rank::d.world]
    m, _ = evaluate(model, tok, mine, index=range(d.rank, len(problems), d.world), **kw)
    return {k: common.all_sum(d, v * len(mine)) / len(problems) for k, v in m.items() if isinstance(v, float)}


# -----------------------------------------------------------------------------
# A training run's held-out table and curves (grpo.py)


def print_table(before, after, args, d):
    """A run's held-out rows before and after training: greedy accuracy, and mean@k / maj@k / pass@k when sampled
    (a "before" read back from a run begun by older code may lack a column: shown as -)."""
    sampled = (f"; {args.report_problems} sampled {args.report_samples}x at T={args.report_temperature}"
               if args.report_problems else "")
    common.print0(d, f"\nheld-out ({args.eval_problems} problems greedy{sampled}):")
    common.print0(d, f"  {'':8s}" + "".join(f"{k:>10s}" for k in after))
    for name, r in (("before", before), ("after", after)):
        common.print0(d, f"  {name:8s}" + "".join(f"{100 * r[k]:9.1f}%" if k in r else f"{'-':>10s}" for k in after))


def plot_curves(metrics_path, png):
    """reward, held-out accuracy, KL and length against the step, from metrics.jsonl."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no curves.png (pip install matplotlib)")
        return
    rows = [json.loads(line) for line in open(metrics_path)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, key, title in zip(axes, ("reward", "eval_greedy_accuracy", "kl", "length"),
                              ("train reward (mean)", "held-out greedy accuracy", "KL to reference (k3)",
                               "completion length (tokens)")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts and key.startswith("eval"):
            ax.plot(*zip(*pts), marker="o", markersize=3)
        elif pts:  # per-step values are noisy (each step asks other questions): raw, and a running mean of 5
            steps, values = zip(*pts)
            ax.plot(steps, values, alpha=0.35)
            ax.plot(steps, [np.mean(values[max(0, i - 4):i + 1]) for i in range(len(values))])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="out/toy/sft", help="a Hugging Face model directory (ours, or a "
                    "llama/qwen2/qwen3/mistral one)")
    ap.add_argument("--data", default="out/toy/data/problems/test.jsonl", help="GSM8K / MATH / our jsonl")
    ap.add_argument("--prompt", default="cot", choices=sorted(PROMPTS), help="answer format")
    ap.add_argument("--samples", type=positive, default=1, help="completions per problem (K of maj@K, pass@K)")
    ap.add_argument("--temperature", type=nonnegative, default=None, help="default: 0 (greedy) for 1 sample, else 0.7")
    ap.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens whose "
                    "probability reaches P")
    ap.add_argument("--top-k", type=int, default=0, help="sample from the K likeliest tokens (0: every token)")
    ap.add_argument("--min-p", type=float, default=0.0, help="sample from the tokens at least P times as likely as "
                    "the likeliest (0: every token)")
    ap.add_argument("--max-new-tokens", type=positive, default=512, help="cut at the model's context length if longer")
    ap.add_argument("--limit", type=count, default=0, help="only the first N problems (0: all)")
    ap.add_argument("--batch", type=positive, default=64, help="sequences decoded at once (the KV cache's rows)")
    problem_sets.add_problem_args(ap)
    add_chat_args(ap)
    ap.add_argument("--out", default=None, help="predictions jsonl (default: <model>/eval-<data>-<prompt>.jsonl)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--workers", type=positive, default=os.cpu_count(), help="grading processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="capture the decode step (a CUDA graph on GPU; "
                    "engine.Decoder)")
    args = ap.parse_args(argv)
    if refused := cuts_refused(args.top_k, args.top_p, args.min_p):
        ap.error(refused)
    return args


# Sequences a part of the set holds (x --batch): the predictions are saved after each part, so a stopped run loses
# at most one part; more sequences per part keep the rows full for longer before a part's last ones finish.
PART = 16


def settings_of(args, temperature, dtype):
    """What the predictions depend on: a run may only go on from a stopped one with the same (--limit, --batch,
    --workers and --compile change none of them: samples are a function of their seed, stream and position)."""
    keys = ("prompt", "samples", "top_p", "top_k", "min_p", "max_new_tokens", "seed", "question_field", "answer_field",
            "solution_field", "chat_template", "system", "device")
    return dict(model=os.path.abspath(args.model), data=os.path.abspath(args.data), temperature=temperature,
                dtype=str(dtype), **{k: getattr(args, k) for k in keys})


def records_done(partial, settings, problems):
    """The records a stopped run with these settings saved in `partial` (its first line the settings; a last line
    cut short by the stop is dropped), each checked against its problem; [] if there is no such file."""
    if not os.path.isfile(partial):
        return []
    rows = []
    with open(partial, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                break  # cut short by the stop: it and anything after it are graded again
    saved = rows[0].get("settings", {}) if rows and isinstance(rows[0], dict) else {}
    other = [k for k in settings if saved.get(k) != settings[k]]
    if other:
        raise SystemExit(f"error: {partial}: a stopped evaluation with other settings ({', '.join(other)}); delete it "
                         f"to start again, or give another --out")
    done = rows[1:len(problems) + 1]
    for i, (r, p) in enumerate(zip(done, problems)):
        if (r.get("question"), r.get("gold")) != (p["question"], p["answer"]):
            raise SystemExit(f"error: {partial}: its problem {i + 1} is not problem {i + 1} of the data; delete it to "
                             f"start again")
    return done


def grade_in_parts(args, model, tok, problems, temperature, settings, out):
    """grade() on parts of the set, each part's records appended to <out>.partial as it is done and a line of
    progress printed, going on from what a stopped run with the same settings saved there; the whole set's
    records, the partial file removed once `out` holds them."""
    from tqdm import tqdm
    partial = out + ".partial"
    records = records_done(partial, settings, problems)
    if records:
        print(f"{partial}: going on after the {len(records)} problems a stopped run graded", flush=True)
    jsonl.write_jsonl(partial, [dict(settings=settings)] + records)  # without a line the stop cut short
    n, begun, t0 = len(problems), len(records), time.time()
    bar = tqdm(total=n * args.samples, initial=begun * args.samples, unit="sample", desc=f"evaluate {args.prompt}",
               disable=not sys.stderr.isatty())
    decoder = Decoder(model, compile=args.compile)  # one for all parts: a compiled step compiles once
    size = max(1, PART * args.batch // args.samples)
    for lo in range(begun, n, size):
        part = problems[lo:lo + size]
        new = grade(decoder, tok, part, args.prompt, args.samples, temperature, args.top_p, args.max_new_tokens,
                    args.batch, args.seed, args.workers, index=range(lo, lo + len(part)), progress=bar,
                    top_k=args.top_k, min_p=args.min_p)
        jsonl.append_jsonl(partial, new)
        records += new
        right = sum(sum(r["correct"]) for r in records) / (len(records) * args.samples)
        bar.write(f"evaluate: {len(records)}/{n} problems, accuracy {100 * right:.1f}% so far, "
                  f"{common.eta(t0, len(records) - begun, n - len(records))}")
        sys.stdout.flush()  # a log file sees each line as it is written
    bar.close()
    jsonl.write_jsonl(out, records)
    os.remove(partial)
    return records


def main(args):
    for path, what in ((os.path.join(args.model, "config.json"), "--model"), (args.data, "--data")):
        if os.path.isdir(path):
            raise SystemExit(f"error: {path}: a directory ({what} takes a .jsonl, .json, .csv or .parquet file)")
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path}: not found ({what}); the toy files are built by `python grpo.py`")
    read_problems = problem_sets.problem_reader(args)
    problems = read_problems(args.data)
    problems = problems[:args.limit] if args.limit else problems
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    model = Transformer.from_pretrained(args.model, dtype=dtype, device=args.device)
    tok = Tokenizer.load(args.model)
    use_chat_args(tok, args)
    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 0.7)
    name = os.path.splitext(os.path.basename(args.data))[0]
    out = args.out or os.path.join(args.model, f"eval-{name}-{args.prompt}.jsonl")
    records = grade_in_parts(args, model, tok, problems, temperature, settings_of(args, temperature, dtype), out)
    report(args, len(problems), temperature, metrics_of(records), records, out)


def report(args, n, temperature, metrics, records, out):
    print(f"{args.model} on {args.data} ({n} problems, {args.prompt}, {args.samples} sample(s) at T={temperature}):")
    for k, v in metrics.items():
        if not k.startswith("by_"):
            print(f"  {k:10s} {v:.4f}" if isinstance(v, float) else f"  {k:10s} {v}")
    for field in ("by_type", "by_level"):
        for g, m in metrics.get(field, {}).items():
            print(f"  {field[3:]} {g}: " + "  ".join(f"{k} {v:.3f}" for k, v in m.items() if k != "problems")
                  + f"  ({m['problems']} problems)")
    steps = arithmetic_report(records)
    if steps:
        print(f"  arithmetic: {steps['wrong_with_bad_line']} of the {steps['wrong_answers']} wrong answers hold a "
              f"wrong `a op b = c` line; {steps['lines']} lines, {100 * steps['lines_right']:.1f}% right; of the "
              f"{steps['facts']} facts (a op b) met 4+ times: {steps['facts_never']} never right, "
              f"{steps['facts_below_half']} right under half the time, {steps['facts_half_or_more']} half or more, "
              f"{steps['facts_always']} always")
    print(f"predictions: {out}")
    print(json.dumps({k: v for k, v in metrics.items() if not k.startswith("by_")}))


if __name__ == "__main__":
    with common.one_line_errors():
        main(parse_args())
