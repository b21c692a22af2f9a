"""grpo.py's training path on scripted rollouts (tests/scripted_grpo.py: mixed rewards, a tool splice,
multi-byte text): step 1's loss of each option computed by hand, the gradient of the plain objective on
transformers' Llama, 1, 2 and 4 ranks alike, FSDP2's collectives counted, exact resume, LoRA, a user's reward."""
import argparse
import functools
import itertools
import json
import zlib

import pytest
import torch

import engine
import problem_sets
import reward
from grpo import rule_steps, token_advantages
from model import Transformer, config_from_hf, hf_layout
from packing import Batch, pack_rows
from test_grpo_cli import run, train_rows
from tokenizer import Tokenizer


def scripted_args(base, problems, out, *extra):
    return ["tests/scripted_grpo.py", "--init", str(base), "--data", str(problems), "--eval-data", "none",
            "--questions", "4", "--group-size", "4", "--max-new-tokens", "12", "--micro-batch", "3",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def problems(data_dir, tmp_path_factory):
    """The toy's questions, each with the answer 5: every scripted output then has the same tokens whatever
    question it answers (its prompt aside), so the test can count them."""
    path = tmp_path_factory.mktemp("scripted") / "rl.jsonl"
    with open(path, "w") as f:
        for line in open(data_dir / "train.jsonl"):
            f.write(json.dumps(dict(question=json.loads(line)["question"], answer="5")) + "\n")
    return path


@pytest.fixture
def in_process(problems, monkeypatch):
    """tests/scripted_grpo.py in this process, with no new process to start (most of a short run's time):
    argv -> the run's metrics rows."""
    import grpo
    import scripted_grpo
    monkeypatch.setattr(scripted_grpo, "ANSWERS", {p["question"]: p["answer"]
                                                   for p in problem_sets.load_problems(str(problems))})
    monkeypatch.setattr(engine, "complete", scripted_grpo.scripted)

    def main(argv):
        args = grpo.parse_args(argv[1:])
        monkeypatch.setattr(scripted_grpo, "SAMPLER_LOGPROBS", args.off_policy_mask is not None)
        grpo.main(args)
        return train_rows(args.out)
    return main


def test_fsdp_gathers_the_reference_once_and_reduce_scatters_once_a_step(base, problems, tmp_path):
    """On 2 gloo ranks, 2 steps of 4 micro-batches each, collectives counted (tests/counted.py): the reference
    costs one all-gather of each FSDP2 unit when built and one per step, not one per micro-batch (the difference
    from a run without it, β = 0), and the policy's gradients one reduce-scatter of each unit per step."""
    units = config_from_hf(base).n_layers + 1  # each block, and the root (embeddings, final norm, head)
    counts = {}
    for beta in ("0.04", "0"):
        out = tmp_path / beta
        r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "tests/counted.py",
                 str(tmp_path / f"{beta}.json"), *scripted_args(base, problems, out, "--max-steps", "2", "--beta",
                                                                 beta, "--pack", "1", "--micro-batch", "2",
                                                                 "--report-problems", "0")])
        assert r.returncode == 0, r.stderr[-3000:]
        counts[beta] = json.load(open(tmp_path / f"{beta}.json"))
    assert counts["0.04"]["all_gather"] - counts["0"]["all_gather"] == units * (1 + 2)
    assert counts["0.04"]["reduce_scatter"] == counts["0"]["reduce_scatter"] == units * 2


