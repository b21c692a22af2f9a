"""Reward models: a model that scores a solution, at its end (outcome) or after every step (process); paper §4.2
and §4.1.3, labels as Math-Shepherd's (docs/paper.md §5).

DeepSeekMath's RL reward is not the answer rule itself but a model trained on the rule's verdicts. Both kinds
here start from --init (the SFT model by default) and learn from completions sampled from one or more policies
(--policy DIR[@T] ...: the SFT model at T = 1 by default), each kept once per question and labelled by the answer
rule (reward.py), never by people:

- outcome (ORM): one label per completion, 1 if its final answer is right. By default in the implicit form
  (ImplicitReward, PRIME's): no head, the score is β Σ_t log π_φ(o_t)/π_ref(o_t) over the completion's tokens,
  π_φ a language model trained by the loss below and π_ref --init, frozen. It ranks a question's outputs better
  than the head form (--orm-form head: a scalar head read at the last token), which ranks them worse than the SFT
  model's own likelihood does, and GRPO on it gained +3.2 to the head's +2.8 (docs/findings.md).
- process (PRM): the policy's architecture with a scalar head (model.py, head "score": Hugging Face's
  ...ForSequenceClassification with one label); one label per step (a line of the solution). From the prefix
  that ends at step j, N completions are sampled; the label is the fraction of them that reach the gold answer
  (Math-Shepherd's soft estimate; --hard: 1 if any does). The last step's label is the completion's own
  outcome. The score is read at each step's last token.

Loss: binary cross-entropy on the score as a logit (the paper does not name its loss; BCE is the usual one for
a probability of being right, and it takes soft labels as they are). Held-out evaluation, on questions never
trained on: AUC and accuracy at 1/2 against the rule's verdicts, the AUC within a question (what GRPO's group
baseline sees), on another policy's samples too (--drift), and for the PRM the per-step AUC against the toy's
arithmetic checker (reward.arithmetic_steps), a ground truth the PRM never sees. Training uses the shared
machinery (common.py: FSDP2, train_step, checkpoints, export) as every other trainer; the labelled examples are
written before training starts, so --resume trains on without sampling and labelling again. For grpo.py it also reads
a reward model's verdicts on rollouts (model_rewards) and runs iterative GRPO's refresh (refresh_reward_model:
the policy's new samples, labelled by the rule, with a replay of a tenth).

    python reward_model.py                                # the toy: outcome and process models from the SFT's samples
    torchrun --nproc_per_node 8 reward_model.py --init deepseek-math-7b-base/ --policy out/sft --data rl.jsonl \\
        --kinds orm --lr 2e-5 --micro-batch 4 --out-dir out/rm --activation-checkpointing
"""

import argparse
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

import common
import data
import engine
import memory
import problem_sets
import reward
import sft
from common import count, nonnegative, positive
from model import Transformer, config_from_hf, packed_mask
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# Examples: a sequence and the positions where its score is trained


@dataclass
class Scored:
    ids: list  # prompt + completion token ids
    at: list  # positions whose score is trained: the last token (outcome), or each step's last token (process)
    labels: list  # per position of `at`, the target probability of being right, in [0, 1]
    truth: list  # per position, what the rule says (1/0), None where it cannot say: held-out evaluation only
    start: int = None  # index in ids of the completion's first token (what the implicit form sums over)


SCORED_FIELDS = tuple(f.name for f in fields(Scored))  # a Scored's keys in examples.jsonl and held_out.jsonl
REQUIRED_FIELDS = SCORED_FIELDS[:-1]  # files written before `start` existed still load (the head form's)


def token_index(tok, ids, ends):
    """For each character offset into decode(ids) where a step ends (exclusive), the index of the token that
    holds the step's last character (the last token for an offset past the end)."""
    byte_ends = np.cumsum([len(tok.id_to_bytes[i]) for i in ids])  # byte offset where each token ends
    text = tok.decode(ids)
    return [min(int(np.searchsorted(byte_ends, len(text[:c].encode()))), len(ids) - 1) for c in ends]


def step_ends(tok, comp):
    """The steps of a completion as (index in comp.ids of the step's last token, character offset where it ends):
    a step is a non-empty line, and the last step, ending at the completion's last token, holds the answer."""
    text = tok.decode([t for t in comp.ids if t not in tok.stop_ids])
    ends = [i for i, ch in enumerate(text) if ch == "\n" and text[:i].strip() and text[i - 1] != "\n"]
    steps = [(t, e) for t, e in zip(token_index(tok, comp.ids, ends), ends) if t < len(comp.ids) - 1]
    return steps + [(len(comp.ids) - 1, len(text))]


def step_truth(text, ends):
    """Per step ending at each offset, the toy's arithmetic checker's verdict on the `a op b = c` line that ends
    there (1.0 right, 0.0 wrong), None for a line it cannot check."""
    checked = {end: float(right) for end, _, right in reward.arithmetic_steps(text)}
    return [checked.get(e) for e in ends]


