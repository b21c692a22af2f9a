"""Memory plans (--dry-run): what a run holds per GPU, phase by phase, counted on the meta device.

Activations are what autograd keeps from one block's forward, counted by identity with a saved-tensors hook
on a block built on the meta device (nothing allocated); weights, gradients and AdamW state follow from the
parameter count and the FSDP2 sharding; the LM head's working memory and the rollouts' KV cache from their
shapes. pretrain.py and sft.py plan with train_plan, grpo.py with grpo_plan; gpu_check.py sets a plan beside
the memory a GPU measured (+1.2% on an H200 at 1B).

    python pretrain.py --dry-run --preset deepseek-math-7b
    python grpo.py --dry-run --preset deepseek-math-7b --world-size 8 --micro-batch 4 --gen-batch 32
"""

import dataclasses

import torch
import torch.nn.functional as F

from fused_kernels import CHUNK_ELEMENTS
import lora
from model import Transformer

GIB = 2 ** 30
AUTO_FRACTION = 0.9  # of a GPU's memory that --activation-checkpointing auto plans to fill: room for fragmentation

# -----------------------------------------------------------------------------
# Activations


class _FlashStandIn(torch.autograd.Function):
    """SDPA on the meta device, saving nothing: the math path it would take there saves (T, T) score matrices,
    which flash attention on a GPU never keeps; flash's own saved tensors are added by hand."""

    @staticmethod
    def forward(ctx, q, k, v):
        return q.new_empty(q.shape[:-1] + v.shape[-1:])

    @staticmethod
    def backward(ctx, g):
        return None, None, None


def saved_activation_bytes(block, x, cos, sin):
    """Bytes autograd keeps from one call of `block` for its backward, counted by identity: a tensor saved by
    several ops (or as several views) once, and the block's own weights (and views of them) not at all."""
    params = {id(p) for p in block.parameters()}
    seen, total = set(), [0]

    def pack(t):
        base = t if t._base is None else t._base
        if id(base) not in params and id(base) not in seen:
            seen.add(id(base))
            total[0] += base.numel() * base.element_size()
        return t
    keep = []  # hold the bases, so that no id is reused while counting
    with torch.autograd.graph.saved_tensors_hooks(lambda t: keep.append(t) or pack(t), lambda t: t):
        block(x, cos, sin)
    return total[0]


def activation_bytes(config, micro_batch, seq_len, checkpointed, dtype=torch.bfloat16):
    """Saved activations at their peak, over micro_batch x seq_len tokens, all blocks, with flash attention. Of
    the first `checkpointed` blocks (activation checkpointing) only the input is kept; each is recomputed in
    backward after the later blocks have freed theirs, so the peak is the larger of the forward's end and one
    recomputed block over the inputs kept."""
    with torch.device("meta"):
        block = Transformer(dataclasses.replace(config, n_layers=1)).layers[0].to(dtype)
        x = torch.empty(micro_batch, seq_len, config.dim, dtype=dtype, requires_grad=True)
        cos = torch.empty(1, seq_len, 1, config.head_dim, dtype=dtype)
        sdpa = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = lambda q, k, v, **kw: _FlashStandIn.apply(q, k, v)
        try:
            per_block = saved_activation_bytes(block, x, cos, cos)
        finally:
            F.scaled_dot_product_attention = sdpa
    bt, size = micro_batch * seq_len, torch.finfo(dtype).bits // 8
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    # flash keeps q and k (one tensor: RoPE's output), v, which is a view of the fused qkv projection's output and
    # so keeps all of it, and its own output
    per_block += bt * ((q + kv) + (q + 2 * kv) + q) * size
    per_block += bt * config.n_heads * 4  # and the log-sum-exp of each row, in fp32
    block_in = bt * config.dim * size
    kept = checkpointed * block_in
    return max((config.n_layers - checkpointed) * per_block + kept, kept + (per_block if checkpointed else 0))


def blocks_to_checkpoint(n_layers, peak_of, budget):
    """--activation-checkpointing auto: the fewest blocks to checkpoint for the plan's peak, peak_of(k) bytes
    with k blocks checkpointed, to fit in `budget`; all of them when nothing fits. Each block checkpointed costs
    a second forward of it in backward (a third more compute for the block), so none is where memory allows."""
    return next((k for k in range(n_layers + 1) if peak_of(k) <= budget), n_layers)


# -----------------------------------------------------------------------------
# Plans


