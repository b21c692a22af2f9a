"""The tokenizer: byte-level BPE, trained here or read from a Hugging Face tokenizer.json, served by tiktoken.

DeepSeekMath uses byte-level BPE with digits split one by one (paper §2; docs/paper.md §2). This file
trains such a tokenizer on our own corpus (the toy world uses it), and reads the tokenizer.json of real models
(DeepSeek, Qwen2, Llama-3, GPT-2 style) so that ids match the `tokenizers` library exactly. Either way the
encoding itself is done by tiktoken's Rust BPE; this file only prepares its tables.

Our save format *is* Hugging Face's: `save(dir)` writes tokenizer.json + tokenizer_config.json, so transformers,
vLLM and lm-evaluation-harness open what we train, and `load(dir)` is `from_hf(dir)`.

    python tokenizer.py --train corpus.txt --vocab-size 4096 --out tok/   # train on a text or jsonl file
    python tokenizer.py --load path/to/hf_model --text "1 + 1 = 2"       # show how a model splits text
"""

import argparse
import heapq
import json
import os
import unicodedata
from collections import Counter, defaultdict

import regex
import tiktoken

# -----------------------------------------------------------------------------
# Constants

# Pre-tokenizer of our trained tokenizers: GPT-4's split with single digits (the paper splits digits individually,
# so "1234" is four tokens and arithmetic is learned digit by digit).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
# What a Hugging Face ByteLevel pre-tokenizer with use_regex=true splits on (GPT-2's pattern).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"  # the specials of tokenizers we train, ids after the merges
LEAST_VOCAB = 256 + 3  # a trained tokenizer's ids without a merge: the bytes and the specials
# The chat format of DeepSeekMath-Instruct/RL (paper §2): BOS first, the answer follows with a space, then EOS.
CHAT_FORMAT = "User: {question}\n\nAssistant:"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + "
                 "'\\n\\n' }}{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token }}"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

# A special-token string inside a chat message while its template renders (Tokenizer.chat): the token's id between
# two private-use characters, which no tokenizer's specials or templates contain.
STAND_IN = "\U000F0000{}\U000F0001"
STAND_IN_RX = regex.compile("\U000F0000([0-9]+)\U000F0001")


def _bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable characters, which tokenizer.json uses to spell tokens:
    printable Latin-1 bytes stand for themselves, the others for chr(256), chr(257), ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, n = {}, 0
    for b in range(256):
        out[b] = chr(b) if b in printable else chr(256 + n)
        n += b not in printable
    return out


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}

# -----------------------------------------------------------------------------
# Training byte-level BPE


def train_bpe(texts, n_merges, pattern=SPLIT_PATTERN):
    """Learn up to n_merges byte-pair merges. Returns (merges, vocab): merges as (id_a, id_b, new_id), vocab as
    a list of bytes indexed by id, the 256 single bytes first.

    Words (pre-tokenizer pieces) are counted once; pair counts are kept incrementally, with a max-heap of
    (count, pair) whose stale entries are skipped on pop, so each merge only touches the words that hold its pair.
    Ties go to the smallest pair of ids, so training is deterministic.
    """
    rx = regex.compile(pattern)
    counts = Counter()
    for text in texts:
        counts.update(rx.findall(text))
    words = [list(w.encode("utf-8")) for w in counts]
    freqs = list(counts.values())
    pair_count, where = defaultdict(int), defaultdict(set)
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pair_count[p] += freqs[i]
            where[p].add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)

    vocab = [bytes([b]) for b in range(256)]
    index = {b: i for i, b in enumerate(vocab)}
    merges = []
    while heap and len(vocab) < 256 + n_merges:
        neg, pair = heapq.heappop(heap)
        count = pair_count.get(pair, 0)
        if count != -neg:
            continue  # a stale heap entry: the pair's count changed since it was pushed
        if count < 2:
            break  # the most frequent pair occurs once: nothing worth learning is left
        merged = vocab[pair[0]] + vocab[pair[1]]
        new = index.get(merged)  # two different pairs can spell the same bytes: then they share one id
        if new is None:
            new = index[merged] = len(vocab)
            vocab.append(merged)
        merges.append((pair[0], pair[1], new))
        touched = set()
        for i in where.pop(pair):
            w, f = words[i], freqs[i]
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == pair[0] and w[j + 1] == pair[1]:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            if len(out) == len(w):
                continue  # a stale entry of `where`: the pair left this word in an earlier merge
            for p in zip(w, w[1:]):
                pair_count[p] -= f
                touched.add(p)
            for p in zip(out, out[1:]):
                pair_count[p] += f
                where[p].add(i)
                touched.add(p)
            words[i] = out
        pair_count.pop(pair, None)
        for p in touched - {pair}:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
    return merges, vocab


