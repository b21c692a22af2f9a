"""reward_model.py: the scalar head against transformers and through save/load, Math-Shepherd labels on a
hand-made case, AUC by hand, and the command line on 1 process and 2 FSDP ranks."""
import argparse
import copy
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import common
import engine
import reward_model
import sft
from engine import Completion, Generation
from model import ModelConfig, Transformer, packed_mask
from reward_model import Scored, auc, bce_loss, collate, outcome_examples, shepherd_examples, step_ends
from test_grpo_cli import grpo_args, run
from tokenizer import Tokenizer

TINY = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


def tiny_scorer(seed=0, vocab_size=97):
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**{**TINY, "vocab_size": vocab_size}, head="score"))
    m.init_weights()
    torch.nn.init.normal_(m.score.weight, std=0.5)  # a trained head, not the new one's zeros
    return m


def test_score_head_matches_transformers_and_survives_save_and_load(tmp_path):
    from transformers import AutoModelForSequenceClassification
    m = tiny_scorer()
    m.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["architectures"] == ["LlamaForSequenceClassification"]
    x = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        ours = m(x)  # (1, 11): a score at every position
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()(x).logits  # (1, 1): the last token
        back = Transformer.from_pretrained(tmp_path)(x)
    assert back.shape == ours.shape == (1, 11) and back.dtype == torch.float32
    torch.testing.assert_close(ours[:, -1:], hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back, ours)
    with pytest.raises(ValueError, match="no next-token log-probs"):
        m(x, x)


def test_a_reward_model_starts_from_a_language_models_body_with_a_zero_head(tmp_path):
    torch.manual_seed(0)
    lm = Transformer(ModelConfig(**TINY))
    lm.init_weights()
    lm.save_pretrained(tmp_path)
    state = common.initial_state(ModelConfig(**TINY, head="score"), str(tmp_path), seed=0)
    assert "lm_head.weight" not in state and not state["score.weight"].any()
    torch.testing.assert_close(state["layers.1.mlp.down_proj.weight"], lm.layers[1].mlp.down_proj.weight)


def test_auc_by_hand():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # 3 of the 4 pairs ordered right
    assert auc([0.5, 0.5, 0.9], [0, 1, 1]) == pytest.approx(0.75)  # a tie counts half
    assert auc([1.0, 0.0], [1, 0]) == 1.0 and auc([0.0, 1.0], [1, 0]) == 0.0
    assert math.isnan(auc([0.3, 0.4], [1, 1]))


TEXT = "Ava starts with 5.\n5 + 3 = 8\n8 - 2 = 7\nThe answer is \\boxed{7}."  # line 3 is wrong: 6 is right


def test_math_shepherd_labels_a_hand_made_solution(monkeypatch):
    """From the end of each line but the last, N = 4 continuations: after the two right lines, 3 and then 2 of
    them reach 6; after the wrong line none can. Soft labels are those fractions, hard ones whether any does;
    the last step is the completion's own outcome (wrong), and the arithmetic checker's truth rides along."""
    tok = Tokenizer.train([TEXT * 3, "The answer is \\boxed{6}."], 300)
    ids = tok.encode(TEXT, eos=True)
    comp = Completion(tok.encode("Q"), ids, [True] * len(ids), True, TEXT)
    steps = step_ends(tok, comp)
    assert [TEXT[:e] for _, e in steps] == [TEXT[:TEXT.index("\n", i)] for i in (0, 19, 29)] + [TEXT]
    for t, e in steps[:-1]:  # the token that holds each line's last character
        assert len(tok.decode(ids[:t])) < e <= len(tok.decode(ids[:t + 1]))
    right, wrong = tok.encode("\nThe answer is \\boxed{6}.", eos=True), tok.encode("\nThe answer is 9.", eos=True)
    plan = {steps[0][0]: 3, steps[1][0]: 2, steps[2][0]: 0}  # continuations that reach the gold, per prefix

    def scripted(model, prompts, max_new_tokens, **kw):
        tokens = []
        for p in prompts:
            t = len(p) - len(comp.prompt) - 1  # the prefix ends at token t of the completion
            k = sum(1 for q in prompts[:len(tokens)] if q == p)  # which of its copies this one is
            tokens.append(right if k < plan[t] else wrong)
        return Generation(tokens, [True] * len(prompts), *([[0.0] * len(x) for x in tokens] for _ in range(2)))

    monkeypatch.setattr(engine, "generate", scripted)
    for hard, labels in ((False, [0.75, 0.5, 0.0, 0.0]), (True, [1.0, 1.0, 0.0, 0.0])):
        [ex] = shepherd_examples(None, tok, [comp], [0.0], ["6"], 4, hard, seed=0, batch=8, max_new_tokens=8)
        assert ex.labels == labels
        assert ex.at == [len(comp.prompt) + t for t, _ in steps]
        assert ex.truth == [None, 1.0, 0.0, 0.0]  # "starts with" cannot be checked; 5+3=8 right; 8-2=7 wrong


