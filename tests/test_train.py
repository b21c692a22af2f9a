"""pretrain.py and sft.py: schedules, 1 process vs 2 FSDP2 ranks, exact resume, failures that name their cause."""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import data
import engine
import memory
import pretrain
import problem_sets
import sft
import toyworld
from model import PRESETS, ModelConfig, Transformer
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
TINY = ["--seq-len", "32", "--micro-batch", "4", "--batch-tokens", "256", "--eval-every", "0", "--warmup", "2"]


def run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def losses(out, key="loss"):
    return [json.loads(line)[key] for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]


def test_lr_schedules():
    a = common.Optim(lr=1.0, max_steps=100, warmup=10, schedule="multistep")
    assert common.lr_factor(0, a) == pytest.approx(0.1) and common.lr_factor(9, a) == 1.0
    assert [common.lr_factor(s, a) for s in (79, 80, 89, 90, 99)] == [1.0, 0.316, 0.316, 0.1, 0.1]  # paper §2.3
    a.schedule = "cosine"
    assert common.lr_factor(10, a) == pytest.approx(1.0) and common.lr_factor(100, a) == pytest.approx(0.1)
    assert common.lr_factor(55, a) == pytest.approx(0.55) and common.lr_factor(150, a) == pytest.approx(0.1)
    a.schedule = "constant"
    assert common.lr_factor(50, a) == 1.0


def test_batch_sizes_not_given_follow_the_model_size(capsys):
    d = common.Dist(0, 1, torch.device("cpu"))
    for preset, want, said in (("toy", (32, 128), False), ("1b", (4, 32), True)):
        args = argparse.Namespace(micro_batch=None, gen_batch=None)
        common.size_defaults(args, ModelConfig(**PRESETS[preset]), d, micro_batch=(32, 4), gen_batch=(128, 32))
        assert (args.micro_batch, args.gen_batch) == want
        assert ("--gen-batch not given: 32 for a 1.2B-parameter model" in capsys.readouterr().out) == said
    args = argparse.Namespace(micro_batch=8, gen_batch=None)  # what the user gave stays
    common.size_defaults(args, ModelConfig(**PRESETS["1b"]), d, micro_batch=(32, 4), gen_batch=(128, 32))
    assert (args.micro_batch, args.gen_batch) == (8, 32)


def test_metrics_mirror_to_wandb_only_when_asked(tmp_path, monkeypatch):
    import types
    d = common.Dist(0, 1, torch.device("cpu"))
    log = common.Log(tmp_path, d, 2, 0, args=argparse.Namespace(wandb=None))
    log(dict(step=1, loss=1.0))
    log.close()
    assert "wandb" not in sys.modules  # off: not even imported
    seen = []
    run = types.SimpleNamespace(log=lambda row, step: seen.append((step, row)), finish=lambda: seen.append("finish"))
    fake = types.SimpleNamespace(init=lambda **kw: seen.append(kw["project"]) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = common.Log(tmp_path, d, 2, 0, args=argparse.Namespace(wandb="proj"))
    log(dict(step=2, loss=0.5))
    log.close()
    assert seen == ["proj", (2, {"step": 2, "loss": 0.5}), "finish"]
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]



def test_a_plain_log_line_says_how_long_the_rest_takes(tmp_path, monkeypatch, capsys):
    """Off a terminal (no bar) a line every `every` steps, with the time since the start and the steps left at the
    rate of this run's own steps (a resumed run's earlier ones not counted)."""
    now = [1000.0]
    monkeypatch.setattr(common.time, "time", lambda: now[0])
    log = common.Log(tmp_path, common.Dist(0, 1, torch.device("cpu")), 100, 40, every=10)  # resumed at step 40
    now[0] += 90  # 10 steps in 90 s: the 50 left take 7m30s
    log(dict(step=50, loss=1.0))
    log.close()
    assert capsys.readouterr().out.strip() == "step 50  loss 1  (1m30s, ETA 7m30s)"
    assert common.eta(now[0] - 7290, 0, 5) == "2h01m, ETA ?"  # nothing done yet: no rate

