"""Group Relative Policy Optimization, as DeepSeekMath writes it (paper §4; docs/paper.md §5).

For each question q, sample G outputs o_1..o_G from the old policy and maximise

    J = mean_q (1/G) sum_i (1/|o_i|) sum_t [ min(r_it A_it, clip(r_it, 1-eps, 1+eps) A_it) - beta KL_it ]

with r_it = pi(o_it | q, o_i<t) / pi_old(...), and the k3 estimate KL_it = pi_ref/pi - log(pi_ref/pi) - 1 in the
loss (not in the reward). Advantages, two ways (paper §4.1.2-4.1.3):
- outcome supervision: A_it = (r_i - mean(r)) / std(r) over the group, the same for every token of o_i;
- process supervision (--supervision process): every step j of o_i gets a reward, normalised over all steps
  of the group, and A_it is the sum of the normalised rewards of the steps that end at or after token t. On the
  toy a rule-based checker (reward.process_rewards) stands in for the paper's process reward model.
One step: rollout -> reward -> advantages -> loss -> backward -> AdamW step, in `main` below.

Choices the paper leaves open, made here: eps = 0.2 (PPO's), std with Bessel's correction (as TRL), a group
whose rewards are all equal gets zero advantage (counted in zero_std_groups), rollouts at temperature 1, a
constant LR.
Options, one flag each: --loss-norm token (DAPO) or constant (Dr. GRPO), --no-std-scale (Dr. GRPO), --clip-high
(DAPO's asymmetric clip), --beta 0 (no KL), --mask-truncated (DAPO), --ref-reset K (iterative GRPO, Algorithm 1:
the reference becomes the current policy every K steps), --oversample K (DAPO's dynamic sampling: groups whose
rewards all agree are replaced by ones that carry signal), --online-rft (the paper's §5.2.1 baseline), --prompt
tool (tool-integrated rollouts: the sandbox runs the model's programs, and their output joins the context with
no loss on it).

    python grpo.py                                    # the toy: builds data, base and SFT models first if missing
    torchrun --nproc_per_node 8 grpo.py --init <hf dir> --data problems.jsonl --questions 16 --group-size 64 \\
        --lr 1e-6 --max-new-tokens 1024 --micro-batch 4 --gen-batch 32 --max-steps 9000 --activation-checkpointing
"""

import argparse
import json
import os
import time

import numpy as np
import torch

import data
import evaluate
import pretrain
import reward
import sft
from kernels import grpo_token_loss, token_logprobs
from model import config_from_hf
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# The pieces, named as in the paper


def flat_groups(rewards):
    """(questions, G) rewards -> (questions,) bool: the groups whose rewards all agree, which carry no signal."""
    return rewards.std(1) < 1e-6 if rewards.shape[1] > 1 else torch.ones(len(rewards), dtype=torch.bool)


def group_advantages(rewards, scale_std=True):
    """Outcome supervision (paper §4.1.2): A_i = (r_i - mean(r)) / std(r) within each group, the same for every
    token of o_i. rewards: (questions, G). A group whose rewards are all equal gets advantages 0 (not 0/0).
    Returns (advantages, number of such groups)."""
    flat = flat_groups(rewards)[:, None]
    adv = rewards - rewards.mean(1, keepdim=True)
    if scale_std:
        adv = adv / rewards.std(1, keepdim=True).clamp(min=1e-6) if rewards.shape[1] > 1 else adv
    return torch.where(flat, 0.0, adv), int(flat.sum())


