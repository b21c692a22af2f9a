"""Next-token pretraining, and the training machinery that sft.py and grpo.py share (paper §2.2-2.3).

The same script runs in one CPU process and under torchrun with FSDP2; beyond creating the process group there
is no code path only one of them takes. A run writes to --out: metrics.jsonl (one line per step), args.json,
sharded checkpoints (torch.distributed.checkpoint) under checkpoints/, and at the end the model as a Hugging Face
directory (config.json, model.safetensors, tokenizer files) in --out itself.

Paper settings (docs/paper.md §3): AdamW β 0.9/0.95, weight decay 0.1, peak LR 4.2e-4 with 2,000 warmup steps,
then the multi-step schedule (×0.316 at 80% of training, ×0.1 of peak at 90%), 10M-token batches of 4K context.

    python pretrain.py                                         # the toy: builds its data first if missing
    python pretrain.py --preset toy --max-steps 50 --out out/try
    torchrun --nproc_per_node 8 pretrain.py --preset deepseek-math-7b --data out/real --batch-tokens 10000000 \\
        --seq-len 4096 --micro-batch 1 --lr 4.2e-4 --warmup 2000 --activation-checkpointing
    python pretrain.py --dry-run --preset deepseek-math-7b --world-size 8    # memory plan, no training
"""

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
from model import PRESETS, CheckpointError, ModelConfig, Transformer
from tokenizer import TokenizerError

# -----------------------------------------------------------------------------
# Processes and devices


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def init_dist():
    """One process, or one of torchrun's: NCCL on GPUs, gloo on CPUs, chosen from what the machine has."""
    if "RANK" not in os.environ:
        return Dist(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu"))


@contextmanager
def one_line_errors():
    """Input a user can fix (a malformed jsonl line, a truncated checkpoint, a damaged tokenizer.json) ends a script
    with one line that names the file and the fix, and exit status 1: never a traceback from deep inside."""
    try:
        yield
    except (data.DataError, CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def print0(d, *a, **kw):
    if d.main:
        print(*a, **kw, flush=True)


def all_sum(d, x):
    """Sum of a float across ranks."""
    if d.world == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item()


# -----------------------------------------------------------------------------
# Building the model: meta device, FSDP2, then the initial weights broadcast from rank 0


def initial_state(config, init_dir, seed):
    """The starting weights as a full CPU state dict: a Hugging Face checkpoint (the paper starts from a code
    model) or a seeded random init. Built on rank 0 only, so every world size starts from the same weights."""
    if init_dir:
        return Transformer.from_pretrained(init_dir, dtype=torch.float32).state_dict()
    torch.manual_seed(seed)
    m = Transformer(config)
    m.init_weights()
    return m.state_dict()


def build_model(config, d, args, init_dir=None):
    """Build on the meta device (no memory), wrap each block for activation checkpointing and FSDP2 as asked,
    materialise only this rank's shard, then load the initial weights broadcast from rank 0."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.device("meta"):
        model = Transformer(config)
    for i, block in enumerate(model.layers):
        if args.activation_checkpointing:  # keep each block's input, recompute the rest in backward
            block = model.layers[i] = checkpoint_wrapper(block)
        if args.compile:
            block.compile()
    bf16 = d.device.type == "cuda" and args.dtype == "bfloat16"
    if d.world > 1:
        # bf16 compute copies of the params, fp32 sharded master weights, fp32 gradient reduction (torchtitan)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    model.to_empty(device=d.device)
    state = initial_state(config, init_dir, args.seed) if d.main else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=d.world > 1))
    model.reset_rope()  # buffers are not part of the state dict
    if d.world > 1:  # FSDP initialises lazily from the first forward, which must go through the root: do it now,
        with torch.no_grad():  # before generation calls blocks directly through model.hidden()
            model(torch.zeros(1, 1, dtype=torch.long, device=d.device))
        model.reshard()  # the root stays unsharded after a forward; the optimizer must see the sharded parameters
    return model


@contextmanager
def gathered(model):
    """Hold FSDP2's full parameters for a whole generation phase: each rank then decodes on its own, with no
    all-gather per token and no collective at all, so ranks may stop at different steps. No-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


# -----------------------------------------------------------------------------
# Optimizer and learning-rate schedule


def make_optimizer(model, args):
    """AdamW with weight decay on matrices only (not on norms and biases), as the paper's β and decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=args.weight_decay),
              dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)


def lr_factor(step, args):
    """Multiplier on the peak LR at `step` (0-based): linear warmup, then the paper's multi-step schedule
    (1 until 80% of training, 0.316 until 90%, then 0.1), cosine down to 0.1, or constant (SFT)."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    frac = step / max(args.max_steps, 1)
    if args.schedule == "multistep":
        return 1.0 if frac < 0.8 else 0.316 if frac < 0.9 else 0.1
    if args.schedule == "cosine":
        t = (step - args.warmup) / max(args.max_steps - args.warmup, 1)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0)))
    return 1.0


