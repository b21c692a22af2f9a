"""From raw pages to token shards: the DeepSeekMath corpus pipeline (paper §2.1; docs/paper.md §1).

    crawl.jsonl ─► URL dedup ─► MinHash near-dedup ─► quality filters ─► fastText classifier with iterative
    domain expansion ─► 10-gram decontamination ─► tokenizer ─► packed shards per source (math, code, general)

Every stage is one function below, called in order by `build`; each reads and writes jsonl in a directory, reports
what it kept and dropped (and, on the toy world, precision and recall against ground truth), and is skipped when
its output exists. The same stages run on real dumps: OpenWebMath / Common Crawl jsonl with {"text", "url"}
lines. MinHash and the n-gram matching are dedup.py's, the tokenizer tokenizer.py's, the toy world toyworld.py's,
the problem sets (read to decontaminate against) problem_sets.py's; this file writes the token shards the trainers
read.

    python data.py                                   # the toy world, end to end, into out/toy/data
    python data.py --crawl cc.jsonl --seed-pos owm.jsonl --benchmarks gsm8k_test.jsonl --out out/real
"""

import argparse
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from dedup import NearDupIndex, batched, decontaminate, minhash_dedup  # noqa: F401  (public)
from jsonl import DataError, append_jsonl, read_jsonl, write_jsonl  # noqa: F401  (public here too)
from problem_sets import benchmark_texts, load_problems
from reward import forked_pool  # a leaf (stdlib + sympy)
from tokenizer import LEAST_VOCAB, Tokenizer  # noqa: F401  (data.Tokenizer is a public name)



def progress(iterable, desc, total=None):
    """A progress bar on a terminal, nothing in logs."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False)


# -----------------------------------------------------------------------------
# URLs

TRACKING = re.compile(r"^(utm_\w+|fbclid|gclid|mc_cid|mc_eid|ref|ref_src)$")


def normalize_url(url):
    """One spelling per page: lowercase scheme and host, no www., no default port, no fragment, no tracking
    parameters, sorted query, no trailing slash; http and https are the same page."""
    try:
        s = urlsplit(url.strip())
    except ValueError:
        return url.strip()
    host = (s.hostname or "").removeprefix("www.")
    if s.port and s.port not in (80, 443):
        host += f":{s.port}"
    query = urlencode(sorted((k, v) for k, v in parse_qsl(s.query, keep_blank_values=True) if not TRACKING.match(k)))
    return urlunsplit(("https", host, s.path.rstrip("/") or "", query, ""))


def domain(url):
    """The paper's domain: pages with the same base URL."""
    return urlsplit(normalize_url(url)).hostname or ""


def url_dedup(urls, seen=None):
    """Keep mask: the first page of each normalised URL. Pass the same `seen` set to successive calls to
    deduplicate a stream batch by batch."""
    seen, keep = set() if seen is None else seen, []
    for u in urls:
        key = normalize_url(u)
        keep.append(key not in seen)
        seen.add(key)
    return keep


# -----------------------------------------------------------------------------
# Quality filters: each one justified, each one counted


def quality_issue(text, min_words=20, max_symbol_ratio=0.3, max_dup_line_ratio=0.3):
    """The reason a page is dropped, or None. Thresholds are ours (the paper gives none):
    too_short: fewer than 20 words is a stub, an error page or a menu; symbols: more than 30% of non-space
    characters outside letters, digits and common math punctuation is markup debris or encoding junk;
    repetition: more than 30% of the characters in lines that repeat an earlier line is spam or boilerplate
    (Gopher's rule, weighted by characters so that short repeated lines such as code fences do not count much)."""
    ws = text.split()
    if len(ws) < min_words:
        return "too_short"
    chars = [c for c in text if not c.isspace()]
    odd = sum(not (c.isalnum() or c in "+-*/=()[]{}.,:;?'\"\\^_$<>!%") for c in chars)
    if odd > max_symbol_ratio * len(chars):
        return "symbols"
    seen, repeated, total = set(), 0, 0
    for ln in (ln.strip() for ln in text.splitlines()):
        total += len(ln)
        repeated += len(ln) if ln in seen else 0
        seen.add(ln)
    if repeated > max_dup_line_ratio * total:
        return "repetition"
    return None


