"""Generation as GRPO and evaluation both need it: questions in; completions with their token ids, which of
those the model wrote (the loss mask), the sampler's log-probs and the text to grade out.

Two layers. `generate` is the decoder: token-id prompts in, sampled continuations out, on the model's KV cache
(model.prefill, model.decode_step). It is built for GRPO's shape of work, G samples of each of a few prompts with
ragged lengths:
- each distinct prompt is prefilled once and its keys and values are copied into the cache rows of its samples;
- the cache has a fixed number of rows (`slots`); a row whose sequence stops is refilled with a waiting one
  (continuous batching), so a batch never waits for its longest row; once nothing waits, the live rows are
  compacted into half as many, so the last long rows run at the batch size they need;
- stops (EOS, stop strings, the budget) are checked every `sync_every` tokens, the only time the host reads the
  device; what was generated past a stop is dropped;
- every sampled token's randomness is a function of (seed, the sequence's stream, its position) alone
  (`uniforms`), not of which row or batch the sequence ran in: a sequence samples the same tokens however the
  scheduler packs it, and resuming a run replays it exactly;
- a decode step has fixed shapes (the cache's), so `compile=True` can capture it in a CUDA graph.

`complete` puts questions in the paper's chat format with their prompt (data.PROMPTS) and runs tool rounds: for
tool-integrated solutions (paper §3; docs/paper.md §4), whenever the model opens a ```output block, generation
stops there, the sandbox runs the program above it, its output is spliced into the context as tokens the model
did not write, and generation continues, at most TOOL_ROUNDS times. For program-of-thought the last program runs
once at the end and its output is appended to the text that is graded. grpo.py trains on exactly what this
returns, so training and evaluation see the same prompts, tools and stopping rules.
"""

import re
from collections import Counter, deque
from dataclasses import dataclass

import torch

import data
from model import KVCache
from sandbox import run_python

TOOL_ROUNDS = 2  # sandbox executions per tool-integrated solution (paper §6)
OUTPUT_MARK = "```output"
OUTPUT_SHOWN = 512  # characters of a program's output shown to the model (ToRA shows a short tail as well)

# -----------------------------------------------------------------------------
# Sampling with counter-based randomness


def _mul32(x, c):
    """x * c mod 2^32 for x in [0, 2^32) (an int64 tensor or an int) and a constant c < 2^32, in pieces small
    enough that no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash with full avalanche (Wellons' lowbias32), elementwise."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seed, streams, positions):
    """One uniform number in [0, 1) per row, a function of (seed, stream, position) only: streams and positions
    are int64 tensors (B,). 24 bits, exact in float32 (a token of probability below 2^-24 is drawn at most at
    that rate, as from any float32 sampler)."""
    key = _mix32(_mix32(seed & 0xFFFFFFFF) ^ ((seed >> 32) & 0xFFFFFFFF))
    h = _mix32(_mix32(streams & 0xFFFFFFFF) ^ key)
    h = _mix32(h ^ _mix32((positions & 0xFFFFFFFF) ^ 0x9E3779B9))
    return (h >> 8).float() * 2.0 ** -24


def sample(logits, u, temperature=1.0, top_k=0, top_p=1.0):
    """One token per row from logits (B, V) with each row's uniform u (B,), by inverting the cumulative
    distribution: greedy at temperature 0, else softmax(logits / T) restricted to the top_k most likely tokens
    and to the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        p_sorted = sorted_logits.softmax(-1)
        drop = p_sorted.cumsum(-1) - p_sorted >= top_p  # mass before this token already reaches top_p
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    p = logits.softmax(-1)  # (B, V)
    cdf = p.cumsum(-1)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]  # first token whose cdf passes u
    last = p.size(-1) - 1 - (p > 0).flip(-1).int().argmax(-1)  # rounding can only overshoot into the zero tail
    return torch.minimum(tok, last)


# -----------------------------------------------------------------------------
# The decoder: shared prefill, continuous batching in a static cache


@dataclass
class Generation:
    tokens: list  # per prompt, the new token ids, ending with the EOS or stop token if it stopped
    finished: list  # per prompt, True if it stopped on EOS or a stop string, False if cut at its budget
    logprobs: list  # per prompt and token, log π(token) under the untempered model, over the ids it may sample


