"""Supervised fine-tuning on chain-of-thought, program-of-thought and tool-integrated solutions (paper §3;
docs/paper.md §4).

Each problem gives one example per solution format (--formats: cot, pot, tool), in the chat format of
DeepSeekMath-Instruct, `<bos>User: {prompt}\\n\\nAssistant: {solution}<eos>`, with the loss on the solution tokens
only (the paper is silent on prompt masking; we mask), and none on the sandbox's ```output contents in tool
solutions. Examples are right-padded to the longest one of their micro-batch, never packed: each example then
attends only to itself under plain causal attention, which packing would need a block-diagonal mask for;
sorting examples by length within a step keeps the padding small.

The paper: 776K examples, 500 steps of 256, constant LR 5e-5. The loop is `main` below; the distributed setup,
optimizer, the optimizer step (masked cross-entropy, as pretraining), checkpoints and export are common.py's,
the held-out accuracy evaluate.py's.

    python sft.py                              # the toy: builds the base model first if missing
    torchrun --nproc_per_node 8 sft.py --init deepseek-math-7b-base/ --data problems.jsonl --batch 256 \\
        --micro-batch 4 --lr 5e-5 --max-steps 500 --out out/sft --activation-checkpointing
"""

import argparse
import json
import os
import re
import time

import numpy as np
import torch

import common
import engine
import evaluate
import lora
import memory
import pretrain
import problem_sets
from common import count, nonnegative, positive
from model import Transformer, config_from_hf
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# Examples


def solution_pieces(solution, fmt):
    """A solution as (text, written by the model?) pieces: in a tool-integrated solution the contents of each
    ```output block are the sandbox's, the rest the model's."""
    if fmt != "tool":
        return [(solution, True)]
    pieces, pos = [], 0
    for m in re.finditer(r"(?<=```output)\n.*?\n```\n", solution, re.S):
        pieces += [(solution[pos:m.start()], True), (m.group(0), False)]
        pos = m.end()
    return pieces + [(solution[pos:], True)]


def make_examples(problems, tok, formats):
    """(ids, mask) per (problem, format): mask is 1 on the solution and its EOS, the tokens that carry loss.
    The sandbox's output in tool-integrated solutions carries none (as ToRA), and each piece is encoded apart,
    exactly as engine.complete splices outputs in at run time."""
    out = []
    for p in problems:
        for f in formats:
            if not p.get(f):
                continue
            prompt = engine.prompt_ids(tok, p["question"], f)
            ids, mask = list(prompt), [0] * len(prompt)
            pieces = solution_pieces(tok.answer_prefix + p[f], f)
            for k, (text, by_model) in enumerate(pieces):
                piece = tok.encode(text, eos=k == len(pieces) - 1)
                ids += piece
                mask += [int(by_model)] * len(piece)
            out.append((ids, mask))
    return out


