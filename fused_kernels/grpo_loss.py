"""The GRPO per-token loss of paper Eq. 3-4 (docs/paper.md §5), forward and gradient in one pass.

With r = exp(logp - old_logp), advantage A, clip bounds (1 - eps_low, 1 + eps_high) and d = ref_logp - logp:

    loss = -min(r A, clip(r) A) + beta * kl,        kl = exp(d) - d - 1        (k3: >= 0, unbiased for KL)

Gradients with respect to logp (old_logp, ref_logp and A are constants):
    d(r A)/d logp = r A.  The min takes the clipped term only when it is smaller, and the clipped term has zero
    gradient outside the bounds; so d(-min)/d logp = -r A unless (A > 0 and r > 1 + eps_high) or
    (A < 0 and r < 1 - eps_low), where it is 0 (the clip binds).
    d kl / d logp = 1 - exp(d).

Dual clip (Ye et al., 2020; verl's clip_ratio_c), dual_clip = c > 1: for A < 0 the term -min(r A, clip(r) A) =
|A| max(r, clip(r)) grows with r without bound, so one token that π_θ made far likelier than π_old did (an
earlier update of the batch, μ > 1) can take over the loss; the term is capped at c |A|, binding where r > c,
its gradient 0 there. A > 0 is bounded by the clip already. Off (0) by default, as in the paper; at one update a
batch r = 1 and the cap never binds.

CISPO (MiniMax-M1, Chen et al., 2025), cispo=True: the policy term is -sg(w) A log π with the importance weight
truncated, w = min(r, 1 + eps_high), and no lower bound (the paper's choice). Written -sg(w/r) r A, its value is
-w A, as the clipped term's would be, and its gradient -w A on *every* token: where PPO's clip zeroes a token's
gradient, CISPO keeps it at the capped weight, so the rare tokens that moved most in the first update still learn.

The KL term in the loss, kl_loss="k2": 1/2 d^2 in place of k3 (the `kl` returned stays k3, the log's estimate of
the KL). On tokens drawn from π_θ, k3's gradient (1 - π_ref/π_θ) ∇log π_θ has the expectation
Σ (π_θ - π_ref) ∇log π_θ = -Σ π_ref ∇log π_θ: the gradient of the *forward* KL(π_ref ‖ π_θ). k2's,
(log π_θ - log π_ref) ∇log π_θ, has that of the reverse KL(π_θ ‖ π_ref), the one Eq. 3 writes. Both pull π_θ
toward π_ref; they part where π_θ puts mass that π_ref does not (k3 pushes it back more softly).
kl_loss="k3-is" (DeepSeek-V3.2's unbiased KL estimate): r k3, k3 weighted by the ratio to π_old, which drew the
tokens. Its expectation over π_old's tokens is KL(π_θ ‖ π_ref) and so is its gradient's, whatever π_old is:
d(r k3)/d logp = r k3 + r (1 - exp(d)) = -r d, the reverse KL's gradient r-weighted. On-policy (μ = 1, r = 1
with r's gradient kept) its value is k3's and its gradient k2's; once π_θ has moved from π_old (μ > 1), neither
k3 nor k2 is unbiased and r k3 still is.

The memory problem is small here (a few (N,) vectors), but an unfused PyTorch version launches ~15 kernels
and keeps their intermediates for autograd; the fused kernel reads 4 floats and writes 4 per token.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

KL_TERMS = ("k3", "k2", "k3-is")  # the KL term in the loss, by the kernel's KL number


def grpo_loss_torch(logp, old_logp, ref_logp, advantages, clip_low, clip_high, beta, cispo=False, kl_loss="k3",
                    dual_clip=0.0):
    """The reference, in plain autograd (works in float64 for tests)."""
    r = torch.exp(logp - old_logp)
    if cispo:
        pg = -(r.clamp(max=1 + clip_high) / r).detach() * r * advantages
    else:
        pg = -torch.minimum(r * advantages, r.clamp(1 - clip_low, 1 + clip_high) * advantages)
        if dual_clip:
            pg = torch.where(advantages < 0, torch.minimum(pg, -dual_clip * advantages), pg)
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1
    return pg + beta * {"k3": kl, "k2": 0.5 * d ** 2, "k3-is": r * kl}[kl_loss], kl


if triton is not None:
    @triton.jit
    def _grpo_fwd(lp_ptr, old_ptr, ref_ptr, adv_ptr, loss_ptr, kl_ptr, dloss_ptr, dkl_ptr, N, clip_low, clip_high,
                  dual_clip, beta, CISPO: tl.constexpr, KL: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < N
        lp = tl.load(lp_ptr + i, mask=mask, other=0.0)
        old = tl.load(old_ptr + i, mask=mask, other=0.0)
        ref = tl.load(ref_ptr + i, mask=mask, other=0.0)
        a = tl.load(adv_ptr + i, mask=mask, other=0.0)
        r = tl.exp(lp - old)
        if CISPO:
            pg = -tl.minimum(r, 1 + clip_high) * a
            dpg = pg
        else:
            clipped = tl.minimum(tl.maximum(r, 1 - clip_low), 1 + clip_high)
            pg = -tl.minimum(r * a, clipped * a)
            binds = ((a > 0) & (r > 1 + clip_high)) | ((a < 0) & (r < 1 - clip_low))
            capped = (a < 0) & (dual_clip > 0) & (r > dual_clip)  # the dual clip's cap binds (0: off)
            pg = tl.where(capped, -dual_clip * a, pg)
            dpg = tl.where(binds | capped, 0.0, -r * a)
        d = ref - lp
        ed = tl.exp(d)
        kl = ed - d - 1
        dkl = 1 - ed
        if KL == 1:  # the KL term in the loss, and its derivative in lp: k2
            penalty, dpenalty = 0.5 * d * d, -d
        elif KL == 2:  # k3-is
            penalty, dpenalty = r * kl, -r * d
        else:  # k3
            penalty, dpenalty = kl, dkl
        tl.store(loss_ptr + i, pg + beta * penalty, mask=mask)
        tl.store(kl_ptr + i, kl, mask=mask)
        tl.store(dloss_ptr + i, dpg + beta * dpenalty, mask=mask)
        tl.store(dkl_ptr + i, dkl, mask=mask)


class TritonGRPOLoss(torch.autograd.Function):
    BLOCK = 1024

    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, advantages, clip_low, clip_high, beta, cispo, kl_loss, dual_clip):
        ins = [t.float().contiguous() for t in (logp, old_logp, ref_logp, advantages)]
        N = ins[0].numel()
        loss, kl, dloss, dkl = (torch.empty_like(ins[0]) for _ in range(4))
        grid = (triton.cdiv(N, TritonGRPOLoss.BLOCK),)
        _grpo_fwd[grid](*ins, loss, kl, dloss, dkl, N, float(clip_low), float(clip_high),
                        float(dual_clip), float(beta),
                        CISPO=bool(cispo), KL=KL_TERMS.index(kl_loss), BLOCK=TritonGRPOLoss.BLOCK)
        ctx.save_for_backward(dloss, dkl)
        ctx.dtype = logp.dtype
        return loss, kl

    @staticmethod
    def backward(ctx, g_loss, g_kl):
        dloss, dkl = ctx.saved_tensors  # one of the two upstream gradients may be None (never both)
        terms = [g * d for g, d in ((g_loss, dloss), (g_kl, dkl)) if g is not None]
        grad = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        return grad.to(ctx.dtype), None, None, None, None, None, None, None, None, None
