"""Group Relative Policy Optimization, as DeepSeekMath writes it (paper §4; docs/paper.md §5).

For each question q, sample G outputs o_1..o_G from the old policy π_old and maximise

    J = mean_q (1/G) Σ_i (1/|o_i|) Σ_t [ min(ρ_it Â_it, clip(ρ_it, 1-ε, 1+ε) Â_it) - β KL_it ]

with the ratio ρ_it = π_θ(o_it | q, o_i<t) / π_old(o_it | q, o_i<t), and the k3 estimate
KL_it = π_ref/π_θ - log(π_ref/π_θ) - 1 in the loss (not in the reward). The advantages Â, two ways:
- outcome supervision (§4.1.2): Â_it = (r_i - mean(r)) / std(r) over the group, for every token of o_i;
- process supervision (§4.1.3, --supervision process): each step j of o_i has a reward, normalised over all
  steps of the group, and Â_it is the sum of the normalised rewards of the steps that end at or after token t.
  The step rewards come from a process reward model (--reward prm, reward_model.py) or, on the toy, from a
  rule-based checker of its arithmetic (reward.process_rewards).

Algorithm 1 (§4.1.4), numbered as `main` numbers its comments:
     1  policy π_θ ← π_init
     2  for iteration = 1, ..., I:                  (I x M = --max-steps; a new one every --ref-reset M)
     3      reference π_ref ← π_θ
     4      for step = 1, ..., M:
     5          sample a batch D_b of questions
     6          π_old ← π_θ
     7          sample G outputs o_i ~ π_old(· | q) for each question q of D_b
     8          rewards r_i of the outputs              (--reward: the answer rule, reward.py; or a reward model)
     9          advantages Â_it by group-relative estimation
    10          for GRPO iteration = 1, ..., μ:
    11              update π_θ to maximise J
    12      update the reward model with a replay of old data   (--rm-refresh: reward_model.refresh_reward_model)

Choices the paper leaves open, made here: ε = 0.2 (PPO's), std with Bessel's correction (as TRL), a group whose
rewards are all equal gets advantage 0 (counted as zero_std_groups), rollouts at temperature 1, the LR on a cosine
from its peak to a tenth of it (docs/findings.md: on the toy it gains on every seed where a constant LR does not).
Options, one flag each: --loss-norm token (DAPO) or constant (Dr. GRPO), --no-std-scale (Dr. GRPO) or --std-scale
batch (REINFORCE++), --clip-high (DAPO's asymmetric clip), --beta 0 (no KL), --kl-loss k2 (the KL term whose
gradient is the reverse KL's, as Eq. 3 writes it; k3's is the forward KL's: fused_kernels/grpo_loss.py), --kl-loss
k3-is (DeepSeek-V3.2's unbiased KL: k3 weighted by the ratio, also at --mu > 1), --off-policy-mask δ
(DeepSeek-V3.2's: no push down on outputs the policy has moved away from since they were drawn), --mask-truncated
and --overlong-buffer L (DAPO's overlong filter and soft punishment), --mini-batches K (K updates a batch, each on a
share of its groups: verl's mini-batches), with --mu or --mini-batches > 1 --ratio sequence (GSPO: one ratio per
output), --policy-loss cispo (CISPO: the ratio capped as a weight, no token's gradient zeroed) and --dual-clip C
(dual-clip PPO, verl's: a push down capped where the ratio passes C), --oversample K (DAPO's dynamic sampling:
groups whose rewards all agree are replaced by ones that carry signal), --top-entropy ρ (the policy-gradient term on
the tokens drawn at the highest entropy only: Wang et al., 2025), --online-rft (the paper's §5.2.1 baseline),
--prompt tool (tool-integrated rollouts: the sandbox's output joins the context, no loss on it), --reward orm|prm (a
learned reward), --rm-refresh K (iterative GRPO's reward-model update), --ref-mixup α (line 3 a share α of the way:
TRL's), --advantage gae (PPO, the method GRPO replaces: line 9 from a value model instead of the group), --reward-fn
(your own rewards beside the rule), --lora-rank (LoRA: π_ref is the policy with its adapters off); every flag is in
grpo_cli.py. Generation is engine.py's, the per-token loss fused_kernels/'s, processes, FSDP2 and checkpoints
common.py's, reward models reward_model.py's, PPO's advantages and value loss ppo.py's, what a step logs
grpo_log.py's.

    python grpo.py                                # the toy: builds data, base and SFT models first if missing
    torchrun --nproc_per_node 8 grpo.py --init <hf dir> --data problems.jsonl --questions 16 --group-size 64 \\
        --lr 1e-6 --max-new-tokens 1024 --micro-batch 4 --gen-batch 32 --max-steps 9000 \\
        --activation-checkpointing
"""

import argparse
import copy
import json
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

import common
import data
import engine
import evaluate
import grpo_log
import lora
import memory
import ppo
import problem_sets
import reward
import reward_model
import sft
from fused_kernels import grpo_token_loss
from grpo_cli import SIZE_DEFAULTS, parse_args
from model import PRESETS, ModelConfig, config_from_hf
from packing import micro_batches, pack_rows
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# The pieces, named as in the paper


def draw(n_problems, n, seed, step):
    """Line 5: the indices of step's batch D_b, n of n_problems without replacement, a function of (seed, step)
    alone, so that a resumed run draws what the uninterrupted one would have."""
    return np.random.default_rng([seed, step]).choice(n_problems, n, replace=False)


def zero_std_groups(rewards):
    """(questions, G) rewards -> (questions,) bool: groups whose rewards all agree, which carry no signal."""
    return rewards.std(1) < 1e-6 if rewards.shape[1] > 1 else torch.ones(len(rewards), dtype=torch.bool)