class _Step:
    """One decode step for every cache row, on the device: feed each row's last token, sample the next one, write
    it to the row's output. Shapes are those of the cache, so a compiled step runs without the host: with
    compile, torch.compile captures it (a CUDA graph on GPU, one per cache size), the cache and outputs marked as
    static buffers it updates in place, and the seed a tensor, so that a new seed is not a new graph."""

    def __init__(self, model, seed, temperature, top_k, top_p, vocab_limit, compile):
        dev = model.lm_head.weight.device
        self.model, self.vocab_limit, self.compiled = model, vocab_limit, compile
        self.seed = torch.tensor(seed, device=dev) if compile else seed
        self.opts = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.fn = torch.compile(self.step, dynamic=False, mode="reduce-overhead") if compile else self.step

    def __call__(self, cur, pos, count, streams, cache, out, out_lp):
        if not self.compiled:
            return self.step(cur, pos, count, streams, cache.k, cache.v, out, out_lp)
        for t in (cache.k, cache.v, out, out_lp):
            torch._dynamo.mark_static_address(t)
        # a graph's outputs live in its own memory, overwritten by its next run: the loop keeps copies
        return tuple(t.clone() for t in self.fn(cur, pos, count, streams, cache.k, cache.v, out, out_lp))

    def logits(self, h):
        return self.model.lm_head(h).float()[:, :self.vocab_limit]  # rows past the tokenizer's ids: never sampled

    def draw(self, logits, streams, positions):
        """Tokens for the positions `positions`, and their log-probs under the untempered model."""
        tok = sample(logits, uniforms(self.seed, streams, positions), **self.opts)
        return tok, logits.log_softmax(-1).gather(1, tok[:, None])[:, 0]

    def step(self, cur, pos, count, streams, k, v, out, out_lp):
        S, W = k.shape[3], out.shape[1]
        h = self.model.decode_step(cur, pos.clamp(max=S - 1), KVCache(k, v))  # past a row's end: it is stopping
        tok, lp = self.draw(self.logits(h), streams, pos + 1)
        rows, at = torch.arange(len(cur), device=cur.device), count.clamp(max=W - 1)
        out[rows, at], out_lp[rows, at] = tok, lp
        return tok, pos + 1, count + 1


