"""From a step's completions to the tensors the update trains on: rows that hold a question's prompt once and
then several of its completions (--pack), each with its advantages, loss weights and the sampler's log-probs;
micro-batches of rows of similar length. A completion in a packed row attends to the prompt and to itself only
(model.packed_mask), so its log-probs are those it has alone, the prompt computed once for the group (grpo.py's
update, ppo.py's value model)."""

from dataclasses import dataclass

import torch

from model import packed_mask


def loss_weights(sampled, loss_norm):
    """Per token of one completion, its weight in GRPO's loss sum (grpo.grpo_objective_sums; grpo.loss_normaliser
    divides the sum): `sampled` (n,) bool marks the tokens that carry loss; per sequence (the paper) each of them
    weighs 1/|o_i|, so that every output counts once whatever its length; per token (DAPO) and constant
    (Dr. GRPO) each weighs 1."""
    m = sampled.float()
    return m / m.sum().clamp(min=1) if loss_norm == "sequence" else m


@dataclass
class Row:
    """One training row: a question's prompt once, then up to `pack` of its completions, each behind its own
    copy of the prompt's last token, so that every position predicts one token (a completion's first token is
    predicted from the prompt's end). A completion attends to the prompt and to itself, never to its neighbours,
    and its positions restart after the prompt: its log-probs are those of prompt + completion alone, while the
    prompt is computed once for all of them. With pack = 1 a row is the plain sequence prompt + completion.
    All fields are lists of the row's length."""
    inputs: list  # token ids fed in
    targets: list  # the token each position predicts
    positions: list  # RoPE positions
    segment: list  # 0 on the shared prompt, k on completion k
    weights: list  # loss weight of each target (loss_weights), 0 off the model's own tokens
    advantages: list
    sampler_logp: list  # the sampler's log π of each target (0 where it did not sample it)
    entropy: list  # the entropy of π where the sampler drew each target (0 where it did not sample it)
    kept: list  # per target, the ids the sampler could have drawn it from, -1 after them (all -1: every id)


def pack_rows(comps, per_token, group_size, pack, mask_truncated, loss_norm):
    """Rows of up to `pack` completions of one question each. comps come in groups of group_size outputs of one
    question; per_token holds each completion's advantages (token_advantages). The kept ids are each
    completion's own (engine.Completion.kept, --keep-sampling-mask) or, where it has none, [-1]: every id."""
    rows, none = [], [-1] * max((len(c.kept[0]) for c in comps if c.kept), default=1)
    for g in range(0, len(comps), group_size):
        for first in range(g, g + group_size, pack):
            p = comps[first].prompt
            n = len(p) - 1
            row = Row(p[:-1], p[1:], list(range(n)), [0] * n, [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n,
                      [none] * n)
            for k, i in enumerate(range(first, min(first + pack, g + group_size)), 1):
                c = comps[i]
                live = c.finished or not mask_truncated  # a cut-off completion may teach nothing (DAPO)
                row.inputs += [p[-1]] + c.ids[:-1]
                row.targets += c.ids
                row.positions += range(n, n + len(c.ids))
                row.segment += [k] * len(c.ids)
                row.weights += loss_weights(torch.tensor(c.sampled, dtype=torch.bool) & live, loss_norm).tolist()
                row.advantages += per_token[i].tolist()
                row.sampler_logp += c.logprobs if c.logprobs is not None else [0.0] * len(c.ids)
                row.entropy += c.entropies if c.entropies is not None else [0.0] * len(c.ids)
                row.kept += c.kept if c.kept is not None else [none] * len(c.ids)
            rows.append(row)
    return rows


class Batch:
    """Rows of similar length as right-padded tensors (b, T), one per field of Row (`kept` (b, T, K), or None
    where no row keeps fewer than every id), and `attn` (b, 1, T, T), the keys each query sees (None when no row
    holds two completions: plain causal attention). Padding predicts the pad id with weight 0 and sees the prompt
    and itself."""

    def __init__(self, rows, pad_id, device):
        T = max(len(r.inputs) for r in rows)

        def pad(field, value, dtype):
            return torch.tensor([getattr(r, field) + [value] * (T - len(r.inputs)) for r in rows], dtype=dtype,
                                device=device)
        self.inputs, self.targets = pad("inputs", pad_id, torch.long), pad("targets", pad_id, torch.long)
        self.positions, segment = pad("positions", 0, torch.long), pad("segment", -1, torch.long)
        self.weights, self.advantages = pad("weights", 0.0, torch.float32), pad("advantages", 0.0, torch.float32)
        self.sampler_logp, self.entropy = pad("sampler_logp", 0.0, torch.float32), pad("entropy", 0.0, torch.float32)
        kept = any(k[0] >= 0 for r in rows for k in r.kept)
        self.kept = pad("kept", [-1] * len(rows[0].kept[0]), torch.long) if kept else None  # (b, T, K)
        self.mask = self.weights > 0  # (b, T): the model's own tokens
        self.segment = segment  # (b, T): 0 on the prompt, k on completion k, -1 on padding
        self.positions_run, self.tokens = len(rows) * T, sum(len(r.inputs) for r in rows)
        self.outputs = sum(max(r.segment) for r in rows)  # the completions it holds
        self.attn = packed_mask(segment)  # (b, 1, T, T): its prompt and itself; None if one completion a row

    def logprobs(self, model, vocab_limit, temperature=1.0):
        """log π(targets) (b, T) under `model` at `temperature`, over the tokenizer's ids only, without gradient
        (model.forward)."""
        return model(self.inputs, self.targets, positions=self.positions, mask=self.attn, vocab_limit=vocab_limit,
                     temperature=temperature, kept=self.kept)

    def loss(self, model, vocab_limit, token_loss, sees_all=False, temperature=1.0):
        """(Σ token_loss, log π(targets) (b, T)): the training forward (model.loss), its gradient made in it."""
        return model.loss(self.inputs, self.targets, token_loss, positions=self.positions, mask=self.attn,
                          vocab_limit=vocab_limit, sees_all=sees_all, temperature=temperature, kept=self.kept)

    def values(self, model):
        """V(state) (b, T) under a value model: at each position, the value of the context its target is drawn
        from."""
        return model(self.inputs, positions=self.positions, mask=self.attn)


def micro_batches(rows, size, pad_id, device):
    """Batches of up to `size` rows of similar length: sorted by length, each padded to its own longest."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].inputs))
    return [Batch([rows[i] for i in order[s:s + size]], pad_id, device) for s in range(0, len(order), size)]
