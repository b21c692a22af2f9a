"""The transformer: a Llama/DeepSeek-family decoder, its KV cache, and Hugging Face checkpoint I/O.

DeepSeekMath-Base 7B is a plain Llama (paper §2; docs/paper.md §2): pre-norm RMSNorm, rotary position
embeddings, SwiGLU feed-forward, multi-head attention (grouped-query here, so Qwen2/Qwen3/Llama-3 load too), untied
input and output embeddings, no biases. This file is the whole model; it imports torch, safetensors and fused_kernels/
(token log-probs) only and knows nothing of tokenizers, data or process groups (FSDP2 is applied by common.py).
Its forward gives logits, or token log-probs without the logits (training); `prefill` and `decode_step` are the
two calls of a KV-cache decoder, whose scheduling and sampling are engine.py's.

Module and parameter names follow Hugging Face's `LlamaForCausalLM` minus its `model.` prefix, so reading and
writing a checkpoint is a rename of one prefix, not a translation table.

    python model.py                      # parameter counts of every preset
    python -c "from model import *; m = Transformer.from_pretrained('path/to/hf_dir')"
"""

import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fused_kernels import hidden_logprobs, hidden_token_loss

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class ModelConfig:
    vocab_size: int = 102400
    dim: int = 4096  # residual stream width, C
    n_layers: int = 30
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many as n_heads (multi-head attention, as DeepSeekMath)
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int = 11008  # SwiGLU hidden width
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Hugging Face's rope_scaling: None, {"rope_type": "linear" | "llama3", ...}
    norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v
    qk_norm: bool = False  # Qwen3 RMS-normalises each head's query and key before RoPE
    tie_embeddings: bool = False
    # "lm": next-token logits (Hugging Face's ...ForCausalLM); "score": one scalar per position instead
    # (...ForSequenceClassification with one label), the head of a reward or value model (reward_model.py)
    head: str = "lm"
    # a compute choice, never saved: the LM head's GEMM in fp32 whatever the compute dtype, so that the logits are
    # not rounded to bf16 and the sampler's log-probs meet the trainer's closer (grpo.py --fp32-head; bench.py gap)
    fp32_head: bool = False

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head not in ("lm", "score"):
            raise ValueError(f"head={self.head!r}: expected 'lm' or 'score'")


# Model sizes by name. "deepseek-math-7b" is the exact shape of DeepSeekMath-Base 7B (6.91B parameters);
# "toy" is the laptop model the toy pipeline trains (its vocab_size is set by the toy tokenizer).
PRESETS = {
    "toy": dict(vocab_size=2048, dim=256, n_layers=6, n_heads=4, ffn_dim=704, max_seq_len=512),
    "100m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, ffn_dim=2048, max_seq_len=2048),
    "1b": dict(vocab_size=102400, dim=2048, n_layers=16, n_heads=16, ffn_dim=5504, max_seq_len=4096),
    "deepseek-math-7b": dict(vocab_size=102400, dim=4096, n_layers=30, n_heads=32, ffn_dim=11008,
                             max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-6),
}

# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x · rsqrt(mean(x²) + eps) in fp32, cast back to x's dtype, then the weight, as Llama does (bf16
        # mean-of-squares loses too many bits). F.rms_norm computes exactly that: on the CPU op for op as written
        # out (the same bits), on CUDA in one fused kernel where the written-out form took seven
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def rope_frequencies(cfg: ModelConfig):
    """Inverse frequencies theta^(-2i/d) of rotary embeddings, with Hugging Face's linear or llama3 scaling."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / s["factor"]
    elif kind == "llama3":  # Llama 3.1: slow frequencies divided by `factor`, fast ones kept, a smooth ramp between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old / wavelen - lo) / (hi - lo)  # used only between the two cut-offs: in [0, 1]
        inv_freq = torch.where(wavelen > old / lo, inv_freq / factor,
                               torch.where(wavelen < old / hi, inv_freq,
                                           (1 - smooth) * inv_freq / factor + smooth * inv_freq))
    elif kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: linear, llama3)")
    return inv_freq.float()


def apply_rope(x, cos, sin):
    # x: (B, T, H, D); cos, sin: (B or 1, T, 1, D). Hugging Face's "rotate half" layout: the pairs rotated
    # together are (i, i + D/2), not (2i, 2i+1), so Llama checkpoints load without permuting q and k.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # q, k and v in one GEMM (Hugging Face's q_proj, k_proj, v_proj stacked: see FUSED)
        self.qkv_proj = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps), RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x, cos, sin, mask=None, kv=None, pos=None):
        """x (B, T, C). mask None: causal attention over x itself; else the keys each query sees, (B, 1, T, S) bool,
        or for a decode step (B, 1, 1, L) additive. kv: this layer's cache (keys, values), each (R, Hkv, S, D) with
        R >= B rows. With pos None, x's keys and values are written at [0, T) (a prefill); with pos (B,), T is 1,
        each row's are written at its own position and its query attends over the first L positions of the first
        B rows under `mask` (a decode step: every row may be at another length)."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qk, v = self.qkv_proj(x).view(B, T, H + 2 * Hkv, D).split([H + Hkv, Hkv], dim=2)
        if hasattr(self, "q_norm"):
            qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)
        # the query and key heads rotated together: half the elementwise ops of rotating each (a decode step
        # is bound by how many it launches); rotated in the projection's (B, T, heads, D) layout, then transposed:
        # rotating the transposed view made a compiled block's backward fail at any length but the one it was
        # compiled at (torch inductor fixed the attention output's strides there, the length itself symbolic)
        q, k = apply_rope(qk, cos, sin).transpose(1, 2).split([H, Hkv], dim=1)  # (B, H, T, D), (B, Hkv, T, D)
        v = v.transpose(1, 2)
        if kv is not None and pos is None:
            kv[0][:, :, :T], kv[1][:, :, :T] = k, v
        elif kv is not None:
            # written into the whole buffer, not through a view of it, which a compiled step would copy back whole
            rows = torch.arange(B, device=x.device)
            kv[0][rows, :, pos], kv[1][rows, :, pos] = k[:, :, 0], v[:, :, 0]  # (B, Hkv, D) each
            L = mask.shape[-1]
            # the H / Hkv query heads that share a key head as that many queries of it: no copy of the cache
            y = F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, D), kv[0][:B, :, :L], kv[1][:B, :, :L],
                                               attn_mask=mask)  # (B, Hkv, H / Hkv, D)
            return self.o_proj(y.reshape(B, 1, H * D))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=Hkv != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)  # gate_proj and up_proj in one GEMM
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, kv=None, pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class KVCache:
    """Keys and values of `rows` sequences of up to `length` positions, preallocated: k and v are lists with one
    (rows, Hkv, length, D) tensor per layer (separate tensors, so that a compiled decode step writes each in
    place). Row i holds one sequence from position 0 on; engine.py decides which sequence lives in which row."""
    k: list
    v: list

    @classmethod
    def empty(cls, config, rows, length, dtype, device):
        shape = (rows, config.n_kv_heads, length, config.head_dim)
        return cls(*([torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
                     for _ in range(2)))

    def layer(self, i):
        return self.k[i], self.v[i]


# -----------------------------------------------------------------------------
# The model


def packed_mask(segment):
    """The keys each query of a packed row sees, (b, 1, T, T) bool, for Transformer.hidden's `mask`: causally, the
    row's shared prompt and its own sequence. segment (b, T): 0 on the prompt, k on the k-th sequence after it, -1
    on padding (which sees the prompt and itself, so that no query sees nothing). None when no row holds two
    sequences: plain causal attention, which the fast attention kernels take without a mask."""
    if segment.amax() <= 1:
        return None
    T = segment.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment.device).tril()  # query t sees keys up to t
    q, k = segment[:, :, None], segment[:, None, :]  # (b, T, 1), (b, 1, T)
    return (causal & ((k == 0) | (k == q)))[:, None]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        if config.head == "score":
            self.score = nn.Linear(config.dim, 1, bias=False)
        else:
            self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.lm_head.weight = self.embed_tokens.weight
        # cos/sin tables for every position, (max_seq_len, head_dim); not saved, rebuilt by reset_rope()
        self.register_buffer("rope_cos", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        self.reset_rope()

    def reset_rope(self):
        """Fill the rotary tables; call after moving a meta-built model to a real device."""
        if self.rope_cos.is_meta:
            return
        t = torch.arange(self.config.max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, rope_frequencies(self.config))  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1).to(self.rope_cos.device)  # (T, D), rotate-half layout
        self.rope_cos.copy_(emb.cos())
        self.rope_sin.copy_(emb.sin())

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """Random init for training from scratch: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)
        (GPT-2) so the residual stream's variance does not grow with depth."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):  # the layer norms, the final one, Qwen3's q_norm and k_norm
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name == "score.weight":  # a new reward or value head starts at 0: every score σ(0) = 1/2
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)
        self.reset_rope()

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def hidden(self, tokens, positions=None, mask=None, cache=None, pos=None):
        """Final normalised hidden states (B, T, C): everything but the LM head.

        tokens alone: causal attention at positions 0..T-1 (training, or a prefill that writes `cache`). Packed
        rows pass their own `positions` (B, T) and `mask` (B, 1, T, T) of the keys each query sees. A decode step
        passes `pos` (B,), the position of each row's one token, and the cache it reads and writes (see
        Attention.forward)."""
        B, T = tokens.shape
        if positions is None and pos is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.config.max_seq_len}")
            cos, sin = self.rope_cos[:T][None, :, None], self.rope_sin[:T][None, :, None]  # (1, T, 1, D)
        else:
            at = positions if positions is not None else pos[:, None]  # (B, T)
            cos, sin = self.rope_cos[at][:, :, None], self.rope_sin[at][:, :, None]  # (B, T, 1, D)
        x = self.embed_tokens(tokens)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if cache is None else cache.layer(i), pos)
        return self.norm(x)

    def forward(self, tokens, targets=None, *, positions=None, mask=None, vocab_limit=None, at=None,
                temperature=1.0, kept=None):
        """Logits (B, T, V); or, given targets (B, T), the log-probabilities log π(targets_t | tokens_≤t) (B, T) in
        fp32, computed from the hidden states a chunk of rows at a time (fused_kernels.hidden_logprobs), so that the
        (B, T, V) logits never exist: at 7B they are the largest tensor of a training step. Differentiable, its
        backward making the logits again chunk by chunk (a loss of each token's log-prob alone, as GRPO's, trains
        through `loss` instead). Inside forward, FSDP2 gathers the LM head as for any other use of it. vocab_limit:
        the tokenizer's size, for a head with more rows than token ids (DeepSeek-Math: 102,400 for 100,015): π is
        then over the real ids only, the distribution the sampler draws from (engine.generate); temperature: π is
        softmax(logits / temperature), the distribution a sampler at that temperature draws from. positions, mask:
        for packed rows (see hidden). at (B, T): the position whose hidden state predicts each target, where it is
        not the target's own (packed rows where several completions continue one prompt: each one's first token is
        predicted from the prompt's last position). kept (B, T, K): per target, the ids π is renormalised over, -1
        after them (a top-k sampler's, engine.cut's: DeepSeek-V3.2's keep-sampling mask); all -1: every id.
        A model with the "score" head returns its scalar at every position instead (B, T), in fp32: a reward
        model reads it at a sequence's last token or at the end of each step (reward_model.py)."""
        h = self.hidden(tokens, positions, mask)
        if self.config.head == "score":
            if targets is not None:
                raise ValueError("a model with the 'score' head has no next-token log-probs: call it without targets")
            # a tensor of its own, not a view of the (B, T, 1) output: FSDP2 warns on views returned from forward
            return self.score(h)[..., 0].to(torch.float32, copy=True)
        if targets is None:
            return self.logits(h)
        if self.lm_head.bias is not None:
            raise ValueError("forward(targets=...) takes an LM head without bias, as every supported architecture's")
        if at is not None:
            h = h.gather(1, at[..., None].expand(-1, -1, h.shape[-1]))
        with self.head_precision(h):
            return hidden_logprobs(*self.head_inputs(h, vocab_limit, temperature), targets, kept=kept)  # (B, T)

    def loss(self, tokens, targets, token_loss, *, positions=None, mask=None, vocab_limit=None, sees_all=False,
             temperature=1.0, kept=None):
        """The training forward: Σ_t token_loss(log π(targets_t | tokens_≤t)), its gradient in the LM head and the
        hidden states made here, in one pass over chunks of the logits (fused_kernels.hidden_token_loss: three
        GEMMs, the logits never whole), and the log-probs (B, T) in fp32 without gradient, for metrics.
        token_loss(logp (n,), rows) -> (loss (n,), d loss / d logp (n,)) for the flattened (B·T) positions `rows`
        (a slice). sees_all: a token's loss depends on other tokens' log-probs (GSPO's ratio: a mean over its
        sequence), so token_loss is instead a function of all of them, (B, T) without gradient, that returns the
        token loss; they are read first from the same hidden states (a fourth GEMM). Under FSDP2 this is a forward
        like forward (common.build_model registers it). vocab_limit, positions, mask, temperature, kept: as
        forward."""
        if self.config.head == "score" or self.lm_head.bias is not None:
            raise ValueError("loss() takes a model with an LM head without bias, as every supported architecture's")
        h = self.hidden(tokens, positions, mask)
        with self.head_precision(h):
            h, w = self.head_inputs(h, vocab_limit, temperature)
            if sees_all:
                with torch.no_grad():
                    token_loss = token_loss(hidden_logprobs(h, w, targets, kept=kept))
            return hidden_token_loss(h, w, targets, token_loss, kept=kept)

    def logits(self, h, vocab_limit=None):
        """The LM head's logits of hidden states h (..., C) over the first vocab_limit ids: what forward returns
        without targets and what the sampler draws from (engine), in fp32 with config.fp32_head."""
        bias = self.lm_head.bias
        with self.head_precision(h):
            return F.linear(*self.head_inputs(h, vocab_limit), None if bias is None else bias[:vocab_limit])

    def head_inputs(self, h, vocab_limit=None, temperature=1.0):
        """The LM head's GEMM operands: the hidden states and the head's first vocab_limit rows, as they are, or
        in fp32 with config.fp32_head (under head_precision, which keeps autocast from casting them back); the
        hidden states divided by the temperature, which divides the logits."""
        w = self.lm_head.weight[:vocab_limit]
        h, w = (h.float(), w.float()) if self.config.fp32_head else (h, w)
        return (h if temperature == 1 else h / temperature), w

    def head_precision(self, h):
        """The context of the LM head's GEMM: autocast off for an fp32 head, the caller's otherwise."""
        return torch.autocast(h.device.type, enabled=False) if self.config.fp32_head else nullcontext()

    def prefill(self, tokens, cache):
        """Keys and values of right-padded prompts (B, P) written into `cache` at [0, P); returns the hidden states
        (B, P, C). Under causal attention a prompt's tokens never see the padding after them."""
        return self.hidden(tokens, cache=cache)

    def decode_step(self, tokens, pos, cache, length):
        """One token per row, tokens (B,) at positions pos (B,) < length: each row's keys and values are written
        into the cache (of B rows or more) at its position, and its query attends over the cache's first `length`
        positions up to its own. Returns the hidden states (B, C). No shape depends on the data and nothing is read
        back to the host, so a CUDA graph can capture the step (engine.Decoder(compile=True))."""
        keys = torch.arange(length, device=pos.device)
        mask = torch.zeros(len(pos), length, dtype=self.embed_tokens.weight.dtype, device=pos.device)
        mask = mask.masked_fill(keys[None, :] > pos[:, None], float("-inf"))  # (B, L): additive, built once a step
        return self.hidden(tokens[:, None], mask=mask[:, None, None, :], cache=cache, pos=pos)[:, 0]

    # -------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu"):
        """Load a Hugging Face directory (config.json + model.safetensors, or sharded with
        model.safetensors.index.json) of model_type llama, qwen2, qwen3 or mistral. The model is built on the meta
        device and each tensor is assigned as it is read, so a 7B model needs its own size in memory, not twice that.
        dtype None keeps the checkpoint's dtype."""
        from safetensors import safe_open

        config = config_from_hf(path)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in hf_layout(model.state_dict(), config).items()}  # Hugging Face's names
        if config.tie_embeddings and config.head == "lm":
            expected.pop("lm_head.weight")
        state = {}
        for file in _safetensors_files(path):
            try:
                with safe_open(file, framework="pt", device=str(device)) as f:
                    for key in f.keys():
                        name = key.removeprefix("model.")
                        if name not in expected:
                            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight"
                                                                         and config.tie_embeddings):
                                continue  # recomputed / shared with the embedding
                            raise CheckpointError(f"{file}: unexpected tensor {key!r}: this is not a plain "
                                                  f"{'/'.join(HF_ARCHITECTURES)} checkpoint, or its config.json is "
                                                  "wrong")
                        t = f.get_tensor(key)
                        if t.shape != expected[name]:
                            raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(t.shape)} but config.json "
                                                  f"implies {tuple(expected[name])}: the config and the weights differ")
                        state[name] = t.to(dtype) if dtype is not None else t
            except CheckpointError:
                raise
            except Exception as e:  # safetensors' own errors (a truncated file, a bad header) have no common base
                raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {e}); the file is truncated or "
                                      f"damaged: copy or export it again") from None
        missing = sorted(set(expected) - set(state))
        if missing:
            raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                                  f"({len(missing)} in all); the checkpoint is incomplete or for another architecture")
        if dtype is None:  # one dtype for the whole model: that of the embedding
            dtype = state["embed_tokens.weight"].dtype
            state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(fused_layout(state, config), strict=False, assign=True)
        if config.tie_embeddings and config.head == "lm":
            model.lm_head.weight = model.embed_tokens.weight
        model.rope_cos = torch.empty(config.max_seq_len, config.head_dim, device=device)
        model.rope_sin = torch.empty(config.max_seq_len, config.head_dim, device=device)
        model.reset_rope()
        return model

    def save_pretrained(self, path, state_dict=None, max_shard_bytes=5 << 30, dtype=None, bos_id=None,
                        eos_id=None):
        """Write config.json and model.safetensors (sharded with an index above max_shard_bytes) that
        transformers, vLLM and lm-evaluation-harness load as they are. Pass `state_dict` to save a gathered
        copy (e.g. the full state of an FSDP-sharded model), `dtype` to write in another dtype than the weights'
        (bf16 from fp32 master weights), and the tokenizer's BOS/EOS ids so that other tools stop where ours do:
        they go into config.json and generation_config.json (without them, Llama's 1 and 2 are assumed). eos_id may
        be a list (an instruct model's stop ids): config.json takes the first, generation_config.json all."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        state = hf_layout(state_dict if state_dict is not None else self.state_dict(), self.config)
        heads = ("lm_head.weight", "score.weight")  # outside Hugging Face's "model." prefix
        state = {("" if k in heads else "model.") + k: v.detach().to(dtype).contiguous().cpu()
                 for k, v in state.items() if not (k == "lm_head.weight" and self.config.tie_embeddings)}
        dtype = next(iter(state.values())).dtype
        eos = list(eos_id) if isinstance(eos_id, (list, tuple)) else [] if eos_id is None else [eos_id]
        special = {k: v for k, v in (("bos_token_id", bos_id), ("eos_token_id", eos[0] if eos else None))
                   if v is not None}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**config_to_hf(self.config, dtype), **special}, f, indent=2)
        if special:
            with open(os.path.join(path, "generation_config.json"), "w") as f:
                json.dump({**special, **({"eos_token_id": eos} if len(eos) > 1 else {})}, f, indent=2)
        shards, size = [{}], 0
        for k, v in state.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        umask = os.umask(0)
        os.umask(umask)
        for name, shard in zip(names, shards):
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            os.chmod(os.path.join(path, name), 0o666 & ~umask)  # safetensors writes 0600; a cluster's group reads
        if len(shards) == 1:
            return
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(v.numel() * v.element_size() for v in state.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# -----------------------------------------------------------------------------
# Hugging Face's layout: our fused projections, theirs apart

FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def part_sizes(fused, cfg):
    if fused == "self_attn.qkv_proj":
        return [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
    return [cfg.ffn_dim, cfg.ffn_dim]


def hf_layout(state, cfg):
    """Our state dict with each fused projection split into Hugging Face's (rows of the weight, and of the bias)."""
    out = {}
    for name, t in state.items():
        fused = next((f for f in FUSED if f".{f}." in name), None)
        if fused is None:
            out[name] = t
            continue
        for part, piece in zip(FUSED[fused], t.split(part_sizes(fused, cfg), dim=0)):
            out[name.replace(fused, part)] = piece
    return out


