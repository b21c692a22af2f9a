"""--keep-sampling-mask (DeepSeek-V3.2): the sampler returns the ids each token could have been under top-k and
top-p, and π_θ, π_old and π_ref are renormalised over them; checked by hand, against float64, and end to end,
where the sampler's log-probs and the trainer's agree only if both renormalise over the same ids."""
import json
import math

import pytest
import torch

import engine
import grpo
import grpo_log
from fused_kernels import hidden_logprobs, hidden_token_loss
from packing import Batch, pack_rows
from test_engine import tiny
from test_grpo_cli import grpo_args, train_rows


def test_the_kept_ids_are_the_top_k_nucleus_and_the_log_prob_and_entropy_are_over_them():
    """At T = 0.5 the top 3 of these logits are tokens 3, 6, 2 (tempered 6, 5, 4), whose softmax is 0.665, 0.245,
    0.090: the nucleus of 0.8 is tokens 3 and 6. π over them is (1 + e^-1)^-1 = 0.731 and 0.269: by hand, the
    log-probs -log(1 + e^-1) and -1 - log(1 + e^-1), the entropy of (0.731, 0.269). The tokens are those drawn
    without keep, whose log-probs are the whole tempered π's."""
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0, 0.5, 2.5, -30.0]).expand(400, -1)
    u = engine.uniforms(3, torch.zeros(400, dtype=torch.long), torch.arange(400))
    tok, lp, ent, kept = engine.draw(logits, u, 0.5, 4, 0.8, keep=True)
    plain, plain_lp, _, none = engine.draw(logits, u, 0.5, 4, 0.8)
    assert none is None and torch.equal(tok, plain) and set(tok.tolist()) == {3, 6}
    assert kept.tolist() == [[3, 6, -1, -1]] * 400
    by_hand = torch.where(tok == 3, -math.log(1 + math.exp(-1)), -1 - math.log(1 + math.exp(-1)))
    torch.testing.assert_close(lp, by_hand.float(), atol=1e-6, rtol=0)
    p = 1 / (1 + math.exp(-1))
    torch.testing.assert_close(ent, torch.full((400,), -p * math.log(p) - (1 - p) * math.log(1 - p)), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(plain_lp, (logits / 0.5).log_softmax(-1).gather(1, tok[:, None])[:, 0])
    # min-p 0.3 in place of top-p keeps the same two (tempered logits within -log 0.3 = 1.2 of the largest)
    tok_m, lp_m, ent_m, kept_m = engine.draw(logits, u, 0.5, 4, 1.0, min_p=0.3, keep=True)
    assert torch.equal(tok_m, tok) and torch.equal(kept_m, kept) and torch.equal(lp_m, lp) and torch.equal(ent_m, ent)


def test_top_k_keeps_exactly_k_ids_when_logits_tie():
    """Four equal logits and top_k 2: two ids are drawn and kept, as many as are stored (a threshold at the k-th
    value kept all four)."""
    u = (torch.arange(64) + 0.5) / 64
    tok, _, _, kept = engine.draw(torch.zeros(64, 4), u, 1.0, 2, 1.0, keep=True)
    ids = set(kept[0].tolist())
    assert len(ids) == 2 and -1 not in ids and (kept == kept[0]).all() and set(tok.tolist()) == ids


def kept_by_hand(z, top_k, top_p):
    """The nucleus of the top_k of float64 logits z (V,), most likely first."""
    idx = z.argsort(descending=True)[:top_k]
    p = z[idx].softmax(-1)
    before = p.cumsum(0) - p
    return idx[before < top_p].tolist()


@pytest.mark.parametrize("compile", [False, True])
def test_generate_keeps_each_tokens_ids_and_its_log_prob_over_them(compile):
    """Seven sequences of two prompts, five tokens each, at T = 0.8, top_k 4 and top_p 0.9: the same tokens as
    without keep; at every position the kept ids are the nucleus of a float64 forward's top 4 (1 to 4 ids), the
    log-prob and entropy those of softmax over them (0 and 0 for one id); -1 after them. Captured (compile) as
    eager."""
    m = tiny(vocab_size=11)
    with torch.no_grad():
        m.lm_head.weight *= 12  # logits far apart: nuclei of 1, 2, 3 and 4 ids
    prompts, T = [[1, 2, 3]] * 4 + [[4, 5]] * 3, 0.8
    opts = dict(temperature=T, top_k=4, top_p=0.9, seed=3)
    gen = engine.Decoder(m, compile).generate(prompts, 5, keep=True, **opts)
    assert gen.tokens == engine.generate(m, prompts, 5, **opts).tokens
    m64, sizes = m.double(), set()
    assert [len(x) for x in (*gen.kept, *gen.logprobs, *gen.entropies)] == [5] * 21
    for prompt, toks, kept, lps, ents in zip(prompts, gen.tokens, gen.kept, gen.logprobs, gen.entropies):
        with torch.no_grad():
            z = m64(torch.tensor([prompt + toks]))[0, len(prompt) - 1:-1] / T  # (5, V): what drew each token
        for zt, t, k, lp, ent in zip(z, toks, kept, lps, ents):
            ids = kept_by_hand(zt, 4, 0.9)
            assert k == ids + [-1] * (4 - len(ids)) and t in ids
            logp = zt[ids].log_softmax(-1)
            assert lp == pytest.approx(float(logp[ids.index(t)]), abs=1e-5)
            assert ent == pytest.approx(float(-(logp.exp() * logp).sum()), abs=1e-5)
            sizes.add(len(ids))
    assert sizes == {1, 2, 3, 4}  # each size of nucleus was met


def test_a_kept_decoders_buffers_follow_the_kept_ids_a_token():
    """A compiled Decoder keeps its buffers across calls while they are large enough: a call with keep (K = 4
    ids a token) after one without (K = 0) needs new ones, and one without after it may not reuse them either."""
    d = engine.Decoder(tiny(vocab_size=11), compile=True)
    assert d._state(4, 32, 16, 0).out_kept.shape == (4, 64, 0)  # widths rounded up to 64
    rows = d._state(2, 32, 16, 4)
    assert rows.out_kept.shape == (4, 64, 4) and d._state(4, 64, 64, 4) is rows  # exactly the size held: kept
    assert d._state(4, 32, 16, 0).out_kept.shape == (4, 64, 0)


def test_generate_refuses_keep_without_top_k_or_at_temperature_0():
    m = tiny(vocab_size=11)
    for opts in (dict(temperature=1.0, top_p=0.9), dict(temperature=0.0, top_k=4)):
        with pytest.raises(ValueError, match="needs top_k > 0 and temperature > 0"):
            engine.generate(m, [[1, 2]], 3, keep=True, **opts)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_head_renormalises_over_the_kept_ids_as_float64_does(backend, monkeypatch):
    """hidden_logprobs and hidden_token_loss with kept ids, in chunks of 8 rows: the log-probs of softmax over
    each row's ids (-1 padding; rows of -1 alone over every id) and their gradients in h and W against float64,
    the gradient 0 in the logits outside a row's ids."""
    monkeypatch.setenv("KERNELS_BACKEND", backend)
    torch.manual_seed(0)
    h, w = torch.randn(2, 19, 16, requires_grad=True), torch.randn(1001, 16, requires_grad=True)
    t = torch.randint(0, 1001, (2, 19))
    kept = torch.randint(0, 1001, (2, 19, 5))
    kept[..., 2] = t  # the target among them, not first
    kept[0, :6, 3:] = -1  # padding
    kept[1, 4:9] = -1  # every id
    z = torch.zeros(2, 19, 1001, dtype=torch.float64)  # 0 on a row's ids (all of them without any), -inf elsewhere
    for i, j in ((i, j) for i in range(2) for j in range(19)):
        ids = [k for k in kept[i, j].tolist() if k >= 0]
        if ids:
            z[i, j] = float("-inf")
            z[i, j, ids] = 0.0
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = (h64 @ w64.T + z).log_softmax(-1).gather(-1, t[..., None])[..., 0]
    c = torch.randn(2, 19, dtype=torch.float64)
    (ref * c).sum().backward()
    lp = hidden_logprobs(h, w, t, budget=8 * 1001, kept=kept)
    (lp * c).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lp.detach().double(), ref.detach(), **tol)
    torch.testing.assert_close(h.grad.double(), h64.grad, **tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, **tol)
    h.grad = w.grad = None
    flat_c = c.flatten().float()
    total, lp2 = hidden_token_loss(h, w, t, lambda x, rows: (x * flat_c[rows], flat_c[rows]), budget=8 * 1001,
                                   kept=kept)
    total.backward()
    torch.testing.assert_close(lp2.double(), ref.detach(), **tol)
    torch.testing.assert_close(h.grad.double(), h64.grad, **tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, **tol)


