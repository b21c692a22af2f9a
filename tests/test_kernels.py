"""fused_kernels/: Triton (under TRITON_INTERPRET=1) and PyTorch paths against float64 references, forward and
gradient."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fused_kernels
from fused_kernels import grpo_token_loss, hidden_logprobs, hidden_token_loss, token_logprobs

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", request.param)
    return request.param


def reference(x, t, g):
    """float64 log-probs of x (as given, upcast exactly) and their gradient for upstream g."""
    x64 = x.detach().double().requires_grad_()
    lp = x64.log_softmax(-1).gather(-1, t[:, None])[:, 0]
    lp.backward(g.double())
    return lp.detach(), x64.grad


@pytest.mark.parametrize("V", [1000, 32003, 50257, 131072])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_match_float64(backend, V, dtype):
    torch.manual_seed(V)
    x = (torch.randn(3, V) * 4).to(dtype).requires_grad_()
    t = torch.randint(0, V, (3,))
    g = torch.randn(3) * torch.tensor([1.0, 0.0, 1.0])  # the middle token is masked: no gradient at all
    lp = token_logprobs(x, t)
    lp.backward(g)
    ref, ref_grad = reference(x, t, g)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref, rtol=0, atol=2e-5)
    assert x.grad.dtype == dtype and not x.grad[1].any()
    # the gradient is written in the logits' dtype: equal to the reference rounded to it, within one rounding
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref_grad.to(dtype).double(), **tol)


@pytest.mark.parametrize("rows", ["extreme", "equal", "masked"])
def test_token_logprobs_on_extreme_and_flat_rows(backend, rows):
    V = 5003
    if rows == "equal":
        x = torch.full((2, V), 3.0)
    elif rows == "extreme":
        x = torch.randn(2, V).clamp(-1, 1) * 1e4
    else:  # a vocabulary mask: the Triton forward's first blocks see only -inf (its running max starts there)
        x = torch.randn(2, V).index_fill_(1, torch.arange(4500), float("-inf"))
    x.requires_grad_()
    t = torch.tensor([V - 2 if rows == "masked" else 0, V - 1])
    g = torch.tensor([1.0, -2.0])
    lp = token_logprobs(x, t)
    lp.backward(g)
    ref, ref_grad = reference(x, t, g)
    assert torch.isfinite(lp).all() and torch.isfinite(x.grad).all()
    # fp32 spaces numbers near the extreme rows' lse (~1e4) 2^-10 apart: what log-probs near 0 can be off by
    torch.testing.assert_close(lp.double(), ref, rtol=1e-6, atol=2 ** -10)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["sliced", "transposed", "chunked"])
def test_token_logprobs_of_strided_logits_and_in_chunks(backend, layout):
    """Logits sliced to a tokenizer's ids (rows V + 24 apart, as a padded head makes them), logits whose last
    dimension is not the contiguous one, and the PyTorch path three rows at a time: each as the reference."""
    torch.manual_seed(0)
    V = 1000
    base = (torch.randn(V, 10) if layout == "transposed" else torch.randn(10, V + 24)) * 4
    base.requires_grad_()
    x = base.T if layout == "transposed" else base[:, :V]
    t, g = torch.randint(0, V, (10,)), torch.randn(10)
    lp = token_logprobs(x, t, chunk=3 if layout == "chunked" else None)
    lp.backward(g)
    ref, ref_grad = reference(x, t, g)
    torch.testing.assert_close(lp.double(), ref, rtol=0, atol=2e-5)
    grad = base.grad.T if layout == "transposed" else base.grad
    torch.testing.assert_close(grad[:, :V].double(), ref_grad, rtol=1e-5, atol=1e-7)
    assert not grad[:, V:].any()  # the sliced-off columns

def test_token_logprobs_keep_the_leading_shape(backend):
    x, t = torch.randn(2, 3, 50), torch.randint(0, 50, (2, 3))
    assert token_logprobs(x, t).shape == (2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_token_loss_equals_logits_then_logprobs(backend, dtype):
    """From hidden states with a budget of 8 rows of logits (5 chunks): the log-probs, Σ g·logp and its gradient
    in h and W, made in the forward pass, against float64 logits; bf16 within its rounding of logits of magnitude
    ~20 (2^-8 x 20 = 0.08). hidden_logprobs (no gradient) gives the same log-probs."""
    torch.manual_seed(0)
    h = torch.randn(37, 16).to(dtype).requires_grad_()
    w = torch.randn(1001, 16).to(dtype).requires_grad_()
    t = torch.randint(0, 1001, (37,))
    g = torch.randn(37)
    total, lp = hidden_token_loss(h, w, t, lambda x, rows: (x * g[rows], g[rows]), budget=8 * 1001)
    (total * 2).backward()  # the upstream gradient scales what the forward made
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = (h64 @ w64.T).log_softmax(-1).gather(-1, t[:, None])[:, 0]
    (2 * ref * g.double()).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=0.08)
    assert lp.dtype == torch.float32 and not lp.requires_grad and h.grad.dtype == w.grad.dtype == dtype
    torch.testing.assert_close(lp.double(), ref.detach(), **tol)
    torch.testing.assert_close(hidden_logprobs(h, w, t, budget=8 * 1001).double(), ref.detach(), **tol)
    torch.testing.assert_close(total.double(), (ref * g.double()).sum().detach(), **tol)
    torch.testing.assert_close(h.grad.double(), h64.grad, **tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_logprobs_gradient_equals_logits_then_logprobs(backend, dtype):
    """hidden_logprobs differentiated (its backward makes the logits again, chunk by chunk: 5 chunks here) for an
    upstream gradient coupled across tokens, as the implicit reward model's BCE of a sum is: the gradient in h
    and W against float64 logits, the same tolerances as above."""
    torch.manual_seed(1)
    h = torch.randn(2, 19, 16).to(dtype).requires_grad_()
    w = torch.randn(1001, 16).to(dtype).requires_grad_()
    t = torch.randint(0, 1001, (2, 19))
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = (h64 @ w64.T).log_softmax(-1).gather(-1, t[..., None])[..., 0]
    c = torch.randn(2, 19, dtype=torch.float64)  # weights, so that each token's upstream gradient differs
    lp = hidden_logprobs(h, w, t, budget=8 * 1001)
    torch.nn.functional.logsigmoid((lp * c).sum(1) / 20).sum().backward()  # a token's gradient needs its whole row
    torch.nn.functional.logsigmoid((ref * c).sum(1) / 20).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=0.08)
    assert lp.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == dtype
    torch.testing.assert_close(lp.detach().double(), ref.detach(), **tol)
    torch.testing.assert_close(h.grad.double(), h64.grad, **tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, **tol)
    with torch.no_grad():
        assert not hidden_logprobs(h, w, t).requires_grad


@pytest.mark.parametrize("head", ["hidden_logprobs", "hidden_token_loss"])
def test_the_head_under_bf16_autocast_with_fp32_parameters(backend, head):
    """fp32 parameters under bf16 autocast (a model built outside common.build_model): both head functions run
    every GEMM in bf16 (the log-probs are those of bf16 operands without autocast, to the bit), their gradients
    come back in fp32, and backward's softmax is the forward's: each row's gradient in the logits, onehot -
    softmax, sums to 0 over the vocabulary, so grad_W's rows sum to 0 (fp32 logits against a bf16 lse leave a
    few percent)."""
    torch.manual_seed(2)
    h = (torch.randn(24, 16) * 2).requires_grad_()
    w = torch.randn(1001, 16).requires_grad_()
    t = torch.randint(0, 1001, (24,))

    def run(h, w):
        if head == "hidden_logprobs":
            lp = hidden_logprobs(h, w, t, budget=8 * 1001)
            return lp.sum(), lp
        return hidden_token_loss(h, w, t, lambda x, rows: (x, torch.ones_like(x)), budget=8 * 1001)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, lp = run(h, w)
    total.backward()
    assert torch.equal(lp.detach(), run(h.detach().bfloat16(), w.detach().bfloat16())[1].detach())
    assert h.grad.dtype == w.grad.dtype == torch.float32
    assert w.grad.sum(0).abs().max() < 1e-3 * w.grad.abs().sum(0).max()


def test_hidden_token_loss_runs_three_matmuls_and_never_syncs(backend):
    """The LM head's forward and backward: 3 GEMMs of 2·N·C·V FLOPs (recomputing the logits in backward would
    take a 4th), and no op whose output size the host must read back (nonzero and kin)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode
    N, C, V = 64, 32, 3000
    h, w = torch.randn(N, C, requires_grad=True), torch.randn(V, C, requires_grad=True)
    t = torch.randint(0, V, (N,))

    class Ops(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))
    with FlopCounterMode(display=False) as flops, Ops() as ops:
        total, _ = hidden_token_loss(h, w, t, lambda x, rows: (-x, -torch.ones_like(x)), budget=16 * V)
        total.backward()
    assert flops.get_total_flops() == 3 * 2 * N * C * V
    assert not ops.seen & {"nonzero", "_local_scalar_dense", "masked_select", "unique"}, ops.seen


