"""tokenizer.py: our BPE vs the `tokenizers` library, both directions, on text that breaks tokenizers."""
import inspect
import itertools
import json
import random
from collections import Counter

import pytest

from tokenizer import BOS, BYTE_TO_CHAR, EOS, SPLIT_PATTERN, Tokenizer, TokenizerError, train_bpe

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

# Text that trips tokenizers: LaTeX, code, long digit runs, accents, CJK, emoji, whitespace runs, CRLF.
HARD = [
    r"Let $f(x) = \frac{x^2 + 3x}{\sqrt{2}}$. Then \boxed{\dfrac{1}{2}} and 10{,}000.",
    "def f(x):\n    return x ** 2  # square\n\n\n\tprint(f(3))\r\n",
    "1234567890 3.14159 -0.5e-10 $1,234.56 100%",
    "naïve café Zürich — “quoted” ‘single’ … ½ ⅓ √2 ∑ ∫ ≤ ≥ ≠ ∞ π θ",
    "数学是科学的皇后。 これは日本語です。 수학 🙂🚀 👨‍👩‍👧",
    "   leading spaces, trailing spaces    \n\n\n    \t\t  mixed\u00a0nbsp",
    "I'm sure it's OK; they'll say we've done it, DON'T they'd?",
    "",
    "x",
    "<|eos|> <|bos|> are just text here",
    "```python\nimport sympy\nprint(sympy.Rational(3, 4))\n```\n```output\n3/4\n```",
]


def corpus():
    """Varied real text from the standard library (code and English docstrings) plus the hard cases."""
    import argparse
    import collections
    import email.message
    import json as json_mod
    texts = [inspect.getsource(m) for m in (argparse, collections, email.message, json_mod.decoder)]
    rng = random.Random(0)
    for _ in range(300):
        a, b = rng.randint(0, 10**6), rng.randint(1, 999)
        texts.append(f"We have {a} + {b} = {a + b}, so $x = \\frac{{{a}}}{{{b}}}$ and the answer is "
                     f"\\boxed{{{a + b}}}.")
    return texts + HARD * 5


def varied_samples():
    rng = random.Random(1)
    samples = list(HARD)
    source = "".join(corpus()[:2])
    for _ in range(200):  # random slices of real text, cut anywhere (mid-word, mid-line)
        i = rng.randrange(len(source) - 300)
        samples.append(source[i:i + rng.randint(1, 300)])
    return samples


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    tok = Tokenizer.train(corpus(), 800)
    path = tmp_path_factory.mktemp("ours")
    tok.save(path)
    return tok, path


def test_trained_tokenizer_matches_tokenizers_on_varied_text(ours):
    tok, path = ours
    ref = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    ref.encode_special_tokens = True  # special-token strings in text are text, as in ours
    assert tok.vocab_size == ref.get_vocab_size() == 800
    for text in varied_samples():
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([0xC3]) == ref.decode([0xC3]) == "\ufffd"  # the first byte of "é" alone


def test_trained_tokenizer_splits_digits_and_learns_merges(ours):
    tok, _ = ours
    assert len(tok.encode("1234567")) == 7  # one token per digit, as the paper
    assert len(tok.encode(" self")) == 1  # frequent in the corpus: a single token
    assert tok.decode([tok.eos_id]) == EOS


def test_saved_tokenizer_opens_in_transformers_with_the_chat_template(ours):
    transformers = pytest.importorskip("transformers")
    tok, path = ours
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    q = "What is 2 + 3?"
    messages = [{"role": "user", "content": q}]
    assert hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == tok.chat(q)
    assert tok.decode(tok.chat(q)) == f"{BOS}User: {q}\n\nAssistant:"
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_special_token_strings_in_text_stay_text(ours):
    tok, _ = ours
    ids = tok.encode("<|eos|>")
    assert tok.eos_id not in ids and tok.decode(ids) == "<|eos|>"
    assert tok.encode("hi", bos=True, eos=True) == [tok.bos_id, *tok.encode("hi"), tok.eos_id]