def test_packed_rows_carry_each_tokens_kept_ids_and_minus_one_elsewhere():
    """Two completions packed behind one prompt of 3 tokens, and two without kept ids in a second row: the
    prompt's 2 targets, the padding and those without ids hold -1 alone (as the sandbox's tokens do already); a
    batch whose rows hold no ids keeps every id (kept None). The log's sums count the model's tokens only."""
    def comp(ids, kept, sampled=True):
        return engine.Completion([1, 2, 3], ids, [sampled] * len(ids), True, "", [0.0] * len(ids),
                                 [0.0] * len(ids), kept)
    a, b, c = comp([7, 8], [[7, 9], [8, -1]]), comp([5], [[-1, -1]], False), comp([6, 6, 6, 6], None)
    rows = pack_rows([a, b, c, c], [torch.zeros(2), torch.zeros(1), torch.zeros(4), torch.zeros(4)], 2, 2, False,
                     "sequence")
    batch = Batch(rows, 0, "cpu")
    assert batch.kept.tolist()[0] == [[-1, -1], [-1, -1], [7, 9], [8, -1], [-1, -1], [-1, -1], [-1, -1], [-1, -1],
                                      [-1, -1], [-1, -1]]
    assert (batch.kept[1] == -1).all()
    assert Batch(pack_rows([b, b], [torch.zeros(1)] * 2, 2, 2, False, "sequence"), 0, "cpu").kept is None
    zero = comp([0], [[0, -1]])  # id 0 kept, first: a real id, not the -1 that means none
    assert Batch(pack_rows([zero, b], [torch.zeros(1)] * 2, 2, 2, False, "sequence"), 0, "cpu").kept is not None
    # what the log counts over the model's tokens: a's, of 2 ids and 1 (b's is the sandbox's; c has none)
    assert grpo_log.kept_sums([Batch(pack_rows([a, b], [torch.zeros(2), torch.zeros(1)], 2, 2, False,
                                               "sequence"), 0, "cpu")]) == dict(kept_ids=3, kept_alone=1)