def test_steps_are_the_written_lines_once_each_with_offsets_in_characters():
    """A blank line is no step; a line whose last token ends a completion cut at its budget (no EOS) is its
    last step, once; offsets count characters where tokens hold bytes (− and × take 3 and 2); the end of a text
    whose last token is a broken character (more bytes decoded than the tokens hold) falls on the last token."""
    text = "Ava’s café: 5 × 3 − 1 = 14 − 0 = 14.\n\n14 − 2 = 12.\n"  # tokens ".\n\n", ".\n"
    tok = Tokenizer.train([text * 3], 300)
    ids = tok.encode(text)
    comp = Completion(tok.encode("Q"), ids, [True] * len(ids), False, text)
    steps = step_ends(tok, comp)
    assert [e for _, e in steps] == [text.index("\n"), len(text)] and steps[-1][0] == len(ids) - 1
    t, e = steps[0]  # the token that holds the first line's last character
    assert len(tok.decode(ids[:t])) < e <= len(tok.decode(ids[:t + 1]))
    cut = ids[:3] + [tok.id_to_bytes.index(b"\xc3")]  # cut inside a character: decoded as U+FFFD, 3 bytes
    assert reward_model.token_index(tok, cut, [len(tok.decode(cut))]) == [len(cut) - 1]


def test_collate_and_loss_train_only_the_labelled_positions():
    ex = outcome_examples([Completion([1, 2], [3, 4, 5], [True] * 3, True, "")], [1.0])
    ex.append(Scored([1, 2, 3], [1, 2], [0.25, 1.0], [None, 1.0]))
    x, y, m, seg = collate(ex, pad_id=0)
    assert x.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 0, 0]] and m.sum() == 3
    assert y[0, 4] == 1.0 and y[1, 1] == 0.25 and m[0, 4] and m[1, 1] and m[1, 2]
    assert seg.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, -1, -1]]  # the second does not say where its completion starts
    model = tiny_scorer()
    losses = bce_loss(model, x, y, seg)
    with torch.no_grad():
        p = torch.sigmoid(model(x))[1, 1]
    assert losses[1, 1].item() == pytest.approx(-(0.25 * math.log(p) + 0.75 * math.log(1 - p)), rel=1e-5)
    assert reward_model.scores(model, ex, pad_id=0)[1] == pytest.approx(torch.sigmoid(model(x))[1, 1:3].tolist())


def tiny_implicit(beta=0.5):
    """An implicit outcome model whose π_φ is π_ref with noise added: scores away from 0."""
    torch.manual_seed(0)
    ref = Transformer(ModelConfig(**TINY))
    ref.init_weights()
    policy = Transformer(ModelConfig(**TINY))
    policy.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in ref.state_dict().items()})
    return reward_model.ImplicitReward(policy, ref, beta)