def hf_trained(path, pre_tokenizer, normalizer=None, shuffle_ids=False):
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizer
    if normalizer:
        t.normalizer = normalizer
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(corpus(), trainer)
    file = path / "tokenizer.json"
    t.save(str(file))
    if shuffle_ids:  # ids unrelated to merge order: merge priority must come from the merges list
        data = json.loads(file.read_text())
        vocab = data["model"]["vocab"]
        tokens = [t for t in vocab if t not in ("<s>", "</s>")]  # specials keep their ids
        ids = [vocab[t] for t in tokens]
        random.Random(0).shuffle(ids)
        vocab.update(zip(tokens, ids))
        file.write_text(json.dumps(data))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    ref = tokenizers.Tokenizer.from_file(str(file))
    ref.encode_special_tokens = True
    return ref


DEEPSEEK_STYLE = pre_tokenizers.Sequence([
    pre_tokenizers.Split(tokenizers.Regex(r"[\r\n]"), "isolated"),
    pre_tokenizers.Split(tokenizers.Regex(r"\s?[A-Za-zµÀ-ÖØ-öø-ƺ]+"), "isolated"),
    pre_tokenizers.Split(tokenizers.Regex(r"\s?[!-/:-~！-／：-～‘-‟　-。]+"), "isolated"),
    pre_tokenizers.Split(tokenizers.Regex(r"\s+$"), "isolated"),
    pre_tokenizers.Split(tokenizers.Regex(r"[一-龥ࠀ-一가-퟿]+"), "isolated"),
    pre_tokenizers.Digits(individual_digits=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
])
LLAMA3_STYLE = pre_tokenizers.Sequence([
    pre_tokenizers.Split(tokenizers.Regex(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"), "isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
])


@pytest.mark.parametrize("kind", ["gpt2", "gpt2-prefix-space", "deepseek", "llama3", "qwen2-nfc", "shuffled-ids",
                                  "digit-runs", "use-regex-unsaid"])
def test_reads_tokenizers_files_and_encodes_identically(kind, tmp_path):
    pre, norm = {
        "gpt2": (pre_tokenizers.ByteLevel(add_prefix_space=False), None),
        "digit-runs": (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)]), None),
        "use-regex-unsaid": (pre_tokenizers.ByteLevel(add_prefix_space=False), None),
        "gpt2-prefix-space": (pre_tokenizers.ByteLevel(add_prefix_space=True), None),
        "deepseek": (DEEPSEEK_STYLE, None),
        "llama3": (LLAMA3_STYLE, None),
        "qwen2-nfc": (LLAMA3_STYLE, normalizers.NFC()),
        "shuffled-ids": (pre_tokenizers.ByteLevel(add_prefix_space=False), None),
    }[kind]
    ref = hf_trained(tmp_path, pre, norm, shuffle_ids=kind == "shuffled-ids")
    if kind == "use-regex-unsaid":  # older files leave out ByteLevel's use_regex, which then defaults to true
        data = json.loads((tmp_path / "tokenizer.json").read_text())
        del data["pre_tokenizer"]["use_regex"]
        (tmp_path / "tokenizer.json").write_text(json.dumps(data))
        ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
        ref.encode_special_tokens = True
    tok = Tokenizer.from_hf(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.token_to_id("<s>"), ref.token_to_id("</s>"),
                                                    ref.token_to_id("</s>"))  # no pad_token: EOS pads
    for text in varied_samples() + ["Cafe\u0301 vs Café"]:
        expected = ref.encode(text, add_special_tokens=False)
        assert tok.encode(text) == expected.ids, text
        if kind != "qwen2-nfc" and kind != "gpt2-prefix-space":  # those two change the text itself
            assert tok.decode(tok.encode(text)) == text


# the single bytes that never occur in UTF-8, which DeepSeek keeps out of its main vocabulary
NOT_UTF8 = [0xC0, 0xC1] + list(range(0xF5, 0x100))