def test_two_fsdp_ranks_match_one_process(data_dir, tmp_path):
    """256 tokens a step in micro-batches of 2 x 32: 4 on one process, 2 on each of 2 ranks, which then must take
    the rows of the step's batch that one process does, none twice."""
    argv = ["pretrain.py", "--data", str(data_dir), "--max-steps", "3", *TINY, "--micro-batch", "2"]
    one = run([*argv, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv,
               "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 rank(s)" in two.stdout and "2 micro-batches of 2x32 per rank" in two.stdout
    assert "4 micro-batches of 2x32 per rank" in one.stdout
    for key in ("loss", "grad_norm"):  # the gradient's scale too, which Adam's update would hide
        two_ranks, one = (torch.tensor(losses(tmp_path / name, key)) for name in ("two", "one"))
        torch.testing.assert_close(two_ranks, one, rtol=1e-5, atol=1e-5, msg=key)
    # the exported models agree too, to float rounding: a rarely seen token's embedding row gets gradients near
    # AdamW's eps, where m / sqrt(v) magnifies the different summation order of a 2-rank reduction (seen: 5e-5)
    a, b = Transformer.from_pretrained(tmp_path / "one"), Transformer.from_pretrained(tmp_path / "two")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=2e-4, msg=k)


def test_stop_by_signal_then_resume_equals_an_uninterrupted_run(data_dir, tmp_path):
    argv = ["pretrain.py", "--data", str(data_dir), "--max-steps", "30", "--ckpt-every", "100", *TINY]
    ref = run([*argv, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, *argv, "--out", str(out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.joinpath("metrics.jsonl").exists() and len(losses(out)) >= 2):
        time.sleep(0.005)
    # frozen first, so that the run cannot finish between the check and the signal; the handler runs on SIGCONT
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    cut = len(losses(out))
    assert cut < 30 and common.latest_checkpoint(str(out)).endswith(f"step_{cut:06d}")
    again = run([*argv, "--out", str(out), "--resume"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(tmp_path / "ref")), rtol=0, atol=1e-6)


def test_resume_drops_the_metrics_a_killed_run_wrote_after_its_last_checkpoint(tmp_path):
    rows = [{"step": 0, "eval_loss": 2.0}] + [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"step": 6, "lo')  # the kill cut this line short
    common.trim_metrics(str(tmp_path), 3)
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == rows[:4]


def test_resume_refuses_other_settings(data_dir, tmp_path):
    r = run(["pretrain.py", "--data", str(data_dir), "--max-steps", "1", *TINY, "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(["pretrain.py", "--data", str(data_dir), "--max-steps", "2", *TINY, "--out", str(tmp_path), "--resume",
             "--seed", "5", "--seq-len", "64"])
    assert r.returncode != 0 and "seq_len was 32, now 64, seed was 0, now 5" in r.stderr



def test_a_resume_is_refused_for_each_setting_that_changed_and_only_those(tmp_path):
    """check_resumable compares every key it is given with args.json: each one changed alone is refused by name,
    a setting not in the list may change, and one args.json does not record (a flag newer than the run) passes."""
    saved = dict(preset="toy", data="d", seq_len=32, seed=0, lr=1e-3)
    (tmp_path / "args.json").write_text(json.dumps(saved))
    keys = ("preset", "data", "seq_len", "seed", "mixture")
    for k in keys[:4]:
        with pytest.raises(SystemExit, match=f"{k} was {saved[k]!r}, now 'other'"):
            common.check_resumable(str(tmp_path), argparse.Namespace(**dict(saved, mixture=None, **{k: "other"})),
                                   keys)
    common.check_resumable(str(tmp_path), argparse.Namespace(**dict(saved, lr=5.0, mixture="m=1")), keys)


def test_a_sequence_longer_than_the_presets_context_widens_the_model_and_the_last_step_is_evaluated(data_dir,
                                                                                                    tmp_path):
    """--seq-len past the preset's max_seq_len (the toy's 512) makes a model with that many positions; the held-out
    loss is measured at the last step too (every 5 steps, of 2), near the training loss (ln 2048 = 7.6 at init)."""
    r = run(["pretrain.py", "--data", str(data_dir), "--max-steps", "2", "--seq-len", "640", "--micro-batch", "1",
             "--batch-tokens", "640", "--eval-every", "5", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(tmp_path / "config.json"))["max_position_embeddings"] == 640
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    [evaluated] = [row for row in rows if "eval_loss" in row]
    assert evaluated["step"] == 2 and abs(evaluated["eval_loss"] - rows[1]["loss"]) < 0.2 * rows[1]["loss"]


def test_the_mixture_flag_weighs_the_sources(data_dir):
    args = pretrain.parse_args(["--data", str(data_dir), "--mixture", "math=3,code=1,general=0"])
    mixture = pretrain.mixture(args, "val")
    assert mixture.names == ["math", "code", "general"] and mixture.weights.tolist() == [0.75, 0.25, 0.0]

def test_bad_batch_and_missing_data_are_clear_errors(data_dir, tmp_path):
    r = run(["pretrain.py", "--data", str(data_dir), "--batch-tokens", "300", "--seq-len", "32", "--micro-batch", "4",
             "--out", str(tmp_path)])
    assert r.returncode != 0 and "--batch-tokens 300 is not a multiple" in r.stderr
    r = run(["pretrain.py", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path)])
    assert r.returncode != 0 and "python data.py --out" in r.stderr
    for script in ("sft.py", "grpo.py"):  # a model that is not there is not built: only the toy's default is
        r = run([script, "--init", str(tmp_path / "nope"), "--out", str(tmp_path / script)])
        assert r.returncode != 0 and "nope: no config.json; --init takes a Hugging Face model" in r.stderr


def saved_storage_bytes(module, run):
    """Bytes autograd saves while run() executes, counted by storage as memory holds them (a view keeps all of its
    base), the module's weights not counted."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen, measured = set(), [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and ptr not in seen:
            seen.add(ptr)
            measured[0] += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return measured[0]


def test_memory_plan_counts_what_a_real_forward_saves():
    """The plan counts, on the meta device, what autograd saves from one block (flash attention's own tensors
    added by hand); a real CPU forward of a small model, counted by storage, must agree within 15%."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=256, n_layers=3, n_heads=4, ffn_dim=704, max_seq_len=512)
    model = Transformer(cfg)
    model.init_weights()
    measured = saved_storage_bytes(model, lambda: model.hidden(torch.randint(0, 512, (4, 200))))
    plan = memory.activation_bytes(cfg, 4, 200, 0, dtype=torch.float32)
    assert 0.85 < plan / measured < 1.15, (plan, measured)
    # a sequence as long as the model is wide is no special case (a shape rule once dropped the hidden states)
    seven = ModelConfig(**PRESETS["deepseek-math-7b"])
    per_token = [memory.activation_bytes(seven, 1, T, 0) / T for T in (4095, 4096, 4097)]
    assert max(per_token) / min(per_token) < 1.01


class FlashLike(torch.autograd.Function):
    """Causal attention that keeps for backward what flash attention keeps: the q, k and v it is given (views,
    holding their storage), its output and each row's log-sum-exp in fp32."""

    @staticmethod
    def forward(ctx, q, k, v):
        k2, v2 = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
        s = (q @ k2.transpose(-1, -2)).float() / q.shape[-1] ** 0.5
        s = s.masked_fill(torch.ones(s.shape[-1], s.shape[-1], dtype=torch.bool).triu(1), float("-inf"))
        out = torch.softmax(s, -1).to(q.dtype) @ v2
        ctx.save_for_backward(q, k, v, out, torch.logsumexp(s, -1))
        return out

    @staticmethod
    def backward(ctx, g):
        return None, None, None


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_the_plan_counts_a_block_with_flash_attention_by_its_storage(n_kv_heads, monkeypatch):
    """One bf16 block on the CPU with attention that saves what flash saves, counted by storage as a GPU holds it:
    v is a view of the fused q/k/v projection's output, so saving it keeps that whole output (the plan once counted
    v alone, 9% short of a block at this size). The plan may miss RoPE's sin beside its cos (it passes one tensor for
    both): within 2%."""
    cfg = ModelConfig(vocab_size=512, dim=256, n_layers=1, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=704,
                      max_seq_len=512)
    model = Transformer(cfg).to(torch.bfloat16)
    block, B, T = model.layers[0], 4, 200
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: FlashLike.apply(q, k, v))
    x = torch.randn(B, T, cfg.dim, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = (t[:T][None, :, None].to(torch.bfloat16) for t in (model.rope_cos, model.rope_sin))
    measured = saved_storage_bytes(block, lambda: block(x, cos, sin))
    monkeypatch.undo()
    assert 0.98 < memory.activation_bytes(cfg, B, T, 0) / measured <= 1.0


def test_micro_batches_of_unequal_tokens_give_the_whole_batchs_gradient():
    """train_step over micro-batches with 3 and 11 valid positions returns the norm of the gradient of the mean
    loss over all 14, as float64 autograd on the whole batch at once computes it (each micro-batch divided by
    its own count would weigh the 3 positions' tokens 11/3 times more)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=16)
    model = Transformer(cfg)
    model.init_weights()
    twin = Transformer(cfg).double()
    twin.load_state_dict(model.state_dict())
    x, y = torch.randint(0, 64, (4, 8)), torch.randint(0, 64, (4, 8))
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[0, :3] = True
    mask[2:, 2:] = True  # 12 positions, less the one below
    mask[3, 7] = False
    assert (mask[:2].sum(), mask[2:].sum()) == (3, 11)
    d = common.Dist(0, 1, torch.device("cpu"))
    optim = common.Optim(lr=0.0, max_steps=10, grad_clip=1e9)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, norm, n = common.train_step(model, opt, [(x[:2], y[:2], mask[:2]), (x[2:], y[2:], mask[2:])], d, optim, 0)
    logp = torch.log_softmax(twin(x), -1).gather(-1, y[..., None])[..., 0]
    whole = -(logp * mask).sum() / mask.sum()
    whole.backward()
    expected = torch.sqrt(sum((p.grad ** 2).sum() for p in twin.parameters()))
    assert n == 14 and loss == pytest.approx(whole.item(), rel=1e-5)
    assert float(norm) == pytest.approx(float(expected), rel=1e-4)


def test_nan_loss_stops_before_the_optimizer_step():
    d = common.Dist(0, 1, torch.device("cpu"))
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16))
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    before = model.embed_tokens.weight.clone()
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, 50, (2, 8))
    optim = common.Optim(lr=1e-3, max_steps=10, warmup=1)
    with pytest.raises(FloatingPointError, match="step 7: loss is nan"):
        common.train_step(model, opt, [(x, x, torch.ones_like(x, dtype=torch.bool))], d, optim, 7)
    assert torch.equal(model.embed_tokens.weight, before)


def test_an_infinite_loss_stops_too_and_gradients_are_clipped_before_the_step():
    """An infinite loss stops like a NaN. With plain SGD at lr 1 the update is the gradient itself, so a step whose
    gradient norm is past --grad-clip moves the weights by exactly grad_clip (AdamW would hide the clip: it is
    invariant to the gradient's scale); AdamW's betas are the paper's (0.9, 0.95)."""
    d = common.Dist(0, 1, torch.device("cpu"))
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16))
    model.init_weights()
    x, optim = torch.randint(0, 50, (2, 8)), common.Optim(lr=1.0, max_steps=10, warmup=0, grad_clip=0.01)
    batch = [(x, x, torch.ones_like(x, dtype=torch.bool))]
    infinite = lambda m, x, y: m(x)[..., 0] * 0 + float("inf")  # noqa: E731
    with pytest.raises(FloatingPointError, match="step 3: loss is inf"):
        common.train_step(model, torch.optim.SGD(model.parameters()), batch, d, optim, 3, loss_of=infinite)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    _, norm, _ = common.train_step(model, torch.optim.SGD(model.parameters()), batch, d, optim, 0)
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert norm > 10 * optim.grad_clip and moved.norm().item() == pytest.approx(optim.grad_clip, rel=1e-4)
    assert {g["betas"] for g in common.make_optimizer(model, optim).param_groups} == {(0.9, 0.95)}


def test_checkpoints_keep_the_last_two_skip_a_partial_one_and_restore_the_rng(tmp_path):
    """Three saves leave steps 2 and 3; a step 9 cut short while saving (its .tmp directory) is not resumed from;
    loading step 3 restores the weights, the optimizer's moments and the RNG as they were saved."""
    d = common.Dist(0, 1, torch.device("cpu"))
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16))
    model.init_weights()
    optim = common.Optim(lr=1e-2, max_steps=10, warmup=1)
    opt = common.make_optimizer(model, optim)
    x = torch.randint(0, 50, (2, 8))
    for step in (1, 2, 3):
        common.train_step(model, opt, [(x, x, torch.ones_like(x, dtype=torch.bool))], d, optim, step)
        common.save_checkpoint(str(tmp_path), model, opt, step, d)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000002", "step_000003"]
    (tmp_path / "checkpoints" / "step_000009.tmp").mkdir()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    moments = opt.state[model.lm_head.weight]["exp_avg_sq"].clone()
    drawn = torch.rand(4)  # what the run would have drawn next
    common.train_step(model, opt, [(x, x, torch.ones_like(x, dtype=torch.bool))], d, optim, 4)
    torch.rand(10)
    ckpt = common.latest_checkpoint(str(tmp_path))
    assert ckpt.endswith("step_000003") and common.load_checkpoint(ckpt, model, opt) == 3
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert torch.equal(opt.state[model.lm_head.weight]["exp_avg_sq"], moments) and torch.equal(torch.rand(4), drawn)


def test_a_run_claims_its_directory(tmp_path, monkeypatch):
    """A live process's pid in out/RUNNING refuses a second run, whoever's it is; a dead one's does not. A fresh run
    clears the old run's checkpoints and metrics (so --resume cannot pick up a stale step); a resumed one keeps
    them."""
    d = common.Dist(0, 1, torch.device("cpu"))
    (tmp_path / "checkpoints" / "step_000005").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 5}\n')
    for alive in (os.getppid(), 1):  # pytest's parent; init
        (tmp_path / "RUNNING").write_text(str(alive))
        with pytest.raises(SystemExit, match=f"another run \\(pid {alive}\\) is writing here"):
            common.claim(str(tmp_path), d, resume=True)

    def another_users(pid, sig):  # what the kernel answers a user who signals another user's process
        raise PermissionError(1, "Operation not permitted")
    with monkeypatch.context() as m:
        m.setattr(common.os, "kill", another_users)
        with pytest.raises(SystemExit, match="another run \\(pid 1\\) is writing here"):
            common.claim(str(tmp_path), d, resume=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "RUNNING").write_text(str(dead.pid))
    common.claim(str(tmp_path), d, resume=True)
    assert (tmp_path / "RUNNING").read_text() == str(os.getpid()) and (tmp_path / "checkpoints").is_dir()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 5}\n'
    common.claim(str(tmp_path), d, resume=False)  # our own pid: no refusal
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "metrics.jsonl").read_text() == ""
    (tmp_path / "a_file").write_text("")  # an --out that cannot be made: one line, not os.makedirs' traceback
    with pytest.raises(SystemExit, match="a_file: cannot make this directory \\(File exists\\); give another --out"):
        common.claim(str(tmp_path / "a_file"), d)


