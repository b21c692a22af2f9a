"""grpo.py's command line: its flags grouped by the line of Algorithm 1 they change (the rollouts, rewards and
advantages, the update, what a run reports), and the combinations it refuses, each in one line."""
import argparse

import common
import engine
import lora
import problem_sets
from common import count, nonnegative, positive
from fused_kernels import KL_TERMS
from model import PRESETS

# flags left unset (None) get the toy's value below 1B parameters, the large one above (common.size_defaults)
SIZE_DEFAULTS = dict(micro_batch=(32, 4), gen_batch=(128, 32), pack=(8, 1))
# β by reward: the paper's with the rule; with a reward model more, which on the toy kept GRPO from gaming it where
# the paper's lost 17 points in 10 steps. Three seeds each: the process RM gains most at ten times the paper's (+3.8
# against +0.5 at 0.15), the outcome RM at 0.15 (+2.8 against +1.3 at 0.4, +0.5 at 0.1): docs/findings.md
BETA = dict(rule=0.04, orm=0.15, prm=0.4)
SCALES = ("group", "batch", "none")  # what divides an advantage r - mean(r) (grpo.group_advantages)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Group Relative Policy Optimization, as DeepSeekMath writes it "
                                 "(grpo.py: Algorithm 1)")
    ap.add_argument("--init", default="out/toy/sft", help="the policy to start from (a Hugging Face directory)")
    ap.add_argument("--data", default="out/toy/data/problems/rl.jsonl", help="questions with answers")
    ap.add_argument("--eval-data", default="out/toy/data/problems/test.jsonl", help="held-out problems")
    problem_sets.add_problem_args(ap)
    engine.add_chat_args(ap)
    ap.add_argument("--out", default="out/toy/grpo")
    ap.add_argument("--max-steps", type=count, default=80)
    ap.add_argument("--questions", type=positive, default=16, help="questions per step, all ranks")
    ap.add_argument("--oversample", type=positive, default=1, help="draw K x --questions, train on the --questions "
                    "whose rewards disagree (DAPO's dynamic sampling; 1: the paper)")
    ap.add_argument("--group-size", type=positive, default=8, help="G, outputs per question (paper: 64)")
    ap.add_argument("--prompt", default="cot", choices=["cot", "tool"], help="rollout format (engine.py)")
    ap.add_argument("--max-new-tokens", type=positive, default=96, help="completion budget (paper: 1024)")
    ap.add_argument("--temperature", type=nonnegative, default=1.0, help="rollout temperature, at which π_θ, π_old and "
                    "π_ref are trained too, softmax(logits / T), as TRL and verl do (paper: not given)")
    ap.add_argument("--top-p", type=float, default=1.0, help="rollouts draw from the smallest set of tokens whose "
                    "probability reaches P (1: every token)")
    ap.add_argument("--top-k", type=int, default=0, help="rollouts draw from the K likeliest tokens (0: every token)")
    ap.add_argument("--min-p", type=float, default=0.0, help="rollouts draw from the tokens at least P times as likely "
                    "as the likeliest (min-p sampling, as TRL's min_p; 0: every token)")
    ap.add_argument("--keep-sampling-mask", action="store_true", help="π_θ, π_old and π_ref renormalised over the "
                    "tokens --top-k / --top-p / --min-p let the sampler draw at each position, as it drew "
                    "(DeepSeek-V3.2; stores up to --top-k ids a token)")
    ap.add_argument("--ref-reset", type=count, default=0, help="iterative GRPO: reset the reference every K steps")
    ap.add_argument("--ref-mixup", type=float, default=1.0, metavar="ALPHA", help="with --ref-reset, a reset moves "
                    "π_ref a share ALPHA of the way to π_θ: π_ref ← ALPHA π_θ + (1 - ALPHA) π_ref (TRL's "
                    "ref_model_mixup_alpha, from TR-DPO; 1: the paper's π_ref ← π_θ)")
    add_reward_args(ap.add_argument_group("rewards and advantages (lines 8-9)"))
    add_update_args(ap.add_argument_group("the update (lines 10-11)"))
    add_watch_args(ap.add_argument_group("held-out evaluation and logs"))
    lora.add_args(ap)
    common.add_training_args(ap, warmup=0, schedule="cosine", ckpt_every=20, helps={
        "--schedule": "LR after --warmup (paper: not given; cosine to a tenth of --lr)",
        "--compile": "torch.compile each block for training, and capture the rollouts' decode step (a CUDA graph "
                     "on GPU)"})
    ap.add_argument("--dry-run", action="store_true", help="print the per-GPU memory plan and exit")
    ap.add_argument("--world-size", type=positive, default=8, help="GPUs, for --dry-run")
    ap.add_argument("--preset", choices=list(PRESETS), help="for --dry-run: a model.PRESETS shape instead of --init")
    ap.add_argument("--prompt-tokens", type=positive, default=256, help="for --dry-run: tokens of a prompt")
    args = ap.parse_args(argv)
    check_args(ap, args)
    return args


