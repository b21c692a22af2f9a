"""Generation as GRPO and evaluation both need it: questions in; completions with their token ids, which of
those the model wrote (the loss mask), the sampler's log-probs, the entropies it drew them at and the text to
grade out.

Two layers. `Decoder.generate` (and `generate`, one call's Decoder) is the decoder: token-id prompts in, sampled
continuations out, on a KV cache of one K and one V tensor per layer (model.prefill, model.decode_step). It is
built for GRPO's shape of work, G samples of each of a few prompts with ragged lengths:
- each distinct prompt is prefilled once and its keys and values are copied into the cache rows of its samples;
- the cache has a fixed number of rows (`slots`); a row whose sequence stops is refilled with a waiting one
  (continuous batching), so a batch never waits for its longest row; once nothing waits, the live rows are
  compacted into half as many, so the last long rows run at the batch size they need;
- stops (EOS, stop strings, the budget) are checked every `sync_every` tokens, the only time the host reads the
  device; what was generated past a stop is dropped;
- every sampled token's randomness is a function of (seed, the sequence's stream, its position) alone
  (`uniforms`, drawn for a whole row when it is given its sequence), not of which row or batch the sequence ran
  in: a sequence samples the same tokens however the scheduler packs it, and resuming a run replays it exactly;
  a token is drawn by inverting the CDF in two levels (`sample`), a few fused reductions;
- a decode step writes every buffer in place, reads nothing back to the host and has no shape that depends on
  the data, so `compile=True` compiles it once for every batch and row count and captures it in CUDA graphs
  that a Decoder kept across calls replays on the same memory.

`complete` puts questions in the paper's chat format with their prompt (PROMPTS) and runs tool rounds: for
tool-integrated solutions (paper §3; docs/paper.md §4), whenever the model opens a ```output block, generation
stops there, the sandbox runs the program above it, its output is spliced into the context as tokens the model
did not write, and generation continues, at most TOOL_ROUNDS times. For program-of-thought the last program runs
once at the end and its output is appended to the text that is graded. grpo.py trains on exactly what this
returns, so training and evaluation see the same prompts, tools and stopping rules.
"""

import math
import re
from collections import Counter, deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import KVCache
from sandbox import run_python

TOOL_ROUNDS = 2  # sandbox executions per tool-integrated solution (paper §6)
OUTPUT_MARK = "```output"
OUTPUT_SHOWN = 512  # characters of a program's output shown to the model (ToRA shows a short tail as well)

# -----------------------------------------------------------------------------
# Sampling with counter-based randomness

BLOCK = 1024  # token ids per block of the two-level inverse CDF (sample)