def test_compiled_blocks_run_every_length_on_one_graph_as_eager():
    """--compile (common.build_model): GRPO's, SFT's and PPO's rows change length every step or micro-batch, so each
    block's graph holds the length symbolic from the first call: a second length runs the first graph (one
    specialised to the first length would serve that call alone, then compile again), with eager's outputs and
    gradients. Rotating q and k in their transposed layout made torch fix the attention output's strides at the
    compiled length, and the backward failed at the next (GRPO --compile's third step)."""
    from torch._dynamo.utils import counters
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    d = common.one_process("cpu")
    eager, compiled = (common.build_model(cfg, d, seed=0, compile=c) for c in (False, True))
    graphs = counters["stats"]["unique_graphs"]
    for T in (9, 7):
        tokens = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(T))
        results = []
        for model in (eager, compiled):
            logits = model(tokens)
            results.append((logits, *torch.autograd.grad((logits * logits).sum(), list(model.parameters()))))
        for want, got in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] - graphs == 1


def test_one_process_trains_in_bf16_as_in_fp32(group_of_one):
    """One GPU at --dtype bfloat16 (the default) computes as 8 GPUs do, through FSDP2's mixed precision in a
    group of one: fp32 master weights, bf16 parameters in the forward and so a bf16 residual stream (autocast
    alone would keep both fp32), bf16 weights for the rollouts. A training step there (here on the CPU) runs
    through the fused LM head and gives the fp32 step's loss and gradient norm within bf16's rounding."""
    cfg = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
    x = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    batch, optim = [(x[:, :-1], x[:, 1:], torch.ones(2, 16, dtype=torch.bool))], common.Optim(1e-3, 1)
    got, seen = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        d = common.one_process("cpu", dtype)
        model = common.build_model(cfg, d, seed=0)

        def weight(mlp, args, out, dtype=dtype):  # inside the block's forward: the weight it computes with
            seen.setdefault(dtype, [mlp.gate_up_proj.weight.dtype])

        def residual(block, args, out, dtype=dtype):  # the residual stream into and out of the block
            seen[dtype][1:] = [args[0].dtype, out.dtype]
        model.layers[1].mlp.register_forward_hook(weight)
        model.layers[1].register_forward_hook(residual)
        got[dtype] = common.train_step(model, common.make_optimizer(model, optim), batch, d, optim, 0)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        with common.gathered(model) as sampler:
            assert all(p.dtype == dtype for p in sampler.parameters())
    assert seen == {torch.float32: [torch.float32] * 3, torch.bfloat16: [torch.bfloat16] * 3}
    (loss, norm, n), (loss16, norm16, n16) = got[torch.float32], got[torch.bfloat16]
    assert n == n16 == 32 and loss16 == pytest.approx(loss, rel=1e-2) and norm16 == pytest.approx(norm, rel=2e-2)