def group_advantages(rewards, scale="group"):
    """Outcome supervision (paper §4.1.2): Â_i = (r_i - mean(r)) / std(r) within each group, the same for
    every token of o_i. rewards: (questions, G). scale: "group" divides by each group's std (the paper's),
    "batch" by one std of the centred rewards over the whole batch (REINFORCE++'s: a question whose outputs score
    alike gets a small push, not a full one), "none" by nothing (Dr. GRPO). A group whose rewards are all equal
    gets advantages 0 (not 0/0). Returns (advantages (questions, G), number of such groups)."""
    zero_std = zero_std_groups(rewards)[:, None]  # (Q, 1)
    adv = rewards - rewards.mean(1, keepdim=True)  # (Q, G)
    if scale == "group" and rewards.shape[1] > 1:
        adv = adv / rewards.std(1, keepdim=True).clamp(min=1e-6)
    elif scale == "batch" and adv.numel() > 1:
        adv = adv / adv.std().clamp(min=1e-6)
    return torch.where(zero_std, 0.0, adv), int(zero_std.sum())


def process_advantages(steps, lengths, group_size, scale="group"):
    """Process supervision (paper §4.1.3): steps[i] lists (index of the token that ends step j, reward r_ij)
    of output i; each reward is normalised by the mean and std of all step rewards of its group (scale "batch":
    by its group's mean and one std of the centred step rewards over the batch; "none": by the mean alone), and
    token t of o_i gets Â_it = the sum of the normalised rewards of the steps ending at or after t. Returns (per
    output a (length,) tensor of advantages, number of groups whose step rewards are all equal: zero advantage)."""
    groups = [steps[g:g + group_size] for g in range(0, len(steps), group_size)]
    rs = [torch.tensor([x for s in group for _, x in s]) for group in groups]  # every step reward of a group
    centred = torch.cat([r - r.mean() for r in rs if len(r)])
    batch_std = centred.std().clamp(min=1e-6) if len(centred) > 1 else 1.0
    out, n_zero_std = [], 0
    for g, (group, r) in enumerate(zip(groups, rs)):
        mean, std = r.mean(), (r.std() if len(r) > 1 else torch.tensor(0.0))
        zero_std = bool(std < 1e-6)
        n_zero_std += zero_std
        divide = {"group": std, "batch": batch_std, "none": 1.0}[scale]
        for s, n in zip(group, lengths[g * group_size:(g + 1) * group_size]):
            a = torch.zeros(n)
            for end, x in ([] if zero_std else s):
                a[:end + 1] += (x - mean) / divide  # every token up to its end
            out.append(a)
    return out, n_zero_std


def grpo_objective_sums(logp, old_logp, ref_logp, advantages, weights, objective):
    """The GRPO loss (−J) of a micro-batch as Σ_t weight_t · loss_t, the sum *before* the division by the
    mini-batch's normaliser, so that micro-batches and ranks add up exactly to the whole. The weights say how
    tokens are normalised (loss_weights): 1/|o_i| on each token of o_i for the paper's per-sequence mean (then
    / number of sequences), 1 for DAPO's per-token mean (then / number of tokens) and for Dr. GRPO's constant
    (then / sequences x max new tokens); 0 on the prompt, the sandbox's output and padding.
    logp, old_logp, ref_logp, advantages, weights: (B, T); objective: grpo_token_loss's settings (clip_eps as
    (ε_low, ε_high), beta, cispo, kl_loss, dual_clip). Returns (loss sum, KL sum over the weighted tokens, number
    of them where a clip binds), as tensors: nothing is read back to the host here."""
    # per token: -min(ρÂ, clip(ρ)Â) + β k3 (or CISPO's term, k2), and its gradient, in one fused pass
    loss, kl = grpo_token_loss(logp, old_logp, ref_logp, advantages, **objective)  # (B, T)
    mask = weights > 0  # (B, T): the tokens the model wrote
    ratio = torch.exp(logp - old_logp).detach()  # (B, T): ρ, 1 everywhere when μ = 1
    (low, high), pushed = objective["clip_eps"], advantages != 0
    if objective.get("cispo"):  # the cap cuts the weight of a token's gradient, whatever Â's sign; none is 0
        clipped = (ratio > 1 + high) & pushed
    else:  # the clip binds (the token's gradient is 0) only where it lowers the objective: ρ past 1 + ε pushing a
        # token up (Â > 0), or below 1 - ε pushing it down (Â < 0)
        clipped = ((ratio > 1 + high) & (advantages > 0)) | ((ratio < 1 - low) & (advantages < 0))
        if objective.get("dual_clip"):  # and where the dual clip caps ρ pushing a token down
            clipped |= (ratio > objective["dual_clip"]) & (advantages < 0)
    return (loss * weights).sum(), (kl.detach() * mask).sum(), (clipped & mask).sum()


def fixed_logprobs(model, batches, vocab_limit, d, args):
    """log π(targets) of every micro-batch under `model` (π_ref, or π_old when μ > 1), without gradient: the
    log-probs that stay fixed during the update. Its weights are gathered once for all the micro-batches
    (common.unsharded; FSDP2's hooks would gather every block again for each), and its forward is the policy's
    own (the same wrappers, dtype, autocast and rollout temperature), or the KL would start above 0."""
    with torch.no_grad(), common.unsharded(model), common.autocast(d):
        return [b.logprobs(model, vocab_limit, args.temperature) for b in batches]


def policy_token_loss(b, old_logp, ref_logp, objective, tis, scale, log_ratio=None, dropped=None):
    """Line 10's objective for micro-batch b as model.loss takes it: for the policy's log-probs lp (n,) of the
    flattened positions `rows`, each token's scale · weight · (-min(ρÂ, clip(ρ)Â) + β k3) and its derivative in
    lp, both from the fused per-token kernel (fused_kernels.grpo_token_loss, whose settings `objective` holds:
    clip_eps, beta, cispo, kl_loss, dual_clip). old_logp None: π_old is π_θ itself (μ = 1: ρ = 1, its gradient
    not); ref_logp None: no KL (β = 0); tis > 0: Â weighted by tis_weights.
    log_ratio (b, T): --ratio sequence, GSPO's log s_i on each token of o_i (sequence_log_ratio): ρ is then
    s_i · π_θ/sg[π_θ], s_i in value and clip, the token's own in gradient (GSPO-token, Zheng et al., 2025).
    dropped (b, T): --off-policy-mask, the tokens whose policy term is dropped (off_policy_masked): Â = 0 there."""
    def token_loss(lp, rows):
        def flat(t):
            return t.reshape(-1)[rows]
        old = lp if old_logp is None else flat(old_logp)
        ref = lp if ref_logp is None else flat(ref_logp)
        adv = flat(b.advantages)
        if tis:
            adv = adv * tis_weights(old, flat(b.sampler_logp), flat(b.mask), tis)[0]
        if dropped is not None:
            adv = torch.where(flat(dropped), 0.0, adv)
        if log_ratio is not None:  # exp(lp - (lp - log s_i)) = s_i
            old = lp - flat(log_ratio)
        w = flat(b.weights) * scale
        with torch.enable_grad():  # the kernel's own gradient, run inside the model's forward
            x = lp.detach().requires_grad_()
            loss, _ = grpo_token_loss(x, old, ref, adv, **objective)
            (loss * w).sum().backward()
        return loss.detach() * w, x.grad
    return token_loss