@torch.no_grad()
def generate(model, prompts, max_new_tokens, *, temperature=1.0, top_k=0, top_p=1.0, eos_ids=(), stop=(),
             decode=None, seed=0, streams=None, vocab_limit=None, slots=64, sync_every=None, compile=False,
             progress=None):
    """Sample a continuation of each prompt (a list of token ids, BOS first) with the model's KV cache.

    max_new_tokens: one budget, or one per prompt (cut at the model's context). A sequence stops at any id of
    `eos_ids`, or once its decoded text holds a string of `stop` (needs `decode`, token ids to text).
    seed, streams (one int per prompt; default 0, 1, ...): the randomness of each token is a function of (seed,
    stream, position), so equal arguments give equal samples whatever `slots` is. vocab_limit: ids from there on
    are never sampled, for a head with more rows than the tokenizer has ids. slots: cache rows, sequences decoded
    at once. sync_every: decode steps between stop checks (default 1 on CPU, 8 on GPU, where each check waits for
    the device). compile: capture the decode step with torch.compile (a CUDA graph on GPU). progress: anything
    with .update(n), told of each finished sequence. Returns a Generation, in the order of `prompts`."""
    if stop and decode is None:
        raise ValueError("generate(stop=...) needs decode=<function from token ids to text>")
    cfg, dev, dtype = model.config, model.lm_head.weight.device, model.embed_tokens.weight.dtype
    n = len(prompts)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    budgets = [min(b, cfg.max_seq_len - len(p)) for p, b in zip(prompts, budgets)]
    if n and min(budgets) <= 0:
        P = len(prompts[budgets.index(min(budgets))])
        raise ValueError(f"prompt of {P} tokens leaves no room within max_seq_len={cfg.max_seq_len}")
    streams = list(range(n)) if streams is None else list(streams)
    k = sync_every or (8 if dev.type == "cuda" else 1)
    eos, max_stop = set(eos_ids), max((len(s.encode()) for s in stop), default=0)
    result = Generation([None] * n, [False] * n, [None] * n)
    if n == 0:
        return result

    B = min(slots, n)
    S = max(len(p) + b for p, b in zip(prompts, budgets))  # the longest sequence any row will hold
    W = max(budgets) + k  # a row may run up to k - 1 tokens past its stop before the check sees it
    cache = KVCache.empty(cfg, B, S, dtype, dev)
    out = torch.zeros(B, W, dtype=torch.long, device=dev)  # (B, W): each row's sampled tokens
    out_lp = torch.zeros(B, W, device=dev)
    cur, pos, count, row_stream = (torch.zeros(B, dtype=torch.long, device=dev) for _ in range(4))
    seq = [-1] * B  # which prompt each row holds (-1: none)
    checked = [0] * B  # tokens of each row already checked for a stop
    at = [0] * B  # each row's position, as the device's `pos`: attention need not read the cache past the furthest
    step = _Step(model, seed, temperature, top_k, top_p, vocab_limit, compile)
    queue = deque(range(n))
    waiting = Counter(tuple(p) for p in prompts)  # samples of each prompt not yet admitted
    prefixes = {}  # prompt -> (keys, values, last logits) of its prefill, kept while samples of it wait

    def admit(rows):
        """Give each free row the next waiting sequence: copy its prompt's cached prefill (prefilling the
        prompts not seen yet, in one batch) and sample its first token from the prompt's last logits."""
        js = [queue.popleft() for _ in rows]
        new = list(dict.fromkeys(tuple(prompts[j]) for j in js if tuple(prompts[j]) not in prefixes))
        if new:
            lens = torch.tensor([len(p) for p in new], device=dev)
            tokens = torch.zeros(len(new), max(len(p) for p in new), dtype=torch.long, device=dev)
            for i, p in enumerate(new):
                tokens[i, :len(p)] = torch.tensor(p)  # right-padded: causal attention never sees the padding
            fresh = KVCache.empty(cfg, len(new), tokens.shape[1], dtype, dev)
            h = model.prefill(tokens, fresh)[torch.arange(len(new), device=dev), lens - 1]  # (new, C)
            logits = step.logits(h)
            for i, p in enumerate(new):
                prefixes[p] = (fresh.k[:, i, :, :len(p)], fresh.v[:, i, :, :len(p)], logits[i])
        first = []
        for r, j in zip(rows, js):
            p = tuple(prompts[j])
            pk, pv, logits = prefixes[p]
            cache.k[:, r, :, :len(p)], cache.v[:, r, :, :len(p)] = pk, pv
            first.append(logits)
            waiting[p] -= 1
            if not waiting[p]:
                del prefixes[p]
            seq[r], checked[r], at[r] = j, 0, len(prompts[j])
        idx = torch.tensor(rows, device=dev)
        row_stream[idx] = torch.tensor([streams[j] for j in js], device=dev)
        pos[idx] = torch.tensor([len(prompts[j]) for j in js], device=dev)  # where the first new token goes
        tok, lp = step.draw(torch.stack(first), row_stream[idx], pos[idx])
        out[idx, 0], out_lp[idx, 0], cur[idx], count[idx] = tok, lp, tok, 1

    def stops_at(r, n_out, block, lo):
        """Where row r's sequence stops among its tokens sampled since the last check (of its first n_out;
        block[r] holds its tokens from lo on): (index of the last token kept, True if EOS or a stop string ended
        it, False if its budget did), or None if it goes on."""
        row = block[r]
        for t in range(checked[r], n_out):
            if row[t - lo] in eos or (max_stop and any(s in decode(row[max(lo, t + 1 - max_stop) - lo:t + 1 - lo])
                                                       for s in stop)):
                return t, True
            if t + 1 == budgets[seq[r]]:
                return t, False
        checked[r] = n_out
        return None

    while True:
        free = [r for r in range(len(seq)) if seq[r] < 0]
        if free and queue:
            admit(free[:len(queue)])
        live = [r for r in range(len(seq)) if seq[r] >= 0]
        if not live:
            break
        if not queue and len(live) <= len(seq) // 2:  # nothing waits: run the live rows at the size they need
            size = 1 << (len(live) - 1).bit_length()
            keep = live + [r for r in range(len(seq)) if seq[r] < 0][:size - len(live)]
            idx = torch.tensor(keep, device=dev)
            cache = KVCache(cache.k[:, idx], cache.v[:, idx])
            out, out_lp, cur, pos, count, row_stream = (t[idx] for t in (out, out_lp, cur, pos, count, row_stream))
            seq, checked, at = [seq[r] for r in keep], [checked[r] for r in keep], [at[r] for r in keep]
            live = list(range(len(live)))
        # eager: attend over the positions written so far only; compiled: over the whole cache, one shape
        L = S if compile else min(S, max(at[r] for r in live) + k)
        view = KVCache(cache.k[:, :, :, :L], cache.v[:, :, :, :L])
        for _ in range(k):
            cur, pos, count = step(cur, pos, count, row_stream, view, out, out_lp)
        at = [a + k for a in at]
        counts = [min(c, W) for c in count.tolist()]  # the host reads the device here only, every k steps
        lo = max(0, min(checked[r] for r in live) - max_stop)  # a stop string may begin in checked tokens
        block = out[:, lo:max(counts[r] for r in live)].tolist()
        for r in live:
            hit = stops_at(r, counts[r], block, lo)
            if hit is None:
                continue
            t, finished = hit
            j = seq[r]
            result.tokens[j], result.logprobs[j] = out[r, :t + 1].tolist(), out_lp[r, :t + 1].tolist()
            result.finished[j] = finished
            seq[r] = -1
            if progress is not None:
                progress.update(1)
    return result


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
def complete(model, tok, questions, prompt="cot", max_new_tokens=512, temperature=0.0, top_p=1.0, seed=0,
             batch=64, code_timeout=5.0, progress=None, compile=False):
    """One completion per question (repeat a question for several samples; its copies share one prefill), with
    `batch` sequences decoded at once and one `generate` call per tool round. Question i samples from stream i
    of `seed`. compile: capture the decode step (generate). Returns [Completion] in the order of `questions`."""
    prompts = [prompt_ids(tok, q, prompt) for q in questions]
    n = len(prompts)
    ids, sampled, logprobs = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
    finished, live = [False] * n, list(range(n))
    rounds = TOOL_ROUNDS + 1 if prompt == "tool" else 1
    for round_ in range(rounds):
        budget = {i: min(max_new_tokens - len(ids[i]), model.config.max_seq_len - len(prompts[i]) - len(ids[i]))
                  for i in live}  # a sequence with no room left (budget or context) is done
        live = [i for i in live if budget[i] > 0]
        if not live:
            break
        stop = (OUTPUT_MARK,) if prompt == "tool" and round_ < TOOL_ROUNDS else ()
        gen = generate(model, [prompts[i] + ids[i] for i in live], [budget[i] for i in live],
                       temperature=temperature, top_p=top_p, eos_ids=tok.stop_ids, stop=stop, decode=tok.decode,
                       seed=seed, streams=live, vocab_limit=tok.vocab_size,  # a head may have more rows than ids
                       slots=batch, progress=progress if rounds == 1 else None, compile=compile)
        again = []
        for i, new, lp, fin in zip(live, gen.tokens, gen.logprobs, gen.finished):
            ids[i] += new
            sampled[i] += [True] * len(new)
            logprobs[i] += lp
            finished[i] = fin
            if fin and new and new[-1] not in tok.stop_ids:  # stopped at ```output: run the program above it
                shown = program_output(last_program(tok.decode(ids[i])), code_timeout)
                spliced = tok.encode("\n" + shown + "\n```\n")
                ids[i] += spliced
                sampled[i] += [False] * len(spliced)
                logprobs[i] += [0.0] * len(spliced)
                finished[i] = False
                again.append(i)
        live = again
    out = []
    for i in range(n):
        text = tok.decode([t for t in ids[i] if t not in tok.stop_ids])
        if prompt == "pot":
            text += f"\n{OUTPUT_MARK}\n{program_output(last_program(text), code_timeout)}\n```"
        out.append(Completion(prompts[i], ids[i], sampled[i], finished[i], text, logprobs[i]))
    if progress is not None and rounds > 1:
        progress.update(n)
    return out