def outcome_examples(comps, outcomes):
    """One example per completion: its score at the last token, labelled by its rule reward (1 right, 0 wrong)."""
    return [Scored(c.prompt + c.ids, [len(c.prompt) + len(c.ids) - 1], [float(r)], [float(r)], len(c.prompt))
            for c, r in zip(comps, outcomes)]


def shepherd_examples(sampler, tok, comps, outcomes, golds, n, hard, seed, batch, max_new_tokens):
    """Math-Shepherd's process labels: from the prefix ending at each step but the last, n completions at T = 1;
    the step's label is the fraction that reach the gold answer (hard: 1.0 if any does). The last step is
    labelled by the completion's own outcome. One generate call for all prefixes (each prefilled once)."""
    steps = [step_ends(tok, c) for c in comps]
    prefixes, owner = [], []  # every (completion, step) prefix, n times
    for i, (c, s) in enumerate(zip(comps, steps)):
        for t, _ in s[:-1]:
            prefixes += [c.prompt + c.ids[:t + 1]] * n
            owner += [i] * n
    gen = engine.generate(sampler, prefixes, max_new_tokens, temperature=1.0, eos_ids=tok.stop_ids, seed=seed,
                          vocab_limit=tok.vocab_size, slots=batch)
    texts = [tok.decode([t for t in p[len(comps[i].prompt):] + new if t not in tok.stop_ids])
             for p, new, i in zip(prefixes, gen.tokens, owner)]
    reached = reward.batch_rewards(texts, [golds[i] for i in owner], workers=1)
    out, k = [], 0
    for c, s, r in zip(comps, steps, outcomes):
        labels = []
        for _ in s[:-1]:
            hits = reached[k:k + n]
            labels.append(float(max(hits)) if hard else float(np.mean(hits)))
            k += n
        truth = step_truth(c.text, [e for _, e in s[:-1]]) + [float(r)]
        out.append(Scored(c.prompt + c.ids, [len(c.prompt) + t for t, _ in s], labels + [float(r)], truth,
                          len(c.prompt)))
    return out


def segments(e):
    """An example's segment per token, as model.packed_mask reads them: 0 on the prompt, 1 on the completion
    (all 0 where the example does not say where its completion starts)."""
    start = len(e.ids) if e.start is None else e.start
    return [0] * start + [1] * (len(e.ids) - start)


def collate(examples, pad_id):
    """Right-padded (x (B, T) ids, y (B, T) labels, mask (B, T) where a label is, segment (B, T): `segments`,
    -1 on padding)."""
    T = max(len(e.ids) for e in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.zeros(len(examples), T)
    m = torch.zeros(len(examples), T, dtype=torch.bool)
    seg = torch.full((len(examples), T), -1, dtype=torch.long)
    for i, e in enumerate(examples):
        x[i, :len(e.ids)], seg[i, :len(e.ids)] = torch.tensor(e.ids), torch.tensor(segments(e))
        y[i, e.at], m[i, e.at] = torch.tensor(e.labels), True
    return x, y, m, seg


# -----------------------------------------------------------------------------
# The implicit form of an outcome model: no head, a language model against its reference


class ImplicitReward(torch.nn.Module):
    """An outcome model without a head (PRIME's implicit reward, Cui et al. 2025): a language model π_φ and a
    frozen reference π_ref, both --init at the start. A completion's score, as a logit, is β Σ_t log π_φ(o_t) /
    π_ref(o_t) over its tokens; trained by BCE on the outcome, π_φ learns which tokens make right solutions more
    likely than the reference finds them. It starts at 0 for every completion, and it learns through the language
    model's own next-token predictions, where what tells a right calculation from a wrong one already lies (the
    SFT model's likelihood alone ranks its own outputs within a question better than a head trained on the same
    labels: docs/findings.md). The score after token t is the sum up to t: at the last token, the verdict."""

    def __init__(self, policy, ref, beta):
        super().__init__()
        self.policy, self.ref, self.beta = policy, ref.requires_grad_(False), beta

    def forward(self, tokens, segment, positions=None):
        """The score at every position (B, T), fp32, of rows laid out as packed_scores makes them (segment 0 on
        the prompt, k on the k-th completion behind it, -1 on padding): 0 on the prompt, after that the sum over
        the completion's tokens so far. A completion's first token is predicted from the prompt's last."""
        mask, prev = packed_mask(segment), predicting_positions(segment)
        lp = self.policy(tokens, tokens, positions=positions, mask=mask, at=prev)
        with torch.no_grad():
            lp_ref = self.ref(tokens, tokens, positions=positions, mask=mask, at=prev)
        x = self.beta * (lp - lp_ref) * (segment > 0)
        T = tokens.shape[1]
        idx = torch.arange(T, device=tokens.device).expand_as(tokens)
        start = torch.where(segment_starts(segment), idx, 0).cummax(1).values  # where each token's segment starts
        total = x.cumsum(1)
        return total - torch.where(start > 0, total.gather(1, (start - 1).clamp(min=0)), 0)  # the segment's own sum


def segment_starts(segment):
    """(B, T) bool: True where a segment begins (at position 0 too)."""
    return torch.cat([torch.ones_like(segment[:, :1], dtype=torch.bool), segment[:, 1:] != segment[:, :-1]], 1)


def predicting_positions(segment):
    """(B, T): the position whose hidden state predicts each token of packed rows: t - 1 within a segment, the
    prompt's last position at a segment's first token (0 for the prompt's first token, which nothing predicts:
    the caller masks the prompt)."""
    B, T = segment.shape
    idx = torch.arange(T, device=segment.device).expand(B, T)
    prompt_last = (segment == 0).sum(1, keepdim=True) - 1
    return torch.where(segment_starts(segment), prompt_last, idx - 1).clamp(min=0)


def score_logits(model, tokens, segment, positions=None):
    """A reward model's score (a logit) at every position (B, T) of rows as packed_scores lays them out: a head
    model's, or an implicit one's."""
    if isinstance(model, ImplicitReward):
        return model(tokens, segment, positions)
    return model(tokens, positions=positions, mask=packed_mask(segment))


def bce_loss(model, x, y, segment):
    """Per position (B, T): binary cross-entropy of the score as a logit against the label y in [0, 1]."""
    return F.binary_cross_entropy_with_logits(score_logits(model, x, segment), y, reduction="none")


@torch.no_grad()
def row_scores(model, rows, pad_id, batch):
    """σ(score) at every position of each row, a CPU tensor per row. A row is (ids, positions, segment) as
    model.packed_mask reads them: one sequence (segment 0 on its prompt, 1 on its completion; or all 0), or a prompt
    and sequences packed behind it (1, 2, ...). Rows of similar length go `batch` to a forward, right-padded.
    `model` is a plain (unsharded) model."""
    dev = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]))
    got = [None] * len(rows)
    for s in range(0, len(order), batch):
        chunk = [rows[r] for r in order[s:s + batch]]
        T = max(len(ids) for ids, _, _ in chunk)

        def pad(j, value):
            return torch.tensor([r[j] + [value] * (T - len(r[j])) for r in chunk], device=dev)
        p = torch.sigmoid(score_logits(model, pad(0, pad_id), pad(2, -1), pad(1, 0))).cpu()  # (B, T)
        for r, row in zip(order[s:s + batch], p):
            got[r] = row
    return got


