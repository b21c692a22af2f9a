"""Group Relative Policy Optimization, as DeepSeekMath writes it (paper §4; ../shared/PAPER.md §5).

For each question q, sample G outputs o_1..o_G from the old policy and maximise

    J = mean_q (1/G) sum_i (1/|o_i|) sum_t [ min(r_it A_it, clip(r_it, 1-eps, 1+eps) A_it) - beta KL_it ]

with r_it = pi(o_it | q, o_i<t) / pi_old(...), outcome advantages A_it = (r_i - mean(r)) / std(r) over the
group, and the k3 estimate KL_it = pi_ref/pi - log(pi_ref/pi) - 1 in the loss (not in the reward).
One step: rollout -> reward -> group advantages -> loss -> backward -> AdamW step, in `main` below.

Choices the paper leaves open, made here: eps = 0.2 (PPO's), temperature 1.0 and top-p 1.0 for rollouts,
std with Bessel's correction (as TRL), a group whose rewards are all equal gets zero advantage (counted).
Options from later work, one flag each: --loss-norm token (DAPO) or constant (Dr. GRPO), --no-std-scale
(Dr. GRPO), --clip-high (DAPO's asymmetric clip), --beta 0 (no KL), --mask-truncated, --ref-reset K
(iterative GRPO: the reference becomes the current policy every K steps).

    python grpo.py                                    # the toy: builds data, base and SFT models first if missing
    torchrun --nproc_per_node 8 grpo.py --init <hf dir> --data problems.jsonl --group-size 64 --lr 1e-6
"""

import argparse
import json
import os
import time

import numpy as np
import torch

import data
import pretrain
import reward
import sft
from kernels import grpo_token_loss, token_logprobs
from model import config_from_hf
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# The pieces, named as in the paper


def group_advantages(rewards, scale_std=True):
    """Outcome supervision (paper §4.1.2): A_i = (r_i - mean(r)) / std(r) within each group, the same for every
    token of o_i. rewards: (questions, G). A group whose rewards are all equal carries no signal: its advantages
    are 0 (not 0/0). Returns (advantages, number of such groups)."""
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    flat = std < 1e-6
    adv = rewards - mean
    if scale_std:
        adv = torch.where(flat, 0.0, adv / std.clamp(min=1e-6))
    return torch.where(flat, 0.0, adv), int(flat.sum())


def grpo_objective_sums(logp, old_logp, ref_logp, adv, mask, args):
    """Per-token GRPO loss (kernels.grpo_token_loss) summed the way --loss-norm says, *before* the division
    by the global normaliser (so micro-batches and ranks add up exactly):
      sequence (paper): sum_i (1/|o_i|) sum_t loss_it        then / number of sequences
      token (DAPO):     sum_i sum_t loss_it                   then / number of completion tokens
      constant (Dr. GRPO): sum_i sum_t loss_it                then / (sequences x max new tokens)
    Shapes: logp, old_logp, ref_logp, mask (B, T); adv (B,). Returns (loss sum, kl sum per token, clip count)."""
    loss, kl = grpo_token_loss(logp, old_logp, ref_logp, adv[:, None].expand_as(logp),
                               clip_eps=(args.clip_eps, args.clip_high or args.clip_eps), beta=args.beta)
    m = mask.float()
    if args.loss_norm == "sequence":
        per_seq = (loss * m).sum(1) / m.sum(1).clamp(min=1)
        total = per_seq.sum()
    else:
        total = (loss * m).sum()
    r = torch.exp(logp - old_logp).detach()
    clipped = ((r < 1 - args.clip_eps) | (r > 1 + (args.clip_high or args.clip_eps))) & mask
    return total, (kl.detach() * m).sum(), int(clipped.sum())


def sequence_logprobs(model, tokens):
    """log pi(token_t | tokens_<t) for every position (B, T-1) of right-padded sequences."""
    logits = model(tokens[:, :-1])
    return token_logprobs(logits, tokens[:, 1:])


# -----------------------------------------------------------------------------
# Rollouts