def test_a_loaded_reward_model_is_frozen_in_bf16_unless_refreshed(tmp_path, group_of_one):
    """In bf16, what GRPO only reads of a reward model is kept in bf16 (common.build_model(frozen=True)); what
    --rm-refresh trains keeps fp32 master weights; the implicit form's reference is frozen either way."""
    rm = tiny_implicit()
    rm.policy.save_pretrained(tmp_path / "implicit")
    rm.ref.save_pretrained(tmp_path / "implicit" / "reference")
    (tmp_path / "implicit" / reward_model.IMPLICIT).write_text('{"beta": 0.5}')
    tiny_scorer().save_pretrained(tmp_path / "head")
    d = common.one_process("cpu", torch.bfloat16)
    for refreshed in (False, True):
        models = reward_model.load(str(tmp_path / "implicit"), d, 0, refreshed=refreshed)
        head = reward_model.load(str(tmp_path / "head"), d, 0, refreshed=refreshed)
        for m, trains in ((models.policy, refreshed), (models.ref, False), (head, refreshed)):
            assert {(p.dtype, p.requires_grad) for p in m.parameters()} == {
                (torch.float32, True) if trains else (torch.bfloat16, False)}


def test_the_implicit_score_is_beta_times_the_log_ratio_summed_over_the_completion():
    """Against float64 log-softmaxes of each model's logits on prompt + completion alone, token by token: the
    score after completion token t is β Σ_{s ≤ t} log π_φ(o_s)/π_ref(o_s), 0 on the prompt; packed rows (GRPO's
    groups behind one prompt) give each completion its own sums; with π_φ = π_ref it is 0."""
    rm = tiny_implicit()
    prompt = [1, 5, 9, 2]
    comps = [Completion(prompt, torch.randint(3, 97, (n,)).tolist(), [True] * n, True, "") for n in (5, 2, 7)]
    want = []
    with torch.no_grad():
        for c in comps:
            x = torch.tensor([c.prompt + c.ids])
            lp = [torch.log_softmax(m(x)[0].double(), -1) for m in (rm.policy, rm.ref)]
            P = len(c.prompt)
            ratio = [(lp[0][t - 1, x[0, t]] - lp[1][t - 1, x[0, t]]).item() for t in range(P, x.shape[1])]
            want.append([0.0] * P + [rm.beta * sum(ratio[:k + 1]) for k in range(len(ratio))])
    ex = outcome_examples(comps, [1.0, 0.0, 1.0])
    x, _, _, seg = collate(ex, pad_id=0)
    with torch.no_grad():
        got = rm(x, seg)
    for i, w in enumerate(want):
        assert got[i, :len(w)].tolist() == pytest.approx(w, abs=1e-5)
        assert abs(w[-1]) > 0.05  # the noise moved the score: the comparison can fail
    at = [list(range(len(c.ids))) for c in comps]
    packed = reward_model.packed_scores(rm, comps, at, pad_id=0, pack=3, batch=8)
    for p, w, c in zip(packed, want, comps):
        assert p == pytest.approx(torch.sigmoid(torch.tensor(w[len(c.prompt):])).tolist(), abs=1e-5)
    same = reward_model.ImplicitReward(rm.ref, rm.ref, 0.5)
    with torch.no_grad():
        assert not same(x, seg).any()


def test_the_implicit_form_trains_its_language_model_and_never_its_reference():
    rm = tiny_implicit()
    ex = outcome_examples([Completion([1, 2], [3, 4, 5], [True] * 3, True, "")], [1.0])
    x, y, m, seg = collate(ex, pad_id=0)
    (bce_loss(rm, x, y, seg) * m).sum().backward()
    assert rm.policy.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in rm.ref.parameters())


