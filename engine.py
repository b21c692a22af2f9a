"""Generation as GRPO and evaluation both need it: questions in; completions with their token ids, which of
those the model wrote (the loss mask), and the text to grade out. Tool rounds go through the sandbox.

One function, `complete`: each question is put in the paper's chat format with its prompt (data.PROMPTS), and
batches of them go through the model's KV-cache sampler (model.generate). For tool-integrated solutions (paper
§3; docs/paper.md §4), whenever the model opens a ```output block, generation stops there, the sandbox runs the
program above it, its output is spliced into the context as tokens the model did not write, and generation
continues, at most TOOL_ROUNDS times. For program-of-thought the last program runs once at the end and its output
is appended to the text that is graded. grpo.py trains on exactly what this returns, so training and evaluation
see the same prompts, tools and stopping rules.
"""

import re
from dataclasses import dataclass

import torch

import data
from sandbox import run_python

TOOL_ROUNDS = 2  # sandbox executions per tool-integrated solution (paper §6)
OUTPUT_MARK = "```output"
OUTPUT_SHOWN = 512  # characters of a program's output shown to the model (ToRA shows a short tail as well)

# -----------------------------------------------------------------------------
# Completions, with the sandbox in the loop


@dataclass
class Completion:
    prompt: list  # the prompt's token ids
    ids: list  # the completion's token ids: the model's, tool outputs spliced in; ends with EOS if it stopped
    sampled: list  # per id, True where the model wrote it, False where the sandbox did (no loss on those)
    finished: bool  # False if cut at the token budget
    text: str  # what is graded: the decoded completion, for PoT followed by its program's output block
    logprobs: list = None  # per id, log π(id) as the sampler computed it (0.0 where the sandbox wrote it)


def last_program(text):
    """The last ```python block of a text, or None."""
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return blocks[-1] if blocks else None


def program_output(code, timeout):
    """What the model is shown of running `code` in the sandbox: stdout, or the error line if it failed."""
    if code is None:
        return "no program found"
    r = run_python(code, timeout=timeout)
    out = r.stdout if r.ok else (r.stdout + (r.error or "error")).strip()
    return out.strip()[-OUTPUT_SHOWN:]


def prompt_ids(tok, question, prompt="cot"):
    """The token ids a question is asked with: its prompt (data.PROMPTS) in the chat format, BOS first."""
    return tok.chat(data.PROMPTS[prompt].format(question=question))


@torch.no_grad()
def complete(model, tok, questions, prompt="cot", max_new_tokens=512, temperature=0.0, top_p=1.0, generator=None,
             batch=64, code_timeout=5.0, progress=None):
    """One completion per question (repeat a question for several samples), in batches of `batch`, each batch a
    single KV-cache generate call per tool round. Returns [Completion] in the order of `questions`."""
    prompts = [prompt_ids(tok, q, prompt) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: little left-padding
    out = [None] * len(prompts)
    for s in range(0, len(order), batch):
        rows = order[s:s + batch]
        ids, sampled, logprobs = {i: [] for i in rows}, {i: [] for i in rows}, {i: [] for i in rows}
        finished, live = {i: False for i in rows}, list(rows)
        for round_ in range(TOOL_ROUNDS + 1 if prompt == "tool" else 1):
            budget = {i: min(max_new_tokens - len(ids[i]), model.config.max_seq_len - len(prompts[i]) - len(ids[i]))
                      for i in live}  # a row with no room left (budget or context) is done
            live = [i for i in live if budget[i] > 0]
            if not live:
                break
            stop = (OUTPUT_MARK,) if prompt == "tool" and round_ < TOOL_ROUNDS else ()
            gen = model.generate([prompts[i] + ids[i] for i in live], max(budget[i] for i in live),
                                 temperature=temperature, top_p=top_p, eos_ids=[tok.eos_id], pad_id=tok.pad_id,
                                 stop=stop, decode=tok.decode, generator=generator, logprobs=True,
                                 vocab_limit=tok.vocab_size)  # a model may have more output rows than ids
            again = []
            for i, new, lp, fin in zip(live, gen.tokens, gen.logprobs, gen.finished):
                if len(new) > budget[i]:
                    new, lp, fin = new[:budget[i]], lp[:budget[i]], False
                ids[i] += new
                sampled[i] += [True] * len(new)
                logprobs[i] += lp
                finished[i] = fin
                if fin and new and new[-1] != tok.eos_id:  # stopped at ```output: run the program above it
                    shown = program_output(last_program(tok.decode(ids[i])), code_timeout)
                    spliced = tok.encode("\n" + shown + "\n```\n")
                    ids[i] += spliced
                    sampled[i] += [False] * len(spliced)
                    logprobs[i] += [0.0] * len(spliced)
                    finished[i] = False
                    again.append(i)
            live = again
        for i in rows:
            text = tok.decode([t for t in ids[i] if t != tok.eos_id])
            if prompt == "pot":
                text += f"\n{OUTPUT_MARK}\n{program_output(last_program(text), code_timeout)}\n```"
            out[i] = Completion(prompts[i], ids[i], sampled[i], finished[i], text, logprobs[i])
        if progress is not None:
            progress.update(len(rows))
    return out
