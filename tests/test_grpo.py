"""grpo.py: the paper's advantages and loss on hand-computed groups, the update's sums and gradients against each
output run alone in float64, a loop that learns a trivial task; its command line is tests/test_grpo_cli.py, and
its training path on scripted rollouts, whose step-1 loss is known by hand, tests/test_scripted_grpo.py."""
import argparse
import math

import numpy as np
import pytest
import torch

import common
import engine
import grpo
import reward
from grpo import (draw, group_advantages, groups_with_signal, grpo_objective_sums, grpo_update, high_entropy_only,
                  loss_normaliser, overlong_penalty, policy_token_loss, process_advantages, reset_reference,
                  tis_weights, token_advantages)
from model import ModelConfig, Transformer
from packing import Batch, loss_weights, micro_batches, pack_rows
from reward_model import token_index
from tokenizer import Tokenizer


def opts(clip_low=0.2, clip_high=0.2, beta=0.0):
    """grpo_objective_sums' settings after its five tensors."""
    return dict(clip_eps=(clip_low, clip_high), beta=beta)


def update_args(**given):
    """grpo_update's flags: grpo_cli's defaults, no gradient clipping, and what the test gives."""
    return argparse.Namespace(**{**vars(grpo.parse_args([])), "grad_clip": 1e9, "out": "-", **given})


def weights(mask, loss_norm="sequence"):
    """Loss weights of rows that each hold one output: loss_weights of each row's mask."""
    return torch.stack([loss_weights(m, loss_norm) for m in mask])


def test_group_advantages_normalise_within_each_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv, flat = group_advantages(r)
    s = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # Bessel-corrected, as TRL
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / s)
    assert flat == 1 and not adv[1].any()  # all equal: zero advantage, counted, not 0/0
    assert adv[2, 3] > 0 and (adv[2, :3] < 0).all()
    adv, _ = group_advantages(r, "none")  # Dr. GRPO
    torch.testing.assert_close(adv[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]))
    adv, _ = group_advantages(r, "batch")  # one std over the batch's centred rewards, the flat group's zeros too
    centred = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.25, -0.25, -0.25, 0.75]
    torch.testing.assert_close(adv.flatten(), torch.tensor(centred) / torch.tensor(centred).std())
    # the smallest groups: G = 2 is divided by its std (±0.5 / 0.7071), as is a batch of one such group; G = 1
    # has no std: every group counts as flat, advantage 0 (not NaN)
    for scale in ("group", "batch"):
        torch.testing.assert_close(group_advantages(torch.tensor([[1.0, 0.0]]), scale)[0],
                                   torch.tensor([[0.5, -0.5]]) / math.sqrt(0.5))
    adv, flat = group_advantages(torch.tensor([[1.0], [0.0]]))
    assert flat == 2 and adv.tolist() == [[0.0], [0.0]]


def test_each_step_draws_its_own_questions_as_a_function_of_seed_and_step():
    """Line 5's D_b: distinct questions within a step, other questions at the next step, the same ones again for
    the same (seed, step) (what a resumed run draws)."""
    a, b = draw(1000, 16, seed=0, step=1), draw(1000, 16, seed=0, step=2)
    assert len(set(a.tolist())) == 16 and set(a.tolist()) != set(b.tolist())
    assert (a == draw(1000, 16, seed=0, step=1)).all() and set(a.tolist()) != set(draw(1000, 16, 1, 1).tolist())


def test_process_advantages_are_future_sums_of_normalised_step_rewards():
    """Paper §4.1.3: normalise all step rewards of a group together; token t sums the steps ending at or after t."""
    steps = [[(1, 1.0), (4, 0.0)], [(2, 1.0), (3, 1.0)]]  # (token index where the step ends, reward)
    adv, flat = process_advantages(steps, [5, 4], group_size=2)
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    z = (r - r.mean()) / r.std()
    torch.testing.assert_close(adv[0], torch.tensor([z[0] + z[1], z[0] + z[1], z[1], z[1], z[1]]))
    torch.testing.assert_close(adv[1], torch.tensor([z[2] + z[3]] * 3 + [z[3]]))
    assert flat == 0
    adv, flat = process_advantages([[(0, 1.0)], [(1, 1.0)]], [2, 2], group_size=2)  # all equal: no signal
    assert flat == 1 and not torch.cat(adv).any()
    adv, flat = process_advantages([[(0, 1.0)], []], [2, 2], group_size=2)  # one step reward: no std, no signal
    assert flat == 1 and not torch.cat(adv).any()
    # batch: each group centred on its own mean, all divided by one std of the batch's centred step rewards
    steps += [[(0, 0.2)], [(1, 0.6)]]
    adv, flat = process_advantages(steps, [5, 4, 1, 2], group_size=2, scale="batch")
    c = torch.tensor([1 - 0.75, 0 - 0.75, 1 - 0.75, 1 - 0.75, 0.2 - 0.4, 0.6 - 0.4])
    z = c / c.std()
    torch.testing.assert_close(adv[0], torch.tensor([z[0] + z[1], z[0] + z[1], z[1], z[1], z[1]]))
    torch.testing.assert_close(adv[2], z[4:5])
    torch.testing.assert_close(adv[3], z[5].expand(2))
    adv, _ = process_advantages(steps, [5, 4, 1, 2], group_size=2, scale="none")
    torch.testing.assert_close(adv[3], c[5].expand(2))
    # a batch of two step rewards has a std too: ±0.5 / 0.7071
    adv, _ = process_advantages([[(0, 1.0)], [(0, 0.0)]], [1, 1], group_size=2, scale="batch")
    torch.testing.assert_close(torch.cat(adv), torch.tensor([0.5, -0.5]) / math.sqrt(0.5))


