"""PPO, the method GRPO replaces (paper Eq. 1-2; docs/paper.md §5): what `grpo.py --advantage gae` does instead
of line 9 of Algorithm 1.

PPO's advantage of each token comes from a learned value model V_ψ, as large as the policy, rather than from the
other outputs of its question:

    r_t = r_φ(q, o) · [t is the last token] − β log(π_old(o_t) / π_ref(o_t))      (the KL is in the reward)
    A_t = Σ_l (γλ)^l δ_{t+l},  δ_t = r_t + γ V(s_{t+1}) − V(s_t)                    (GAE; γ = 1, λ = 0.95)

and V_ψ learns the returns R_t = A_t + V(s_t) with a clipped squared error. Everything else, the rollouts, rows,
kernels, the clipped policy loss and the grader, is grpo.py's. The paper gives neither λ, γ, the value loss's
clipping nor the value model's start: ours are stated here and in grpo.py's flags. GRPO's saving is this file's
second model: its weights, gradients and optimizer state, and a forward and backward per step.
"""

import math

import torch

import common



def gae(rewards, values, lam):
    """Generalised advantage estimation over one output's tokens, with γ = 1 (an episode is one output, as the
    paper's Eq. 2 sums it): A_t = Σ_l λ^l δ_{t+l} with δ_t = r_t + V_{t+1} − V_t and V = 0 after the last token
    (the output ends there). rewards, values: lists of floats. Returns (advantages, returns R_t = A_t + V_t)."""
    adv, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        after = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + after - values[t] + lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values)]


def outcome_at_end(comps, rewards):
    """Per output a (length,) tensor: its reward on the last token the model wrote, 0 elsewhere: PPO's r_φ,
    given at the end of the episode (paper Eq. 2); the KL penalty joins it per token in `advantages`."""
    out = []
    for c, r in zip(comps, rewards.tolist()):
        a = torch.zeros(len(c.ids))
        a[max(i for i, s in enumerate(c.sampled) if s)] = r
        out.append(a)
    return out


def advantages(batches, ref_logp, values, beta, lam, d):
    """PPO's advantages: per token the reward r_t = r_φ·[t is the last] − β log(π_old/π_ref) (paper Eq. 2: the
    KL is a penalty in the reward, not a term of the loss), then GAE with γ = 1 over the tokens each output's
    model wrote (the sandbox's are skipped) against the value model's V_t, then whitened over every token of
    the step on all ranks (all 0 where they agree to 1e-6: no signal). Overwrites b.advantages (which held r_φ at
    the last token, from outcome_at_end) and sets b.returns, the value model's targets."""
    total = sq = 0.0
    for b, ref, v in zip(batches, ref_logp, values):
        r = (b.advantages - beta * (b.sampler_logp - ref)) * b.mask  # (b, T)
        adv, b.returns = torch.zeros_like(r), v.clone()
        for i in range(len(r)):
            for k in b.segment[i].unique().tolist():
                idx = ((b.segment[i] == k) & b.mask[i]).nonzero()[:, 0]
                if k < 1 or not len(idx):
                    continue
                a, ret = gae(r[i, idx].tolist(), v[i, idx].tolist(), lam)
                adv[i, idx], b.returns[i, idx] = torch.tensor(a), torch.tensor(ret)
        b.advantages = adv
        total, sq = total + adv[b.mask].sum().item(), sq + (adv[b.mask] ** 2).sum().item()
    n = common.all_sum(d, sum(int(b.mask.sum()) for b in batches))
    mean = common.all_sum(d, total) / max(n, 1)
    std = max(common.all_sum(d, sq) / max(n, 1) - mean ** 2, 0.0) ** 0.5
    for b in batches:  # advantages that agree to 1e-6 carry no signal (every reward equal, the values where they
        # started): whitening would scale their float noise to unit size, and AdamW that into full steps; 0, as
        # GRPO gives a group whose rewards agree
        b.advantages = (b.advantages - mean) / (std + 1e-8) * b.mask if std >= 1e-6 else torch.zeros_like(b.advantages)


def value_loss_sum(v, old_v, returns, mask, clip):
    """PPO's clipped value loss, summed over the masked tokens: ½ max((V − R)², (V_old + clip(V − V_old, ±c) −
    R)²), so that one update moves a value at most c from where the rollout found it."""
    clipped = old_v + (v - old_v).clamp(-clip, clip)
    return (0.5 * torch.maximum((v - returns) ** 2, (clipped - returns) ** 2) * mask).sum()


def update_value(value, opt, batches, old_values, n_tok, d, args):
    """One step of the value model on the step's batches: the clipped value loss as a mean over the n_tok tokens
    the model wrote (on all ranks), backward, clip, AdamW. Returns this rank's summed loss."""
    total = 0.0  # a tensor after the first micro-batch: read back once, after the last (no sync per micro-batch)
    for b, old in zip(batches, old_values):
        with common.autocast(d):
            v = b.values(value)
        loss = value_loss_sum(v, old, b.returns, b.mask, args.value_clip)
        (loss * d.world / max(n_tok, 1)).backward()  # FSDP averages gradients over ranks: undo it
        total = total + loss.detach()
    norm = common.clip_grad_norm(value, args.grad_clip)
    if not math.isfinite(norm):  # as the policy's: before the optimizer step, one line (common.one_line_errors)
        raise FloatingPointError(f"value model: gradient norm {norm}; the last good checkpoint is in {args.out}"
                                 "/checkpoints (lower --value-lr, then --resume)")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(total)