def scores(model, examples, pad_id, batch=32):
    """σ(score) at each example's positions `at`: a list per example. `model` is a plain (unsharded) model."""
    rows = [(e.ids, list(range(len(e.ids))), segments(e)) for e in examples]
    return [row[e.at].tolist() for row, e in zip(row_scores(model, rows, pad_id, batch), examples)]


def packed_scores(model, comps, at, pad_id, pack, batch):
    """σ(score) of each completion at its token indices `at` (a list per completion), as `scores` gives them for
    prompt + completion alone, with up to `pack` consecutive completions of one prompt (GRPO's groups) in a row
    behind one copy of it: each sees the prompt and itself, its positions restart after the prompt, and the
    prompt is run once for all of them. `batch` completions to a forward."""
    rows, where = [], []  # rows (ids, positions, segment); per completion, its row and its `at` in that row
    for i, c in enumerate(comps):
        if not rows or rows[-1][2][-1] >= pack or comps[i - 1].prompt != c.prompt:
            rows.append((list(c.prompt), list(range(len(c.prompt))), [0] * len(c.prompt)))
        ids, positions, segment = rows[-1]
        where.append((len(rows) - 1, [len(ids) + t for t in at[i]]))
        positions += range(len(c.prompt), len(c.prompt) + len(c.ids))
        segment += [segment[-1] + 1] * len(c.ids)
        ids += c.ids
    got = row_scores(model, rows, pad_id, max(1, batch // pack))
    return [got[r][idx].tolist() for r, idx in where]


# -----------------------------------------------------------------------------
# Evaluation


def auc(predicted, labels):
    """Area under the ROC curve: the chance that a random positive scores above a random negative (ties
    count half). nan when one class is missing."""
    p, y = np.asarray(predicted, dtype=float), np.asarray(labels, dtype=float) > 0.5
    if y.all() or not y.any():
        return float("nan")
    ranks = np.empty(len(p))
    order = np.argsort(p, kind="mergesort")
    ranks[order] = np.arange(1, len(p) + 1)
    for v in np.unique(p):  # ties share their mean rank
        ranks[p == v] = ranks[p == v].mean()
    n_pos = int(y.sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(p) - n_pos)))


