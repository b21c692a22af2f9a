"""What every trainer shares: processes, FSDP2 wrapping, the optimizer and its schedule, one optimizer step,
checkpoints and resume, logging, and the export to a Hugging Face directory.

pretrain.py, sft.py, reward_model.py and grpo.py each keep their own loop in view and call these pieces, passing
values, not their command lines: a script's flags become a Dist (where and in what dtype it computes), an Optim (the
optimizer step's settings) and the keyword arguments of build_model; only the run's record (args.json, resume's
check, the W&B config) and the size defaults it fills in take the parsed flags whole. The same
code runs in one CPU process and under torchrun: FSDP2 wraps the model only when there is more than one rank, and
everything else (the batch each rank sees, the loss normalisation, checkpoints) is written so that one process and
N ranks compute the same thing. Nothing here knows about a particular stage's data or loss beyond next-token
cross-entropy (train_step), which pretraining and SFT share.
"""

import argparse
import atexit
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

import jsonl
import lora
import memory
from model import CheckpointError, Transformer
from tokenizer import Tokenizer, TokenizerError

# -----------------------------------------------------------------------------
# The flags every trainer takes


@dataclass
class Optim:
    """The settings of an optimizer step: AdamW's peak LR and weight decay (on matrices), the global gradient
    norm's clip, and the LR schedule over max_steps (lr_factor). Optim.of(args) reads a trainer's flags
    (add_training_args', --lr and --max-steps), whose defaults are these."""
    lr: float
    max_steps: int
    warmup: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    @classmethod
    def of(cls, args):
        return cls(args.lr, args.max_steps, args.warmup, args.schedule, args.weight_decay, args.grad_clip)


def add_training_args(ap, *, warmup, schedule, ckpt_every, weight_decay=Optim.weight_decay, helps=None):
    """The optimizer, schedule, precision, checkpoint and logging flags of pretrain.py, sft.py, grpo.py and
    reward_model.py, spelled once; a stage gives its own defaults, and helps={flag: text} for a flag whose meaning
    it sharpens."""
    def add(flag, help=None, **kw):
        ap.add_argument(flag, help=(helps or {}).get(flag, help), **kw)
    add("--warmup", type=count, default=warmup, help="warmup steps")
    add("--schedule", default=schedule, choices=["constant", "cosine", "multistep"], help="LR after --warmup "
        "(lr_factor: cosine to a tenth of --lr; multistep: the paper's x0.316 and x0.1 at 80 and 90 percent of the "
        "steps)")
    add("--weight-decay", type=nonnegative, default=weight_decay)
    add("--grad-clip", type=nonnegative, default=Optim.grad_clip, help="max global gradient norm")
    add("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype on GPU (CPU runs in "
        "float32)")
    add("--activation-checkpointing", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
        help="recompute blocks in backward: on (every block; the flag alone), off, or auto (default): on a GPU the "
        "fewest blocks for the memory plan to fit 90%% of its memory, on a CPU none")
    add("--compile", action="store_true", help="torch.compile each block")
    add("--ckpt-every", type=positive, default=ckpt_every, help="checkpoint every N steps (and at the end and on "
        "SIGTERM)")
    add("--resume", action="store_true", help="continue from the last checkpoint in --out")
    add("--wandb", metavar="PROJECT", type=wandb_project, help="mirror metrics.jsonl to Weights & Biases (pip "
        "install wandb)")
    add("--seed", type=int, default=0)


