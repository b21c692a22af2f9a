"""Fused kernels for GRPO's two memory- and launch-bound steps, each beside its PyTorch reference.

    hidden_logprobs(hidden, weight, targets) -> float32 log-probs from final hidden states, never holding all
        logits (model.forward(tokens, targets): π_ref, π_old, evaluation, the implicit reward model's training)
    hidden_token_loss(hidden, weight, targets, token_loss) -> (Σ loss, log-probs): a per-token loss of the
        log-probs with its gradient made in the forward pass, 3 GEMMs (model.loss: every training step)
    grpo_token_loss(logp, old_logp, ref_logp, advantages, clip_eps, beta) -> (loss, kl) per token
    token_logprobs(logits, targets) -> float32 log-probs, differentiable in the logits: for logits a caller
        already has (the benchmarks and tests; the model never makes the whole logits)

model.py computes its log-probs and losses with these, grpo.py its per-token objective. Triton runs on CUDA
tensors; elsewhere the PyTorch paths run. KERNELS_BACKEND=triton|torch forces one (tests run the Triton kernels
on the CPU with TRITON_INTERPRET=1). Derivations are in each module's docstring. (Not named `kernels`: that is the
import name of Hugging Face's kernel hub, which transformers imports at start-up; a folder of that name here
shadowed it and broke transformers in any process started from this directory.)

    python -m fused_kernels.bench          # time and peak memory, ours vs naive PyTorch (and torch.compile on GPU)
"""

import os

from .grpo_loss import KL_TERMS, TritonGRPOLoss, grpo_loss_torch
from .grpo_loss import triton as _triton
from .logprobs import (ChunkedLogprobs, HiddenLogprobs, HiddenTokenLoss, TritonLogprobs, grad_rows_torch,
                       grad_rows_triton, naive_logprobs, rows_torch, rows_triton)

__all__ = ["token_logprobs", "hidden_logprobs", "hidden_token_loss", "grpo_token_loss", "naive_logprobs",
           "grpo_loss_torch", "CHUNK_ELEMENTS", "KL_TERMS"]

CHUNK_ELEMENTS = 1 << 24  # logits alive at once in the chunked paths: 64 MB in fp32 (memory plans count it)


def backend(x):
    """'triton' for CUDA tensors when triton is installed, else 'torch'; KERNELS_BACKEND overrides."""
    forced = os.environ.get("KERNELS_BACKEND")
    if forced not in (None, "", "triton", "torch"):
        raise ValueError(f"KERNELS_BACKEND={forced!r}: expected 'triton' or 'torch'")
    if forced == "triton" and _triton is None:
        raise RuntimeError("KERNELS_BACKEND=triton but triton is not installed (pip install triton)")
    if forced:
        return forced
    return "triton" if _triton is not None and x.is_cuda else "torch"


def token_logprobs(logits, targets, chunk=None):
    """log softmax(logits)[target] over the last dimension, in float32 (logits may be bf16/fp16/fp32; any vocab
    size). logits (..., V), targets (...) of ids in [0, V): mask padded positions after, not with a sentinel.
    chunk: rows per fp32 working block of the PyTorch path (default: CHUNK_ELEMENTS in all)."""
    V = logits.shape[-1]
    chunk = chunk or max(1, CHUNK_ELEMENTS // V)
    flat, t = logits.reshape(-1, V), targets.reshape(-1)
    out = TritonLogprobs.apply(flat, t) if backend(logits) == "triton" else ChunkedLogprobs.apply(flat, t, chunk)
    return out.view(targets.shape)


def _rows_and_grad(x):
    """The backend's (log-probs and lse of logits rows, their gradient) pair."""
    return (rows_triton, grad_rows_triton) if backend(x) == "triton" else (rows_torch, grad_rows_torch)


def hidden_logprobs(hidden, weight, targets, budget=CHUNK_ELEMENTS, kept=None):
    """token_logprobs(hidden @ weight.T, targets) with at most `budget` logits alive at once: memory independent
    of tokens x vocab. hidden (..., C), weight (V, C) (the LM head), targets (...). Differentiable in hidden and
    weight, its backward making each chunk of logits again (logprobs.HiddenLogprobs): a loss of each token's
    log-prob alone trains through hidden_token_loss, which needs one GEMM less. kept (..., K): per target the
    ids its softmax is renormalised over, -1 after them (all -1: every id), as a top-k sampler drew them
    (DeepSeek-V3.2's keep-sampling mask; logprobs.keep_only)."""
    return HiddenLogprobs.apply(hidden, weight, targets, kept, budget, *_rows_and_grad(hidden))


def hidden_token_loss(hidden, weight, targets, token_loss, budget=CHUNK_ELEMENTS, kept=None):
    """(Σ_t loss_t, log-probs) for a loss of each token's log-prob, token_loss(logp (n,), rows: a slice of the
    flattened positions) -> (loss (n,), d loss / d logp (n,)), differentiable in hidden and weight, its gradient
    made in the forward pass (logprobs.HiddenTokenLoss). The log-probs (targets' shape, fp32) carry none. kept:
    as hidden_logprobs'."""
    return HiddenTokenLoss.apply(hidden, weight, targets, kept, token_loss, budget, *_rows_and_grad(hidden))


def grpo_token_loss(logp, old_logp, ref_logp, advantages, clip_eps=0.2, beta=0.04, cispo=False, kl_loss="k3",
                    dual_clip=None):
    """Per-token GRPO loss and k3 KL (paper Eq. 3-4): -min(r A, clip(r, 1-eps, 1+eps) A) + beta * kl.
    clip_eps is one number or (eps_low, eps_high) for an asymmetric clip. cispo: the policy term is CISPO's
    -sg(min(r, 1+eps_high)) A log π instead; kl_loss "k2": the KL term in the loss is 1/2 (log π - log π_ref)^2,
    whose gradient is the reverse KL's, "k3-is": r k3, unbiased under π_old's tokens (grpo_loss.py); the kl
    returned is k3 in every case. dual_clip c > 1: the policy term of A < 0 capped at -c A (dual-clip PPO).
    All inputs have one shape; the gradient flows to logp only. Normalisation over tokens and sequences is the
    caller's (grpo.py)."""
    if kl_loss not in KL_TERMS:
        raise ValueError(f"kl_loss={kl_loss!r}: expected one of {KL_TERMS}")
    if dual_clip is not None and (dual_clip <= 1 or cispo):
        raise ValueError(f"dual_clip={dual_clip!r}: a cap c > 1 on the clip's ratio for A < 0 (not with cispo, "
                         "whose weight is capped already)")
    low, high = (clip_eps, clip_eps) if isinstance(clip_eps, (int, float)) else clip_eps
    args = (logp, old_logp, ref_logp, advantages, low, high, beta, cispo, kl_loss, dual_clip or 0.0)
    return (TritonGRPOLoss.apply if backend(logp) == "triton" else grpo_loss_torch)(*args)