def report(model, examples, pad_id, questions=None):
    """Held-out quality of a reward model against the rule, from the examples' `truth`: the final score's AUC
    and accuracy at 1/2 against the outcome; given each example's question, the AUC within a question, averaged
    over the questions with right and wrong outputs (what GRPO's group baseline sees: the AUC across questions
    also rewards knowing which questions are easy); for a process model, the AUC over the steps the arithmetic
    checker can judge."""
    s = scores(model, examples, pad_id)
    final, outcome = [x[-1] for x in s], [e.truth[-1] for e in examples]
    row = dict(examples=len(examples), outcome_auc=auc(final, outcome),
               outcome_accuracy=float(np.mean([(f > 0.5) == (o > 0.5) for f, o in zip(final, outcome)])),
               right=float(np.mean(outcome)))
    if questions is not None:
        groups = {}
        for q, f, o in zip(questions, final, outcome):
            groups.setdefault(q, ([], []))[0].append(f)
            groups[q][1].append(o)
        within = [a for a in (auc(*g) for g in groups.values()) if a == a]  # nan: one class only
        row.update(group_auc=float(np.mean(within)) if within else float("nan"), mixed_questions=len(within))
    steps = [(x, t) for xs, e in zip(s, examples) for x, t in zip(xs[:-1], e.truth[:-1]) if t is not None]
    if steps:
        row.update(step_auc=auc(*zip(*steps)), steps_checked=len(steps))
    return row


# -----------------------------------------------------------------------------
# Training


def policy_sources(specs):
    """--policy's entries, DIR or DIR@T, as (directory, sampling temperature; 1.0 where not given)."""
    out = []
    for spec in specs:
        path, at, t = spec.rpartition("@")
        try:
            out.append((path, float(t)) if at else (spec, 1.0))
        except ValueError:
            raise SystemExit(f"error: --policy {spec}: expected DIR or DIR@TEMPERATURE") from None
        if out[-1][1] <= 0:
            raise SystemExit(f"error: --policy {spec}: a sampling temperature > 0 (the samples of a question must "
                             "differ)")
    return out


def sample_completions(sources, tok, problems, args, d):
    """`args.samples` completions per question from each (policy, temperature) of `sources`, this rank's share of
    the questions (problems[rank::world]). Question by question, each source's samples in turn, a completion
    kept once however often a question's samples repeat it. Returns (completions, rule rewards, gold answers,
    each one's question: its index in `problems`)."""
    mine = range(d.rank, len(problems), d.world)
    questions = [problems[q]["question"] for q in mine for _ in range(args.samples)]
    drawn = []
    for k, (path, temperature) in enumerate(sources):  # each source its own stream of uniforms
        sampler = Transformer.from_pretrained(path, device=d.device)
        drawn.append(engine.complete(sampler, tok, questions, "cot", args.max_new_tokens, temperature,
                                     seed=engine.sampling_seed(args.seed, k, d.rank), batch=args.gen_batch))
    comps, qids, seen = [], [], set()
    for i, q in enumerate(mine):
        for c in (c for per_source in drawn for c in per_source[i * args.samples:(i + 1) * args.samples]):
            if (q, tuple(c.ids)) not in seen:
                seen.add((q, tuple(c.ids)))
                comps.append(c)
                qids.append(q)
    golds = [problems[q]["answer"] for q in qids]
    outcomes = reward.batch_rewards([c.text for c in comps], golds, workers=1)
    return comps, outcomes, golds, qids


def first_per_question(qids, n):
    """Indices of the first n entries of each question in qids."""
    seen, out = {}, []
    for i, q in enumerate(qids):
        seen[q] = seen.get(q, 0) + 1
        if seen[q] <= n:
            out.append(i)
    return out


def save_examples(path, examples):
    """Examples as jsonl (data.write_jsonl: never half-written): the replay data of iterative GRPO."""
    data.write_jsonl(path, (asdict(e) for e in examples))


def load_examples(path):
    """save_examples' file back as Scored (a malformed line: one error naming file:line)."""
    return [Scored(**r) for r in data.read_jsonl(path, fields=REQUIRED_FIELDS)]


# What decides the labelled examples: a resumed run reads them back (save_labelled) only if these match.
RESUMABLE = ("init", "policy", "data", "eval_data", "questions", "samples", "shepherd_samples",
             "shepherd_per_question", "hard", "max_new_tokens", "drift", "seed")


def save_labelled(out, args, examples, held_out, drift):
    """A kind's labelled data, written before its training: the examples it trains on (examples.jsonl, also
    iterative GRPO's replay pool: grpo.py --rm-refresh), and the held-out and --drift ones with their question
    (held_out.jsonl), so that --resume does not sample and label again (Math-Shepherd's labels of the toy's 7,100
    completions take a quarter of an hour), with the settings that made them (args.json, as a run's)."""
    save_examples(os.path.join(out, "examples.jsonl"), examples)
    common.save_args(out, args)
    data.write_jsonl(os.path.join(out, "held_out.jsonl"), ({"question": q, "set": name, **asdict(e)}
                                                           for name, pairs in (("held_out", held_out), ("drift", drift))
                                                           for q, e in pairs))