def test_grpo_trains_the_policy_over_the_ids_its_sampler_kept(base, data_dir, tmp_path, monkeypatch):
    """One step at T = 1.5, top_k 3, top_p 0.7 (min_p 0.05, which a tiny model's flat top 3 never meets) and
    μ = 2 (π_old made by the trainer): the sampler's log-probs over the kept ids are π_old's and the policy's,
    within fp32's rounding; the kept ids' mean count and the share of tokens kept alone are logged. Over the whole
    vocabulary (the mask dropped from the batch) π_old is lower by the mass outside them, most of it for a tiny
    model at T = 1.5. Rollouts without kept ids are refused."""
    flags = ("--max-steps", "1", "--eval-every", "0", "--report-problems", "0", "--mu", "2", "--top-k", "3",
             "--top-p", "0.7", "--min-p", "0.05", "--keep-sampling-mask")
    real, drawn = engine.complete, []

    def recorded(*a, **k):
        assert (k["top_k"], k["min_p"], k["keep"]) == (3, 0.05, True) and a[6] == 0.7  # a[6]: top_p
        drawn.extend(real(*a, **k))
        return drawn[-len(a[2]):]
    monkeypatch.setattr(engine, "complete", recorded)
    grpo.main(grpo.parse_args(grpo_args(base, data_dir, tmp_path / "kept", *flags)[1:]))
    [row] = train_rows(tmp_path / "kept")
    assert row["logprob_gap_max"] < 1e-4  # π_old's forward, over the kept ids
    n = sum(len(c.ids) for c in drawn)  # and the policy's (its -log π, logged): the sampler's, over the same ids
    assert row["entropy"] == pytest.approx(-sum(sum(c.logprobs) for c in drawn) / n, rel=1e-5)
    assert all(c.ids[t] in c.kept[t] for c in drawn for t in range(len(c.ids)))
    sizes = [sum(k >= 0 for k in ids) for c in drawn for ids in c.kept]  # the logged means, by hand
    assert (row["kept_ids"], row["kept_alone"]) == pytest.approx((sum(sizes) / n, sizes.count(1) / n), rel=1e-6)
    assert set(sizes) == {2, 3}  # a tiny model at T = 1.5: its top 3 reach 0.7, or its top 2 do
    monkeypatch.undo()
    real_init = Batch.__init__

    def unmasked(self, *a, **k):
        real_init(self, *a, **k)
        self.kept = None
    monkeypatch.setattr(Batch, "__init__", unmasked)
    grpo.main(grpo.parse_args(grpo_args(base, data_dir, tmp_path / "whole", *flags)[1:]))
    [row] = train_rows(tmp_path / "whole")
    assert row["logprob_gap_mean"] > 1.0
    monkeypatch.undo()
    real = engine.complete

    def without_kept(*a, **k):
        comps = real(*a, **k)
        for c in comps:
            c.kept = None
        return comps
    monkeypatch.setattr(engine, "complete", without_kept)
    with pytest.raises(ValueError, match="which these rollouts do not carry"):
        grpo.main(grpo.parse_args(grpo_args(base, data_dir, tmp_path / "none", *flags)[1:]))
    assert json.load(open(tmp_path / "kept" / "args.json"))["keep_sampling_mask"] is True
