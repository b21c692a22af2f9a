"""Benchmarks against peers, measured in one run on the same inputs; each prints ratios.

model: model.py vs transformers on the same weights. Training: tokens/s of forward + cross-entropy + backward,
  ours vs `LlamaForCausalLM`. Generation: new tokens/s of batched sampling from prompts of different lengths
  (left-padded for transformers), ours (preallocated KV cache) vs `generate` (its dynamic cache), greedy.
engine: GRPO-shaped sampling, 16 prompts x 8 samples with ragged lengths: engine.generate (eager, and its decode step
  compiled) vs the static-batch loop it replaced and transformers' `generate`.
sampler: the toy SFT model's samples from engine.complete and from transformers' `generate`: an exact per-token
  test of each sampler and their reward rates, paired per question.
gap: the sampler's log-probs against the training forward's on the same tokens, with the LM head in --dtype and in
  fp32: how much of the bf16 gap the head makes.
data: data.py's MinHash dedup vs datasketch's MinHashLSH (same permutations and threshold; also with FineWeb's
  14 x 8 banding): the share of near copies dropped by true-Jaccard bucket on real prose (docstrings), then recall
  and false drops on the toy crawl judged by exact Jaccard; tokenize-and-pack vs plain tiktoken.
reward: reward.py vs math-verify (`pip install math-verify`) on tests/data/grader_dev.jsonl, pairs drawn from
  other graders' test suites (the parametrize tables of math-verify 0.9.0's sdist tests, most written from model
  outputs; NeMo-Skills' test_math_equal both ways; MATH's is_equiv tests; Qwen2.5-Math's grader examples),
  labelled with the mathematical truth (`relabelled` says where that differs from the source). Kinds: "answer"
  (a bare answer vs the gold: is_equiv), "completion" (a model's text with a marked final answer: extraction,
  then is_equiv), "unmarked" (text that never marks its answer: we give no credit by design, see
  reward.extract_answer; reported apart).

    python bench.py model                 # toy and 100m on this machine's CPU
    python bench.py model --sizes 1b --device cuda --dtype bfloat16
    python bench.py engine                # GRPO-shaped sampling: 16 prompts x 8, ragged lengths; toy and 100m
    python bench.py data                  # needs the toy data: python data.py
    python bench.py reward [--show]       # --show lists every pair either grader gets wrong
    python bench.py grpo [--steps 10]     # needs the toy SFT model and pip install trl
    python bench.py sampler [--seed 1]    # needs the toy SFT model
    python bench.py gap --dtype bfloat16  # needs the toy SFT model
"""

import argparse
import json
import os
import re
import tempfile
import time
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F

import engine
from model import PRESETS, KVCache, ModelConfig, Transformer, config_from_hf, fused_layout


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