def test_step_checker_and_token_positions():
    text = "Ava starts with 12.\n12 + 5 = 17\n17 * 2 = 35\nThe answer is \\boxed{35}."
    steps = reward.process_rewards(text, reward.math_reward(text, "34"))
    assert [r for _, r in steps] == [1.0, 0.0, 0.0]  # right line, wrong line, wrong final answer
    assert text[:steps[0][0]].endswith("12 + 5 = 17") and steps[-1][0] == len(text)
    tok = Tokenizer.train([text * 3], 300)
    ids = tok.encode(text)
    idx = token_index(tok, ids, [e for e, _ in steps])
    for (end, _), i in zip(steps, idx):  # the token holding a step's last character
        assert len(tok.decode(ids[:i])) < end <= len(tok.decode(ids[:i + 1]))


def test_sequence_normalisation_weights_short_and_long_outputs_as_the_paper():
    """Two outputs with advantage 1 and ratio 1: per token loss -1. The paper averages each output over its own
    length, so each contributes -1 whatever its length; per-token (DAPO) weights tokens; constant (Dr. GRPO)
    divides by a fixed budget later."""
    logp = torch.zeros(2, 6, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, 1.0])
    adv = adv[:, None].expand(2, 6)
    total, kl, clipped = grpo_objective_sums(logp, logp.detach(), logp.detach(), adv, weights(mask), opts())
    assert total.item() == pytest.approx(-2.0) and clipped == 0 and kl.item() == 0
    total.backward()
    torch.testing.assert_close(logp.grad[0, :2], torch.full((2,), -0.5))  # a short output's tokens weigh more
    torch.testing.assert_close(logp.grad[1], torch.full((6,), -1 / 6))
    assert not logp.grad[0, 2:].any()  # padding carries no gradient
    tok_total, _, _ = grpo_objective_sums(logp, logp.detach(), logp.detach(), adv, weights(mask, "token"), opts())
    assert tok_total.item() == pytest.approx(-8.0)  # divided later by the 8 tokens


def test_the_loss_is_divided_by_outputs_tokens_or_outputs_times_the_budget():
    """--loss-norm's divisor of the step's weighted sum, from 4 outputs of 1 or 0 tokens in all, a budget of 100."""
    assert [loss_normaliser(norm, 4, 1, 100) for norm in ("sequence", "token", "constant")] == [4, 1, 400]
    assert loss_normaliser("token", 4, 0, 100) == 1  # no token written: the sum is 0, divided by 1, not by 0


@pytest.mark.parametrize("norm", ["sequence", "token", "constant"])
def test_loss_sums_split_over_ranks_and_micro_batches_add_up_to_the_whole(norm):
    """main() divides each micro-batch's sum by one global normaliser: any split of the batch (ranks,
    micro-batches) then gives the same loss and gradient as the whole batch in one piece, and that is the sum
    written out here: per token -min(ρÂ, clip(ρ)Â) + β k3, weighted 1/|o_i| (sequence) or 1 (token, constant)."""
    torch.manual_seed(0)
    logp = torch.randn(6, 7, requires_grad=True)
    old, ref, adv = logp.detach() + 0.3 * torch.randn(6, 7), logp.detach() + 0.1 * torch.randn(6, 7), torch.randn(6, 7)
    mask = torch.rand(6, 7) > 0.3
    args, w = opts(beta=0.04), weights(mask, norm)
    whole, _, _ = grpo_objective_sums(logp, old, ref, adv, w, args)
    whole.backward()
    g = logp.grad.clone()
    logp.grad = None
    parts = sum(grpo_objective_sums(logp[s], old[s], ref[s], adv[s], w[s], args)[0]
                for s in (slice(0, 1), slice(1, 4), slice(4, 6)))
    parts.backward()
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(logp.grad, g)
    x, o, q, A = (t.detach().double() for t in (logp, old, ref, adv))
    r = torch.exp(x - o)
    per = -torch.minimum(r * A, r.clamp(0.8, 1.2) * A) + 0.04 * (torch.exp(q - x) - (q - x) - 1)
    length = mask.sum(1, keepdim=True).clamp(min=1).double()
    by_hand = (per * mask / (length if norm == "sequence" else 1.0)).sum()
    assert whole.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_dynamic_sampling_keeps_the_groups_whose_rewards_disagree():
    comps = [engine.Completion([5], [7, 8], [True, True], True, q) for q in ("q2", "q1", "q4", "q3") for _ in "ab"]
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0])  # q2 and q4 agree: they carry no signal
    pick = groups_with_signal(rewards, group_size=2, keep=2)
    assert [comps[i].text for i in pick] == ["q1", "q1", "q3", "q3"] and rewards[pick].tolist() == [1.0, 0.0, 0.0, 1.0]
    pick = groups_with_signal(rewards[:6], group_size=2, keep=2)  # short of signal: padded
    assert [comps[i].text for i in pick] == ["q1", "q1", "q2", "q2"] and rewards[pick].tolist() == [1.0, 0.0, 1.0, 1.0]


