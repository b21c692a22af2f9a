"""Next-token pretraining (paper §2.2-2.3; docs/paper.md §3), from one CPU process to torchrun with FSDP2.

The loop is below in `main`: draw the step's batch from the source mixture, `common.train_step` (forward, masked
cross-entropy over the global count of tokens, backward, clip, AdamW), log, checkpoint. The machinery it shares
with sft.py and grpo.py (processes, FSDP2, optimizer and schedule, checkpoints, export) is in common.py; the data
(shards and their mixture) come from data.py. A run writes to --out: metrics.jsonl (one line per step), args.json,
sharded checkpoints under checkpoints/, and at the end the model as a Hugging Face directory (config.json,
model.safetensors, tokenizer files) in --out itself.

Paper settings: AdamW β 0.9/0.95, weight decay 0.1, peak LR 4.2e-4 with 2,000 warmup steps, then the multi-step
schedule (×0.316 at 80% of training, ×0.1 of peak at 90%), 10M-token batches of 4K context.

    python pretrain.py                                         # the toy: builds its data first if missing
    python pretrain.py --preset toy --max-steps 50 --out out/try
    torchrun --nproc_per_node 8 pretrain.py --preset deepseek-math-7b --data out/real --batch-tokens 10027008 \\
        --seq-len 4096 --micro-batch 1 --lr 4.2e-4 --warmup 2000 --activation-checkpointing
        # 10,027,008 = 306 x (8 ranks x 4096): the paper's 10M tokens, a whole number of micro-batches per rank
    python pretrain.py --dry-run --preset deepseek-math-7b --world-size 8    # memory plan, no training
"""

import argparse
import os
import time
from dataclasses import asdict

import torch

import data
import memory
from common import (Log, Optim, StopFlag, add_training_args, all_sum, autocast, build_model, checkpointed_blocks,
                    count, export_hf, finish, init_dist, make_optimizer, nonnegative, num_params, one_line_errors,
                    positive, print0, save_or_stop, start_run, train_step)
from model import PRESETS, ModelConfig, config_from_hf

# -----------------------------------------------------------------------------
# Memory plan (--dry-run)


def dry_run(args):
    config = ModelConfig(**PRESETS[args.preset])
    print(f"{args.preset}: {asdict(config)}")
    memory.print_train_plan(config, args.world_size, args.micro_batch, args.seq_len)


# -----------------------------------------------------------------------------
# Pretraining


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="toy", choices=list(PRESETS), help="model size (model.PRESETS)")
    ap.add_argument("--init", help="start from this Hugging Face model directory instead of random weights")
    ap.add_argument("--data", default="out/toy/data", help="data.py output directory (shards/ and tokenizer/)")
    ap.add_argument("--mixture", default="math=0.6,code=0.2,general=0.2", help="source=weight,... (paper §2.3)")
    ap.add_argument("--out", default="out/toy/base", help="output directory")
    ap.add_argument("--max-steps", type=positive, default=100)
    ap.add_argument("--batch-tokens", type=positive, default=8192, help="tokens per optimizer step, all ranks")
    ap.add_argument("--micro-batch", type=positive, default=16, help="sequences per forward/backward per rank")
    ap.add_argument("--seq-len", type=positive, default=256)
    ap.add_argument("--lr", type=nonnegative, default=3e-3, help="peak LR (paper: 4.2e-4 at 7B; small models take "
                    "more)")
    add_training_args(ap, warmup=30, schedule="multistep", ckpt_every=100, weight_decay=0.1,
                      helps={"--warmup": "warmup steps (paper: 2000)"})
    ap.add_argument("--eval-every", type=count, default=50, help="held-out loss every N steps (0: never)")
    ap.add_argument("--dry-run", action="store_true", help="print the per-GPU memory plan and exit")
    ap.add_argument("--world-size", type=positive, default=8, help="GPUs, for --dry-run")
    return ap.parse_args(argv)


def mixture(args, split):
    sources = {}
    for part in args.mixture.split(","):
        name, _, w = part.partition("=")
        sources[name] = (os.path.join(args.data, "shards", f"{name}.json"), float(w))
    return data.Mixture(sources, args.seq_len, seed=args.seed, split=split)