def test_loss_mask_and_advantages_land_on_the_models_own_tokens_in_process_supervision(data_dir):
    """Scripted output 1 has a wrong step (`5 * 2 = 11`) after multi-byte text and a right answer: its tokens up
    to the one that ends the step carry both steps' normalised rewards, the rest (EOS too) only the answer's;
    output 0's sandbox tokens carry no loss."""
    import scripted_grpo
    tok = Tokenizer.load(data_dir / "tokenizer")
    q = next(json.loads(line)["question"] for line in open(data_dir / "train.jsonl")
             if zlib.crc32(json.loads(line)["question"].encode()) % 3)  # a question with right answers
    comps = [scripted_grpo.completion(tok, q, *out) for out in scripted_grpo.group(q, "5")]
    rewards = torch.tensor(reward.batch_rewards([c.text for c in comps], ["5"] * 4, workers=1))
    assert rewards.tolist() == [1.0, 1.0, 0.0, 0.0]
    args = argparse.Namespace(group_size=4, supervision="process", online_rft=False, std_scale="group")
    per_token, n_zero_std = token_advantages(comps, rewards, rule_steps(tok, comps, rewards), args)
    step_rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])  # per output: [answer], [step, answer], ...
    mean, std = step_rewards.mean().item(), step_rewards.std().item()
    ids = comps[1].ids
    end = next(k for k in range(len(ids)) if "= 11" in tok.decode(ids[:k + 1]))  # the token ending the step
    a = per_token[1]
    assert a[:end + 1].tolist() == pytest.approx([((0 - mean) + (1 - mean)) / std] * (end + 1))
    assert a[end + 1:].tolist() == pytest.approx([(1 - mean) / std] * (len(ids) - end - 1))
    assert n_zero_std == 0
    mask = Batch(pack_rows(comps, per_token, 4, 1, False, "sequence"), tok.pad_id, "cpu").mask
    P = len(comps[0].prompt)
    assert mask[0, P - 1:P - 1 + len(comps[0].ids)].tolist() == comps[0].sampled  # the sandbox's tokens: no loss
    assert not mask[:, :P - 1].any()  # the prompt: no loss
    assert mask.sum(1).tolist() == [sum(c.sampled) for c in comps]  # nor padding


def test_scripted_grpo_trains_alike_on_1_2_and_4_ranks(base, problems, tmp_path, in_process):
    """Rollouts that do not depend on the rank: 1 process, 2 and 4 FSDP2 gloo ranks report the same loss, KL,
    gradient norm and rewards at each step and end with the same weights; two updates a batch, the second with
    GSPO's ratio per output (each rank's log-probs read first, inside FSDP2's forward); the policy-gradient term on
    the half of all ranks' tokens drawn at the highest entropy (one quantile of every rank's)."""
    from safetensors.torch import load_file
    flags = ("--max-steps", "2", "--lr", "0.01", "--supervision", "process", "--report-problems", "0", "--mu", "2",
             "--ratio", "sequence", "--top-entropy", "0.5")
    in_process(scripted_args(base, problems, tmp_path / "1", *flags))
    for world in (2, 4):
        r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                 *scripted_args(base, problems, tmp_path / str(world), *flags)])
        assert r.returncode == 0, r.stderr[-3000:]
    rows = {w: train_rows(tmp_path / str(w)) for w in (1, 2, 4)}
    keys = ("loss", "kl", "grad_norm", "reward", "entropy", "zero_std_groups", "length", "tool_calls", "entropy_cut")
    assert 0 < rows[1][0]["reward"] < 1 and rows[1][1]["kl"] > 0 and rows[1][0]["grad_norm"] > 0
    for w in (2, 4):
        for a, b in zip(rows[1], rows[w]):
            assert {k: b[k] for k in keys} == pytest.approx({k: a[k] for k in keys}, rel=1e-4, abs=1e-7), w
    # the weights: equal up to the order of fp32 sums, which Adam's first steps amplify where a gradient is ~0
    # (its step is lr x g / |g|), so the whole difference is measured against the whole update
    weights = {w: load_file(str(tmp_path / str(w) / "model.safetensors")) for w in (1, 2, 4)}
    start = load_file(str(base / "model.safetensors"))

    def distance(a, b):
        return sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5

    update = distance(weights[1], start)
    for w in (2, 4):
        assert distance(weights[w], weights[1]) < 1e-4 * update, w