def deepseek_layout(tmp_path):
    """A byte-level BPE laid out as DeepSeek-LLM / DeepSeek-Math's tokenizer.json: the 13 bytes of NOT_UTF8 are
    not in the vocabulary; BOS and EOS follow it as special added tokens, then those bytes as non-special added
    tokens spelled in their byte-level characters ("À", "õ", "÷", ...)."""
    from tokenizer import BYTE_TO_CHAR
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = DEEPSEEK_STYLE
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = json.loads(t.to_str())
    gone = {BYTE_TO_CHAR[b] for b in NOT_UTF8}
    assert not any(set(pair.split(" ") if isinstance(pair, str) else pair) & gone for pair in data["model"]["merges"])
    kept = sorted((i, s) for s, i in data["model"]["vocab"].items() if s not in gone)
    data["model"]["vocab"] = {s: k for k, (_, s) in enumerate(kept)}
    n = len(kept)
    names = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"] + [BYTE_TO_CHAR[b] for b in NOT_UTF8]
    data["added_tokens"] = [dict(id=n + k, content=c, single_word=False, lstrip=False, rstrip=False, normalized=True,
                                 special=k < 2) for k, c in enumerate(names)]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": names[0], "eos_token": names[1]}))
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ref.encode_special_tokens = True
    return ref, n


def test_reads_deepseeks_layout_with_bytes_as_added_tokens(tmp_path):
    ref, n = deepseek_layout(tmp_path)
    tok = Tokenizer.from_hf(tmp_path)
    assert tok.vocab_size == ref.get_vocab_size() == n + 15 and (tok.bos_id, tok.eos_id) == (n, n + 1)
    texts = varied_samples() + [
        "3÷4 = 0.75 and 12÷3=4", "÷÷÷", "Àlvaro põe ÷ × ø in Ørsted; þorn ÿes À1 9Á", "x÷" * 50,
        "São João: ö ü û ú ù ý é à", "<｜end▁of▁sentence｜> is text ÷ here", "÷<｜begin▁of▁sentence｜>÷"]
    for text in texts:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
    ids = tok.encode("3÷4")
    assert ids[1] == ref.token_to_id("÷") and tok.eos_id not in tok.encode("<｜end▁of▁sentence｜>")
    # decoding: the character itself, where `tokenizers` gives U+FFFD for the lone byte
    assert tok.decode(tok.encode("Àlvaro põe 3÷4")) == "Àlvaro põe 3÷4"
    assert ref.decode(ref.encode("3÷4").ids) == "3\ufffd4"


def test_unsupported_tokenizer_files_fail_clearly(tmp_path):
    t = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.train_from_iterator(["a b c"] * 10, trainers.BpeTrainer(vocab_size=50, special_tokens=["<unk>"],
                                                               show_progress=False))
    t.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="only byte-level BPE is supported"):
        Tokenizer.from_hf(tmp_path)
    with pytest.raises(TokenizerError, match="tokenizer.json not found"):
        Tokenizer.from_hf(tmp_path / "nowhere")


def test_decode_rejects_ids_outside_the_vocabulary(ours):
    tok, _ = ours
    with pytest.raises(ValueError, match=r"ids \[800\]"):
        tok.decode([1, 800])


def test_bpe_training_is_deterministic_and_counts_merges():
    texts = ["low lower lowest newer wider " * 20, "the then there " * 30]
    m1, v1 = train_bpe(texts, 20)
    m2, v2 = train_bpe(list(reversed(texts)), 20)
    assert m1 == m2 and v1 == v2 and len(v1) == 256 + 20
    assert b" the" in v1 and b"low" in v1
    # the first merge is the most frequent pair
    assert (v1[m1[0][0]] + v1[m1[0][1]]) in (b"th", b" t", b"he", b"lo", b"ow", b"er")


def naive_bpe(texts, n_merges):
    """Byte-pair merges the slow way, as a second implementation: every pair recounted before each merge, the
    most frequent taken (ties: the smallest pair of ids), none once the best occurs once; two pairs that spell
    the same bytes share one id."""
    import regex
    counts = Counter(w for t in texts for w in regex.findall(SPLIT_PATTERN, t))
    words = [(list(w.encode()), f) for w, f in counts.items()]
    vocab, merges = [bytes([b]) for b in range(256)], []
    while len(vocab) < 256 + n_merges:
        pairs = Counter()
        for w, f in words:
            for p in zip(w, w[1:]):
                pairs[p] += f
        best = min(pairs, key=lambda p: (-pairs[p], p), default=None)
        if best is None or pairs[best] < 2:
            break
        merged = vocab[best[0]] + vocab[best[1]]
        if merged not in vocab:
            vocab.append(merged)
        merges.append((*best, vocab.index(merged)))
        for w, _ in words:
            j = 0
            while j < len(w) - 1:
                if (w[j], w[j + 1]) == best:
                    w[j:j + 2] = [merges[-1][2]]
                j += 1
    return merges, vocab