def at_least(lo, kind=int):
    """An argparse type: a finite number of `kind` >= lo, else one line naming the flag (a count of 0 went on to a
    division by zero or an empty batch deep inside the run; a negative LR, β, clip or cap, or a nan, trained on)."""
    def number(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not (math.isfinite(x) and x >= lo):
            raise argparse.ArgumentTypeError(f"{text}: expected {lo} or more" if kind is int else
                                             f"{text}: expected a finite number >= {lo}")
        return x
    return number


# the types of the scripts' flags that count things, and of their rates, weights, clips and temperatures
count, positive, nonnegative = at_least(0), at_least(1), at_least(0.0, float)


def wandb_project(name):
    """--wandb's value, refused at the command line (one line, exit 2) where wandb is not installed: not after
    the model is built."""
    import importlib.util
    if importlib.util.find_spec("wandb") is None:
        raise argparse.ArgumentTypeError("wandb is not installed: pip install wandb, or leave out --wandb")
    return name


# -----------------------------------------------------------------------------
# Processes and devices


@dataclass
class Dist:
    """This process: its rank of `world`, its device, and the dtype its forwards compute in (bf16 on a GPU under
    --dtype bfloat16, where FSDP2 also gathers the parameters in it and the export is written in it; else fp32)."""
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype = torch.float32

    @property
    def main(self):
        return self.rank == 0

    @property
    def fsdp(self):
        """Whether build_model wraps models in FSDP2: on more than one rank, and in one process computing in bf16
        (a group of one), where FSDP2's mixed precision gives the forward bf16 parameters over fp32 master
        weights, as on 8 GPUs. Autocast alone would keep the parameters fp32, and with them the residual stream,
        the norms and RoPE."""
        return self.world > 1 or self.dtype != torch.float32


def one_process(device, dtype=torch.float32):
    """This process alone, on `device`; computing in bf16 it joins a process group of one (an in-memory store,
    no torchrun) for FSDP2 (Dist.fsdp). Calling it again reuses the group. The group ends with the run (finish)
    or, where the process exits another way (a one-line error, a SystemExit), at exit: NCCL prints a warning at
    teardown of a group never destroyed, after the error line that should have been the last."""
    d = Dist(0, 1, torch.device(device), dtype)
    if d.fsdp and not dist.is_initialized():
        dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
        atexit.register(end_group_of_one)
    return d


def end_group_of_one():
    """Destroy this process's group of one (one_process), if it has one."""
    if dist.is_initialized() and dist.get_world_size() == 1:
        dist.destroy_process_group()


def init_dist(dtype):
    """One process, or one of torchrun's: NCCL on GPUs, gloo on CPUs, chosen from what the machine has. dtype: the
    --dtype flag ("bfloat16" or "float32"), which a CPU overrides (it computes in fp32)."""
    cuda = torch.cuda.is_available()
    compute = torch.bfloat16 if cuda and dtype == "bfloat16" else torch.float32
    if "RANK" not in os.environ:
        return one_process("cuda" if cuda else "cpu", compute)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu"), compute)


@contextmanager
def one_line_errors():
    """Input a user can fix (a malformed jsonl line, a truncated checkpoint, a damaged tokenizer.json) and a loss or
    gradient that is no longer finite end a script with one line that names the file (or step) and the fix, and
    exit status 1: never a traceback from deep inside."""
    try:
        yield
    except (jsonl.DataError, CheckpointError, TokenizerError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def autocast(d):
    """The compute dtype's context (nothing in fp32). Every forward whose log-probs meet another's (policy,
    reference, old policy) runs under it, or the KL starts > 0."""
    return torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.dtype == torch.bfloat16)


def finish(d, status=0):
    """End a process of a run, on every rank together: wait for all of them (rank 0 may still be writing the
    export), destroy the process group, run the atexit handlers, and leave without the interpreter's teardown.
    destroy_process_group drops only the registry's references: the model's device mesh keeps the C++ gloo group
    alive until teardown frees it, and a gloo worker thread freed there can abort a rank whose work is done
    ("terminate called without an active exception", seen on gloo CPU ranks), which torchrun reports as a failed
    run. A non-zero status then exits (130: stopped by a signal)."""
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    end_group_of_one()
    if status:
        sys.exit(status)


def print0(d, *a, **kw):
    if d.main:
        print(*a, **kw, flush=True)


def all_sum(d, x):
    """Sum of a float across ranks."""
    return _all_reduce(d, x, dist.ReduceOp.SUM)


def all_max(d, x):
    """Largest value of a float across ranks."""
    return _all_reduce(d, x, dist.ReduceOp.MAX)


def all_gather_list(d, items):
    """Every rank's list, concatenated in rank order, on every rank (small Python objects: examples, records)."""
    if d.world == 1:
        return list(items)
    parts = [None] * d.world
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def _all_reduce(d, x, op):
    if d.world == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=op)
    return t.item()