def process_advantages(steps, lengths, group_size, scale_std=True):
    """Process supervision (paper §4.1.3): steps[i] lists (index of the token that ends step j, reward r_ij) of
    output i; each reward is normalised by the mean and std of all step rewards of its group, and token t of o_i
    gets A_it = sum of the normalised rewards of the steps ending at or after t. Returns (per output a (length,)
    tensor of advantages, number of groups whose step rewards are all equal: zero advantage)."""
    out, flat = [], 0
    for g in range(0, len(steps), group_size):
        r = torch.tensor([x for s in steps[g:g + group_size] for _, x in s])
        std = r.std() if len(r) > 1 else torch.tensor(0.0)
        is_flat = bool(std < 1e-6)
        flat += is_flat
        for s, n in zip(steps[g:g + group_size], lengths[g:g + group_size]):
            a = torch.zeros(n)
            for end, x in ([] if is_flat else s):
                a[:end + 1] += (x - r.mean()) / (std if scale_std else 1.0)
            out.append(a)
    return out, flat


def grpo_objective_sums(logp, old_logp, ref_logp, adv, mask, args):
    """Per-token GRPO loss (kernels.grpo_token_loss) summed the way --loss-norm says, *before* the division
    by the global normaliser (so micro-batches and ranks add up exactly):
      sequence (paper): sum_i (1/|o_i|) sum_t loss_it        then / number of sequences
      token (DAPO):     sum_i sum_t loss_it                   then / number of completion tokens
      constant (Dr. GRPO): sum_i sum_t loss_it                then / (sequences x max new tokens)
    Shapes: logp, old_logp, ref_logp, mask (B, T); adv (B, T), or (B,) for one advantage per output.
    Returns (loss sum, kl sum over tokens, clipped token count)."""
    adv = adv if adv.dim() == 2 else adv[:, None].expand_as(logp)
    high = args.clip_high or args.clip_eps
    loss, kl = grpo_token_loss(logp, old_logp, ref_logp, adv, clip_eps=(args.clip_eps, high), beta=args.beta)
    m = mask.float()
    if args.loss_norm == "sequence":
        total = ((loss * m).sum(1) / m.sum(1).clamp(min=1)).sum()
    else:
        total = (loss * m).sum()
    r = torch.exp(logp - old_logp).detach()
    clipped = ((r < 1 - args.clip_eps) | (r > 1 + high)) & mask
    return total, (kl.detach() * m).sum(), int(clipped.sum())


def sequence_logprobs(model, tokens):
    """log pi(token_t | tokens_<t) for every position (B, T-1) of right-padded sequences."""
    return token_logprobs(model(tokens[:, :-1]), tokens[:, 1:])


@torch.no_grad()
def frozen_logprobs(model, tokens, micro_batch):
    """sequence_logprobs without a graph, a micro-batch at a time (pi_old, pi_ref)."""
    return torch.cat([sequence_logprobs(model, tokens[i:i + micro_batch]) for i in range(0, len(tokens), micro_batch)])


# -----------------------------------------------------------------------------
# Rollouts


def token_index(tok, ids, char_offsets, text_len):
    """For each character offset into decode(ids), the index of the token that holds that character."""
    ends = np.cumsum([len(tok.id_to_bytes[i]) for i in ids])  # byte offset where each token ends
    text = tok.decode(ids)[:text_len]
    return [min(int(np.searchsorted(ends, len(text[:c].encode()))), len(ids) - 1) for c in char_offsets]