def sequence_log_ratio(logp, old_logp, b):
    """GSPO's log s_i = (1/|o_i|) Σ_t log π_θ(o_it)/π_old(o_it), the log of the geometric mean of o_i's ratios
    over the tokens its model wrote, at each of them; 0 elsewhere. logp, old_logp: (b, T) -> (b, T)."""
    seg = b.segment.clamp(min=0)  # completion k >= 1 of each row; the prompt and padding, masked, share 0
    mask = b.mask.float()
    sums = torch.zeros_like(mask).scatter_add_(1, seg, torch.where(b.mask, logp - old_logp, 0.0))
    counts = torch.zeros_like(mask).scatter_add_(1, seg, mask)
    return (sums / counts.clamp(min=1)).gather(1, seg) * mask


def off_policy_masked(logp, b, delta):
    """DeepSeek-V3.2's off-policy sequence masking: the tokens whose policy term is dropped, those of Â < 0 in the
    outputs whose mean log π_sampler/π_θ over the tokens their model wrote exceeds δ. The policy has moved away
    from what drew them (the sampler's rounding, the earlier updates when μ > 1), and pushing an output down
    that π_θ already makes less likely learns from off-policy noise more than from the output. Outputs of
    Â > 0 keep theirs, and the KL term stays on every token. logp (b, T): π_θ now, no gradient -> (b, T) bool."""
    drift = -sequence_log_ratio(logp, b.sampler_logp, b)  # (b, T): the output's mean log π_sampler/π_θ
    return (drift > delta) & (b.advantages < 0)  # δ >= 0 (grpo_cli): off the model's tokens the drift is 0


def grpo_update(policy, opt, batches, old_logp, ref_logp, normaliser, beta, tis, vocab_limit, step, args, d):
    """Lines 10-11 of Algorithm 1, one update on a mini-batch: J on each of its micro-batches, its gradient made in
    the forward (model.loss) and normalised over all ranks, so that any split adds up to the whole mini-batch;
    clipped; one AdamW step. old_logp None: π_old is π_θ as it is now (ρ = 1); ref_logp None: no KL. Returns this
    rank's sums for the log (the loss over the normaliser, KL, tokens where the clip binds, -log π, π_old's gap to
    the sampler, the TIS weights and the tokens the off-policy mask dropped; read back once, not per micro-batch)
    and the gradient norm."""
    objective = dict(clip_eps=(args.clip_eps, args.clip_high or args.clip_eps), beta=beta,
                     cispo=args.policy_loss == "cispo", kl_loss=args.kl_loss, dual_clip=args.dual_clip)
    sums = dict(loss=0, kl=0, clipped=0, neg_logp=0, logprob_gap=0, gap_max=0.0, tis_weight=0, tis_cut=0,
                dropped=0)
    gspo, opsm = args.ratio == "sequence" and old_logp is not None, args.off_policy_mask
    for k, b in enumerate(batches):
        if d.world > 1:  # FSDP2 accumulates the gradients unsharded; one reduce-scatter, after the last
            policy.set_requires_gradient_sync(k == len(batches) - 1)
        old = old_logp[k] if old_logp is not None else None
        ref = ref_logp[k] if ref_logp is not None else None
        scale = d.world / normaliser  # × world: FSDP2 averages gradients over ranks, which this undoes

        def seen_whole(lp):  # GSPO's ratio and the off-policy mask: functions of all of an output's log-probs
            log_ratio = sequence_log_ratio(lp, old, b) if gspo else None
            dropped = off_policy_masked(lp, b, opsm) if opsm is not None else None
            return policy_token_loss(b, old, ref, objective, tis, scale, log_ratio, dropped)
        with common.autocast(d):
            if gspo or opsm is not None:
                total, logp = b.loss(policy, vocab_limit, seen_whole, sees_all=True, temperature=args.temperature)
            else:
                total, logp = b.loss(policy, vocab_limit, policy_token_loss(b, old, ref, objective, tis, scale),
                                     temperature=args.temperature)
        total.backward()
        # what to log, from the same log-probs (no gradient)
        old, ref = (logp if x is None else x for x in (old, ref))
        gap = (old - b.sampler_logp).abs() * b.mask  # (b, T), 0 off the model's tokens: π_old against the sampler
        sums["logprob_gap"], sums["gap_max"] = sums["logprob_gap"] + gap.sum(), gap.max().clamp(min=sums["gap_max"])
        adv = b.advantages
        if tis:  # as policy_token_loss weighs them
            w, cut = tis_weights(old, b.sampler_logp, b.mask, tis)
            adv = adv * w
            sums["tis_weight"], sums["tis_cut"] = sums["tis_weight"] + (w * b.mask).sum(), sums["tis_cut"] + cut.sum()
        if opsm is not None:
            dropped = off_policy_masked(logp, b, opsm)
            adv, sums["dropped"] = torch.where(dropped, 0.0, adv), sums["dropped"] + dropped.sum()
        if args.ratio == "sequence":  # the ratio the loss took: its sequence's
            old = logp - sequence_log_ratio(logp, old, b)
        loss, kl, clipped = grpo_objective_sums(logp, old, ref, adv, b.weights, objective)
        sums.update(loss=sums["loss"] + loss / normaliser, kl=sums["kl"] + kl, clipped=sums["clipped"] + clipped,
                    neg_logp=sums["neg_logp"] - (logp * b.mask).sum())
    grad_norm = common.clip_grad_norm(policy, args.grad_clip)
    if not np.isfinite(grad_norm):  # as common.train_step: before the optimizer step, one line (one_line_errors)
        raise FloatingPointError(f"step {step + 1}: gradient norm {grad_norm}; the last good checkpoint is in "
                                 f"{args.out}/checkpoints (lower --lr, then --resume)")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {k: float(v) for k, v in sums.items()}, grad_norm


