"""lora.py: adapters that start as the base model, train alone, merge into the export, load in PEFT, and run on
1 and 2 FSDP2 ranks with exact resume (sft.py --lora-rank); GRPO's reference is the policy with them off."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import common
import lora
from conftest import ROOT
from model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
CPU = common.Dist(0, 1, torch.device("cpu"))


def lora_model(seed=0, rank=4, alpha=8.0, random_b=True, config=CFG):
    """A base model with adapters; B drawn at random (not zero) so that they change the output."""
    torch.manual_seed(seed)
    base = Transformer(config)
    base.init_weights()
    model = lora.add_adapters(Transformer(config), rank, alpha)
    model.load_state_dict({**base.state_dict(), **lora.initial_adapters(model, seed)})
    if random_b:
        with torch.no_grad():
            for _, m in lora.adapters(model):
                m.lora_B.normal_(0, 0.5)
    return base, model


def test_an_adapter_is_w_plus_scaled_ba_per_part_in_float64():
    """Each part of a fused projection gets its own (A, B): y = x Wᵀ + (α/r) x A_iᵀ B_iᵀ, checked in float64
    against the merged weight written out by hand; with B = 0 the model is the base model."""
    base, model = lora_model(random_b=False)
    x = torch.randint(0, 300, (2, 12))
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    _, model = lora_model()
    model = model.double()
    m = model.layers[0].self_attn.qkv_proj  # q (32), k (16), v (16) rows
    assert m.parts == [32, 16, 16] and m.lora_A.shape == (12, 32) and m.lora_B.shape == (64, 4)
    h = torch.randn(3, 32, dtype=torch.float64)
    A, B = m.lora_A, m.lora_B
    by_hand = torch.cat([B[0:32] @ A[0:4], B[32:48] @ A[4:8], B[48:64] @ A[8:12]]) * (8.0 / 4)
    torch.testing.assert_close(m(h), h @ (m.weight + by_hand).T + (m.bias if m.bias is not None else 0))
    with lora.disabled(model):
        torch.testing.assert_close(m(h), h @ m.weight.T)
    torch.testing.assert_close(m(h), h @ (m.weight + by_hand).T)  # on again after the reference's turn


def test_adapters_start_as_peft_draws_them_seeded_with_alpha_2r_by_default():
    """A is uniform on ±1/√in (kaiming_uniform_ with a = √5, as PEFT), a function of the seed; α defaults to 2R;
    --export-adapter asks for --lora-rank."""
    import argparse
    import math
    _, model = lora_model(random_b=False)
    a, b = lora.initial_adapters(model, 0), lora.initial_adapters(model, 1)
    A = a["layers.0.mlp.gate_up_proj.lora_A"]  # (2 parts x 4, 32)
    assert 0.9 / math.sqrt(32) < A.abs().max() <= 1 / math.sqrt(32)
    assert all(torch.equal(v, lora.initial_adapters(model, 0)[k]) for k, v in a.items())
    assert not torch.equal(A, b["layers.0.mlp.gate_up_proj.lora_A"])
    ap = argparse.ArgumentParser()
    lora.add_args(ap)
    assert lora.of(ap.parse_args(["--lora-rank", "8"])) == (8, 16.0) and lora.of(ap.parse_args([])) is None
    with pytest.raises(SystemExit, match="--export-adapter writes LoRA adapters: add --lora-rank R"):
        lora.of(ap.parse_args(["--export-adapter"]))


def test_a_lora_step_trains_only_the_adapters():
    optim = common.Optim(lr=1e-2, max_steps=10, weight_decay=0.1)
    model = common.build_model(CFG, CPU, seed=0, adapters=(4, 8.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = common.make_optimizer(model, optim)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == \
        sum(v.numel() for k, v in before.items() if ".lora_" in k)
    x = torch.randint(0, 300, (4, 16))
    common.train_step(model, opt, [(x, x, torch.ones_like(x, dtype=torch.bool))], CPU, optim, 0)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".lora_A" in k or ".lora_B" in k}  # all adapters, nothing else


def test_the_rollouts_of_a_sharded_lora_model_hold_one_copy_of_its_weights(group_of_one):
    """Under FSDP2 (one bf16 process: a group of one) the rollouts' weights are W + (α/r) BA, new tensors: each
    block is gathered, merged and released before the next (common.merged_blocks), so inside `gathered` no block
    is left gathered beside its merged copy. The weights are those of merging the whole gathered model at once,
    to the bit, and W + (α/r) BA in float64 within bf16's rounding, ties and checkpointed blocks included."""
    from torch.distributed.tensor import DTensor
    d = common.one_process("cpu", torch.bfloat16)
    model = common.build_model(replace(CFG, tie_embeddings=True), d, seed=0, adapters=(4, 8.0), checkpointed=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B" in n:
                p.to_local().normal_(0, 0.5)  # not zero: the merge changes the weights
    with common.gathered(model) as view:
        assert all(isinstance(p, DTensor) for p in model.layers.parameters())  # every block sharded again
        got = {k: v.clone() for k, v in view.state_dict().items()}
    with common.unsharded(model):  # the whole model gathered, then merged at once
        want = {k: v.clone() for k, v in common.plain_view(model).state_dict().items()}  # before the reshard
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(got["lm_head.weight"], got["embed_tokens.weight"])  # tied
    full = {lora.clean(n): p.full_tensor().double() for n, p in model.named_parameters()}
    m = model.layers[1].mlp.down_proj
    by_hand = full["layers.1.mlp.down_proj.weight"] + m.scale * full["layers.1.mlp.down_proj.lora_B"] @ \
        full["layers.1.mlp.down_proj.lora_A"]
    torch.testing.assert_close(got["layers.1.mlp.down_proj.weight"].double(), by_hand, rtol=1e-2, atol=1e-2)


def test_the_export_merges_and_peft_loads_the_adapter(tmp_path):
    """The merged export gives the LoRA model's logits; PEFT, given the base checkpoint and the adapter
    directory, gives them too."""
    from tokenizer import Tokenizer
    base, model = lora_model()
    base.save_pretrained(tmp_path / "base")
    Tokenizer.train(["What is 2 + 3? The answer is 5."] * 4, 300).save(tmp_path / "base")
    common.export_hf(model, str(tmp_path / "out"), str(tmp_path / "base"), CPU, adapter_of=str(tmp_path / "base"))
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(Transformer.from_pretrained(tmp_path / "out")(x), want, rtol=1e-5, atol=1e-5)
    peft = pytest.importorskip("peft", reason="peft is not installed (requirements-dev.txt has it)")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(hf, tmp_path / "out" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(tuned(x).logits, want, rtol=1e-5, atol=1e-5)


def test_the_plan_of_lora_grpo_on_one_gpu():
    """DeepSeek-Math-7B at rank 16: per layer r·(in + out) for q, k, v, o (4 × 16 · 8192), gate and up (2 × 16 ·
    15104) and down (16 · 15104), counted by hand as PEFT counts them; AdamW for those alone, the frozen base in
    bf16 and no reference copy bring GRPO under 48 GiB on one GPU, where full training outgrows even an H200."""
    import memory
    from model import PRESETS
    config = ModelConfig(**PRESETS["deepseek-math-7b"])
    tuned = memory.grpo_plan(config, 1, 4, 32, 256, 1024, 30, lora_rank=16)
    full = memory.grpo_plan(config, 1, 4, 32, 256, 1024, 30)
    assert tuned["trained"] == 30 * (4 * 16 * 8192 + 3 * 16 * 15104) == 37_478_400
    assert "reference_bf16" not in tuned["held"] and tuned["held"]["adamw_fp32"] == 8 * 37_478_400
    # the frozen base in bf16 (common.build_model), 2 bytes a parameter; the adapters' fp32 master weights
    assert tuned["held"]["policy_frozen_bf16"] == 2 * 6_910_365_696  # the base model, every parameter of it
    assert tuned["held"]["policy_fp32"] == 4 * 37_478_400
    assert tuned["peak"] < 48 * 2 ** 30 and full["peak"] > 141 * 2 ** 30


def run(args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def sft_args(base, data_dir, out, *extra):
    return ["sft.py", "--init", str(base), "--data", str(data_dir / "train.jsonl"), "--eval-data", "none",
            "--batch", "8", "--micro-batch", "2", "--lr", "0.01", "--lora-rank", "4", "--out", str(out), *extra]


def losses(out):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


def test_lora_sft_on_1_and_2_ranks_agrees_and_resumes_exactly(base, data_dir, tmp_path):
    """sft.py --lora-rank: 1 process and 2 FSDP2 gloo ranks log the same losses; a run stopped after step 2 and
    resumed logs steps 3-4 as the straight run did, from a checkpoint that holds the adapters only."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for argv in (sft_args(base, data_dir, tmp_path / "one", "--max-steps", "4", "--export-adapter"),
                 [*torchrun, *sft_args(base, data_dir, tmp_path / "two", "--max-steps", "4")],
                 sft_args(base, data_dir, tmp_path / "cut", "--max-steps", "2", "--ckpt-every", "2"),
                 sft_args(base, data_dir, tmp_path / "cut", "--max-steps", "4", "--resume")):
        r = run(argv)
        assert r.returncode == 0, r.stderr[-3000:]
    r = run(sft_args(base, data_dir, tmp_path / "cut", "--max-steps", "4", "--resume", "--formats", "cot,tool"))
    assert r.returncode == 1 and "formats was 'cot', now 'cot,tool'" in r.stderr, r.stderr[-3000:]
    assert (tmp_path / "one" / "adapter" / "adapter_model.safetensors").is_file()  # --export-adapter: PEFT's too
    one, two, cut = (losses(tmp_path / name) for name in ("one", "two", "cut"))
    assert len(one) == 4 and one[-1][1] < one[0][1]  # it learns
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-4)
    assert [s for s, _, _ in cut] == [1, 2, 3, 4]
    for a, b in zip(one, cut):
        assert b == pytest.approx(a, rel=1e-5)
    from torch.distributed.checkpoint import FileSystemReader
    ckpt = tmp_path / "cut" / "checkpoints" / "step_000002"
    saved = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("model.")]
    assert weights and all(".lora_" in k for k in weights), weights[:4]
    base_logits = Transformer.from_pretrained(base)(torch.tensor([[1, 2, 3]]))
    assert not torch.allclose(Transformer.from_pretrained(tmp_path / "one")(torch.tensor([[1, 2, 3]])), base_logits)


def test_lora_sfts_auto_checkpointing_plans_lora(base, data_dir, tmp_path, monkeypatch):
    """sft.py --activation-checkpointing auto asks the plan of what LoRA holds (a bf16 base; fp32 weights,
    gradients and AdamW moments for the adapters alone), at least 10 of full training's 16 bytes a parameter less:
    planned as full training, a LoRA run on one GPU checkpoints every block it need not."""
    import sft
    from model import config_from_hf
    seen = {}

    def plan_only(mode, d, n_layers, peak_of):
        seen[rank] = peak_of(0)
        raise StopIteration
    monkeypatch.setattr(common, "checkpointed_blocks", plan_only)
    for rank in ("0", "4"):
        with pytest.raises(StopIteration):
            sft.main(sft.parse_args(sft_args(base, data_dir, tmp_path, "--lora-rank", rank)[1:]))
    assert seen["4"] < seen["0"] - 10 * Transformer(config_from_hf(base)).num_params()