def test_grpo_loss_on_hand_computed_tokens(backend):
    # r = 1 (on-policy, as the paper's mu = 1): loss = -A + beta * 0; gradient -A
    # r = 1.5, A > 0: the clip binds at 1.2 -> loss -1.2 A, gradient 0
    # r = 0.5, A < 0: the clip binds at 0.8 -> loss -0.8 A, gradient 0
    # r = 0.5, A > 0: min picks r A -> loss -0.5 A, gradient -0.5 A
    lp = torch.log(torch.tensor([1.0, 1.5, 0.5, 0.5])).requires_grad_()
    old = torch.zeros(4)
    ref = lp.detach().clone()  # kl = 0
    a = torch.tensor([2.0, 1.0, -1.0, 3.0])
    loss, kl = grpo_token_loss(lp, old, ref, a, clip_eps=0.2, beta=0.04)
    loss.sum().backward()
    torch.testing.assert_close(loss, torch.tensor([-2.0, -1.2, 0.8, -1.5]))
    torch.testing.assert_close(kl, torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(lp.grad, torch.tensor([-2.0, 0.0, 0.0, -1.5]))
    # k3 KL: ref - logp = log 2 -> kl = 2 - log 2 - 1; its gradient 1 - 2 = -1, times beta
    lp = torch.zeros(1, requires_grad=True)
    loss, kl = grpo_token_loss(lp, torch.zeros(1), torch.log(torch.tensor([2.0])), torch.zeros(1), 0.2, 0.5)
    loss.backward()
    torch.testing.assert_close(kl, torch.tensor([1 - torch.log(torch.tensor(2.0)).item()]))
    torch.testing.assert_close(lp.grad, torch.tensor([-0.5]))


def test_grpo_loss_with_asymmetric_clip_on_hand_computed_tokens(backend):
    # clip (0.2, 0.28): the ratio may rise to 1.28 before the clip binds, and fall to 0.8
    # r = 1.25, A = 2: inside 1.28, not clipped -> loss -2.5, gradient -r A = -2.5 (with eps 0.2 it would bind)
    # r = 1.30, A = 1: above 1.28 -> loss -1.28, gradient 0
    # r = 0.78, A = -1: below 0.8 -> loss -min(-0.78, -0.8) = 0.8, gradient 0
    # r = 0.78, A = 1: min picks r A -> loss -0.78, gradient -0.78
    lp = torch.log(torch.tensor([1.25, 1.30, 0.78, 0.78])).requires_grad_()
    a = torch.tensor([2.0, 1.0, -1.0, 1.0])
    loss, kl = grpo_token_loss(lp, torch.zeros(4), lp.detach().clone(), a, clip_eps=(0.2, 0.28), beta=0.04)
    loss.sum().backward()
    torch.testing.assert_close(loss, torch.tensor([-2.5, -1.28, 0.8, -0.78]))
    torch.testing.assert_close(lp.grad, torch.tensor([-2.5, 0.0, 0.0, -0.78]))
    lp.grad = None
    loss, _ = grpo_token_loss(lp, torch.zeros(4), lp.detach().clone(), a, clip_eps=0.2, beta=0.04)
    loss.sum().backward()
    torch.testing.assert_close(loss[:2], torch.tensor([-2.4, -1.2]))  # symmetric: both bind at 1.2
    torch.testing.assert_close(lp.grad[:2], torch.zeros(2))


def test_cispo_loss_on_hand_computed_tokens(backend):
    # CISPO, clip (0.2, 0.28): the weight is min(r, 1.28), no lower cap; loss and gradient are both -w A
    # r = 1, A = 2: w = 1 -> -2 (as the clip's: on-policy, the two agree)
    # r = 1.5, A = 1: w = 1.28 -> -1.28, gradient -1.28 (the clip's loss is the same, its gradient 0)
    # r = 0.5, A = -1: w = 0.5 -> 0.5, gradient 0.5 (the clip's: 0.8, gradient 0)
    # r = 1.5, A = -1: w = 1.28 -> 1.28, gradient 1.28 (the clip's: 1.5 and 1.5, r A unclipped)
    lp = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5])).requires_grad_()
    a = torch.tensor([2.0, 1.0, -1.0, -1.0])
    loss, kl = grpo_token_loss(lp, torch.zeros(4), lp.detach().clone(), a, clip_eps=(0.2, 0.28), beta=0.04,
                               cispo=True)
    loss.sum().backward()
    torch.testing.assert_close(loss, torch.tensor([-2.0, -1.28, 0.5, 1.28]))
    torch.testing.assert_close(lp.grad, torch.tensor([-2.0, -1.28, 0.5, 1.28]))


