"""grpo.py's command line: its flags' defaults, 1 and 2 ranks, one bf16 process, resumed, every option, compiled,
a sampler made deliberately different (TIS), the memory plan of the README's 8-GPU command. Its helpers (run,
grpo_args, train_rows) serve the other tests that launch the trainers."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import common
import engine
import grpo
import reward
from model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_reward_model_gets_less_push_than_the_rule_by_default():
    """--reward orm|prm: β 0.15 (outcome) or 0.4 (process) and advantages r - mean(r), unless the flags say
    otherwise; the rule's reward keeps the paper's β 0.04 and the std scale (GRPO on the toy's reward models was
    gamed under those)."""
    rule, orm = grpo.parse_args([]), grpo.parse_args(["--reward", "orm", "--reward-model", "rm"])
    prm = grpo.parse_args(["--reward", "prm", "--reward-model", "rm"])
    assert (rule.beta, rule.std_scale) == (0.04, "group") and (orm.beta, orm.std_scale) == (0.15, "none")
    assert (prm.beta, prm.std_scale) == (0.4, "none")
    told = grpo.parse_args(["--reward", "prm", "--reward-model", "rm", "--beta", "0.04", "--std-scale"])
    assert (told.beta, told.std_scale) == (0.04, "group")
    assert grpo.parse_args(["--beta", "0"]).beta == 0 and grpo.parse_args(["--no-std-scale"]).std_scale == "none"
    assert grpo.parse_args(["--std-scale", "batch"]).std_scale == "batch"


def grpo_args(base, data_dir, out, *extra):
    return ["grpo.py", "--init", str(base), "--data", str(data_dir / "train.jsonl"), "--eval-data",
            str(data_dir / "test.jsonl"), "--eval-problems", "4", "--report-problems", "4", "--report-samples", "2",
            "--questions", "4", "--group-size", "3", "--max-new-tokens", "12", "--temperature", "1.5",
            "--out", str(out), *extra]


def test_two_fsdp_ranks_run_grpo_with_gathered_rollouts(base, data_dir, tmp_path):
    """Each rank generates for its own questions with full weights (no collective per token, ranks may stop
    at different lengths), then trains with FSDP2; the run ends with the before/after table, curves and an
    exported policy."""
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             *grpo_args(base, data_dir, tmp_path, "--max-steps", "2", "--eval-every", "1")])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [row["step"] for row in rows if "reward" in row] == [1, 2]
    assert [row["step"] for row in rows if "eval_greedy_accuracy" in row] == [0, 1, 2]
    # the sampler's log-probs and the training forward's, on the same tokens before the update: equal in fp32
    assert all(0 <= row["logprob_gap_mean"] <= row["logprob_gap_max"] <= 1e-4 for row in rows if "reward" in row)
    assert set(json.load(open(tmp_path / "after.json"))) == {"greedy", "mean@2", "maj@2", "pass@2"}
    for name in ("model.safetensors", "curves.png", "before.json"):
        assert os.path.isfile(tmp_path / name), name


def test_grpo_resume_continues_exactly_as_if_never_stopped(base, data_dir, tmp_path):
    """Rollouts are seeded by the step, the checkpoint holds policy, optimizer and the reset reference. A tiny
    model earns no reward, so weight decay moves the policy off the reference: the KL is then what must match.
    The LR follows --warmup and --schedule across the restart."""
    common = ("--eval-every", "0", "--report-problems", "0", "--ref-reset", "2", "--supervision", "process",
              "--weight-decay", "0.5", "--lr", "0.02", "--warmup", "2", "--schedule", "cosine")
    r = run(grpo_args(base, data_dir, tmp_path / "a", "--max-steps", "4", *common))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(grpo_args(base, data_dir, tmp_path / "b", "--max-steps", "2", "--ckpt-every", "1", *common))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(grpo_args(base, data_dir, tmp_path / "b", "--max-steps", "4", "--resume", *common))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {k: [json.loads(line) for line in open(tmp_path / k / "metrics.jsonl")] for k in "ab"}
    train = {k: [(row["step"], row["lr"], row["loss"], row["kl"], row["reward"]) for row in v if "loss" in row]
             for k, v in rows.items()}
    assert [s for s, *_ in train["b"]] == [1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["step_000002", "step_000004"]  # the last two kept
    assert [lr for _, lr, *_ in train["a"]] == pytest.approx([0.01, 0.02, 0.02, 0.011])  # warmup, then cosine to 0.1x
    kl = [k for _, _, _, k, _ in train["a"]]
    assert kl[1] > 0 and kl[2] == 0 and kl[3] > 0  # the policy moved; the reference was reset after step 2
    for x, y in zip(train["a"], train["b"]):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-6)


def test_one_bf16_process_runs_grpo_through_fsdp2_and_resumes_exactly(base, data_dir, tmp_path, monkeypatch,
                                                                      group_of_one):
    """One GPU at the default --dtype bfloat16 runs FSDP2 in a process group of one (common.one_process), here on
    the CPU: steps with TIS on (bf16's default), a checkpoint of the sharded state (the reset reference's too), a
    resume that continues as if never stopped, an export; the group is gone when main returns."""
    monkeypatch.setattr(common, "init_dist", lambda dtype: common.one_process("cpu", torch.bfloat16))
    built, build = [], common.build_model

    def build_model(*a, **kw):
        model = build(*a, **kw)
        built.append({p.dtype for p in model.parameters()})
        return model
    monkeypatch.setattr(common, "build_model", build_model)
    flags = ("--eval-every", "0", "--report-problems", "0", "--weight-decay", "0.5", "--lr", "0.02", "--warmup", "2",
             "--ref-reset", "2")
    for name, extra in (("a", ("--max-steps", "3")), ("b", ("--max-steps", "2", "--ckpt-every", "1")),
                        ("b", ("--max-steps", "3", "--resume"))):
        grpo.main(grpo.parse_args(grpo_args(base, data_dir, tmp_path / name, *flags, *extra)[1:]))
        assert not torch.distributed.is_initialized()
    assert built == [{torch.float32}, {torch.bfloat16}] * 3  # π_θ's fp32 master weights; π_ref frozen, in bf16
    a, b = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    assert [row["step"] for row in b] == [1, 2, 3] and all("tis_weight" in row for row in a)
    for rows in (a, b):  # π_ref (bf16: frozen) is π_θ at the start and again after its reset at step 2, which the
        # resumed run loads from the checkpoint: the two gather to the same bf16 weights, KL exactly 0
        assert rows[0]["kl"] == rows[2]["kl"] == 0 < rows[1]["kl"]
    for x, y in zip(a, b):
        assert [x[k] for k in ("loss", "kl", "reward", "grad_norm")] == pytest.approx(
            [y[k] for k in ("loss", "kl", "reward", "grad_norm")], rel=1e-4, abs=1e-6)
    exported = Transformer.from_pretrained(str(tmp_path / "b"))
    assert next(exported.parameters()).dtype == torch.bfloat16  # written in the compute dtype


def test_questions_that_leave_no_room_for_an_answer_are_skipped(base, data_dir, tmp_path):
    rows = [json.loads(line) for line in open(data_dir / "train.jsonl")][:8]
    rows.append(dict(question=" ".join(["why"] * 600), answer="1"))  # the toy model has 512 positions
    with open(tmp_path / "rl.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    args = grpo_args(base, data_dir, tmp_path / "out", "--max-steps", "1", "--eval-every", "0", "--report-problems",
                     "0")
    args[args.index("--data") + 1] = str(tmp_path / "rl.jsonl")
    r = run(args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 questions leave no room for 12 new tokens in the model's 512 positions: skipped" in r.stdout


@pytest.mark.parametrize("flags", [
    ("--online-rft", "--beta", "0", "--mu", "2", "--ratio", "sequence", "--loss-norm", "token", "--mask-truncated",
     "--policy-loss", "cispo"),
    ("--prompt", "tool", "--no-std-scale", "--clip-high", "0.28", "--loss-norm", "constant", "--ref-reset", "1",
     "--top-entropy", "0.2", "--kl-loss", "k2"),
    ("--oversample", "3", "--supervision", "process", "--fp32-head", "--mu", "2", "--kl-loss", "k3-is",
     "--off-policy-mask", "0"),
])
def test_every_option_runs_a_step(base, data_dir, tmp_path, flags):
    r = run(grpo_args(base, data_dir, tmp_path, "--max-steps", "1", "--eval-every", "0", "--report-problems", "0",
                      *flags))
    assert r.returncode == 0, r.stderr[-2000:]
    [row] = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert all(math.isfinite(row[k]) for k in ("loss", "kl", "entropy", "grad_norm", "reward"))
    assert ("--off-policy-mask" in flags) == (0 <= row.get("off_policy_masked", -1) <= 1)


def test_compiled_rollouts_and_blocks_train_as_eager(base, data_dir, tmp_path):
    """--compile: the rollouts' decode step captured once for the run (its Decoder keeps a copy of the weights,
    refreshed each step) and each block compiled for training: the same rollouts and the same steps as eager, on
    three steps (each step's rows have another length: the third runs graphs compiled at the second's)."""
    flags = ("--max-steps", "3", "--eval-every", "0", "--report-problems", "0", "--lr", "0.02", "--weight-decay",
             "0.5")  # no reward for a tiny model: decay moves the policy
    rows = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        r = run(grpo_args(base, data_dir, tmp_path / name, *flags, *extra))
        assert r.returncode == 0, r.stderr[-2000:]
        rows[name] = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl") if '"loss"' in line]
    assert len(rows["eager"]) == len(rows["compiled"]) == 3
    for a, b in zip(rows["eager"], rows["compiled"]):  # step 2 samples from the weights step 1 changed
        assert (a["length"], a["reward"]) == (b["length"], b["reward"])
        assert b["logprob_gap_max"] < 1e-4  # the sampler's log-probs are the policy's: its weights were refreshed
        assert (a["loss"], a["kl"], a["grad_norm"]) == pytest.approx((b["loss"], b["kl"], b["grad_norm"]), rel=1e-4,
                                                                      abs=1e-7)


def test_tis_reweights_a_sampler_made_deliberately_different(base, data_dir, tmp_path, monkeypatch):
    """The sampler is told its log-probs were log 3 lower than the policy's on outputs of even place (log 4 on the
    first), log 1.5 on the others: with --tis 2 their tokens weigh min(3, 2) = 2 and 1.5 (logged: the mean weight
    and the share the cap cut), and step 1's loss (ρ = 1, no KL yet) is -Σ_i Â_i w_i / 12 over the 12 outputs,
    where it is 0 without. Rewards are scripted (1 on every fourth output). Off by default in fp32. The gap and
    -log π logged are those of every micro-batch (one per question here), not the last one's."""
    real, sampled = engine.complete, []

    def biased(*a, **k):
        comps = real(*a, **k)
        sampled.append(-sum(sum(c.logprobs) for c in comps))  # what the policy gives them, within 1e-6
        for i, c in enumerate(comps):
            c.logprobs = [x - math.log(4.0 if i == 0 else 3.0 if i % 2 == 0 else 1.5) for x in c.logprobs]
        return comps
    monkeypatch.setattr(engine, "complete", biased)
    monkeypatch.setattr(reward, "batch_rewards", lambda texts, *a, **k: [float(i % 4 == 0) for i in range(len(texts))])
    flags = ("--max-steps", "1", "--eval-every", "0", "--report-problems", "0", "--micro-batch", "1")
    rows = {}
    for name, extra in (("default", ()), ("tis", ("--tis", "2"))):
        grpo.main(grpo.parse_args(grpo_args(base, data_dir, tmp_path / name, *flags, *extra)[1:]))
        [rows[name]] = train_rows(tmp_path / name)
        assert rows[name]["entropy"] == pytest.approx(sampled[-1] / 144, rel=1e-5)  # 12 outputs x 12 tokens
        assert rows[name]["logprob_gap_max"] == pytest.approx(math.log(4), abs=1e-5)
        gaps = math.log(4) + 5 * math.log(3) + 6 * math.log(1.5)
        assert rows[name]["logprob_gap_mean"] == pytest.approx(gaps / 12, abs=1e-5)
    assert "tis_weight" not in rows["default"] and rows["default"]["loss"] == pytest.approx(0, abs=1e-6)
    assert rows["default"]["length"] == rows["tis"]["length"] == 12  # a tiny model runs to the budget
    assert rows["tis"]["tis_weight"] == pytest.approx(1.75, abs=1e-4)
    assert rows["tis"]["tis_clip_rate"] == pytest.approx(0.5, abs=1e-4)
    r = torch.tensor([float(i % 4 == 0) for i in range(12)]).view(4, 3)  # 4 questions x G = 3
    std = r.std(1, keepdim=True)
    adv = torch.where(std > 0, (r - r.mean(1, keepdim=True)) / std, 0.0).flatten()
    w = torch.tensor([2.0 if i % 2 == 0 else 1.5 for i in range(12)])
    assert rows["tis"]["loss"] == pytest.approx(-float((adv * w).sum()) / 12, rel=1e-4)


def test_dry_run_plans_the_8_gpu_command_under_80_gib():
    r = run(["grpo.py", "--dry-run", "--preset", "deepseek-math-7b", "--world-size", "8", "--micro-batch", "4",
             "--gen-batch", "32", "--max-new-tokens", "1024"])
    assert r.returncode == 0, r.stderr[-2000:]
    peaks = [float(line.split()[1]) for line in r.stdout.splitlines() if line.strip().startswith("peak")]
    assert len(peaks) == 2 and all(40 < p < 80 for p in peaks), r.stdout  # without and with checkpointing


def train_rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