def test_a_reward_model_scores_each_output_at_its_last_token(data_dir):
    """--reward orm: σ(score) at the output's last token, as one forward of prompt + output alone gives it (not
    padded with others); prm: at the token holding each line's last character, and at the output's end."""
    from reward_model import model_rewards
    tok = Tokenizer.load(data_dir / "tokenizer")
    torch.manual_seed(0)
    scorer = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, ffn_dim=64,
                                     max_seq_len=128, head="score"))
    scorer.init_weights()
    with torch.no_grad():
        scorer.score.weight.normal_()  # not the zero a new head starts at
    texts = ["2 + 3 = 5\nThe answer is \\boxed{5}.", "No idea.", "4 * 2 = 8\n8 - 1 = 7\nSo \\boxed{7}."]
    comps = [engine.Completion(tok.chat(f"Question {i}?"), tok.encode(t, eos=True), [True] * 99, True, t)
             for i, t in enumerate(texts)]
    with torch.no_grad():
        alone = [torch.sigmoid(scorer(torch.tensor([c.prompt + c.ids])))[0] for c in comps]
        orm = model_rewards(scorer, tok, comps, "orm", batch=2)
        prm = model_rewards(scorer, tok, comps, "prm", batch=2)
    torch.testing.assert_close(orm, torch.stack([s[-1] for s in alone]))
    for c, s, steps in zip(comps, alone, prm):
        newlines = [i for i, ch in enumerate(c.text) if ch == "\n"]
        lines = [next(k for k in range(len(c.ids)) if len(tok.decode(c.ids[:k + 1])) >= i) for i in newlines]
        assert [t for t, _ in steps] == lines + [len(c.ids) - 1]
        assert [x for _, x in steps] == pytest.approx([float(s[len(c.prompt) + t]) for t, _ in steps], rel=1e-5)


def test_advantages_and_loss_mask_land_on_the_models_own_tokens():
    """A completion with a tool splice: the prompt, the sandbox's tokens and the padding carry no loss and no
    advantage; a truncated completion carries none with --mask-truncated."""
    spliced = engine.Completion([1, 2, 3], [10, 11, 12, 13], [True, False, False, True], True, "x")
    short = engine.Completion([1], [20, 21], [True, True], False, "y")
    args = argparse.Namespace(group_size=2, supervision="outcome", online_rft=False, std_scale="group")
    per_token, n_zero_std = token_advantages([spliced, short], torch.tensor([1.0, 0.0]), None, args)
    assert n_zero_std == 0 and per_token[0].tolist() == [per_token[0][0].item()] * 4 and per_token[0][0] > 0
    b = Batch(pack_rows([spliced, short], per_token, 1, 1, False, "token"), 0, "cpu")
    # position t predicts token t + 1: the completion's first token is predicted from the prompt's last one
    assert b.inputs.tolist() == [[1, 2, 3, 10, 11, 12], [1, 20, 0, 0, 0, 0]]
    assert b.targets.tolist() == [[2, 3, 10, 11, 12, 13], [20, 21, 0, 0, 0, 0]]
    assert b.mask.tolist() == [[False, False, True, False, False, True], [True, True, False, False, False, False]]
    adv = b.advantages
    assert (adv[0, 2:6] > 0).all() and (adv[1, :2] < 0).all() and not adv[0, :2].any() and not adv[1, 2:].any()
    assert b.attn is None  # one completion per row: plain causal attention
    b = Batch(pack_rows([spliced, short], per_token, 1, 1, True, "token"), 0, "cpu")
    assert not b.mask[1].any() and b.mask[0].sum() == 2