def test_dual_clip_on_hand_computed_tokens(backend):
    # dual clip c = 3, clip 0.2: for A < 0 the term |A| max(r, clip(r)) is capped at c |A|, its gradient then 0
    # r = 4, A = -1: capped -> loss 3, gradient 0 (without the cap: 4 and 4)
    # r = 2, A = -1: under c -> loss 2, gradient -r A = 2
    # r = 4, A = 2: A > 0, the clip binds at 1.2 -> loss -2.4, gradient 0 (the cap leaves A > 0 alone)
    # r = 0.5, A = -2: the lower clip binds -> loss 1.6, gradient 0
    lp = torch.log(torch.tensor([4.0, 2.0, 4.0, 0.5])).requires_grad_()
    a = torch.tensor([-1.0, -1.0, 2.0, -2.0])
    for cap, want, grad in ((3.0, [3.0, 2.0, -2.4, 1.6], [0.0, 2.0, 0.0, 0.0]),
                            (None, [4.0, 2.0, -2.4, 1.6], [4.0, 2.0, 0.0, 0.0])):
        lp.grad = None
        loss, _ = grpo_token_loss(lp, torch.zeros(4), lp.detach().clone(), a, clip_eps=0.2, beta=0.04, dual_clip=cap)
        loss.sum().backward()
        torch.testing.assert_close(loss, torch.tensor(want))
        torch.testing.assert_close(lp.grad, torch.tensor(grad))
    for bad in (dict(dual_clip=1.0), dict(dual_clip=3.0, cispo=True)):
        with pytest.raises(ValueError, match="dual_clip"):
            grpo_token_loss(lp, torch.zeros(4), lp.detach(), a, **bad)