def test_the_bf16_tests_products_are_the_cpus_own_to_the_rounding():
    """in_bf16.Fp32Products, the bf16 tests' matrix products (in fp32, rounded once: faster), gives the CPU's bf16
    GEMM's values within bf16's rounding, in bf16: a linear layer forward and backward, a batched product, an
    in-place accumulation (the fused head's grad_W); the products it passes on are fp32 ones."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from in_bf16 import Fp32Products

    aten = torch.ops.aten

    class Products(TorchDispatchMode):  # below Fp32Products: the dtypes of the products it passes on
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (aten.mm.default, aten.addmm.default, aten.addmm.out, aten.bmm.default):
                seen.update(a.dtype for a in args if isinstance(a, torch.Tensor))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    x, w, c = (torch.randn(*s, generator=g).bfloat16() for s in ((3, 40, 512), (256, 512), (256, 512)))
    c *= 100  # as large as what is added to it

    def products():
        xx, ww, cc = x.clone().requires_grad_(), w.clone().requires_grad_(), c.clone()
        y = torch.nn.functional.linear(xx, ww)
        (y.float() * torch.linspace(-1, 1, 256)).sum().backward()
        torch.addmm(cc, y[0].detach().T, xx[0].detach(), out=cc)
        return y, xx.grad, ww.grad, y @ y.transpose(1, 2), cc
    seen, theirs = set(), products()
    with Products(), Fp32Products():
        ours = products()
    assert seen == {torch.float32}
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-4 * b.float().abs().max().item())


def test_frozen_parameters_are_kept_in_the_compute_dtype(group_of_one, tmp_path):
    """In bf16, what nothing trains is stored in bf16, not as fp32 master weights: a frozen model (π_ref) computes
    the trainable one's log-probs to the bit (FSDP2 cast the fp32 copy to the same bf16 for every forward), a tied
    head stays tied, and a checkpoint written when π_ref was stored in fp32 still loads into it; LoRA's base
    weights are bf16 beside fp32 adapters, trains as in fp32 within rounding, and holds what the memory plan
    counts for it."""
    cfg = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64,
                      tie_embeddings=True)
    x = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    batch, optim = [(x[:, :-1], x[:, 1:], torch.ones(2, 16, dtype=torch.bool))], common.Optim(1e-3, 1)
    d = common.one_process("cpu", torch.bfloat16)
    ref, trained = common.build_model(cfg, d, seed=0, frozen=True), common.build_model(cfg, d, seed=0)
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16} and ref.lm_head.weight is ref.embed_tokens.weight
    assert {p.dtype for p in trained.parameters()} == {torch.float32}
    with torch.no_grad(), common.unsharded(ref) as a, common.unsharded(trained) as b:
        assert torch.equal(a(x[:, :-1], x[:, 1:]), b(x[:, :-1], x[:, 1:]))

    old_run = common.build_model(cfg, d, seed=1)  # another π_ref, stored in fp32 as before
    opt = common.make_optimizer(trained, optim)
    common.save_checkpoint(str(tmp_path), trained, opt, 1, d, extra={"ref": old_run})
    common.load_checkpoint(common.latest_checkpoint(str(tmp_path)), trained, opt, extra={"ref": ref})
    for mine, theirs in zip(ref.state_dict().values(), old_run.state_dict().values()):
        assert torch.equal(mine.full_tensor(), theirs.full_tensor().to(torch.bfloat16))

    steps = {}
    for dtype in (torch.float32, torch.bfloat16):
        d = common.one_process("cpu", dtype)
        tuned = common.build_model(cfg, d, seed=0, adapters=(4, 8.0))
        assert {(".lora_" in n, p.dtype) for n, p in tuned.named_parameters()} == {(False, dtype),
                                                                                   (True, torch.float32)}
        steps[dtype] = common.train_step(tuned, common.make_optimizer(tuned, optim), batch, d, optim, 0)
    plan = memory.train_plan(cfg, 1, 2, 16, 0, lora_rank=4)
    assert sum(p.numel() * p.element_size() for p in tuned.parameters()) == plan["params_fp32"] + plan["frozen_bf16"]
    (loss, norm, _), (loss16, norm16, _) = steps[torch.float32], steps[torch.bfloat16]
    assert loss16 == pytest.approx(loss, rel=1e-2) and norm16 == pytest.approx(norm, rel=2e-2)


FROZEN_ON_TWO_RANKS = """
import sys, torch, torch.distributed as dist, common, grpo
from model import ModelConfig
dist.init_process_group("gloo")
d = common.Dist(dist.get_rank(), 2, torch.device("cpu"), torch.bfloat16)  # as two GPUs run, on the CPU
cfg = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
x = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
batch, optim = [(x[:, :-1], x[:, 1:], torch.ones(2, 16, dtype=torch.bool))], common.Optim(1e-2, 1)