def load_labelled(out, args):
    """save_labelled's (examples, held_out, drift) back, or None where it has not written them; made with other
    settings than args': an error (common.check_resumable)."""
    path = os.path.join(out, "held_out.jsonl")
    if not os.path.isfile(path):
        return None
    common.check_resumable(out, args, RESUMABLE)
    pairs = {"held_out": [], "drift": []}
    for r in data.read_jsonl(path, fields=("question", "set", *REQUIRED_FIELDS)):
        pairs.setdefault(r.pop("set"), []).append((r.pop("question"), Scored(**r)))
    return load_examples(os.path.join(out, "examples.jsonl")), pairs["held_out"], pairs["drift"]


def fit_step(model, opt, optim, examples, step, d, *, batch, micro_batch, seed, pad_id):
    """One optimizer step of a reward model on the global batch `step` of `examples` (sft.step_examples: every
    rank holds all of them in one order, drawn by `seed`), this rank's share, with BCE through common.train_step."""
    if len(examples) < batch:
        raise SystemExit(f"error: {len(examples)} reward-model examples, fewer than one batch of {batch}: sample more "
                         "questions or lower the batch")
    per_rank = batch // d.world
    mine = sft.step_examples(examples, step, batch, seed)[d.rank * per_rank:(d.rank + 1) * per_rank]
    mine.sort(key=lambda e: len(e.ids))  # similar lengths share a micro-batch
    micro = [collate(mine[i:i + micro_batch], pad_id) for i in range(0, per_rank, micro_batch)]
    return common.train_step(model, opt, micro, d, optim, step, loss_of=bce_loss)


def train(kind, examples, held_out, drift, config, tok, args, d):
    """Train one reward model on `examples` (Scored) from args.init's body; export it to args.out_dir/kind with
    its report on the held-out questions (and on --drift's samples of them, if any): those two as (question,
    example) pairs. Returns the report."""
    implicit = kind == "orm" and args.orm_form == "implicit"
    run = argparse.Namespace(**{**vars(args), "out": os.path.join(args.out_dir, kind),  # this model's record
                                "lr": args.lr or (1e-4 if implicit else 2e-4)})
    longest = max(len(e.ids) for e in examples)
    trained_config = config if implicit else replace(config, head="score")
    ac = common.checkpointed_blocks(args.activation_checkpointing, d, config.n_layers, lambda k: memory.train_peak(
        memory.train_plan(trained_config, d.world, args.micro_batch, longest, k, reference=implicit)))
    model = common.build_model(trained_config, d, seed=args.seed, init_dir=args.init, checkpointed=ac,
                               compile=args.compile)
    rm = ImplicitReward(model, common.build_model(config, d, seed=args.seed, init_dir=args.init, compile=args.compile,
                                                  frozen=True), args.implicit_beta) if implicit else model
    optim = common.Optim.of(run)
    opt = common.make_optimizer(model, optim)
    step = common.start_run(run, d, model, opt, RESUMABLE)
    log = common.Log(run.out, d, run.max_steps, step, args=run)
    with common.StopFlag() as stop:  # the signal handlers are the run's only while it runs
        while step < run.max_steps:
            t0 = time.time()
            loss, norm, n = fit_step(rm, opt, optim, examples, step, d, batch=args.batch,
                                     micro_batch=args.micro_batch, seed=args.seed, pad_id=tok.pad_id)
            step += 1
            log(dict(step=step, loss=loss, lr=opt.param_groups[0]["lr"], grad_norm=norm, labels=n,
                     seconds=time.time() - t0))
            common.save_or_stop(stop, run.out, model, opt, step, d, step % run.ckpt_every == 0 or step == run.max_steps)
    log.close()
    save(rm, run.out, policy_sources(args.policy)[0][0], d)  # with the policies' tokenizer
    with scoring(rm) as plain:
        row = report(plain, [e for _, e in held_out], tok.pad_id, [q for q, _ in held_out])
        if drift:
            row["drift"] = report(plain, [e for _, e in drift], tok.pad_id, [q for q, _ in drift])
    if d.main:
        with open(os.path.join(run.out, "report.json"), "w") as f:
            json.dump(row, f, indent=1)
    return row


# -----------------------------------------------------------------------------
# A reward model on disk: a Hugging Face directory with the "score" head, or for the implicit form the language
# model π_φ, its reference in reference/ and implicit.json (β)

IMPLICIT = "implicit.json"


def save(rm, out, tokenizer_dir, d):
    """Export a trained reward model to `out` (common.export_hf), the implicit form's reference beside it."""
    if isinstance(rm, ImplicitReward):
        common.export_hf(rm.policy, out, tokenizer_dir, d)
        common.export_hf(rm.ref, os.path.join(out, "reference"), tokenizer_dir, d)
        if d.main:
            with open(os.path.join(out, IMPLICIT), "w") as f:
                json.dump({"beta": rm.beta}, f)
    else:
        common.export_hf(rm, out, tokenizer_dir, d)


