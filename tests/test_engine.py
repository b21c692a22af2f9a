"""engine.generate: the same tokens as a full re-forward and as transformers, whatever the cache rows and the
stop-check interval; stops; each distinct prompt prefilled once; the sampler's randomness and distribution."""
import copy
import itertools
import math
from collections import Counter

import pytest
import torch

import engine
from model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")


def tiny(**kw):
    cfg = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    cfg.update(kw)
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**cfg))
    m.init_weights()
    return m.eval()


def greedy_by_reforward(m, prompt, n):
    """The simplest correct decoder: the whole sequence through the model again for every new token."""
    seq = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42], [3], [5, 6], [40, 41, 42], [3]]


@pytest.mark.parametrize("slots,sync_every", [(7, 1), (2, 1), (3, 4), (1, 3), (2, 5)])
def test_greedy_equals_a_full_reforward_for_ragged_prompts_however_rows_are_scheduled(slots, sync_every):
    """Fewer cache rows than prompts: rows are refilled as sequences stop (budgets differ), then compacted; a
    check every few tokens trims what was generated past each budget. Checked every 5, the longest sequence (7 + 12
    positions, the cache's length) runs 3 tokens past its end: they must stay within the cache."""
    m = tiny()
    budgets = [12, 5, 9, 1, 12, 3, 7]
    gen = engine.generate(m, PROMPTS, budgets, temperature=0, slots=slots, sync_every=sync_every)
    for p, n, got in zip(PROMPTS, budgets, gen.tokens):
        assert got == greedy_by_reforward(m, p, n)
    assert gen.finished == [False] * len(PROMPTS)  # all cut at their budgets


def test_once_nothing_waits_the_step_runs_the_live_rows_only():
    """Seven rows (all prompts admitted at once): a step is run while any sequence needs more, and once no prompt waits
    and at most half the rows are live, they are moved to the front and only as many rows as the next power of two
    are stepped. Budgets 1, 3, 5, 7, 9, 12, 12: before step s the live ones are those of budget > s (before step 1,
    all, the 1-token one not yet checked): 7 rows for steps 1-6, 3 live before step 7 (4 rows), 2 before step 9."""
    m, steps = tiny(), []
    decoder = engine.Decoder(m)
    decoder.step = lambda model, n, *a, **kw: steps.append(n) or engine._decode_step(model, n, *a, **kw)
    budgets = [12, 5, 9, 1, 12, 3, 7]
    gen = decoder.generate(PROMPTS, budgets, temperature=0, slots=7)
    assert steps == [7] * 6 + [4] * 2 + [2] * 3
    assert [len(t) for t in gen.tokens] == budgets


def test_a_row_left_free_steps_on_within_its_buffers():
    """Once nothing waits, a row whose sequence stopped is stepped with the live ones (4 rows, 3 live: not
    compacted): D's row, freed two steps before E, F and G stop, counts past the 20 tokens a row may write (the
    longest budget and one token of the check interval)."""
    m = tiny()
    prompts, budgets = [[3], [4], [5], [6, 7], [8], [9], [10]], [3, 3, 3, 19, 19, 19, 19]  # A B C D, then E F G
    gen = engine.generate(m, prompts, budgets, temperature=0, slots=4)
    for p, n, got in zip(prompts, budgets, gen.tokens):
        assert got == greedy_by_reforward(m, p, n)


def test_greedy_matches_transformers_generate(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(1)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    ref.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    prompt = [1, 2, 3, 4, 5]
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, 5:].tolist()
    assert engine.generate(ours, [prompt], 20, temperature=0).tokens[0] == expected


