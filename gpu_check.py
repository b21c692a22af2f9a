"""The GPU check: one command that measures what only a GPU can show, in a few minutes, and prints one table.

A GPU is lent to this project rarely and briefly, so this is prepared in advance and its CPU smoke mode runs in
the tests (it cannot rot). Four parts:
- token log-probs + the GRPO loss, forward and backward, from 16K tokens of logits at V = 32K, 102,400 and 152K
  in bf16: naive PyTorch, its torch.compile, ours (fused_kernels/, Triton), ours from the hidden states (the logits
  never exist) and Liger-Kernel's GRPO loss when it is installed; time, GB/s of the minimum traffic (read the
  logits forward, read them and write their gradient backward) against the measured copy bandwidth, peak memory;
- decoding with engine.generate at 1B parameters in bf16: batch 64, 512 new tokens, tokens/s, eager and with
  the decode step captured (torch.compile, CUDA graphs);
- training at 1B in bf16 with activation checkpointing: tokens/s and MFU;
- one GRPO step at 1B (grpo.py itself, random weights, a toy tokenizer), split into its phases.

    python gpu_check.py            # on a GPU
    python gpu_check.py --smoke    # the same code at toy sizes, on whatever device there is (CPU in the tests)
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile

import torch

import common
import engine
import grpo
import pretrain
from bench import timed
from fused_kernels.bench import copy_bandwidth
from model import PRESETS, ModelConfig, Transformer


def peak_gib(fn, cuda):
    """GiB allocated at the peak of one call beyond what was allocated before it (CUDA only; None elsewhere)."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 30


# -----------------------------------------------------------------------------
# 1. log-probs + GRPO loss