def test_bpe_training_equals_a_naive_recount_and_stops_at_pairs_seen_once():
    assert train_bpe(corpus(), 300) == naive_bpe(corpus(), 300)
    # by hand: "aaa" x1, " aaa" x1, " ab" x3, "ab", " bb", " cd". " a", "aa" and "ab" occur 4 times (" a" is the
    # smallest pair); then "aa" and " a"+"b" 3 times ("aa" smaller); then " a"+"b"; every pair left occurs once
    merges, vocab = train_bpe(["aaa bb aaa", "ab ab ab ab cd"], 50)
    assert merges == [(32, 97, 256), (97, 97, 257), (256, 98, 258)] and vocab[256:] == [b" a", b"aa", b" ab"]


def test_merges_that_spell_one_token_two_ways(tmp_path):
    """A tokenizer.json whose merges make "abc" from b+c then a+bc, and again from a+b then ab+c: the token keeps
    the priority of its first merge, and every string over a, b, c and space up to 6 long encodes as `tokenizers`
    encodes it."""
    data = json.loads(tokenizers.Tokenizer(models.BPE()).to_str())
    data["pre_tokenizer"] = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True)
    data["model"]["vocab"] = {**{BYTE_TO_CHAR[b]: b for b in range(256)}, "bc": 256, "abc": 257, "ab": 258}
    data["model"]["merges"] = [["b", "c"], ["a", "bc"], ["a", "b"], ["ab", "c"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    ref, tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")), Tokenizer.from_hf(tmp_path)
    for n in range(1, 7):
        for text in map("".join, itertools.product("abc ", repeat=n)):
            assert tok.encode(text) == ref.encode(text).ids, text


def test_added_and_special_tokens_are_matched_longest_first(tmp_path):
    """Added tokens listed shorter first ("<x>" then "<x>y", "<|s|>" then "<|s|>t"): in text, the non-special ones
    match as `tokenizers` matches them, the longest at each place; in a chat template the template's specials do,
    while the same strings inside the question stay text, as encode() keeps them."""
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(["a b"], trainers.BpeTrainer(show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.add_tokens(["<x>", "<x>y"])
    t.add_special_tokens(["<|s|>", "<|s|>t"])
    t.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_hf(tmp_path)
    text = "a<x>yb<x>c <|s|>t <|s|>"
    t.encode_special_tokens = True  # special-token strings in text are text, as in ours
    assert tok.encode(text) == t.encode(text).ids and t.token_to_id("<x>y") in tok.encode(text)
    tok.chat_template = "<|s|>t{{ messages[0]['content'] }}<|s|>"
    tok.use_chat_template()
    t.encode_special_tokens = False
    assert tok.chat("q<x>y") == t.encode("<|s|>tq<x>y<|s|>").ids
    assert tok.chat(text) == [t.token_to_id("<|s|>t"), *tok.encode(text), t.token_to_id("<|s|>")]


@pytest.mark.parametrize("flags, words", [(["--train", "{t}", "--vocab-size", "10"], "--vocab-size 10: 259 or more"),
                                          (["--train", "{d}/missing.jsonl"], "missing.jsonl: no such file"),
                                          (["--load", "{d}"], "tokenizer.json not found")])
def test_the_command_line_refuses_in_one_line(tmp_path, flags, words):
    """`python tokenizer.py` with too few ids, a missing file or no tokenizer.json: each was a traceback."""
    import os
    import subprocess
    import sys
    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"text": "hello world"}) + "\n")
    argv = [f.format(t=texts, d=tmp_path) for f in flags]
    r = subprocess.run([sys.executable, "tokenizer.py", *argv], capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = r.stderr.strip().splitlines()
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr and words in lines[-1], r.stderr
    assert lines[-1].startswith(("error: ", "tokenizer.py: error: ")), lines[-1]