def same_logprobs(a, b):
    with torch.no_grad(), common.unsharded(a) as a, common.unsharded(b) as b:
        return torch.equal(a(x[:, :-1], x[:, 1:]), b(x[:, :-1], x[:, 1:]))
ref, policy = common.build_model(cfg, d, seed=0, frozen=True), common.build_model(cfg, d, seed=0)
assert {p.dtype for p in ref.parameters()} == {torch.bfloat16} and same_logprobs(ref, policy)
opt = common.make_optimizer(policy, optim)
common.train_step(policy, opt, batch, d, optim, 0)
assert not same_logprobs(ref, policy)
before = [r.full_tensor().double() for r in ref.parameters()]
grpo.reset_reference(ref, policy, 0.25)  # grpo.py's --ref-reset --ref-mixup 0.25, each rank its shards
for r, p, b in zip(ref.parameters(), policy.parameters(), before):
    assert r.dtype == torch.bfloat16
    torch.testing.assert_close(r.full_tensor().double(), 0.25 * p.full_tensor().double() + 0.75 * b,
                               rtol=2 ** -8, atol=1e-6)
grpo.reset_reference(ref, policy, 1.0)  # grpo.py's --ref-reset
assert same_logprobs(ref, policy)
common.save_checkpoint(sys.argv[1], policy, opt, 1, d, extra={"ref": ref})
fresh = common.build_model(cfg, d, seed=1, frozen=True)
common.load_checkpoint(common.latest_checkpoint(sys.argv[1]), policy, opt, extra={"ref": fresh})
assert same_logprobs(fresh, policy)
tuned = common.build_model(cfg, d, seed=0, adapters=(4, 8.0))  # one all-gather of bf16 base and fp32 adapters
loss, norm, _ = common.train_step(tuned, common.make_optimizer(tuned, optim), batch, d, optim, 0)
assert {(".lora_" in n, p.dtype) for n, p in tuned.named_parameters()} == {(False, torch.bfloat16),
                                                                           (True, torch.float32)}
