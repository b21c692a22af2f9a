"""model.py: shapes of the presets, logits parity with transformers both ways, token log-probs from the forward
(plain and packed rows); the decoder built on its KV cache is tested in test_engine.py."""
import json
import os

import pytest
import torch

from model import PRESETS, CheckpointError, ModelConfig, Transformer, config_from_hf, packed_mask

transformers = pytest.importorskip("transformers")


def tiny(**kw):
    cfg = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    cfg.update(kw)
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**cfg))
    m.init_weights()
    return m.eval()


def test_deepseek_math_7b_shape_has_the_papers_parameter_count():
    with torch.device("meta"):
        m = Transformer(ModelConfig(**PRESETS["deepseek-math-7b"]))
    # 30 x (4 x 4096^2 attention + 3 x 4096 x 11008 SwiGLU + 2 x 4096 norms) + 2 x 102400 x 4096 + 4096
    assert m.num_params() == 6_910_365_696


HF_CONFIGS = {
    "llama-gqa-rope-scaling": (transformers.LlamaConfig, dict(
        num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16))),
    "qwen2-bias-tied": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                       rope_theta=1000000.0)),
    "llama-linear-rope": (transformers.LlamaConfig, dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=1, sliding_window=None)),
    "qwen3-qk-norm": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                                                     rope_theta=1000000.0)),
}


def hf_model(name):
    cls, extra = HF_CONFIGS[name]
    cfg = cls(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, rms_norm_eps=1e-6, **extra)
    torch.manual_seed(1)
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():  # HF zero-inits biases and sets norms to 1; make them matter
        for n, p in m.named_parameters():
            if n.endswith("bias") or n.endswith("norm.weight"):
                p.normal_(1.0 if n.endswith("norm.weight") else 0.0, 0.5)
    return m


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_loads_transformers_checkpoints_with_identical_logits(name, tmp_path):
    ref = hf_model(name)
    ref.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(tokens).logits
        got = ours(tokens)
    assert got.shape == (3, 40, 101)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_checkpoint_that_slides_is_read_within_its_window(tmp_path):
    """We attend to every earlier position, which is sliding attention as long as a sequence fits the window: a
    Mistral that slides (a window of 16 of its 64 positions) is read as a 16-position model; a Qwen2 that names a
    window but says use_sliding_window false (as Qwen2.5's files do) keeps its 64."""
    for cls, expected in ((transformers.MistralConfig, 16), (transformers.Qwen2Config, 64)):
        cfg = cls(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, sliding_window=16).to_dict()
        (tmp_path / cls.model_type).mkdir()
        (tmp_path / cls.model_type / "config.json").write_text(json.dumps({**cfg, "sliding_window": 16}))
        assert config_from_hf(str(tmp_path / cls.model_type)).max_seq_len == expected


def test_loads_sharded_checkpoints(tmp_path):
    ref = hf_model("llama-gqa-rope-scaling")
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    ours = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kw", [dict(), dict(qkv_bias=True, tie_embeddings=True), dict(qk_norm=True, head_dim=8),
                                dict(rope_scaling=dict(rope_type="linear", factor=4.0))])
def test_saved_checkpoints_load_in_transformers(kw, tmp_path):
    ours = tiny(**kw)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("bias") or n.endswith("norm.weight"):
                p.normal_(1.0 if n.endswith("norm.weight") else 0.0, 0.5)
    ours.save_pretrained(tmp_path, max_shard_bytes=100_000)  # forces shards + index
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    tokens = torch.randint(0, 97, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(ref(tokens).logits, ours(tokens), atol=1e-4, rtol=0)
    again = Transformer.from_pretrained(tmp_path)  # and our own round trip is exact
    with torch.no_grad():
        assert torch.equal(again(tokens), ours(tokens))


def test_export_in_bf16_with_the_tokenizers_stop_ids_and_readable_files(tmp_path):
    """Other tools stop where ours do (EOS in config.json and generation_config.json: without them transformers
    assumes Llama's 1 and 2), the file holds what config.json says, and the group can read the weights."""
    import os
    import stat

    import transformers
    model = tiny()
    model.save_pretrained(tmp_path, dtype=torch.bfloat16, bos_id=7, eos_id=9)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["torch_dtype"]) == (7, 9, "bfloat16")
    assert transformers.GenerationConfig.from_pretrained(tmp_path).eos_token_id == 9
    mode = stat.S_IMODE(os.stat(tmp_path / "model.safetensors").st_mode)
    assert mode == 0o666 & ~_umask()
    again = Transformer.from_pretrained(tmp_path, dtype=torch.float32)  # loading casts to the compute dtype
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a.to(torch.bfloat16).float(), b, msg=k)
    assert {p.dtype for p in Transformer.from_pretrained(tmp_path).parameters()} == {torch.bfloat16}  # as saved


