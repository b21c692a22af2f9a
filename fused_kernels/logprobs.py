"""Token log-probabilities: log softmax(logits)[target] for every row, and its gradient.

For a row x of V logits and target t:      logp = x_t - lse(x),   lse(x) = log sum_j exp(x_j)
and for an upstream gradient g:            d logp / d x_j = [j = t] - softmax(x)_j
so                                          grad_x = g * (onehot(t) - exp(x - lse)).

The memory problem: GRPO's logits are (tokens x vocab), 16K x 102400 in bf16 is 3.4 GB. The naive
`log_softmax(logits.float()).gather(...)` keeps an fp32 copy and an fp32 log-softmax for backward, and its
backward makes more: several times the logits at peak. Both paths here keep only one float per row (lse):
- `ChunkedLogprobs` (PyTorch, any device): fp32 work on `chunk` rows at a time; backward recomputes softmax from
  the saved lse and writes the gradient in the logits' dtype.
- `TritonLogprobs` (CUDA, or the CPU under TRITON_INTERPRET=1): one program per row streams the vocabulary in
  blocks with an online max and sum, one exp per logit (forward reads the logits once); backward reads them once
  more and writes the gradient once.
From the final hidden states and the LM head two functions go one step further and never hold more than a
fixed budget of logits at all: `HiddenLogprobs` (log-probs: model.forward(tokens, targets), its backward making
the logits again) and `HiddenTokenLoss` (a loss of the log-probs with its gradient made in the forward pass:
model.loss, every training step).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton still have the PyTorch paths
    triton = None


def naive_logprobs(logits, targets):
    """The reference: simple, exact, and memory-hungry (fp32 copies of the whole logits)."""
    return logits.float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]


def _onehot_minus_softmax(x, lse, targets, g):
    """g * (onehot(t) - exp(x - lse)) for fp32 rows x (n, V)."""
    p = torch.exp(x - lse[:, None]).neg_().mul_(g[:, None])
    p[torch.arange(len(x), device=x.device), targets] += g
    return p


class ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, chunk):
        N = logits.shape[0]
        out = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        for i in range(0, N, chunk):
            x = logits[i:i + chunk].float()
            lse[i:i + chunk] = x.logsumexp(-1)
            out[i:i + chunk] = x.gather(-1, targets[i:i + chunk, None])[:, 0] - lse[i:i + chunk]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        g = g.float()
        for i in range(0, len(logits), ctx.chunk):
            s = slice(i, i + ctx.chunk)
            grad[s] = _onehot_minus_softmax(logits[s].float(), lse[s], targets[s], g[s]).to(logits.dtype)
        return grad, None, None


if triton is not None:
    @triton.jit
    def _logprobs_fwd(x_ptr, stride, t_ptr, out_ptr, lse_ptr, V, BLOCK: tl.constexpr):
        # one exp per logit: the running max is the block's, one number, so the sum is rescaled once per block. A
        # max per lane took two, as many as an H200's exp units issue while its memory streams bf16 logits
        # (docs/kernels.md): that kernel reached 78% of copy bandwidth there
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        m = float("-inf")  # running max
        s = 0.0  # running sum of exp(x - m)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows of -inf so far: exp(-inf) = 0, not NaN
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
            m = m_new
        lse = m + tl.log(s)
        t = tl.load(t_ptr + row)
        xt = tl.load(base + t).to(tl.float32)
        tl.store(out_ptr + row, xt - lse)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _logprobs_bwd(x_ptr, stride, t_ptr, lse_ptr, g_ptr, dx_ptr, dstride, V, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        g = tl.load(g_ptr + row)
        lse = tl.load(lse_ptr + row)
        t = tl.load(t_ptr + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            d = g * (tl.where(cols == t, 1.0, 0.0) - tl.exp(x - lse))
            tl.store(dx_ptr + row * dstride + cols, d.to(dx_ptr.dtype.element_ty), mask=cols < V)


# Launch settings: Liger-Kernel's for the same two loops (its triton_grpo_loss reached 93% of copy bandwidth on the
# 2026-12-04 H200 run, ours 78% with 4 warps each way): the forward one warp a row, so that a block's max and sum
# need no exchange between warps, the backward 16. BLOCK is cut to the vocabulary's size.
FORWARD = dict(BLOCK=2048, num_warps=1, num_stages=2)
BACKWARD = dict(BLOCK=4096, num_warps=16, num_stages=1)


def _launch(config, V):
    return dict(config, BLOCK=min(config["BLOCK"], triton.next_power_of_2(V)))


class TritonLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        out, lse = rows_triton(logits, targets)
        ctx.save_for_backward(logits, targets, lse)
        return out

    @staticmethod
    def backward(ctx, g):
        logits, targets, lse = ctx.saved_tensors
        return _grad_rows(logits, targets, lse, g, torch.empty_like(logits)), None


def rows_torch(x, targets):
    """(log-probs, lse) of logits rows x (n, V) at the targets, in fp32."""
    x = x.float()
    lse = x.logsumexp(-1)
    return x.gather(-1, targets[:, None])[:, 0] - lse, lse


def rows_triton(x, targets):
    """rows_torch with the Triton forward kernel: one read of the logits."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    N, V = x.shape
    out = torch.empty(N, dtype=torch.float32, device=x.device)
    lse = torch.empty(N, dtype=torch.float32, device=x.device)
    _logprobs_fwd[(N,)](x, x.stride(0), targets, out, lse, V, **_launch(FORWARD, V))
    return out, lse