assert 5 < loss < 6 and norm > 0  # about ln 300 at the start
print(f"ok {d.rank}", flush=True)  # one write of the pipe both ranks share (print("ok", rank) gave "okok 0 1")
dist.destroy_process_group()
"""


def test_frozen_models_in_bf16_on_two_ranks(tmp_path):
    """On several GPUs a frozen model's bf16 shards are loaded from rank 0's fp32 weights (broadcast), compute
    the trainable copy's log-probs to the bit, follow it through grpo.py's --ref-reset, and come back from a
    checkpoint; LoRA trains its fp32 adapters over a bf16 base (here on two gloo ranks of the CPU, in bf16)."""
    (tmp_path / "probe.py").write_text(FROZEN_ON_TWO_RANKS)
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(tmp_path / "probe.py"),
             str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ok 0") == r.stdout.count("ok 1") == 1, r.stdout


def test_a_bf16_process_that_ends_in_an_error_leaves_no_group_to_the_teardown():
    """One bf16 process that exits with a one-line error (not through common.finish) still destroys its group of
    one before the interpreter's teardown, where NCCL would print a warning after the error line."""
    probe = ("import atexit, torch, torch.distributed as dist, common\n"
             "atexit.register(lambda: print('a group at teardown:', dist.is_initialized()))\n"  # runs last
             "common.one_process('cpu', torch.bfloat16)\n"
             "with common.one_line_errors():\n"
             "    raise common.jsonl.DataError('bad.jsonl, line 3: not JSON')\n")
    r = run(["-c", probe])
    assert r.returncode == 1 and r.stderr.strip() == "error: bad.jsonl, line 3: not JSON"
    assert r.stdout.strip() == "a group at teardown: False"


def test_dry_run_memory_plan_for_7b_on_8_gpus():
    config = ModelConfig(**PRESETS["deepseek-math-7b"])
    off = memory.train_plan(config, 8, 1, 4096, 0)
    on = memory.train_plan(config, 8, 1, 4096, 30)
    assert off["parameters"] == 6_910_365_696
    assert off["adamw_fp32"] == pytest.approx(8 * 6_910_365_696 / 8)
    # a block is 4 x 4096^2 attention + 3 x 4096 x 11008 SwiGLU + 2 x 4096 norms = 202,383,360 parameters; FSDP2
    # holds two gathered in bf16 (the one computing and the next, prefetched)
    assert off["gathered_bf16"] == 2 * 2 * 202_383_360
    # checkpointing keeps one (1, 4096, 4096) bf16 input per block, 32 MiB, plus one block's activations
    assert on["activations"] == 30 * 4096 * 4096 * 2 + off["activations"] / 30
    assert on["activations"] < off["activations"] / 5
    # the first 10 of 30 blocks checkpointed: 20 keep everything, 10 their input; those 10 are recomputed in
    # backward after the 20 have freed theirs, so the peak is the forward's end
    some = memory.train_plan(config, 8, 1, 4096, 10)["activations"]
    assert some == 20 * off["activations"] / 30 + 10 * 4096 * 4096 * 2
    r = run(["pretrain.py", "--dry-run", "--preset", "deepseek-math-7b", "--world-size", "8"])
    assert r.returncode == 0 and "6.91B parameters" in r.stdout and "GiB per GPU" in r.stdout


@pytest.mark.parametrize("tied", [False, True])
def test_the_mfu_count_is_what_a_training_step_multiplies(tied):
    """flops_per_token x tokens = the FLOPs FlopCounterMode counts in model.loss's forward and backward, attention
    computed by the math backend (every T x T product, as PaLM's 12·L·d·T counts them), plus 6 a token for each
    norm weight (in N, though no matrix multiplies it: 0.3% here). The input embedding is a lookup and counts
    only where it is the head too (tied)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64,
                      tie_embeddings=tied)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    x, y = torch.randint(0, 512, (2, 2, 64))
    with FlopCounterMode(display=False) as counted, sdpa_kernel(SDPBackend.MATH):
        total, _ = model.loss(x, y, lambda lp, rows: (-lp, -torch.ones_like(lp)))
        total.backward()
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    assert pretrain.flops_per_token(cfg, 64) * x.numel() == counted.get_total_flops() + 6 * norms * x.numel()


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA H20", 148),
                                          ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A10", None), ("NVIDIA L4", 121),
                                          ("NVIDIA L40S", 362), ("NVIDIA GeForce RTX 4090", None)])
def test_mfu_divides_by_the_peak_of_the_gpu_named(monkeypatch, name, tflops):
    """The peak is the datasheet's dense bf16 figure for the name torch reports, the more specific name first (an
    H100 PCIe is not an SXM H100, an A10 is not an A100, an H20 not an H200); a GPU not listed has no MFU."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = pretrain.peak_flops(torch.device("cuda", 0))
    assert (math.isnan(peak) if tflops is None else peak == tflops * 1e12), (name, peak)
    assert math.isnan(pretrain.peak_flops(torch.device("cpu")))


def test_the_rollouts_kv_cache_is_planned_for_grouped_query_attention():
    """Qwen2.5-7B's shape (28 layers; 28 query heads of 128, 4 key-value heads) keeps 28 x 2 x 4 x 128 x 2 bytes =
    56 KiB of keys and values a token in bf16, a seventh of what 28 key-value heads would."""
    config = ModelConfig(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944,
                         max_seq_len=32768, qkv_bias=True)
    plan = memory.grpo_plan(config, 8, 4, 32, 256, 1024, 0)
    assert plan["rollout"]["kv_cache"] == 32 * (256 + 1024) * 57_344