def add_reward_args(ap):
    """What gives the reward (line 8) and how it becomes an advantage (line 9): the rule, a reward
    model, the user's functions, outcome or process supervision, GRPO's group baseline or PPO's value model."""
    ap.add_argument("--reward", default="rule", choices=["rule", "orm", "prm"], help="what gives the reward: the "
                    "answer rule (reward.py), or an outcome / process reward model (reward_model.py; paper: a model)")
    ap.add_argument("--reward-model", nargs="+", metavar="DIR", help="the --reward model's directory (default: the "
                    "toy's, out/toy/<orm|prm>, built by reward_model.py if missing); several: an ensemble")
    ap.add_argument("--rm-ensemble", default="mean", choices=["mean", "min"], help="an ensemble's verdict: the mean "
                    "of its models', or the lowest (the pessimist's: harder to game, as one model's blind spot is "
                    "seldom all of theirs)")
    ap.add_argument("--reward-fn", action="append", default=[], metavar="MODULE:FUNCTION", help="a reward of "
                    "yours, f(completion text, problem row) -> float, added to --reward's (repeatable; also "
                    "path/to/file.py:function)")
    ap.add_argument("--reward-weights", help="comma-separated weights: --reward's first, then each --reward-fn's "
                    "(default: 1 each)")
    ap.add_argument("--overlong-buffer", type=int, default=0, metavar="L", help="DAPO's soft overlong punishment: "
                    "a reward falling from 0 to -1 over the last L tokens of --max-new-tokens, added to the others "
                    "(logged as overlong_penalty; 0: off)")
    ap.add_argument("--rm-refresh", type=count, default=0, metavar="K", help="iterative GRPO (paper §4.1.4, with "
                    "--ref-reset K): every K steps, train the reward model on the policy's new samples, 10%% of them "
                    "replayed")
    ap.add_argument("--rm-questions", type=positive, default=64, help="questions a refresh samples, all ranks")
    ap.add_argument("--rm-samples", type=positive, default=4, help="samples per question of a refresh")
    ap.add_argument("--rm-steps", type=positive, default=20, help="reward-model optimizer steps of a refresh")
    ap.add_argument("--rm-batch", type=positive, default=64, help="reward-model examples per refresh step, all ranks")
    ap.add_argument("--rm-lr", type=nonnegative, default=1e-4, help="reward-model LR of a refresh (constant)")
    ap.add_argument("--shepherd-samples", type=positive, default=4, help="a refresh's completions from each step's "
                    "prefix for a process model's labels (reward_model.py)")
    ap.add_argument("--supervision", default=None, choices=["outcome", "process"], help="paper §4.1.2 / §4.1.3 "
                    "(default: process with --reward prm, else outcome; rule process rewards: the arithmetic checker)")
    ap.add_argument("--online-rft", action="store_true", help="advantage 1 for right, 0 for wrong outputs: online "
                    "rejection-sampling fine-tuning, GRPO's baseline in paper §5.2.1 (use with --beta 0)")
    ap.add_argument("--advantage", default="group", choices=["group", "gae"], help="group: GRPO's, relative to "
                    "the G outputs of a question; gae: PPO's (paper Eq. 1-2), from a value model, with the KL as a "
                    "per-token penalty in the reward")
    ap.add_argument("--gae-lambda", type=nonnegative, default=0.95, help="PPO: GAE's λ (γ = 1; the paper gives "
                    "neither)")
    ap.add_argument("--value-clip", type=nonnegative, default=0.2, help="PPO: how far one update may move a value")
    ap.add_argument("--value-lr", type=nonnegative, default=None, help="PPO: the value model's LR, constant (default "
                    "--lr)")
    ap.add_argument("--value-init", help="PPO: the value model's start (default: the reward model with --reward "
                    "orm|prm, else --init's body with a new head)")