def set_lr(opt, step, args):
    """Give every parameter group the scheduled LR of `step` (0-based), and return it."""
    lr = args.lr * lr_factor(step, args)
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


# -----------------------------------------------------------------------------
# One optimizer step: the loss is a mean over the valid tokens of the whole batch, across micro-batches and ranks


def clip_grad_norm(model, max_norm):
    """Clip the gradients to max_norm; returns their total norm before clipping, as a float (under FSDP2 the
    norm is a DTensor: its full value is the norm over every rank's shard)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item()


def train_step(model, opt, micro_batches, d, args, step):
    """micro_batches: list of (x, y, mask) int64/bool tensors (B, T). Each token's loss is divided by the global
    count of valid tokens, so a batch's gradient does not depend on how it is split across micro-batches or ranks.
    FSDP averages gradients over ranks, hence the factor `world`. Returns (mean loss, grad norm, valid tokens)."""
    n_tokens = all_sum(d, sum(int(m.sum()) for _, _, m in micro_batches))
    if n_tokens == 0:
        raise ValueError(f"step {step}: no token carries a loss in this batch (is every answer masked?)")
    loss_sum = 0.0
    for x, y, mask in micro_batches:
        x, y, mask = x.to(d.device), y.to(d.device), mask.to(d.device)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda" and args.dtype == "bfloat16"):
            logits = model(x)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none") * mask.flatten()
        (losses.sum() * d.world / n_tokens).backward()
        loss_sum += losses.sum().item()
    loss = all_sum(d, loss_sum) / n_tokens
    if not math.isfinite(loss):
        raise FloatingPointError(f"step {step}: loss is {loss}; stopping before the optimizer step, so the last "
                                 "checkpoint stays good (lower --lr, or check the data)")
    norm = clip_grad_norm(model, args.grad_clip)
    set_lr(opt, step, args)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, norm, n_tokens


# -----------------------------------------------------------------------------
# Checkpoints: sharded with torch.distributed.checkpoint; resume continues exactly


def save_checkpoint(out, model, opt, step, d, extra=None):
    """checkpoints/step_NNNNNN: model and optimizer shards of every rank, the step (the data position: batches
    are a function of the step), the RNG state, and the weights of any `extra` models (name -> module, e.g.
    GRPO's reference). Written to a temporary name, then renamed: a run killed while saving keeps its previous
    checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    final = os.path.join(out, "checkpoints", f"step_{step:06d}")
    tmp = final + ".tmp"
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "step": torch.tensor(step), "rng": torch.get_rng_state()}
    state.update({name: get_model_state_dict(m) for name, m in (extra or {}).items()})
    with warnings.catch_warnings():  # in one process DCP warns that it saves without a process group: intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=tmp)
    if d.world > 1:
        dist.barrier()
    if d.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(os.listdir(os.path.dirname(final)))[:-2]:  # keep the last two
            shutil.rmtree(os.path.join(os.path.dirname(final), old), ignore_errors=True)
    if d.world > 1:
        dist.barrier()


def latest_checkpoint(out):
    ckpts = os.path.join(out, "checkpoints")
    names = sorted(n for n in os.listdir(ckpts) if not n.endswith(".tmp")) if os.path.isdir(ckpts) else []
    return os.path.join(ckpts, names[-1]) if names else None