def test_the_readme_grpo_commands_plan_entry_by_entry():
    """The README's 8-GPU GRPO command (7B, micro-batch 4, gen-batch 32, 256 + 1024 tokens), each entry by hand
    but the activations (activation_bytes, tested above); with --compile the decoder's bf16 copy and KV cache are
    held all run long and the rollout phase is the gather that refreshes the copy."""
    config, n, T = ModelConfig(**PRESETS["deepseek-math-7b"]), 6_910_365_696, 1280
    kv = 32 * T * 30 * 2 * 32 * 128 * 2  # rows x positions x layers x (K, V) x heads x head dim x bf16
    plan = memory.grpo_plan(config, 8, 4, 32, 256, 1024, 30)
    assert plan["held"] == dict(policy_fp32=4 * n / 8, grads_fp32=4 * n / 8, adamw_fp32=8 * n / 8,
                                reference_bf16=2 * n / 8)
    assert plan["rollout"] == dict(gathered_bf16=2 * n, kv_cache=kv) and plan["reference"] == dict(gathered_bf16=2 * n)
    tokens = 4 * T * 4096  # the hidden states of a micro-batch: more than fused_kernels.CHUNK_ELEMENTS (2^24)
    assert plan["train"] == dict(gathered_blocks=2 * 2 * 202_383_360,
                                 activations=memory.activation_bytes(config, 4, T, 30),
                                 logits=2 * (tokens + tokens + 102_400 * 4096), grads_unsharded_fp32=4 * n)
    assert plan["peak"] == sum(plan["held"].values()) + max(sum(plan[p].values()) for p in ("rollout", "train"))
    one_row = memory.grpo_plan(config, 8, 1, 32, 256, 1024, 30)["train"]["logits"]  # 1 x 1280 x 4096 < 2^24
    assert one_row == 2 * (2 ** 24 + T * 4096 + 102_400 * 4096)
    kept = memory.grpo_plan(config, 8, 4, 32, 256, 1024, 30, kept_decoder=True)
    assert kept["held"] == {**plan["held"], "decoder_bf16": 2 * n, "decoder_kv_cache": kv}
    assert kept["rollout"] == dict(gathered_bf16=2 * n)


def test_the_grpo_plan_holds_frozen_models_in_bf16(tmp_path):
    """π_ref and the reward models GRPO only reads are held as bf16 shards (common.build_model(frozen=True)); the
    reward model --rm-refresh trains keeps fp32 master weights, and the implicit form's reference stays frozen.
    Scoring gathers each reward model whole (the implicit form's two models at once). Its training between steps
    is a phase of its own: on one GPU, where no unsharded gradients make the policy's training larger, its
    gradients and AdamW moments make it the peak."""
    config, n = ModelConfig(**PRESETS["deepseek-math-7b"]), 6_910_365_696
    plain = memory.grpo_plan(config, 8, 4, 32, 256, 1024, 0)["held"]
    assert plain["reference_bf16"] == 2 * n / 8 and plain["policy_fp32"] == 4 * n / 8
    implicit = memory.grpo_plan(config, 8, 4, 32, 256, 1024, 0, reward_model=2)  # π_φ and its π_ref
    assert implicit["held"]["reward_models_bf16"] == 2 * 2 * n / 8 and "reward_model_fp32" not in implicit["held"]
    assert implicit["scoring"] == {"gathered_bf16": 2 * 2 * n}  # both gathered whole to score the rollouts
    assert memory.grpo_plan(config, 8, 4, 32, 256, 1024, 0, reward_model=1)["scoring"]["gathered_bf16"] == 2 * n
    assert "scoring" not in memory.grpo_plan(config, 8, 4, 32, 256, 1024, 0)
    refreshed = memory.grpo_plan(config, 8, 4, 32, 256, 1024, 0, reward_model=2, rm_trained=True)["held"]
    assert refreshed["reward_model_fp32"] == 4 * n / 8 and refreshed["reward_models_bf16"] == 2 * n / 8
    one = memory.grpo_plan(config, 1, 4, 32, 256, 1024, 30, reward_model=1, rm_trained=True)
    assert one["rm_refresh"]["grads_fp32"] == 4 * n and one["rm_refresh"]["adamw_fp32"] == 8 * n
    assert one["peak"] == sum(one["held"].values()) + sum(one["rm_refresh"].values())
    assert "rm_refresh" not in memory.grpo_plan(config, 1, 4, 32, 256, 1024, 30, reward_model=1)
    r = run(["grpo.py", "--dry-run", "--preset", "deepseek-math-7b", "--world-size", "8", "--reward", "orm",
             "--reward-model", str(tmp_path), "--rm-refresh", "1"])
    assert r.returncode == 0 and "reward_model_fp32 3.22" in r.stdout and "reward_models_bf16" not in r.stdout
    assert "rm_refresh" in r.stdout