def add_update_args(ap):
    """The objective J and how it is optimised (lines 10-11): LR, β, the clip, the normalisation, μ,
    the sampler correction, and how the batch is cut for memory."""
    ap.add_argument("--lr", type=nonnegative, default=1e-4, help="policy LR (paper: 1e-6 at 7B)")
    ap.add_argument("--beta", type=nonnegative, default=None, help=f"KL weight (default: the paper's {BETA['rule']} "
                    f"with the rule's reward, {BETA['orm']} with an outcome RM's, {BETA['prm']} with a process "
                    "RM's); 0 turns the KL off")
    ap.add_argument("--kl-loss", default="k3", choices=KL_TERMS, help="the KL term in the loss: k3, the paper's "
                    "(Eq. 4; its gradient on sampled tokens is that of KL(π_ref ‖ π_θ)); k2, (log π_θ/π_ref)²/2 "
                    "(whose gradient is that of KL(π_θ ‖ π_ref), the KL Eq. 3 writes); or k3-is, k3 weighted by "
                    "π_θ/π_old (DeepSeek-V3.2: unbiased in value and gradient on π_old's tokens, also at --mu > 1); "
                    "kl in the log is k3's in every case")
    ap.add_argument("--clip-eps", type=nonnegative, default=0.2, help="ε, the lower clip (paper: not given; PPO's 0.2)")
    ap.add_argument("--clip-high", type=nonnegative, default=None, help="upper clip if asymmetric (DAPO: 0.28)")
    ap.add_argument("--dual-clip", type=float, default=None, metavar="C", help="dual-clip PPO (Ye et al., 2020; "
                    "verl's clip_ratio_c, its default 3): the policy term of a token of advantage < 0 capped at C "
                    "times its advantage, its gradient 0 where the ratio passes C (default: off; the same unless --mu "
                    "or --mini-batches > 1)")
    ap.add_argument("--loss-norm", default="sequence", choices=["sequence", "token", "constant"])
    ap.add_argument("--std-scale", nargs="?", const="group", default=None, choices=SCALES, help="what divides an "
                    "advantage r - mean(r): group (its group's std: GRPO, the default with the rule's reward; the "
                    "bare flag), batch (one std over the batch: REINFORCE++), none (Dr. GRPO; the default with a "
                    "reward model's)")
    ap.add_argument("--no-std-scale", dest="std_scale", action="store_const", const="none", help="--std-scale none")
    ap.add_argument("--mask-truncated", action="store_true", help="no loss on completions cut at the budget")
    ap.add_argument("--top-entropy", type=float, default=1.0, metavar="RHO", help="the policy-gradient term on the "
                    "share RHO of the step's sampled tokens drawn at the highest entropy, the KL on all (Wang et "
                    "al., 2025: 0.2; TRL's top_entropy_quantile; 1: every token)")
    ap.add_argument("--mu", type=positive, default=1, help="passes over each rollout batch, an update per mini-batch "
                    "each (paper: 1)")
    ap.add_argument("--mini-batches", type=positive, default=1, metavar="K", help="updates per pass: each rank's "
                    "questions dealt into K mini-batches of whole groups, the later ones off-policy as at --mu > 1 "
                    "(verl's ppo_mini_batch_size = --questions / K; paper: 1); the LR is the step's for all")
    ap.add_argument("--ratio", default="token", choices=["token", "sequence"], help="the ratio π_θ/π_old in the "
                    "clip: per token (the paper), or per output, the geometric mean of its tokens' (GSPO, Zheng et "
                    "al., 2025, whose paper clips at --clip-eps 3e-4 --clip-high 4e-4 with --beta 0); the same "
                    "unless --mu or --mini-batches > 1")
    ap.add_argument("--policy-loss", default="clip", choices=["clip", "cispo"], help="the policy term: PPO's clip "
                    "(the paper), or CISPO's (MiniMax-M1, Chen et al., 2025): each token's gradient weighted by its "
                    "ratio capped at 1 + --clip-high (no lower cap), never zeroed; the same unless --mu or "
                    "--mini-batches > 1")
    ap.add_argument("--tis", type=nonnegative, default=None, metavar="C", help="truncated importance sampling: weight "
                    "each token's policy-gradient term by min(π_old / π_sampler, C), where the sampler's bf16 "
                    "log-probs differ from the trainer's (default: 2 in bf16, off in fp32; 0: off)")
    ap.add_argument("--off-policy-mask", type=float, default=None, metavar="DELTA", help="DeepSeek-V3.2's off-policy "
                    "sequence masking: no policy term on the outputs of advantage < 0 whose mean log π_sampler/π_θ "
                    "over their tokens exceeds DELTA (the KL term stays); logged as off_policy_masked (default: off)")
    ap.add_argument("--fp32-head", action="store_true", help="the LM head's GEMM in fp32 for the sampler and the "
                    "trainer alike (bf16 runs): logits bf16 does not round, a smaller sampler/trainer gap (bench.py "
                    "gap), for an fp32 GEMM over the vocabulary")
    ap.add_argument("--micro-batch", type=positive, default=None, help="sequences per forward/backward per rank "
                    "(default: 32 below 1B parameters, 4 above)")
    ap.add_argument("--gen-batch", type=positive, default=None, help="sequences decoded at once per rank, the KV "
                    "cache's rows (default: 128 below 1B parameters, 32 above: 7B's KV cache is 480 KiB per token)")
    ap.add_argument("--pack", type=positive, default=None, help="completions of one question per training row, behind "
                    "one copy of its prompt (default: 8 below 1B parameters; 1 above, a row per completion, until a "
                    "GPU measures the masked attention packing needs against the prompt tokens it saves)")


