"""ppo.py (grpo.py --advantage gae), PPO as the paper writes it: GAE and the clipped value loss by hand, the per-token
KL reward laid over packed rows, and the command line on 1 and 2 ranks with an exact resume of the value model."""
import copy
import json
import math

import pytest
import torch

import common
from engine import Completion
from packing import micro_batches, pack_rows
from ppo import advantages, gae, outcome_at_end, update_value, value_loss_sum
from test_grpo_cli import grpo_args, run
from test_scripted_grpo import in_process, problems, scripted_args  # noqa: F401 (in_process, problems: fixtures)


def test_gae_by_hand():
    r, v = [0.0, 0.0, 1.0], [0.5, 0.6, 0.8]
    adv, ret = gae(r, v, lam=0.5)
    # δ = (0 + 0.6 - 0.5, 0 + 0.8 - 0.6, 1 + 0 - 0.8) = (0.1, 0.2, 0.2); A_t = δ_t + λ A_{t+1}
    assert adv == pytest.approx([0.1 + 0.5 * 0.3, 0.2 + 0.5 * 0.2, 0.2])
    assert ret == pytest.approx([0.75, 0.9, 1.0])
    adv, _ = gae(r, v, lam=1.0)  # λ = 1: the return to the end minus the value, Monte Carlo
    assert adv == pytest.approx([1 - 0.5, 1 - 0.6, 1 - 0.8])


def test_value_loss_is_clipped_around_the_rollouts_values():
    old, ret = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5]), torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])
    v = torch.tensor([1.0, 0.6, 0.0, 0.1, 9.0], requires_grad=True)
    loss = value_loss_sum(v, old, ret, torch.tensor([True, True, True, True, False]), clip=0.2)
    # v = 1.0 moved 0.5 up from 0.5: its clipped value 0.7 is 0.3 short, and max() keeps that larger error, with no
    # gradient (the clip holds it); v = 0.6 is within the clip: ½ 0.4², gradient v − R; v = 0.0 moved away from
    # R: unclipped, 1.0 short, the larger error; v = 0.1 moved 0.4 down towards R = 0: clipped to 0.3; masked: 0
    assert loss.item() == pytest.approx(0.5 * (0.3 ** 2 + 0.4 ** 2 + 1.0 ** 2 + 0.3 ** 2))
    loss.backward()
    assert v.grad.tolist() == pytest.approx([0.0, -0.4, -1.0, 0.0, 0.0])


def test_ppo_advantages_put_the_kl_in_the_reward_and_run_gae_per_completion_in_packed_rows():
    """Three outputs of one question packed in one row behind their prompt: each one's reward is its score at its
    last token minus β log(π_old/π_ref) at every token; GAE runs within each output, and the step whitens."""
    comps = [Completion([1, 2], [5, 6, 7], [True] * 3, True, "", [-0.5, -1.0, -0.2]),
             Completion([1, 2], [8, 9], [True] * 2, True, "", [-0.3, -0.7]),
             Completion([1, 2], [3, 4, 5, 6], [True] * 4, True, "", [-0.1, -0.9, -0.4, -0.6])]
    scores = (1.0, 0.0, 1.0)
    rows = pack_rows(comps, outcome_at_end(comps, torch.tensor(scores)), 3, 3, False, "sequence")
    [b] = micro_batches(rows, 4, 0, "cpu")
    ref = torch.zeros_like(b.sampler_logp) - 0.4
    values = torch.linspace(0.1, 0.9, b.inputs.shape[1])[None]  # a value at each position
    beta, lam = 0.5, 0.9
    advantages([b], [ref], [values], beta, lam, common.Dist(0, 1, torch.device("cpu")))
    want = []
    for k, (c, score) in enumerate(zip(comps, scores), 1):
        idx = (b.segment[0] == k).nonzero()[:, 0]
        r = [-beta * (lp + 0.4) for lp in c.logprobs]
        r[-1] += score
        v = values[0, idx].tolist()
        a, later = [0.0] * len(r), 0.0  # GAE with γ = 1 written out here, from the last token back
        for t in reversed(range(len(r))):
            later = r[t] + (v[t + 1] if t + 1 < len(r) else 0.0) - v[t] + lam * later
            a[t] = later
        want.append(a)
        assert b.returns[0, idx].tolist() == pytest.approx([x + y for x, y in zip(a, v)])  # returns: Â + V
    flat = torch.tensor(sum(want, []))
    whitened = (flat - flat.mean()) / (flat.var(unbiased=False).sqrt() + 1e-8)
    assert b.advantages[b.mask].tolist() == pytest.approx(whitened.tolist(), abs=1e-5)
    assert not b.advantages[~b.mask].any()  # nothing on the prompt