def tis_weights(old_logp, sampler_logp, mask, cap):
    """Truncated importance sampling: the sampler drew the tokens from its own π_sampler (bf16 rounding, another
    kernel), not from the π_old the loss assumes; weighting each token's policy-gradient term by
    min(π_old / π_sampler, cap) corrects the draw, the cap bounding the variance (verl, OpenRLHF, slime).
    (B, T) log-probs and mask -> (weights, 1 off the mask; the tokens whose ratio the cap cut)."""
    ratio = torch.exp(old_logp - sampler_logp)
    return torch.where(mask, ratio.clamp(max=cap), 1.0), (ratio > cap) & mask


# The loss's normalisation, --loss-norm, in two halves: each token's weight (known per output, at packing) and
# the divisor of the step's weighted sum (known only when every rank's outputs are counted):
#     sequence (the paper)   weight 1/|o_i|   divided by the outputs         mean over outputs of their token mean
#     token (DAPO)           weight 1         divided by the tokens          mean over all tokens
#     constant (Dr. GRPO)    weight 1         divided by outputs x budget    no length bias either way
# (the weights: packing.loss_weights)


def loss_normaliser(loss_norm, n_seq, n_tok, max_new_tokens):
    """What the step's weighted loss sum is divided by, from the outputs and tokens of all ranks."""
    return dict(sequence=n_seq, token=max(n_tok, 1), constant=n_seq * max_new_tokens)[loss_norm]


# -----------------------------------------------------------------------------
# From completions to training tensors


def combined_rewards(base, reward_fns, weights, comps, problems):
    """--reward-fn: the weighted sum w_0 · base + Σ_i w_i · f_i(completion, problem) per output (TRL's list of
    reward functions), and each f_i's rewards by name (logged apart: reward_fn_<name>)."""
    scores = {f"reward_fn_{name}": torch.tensor(reward.custom_rewards(fn, spec, [c.text for c in comps], problems))
              for (spec, name, fn) in reward_fns}
    total = weights[0] * base
    for w, s in zip(weights[1:], scores.values()):
        total = total + w * s
    return total, scores


def overlong_penalty(lengths, budget, buffer):
    """DAPO's soft overlong punishment (Yu et al., 2025, Eq. 13): 0 for an output of up to budget - buffer tokens,
    then falling linearly to -1 at the budget, where the engine cuts an output. lengths: (n,) -> (n,)."""
    return -((lengths.float() - (budget - buffer)).clamp(min=0) / buffer).clamp(max=1)


def groups_with_signal(rewards, group_size, keep):
    """DAPO's dynamic sampling (--oversample): of the drawn groups, the outputs of the first `keep`, those whose
    rewards disagree ahead of those that agree (padding, so that every rank trains on as many sequences)."""
    zero_std = zero_std_groups(rewards.view(-1, group_size))
    order = sorted(range(len(zero_std)), key=lambda q: bool(zero_std[q]))[:keep]
    return [q * group_size + i for q in order for i in range(group_size)]


def rule_steps(tok, comps, rewards):
    """Per output, its steps as (index of the step's last token, reward) from the toy's arithmetic checker
    (reward.process_rewards), the rule that stands in for a process reward model: each `a op b = c` line, then
    the final answer with the outcome reward at the last token (EOS too)."""
    steps = []
    for c, r in zip(comps, rewards.tolist()):
        checked = reward.process_rewards(c.text, r)  # (character where step j ends, its reward)
        ends = reward_model.token_index(tok, c.ids, [end for end, _ in checked])
        ends[-1] = len(c.ids) - 1
        steps.append([(e, x) for e, (_, x) in zip(ends, checked)])
    return steps


def token_advantages(comps, rewards, step_rewards, args):
    """Â_it for every token of every output (line 9 of Algorithm 1): from `step_rewards` (process
    supervision: per output [(index of a step's last token, reward)]), else from the outcome rewards, as
    --online-rft says. Returns (per output a (length,) tensor, number of groups whose rewards all agree)."""
    G, scale = args.group_size, args.std_scale
    if step_rewards is not None:
        return process_advantages(step_rewards, [len(c.ids) for c in comps], G, scale)
    if args.online_rft:  # the unified view (paper §5.2.1): coefficient 1 on right outputs, 0 on wrong ones
        adv, n_zero_std = (rewards > 0).float(), 0
    else:
        adv, n_zero_std = group_advantages(rewards.view(-1, G), scale)
    return [a.expand(len(c.ids)) for a, c in zip(adv.flatten(), comps)], n_zero_std


def high_entropy_only(batches, rho, d):
    """--top-entropy ρ (Wang et al., 2025, "Beyond the 80/20 rule"): keep the policy-gradient term on the ρ share
    of the step's sampled tokens, all ranks', drawn where π had the highest entropy (the forks of a reasoning
    path), by zeroing Â on the rest, whose KL term stays. The entropies are the sampler's (π_old's: at μ = 1 the
    policy's own; TRL recomputes them each update), so every update masks the same tokens. Returns the entropy
    a token needs to keep its term."""
    mine = torch.cat([b.entropy[b.mask] for b in batches]).tolist()
    everyone = np.array(common.all_gather_list(d, mine))  # numpy's quantile: torch's refuses past 16M tokens
    cut = float(np.quantile(everyone, 1 - rho)) if everyone.size else 0.0
    for b in batches:
        b.advantages = b.advantages * (b.entropy >= cut)
    return cut


# -----------------------------------------------------------------------------
# Training