def add_watch_args(ap):
    """What a run reports while it trains: held-out accuracy, the before/after table, completions.jsonl,
    mid-run exports."""
    ap.add_argument("--eval-every", type=count, default=10, help="held-out greedy accuracy every N steps (0: never)")
    ap.add_argument("--eval-problems", type=positive, default=200, help="held-out problems for greedy accuracy")
    ap.add_argument("--report-problems", type=count, default=100, help="held-out problems for the before/after "
                    "table's maj@k and pass@k (0: no table)")
    ap.add_argument("--report-samples", type=positive, default=8, help="k of the table's maj@k and pass@k")
    ap.add_argument("--log-completions", type=count, default=1, metavar="N", help="every N steps, append the first "
                    "group's outputs with their rewards and advantage to completions.jsonl (0: never)")
    ap.add_argument("--export-every", type=count, default=0, metavar="N", help="also export the policy as a Hugging "
                    "Face directory (out/step-N) every N steps, to evaluate a long run while it trains (0: at the "
                    "end only)")
    ap.add_argument("--report-temperature", type=nonnegative, default=0.7)


def check_args(ap, args):
    """The flags that do not go together, refused with one line each; the defaults that depend on other flags:
    --supervision's, --beta's and --std-scale's (by --reward), and --reward-weights'."""
    if args.supervision is None:
        args.supervision = "process" if args.reward == "prm" else "outcome"
    learned = args.reward != "rule"  # a model's score: gamed under the rule's push (docs/findings.md), so less of it
    args.beta = BETA[args.reward] if args.beta is None else args.beta
    args.std_scale = ("none" if learned else "group") if args.std_scale is None else args.std_scale
    if (args.reward, args.supervision) in (("orm", "process"), ("prm", "outcome")):
        ap.error(f"--reward {args.reward} with --supervision {args.supervision}: an outcome model scores whole "
                 "outputs (outcome), a process model their steps (process)")
    if args.group_size < 2 and args.advantage == "group" and not args.online_rft:
        ap.error(f"--group-size {args.group_size}: GRPO's advantage compares a question's G outputs with each other, "
                 "and one output has none to compare with: give G >= 2 (or --advantage gae, or --online-rft)")
    if args.temperature <= 0:
        ap.error(f"--temperature {args.temperature}: GRPO samples G different outputs a question, at T > 0")
    if refused := engine.cuts_refused(args.top_k, args.top_p, args.min_p):
        ap.error(refused)
    if args.keep_sampling_mask and not args.top_k:
        ap.error("--keep-sampling-mask stores the ids each token could have been, at most --top-k of them: add "
                 "--top-k K (with --top-p too, if you like)")
    if not 0 < args.top_entropy <= 1:
        ap.error(f"--top-entropy {args.top_entropy}: a share of the tokens, in (0, 1]")
    if args.kl_loss != "k3" and (args.beta == 0 or args.advantage == "gae"):
        ap.error(f"--kl-loss {args.kl_loss} changes the KL term in the loss, which --beta 0 and --advantage gae (the "
                 "KL in PPO's reward) leave out")
    if args.off_policy_mask is not None and (args.off_policy_mask < 0 or args.online_rft):
        ap.error(f"--off-policy-mask {args.off_policy_mask}: a mean log-ratio DELTA >= 0 under which outputs of "
                 "advantage < 0 keep their policy term (--online-rft gives none)")
    if not 0 < args.ref_mixup <= 1 or (args.ref_mixup < 1 and not args.ref_reset):
        ap.error(f"--ref-mixup {args.ref_mixup}: the share of the way to π_θ that each --ref-reset moves π_ref, in "
                 "(0, 1], with --ref-reset K")
    if args.kl_loss == "k3-is" and args.ratio == "sequence":
        ap.error("--kl-loss k3-is weights each token's k3 by its own ratio, and --ratio sequence gives the loss one "
                 "ratio per output: use one of them")
    ratio_flags = [f for f, on in (("--ratio sequence", args.ratio == "sequence"),
                                   ("--policy-loss cispo", args.policy_loss == "cispo"),
                                   ("--dual-clip", args.dual_clip is not None)) if on]
    if args.dual_clip is not None and (args.dual_clip <= 1 or args.policy_loss == "cispo"):
        ap.error(f"--dual-clip {args.dual_clip}: a cap C > 1 on the ratio of tokens of advantage < 0, for the clip's "
                 "policy term (CISPO's weight is capped already)")
    if ratio_flags and args.mu * args.mini_batches < 2:
        ap.error(f"{ratio_flags[0]} changes nothing with one update a batch, where π_old is π_θ and every ratio is "
                 "1: give --mu 2 or --mini-batches 2 or more")
    if args.rm_refresh and (args.reward == "rule" or len(args.reward_model or ()) > 1):
        ap.error("--rm-refresh retrains a reward model: give --reward orm|prm and one --reward-model")
    if args.reward == "prm" and args.prompt == "tool":
        ap.error("--reward prm scores the lines of chain-of-thought outputs: use it with --prompt cot")
    if args.advantage == "gae" and (args.supervision == "process" or args.online_rft or args.beta == 0):
        ap.error("--advantage gae is PPO: an outcome reward (no --supervision process, no --online-rft) and a KL "
                 "penalty in the reward (--beta > 0)")
    if args.online_rft and args.reward != "rule":
        ap.error("--online-rft keeps the outputs the rule grades right (paper §5.2.1): use it with --reward rule")
    if args.lora_rank and args.ref_reset:
        ap.error("--ref-reset with --lora-rank: π_ref is the model under the adapters, which a reset would move")
    if args.overlong_buffer and (args.supervision == "process" or args.online_rft):
        ap.error("--overlong-buffer shapes an outcome reward: use it without --supervision process and --online-rft")
    if not 0 <= args.overlong_buffer <= args.max_new_tokens:
        ap.error(f"--overlong-buffer {args.overlong_buffer}: tokens at the end of the budget, in [0, "
                 f"--max-new-tokens {args.max_new_tokens}]")
    if args.reward_fn and args.supervision == "process":
        ap.error("--reward-fn scores whole outputs: use it with outcome supervision")
    names = [spec.rpartition(":")[2] for spec in args.reward_fn]
    if len(set(names)) < len(names):
        ap.error(f"--reward-fn: two functions named alike ({names}): their rewards are logged by name")
    try:
        args.reward_weights = [float(w) for w in args.reward_weights.split(",")] if args.reward_weights \
            else [1.0] * (1 + len(args.reward_fn))
    except ValueError:
        ap.error(f"--reward-weights {args.reward_weights}: expected numbers separated by commas")
    if len(args.reward_weights) != 1 + len(args.reward_fn):
        ap.error(f"--reward-weights: {len(args.reward_weights)} weights for --reward and {len(args.reward_fn)} "
                 f"--reward-fn: give {1 + len(args.reward_fn)}")