def main(args):
    if args.dry_run:
        return dry_run(args)
    d = init_dist(args.dtype)
    torch.manual_seed(args.seed)
    if not os.path.isfile(os.path.join(args.data, "shards", "math.json")):
        if args.data != parse_args([]).data:
            raise SystemExit(f"error: {args.data}: no shards/math.json; build it with: python data.py --out "
                             f"{args.data} ...")
        if d.main:  # the toy data: built once by rank 0
            data.build(data.parse_args(["--out", args.data]))
        if d.world > 1:
            torch.distributed.barrier()
    tok_dir = os.path.join(args.data, "tokenizer")
    per_step = args.micro_batch * args.seq_len * d.world
    if args.batch_tokens % per_step:
        raise SystemExit(f"error: --batch-tokens {args.batch_tokens} is not a multiple of micro-batch x seq-len x "
                         f"ranks = {args.micro_batch} x {args.seq_len} x {d.world} = {per_step}")
    accum = args.batch_tokens // per_step
    train, val = mixture(args, "train"), mixture(args, "val")
    preset = PRESETS[args.preset]
    config = ModelConfig(**{**preset, "vocab_size": train.vocab_size,
                            "max_seq_len": max(args.seq_len, preset["max_seq_len"])}) \
        if not args.init else None
    if args.init:
        config = config_from_hf(args.init)
    ac = checkpointed_blocks(args.activation_checkpointing, d, config.n_layers, lambda k: memory.train_peak(
        memory.train_plan(config, d.world, args.micro_batch, args.seq_len, k)))
    model = build_model(config, d, seed=args.seed, init_dir=args.init, checkpointed=ac, compile=args.compile,
                        fixed_length=True)
    optim = Optim.of(args)
    opt = make_optimizer(model, optim)
    step = start_run(args, d, model, opt, ("preset", "init", "data", "mixture", "batch_tokens", "seq_len", "seed"))
    n_params = num_params(config)
    print0(d, f"{n_params / 1e6:.1f}M parameters, {d.world} rank(s) on {d.device}, {accum} micro-batches of "
              f"{args.micro_batch}x{args.seq_len} per rank per step, {args.max_steps} steps")
    log = Log(args.out, d, args.max_steps, step, args=args)
    model.train()
    with StopFlag() as stop:  # the signal handlers are the run's only while it runs
        while step < args.max_steps:
            t0 = time.time()
            batches = []
            for k in range(accum):  # this rank's rows of the step's global batch, which is fixed by (seed, step)
                lo = (d.rank * accum + k) * args.micro_batch
                x, y = train.batch(step, range(lo, lo + args.micro_batch))
                batches.append((torch.from_numpy(x), torch.from_numpy(y), torch.ones(x.shape, dtype=torch.bool)))
            loss, norm, n = train_step(model, opt, batches, d, optim, step)
            step += 1
            row = dict(step=step, loss=loss, lr=opt.param_groups[0]["lr"], grad_norm=norm,
                       tokens_per_s=n / (time.time() - t0))
            if d.device.type == "cuda":  # model FLOPs utilisation: 6N per token + attention, against bf16 dense peak
                flops = flops_per_token(config, args.seq_len) * n / (time.time() - t0) / d.world
                row["mfu"] = flops / peak_flops(d.device)
            log(row)
            if args.eval_every and (step % args.eval_every == 0 or step == args.max_steps):
                log(dict(step=step, eval_loss=eval_loss(model, val, d, args)))
            save_or_stop(stop, args.out, model, opt, step, d, step % args.ckpt_every == 0 or step == args.max_steps)
    log.close()
    export_hf(model, args.out, tok_dir, d)
    print0(d, f"saved {args.out}")
    finish(d)


@torch.no_grad()
def eval_loss(model, val, d, args, batches=4):
    model.eval()
    total, n = 0.0, 0
    for k in range(batches):
        x, y = val.batch(k, range(d.rank * args.micro_batch, (d.rank + 1) * args.micro_batch))
        x, y = torch.from_numpy(x).to(d.device), torch.from_numpy(y).to(d.device)
        with autocast(d):
            total -= model(x, y).sum().item()  # cross-entropy: -log π(y)
        n += y.numel()
    model.train()
    return all_sum(d, total) / all_sum(d, n)


def flops_per_token(config, seq_len):
    """Training FLOPs per token: 6N for the matrices (forward and backward), N counting the weights a token is
    multiplied by, so not the input embedding (a lookup; tied to the LM head, it is the head and counts), and
    12·L·d·T for attention (PaLM's count; activation checkpointing's recomputation is not counted, as MFU is
    defined)."""
    n = num_params(config) - (0 if config.tie_embeddings else config.vocab_size * config.dim)
    return 6 * n + 12 * config.n_layers * config.dim * seq_len


# Dense bf16 tensor-core peaks (NVIDIA's datasheets, without sparsity), by a piece of torch.cuda.get_device_name:
# the first piece the name holds wins, so the more specific come first ("H100 PCIe" before "H100", "A100" before
# "A10", "H200" before "H20", "L40" before "L4").
PEAK_BF16 = [("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H200 NVL", 835e12), ("H100", 989e12),
             ("H200", 989e12), ("H800", 989e12), ("H20", 148e12), ("B200", 2250e12), ("A100", 312e12),
             ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12)]


def peak_flops(device):
    """Dense bf16 peak of the GPU, for MFU (PEAK_BF16); NaN for a GPU not listed and off a GPU (no MFU there)."""
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    return next((peak for piece, peak in PEAK_BF16 if piece in name), float("nan"))


if __name__ == "__main__":
    with one_line_errors():
        main(parse_args())