def test_completions_log_and_exports_along_the_run(base, problems, tmp_path):
    """completions.jsonl holds each step's first group with the script's rewards and Â by hand (a group scoring
    [1, 1, 0, 0]: ±√3/2; one scoring all 0: 0); --export-every writes a loadable model mid-run."""
    import scripted_grpo
    out = tmp_path / "run"
    r = run(scripted_args(base, problems, out, "--max-steps", "2", "--report-problems", "0", "--export-every", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "completions.jsonl")]
    assert [row["step"] for row in rows] == [1] * 4 + [2] * 4
    for step in (1, 2):
        group = [row for row in rows if row["step"] == step]
        q = group[0]["question"]
        assert all(row["question"] == q and row["answer"] == "5" for row in group)
        right = zlib.crc32(q.encode()) % 3 != 0
        assert [row["rule_reward"] for row in group] == ([1.0, 1.0, 0.0, 0.0] if right else [0.0] * 4)
        assert [row["rule_reward"] for row in group] == [row["reward"] for row in group]
        h = 3 ** 0.5 / 2
        assert [row["advantage"] for row in group] == pytest.approx([h, h, -h, -h] if right else [0.0] * 4, rel=1e-5)
        assert [row["finished"] for row in group] == [True, True, True, False]
        expected = [scripted_grpo.completion(Tokenizer.load(base), q, *o).text for o in scripted_grpo.group(q, "5")]
        assert [row["completion"] for row in group] == expected
    mid = Transformer.from_pretrained(out / "step-1")
    assert mid.num_params() == Transformer.from_pretrained(out).num_params()
    assert not (out / "step-2").exists()  # the last step's export is the run's own