def test_the_implicit_gradient_equals_the_full_logits_path_in_float64():
    """The BCE's gradient in every π_φ parameter, from hidden states a chunk at a time (model.forward(targets,
    at=...): the logits never whole), against the same score built from float64 log-softmaxes of the whole
    logits, token by token, on packed rows: two completions behind one prompt, a label at each one's last token."""
    rm = tiny_implicit()
    prompt, ids = [1, 5, 9, 2], [[7, 3, 11, 4], [8, 12]]
    x = torch.tensor([prompt + ids[0] + ids[1]])
    seg = torch.tensor([[0] * 4 + [1] * 4 + [2] * 2])
    positions = torch.tensor([list(range(8)) + [4, 5]])
    y, ends = torch.tensor([1.0, 0.0]), [7, 9]
    F.binary_cross_entropy_with_logits(rm(x, seg, positions)[0, ends], y, reduction="sum").backward()
    got = {k: p.grad.clone() for k, p in rm.policy.named_parameters()}
    policy64, ref64 = (copy.deepcopy(m).double() for m in (rm.policy, rm.ref))
    policy64.zero_grad()
    mask = packed_mask(seg)
    lp = [torch.log_softmax(m(x, positions=positions, mask=mask)[0], -1) for m in (policy64, ref64)]
    prev = {4: 3, 8: 3}  # each completion's first token from the prompt's last position
    score = [rm.beta * sum(lp[0][prev.get(t, t - 1), x[0, t]] - lp[1][prev.get(t, t - 1), x[0, t]].detach()
                           for t in span) for span in (range(4, 8), range(8, 10))]
    F.binary_cross_entropy_with_logits(torch.stack(score), y.double(), reduction="sum").backward()
    for k, p in policy64.named_parameters():
        torch.testing.assert_close(got[k].double(), p.grad, rtol=1e-4, atol=1e-6, msg=k)
    assert got["lm_head.weight"].abs().sum() > 1e-3


def test_the_memory_plan_counts_the_implicit_forms_reference(tmp_path):
    import grpo
    (tmp_path / "implicit").mkdir()
    (tmp_path / "implicit" / reward_model.IMPLICIT).write_text('{"beta": 0.05}')
    (tmp_path / "head").mkdir()
    args = argparse.Namespace(reward="orm", reward_model=[str(tmp_path / "implicit"), str(tmp_path / "head")])
    assert grpo.scoring_models(args) == 3
    assert grpo.scoring_models(argparse.Namespace(reward="rule", reward_model=None)) == 0


def test_auto_checkpointing_plans_for_the_implicit_forms_reference(monkeypatch, tmp_path):
    """reward_model.train's plan for --activation-checkpointing auto, at 7B on 8 GPUs: the implicit form holds π_φ
    trained and π_ref frozen beside it (one more shard of 7B / 8, in bf16: frozen), the head form one model."""
    import memory
    from model import PRESETS
    config, seen = ModelConfig(**PRESETS["deepseek-math-7b"]), {}

    def plan_only(mode, d, n_layers, peak_of):
        seen[form] = peak_of(0)
        raise StopIteration
    monkeypatch.setattr(common, "checkpointed_blocks", plan_only)
    examples = [Scored(list(range(1000)), [999], [1.0], [1.0], start=500)]
    for form in ("implicit", "head"):
        args = argparse.Namespace(orm_form=form, lr=None, out_dir=str(tmp_path), activation_checkpointing="auto",
                                  micro_batch=2)
        with pytest.raises(StopIteration):
            reward_model.train("orm", examples, [], [], config, None, args, common.Dist(0, 8, torch.device("cpu")))
    lm = memory.train_plan(config, 8, 2, 1000, 0)
    assert seen["implicit"] == memory.train_peak(lm) + 2 * 6_910_365_696 / 8
    # the head form has no LM head: 16 bytes less (fp32 weight, gradient, two AdamW moments) per head weight
    assert seen["head"] < memory.train_peak(lm) - 0.9 * 16 * 102_400 * 4096 / 8


def test_the_report_gives_the_auc_within_questions_beside_the_auc_across_them(monkeypatch):
    """Question 0 ranked right, question 1 wrong way round, question 2 all right (no AUC): within, (1 + 0) / 2;
    across, 5 of the 12 right-wrong pairs in order."""
    final = [0.9, 0.2, 0.5, 0.3, 0.6, 0.1, 0.4]
    truth = [1, 0, 0, 1, 0, 1, 1]
    examples = [Scored([1, 2], [1], [float(t)], [float(t)]) for t in truth]
    monkeypatch.setattr(reward_model, "scores", lambda model, ex, pad_id: [[f] for f in final])
    row = reward_model.report(None, examples, 0, questions=[0, 0, 0, 1, 1, 2, 2])
    assert row["group_auc"] == 0.5 and row["mixed_questions"] == 2
    assert row["outcome_auc"] == pytest.approx(5 / 12) and row["outcome_accuracy"] == pytest.approx(3 / 7)
    # a process model's step AUC: over the steps the checker judged (truth not None), never the last (the outcome)
    examples = [Scored([1, 2, 3], [0, 1, 2], [0.0] * 3, truth) for truth in ([1.0, None, 0.0], [0.0, 1.0, 1.0])]
    monkeypatch.setattr(reward_model, "scores", lambda model, ex, pad_id: [[0.8, 0.5, 0.1], [0.3, 0.9, 0.2]])
    row = reward_model.report(None, examples, 0)
    assert row["step_auc"] == 1.0 and row["steps_checked"] == 3


