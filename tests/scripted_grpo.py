"""grpo.py with scripted rollouts: `python tests/scripted_grpo.py <grpo.py arguments>`, alone or under torchrun.

A model that earns no reward gives advantages 0, a KL of 0 and no gradient, so a run of it tests nothing but that
it runs. Here engine.complete is replaced by `scripted`: each output is a function of its question and its index
in the group only (not of the rank, the step or the model), so 1, 2 or 4 ranks train on the same outputs, and the
rewards are mixed. Everything after the rollout (grading, advantages, masks, the loss, FSDP2, checkpoints) is
grpo.py's own.
"""
import sys
import zlib

import torch

import common
import engine
import grpo
import problem_sets

ANSWERS = {}  # question -> gold answer, from --data
SAMPLER_LOGPROBS = False  # give each output the sampler's log-probs (sampler_logprobs)


def group(question, answer):
    """The G = 4 scripted outputs for a question with gold `answer`, as (pieces, finished), each piece
    (text, written by the model?). 0: right, with a tool call whose output the sandbox wrote; 1: right, with
    multi-byte UTF-8 and a wrong arithmetic step; 2: wrong; 3: cut at the budget, no answer. A third of the
    questions (by a hash of the text) get wrong answers only: groups whose rewards agree."""
    right = "-1" if zlib.crc32(question.encode()) % 3 == 0 else answer
    return [
        ([("Compute it.\n```python\nprint(3 + 4)\n```\n", True), ("```output\n7\n```\n", False),
          (f"So 3 + 4 = 7 and the answer is \\boxed{{{right}}}.", True)], True),
        ([(f"Étape ① : 3 × 4 ≈ 12 ÷ 1\n5 * 2 = 11\nThe answer is \\boxed{{{right}}}.", True)], True),
        ([("2 + 2 = 4\nThe answer is \\boxed{-1}.", True)], True),
        ([("Let me think about this for a long while — ", True)], False),
    ]


def completion(tok, question, pieces, finished, prompt="cot"):
    """An engine.Completion of scripted pieces: the sandbox's pieces are not sampled; EOS ends a finished one.
    The entropies the sampler would have drawn each token at: a hash of the question, the place and the token
    (0 on the sandbox's, as engine.complete's)."""
    ids, sampled = [], []
    for text, model_wrote in pieces:
        piece = tok.encode(text)
        ids += piece
        sampled += [model_wrote] * len(piece)
    if finished:
        ids.append(tok.eos_id)
        sampled.append(True)
    entropies = [zlib.crc32(f"{question}|{t}|{x}".encode()) % 1000 / 1000 if s else 0.0
                 for t, (x, s) in enumerate(zip(ids, sampled))]
    return engine.Completion(engine.prompt_ids(tok, question, prompt), ids, sampled, finished,
                             "".join(text for text, _ in pieces), entropies=entropies)


def scripted(model, tok, questions, prompt="cot", max_new_tokens=512, temperature=0.0, top_p=1.0, seed=0, batch=64,
             code_timeout=5.0, progress=None, compile=False, top_k=0, min_p=0.0, keep=False):
    """engine.complete's signature; questions come as each question repeated G times, in order (no kept ids:
    --keep-sampling-mask refuses them)."""
    comps, seen = [], {}
    for q in questions:
        j = seen[q] = seen.get(q, -1) + 1
        comps.append(completion(tok, q, *group(q, ANSWERS[q])[j % 4], prompt))
    if SAMPLER_LOGPROBS:
        for c in comps:
            c.logprobs = sampler_logprobs(model, tok, c, temperature)
    return comps


def sampler_logprobs(model, tok, c, temperature):
    """What engine.complete returns beside each output: log π of its tokens under the model at the temperature,
    over the tokenizer's ids, 0 on the sandbox's. Only with --off-policy-mask, which needs them (one process: the
    other runs check that the training path works without them, on any number of ranks)."""
    ids = torch.tensor([c.prompt + c.ids])
    with torch.no_grad():
        lp = model(ids[:, :-1], ids[:, 1:], vocab_limit=tok.vocab_size, temperature=temperature or 1.0)
    lp = lp[0, len(c.prompt) - 1:]
    return [x if s else 0.0 for x, s in zip(lp.tolist(), c.sampled)]


if __name__ == "__main__":
    args = grpo.parse_args(sys.argv[1:])
    if args.group_size != 4:
        raise SystemExit("scripted_grpo.py scripts groups of 4: pass --group-size 4")
    ANSWERS.update((p["question"], p["answer"]) for p in problem_sets.load_problems(args.data))
    SAMPLER_LOGPROBS = args.off_policy_mask is not None
    engine.complete = scripted
    with common.one_line_errors():  # as grpo.py's own __main__
        grpo.main(args)
