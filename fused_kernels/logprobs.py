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
  blocks with an online max/sum (forward reads the logits once); backward reads them once more and writes the
  gradient once.
`hidden_logprobs` goes one step further: from the final hidden states and the LM head, it never holds more
than a fixed budget of logits at all (model.forward(tokens, targets) uses it for every training loss).
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
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        m = tl.full([BLOCK], float("-inf"), tl.float32)  # running max, per lane
        s = tl.zeros([BLOCK], tl.float32)  # running sum of exp(x - m), per lane
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane that has seen only padding stays at 0
            s = s * tl.exp(m - shift) + tl.exp(x - shift)
            m = m_new
        mx = tl.max(m, 0)
        lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), 0))
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


class TritonLogprobs(torch.autograd.Function):
    BLOCK = 4096

    @staticmethod
    def forward(ctx, logits, targets):
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        N, V = logits.shape
        out = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        block = min(TritonLogprobs.BLOCK, triton.next_power_of_2(V))
        _logprobs_fwd[(N,)](logits, logits.stride(0), targets, out, lse, V, BLOCK=block)
        ctx.save_for_backward(logits, targets, lse)
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx, g):
        logits, targets, lse = ctx.saved_tensors
        N, V = logits.shape
        grad = torch.empty_like(logits)
        _logprobs_bwd[(N,)](logits, logits.stride(0), targets, lse, g.float().contiguous(), grad, grad.stride(0), V,
                            BLOCK=ctx.block)
        return grad, None


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
    block = min(TritonLogprobs.BLOCK, triton.next_power_of_2(V))
    _logprobs_fwd[(N,)](x, x.stride(0), targets, out, lse, V, BLOCK=block)
    return out, lse


class HiddenLogprobs(torch.autograd.Function):
    """log softmax(h W^T)[t] from final hidden states h (N, C) and the LM head W (V, C), with at most `budget`
    logits alive at once: the (N, V) logits never exist. h may be (..., C) and targets (...): the result has
    targets' shape as a tensor of its own, not a view (FSDP2 warns of a root module that returns a view, whose
    in-place edit would drop its backward hook). Forward takes rows in chunks of budget / V and keeps one
    float per row (lse). Backward recomputes the logits (one extra matmul, as activation checkpointing does),
    this time in chunks of budget / N vocabulary columns: for columns c, grad_logits[:, c] = g (onehot - exp(x - lse)),
    grad_h += grad_logits[:, c] W[c] and grad_W[c] = grad_logits[:, c]^T h, so each slice of grad_W is written
    once and the only accumulator is grad_h's (N, C) in fp32, not grad_W's (V, C): at 7B, 5K tokens against
    102,400 rows. Matmuls run in the compute dtype (bf16 on GPU), as the forward's; softmax is fp32."""

    @staticmethod
    def forward(ctx, h, weight, targets, budget, rows_fn):
        ctx.h_shape = h.shape
        result = torch.empty(targets.shape, dtype=torch.float32, device=h.device)
        out = result.view(-1)  # the rows are written through this flat view
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        N, V = len(h), len(weight)
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        rows = max(1, budget // V)
        for i in range(0, N, rows):
            out[i:i + rows], lse[i:i + rows] = rows_fn(h[i:i + rows] @ weight.T, targets[i:i + rows])
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.budget = budget
        return result

    @staticmethod
    def backward(ctx, g):
        h, weight, targets, lse = ctx.saved_tensors
        N, V = len(h), len(weight)
        g = g.reshape(-1).float()
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.empty_like(weight)
        cols = max(1, ctx.budget // max(N, 1))
        for j in range(0, V, cols):
            w = weight[j:j + cols]
            d = (h @ w.T).float().sub_(lse[:, None]).exp_().mul_(-g[:, None])  # (N, c): -g softmax
            hit = ((targets >= j) & (targets < j + cols)).nonzero()[:, 0]
            d[hit, targets[hit] - j] += g[hit]  # + g onehot
            d = d.to(weight.dtype)
            grad_h += (d @ w).float()
            grad_w[j:j + cols] = d.T @ h
        return grad_h.to(h.dtype).view(ctx.h_shape), grad_w, None, None, None