def collate(examples, pad_id):
    """Right-pad to the longest: (x, y, mask) with y the next token and mask on the tokens predicted from them."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), pad_id, dtype=torch.long)
    m = torch.zeros((len(examples), T), dtype=torch.bool)
    for i, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        x[i, :n], y[i, :n] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
        m[i, :n] = torch.tensor(mask[1:], dtype=torch.bool)
    return x, y, m


def step_examples(examples, step, batch, seed):
    """The global batch of `step`: consecutive slices of a fresh permutation each epoch, fixed by (seed, step)."""
    per_epoch = len(examples) // batch
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    return [examples[i] for i in order[k * batch:(k + 1) * batch]]


# -----------------------------------------------------------------------------
# Training


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", default="out/toy/base", help="the model to fine-tune (a Hugging Face directory)")
    ap.add_argument("--data", default="out/toy/data/problems/train.jsonl", help="problems with solutions")
    ap.add_argument("--eval-data", default="out/toy/data/problems/test.jsonl", help="held-out problems")
    ap.add_argument("--formats", default="cot", help="solution fields to train on, one example each: any of "
                    "cot,pot,tool (the toy default trains CoT only, to fit its time budget)")
    ap.add_argument("--out", default="out/toy/sft")
    ap.add_argument("--max-steps", type=positive, default=240)
    ap.add_argument("--batch", type=positive, default=64, help="examples per optimizer step, all ranks (paper: 256)")
    ap.add_argument("--micro-batch", type=positive, default=None, help="examples per forward/backward per rank "
                    "(default: 16 below 1B parameters, 4 above)")
    ap.add_argument("--lr", type=nonnegative, default=1e-3, help="constant LR after warmup (paper: 5e-5 at 7B)")
    lora.add_args(ap)
    common.add_training_args(ap, warmup=10, schedule="constant", ckpt_every=100)
    ap.add_argument("--eval-problems", type=count, default=500, help="held-out problems for the final accuracy")
    ap.add_argument("--gen-batch", type=positive, default=None, help="sequences per generate call in that evaluation "
                    "(default: 64 below 1B parameters, 32 above)")
    problem_sets.add_problem_args(ap)
    engine.add_chat_args(ap)
    return ap.parse_args(argv)


def main(args):
    d = common.init_dist(args.dtype)
    torch.manual_seed(args.seed)
    common.require_model(args.init, parse_args([]).init, d, lambda: pretrain.main(pretrain.parse_args([])))
    tok = Tokenizer.load(args.init)
    engine.use_chat_args(tok, args)
    problems, held_out, dropped = problem_sets.problems_and_held_out(args)
    common.print0(d, dropped)
    config = config_from_hf(args.init)
    common.size_defaults(args, config, d, micro_batch=(16, 4), gen_batch=(64, 32))
    formats = args.formats.split(",")
    found = {f: sum(bool(p.get(f)) for p in problems) for f in formats}
    common.print0(d, f"{args.data}: solutions by format: " + ", ".join(f"{f} {n}" for f, n in found.items()))
    for f in (f for f, n in found.items() if n == 0):
        common.print0(d, f"{args.data}: no problem has a {f!r} solution: --formats {f} trains on nothing")
    examples = make_examples(problems, tok, formats)
    fits = [e for e in examples if len(e[0]) <= config.max_seq_len]  # real MATH solutions can pass 4K tokens
    if len(fits) < len(examples):
        common.print0(d, f"{args.data}: {len(examples) - len(fits)} of {len(examples)} examples are longer than the "
                         f"model's {config.max_seq_len} positions: skipped")
    examples = fits
    if len(examples) < args.batch:
        raise SystemExit(f"error: {args.data}: {len(examples)} examples, fewer than one batch of {args.batch}")
    if args.batch % (args.micro_batch * d.world):
        raise SystemExit(f"error: --batch {args.batch} is not a multiple of micro-batch x ranks = {args.micro_batch} x "
                         f"{d.world}")
    longest = max(len(e[0]) for e in examples)
    ac = common.checkpointed_blocks(args.activation_checkpointing, d, config.n_layers, lambda k: memory.train_peak(
        memory.train_plan(config, d.world, args.micro_batch, longest, k, args.lora_rank)))
    model = common.build_model(config, d, seed=args.seed, init_dir=args.init, checkpointed=ac, adapters=lora.of(args),
                               compile=args.compile)
    optim = common.Optim.of(args)
    opt = common.make_optimizer(model, optim)
    step = common.start_run(args, d, model, opt, ("init", "data", "formats", "batch", "seed"))
    common.print0(d, f"{len(examples)} examples ({args.formats}) from {len(problems)} problems; "
                       f"{args.max_steps} steps of {args.batch} on {d.world} rank(s)")
    log = common.Log(args.out, d, args.max_steps, step, args=args)
    model.train()
    per_rank = args.batch // d.world
    with common.StopFlag() as stop:  # the signal handlers are the run's only while it runs
        while step < args.max_steps:
            t0 = time.time()
            mine = step_examples(examples, step, args.batch, args.seed)[d.rank * per_rank:(d.rank + 1) * per_rank]
            mine.sort(key=lambda e: len(e[0]))  # similar lengths share a micro-batch: little padding
            micro = [collate(mine[i:i + args.micro_batch], tok.pad_id) for i in range(0, per_rank, args.micro_batch)]
            loss, norm, n = common.train_step(model, opt, micro, d, optim, step)
            step += 1
            log(dict(step=step, loss=loss, lr=opt.param_groups[0]["lr"], grad_norm=norm,
                     tokens_per_s=n / (time.time() - t0)))
            common.save_or_stop(stop, args.out, model, opt, step, d,
                                step % args.ckpt_every == 0 or step == args.max_steps)
    log.close()
    common.export_hf(model, args.out, args.init, d, adapter_of=args.init if args.export_adapter else None)
    del model, opt

    # Held-out greedy accuracy of the exported model: each rank evaluates its share with a full copy.
    if d.world > 1:
        torch.distributed.barrier()
    held_out = held_out[:args.eval_problems]
    if held_out:
        final = Transformer.from_pretrained(args.out, device=d.device)
        acc = evaluate.held_out_metrics(final, tok, held_out, d, prompt="cot",  # greedy, graded by reward.py
                                        batch=args.gen_batch)["accuracy"]
        if d.main:
            with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(dict(step=step, eval_greedy_accuracy=acc, eval_problems=len(held_out))) + "\n")
        common.print0(d, f"held-out greedy accuracy (CoT): {acc:.3f} on {len(held_out)} problems")
    common.print0(d, f"saved {args.out}")
    common.finish(d)


if __name__ == "__main__":
    with common.one_line_errors():
        main(parse_args())