def test_packed_rows_give_the_loss_and_gradient_of_one_row_per_completion():
    """--pack 1 and --pack 3 (a group of 3 completions in one row behind one copy of the prompt) each give the
    loss and gradient computed here without pack_rows: every completion run alone through the model, its
    log-probs read at its own positions, the per-token loss -Â ρ + β k3 (ρ = 1, π_ref = π_θ e^-0.1) weighted by
    1/|o_i| (sequence) or 1 (token)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=64))
    model.init_weights()
    comps = [engine.Completion([1, 5, 6, 7], ids, [True] * len(ids), True, "") for ids in
             ([9, 8, 7, 2], [11, 12], [13, 14, 15, 16, 17, 18])] + \
            [engine.Completion([1, 9], ids, [True] * len(ids), True, "") for ids in ([3], [4, 5, 6], [7, 7])]
    per_token = [torch.randn(len(c.ids)) for c in comps]
    for norm in ("sequence", "token"):
        model.zero_grad()
        expected = 0.0
        for c, adv in zip(comps, per_token):
            logits = model(torch.tensor([c.prompt + c.ids]))[0, len(c.prompt) - 1:-1]
            lp = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(c.ids)[:, None])[:, 0]
            ref = lp.detach() - 0.1
            per = -adv.double() * torch.exp(lp - lp.detach()) + 0.04 * (torch.exp(ref - lp) - (ref - lp) - 1)
            expected = expected + per.sum() / (len(c.ids) if norm == "sequence" else 1)
        expected.backward()
        results = [(expected.item(), None, [p.grad.clone() for p in model.parameters()])]
        for pack in (1, 3):
            batches = micro_batches(pack_rows(comps, per_token, 3, pack, False, norm), 6, 0, "cpu")
            assert len(batches) == 1 and (batches[0].attn is None) == (pack == 1)
            model.zero_grad()
            b = batches[0]
            ref = b.logprobs(model, None) - 0.1
            total, _ = b.loss(model, None, policy_token_loss(b, None, ref, opts(beta=0.04), 0, 1.0))
            total.backward()
            results.append((total.item(), b.positions_run, [p.grad.clone() for p in model.parameters()]))
        (alone, _, alone_grads), (plain, plain_run, plain_grads), (packed, packed_run, packed_grads) = results
        assert plain == pytest.approx(alone, rel=1e-5) and packed == pytest.approx(alone, rel=1e-5)
        assert packed_run < plain_run
        for a, b, c in zip(alone_grads, plain_grads, packed_grads):
            torch.testing.assert_close(b, a.float(), atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(c, a.float(), atol=1e-6, rtol=1e-4)


class GradientsOf:
    """An optimizer that keeps the gradients it is asked to step on (grpo_update zeroes them after)."""

    def __init__(self, model):
        self.model = model

    def step(self):
        self.grads = [p.grad.clone() for p in self.model.parameters()]

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def model_and_two_groups():
    """A tiny model (seeded) and two groups of 3 outputs, behind prompts of 4 and 2 tokens; the third output holds a
    token the sandbox wrote."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=64))
    model.init_weights()
    sampled = ([True] * 4, [True, True], [True, True, False, True, True, True], [True], [True] * 3, [True, True])
    comps = [engine.Completion([1, 5, 6, 7], ids, s, True, "") for ids, s in
             zip(([9, 8, 7, 2], [11, 12], [13, 14, 15, 16, 17, 18]), sampled)] + \
            [engine.Completion([1, 9], ids, s, True, "") for ids, s in zip(([3], [4, 5, 6], [7, 7]), sampled[3:])]
    return model, comps


def packed_with_old(model, comps, per_token, moves):
    """comps packed 3 to a row as grpo.py packs them; π_old the model's log-probs moved by moves[i] (per token) on
    output i, π_ref 0.1 below the model's. Returns (the micro-batch, π_old, π_ref)."""
    [b] = micro_batches(pack_rows(comps, per_token, 3, 3, False, "sequence"), 6, 0, "cpu")
    with torch.no_grad():
        now = b.logprobs(model, None)
    old, ref = now.clone(), now - 0.1
    for r in range(len(b.segment)):  # each output found by its tokens (micro_batches orders rows by length)
        for k in range(1, 4):
            where = (b.segment[r] == k).nonzero()[:, 0]
            [i] = [i for i, c in enumerate(comps) if b.targets[r, where].tolist() == c.ids]
            old[r, where] += moves[i]
    return b, old, ref


def update_matches(model, b, old, ref, beta, tis, args, loss, clipped, grads):
    """One grpo_update of micro-batch b logs the loss and the clip's count computed apart and makes every weight's
    gradient as computed apart (`grads`). old None: μ = 1. Its other sums by hand from the policy's log-probs on
    the model's tokens: -log π, k3 to π_ref, π_old's gap to the sampler, the TIS weights and those the cap cut.
    Returns the update's sums."""
    with torch.no_grad():
        now = b.logprobs(model, None)
    gap = ((now if old is None else old) - b.sampler_logp) * b.mask
    ratio, tis_on = gap.exp(), b.mask if tis else torch.zeros_like(b.mask)  # without TIS its sums stay 0
    logged = dict(neg_logp=-(now * b.mask).sum(), kl=((torch.exp(ref - now) - (ref - now) - 1) * b.mask).sum(),
                  logprob_gap=gap.abs().sum(), gap_max=gap.abs().max(),
                  tis_weight=(ratio.clamp(max=tis) * tis_on).sum(), tis_cut=((ratio > tis) & tis_on).sum())
    opt = GradientsOf(model)
    sums, _ = grpo_update(model, opt, [b], None if old is None else [old], [ref], 1.0, beta, tis, None, 0, args,
                          common.one_process("cpu"))
    assert sums["loss"] == pytest.approx(loss, rel=1e-5)
    assert sums["clipped"] == clipped
    assert {k: sums[k] for k in logged} == pytest.approx({k: float(v) for k, v in logged.items()}, rel=1e-5, abs=1e-6)
    for got, w in zip(opt.grads, grads):
        torch.testing.assert_close(got, w.float(), atol=1e-6, rtol=1e-4)
    return sums