def train_plan(config, world, micro_batch, seq_len, checkpointed, lora_rank=0, reference=False):
    """Per-GPU bytes for a FSDP2 run in bf16 with fp32 master weights, gradients and AdamW state, sharded over
    `world`; activations counted on the meta device (activation_bytes); the LM head's working memory: the
    logits never exist whole (model.loss, fused_kernels.hidden_token_loss), only a chunk of them, CHUNK_ELEMENTS
    or tokens x dim if more, in bf16 with its gradient written over it (the Triton path), and the two gradients
    made in the forward: the hidden states' (tokens x dim) and the head's (vocab x dim), in bf16. Frozen
    parameters (LoRA's base weights) are held in bf16 (common.build_model). reference: a frozen copy of the model
    is held beside it (the implicit reward model's π_ref), its bf16 shard."""
    with torch.device("meta"):
        model = Transformer(config)
        if lora_rank:
            lora.add_adapters(model, lora_rank, 2.0 * lora_rank)
    n = model.num_params()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)  # all, or the LoRA adapters
    layer_params = sum(p.numel() for p in model.layers[0].parameters())
    frozen = dict(frozen_bf16=2 * (n - trained) / world) if trained < n else {}
    return dict(parameters=n, trained=trained, params_fp32=4 * trained / world, **frozen,
                grads_fp32=4 * trained / world, adamw_fp32=8 * trained / world,
                gathered_bf16=2 * 2 * layer_params,  # the block in use and the next one, prefetched
                activations=activation_bytes(config, micro_batch, seq_len, checkpointed),
                logits=2 * (max(CHUNK_ELEMENTS, micro_batch * seq_len * config.dim)
                            + micro_batch * seq_len * config.dim + config.vocab_size * config.dim),
                **(dict(reference_bf16=2 * n / world) if reference else {}))


def train_peak(plan):
    """A train_plan's bytes in all."""
    return sum(v for k, v in plan.items() if k not in ("parameters", "trained"))


def print_train_plan(config, world, micro_batch, seq_len):
    """The plan of pretraining or SFT, without and with activation checkpointing, and what auto chooses."""
    for ac in (0, config.n_layers):
        plan = train_plan(config, world, micro_batch, seq_len, ac)
        n, _ = plan.pop("parameters"), plan.pop("trained")
        print(f"\n{n / 1e9:.2f}B parameters, FSDP2 over {world} GPUs, micro-batch {micro_batch} x {seq_len} tokens, "
              f"activation checkpointing {'on' if ac else 'off'}:")
        for k, v in plan.items():
            print(f"  {k:<14} {v / GIB:8.2f} GiB")
        print(f"  {'total':<14} {sum(plan.values()) / GIB:8.2f} GiB per GPU")
    print_auto(config.n_layers, lambda k: train_peak(train_plan(config, world, micro_batch, seq_len, k)))


def print_auto(n_layers, peak_of):
    """What --activation-checkpointing auto would choose on two common GPU sizes."""
    k80, k141 = (blocks_to_checkpoint(n_layers, peak_of, AUTO_FRACTION * gib * GIB) for gib in (80, 141))
    print(f"\n--activation-checkpointing auto (the default) checkpoints {k80} of {n_layers} blocks on an 80 GiB GPU "
          f"(peak {peak_of(k80) / GIB:.2f} GiB), {k141} on 141 GiB (peak {peak_of(k141) / GIB:.2f} GiB)")