@pytest.mark.parametrize("sync_every", [1, 5])
def test_sequences_stop_independently_on_eos_and_stop_strings(sync_every):
    m = tiny()
    prompts = [[5, 6, 7], [8, 9], [10]]
    free = engine.generate(m, prompts, 10, temperature=0).tokens
    assert free[1][1] != free[1][0]  # so that a check that reads the wrong token for the first one misses it
    for eos in (free[0][3], free[1][0]):  # the 4th greedy token of sequence 0, the 1st of sequence 1
        gen = engine.generate(m, prompts, 10, temperature=0, eos_ids=[eos], slots=2, sync_every=sync_every)
        assert gen.tokens == [full[:full.index(eos) + 1] if eos in full else full for full in free]
        assert gen.finished == [eos in full for full in free]

    decode = lambda ids: " ".join(f"<{i}>" for i in ids)  # noqa: E731  a stand-in tokenizer
    stop = f"<{free[1][1]}> <{free[1][2]}>"  # two tokens of sequence 1: the string ends at its third token
    gen = engine.generate(m, prompts, 10, temperature=0, stop=[stop], decode=decode, sync_every=sync_every)
    assert gen.tokens[1] == free[1][:3] and gen.finished[1]
    letters = lambda ids: "".join(chr(ord("a") + i % 26) for i in ids)  # noqa: E731  a character per token
    # as many bytes as tokens: the check must look back over all three; the second string ends past the first
    # check (of 6 tokens, every 5 steps), whose tokens the second check reads again, and no sooner
    for first in (2, 5):
        stop = letters(free[2][first:first + 3])
        end = next(j for j in range(1, 11) if stop in letters(free[2][:j]))
        gen = engine.generate(m, prompts, 10, temperature=0, stop=[stop], decode=letters, sync_every=sync_every)
        assert gen.tokens[2] == free[2][:end] and gen.finished[2]


def test_each_token_is_checked_for_stop_strings_once_and_each_sequence_reported_once():
    """The stop check decodes each kept token's window once, not every token again at every check; `progress`
    hears of each finished sequence once; an eager Decoder frees its buffers when the call returns."""
    m, decoded, told = tiny(), [], []
    decode = lambda ids: decoded.append(ids) or " ".join(map(str, ids))  # noqa: E731
    progress = type("Progress", (), {"update": lambda self, n: told.append(n)})()
    decoder = engine.Decoder(m)
    gen = decoder.generate(PROMPTS, [12, 5, 9, 1, 12, 3, 7], temperature=1.0, stop=["never"], decode=decode, slots=3,
                           sync_every=4, progress=progress)
    assert len(decoded) == sum(map(len, gen.tokens)) and told == [1] * len(PROMPTS)
    assert decoder.rows is None


def test_each_distinct_prompt_is_prefilled_once():
    """G samples of a prompt share its prefill: the model sees each distinct prompt once, even when its
    samples enter the cache at different times (2 rows for 3 x 3 samples)."""
    m = tiny()
    seen, prefill = [], m.prefill  # the prompts the model is asked to prefill (no prompt holds the pad id 0)
    m.prefill = lambda tokens, cache: seen.extend(tuple(t for t in row if t) for row in tokens.tolist()) or \
        prefill(tokens, cache)
    prompts = [[5, 6, 7]] * 3 + [[8, 9]] * 3 + [[5, 6, 7, 8]] * 3
    decoder, admit, held = engine.Decoder(m), engine.Decoder._admit, []
    # after each admission, the prefills kept: only those of prompts whose samples still wait for a row
    decoder._admit = lambda q, *a: admit(decoder, q, *a) or held.append(sorted(map(len, q.prefixes)))
    gen = decoder.generate(prompts, 6, temperature=1.0, seed=1, slots=2)
    assert sorted(seen) == [(5, 6, 7), (5, 6, 7, 8), (8, 9)]
    assert held == [[3], [2], [], [4], []]  # admitted two at a time: A A, A B, B B, C C, C (A: 3 tokens, B: 2, C: 4)
    assert len({tuple(t) for t in gen.tokens[:3]}) > 1  # the samples of one prompt differ all the same


def test_logprobs_are_the_models_and_samples_do_not_depend_on_the_schedule():
    """A sequence's tokens are a function of (seed, stream, position) and the model: the same for any number of
    cache rows and any stop-check interval; another seed gives others. Each token's log-prob and the entropy of
    the distribution it was drawn from are those of softmax(logits / T) of the model on the whole sequence
    (float64 here), before top-p cuts it: what GRPO trains at that temperature."""
    m = tiny()
    prompts, budgets = PROMPTS * 2, [3, 12, 7, 9, 5, 8, 6] * 2
    runs = [engine.generate(m, prompts, budgets, temperature=0.8, top_p=0.9, seed=3, slots=s, sync_every=k)
            for s, k in ((14, 1), (3, 1), (5, 4))]
    assert runs[0].tokens == runs[1].tokens == runs[2].tokens
    other = engine.generate(m, prompts, budgets, temperature=0.8, top_p=0.9, seed=4)
    assert other.tokens != runs[0].tokens
    m64 = copy.deepcopy(m).double()
    for p, toks, lps, ents in zip(prompts, runs[1].tokens, runs[1].logprobs, runs[1].entropies):
        with torch.no_grad():
            logp = (m64(torch.tensor([p + toks]))[0, len(p) - 1:-1] / 0.8).log_softmax(-1)
        expected = logp.gather(1, torch.tensor(toks)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(ents, dtype=torch.float64), -(logp.exp() * logp).sum(-1),
                                   atol=1e-5, rtol=0)
    for run in runs[::2]:  # equal but for the rounding of other batch shapes
        torch.testing.assert_close(torch.tensor(sum(run.entropies, [])), torch.tensor(sum(runs[1].entropies, [])))