def left_padded(prompts, pad_id=0):
    """Prompts of several lengths as one batch for transformers' generate: (ids, attention mask), padded on the
    left so that every row's last prompt token sits in the last column, where generation continues."""
    P = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


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
    ids, mask = (t.to(args.device) for t in left_padded(prompts))
    N = args.new_tokens
    with torch.no_grad():
        t_ours, t_ref = timed([lambda: engine.generate(ours, prompts, N, temperature=0, slots=len(prompts)),
                               lambda: ref.generate(ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N,
                                                    do_sample=False, pad_token_id=0, eos_token_id=None)],
                              max(1, args.repeats // 3), args.device)
    rows.append((name, f"generate B={len(prompts)} new={N}", len(prompts) * N / t_ours, len(prompts) * N / t_ref))
    return rows


# -----------------------------------------------------------------------------
# engine: GRPO-shaped generation


@torch.no_grad()
def static_batch_generate(model, prompts, max_new_tokens, eos_ids, generator):
    """The decode loop this project had before engine.generate, as a peer: one batch of every sequence, each
    prompt prefilled for each of its samples, every row decoded until the longest has stopped, stops checked
    after every token, torch.multinomial sampling. Returns the number of tokens kept (up to each row's EOS)."""
    B, dev = len(prompts), model.lm_head.weight.device
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    tokens = torch.zeros(B, int(lens.max()), dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    cache = KVCache.empty(model.config, B, tokens.shape[1] + max_new_tokens, model.lm_head.weight.dtype, dev)
    h = model.prefill(tokens, cache)[torch.arange(B, device=dev), lens - 1]
    pos, eos = lens.clone(), torch.tensor(sorted(eos_ids), device=dev)
    done, kept = torch.zeros(B, dtype=torch.bool, device=dev), torch.zeros(B, dtype=torch.long, device=dev)
    for _ in range(max_new_tokens):
        nxt = torch.multinomial(model.lm_head(h).float().softmax(-1), 1, generator=generator)[:, 0]
        kept += ~done
        done |= torch.isin(nxt, eos)
        if done.all():
            break
        h = model.decode_step(nxt, pos, cache, cache.k[0].shape[2])
        pos += 1
    return int(kept.sum())


def bench_engine(args):
    """16 prompts x G = 8 samples at temperature 1, up to 96 new tokens, random weights: a sequence stops at any of
    V / 35 ids made EOS, so completions are ragged (about 35 tokens on average, as the toy's), and the samples of
    a prompt differ. engine.generate (shared prefill, rows refilled and compacted), eager and with the decode step
    compiled (a Decoder kept across calls, as GRPO keeps one: timed warm), against the static batch above and
    transformers' generate given the 128 sequences as one left-padded batch (its dynamic cache, top_k off). New
    tokens per second, each counting the tokens it kept."""
    from transformers import AutoModelForCausalLM

    print(f"{'size':>6} {'generator':<32} {'tokens/s':>9} {'ratio':>7}")
    for name in args.sizes.split(","):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**PRESETS[name]))
        model.init_weights()
        V = model.config.vocab_size
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
        model, ref = model.to(args.device).eval(), ref.to(args.device).eval()
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(24, 64, (16,), generator=g).tolist()
        distinct = [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]
        prompts = [p for p in distinct for _ in range(8)]
        eos = set(torch.randperm(V - 1, generator=g)[:V // 35].add(1).tolist())
        ids, mask = (t.to(args.device) for t in left_padded(prompts))
        P, sampler = ids.shape[1], torch.Generator(args.device).manual_seed(0)
        kept, decoder = {}, engine.Decoder(model, compile=True)

        def ours():
            gen = engine.generate(model, prompts, 96, temperature=1.0, eos_ids=eos, slots=len(prompts))
            kept["engine.generate"] = sum(map(len, gen.tokens))

        def compiled():
            gen = decoder.generate(prompts, 96, temperature=1.0, eos_ids=eos, slots=len(prompts))
            kept["engine.generate, compiled"] = sum(map(len, gen.tokens))

        def static():
            kept["static batch (the previous loop)"] = static_batch_generate(model, prompts, 96, eos, sampler)

        def hf():
            out = ref.generate(ids, attention_mask=mask, max_new_tokens=96, do_sample=True, temperature=1.0, top_k=0,
                               top_p=1.0, eos_token_id=sorted(eos), pad_token_id=0)[:, P:]
            is_eos = torch.isin(out, torch.tensor(sorted(eos), device=out.device))  # kept: up to the first EOS
            kept["transformers generate"] = int(((is_eos.cumsum(1) - is_eos.long()) == 0).sum())

        seconds = timed([ours, compiled, static, hf], max(1, args.repeats // 3), args.device)
        rates = {k: kept[k] / s for k, s in zip(kept, seconds)}
        for k, r in rates.items():
            print(f"{name:>6} {k:<32} {r:9.0f} {r / rates['transformers generate']:6.2f}x", flush=True)
        print(f"{name:>6} engine.generate / static batch: {rates['engine.generate'] / rates[list(rates)[2]]:.2f}x; "
              f"compiled / eager: {rates['engine.generate, compiled'] / rates['engine.generate']:.2f}x")


# -----------------------------------------------------------------------------
# sampler: does the engine draw what transformers' generate draws?


def bench_sampler(args):
    """The toy SFT model sampled by engine.complete and by transformers' generate as TRL calls it (left-padded
    batches of 128, temperature 1, top_k 0, top_p 1), --questions RL questions x --samples each, up to 96 new
    tokens. Two checks per sampler, on its own samples scored by our forward: one exact per token (at each
    position the most likely token is drawn with its probability p_max, so Σ (1[argmax drawn] - p_max) over the
    sampled tokens is 0 in expectation with variance Σ p_max (1 - p_max); its z-score stays within ±3 for an
    exact sampler), and the reward rate, paired per question between the two samplers (difference ± its standard
    error): what GRPO's groups see."""
    import statistics

    import transformers

    import problem_sets
    import reward
    from tokenizer import Tokenizer
    tok = Tokenizer.load(args.init)
    problems = problem_sets.load_problems(args.rl_data)[:args.questions]
    questions = [p["question"] for p in problems for _ in range(args.samples)]
    golds = [p["answer"] for p in problems for _ in range(args.samples)]
    prompts = [engine.prompt_ids(tok, q) for q in questions]
    model = Transformer.from_pretrained(args.init, dtype=torch.float32).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32).eval()
    drawn = {"engine.complete": [c.ids for c in engine.complete(model, tok, questions, "cot", 96, 1.0,
                                                                seed=args.seed, batch=128)]}
    torch.manual_seed(args.seed)
    drawn["transformers generate"] = []
    for i in range(0, len(prompts), 128):
        ids, mask = left_padded(prompts[i:i + 128], tok.pad_id)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=96, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[:, ids.shape[1]:].tolist()
        drawn["transformers generate"] += [row[:row.index(tok.eos_id) + 1] if tok.eos_id in row else row
                                           for row in out]  # a row without EOS ran to the budget

    print(f"{args.questions} questions x {args.samples} samples from {args.init}")
    print(f"{'sampler':<24}{'reward':>8}{'length':>8}{'flat groups':>13}{'argmax z':>10}")
    per_question = {}
    for name, outs in drawn.items():
        rewards, excess, variance = [], 0.0, 0.0
        for p, ids, gold in zip(prompts, outs, golds):
            with torch.no_grad():
                probs = model(torch.tensor([p + ids]))[0, len(p) - 1:-1, :tok.vocab_size].float().softmax(-1)
            p_max, top = probs.max(-1)  # (|o|,): the most likely token at each position, and its probability
            excess += ((top == torch.tensor(ids)).float() - p_max).sum().item()
            variance += (p_max * (1 - p_max)).sum().item()
            rewards.append(reward.math_reward(tok.decode([t for t in ids if t != tok.eos_id]), gold))
        groups = [rewards[i:i + args.samples] for i in range(0, len(rewards), args.samples)]
        per_question[name] = [statistics.mean(g) for g in groups]
        flat = sum(len(set(g)) == 1 for g in groups)
        length = statistics.mean(map(len, outs))
        print(f"{name:<24}{statistics.mean(rewards):8.4f}{length:8.2f}{flat:>8d}/{len(groups):<4d}"
              f"{excess / variance ** 0.5:+10.2f}")
    diff = [a - b for a, b in zip(*per_question.values())]
    print(f"reward per question, engine - transformers: {100 * statistics.mean(diff):+.2f} ± "
          f"{100 * statistics.stdev(diff) / len(diff) ** 0.5:.2f} points")


def bench_gap(args):
    """The sampler's log-probs against the training forward's, on the sampler's own tokens (what grpo.py logs as
    logprob_gap and --tis corrects), with the model in --dtype: the LM head's GEMM in that dtype, and in fp32 on
    both sides (--fp32-head): how much of the gap the head's rounding makes. --questions RL questions x
    --samples each, up to 96 new tokens at T = 1, from --init."""
    import problem_sets
    from tokenizer import Tokenizer
    tok = Tokenizer.load(args.init)
    questions = [p["question"] for p in problem_sets.load_problems(args.rl_data)[:args.questions]
                 for _ in range(args.samples)]
    model = Transformer.from_pretrained(args.init, dtype=getattr(torch, args.dtype), device=args.device).eval()
    print(f"{len(questions)} samples of {args.init} in {args.dtype} on {args.device}; |sampler - trainer| log-prob")
    for fp32_head in (False, True):
        model.config.fp32_head = fp32_head
        with torch.no_grad():
            comps = engine.complete(model, tok, questions, "cot", 96, 1.0, seed=args.seed, batch=128)
            gaps = []
            for c in comps:
                t = torch.tensor([c.prompt + c.ids], device=args.device)
                trainer = model(t[:, :-1], t[:, 1:], vocab_limit=tok.vocab_size)[0, len(c.prompt) - 1:]
                gaps.append((trainer.cpu() - torch.tensor(c.logprobs)).abs())
        g = torch.cat(gaps)
        head = "float32" if fp32_head else args.dtype
        print(f"  head in {head:<9} mean {g.mean():.2e}  max {g.max():.2e}  over {len(g)} tokens")


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


def docstrings(roots):
    """Real English prose offline: the docstrings of the Python source files under `roots` (read with ast,
    nothing imported), deduplicated."""
    import ast
    files = sorted(os.path.join(d, f) for r in roots for d, _, fs in os.walk(r) if "test" not in d
                   for f in fs if f.endswith(".py"))
    docs = {}
    for path in files:
        try:
            tree = ast.parse(open(path, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and (d := ast.get_docstring(node)):
                docs[d] = None
    return list(docs)


def prose():
    """The standard library's and sympy's docstrings as one word list."""
    import sysconfig

    import sympy
    return " ".join(docstrings([sysconfig.get_paths()["stdlib"], os.path.dirname(sympy.__file__)])).split()


# Final answers in MATH's style (written here; the shapes that recur in its test set)
MATH_STYLE_ANSWERS = ["\\frac{1}{2}", "2\\sqrt{3}", "\\frac{\\sqrt{3}}{2}", "\\frac{\\pi}{4}", "x^2 + 1",
                      "\\frac{1}{3}",
                      "3\\sqrt{2}", "\\frac{2}{3}", "-\\frac{1}{2}", "1 + \\sqrt{2}", "(-\\infty, 0)", "[-1, 1]",
                      "\\dfrac{1}{4}", "2^{10}", "\\frac{x}{2}", "x + 1", "(1, 2)", "e^{x} + 1", "\\sin x \\cos x",
                      "\\frac{n(n+1)}{2}"]


def decontamination_drops():
    """Pages of real math text (sympy's docstrings) dropped by decontamination against 200 MATH-style problems
    whose questions and solutions are not on any page: with the bare final answers among the benchmark texts
    (before) and without them (problem_sets.benchmark_texts)."""
    import sympy

    import data
    import problem_sets
    pages = docstrings([os.path.dirname(sympy.__file__)])
    problems = [dict(question=f"Contest problem {i}: find the exact value asked for in part ({i % 7}) below.",
                     answer=a, cot=f"Working through problem {i} step by step, the value is $\\boxed{{{a}}}$.")
                for i, a in enumerate(MATH_STYLE_ANSWERS * 10)]
    before = data.decontaminate(pages, problem_sets.benchmark_texts(problems) + [p["answer"] for p in problems])
    after = data.decontaminate(pages, problem_sets.benchmark_texts(problems))
    print(f"\ndecontamination of {len(pages)} sympy docstrings against 200 MATH-style problems: pages dropped "
          f"with bare answers matched {before.count(False)}, questions and solutions only {after.count(False)}")


def near_copies(windows, rate, rng, vocab):
    """Each window with `rate` of its words replaced by random words of the vocabulary."""
    out = []
    for w in windows:
        ws = w.split()
        for i in rng.sample(range(len(ws)), max(1, round(rate * len(ws)))):
            ws[i] = rng.choice(vocab)
        out.append(" ".join(ws))
    return out


def datasketch_dedup(sets, threshold, num_perm, params=None):
    """datasketch's MinHashLSH as a streaming dedup: a page is dropped when the index returns any candidate."""
    from datasketch import MinHash, MinHashLSH
    lsh, keep = MinHashLSH(threshold=threshold, num_perm=num_perm, params=params), []
    for i, s in enumerate(sets):
        m = MinHash(num_perm=num_perm)
        m.update_batch([sh.encode() for sh in s])
        dup = bool(lsh.query(m))
        keep.append(not dup)
        if not dup:
            lsh.insert(str(i), m)
    return keep


def recall_curve(args):
    """Drop rate by true Jaccard of 200-word windows of real prose against near copies of themselves (1%, 2% and
    5% of the words replaced, one copy per window per rate, each rate a separate stream: originals, then
    copies). Shingling for datasketch is timed with it; ours shingles inside minhash_dedup."""
    import random

    import numpy as np

    import data
    words = prose()
    windows = [" ".join(words[i:i + 200]) for i in range(0, len(words) - 200, 200)][:args.windows]
    rng, vocab = random.Random(0), sorted(set(words))
    arms = {"ours": lambda texts: data.minhash_dedup(texts, args.threshold, args.num_perm),
            "datasketch": lambda texts: datasketch_dedup(shingle_sets(texts), args.threshold, args.num_perm),
            "datasketch 14x8": lambda texts: datasketch_dedup(  # FineWeb's banding
                shingle_sets(texts), args.threshold, args.num_perm, params=(14, 8))}
    jaccard, dropped, seconds = [], defaultdict(list), Counter()
    for rate in (0.01, 0.02, 0.05):
        copies = near_copies(windows, rate, rng, vocab)
        stream = windows + copies
        sets = shingle_sets(stream)
        jaccard += [len(a & b) / len(a | b) for a, b in zip(sets[:len(windows)], sets[len(windows):])]
        for name, fn in arms.items():
            t0 = time.perf_counter()
            keep = fn(stream)
            seconds[name] += time.perf_counter() - t0
            dropped[name] += [not k for k in keep[len(windows):]]
    jaccard = np.array(jaccard)
    edges = [0.0, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.01]
    buckets = [(lo, hi) for lo, hi in zip(edges, edges[1:])]
    print(f"{len(windows)} windows of 200 words x 3 copy rates; share of copies dropped by true Jaccard of word "
          f"5-grams to their original (threshold {args.threshold}, {args.num_perm} permutations):")
    print(f"{'':<18}" + "".join(f"{f'{lo:.2f}-{min(hi, 1):.2f}':>11}" for lo, hi in buckets) + f"{'pages/s':>9}")
    print(f"{'pairs':<18}" + "".join(f"{((jaccard >= lo) & (jaccard < hi)).sum():>11}" for lo, hi in buckets))
    for name in arms:
        d = np.array(dropped[name])
        cells = [d[(jaccard >= lo) & (jaccard < hi)] for lo, hi in buckets]
        print(f"{name:<18}" + "".join(f"{c.mean():>11.3f}" if len(c) else f"{'-':>11}" for c in cells)
              + f"{2 * len(jaccard) / seconds[name]:>9.0f}")
    print("recall at Jaccard >= 0.85: " + ", ".join(
        f"{name} {np.array(dropped[name])[jaccard >= 0.85].mean():.4f}" for name in arms))
    print(f"dedup throughput ratio ours/datasketch: {seconds['datasketch'] / seconds['ours']:.2f}x")


def bench_data(args):
    import data
    from tokenizer import Tokenizer
    recall_curve(args)
    decontamination_drops()
    d = args.data
    pages = [p["text"] for p in data.read_jsonl(os.path.join(d, "crawl.jsonl"))][:args.pages]
    sets = shingle_sets(pages)
    pairs = true_pairs(sets, args.threshold)
    print(f"\n{len(pages)} toy crawl pages, {len(pairs)} pairs with exact Jaccard >= {args.threshold}")

    t0 = time.perf_counter()
    ours = data.minhash_dedup(pages, threshold=args.threshold, num_perm=args.num_perm)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = datasketch_dedup(shingle_sets(pages), args.threshold, args.num_perm)
    t_theirs = time.perf_counter() - t0

    print(f"{'dedup':<12} {'pages/s':>9} {'recall':>7} {'false drops':>12}")
    for name, keep, t in (("ours", ours, t_ours), ("datasketch", theirs, t_theirs)):
        r, f = judge(keep, pairs, len(pages))
        print(f"{name:<12} {len(pages) / t:9.0f} {r:7.3f} {f:11.2%}")
    print(f"dedup throughput ratio ours/datasketch: {t_theirs / t_ours:.2f}x")

    texts = [p["text"] for s in ("math", "code", "general")
             for p in data.read_jsonl(os.path.join(d, f"{s}_clean.jsonl"))]
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


DEV_PAIRS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "data", "grader_dev.jsonl")


def our_verdict(row):
    """reward.py's verdict on one held-out pair (a gold written as a solution is read as a solution)."""
    from reward import extract_answer, is_equiv, math_reward
    gold = extract_answer(row["gold"]) or row["gold"]
    return is_equiv(row["pred"], gold) if row["kind"] == "answer" else math_reward(row["pred"], gold) == 1.0


def bench_reward(args):
    import json

    try:
        from math_verify import parse, verify
    except ImportError:
        raise SystemExit("error: bench.py reward compares with math-verify: pip install math-verify") from None
    rows = [json.loads(line) for line in open(DEV_PAIRS)]

    def read(s):  # as its README calls it; a bare answer that yields nothing is retried inside $...$
        return parse(s) or parse(f"${s}$")

    def theirs(row):
        try:
            return bool(verify(read(row["gold"]), read(row["pred"])))
        except Exception:  # noqa: BLE001  a crash is a wrong verdict, as for any grader
            return False
    t0 = time.perf_counter()
    ours = [our_verdict(r) for r in rows]
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    mv = [theirs(r) for r in rows]
    t_mv = time.perf_counter() - t0
    print(f"{'kind':<11} {'source':<58} {'pairs':>5} {'ours':>7} {'math-verify':>11}")
    groups = defaultdict(list)
    for i, r in enumerate(rows):
        groups[(r["kind"], r["source"].split("::")[0])].append(i)
        groups[(r["kind"], "all")].append(i)
    def acc(verdicts, idx):
        return sum(verdicts[i] == bool(rows[i]["label"]) for i in idx) / len(idx)
    for (kind, src), idx in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] == "all", kv[0][1])):
        print(f"{kind:<11} {src:<58} {len(idx):5d} {acc(ours, idx):7.1%} {acc(mv, idx):11.1%}")
    marked = [i for i, r in enumerate(rows) if r["kind"] != "unmarked"]
    print(f"answer + completion, {len(marked)} pairs: ours {acc(ours, marked):.1%}, math-verify {acc(mv, marked):.1%}; "
          f"time ours {t_ours:.1f} s, math-verify {t_mv:.1f} s")
    if args.show:
        for i, r in enumerate(rows):
            if ours[i] != bool(r["label"]) or mv[i] != bool(r["label"]):
                print(f"[{i}] {r['kind']} label={r['label']} ours={int(ours[i])} mv={int(mv[i])} "
                      f"gold={r['gold'][-80:]!r} pred={r['pred'][-120:]!r}")


# -----------------------------------------------------------------------------
# grpo: grpo.py against TRL's GRPOTrainer on the toy


# grpo.py's --schedule choices in TRL's terms (its cosine_with_min_lr at 0.1 is lr_factor's cosine)
TRL_SCHEDULES = dict(constant=dict(lr_scheduler_type="constant"),
                     cosine=dict(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs=dict(min_lr_rate=0.1)))


def trl_run(args, ours, tok, problems, steps, out):
    """TRL's GRPOTrainer matched to grpo.py's defaults `ours` (bench_grpo says how), on grpo.py's draws walked in
    order; its model saved to `out`. Returns (seconds of each step, each step's mean reward)."""
    import datasets
    import transformers
    import trl

    import engine
    import grpo
    import reward
    # TRL walks its dataset in order (no shuffle): grpo.py's draws, step after step
    walk = [problems[i] for step in range(steps) for i in grpo.draw(len(problems), ours.questions, args.seed, step)]
    hf_tok = transformers.AutoTokenizer.from_pretrained(args.init)
    prompt_ids = [engine.prompt_ids(tok, p["question"]) for p in walk]
    prompts = [tok.decode(ids) for ids in prompt_ids]  # TRL takes text: BOS is in it, as its special token
    same = sum(hf_tok(p, add_special_tokens=False)["input_ids"] == ids for p, ids in zip(prompts, prompt_ids))
    print(f"prompts token-identical under TRL's tokenizer call: {same} of {len(prompts)}")
    question_of = dict(zip(prompts, (p["question"] for p in walk)))
    sampler = Transformer.from_pretrained(args.init, dtype=torch.float32)

    def engine_rollouts(prompts, trainer):  # grpo.py's rollouts of the model TRL trains (--trl-sampler engine)
        hf_state = {k.removeprefix("model."): v for k, v in trainer.model.state_dict().items()}
        sampler.load_state_dict(fused_layout(hf_state, sampler.config))  # our q/k/v and gate/up stacked
        step = trainer.state.global_step
        comps = engine.complete(sampler, tok, [question_of[p] for p in prompts], "cot", ours.max_new_tokens,
                                ours.temperature, ours.top_p, seed=engine.sampling_seed(args.seed, step),
                                batch=len(prompts))
        return dict(prompt_ids=[c.prompt for c in comps], completion_ids=[c.ids for c in comps],
                    logprobs=[c.logprobs for c in comps])

    def correctness(completions, answer, **_):
        return [reward.math_reward(c, a) for c, a in zip(completions, answer)]

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.seconds, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.seconds.append(time.perf_counter() - self.t0)

    config = trl.GRPOConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=32, gradient_accumulation_steps=4,
        steps_per_generation=4, num_generations=8, num_iterations=1, max_completion_length=96, temperature=1.0,
        top_p=1.0, learning_rate=ours.lr, **TRL_SCHEDULES[ours.schedule], warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, beta=0.04, epsilon=0.2,
        loss_type="grpo", scale_rewards="group", use_bias_correction_kl=False, gradient_checkpointing=False,
        bf16=False, use_cpu=True, seed=args.seed, report_to="none", logging_steps=1, save_strategy="no",
        disable_tqdm=True, shuffle_dataset=False)
    dataset = datasets.Dataset.from_dict({"prompt": prompts, "answer": [p["answer"] for p in walk]})
    model = transformers.AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32)
    timer = StepTimer()
    trainer = trl.GRPOTrainer(model=model, reward_funcs=correctness, args=config, train_dataset=dataset,
                              processing_class=hf_tok, callbacks=[timer],
                              rollout_func=engine_rollouts if args.trl_sampler == "engine" else None)
    trainer.train()
    trainer.model.save_pretrained(out)
    tok.save(out)
    return timer.seconds, [row["reward"] for row in trainer.state.log_history if "reward" in row]