def num_params(config):
    """Parameters of a model of this config, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return Transformer(config).num_params()


def size_defaults(args, config, d, **toy_and_large):
    """Batch sizes the user did not give (None), by model size: the toy's (fast on a CPU) below 1B parameters, safe
    ones for 80 GB GPUs above, with one line saying which. toy_and_large: flag name -> (toy value, large value)."""
    n = num_params(config)
    for name, (toy, large) in toy_and_large.items():
        if getattr(args, name) is None:
            setattr(args, name, toy if n < 1e9 else large)
            if n >= 1e9:
                print0(d, f"--{name.replace('_', '-')} not given: {large} for a {n / 1e9:.1f}B-parameter model "
                          f"(the toy's default is {toy})")


# -----------------------------------------------------------------------------
# Building the model: meta device, FSDP2, then the initial weights broadcast from rank 0


def require_model(path, toy_default, d, build):
    """`path` must be a Hugging Face model directory; the toy's default one is built by `build()` when missing
    (one process: a toy stage is built before any torchrun)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    if path != toy_default:
        raise SystemExit(f"error: {path}: no config.json; --init takes a Hugging Face model directory")
    if d.world > 1:
        raise SystemExit(f"error: the toy model {path} is missing: build it once in one process (python grpo.py) first")
    build()


def initial_state(config, init_dir, seed):
    """The starting weights as a full CPU state dict: a Hugging Face checkpoint (the paper starts from a code
    model) or a seeded random init. Built on rank 0 only, so every world size starts from the same weights. A
    reward or value model (config.head "score") starts from a language model's body with a new head at 0."""
    if init_dir:
        state = Transformer.from_pretrained(init_dir, dtype=torch.float32).state_dict()
        if config.head == "score" and "score.weight" not in state:
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
            state["score.weight"] = torch.zeros(1, config.dim)
        return state
    torch.manual_seed(seed)
    m = Transformer(config)
    m.init_weights()
    return m.state_dict()


def checkpointed_blocks(mode, d, n_layers, peak_of):
    """How many blocks --activation-checkpointing (mode) checkpoints: all (on), none (off), or auto: on a GPU the
    fewest for the memory plan's peak, peak_of(k) bytes with k of them checkpointed (memory.py), to fit in
    memory.AUTO_FRACTION of the GPU's memory; none on a CPU, whose memory the plan does not model."""
    if mode != "auto":
        return n_layers if mode == "on" else 0
    if d.device.type != "cuda":
        return 0
    budget = memory.AUTO_FRACTION * torch.cuda.get_device_properties(d.device).total_memory
    k = memory.blocks_to_checkpoint(n_layers, peak_of, budget)
    print0(d, f"--activation-checkpointing auto: {k} of {n_layers} blocks checkpointed (the memory plan's peak "
              f"{peak_of(k) / memory.GIB:.1f} GiB of {budget / memory.GIB:.1f})")
    return k