def test_a_sequence_continued_from_its_prefix_samples_what_it_would_have():
    """A token's random number is a function of its position in the sequence, not of its index among one call's
    new tokens: from the prompt and the first k sampled tokens, with the same seed and stream, generation goes
    on with the same tokens (a tool round's continuation draws new numbers, not the first round's again)."""
    m = tiny()
    whole = engine.generate(m, [[5, 6, 7]], 12, temperature=1.0, seed=9, streams=[4]).tokens[0]
    for k in (1, 4):
        rest = engine.generate(m, [[5, 6, 7] + whole[:k]], 12 - k, temperature=1.0, seed=9, streams=[4]).tokens[0]
        assert rest == whole[k:]


def test_vocab_limit_keeps_padding_rows_out():
    m = tiny()
    with torch.no_grad():
        m.lm_head.weight[60:] = m.lm_head.weight[:1] * 0  # rows 60+ have logit 0, above most real ones
    gen = engine.generate(m, [[1, 2]] * 8, 10, temperature=2.0, vocab_limit=60, seed=0)
    assert max(max(t) for t in gen.tokens) < 60


def chi_square_ok(counts, probs, n):
    """Pearson's chi-square against expected counts, below its 0.999 quantile (Wilson-Hilferty)."""
    cells = [(counts.get(i, 0), n * p) for i, p in enumerate(probs) if p > 0]
    stat = sum((o - e) ** 2 / e for o, e in cells)
    k = len(cells) - 1
    return stat < k * (1 - 2 / (9 * k) + 3.09 * math.sqrt(2 / (9 * k))) ** 3


def test_samples_follow_the_filtered_distribution():
    """20,000 draws per setting from one row of logits: frequencies within chance of softmax(logits / T)
    restricted by top_k / top_p / min_p, never outside the kept tokens, and the same tokens from the logits
    shifted. At T = 0.5 the nucleus of 0.8 is tokens 3 and 6 (by hand: 0.653 + 0.240 of softmax(logits / 0.5));
    at T = 1 it also holds token 2 (0.442 + 0.268 < 0.8): the temperature comes before the nucleus. min_p 0.3
    keeps the logits (over T) within -log 0.3 = 1.20 of the largest: 2, 2.5 and 3 at T = 1, 5 and 6 at T = 0.5;
    min_p 0.5 (0.69) only 2.5 and 3."""
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0, 0.5, 2.5, -30.0])
    n = 20000
    pos = torch.arange(n)
    for T, top_k, top_p, min_p, kept in ((1.0, 0, 1.0, 0.0, range(8)), (2.0, 0, 1.0, 0.0, range(8)),
                                         (0.7, 3, 1.0, 0.0, [2, 3, 6]),
                                         (1.0, 0, 0.8, 0.0, [2, 3, 6]), (0.5, 0, 0.8, 0.0, [3, 6]),
                                         (1.0, 0, 1.0, 0.3, [2, 3, 6]), (0.5, 0, 1.0, 0.3, [3, 6]),
                                         (1.0, 3, 1.0, 0.5, [3, 6]), (1.0, 0, 0.8, 0.5, [3, 6])):
        u = engine.uniforms(7, torch.zeros(n, dtype=torch.long), pos)
        toks = engine.sample(logits.expand(n, -1), u, T, top_k, top_p, min_p)
        z = torch.full_like(logits, float("-inf"))
        z[list(kept)] = logits[list(kept)] / T
        assert set(toks.tolist()) <= set(kept) and chi_square_ok(Counter(toks.tolist()), z.softmax(-1).tolist(), n)
        # softmax does not see a shift of every logit, even one past exp's range in float32 (e^89 is inf)
        assert torch.equal(engine.sample(logits.expand(n, -1) + 100, u, T, top_k, top_p, min_p), toks)
    assert engine.sample(logits[None], torch.zeros(1), 0).item() == 3  # temperature 0: greedy