def test_shards_split_between_tensors_never_empty(tmp_path):
    """A shard limit below every tensor's size: one tensor per file, none empty, each named in the index."""
    model = tiny()
    model.save_pretrained(tmp_path, max_shard_bytes=1)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(files) == len(index) and sorted(index.values()) == files
    with torch.no_grad():
        tokens = torch.randint(0, 97, (2, 9))
        assert torch.equal(Transformer.from_pretrained(tmp_path)(tokens), model(tokens))


def _umask():
    import os
    m = os.umask(0)
    os.umask(m)
    return m


def test_bad_checkpoints_fail_with_a_message_naming_the_problem(tmp_path):
    tiny().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
        Transformer.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    shape = r"'model.layers.0.mlp.\w+_proj.weight' has shape \(\d+, \d+\) but config.json implies"
    with pytest.raises(ValueError, match=shape):
        Transformer.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing tensors.*layers.2"):
        Transformer.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.1.*its config.json is wrong"):
        Transformer.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))  # Llama's: o_proj's too
    with pytest.raises(CheckpointError, match="attention_bias/mlp_bias are not supported"):
        Transformer.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))  # weights that load, but
    with pytest.raises(CheckpointError, match="hidden_act 'gelu' is not supported"):  # would compute another function
        Transformer.from_pretrained(tmp_path)

    reward = {**cfg, "architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "bad", "1": "good"}}
    (tmp_path / "config.json").write_text(json.dumps(reward))
    with pytest.raises(CheckpointError, match="a sequence classifier with 2 labels; a reward model has one"):
        Transformer.from_pretrained(tmp_path)

    with pytest.raises(CheckpointError, match="config.json not found"):
        Transformer.from_pretrained(tmp_path / "nowhere")

    (tmp_path / "config.json").write_text(json.dumps(cfg)[:-20])
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        Transformer.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    weights = (tmp_path / "model.safetensors").read_bytes()
    for damaged in (weights[:len(weights) // 2], b"\xff" * 8 + weights[8:], b""):
        (tmp_path / "model.safetensors").write_bytes(damaged)
        with pytest.raises(CheckpointError, match="model.safetensors: unreadable .* truncated or damaged"):
            Transformer.from_pretrained(tmp_path)


def test_rotary_tables_in_a_checkpoint_are_skipped_and_mixed_dtypes_load_as_the_embeddings(tmp_path):
    """Older transformers saved each layer's rotary_emb.inv_freq (we compute ours); a checkpoint of bf16 weights
    and fp32 norms loads, without a dtype asked, all in the embedding's bf16, each value as it was written."""
    from safetensors.torch import load_file, save_file
    m = tiny()
    m.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state = {k: v if "norm" in k else v.to(torch.bfloat16) for k, v in state.items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, tmp_path / "model.safetensors")
    loaded = Transformer.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.embed_tokens.weight, state["model.embed_tokens.weight"])
    assert torch.equal(loaded.norm.weight, state["model.norm.weight"].to(torch.bfloat16))


def test_build_on_meta_then_load_does_not_allocate_twice(tmp_path):
    """from_pretrained assigns the loaded tensors: the model's parameters are the very tensors read."""
    tiny().save_pretrained(tmp_path)
    m = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in m.parameters())
    assert not any(b.is_meta for b in m.buffers())


# -----------------------------------------------------------------------------
# token log-probs from the forward


@pytest.mark.parametrize("vocab_limit, temperature", [(None, 1.0), (90, 1.0), (90, 0.7)])
def test_forward_and_loss_give_the_log_probs_of_the_logits_and_their_gradient(vocab_limit, temperature):
    """forward(tokens, targets) and loss(tokens, targets, token_loss) compute log π(target) from the hidden states
    without the logits: equal to log_softmax(logits / T)[target] over the first vocab_limit rows; loss's gradient,
    made in its forward, is that of Σ g·log π in every parameter."""
    m = tiny()
    m.train()
    x = torch.randint(0, 90, (3, 17), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 90, (3, 17), generator=torch.Generator().manual_seed(1))
    g = torch.randn(3, 17)
    flat = g.flatten()
    total, lp = m.loss(x, y, lambda logp, rows: (logp * flat[rows], flat[rows]), vocab_limit=vocab_limit,
                       temperature=temperature)
    total.backward()
    fused = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ref = (m(x)[..., :vocab_limit] / temperature).log_softmax(-1).gather(-1, y[..., None])[..., 0]
    (ref * g).sum().backward()
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(m(x, y, vocab_limit=vocab_limit, temperature=temperature), ref.detach(), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(total, (ref * g).sum(), atol=1e-4, rtol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_an_fp32_head_gives_sampler_and_trainer_the_fp32_logits_of_a_bf16_model():
    """config.fp32_head on a bf16 model, under bf16 autocast as a one-GPU training forward runs: the training
    forward's log-probs (with and without gradient) and the sampler's logits are those of the fp32 GEMM of the bf16
    hidden states and head, not rounded to bf16 as they are without it; the head's gradient is the fp32 one's."""
    m = tiny(vocab_size=97).to(torch.bfloat16)
    with torch.no_grad():
        m.lm_head.weight.mul_(8)  # logits the size of a trained model's, where bf16 rounding shows
    x = torch.randint(0, 90, (3, 17), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 90, (3, 17), generator=torch.Generator().manual_seed(1))
    h = m.hidden(x).detach()
    w32 = m.lm_head.weight.detach().float()[:90].requires_grad_()
    logits32 = h.float() @ w32.T
    want = logits32.log_softmax(-1).gather(-1, y[..., None])[..., 0]
    (-want.sum()).backward()
    for fp32, near in ((False, False), (True, True)):
        m.config.fp32_head = fp32
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, lp = m.loss(x, y, lambda logp, rows: (-logp, -torch.ones_like(logp)), vocab_limit=90)
            total.backward()
            with torch.no_grad():
                got = m(x, y, vocab_limit=90)
        sampled = m.logits(h[:, -1], 90)
        errors = [(a - b).abs().max().item() for a, b in ((lp, want), (got, want), (sampled, logits32[:, -1]))]
        assert all(e < 1e-4 for e in errors) if near else all(e > 1e-3 for e in errors), (fp32, errors)
    torch.testing.assert_close(m.lm_head.weight.grad[:90].float(), w32.grad, atol=0.02, rtol=0.01)


def test_positions_and_mask_give_a_packed_row_the_log_probs_of_its_sequences():
    """One row holding a prompt once and two continuations after it (each attending to the prompt and itself,
    positions restarting after the prompt) gives each continuation the log-probs it has alone after the prompt."""
    m = tiny()
    p, a, b = [5, 6, 7, 8], [10, 11, 12], [20, 21]
    row = p + a + b
    positions = list(range(7)) + [4, 5]
    segment = torch.tensor([0] * 4 + [1] * 3 + [2] * 2)
    attn = torch.ones(9, 9, dtype=torch.bool).tril() & ((segment[None] == 0) | (segment[None] == segment[:, None]))
    assert torch.equal(packed_mask(segment[None]), attn[None, None])  # what GRPO's packed rows attend with
    assert packed_mask(torch.tensor([[0] * 4 + [1] * 5])) is None  # one sequence: plain causal attention
    with torch.no_grad():
        packed = m(torch.tensor([row]), positions=torch.tensor([positions]), mask=attn[None, None])[0]
        alone_a, alone_b = m(torch.tensor([p + a]))[0], m(torch.tensor([p + b]))[0]
    torch.testing.assert_close(packed[:7], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[7:], alone_b[4:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(), dict(qk_norm=True, head_dim=8), dict(qkv_bias=True)])
def test_a_block_compiles_whole_for_training(kw):
    """--compile compiles each block (common.build_model): one graph per block, no graph break, forward and
    backward, for every supported architecture's block."""
    m = tiny(**kw).train()
    x = torch.randn(2, 9, 64, requires_grad=True)
    cos, sin = m.rope_cos[:9][None, :, None], m.rope_sin[:9][None, :, None]
    explained = torch._dynamo.explain(m.layers[0])(x, cos, sin)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