def load(rm_dir, d, seed, checkpointed=0, compile=False, refreshed=False):
    """The reward model `save` wrote to rm_dir, built as common.build_model builds any model (FSDP2 on several
    ranks), frozen unless `refreshed` (grpo.py --rm-refresh: then what `trained` returns of it trains, the
    implicit form's reference never); an error naming rm_dir if it holds a language model and no implicit.json."""
    config = config_from_hf(rm_dir)
    if os.path.isfile(os.path.join(rm_dir, IMPLICIT)):
        with open(os.path.join(rm_dir, IMPLICIT)) as f:
            beta = json.load(f)["beta"]
        ref_dir = os.path.join(rm_dir, "reference")
        policy = common.build_model(config, d, seed=seed, init_dir=rm_dir, checkpointed=checkpointed, compile=compile,
                                    frozen=not refreshed)
        ref = common.build_model(config_from_hf(ref_dir), d, seed=seed, init_dir=ref_dir, compile=compile, frozen=True)
        return ImplicitReward(policy, ref, beta)
    if config.head != "score":
        raise SystemExit(f"error: --reward-model {rm_dir}: a language model, not a reward model (reward_model.py "
                         "makes one)")
    return common.build_model(config, d, seed=seed, init_dir=rm_dir, checkpointed=checkpointed, compile=compile,
                              frozen=not refreshed)


def models_in(rm_dir):
    """How many models of its --init's size the reward model in rm_dir holds: two in the implicit form (π_φ and
    its reference), else one (also where none is built yet)."""
    return 2 if os.path.isfile(os.path.join(rm_dir, IMPLICIT)) else 1


def trained(rm):
    """The module of a reward model that training changes: the implicit form's π_φ, never its reference."""
    return rm.policy if isinstance(rm, ImplicitReward) else rm


@contextmanager
def scoring(rm):
    """A plain (unsharded) copy of a reward model to score with, valid inside the `with` (common.gathered)."""
    if isinstance(rm, ImplicitReward):
        with common.gathered(rm.policy) as policy, common.gathered(rm.ref) as ref:
            yield ImplicitReward(policy, ref, rm.beta)
    else:
        with common.gathered(rm) as plain:
            yield plain


# -----------------------------------------------------------------------------
# For GRPO: a reward model's verdicts on rollouts (--reward orm|prm)


def model_rewards(scorer, tok, comps, kind, batch, pack=1):
    """A reward model's verdicts on GRPO's outputs: an outcome model's σ(score) at each output's
    last token, (B,); a process model's at the last token of each step (a line), per output [(token index,
    score)], the last step's score being its verdict on the answer. scorer: the model, unsharded; batch and pack:
    as packed_scores (GRPO's --micro-batch and --pack)."""
    ends = [step_ends(tok, c) if kind == "prm" else [(len(c.ids) - 1, None)] for c in comps]
    got = packed_scores(scorer, comps, [[t for t, _ in e] for e in ends], tok.pad_id, pack, batch)
    if kind == "orm":
        return torch.tensor([s[-1] for s in got])
    return [[(t, x) for (t, _), x in zip(e, s)] for e, s in zip(ends, got)]


def ensemble(verdicts, kind, how="mean"):
    """Several reward models' model_rewards on the same outputs as one: per output (orm) or per step (prm), the
    mean of their scores or the lowest (how="min")."""
    if kind == "orm":
        stacked = torch.stack(verdicts)  # (models, B)
        return stacked.mean(0) if how == "mean" else stacked.min(0).values
    combine = np.mean if how == "mean" else min
    return [[(t, float(combine([v[i][j][1] for v in verdicts]))) for j, (t, _) in enumerate(steps)]
            for i, steps in enumerate(verdicts[0])]  # every model's steps end at the same tokens (step_ends)


# -----------------------------------------------------------------------------
# Iterative GRPO: the reward model learns from the policy's new samples (line 12 of grpo.py's Algorithm 1)

REPLAY_SHARE = 0.1  # of each refresh's training mixture, historical data (paper §4.1.4: "10% historical data")


def replay_history(rm_dir, out, step):
    """What a reward model has learned from so far, the refreshes' replay pool: its own training examples
    (main saves them beside it) and those of every refresh of this run up to `step` (a resumed run
    reads only what its checkpoint had seen)."""
    first = os.path.join(rm_dir, "examples.jsonl")
    pool = load_examples(first) if os.path.isfile(first) else []
    folder = os.path.join(out, "rm_history")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".jsonl") and int(name.split("_")[1].split(".")[0]) <= step:
            pool += load_examples(os.path.join(folder, name))
    return pool