def test_the_decoder_draws_each_token_from_softmax_of_its_logits_over_t():
    """4,000 sequences of one prompt at T = 0.5: the first new token (drawn after the prefill) and the second (a
    decode step) are distributed as softmax(logits / T) of a float64 forward, the second's law summed over the
    first's; chi-square, the tokens expected fewer than 5 times pooled."""
    m, n, T, prompt = tiny(vocab_size=11), 4000, 0.5, [1, 2, 3]
    with torch.no_grad():
        m.lm_head.weight *= 8  # logits some units apart, where T and T² draw far apart
    gen = engine.generate(m, [prompt] * n, 2, temperature=T, seed=5)
    m64 = copy.deepcopy(m).double()
    with torch.no_grad():
        first = (m64(torch.tensor([prompt]))[0, -1] / T).softmax(-1)
        second = first @ (m64(torch.tensor([prompt + [t] for t in range(11)]))[:, -1] / T).softmax(-1)
    for k, probs in ((0, first), (1, second)):
        counts, rare = Counter(t[k] for t in gen.tokens), probs * n < 5
        pooled = {i: counts.get(i, 0) for i in range(11) if not rare[i]}
        pooled[11] = sum(counts.get(i, 0) for i in range(11) if rare[i])
        assert chi_square_ok(pooled, [*probs.masked_fill(rare, 0).tolist(), probs[rare].sum().item()], n), k


def test_the_cut_keeps_what_transformers_warpers_keep():
    """On random rows of logits, the tokens engine.cut leaves at each (top_k, top_p, min_p), and their logits, are
    those transformers' TopK, TopP and MinP warpers leave, applied in its order (a second implementation)."""
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    settings = ((10, 1.0, 0.0), (0, 0.9, 0.0), (0, 1.0, 0.1), (10, 0.8, 0.05), (5, 0.95, 0.3), (0, 0.7, 0.2))
    rows = (torch.randn(256, 50) * 3, torch.randn(3, 50) * 3)  # fewer rows than top_k too
    for logits, (top_k, top_p, min_p) in itertools.product(rows, settings):
        ours, theirs = engine.cut(logits, top_k, top_p, min_p)[0], logits.clone()
        for on, warper in ((top_k, TopKLogitsWarper(max(top_k, 1))), (top_p < 1, TopPLogitsWarper(top_p)),
                           (min_p, MinPLogitsWarper(max(min_p, 1e-3)))):
            theirs = warper(None, theirs) if on else theirs
        kept = theirs > float("-inf")
        assert torch.equal(ours > float("-inf"), kept) and torch.equal(ours[kept], theirs[kept])
        assert 1 < kept.sum(-1).float().mean() < 50  # each setting cuts, and leaves more than the likeliest
    # a token exactly min_p times as likely as the likeliest is kept, as transformers keeps it (probs < min_p cut)
    assert engine.cut(torch.tensor([[0.0, math.log(0.5), -1.0]]), 0, 1.0, 0.5)[0].isfinite().tolist() == \
        [[True, True, False]]
    # top_k past the vocabulary: all its ids, most likely first, then -1 (no id) up to top_k
    logits = torch.randn(3, 8)
    ids = engine.cut(logits, 10, 1.0, 0.0)[1]
    assert ids.tolist() == [row.argsort(descending=True).tolist() + [-1, -1] for row in logits]


def test_the_nucleus_is_the_smallest_set_that_reaches_top_p():
    """Four equal logits, each token 0.25 exactly: the nucleus of 0.5 is two tokens, of 0.75 three (the mass
    before a token reaching top_p drops it, where only exceeding it would keep one token more)."""
    u = (torch.arange(64) + 0.5) / 64
    for top_p, size in ((0.5, 2), (0.75, 3), (0.76, 4)):
        assert len(set(engine.sample(torch.zeros(64, 4), u, 1.0, 0, top_p).tolist())) == size, top_p


