"""grpo_log.py: what a GRPO step writes down, by hand."""
import argparse

import pytest
import torch

import common
import grpo_log


def test_a_steps_row_by_hand_and_two_like_ranks_log_its_means_and_twice_its_rates(monkeypatch):
    """grpo_log.step_metrics: one rank's row by hand (the rewards' std over the outputs; means per output and per
    token; tokens a second). Two ranks holding the same outputs (each half of the normalised loss) log the same
    means and seconds, and twice the counts and the tokens a second: the ranks run at once."""
    rank = dict(reward=3.0, reward_sq=3.0, rule_reward=2.0, loss=-0.5, kl=0.2, neg_logp=8.0, clipped=4.0, tokens=40,
                zero_std_groups=1, truncated=1, tool_calls=2, sequence_tokens=60, trained_tokens=80,
                generated_tokens=40, time_generate=2.0, time_reward=0.5, train_tokens=160, grad_norm=0.3,
                logprob_gap=0.4, logprob_gap_max=0.01, tis_weight=36.0, tis_cut=2.0, dropped=3.0, reward_fn_len=1.0,
                overlong_penalty=-0.5, generated_zero_std_groups=3, generated_reward=5.0, generated=8)
    args, times = argparse.Namespace(oversample=2), dict(train=4.0, ref=1.0, step=8.0)
    cpu = torch.device("cpu")
    one = grpo_log.step_metrics(common.Dist(0, 1, cpu, torch.float32), 7, 1e-3, 4, 40, args, rank, times)
    assert one == pytest.approx(dict(
        step=7, lr=1e-3, reward=0.75, reward_std=0.1875 ** 0.5, rule_reward=0.5, loss=-0.5, kl=0.005, clip_frac=0.1,
        entropy=0.2, grad_norm=0.3, length=10.0, zero_std_groups=1, logprob_gap_mean=0.01, logprob_gap_max=0.01,
        tis_weight=0.9, tis_clip_rate=0.05, off_policy_masked=0.075, reward_fn_len=0.25, overlong_penalty=-0.125,
        generated_zero_std_groups=3, generated_reward=0.625, truncated=1, tool_calls=2, padding=0.25,
        rollout_tokens_per_s=20.0, train_tokens_per_s=40.0, time_generate=2.0, time_reward=0.5, time_ref=1.0,
        time_train=4.0, seconds=8.0))
    monkeypatch.setattr(common, "all_sum", lambda d, x: 2 * x)  # the other rank's sums are this one's
    two = grpo_log.step_metrics(common.Dist(0, 2, cpu, torch.float32), 7, 1e-3, 8, 80, args, dict(rank, loss=-0.25),
                                times)
    doubled = {"zero_std_groups", "truncated", "tool_calls", "generated_zero_std_groups", "rollout_tokens_per_s",
               "train_tokens_per_s"}
    assert two == pytest.approx({k: 2 * v if k in doubled else v for k, v in one.items()})
