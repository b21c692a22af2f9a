"""Speed of model.py against transformers on the same weights and inputs, measured in one run.

Training: tokens/s of forward + cross-entropy + backward, ours vs `LlamaForCausalLM`.
Generation: new tokens/s of batched sampling from prompts of different lengths (left-padded for transformers),
ours (preallocated KV cache) vs transformers' `generate` (its dynamic cache), greedy, no early stop.

    python bench.py                       # toy and 100m on this machine's CPU
    python bench.py --sizes 1b --device cuda --dtype bfloat16
"""

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from model import PRESETS, ModelConfig, Transformer


def timed(fns, repeats, device):
    """Best time of `repeats` runs of each function, interleaved so that both see the same machine load."""
    best = [float("inf")] * len(fns)
    for r in range(repeats + 1):  # the first round warms up (allocator, kernels) and is not counted
        for i, fn in enumerate(fns):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if r:
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def bench_size(name, args):
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(**PRESETS[name]))
    ours.init_weights()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa").to(args.device)
    ours = ours.to(args.device, dtype)
    V = ours.config.vocab_size
    rows = []

    B, T = args.train_batch, args.train_len
    x = torch.randint(0, V, (B, T + 1), device=args.device)

    def step(model, logits_of):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(logits_of(x[:, :-1]).float().view(-1, V), x[:, 1:].reshape(-1))
        loss.backward()

    for m in (ours, ref):
        m.train()
    t_ours, t_ref = timed([lambda: step(ours, ours), lambda: step(ref, lambda t: ref(t).logits)],
                          args.repeats, args.device)
    rows.append((name, f"train step B={B} T={T}", B * T / t_ours, B * T / t_ref))

    for m in (ours, ref):
        m.eval()
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.gen_batch,), generator=g).tolist()
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in lens]
    P = max(lens)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(args.device), mask.to(args.device)
    N = args.new_tokens
    with torch.no_grad():
        t_ours, t_ref = timed([lambda: ours.generate(prompts, N, temperature=0),
                               lambda: ref.generate(ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N,
                                                    do_sample=False, pad_token_id=0, eos_token_id=None)],
                              max(1, args.repeats // 3), args.device)
    rows.append((name, f"generate B={len(prompts)} new={N}", len(prompts) * N / t_ours, len(prompts) * N / t_ref))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="toy,100m", help="comma-separated model.PRESETS names")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32, help="prompts have between half this and this many tokens")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=6, help="timed runs of each train step (generation: a third)")
    args = ap.parse_args()
    print(f"device={args.device} dtype={args.dtype} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'size':>6} {'what':<26} {'ours tok/s':>11} {'transformers':>13} {'ratio':>6}")
    for name in args.sizes.split(","):
        for size, what, a, b in bench_size(name, args):
            print(f"{size:>6} {what:<26} {a:11.0f} {b:13.0f} {a / b:5.2f}x", flush=True)