def test_uniforms_are_uniform_and_independent_across_streams_and_positions():
    n = 50000
    streams, positions = torch.randint(0, 1 << 20, (n,)), torch.randint(0, 4096, (n,))
    u = engine.uniforms(12345, streams, positions)
    assert 0 <= u.min() and u.max() < 1
    assert chi_square_ok(Counter((u * 50).long().tolist()), [1 / 50] * 50, n)
    # neighbouring streams and positions: uncorrelated (|r| < 4 / sqrt(n))
    base = torch.arange(n)
    a = engine.uniforms(0, base, torch.zeros(n, dtype=torch.long))
    for b in (engine.uniforms(0, base + 1, torch.zeros(n, dtype=torch.long)),
              engine.uniforms(0, base, torch.ones(n, dtype=torch.long)), engine.uniforms(1, base, 0 * base)):
        r = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert abs(r) < 4 / n ** 0.5
    assert engine.uniforms(2 ** 40 + 5, base[:4], base[:4]).tolist() != engine.uniforms(5, base[:4], base[:4]).tolist()


def test_uniforms_are_lowbias32_of_the_seed_the_stream_and_the_position():
    """uniforms against the same hash written with Python's integers, which do not overflow (engine's int64 tensors
    would, without _mul32's split): Wellons' lowbias32 of the seed's two halves, the stream and the position, its
    top 24 bits over 2^24. Pins the draw a seed makes, on any device."""
    M = 0xFFFFFFFF

    def mix(x):
        x ^= x >> 16
        x = x * 0x7FEB352D & M
        x ^= x >> 15
        x = x * 0x846CA68B & M
        return x ^ (x >> 16)

    def uniform(seed, stream, position):
        key = mix(mix(seed & M) ^ (seed >> 32 & M))
        return (mix(mix(mix(stream & M) ^ key) ^ mix(position & M ^ 0x9E3779B9)) >> 8) / 2 ** 24

    streams = [0, 1, 7, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32 + 3, 123456789]
    positions = [0, 1, 2 ** 31, 2 ** 32 - 1, 5, 4095, 17, 2 ** 33]
    for seed in (0, 12345, 2 ** 40 + 5, 2 ** 63 - 1):
        got = engine.uniforms(seed, torch.tensor(streams), torch.tensor(positions)).tolist()
        assert got == [uniform(seed, s, p) for s, p in zip(streams, positions)], seed