@pytest.mark.parametrize("tis", [0.0, 2.0])
def test_sequence_ratio_updates_on_gspo_token_loss_and_gradient(tis):
    """--ratio sequence (GSPO-token, Zheng et al., 2025) through grpo_update, packed 3 completions a row, against
    every completion run alone in float64: s_i = exp(mean_t log π_θ/π_old) over the tokens its model wrote (a
    tool's output is not), ρ_it = s_i π_θ/sg[π_θ], loss -min(ρÂ, clip(ρ)Â) + β k3 weighted 1/|o_i|. π_old is π_θ
    moved per output and per token, so that each s_i differs from its tokens' ratios, and two outputs' s_i fall
    outside the clip [0.8, 1.28] on the side that binds. With --tis, Â_t is weighted by min(π_old/π_sampler, C) of
    its token, π_old's own, not the sequence's ratio."""
    model, comps = model_and_two_groups()
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])  # Â's sign per output
    shift = torch.tensor([-0.5, 0.4, 0.1, 0.0, 0.3, -0.1])  # log π_old - log π_θ, per output: s_i about e^-shift
    per_token = [sign[i] * (0.5 + torch.rand(len(c.ids))) for i, c in enumerate(comps)]
    noise = [0.2 * torch.randn(len(c.ids)) for c in comps]
    noise = [n - n[torch.tensor(c.sampled)].mean() for n, c in zip(noise, comps)]  # so that s_i = e^-shift
    clip, beta = (0.2, 0.28), 0.04
    expected, clipped = 0.0, 0
    for c, adv, sh, nz in zip(comps, per_token, shift, noise):
        logits = model(torch.tensor([c.prompt + c.ids]))[0, len(c.prompt) - 1:-1]
        lp = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(c.ids)[:, None])[:, 0]
        mine = torch.tensor(c.sampled)
        old, ref = lp.detach() + sh + nz, lp.detach() - 0.1
        sampler = lp.detach() + 0.8 * torch.randn(len(c.ids), dtype=torch.float64)
        c.logprobs = torch.where(mine, sampler, 0.0).tolist()
        s = torch.exp((lp.detach() - old)[mine].mean())
        rho = s * torch.exp(lp - lp.detach())
        adv = adv.double() * (torch.exp(old - sampler).clamp(max=tis) if tis else 1.0)
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        per = -torch.min(rho * adv, rho.clamp(1 - clip[0], 1 + clip[1]) * adv) + beta * kl
        expected = expected + (per * mine).sum() / mine.sum()
        clipped += int(mine.sum()) * bool((s > 1 + clip[1] and adv[0] > 0) or (s < 1 - clip[0] and adv[0] < 0))
    model.zero_grad()
    expected.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert clipped == 4 + 2  # outputs 0 (s = e^0.5, Â > 0) and 1 (e^-0.4, Â < 0); not 4 nor 5 (e^-0.3, Â > 0;
    # e^0.1, Â < 0): there the clip does not bind

    b, old, ref = packed_with_old(model, comps, per_token, [sh + nz for sh, nz in zip(shift, noise)])
    args = update_args(clip_eps=clip[0], clip_high=clip[1], ratio="sequence")
    update_matches(model, b, old, ref, beta, tis, args, expected.item(), clipped, want)


def test_the_sequence_ratio_and_the_entropy_cut_by_hand():
    """GSPO's log s_i is the mean of log π_θ/π_old over the tokens o_i's model wrote, on each of them: a row with
    the prompt (segment 0), an output of one token, one of three (its second a tool's, not the model's), padding.
    --top-entropy keeps Â on a token whose entropy is the cut itself: ρ = 0.5 of entropies 1..5 is 3, 3 tokens."""
    b = argparse.Namespace(segment=torch.tensor([[0, 0, 1, 2, 2, 2, -1]]),
                           mask=torch.tensor([[False, False, True, True, False, True, False]]))
    logp, old = torch.tensor([[5.0, 5.0, -1.0, -2.0, 9.0, -3.0, 9.0]]), torch.zeros(1, 7)
    assert grpo.sequence_log_ratio(logp, old, b).tolist() == [[0.0, 0.0, -1.0, -2.5, 0.0, -2.5, 0.0]]
    b = argparse.Namespace(entropy=torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 9.0]]), advantages=torch.ones(1, 6),
                           mask=torch.tensor([[True] * 5 + [False]]))
    assert high_entropy_only([b], 0.5, common.one_process("cpu")) == 3.0
    assert b.advantages.tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0, 1.0]]  # the last not the model's: never counted


@pytest.mark.parametrize("tis", [0.0, 2.0])
def test_cispo_weighs_each_tokens_gradient_by_its_capped_ratio_and_zeroes_none(tis):
    """--policy-loss cispo (MiniMax-M1, Chen et al., 2025) through grpo_update, packed 3 completions a row, against
    every completion alone in float64: per token the loss -w Â + β k3 and the gradient of -sg(w) Â log π + β k3,
    w = min(ρ, 1 + ε_high) with no lower cap, weighted 1/|o_i|. π_old is π_θ moved by about ±0.5 per token, so
    that ρ passes both of the clip's bounds, on tokens where the clip would zero the gradient and on others. With
    --tis, Â_t is weighted by min(π_old/π_sampler, C) as without CISPO. The count logged: the tokens whose weight
    the cap cut (not the clip's count, here)."""
    model, comps = model_and_two_groups()
    per_token = [torch.randn(len(c.ids)) * (i != 4) for i, c in enumerate(comps)]  # output 4: Â = 0, nothing to cap
    shifts = [torch.where(torch.arange(len(c.ids)) % 3 == 2, 0.5, -0.5) + 0.2 * torch.rand(len(c.ids))
              for c in comps]  # log π_old - log π_θ: ρ about e^0.4 on two tokens of three, e^-0.6 on the third
    clip, beta = (0.2, 0.28), 0.04
    value, surrogate, capped, clip_zeroes = 0.0, 0.0, 0, 0
    for c, adv, sh in zip(comps, per_token, shifts):
        logits = model(torch.tensor([c.prompt + c.ids]))[0, len(c.prompt) - 1:-1]
        lp = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(c.ids)[:, None])[:, 0]
        mine = torch.tensor(c.sampled)
        old, ref = lp.detach() + sh, lp.detach() - 0.1
        sampler = lp.detach() + 0.8 * torch.randn(len(c.ids), dtype=torch.float64)
        c.logprobs = torch.where(mine, sampler, 0.0).tolist()
        adv = adv.double() * (torch.exp(old - sampler).clamp(max=tis) if tis else 1.0)
        ratio = torch.exp(lp.detach() - old)
        w = ratio.clamp(max=1 + clip[1])
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        value = value + ((-w * adv + beta * kl) * mine).sum() / mine.sum()
        surrogate = surrogate + ((-w * adv * lp + beta * kl) * mine).sum() / mine.sum()
        capped += int(((ratio > 1 + clip[1]) & mine & (adv != 0)).sum())
        clip_zeroes += int(((((ratio > 1 + clip[1]) & (adv > 0)) | ((ratio < 1 - clip[0]) & (adv < 0))) & mine).sum())
    model.zero_grad()
    surrogate.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert capped >= 3 and clip_zeroes >= 3 and capped != clip_zeroes  # CISPO and the clip part on these tokens

    b, old, ref = packed_with_old(model, comps, per_token, [sh.float() for sh in shifts])
    args = update_args(clip_eps=clip[0], clip_high=clip[1], policy_loss="cispo")
    update_matches(model, b, old, ref, beta, tis, args, value.item(), capped, want)


