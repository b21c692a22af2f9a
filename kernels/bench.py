"""Token log-probs forward + backward: time, bandwidth and peak memory, ours against naive PyTorch.

On a GPU: 16K tokens x V in {32K, 102400, 152K}, bf16; the naive `log_softmax(logits.float()).gather`, its
`torch.compile`, our Triton kernel, and the fused hidden->log-prob path; GB/s against the device's measured
copy bandwidth (the floor is one read of the logits forward, one read and one write backward).
On a CPU: fewer tokens, the naive and chunked PyTorch paths, each in a fresh process so that its peak resident
memory is its own.

    python -m kernels.bench                     # CPU: 2048 tokens
    python -m kernels.bench --tokens 16384      # GPU
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def run_one(method, N, V, dtype, device, repeats):
    """Time one method; returns (seconds per forward+backward, peak bytes beyond the logits and their grad)."""
    from kernels import hidden_logprobs, naive_logprobs, token_logprobs
    torch.manual_seed(0)
    C = 4096
    if method == "hidden":
        h = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(V, C, device=device, dtype=dtype) * 0.02).requires_grad_()
    else:
        x = torch.randn(N, V, device=device, dtype=dtype, requires_grad=True)
    t = torch.randint(0, V, (N,), device=device)
    os.environ["KERNELS_BACKEND"] = {"naive": "torch", "compiled": "torch", "chunked": "torch", "triton": "triton",
                                     "hidden": "triton" if device == "cuda" else "torch"}[method]
    fn = {"naive": lambda: naive_logprobs(x, t), "chunked": lambda: token_logprobs(x, t),
          "triton": lambda: token_logprobs(x, t), "hidden": lambda: hidden_logprobs(h, w, t),
          "compiled": torch.compile(lambda: naive_logprobs(x, t))}[method]

    def step():
        fn().sum().backward()
        if method == "hidden":
            h.grad = w.grad = None
        else:
            x.grad = None
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / repeats
    logits_bytes = N * V * torch.finfo(dtype).bits // 8
    if device == "cuda":
        extra = torch.cuda.max_memory_allocated() - base - (logits_bytes if method != "hidden" else 0)
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS of this process
    return sec, extra, logits_bytes


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
    ap.add_argument("--vocabs", default="32768,102400,151936")
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    ap.add_argument("--repeats", type=int, default=10 if cuda else 3)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this process, print json
    args = ap.parse_args()
    dtype, device = getattr(torch, args.dtype), "cuda" if cuda else "cpu"
    if args.one:
        method, V = args.one.split(":")
        print(json.dumps(run_one(method, args.tokens, int(V), dtype, device, args.repeats)))
        sys.exit(0)
    methods = ["naive", "compiled", "triton", "hidden"] if cuda else ["naive", "chunked"]
    bw = copy_bandwidth(device) if cuda else None
    print(f"{device}, {args.tokens} tokens, {args.dtype}" + (f", copy bandwidth {bw / 1e9:.0f} GB/s" if bw else ""))
    print(f"{'vocab':>7} {'method':<9} {'ms':>9} {'GB/s':>7} {'% copy':>7} {'peak extra':>12}")
    for V in map(int, args.vocabs.split(",")):
        for m in methods:
            r = subprocess.run([sys.executable, "-m", "kernels.bench", "--one", f"{m}:{V}", "--tokens", str(args.tokens),
                                "--dtype", args.dtype, "--repeats", str(args.repeats)], capture_output=True, text=True)
            if r.returncode:
                print(f"{V:>7} {m:<9} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
                continue
            sec, extra, logits = json.loads(r.stdout.strip().splitlines()[-1])
            gbs = 3 * logits / sec / 1e9  # read fwd, read + write bwd: the minimum traffic
            pct = f"{100 * gbs * 1e9 / bw:6.1f}%" if bw else "      -"
            label = "peak RSS" if not cuda else "beyond x,dx"
            print(f"{V:>7} {m:<9} {sec * 1e3:9.1f} {gbs:7.1f} {pct} {extra / 2**20:9.0f} MiB {label}", flush=True)