def test_policy_sources_read_a_temperature_after_the_last_at():
    assert reward_model.policy_sources(["out/sft", "runs/a@b/grpo@0.7"]) == [("out/sft", 1.0), ("runs/a@b/grpo", 0.7)]
    with pytest.raises(SystemExit, match="--policy out@hot: expected DIR or DIR@TEMPERATURE"):
        reward_model.policy_sources(["out@hot"])


def test_samples_from_several_policies_come_question_by_question_each_kept_once(base):
    """Each source's samples of a question in turn, a repeated completion of a question kept once: greedy
    sources give one completion per question, the greedy one; a sampled source's come first, then greedy's
    unless a sample already was it."""
    tok = Tokenizer.load(base)
    problems = [dict(question=f"What is {a} + 3?", answer=str(a + 3)) for a in range(3)]
    args = argparse.Namespace(samples=2, max_new_tokens=8, seed=0, gen_batch=4)
    cpu, model = common.Dist(0, 1, torch.device("cpu")), Transformer.from_pretrained(base)
    greedy = engine.complete(model, tok, [p["question"] for p in problems], max_new_tokens=8)
    comps, outcomes, golds, qids = reward_model.sample_completions([(base, 0.0), (base, 0.0)], tok, problems, args,
                                                                   cpu)
    assert qids == [0, 1, 2] and golds == ["3", "4", "5"] and [c.ids for c in comps] == [c.ids for c in greedy]
    sampled = engine.complete(model, tok, [p["question"] for p in problems for _ in range(2)], "cot", 8, 1.0,
                              seed=engine.sampling_seed(0), batch=4)
    want, want_q = [], []
    for q in range(3):
        for ids in [c.ids for c in sampled[2 * q:2 * q + 2]] + [greedy[q].ids]:
            if ids not in want[len(want_q) - want_q.count(q):]:
                want.append(ids)
                want_q.append(q)
    comps, _, _, qids = reward_model.sample_completions([(base, 1.0), (base, 0.0)], tok, problems, args, cpu)
    assert [c.ids for c in comps] == want and qids == want_q and len(set(map(tuple, want))) > 3
    assert reward_model.first_per_question(qids, 1) == [want_q.index(q) for q in range(3)]


def rm_args(base, data_dir, out, *extra):
    return ["reward_model.py", "--init", str(base), "--policy", str(base), "--data", str(data_dir / "train.jsonl"),
            "--eval-data", str(data_dir / "test.jsonl"), "--questions", "8", "--samples", "2",
            "--shepherd-samples", "2", "--max-new-tokens", "12", "--max-steps", "2", "--batch", "4",
            "--micro-batch", "2", "--out-dir", str(out), *extra]