def loss_methods(N, V, C, dtype, device):
    """(name -> a function computing the summed GRPO loss of N tokens from logits or hidden states, all on the
    same random data; the tensors they differentiate)."""
    from fused_kernels import grpo_loss_torch, grpo_token_loss, hidden_logprobs, naive_logprobs, token_logprobs
    torch.manual_seed(0)
    logits = torch.randn(N, V, device=device, dtype=dtype, requires_grad=True)
    hidden = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, C, device=device, dtype=dtype) * C ** -0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device)
    old = ref = torch.full((N,), -math.log(V), device=device)  # about uniform
    adv = torch.randn(N, device=device)

    def naive():
        return grpo_loss_torch(naive_logprobs(logits, targets), old, ref, adv, 0.2, 0.2, 0.04)[0].sum()

    methods = {"naive PyTorch": naive,
               "ours": lambda: grpo_token_loss(token_logprobs(logits, targets), old, ref, adv)[0].sum(),
               "ours from hidden": lambda: grpo_token_loss(hidden_logprobs(hidden, weight, targets), old, ref,
                                                           adv)[0].sum()}
    leaves = [logits, hidden, weight]
    if device == "cuda":
        methods["naive, compiled"] = torch.compile(naive)
        methods["Liger-Kernel"] = None  # a row says it is not installed
        try:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss
        except ImportError:
            return methods, leaves
        B = 16  # Liger takes (B, L + 1, V) logits and (B,) advantages: the same N tokens as 16 sequences
        lg = logits.detach().view(B, N // B, V)
        lg = torch.cat([lg, lg[:, :1]], 1).requires_grad_()
        ids, o = targets.view(B, -1), old.view(B, -1)
        methods["Liger-Kernel"] = lambda: triton_grpo_loss(lg, o, o, ids, adv[:B], temperature=1.0, beta=0.04,
                                                           eps_low=0.2, eps_high=0.2, inplace=False,
                                                           loss_type="grpo")[0].sum()
        leaves.append(lg)
    return methods, leaves


def loss_table(args, dtype, device):
    cuda = device == "cuda"
    bandwidth = copy_bandwidth(device) if cuda else None
    print(f"\n1. token log-probs + GRPO loss, forward + backward, {args.tokens} tokens, {str(dtype)[6:]}"
          + (f"; copy bandwidth {bandwidth / 1e9:.0f} GB/s" if cuda else ""))
    print(f"{'vocab':>8}  {'method':<18}{'ms':>9}{'GB/s':>8}{'% copy':>8}{'peak GiB':>10}")
    for V in args.vocabs:
        methods, leaves = loss_methods(args.tokens, V, args.hidden, dtype, device)
        for name, fn in methods.items():
            if fn is None:
                print(f"{V:>8}  {name:<18}  not installed (pip install liger-kernel)")
                continue

            def step():
                fn().backward()
                for x in leaves:  # each call allocates its own gradient, as a training step does
                    x.grad = None
            try:
                sec = timed([step], args.repeats, device)[0]
                peak = peak_gib(step, cuda)
            except Exception as e:  # a peer that fails at this size is a row, not the end of the check
                print(f"{V:>8}  {name:<18}  failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                continue
            traffic = 3 * args.tokens * V * dtype.itemsize  # from hidden states there are no logits to move
            gbs = traffic / sec / 1e9 if name != "ours from hidden" else None
            cells = [f"{gbs:8.0f}" if gbs else f"{'-':>8}",
                     f"{100 * gbs * 1e9 / bandwidth:7.0f}%" if gbs and bandwidth else f"{'-':>8}",
                     f"{peak:10.2f}" if peak is not None else f"{'-':>10}"]
            print(f"{V:>8}  {name:<18}{sec * 1e3:9.2f}" + "".join(cells), flush=True)


# -----------------------------------------------------------------------------
# 2-3. decoding and training at a size


def decode_row(config, args, dtype, device):
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: a 1B model initialised on the CPU takes a while
        model = Transformer(config)
    model.init_weights()
    model = model.to(dtype).eval()
    g = torch.Generator(device).manual_seed(0)
    prompts = torch.randint(1, config.vocab_size, (args.decode_batch, args.prompt_tokens), generator=g,
                            device=device).tolist()
    print(f"\n2. decoding, engine.generate, {args.size} ({model.num_params() / 1e9:.2f}B) in {str(dtype)[6:]}: "
          f"batch {args.decode_batch}, prompts of {args.prompt_tokens}, {args.new_tokens} new tokens")
    for name, compile in [("eager", False)] + [("captured (torch.compile, CUDA graphs)", True)] * (device == "cuda"):
        sec = timed([lambda: engine.generate(model, prompts, args.new_tokens, temperature=1.0,
                                             slots=args.decode_batch, compile=compile)], 1, device)[0]
        print(f"   {name}: {args.decode_batch * args.new_tokens / sec:,.0f} tokens/s ({sec:.2f} s)", flush=True)


def train_row(config, args, device):
    d = common.Dist(0, 1, torch.device(device))
    run = argparse.Namespace(activation_checkpointing=True, compile=False, dtype="bfloat16", seed=0, lr=1e-4,
                             weight_decay=0.1, grad_clip=1.0, warmup=0, schedule="constant", max_steps=10)
    model = common.build_model(config, d, run)
    opt = common.make_optimizer(model, run)
    B, T = args.train_batch, args.train_tokens
    x = torch.randint(0, config.vocab_size, (B, T + 1))
    batch = [(x[:, :-1], x[:, 1:], torch.ones(B, T, dtype=torch.bool))]
    sec = timed([lambda: common.train_step(model, opt, batch, d, run, 0)], args.repeats, device)[0]
    n_params = model.num_params()
    tokens_per_s = B * T / sec
    mfu = pretrain.flops_per_token(n_params, config, T) * tokens_per_s / pretrain.peak_flops(d.device) \
        if device == "cuda" else float("nan")
    print(f"\n3. training, {args.size} with activation checkpointing, micro-batch {B} x {T}, AdamW step included")
    print(f"   {tokens_per_s:,.0f} tokens/s, MFU {100 * mfu:.1f}% (6N + 12·L·d·T FLOPs per token)")


# -----------------------------------------------------------------------------
# 4. one GRPO step, by phase


def grpo_rows(config, args, device):
    import data
    import toyworld
    from tokenizer import Tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        problems = toyworld.make_problems(64, seed=0)
        tok = Tokenizer.train([p["question"] + " " + p["cot"] for p in problems], 600)
        torch.manual_seed(0)
        model = Transformer(dataclasses.replace(config, vocab_size=max(config.vocab_size, tok.vocab_size)))
        model.init_weights()
        model.save_pretrained(tmp, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                              bos_id=tok.bos_id, eos_id=tok.eos_id)
        tok.save(tmp)
        data.write_jsonl(os.path.join(tmp, "rl.jsonl"), problems)
        out = os.path.join(tmp, "out")
        grpo.main(grpo.parse_args([
            "--init", tmp, "--data", os.path.join(tmp, "rl.jsonl"), "--eval-data", "none", "--out", out,
            "--questions", str(args.grpo_questions), "--group-size", str(args.grpo_group),
            "--max-new-tokens", str(args.new_tokens), "--max-steps", "2", "--report-problems", "0",
            "--micro-batch", str(args.train_batch), "--gen-batch", str(args.grpo_questions * args.grpo_group),
            "--activation-checkpointing", "--ckpt-every", "100"]))
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    r = rows[-1]  # the second step: the first also pays for warm-up
    print(f"\n4. one GRPO step, {args.size}: {args.grpo_questions} questions x G = {args.grpo_group}, "
          f"up to {args.new_tokens} new tokens (random weights: outputs run to the budget)")
    print(f"   {r['seconds']:.2f} s: generate {r['time_generate']:.2f} ({r['rollout_tokens_per_s']:,.0f} tokens/s), "
          f"reward {r['time_reward']:.2f}, reference {r['time_ref']:.2f}, train {r['time_train']:.2f} "
          f"({r['train_tokens_per_s']:,.0f} tokens/s)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes (the CPU test of this script)")
    ap.add_argument("--parts", default="1,2,3,4", help="which of the four parts to run")
    args = ap.parse_args(argv)
    gpu = dict(size="1b", tokens=16384, vocabs=[32768, 102400, 151936], hidden=4096, repeats=10, decode_batch=64,
               prompt_tokens=128, new_tokens=512, train_batch=4, train_tokens=2048, grpo_questions=8, grpo_group=8)
    smoke = dict(size="toy", tokens=256, vocabs=[1000, 4096], hidden=64, repeats=2, decode_batch=4, prompt_tokens=8,
                 new_tokens=8, train_batch=2, train_tokens=64, grpo_questions=2, grpo_group=2)
    vars(args).update(smoke if args.smoke else gpu)
    return args


def main(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("gpu_check.py: no GPU here (torch.cuda.is_available() is False); --smoke runs toy sizes")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {'smoke sizes' if args.smoke else 'full sizes'}")
    config = ModelConfig(**PRESETS[args.size])
    parts = args.parts.split(",")
    if "1" in parts:
        loss_table(args, dtype, device)
    if "2" in parts:
        decode_row(config, args, dtype, device)
    if "3" in parts:
        train_row(config, args, device)
    if "4" in parts:
        grpo_rows(config, args, device)
    sys.stdout.flush()


if __name__ == "__main__":
    with common.one_line_errors():
        main(parse_args())