def test_advantages_without_a_signal_are_zero_not_whitened_noise():
    """No output scored (every reward 0), the value model at its start (its zero head: V = 0) and π_old = π_ref but
    for float noise (1e-7, as a decode step's log-probs and a forward pass's differ): GAE's advantages are that
    noise, and whitening would scale it to unit size (AdamW then takes a full step on it: a 1e-8 gradient moves
    the weights as a real one does). They are 0, as GRPO's for a group whose rewards agree."""
    comps = [Completion([1, 2], [5, 6, 7], [True] * 3, True, "", [-0.5, -1.0, -0.2]),
             Completion([1, 2], [8, 9], [True] * 2, True, "", [-0.3, -0.7])]
    rows = pack_rows(comps, outcome_at_end(comps, torch.tensor([0.0, 0.0])), 2, 2, False, "sequence")
    [b] = micro_batches(rows, 4, 0, "cpu")
    noise = torch.randn(b.sampler_logp.shape, generator=torch.Generator().manual_seed(0)) * 1e-7
    advantages([b], [b.sampler_logp + noise], [torch.zeros(b.inputs.shape)], 0.04, 0.95,
               common.Dist(0, 1, torch.device("cpu")))
    assert not b.advantages.any()
    comps = [Completion([1, 2], [5], [True], True, "", [-0.5])]  # one token in the step: nothing to compare it with
    [b] = micro_batches(pack_rows(comps, outcome_at_end(comps, torch.tensor([1.0])), 1, 1, False, "sequence"), 4, 0,
                        "cpu")
    advantages([b], [b.sampler_logp], [torch.zeros(b.inputs.shape)], 0.04, 0.95, common.Dist(0, 1, torch.device("cpu")))
    assert not b.advantages.any()


def test_the_outcome_is_on_the_last_token_the_model_wrote():
    """A tool round's output ends the completion: r_φ goes on the model's last token before it, not on the
    sandbox's."""
    c = Completion([1], [5, 6, 7, 8], [True, True, False, False], True, "", [-0.1, -0.2, 0.0, 0.0])
    assert outcome_at_end([c], torch.tensor([2.0]))[0].tolist() == [0.0, 2.0, 0.0, 0.0]


def a_value_model_and_its_batch():
    """A tiny value model (the score head, at random) and a micro-batch of one 3-token output, with its values."""
    from model import ModelConfig, Transformer
    comps = [Completion([1, 2], [5, 6, 7], [True] * 3, True, "", [-0.5, -1.0, -0.2])]
    [b] = micro_batches(pack_rows(comps, outcome_at_end(comps, torch.tensor([1.0])), 1, 1, False, "sequence"),
                        4, 0, "cpu")
    value = Transformer(ModelConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=8,
                                    head="score"))
    value.init_weights()
    with torch.no_grad():
        torch.nn.init.normal_(value.score.weight, std=0.5)  # not the zero head: values that differ
        return value, b, b.values(value)


def test_the_value_step_is_the_mean_loss_over_the_written_tokens():
    """With SGD at lr 1 and no clip a step is minus the gradient of the clipped value loss's mean over the n_tok
    tokens the model wrote on all ranks (here by autograd on a copy; n_tok 4, then 1, for the batch's 3 on this
    rank), each step from a zero gradient; it returns the summed loss."""
    from types import SimpleNamespace
    value, b, old = a_value_model_and_its_batch()
    b.returns = old + torch.tensor([0.1, -0.3, 0.05, 0.5]).expand_as(old)  # targets above and below the values
    d, args = common.Dist(0, 1, torch.device("cpu")), SimpleNamespace(value_clip=0.2, grad_clip=1e9, out="out")
    opt = torch.optim.SGD(value.parameters(), lr=1.0)
    for n_tok in (4, 1):
        mirror = copy.deepcopy(value)
        loss = value_loss_sum(b.values(mirror), old, b.returns, b.mask, args.value_clip)
        (loss / n_tok).backward()
        want = [(p - p.grad).detach() for p in mirror.parameters()]
        got = update_value(value, opt, [b], [old], n_tok, d, args)
        assert got == pytest.approx(loss.item(), rel=1e-6)
        for p, w in zip(value.parameters(), want):
            torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-7)