def grad_rows_torch(x, targets, lse, g):
    """g (onehot(targets) - softmax(x)) for logits rows x (n, V), from their lse: the gradient of g·logp, in x's
    dtype."""
    return _onehot_minus_softmax(x.float(), lse, targets, g).to(x.dtype)


def grad_rows_triton(x, targets, lse, g):
    """grad_rows_torch with the Triton backward kernel, written over x itself (each block is read before it is
    written): one read and one write of the logits, no second buffer."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return _grad_rows(x, targets, lse, g, into=x)


def _grad_rows(x, targets, lse, g, into):
    """The backward kernel over rows x (n, V) of unit stride, the gradient written into `into` (x itself or not)."""
    V = x.shape[1]
    _logprobs_bwd[(len(x),)](x, x.stride(0), targets, lse, g.float().contiguous(), into, into.stride(0), V,
                             **_launch(BACKWARD, V))
    return into


def chunk_rows(N, C, V, budget):
    """Rows of hidden states per chunk of logits: budget / V, or N·C / V (logits the size of h) if more. One rule
    for the log-probs with and without gradient, so that the same rows give the same bits either way."""
    return max(1, budget // V, -(-N * C // V))


def keep_only(x, kept):
    """Logits rows x (n, V), in place, with -inf outside each row's kept ids (kept (n, K), -1 after them; a row
    of -1 alone keeps every id; None keeps all): π renormalised over the ids a top-k / top-p sampler could draw
    (engine.kept_ids), whose log-probs and gradient (0 outside them) the rows functions then give as they are."""
    if kept is None:
        return x
    ids = torch.where(kept < 0, kept[:, :1], kept).clamp(min=0)  # -1 padding repeats the row's first id
    outside = torch.ones_like(x, dtype=torch.bool).scatter_(1, ids, False) & (kept[:, :1] >= 0)
    return x.masked_fill_(outside, float("-inf"))


def in_compute_dtype(h, weight):
    """The LM head's operands in the dtype its GEMMs run in: autocast's where it is on (fp32 parameters under a
    caller's autocast; common.build_model's bf16 forwards get FSDP2's bf16 copies), else their own. Chosen once
    for all of a function's GEMMs: autocast reaches neither grad_W's in-place accumulation (addmm with out=) nor a
    backward."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    return h.to(dtype), weight.to(dtype)


class HiddenLogprobs(torch.autograd.Function):
    """log softmax(h Wᵀ)[t] from final hidden states h (..., C) and the LM head W (V, C), in fp32, with at most
    `budget` logits alive at once (rows of h in chunks of chunk_rows, as HiddenTokenLoss: the same rows give the
    same bits either way). Forward keeps one lse per row, not the logits; backward, given the upstream gradient
    g of each log-prob, makes each chunk of logits again (GEMM 1), overwrites it by g (onehot - softmax) and
    multiplies it back into grad_h (GEMM 2) and grad_W (GEMM 3): four GEMMs in all where HiddenTokenLoss needs
    three, the price of a loss whose per-token gradient is known only after the forward (the implicit reward
    model sums a sequence's log-probs before its loss). The GEMMs run in_compute_dtype, backward's too, so that it
    makes the logits its lse was read from. Without gradient (π_ref, π_old, evaluation) it is the forward alone.
    kept (..., K) or None: each row's π over those ids only (keep_only)."""

    @staticmethod
    def forward(ctx, h, weight, targets, kept, budget, rows_fn, grad_fn):
        ctx.dtypes = h.dtype, weight.dtype
        h, weight = in_compute_dtype(h, weight)
        logp = torch.empty(targets.shape, dtype=torch.float32, device=h.device)
        flat, rows_h, flat_t = logp.view(-1), h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        rows_k = None if kept is None else kept.reshape(len(flat_t), -1)
        lse = torch.empty_like(flat)
        ctx.rows, ctx.grad_fn = chunk_rows(*rows_h.shape, len(weight), budget), grad_fn
        for i in range(0, len(rows_h), ctx.rows):
            s = slice(i, i + ctx.rows)
            flat[s], lse[s] = rows_fn(keep_only(rows_h[s] @ weight.T, _sliced(rows_k, s)), flat_t[s])
        ctx.save_for_backward(h, weight, targets, rows_k, lse)
        return logp

    @staticmethod
    def backward(ctx, g):
        h, weight, targets, rows_k, lse = ctx.saved_tensors
        rows_h, flat_t, g = h.reshape(-1, h.shape[-1]), targets.reshape(-1), g.reshape(-1)
        grad_h = torch.empty_like(rows_h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for i in range(0, len(rows_h), ctx.rows):
            s = slice(i, i + ctx.rows)
            x = keep_only(rows_h[s] @ weight.T, _sliced(rows_k, s))  # (n, V): GEMM 1 again
            d = ctx.grad_fn(x, flat_t[s], lse[s], g[s])
            if grad_h is not None:
                grad_h[s] = d @ weight  # GEMM 2
            if grad_w is not None:
                torch.addmm(grad_w, d.T, rows_h[s], out=grad_w)  # GEMM 3, accumulated in place
        h_dtype, w_dtype = ctx.dtypes
        grad_h = None if grad_h is None else grad_h.view(h.shape).to(h_dtype)
        return grad_h, None if grad_w is None else grad_w.to(w_dtype), None, None, None, None, None


def _sliced(kept, s):
    return None if kept is None else kept[s]


class HiddenTokenLoss(torch.autograd.Function):
    """Σ_t loss_t(log π(t)) from final hidden states h (..., C) and the LM head W (V, C), where the loss of each
    token is a function of its log-prob alone (cross-entropy; GRPO's clipped objective and KL, given π_old,
    π_ref and the advantage), with its gradient made in the forward pass. There the derivative g_t of the loss in
    each log-prob is known (token_loss returns it), so each chunk of logits x = h Wᵀ is made once (GEMM 1), its
    log-probs and lse read from it, then overwritten by its own gradient g (onehot - softmax(x)), which is
    multiplied back into grad_h = d W (GEMM 2) and grad_W += dᵀ h (GEMM 3): three GEMMs where recomputing the
    logits in backward takes four, and no logits are kept for backward, which only scales the two gradients by
    its upstream scalar. Chunks hold chunk_rows rows: the larger the chunks, the fewer the accumulations into
    grad_W, which is kept in the compute dtype (Liger-Kernel's choice; exact in fp32). Matmuls run in_compute_dtype
    (bf16 on GPU), softmax in fp32. kept (..., K) or None: each row's π over those ids only (keep_only).
    token_loss(logp (n,), rows: a slice of the flattened positions) -> (loss (n,), d loss / d logp (n,)).
    Returns (the summed loss, the log-probs (targets' shape, fp32, no gradient))."""

    @staticmethod
    def forward(ctx, h, weight, targets, kept, token_loss, budget, rows_fn, grad_fn):
        ctx.h_shape, ctx.dtypes = h.shape, (h.dtype, weight.dtype)
        h, weight = in_compute_dtype(h, weight)
        logp = torch.empty(targets.shape, dtype=torch.float32, device=h.device)
        flat, h, targets = logp.view(-1), h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        kept = None if kept is None else kept.reshape(len(targets), -1)
        (N, C), V = h.shape, len(weight)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = chunk_rows(N, C, V, budget)
        for i in range(0, N, rows):
            s = slice(i, i + rows)
            x = keep_only(h[s] @ weight.T, _sliced(kept, s))  # (n, V), GEMM 1
            flat[s], lse = rows_fn(x, targets[s])
            loss, g = token_loss(flat[s], s)
            total += loss.sum()
            d = grad_fn(x, targets[s], lse, g)  # (n, V): d loss / d x, over x where the backend can
            grad_h[s] = d @ weight  # GEMM 2
            if grad_w is not None:
                torch.addmm(grad_w, d.T, h[s], out=grad_w)  # GEMM 3, accumulated in place
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(logp)
        return total, logp

    @staticmethod
    def backward(ctx, g_total, _):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return ((grad_h * g_total).view(ctx.h_shape).to(h_dtype),
                None if grad_w is None else (grad_w * g_total).to(w_dtype), None, None, None, None, None, None)