def fused_layout(state, cfg):
    """The inverse of hf_layout: Hugging Face's q/k/v and gate/up projections stacked into ours, a layer at a time
    (a loading model holds one layer's projections twice at most)."""
    out = dict(state)
    for name in list(state):
        for fused, parts in FUSED.items():
            if f".{parts[0]}." in name:
                out[name.replace(parts[0], fused)] = torch.cat([out.pop(name.replace(parts[0], p)) for p in parts])
    return out


# -----------------------------------------------------------------------------
# config.json <-> ModelConfig

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                    "mistral": "MistralForCausalLM"}


class CheckpointError(ValueError):
    """A model directory that cannot be read: the message names the file, what is wrong, and the fix."""


def config_from_hf(path) -> ModelConfig:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} not found: expected a Hugging Face model directory")
    try:
        with open(file) as f:
            c = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e}); the file is damaged: copy or export it again") from None
    if not isinstance(c, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(c).__name__}")
    kind = c.get("model_type")
    if kind not in HF_ARCHITECTURES:
        raise CheckpointError(f"{file}: model_type {kind!r} is not supported (supported: "
                              f"{', '.join(HF_ARCHITECTURES)})")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise CheckpointError(f"{file}: attention_bias/mlp_bias are not supported (only Qwen2's q/k/v biases)")
    if c.get("hidden_act", "silu") != "silu":  # the MLP is SwiGLU: another activation would run as silu, silently
        raise CheckpointError(f"{file}: hidden_act {c['hidden_act']!r} is not supported (the MLP is SwiGLU: silu)")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if k not in c]
    if missing:
        raise CheckpointError(f"{file}: missing {', '.join(missing)}; this is not a complete model config")
    # transformers >= 5 nests rope_theta and the scaling under rope_parameters; older files keep them at the top
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = None
    max_len = c.get("max_position_embeddings", 4096)
    if c.get("sliding_window") and c.get("use_sliding_window", kind == "mistral"):  # Qwen2/3 say whether they slide
        max_len = min(max_len, c["sliding_window"])  # within the window, sliding attention is plain attention
    head = "lm"
    if any(a.endswith("ForSequenceClassification") for a in c.get("architectures") or []):
        if len(c.get("id2label") or {"0": ""}) != 1:
            raise CheckpointError(f"{file}: a sequence classifier with {len(c['id2label'])} labels; a reward model "
                                  "has one (num_labels=1)")
        head = "score"
    return ModelConfig(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads"), head_dim=c.get("head_dim"),
        ffn_dim=c["intermediate_size"], max_seq_len=max_len, rope_theta=theta, rope_scaling=rope,
        norm_eps=c.get("rms_norm_eps", 1e-6), qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3",
        tie_embeddings=c.get("tie_word_embeddings", False), head=head)