@pytest.mark.parametrize("ranks", [1, 2])
def test_reward_models_train_and_report_on_1_and_2_ranks(base, data_dir, tmp_path, ranks):
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if ranks == 2 else []
    r = run([*launch, *rm_args(base, data_dir, tmp_path, "--drift", f"{base}@0.5")])
    assert r.returncode == 0, r.stderr[-3000:]
    lr = {}
    for kind in ("orm", "prm"):
        rows = [json.loads(line) for line in open(tmp_path / kind / "metrics.jsonl")]
        assert [row["step"] for row in rows] == [1, 2] and all(math.isfinite(row["loss"]) for row in rows)
        lr[kind] = [row["lr"] for row in rows]
        rep = json.load(open(tmp_path / kind / "report.json"))
        # held out: one question, its 2 samples, for the process model each with its steps' labels estimated
        assert rep["examples"] == 2 and 0 <= rep["outcome_accuracy"] <= 1
        assert rep["drift"]["examples"] == 2  # --drift's 2 samples of the held-out question
    assert lr["orm"] == pytest.approx([x * 1e-4 / 2e-4 for x in lr["prm"]])  # default peaks: implicit 1e-4, head 2e-4
    m = Transformer.from_pretrained(tmp_path / "prm")
    assert m.config.head == "score" and m.score.weight.any()  # trained away from its zero start
    # the outcome model's default form: a language model trained away from its reference, which is --init's
    assert json.load(open(tmp_path / "orm" / "implicit.json")) == {"beta": 0.05}
    policy, ref = (Transformer.from_pretrained(tmp_path / "orm" / sub) for sub in ("", "reference"))
    start = Transformer.from_pretrained(base)
    assert policy.config.head == "lm" and not torch.equal(policy.lm_head.weight, ref.lm_head.weight)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), start.state_dict().values()))