# -----------------------------------------------------------------------------
# The tokenizer


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read: the message names the file and what is wrong."""


class Tokenizer:
    """Byte-level BPE served by tiktoken.

    `ranks` maps token bytes to merge priority (tiktoken merges the adjacent pair whose concatenation has the lowest
    rank); `rank_to_id` maps tiktoken's output to the model's ids where the two differ (Hugging Face files whose
    ids are not in merge order). `splits` is a list of regexes applied in turn (Hugging Face's Sequence of Split
    pre-tokenizers); one regex is handed to tiktoken directly. `prefix_space_at`, if not None, is the index of the
    split before which every piece gets a leading space (Hugging Face's ByteLevel add_prefix_space).
    """

    def __init__(self, ranks, id_to_bytes, specials, splits, rank_to_id=None, normalizer=None,
                 prefix_space_at=None, bos=None, eos=None, pad=None, merges=None, added=None):
        self.ranks, self.id_to_bytes, self.specials = ranks, id_to_bytes, specials
        # Added tokens that are not special (DeepSeek's 13 bytes that never occur in UTF-8, kept out of its main
        # vocabulary as their byte-level characters "À", "õ", "÷", ...) are matched in the text itself, before
        # pre-tokenization, as the `tokenizers` library does: "3÷4" is 3, the added id of "÷", then 4.
        self.added = added or {}
        self._added_rx = _longest_first(self.added)
        self.splits, self.rank_to_id, self.normalizer = splits, rank_to_id, normalizer
        self.prefix_space_at = prefix_space_at
        self.merges = merges  # (bytes_a, bytes_b) in priority order, for save()
        # Qwen2 and Qwen2.5 have no BOS ("bos_token": null): their prompts start with the first text token
        self.bos_id, self.eos_id = specials.get(bos), specials.get(eos)
        self.pad_id = specials.get(pad, self.eos_id)
        # every id that ends a generation: EOS and, for instruct models, the ids their generation_config.json adds
        # (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>); from_hf fills it in
        self.stop_ids = (self.eos_id,) if self.eos_id is not None else ()
        self.bos_token, self.eos_token, self.pad_token = bos, eos, pad
        self.chat_template = None  # tokenizer_config.json's, which use_chat_template makes chat() render
        self.system = None
        self._special_rx = _longest_first(specials)
        self.templated = False
        if not all(bytes([b]) in ranks for b in range(256)):
            raise ValueError("a byte-level BPE vocabulary must contain all 256 single bytes")
        # One regex: tiktoken splits and merges in Rust. Several: we split in Python, tiktoken merges each piece.
        # A split's gaps (text between matches) are pieces too, as in Hugging Face's "Isolated" behaviour.
        one = len(splits) == 1 and prefix_space_at is None
        pat = f"(?:{splits[0]})|(?:(?!{splits[0]})[\\s\\S])+" if one else r"[\s\S]+"
        self._enc = tiktoken.Encoding("bpe", pat_str=pat, mergeable_ranks=ranks, special_tokens={})
        self._splits = None if one else [regex.compile(s) for s in splits]

    @property
    def vocab_size(self):
        return len(self.id_to_bytes)

    # ---- encode / decode

    def encode(self, text, bos=False, eos=False):
        """Token ids of `text`. No special tokens are added unless asked, and special-token strings inside the
        text are encoded as plain text: model output cannot smuggle in an EOS or a chat marker."""
        return self.encode_batch([text], bos=bos, eos=eos)[0]

    def encode_batch(self, texts, bos=False, eos=False, num_threads=8):
        if self.normalizer:
            texts = [unicodedata.normalize(self.normalizer, t) for t in texts]
        out = self._encode_added(texts, num_threads) if self._added_rx else self._encode_plain(texts, num_threads)
        if eos and self.eos_id is None:
            raise TokenizerError("encode(eos=True): this tokenizer has no EOS token (tokenizer_config.json's "
                                 "eos_token); set one")
        if bos or eos:
            head, tail = [self.bos_id] if bos and self.bos_id is not None else [], [self.eos_id] if eos else []
            out = [head + ids + tail for ids in out]
        return out

    def _encode_added(self, texts, num_threads):
        """Each text cut at its added tokens: those are their ids, the text between is encoded on its own (the
        pieces of all texts in one batch)."""
        split = [self._added_rx.split(t) for t in texts]  # per text: text, added token, text, ..., text
        plain = iter(self._encode_plain([p for parts in split for p in parts[0::2]], num_threads))
        return [[i for k, p in enumerate(parts) for i in (next(plain) if k % 2 == 0 else [self.added[p]])]
                for parts in split]

    def _encode_plain(self, texts, num_threads):
        if self._splits is None:
            out = self._enc.encode_ordinary_batch(texts, num_threads=num_threads)
        else:
            out = []
            for t in texts:
                pieces = self._enc.encode_ordinary_batch(self.pretokenize(t), num_threads=1)
                out.append([r for p in pieces for r in p])
        if self.rank_to_id is not None:
            out = [[self.rank_to_id[r] for r in ids] for ids in out]
        return out

    def pretokenize(self, text):
        pieces = [text] if text else []
        for k, rx in enumerate(self._splits + [None]):
            if k == self.prefix_space_at:
                pieces = [p if p.startswith(" ") else " " + p for p in pieces]
            if rx is not None:
                pieces = [q for p in pieces for q in _split_isolated(rx, p)]
        return pieces

    def decode(self, ids):
        try:
            data = b"".join([self.id_to_bytes[i] for i in ids])
        except (IndexError, TypeError):
            bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < len(self.id_to_bytes))][:3]
            raise ValueError(f"decode: ids {bad} are not in this {len(self.id_to_bytes)}-token vocabulary") from None
        return data.decode("utf-8", errors="replace")

    def chat(self, question):
        """The prompt of a question: the paper's, `User: {question}\\n\\nAssistant:` with BOS first (if the
        tokenizer has one), or after use_chat_template the tokenizer's own template with the question as the
        user's message. The answer that follows is `encode(answer_prefix + answer, eos=True)`.

        A special-token string inside the question or the system message stays text, as in encode(): it renders
        as a private-use stand-in and is put back in the text between the template's own specials (transformers'
        apply_chat_template would read it as the special token)."""
        if not self.templated:
            return self.encode(CHAT_FORMAT.format(question=question), bos=True)
        messages = ([dict(role="system", content=self._hidden(self.system))] if self.system else []) + \
            [dict(role="user", content=self._hidden(question))]
        text = render_chat(self.chat_template, messages, bos_token=self.bos_token or "",
                           eos_token=self.eos_token or "", pad_token=self.pad_token or "")
        if not self.specials:
            return self.encode(text)
        names = {i: s for s, i in self.specials.items()}
        show = lambda t: STAND_IN_RX.sub(lambda m: names.get(int(m.group(1)), m.group()), t)  # noqa: E731
        parts = self._special_rx.split(text)  # text, special, text, ..., text
        return [i for k, p in enumerate(parts) for i in (self.encode(show(p)) if k % 2 == 0 else [self.specials[p]])]

    def _hidden(self, text):
        """`text` with each special-token string in it replaced by its stand-in (chat)."""
        if not self.specials:
            return text
        return self._special_rx.sub(lambda m: STAND_IN.format(self.specials[m.group()]), text)

    def use_chat_template(self, system=None):
        """Make chat() render the tokenizer's chat template (an instruct model's own format), with a system
        message if given, as transformers' apply_chat_template(..., add_generation_prompt=True) does."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat_template (tokenizer_config.json): leave out "
                                 "--chat-template to prompt in the paper's format")
        self.templated, self.system = True, system

    @property
    def answer_prefix(self):
        """What goes between a prompt and its answer: a space after the paper's `Assistant:`, nothing after a
        template's generation prompt (which ends its own line)."""
        return "" if self.templated else " "

    # ---- training, saving, loading

    @classmethod
    def train(cls, texts, vocab_size, pattern=SPLIT_PATTERN):
        """Train byte-level BPE on an iterable of strings: 256 bytes + merges + 3 specials = vocab_size ids."""
        n_merges = vocab_size - LEAST_VOCAB
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is below the {LEAST_VOCAB} ids of the bytes and the specials")
        merges, vocab = train_bpe(texts, n_merges, pattern)
        ranks = {b: i for i, b in enumerate(vocab)}
        specials = {s: len(vocab) + k for k, s in enumerate((BOS, EOS, PAD))}
        id_to_bytes = vocab + [s.encode() for s in specials]
        return cls(ranks, id_to_bytes, specials, [pattern], bos=BOS, eos=EOS, pad=PAD,
                   merges=[(vocab[a], vocab[b]) for a, b, _ in merges])

    def save(self, path):
        """Write tokenizer.json and tokenizer_config.json as Hugging Face's fast tokenizers expect them."""
        if self.merges is None or self.rank_to_id is not None or self.normalizer or self.prefix_space_at is not None:
            raise ValueError("save() writes tokenizers trained here; copy a loaded tokenizer.json instead")
        os.makedirs(path, exist_ok=True)
        spell = lambda b: "".join(BYTE_TO_CHAR[x] for x in b)  # noqa: E731
        special_ids = set(self.specials.values())
        vocab = {spell(b): i for i, b in enumerate(self.id_to_bytes) if i not in special_ids}
        added = [dict(id=i, content=s, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
                 for s, i in self.specials.items()]
        pre = [dict(type="Split", pattern=dict(Regex=s), behavior="Isolated", invert=False) for s in self.splits]
        pre.append(dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=False))
        tok = dict(version="1.0", truncation=None, padding=None, added_tokens=added, normalizer=None,
                   pre_tokenizer=dict(type="Sequence", pretokenizers=pre), post_processor=None,
                   decoder=dict(type="ByteLevel", add_prefix_space=True, trim_offsets=True, use_regex=True),
                   # ignore_merges: a piece that is itself a token stays whole, which is what tiktoken does
                   model=dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None,
                              end_of_word_suffix=None, fuse_unk=False, byte_fallback=False, ignore_merges=True,
                              vocab=vocab, merges=[[spell(a), spell(b)] for a, b in self.merges]))
        with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tok, f, ensure_ascii=False)
        cfg = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=self.bos_token, eos_token=self.eos_token,
                   pad_token=self.pad_token, clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE)
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, ensure_ascii=False, indent=2)

    @classmethod
    def load(cls, path):
        return cls.from_hf(path)

    @classmethod
    def from_hf(cls, path):
        """Read a Hugging Face byte-level BPE tokenizer.json (and tokenizer_config.json for BOS/EOS/pad).

        Special added tokens (BOS, EOS, chat markers) in text are encoded as plain text; non-special added tokens
        are matched in the text as `tokenizers` does. A single byte missing from the main vocabulary may be
        given by a non-special added token spelled as that byte (DeepSeek's layout). Decoding an added token
        gives back its text: for DeepSeek's byte tokens the character itself ("÷"), where `tokenizers` decodes
        the lone byte to U+FFFD; a model's output then reads as it was meant."""
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise TokenizerError(f"{file} not found (sentencepiece tokenizer.model files are not supported)")
        try:
            with open(file, encoding="utf-8") as f:
                tok = json.load(f)
            m = tok["model"]
            m["vocab"], m["merges"]  # noqa: B018  (present, or the KeyError below)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise TokenizerError(f"{file}: not a Hugging Face tokenizer.json ({type(e).__name__}: {e}); the file is "
                                 f"damaged or of another kind: copy it again from the model") from None
        if m.get("type") != "BPE" or any(m.get(k) for k in ("byte_fallback", "continuing_subword_prefix",
                                                            "end_of_word_suffix")):
            raise TokenizerError(f"{file}: only byte-level BPE is supported (got model type {m.get('type')!r}"
                             f"{', byte_fallback' if m.get('byte_fallback') else ''}); sentencepiece-style "
                             "tokenizers (Llama 2, Mistral) are not")
        splits, prefix_space_at = _hf_pre_tokenizer(tok.get("pre_tokenizer"), file)
        normalizer = _hf_normalizer(tok.get("normalizer"), file)

        def unspell(s):
            try:
                return bytes(CHAR_TO_BYTE[c] for c in s)
            except KeyError:
                raise TokenizerError(f"{file}: token {s!r} is not spelled in byte-level characters") from None

        vocab = {unspell(s): i for s, i in m["vocab"].items()}
        specials = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
        added = {a["content"]: a["id"] for a in tok.get("added_tokens", []) if not a.get("special", True)}
        if any(a.get(k) for a in tok.get("added_tokens", []) if not a.get("special", True)
               for k in ("lstrip", "rstrip", "single_word")):
            raise TokenizerError(f"{file}: added tokens with lstrip, rstrip or single_word are not supported")
        n = max(list(vocab.values()) + list(specials.values())) + 1
        id_to_bytes = [b""] * n
        for b, i in vocab.items():
            id_to_bytes[i] = b
        for s, i in specials.items():
            id_to_bytes[i] = s.encode()
        # tiktoken ranks: single bytes first, then each merge's result in merge order (the merge priority),
        # whatever ids the vocabulary gives them; rank_to_id translates back.
        ranks, merges = {bytes([b]): b for b in range(256)}, []
        for pair in m["merges"]:
            a, b = pair.split(" ") if isinstance(pair, str) else pair
            a, b = unspell(a), unspell(b)
            merges.append((a, b))
            if a + b not in vocab:
                raise TokenizerError(f"{file}: merge {pair!r} makes a token that is not in the vocabulary")
            ranks.setdefault(a + b, len(ranks))
        for b in [b for b in ranks if b not in vocab and len(b) == 1]:  # a byte given as an added token
            if BYTE_TO_CHAR[b[0]] in added:
                vocab[b] = added[BYTE_TO_CHAR[b[0]]]
        missing = [b for b in ranks if b not in vocab]
        if missing:
            raise TokenizerError(f"{file}: byte-level vocabulary lacks single bytes {missing[:5]}")
        rank_to_id = [0] * len(ranks)
        for b, r in ranks.items():
            rank_to_id[r] = vocab[b]
        identity = all(r == i for r, i in enumerate(rank_to_id))
        cfg = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file, encoding="utf-8") as f:
                cfg = json.load(f)
        name = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731
        tok = cls(ranks, id_to_bytes, specials, splits, None if identity else rank_to_id, normalizer,
                  prefix_space_at, bos=name(cfg.get("bos_token")), eos=name(cfg.get("eos_token")),
                  pad=name(cfg.get("pad_token")), merges=merges if identity else None, added=added)
        tok.stop_ids = tuple(dict.fromkeys(tok.stop_ids + _generation_eos_ids(path, n)))
        tok.chat_template = _chat_template(path, cfg)
        return tok