@pytest.mark.parametrize("tis, delta", [(0.0, 0.1), (2.0, 0.1), (0.0, 0.0)])
def test_off_policy_mask_drops_the_push_down_on_outputs_the_policy_has_moved_from(tis, delta):
    """--off-policy-mask δ (DeepSeek-V3.2) through grpo_update at μ = 1, packed 3 completions a row, against every
    completion alone in float64: the policy term is dropped on the outputs of Â < 0 whose mean log π_sampler/π_θ
    over the tokens their model wrote (a tool's output is not) exceeds δ, kept on the others (Â > 0 at any drift;
    Â < 0 at a drift below δ or negative), and the KL term kept on all; with --tis too. The sampler's log-probs
    are π_θ's moved per output by a drift and per token by noise of mean 0 over the output."""
    model, comps = model_and_two_groups()
    sign = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0, -1.0])  # Â's sign per output
    drift = torch.tensor([0.3, 0.3, -0.3, 0.05, 0.3, 0.2])  # mean log π_sampler/π_θ per output
    dropped_outputs = {0.1: [1, 5], 0.0: [1, 3, 5]}[delta]  # Â < 0 and a drift past δ
    per_token = [sign[i] * (0.5 + torch.rand(len(c.ids))) for i, c in enumerate(comps)]
    beta, expected, dropped = 0.04, 0.0, 0
    for i, (c, adv) in enumerate(zip(comps, per_token)):
        logits = model(torch.tensor([c.prompt + c.ids]))[0, len(c.prompt) - 1:-1]
        lp = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(c.ids)[:, None])[:, 0]
        mine, ref = torch.tensor(c.sampled), lp.detach() - 0.1
        noise = 0.2 * torch.randn(len(c.ids), dtype=torch.float64)
        sampler = lp.detach() + drift[i] + noise - noise[mine].mean()
        c.logprobs = torch.where(mine, sampler, 0.0).tolist()
        assert (sampler - lp.detach())[mine].mean() == pytest.approx(float(drift[i]))
        adv = adv.double() * (torch.exp(lp.detach() - sampler).clamp(max=tis) if tis else 1.0)
        adv = adv * (i not in dropped_outputs)
        per = -adv * torch.exp(lp - lp.detach()) + beta * (torch.exp(ref - lp) - (ref - lp) - 1)
        expected = expected + (per * mine).sum() / mine.sum()
        dropped += int(mine.sum()) * (i in dropped_outputs)
    model.zero_grad()
    expected.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    b, _, ref = packed_with_old(model, comps, per_token, [0.0] * 6)
    sums = update_matches(model, b, None, ref, beta, tis, update_args(off_policy_mask=delta), expected.item(), 0,
                          want)
    assert sums["dropped"] == dropped == {0.1: 2 + 2, 0.0: 2 + 1 + 2}[delta]


def test_the_off_policy_mask_refuses_rollouts_without_the_samplers_log_probs():
    """Their zeros would read as a drift of -mean log π and drop every output of Â < 0 from the first update."""
    run = argparse.Namespace(args=update_args(off_policy_mask=0.1), d=common.one_process("cpu"))
    comps = [engine.Completion([1], [2, 3], [True, True], True, ""), engine.Completion([1], [4], [True], True, "")]
    comps[0].logprobs = [-0.5, -0.1]
    with pytest.raises(ValueError, match="whose log-probs these rollouts do not carry"):
        grpo.train(run, [], [], (None, None, None), comps)