@torch.no_grad()
def rollout(model, tok, problems, args, generator):
    """G sampled completions per problem. Returns (tokens (B, T) right-padded prompt+completion, completion mask
    (B, T-1) over the predicted positions, rewards (n, G), finished flags, completion texts)."""
    model.eval()
    prompts = [tok.chat(data.PROMPTS["cot"].format(question=p["question"])) for p in problems for _ in range(args.group_size)]
    with pretrain.gathered(model):  # FSDP: full weights for the whole rollout, no collective per token
        gen = model.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             eos_ids=[tok.eos_id], pad_id=tok.pad_id, generator=generator)
    texts = [tok.decode([t for t in ids if t != tok.eos_id]) for ids in gen.tokens]
    golds = [p["answer"] for p in problems for _ in range(args.group_size)]
    rewards = torch.tensor(reward.batch_rewards(texts, golds, workers=1), dtype=torch.float32)
    T = max(len(p) + len(c) for p, c in zip(prompts, gen.tokens))
    tokens = torch.full((len(prompts), T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T - 1, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, gen.tokens)):
        tokens[i, :len(p) + len(c)] = torch.tensor(p + c)
        keep = gen.finished[i] or not args.mask_truncated  # a cut-off completion may teach nothing (DAPO)
        mask[i, len(p) - 1:len(p) + len(c) - 1] = keep
    model.train()
    return tokens, mask, rewards.view(len(problems), args.group_size), gen.finished, texts