def usable_problems(problems, tok, config, args, d):
    """The problems whose prompt leaves room for --max-new-tokens in the model's positions (one that does not
    teaches nothing), and the longest such prompt in tokens; enough of them for one step, or a clear exit."""
    prompt_len = [len(engine.prompt_ids(tok, p["question"], args.prompt)) for p in problems]
    fits = [n + args.max_new_tokens <= config.max_seq_len for n in prompt_len]
    room = [p for p, ok in zip(problems, fits) if ok]
    if len(room) < len(problems):
        common.print0(d, f"{args.data}: {len(problems) - len(room)} questions leave no room for "
                         f"{args.max_new_tokens} new tokens in the model's {config.max_seq_len} positions: skipped")
    if len(room) < args.questions * args.oversample:
        raise SystemExit(f"error: {args.data}: {len(room)} usable questions (the count above), fewer than one step "
                         f"draws ({args.questions * args.oversample}): give more data or a smaller --questions")
    return room, max(n for n, ok in zip(prompt_len, fits) if ok)


@dataclass
class Run:
    """What a GRPO run holds from start to end: its processes, tokenizer, questions, the models (π_θ and its
    optimizer, π_ref, a reward model, PPO's value model), the kept decoder and the user's reward functions."""
    args: argparse.Namespace
    d: common.Dist
    tok: Tokenizer
    problems: list
    held_out: list
    policy: object
    optim: common.Optim  # π_θ's optimizer settings
    opt: object
    ref: object = None  # a second copy of π_θ, frozen; None with LoRA (π_ref is the policy with its adapters off)
    reference: object = None  # what gives π_ref's log-probs: ref, the policy (LoRA), or None when β = 0
    rms: list = ()  # learned rewards (line 8 as the paper runs it): one, or an ensemble
    value: object = None  # PPO's value model V_ψ
    value_opt: object = None
    decoder: object = None  # --compile: the rollouts' decoder, with its own copy of the weights
    reward_fns: list = ()
    history: list = None  # --rm-refresh: the replay pool
    extra: dict = None  # what a checkpoint keeps beside the policy
    step: int = 0


def setup(args):
    """Everything before line 2 of Algorithm 1: the processes, the questions (held-out ones dropped from the
    training set), 1. π_θ ← π_init, 3. π_ref ← π_θ, the reward, and the run's directory (resumed if asked)."""
    d = common.init_dist(args.dtype)
    torch.manual_seed(args.seed)
    # the toy SFT model, built with the data and base model first if missing
    common.require_model(args.init, parse_args([]).init, d, lambda: sft.main(sft.parse_args([])))
    if args.questions % (d.world * args.mini_batches):
        raise SystemExit(f"error: --questions {args.questions} is not a multiple of the {d.world} ranks x "
                         f"--mini-batches {args.mini_batches}")
    try:  # the user's rewards, loaded before anything is built
        reward_fns = [(spec, spec.rpartition(":")[2], reward.load_reward_fn(spec)) for spec in args.reward_fn]
    except reward.RewardFnError as e:
        raise SystemExit(f"error: {e}") from None
    tok = Tokenizer.load(args.init)
    engine.use_chat_args(tok, args)
    problems, held_out, dropped = problem_sets.problems_and_held_out(args)
    common.print0(d, dropped)
    config = replace(config_from_hf(args.init), fp32_head=args.fp32_head)  # π_θ's, π_ref's and the sampler's
    common.size_defaults(args, config, d, **SIZE_DEFAULTS)
    problems, longest_prompt = usable_problems(problems, tok, config, args, d)
    ac = common.checkpointed_blocks(args.activation_checkpointing, d, config.n_layers, lambda k: memory.grpo_plan(
        config, d.world, args.micro_batch, args.gen_batch, longest_prompt, args.max_new_tokens, k,
        **planned_models(args))["peak"])
    policy = common.build_model(config, d, seed=args.seed, init_dir=args.init, checkpointed=ac,
                                adapters=lora.of(args), compile=args.compile)
    optim = common.Optim.of(args)
    run = Run(args, d, tok, problems, held_out, policy, optim, common.make_optimizer(policy, optim),
              reward_fns=reward_fns)
    build_helpers(run, config, ac)
    run.extra = {"ref": run.ref} if run.ref is not None and args.ref_reset else {}  # a reset π_ref is state
    if run.value is not None:
        run.extra["value"] = (run.value, run.value_opt)
    if args.rm_refresh:
        run.extra["rm"] = reward_model.trained(run.rms[0])  # as is a refreshed reward model
    resumable = ("init", "data", "questions", "oversample", "group_size", "prompt", "chat_template", "system",
                 "reward", "advantage", "seed")
    run.step = common.start_run(args, d, policy, run.opt, resumable, run.extra)
    if args.rm_refresh:
        run.history = reward_model.replay_history(reward_model_dirs(args)[0], args.out, run.step)
    if args.compile:
        with common.gathered(policy) as sampler:
            run.decoder = engine.Decoder(copy.deepcopy(sampler), compile=True)
    return run


def toy_reward_model_dir(args):
    """Where reward_model.py's defaults put the toy's --reward orm|prm model."""
    return os.path.join(reward_model.parse_args([]).out_dir, args.reward)


def reward_model_dirs(args):
    """--reward-model's directories, or the toy's."""
    return args.reward_model or [toy_reward_model_dir(args)]


def scoring_models(args):
    """How many models of the policy's size score the rollouts, for the memory plan: none under the rule; per
    --reward-model, two for the implicit outcome form (π_φ and its reference), else one."""
    if args.reward == "rule":
        return 0
    return sum(reward_model.models_in(rm_dir) for rm_dir in reward_model_dirs(args))


def planned_models(args):
    """What runs beside the policy, as memory.grpo_plan counts it: for the run itself and for --dry-run."""
    return dict(reward_model=scoring_models(args), value_model=args.advantage == "gae", kept_decoder=args.compile,
                lora_rank=args.lora_rank, rm_trained=bool(args.rm_refresh))