def build_model(config, d, *, seed, init_dir=None, checkpointed=0, adapters=None, compile=False, fixed_length=False,
                frozen=False):
    """Build on the meta device (no memory), with LoRA adapters (rank, alpha) if given (lora.py: all else
    frozen), or all frozen (`frozen`: π_ref, a reward model that is only read), wrap the first `checkpointed`
    blocks for activation checkpointing (checkpointed_blocks), compile each block if asked (for rows of any
    length, or of one: `fixed_length`, pretraining's) and FSDP2-wrap it, materialise only this rank's shard, then
    load the initial weights (init_dir's, or a random init from `seed`; the adapters' start from it too)
    broadcast from rank 0. Frozen parameters are kept in the compute dtype: with no update to accumulate they need
    no fp32 master copy (FSDP2 would cast them to it for every forward anyway, so the forwards are the same to the
    bit), and they take half the memory (at 7B: 12.9 GiB less for LoRA on one GPU, 1.6 GiB a GPU less for π_ref on
    eight)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    with torch.device("meta"):
        model = Transformer(config)
    if adapters:
        lora.add_adapters(model, *adapters)
    if frozen:
        model.requires_grad_(False)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(d.dtype)  # in place of the parameter: a tied head stays tied
    for i, block in enumerate(model.layers):
        if i < checkpointed:  # keep the block's input, recompute the rest in backward; the first blocks, as their
            # backward comes last, when the later blocks' activations are freed (memory.activation_bytes)
            block = model.layers[i] = checkpoint_wrapper(block)
        if compile:  # rows of another length each step or micro-batch: the length symbolic from the first call
            # (a graph specialised to the first length would serve that one call, then compile again)
            block.compile(dynamic=None if fixed_length else True)
    if d.fsdp:
        # compute-dtype copies of the params, fp32 sharded master weights, fp32 gradient reduction (torchtitan)
        mp = MixedPrecisionPolicy(param_dtype=d.dtype, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        register_fsdp_forward_method(model, "loss")  # the training forward gathers the root's weights too
    model.to_empty(device=d.device)
    state = initial_state(config, init_dir, seed) if d.main else {}
    if adapters and d.main:
        state.update(lora.initial_adapters(model, seed))
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=d.world > 1))
    model.reset_rope()  # buffers are not part of the state dict
    if d.fsdp:  # FSDP initialises lazily from the first forward, which must go through the root: do it now,
        with torch.no_grad():  # before generation calls blocks directly through model.hidden()
            model(torch.zeros(1, 1, dtype=torch.long, device=d.device))
        model.reshard()  # the root stays unsharded after a forward; the optimizer must see the sharded parameters
    return model


@contextmanager
def gathered(model, into=None):
    """A plain Transformer for a generation phase: FSDP2's full parameters gathered once and held, so each rank
    decodes on its own, with no all-gather per token and no collective at all (ranks may stop at different
    steps). The model it yields shares those parameters but has no FSDP2 hooks, activation-checkpoint or
    compile wrappers: nothing runs per block call but the block; its parameters are in the compute dtype
    (FSDP2's mixed precision gathers them so). Valid only inside the `with`. into: a plain Transformer kept by
    the caller (from a first `copy.deepcopy` of what this yields), into whose tensors the weights are copied and
    which is yielded instead: its memory stays where it is, as a CUDA graph captured on it needs. With LoRA the
    merged weights are new tensors, and the gathered ones would be a second copy beside them: the blocks are
    gathered, merged and released one at a time (merged_blocks)."""
    from torch.distributed.fsdp import FSDPModule
    mods, blocks = [m for m in model.modules() if isinstance(m, FSDPModule)], None
    if mods and lora.adapters(model):
        blocks, mods = merged_blocks(model), [model]  # only the root's own parameters left to gather
    for m in mods:
        m.unshard()
    try:
        view = plain_view(model, blocks)
        if into is not None:
            with torch.no_grad():
                for mine, theirs in zip(into.parameters(), view.parameters()):
                    mine.copy_(theirs)
            view = into
        yield view
    finally:
        for m in mods:
            m.reshard()


@contextmanager
def unsharded(model):
    """`model` itself, with FSDP2's full parameters gathered once for every forward inside the `with` (its hooks
    would gather each block again for each call), and resharded after. Its forwards run exactly as training's
    (hooks, compiled blocks and checkpoint wrappers kept), so log-probs made here meet the training forward's
    bit for bit where the computation is the same. A module without FSDP2 passes through."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not mods:
        yield model
        return
    model.set_reshard_after_forward(False)
    for m in mods:
        m.unshard()
    try:
        yield model
    finally:
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # the root's own: FSDP2 keeps it gathered after forward
        for m in mods:
            m.reshard()


def merged_blocks(model):
    """A LoRA model's blocks under FSDP2, their adapters merged into new weights (W + (α/r) BA): name -> tensor as
    in a plain Transformer's state dict. Each block is gathered, merged, and released before the next, so that
    at no time are more than one block's gathered weights held beside the merged ones."""
    state = {}
    for i, block in enumerate(model.layers):
        block.unshard()
        own = {lora.clean(n): p.detach() for n, p in block.named_parameters()}
        for name, t in lora.merged(own, block).items():  # what is not merged (norms, biases) is a gathered tensor
            state[f"layers.{i}.{name}"] = t.clone() if t is own.get(name) else t  # the reshard frees: a copy
        block.reshard()
    return state


def plain_view(model, blocks=None):
    """A Transformer on the same tensors as `model`, without the FSDP2 hooks, activation-checkpoint wrappers and
    compiled calls that build_model may have put on it and its blocks; LoRA adapters merged into new weights.
    blocks: the blocks' tensors, merged already (merged_blocks); the rest is then `model`'s own."""
    with torch.device("meta"):
        view = Transformer(model.config)
    state = {lora.clean(n): p.detach() for n, p in model.named_parameters(remove_duplicate=False)
             if blocks is None or not n.startswith("layers.")}
    view.load_state_dict(lora.merged(state, model) if blocks is None else {**state, **blocks}, strict=False,
                         assign=True)
    if model.config.tie_embeddings and model.config.head == "lm":
        view.lm_head.weight = view.embed_tokens.weight
    view.rope_cos, view.rope_sin = model.rope_cos, model.rope_sin
    return view.eval()