# -----------------------------------------------------------------------------
# The fastText math classifier (paper §2.1)


def _one_line(text, max_chars):
    """fastText reads one example per line: newlines become spaces, invalid unicode is replaced, and huge
    pages are cut to their first max_chars characters (the score of a page is decided by its beginning)."""
    return " ".join(text[:max_chars].encode("utf-8", "replace").decode("utf-8").split()) or "<empty>"


class MathClassifier:
    """fastText binary classifier, math vs not, with the paper's settings as defaults:
    vector dim 256, lr 0.1, word n-grams up to 3, minCount 3, 3 epochs."""

    def __init__(self, model=None, max_chars=100_000):
        self.model, self.max_chars = model, max_chars

    def train(self, pos_texts, neg_texts, dim=256, lr=0.1, word_ngrams=3, min_count=3, epoch=3, seed=0, threads=1,
              bucket=None):
        """bucket: size of the hashed n-gram table. fastText's default, 2M rows of `dim` floats, is 2 GB at dim 256;
        None scales it to the data (50 rows per training page, between 100K and 2M). threads: one gives the same
        model on every run (fastText's threads update shared weights without locks); use more on a real crawl."""
        import random
        import tempfile

        import fasttext
        lines = [f"__label__math {_one_line(t, self.max_chars)}" for t in pos_texts]
        lines += [f"__label__other {_one_line(t, self.max_chars)}" for t in neg_texts]
        if not all(any(ln.startswith(label) for ln in lines) for label in ("__label__math", "__label__other")):
            raise ValueError("MathClassifier.train needs at least one positive and one negative text")
        random.Random(seed).shuffle(lines)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        try:
            self.model = fasttext.train_supervised(input=f.name, dim=dim, lr=lr, wordNgrams=word_ngrams,
                                                   minCount=min_count, epoch=epoch, seed=seed, thread=threads,
                                                   bucket=bucket or min(2_000_000, max(100_000, 50 * len(lines))),
                                                   verbose=0)
        finally:
            os.unlink(f.name)
        return self

    def predict_proba(self, texts):
        """P(math) for each text, as a float32 array."""
        texts = [_one_line(t, self.max_chars) for t in texts]
        if not texts:
            return np.zeros(0, dtype=np.float32)
        labels, probs = self.model.predict(texts, k=2)
        return np.array([dict(zip(ls, ps)).get("__label__math", 0.0) for ls, ps in zip(labels, probs)],
                        dtype=np.float32).clip(0, 1)

    def save(self, path):
        self.model.save_model(path)

    @classmethod
    def load(cls, path):
        import fasttext
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no fastText model here")
        return cls(fasttext.load_model(path))


def math_paths(collected_urls, all_urls, min_domain_share=0.1, min_path_share=0.1):
    """The paper's domain discovery with a rule in place of its human annotators. A domain (base URL) with more
    than 10% of its pages collected is math-related (paper); within it, a first path segment (e.g.
    talkboard.com/math) with more than 10% of its pages collected is a math path (ours, the same share one level
    down: the paper's annotators marked such paths by hand). Returns the set of (domain, first segment).

    Where a rule differs from a person: a weak first classifier whose false positives push a non-math domain past
    10% makes the whole of its path positive, and the next round collects all of it. On the toy this happens at
    about 5,000 pages and below (a classifier trained on a few hundred seeds); a person would look at the pages."""
    pages = defaultdict(Counter)  # domain -> first segment -> pages
    got = defaultdict(Counter)
    collected = set(map(normalize_url, collected_urls))
    for u in all_urls:
        nu = normalize_url(u)
        d, seg = _path_key(nu)
        pages[d][seg] += 1
        got[d][seg] += nu in collected
    out = set()
    for d in pages:
        if sum(got[d].values()) > min_domain_share * sum(pages[d].values()):
            out |= {(d, s) for s in pages[d] if got[d][s] > min_path_share * pages[d][s]}
    return out


