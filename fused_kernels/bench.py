"""The LM head of one training micro-batch, forward + backward: hidden states (N, C) and the head (V, C) in, token
log-probs out, gradients back to both. Time and peak memory of each way to compute it, in a fresh process each,
so that a peak is its own:

    naive      logits = h W^T, then log_softmax(logits.float()).gather (autograd keeps fp32 copies)
    compiled   the same under torch.compile (GPU)
    chunked    logits = h W^T, then token_logprobs on 64 MB fp32 chunks (the PyTorch kernel)
    triton     logits = h W^T, then the Triton kernel (GPU)
    hidden     hidden_token_loss(h, W, -logp): no logits tensor at all, the gradient made in the forward (what
               model.loss runs in every training step)

    python -m fused_kernels.bench                     # CPU: 2048 tokens, width 256, fp32
    python -m fused_kernels.bench --tokens 16384      # GPU: width 4096, bf16
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def run_one(method, N, V, C, dtype, device, repeats):
    """Time one method; returns (seconds per forward+backward, peak bytes: on CUDA beyond what was allocated
    before the first call, on a CPU the process's peak resident memory)."""
    from fused_kernels import hidden_token_loss, naive_logprobs, token_logprobs
    torch.manual_seed(0)
    h = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, C, device=device, dtype=dtype) * C ** -0.5).requires_grad_()
    t = torch.randint(0, V, (N,), device=device)
    os.environ["KERNELS_BACKEND"] = {"triton": "triton", "hidden": "triton" if device == "cuda" else "torch"}.get(
        method, "torch")
    fn = {"naive": lambda: naive_logprobs(h @ w.T, t).sum(), "chunked": lambda: token_logprobs(h @ w.T, t).sum(),
          "triton": lambda: token_logprobs(h @ w.T, t).sum(),
          "hidden": lambda: -hidden_token_loss(h, w, t, lambda x, rows: (-x, -torch.ones_like(x)))[0]}.get(method)
    fn = fn or torch.compile(lambda: naive_logprobs(h @ w.T, t).sum())

    def step():
        fn().backward()
        h.grad = w.grad = None

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / repeats
    if device == "cuda":
        return sec, torch.cuda.max_memory_allocated() - base
    return sec, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def copy_bandwidth(device):
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (time.perf_counter() - t0)  # read + write


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--tokens", type=int, default=16384 if cuda else 2048)
    ap.add_argument("--width", type=int, default=4096 if cuda else 256, help="hidden size C")
    ap.add_argument("--vocabs", default="32768,102400,151936")
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    ap.add_argument("--repeats", type=int, default=10 if cuda else 3)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this process, print json
    args = ap.parse_args()
    dtype, device = getattr(torch, args.dtype), "cuda" if cuda else "cpu"
    if args.one:
        method, V = args.one.split(":")
        print(json.dumps(run_one(method, args.tokens, int(V), args.width, dtype, device, args.repeats)))
        sys.exit(0)
    methods = ["naive", "compiled", "triton", "hidden"] if cuda else ["naive", "chunked", "hidden"]
    label = "peak beyond inputs" if cuda else "peak RSS"
    print(f"{device}, {args.tokens} tokens x width {args.width}, {args.dtype}; forward + backward of the head")
    print(f"{'vocab':>7} {'method':<9} {'ms':>9} {label:>20} {'logits alone':>13}")
    for V in map(int, args.vocabs.split(",")):
        for m in methods:
            r = subprocess.run([sys.executable, "-m", "fused_kernels.bench", "--one", f"{m}:{V}",
                                "--tokens", str(args.tokens),
                                "--width", str(args.width), "--dtype", args.dtype, "--repeats", str(args.repeats)],
                               capture_output=True, text=True)
            if r.returncode:
                why = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode
                print(f"{V:>7} {m:<9} failed: {why}")
                continue
            sec, peak = json.loads(r.stdout.strip().splitlines()[-1])
            logits = args.tokens * V * dtype.itemsize
            print(f"{V:>7} {m:<9} {sec * 1e3:9.1f} {peak / 2**20:16.0f} MiB {logits / 2**20:9.0f} MiB", flush=True)
