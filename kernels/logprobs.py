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
`hidden_logprobs` goes one step further and never holds more than `chunk` rows of logits at all.
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


class HiddenLogprobs(torch.autograd.Function):
    """log softmax(h W^T)[t] from final hidden states h (N, C) and the LM head W (V, C), `chunk` rows at a time:
    the (N, V) logits never exist. Backward recomputes each chunk's logits (one extra matmul, as activation
    checkpointing does) and accumulates grad_h = grad_logits W and grad_W = grad_logits^T h."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, rows_fn):
        out = torch.empty(len(h), dtype=torch.float32, device=h.device)
        for i in range(0, len(h), chunk):
            out[i:i + chunk] = rows_fn(h[i:i + chunk] @ weight.T, targets[i:i + chunk])
        ctx.save_for_backward(h, weight, targets)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g):
        h, weight, targets = ctx.saved_tensors
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        g = g.float()
        for i in range(0, len(h), ctx.chunk):
            s = slice(i, i + ctx.chunk)
            x = (h[s] @ weight.T).float()
            d = _onehot_minus_softmax(x, x.logsumexp(-1), targets[s], g[s])
            grad_h[s] = (d @ weight.float()).to(h.dtype)
            grad_w += d.T @ h[s].float()
        return grad_h, grad_w.to(weight.dtype), None, None, None