def config_to_hf(cfg: ModelConfig, dtype=torch.float32) -> dict:
    if cfg.qkv_bias and cfg.qk_norm:
        raise ValueError("no Hugging Face architecture has both q/k/v biases and q/k norms")
    kind = "qwen2" if cfg.qkv_bias else "qwen3" if cfg.qk_norm else "llama"  # Llama's attention_bias: o_proj too
    arch = HF_ARCHITECTURES[kind]
    if cfg.head == "score":  # transformers reads it at the last non-pad token: a reward model
        arch = arch.replace("ForCausalLM", "ForSequenceClassification")
    c = dict(architectures=[arch], model_type=kind, vocab_size=cfg.vocab_size,
             hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
             num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.ffn_dim,
             max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
             rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
             torch_dtype=str(dtype).removeprefix("torch."))
    if kind in ("llama", "qwen3"):
        c.update(attention_bias=False, mlp_bias=False)
    if cfg.head == "score":
        c.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return c


def _safetensors_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        for n in names:
            if not os.path.isfile(os.path.join(path, n)):
                raise CheckpointError(f"{index} lists {n}, which is not in {path}: the download is incomplete")
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                          "(PyTorch .bin checkpoints are not read: convert them with safetensors first)")


if __name__ == "__main__":
    for name, kw in PRESETS.items():
        with torch.device("meta"):
            m = Transformer(ModelConfig(**kw))
        print(f"{name:>18}: {m.num_params() / 1e6:9.1f}M parameters  {asdict(m.config)}")