def load_checkpoint(path, model, opt, extra=None):
    """Restore model, optimizer, RNG and `extra` models from a checkpoint; returns the step to continue from."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "step": torch.tensor(0), "rng": torch.get_rng_state()}
    state.update({name: get_model_state_dict(m) for name, m in (extra or {}).items()})
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path)
    except Exception as e:  # DCP's own errors name tensors but not the likely cause
        raise RuntimeError(f"{path}: cannot load this checkpoint into the model being built ({type(e).__name__}: "
                           f"{str(e)[:300]}). Was it written with another --preset or config?") from None
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for name, m in (extra or {}).items():
        set_model_state_dict(m, state[name])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def claim(out, d, resume=False):
    """Refuse to start while another live run writes to `out` (two runs in one directory corrupt each other's
    checkpoints and metrics): rank 0 keeps its pid in out/RUNNING until it exits. A fresh (not resumed) run
    then clears an earlier run's checkpoints and metrics, so that --resume can never pick up a stale step."""
    if not d.main:
        return
    import atexit
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "RUNNING")
    try:
        pid = int(open(path).read())
        os.kill(pid, 0)  # raises if no such process
        if pid != os.getpid():
            raise SystemExit(f"{out}: another run (pid {pid}) is writing here; wait for it, or use another --out")
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    atexit.register(lambda: os.path.exists(path) and os.remove(path))
    if not resume:
        shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
        open(os.path.join(out, "metrics.jsonl"), "w").close()


def require_model(path, toy_default, d, build):
    """`path` must be a Hugging Face model directory; the toy's default one is built by `build()` when missing
    (one process: a toy stage is built before any torchrun). Shared by sft.py and grpo.py."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    if path != toy_default:
        raise SystemExit(f"{path}: no config.json; --init takes a Hugging Face model directory")
    if d.world > 1:
        raise SystemExit(f"the toy model {path} is missing: build it once in one process (python grpo.py) first")
    build()


def check_resumable(out, args, keys):
    """A checkpoint continues only the run that wrote it: the settings in `keys` must match args.json."""
    path = os.path.join(out, "args.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        diff = {k: (saved.get(k), getattr(args, k)) for k in keys if saved.get(k) != getattr(args, k)}
        if diff:
            raise SystemExit(f"{out}: --resume with other settings than the run being resumed: "
                             + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items()))


def start_run(args, d, model, opt, keys, extra=None):
    """Claim args.out for this run and write its args.json; with --resume, first restore the last checkpoint of
    the run that wrote it (the settings in `keys` must match). Returns the step to start from."""
    claim(args.out, d, args.resume)
    step = 0
    if args.resume:
        check_resumable(args.out, args, keys)
        ckpt = latest_checkpoint(args.out)
        if ckpt is None:
            raise SystemExit(f"--resume: no checkpoint in {args.out}/checkpoints")
        step = load_checkpoint(ckpt, model, opt, extra)
        print0(d, f"resumed from {ckpt} at step {step}")
    if d.main:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    return step


def export_hf(model, out, tokenizer_dir, d):
    """Gather the full weights on rank 0 and write them, with the tokenizer, as a Hugging Face directory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        Transformer.save_pretrained(model, out, state_dict=state)
        if tokenizer_dir and os.path.abspath(tokenizer_dir) != os.path.abspath(out):
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out, name))