def test_a_resumed_reward_model_reads_its_labelled_examples_back(base, data_dir, tmp_path):
    """--resume does not sample and label again: with the policy's weights gone, the run resumed at its last
    step (nothing left to train) exports the same models with the same reports, made from examples.jsonl and
    held_out.jsonl (the held-out and --drift examples); other data settings are refused in one line."""
    policy = tmp_path / "policy"
    shutil.copytree(base, policy)
    args = rm_args(base, data_dir, tmp_path / "rm", "--policy", str(policy), "--drift", f"{policy}@0.5")
    r = run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = {kind: json.load(open(tmp_path / "rm" / kind / "report.json")) for kind in ("orm", "prm")}
    (policy / "model.safetensors").unlink()
    r = run([*args, "--resume"])
    assert r.returncode == 0 and "read back, not sampled again" in r.stdout, r.stderr[-3000:]
    for kind, want in reports.items():
        assert json.load(open(tmp_path / "rm" / kind / "report.json")) == want
    for flag, was, now in (("questions", 8, 6), ("samples", 2, 3)):
        r = run([*args, "--resume", f"--{flag}", str(now)])
        assert r.returncode == 1, r.stderr[-3000:]
        assert f"{flag} was {was}, now {now}" in r.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def reward_models(base, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    r = run(rm_args(base, data_dir, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("kind", ["orm", "prm"])
def test_grpo_with_a_learned_reward_refreshed_each_iteration(base, data_dir, reward_models, tmp_path, kind,
                                                             ranks):
    """--reward orm|prm scores the rollouts with the model (the rule's reward logged beside it); --rm-refresh 1
    after each step samples 5 questions x 5, labels them by the rule, and trains the reward model on them with a
    replay of what it learned from before, a tenth of the mixture: 3 of 28 (25 / 9 rounded; 25 / 10 would round
    to 2). --ref-reset 1: each step starts from
    π_ref = π_θ, so its KL is 0 (the update comes after the forward it is measured in)."""
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if ranks == 2 else []
    r = run([*launch, *grpo_args(base, data_dir, tmp_path, "--max-steps", "2", "--eval-every", "0",
                                 "--report-problems", "0", "--reward", kind, "--reward-model",
                                 str(reward_models / kind), "--ref-reset", "1", "--rm-refresh", "1",
                                 "--rm-questions", "5", "--rm-samples", "5", "--rm-steps", "2", "--rm-batch", "4",
                                 "--shepherd-samples", "2")])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(0 < row["reward"] < 1 and 0 <= row["rule_reward"] <= 1 for row in rows)  # σ(score), and the rule's
    for row in rows:  # each step ends an iteration
        assert row["rm_new"] == 25 and row["rm_replay"] == 3 and math.isfinite(row["rm_loss_last"])
        assert len(open(tmp_path / "rm_history" / f"step_{row['step']:06d}.jsonl").readlines()) == 25
        assert row["kl"] == pytest.approx(0, abs=1e-7)


def test_a_refresh_without_a_reference_reset_keeps_the_reference(base, data_dir, reward_models, tmp_path):
    """--rm-refresh 2 alone: the reward model is retrained after step 2, not 1, and π_ref stays the start, so
    step 2 measures a KL to it (the KL of the test above, whose reference follows the policy, is 0)."""
    r = run(grpo_args(base, data_dir, tmp_path, "--max-steps", "2", "--eval-every", "0", "--report-problems", "0",
                      "--reward", "orm", "--reward-model", str(reward_models / "orm"), "--rm-refresh", "2",
                      "--rm-questions", "6", "--rm-samples", "2", "--rm-steps", "2", "--rm-batch", "4"))
    assert r.returncode == 0, r.stderr[-2000:]
    first, second = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert "rm_new" not in first and second["rm_new"] == 12
    assert first["kl"] == pytest.approx(0, abs=1e-7) and second["kl"] > 1e-5


def test_an_ensemble_scores_by_the_mean_or_the_lowest_verdict():
    a, b = torch.tensor([0.2, 0.9]), torch.tensor([0.4, 0.5])
    assert reward_model.ensemble([a, b], "orm").tolist() == pytest.approx([0.3, 0.7])
    assert reward_model.ensemble([a, b], "orm", "min").tolist() == pytest.approx([0.2, 0.5])
    p, q = [[(3, 0.2), (7, 0.9)], [(5, 0.6)]], [[(3, 0.4), (7, 0.5)], [(5, 0.1)]]  # per output, (token, score)
    for how, want in (("mean", [0.3, 0.7, 0.35]), ("min", [0.2, 0.5, 0.1])):
        got = reward_model.ensemble([p, q], "prm", how)
        assert [t for out in got for t, _ in out] == [3, 7, 5]
        assert [x for out in got for _, x in out] == pytest.approx(want)


def test_packed_scores_are_each_completions_own_and_the_prompt_runs_once(monkeypatch):
    """GRPO's groups scored `pack` completions to a row behind one copy of their prompt give, at every position
    asked, what the model gives prompt + completion alone; rows break at a new prompt and after `pack`."""
    torch.manual_seed(1)
    model = tiny_scorer()
    prompts = [[1, 5, 9, 2], [1, 7, 3]]
    comps = [Completion(p, torch.randint(3, 97, (n,)).tolist(), [True] * n, True, "")
             for p, lengths in zip(prompts, ([5, 2, 7, 1], [3, 6])) for n in lengths]  # groups of 4 and 2
    at = [[0, len(c.ids) - 1] for c in comps]
    alone = []
    with torch.no_grad():
        for c, a in zip(comps, at):
            s = torch.sigmoid(model(torch.tensor([c.prompt + c.ids])))[0]
            alone.append(s[[len(c.prompt) + t for t in a]].tolist())
    ran = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x, **kw: ran.append(x.shape) or forward(x, **kw))
    for pack in (1, 3, 4):
        ran.clear()
        got = reward_model.packed_scores(model, comps, at, pad_id=0, pack=pack, batch=64)
        assert len(got) == len(comps)
        for g, want in zip(got, alone):
            assert g == pytest.approx(want, abs=1e-6)
        rows = {1: 6, 3: 3, 4: 2}[pack]  # 4 + 2 completions: [3, 1] + [2] rows at pack 3, [4] + [2] at 4
        assert sum(shape[0] for shape in ran) == rows



def test_a_reward_models_verdicts_are_its_scores_at_the_answer_and_at_each_step():
    """model_rewards: an outcome model's σ(score) at each output's last token, a process model's at the last
    token of each step (step_ends), both as the model gives them on prompt + output alone."""
    tok = Tokenizer.train([TEXT * 3], 300)
    model = tiny_scorer(seed=2, vocab_size=300)
    prompt = tok.encode("Q")
    comps = [Completion(prompt, ids, [True] * len(ids), True, TEXT)
             for ids in (tok.encode(TEXT, eos=True), tok.encode(TEXT[:30], eos=True))]
    with torch.no_grad():
        alone = [torch.sigmoid(model(torch.tensor([c.prompt + c.ids])))[0, len(prompt):].tolist() for c in comps]
    orm = reward_model.model_rewards(model, tok, comps, "orm", batch=4)
    assert orm.tolist() == pytest.approx([a[-1] for a in alone], abs=1e-6)
    prm = reward_model.model_rewards(model, tok, comps, "prm", batch=4, pack=2)
    for got, c, a in zip(prm, comps, alone):
        assert [t for t, _ in got] == [t for t, _ in step_ends(tok, c)] and got[-1][0] == len(c.ids) - 1
        assert [x for _, x in got] == pytest.approx([a[t] for t, _ in got], abs=1e-6)


def test_each_rank_fits_its_own_share_of_the_steps_batch(monkeypatch):
    """fit_step on 2 ranks: each trains on half of the step's examples (sft.step_examples), the halves disjoint,
    shortest first so that similar lengths share a micro-batch."""
    examples = [Scored([i] * (1 + i % 5), [0], [1.0], [1.0]) for i in range(1, 25)]  # ids name the example
    shares = {}

    def train_step(model, opt, micro, d, optim, step, loss_of):
        shares[d.rank] = [int(x[0]) for batch in micro for x in batch[0]]
        return 0.0, 0.0, 0
    monkeypatch.setattr(common, "train_step", train_step)
    for rank in (0, 1):
        reward_model.fit_step(None, None, None, examples, 3, common.Dist(rank, 2, torch.device("cpu")), batch=8,
                              micro_batch=2, seed=5, pad_id=0)
    step = [e.ids[0] for e in sft.step_examples(examples, 3, 8, 5)]
    assert shares[0] == sorted(step[:4], key=lambda i: i % 5) and shares[1] == sorted(step[4:], key=lambda i: i % 5)

def test_grpo_with_an_ensemble_of_one_model_twice_scores_as_the_model(base, data_dir, reward_models, tmp_path):
    """--reward-model A A: each model's verdicts combined (here the lowest of two equal ones) are the model's."""
    rows = {}
    for name, dirs in (("one", [reward_models / "orm"]), ("two", [reward_models / "orm"] * 2)):
        r = run(grpo_args(base, data_dir, tmp_path / name, "--max-steps", "1", "--eval-every", "0",
                          "--report-problems", "0", "--reward", "orm", "--rm-ensemble", "min", "--reward-model",
                          *map(str, dirs)))
        assert r.returncode == 0, r.stderr[-2000:]
        [rows[name]] = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl") if '"loss"' in line]
    assert 0 < rows["one"]["reward"] < 1 and rows["one"]["reward"] == rows["two"]["reward"]
    assert rows["one"]["loss"] == pytest.approx(rows["two"]["loss"], rel=1e-6)


def test_iterative_grpo_resumes_with_its_refreshed_reward_model_and_replay_pool(base, data_dir, reward_models,
                                                                                tmp_path):
    """The checkpoint after a refresh holds the refreshed reward model; the replay pool is read back from
    rm_history up to the checkpoint's step: stopped after step 1 and resumed, step 2 is the uninterrupted one."""
    flags = ("--eval-every", "0", "--report-problems", "0", "--reward", "orm", "--reward-model",
             str(reward_models / "orm"), "--ref-reset", "1", "--rm-refresh", "1", "--rm-questions", "6", "--rm-samples",
             "2", "--rm-steps", "2", "--rm-batch", "4")
    for out, steps in (("a", 2), ("b", 1)):
        r = run(grpo_args(base, data_dir, tmp_path / out, "--max-steps", str(steps), *flags))
        assert r.returncode == 0, r.stderr[-2000:]
    r = run(grpo_args(base, data_dir, tmp_path / "b", "--max-steps", "2", "--resume", *flags))
    assert r.returncode == 0, r.stderr[-2000:]
    keys = ("reward", "rule_reward", "loss", "kl", "rm_replay", "rm_loss_first", "rm_loss_last")
    a, b = ([json.loads(line) for line in open(tmp_path / k / "metrics.jsonl") if '"loss"' in line] for k in "ab")
    assert [row["step"] for row in b] == [1, 2]
    for x, y in zip(a, b):
        assert [x[k] for k in keys] == pytest.approx([y[k] for k in keys], rel=1e-4, abs=1e-6)