@torch.no_grad()
def rollout(model, tok, problems, args, generator, keep=None):
    """G completions per problem from the current policy (evaluate.complete: the same prompts and tools as
    evaluation). Returns tokens (B, T) right-padded prompt+completion, mask (B, T-1) over the predicted positions
    that carry loss (the model's own tokens, not the sandbox's), advantages (B, T-1), rewards (n, G), and stats.
    With `keep` < len(problems), only `keep` groups go on: those whose rewards disagree first (DAPO's dynamic
    sampling), then others, so every rank trains on the same number of sequences."""
    G = args.group_size
    questions = [p["question"] for p in problems for _ in range(G)]
    golds = [p["answer"] for p in problems for _ in range(G)]
    t0 = time.time()
    with pretrain.gathered(model):  # FSDP: full weights for the whole rollout, no collective per token
        model.eval()
        comps = evaluate.complete(model, tok, questions, args.prompt, args.max_new_tokens, args.temperature,
                                  args.top_p, generator, batch=args.gen_batch)
        model.train()
    t1 = time.time()
    texts = [c.text for c in comps]
    rewards = torch.tensor(reward.batch_rewards(texts, golds, workers=1), dtype=torch.float32)
    agree = flat_groups(rewards.view(-1, G))
    generated = dict(generated_zero_std_groups=int(agree.sum()), generated_reward=rewards.sum().item(),
                     generated=len(comps), generated_tokens=sum(len(c.ids) for c in comps))
    if keep is not None and keep < len(problems):
        order = sorted(range(len(problems)), key=lambda q: bool(agree[q]))[:keep]
        pick = [q * G + i for q in order for i in range(G)]
        comps, texts, rewards = [comps[i] for i in pick], [texts[i] for i in pick], rewards[pick]
    if args.supervision == "process":
        steps = [[(i, r) for i, (_, r) in zip(token_index(tok, c.ids, [e for e, _ in s], len(c.text)), s)]
                 for c, s in zip(comps, map(reward.process_rewards, texts, rewards.tolist()))]
        per_token, flat = process_advantages(steps, [len(c.ids) for c in comps], G, not args.no_std_scale)
    else:
        if args.online_rft:  # the unified view (paper §5.2.1): gradient coefficient 1 on right outputs, 0 on wrong
            adv, flat = (rewards > 0).float(), 0
        else:
            adv, flat = group_advantages(rewards.view(-1, G), not args.no_std_scale)
        per_token = [a.expand(len(c.ids)) for a, c in zip(adv.flatten(), comps)]
    T = max(len(c.prompt) + len(c.ids) for c in comps)
    tokens = torch.full((len(comps), T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(comps), T - 1, dtype=torch.bool)
    advantages = torch.zeros(len(comps), T - 1)
    for i, c in enumerate(comps):
        P, n = len(c.prompt), len(c.ids)
        tokens[i, :P + n] = torch.tensor(c.prompt + c.ids)
        live = c.finished or not args.mask_truncated  # a cut-off completion may teach nothing (DAPO)
        mask[i, P - 1:P - 1 + n] = torch.tensor(c.sampled) & live
        advantages[i, P - 1:P - 1 + n] = per_token[i]
    stats = dict(zero_std_groups=flat, truncated=sum(not c.finished for c in comps), **generated,
                 tokens=sum(len(c.ids) for c in comps), tool_calls=sum(not all(c.sampled) for c in comps),
                 time_generate=t1 - t0, time_reward=time.time() - t1)
    return tokens, mask, advantages, rewards, stats


# -----------------------------------------------------------------------------
# Curves


def plot_curves(metrics_path, png):
    """reward, held-out accuracy, KL and length against the step, from metrics.jsonl."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no curves.png (pip install matplotlib)")
        return
    rows = [json.loads(line) for line in open(metrics_path)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, key, title in zip(axes, ("reward", "eval_greedy_accuracy", "kl", "length"),
                              ("train reward (mean)", "held-out greedy accuracy", "KL to reference (k3)",
                               "completion length (tokens)")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts and key.startswith("eval"):
            ax.plot(*zip(*pts), marker="o", markersize=3)
        elif pts:  # per-step values are noisy (each step asks other questions): raw, and a running mean of 5
            steps, values = zip(*pts)
            ax.plot(steps, values, alpha=0.35)
            ax.plot(steps, [np.mean(values[max(0, i - 4):i + 1]) for i in range(len(values))])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Training


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", default="out/toy/sft", help="the policy to start from (a Hugging Face directory)")
    ap.add_argument("--data", default="out/toy/data/problems/rl.jsonl", help="questions with answers")
    ap.add_argument("--eval-data", default="out/toy/data/problems/test.jsonl", help="held-out problems")
    ap.add_argument("--skip-bad", action="store_true", help="skip and count malformed problem lines")
    ap.add_argument("--out", default="out/toy/grpo")
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--questions", type=int, default=16, help="questions per step, all ranks")
    ap.add_argument("--oversample", type=int, default=1, help="draw K x --questions, train on the --questions whose "
                    "rewards disagree (DAPO's dynamic sampling; 1: the paper)")
    ap.add_argument("--group-size", type=int, default=8, help="G, outputs per question (paper: 64)")
    ap.add_argument("--prompt", default="cot", choices=["cot", "tool"], help="rollout format (evaluate.py)")
    ap.add_argument("--supervision", default="outcome", choices=["outcome", "process"], help="paper §4.1.2 / §4.1.3")
    ap.add_argument("--online-rft", action="store_true", help="advantage 1 for right, 0 for wrong outputs: online "
                    "rejection-sampling fine-tuning, GRPO's baseline in paper §5.2.1 (use with --beta 0)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="completion budget (paper: 1024)")
    ap.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (paper: not given)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4, help="policy LR (paper: 1e-6 at 7B)")
    ap.add_argument("--beta", type=float, default=0.04, help="KL weight (paper: 0.04); 0 turns the KL off")
    ap.add_argument("--clip-eps", type=float, default=0.2, help="eps, the lower clip (paper: not given; PPO's 0.2)")
    ap.add_argument("--clip-high", type=float, default=None, help="upper clip if asymmetric (DAPO: 0.28)")
    ap.add_argument("--loss-norm", default="sequence", choices=["sequence", "token", "constant"])
    ap.add_argument("--no-std-scale", action="store_true", help="advantage r - mean(r) (Dr. GRPO)")
    ap.add_argument("--mask-truncated", action="store_true", help="no loss on completions cut at the budget")
    ap.add_argument("--mu", type=int, default=1, help="policy updates per rollout batch (paper: 1)")
    ap.add_argument("--micro-batch", type=int, default=32, help="sequences per forward/backward per rank")
    ap.add_argument("--gen-batch", type=int, default=128, help="sequences per generate call per rank")
    ap.add_argument("--ref-reset", type=int, default=0, help="iterative GRPO: reset the reference every K steps")
    ap.add_argument("--eval-every", type=int, default=10, help="held-out greedy accuracy every N steps (0: never)")
    ap.add_argument("--eval-problems", type=int, default=200, help="held-out problems for greedy accuracy")
    ap.add_argument("--report-problems", type=int, default=100, help="held-out problems for the before/after "
                    "table's maj@k and pass@k (0: no table)")
    ap.add_argument("--report-samples", type=int, default=8, help="k of the table's maj@k and pass@k")
    ap.add_argument("--report-temperature", type=float, default=0.7)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--schedule", default="constant", choices=["constant", "cosine", "multistep"],
                    help="LR after --warmup (paper: not given); as pretrain.py's")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype on GPU")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--ckpt-every", type=int, default=20, help="checkpoint every N steps (and on SIGTERM)")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(args):
    d = pretrain.init_dist()
    torch.manual_seed(args.seed)
    # the toy SFT model, built with the data and base model first if missing
    pretrain.require_model(args.init, parse_args([]).init, d, lambda: sft.main(sft.parse_args([])))
    if args.questions % d.world:
        raise SystemExit(f"--questions {args.questions} is not a multiple of the {d.world} ranks")
    tok = Tokenizer.load(args.init)
    problems = data.load_problems(args.data, skip_bad=args.skip_bad)
    held_out = data.load_problems(args.eval_data, skip_bad=args.skip_bad) if os.path.isfile(args.eval_data) else []
    problems, leaked = data.drop_test_questions(problems, held_out)
    pretrain.print0(d, f"{args.data}: {len(leaked)} questions that contain a held-out one, dropped")
    config = config_from_hf(args.init)
    policy = pretrain.build_model(config, d, args, init_dir=args.init)
    ref = pretrain.build_model(config, d, args, init_dir=args.init) if args.beta > 0 else None
    if ref is not None:
        ref.requires_grad_(False)
    opt = pretrain.make_optimizer(policy, args)
    extra = {"ref": ref} if ref is not None and args.ref_reset else None  # a reset reference is state to keep
    step = pretrain.start_run(args, d, policy, opt,
                              ("init", "data", "questions", "oversample", "group_size", "prompt", "seed"), extra)

    def held_out_metrics(n, samples, temperature):  # on the first n held-out problems, the policy unsharded
        with pretrain.gathered(policy):
            return sft.held_out_metrics(policy, tok, held_out[:n], d, prompt=args.prompt, samples=samples,
                                        temperature=temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)

    def report(name):  # greedy accuracy, and maj@k / pass@k at the report temperature: the before/after table
        row = dict(greedy=held_out_metrics(args.eval_problems, 1, 0.0)["accuracy"])
        if args.report_problems:
            k = args.report_samples
            m = held_out_metrics(args.report_problems, k, args.report_temperature)
            row.update({f"maj@{k}": m[f"maj@{k}"], f"pass@{k}": m[f"pass@{k}"]})
        if d.main:
            with open(os.path.join(args.out, f"{name}.json"), "w") as f:
                json.dump(row, f)
        return row

    log, stop = pretrain.Log(args.out, d, args.max_steps, step, every=1), pretrain.StopFlag()
    before = None
    if held_out:
        path = os.path.join(args.out, "before.json")
        before = json.load(open(path)) if args.resume and os.path.isfile(path) else report("before")
        if step == 0:
            log(dict(step=0, eval_greedy_accuracy=before["greedy"]))
    per_rank = args.questions // d.world
    gen = torch.Generator(device=d.device)
    while step < args.max_steps:
        t0 = time.time()
        # 1. rollout: this rank's questions, G outputs each, from the current (= old) policy
        rng = np.random.default_rng([args.seed, step])
        drawn = per_rank * args.oversample
        batch = [problems[i] for i in rng.choice(len(problems), drawn * d.world, replace=False)]
        batch = batch[d.rank * drawn:(d.rank + 1) * drawn]
        gen.manual_seed(args.seed * 1_000_003 + step * 1009 + d.rank)  # a function of the step: resume is exact
        tokens, mask, adv, rewards, stats = rollout(policy, tok, batch, args, gen, keep=per_rank)
        # 2. frozen log-probs: pi_ref for the KL; pi_old only if the batch is reused (mu > 1), else pi_old = pi
        t1 = time.time()
        tokens = tokens.to(d.device)
        ref_lp = frozen_logprobs(ref, tokens, args.micro_batch) if ref is not None else None
        old_lp = frozen_logprobs(policy, tokens, args.micro_batch) if args.mu > 1 else None
        t2 = time.time()
        # 3. mu policy updates on this rollout batch, the loss normalised over all ranks
        n_seq = pretrain.all_sum(d, len(tokens))
        n_tok = pretrain.all_sum(d, int(mask.sum()))
        norm = {"sequence": n_seq, "token": max(n_tok, 1), "constant": n_seq * args.max_new_tokens}[args.loss_norm]
        lr = pretrain.set_lr(opt, step, args)
        for _ in range(args.mu):
            loss_sum = kl_sum = clip_n = neg_logp = 0.0
            for i in range(0, len(tokens), args.micro_batch):
                s = slice(i, i + args.micro_batch)
                with torch.autocast(d.device.type, dtype=torch.bfloat16,
                                    enabled=d.device.type == "cuda" and args.dtype == "bfloat16"):
                    lp = sequence_logprobs(policy, tokens[s])
                old = old_lp[s] if old_lp is not None else lp.detach()  # mu = 1: pi_old is pi, ratio 1 (paper)
                rf = ref_lp[s] if ref_lp is not None else lp.detach()
                total, kl, clipped = grpo_objective_sums(lp, old, rf, adv[s].to(d.device), mask[s].to(d.device), args)
                (total * d.world / norm).backward()  # FSDP averages gradients over ranks: undo it, norm is global
                loss_sum, kl_sum, clip_n = loss_sum + total.item(), kl_sum + kl.item(), clip_n + clipped
                neg_logp -= (lp.detach() * mask[s].to(d.device)).sum().item()
            grad_norm = pretrain.clip_grad_norm(policy, args.grad_clip)
            if not np.isfinite(grad_norm):
                raise SystemExit(f"step {step + 1}: gradient norm {grad_norm}; the last good checkpoint is in "
                                 f"{args.out}/checkpoints (lower --lr, then --resume)")
            opt.step()
            opt.zero_grad(set_to_none=True)
        step += 1
        if args.ref_reset and step % args.ref_reset == 0 and ref is not None:  # iterative GRPO (Algorithm 1)
            ref.load_state_dict(policy.state_dict())
        t3 = time.time()
        sums = {k: pretrain.all_sum(d, v) for k, v in dict(
            reward=rewards.sum().item(), reward_sq=(rewards ** 2).sum().item(), loss=loss_sum, kl=kl_sum,
            neg_logp=neg_logp, clipped=clip_n, train_tokens=tokens.numel() * args.mu, **stats).items()}
        mean = sums["reward"] / n_seq
        selection = dict(generated_zero_std_groups=sums["generated_zero_std_groups"],  # before dynamic sampling
                         generated_reward=sums["generated_reward"] / sums["generated"]) if args.oversample > 1 else {}
        row = dict(step=step, lr=lr, reward=mean, reward_std=max(sums["reward_sq"] / n_seq - mean ** 2, 0.0) ** 0.5,
                   loss=sums["loss"] / norm, kl=sums["kl"] / max(n_tok, 1), clip_frac=sums["clipped"] / max(n_tok, 1),
                   entropy=sums["neg_logp"] / max(n_tok, 1),  # -log pi of the sampled tokens: an estimate at T = 1
                   grad_norm=grad_norm, length=sums["tokens"] / n_seq, zero_std_groups=sums["zero_std_groups"],
                   **selection,
                   truncated=sums["truncated"], tool_calls=sums["tool_calls"],
                   rollout_tokens_per_s=sums["generated_tokens"] * d.world / sums["time_generate"],
                   train_tokens_per_s=sums["train_tokens"] / (t3 - t2),
                   time_generate=sums["time_generate"] / d.world, time_reward=sums["time_reward"] / d.world,
                   time_ref=t2 - t1, time_train=t3 - t2, seconds=t3 - t0)
        if held_out and args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            row["eval_greedy_accuracy"] = held_out_metrics(args.eval_problems, 1, 0.0)["accuracy"]
        log(row)
        stopping = stop(d)
        if stopping or step % args.ckpt_every == 0 or step == args.max_steps:
            pretrain.save_checkpoint(args.out, policy, opt, step, d, extra)
        if stopping:
            pretrain.print0(d, f"stopped by signal at step {step}; continue with --resume")
            raise SystemExit(130)
    if held_out:
        after = report("after")
        log(dict(step=step, eval_greedy_accuracy=after["greedy"]))
    log.close()
    pretrain.export_hf(policy, args.out, args.init, d)
    if held_out:
        pretrain.print0(d, f"\nheld-out ({args.eval_problems} problems greedy; {args.report_problems} sampled "
                           f"{args.report_samples}x at T={args.report_temperature}):")
        pretrain.print0(d, f"  {'':8s}" + "".join(f"{k:>10s}" for k in before))
        for name, r in (("before", before), ("after", after)):
            pretrain.print0(d, f"  {name:8s}" + "".join(f"{100 * v:9.1f}%" for v in r.values()))
        if d.main:
            plot_curves(os.path.join(args.out, "metrics.jsonl"), os.path.join(args.out, "curves.png"))
    pretrain.print0(d, f"saved {args.out}")
    if d.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    with pretrain.one_line_errors():
        main(parse_args())