# -----------------------------------------------------------------------------
# Optimizer and learning-rate schedule


def make_optimizer(model, optim):
    """AdamW with weight decay on matrices only (not on norms and biases), as the paper's β and decay; on GPU the
    fused implementation (one kernel for all parameters), elsewhere foreach."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=optim.weight_decay),
              dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused, foreach=not fused)


def lr_factor(step, optim):
    """Multiplier on the peak LR at `step` (0-based): linear warmup, then the paper's multi-step schedule
    (1 until 80% of training, 0.316 until 90%, then 0.1), cosine down to 0.1, or constant (SFT)."""
    if step < optim.warmup:
        return (step + 1) / optim.warmup
    frac = step / max(optim.max_steps, 1)
    if optim.schedule == "multistep":
        return 1.0 if frac < 0.8 else 0.316 if frac < 0.9 else 0.1
    if optim.schedule == "cosine":
        t = (step - optim.warmup) / max(optim.max_steps - optim.warmup, 1)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0)))
    return 1.0


def set_lr(opt, step, optim):
    """Give every parameter group the scheduled LR of `step` (0-based), and return it."""
    lr = optim.lr * lr_factor(step, optim)
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


def train_step(model, opt, micro_batches, d, optim, step, loss_of=None):
    """micro_batches: list of (x, y, mask, *extra) tensors (B, T), mask bool. Each position's loss, the next-token
    cross-entropy −log π(y_t | x_≤t) (model.loss) or loss_of(model, x, y, *extra) (B, T) if given, is divided by the
    global count of valid positions, so a batch's gradient does not depend on how it is split across
    micro-batches or ranks. FSDP averages gradients over ranks, hence the factor `world`. Returns (mean loss, grad
    norm, valid positions)."""
    n_tokens = all_sum(d, sum(int(b[2].sum()) for b in micro_batches))
    if n_tokens == 0:
        raise ValueError(f"step {step}: no token carries a loss in this batch (is every answer masked?)")
    loss_sum = 0.0  # a tensor after the first micro-batch: read back once, after the last (no sync per micro-batch)
    for x, y, mask, *extra in micro_batches:
        x, y, mask, extra = x.to(d.device), y.to(d.device), mask.to(d.device), [e.to(d.device) for e in extra]
        with autocast(d):
            if loss_of is None:  # each position's loss -w·logp, w = its mask x world / n_tokens: d/d logp = -w
                w = mask.flatten().float() * (d.world / n_tokens)
                total, logp = model.loss(x, y, lambda lp, rows: (-lp * w[rows], -w[rows]))
                losses = -logp * mask  # (B, T), for the log
            else:
                losses = loss_of(model, x, y, *extra) * mask  # (B, T)
                total = losses.sum() * d.world / n_tokens
        total.backward()
        loss_sum = loss_sum + losses.detach().sum()
    loss = all_sum(d, float(loss_sum)) / n_tokens
    if not math.isfinite(loss):
        raise FloatingPointError(f"step {step}: loss is {loss}; stopping before the optimizer step, so the last "
                                 "checkpoint stays good (lower --lr, or check the data)")
    norm = clip_grad_norm(model, optim.grad_clip)
    set_lr(opt, step, optim)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, norm, n_tokens


# -----------------------------------------------------------------------------
# Checkpoints: sharded with torch.distributed.checkpoint; resume continues exactly


def _trained_only():
    """The policy's state in a checkpoint: what it trains (a LoRA run: the adapters; else every parameter); the
    frozen rest comes back from --init. Loading sets just those (strict=False): dcp.load has already failed if
    the checkpoint lacks any of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_checkpoint(out, model, opt, step, d, extra=None):
    """checkpoints/step_NNNNNN: model and optimizer shards of every rank, the step (the data position: batches
    are a function of the step), the RNG state, and any `extra` models: name -> module (weights, e.g. GRPO's
    reference) or (module, optimizer) (both, e.g. PPO's value model). Written to a temporary name, then renamed:
    a run killed while saving keeps its previous checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = os.path.join(out, "checkpoints", f"step_{step:06d}")
    tmp = final + ".tmp"
    msd, osd = get_state_dict(model, opt, options=_trained_only())
    state = {"model": msd, "optim": osd, "step": torch.tensor(step), "rng": torch.get_rng_state()}
    state.update(extra_states(extra))
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


def save_or_stop(stop, out, model, opt, step, d, due, extra=None):
    """The end of every trainer's step: a checkpoint when `due` (every --ckpt-every steps, the last one) or when a
    stop signal reached any rank (StopFlag), which then ends the run with status 130 once the checkpoint is
    written: `--resume` continues from there."""
    stopping = stop(d)
    if stopping or due:
        save_checkpoint(out, model, opt, step, d, extra)
    if stopping:
        print0(d, f"stopped by signal at step {step}; continue with --resume")
        finish(d, 130)


def extra_states(extra):
    """The state dicts of save_checkpoint's `extra`: a module's weights under its name, an optimizer's state
    under name + "_optim"."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    state = {}
    for name, m in (extra or {}).items():
        if isinstance(m, tuple):
            state[name], state[name + "_optim"] = get_state_dict(*m)
        else:
            state[name] = get_model_state_dict(m)
    return state