def build_helpers(run, config, ac):
    """The models beside π_θ, in this order (each draws from the seeded generator): π_ref, a frozen copy (none
    when β = 0; with LoRA, the policy itself with its adapters off), the reward model and PPO's value model."""
    args, d = run.args, run.d
    if args.beta > 0 and not args.lora_rank:
        run.ref = common.build_model(config, d, seed=args.seed, init_dir=args.init, compile=args.compile, frozen=True)
    run.reference = run.ref if run.ref is not None else run.policy if args.beta > 0 else None
    if args.reward != "rule":
        run.rms = [reward_model_of(rm_dir, run, ac) for rm_dir in reward_model_dirs(args)]
    if args.advantage == "gae":
        value_init = args.value_init or (reward_model_dirs(args)[0] if run.rms else args.init)
        run.value = common.build_model(replace(config_from_hf(value_init), head="score"), d, seed=args.seed,
                                       init_dir=value_init, checkpointed=ac, compile=args.compile)
        run.value_opt = common.make_optimizer(run.value, common.Optim(lr=args.value_lr or args.lr,
                                                                      max_steps=args.max_steps))


def reward_model_of(rm_dir, run, ac):
    """A reward model for line 8, frozen unless --rm-refresh trains it (then checkpointed as the policy is); the
    toy's is built first if missing."""
    args, d = run.args, run.d
    common.require_model(rm_dir, toy_reward_model_dir(args), d,
                         lambda: reward_model.main(reward_model.parse_args(["--kinds", args.reward])))
    return reward_model.load(rm_dir, d, args.seed, checkpointed=ac if args.rm_refresh else 0, compile=args.compile,
                             refreshed=bool(args.rm_refresh))


def held_out_metrics(run, n, samples, temperature):
    """evaluate.held_out_metrics of the policy, gathered, on the first n held-out problems."""
    args = run.args
    with common.gathered(run.policy) as sampler:
        return evaluate.held_out_metrics(sampler, run.tok, run.held_out[:n], run.d, prompt=args.prompt,
                                         samples=samples, temperature=temperature, max_new_tokens=args.max_new_tokens,
                                         seed=args.seed, batch=min(args.gen_batch, 64))  # --gen-batch bounds the cache


def report(run, name):
    """The before/after table's row: greedy accuracy, and at the report temperature mean@k (the mean accuracy of
    k samples: the rule's reward of the policy's own samples, on questions that stay the same), maj@k and
    pass@k; written to out/<name>.json (a resumed run reads its "before" back instead of measuring it again)."""
    args = run.args
    path = os.path.join(args.out, f"{name}.json")
    if name == "before" and args.resume and os.path.isfile(path):
        return json.load(open(path))
    row = dict(greedy=held_out_metrics(run, args.eval_problems, 1, 0.0)["accuracy"])
    if args.report_problems:
        k = args.report_samples
        m = held_out_metrics(run, args.report_problems, k, args.report_temperature)
        row.update({f"mean@{k}": m["accuracy"], f"maj@{k}": m[f"maj@{k}"], f"pass@{k}": m[f"pass@{k}"]})
    if run.d.main:
        with open(path, "w") as f:
            json.dump(row, f)
    return row


def rollout(run):
    """Lines 5-7: this rank's share of the step's questions, and G outputs for each from π_old (π_θ as it is now),
    sampled by the decoder evaluation uses, the weights gathered once (no collective per token). Returns the
    outputs and each one's problem."""
    args, d, step = run.args, run.d, run.step
    n = args.questions // d.world * args.oversample
    batch = [run.problems[i] for i in draw(len(run.problems), n * d.world, args.seed, step)]
    batch = batch[d.rank * n:(d.rank + 1) * n]
    drawn = [p for p in batch for _ in range(args.group_size)]
    with common.gathered(run.policy, into=run.decoder and run.decoder.model) as sampler:
        comps = engine.complete(run.decoder or sampler, run.tok, [p["question"] for p in drawn], args.prompt,
                                args.max_new_tokens, args.temperature, args.top_p, batch=args.gen_batch,
                                seed=engine.sampling_seed(args.seed, step, d.rank), top_k=args.top_k,
                                min_p=args.min_p, keep=args.keep_sampling_mask)
    return comps, drawn


@dataclass
class Scored:
    """Line 8's result for the outputs kept: the rule's reward, the reward trained on (the rule's, a reward
    model's, weighted with --reward-fn's), per output its steps' rewards under process supervision, each
    --reward-fn's rewards, and what was generated before dynamic sampling chose (for the log)."""
    comps: list
    drawn: list
    rule: torch.Tensor
    rewards: torch.Tensor
    step_rewards: list
    scores: dict
    generated: dict


