"""What a GRPO step writes down (grpo.py): its row of metrics.jsonl, this rank's sums added over all ranks and
turned into means, and its first group's outputs for completions.jsonl. What each column means and its healthy
values on the toy: docs/pipeline.md."""

import common


def pass_sums(updates):
    """One pass's sums for the log from its mini-batches' updates: totals, the largest gap, and the mean of their
    losses (each normalised over its own mini-batch)."""
    sums = {k: sum(u[k] for u in updates) for k in updates[0]}
    return dict(sums, gap_max=max(u["gap_max"] for u in updates), loss=sums["loss"] / len(updates))


def kept_sums(batches):
    """--keep-sampling-mask: over the model's tokens (each batch's mask), the ids each could have been, summed,
    and the tokens that could have been no other (π over one id is 1: the mask leaves them no gradient)."""
    sizes = [(b.kept >= 0).sum(-1)[b.mask] for b in batches if b.kept is not None]
    return dict(kept_ids=sum(int(x.sum()) for x in sizes), kept_alone=sum(int((x == 1).sum()) for x in sizes))


def step_metrics(d, step, lr, n_seq, n_tok, args, sums, times):
    """One row of metrics.jsonl: `sums` are this rank's sums (summed over ranks here), `times` its seconds."""
    s = {k: common.all_sum(d, v) for k, v in sums.items()}
    mean = s["reward"] / n_seq
    row = dict(step=step, lr=lr, reward=mean, reward_std=max(s["reward_sq"] / n_seq - mean ** 2, 0.0) ** 0.5,
               rule_reward=s["rule_reward"] / n_seq,  # = reward unless a reward model gives it: the hacking check
               loss=s["loss"],  # each rank's part of -J, normalised (the last pass's mean over mini-batches)
               kl=s["kl"] / max(n_tok, 1),
               clip_frac=s["clipped"] / max(n_tok, 1),
               entropy=s["neg_logp"] / max(n_tok, 1),  # -log π of the sampled tokens: an estimate at T = 1
               grad_norm=sums["grad_norm"], length=s["tokens"] / n_seq, zero_std_groups=s["zero_std_groups"])
    if "logprob_gap_max" in sums:  # the sampler against the training forward of π_old, on the same tokens
        row.update(logprob_gap_mean=s["logprob_gap"] / max(n_tok, 1), logprob_gap_max=sums["logprob_gap_max"])
    if "tis_weight" in sums:  # --tis: the mean weight on the model's tokens, and the share the cap cut
        row.update(tis_weight=s["tis_weight"] / max(n_tok, 1), tis_clip_rate=s["tis_cut"] / max(n_tok, 1))
    if "dropped" in sums:  # --off-policy-mask: the share of the model's tokens whose policy term it dropped
        row.update(off_policy_masked=s["dropped"] / max(n_tok, 1))
    if "kept_ids" in sums:  # --keep-sampling-mask: the ids a token could have been, and how often only itself
        row.update(kept_ids=s["kept_ids"] / max(n_tok, 1), kept_alone=s["kept_alone"] / max(n_tok, 1))
    row.update({k: s[k] / n_seq for k in s if k.startswith("reward_fn_") or k == "overlong_penalty"})  # means
    if args.oversample > 1:  # before dynamic sampling chose the groups
        row.update(generated_zero_std_groups=s["generated_zero_std_groups"],
                   generated_reward=s["generated_reward"] / s["generated"])
    row.update(truncated=s["truncated"], tool_calls=s["tool_calls"],
               padding=1 - s["sequence_tokens"] / s["trained_tokens"],  # of the positions the forwards ran
               rollout_tokens_per_s=s["generated_tokens"] * d.world / s["time_generate"],
               train_tokens_per_s=s["train_tokens"] / times["train"],
               time_generate=s["time_generate"] / d.world, time_reward=s["time_reward"] / d.world,
               time_ref=times["ref"], time_train=times["train"], seconds=times["step"])
    return row


def completion_rows(step, problems, comps, scores, advantages, group_size):
    """The step's first group on this rank, for completions.jsonl: what to read when the reward rises and the
    outputs do not look better (a reward model gamed, an answer format the grader takes by accident, outputs
    cut at the budget). scores: name -> per output (the rule's, the reward trained on, each --reward-fn's);
    advantages: per output its per-token tensor (the mean is logged), or None (PPO)."""
    return [dict(step=step, question=problems[i]["question"], answer=problems[i]["answer"], completion=comps[i].text,
                 **{k: float(v[i]) for k, v in scores.items()}, tokens=len(comps[i].ids), finished=comps[i].finished,
                 advantage=None if advantages is None else float(advantages[i].float().mean()))
            for i in range(min(group_size, len(comps)))]