def latest_checkpoint(out):
    ckpts = os.path.join(out, "checkpoints")
    names = sorted(n for n in os.listdir(ckpts) if not n.endswith(".tmp")) if os.path.isdir(ckpts) else []
    return os.path.join(ckpts, names[-1]) if names else None


def load_checkpoint(path, model, opt, extra=None):
    """Restore model, optimizer, RNG and `extra` models from a checkpoint; returns the step to continue from."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict
    msd, osd = get_state_dict(model, opt, options=_trained_only())
    state = {"model": msd, "optim": osd, "step": torch.tensor(0), "rng": torch.get_rng_state()}
    state.update(extra_states(extra))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path)
    except Exception as e:  # DCP's own errors name tensors but not the likely cause
        raise RuntimeError(f"{path}: cannot load this checkpoint into the model being built ({type(e).__name__}: "
                           f"{str(e)[:300]}). Was it written with another --preset or config?") from None
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_trained_only())
    for name, m in (extra or {}).items():
        if isinstance(m, tuple):
            set_state_dict(*m, model_state_dict=state[name], optim_state_dict=state[name + "_optim"])
        else:
            set_model_state_dict(m, state[name])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def claim(out, d, resume=False):
    """Refuse to start while another live run writes to `out` (two runs in one directory corrupt each other's
    checkpoints and metrics): rank 0 keeps its pid in out/RUNNING until it exits. A fresh (not resumed) run
    then clears an earlier run's checkpoints and metrics, so that --resume can never pick up a stale step."""
    if not d.main:
        return
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # a file of that name, a read-only disk, another user's directory
        raise SystemExit(f"error: {out}: cannot make this directory ({e.strerror}); give another --out") from None
    path = os.path.join(out, "RUNNING")
    try:
        with open(path) as f:
            pid = int(f.read())
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pid = None  # no run recorded, or it has ended
    except PermissionError:
        pass  # it exists, and is another user's (a shared directory)
    if pid is not None and pid != os.getpid():
        raise SystemExit(f"error: {out}: another run (pid {pid}) is writing here; wait for it, or use another --out")
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    atexit.register(lambda: os.path.exists(path) and os.remove(path))
    if not resume:
        shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
        open(os.path.join(out, "metrics.jsonl"), "w").close()


def check_resumable(out, args, keys):
    """A checkpoint continues only the run that wrote it: the settings in `keys` must match args.json (a setting
    it does not record, from before the flag existed, is taken as matching)."""
    path = os.path.join(out, "args.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        diff = {k: (saved[k], getattr(args, k)) for k in keys if k in saved and saved[k] != getattr(args, k)}
        if diff:
            raise SystemExit(f"error: {out}: --resume with other settings than the run being resumed: "
                             + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items()))