def test_activation_checkpointing_auto_checkpoints_the_fewest_blocks_that_fit():
    """auto asks the plan for the fewest checkpointed blocks under the budget; on/off/a CPU need no plan; the
    model wraps exactly that many blocks."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    config = ModelConfig(**PRESETS["deepseek-math-7b"])
    peak = [memory.grpo_plan(config, 8, 8, 64, 256, 1024, k)["peak"] for k in range(31)]
    assert all(a >= b for a, b in zip(peak, peak[1:])) and peak[16] > peak[17]  # until rollouts are the largest
    assert memory.blocks_to_checkpoint(30, peak.__getitem__, peak[17]) == 17
    assert memory.blocks_to_checkpoint(30, peak.__getitem__, peak[17] - 1) == 18
    assert memory.blocks_to_checkpoint(30, peak.__getitem__, peak[0]) == 0
    assert memory.blocks_to_checkpoint(30, peak.__getitem__, 1) == 30  # nothing fits: all, the least memory
    cpu = common.Dist(0, 1, torch.device("cpu"))

    def chosen(mode):
        return common.checkpointed_blocks(mode, cpu, 30, None)
    assert (chosen("on"), chosen("off"), chosen("auto")) == (30, 0, 0)
    small = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=2, ffn_dim=64, max_seq_len=16)
    model = common.build_model(small, cpu, seed=0, checkpointed=2)
    assert [isinstance(b, CheckpointWrapper) for b in model.layers] == [True, True, False]


def test_wandb_missing_is_one_line_at_the_command_line(monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        sft.parse_args(["--wandb", "my-project"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --wandb: wandb is not installed: pip install wandb, or leave out --wandb" in err


def test_sft_loss_mask_covers_the_solution_only(data_dir):
    tok = Tokenizer.load(data_dir / "tokenizer")
    prob = problem_sets.load_problems(str(data_dir / "train.jsonl"))[0]
    (ids, mask), (pot_ids, _) = sft.make_examples([prob], tok, ["cot", "pot"])
    prompt = tok.chat(engine.PROMPTS["cot"].format(question=prob["question"]))
    answer = tok.encode(" " + prob["cot"], eos=True)
    assert ids == prompt + answer and mask == [0] * len(prompt) + [1] * len(answer)
    assert tok.decode(pot_ids).count("```python") == 1
    x, y, m = sft.collate([(ids, mask), (pot_ids, [1] * len(pot_ids))], tok.pad_id)
    assert y[0][m[0]].tolist() == answer  # the supervised targets are exactly the solution and its EOS
    assert not m[0, len(ids) - 1:].any()  # padding carries no loss


def test_sft_tool_examples_leave_the_sandbox_output_unsupervised(data_dir):
    """The ```output contents are the sandbox's: no loss, and tokenised apart, as engine.complete splices them."""
    tok = Tokenizer.load(data_dir / "tokenizer")
    prob = toyworld.make_problems(1, seed=3)[0]
    [(ids, mask)] = sft.make_examples([prob], tok, ["tool"])
    prompt = tok.chat(engine.PROMPTS["tool"].format(question=prob["question"]))
    unsupervised = tok.decode([t for t, m in zip(ids[len(prompt):], mask[len(prompt):]) if not m])
    assert ids[:len(prompt)] == prompt and unsupervised == f"\n{prob['answer']}\n```\n"
    head, _, _ = (" " + prob["tool"]).partition("```output")
    assert ids[len(prompt):len(prompt) + len(tok.encode(head + "```output"))] == tok.encode(head + "```output")
    assert ids[-1] == tok.eos_id and mask[-1] == 1
    assert len(sft.make_examples([dict(prob, pot=None), prob], tok, ["pot", "tool"])) == 3  # a format it lacks: none



def test_a_tool_solution_is_split_at_each_output_block():
    """Two program runs: each output block's contents are the sandbox's, everything between them the model's."""
    run1, run2 = "a\n```python\nprint(1)\n```\n```output", "b\n```python\nprint(2)\n```\n```output"
    solution = f"{run1}\n1\n```\n{run2}\n2\n```\nc"
    assert sft.solution_pieces(solution, "tool") == [(run1, True), ("\n1\n```\n", False), (run2, True),
                                                     ("\n2\n```\n", False), ("c", True)]
    assert sft.solution_pieces(solution, "pot") == [(solution, True)]


def test_each_step_draws_its_batch_from_a_permutation_made_for_its_epoch():
    """sft.step_examples: 10 examples in batches of 3 make 3 steps an epoch (one example waits for a later
    epoch), the steps of an epoch disjoint, each epoch in its own order, a step's batch fixed by (seed, step)."""
    examples = list(range(10))
    epochs = [[sft.step_examples(examples, 3 * e + k, 3, seed=1) for k in range(3)] for e in range(3)]
    for steps in epochs:
        assert [len(s) for s in steps] == [3, 3, 3] and len(set(sum(steps, []))) == 9
    assert len({tuple(sum(steps, [])) for steps in epochs}) == 3
    assert sft.step_examples(examples, 4, 3, seed=1) == epochs[1][1] != sft.step_examples(examples, 4, 3, seed=2)

def test_pretrain_then_sft_chain_reports_held_out_accuracy(data_dir, tmp_path):
    r = run(["pretrain.py", "--data", str(data_dir), "--max-steps", "2", *TINY, "--out", str(tmp_path / "base")])
    assert r.returncode == 0, r.stderr[-2000:]
    train = problem_sets.load_problems(str(data_dir / "train.jsonl"))
    long = [dict(p, cot=" ".join(["so"] * 600) + p["cot"]) for p in train[:2]]  # past the model's 512 positions
    data.write_jsonl(str(tmp_path / "train.jsonl"), train + long)
    r = run(["sft.py", "--init", str(tmp_path / "base"), "--data", str(tmp_path / "train.jsonl"),
             "--eval-data", str(data_dir / "test.jsonl"), "--max-steps", "2", "--batch", "8", "--micro-batch", "4",
             "--eval-problems", "12", "--out", str(tmp_path / "sft")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"2 of {len(train) + 2} examples are longer than the model's 512 positions: skipped" in r.stdout
    rows = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
    assert rows[-1]["eval_problems"] == 12 and 0.0 <= rows[-1]["eval_greedy_accuracy"] <= 1.0
    vocab = Transformer.from_pretrained(tmp_path / "sft").config.vocab_size
    assert vocab == Tokenizer.load(tmp_path / "sft").vocab_size
    cfg, tok = json.load(open(tmp_path / "sft" / "config.json")), Tokenizer.load(tmp_path / "sft")
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (tok.bos_id, tok.eos_id)  # other tools stop where we do