def refresh_reward_model(rm, policy, tok, problems, history, step, args, d):
    """Sample the policy on --rm-questions questions (--rm-samples each), label the samples by the rule (and
    Math-Shepherd's step labels for a process model), and continue training the reward model for
    --rm-steps on them mixed with a replay of `history`, the replay a tenth of the mixture. Appends the new
    examples to `history` and to out/rm_history. Returns the metrics of the refresh."""
    t0 = time.time()
    rng = np.random.default_rng([args.seed, step, 12])  # line 12: its own stream, a function of the step
    picks = [problems[i] for i in rng.choice(len(problems), args.rm_questions, replace=False)][d.rank::d.world]
    questions = [p["question"] for p in picks for _ in range(args.rm_samples)]
    golds = [p["answer"] for p in picks for _ in range(args.rm_samples)]
    seed = engine.sampling_seed(args.seed, step, d.rank, engine.RM_REFRESH)
    with common.gathered(policy) as sampler:
        comps = engine.complete(sampler, tok, questions, args.prompt, args.max_new_tokens, args.temperature,
                                seed=seed, batch=args.gen_batch)
        rule = reward.batch_rewards([c.text for c in comps], golds, workers=1)
        new = (outcome_examples(comps, rule) if args.reward == "orm" else
               shepherd_examples(sampler, tok, comps, rule, golds, args.shepherd_samples, False,
                                              seed + engine.SHEPHERD, args.gen_batch, args.max_new_tokens))
        new = common.all_gather_list(d, new)
        with scoring(rm) as scorer:  # how well the reward model judged the policy's samples before
            before = report(scorer, new, tok.pad_id, [i // args.rm_samples for i in range(len(new))])
    n_replay = min(len(history), round(len(new) * REPLAY_SHARE / (1 - REPLAY_SHARE)))
    mixture = new + [history[i] for i in rng.choice(len(history), n_replay, replace=False)]
    fit = common.Optim(lr=args.rm_lr, max_steps=args.rm_steps, grad_clip=args.grad_clip)  # constant LR
    opt = common.make_optimizer(rm, fit)  # a new phase of the reward model's training, each with its own AdamW
    losses = [fit_step(rm, opt, fit, mixture, k, d, batch=args.rm_batch, micro_batch=args.micro_batch,
                       seed=args.seed + step, pad_id=tok.pad_id)[0] for k in range(args.rm_steps)]
    if d.main:
        save_examples(os.path.join(args.out, "rm_history", f"step_{step:06d}.jsonl"), new)
    history += new
    row = dict(rm_new=len(new), rm_replay=n_replay, rm_loss_first=losses[0], rm_loss_last=losses[-1],
               rm_auc_on_new=before["outcome_auc"], rm_group_auc_on_new=before["group_auc"],
               rm_seconds=time.time() - t0)
    if "step_auc" in before:
        row["rm_step_auc_on_new"] = before["step_auc"]
    return row


def label_examples(kinds, sources, tok, problems, args, d):
    """Sample the policies on the questions and label what they wrote: the rule's verdict for an outcome model,
    Math-Shepherd's step estimates for a process model. Returns {kind: (training examples, held-out (question,
    example) pairs, --drift's pairs)}, the same on every rank; the last tenth of the questions held out, whole."""
    t0 = time.time()
    comps, outcomes, golds, qids = sample_completions(sources, tok, problems, args, d)
    common.print0(d, f"rank 0: {len(comps)} distinct completions of {len(set(qids))} questions from "
                     f"{len(sources)} source(s), {np.mean(outcomes):.1%} right ({time.time() - t0:.0f} s)")
    built = {}
    if "orm" in kinds:
        built["orm"] = list(zip(qids, outcome_examples(comps, outcomes)))
    if "prm" in kinds:
        t0 = time.time()
        per_question = args.samples if args.shepherd_per_question is None else args.shepherd_per_question
        pick = first_per_question(qids, per_question)  # the first source's (sample_completions)
        completer = Transformer.from_pretrained(sources[0][0], device=d.device)
        built["prm"] = list(zip([qids[i] for i in pick], shepherd_examples(
            completer, tok, [comps[i] for i in pick], [outcomes[i] for i in pick], [golds[i] for i in pick],
            args.shepherd_samples, args.hard, engine.sampling_seed(args.seed, rank=d.rank, purpose=engine.SHEPHERD),
            args.gen_batch, args.max_new_tokens)))
        common.print0(d, f"Math-Shepherd labels for {sum(len(e.at) - 1 for _, e in built['prm'])} steps from "
                         f"{args.shepherd_samples} completions each ({time.time() - t0:.0f} s)")
        del completer
    unseen = len(problems) - max(1, len(problems) // 10)  # questions from here on are held out, whole
    drift = []
    if args.drift:  # a later policy's samples of them: what GRPO will show the reward model
        dc, do, _, dq = sample_completions(policy_sources([args.drift]), tok, problems[unseen:], args, d)
        drift = common.all_gather_list(d, list(zip(dq, outcome_examples(dc, do))))
    out = {}
    for kind in kinds:
        everyone = sorted(common.all_gather_list(d, built[kind]), key=lambda qe: qe[0])  # one order on all ranks
        out[kind] = ([e for q, e in everyone if q < unseen], [(q, e) for q, e in everyone if q >= unseen], drift)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", default="out/toy/sft", help="the body a reward model starts from (paper: the base "
                    "model; here the SFT model, the start of the RM that taught GRPO in docs/findings.md)")
    ap.add_argument("--policy", nargs="+", default=["out/toy/sft"], metavar="DIR[@T]", help="the models whose "
                    "samples are labelled, each at its temperature (default 1.0): --samples per question from each")
    ap.add_argument("--data", default="out/toy/data/problems/rl.jsonl", help="questions with answers")
    ap.add_argument("--eval-data", default="out/toy/data/problems/test.jsonl", help="the benchmark's test problems: "
                    "never sampled here")
    problem_sets.add_problem_args(ap)
    engine.add_chat_args(ap)
    ap.add_argument("--drift", metavar="DIR[@T]", help="also report on this policy's samples of the held-out "
                    "questions (a policy later than those trained on, as GRPO's will be)")
    ap.add_argument("--kinds", default="orm,prm", help="which to train: orm, prm or both")
    ap.add_argument("--out-dir", default="out/toy", help="each kind goes to <out-dir>/<kind>")
    ap.add_argument("--questions", type=positive, default=2000, help="questions sampled (a tenth held out for the "
                    "report; the toy has 2,000)")
    ap.add_argument("--samples", type=positive, default=4, help="completions per question")
    ap.add_argument("--shepherd-samples", type=positive, default=4, help="N, completions from each step's prefix "
                    "(Math-Shepherd: 8)")
    ap.add_argument("--shepherd-per-question", type=count, default=None, help="completions per question the process "
                    "model learns from (default: all --samples of the first policy; each costs N completions per "
                    "step to label)")
    ap.add_argument("--hard", action="store_true", help="a step is right if any completion from it is (Math-"
                    "Shepherd's hard estimate; default: the fraction that are, the soft one)")
    ap.add_argument("--max-new-tokens", type=positive, default=96)
    ap.add_argument("--max-steps", type=positive, default=300)
    ap.add_argument("--batch", type=positive, default=64, help="examples per optimizer step, all ranks")
    ap.add_argument("--micro-batch", type=positive, default=None, help="examples per forward/backward per rank "
                    "(default: 32 below 1B parameters, 4 above)")
    ap.add_argument("--gen-batch", type=positive, default=None, help="sequences decoded at once per rank (default: 128 "
                    "below 1B parameters, 32 above)")
    ap.add_argument("--orm-form", choices=("implicit", "head"), default="implicit", help="the outcome model: "
                    "implicit, a language model scored against its reference (ImplicitReward); head, a scalar "
                    "head read at the last token (the process model always has the head)")
    ap.add_argument("--implicit-beta", type=nonnegative, default=0.05, help="β of the implicit form's score (PRIME's)")
    ap.add_argument("--lr", type=nonnegative, default=None, help="peak LR (default: 1e-4 for the implicit form, 2e-4 "
                    "for a head; paper: 2e-5 at 7B)")
    common.add_training_args(ap, warmup=10, schedule="cosine", ckpt_every=50)
    return ap.parse_args(argv)


def main(args):
    kinds = args.kinds.split(",")
    if not kinds or set(kinds) - {"orm", "prm"}:
        raise SystemExit(f"error: --kinds {args.kinds}: expected orm, prm or orm,prm")
    d = common.init_dist(args.dtype)
    torch.manual_seed(args.seed)
    toy, sources = parse_args([]), policy_sources(args.policy)
    for path in [p for p, _ in sources] + [args.init]:  # the toy's SFT model is both: built here if missing
        common.require_model(path, toy.init, d, lambda: sft.main(sft.parse_args([])))
    tok = Tokenizer.load(sources[0][0])  # the policies share it
    engine.use_chat_args(tok, args)
    problems, _, _ = problem_sets.problems_and_held_out(args)  # the benchmark's questions stay unseen by this model too
    order = np.random.default_rng(args.seed).permutation(len(problems))[:args.questions]
    problems = [problems[i] for i in order]
    config = config_from_hf(args.init)
    common.size_defaults(args, config, d, micro_batch=(32, 4), gen_batch=(128, 32))
    if args.batch % (args.micro_batch * d.world):
        raise SystemExit(f"error: --batch {args.batch} is not a multiple of micro-batch x ranks = {args.micro_batch} x "
                         f"{d.world}")

    for kind in kinds:  # before sampling into it: no other live run writes there (a fresh run clears it)
        common.claim(os.path.join(args.out_dir, kind), d, args.resume)
    labelled = {kind: load_labelled(os.path.join(args.out_dir, kind), args) if args.resume else None
                for kind in kinds}
    if all(labelled.values()):
        common.print0(d, f"--resume: the labelled examples of {args.out_dir} read back, not sampled again")
    else:
        labelled = label_examples(kinds, sources, tok, problems, args, d)
        for kind in kinds if d.main else ():
            save_labelled(os.path.join(args.out_dir, kind), args, *labelled[kind])
    for kind in kinds:
        row = train(kind, *labelled[kind], config, tok, args, d)
        common.print0(d, f"{kind}: {len(labelled[kind][0])} examples; held out {json.dumps(row)}")
        common.print0(d, f"saved {os.path.join(args.out_dir, kind)}")
    common.finish(d)


if __name__ == "__main__":
    with common.one_line_errors():
        main(parse_args())