def trim_metrics(out, step):
    """Drop the metrics lines a killed run wrote after its last checkpoint (and a line the kill cut short): the
    resumed run writes those steps again, and a curve must not show them twice."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return

    def row(line):
        try:
            return json.loads(line)
        except ValueError:
            return None

    with open(path) as f:
        rows = [r for r in map(row, f) if r is not None and r.get("step", 0) <= step]
    jsonl.write_jsonl(path, rows)  # through a temporary file: a second interruption here loses nothing


def start_run(args, d, model, opt, keys, extra=None):
    """Claim args.out for this run and write its args.json; with --resume, first restore the last checkpoint of
    the run that wrote it (the settings in `keys` must match). Returns the step to start from."""
    claim(args.out, d, args.resume)
    step = 0
    if args.resume:
        check_resumable(args.out, args, keys)
        ckpt = latest_checkpoint(args.out)
        if ckpt is None:
            raise SystemExit(f"error: --resume: no checkpoint in {args.out}/checkpoints")
        step = load_checkpoint(ckpt, model, opt, extra)
        if d.main:
            trim_metrics(args.out, step)
        print0(d, f"resumed from {ckpt} at step {step}")
    if d.main:
        save_args(args.out, args)
    return step


def save_args(out, args):
    """The settings a run was started with, out/args.json: what --resume checks (check_resumable)."""
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)


def export_hf(model, out, tokenizer_dir, d, adapter_of=None):
    """Gather the full weights on rank 0 and write them, with the tokenizer, as a Hugging Face directory: in the
    compute dtype (bf16 on GPU: half the bytes of the fp32 master weights), with the tokenizer's BOS and EOS.
    LoRA adapters are merged into the weights; adapter_of (the base model's name or directory) also writes them
    apart in PEFT's layout, to out/adapter."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        os.makedirs(out, exist_ok=True)
        if adapter_of:
            lora.export_adapter(state, model, os.path.join(out, "adapter"), adapter_of)
        state = lora.merged(state, model)
        if tokenizer_dir and os.path.abspath(tokenizer_dir) != os.path.abspath(out):
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out, name))
        tok = Tokenizer.load(tokenizer_dir or out)  # with its generation_config.json's stop ids
        Transformer.save_pretrained(model, out, state_dict=state, dtype=d.dtype, bos_id=tok.bos_id,
                                    eos_id=list(tok.stop_ids))


class StopFlag:
    """SIGTERM / SIGINT set a flag that the loop checks after each step: the run saves, then exits. Used as
    `with StopFlag() as stop:` around the loop, so the handlers it replaced come back when the run ends, however it
    ends: a process that outlived them (main() called from Python, a test) would otherwise ignore SIGTERM, and so
    would every process it forks later (a grading pool whose terminate() then waits forever)."""

    def __init__(self):
        self.raised = False
        self.replaced = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.replaced[sig] = signal.signal(sig, self._set)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.replaced.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    def _set(self, signum, frame):
        self.raised = True

    def __call__(self, d):
        return all_sum(d, self.raised) > 0  # every rank stops together


def eta(t0, done, left):
    """'3m12s, ETA 28m40s': the time since t0 (a time.time()) and what the `left` units still to do take at the
    rate of the `done` ones finished since then (a resumed run counts only its own)."""
    def hms(sec):
        sec = int(sec)
        return f"{sec // 3600}h{sec // 60 % 60:02d}m" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"
    spent = time.time() - t0
    return f"{hms(spent)}, ETA " + (hms(spent / done * left) if done else "?")


class Log:
    """metrics.jsonl on rank 0; a progress bar on a terminal, elsewhere a plain line per `every` steps with the time
    left; each training row also carries the step's peak GPU memory on CUDA; mirrored to Weights & Biases with
    --wandb PROJECT (imported only then; args: the run's flags, its W&B config)."""

    def __init__(self, out, d, total, start, every=10, args=None):
        self.d, self.every, self.total, self.start, self.t0 = d, every, total, start, time.time()
        self.file = open(os.path.join(out, "metrics.jsonl"), "a") if d.main else None
        self.bar = self.wandb = None
        if d.main and sys.stderr.isatty() and "RANK" not in os.environ:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True)
        if d.main and getattr(args, "wandb", None):
            import wandb
            self.wandb = wandb.init(project=args.wandb, name=os.path.basename(os.path.abspath(out)), dir=out,
                                    config=vars(args), resume="allow")

    def __call__(self, row):
        if not self.d.main:
            return
        if self.d.device.type == "cuda" and "loss" in row:
            row = dict(row, peak_memory_gib=torch.cuda.max_memory_allocated(self.d.device) / 2**30)
            torch.cuda.reset_peak_memory_stats(self.d.device)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=row.get("step"))
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        if self.bar is not None:
            self.bar.update(1) if "loss" in row else None
            self.bar.set_description(text)
        elif row.get("step", 0) % self.every == 0 or "eval_loss" in row:
            step = row.get("step", self.start)
            print(f"{text}  ({eta(self.t0, step - self.start, self.total - step)})", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