class StopFlag:
    """SIGTERM / SIGINT set a flag that the loop checks after each step: the run saves, then exits."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        self.raised = True

    def __call__(self, d):
        return all_sum(d, self.raised) > 0  # every rank stops together


class Log:
    """metrics.jsonl on rank 0; a progress bar on a terminal, a plain line per `every` steps elsewhere."""

    def __init__(self, out, d, total, start, every=10):
        self.d, self.every = d, every
        self.file = open(os.path.join(out, "metrics.jsonl"), "a") if d.main else None
        self.bar = None
        if d.main and sys.stderr.isatty() and "RANK" not in os.environ:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True)

    def __call__(self, row):
        if not self.d.main:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        if self.bar is not None:
            self.bar.update(1) if "loss" in row else None
            self.bar.set_description(text)
        elif row.get("step", 0) % self.every == 0 or "eval_loss" in row:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


# -----------------------------------------------------------------------------
# Memory plan (--dry-run)


def memory_plan(config, world, micro_batch, seq_len, ac):
    """Per-GPU bytes for a FSDP2 run in bf16 with fp32 master weights, gradients and AdamW state, sharded over
    `world`; activations counted by running one block on the meta device and summing what autograd saves.
    On meta, attention takes SDPA's math path, which saves (T, T) score matrices; flash attention on a GPU saves
    its output and a (B, H, T) fp32 log-sum-exp instead, so the count swaps one for the other."""
    def size(t):
        return 0 if t.dim() >= 2 and t.shape[-1] == t.shape[-2] == seq_len else t.numel() * t.element_size()
    with torch.device("meta"):
        model = Transformer(config)
        n = model.num_params()
        block = model.layers[0].to(torch.bfloat16)
        x = torch.empty(micro_batch, seq_len, config.dim, dtype=torch.bfloat16, requires_grad=True)
        cos = torch.empty(1, 1, seq_len, config.head_dim, dtype=torch.bfloat16)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(size(t)) or t, lambda t: t):
            block(x, cos, cos)
    per_block = sum(saved) + micro_batch * config.n_heads * seq_len * 4
    block_in = micro_batch * seq_len * config.dim * 2
    acts = (config.n_layers * block_in + per_block) if ac else config.n_layers * per_block
    logits = micro_batch * seq_len * config.vocab_size * (2 + 4 + 4)  # bf16 logits, fp32 copy, fp32 gradient
    layer_params = sum(p.numel() for p in model.layers[0].parameters())
    return dict(parameters=n, params_fp32=4 * n / world, grads_fp32=4 * n / world, adamw_fp32=8 * n / world,
                gathered_bf16=2 * 2 * layer_params,  # the block in use and the next one, prefetched
                activations=acts, logits=logits)


def dry_run(args):
    config = ModelConfig(**PRESETS[args.preset])
    print(f"{args.preset}: {asdict(config)}")
    for ac in (False, True):
        plan = memory_plan(config, args.world_size, args.micro_batch, args.seq_len, ac)
        n = plan.pop("parameters")
        total = sum(plan.values())
        print(f"\n{n / 1e9:.2f}B parameters, FSDP2 over {args.world_size} GPUs, micro-batch {args.micro_batch} x "
              f"{args.seq_len} tokens, activation checkpointing {'on' if ac else 'off'}:")
        for k, v in plan.items():
            print(f"  {k:<14} {v / 2**30:8.2f} GiB")
        print(f"  {'total':<14} {total / 2**30:8.2f} GiB per GPU")


# -----------------------------------------------------------------------------
# Pretraining


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="toy", choices=list(PRESETS), help="model size (model.PRESETS)")
    ap.add_argument("--init", help="start from this Hugging Face model directory instead of random weights")
    ap.add_argument("--data", default="out/toy/data", help="data.py output directory (shards/ and tokenizer/)")
    ap.add_argument("--mixture", default="math=0.6,code=0.2,general=0.2", help="source=weight,... (paper §2.3)")
    ap.add_argument("--out", default="out/toy/base", help="output directory")
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--batch-tokens", type=int, default=8192, help="tokens per optimizer step, all ranks")
    ap.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward per rank")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak LR (paper: 4.2e-4 at 7B; small models take more)")
    ap.add_argument("--warmup", type=int, default=30, help="warmup steps (paper: 2000)")
    ap.add_argument("--schedule", default="multistep", choices=["multistep", "cosine", "constant"])
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype on GPU "
                    "(CPU runs in float32)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block")
    ap.add_argument("--eval-every", type=int, default=50, help="held-out loss every N steps (0: never)")
    ap.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="print the per-GPU memory plan and exit")
    ap.add_argument("--world-size", type=int, default=8, help="GPUs, for --dry-run")
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
    d = init_dist()
    torch.manual_seed(args.seed)
    if not os.path.isfile(os.path.join(args.data, "shards", "math.json")):
        if args.data != parse_args([]).data:
            raise SystemExit(f"{args.data}: no shards/math.json; build it with: python data.py --out {args.data} ...")
        if d.main:  # the toy data: built once by rank 0
            data.build(data.parse_args(["--out", args.data]))
        if d.world > 1:
            dist.barrier()
    tok_dir = os.path.join(args.data, "tokenizer")
    per_step = args.micro_batch * args.seq_len * d.world
    if args.batch_tokens % per_step:
        raise SystemExit(f"--batch-tokens {args.batch_tokens} is not a multiple of micro-batch x seq-len x ranks "
                         f"= {args.micro_batch} x {args.seq_len} x {d.world} = {per_step}")
    accum = args.batch_tokens // per_step
    train, val = mixture(args, "train"), mixture(args, "val")
    config = ModelConfig(**{**PRESETS[args.preset], "vocab_size": train.vocab_size, "max_seq_len": max(args.seq_len, PRESETS[args.preset]["max_seq_len"])}) \
        if not args.init else None
    if args.init:
        from model import config_from_hf
        config = config_from_hf(args.init)
    model = build_model(config, d, args, init_dir=args.init)
    opt = make_optimizer(model, args)
    step = start_run(args, d, model, opt, ("preset", "init", "data", "mixture", "batch_tokens", "seq_len", "seed"))
    n_params = sum(p.numel() for p in model.parameters()) if d.world == 1 else config_params(config)
    print0(d, f"{n_params / 1e6:.1f}M parameters, {d.world} rank(s) on {d.device}, {accum} micro-batches of "
              f"{args.micro_batch}x{args.seq_len} per rank per step, {args.max_steps} steps")
    log, stop = Log(args.out, d, args.max_steps, step), StopFlag()
    model.train()
    while step < args.max_steps:
        t0 = time.time()
        batches = []
        for k in range(accum):  # this rank's rows of the step's global batch, which is fixed by (seed, step)
            lo = (d.rank * accum + k) * args.micro_batch
            x, y = train.batch(step, range(lo, lo + args.micro_batch))
            batches.append((torch.from_numpy(x), torch.from_numpy(y), torch.ones(x.shape, dtype=torch.bool)))
        loss, norm, n = train_step(model, opt, batches, d, args, step)
        step += 1
        row = dict(step=step, loss=loss, lr=opt.param_groups[0]["lr"], grad_norm=norm,
                   tokens_per_s=n / (time.time() - t0))
        if d.device.type == "cuda":  # model FLOPs utilisation: 6N per token + attention, against bf16 dense peak
            flops = (6 * n_params + 12 * config.n_layers * config.dim * args.seq_len) * n / (time.time() - t0) / d.world
            row["mfu"] = flops / peak_flops(d.device)
        log(row)
        if args.eval_every and (step % args.eval_every == 0 or step == args.max_steps):
            log(dict(step=step, eval_loss=eval_loss(model, val, d, args)))
        if stop(d):
            save_checkpoint(args.out, model, opt, step, d)
            print0(d, f"stopped by signal at step {step}; continue with --resume")
            sys.exit(130)
        if step % args.ckpt_every == 0 or step == args.max_steps:
            save_checkpoint(args.out, model, opt, step, d)
    log.close()
    export_hf(model, args.out, tok_dir, d)
    print0(d, f"saved {args.out}")
    if d.world > 1:
        dist.destroy_process_group()


@torch.no_grad()
def eval_loss(model, val, d, args, batches=4):
    model.eval()
    total, n = 0.0, 0
    for k in range(batches):
        x, y = val.batch(k, range(d.rank * args.micro_batch, (d.rank + 1) * args.micro_batch))
        x, y = torch.from_numpy(x).to(d.device), torch.from_numpy(y).to(d.device)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda" and args.dtype == "bfloat16"):
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        n += y.numel()
    model.train()
    return all_sum(d, total) / all_sum(d, n)


def config_params(config):
    with torch.device("meta"):
        return Transformer(config).num_params()


def peak_flops(device):
    """Dense bf16 peak of the GPU, for MFU (H100 SXM 989 TFLOP/s; A100 312)."""
    name = torch.cuda.get_device_name(device)
    return 989e12 if "H100" in name or "H200" in name else 312e12 if "A100" in name else float("nan")


if __name__ == "__main__":
    with one_line_errors():
        main(parse_args())