def test_prompts_that_leave_no_room_and_samplers_that_keep_nothing_are_a_clear_error():
    m = tiny()
    assert engine.generate(m, [], 5, keep=True, top_k=3) == engine.Generation([], [], [], [], [])  # nothing asked
    with pytest.raises(ValueError, match=r"needs decode=<function from token ids to text>"):
        engine.generate(m, [[1]], 5, stop=["\n"])
    with pytest.raises(ValueError, match=r"temperature -0.5, expected >= 0"):
        engine.generate(m, [[1]], 5, temperature=-0.5)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        engine.generate(m, [[1] * 64], 5)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        m(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate(m, [[]], 5)
    for bad in (dict(min_p=1.0), dict(min_p=1.5), dict(min_p=-0.1), dict(top_p=0.0), dict(top_p=1.01),
                dict(top_k=-1)):
        with pytest.raises(ValueError, match=r"generate: top-k .*: top-k is a number of tokens >= 0, top-p a"):
            engine.generate(m, [[1]], 2, **bad)


def test_a_compiled_decoder_samples_as_eager_and_compiles_once_for_every_batch():
    """compile=True (torch.compile, fullgraph, dynamic shapes; a CUDA graph on GPU, inductor here): the same samples
    as eager; one Decoder kept across calls, as GRPO keeps it, compiles one graph for the first batch (down to its
    last row, and at its last positions) and none for later ones with other prompts, lengths, row counts and seeds,
    on the same buffers, nor for larger buffers, up to a sequence as long as the model's context."""
    from torch._dynamo.utils import counters
    m = tiny(n_heads=6, n_kv_heads=6, head_dim=16, max_seq_len=512)  # as many key-value heads as the first batch
    decoder = engine.Decoder(m, compile=True)  # has rows, and the buffers' positions as their width (256): sizes
    traced = counters["aot_autograd"]["total"]  # tied by value (duck sizing) must not fix the graph to them

    def same(prompts, budget, seed, slots):
        eager = engine.generate(m, prompts, budget, temperature=1.0, seed=seed, slots=slots)
        compiled = decoder.generate(prompts, budget, temperature=1.0, seed=seed, slots=slots)
        assert compiled.tokens == eager.tokens
        for field in ("logprobs", "entropies"):
            torch.testing.assert_close(torch.tensor(sum(getattr(compiled, field), [])),
                                       torch.tensor(sum(getattr(eager, field), [])), atol=1e-5, rtol=0)

    # 201 tokens a row (one of the check), 250 + 6 positions: 256 of each; 6 rows compacted to 4, then to 2 (the
    # last sequence beside a free row)
    same([[5, 6, 7, 8], [3, 4], [1] * 250, [3, 4], [5, 6, 7, 8], [3, 4]], [200, 6, 6, 3, 90, 40], 1, 6)
    graphs, buffers = counters["stats"]["unique_graphs"], [t.data_ptr() for t in decoder.rows.tensors()]
    assert counters["aot_autograd"]["total"] == traced + 1  # traced once, not again after a failed try
    for prompts, budget, seed, slots in [([[9] * 20, [1, 2, 3], [4] * 11], 9, 2, 3), ([[7, 7, 7]] * 5, 12, 1, 8)]:
        same(prompts, budget, seed, slots)
    assert [t.data_ptr() for t in decoder.rows.tensors()] == buffers
    same([[3, 4]] * 8, 6, 5, 8)  # more rows than the buffers hold (6): new ones, of 8 rows
    same([[2] * 500], 12, 5, 1)  # more positions: all 512 of the model's, beside a width of 256
    assert decoder.rows.shape == (8, 512, 256, 0) and counters["stats"]["unique_graphs"] == graphs


def decode_step_inputs(m, rows=4, length=32, width=16, kept=0):
    st = engine._Rows.empty(m.config, rows, length, width, kept, torch.float32, "cpu")
    st.cur.copy_(torch.tensor([5, 6, 7, 8]))
    st.pos.copy_(torch.tensor([3, 9, 1, 20]))
    st.count.copy_(torch.tensor([0, 2, 1, 5]))
    st.u.uniform_()
    return st, (m, 3, 24, st.cur, st.pos, st.count, st.u, st.out, st.out_lp, st.out_ent, st.out_kept, st.cache.k,
                st.cache.v)


@pytest.mark.parametrize("opts", [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=5, top_p=0.9),
                                  dict(temperature=0.0, top_k=0, top_p=1.0),
                                  dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, keep=True)])