def test_k2_kl_term_on_hand_computed_tokens(backend):
    # log π_θ = 0, log π_ref = log 2: k2 = (log 2)^2 / 2, its gradient β (log π_θ - log π_ref) = -β log 2;
    # the KL returned is k3's, 2 - log 2 - 1
    lp = torch.zeros(1, requires_grad=True)
    loss, kl = grpo_token_loss(lp, torch.zeros(1), torch.log(torch.tensor([2.0])), torch.zeros(1), 0.2, 0.5,
                               kl_loss="k2")
    loss.backward()
    log2 = math.log(2)
    torch.testing.assert_close(loss, torch.tensor([0.5 * log2 ** 2 / 2]))
    torch.testing.assert_close(kl, torch.tensor([1 - log2]))
    torch.testing.assert_close(lp.grad, torch.tensor([-0.5 * log2]))


@pytest.mark.parametrize("kl_loss", ["k3", "k2"])
def test_the_kl_terms_expected_gradient_is_the_forward_kls_for_k3_and_the_reverse_kls_for_k2(backend, kl_loss):
    """On one position with a vocabulary of 7, each token's KL term weighted by its probability under π_θ (the
    expectation over the tokens π_θ samples, exactly) has the gradient in the logits of KL(π_ref ‖ π_θ) with k3
    in the loss and of KL(π_θ ‖ π_ref) with k2, each computed here from its definition; the two differ."""
    torch.manual_seed(0)
    theta, ref = torch.randn(7, dtype=torch.float64, requires_grad=True), torch.log_softmax(torch.randn(7), -1)
    lp = torch.log_softmax(theta, -1)
    loss, _ = grpo_token_loss(lp, lp.detach(), ref, torch.zeros(7), 0.2, 1.0, kl_loss=kl_loss)
    (lp.exp().detach() * loss).sum().backward()
    got, theta.grad = theta.grad.clone(), None
    p, q = torch.softmax(theta, -1), ref.double().exp()
    forward, reverse = (q * (q.log() - torch.log_softmax(theta, -1))).sum(), (p * (p.log() - q.log())).sum()
    want = torch.autograd.grad(forward if kl_loss == "k3" else reverse, theta)[0]
    other = torch.autograd.grad(reverse if kl_loss == "k3" else forward, theta)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got - other).abs().max() > 1e-2