def test_top_entropy_keeps_the_policy_term_on_the_tokens_drawn_at_high_entropy_and_the_kl_on_all():
    """--top-entropy ρ (Wang et al., 2025) through high_entropy_only and grpo_update, packed 3 completions a row,
    against every completion alone in float64: Â is kept on the model's tokens whose sampler entropy reaches the
    (1 - ρ) quantile of the step's model-written tokens (numpy's; a tool's output and the prompts count for
    nothing), zeroed elsewhere, and the KL term stays on every token."""
    model, comps = model_and_two_groups()
    for c in comps:
        c.entropies = [float(e) if s else 9.0 for e, s in zip(torch.rand(len(c.ids)), c.sampled)]  # a tool's: not
    per_token = [torch.randn(len(c.ids)) for c in comps]
    rho, beta = 0.3, 0.04
    ents = np.array([e for c in comps for e, s in zip(c.entropies, c.sampled) if s])  # 17: no token on the cut
    cut = np.quantile(ents, 1 - rho)
    expected = 0.0
    for c, adv in zip(comps, per_token):
        logits = model(torch.tensor([c.prompt + c.ids]))[0, len(c.prompt) - 1:-1]
        lp = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(c.ids)[:, None])[:, 0]
        mine, ref = torch.tensor(c.sampled), lp.detach() - 0.1
        kept = torch.tensor(c.entropies, dtype=torch.float64) >= cut
        per = -adv.double() * kept * torch.exp(lp - lp.detach()) + beta * (torch.exp(ref - lp) - (ref - lp) - 1)
        expected = expected + (per * mine).sum() / mine.sum()
    model.zero_grad()
    expected.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    [b] = micro_batches(pack_rows(comps, per_token, 3, 3, False, "sequence"), 6, 0, "cpu")
    before = b.advantages.clone()
    d = common.one_process("cpu")
    assert high_entropy_only([b], rho, d) == pytest.approx(cut, rel=1e-6)
    assert int(((b.advantages != 0) & b.mask).sum()) == (ents >= cut).sum() == 5  # 30% of 17, rounded down
    torch.testing.assert_close(b.advantages, before * (b.entropy >= cut))
    with torch.no_grad():
        ref = b.logprobs(model, None) - 0.1
    args = update_args()
    opt = GradientsOf(model)
    sums, _ = grpo_update(model, opt, [b], None, [ref], 1.0, beta, 0.0, None, 0, args, d)
    assert sums["loss"] == pytest.approx(expected.item(), rel=1e-5)
    for got, w in zip(opt.grads, want):
        torch.testing.assert_close(got, w.float(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_a_reference_reset_moves_it_a_share_of_the_way_to_the_policy(alpha):
    """--ref-reset with --ref-mixup alpha: π_ref ← alpha π_θ + (1 - alpha) π_ref, against float64 by hand, a tied
    head moved once with its embedding; at alpha = 1 (the paper's) a copy to the bit."""
    cfg = ModelConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=16, tie_embeddings=True)
    ref, policy = Transformer(cfg), Transformer(cfg)
    pairs = list(zip(ref.parameters(), policy.parameters(), strict=True))
    with torch.no_grad():
        for _, p in pairs:
            p.add_(torch.randn_like(p))  # norms' weights too (both start at 1)
    want = [alpha * p.double() + (1 - alpha) * r.double() for r, p in pairs]
    reset_reference(ref, policy, alpha)
    assert ref.lm_head.weight is ref.embed_tokens.weight
    for (r, p), w in zip(pairs, want):
        assert torch.equal(r, p) if alpha == 1 else torch.allclose(r.double(), w, rtol=1e-6, atol=1e-7)


def test_micro_batches_group_similar_lengths_and_trim_to_their_longest():
    comps = [engine.Completion([1, 2], [3] * n, [True] * n, True, "") for n in (4, 8, 2, 7, 3)]
    rows = pack_rows(comps, [torch.zeros(len(c.ids)) for c in comps], 1, 1, False, "sequence")
    batches = micro_batches(rows, 2, 0, "cpu")
    assert [b.inputs.shape for b in batches] == [(2, 4), (2, 8), (1, 9)]  # row lengths 3, 4 | 5, 8 | 9
    assert [b.tokens for b in batches] == [7, 13, 9] and [b.positions_run for b in batches] == [8, 16, 9]


def test_zero_std_groups_give_zero_gradient():
    logp = torch.randn(4, 5, requires_grad=True)
    adv, flat = group_advantages(torch.ones(1, 4))
    total, _, _ = grpo_objective_sums(logp, logp.detach(), logp.detach(), adv.flatten()[:, None].expand(4, 5),
                                      weights(torch.ones(4, 5, dtype=torch.bool)), opts())
    total.backward()
    assert flat == 1 and not logp.grad.any()


def test_kl_term_pulls_toward_the_reference():
    logp = torch.zeros(1, 3, requires_grad=True)
    ref = torch.full((1, 3), 0.5)  # the reference gives these tokens more probability
    total, kl, _ = grpo_objective_sums(logp, logp.detach(), ref, torch.zeros(1, 3),
                                       weights(torch.ones(1, 3, dtype=torch.bool)), opts(beta=0.1))
    total.backward()
    assert kl.item() > 0 and (logp.grad < 0).all()  # descending the loss raises logp toward the reference


def test_grpo_loop_learns_a_trivial_task():
    """Reward 1 when the first sampled token is 5: a few dozen GRPO steps must make that likely."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16)
    policy = Transformer(cfg)
    policy.init_weights()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-2)
    G, prompt = 16, [1, 2]

    def p5():
        with torch.no_grad():
            return policy(torch.tensor([prompt]))[0, -1].softmax(-1)[5].item()
    before = p5()
    for step in range(40):
        out = engine.generate(policy, [prompt] * G, 3, temperature=1.0, seed=step)
        tokens = torch.tensor([prompt + t for t in out.tokens])
        rewards = torch.tensor([[float(t[0] == 5) for t in out.tokens]])
        adv, _ = group_advantages(rewards)
        mask = torch.zeros(G, tokens.shape[1] - 1, dtype=torch.bool)
        mask[:, len(prompt) - 1:] = True
        b = argparse.Namespace(advantages=adv.flatten()[:, None].expand(mask.shape), weights=weights(mask))
        total, _ = policy.loss(tokens[:, :-1], tokens[:, 1:], policy_token_loss(b, None, None, opts(), 0, 1 / G))
        total.backward()
        opt.step()
        opt.zero_grad()
    assert before < 0.2 and p5() > 0.8


def test_training_log_probs_are_the_samplers_when_the_model_has_padded_vocab_rows():
    """More output rows than token ids (DeepSeek-Math): the sampler draws from the real ids only, and the
    forward with the same limit gives the sampler's log-probs; over all rows they would be lower by the
    padding's share of the probability mass."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=32))
    model.init_weights()
    out = engine.generate(model, [[1, 2, 3]], 6, temperature=1.0, vocab_limit=40, seed=0)
    tokens = torch.tensor([[1, 2, 3] + out.tokens[0]])
    with torch.no_grad():
        limited = model(tokens[:, :-1], tokens[:, 1:], vocab_limit=40)[0, 2:]  # the completion's positions
        every_row = model(tokens[:, :-1], tokens[:, 1:])[0, 2:]
    torch.testing.assert_close(limited, torch.tensor(out.logprobs[0]), atol=1e-5, rtol=0)
    assert (every_row < limited - 0.1).all()


def test_clip_fraction_counts_the_tokens_where_the_clip_binds():
    """ρ above 1 + ε binds only when Â > 0, below 1 - ε only when Â < 0 (there the min takes the clipped side and
    the token's gradient is 0); with Â = 0 (a group whose rewards agree) never: there is no push to stop;
    ε_high = 0.28 as DAPO's."""
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.25, 1.25, 1.0, 0.75, 1.5, 1.5, 0.5]])
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 0.0, 0.0]])
    weights = torch.tensor([[1.0] * 8 + [0.0] + [1.0] * 2])  # token 8 is not the model's
    logp = ratio.log().requires_grad_()
    total, _, clipped = grpo_objective_sums(logp, torch.zeros_like(logp), logp.detach(), adv, weights, opts(0.2, 0.28))
    assert clipped == 3  # tokens 0, 2 and 7 (0.75 < 1 - 0.2); 4 is inside [0.8, 1.28]; 8 is masked; 9, 10: Â = 0
    total.backward()
    assert clipped == ((logp.grad == 0) & (weights > 0) & (adv != 0)).sum()  # the tokens whose push the clip stops
    # the dual clip at 1.4 also stops the push down on token 1 (ρ 1.5, Â < 0); CISPO's cap at 1.28 cuts the weight
    # of tokens 0 and 1 (ρ 1.5), whatever Â's sign, and of no token of Â = 0 (9)
    logp.grad = None
    total, _, clipped = grpo_objective_sums(logp, torch.zeros_like(logp), logp.detach(), adv, weights,
                                            dict(opts(0.2, 0.28), dual_clip=1.4))
    total.backward()
    assert clipped == 4 == ((logp.grad == 0) & (weights > 0) & (adv != 0)).sum()
    _, _, clipped = grpo_objective_sums(logp, torch.zeros_like(logp), logp.detach(), adv, weights,
                                        dict(opts(0.2, 0.28), cispo=True))
    assert clipped == 2