def _chat_template(path, cfg):
    """The chat template: chat_template.jinja (transformers' newer saves), else tokenizer_config.json's string,
    or the one named "default" of its list."""
    file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            return f.read()
    template = cfg.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template


def render_chat(template, messages, **tokens):
    """A chat template rendered as transformers' apply_chat_template(messages, add_generation_prompt=True)
    renders it (without importing transformers): jinja2's sandbox with trim_blocks and lstrip_blocks, loop
    controls, a tojson filter, raise_exception and strftime_now; tokens: bos_token, eos_token, pad_token."""
    import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, tools=None,
                                                documents=None, **tokens)
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"the chat template failed: {e}") from None


def _generation_eos_ids(path, vocab_size):
    """The ids generation_config.json says end a generation (an int or a list), or () without the file."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return ()
    try:
        with open(file, encoding="utf-8") as f:
            ids = json.load(f).get("eos_token_id")
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise TokenizerError(f"{file}: not a JSON object ({e}); the file is damaged: copy it again") from None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else ids
    if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
        raise TokenizerError(f"{file}: eos_token_id {ids!r} is not a list of ids below {vocab_size}")
    return tuple(ids)


def _longest_first(strings):
    """A regex that finds any of `strings`, the longest one at each place (as `tokenizers` matches added tokens),
    capturing it so that split() keeps it; None for none."""
    longest_first = sorted(strings, key=len, reverse=True)
    return regex.compile("(" + "|".join(map(regex.escape, longest_first)) + ")") if strings else None


def _split_isolated(rx, text):
    """Hugging Face's Split with behaviour "Isolated": every match is a piece, and so is every gap between."""
    pieces, end = [], 0
    for mt in rx.finditer(text):
        if mt.start() > end:
            pieces.append(text[end:mt.start()])
        if mt.end() > mt.start():
            pieces.append(mt.group())
        end = max(end, mt.end())
    if end < len(text):
        pieces.append(text[end:])
    return pieces