# -----------------------------------------------------------------------------
# Training


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", default="out/toy/sft", help="the policy to start from (a Hugging Face directory)")
    ap.add_argument("--data", default="out/toy/data/problems/train.jsonl", help="questions with answers")
    ap.add_argument("--eval-data", default="out/toy/data/problems/test.jsonl", help="held-out problems")
    ap.add_argument("--out", default="out/toy/grpo")
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--questions", type=int, default=16, help="questions per step, all ranks")
    ap.add_argument("--group-size", type=int, default=8, help="G, outputs per question (paper: 64)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="completion budget (paper: 1024)")
    ap.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (paper: not given)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-4, help="policy LR (paper: 1e-6 at 7B)")
    ap.add_argument("--beta", type=float, default=0.04, help="KL weight (paper: 0.04); 0 turns the KL off")
    ap.add_argument("--clip-eps", type=float, default=0.2, help="eps, the lower clip (paper: not given; PPO's 0.2)")
    ap.add_argument("--clip-high", type=float, default=None, help="upper clip if asymmetric (DAPO: 0.28)")
    ap.add_argument("--loss-norm", default="sequence", choices=["sequence", "token", "constant"])
    ap.add_argument("--no-std-scale", action="store_true", help="advantage r - mean(r) (Dr. GRPO)")
    ap.add_argument("--mask-truncated", action="store_true", help="no loss on completions cut at the budget")
    ap.add_argument("--mu", type=int, default=1, help="policy updates per rollout batch (paper: 1)")
    ap.add_argument("--micro-batch", type=int, default=32, help="sequences per forward/backward per rank")
    ap.add_argument("--ref-reset", type=int, default=0, help="iterative GRPO: reset the reference every K steps")
    ap.add_argument("--eval-every", type=int, default=20, help="held-out greedy accuracy every N steps")
    ap.add_argument("--eval-problems", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--schedule", default="constant", choices=["constant", "cosine", "multistep"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype on GPU")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(args):
    d = pretrain.init_dist()
    torch.manual_seed(args.seed)
    if not os.path.isfile(os.path.join(args.init, "config.json")):
        if args.init != parse_args([]).init:
            raise SystemExit(f"{args.init}: no config.json; --init takes a Hugging Face model directory")
        if d.world > 1:
            raise SystemExit("the toy SFT model is missing: run `python grpo.py` once in one process first")
        sft.main(sft.parse_args([]))  # builds the toy data and base model first if they are missing
    tok = Tokenizer.load(args.init)
    problems = data.load_problems(args.data)
    held_out = data.load_problems(args.eval_data)[:args.eval_problems] if os.path.isfile(args.eval_data) else []
    if args.questions % d.world:
        raise SystemExit(f"--questions {args.questions} is not a multiple of the {d.world} ranks")
    config = config_from_hf(args.init)
    policy = pretrain.build_model(config, d, args, init_dir=args.init)
    ref = pretrain.build_model(config, d, args, init_dir=args.init) if args.beta > 0 else None
    if ref is not None:
        ref.requires_grad_(False)
    opt = pretrain.make_optimizer(policy, args)
    pretrain.claim(args.out, d)
    if d.main:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    log, stop = pretrain.Log(args.out, d, args.max_steps, 0, every=1), pretrain.StopFlag()
    gen = torch.Generator(device=d.device).manual_seed(args.seed * 1000 + d.rank)

    def held_out_accuracy():
        mine = held_out[d.rank::d.world]
        with pretrain.gathered(policy):
            acc = sft.greedy_accuracy(policy, tok, mine)
        policy.train()
        return pretrain.all_sum(d, acc * len(mine)) / max(len(held_out), 1)

    first_acc = held_out_accuracy() if held_out else None
    if first_acc is not None:
        log(dict(step=0, eval_greedy_accuracy=first_acc))
    per_rank = args.questions // d.world
    for step in range(args.max_steps):
        t0 = time.time()
        # 1. rollout: this rank's questions, G outputs each, from the current (= old) policy
        rng = np.random.default_rng([args.seed, step])
        batch = [problems[i] for i in rng.choice(len(problems), args.questions, replace=False)]
        batch = batch[d.rank * per_rank:(d.rank + 1) * per_rank]
        tokens, mask, rewards, finished, texts = rollout(policy, tok, batch, args, gen)
        t_gen = time.time() - t0
        # 2. group advantages, computed where the group lives
        adv, flat = group_advantages(rewards, scale_std=not args.no_std_scale)
        adv = adv.flatten()
        # 3. old and reference log-probs (no grad)
        with torch.no_grad():
            ref_lp = sequence_logprobs(ref, tokens.to(d.device)) if ref is not None else None
            old_lp = sequence_logprobs(policy, tokens.to(d.device)) if args.mu > 1 else None
        # 4. mu policy updates on this rollout batch, the loss normalised over all ranks
        n_seq = pretrain.all_sum(d, len(tokens))
        n_tok = pretrain.all_sum(d, int(mask.sum()))
        norm = {"sequence": n_seq, "token": max(n_tok, 1), "constant": n_seq * args.max_new_tokens}[args.loss_norm]
        for _ in range(args.mu):
            loss_sum = kl_sum = clip_n = 0.0
            for i in range(0, len(tokens), args.micro_batch):
                s = slice(i, i + args.micro_batch)
                x, m = tokens[s].to(d.device), mask[s].to(d.device)
                with torch.autocast(d.device.type, dtype=torch.bfloat16,
                                    enabled=d.device.type == "cuda" and args.dtype == "bfloat16"):
                    lp = sequence_logprobs(policy, x)
                old = old_lp[s] if old_lp is not None else lp.detach()  # mu = 1: pi_old is pi, ratio 1 (paper)
                rf = ref_lp[s] if ref_lp is not None else lp.detach()
                total, kl, clipped = grpo_objective_sums(lp, old, rf, adv[s].to(d.device), m, args)
                (total * d.world / norm).backward()
                loss_sum, kl_sum, clip_n = loss_sum + total.item(), kl_sum + kl.item(), clip_n + clipped
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
            grad_norm = grad_norm.full_tensor().item() if hasattr(grad_norm, "full_tensor") else grad_norm.item()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if args.ref_reset and (step + 1) % args.ref_reset == 0 and ref is not None:  # iterative GRPO (Alg. 1)
            ref.load_state_dict(policy.state_dict())
        lens = mask.sum(1).float()
        row = dict(step=step + 1, reward=pretrain.all_sum(d, rewards.sum().item()) / (n_seq),
                   loss=pretrain.all_sum(d, loss_sum) / norm, kl=pretrain.all_sum(d, kl_sum) / max(n_tok, 1),
                   clip_frac=pretrain.all_sum(d, clip_n) / max(n_tok, 1),
                   zero_std_groups=pretrain.all_sum(d, flat), length=pretrain.all_sum(d, lens.sum().item()) / n_seq,
                   truncated=pretrain.all_sum(d, sum(not f for f in finished)) / n_seq, grad_norm=grad_norm,
                   rollout_tokens_per_s=pretrain.all_sum(d, lens.sum().item()) / t_gen, seconds=time.time() - t0)
        if held_out and args.eval_every and (step + 1) % args.eval_every == 0:
            row["eval_greedy_accuracy"] = held_out_accuracy()
        log(row)
        if stop(d):
            pretrain.print0(d, f"stopped by signal at step {step + 1}")
            break
    log.close()
    pretrain.export_hf(policy, args.out, args.init, d)
    if held_out:
        last = held_out_accuracy()
        pretrain.print0(d, f"held-out greedy accuracy: {first_acc:.3f} -> {last:.3f} ({len(held_out)} problems)")
    pretrain.print0(d, f"saved {args.out}")
    if d.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
