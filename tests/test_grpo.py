"""grpo.py: the paper's advantages and loss on hand-computed groups, and a loop that learns a trivial task."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from grpo import group_advantages, grpo_objective_sums, sequence_logprobs
from model import ModelConfig, Transformer


def opts(**kw):
    base = dict(clip_eps=0.2, clip_high=None, beta=0.0, loss_norm="sequence")
    return argparse.Namespace(**{**base, **kw})


def test_group_advantages_normalise_within_each_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv, flat = group_advantages(r)
    s = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # Bessel-corrected, as TRL
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / s)
    assert flat == 1 and not adv[1].any()  # all equal: zero advantage, counted, not 0/0
    assert adv[2, 3] > 0 and (adv[2, :3] < 0).all()
    adv, _ = group_advantages(r, scale_std=False)  # Dr. GRPO
    torch.testing.assert_close(adv[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]))


def test_sequence_normalisation_weights_short_and_long_outputs_as_the_paper():
    """Two outputs with advantage 1 and ratio 1: per token loss -1. The paper averages each output over its own
    length, so each contributes -1 whatever its length; per-token (DAPO) weights tokens; constant (Dr. GRPO)
    divides by a fixed budget later."""
    logp = torch.zeros(2, 6, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, 1.0])
    total, kl, clipped = grpo_objective_sums(logp, logp.detach(), logp.detach(), adv, mask, opts())
    assert total.item() == pytest.approx(-2.0) and clipped == 0 and kl.item() == 0
    total.backward()
    torch.testing.assert_close(logp.grad[0, :2], torch.full((2,), -0.5))  # a short output's tokens weigh more
    torch.testing.assert_close(logp.grad[1], torch.full((6,), -1 / 6))
    assert not logp.grad[0, 2:].any()  # padding carries no gradient
    tok_total, _, _ = grpo_objective_sums(logp, logp.detach(), logp.detach(), adv, mask, opts(loss_norm="token"))
    assert tok_total.item() == pytest.approx(-8.0)  # divided later by the 8 tokens


def test_zero_std_groups_give_zero_gradient():
    logp = torch.randn(4, 5, requires_grad=True)
    adv, flat = group_advantages(torch.ones(1, 4))
    total, _, _ = grpo_objective_sums(logp, logp.detach(), logp.detach(), adv.flatten(), torch.ones(4, 5, dtype=torch.bool),
                                      opts())
    total.backward()
    assert flat == 1 and not logp.grad.any()


def test_kl_term_pulls_toward_the_reference():
    logp = torch.zeros(1, 3, requires_grad=True)
    ref = torch.full((1, 3), 0.5)  # the reference gives these tokens more probability
    total, kl, _ = grpo_objective_sums(logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 3, dtype=torch.bool),
                                       opts(beta=0.1))
    total.backward()
    assert kl.item() > 0 and (logp.grad < 0).all()  # descending the loss raises logp toward the reference


def test_grpo_loop_learns_a_trivial_task():
    """Reward 1 when the first sampled token is 5: a few dozen GRPO steps must make that likely."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16)
    policy = Transformer(cfg)
    policy.init_weights()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    G, prompt = 16, [1, 2]

    def p5():
        with torch.no_grad():
            return policy(torch.tensor([prompt]))[0, -1].softmax(-1)[5].item()
    before = p5()
    for _ in range(40):
        out = policy.generate([prompt] * G, 3, temperature=1.0, generator=g)
        tokens = torch.tensor([prompt + t for t in out.tokens])
        rewards = torch.tensor([[float(t[0] == 5) for t in out.tokens]])
        adv, _ = group_advantages(rewards)
        mask = torch.zeros(G, tokens.shape[1] - 1, dtype=torch.bool)
        mask[:, len(prompt) - 1:] = True
        lp = sequence_logprobs(policy, tokens)
        total, _, _ = grpo_objective_sums(lp, lp.detach(), lp.detach(), adv.flatten(), mask, opts())
        (total / G).backward()
        opt.step()
        opt.zero_grad()
    assert before < 0.2 and p5() > 0.8


def test_two_fsdp_ranks_run_grpo_with_gathered_rollouts(data_dir, tmp_path):
    """Each rank generates for its own questions with full weights (no collective per token, ranks may stop
    at different lengths), then trains with FSDP2; the run ends with an exported policy."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    run = lambda args: subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True,  # noqa: E731
                                      timeout=300)
    r = run(["pretrain.py", "--data", str(data_dir), "--max-steps", "2", "--seq-len", "32", "--micro-batch", "4",
             "--batch-tokens", "256", "--eval-every", "0", "--out", str(tmp_path / "base")])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "grpo.py",
             "--init", str(tmp_path / "base"), "--data", str(data_dir / "train.jsonl"),
             "--eval-data", str(data_dir / "test.jsonl"), "--eval-problems", "4", "--eval-every", "2",
             "--max-steps", "2", "--questions", "4", "--group-size", "3", "--max-new-tokens", "12",
             "--out", str(tmp_path / "grpo")])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "grpo" / "metrics.jsonl")]
    assert [row["step"] for row in rows if "reward" in row] == [1, 2]
    assert os.path.isfile(tmp_path / "grpo" / "model.safetensors")