def test_a_users_reward_function_is_weighted_in_and_logged_apart(base, problems, tmp_path):
    """--reward-fn file.py:has_box --reward-weights 1,0.5: the script's outputs 0-2 write a boxed answer, 3 does
    not, so each group scores rule + [0.5, 0.5, 0.5, 0] and Â follows by hand; a function that raises stops the
    run in one line."""
    fn = tmp_path / "my_rewards.py"
    fn.write_text("def has_box(text, problem):\n    return 1.0 if '\\\\boxed' in text else 0.0\n\n"
                  "def broken(text, problem):\n    return problem['no such field']\n")
    out = tmp_path / "run"
    r = run(scripted_args(base, problems, out, "--max-steps", "1", "--report-problems", "0",
                          "--reward-fn", f"{fn}:has_box", "--reward-weights", "1,0.5"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert train_rows(out)[0]["reward_fn_has_box"] == 0.75
    group = [json.loads(line) for line in open(out / "completions.jsonl")]
    assert [row["reward_fn_has_box"] for row in group] == [1.0, 1.0, 1.0, 0.0]
    right = group[0]["rule_reward"] == 1.0
    assert [row["reward"] for row in group] == ([1.5, 1.5, 0.5, 0.0] if right else [0.5, 0.5, 0.5, 0.0])
    by_hand = [5 / 6, 5 / 6, -0.5, -7 / 6] if right else [0.5, 0.5, 0.5, -1.5]  # (r - mean) / std, unbiased std
    assert [row["advantage"] for row in group] == pytest.approx(by_hand, rel=1e-5)
    r = run(scripted_args(base, problems, tmp_path / "broken", "--max-steps", "1", "--report-problems", "0",
                          "--reward-fn", f"{fn}:broken"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"error: step 1: --reward-fn {fn}:broken raised KeyError: 'no such field'" in r.stderr
    r = run(scripted_args(base, problems, tmp_path / "missing", "--reward-fn", f"{fn}:nothing"))
    assert r.returncode == 1 and r.stderr.strip() == f"error: --reward-fn {fn}:nothing: {fn} has no function nothing"


def test_lora_grpo_starts_as_the_full_model_and_its_reference_is_the_base(base, problems, tmp_path):
    """--lora-rank 4: at step 1 the adapters are zero (B = 0), so the step's loss, KL and rewards equal the full
    model's on the same scripted rollouts; at step 2 π_θ has moved and π_ref (the adapters off) has not: KL > 0.
    No second model is built. On 2 FSDP2 ranks (adapters sharded, merged for the rollouts) the steps are the
    same."""
    flags = ("--max-steps", "2", "--report-problems", "0", "--lr", "0.01")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for name, launch, extra in (("full", [], ()), ("lora", [], ("--lora-rank", "4")),
                                ("lora2", torchrun, ("--lora-rank", "4"))):
        r = run([*launch, *scripted_args(base, problems, tmp_path / name, *flags, *extra)])
        assert r.returncode == 0, r.stderr[-3000:]
    full, tuned = train_rows(tmp_path / "full"), train_rows(tmp_path / "lora")
    for a, b in zip(tuned, train_rows(tmp_path / "lora2")):
        assert [b[k] for k in ("loss", "kl", "grad_norm")] == pytest.approx([a[k] for k in ("loss", "kl", "grad_norm")],
                                                                            rel=1e-4, abs=1e-7)
    keys = ("loss", "kl", "reward", "length")
    assert {k: tuned[0][k] for k in keys} == pytest.approx({k: full[0][k] for k in keys}, rel=1e-5, abs=1e-7)
    assert tuned[0]["kl"] == 0 and tuned[1]["kl"] > 1e-6
    assert tuned[1]["grad_norm"] != pytest.approx(full[1]["grad_norm"])  # only the adapters' gradient now


def test_a_gradient_that_is_no_longer_finite_ends_the_run_in_one_line(base, problems, tmp_path):
    """--lr 1e30 ruins the weights at step 1; step 2's gradient is not finite: the run stops before the optimizer
    step with one line naming the step and the fix, status 1, and the checkpoint of step 1 kept."""
    r = run(scripted_args(base, problems, tmp_path / "run", "--max-steps", "3", "--report-problems", "0",
                          "--lr", "1e30", "--ckpt-every", "1"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: step 2: gradient norm ")
    assert "(lower --lr, then --resume)" in r.stderr and (tmp_path / "run" / "checkpoints" / "step_000001").is_dir()


def test_scripted_grpo_resumes_a_two_rank_checkpoint_exactly(base, problems, tmp_path, in_process):
    """Two ranks, two passes over two mini-batches a step: a run stopped after step 1 and resumed logs what the
    uninterrupted one does, and one process alone the same (each rank deals its questions to the mini-batches so
    that they hold the same groups on any number of ranks)."""
    flags = ("--lr", "0.003", "--mu", "2", "--mini-batches", "2", "--clip-high", "0.28", "--report-problems", "0")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for out, extra in (("a", ("--max-steps", "3")), ("b", ("--max-steps", "1", "--ckpt-every", "1")),
                       ("b", ("--max-steps", "3", "--resume"))):
        r = run([*torchrun, *scripted_args(base, problems, tmp_path / out, *flags, *extra)])
        assert r.returncode == 0, r.stderr[-3000:]
    in_process(scripted_args(base, problems, tmp_path / "alone", *flags, "--max-steps", "3"))
    keys = ("step", "loss", "kl", "grad_norm", "clip_frac", "reward")
    a, b, alone = ([{k: row[k] for k in keys} for row in train_rows(tmp_path / out)] for out in ("a", "b", "alone"))
    assert [row["step"] for row in b] == [1, 2, 3] and a[2]["kl"] > 0 and a[2]["clip_frac"] > 0
    for x, y, z in zip(a, b, alone):
        assert y == pytest.approx(x, rel=1e-5, abs=1e-7)
        assert z == pytest.approx(x, rel=1e-4, abs=1e-7)


def test_each_option_changes_step_one_as_computed_by_hand(base, problems, data_dir, tmp_path, in_process):
    """At step 1 with μ = 1 the policy is π_old and π_ref, so ρ = 1, the KL is 0 and each token's loss is -Â:
    the logged loss follows from the script's rewards and token counts. A group scores [1, 1, 0, 0] (Â = ±√3/2)
    or [0, 0, 0, 0] (Â = 0); output 0 holds sandbox tokens (no loss), output 3 is cut at the budget."""
    import scripted_grpo
    near = functools.partial(pytest.approx, rel=1e-5, abs=1e-6)  # fp32 sums
    tok = Tokenizer.load(data_dir / "tokenizer")
    questions = [json.loads(line)["question"] for line in open(problems)]
    counts, lengths = {}, {}  # tokens the model wrote, and all, per output of a group with signal (True) and not
    for signal in (True, False):
        q = next(q for q in questions if bool(zlib.crc32(q.encode()) % 3) == signal)
        outs = [scripted_grpo.completion(tok, q, *out) for out in scripted_grpo.group(q, "5")]
        counts[signal], lengths[signal] = [sum(c.sampled) for c in outs], [len(c.ids) for c in outs]

    def step_one(name, *flags):
        return in_process(scripted_args(base, problems, tmp_path / name, "--max-steps", "1", "--report-problems", "0",
                                        "--lr", "0.05", *flags))[0]

    row = step_one("default")
    n_sig = round(row["reward"] * 16 / 2)  # two right outputs per group with signal
    assert 0 < n_sig < 4 and row["zero_std_groups"] == 4 - n_sig and row["tool_calls"] == row["truncated"] == 4
    a = 3 ** 0.5 / 2
    adv = [a, a, -a, -a]

    def tokens(outputs=range(4)):
        return sum(n_sig * counts[True][j] + (4 - n_sig) * counts[False][j] for j in outputs)

    signal_sum = sum(x * n for x, n in zip(adv, counts[True]))  # Σ_j Â_j |o_j| over a group with signal
    assert row["loss"] == near(0)  # per sequence: each group's Â sums to 0
    assert step_one("mask", "--mask-truncated")["loss"] == near(-n_sig * a / 16)
    assert step_one("token", "--loss-norm", "token")["loss"] == near(-n_sig * signal_sum / tokens())
    assert step_one("constant", "--loss-norm", "constant")["loss"] == near(-n_sig * signal_sum / (16 * 12))
    centred = sum(x / (2 * a) * n for x, n in zip(adv, counts[True]))  # Â = r - mean(r) = ±1/2
    assert step_one("no-std", "--loss-norm", "token", "--no-std-scale")["loss"] == near(
        -n_sig * centred / tokens())
    masked_sum = sum(x * n for x, n in zip(adv[:3], counts[True][:3]))
    assert step_one("mask-token", "--mask-truncated", "--loss-norm", "token")["loss"] == near(
        -n_sig * masked_sum / tokens(range(3)))
    rft = step_one("rft", "--online-rft", "--beta", "0")  # coefficient 1 on right outputs: no group is flat
    assert rft["loss"] == near(-2 * n_sig / 16) and rft["zero_std_groups"] == 0
    # --top-entropy: the policy term on part of each output's tokens, so a group's Â no longer sums to 0
    top = step_one("top-entropy", "--top-entropy", "0.5")
    assert 0 < top["entropy_cut"] < 1 and top["loss"] != near(0)
    # --overlong-buffer 40 of a budget of 64: each output's reward gains -min(max(|o| - 24, 0) / 40, 1), which
    # tells apart the outputs of the groups whose rule rewards agree
    penalty = {signal: [-min(max(n - 24, 0) / 40, 1) for n in lengths[signal]] for signal in (True, False)}
    assert len(set(penalty[False])) == 4 and min(penalty[True] + penalty[False]) > -1 and max(penalty[True]) == 0
    over = step_one("overlong", "--max-new-tokens", "64", "--overlong-buffer", "40")
    mean_penalty = (n_sig * sum(penalty[True]) + (4 - n_sig) * sum(penalty[False])) / 16
    assert over["overlong_penalty"] == near(mean_penalty) and over["reward"] == near(row["reward"] + mean_penalty)
    assert over["zero_std_groups"] == 0
    # μ = 2: the second update sees ρ ≠ 1. Its first is the same with or without the KL (k3's gradient is 0 at
    # π_θ = π_ref), so per token the two losses differ by β times the KL
    mu = step_one("mu", "--mu", "2", "--loss-norm", "token")
    no_kl = step_one("mu-no-kl", "--mu", "2", "--loss-norm", "token", "--beta", "0")
    assert mu["kl"] > 0 and no_kl["kl"] == 0 and mu["loss"] - no_kl["loss"] == near(0.04 * mu["kl"])
    # --kl-loss k2: the same first update (both KL terms have gradient 0 at π_θ = π_ref), so the same k3 logged at
    # the second; its loss carries β (log π_θ/π_ref)²/2, which differs from β k3 by β d³/6 + ... per token
    k2 = step_one("mu-k2", "--mu", "2", "--loss-norm", "token", "--kl-loss", "k2")
    assert k2["kl"] == near(mu["kl"]) and k2["loss"] != near(mu["loss"])
    assert 0.5 < (k2["loss"] - no_kl["loss"]) / (mu["loss"] - no_kl["loss"]) < 2
    # --kl-loss k3-is: the same (its gradient, -ρ β log π_ref/π_θ, is 0 at π_θ = π_ref); ρ k3 in the second's
    # loss, where π_old = π_ref: with x = log π_θ/π_ref, ρ k3 = 1 + (x - 1) e^x = x²/2 + x³/3 + ..., against
    # k3's x²/2 - x³/6 + ...: twice k3 here, where the first update moved tokens far
    k3_is = step_one("mu-k3-is", "--mu", "2", "--loss-norm", "token", "--kl-loss", "k3-is")
    assert k3_is["kl"] == near(mu["kl"]) and k3_is["loss"] not in (near(mu["loss"]), near(k2["loss"]))
    assert 1 < (k3_is["loss"] - no_kl["loss"]) / (mu["loss"] - no_kl["loss"]) < 4
    # --off-policy-mask 0.001: the first update sees the sampler's rounding only (~1e-7), drops nothing: the same KL.
    # At the second, whole outputs of Â < 0 whose mean log π_sampler/π_θ the first raised past δ are dropped, no
    # other token (output 2 shares most of its tokens with the right outputs, pushed up: it may keep its term)
    opsm = step_one("mu-opsm", "--mu", "2", "--loss-norm", "token", "--off-policy-mask", "0.001")
    negative = [counts[True][2]] * n_sig + [counts[True][3]] * n_sig  # tokens of each output of Â < 0
    assert 0 < round(opsm["off_policy_masked"] * tokens()) in subset_sums(negative)
    assert opsm["kl"] == near(mu["kl"]) and opsm["loss"] != near(mu["loss"])
    assert row["clip_frac"] == 0 < mu["clip_frac"]
    high = step_one("mu-high", "--mu", "2", "--loss-norm", "token", "--clip-high", "100")
    assert high["clip_frac"] < mu["clip_frac"]  # only ratios below 1 - ε count as clipped


def subset_sums(sizes):
    """Every total that some of `sizes` add up to."""
    return {sum(s) for k in range(len(sizes) + 1) for s in itertools.combinations(sizes, k)}


def test_a_reference_reset_with_mixup_moves_the_runs_reference_half_way(base, problems, tmp_path, in_process,
                                                                       monkeypatch):
    """--ref-reset 1: step 2 starts from π_ref ← π_θ, its KL 0 (at μ = 1 measured before the update); with
    --ref-mixup 0.5 each reset moves the run's own π_ref half way to its π_θ (checked on the models the run
    holds), and step 2's KL is not 0."""
    import grpo
    moved, reset = [], grpo.reset_reference

    def spy(ref, policy, alpha):
        want = [(r.double() + p.double()) / 2 for r, p in zip(ref.parameters(), policy.parameters())]
        reset(ref, policy, alpha)
        moved.append(all(torch.allclose(r.double(), w, rtol=1e-6, atol=1e-7) for r, w in zip(ref.parameters(), want)))
    kl = {}
    for mixup in ("1", "0.5"):
        monkeypatch.setattr(grpo, "reset_reference", spy if mixup == "0.5" else reset)
        kl[mixup] = [row["kl"] for row in in_process(scripted_args(
            base, problems, tmp_path / mixup, "--max-steps", "2", "--report-problems", "0", "--lr", "0.05",
            "--ref-reset", "1", "--ref-mixup", mixup))]
    assert kl["1"][1] == 0 < kl["0.5"][1] and moved == [True, True]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_step_has_the_gradient_of_the_plain_objective_on_transformers_llama(base, problems, tmp_path, monkeypatch,
                                                                               temperature):
    """grpo.py's whole training path at step 1 (rows that hold a prompt once, log-probs from the hidden states,
    the fused loss, the normalisation over micro-batches) against Eq. 3 written plainly on transformers' Llama,
    one output at a time on full logits: the same gradient, also with π at a rollout temperature of 0.7,
    softmax(logits / 0.7). The rollouts are scripted (mixed rewards, sandbox tokens that carry no loss, an output
    cut at the budget)."""
    import transformers

    import common
    import grpo
    import scripted_grpo
    answers = {p["question"]: p["answer"] for p in problem_sets.load_problems(str(problems))}
    monkeypatch.setattr(scripted_grpo, "ANSWERS", answers)
    seen, clip = {}, common.clip_grad_norm

    def complete(model, tok, questions, *a, **k):
        seen["questions"], seen["comps"] = questions, scripted_grpo.scripted(model, tok, questions, *a, **k)
        return seen["comps"]

    def clip_and_keep(model, max_norm):
        seen["grads"] = {name: p.grad.clone() for name, p in model.named_parameters()}
        return clip(model, max_norm)

    monkeypatch.setattr(engine, "complete", complete)
    monkeypatch.setattr(common, "clip_grad_norm", clip_and_keep)
    args = scripted_args(base, problems, tmp_path / "run", "--max-steps", "1", "--report-problems", "0",
                         "--temperature", str(temperature))[1:]
    grpo.main(grpo.parse_args(args))

    tok = Tokenizer.load(base)
    comps = seen["comps"]
    r = torch.tensor([reward.math_reward(c.text, answers[q]) for q, c in zip(seen["questions"], comps)]).view(-1, 4)
    std = r.std(1, keepdim=True)  # Bessel's, as the paper's std is usually read (and TRL's)
    adv = torch.where(std > 0, (r - r.mean(1, keepdim=True)) / std, 0.0).flatten()
    assert 0 < (adv > 0).sum() < len(adv)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    # π_old = π_θ: the KL term's gradient is 0 at π_θ = π_ref
    plain_objective(hf, tok, comps, adv, temperature=temperature).backward()
    assert_same_gradient(hf, seen["grads"], config_from_hf(base))


def sampled_logprobs(hf, tok, c, temperature=1.0):
    """log π(o_i) (|o_i|,) under transformers' model at the temperature, from its full logits over the
    tokenizer's ids."""
    logits = hf(torch.tensor([c.prompt + c.ids])).logits[0, len(c.prompt) - 1:-1, :tok.vocab_size]
    return (logits / temperature).log_softmax(-1).gather(1, torch.tensor(c.ids)[:, None])[:, 0]


def plain_objective(hf, tok, comps, adv, old=None, beta=0.04, eps=0.2, dual_clip=None, temperature=1.0):
    """Eq. 3 written plainly, one output at a time: the mean over outputs of each one's mean over the tokens its
    model wrote of -min(ρÂ, clip(ρ)Â) + β k3, with π_old = π_ref given per output as log-probs (`old`; None: π_θ
    itself, detached, so that ρ = 1 and k3 = 0 with their gradients); dual_clip c: an output of Â < 0 has its
    policy term capped at -c Â; temperature: π is softmax(logits / temperature)."""
    loss = 0.0
    for i, (c, a) in enumerate(zip(comps, adv)):
        logp = sampled_logprobs(hf, tok, c, temperature)
        fixed = logp.detach() if old is None else old[i]
        ratio, d = torch.exp(logp - fixed), fixed - logp
        pg = -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
        if dual_clip and a < 0:
            pg = pg.clamp(max=-dual_clip * a)
        m = torch.tensor(c.sampled, dtype=torch.float32)  # the model's own tokens
        loss = loss + ((pg + beta * (torch.exp(d) - d - 1)) * m).sum() / m.sum()
    return loss / len(comps)


def assert_same_gradient(hf, grads, config):
    """Our gradients (our names) against those in transformers' model, to 1e-4 of their norm."""
    theirs = {k.removeprefix("model."): p.grad for k, p in hf.named_parameters()}
    ours = hf_layout(grads, config)  # our fused q/k/v and gate/up split as theirs
    diff = sum(((ours[k] - g) ** 2).sum() for k, g in theirs.items()) ** 0.5
    norm = sum((g ** 2).sum() for g in theirs.values()) ** 0.5
    assert norm > 0 and diff < 1e-4 * norm, (diff, norm)


@pytest.mark.parametrize("dual_clip, temperature", [(None, 1.0), (1.1, 0.7)])
def test_mini_batches_update_in_turn_each_on_its_groups(base, problems, tmp_path, monkeypatch, dual_clip, temperature):
    """--mini-batches 2 at step 1: two AdamW steps, the first on the groups of questions 0 and 2 (question q to
    mini-batch q mod 2, on any number of ranks), the second on those of 1 and 3 at the weights the first left,
    with π_old = π_ref = the weights that sampled. Each step's gradient is Eq. 3's on its own mini-batch, averaged
    over its 8 outputs, written plainly on transformers' Llama (ratios past the clip on some tokens of the
    second; with --dual-clip 1.1 past its cap on some of Â < 0, and π_θ, π_old and π_ref at temperature 0.7 then);
    the logged loss is the mean of the two objectives, clip_frac the share of tokens whose policy gradient a clip
    zeroed, and the sampler's gap π_old's (~1e-7), not that of the weights the second update starts from."""
    import transformers

    import common
    import grpo
    import scripted_grpo
    signal = tmp_path / "signal.jsonl"  # the questions whose groups score [1, 1, 0, 0]: each mini-batch has signal
    signal.write_text("".join(line for line in open(problems) if zlib.crc32(json.loads(line)["question"].encode()) % 3))
    answers = {p["question"]: p["answer"] for p in problem_sets.load_problems(str(signal))}
    monkeypatch.setattr(scripted_grpo, "ANSWERS", answers)
    monkeypatch.setattr(scripted_grpo, "SAMPLER_LOGPROBS", True)
    seen, clip, updates = {}, common.clip_grad_norm, []

    def complete(model, tok, questions, *a, **k):
        seen["questions"], seen["comps"] = questions, scripted_grpo.scripted(model, tok, questions, *a, **k)
        return seen["comps"]

    def clip_and_keep(model, max_norm):
        updates.append({name: (p.detach().clone(), p.grad.clone()) for name, p in model.named_parameters()})
        return clip(model, max_norm)

    monkeypatch.setattr(engine, "complete", complete)
    monkeypatch.setattr(common, "clip_grad_norm", clip_and_keep)
    args = scripted_args(base, signal, tmp_path / "run", "--max-steps", "1", "--report-problems", "0",
                         "--mini-batches", "2", "--lr", "0.01", "--temperature", str(temperature),
                         *(("--dual-clip", str(dual_clip)) if dual_clip else ()))[1:]
    grpo.main(grpo.parse_args(args))
    assert len(updates) == 2

    tok, config, comps = Tokenizer.load(base), config_from_hf(base), seen["comps"]
    r = torch.tensor([reward.math_reward(c.text, answers[q]) for q, c in zip(seen["questions"], comps)]).view(-1, 4)
    std = r.std(1, keepdim=True)
    adv = torch.where(std > 0, (r - r.mean(1, keepdim=True)) / std, 0.0).flatten()
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        old = [sampled_logprobs(hf, tok, c, temperature) for c in comps]
    clipped, capped, objectives = 0, 0, []  # tokens where the clip binds, where the dual clip's cap binds
    for k, update in enumerate(updates):
        part = [i for i in range(len(comps)) if i // 4 % 2 == k]  # the outputs of questions k, k + 2
        weights = hf_layout({name: w for name, (w, _) in update.items()}, config)
        hf.load_state_dict({name: weights[name.removeprefix("model.")] for name in hf.state_dict()})
        hf.zero_grad()
        objectives.append(plain_objective(hf, tok, [comps[i] for i in part], adv[part], [old[i] for i in part],
                                          dual_clip=dual_clip, temperature=temperature))
        objectives[-1].backward()
        assert_same_gradient(hf, {name: g for name, (_, g) in update.items()}, config)
        with torch.no_grad():
            for i in part:
                wrote = torch.tensor(comps[i].sampled, dtype=bool)
                ratio = (sampled_logprobs(hf, tok, comps[i], temperature) - old[i]).exp()[wrote]
                clipped += ((ratio > 1.2) & (adv[i] > 0) | (ratio < 0.8) & (adv[i] < 0)).sum()
                capped += ((ratio > (dual_clip or float("inf"))) & (adv[i] < 0)).sum()
    assert clipped > 0 and (capped > 0) == bool(dual_clip)
    [row] = train_rows(tmp_path / "run")
    assert row["loss"] == pytest.approx(sum(objectives).item() / 2, rel=1e-4, abs=1e-6)
    assert row["clip_frac"] * sum(sum(c.sampled) for c in comps) == pytest.approx(clipped + capped, abs=0.5)
    assert row["logprob_gap_max"] < 1e-5