def score(run, comps, drawn):
    """Line 8: the rule's reward (1 for a right final answer, else 0), --oversample's choice of the groups with
    signal, then a reward model's verdicts if --reward asks, the rule's steps under process supervision, and the
    user's rewards weighted in; --overlong-buffer's penalty added last, outside the weights."""
    args, G = run.args, run.args.group_size
    rule = torch.tensor(reward.batch_rewards([c.text for c in comps], [p["answer"] for p in drawn], workers=1))
    generated = dict(generated_zero_std_groups=int(zero_std_groups(rule.view(-1, G)).sum()),
                     generated_reward=rule.sum().item(), generated=len(comps),
                     generated_tokens=sum(len(c.ids) for c in comps))
    if args.oversample > 1:
        pick = groups_with_signal(rule, G, args.questions // run.d.world)
        comps, rule, drawn = [comps[i] for i in pick], rule[pick], [drawn[i] for i in pick]
    rewards, step_rewards = rule, None  # per output [(a step's last token, its reward)] under process supervision
    if run.rms:
        verdicts = []
        for rm in run.rms:
            with reward_model.scoring(rm) as scorer:
                verdicts.append(reward_model.model_rewards(scorer, run.tok, comps, args.reward, args.micro_batch,
                                                           min(args.pack, args.group_size)))
        scored = reward_model.ensemble(verdicts, args.reward, args.rm_ensemble)
        step_rewards = scored if args.reward == "prm" else None
        rewards = torch.tensor([s[-1][1] for s in scored]) if args.reward == "prm" else scored
    elif args.supervision == "process":
        step_rewards = rule_steps(run.tok, comps, rule)
    scores = {}
    if run.reward_fns:
        try:
            rewards, scores = combined_rewards(rewards, run.reward_fns, args.reward_weights, comps, drawn)
        except reward.RewardFnError as e:
            raise SystemExit(f"error: step {run.step + 1}: {e}") from None
    if args.overlong_buffer:
        scores["overlong_penalty"] = overlong_penalty(torch.tensor([len(c.ids) for c in comps]), args.max_new_tokens,
                                                      args.overlong_buffer)
        rewards = rewards + scores["overlong_penalty"]
    return Scored(comps, drawn, rule, rewards, step_rewards, scores, generated)


def prepare(run, s):
    """Line 9 and what the update holds fixed: per-token advantages; the --mini-batches, each of rows holding a
    prompt once with `--pack` of its outputs, cut into micro-batches; π_ref's log-probs for the KL, π_old's when
    the policy moves before the batch's last update (μ > 1, or mini-batches), PPO's old values and its GAE
    advantages (which need them); --top-entropy's choice of tokens. Returns (the micro-batches, each mini-batch's
    slice of them, per_token, what line 9 found for the log, fixed)."""
    args, d, vocab, G = run.args, run.d, run.tok.vocab_size, run.args.group_size
    per_token, n_zero_std = (token_advantages(s.comps, s.rewards, s.step_rewards, args) if run.value is None else
                             (ppo.outcome_at_end(s.comps, s.rewards), 0))  # PPO: the reward at each output's end
    batches, mini = [], []
    for k in range(args.mini_batches):  # question q to mini-batch q mod K: the same K sets on any number of ranks
        outs = [i for q in range(k, len(s.comps) // G, args.mini_batches) for i in range(q * G, (q + 1) * G)]
        rows = pack_rows([s.comps[i] for i in outs], [per_token[i] for i in outs], G, args.pack, args.mask_truncated,
                         args.loss_norm)
        part = micro_batches(rows, max(1, args.micro_batch // min(args.pack, G)), run.tok.pad_id, d.device)
        mini.append(slice(len(batches), len(batches) + len(part)))
        batches += part
    with lora.disabled(run.reference):  # the policy's adapters off when it is π_ref (LoRA); else a no-op
        ref_logp = fixed_logprobs(run.reference, batches, vocab, d, args) if run.reference is not None else None
    moves = args.mu * args.mini_batches > 1
    old_logp = fixed_logprobs(run.policy, batches, vocab, d, args) if moves else None
    old_values = None
    if run.value is not None:
        with torch.no_grad(), common.autocast(d):
            old_values = [b.values(run.value) for b in batches]
        ppo.advantages(batches, ref_logp, old_values, args.beta, args.gae_lambda, d)
    found = dict(zero_std_groups=n_zero_std)
    if args.top_entropy < 1:
        found["entropy_cut"] = high_entropy_only(batches, args.top_entropy, d)
    return batches, mini, per_token, found, (ref_logp, old_logp, old_values)


def train(run, batches, mini, fixed, comps):
    """Lines 10-11: μ passes over the step's mini-batches, an update of π_θ on J each (grpo_update), normalised
    over the mini-batch on all ranks, and PPO's critic on the same ones. Returns the outputs, tokens and LR, the
    first and last passes' sums (pass_sums) and the last gradient norm."""
    args, d = run.args, run.d
    checked = all(c.logprobs is not None for c in comps)  # the sampler's log-probs, to check the forward by
    if args.off_policy_mask is not None and not checked:  # engine.complete's carry them; a replacement's may not
        raise ValueError("--off-policy-mask measures how far π_θ moved from the sampler, whose log-probs these "
                         "rollouts do not carry (engine.Completion.logprobs)")
    if args.keep_sampling_mask and any(c.kept is None for c in comps):
        raise ValueError("--keep-sampling-mask renormalises π over the ids each token could have been, which these "
                         "rollouts do not carry (engine.Completion.kept)")
    ref_logp, old_logp, old_values = fixed
    outputs = [common.all_sum(d, sum(b.outputs for b in batches[m])) for m in mini]  # each mini-batch's, all ranks
    tokens = [common.all_sum(d, sum(int(b.mask.sum()) for b in batches[m])) for m in mini]
    normalisers = [loss_normaliser(args.loss_norm, n_seq, n_tok, args.max_new_tokens)
                   for n_seq, n_tok in zip(outputs, tokens)]
    lr = common.set_lr(run.opt, run.step, run.optim)
    beta = 0.0 if run.value is not None else args.beta  # PPO has the KL in its reward instead
    tis = (args.tis if args.tis is not None else 2.0 if d.dtype == torch.bfloat16
           else 0.0) if checked else 0.0
    passes = []
    for _ in range(args.mu):
        updates, value_loss = [], 0.0
        for m, normaliser, n_tok in zip(mini, normalisers, tokens):
            old, ref = (None if x is None else x[m] for x in (old_logp, ref_logp))
            updates.append(grpo_update(run.policy, run.opt, batches[m], old, ref, normaliser, beta, tis,
                                       run.tok.vocab_size, run.step, args, d))
            if run.value is not None:
                value_loss += ppo.update_value(run.value, run.value_opt, batches[m], old_values[m], n_tok, d, args)
        passes.append(grpo_log.pass_sums([u for u, _ in updates]))
    return dict(n_seq=sum(outputs), n_tok=sum(tokens), lr=lr, checked=checked, tis=tis, first=passes[0],
                last=passes[-1], grad_norm=updates[-1][1], value_loss=value_loss)


def end_iteration(run):
    """Line 12, then 3: iterative GRPO refreshes the reward model every --rm-refresh steps and begins a new
    iteration with π_ref ← π_θ every --ref-reset steps (the paper does both at once; apart, the refreshed model can
    follow the policy while the reference still holds it near the start). After the last step too: a run
    continued with --resume and more --max-steps goes on as if it had never stopped. Returns the refresh's
    metrics, if any."""
    args, refreshed = run.args, {}
    if args.rm_refresh and run.step % args.rm_refresh == 0:
        refreshed = reward_model.refresh_reward_model(run.rms[0], run.policy, run.tok, run.problems, run.history,
                                                      run.step, args, run.d)
    if args.ref_reset and run.step % args.ref_reset == 0 and run.ref is not None:
        reset_reference(run.ref, run.policy, args.ref_mixup)
    return refreshed


@torch.no_grad()
def reset_reference(ref, policy, alpha):
    """Line 3, π_ref ← π_θ; at alpha < 1 a share of the way, π_ref ← alpha π_θ + (1 - alpha) π_ref, in fp32 and
    rounded once to π_ref's dtype (bf16 on GPU). Parameter by parameter, so a tied head moves once; under FSDP2
    each rank its own shards."""
    for r, p in zip(ref.parameters(), policy.parameters(), strict=True):
        r.copy_(torch.lerp(r.float(), p.float(), alpha))


def step_row(run, s, batches, found, t, times):
    """The step's line of metrics.jsonl, summed over ranks (step_metrics); found: prepare's."""
    args, d = run.args, run.d
    trained = sum(b.positions_run for b in batches)  # token positions the forwards ran, padding included
    last, first = t["last"], t["first"]
    sums = dict(reward=s.rewards.sum().item(), reward_sq=(s.rewards ** 2).sum().item(),
                rule_reward=s.rule.sum().item(), loss=last["loss"], kl=last["kl"], neg_logp=last["neg_logp"],
                clipped=last["clipped"], train_tokens=trained * args.mu,
                sequence_tokens=sum(b.tokens for b in batches), trained_tokens=trained,
                zero_std_groups=found["zero_std_groups"],
                truncated=sum(not c.finished for c in s.comps), tokens=sum(len(c.ids) for c in s.comps),
                tool_calls=sum(not all(c.sampled) for c in s.comps), time_generate=times["generate"],
                time_reward=times["reward"], **s.generated, **{k: v.sum().item() for k, v in s.scores.items()},
                **(grpo_log.kept_sums(batches) if args.keep_sampling_mask else {}))
    if t["checked"]:  # the sampler's gap to π_old and TIS: from the first pass
        sums.update(logprob_gap=first["logprob_gap"], logprob_gap_max=common.all_max(d, first["gap_max"]))
    if t["tis"]:
        sums.update(tis_weight=first["tis_weight"], tis_cut=first["tis_cut"])
    if args.off_policy_mask is not None:
        sums.update(dropped=last["dropped"])
    row = grpo_log.step_metrics(d, run.step, t["lr"], t["n_seq"], t["n_tok"], args,
                                dict(sums, grad_norm=t["grad_norm"]), times)
    if run.value is not None:
        row["value_loss"] = common.all_sum(d, t["value_loss"]) / max(t["n_tok"], 1)
    if "entropy_cut" in found:  # one quantile of all ranks' tokens
        row["entropy_cut"] = found["entropy_cut"]
    if run.held_out and args.eval_every and run.step % args.eval_every == 0 and run.step < args.max_steps:
        row["eval_greedy_accuracy"] = held_out_metrics(run, args.eval_problems, 1, 0.0)["accuracy"]
    return row


def keep(run, s, per_token, refreshed, stop):
    """After a step's log line: completions.jsonl, a mid-run export (--export-every), the checkpoint (every
    --ckpt-every steps, at the end, after a reward model's refresh, and on a stop signal, which then ends the run
    with status 130)."""
    args, d, step = run.args, run.d, run.step
    if d.main and args.log_completions and step % args.log_completions == 0:
        data.append_jsonl(os.path.join(args.out, "completions.jsonl"), grpo_log.completion_rows(
            step, s.drawn, s.comps, dict(rule_reward=s.rule, reward=s.rewards, **s.scores),
            None if run.value is not None else per_token, args.group_size))
    if args.export_every and step % args.export_every == 0 and step < args.max_steps:
        common.export_hf(run.policy, os.path.join(args.out, f"step-{step}"), args.init, d)
    common.save_or_stop(stop, args.out, run.policy, run.opt, step, d,
                        step % args.ckpt_every == 0 or step == args.max_steps or bool(refreshed), run.extra)


def dry_run(args):
    config = ModelConfig(**PRESETS[args.preset]) if args.preset else config_from_hf(args.init)
    common.size_defaults(args, config, common.Dist(0, 1, torch.device("cpu")), **SIZE_DEFAULTS)
    memory.print_grpo_plan(config, args.world_size, args.micro_batch, args.gen_batch, args.prompt_tokens,
                           args.max_new_tokens, **planned_models(args))


def main(args):
    """Algorithm 1, with its line numbers."""
    if args.dry_run:
        return dry_run(args)
    run = setup(args)  # 1. π_θ ← π_init; 3. π_ref ← π_θ; the questions, the reward
    d = run.d
    log = common.Log(args.out, d, args.max_steps, run.step, every=1, args=args)
    before = report(run, "before") if run.held_out else None
    if before and run.step == 0:
        log(dict(step=0, eval_greedy_accuracy=before["greedy"]))
    with common.StopFlag() as stop:  # the signal handlers are the run's only while it runs
        while run.step < args.max_steps:  # 2, 4: iterations and their steps, one loop (--ref-reset marks them)
            t0 = time.time()
            comps, drawn = rollout(run)  # 5-7. a batch of questions; G outputs each from π_old
            t1 = time.time()
            s = score(run, comps, drawn)  # 8. rewards
            t2 = time.time()
            batches, mini, per_token, found, fixed = prepare(run, s)  # 9. advantages; what the update holds fixed
            t3 = time.time()
            update = train(run, batches, mini, fixed, s.comps)  # 10-11. μ passes of updates of π_θ on J
            run.step += 1
            t4 = time.time()
            refreshed = end_iteration(run)  # 12, then 3
            row = step_row(run, s, batches, found, update, dict(generate=t1 - t0, reward=t2 - t1,
                                                                ref=t3 - t2, train=t4 - t3, step=t4 - t0))
            log({**row, **refreshed})
            keep(run, s, per_token, refreshed, stop)
    if run.held_out:
        after = report(run, "after")
        log(dict(step=run.step, eval_greedy_accuracy=after["greedy"]))
    log.close()
    common.export_hf(run.policy, args.out, args.init, d, adapter_of=args.init if args.export_adapter else None)
    if run.held_out:
        evaluate.print_table(before, after, args, d)
        if d.main:
            evaluate.plot_curves(os.path.join(args.out, "metrics.jsonl"), os.path.join(args.out, "curves.png"))
    common.print0(d, f"saved {args.out}")
    common.finish(d)


if __name__ == "__main__":
    with common.one_line_errors():
        main(parse_args())