def _mul32(x, c):
    """x * c mod 2^32 for x in [0, 2^32) (an int64 tensor or an int) and a constant c < 2^32, with no int64 product
    that overflows: x * (c mod 2^31) < 2^63, and x * 2^31 mod 2^32 is x's lowest bit moved to the top."""
    y = x * (c & 0x7FFFFFFF)
    if c >> 31:
        y = y + ((x & 1) << 31)
    return y & 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash with full avalanche (Wellons' lowbias32), elementwise."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seed, streams, positions):
    """One uniform number in [0, 1) per element, a function of (seed, stream, position) only: streams and positions
    are int64 tensors of one shape (or broadcasting). 24 bits, exact in float32 (a token of probability below
    2^-24 is drawn at most at that rate, as from any float32 sampler)."""
    key = _mix32(_mix32(seed & 0xFFFFFFFF) ^ ((seed >> 32) & 0xFFFFFFFF))
    h = _mix32(_mix32(streams & 0xFFFFFFFF) ^ key)
    h = _mix32(h ^ _mix32((positions & 0xFFFFFFFF) ^ 0x9E3779B9))
    return (h >> 8).float() * 2.0 ** -24


def sample(logits, u, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """One token per row from logits (B, V) with each row's uniform u (B,), by inverting the cumulative
    distribution: greedy at temperature 0, else softmax(logits / T) restricted to the top_k most likely tokens,
    to the smallest set whose probability reaches top_p and to those at least min_p times as likely as the
    likeliest (cut)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = cut(tempered(logits, temperature), top_k, top_p, min_p)[0]
    return _invert_cdf((logits - logits.amax(-1, keepdim=True)).exp(), u)


def cut(logits, top_k=0, top_p=1.0, min_p=0.0):
    """(logits (B, V) with -inf outside the tokens a sampler may draw, and with top_k those tokens' ids, most
    likely first, -1 after them: (B, top_k), what DeepSeek-V3.2's keep-sampling mask renormalises π over; else
    None). The tokens: the top_k largest (exactly k: of ids tied at the k-th value topk picks some), then the
    smallest set of those whose probability reaches top_p, found among the k alone (no sort of the vocabulary),
    then those at least min_p times as likely as the likeliest (min-p sampling, as transformers orders them)."""
    if not top_k:
        if top_p < 1.0:
            sorted_logits, idx = logits.sort(dim=-1, descending=True)
            logits = logits.scatter(-1, idx, _nucleus(sorted_logits, top_p))
        return _min_p(logits, min_p), None
    top = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)  # sorted, most likely first
    values = _min_p(_nucleus(top.values, top_p) if top_p < 1.0 else top.values, min_p)
    logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, values)
    ids = top.indices.masked_fill(values == float("-inf"), -1)
    return logits, F.pad(ids, (0, top_k - ids.size(-1)), value=-1)  # top_k past the vocabulary: -1 after it all


def cuts_refused(top_k, top_p, min_p):
    """Why cut cannot take these settings (each would leave no token, or is not a number of tokens), or None: what
    generate and the command lines refuse."""
    if top_k < 0 or not 0 < top_p <= 1 or not 0 <= min_p < 1:
        return (f"top-k {top_k}, top-p {top_p} and min-p {min_p}: top-k is a number of tokens >= 0, top-p a "
                "probability in (0, 1], min-p a ratio in [0, 1)")
    return None


def _nucleus(sorted_logits, top_p):
    """Logits sorted in descending order with -inf from the first token whose mass before it reaches top_p."""
    p = sorted_logits.softmax(-1)
    return sorted_logits.masked_fill(_cumsum(p) - p >= top_p, float("-inf"))


def _min_p(logits, min_p):
    """-inf where a token is less than min_p times as likely as its row's likeliest (none cut at min_p = 0)."""
    if not min_p:
        return logits
    return logits.masked_fill(logits < logits.amax(-1, keepdim=True) + math.log(min_p), float("-inf"))


def _blocks(p):
    """(B, V) -> (B, ceil(V / BLOCK), BLOCK), zero-padded."""
    return F.pad(p, (0, -p.size(-1) % BLOCK)).view(p.size(0), -1, BLOCK)


def _cumsum(p):
    """Cumulative sums along the last dimension in two levels, within blocks and over block totals: a scan over
    the whole vocabulary is what inductor failed to generate code for on CUDA (V = 102,400, torch 2.11)."""
    blocks = _blocks(p)
    mass = blocks.sum(-1)  # (B, nb)
    return (blocks.cumsum(-1) + (mass.cumsum(-1) - mass)[..., None]).flatten(1)[:, :p.size(-1)]


def _invert_cdf(p, u):
    """The first id whose cumulative mass exceeds u times the total of p (B, V) (unnormalised probabilities),
    found in two levels: the block the draw falls in, then the id within it. u < 1 puts the draw below the total,
    so the block has mass; within it, the scan's rounding may put the draw before its first id or past its last
    one with mass: it gets that id."""
    blocks = _blocks(p)  # (B, nb, BLOCK)
    mass = blocks.sum(-1)  # (B, nb)
    cdf = mass.cumsum(-1)
    target = u * cdf[:, -1]  # (B,)
    blk = (cdf <= target[:, None]).sum(-1)  # (B,)
    inner = blocks.gather(1, blk[:, None, None].expand(-1, 1, BLOCK))[:, 0]  # (B, BLOCK)
    rest = (target - (cdf - mass).gather(1, blk[:, None])[:, 0]).clamp(min=0)  # the draw's place in its block
    j = (inner.cumsum(-1) <= rest[:, None]).sum(-1)
    last = BLOCK - 1 - (inner > 0).flip(-1).int().argmax(-1)
    return blk * BLOCK + torch.minimum(j, last)


def tempered(logits, temperature):
    """The logits of softmax(logits / T), the distribution a token is drawn from before top-k and top-p cut it
    (the model's own when greedy, T = 0): what the sampler reports log-probs and entropies under, and the π that
    grpo.py trains (as TRL and verl do), unless it keeps the sampling mask (draw's keep)."""
    return logits if temperature in (0, 1) else logits / temperature


def draw(logits, u, temperature, top_k, top_p, min_p=0.0, keep=False):
    """What the decoder writes for each new token: one token per row (sample), its log-prob and the entropy of
    the distribution it was drawn from, both at the temperature, and with keep the ids it could have drawn
    (cut's, (B, top_k)), the log-prob and entropy then those of π renormalised over them, the distribution
    the token was truly drawn from; else None, and those of the whole tempered π. The logits are tempered once,
    then sampled as they are (temperature 1; 0 keeps greedy)."""
    logits = tempered(logits, temperature)
    if not keep:
        tok = sample(logits, u, 1.0 if temperature else 0.0, top_k, top_p, min_p)
        return tok, token_logprob(logits, tok), entropy(logits), None
    logits, ids = cut(logits, top_k, top_p, min_p)
    tok = sample(logits, u, 1.0)
    return tok, token_logprob(logits, tok), entropy(logits), ids


def token_logprob(logits, tok):
    """log softmax(logits)[tok] per row, without the (B, V) log-softmax: x[tok] - lse, as the trainer's kernels
    compute it (read from entropy's log_softmax instead, the fp32 sampler/trainer gap of 3 toy steps rose from
    4-7e-8 to 8e-7)."""
    return logits.gather(1, tok[:, None])[:, 0] - logits.logsumexp(-1)


def entropy(logits):
    """The entropy of softmax(logits) per row, in nats: Σ -p log p, each term >= 0 (lse - Σ p·x would cancel
    to noise on a near-certain row); logits may be -inf (cut)."""
    logp = logits.log_softmax(-1)
    return torch.where(logp == float("-inf"), 0.0, -(logp.exp() * logp)).sum(-1)  # a cut token adds 0, not NaN


# -----------------------------------------------------------------------------
# The decoder: shared prefill, continuous batching in a static cache


@dataclass
class Generation:
    tokens: list  # per prompt, the new token ids, ending with the EOS or stop token if it stopped
    finished: list  # per prompt, True if it stopped on EOS or a stop string, False if cut at its budget
    logprobs: list  # per prompt and token, log π(token) at the temperature (tempered), over the ids it may sample
    entropies: list  # per prompt and token, the entropy of that distribution where the token was drawn
    kept: list = None  # keep=True: per prompt and token, the top_k ids it could have been (cut's)


@dataclass
class _Rows:
    """What the decoder keeps on the device for each of its R rows: the KV cache (R rows of S positions), the
    row's last token, the position the next one goes to, how many it has written, its random numbers (one per
    token it may write, drawn when the row is given its sequence) and its tokens, their log-probs, the
    entropies they were drawn at (W of each) and the ids each could have been (W x K, K = 0 without keep)."""
    cache: KVCache
    cur: torch.Tensor  # (R,) int64
    pos: torch.Tensor  # (R,) int64
    count: torch.Tensor  # (R,) int64
    u: torch.Tensor  # (R, W) float32
    out: torch.Tensor  # (R, W) int64
    out_lp: torch.Tensor  # (R, W) float32
    out_ent: torch.Tensor  # (R, W) float32
    out_kept: torch.Tensor  # (R, W, K) int64

    @classmethod
    def empty(cls, config, rows, length, width, kept, dtype, device):
        def z(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)
        return cls(KVCache.empty(config, rows, length, dtype, device), z(rows), z(rows), z(rows),
                   z(rows, width, dtype=torch.float32), z(rows, width), z(rows, width, dtype=torch.float32),
                   z(rows, width, dtype=torch.float32), z(rows, width, kept))

    @property
    def shape(self):
        """(rows, positions, width, kept ids a token)"""
        return self.out.shape[0], self.cache.k[0].shape[2], self.out.shape[1], self.out_kept.shape[2]

    def tensors(self):
        return [*self.cache.k, *self.cache.v, self.cur, self.pos, self.count, self.u, self.out, self.out_lp,
                self.out_ent, self.out_kept]

    def keep(self, idx):
        """Rows idx (a tensor) moved to the front, in order, in place (compaction)."""
        for t in self.tensors():
            t[:len(idx)] = t[idx]


def _decode_step(model, n, L, cur, pos, count, u, out, out_lp, out_ent, out_kept, k, v, temperature, top_k, top_p,
                 keep, vocab_limit, min_p=0.0):
    """One decode step of rows [0, n), attending over the first L cache positions: feed each row's last token,
    sample the next one with the row's random number for it, write it, its log-prob, the entropy it was drawn
    at and with keep the ids it could have been to the row's output. Every write is in place into whole
    buffers, no shape depends on the data and nothing goes back to the host: this is what torch.compile captures
    (a CUDA graph per (n, L) on GPU)."""
    rows = torch.arange(n, device=cur.device)
    h = model.decode_step(cur[:n], pos[:n].clamp(max=L - 1), KVCache(k, v), L)  # past a row's end: it is stopping
    logits = model.logits(h, vocab_limit).float()  # rows past the tokenizer's ids: never sampled
    at = count[:n].clamp(max=out.shape[1] - 1)
    tok, lp, ent, kept = draw(logits, u[rows, at], temperature, top_k, top_p, min_p, keep)
    out[rows, at], out_lp[rows, at], out_ent[rows, at] = tok, lp, ent
    if keep:
        out_kept[rows, at] = kept
    cur[rows], pos[rows], count[rows] = tok, pos[:n] + 1, count[:n] + 1


class _Queue:
    """The host's side of one generate call: the prompts waiting for a row, which one each row holds, how far each
    row's tokens are checked for a stop, each row's position (as the device's `pos`: attention need not read the
    cache past the furthest), the prefills of prompts whose samples still wait, and the finished sequences."""

    def __init__(self, prompts, budgets, streams, rows, eos_ids, stop, decode):
        self.prompts, self.budgets, self.streams = prompts, budgets, streams
        self.eos, self.stop, self.decode = set(eos_ids), stop, decode
        self.max_stop = max((len(s.encode()) for s in stop), default=0)
        self.queue = deque(range(len(prompts)))
        self.waiting = Counter(tuple(p) for p in prompts)  # samples of each prompt not yet admitted
        self.prefixes = {}  # prompt -> (its keys and values per layer, its last logits), kept while samples of it wait
        self.seq, self.checked, self.at = [-1] * rows, [0] * rows, [0] * rows  # seq: -1 where a row is free
        n = len(prompts)
        self.result = Generation([None] * n, [False] * n, [None] * n, [None] * n)

    def keep(self, rows):
        """Rows `rows` moved to the front, as _Rows.keep moves their device state."""
        self.seq, self.checked, self.at = ([x[r] for r in rows] for x in (self.seq, self.checked, self.at))

    def collect(self, st, live, W, progress):
        """Read the live rows' new tokens back (the host's only read of the device, every k steps) and finish each
        row whose sequence stopped: its tokens and log-probs into the result, the row freed."""
        counts = [min(c, W) for c in st.count[:len(self.seq)].tolist()]
        lo = max(0, min(self.checked[r] for r in live) - self.max_stop)  # a stop string may begin in checked tokens
        block = st.out[:len(self.seq), lo:max(counts[r] for r in live)].tolist()
        for r in live:
            hit = self.stops_at(r, counts[r], block[r], lo)
            if hit is None:
                continue
            t, finished = hit
            j = self.seq[r]
            self.result.tokens[j], self.result.logprobs[j] = st.out[r, :t + 1].tolist(), st.out_lp[r, :t + 1].tolist()
            self.result.entropies[j] = st.out_ent[r, :t + 1].tolist()
            if self.result.kept is not None:
                self.result.kept[j] = st.out_kept[r, :t + 1].tolist()
            self.result.finished[j] = finished
            self.seq[r] = -1
            if progress is not None:
                progress.update(1)

    def stops_at(self, r, n_out, row, lo):
        """Where row r's sequence stops among its tokens sampled since the last check (of its first n_out; `row`
        holds its tokens from lo on): (index of the last token kept, True if EOS or a stop string ended it, False
        if its budget did), or None if it goes on."""
        m = self.max_stop
        for t in range(self.checked[r], n_out):
            if row[t - lo] in self.eos or (m and any(s in self.decode(row[max(lo, t + 1 - m) - lo:t + 1 - lo])
                                                     for s in self.stop)):
                return t, True
            if t + 1 == self.budgets[self.seq[r]]:
                return t, False
        self.checked[r] = n_out
        return None


class Decoder:
    """A model's decoder. Its device state (_Rows) and its decode step persist from one call of `generate` to the
    next with compile=True: the buffers are allocated at the largest shape asked for so far (lengths rounded up,
    so that a new batch of prompts seldom needs a new one) and the step is compiled once, whole (fullgraph) and
    for any row count and attention length (dynamic shapes), so that a CUDA graph recorded on those buffers is
    replayed in every later call: GRPO keeps one Decoder for the run. Without compile each call allocates what it
    needs and frees it (the memory goes back to training) and runs the step eagerly."""

    def __init__(self, model, compile=False):
        self.model, self.compiled, self.rows = model, compile, None
        mode = "reduce-overhead" if model.lm_head.weight.is_cuda else None  # CUDA graphs
        self.step = torch.compile(_decode_step, fullgraph=True, dynamic=True, mode=mode) if compile else _decode_step

    def _state(self, R, S, W, K):
        """Buffers for R rows of S positions, W new tokens and K kept ids a token: this call's own (eager), or the
        Decoder's if they are large enough (and of K ids), else larger ones (compiled)."""
        cfg, dev, dtype = self.model.config, self.model.lm_head.weight.device, self.model.embed_tokens.weight.dtype
        if not self.compiled:
            return _Rows.empty(cfg, R, S, W, K, dtype, dev)
        if self.rows is not None:
            have = self.rows.shape
            if all(h >= need for h, need in zip(have, (R, S, W))) and have[3] == K:
                return self.rows
            R, S, W = (max(h, need) for h, need in zip(have, (R, S, W)))  # grow, never shrink
        S, W = min(-(-S // 256) * 256, cfg.max_seq_len), -(-W // 64) * 64
        self.rows = None  # free the old buffers first
        self.rows = _Rows.empty(cfg, R, S, W, K, dtype, dev)
        for t in self.rows.tensors():
            torch._dynamo.mark_static_address(t)  # a graph's input that stays where it is: no copy per replay
            # rows, positions and width (not heads, head dim or K) are sizes, or one equal to a model's (32 rows of
            # a 7B model's 32 heads: duck sizing) fixes the graph to these buffers and larger ones compile it again
            for dim in (0, 2) if t.dim() == 4 else range(min(t.dim(), 2)):  # k, v: (rows, heads, positions, dim)
                torch._dynamo.maybe_mark_dynamic(t, dim)
        return self.rows

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, keep=False,
                 eos_ids=(), stop=(), decode=None, seed=0, streams=None, vocab_limit=None, slots=64, sync_every=None,
                 progress=None):
        """Sample a continuation of each prompt (a list of token ids, BOS first if the tokenizer has one), at the
        temperature, from the tokens top_k, top_p and min_p leave (cut).

        max_new_tokens: one budget, or one per prompt (cut at the model's context). A sequence stops at any id of
        `eos_ids`, or once its decoded text holds a string of `stop` (needs `decode`, token ids to text).
        keep: also return the top_k ids each token could have been (Generation.kept), and its log-prob and entropy
        over them (draw); needs top_k, which bounds what is stored, and a temperature above 0.
        seed, streams (one int per prompt; default 0, 1, ...): the randomness of each token is a function of (seed,
        stream, position), so equal arguments give equal samples whatever `slots` is. vocab_limit: ids from there
        on are never sampled, for a head with more rows than the tokenizer has ids. slots: cache rows, sequences
        decoded at once. sync_every: decode steps between stop checks (default 1 on CPU, 8 on GPU, where each check
        waits for the device). progress: anything with .update(n), told of each finished sequence. Returns a
        Generation, in the order of `prompts`."""
        model, cfg = self.model, self.model.config
        if stop and decode is None:
            raise ValueError("generate(stop=...) needs decode=<function from token ids to text>")
        if refused := cuts_refused(top_k, top_p, min_p):
            raise ValueError(f"generate: {refused}")
        if temperature < 0:  # logits / T < 0 would draw the least likely tokens first
            raise ValueError(f"generate: temperature {temperature}, expected >= 0 (0: greedy)")
        if keep and not (top_k and temperature):
            raise ValueError("generate(keep=True) stores the top_k ids a token could have been: it needs top_k > 0 "
                             "and temperature > 0")
        n = len(prompts)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        budgets = [min(b, cfg.max_seq_len - len(p)) for p, b in zip(prompts, budgets)]
        if n and min(budgets) <= 0:
            P = len(prompts[budgets.index(min(budgets))])
            raise ValueError(f"prompt of {P} tokens leaves no room within max_seq_len={cfg.max_seq_len}")
        k = sync_every or (8 if model.lm_head.weight.is_cuda else 1)
        # a step compiled for n rows is compiled again for one (torch makes sizes 0 and 1 constants): a compiled
        # decoder steps two at least, the last sequence beside a free row
        least = 2 if self.compiled else 1
        B = max(min(slots, n), least)  # rows in use: [0, B), halved as the queue empties
        q = _Queue(prompts, budgets, list(range(n)) if streams is None else list(streams), B, eos_ids, stop, decode)
        if keep:
            q.result.kept = [None] * n
        if n == 0:
            return q.result
        # the longest sequence a row holds; W: a row may run up to k - 1 tokens past its stop before a check sees it
        st = self._state(B, max(len(p) + b for p, b in zip(prompts, budgets)), max(budgets) + k, top_k if keep else 0)
        S, W = st.shape[1:3]
        opts = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, keep=keep)
        while True:
            free = [r for r in range(B) if q.seq[r] < 0]
            if free and q.queue:
                self._admit(q, st, free[:len(q.queue)], seed, W, vocab_limit, opts)
            live = [r for r in range(B) if q.seq[r] >= 0]
            if not live:
                return q.result
            if not q.queue and len(live) <= B // 2 and B > least:  # nothing waits: run the live rows only
                B = max(1 << (len(live) - 1).bit_length(), least)  # (the next power of two: fewer graphs)
                keep = live + [r for r in range(len(q.seq)) if q.seq[r] < 0][:B - len(live)]
                st.keep(torch.tensor(keep, device=st.cur.device))
                q.keep(keep)
                live = list(range(len(live)))
            # attend over the positions written so far only (compiled: rounded up, for fewer graphs)
            L = max(q.at[r] for r in live) + k
            # and never the cache's length S: the last token of a sequence of S is sampled, not fed, and where L
            # equals S the slice attended over is contiguous: torch guards on that and compiled the step again
            L = min(S - 1, -(-L // 64) * 64 if self.compiled else L)
            # the sampler's floats, constants of the call: traced as symbols, inductor failed to make them tensors
            # and dynamo traced the step again, specialised (a fifth of a cold compile on the CPU)
            with torch._dynamo.config.patch(specialize_float=True):
                for _ in range(k):
                    self.step(model, B, L, st.cur, st.pos, st.count, st.u, st.out, st.out_lp, st.out_ent,
                              st.out_kept, st.cache.k, st.cache.v, vocab_limit=vocab_limit, **opts)
            q.at = [a + k for a in q.at]
            q.collect(st, live, W, progress)

    def _admit(self, q, st, rows, seed, W, vocab_limit, opts):
        """Give each free row the next waiting sequence: copy its prompt's cached prefill (prefilling the prompts
        not seen yet, in one batch), draw its random numbers and sample its first token from the prompt's last
        logits."""
        js = [q.queue.popleft() for _ in rows]
        self._prefill([p for p in dict.fromkeys(tuple(q.prompts[j]) for j in js) if p not in q.prefixes], q.prefixes,
                      vocab_limit)
        dev, by_prompt, first = st.cur.device, {}, []
        for r, j in zip(rows, js):
            p = tuple(q.prompts[j])
            by_prompt.setdefault(p, []).append(r)
            first.append(q.prefixes[p][2])
            q.seq[r], q.checked[r], q.at[r] = j, 0, len(p)
        for p, rs in by_prompt.items():  # one copy per layer of each prompt into all its rows
            idx, (pk, pv, _) = torch.tensor(rs, device=dev), q.prefixes[p]
            for i in range(self.model.config.n_layers):
                st.cache.k[i][idx, :, :len(p)], st.cache.v[i][idx, :, :len(p)] = pk[i], pv[i]
            q.waiting[p] -= len(rs)
            if not q.waiting[p]:
                del q.prefixes[p]
        idx = torch.tensor(rows, device=dev)
        start = torch.tensor([len(q.prompts[j]) for j in js], device=dev)  # where the first new token goes
        stream = torch.tensor([q.streams[j] for j in js], device=dev)
        st.u[idx] = uniforms(seed, stream[:, None], start[:, None] + torch.arange(W, device=dev))  # (rows, W)
        tok, lp, ent, kept = draw(torch.stack(first), st.u[idx, 0], **opts)
        st.out[idx, 0], st.out_lp[idx, 0], st.out_ent[idx, 0] = tok, lp, ent
        if kept is not None:
            st.out_kept[idx, 0] = kept
        st.cur[idx], st.pos[idx], st.count[idx] = tok, start, 1

    def _prefill(self, new, prefixes, vocab_limit):
        """Run the prompts `new` (tuples of ids) through the model in one right-padded batch (causal attention never
        sees the padding); store each one's keys and values per layer and its last position's logits."""
        if not new:
            return
        model, dev = self.model, self.model.lm_head.weight.device
        lens = torch.tensor([len(p) for p in new], device=dev)
        tokens = torch.zeros(len(new), max(map(len, new)), dtype=torch.long, device=dev)
        for i, p in enumerate(new):
            tokens[i, :len(p)] = torch.tensor(p)
        fresh = KVCache.empty(model.config, len(new), tokens.shape[1], model.embed_tokens.weight.dtype, dev)
        h = model.prefill(tokens, fresh)[torch.arange(len(new), device=dev), lens - 1]  # (new, C)
        logits = model.logits(h, vocab_limit).float()
        for i, p in enumerate(new):
            prefixes[p] = ([t[i, :, :len(p)] for t in fresh.k], [t[i, :, :len(p)] for t in fresh.v], logits[i])


def generate(model, prompts, max_new_tokens, *, compile=False, **kw):
    """Decoder(model, compile).generate(prompts, max_new_tokens, **kw): one call's decoder (see Decoder.generate;
    keep a Decoder to reuse a compiled step's buffers across calls)."""
    return Decoder(model, compile).generate(prompts, max_new_tokens, **kw)


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
    entropies: list = None  # per id, the entropy of π where the sampler drew it (0.0 where the sandbox wrote it)
    kept: list = None  # keep=True: per id, the top_k ids it could have been, -1 after them (all -1: the sandbox's)


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


# Sampling seeds, one formula for every sampler a run starts: a function of the run's seed, the step and the rank,
# and an offset per purpose, so that no two uses share a stream of uniforms (streams are the outputs' places in
# a batch: engine.uniforms)
ROLLOUTS, RM_REFRESH, SHEPHERD = 0, 500_009, 7919


def sampling_seed(seed, step=0, rank=0, purpose=ROLLOUTS):
    return seed * 1_000_003 + step * 1009 + purpose + rank


# The paper's instruction for each answer format, appended to the question (paper §3; docs/paper.md §4)
PROMPTS = {
    "cot": "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "tool": "{question}\nPlease integrate natural language reasoning with programs to solve the problem above, "
            "and put your final answer within \\boxed{{}}.",
    "pot": "{question}\nPlease write a Python program that prints the answer.",
}


def add_chat_args(ap):
    """The prompt-format flags of every script that prompts a model."""
    ap.add_argument("--chat-template", action="store_true", help="prompt in the tokenizer's chat template (an "
                    "instruct model's own format), the paper's instruction in the user message; default: the "
                    "paper's 'User: ...\\n\\nAssistant:'")
    ap.add_argument("--system", help="a system message, with --chat-template")


def use_chat_args(tok, args):
    """Set tok's prompt format from add_chat_args' flags (prompt_ids then follows it everywhere)."""
    if args.system and not args.chat_template:
        raise SystemExit("error: --system goes into a chat template: add --chat-template")
    if args.chat_template:
        tok.use_chat_template(args.system)


def prompt_ids(tok, question, prompt="cot"):
    """The token ids a question is asked with: its prompt (PROMPTS) in the chat format, BOS first."""
    return tok.chat(PROMPTS[prompt].format(question=question))


@torch.no_grad()
def complete(model, tok, questions, prompt="cot", max_new_tokens=512, temperature=0.0, top_p=1.0, seed=0,
             batch=64, code_timeout=5.0, progress=None, compile=False, streams=None, top_k=0, min_p=0.0, keep=False):
    """One completion per question (repeat a question for several samples; its copies share one prefill), with
    `batch` sequences decoded at once and one `generate` call per tool round. Question i samples from stream
    streams[i] of `seed` (default i). model: a Transformer, or a Decoder kept across calls (its own compile
    setting then holds); compile: capture the decode step (Decoder); top_k, min_p, keep: as Decoder.generate's.
    Returns [Completion] in the order of `questions`."""
    decoder = model if isinstance(model, Decoder) else Decoder(model, compile)
    model = decoder.model
    prompts = [prompt_ids(tok, q, prompt) for q in questions]
    n = len(prompts)
    streams = list(range(n)) if streams is None else list(streams)
    ids, sampled, logprobs, entropies, kept = ([[] for _ in range(n)] for _ in range(5))
    finished, live = [False] * n, list(range(n))
    rounds = TOOL_ROUNDS + 1 if prompt == "tool" else 1
    for round_ in range(rounds):
        budget = {i: min(max_new_tokens - len(ids[i]), model.config.max_seq_len - len(prompts[i]) - len(ids[i]))
                  for i in live}  # a sequence with no room left (budget or context) is done
        live = [i for i in live if budget[i] > 0]
        if not live:
            break
        stop = (OUTPUT_MARK,) if prompt == "tool" and round_ < TOOL_ROUNDS else ()
        gen = decoder.generate([prompts[i] + ids[i] for i in live], [budget[i] for i in live],
                               temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, keep=keep,
                               eos_ids=tok.stop_ids, stop=stop, decode=tok.decode, seed=seed,
                               streams=[streams[i] for i in live],
                               vocab_limit=tok.vocab_size,  # a head may have more rows than ids
                               slots=batch, progress=progress if rounds == 1 else None)
        again = []
        for i, new, lp, ent, fin, ks in zip(live, gen.tokens, gen.logprobs, gen.entropies, gen.finished,
                                            gen.kept or [[]] * len(live)):
            ids[i] += new
            sampled[i] += [True] * len(new)
            logprobs[i] += lp
            entropies[i] += ent
            kept[i] += ks
            finished[i] = fin
            if fin and new and new[-1] not in tok.stop_ids:  # stopped at ```output: run the program above it
                shown = program_output(last_program(tok.decode(ids[i])), code_timeout)
                spliced = tok.encode("\n" + shown + "\n```\n")
                ids[i] += spliced
                sampled[i] += [False] * len(spliced)
                logprobs[i] += [0.0] * len(spliced)
                entropies[i] += [0.0] * len(spliced)
                kept[i] += [[-1] * top_k] * len(spliced) if keep else []
                finished[i] = False
                again.append(i)
        live = again
    out = []
    for i in range(n):
        text = tok.decode([t for t in ids[i] if t not in tok.stop_ids])
        if prompt == "pot":
            text += f"\n{OUTPUT_MARK}\n{program_output(last_program(text), code_timeout)}\n```"
        out.append(Completion(prompts[i], ids[i], sampled[i], finished[i], text, logprobs[i], entropies[i],
                              kept[i] if keep else None))
    if progress is not None and rounds > 1:
        progress.update(n)
    return out