def test_the_decode_step_is_one_graph_and_never_reads_the_device_from_the_host(opts):
    """What capture needs of the step: no graph break, and no op that makes the host wait for the device (a
    tensor read back as a number, a shape that depends on values)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    m, opts, K = tiny(), dict(dict(keep=False), **opts), opts["top_k"] if opts.get("keep") else 0
    explained = torch._dynamo.explain(engine._decode_step)(*decode_step_inputs(m, kept=K)[1], vocab_limit=90, **opts)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    syncing = {"_local_scalar_dense", "nonzero", "item", "masked_select", "unique", "repeat_interleave"}

    class Ops(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))
    st, args = decode_step_inputs(m, kept=K)
    with Ops() as ops:
        engine._decode_step(*args, vocab_limit=90, **opts)
    assert "mm" in ops.seen or "addmm" in ops.seen  # the mode saw the step's ops
    assert not ops.seen & syncing, ops.seen & syncing
    # rows 0-2 each wrote a token at their count and moved on; row 3 (not in the step) did not
    assert st.count.tolist() == [1, 3, 2, 5] and st.pos.tolist() == [4, 10, 2, 20]
    assert (st.out[[0, 1, 2], [0, 2, 1]] == st.cur[:3]).all() and not st.out[3].any()
    if K:  # each token among the ids it could have been
        assert (st.out_kept[[0, 1, 2], [0, 2, 1]] == st.cur[:3, None]).any(-1).all() and not st.out_kept[3].any()


def test_a_decode_step_launches_few_ops_per_layer():
    """Eager decoding on a GPU is bound by how many kernels a step launches (~11 ms a step at 1B, whatever the
    batch, on the first H200 run), so a layer's count is held to a budget: ops that are not views, per layer (a
    model of two layers less one of one), as the CPU runs them. The two RMSNorms' six each (written out on the
    CPU: pow, mean, add, rsqrt, two muls; on CUDA one fused kernel and the weight's mul), the four GEMMs, RoPE's
    five, the row index and the cache's two writes, attention, SwiGLU's two, the residuals' two: 29, where
    rotating the query and the key heads apart took 34."""
    from torch.utils._python_dispatch import TorchDispatchMode
    views = {"view", "_unsafe_view", "slice", "select", "unsqueeze", "transpose", "t", "split", "split_with_sizes",
             "detach", "expand", "alias", "as_strided"}

    class Ops(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.__name__.split(".")[0] not in views
            return func(*args, **(kwargs or {}))
    counts = []
    for layers in (1, 2):
        args = decode_step_inputs(tiny(n_layers=layers))[1]
        with torch.no_grad(), Ops() as ops:  # as Decoder.generate runs it
            engine._decode_step(*args, vocab_limit=90, temperature=1.0, top_k=0, top_p=1.0, keep=False)
        counts.append(ops.count)
    assert counts[1] - counts[0] <= 29, counts


def test_the_two_level_inverse_cdf_is_the_one_level_one():
    """sample's draw against searchsorted on a float64 cumulative sum: the same id for every uniform but those
    within rounding of a boundary; ragged vocabularies (not a multiple of the block), zero-mass blocks, a tail of
    zeros that rounding must not reach."""
    g = torch.Generator().manual_seed(0)
    for V in (5, engine.BLOCK, 3 * engine.BLOCK + 17):
        p = torch.rand(64, V, generator=g) ** 8
        p[:8, : V // 2] = 0  # whole blocks without mass
        p[8:16, V // 3 + 1:] = 0  # an empty tail (whole blocks of it in the largest vocabulary)
        u = torch.rand(64, generator=g)
        u[:16] = 1 - 2 ** -24  # the largest uniform uniforms() makes: u times the total may round up to the total
        cdf = p.double().cumsum(-1)
        target = u.double() * cdf[:, -1]
        expected = torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp(max=V - 1)
        got = engine._invert_cdf(p, u)
        near = ((cdf - target[:, None]).abs() < 1e-5 * cdf[:, -1:]).any(-1)  # a boundary within rounding
        assert (got == expected)[~near].all() and near[16:].float().mean() < 0.1  # rows :16 end near the total
        assert (p.gather(1, got[:, None]) > 0).all()  # never a token without probability
        torch.testing.assert_close(engine._cumsum(p).double(), cdf, rtol=1e-5, atol=1e-6)
        # the CPU's scans of float32 add in float64: in bfloat16 they round as a GPU's float32 scans do, and a draw
        # near a block's total may pass its last id with mass (the rows with an empty tail)
        assert (p.gather(1, engine._invert_cdf(p.bfloat16(), u)[:, None]) > 0).all()


def test_draws_on_block_boundaries_take_the_next_token_with_mass():
    """Uniforms on and within a few 2^-24 of the boundaries between blocks whose first halves have no mass: where
    the sums of the blocks before round past the draw, it still gets a token with probability. On an exact
    boundary (equal masses: sums exact in float32), between blocks or inside one, the next id, as the one-level
    definition has it (the first id whose cumulative mass exceeds u times the total)."""
    g, B = torch.Generator().manual_seed(1), engine.BLOCK
    p = torch.rand(64, 4 * B, generator=g)
    p.view(64, 4, B)[:, :, :B // 2] = 0
    cdf = engine._blocks(p).sum(-1).cumsum(-1)
    on = cdf.gather(1, (torch.arange(64) % 3)[:, None])[:, 0] / cdf[:, -1]  # after block 0, 1 or 2
    u = (on * 2 ** 24).floor() / 2 ** 24 + (torch.arange(64) % 5 - 2) * 2.0 ** -24
    assert (p.gather(1, engine._invert_cdf(p, u)[:, None]) > 0).all()
    equal = torch.ones(3, 2 * B)
    equal[2, :B] = 0
    assert engine._invert_cdf(equal, torch.tensor([0.5, 100 / (2 * B), 0.0])).tolist() == [B, 100, B]