def grpo_plan(config, world, micro_batch, gen_batch, prompt_tokens, max_new_tokens, checkpointed,
              reward_model=False, value_model=False, kept_decoder=False, lora_rank=0, rm_trained=False):
    """Per-GPU bytes of a GRPO run under FSDP2 (bf16 compute, fp32 master weights), by phase: pretraining's plan
    (train_plan) for the policy's training, plus the reference's shard (bf16: frozen), held all along; the
    rollouts: the whole policy gathered in bf16 (common.gathered) and a KV cache for gen_batch sequences; the
    reference's log-probs: the whole reference gathered; training: on more than one GPU also the gradients
    accumulated unsharded over the micro-batches (reduce-scattered once a step). Each reward model adds its
    shard (reward_model: how many models of the policy's size score the rollouts; True counts one), bf16 but
    the one --rm-refresh trains (rm_trained: fp32, and a phase of its own training); PPO's value model
    (--advantage gae) its shard, gradients and AdamW state.
    kept_decoder (--compile): the rollouts' Decoder keeps its bf16 copy of the policy and its KV cache all run
    long (a CUDA graph replays on them); the rollout phase is then the gather that refreshes the copy.
    lora_rank: fp32 weights, gradients and AdamW state for the adapters only, the base's shard in bf16, and no
    reference copy (lora.py); the adapters' own activations (r of every C numbers a projection sees) are not
    counted."""
    T = prompt_tokens + max_new_tokens
    plan = train_plan(config, world, micro_batch, T, checkpointed, lora_rank)
    n = plan["parameters"]
    held = dict(policy_fp32=plan["params_fp32"], grads_fp32=plan["grads_fp32"], adamw_fp32=plan["adamw_fp32"])
    if lora_rank:
        held["policy_frozen_bf16"] = plan["frozen_bf16"]
    else:
        held["reference_bf16"] = 2 * n / world
    if rm_trained:
        held["reward_model_fp32"] = 4 * n / world
    if int(reward_model) > int(rm_trained):
        held["reward_models_bf16"] = 2 * n * (int(reward_model) - int(rm_trained)) / world
    if value_model:
        held["value_model_fp32_params_grads_adamw"] = 16 * n / world
    kv_per_token = config.n_layers * 2 * config.n_kv_heads * config.head_dim * 2  # keys and values, bf16
    rollout = dict(gathered_bf16=2 * n, kv_cache=gen_batch * T * kv_per_token)
    if kept_decoder:
        held.update(decoder_bf16=2 * n, decoder_kv_cache=rollout.pop("kv_cache"))
    reference = dict(gathered_bf16=2 * n)  # π_ref gathered once for the step's micro-batches (fixed_logprobs)
    train = dict(gathered_blocks=plan["gathered_bf16"], activations=plan["activations"], logits=plan["logits"])
    if world > 1:  # gradients accumulated unsharded across micro-batches, reduce-scattered once (fp32: FSDP2's)
        train["grads_unsharded_fp32"] = 4 * plan["trained"]
    phases = dict(rollout=rollout, reference=reference, train=train)
    if reward_model:  # each reward model gathered whole to score the rollouts, one after the other: the implicit
        # form's π_φ and π_ref together (two models: an upper bound for an ensemble of heads, scored one at a time)
        phases["scoring"] = dict(gathered_bf16=2 * n * min(int(reward_model), 2))
    if rm_trained:  # between steps --rm-refresh trains the reward model (the policy's shape, micro-batches and
        # checkpointed blocks) with an AdamW of its own: sharded gradients and moments beside its activations
        phases["rm_refresh"] = dict(grads_fp32=4 * n / world, adamw_fp32=8 * n / world,
                                    gathered_blocks=plan["gathered_bf16"], activations=plan["activations"],
                                    logits=plan["logits"])
    return dict(parameters=n, trained=plan["trained"], held=held, **phases,
                peak=sum(held.values()) + max(sum(p.values()) for p in phases.values()))


def print_grpo_plan(config, world, micro_batch, gen_batch, prompt_tokens, max_new_tokens, lora_rank=0,
                    value_model=False, **models):
    """The plan of a GRPO (or PPO: value_model) run, without and with activation checkpointing; models: the rest
    of grpo_plan's keywords."""
    plans = [grpo_plan(config, world, micro_batch, gen_batch, prompt_tokens, max_new_tokens, k, lora_rank=lora_rank,
                       value_model=value_model, **models) for k in range(config.n_layers + 1)]
    for ac in (0, config.n_layers):
        plan = plans[ac]
        lora_text = f", LoRA rank {lora_rank} ({plan['trained'] / 1e6:.1f}M trained)" if lora_rank else ""
        print(f"\n{plan['parameters'] / 1e9:.2f}B parameters{lora_text}, {'PPO' if value_model else 'GRPO'} on "
              f"{world} GPUs: "
              f"rollouts of {gen_batch} x ({prompt_tokens} + {max_new_tokens}) tokens, training micro-batches of "
              f"{micro_batch}, activation checkpointing {'on' if ac else 'off'}; per GPU:")
        for phase in ("held", *(p for p in ("rollout", "reference", "scoring", "train", "rm_refresh") if p in plan)):
            items = "  ".join(f"{k} {v / GIB:.2f}" for k, v in plan[phase].items())
            print(f"  {phase:<10} {sum(plan[phase].values()) / GIB:6.2f} GiB  ({items})")
        print(f"  {'peak':<10} {plan['peak'] / GIB:6.2f} GiB  (held + the largest phase)")
    print_auto(config.n_layers, lambda k: plans[k]["peak"])