def _hf_pre_tokenizer(pre, file):
    """tokenizer.json's pre_tokenizer as (list of split regexes, prefix_space_at)."""
    parts = [] if pre is None else pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits, prefix_space_at, byte_level = [], None, False
    for p in parts:
        kind = p.get("type")
        if kind == "Split":
            if p.get("behavior") != "Isolated" or p.get("invert"):
                raise TokenizerError(f"{file}: Split behaviour {p.get('behavior')!r} (invert={p.get('invert')}) is not "
                                 "supported; only 'Isolated' is")
            pat = p["pattern"]
            splits.append(pat["Regex"] if "Regex" in pat else regex.escape(pat["String"]))
        elif kind == "Digits":
            splits.append(r"\p{N}" if p.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel":
            byte_level = True
            if p.get("add_prefix_space"):  # each piece entering ByteLevel, before its own regex split
                prefix_space_at = len(splits)
            if p.get("use_regex", True):
                splits.append(GPT2_PATTERN)
        else:
            raise TokenizerError(f"{file}: pre-tokenizer {kind!r} is not supported (Split, Digits, ByteLevel are)")
    if not byte_level:
        raise TokenizerError(f"{file}: no ByteLevel pre-tokenizer: this is not a byte-level BPE tokenizer")
    return splits or [r"[\s\S]+"], prefix_space_at


def _hf_normalizer(norm, file):
    if norm is None:
        return None
    parts = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    kinds = [n.get("type") for n in parts]
    kinds = [k for k in kinds if k]
    if len(kinds) > 1 or (kinds and kinds[0] not in ("NFC", "NFD", "NFKC", "NFKD")):
        raise TokenizerError(f"{file}: normalizer {kinds} is not supported (one of NFC, NFD, NFKC, NFKD is)")
    return kinds[0] if kinds else None


# -----------------------------------------------------------------------------
# Command line


def _read_texts(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        if path.endswith(".jsonl"):
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise SystemExit(f"error: {path}:{n}: expected a JSON object with a 'text' field ({e})")
        else:
            yield f.read()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", help="a .txt file, or a .jsonl file of {'text': ...} lines, to train on")
    ap.add_argument("--vocab-size", type=int, default=4096, help="ids in all: 256 bytes + merges + 3 specials")
    ap.add_argument("--out", help="directory to save the trained tokenizer to")
    ap.add_argument("--load", help="a directory with a Hugging Face tokenizer.json")
    ap.add_argument("--text", default="The answer is \\boxed{1234}.", help="text to show the split of")
    args = ap.parse_args()
    if args.vocab_size < LEAST_VOCAB:
        ap.error(f"--vocab-size {args.vocab_size}: {LEAST_VOCAB} or more (the bytes and the specials)")
    if args.train and not os.path.isfile(args.train):
        ap.error(f"--train {args.train}: no such file")
    if args.train:
        import time
        t0 = time.time()
        tok = Tokenizer.train(_read_texts(args.train), args.vocab_size)
        print(f"trained {tok.vocab_size} ids in {time.time() - t0:.1f}s")
        if args.out:
            tok.save(args.out)
            print(f"saved to {args.out}")
    elif args.load:
        try:
            tok = Tokenizer.from_hf(args.load)
        except TokenizerError as e:
            raise SystemExit(f"error: {e}") from None
    else:
        ap.error("give --train FILE or --load DIR")
    ids = tok.encode(args.text)
    print(ids)
    print([tok.decode([i]) for i in ids])