def test_the_value_step_clips_its_gradient_and_stops_on_a_non_finite_one():
    """With SGD at lr 1 the update is the gradient itself, so targets far from the values move the value model by
    exactly --grad-clip (AdamW would hide the clip); infinite targets stop before the optimizer step."""
    from types import SimpleNamespace
    value, b, old = a_value_model_and_its_batch()
    d, args = common.Dist(0, 1, torch.device("cpu")), SimpleNamespace(value_clip=0.2, grad_clip=1e-3, out="out")
    b.returns = old + 100.0
    before = torch.cat([p.detach().flatten().clone() for p in value.parameters()])
    update_value(value, torch.optim.SGD(value.parameters(), lr=1.0), [b], [old], int(b.mask.sum()), d, args)
    moved = torch.cat([p.detach().flatten() for p in value.parameters()]) - before
    assert moved.norm().item() == pytest.approx(args.grad_clip, rel=1e-4)
    b.returns = old + float("inf")
    with pytest.raises(FloatingPointError, match="value model: gradient norm nan; the last good checkpoint"):
        update_value(value, torch.optim.SGD(value.parameters(), lr=1.0), [b], [old], int(b.mask.sum()), d, args)


def test_ppo_whitens_over_every_rank(base, problems, tmp_path, in_process):  # noqa: F811
    """Scripted rollouts (the same outputs whatever the rank): PPO's step on 2 ranks, each holding half the groups,
    logs the loss and gradient norm of 1 process, which holds them all: the advantages' mean and std are the
    step's, not a rank's. Two mini-batches a step, the policy's and the value model's updates on each in turn."""
    flags = ("--max-steps", "2", "--report-problems", "0", "--advantage", "gae", "--value-lr", "0.01",
             "--mini-batches", "2")
    in_process(scripted_args(base, problems, tmp_path / "one", *flags))
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             *scripted_args(base, problems, tmp_path / "two", *flags)])
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = ([json.loads(line) for line in open(tmp_path / k / "metrics.jsonl") if '"loss"' in line]
                for k in ("one", "two"))
    keys = ("loss", "grad_norm", "value_loss")
    for a, b in zip(one, two):
        assert [b[k] for k in keys] == pytest.approx([a[k] for k in keys], rel=1e-4, abs=1e-6)


def test_the_value_model_steps_on_each_mini_batch_as_the_policy_does(base, problems, tmp_path, in_process,  # noqa: F811
                                                                     monkeypatch):
    """--advantage gae --mini-batches 2: each pass, the value model takes a step on each mini-batch's micro-batches
    after the policy's on the same ones, its loss averaged over that mini-batch's tokens."""
    import grpo
    import ppo
    seen, grpo_update, value_update = [], grpo.grpo_update, ppo.update_value

    def policy_step(policy, opt, batches, *a):
        seen.append(("policy", [id(b) for b in batches], None))
        return grpo_update(policy, opt, batches, *a)

    def value_step(value, opt, batches, old_values, n_tok, d, args):
        assert n_tok == sum(int(b.mask.sum()) for b in batches)  # one process: all of the mini-batch's tokens
        seen.append(("value", [id(b) for b in batches], [v.shape for v in old_values]))
        return value_update(value, opt, batches, old_values, n_tok, d, args)
    monkeypatch.setattr(grpo, "grpo_update", policy_step)
    monkeypatch.setattr(ppo, "update_value", value_step)
    in_process(scripted_args(base, problems, tmp_path / "run", "--max-steps", "1", "--report-problems", "0",
                             "--advantage", "gae", "--value-lr", "0.01", "--mini-batches", "2", "--mu", "2"))
    assert [kind for kind, _, _ in seen] == ["policy", "value"] * 4
    (_, a, _), (_, a_value, shapes), (_, b, _) = seen[:3]
    assert a == a_value and not set(a) & set(b) and seen[4][1] == a and seen[6][1] == b  # each pass: a, then b
    assert len(shapes) == len(a)


def ppo_args(base, data_dir, out, *extra):
    return grpo_args(base, data_dir, out, "--advantage", "gae", "--eval-every", "0", "--report-problems", "0",
                     "--value-lr", "0.01", *extra)


@pytest.mark.parametrize("ranks", [1, 2])
def test_ppo_runs_and_resumes_exactly_with_its_value_model(base, data_dir, tmp_path, ranks):
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if ranks == 2 else []
    for out, steps in (("a", 3), ("b", 1)):
        r = run([*launch, *ppo_args(base, data_dir, tmp_path / out, "--max-steps", str(steps))])
        assert r.returncode == 0, r.stderr[-3000:]
    r = run([*launch, *ppo_args(base, data_dir, tmp_path / "b", "--max-steps", "3", "--resume")])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = ([json.loads(line) for line in open(tmp_path / k / "metrics.jsonl") if '"loss"' in line] for k in "ab")
    assert [row["step"] for row in b] == [1, 2, 3]
    assert all(math.isfinite(row["value_loss"]) and row["value_loss"] > 0 for row in a)
    keys = ("loss", "kl", "value_loss", "grad_norm")  # step 3's value loss needs the value model's AdamW moments
    for x, y in zip(a, b):
        assert [x[k] for k in keys] == pytest.approx([y[k] for k in keys], rel=1e-4, abs=1e-6)