def test_the_logged_kl_is_k3_summed_over_the_models_tokens_unweighted():
    """The KL column is a mean over the model's tokens, whatever their weight in the loss (1/|o_i| per sequence):
    k3 = π_ref/π_θ - log(π_ref/π_θ) - 1 by hand on the three tokens the model wrote."""
    logp, ref = torch.tensor([[-1.0, -2.0, -0.5, -3.0]]), torch.tensor([[-1.5, -2.0, 0.0, -1.0]])
    weights = torch.tensor([[0.25, 0.25, 0.5, 0.0]])  # token 3 is not the model's
    _, kl, _ = grpo_objective_sums(logp, logp, ref, torch.zeros_like(logp), weights, opts(beta=0.04))
    assert kl.item() == pytest.approx((math.exp(-0.5) + 0.5 - 1) + 0 + (math.exp(0.5) - 0.5 - 1))


def test_overlong_penalty_by_hand():
    # DAPO's Eq. 13 with a budget of 100 and a buffer of 20: nothing up to 80 tokens, then -1/20 a token to -1 at 100
    got = overlong_penalty(torch.tensor([0, 50, 80, 81, 90, 99, 100]), 100, 20)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.0, -0.05, -0.5, -0.95, -1.0]))
    assert overlong_penalty(torch.tensor([120]), 100, 20).item() == -1  # past the budget (never sampled): still -1


def test_tis_weights_by_hand():
    old = torch.tensor([[0.0, -1.0, -2.0, -3.0]])
    sampler = torch.tensor([[-1.0, -1.0, -1.5, -6.0]])  # ratios e, 1, e^-0.5, e^3 (masked: neither cut nor weighed)
    mask = torch.tensor([[True, True, True, False]])
    w, cut = tis_weights(old, sampler, mask, 2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, math.exp(-0.5), 1.0]]))
    assert cut.tolist() == [[True, False, False, False]]
