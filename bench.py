"""Benchmarks against peers, measured in one run on the same inputs; each prints ratios.

model: model.py vs transformers on the same weights. Training: tokens/s of forward + cross-entropy + backward,
  ours vs `LlamaForCausalLM`. Generation: new tokens/s of batched sampling from prompts of different lengths
  (left-padded for transformers), ours (preallocated KV cache) vs `generate` (its dynamic cache), greedy.
data: data.py's MinHash dedup vs datasketch's MinHashLSH (same permutations and threshold), with recall of
  true near-duplicate pairs and false drops judged by exact Jaccard; tokenize-and-pack vs plain tiktoken.

    python bench.py model                 # toy and 100m on this machine's CPU
    python bench.py model --sizes 1b --device cuda --dtype bfloat16
    python bench.py data                  # needs the toy data: python data.py
"""

import argparse
import os
import re
import tempfile
import time
from collections import Counter, defaultdict

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


# -----------------------------------------------------------------------------
# data


def shingle_sets(texts):
    out = []
    for t in texts:
        ws = re.findall(r"\w+", t.lower())
        out.append({" ".join(ws[i:i + 5]) for i in range(max(1, len(ws) - 4))})
    return out


def true_pairs(sets, threshold):
    """Every pair (i < j) with exact Jaccard >= threshold, by an inverted index over shingles."""
    index = defaultdict(list)
    for i, s in enumerate(sets):
        for sh in s:
            index[sh].append(i)
    pairs = set()
    for i, s in enumerate(sets):
        shared = Counter(j for sh in s for j in index[sh] if j < i)
        pairs |= {(j, i) for j, n in shared.items() if n / (len(s) + len(sets[j]) - n) >= threshold}
    return pairs


def judge(keep, pairs, n):
    """Recall: true pairs of which at least one page is gone. False drops: dropped pages with no earlier page
    at the threshold, as a share of all pages."""
    recall = sum(not (keep[i] and keep[j]) for i, j in pairs) / max(len(pairs), 1)
    has_earlier = {j for _, j in pairs}
    false = sum(1 for i in range(n) if not keep[i] and i not in has_earlier)
    return recall, false / n


def bench_data(args):
    from datasketch import MinHash, MinHashLSH

    import data
    from tokenizer import Tokenizer
    d = args.data
    pages = [p["text"] for p in data.read_jsonl(os.path.join(d, "crawl.jsonl"))][:args.pages]
    sets = shingle_sets(pages)
    pairs = true_pairs(sets, args.threshold)
    print(f"{len(pages)} toy crawl pages, {len(pairs)} pairs with exact Jaccard >= {args.threshold}")

    t0 = time.perf_counter()
    ours = data.minhash_dedup(pages, threshold=args.threshold, num_perm=args.num_perm)
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    lsh, theirs = MinHashLSH(threshold=args.threshold, num_perm=args.num_perm), []
    for i, s in enumerate(sets):
        m = MinHash(num_perm=args.num_perm)
        m.update_batch([sh.encode() for sh in s])
        dup = bool(lsh.query(m))
        theirs.append(not dup)
        if not dup:
            lsh.insert(str(i), m)
    t_theirs = time.perf_counter() - t0

    print(f"{'dedup':<12} {'pages/s':>9} {'recall':>7} {'false drops':>12}")
    for name, keep, t in (("ours", ours, t_ours), ("datasketch", theirs, t_theirs)):
        r, f = judge(keep, pairs, len(pages))
        print(f"{name:<12} {len(pages) / t:9.0f} {r:7.3f} {f:11.2%}")
    print(f"dedup throughput ratio ours/datasketch: {t_theirs / t_ours:.2f}x")

    texts = [p["text"] for s in ("math", "code", "general") for p in data.read_jsonl(os.path.join(d, f"{s}_clean.jsonl"))]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    tok_dir = os.path.join(d, "tokenizer")
    enc = Tokenizer.load(tok_dir)._enc  # the same tiktoken Encoding, called directly
    t0 = time.perf_counter()
    enc.encode_ordinary_batch(texts)
    t_tik = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        data.write_shards(texts, tok_dir, out, "bench")
        t_pipe = time.perf_counter() - t0
    print(f"tokenize {mb:.1f} MB: tiktoken encode_ordinary_batch {mb / t_tik:.1f} MB/s, "
          f"write_shards (tokenize + pack + write) {mb / t_pipe:.1f} MB/s, ratio {t_tik / t_pipe:.2f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("suite", nargs="?", default="model", choices=["model", "data"])
    ap.add_argument("--sizes", default="toy,100m", help="model: comma-separated model.PRESETS names")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32, help="prompts have between half this and this many tokens")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=6, help="timed runs of each train step (generation: a third)")
    ap.add_argument("--data", default="out/toy/data", help="data: the toy pipeline's directory")
    ap.add_argument("--pages", type=int, default=10000, help="data: crawl pages to deduplicate")
    ap.add_argument("--threshold", type=float, default=0.8, help="data: Jaccard threshold")
    ap.add_argument("--num-perm", type=int, default=128, help="data: MinHash permutations")
    args = ap.parse_args()
    if args.suite == "data":
        bench_data(args)
    else:
        print(f"device={args.device} dtype={args.dtype} torch={torch.__version__} threads={torch.get_num_threads()}")
        print(f"{'size':>6} {'what':<26} {'ours tok/s':>11} {'transformers':>13} {'ratio':>6}")
        for name in args.sizes.split(","):
            for size, what, a, b in bench_size(name, args):
                print(f"{size:>6} {what:<26} {a:11.0f} {b:13.0f} {a / b:5.2f}x", flush=True)