def test_k3_is_kl_term_on_hand_computed_tokens(backend):
    # log π_θ = 0, log π_old = log 1/2 (r = 2), log π_ref = log 2: the term r k3 = 2 (1 - log 2), its gradient
    # -β r (log π_ref - log π_θ) = -2β log 2; the KL returned is k3's, 1 - log 2. On-policy (π_old = π_θ, r = 1):
    # the value is k3's, the gradient k2's, -β log 2
    log2 = math.log(2)
    for old, r in ((-log2, 2.0), (None, 1.0)):
        lp = torch.zeros(1, requires_grad=True)
        loss, kl = grpo_token_loss(lp, lp.detach() if old is None else torch.tensor([old]), torch.tensor([log2]),
                                   torch.zeros(1), 0.2, 0.5, kl_loss="k3-is")
        loss.backward()
        torch.testing.assert_close(loss, torch.tensor([0.5 * r * (1 - log2)]))
        torch.testing.assert_close(kl, torch.tensor([1 - log2]))
        torch.testing.assert_close(lp.grad, torch.tensor([-0.5 * r * log2]))


@pytest.mark.parametrize("kl_loss", ["k3", "k2", "k3-is"])
def test_only_k3_is_stays_unbiased_when_pi_old_drew_the_tokens(backend, kl_loss):
    """μ > 1: the tokens were drawn from π_old, which is not π_θ. Over a vocabulary of 7, each token's KL term
    weighted by its probability under π_old (the expectation over what π_old samples, exactly): with k3-is (r k3)
    its value and its gradient in the logits are KL(π_θ ‖ π_ref)'s, computed here from the definition; with k3 and
    k2 neither is."""
    torch.manual_seed(0)
    theta = torch.randn(7, dtype=torch.float64, requires_grad=True)
    ref, old = (torch.log_softmax(torch.randn(7, dtype=torch.float64), -1) for _ in range(2))
    lp = torch.log_softmax(theta, -1)
    loss, _ = grpo_token_loss(lp, old, ref, torch.zeros(7), 0.2, 1.0, kl_loss=kl_loss)
    expected = (old.exp() * loss).sum()
    got = torch.autograd.grad(expected, theta)[0]
    p = torch.softmax(theta, -1)
    kl = (p * (p.log() - ref)).sum()
    want = torch.autograd.grad(kl, theta)[0]
    if kl_loss == "k3-is":
        torch.testing.assert_close(expected, kl, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert abs(expected - kl) > 1e-2 and (got - want).abs().max() > 1e-2


@pytest.mark.parametrize("cispo, kl_loss, dual_clip", [(False, "k3", None), (True, "k3", None), (False, "k2", None),
                                                      (True, "k3-is", None), (False, "k3", 1.5)])
def test_grpo_loss_matches_the_formula_in_float64_with_asymmetric_clip(backend, cispo, kl_loss, dual_clip):
    """3,001 random tokens against Eq. 3-4 and their derivatives written out here in float64 (no autograd, not
    the module's own reference): d(-min(rA, clip(r)A))/d logp is -rA where the clip does not bind, else 0; the
    k3 KL's is 1 - π_ref/π_θ. CISPO's policy term: -min(r, 1 + ε_high) A, and the same is its derivative. With
    kl_loss k2 the loss's KL term is (log π_θ - log π_ref)^2 / 2, its derivative log π_θ - log π_ref, with k3-is
    r k3 and r (log π_θ - log π_ref), while the KL returned is still k3. The dual clip c: -c A, derivative 0,
    where A < 0 and r > c."""
    torch.manual_seed(1)
    n = 3001
    lp = torch.randn(n, requires_grad=True)
    old, ref, a = lp.detach() + 0.4 * torch.randn(n), lp.detach() + 0.4 * torch.randn(n), torch.randn(n)
    gl, gk = torch.randn(n), torch.randn(n)
    loss, kl = grpo_token_loss(lp, old, ref, a, clip_eps=(0.2, 0.28), beta=0.04, cispo=cispo, kl_loss=kl_loss,
                               dual_clip=dual_clip)
    torch.autograd.backward([loss, kl], [gl, gk])
    x, o, q, A = (t.detach().double() for t in (lp, old, ref, a))
    r = torch.exp(x - o)
    binds = ((r > 1.28) & (A > 0)) | ((r < 0.8) & (A < 0))
    pg = torch.where(binds, -r.clamp(0.8, 1.28) * A, -r * A)
    dpg = torch.where(binds, 0.0, -r * A)
    if dual_clip:
        capped = (A < 0) & (r > dual_clip)
        assert capped.sum() > 100
        pg, dpg = torch.where(capped, -dual_clip * A, pg), torch.where(capped, 0.0, dpg)
    if cispo:
        pg = dpg = -r.clamp(max=1.28) * A
        assert (r < 0.8).sum() > 300 and (r > 1.28).sum() > 300  # both sides of the clip's bounds are met
    kl64 = torch.exp(q - x) - (q - x) - 1
    dkl = 1 - torch.exp(q - x)
    penalty, dpenalty = {"k3": (kl64, dkl), "k2": ((q - x) ** 2 / 2, x - q), "k3-is": (r * kl64, r * (x - q))}[kl_loss]
    grad = gl.double() * (dpg + 0.04 * dpenalty) + gk.double() * dkl
    torch.testing.assert_close(loss.double(), pg + 0.04 * penalty, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), kl64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp.grad.double(), grad, rtol=1e-4, atol=1e-5)