def bench_grpo(args):
    """The same SFT model, questions, rewards and settings through grpo.py and through TRL's GRPOTrainer, one
    after the other in this process: seconds per step (median over the steps after the first) and held-out
    greedy accuracy of each result, graded by the same evaluate.py. Matched: grpo.py's default steps, 16 questions
    x G = 8 per step in micro-batches of 32, one update per batch (mu = 1), up to 96 new tokens at temperature 1,
    grpo.py's LR (1e-4) on its default schedule (cosine to a tenth, no warmup: TRL's cosine_with_min_lr at 0.1 is the
    same function; or constant), AdamW betas (0.9, 0.95) without weight decay, gradients clipped at 1, beta 0.04
    with the k3 estimate, epsilon 0.2, per-sequence normalisation, std-scaled group advantages, reward.math_reward,
    fp32 on the CPU, prompts token-identical (BOS included; checked), and the same questions at every step (TRL
    walks grpo.py's draws in order). --trl-sampler engine gives TRL's trainer its rollouts from our engine (TRL's
    rollout_func, sampling the model TRL is training, with grpo.py's seeds): with the same rollouts the two trainers
    should take the same steps, which the per-step rewards show until float rounding makes a sample differ."""
    import statistics

    import common
    import engine
    import evaluate
    import grpo
    import problem_sets
    from tokenizer import Tokenizer
    try:
        import transformers
        import trl
    except ImportError:
        raise SystemExit("error: bench.py grpo compares against TRL: pip install trl (not a dependency of this "
                         "project)")
    for path in (args.init, args.rl_data, args.eval_data):
        if not os.path.exists(path):
            raise SystemExit(f"error: bench.py grpo: {path} not found; `python sft.py` builds the toy's SFT model and "
                             "data (or pass --init, --rl-data and --eval-data)")
    tok = Tokenizer.load(args.init)
    problems = problem_sets.load_problems(args.rl_data)
    test = problem_sets.load_problems(args.eval_data)[:args.eval_problems]
    d = common.Dist(0, 1, torch.device("cpu"))
    ours = grpo.parse_args([])  # the defaults both trainers run
    room = config_from_hf(args.init).max_seq_len - ours.max_new_tokens
    if any(len(engine.prompt_ids(tok, p["question"])) > room for p in problems):
        raise SystemExit(f"error: bench.py grpo: {args.rl_data} has prompts too long for {ours.max_new_tokens} new "
                         "tokens: grpo.py would skip them and draw from another list than TRL walks")
    steps = args.steps or ours.max_steps
    if ours.schedule not in TRL_SCHEDULES or ours.warmup:
        raise SystemExit(f"error: bench.py grpo matches TRL to a constant or cosine LR without warmup, not grpo.py's "
                         f"--schedule {ours.schedule} --warmup {ours.warmup}")

    def held_out(path):
        model = Transformer.from_pretrained(path, dtype=torch.float32)
        m = evaluate.held_out_metrics(model, tok, test, d, max_new_tokens=96, batch=64)
        return m["accuracy"]

    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, trl_dir = os.path.join(tmp, "ours"), os.path.join(tmp, "trl")
        grpo.main(grpo.parse_args(["--init", args.init, "--data", args.rl_data, "--eval-data", "none",
                                   "--out", ours_dir, "--max-steps", str(steps), "--seed", str(args.seed)]))
        rows = [json.loads(line) for line in open(os.path.join(ours_dir, "metrics.jsonl"))]
        ours_s = [r["seconds"] for r in rows if "seconds" in r]
        ours_rewards = [r["reward"] for r in rows if "reward" in r]

        trl_s, trl_rewards = trl_run(args, ours, tok, problems, steps, trl_dir)

        before, ours_acc, trl_acc = held_out(args.init), held_out(ours_dir), held_out(trl_dir)
    ours_step, trl_step = statistics.median(ours_s[1:]), statistics.median(trl_s[1:])
    print(f"\n{steps} steps of 16 x 8 ({ours.schedule} LR) on {args.init}, held-out greedy on {len(test)} problems "
          f"(before: {100 * before:.1f}%); TRL {trl.__version__}, transformers {transformers.__version__}")
    print(f"{'':<10}{'s/step':>8}{'held-out':>10}")
    print(f"{'grpo.py':<10}{ours_step:8.2f}{100 * ours_acc:9.1f}%")
    print(f"{'TRL':<10}{trl_step:8.2f}{100 * trl_acc:9.1f}%")
    print(f"speed ratio ours/TRL: {trl_step / ours_step:.2f}x")
    agree = next((i for i, (a, b) in enumerate(zip(ours_rewards, trl_rewards)) if abs(a - b) > 1e-6), steps)
    print(f"mean rewards equal for the first {agree} of {steps} steps (TRL's sampler: {args.trl_sampler}); "
          f"over all steps, grpo.py {statistics.mean(ours_rewards):.4f}, TRL {statistics.mean(trl_rewards):.4f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("suite", nargs="?", default="model",
                    choices=["model", "engine", "sampler", "gap", "data", "reward", "grpo"])
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
    ap.add_argument("--windows", type=int, default=3000, help="data: 200-word prose windows for the recall curve")
    ap.add_argument("--threshold", type=float, default=0.8, help="data: Jaccard threshold")
    ap.add_argument("--num-perm", type=int, default=128, help="data: MinHash permutations")
    ap.add_argument("--show", action="store_true", help="reward: list the pairs either grader gets wrong")
    ap.add_argument("--init", default="out/toy/sft", help="grpo: the model both trainers start from")
    ap.add_argument("--rl-data", default="out/toy/data/problems/rl.jsonl", help="grpo: questions with answers")
    ap.add_argument("--eval-data", default="out/toy/data/problems/test.jsonl", help="grpo: held-out problems")
    ap.add_argument("--eval-problems", type=int, default=200)
    ap.add_argument("--steps", type=int, default=None, help="grpo: steps of each trainer (default: grpo.py's)")
    ap.add_argument("--seed", type=int, default=0, help="grpo: both trainers' seed; sampler: both samplers'")
    ap.add_argument("--questions", type=int, default=100, help="sampler: RL questions sampled")
    ap.add_argument("--samples", type=int, default=16, help="sampler: samples of each question")
    ap.add_argument("--trl-sampler", default="trl", choices=["trl", "engine"],
                    help="grpo: TRL's own generate, or rollouts from our engine through TRL's rollout_func")
    args = ap.parse_args()
    if args.suite == "data":
        bench_data(args)
    elif args.suite == "reward":
        bench_reward(args)
    elif args.suite == "grpo":
        bench_grpo(args)
    elif args.suite == "engine":
        bench_engine(args)
    elif args.suite == "sampler":
        bench_sampler(args)
    elif args.suite == "gap":
        bench_gap(args)
    else:
        print(f"device={args.device} dtype={args.dtype} torch={torch.__version__} threads={torch.get_num_threads()}")
        print(f"{'size':>6} {'what':<26} {'ours tok/s':>11} {'transformers':>13} {'ratio':>6}")
        for name in args.sizes.split(","):
            for size, what, a, b in bench_size(name, args):
                print(f"{size:>6} {what:<26} {a:11.0f} {b:13.0f} {a / b:5.2f}x", flush=True)