def _path_key(url):
    nu = normalize_url(url)
    return domain(nu), urlsplit(nu).path.strip("/").split("/")[0]


def classify_with_expansion(read_pages, seed_texts, iterations=4, budget_tokens=None, threshold=0.5, n_neg=None,
                            epochs=3, labels=None, seed=0, log=print, batch=5000, threads=1):
    """Paper §2.1: train on seed positives vs random pages, score the pool, collect the top pages within a token
    budget (whitespace words stand in for tokens: the tokenizer is trained on the result), find math domains
    and their math paths, add the uncollected pages under those paths to the positives, retrain; `iterations`
    times. Pages scoring under `threshold` are never collected (ours; the paper gives no threshold).

    `read_pages()` returns a fresh iterator over the pool's {"url", "text"} pages: the pool is streamed a few
    times per round, and only its URLs, sizes and scores stay in memory (the training set does too).
    Returns (keep mask over pages, per-round report rows, the last classifier)."""
    rng = np.random.default_rng(seed)
    urls, sizes = [], []
    for p in read_pages():
        urls.append(p["url"])
        sizes.append(len(p["text"].split()))
    sizes = np.array(sizes)
    budget = budget_tokens if budget_tokens is not None else int(sizes.sum())
    n_neg = min(n_neg or max(len(seed_texts), 1), len(urls))
    truth = None if labels is None else np.array([labels[u]["math"] for u in urls])
    positives, prev, report = list(seed_texts), set(), []
    for it in range(1, iterations + 1):
        neg_ids = set(rng.choice(len(urls), n_neg, replace=False).tolist())
        neg = [p["text"] for i, p in enumerate(read_pages()) if i in neg_ids]
        clf = MathClassifier().train(positives, neg, epoch=epochs, seed=seed, threads=threads)
        scores = np.concatenate([clf.predict_proba([p["text"] for p in chunk])
                                 for chunk in batched(read_pages(), batch)])
        order = np.argsort(-scores, kind="stable")
        within = np.cumsum(sizes[order]) <= budget
        collected = set(order[within & (scores[order] >= threshold)].tolist())
        paths = math_paths([urls[i] for i in collected], urls)
        new_pos = [p["text"] for i, p in enumerate(read_pages()) if i not in collected and _path_key(p["url"]) in paths]
        positives += new_pos
        row = dict(iteration=it, collected=len(collected), already_collected=len(collected & prev),
                   math_domains=len({d for d, _ in paths}), new_positives=len(new_pos))
        if truth is not None:
            tp = int(truth[list(collected)].sum()) if collected else 0
            row.update(precision=round(tp / max(len(collected), 1), 4), recall=round(tp / max(truth.sum(), 1), 4))
        report.append(row)
        log("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
        prev = collected
    return [i in prev for i in range(len(urls))], report, clf


# -----------------------------------------------------------------------------
# Tokenize and pack into shards

_worker_tok = None


def _init_worker(tokenizer_dir):
    global _worker_tok
    _worker_tok = Tokenizer.load(tokenizer_dir)


def _encode_docs(texts):
    """BOS + tokens + EOS for each document, concatenated: documents are packed back to back."""
    tok = _worker_tok
    ids = tok.encode_batch(texts, bos=True, eos=True, num_threads=1)
    return np.fromiter((i for doc in ids for i in doc), dtype=np.int64)


def write_shards(texts, tokenizer_dir, out_dir, source, shard_tokens=100_000_000, workers=None, chunk=256):
    """Tokenize texts (any iterable, streamed) in parallel worker processes into {source}_NNNN.bin files of
    uint16 tokens (uint32 when the vocabulary exceeds 65,536), and an index {source}.json with the token count
    of each shard."""
    tok = Tokenizer.load(tokenizer_dir)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    os.makedirs(out_dir, exist_ok=True)
    docs = 0

    def chunks():
        nonlocal docs
        for c in batched(texts, chunk):
            docs += len(c)
            yield c
    workers = workers or min(os.cpu_count() or 1, 8)
    shards, buf, n_buf = [], [], 0

    def flush():
        nonlocal buf, n_buf
        if not n_buf:
            return
        name = f"{source}_{len(shards):04d}.bin"
        arr = np.concatenate(buf).astype(dtype)
        arr.tofile(os.path.join(out_dir, name + ".tmp"))
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
        shards.append(dict(file=name, tokens=int(len(arr))))
        buf, n_buf = [], 0

    if workers > 1:
        pool = forked_pool(workers, _init_worker, (tokenizer_dir,))
        results = pool.imap(_encode_docs, chunks())
    else:
        _init_worker(tokenizer_dir)
        pool, results = None, map(_encode_docs, chunks())
    try:
        for arr in progress(results, f"tokenize {source}"):
            buf.append(arr)
            n_buf += len(arr)
            if n_buf >= shard_tokens:
                flush()
        flush()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    index = dict(source=source, dtype=np.dtype(dtype).name, vocab_size=tok.vocab_size, documents=docs,
                 tokens=sum(s["tokens"] for s in shards), shards=shards)
    with open(os.path.join(out_dir, f"{source}.json"), "w") as f:
        json.dump(index, f, indent=2)
    return index


class TokenSource:
    """The shards of one source, memory-mapped; draws windows of consecutive tokens. The last 1% of the last
    shard (at least 8 windows) is held out: split="val" draws only there, split="train" never does."""

    def __init__(self, index_path, split="train", window=1024):
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"{index_path}: no shard index (build the data first: python data.py)")
        with open(index_path) as f:
            self.index = json.load(f)
        base = os.path.dirname(index_path)
        self.shards = [np.memmap(os.path.join(base, s["file"]), dtype=self.index["dtype"], mode="r")
                       for s in self.index["shards"]]
        if not self.shards:
            raise ValueError(f"{index_path}: the source has no tokens")
        n_last = len(self.shards[-1])
        held = min(max(self.index["tokens"] // 100, 8 * window), n_last // 2)
        # usable [lo, hi) token range of each shard for this split
        self.ranges = [(0, len(s)) for s in self.shards[:-1]] + [(0, n_last - held)] if split == "train" else \
            [(0, 0)] * (len(self.shards) - 1) + [(n_last - held, n_last)]

    def window(self, rng, length):
        room = np.array([max(hi - lo - length + 1, 0) for lo, hi in self.ranges])
        if not room.any():
            raise ValueError(f"source {self.index['source']!r} has no room for a window of {length} tokens")
        k = rng.choice(len(room), p=room / room.sum())
        start = self.ranges[k][0] + rng.integers(0, room[k])
        return np.asarray(self.shards[k][start:start + length], dtype=np.int64)


class Mixture:
    """Draws training sequences from several sources by weight (paper §2.3: 56% math, 20% code, ...).

    Row j of step s is a function of (seed, s, j) alone: the global batch is the same whatever the number of
    ranks and micro-batches it is split into, and resuming a run is resuming its step count.
    split="val" draws from the held-out tails."""

    def __init__(self, sources, seq_len, seed=0, split="train"):
        self.names = list(sources)
        w = np.array([sources[n][1] for n in self.names], dtype=float)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be non-negative with a positive sum, got {w.tolist()}")
        self.sources = [TokenSource(sources[n][0], split, seq_len + 1) for n in self.names]
        vocab = {s.index["vocab_size"] for s in self.sources}
        if len(vocab) != 1:
            raise ValueError(f"the sources were tokenized with different vocabularies: {sorted(vocab)}")
        self.vocab_size = vocab.pop()
        self.weights, self.seq_len, self.seed, self.split = w / w.sum(), seq_len, seed, split

    def batch(self, step, rows):
        """Rows `rows` (a range of row indices) of step `step`'s global batch: (x, y) int64 arrays of shape
        (len(rows), seq_len), y being x shifted by one token."""
        out = []
        for j in rows:
            rng = np.random.default_rng([self.seed, step, j, self.split == "val"])
            out.append(self.sources[rng.choice(len(self.sources), p=self.weights)].window(rng, self.seq_len + 1))
        out = np.stack(out)
        return out[:, :-1], out[:, 1:]


# -----------------------------------------------------------------------------
# The pipeline, stage by stage


def run_stage(report, name, outputs, fn):
    """Run fn unless all its outputs exist; record what it did (or that it was skipped) in the report."""
    if all(os.path.exists(o) for o in outputs):
        report.append(dict(stage=name, skipped=True))
        return
    t0 = time.time()
    print(f"[{name}]", flush=True)
    row = fn() or {}
    report.append(dict(stage=name, seconds=round(time.time() - t0, 1), **row))


@dataclass
class Paths:
    """Every file the pipeline reads or writes, from the command line's --out and input files."""
    out: str
    crawl: str
    seed_pos: str
    code: str
    labels: str  # the toy world's ground truth: which pages are math, copies, leaks
    train: str  # problems: SFT (train), held-out (test), GRPO questions (rl)
    test: str
    rl: str
    dedup: str
    quality: str
    math: str
    other: str
    clean: dict  # source -> decontaminated pages
    tokenizer: str
    shards: str

    @classmethod
    def of(cls, args):
        out = args.out
        j = lambda *parts: os.path.join(out, *parts)  # noqa: E731
        return cls(out=out, crawl=args.crawl or j("crawl.jsonl"), seed_pos=args.seed_pos or j("seed.jsonl"),
                   code=args.code or j("code.jsonl"), labels=j("labels.json"),
                   train=j("problems", "train.jsonl"), test=j("problems", "test.jsonl"), rl=j("problems", "rl.jsonl"),
                   dedup=j("pages_dedup.jsonl"), quality=j("pages_quality.jsonl"), math=j("math_pages.jsonl"),
                   other=j("other_pages.jsonl"), clean={s: j(f"{s}_clean.jsonl") for s in ("math", "code", "general")},
                   tokenizer=args.tokenizer or j("tokenizer"), shards=j("shards"))


def toy_world(args, paths):
    """Stage 0 (the toy only): the synthetic crawl, seed math pages, code pages, problem sets and the truth."""
    import random

    import toyworld
    test = toyworld.make_problems(args.test_problems, seed=args.seed + 100)
    train = toyworld.make_problems(args.train_problems, seed=args.seed + 200, exclude={p["question"] for p in test})
    rl = toyworld.make_problems(args.rl_problems, seed=args.seed + 400,
                                exclude={p["question"] for p in test + train})
    pages, labels = toyworld.make_crawl(args.pages, test, seed=args.seed)
    write_jsonl(paths.test, test)
    write_jsonl(paths.train, train)
    write_jsonl(paths.rl, rl)
    write_jsonl(paths.seed_pos, toyworld.make_seed(args.pages // 10, seed=args.seed))
    code_pool = toyworld.make_problems(args.pages // 5, seed=args.seed + 300, steps=toyworld.PAGE_STEPS,
                                       max_value=toyworld.PAGE_MAX_VALUE)
    rng = random.Random(args.seed)
    write_jsonl(paths.code, (dict(url=f"https://github.example/{i}", text=toyworld.code_page(rng, code_pool[i:i + 3]))
                             for i in range(0, len(code_pool), 3)))
    with open(paths.labels + ".tmp", "w") as f:
        json.dump(labels, f)
    os.replace(paths.labels + ".tmp", paths.labels)
    write_jsonl(paths.crawl, pages)
    return dict(pages=len(pages), train_problems=len(train), test_problems=len(test))


def dedup_stage(args, paths, read, labels):
    """Stage 1: exact URL dedup, then MinHash near-dedup, streamed in batches (memory holds URLs and signatures,
    not pages). On the toy, counts how many planted copies were found."""
    seen, index, stats, all_urls, kept_urls = set(), NearDupIndex(args.dedup_threshold), Counter(), [], set()

    def kept():
        for chunk in progress(batched(read(paths.crawl, ("text", "url")), 2000), "dedup"):
            fresh = [p for p, k in zip(chunk, url_dedup([p["url"] for p in chunk], seen)) if k]
            stats["pages"] += len(chunk)
            stats["url_dups"] += len(chunk) - len(fresh)
            if labels is not None:
                all_urls.extend(p["url"] for p in chunk)
            for p, k in zip(fresh, index.add([p["text"] for p in fresh])):
                stats["near_dups"] += not k
                if k:
                    kept_urls.add(p["url"])
                    yield p
    stats["kept"] = write_jsonl(paths.dedup, kept())
    if not stats["pages"]:
        raise DataError(f"{paths.crawl}: no pages")
    row = dict(stats)
    if labels is not None:  # of each planted cluster (a page and its copies) of n pages, n - 1 should go
        cluster = {u: labels[u]["dup_of"] or u for u in all_urls}
        size, gone = Counter(cluster.values()), Counter()
        for u, c in cluster.items():
            gone[c] += u not in kept_urls
        found = sum(min(gone[c], size[c] - 1) for c in size)
        # what else was dropped is a page whose text another kept page nearly repeats (stubs, spam, templates)
        row.update(planted_found=f"{found}/{sum(n - 1 for n in size.values())}",
                   other_dropped=sum(gone.values()) - found)
    return row


def quality_stage(paths, read):
    """Stage 2: the quality filters (quality_issue), with a count per reason."""
    reasons = Counter()

    def kept():
        for p in read(paths.dedup):
            why = quality_issue(p["text"])
            reasons[why or "kept"] += 1
            if why is None:
                yield p
    write_jsonl(paths.quality, kept())
    return dict(reasons)


def classify_stage(args, paths, read, labels):
    """Stage 3: the fastText classifier with iterative domain expansion; math pages and the rest, apart."""
    pool = lambda: read(paths.quality, ("text", "url"))  # noqa: E731  streamed again in each round
    seeds = [p["text"] for p in read(paths.seed_pos)]
    if not seeds:  # the classifier learns the seed math pages against the pool's others
        raise DataError(f"{paths.seed_pos}: no seed math pages (--seed-pos) to train the math classifier on")
    if next(pool(), None) is None:
        raise DataError(f"{paths.quality}: no crawl pages left after dedup and the quality filter to classify")
    keep, rows, clf = classify_with_expansion(pool, seeds, iterations=args.iterations,
                                              budget_tokens=args.budget_tokens, epochs=args.classifier_epochs,
                                              labels=labels, seed=args.seed, threads=args.classifier_threads)
    clf.save(os.path.join(paths.out, "classifier.bin"))
    write_jsonl(paths.other, (p for p, k in zip(pool(), keep) if not k))
    write_jsonl(paths.math, (p for p, k in zip(pool(), keep) if k))
    return rows[-1]


def decontaminate_stage(args, paths, read, labels):
    """Stage 4: drop pages that contain benchmark questions or solutions, in every source."""
    bench_texts = [t for b in args.benchmarks or [paths.test] for t in benchmark_texts(load_problems(b))]
    sources = {"math": paths.math, "code": paths.code, "general": paths.other}
    row = {}
    for s, path in sources.items():
        dropped = []

        def kept():
            for chunk in batched(read(path), 2000):
                for p, k in zip(chunk, decontaminate([p["text"] for p in chunk], bench_texts)):
                    if k:
                        yield p
                    else:
                        dropped.append(p.get("url", ""))
        write_jsonl(paths.clean[s], kept())
        row[f"{s}_dropped"] = len(dropped)
        if labels is not None and s == "math":
            leaks = {u for u, lab in labels.items() if lab["contaminated"]}
            row.update(leak_recall=round(len(set(dropped) & leaks) / max(len(leaks), 1), 4),
                       false_drops=len(set(dropped) - leaks))
    return row


def tokenizer_stage(args, paths, read):
    """Stage 5: a byte-level BPE trained on the first --tokenizer-mb of each source and the training problems
    (the chat format and the solutions' words matter downstream)."""
    def sample():
        for s in paths.clean:
            budget = args.tokenizer_mb * 1e6
            for p in read(paths.clean[s]):
                yield p["text"]
                budget -= len(p["text"])
                if budget <= 0:
                    break
        if os.path.exists(paths.train):
            yield from (f"{p['question']} {p['cot']} {p.get('pot', '')}" for p in load_problems(paths.train))
    tok = Tokenizer.train(sample(), args.vocab_size)
    tok.save(paths.tokenizer)
    return dict(vocab_size=tok.vocab_size)


def shards_stage(args, paths, read):
    """Stage 6: each source tokenized and packed into shards."""
    row = {}
    for s in paths.clean:
        idx = write_shards((p["text"] for p in read(paths.clean[s])), paths.tokenizer, paths.shards, s,
                           workers=args.workers)
        row[f"{s}_tokens"] = idx["tokens"]
    return row


def unfiltered_stage(args, paths, read):
    """Paper §2.2's control (--unfiltered): the pool the classifier chose from, sampled to the math source's
    size in tokens."""
    tok, want = Tokenizer.load(paths.tokenizer), json.load(open(os.path.join(paths.shards, "math.json")))["tokens"]
    pool = [(p["text"], s == "math") for s in ("math", "general") for p in read(paths.clean[s])]
    np.random.default_rng(args.seed).shuffle(pool)
    sample, n = [], 0
    for text, _ in pool:
        if n >= want:
            break
        sample.append(text)
        n += len(tok.encode(text)) + 2  # BOS and EOS, as write_shards packs them
    idx = write_shards(sample, paths.tokenizer, paths.shards, "unfiltered", workers=args.workers)
    return dict(unfiltered_tokens=idx["tokens"],
                classifier_chosen=round(sum(m for _, m in pool[:len(sample)]) / len(sample), 3))


def build(args):
    """The pipeline: each stage in order, skipped when its outputs exist; a report of what each did."""
    paths, report, counts = Paths.of(args), [], Counter()
    read = lambda path, fields=("text",): read_jsonl(path, fields, args.skip_bad, counts)  # noqa: E731
    os.makedirs(paths.out, exist_ok=True)
    if not args.crawl:  # the toy world stands in for Common Crawl, OpenWebMath, GitHub and the benchmarks
        run_stage(report, "toy world", [paths.crawl, paths.seed_pos, paths.code, paths.train, paths.test, paths.rl,
                                        paths.labels], lambda: toy_world(args, paths))
    labels = json.load(open(paths.labels)) if os.path.exists(paths.labels) and not args.crawl else None
    run_stage(report, "dedup", [paths.dedup], lambda: dedup_stage(args, paths, read, labels))
    run_stage(report, "quality", [paths.quality], lambda: quality_stage(paths, read))
    run_stage(report, "classify", [paths.math, paths.other], lambda: classify_stage(args, paths, read, labels))
    run_stage(report, "decontaminate", list(paths.clean.values()),
              lambda: decontaminate_stage(args, paths, read, labels))
    run_stage(report, "tokenizer", [os.path.join(paths.tokenizer, "tokenizer.json")],
              lambda: tokenizer_stage(args, paths, read))
    run_stage(report, "shards", [os.path.join(paths.shards, f"{s}.json") for s in paths.clean],
              lambda: shards_stage(args, paths, read))
    if args.unfiltered:
        run_stage(report, "unfiltered", [os.path.join(paths.shards, "unfiltered.json")],
                  lambda: unfiltered_stage(args, paths, read))
    if counts:
        report.append(dict(stage="input", **counts))
    with open(os.path.join(paths.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print_report(report)
    return report


def print_report(report):
    print(f"\n{'stage':<14} {'time':>6}  result")
    for row in report:
        row = dict(row)
        name = row.pop("stage")
        if row.pop("skipped", False):
            print(f"{name:<14} {'':>6}  done before, skipped")
            continue
        secs = row.pop("seconds", "")
        print(f"{name:<14} {secs:>6}  " + "  ".join(f"{k}={v}" for k, v in row.items()))


def parse_args(argv=None):
    """The command line; parse_args([]) gives every default (pretrain.py builds missing toy data with it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/toy/data", help="directory for every stage's output")
    ap.add_argument("--crawl", help="jsonl of {text, url} pages to mine (default: the toy world's crawl)")
    ap.add_argument("--seed-pos", help="jsonl of {text} seed math pages, the paper's OpenWebMath (default: toy)")
    ap.add_argument("--code", help="jsonl of {text} code pages, a source of the mixture (default: toy)")
    ap.add_argument("--benchmarks", nargs="*", help="problem files to decontaminate against (default: toy test set)")
    ap.add_argument("--tokenizer", help="a Hugging Face tokenizer directory to use instead of training one")
    ap.add_argument("--pages", type=int, default=20000, help="toy crawl size")
    ap.add_argument("--train-problems", type=int, default=5000, help="toy training problems")
    ap.add_argument("--test-problems", type=int, default=500, help="toy held-out problems")
    ap.add_argument("--rl-problems", type=int, default=2000, help="toy questions for GRPO, unseen in SFT (as the "
                    "paper's RL set is its own subset of the SFT questions, a toy model would recite memorised ones)")
    ap.add_argument("--iterations", type=int, default=4, help="classifier / domain expansion rounds (paper: 4)")
    ap.add_argument("--budget-tokens", type=int, help="keep the top pages up to this many words (default: all)")
    ap.add_argument("--classifier-epochs", type=int, default=3, help="fastText epochs (paper: 3, for ~1M pages)")
    ap.add_argument("--classifier-threads", type=int, default=1, help="fastText threads (1: the same classifier on "
                    "every run; raise it for a real crawl)")
    ap.add_argument("--dedup-threshold", type=float, default=0.8, help="MinHash Jaccard threshold")
    ap.add_argument("--vocab-size", type=int, default=2048, help="tokenizer size, if one is trained")
    ap.add_argument("--tokenizer-mb", type=float, default=100, help="text of each source to train a tokenizer on")
    ap.add_argument("--workers", type=int, help="tokenizer processes (default: CPU count, at most 8)")
    ap.add_argument("--skip-bad", action="store_true", help="skip and count malformed jsonl lines")
    ap.add_argument("--unfiltered", action="store_true", help="also write shards/unfiltered: pages drawn at random "
                    "from the pool the classifier chose from, as many tokens as the math source (paper §2.2 control)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    # counts below their least, refused here: common.py's argparse types would import torch into the data pipeline
    least = dict(pages=1, train_problems=1, test_problems=1, rl_problems=0, iterations=1, budget_tokens=1,
                 classifier_epochs=1, classifier_threads=1, vocab_size=LEAST_VOCAB, workers=1)
    for name, lo in least.items():
        if getattr(args, name) is not None and getattr(args, name) < lo:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected {lo} or more")
    return args


if __name__ == "__main__":
    try:
        build(parse_args())
    except DataError as e:
        sys.exit(f"error: {e}")