def test_the_triton_kernels_compile_for_an_h100_with_one_exp_per_logit(tmp_path):
    """Compiled ahead of time for sm_90 (H100, H200) to machine code with the code's launch settings, on this
    machine without a GPU (tests/for_sm90.py): a kernel the GPU compiler rejects fails here, not in a GPU's few
    minutes. An H200's exp units issue about two exps per bf16 logit its memory streams, so the head's kernels
    must take one: counted in the PTX per thread and block of logits (BLOCK / (32·warps) logits a thread), the
    forward's one rescale of its running sum beside them."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "tests/for_sm90.py"], cwd=root, capture_output=True, text=True, timeout=300,
                       env={**env, "PYTHONPATH": root, "TRITON_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    k = json.loads(r.stdout.splitlines()[-1])

    def per_thread(name):
        return k[name]["block"] // (32 * k[name]["warps"])
    assert k["logprobs_fwd"]["ex2"] == per_thread("logprobs_fwd") + 1
    assert k["logprobs_bwd"]["ex2"] == per_thread("logprobs_bwd")
    variants = ("grpo_fwd", "grpo_fwd_cispo", "grpo_fwd_k2", "grpo_fwd_k3is")
    assert {k[v]["ex2"] for v in variants} == {2 * per_thread("grpo_fwd")}  # r and e^d
    assert len({k[v]["cubin"] for v in variants}) == 4  # each branch compiled, not one of them four times
    from fused_kernels.logprobs import BACKWARD, FORWARD
    assert (k["logprobs_fwd"]["warps"], k["logprobs_bwd"]["warps"]) == (FORWARD["num_warps"], BACKWARD["num_warps"])


def test_backend_choice(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="KERNELS_BACKEND"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    monkeypatch.delenv("KERNELS_BACKEND")
    assert fused_kernels.backend(torch.zeros(1)) == "torch"  # CPU tensors default to PyTorch
