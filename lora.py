"""LoRA (Hu et al., 2021): train a low-rank update of each projection, keep the model's weights frozen.

    W x  becomes  W x + (α / r) · B A x,    A: (r, in) random, B: (out, r) zero at the start

so at step 0 the model is exactly the one it started from, and its trainable state is r · (in + out) numbers per
projection instead of in · out: for DeepSeek-Math-7B at r = 16, 40M of 6.9B parameters. Three things follow for
GRPO (grpo.py --lora-rank): the reference model π_ref is the same model with the adapters switched off (no second
copy), checkpoints hold the adapters and their AdamW state only, and the rollouts decode merged weights W + (α/r) BA
(no extra work per token).

Our projections are fused (q, k and v in one qkv_proj; gate and up in one gate_up_proj, model.py), so an adapter
keeps one (A, B) pair per Hugging Face projection inside the fused one: that is what PEFT trains, and what
`export_adapter` writes in PEFT's layout (adapter_model.safetensors + adapter_config.json) for `peft` to load.
"""

import json
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import FUSED, part_sizes

TARGETS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def add_args(ap):
    """The LoRA flags of sft.py and grpo.py."""
    ap.add_argument("--lora-rank", type=int, default=0, metavar="R", help="train LoRA adapters of rank R on the "
                    "attention and MLP projections, the model frozen (0: train every weight)")
    ap.add_argument("--lora-alpha", type=float, default=None, help="LoRA's α: updates scaled by α/R (default 2R)")
    ap.add_argument("--export-adapter", action="store_true", help="with --lora-rank, also write the adapters in "
                    "PEFT's layout to <out>/adapter (the export itself has them merged)")


def of(args):
    """(rank, alpha) for common.build_model, or None without --lora-rank."""
    if args.lora_rank < 0:
        raise SystemExit(f"error: --lora-rank {args.lora_rank}: a rank R >= 1 (0: no adapters)")
    if args.export_adapter and not args.lora_rank:
        raise SystemExit("error: --export-adapter writes LoRA adapters: add --lora-rank R")
    return (args.lora_rank, args.lora_alpha or 2.0 * args.lora_rank) if args.lora_rank else None


class LoRALinear(nn.Linear):
    """A linear layer plus (α/r) B A for each of its `parts` (output sizes: the fused projection's pieces, or one).
    Its weight and bias keep nn.Linear's names, so state dicts and checkpoints of the base model still fit."""

    def __init__(self, in_features, out_features, bias, rank, alpha, parts):
        super().__init__(in_features, out_features, bias=bias)
        self.rank, self.scale, self.parts = rank, alpha / rank, list(parts)
        self.lora_A = nn.Parameter(torch.empty(len(self.parts) * rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank))
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        h = F.linear(x, self.lora_A).split(self.rank, dim=-1)  # (..., r) per part
        Bs = self.lora_B.split(self.parts, dim=0)
        return y + self.scale * torch.cat([F.linear(hi, Bi) for hi, Bi in zip(h, Bs)], dim=-1)


def delta(A, B, rank, scale, parts):
    """The weight (out, in) an adapter adds: (α/r) B_i A_i for each part, stacked."""
    return scale * torch.cat([b @ a for a, b in zip(A.split(rank, 0), B.split(parts, 0))], dim=0)


def add_adapters(model, rank, alpha):
    """Replace each block's projections by LoRALinear (on the model's device: build on meta, then load) and
    freeze everything but the adapters."""
    cfg = model.config
    for block in model.layers:
        for target in TARGETS:
            parent_name, attr = target.split(".")
            parent = getattr(block, parent_name)
            old = getattr(parent, attr)
            parts = part_sizes(target, cfg) if target in FUSED else [old.out_features]
            with torch.device(old.weight.device):
                setattr(parent, attr, LoRALinear(old.in_features, old.out_features, old.bias is not None, rank,
                                                 alpha, parts))
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def initial_adapters(model, seed):
    """The adapters' starting values, name -> tensor (CPU, fp32): A as PEFT draws it (Kaiming-uniform, a = √5),
    B zero, so that the model starts as the base model. Seeded: every rank and every run starts alike."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in adapters(model):
        bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform_(a=√5) on (r, in): U(-1/√in, 1/√in)
        state[f"{name}.lora_A"] = (torch.rand(m.lora_A.shape, generator=g) * 2 - 1) * bound
        state[f"{name}.lora_B"] = torch.zeros(m.lora_B.shape)
    return state


def adapters(model):
    """(name, LoRALinear) for each adapted projection, named as in the model's state dict (wrappers removed)."""
    return [(clean(name), m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def clean(name):
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


@contextmanager
def disabled(model):
    """The model without its adapters, π_ref under GRPO: the base weights only. A model without adapters (or
    None) passes."""
    mods = [m for _, m in adapters(model)] if model is not None else []
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def merged(state, model):
    """A full state dict (names as the model's) with each adapter merged into its weight and the adapters' own
    entries dropped: a plain model's weights, for the export and the rollouts."""
    out = {k: v for k, v in state.items() if ".lora_" not in k}
    for name, m in adapters(model):
        w = out[f"{name}.weight"]
        add = delta(state[f"{name}.lora_A"].float(), state[f"{name}.lora_B"].float(), m.rank, m.scale, m.parts)
        out[f"{name}.weight"] = (w.float() + add.to(w.device)).to(w.dtype)
    return out


def export_adapter(state, model, path, base_model):
    """PEFT's layout of the adapters in `state` (a full state dict): adapter_model.safetensors with one lora_A /
    lora_B pair per Hugging Face projection, and adapter_config.json, in directory `path`."""
    from safetensors.torch import save_file
    tensors, rank, alpha = {}, None, None
    for name, m in adapters(model):
        A, B = state[f"{name}.lora_A"], state[f"{name}.lora_B"]
        target = next(t for t in TARGETS if name.endswith(t))
        hf_names = FUSED.get(target, (target,))
        for hf, a, b in zip(hf_names, A.split(m.rank, 0), B.split(m.parts, 0)):
            key = f"base_model.model.model.{name.removesuffix(target)}{hf}"
            tensors[f"{key}.lora_A.weight"] = a.float().contiguous().cpu()
            tensors[f"{key}.lora_B.weight"] = b.float().contiguous().cpu()
        rank, alpha = m.rank, m.scale * m.rank
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    modules = sorted({n.split(".")[-1] for t in TARGETS for n in FUSED.get(t, (t,))})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(dict(peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=alpha, lora_dropout=0.0,
                       target_modules=modules, bias="none", fan_in_fan_out=False, use_rslora=False,
                       init_lora_weights=True, inference_mode=True, base_model_name_or_path=base_model), f,
                  indent=2)
