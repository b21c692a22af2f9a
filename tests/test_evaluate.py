"""evaluate.py: pass@k and maj@k against brute force, the sandbox in the loop for PoT and tool-integrated
answers (with a scripted model), and a real model end to end."""
import itertools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import common
import engine
import evaluate
import jsonl
from engine import Generation
from model import ModelConfig, Transformer
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    text = "User: Assistant: The answer is \\boxed{42}. ```python\nprint(6 * 7)\n```\n```output\n42\n```\n" * 20
    return Tokenizer.train([text, "0123456789 abcdefghijklmnopqrstuvwxyz"], 300)


def test_pass_at_k_is_the_unbiased_estimate():
    """pass@k = the chance that k samples drawn without replacement from the n contain a correct one."""
    for n, c, k in [(8, 0, 1), (8, 3, 1), (8, 3, 4), (8, 7, 2), (5, 5, 5), (10, 1, 8), (8, 4, 4), (2, 1, 1)]:
        draws = list(itertools.combinations([True] * c + [False] * (n - c), k))
        assert evaluate.pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))
    assert evaluate.pass_at_k(8, 3, 1) == pytest.approx(3 / 8)


def test_majority_vote_groups_equal_answers_and_skips_missing_ones():
    assert evaluate.majority_correct(["41", "42", "42", None, None, None], [False, True, True, False, False, False])
    assert not evaluate.majority_correct(["41", "42"], [False, True])  # a tie goes to the answer seen first
    assert evaluate.majority_correct(["41", "$42$", "42"], [False, True, True])  # normalised before voting
    assert not evaluate.majority_correct([None, None], [False, False])
    records = [dict(correct=[True, False, False, False], answers=["1", "2", "2", "3"])]
    m = evaluate.summarize(records, [1, 2, 4])
    assert m["accuracy"] == 0.25 and m["maj@1"] == 1.0 and m["maj@4"] == 0.0
    assert m["pass@4"] == 1.0 and m["pass@2"] == pytest.approx(0.5)


def test_arithmetic_report_counts_lines_and_how_often_each_fact_is_right():
    right, wrong = "12 + 5 = 17\n17 * 2 = 34", "12 + 5 = 18\n18 / 3 = 6"
    records = [dict(completions=[right] * 3 + [wrong], correct=[True] * 3 + [False]),
               dict(completions=["9 - 9 = 1"] * 4 + ["no steps"], correct=[False] * 5),
               dict(completions=["2 + 2 = 4", "2 + 2 = 5"] * 2, correct=[True, True, False, False])]
    r = evaluate.arithmetic_report(records)
    assert r["lines"] == 16 and r["lines_right"] == pytest.approx(9 / 16)
    assert r["wrong_answers"] == 8 and r["wrong_with_bad_line"] == 6  # a right answer's bad line is not counted
    # 12 + 5: right 3 of 4; 9 - 9: never; 2 + 2: exactly half; 17 * 2 and 18 / 3 were met fewer than 4 times
    assert (r["facts"], r["facts_never"], r["facts_below_half"], r["facts_half_or_more"], r["facts_always"]) == \
        (3, 1, 0, 2, 0)
    assert evaluate.arithmetic_report([dict(completions=["The answer is 4."], correct=[False])]) is None


def no_logprobs(tokens):
    """A scripted model's log-probs, or its entropies: 0 (it is certain), one per token, as generate returns
    them."""
    return [[0.0] * len(t) for t in tokens]


class Scripted:
    """A stand-in model whose generate() plays back fixed texts, one per call, for every row."""

    def __init__(self, tok, turns):
        self.tok, self.turns, self.calls, self.training = tok, list(turns), [], False
        self.lm_head = torch.nn.Linear(1, 1)
        self.config = ModelConfig(max_seq_len=4096)

    def eval(self):
        return self.train(False)

    def train(self, mode=True):
        self.training = mode
        return self

    def generate(self, prompts, budgets, stop=(), eos_ids=(), **kw):
        self.calls.append(dict(prompts=prompts, stop=stop, budgets=budgets, streams=kw["streams"]))
        text, eos = self.turns.pop(0)
        ids = self.tok.encode(text) + ([self.tok.eos_id] if eos else [])
        tokens = [ids[:b] for b in budgets]
        kept = [[[t] + [-1] * (kw["top_k"] - 1) for t in ts] for ts in tokens] if kw.get("keep") else None
        return Generation(tokens=tokens, finished=[eos or bool(stop)] * len(prompts), logprobs=no_logprobs(tokens),
                          entropies=no_logprobs(tokens), kept=kept)


@pytest.fixture(autouse=True)
def scripted_models_generate_themselves(monkeypatch):
    """engine.complete decodes with a Decoder's generate; a stand-in model plays its script instead."""
    real = engine.Decoder.generate
    monkeypatch.setattr(engine.Decoder, "generate", lambda self, *a, **kw: self.model.generate(*a, **kw)
                        if isinstance(self.model, Scripted) else real(self, *a, **kw))


class Oracle(Scripted):
    """Answers "What is i + 1?" right when i is even; on odd i, right only in the first of every 4 samples it
    is asked for (per question), so every score below is known in advance."""

    def __init__(self, tok):
        super().__init__(tok, [])
        self.asked = {}

    def generate(self, prompts, budgets, stop=(), eos_ids=(), **kw):
        assert not self.training, "evaluate generates in eval mode"
        out = []
        for p in prompts:
            i = int(re.search(r"What is (\d+)", self.tok.decode(p))[1])
            n = self.asked[i] = self.asked.get(i, -1) + 1
            answer = i + 1 if i % 2 == 0 or n % 4 == 0 else i + 2
            out.append(self.tok.encode(f"So the answer is \\boxed{{{answer}}}.") + [self.tok.eos_id])
        return Generation(tokens=out, finished=[True] * len(out), logprobs=no_logprobs(out), entropies=no_logprobs(out))


def test_scores_of_a_model_whose_accuracy_is_known(tok):
    problems = [dict(question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(8)]
    m, records = evaluate.evaluate(Oracle(tok), tok, problems, samples=4, temperature=1.0, max_new_tokens=16)
    # even questions: 4 of 4 right; odd ones: the first sample of 4 only
    assert m["accuracy"] == pytest.approx((4 * 4 + 4 * 1) / 32)
    assert m["pass@1"] == pytest.approx(20 / 32) and m["pass@4"] == 1.0
    assert m["maj@1"] == 1.0 and m["maj@4"] == 0.5  # odd questions: 3 wrong votes beat 1 right one
    assert [r["correct"] for r in records][1] == [True, False, False, False]
    oracle = Oracle(tok).train()
    m, _ = evaluate.evaluate(oracle, tok, problems)  # greedy: one sample each, the first: all right
    assert m["accuracy"] == 1.0 and oracle.training  # evaluated in eval mode, handed back in training mode
    d = common.Dist(0, 1, torch.device("cpu"))
    assert evaluate.held_out_metrics(Oracle(tok), tok, problems, d, samples=4, temperature=1.0)["accuracy"] == 20 / 32


def test_held_out_metrics_are_means_over_problems_not_over_ranks(tok, monkeypatch):
    """Rank r evaluates problems[r::world]: 3 problems on 2 ranks are 2 and 1, and the mean is over the problems
    (9 of 12 samples right here), not over the ranks (a mean of their accuracies, 1.0 and 0.25, is 0.625). Each
    rank's term of the all_sum is taken as it is, and the two ranks are summed here."""
    problems = [dict(question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(3)]
    monkeypatch.setattr(common, "all_sum", lambda d, x: x)
    terms = [evaluate.held_out_metrics(Oracle(tok), tok, problems, common.Dist(r, 2, torch.device("cpu")), samples=4,
                                       temperature=1.0)["accuracy"] for r in range(2)]
    assert sum(terms) == pytest.approx(9 / 12)


def test_held_out_metrics_on_ranks_sample_what_one_process_samples(tok, monkeypatch):
    """At T > 0 each rank draws problem j's samples from the streams of j's place in the whole set, so 2 ranks'
    terms add up to one process's metrics, sample for sample (a random model answers nothing: a stand-in verdict
    reads the sampled text here, right when its length is even)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=64,
                                    max_seq_len=128))
    model.init_weights()
    problems = [dict(question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(6)]
    monkeypatch.setattr(evaluate.reward, "batch_rewards", lambda texts, golds, workers=1: [
        float(len(t) % 2 == 0) for t in texts])
    kw = dict(samples=4, temperature=1.0, max_new_tokens=8)
    whole = evaluate.held_out_metrics(model, tok, problems, common.Dist(0, 1, torch.device("cpu")), **kw)
    monkeypatch.setattr(common, "all_sum", lambda d, x: x)
    terms = [evaluate.held_out_metrics(model, tok, problems, common.Dist(r, 2, torch.device("cpu")), **kw)
             for r in range(2)]
    assert 0 < whole["accuracy"] < 1
    assert {k: terms[0][k] + terms[1][k] for k in whole} == pytest.approx(whole)


def test_metrics_by_type_and_level_whatever_the_levels_are_written_as():
    """MATH writes levels as "Level 3" (and "Level ?"), other sets as numbers: each is a group by its text."""
    def record(correct, **kw):
        return dict(correct=correct, answers=["1" if c else "2" for c in correct], **kw)
    records = [record([True, False], type="Algebra", level="Level 1"), record([True, True], type="Algebra", level=3),
               record([False, False], type="Geometry", level=3), record([True, False], level="Level ?")]
    m = evaluate.metrics_of(records)
    assert m["accuracy"] == pytest.approx((0.5 + 1 + 0 + 0.5) / 4) and m["pass@2"] == pytest.approx(3 / 4)
    assert {g: v["accuracy"] for g, v in m["by_level"].items()} == {"3": 0.5, "Level 1": 0.5, "Level ?": 0.5}
    assert {g: (v["problems"], v["maj@2"]) for g, v in m["by_type"].items()} == {"Algebra": (2, 1.0),
                                                                                  "Geometry": (1, 0.0)}


def test_what_a_stopped_evaluation_must_share_to_go_on(capsys):
    """The flags that change a prediction are in its settings (a run goes on only from one with the same); the
    size of the set, the batch, the grading workers, compiling and the output's name change none. Sampler cuts
    that leave no token are refused."""
    def settings(*flags, temperature=0.0, dtype=torch.float32):
        return evaluate.settings_of(evaluate.parse_args(list(flags)), temperature, dtype)
    base = settings()
    for flags in (["--model", "other"], ["--data", "other.jsonl"], ["--prompt", "tool"], ["--samples", "4"],
                  ["--top-p", "0.9"], ["--top-k", "5"], ["--min-p", "0.1"], ["--max-new-tokens", "9"], ["--seed", "1"],
                  ["--question-field", "q"], ["--answer-field", "a"], ["--solution-field", "s"], ["--chat-template"],
                  ["--system", "Hi."], ["--device", "cuda"]):
        assert settings(*flags) != base, flags
    assert settings(temperature=0.7) != base and settings(dtype=torch.bfloat16) != base
    for flags in (["--limit", "5"], ["--batch", "8"], ["--workers", "3"], ["--compile"], ["--out", "p.jsonl"],
                  ["--skip-bad"]):
        assert settings(*flags) == base, flags
    for cut in (["--top-p", "0"], ["--top-k", "-1"], ["--min-p", "1"]):  # a sampler left no token: refused
        with pytest.raises(SystemExit):
            evaluate.parse_args(cut)
        assert "min-p a ratio in [0, 1)" in capsys.readouterr().err


def test_padded_vocab_rows_are_never_sampled(tok):
    """DeepSeek-Math's head has 102,400 rows for 100,015 tokenizer ids: one sampled padding id would make
    decode raise on that rank. Here the padding rows are made the likeliest by far."""
    V = tok.vocab_size + 24
    model = Transformer(ModelConfig(vocab_size=V, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=128))
    model.init_weights()
    head = torch.nn.Linear(32, V)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.zero_()
    head.bias.data[tok.vocab_size:] = 50.0
    model.lm_head = head
    raw = engine.generate(model, [[1, 2]], 5, temperature=1.0)
    assert all(t >= tok.vocab_size for t in raw.tokens[0])  # without the limit, only padding ids come out
    comps = engine.complete(model, tok, ["What is 1 + 1?"] * 4, temperature=1.0, max_new_tokens=8, seed=0)
    assert all(c.ids and max(c.ids) < tok.vocab_size for c in comps)  # a row may stop early at a sampled EOS
    greedy = engine.generate(model, [[1, 2]], 5, temperature=0.0, vocab_limit=tok.vocab_size)
    assert max(greedy.tokens[0]) < tok.vocab_size and all(lp > -50 for lp in greedy.logprobs[0])


def test_min_p_near_1_samples_the_greedy_tokens(tok):
    """min_p 0.999 leaves each position its likeliest token alone (a random model's logits do not tie): sampled
    at T = 1 through complete, the outputs are greedy decoding's, which plain sampling's are not."""
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=64,
                                    max_seq_len=128))
    model.init_weights()
    questions = ["What is 1 + 1?", "What is 6 times 7?"]
    greedy = engine.complete(model, tok, questions, max_new_tokens=12)
    near = engine.complete(model, tok, questions, max_new_tokens=12, temperature=1.0, min_p=0.999, seed=1)
    plain = engine.complete(model, tok, questions, max_new_tokens=12, temperature=1.0, seed=1)
    assert [c.ids for c in near] == [c.ids for c in greedy] != [c.ids for c in plain]


def test_tool_rounds_splice_the_sandbox_output_into_the_context(tok):
    """The program run is the last one written, the one the output mark follows."""
    model = Scripted(tok, [("Try.\n```python\nprint(6 + 7)\n```\nNo: compute.\n```python\nprint(6 * 7)\n```\n```output",
                            False),
                           ("\nThe answer is \\boxed{42}.", True)])
    [c] = engine.complete(model, tok, ["What is 6 times 7?"], prompt="tool")
    assert model.calls[0]["stop"] == (engine.OUTPUT_MARK,)
    spliced = tok.decode([t for t, s in zip(c.ids, c.sampled) if not s])
    assert spliced == "\n42\n```\n"  # the sandbox's output, which carries no loss in GRPO
    assert len(c.logprobs) == len(c.entropies) == len(c.ids)  # the sampler's, 0 on the sandbox's tokens
    second = tok.encode("\nThe answer is \\boxed{42}.") + [tok.eos_id]
    assert model.calls[1]["prompts"][0] == c.prompt + c.ids[:-len(second)]  # generation continues after the output
    assert c.finished and c.ids[-1] == tok.eos_id and "```output\n42\n```" in c.text
    assert evaluate.reward.math_reward(c.text, "42") == 1.0


def test_tool_rounds_keep_each_tokens_kept_ids_and_none_on_the_sandboxs(tok):
    """With keep (--keep-sampling-mask) a completion has one row of ids per token: the model's own (a scripted
    model could only have written its token) and -1 alone on the sandbox's output."""
    model = Scripted(tok, [("```python\nprint(6 * 7)\n```\n```output", False), ("\\boxed{42}", True)])
    [c] = engine.complete(model, tok, ["What is 6 times 7?"], prompt="tool", top_k=3, keep=True)
    assert len(c.kept) == len(c.ids) and not any(c.sampled[t] for t in range(len(c.ids)) if c.kept[t][0] < 0)
    assert all(k == ([t, -1, -1] if s else [-1, -1, -1]) for t, s, k in zip(c.ids, c.sampled, c.kept))
    assert engine.complete(Scripted(tok, [("done", True)]), tok, ["q"])[0].kept is None


def test_tool_rounds_are_capped(tok):
    turn = ("```python\nprint(1)\n```\n```output", False)
    model = Scripted(tok, [turn] * engine.TOOL_ROUNDS + [("done", True)])
    [c] = engine.complete(model, tok, ["q"], prompt="tool")
    assert len(model.calls) == engine.TOOL_ROUNDS + 1 and model.calls[-1]["stop"] == ()
    assert c.text.count("```output\n1\n```") == engine.TOOL_ROUNDS


def test_tool_rounds_share_one_budget_and_keep_each_questions_stream(tok):
    """Question 0 has no room left after its first round's program output (the context is full): it is cut, not
    finished; question 1 goes on alone, from its own stream (1), with what is left of its budget."""
    program = "```python\nprint(1)\n```\n```output"
    model, turn = Scripted(tok, [(program, False), ("done", True)]), tok.encode(program)
    long, short = engine.prompt_ids(tok, "q " * 20, "tool"), engine.prompt_ids(tok, "q", "tool")
    model.config = ModelConfig(max_seq_len=len(long) + len(turn) + 2)  # less than the output spliced in
    first, second = engine.complete(model, tok, ["q " * 20, "q"], prompt="tool", max_new_tokens=40)
    assert not first.finished and second.finished and second.text.endswith("done")
    spliced = len(tok.encode("\n1\n```\n"))
    assert model.calls[1]["streams"] == [1] and model.calls[1]["budgets"] == [40 - len(turn) - spliced]
    assert len(short) + 40 < model.config.max_seq_len  # the budget, not the context, bounds question 1


def test_the_model_is_shown_a_programs_last_output_and_what_it_printed_before_an_error():
    shown = engine.program_output("for i in range(300):\n    print(i)", timeout=5)
    assert len(shown) == engine.OUTPUT_SHOWN and shown.endswith("\n298\n299")
    shown = engine.program_output("print('so far')\nprint(1 / 0)", timeout=5)
    assert shown.startswith("so far\n") and "ZeroDivisionError" in shown


def test_pot_answers_are_the_programs_output_and_errors_are_shown(tok):
    model = Scripted(tok, [("```python\nx = 6\nprint(x * 7)\n```", True)])
    [c] = engine.complete(model, tok, ["q"], prompt="pot")
    assert c.text.endswith("```output\n42\n```") and evaluate.reward.extract_answer(c.text) == "42"
    model = Scripted(tok, [("```python\nprint(1 / 0)\n```", True)])
    [c] = engine.complete(model, tok, ["q"], prompt="pot")
    assert "ZeroDivisionError" in c.text and evaluate.reward.math_reward(c.text, "42") == 0.0
    model = Scripted(tok, [("no program here", True)])
    [c] = engine.complete(model, tok, ["q"], prompt="pot")
    assert evaluate.reward.math_reward(c.text, "42") == 0.0


def test_evaluate_a_real_model_and_the_cli(tok, tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=64,
                                    max_seq_len=128))
    model.init_weights()
    problems = [dict(question=f"What is {i} + 1?", answer=str(i + 1), type="Algebra" if i % 2 else "Geometry")
                for i in range(6)]
    m, records = evaluate.evaluate(model, tok, problems, samples=4, temperature=1.0, max_new_tokens=8)
    [c] = engine.complete(model, tok, ["x " * 200], prompt="tool", temperature=1.0)  # longer than the context
    assert c.ids == [] and not c.finished
    [c] = engine.complete(model, tok, ["What is 1 + 1?"], prompt="tool", temperature=1.0)  # fills the context
    assert len(c.prompt) + len(c.ids) <= 128
    assert m["problems"] == 6 and set(m) >= {"accuracy", "pass@4", "maj@4", "by_type"}
    assert [len(r["completions"]) for r in records] == [4] * 6
    m2, records2 = evaluate.evaluate(model, tok, problems, samples=4, temperature=1.0, max_new_tokens=8)
    assert [r["completions"] for r in records] == [r["completions"] for r in records2]  # seeded
    # the CLI on a saved model: predictions jsonl with one record per problem
    model.save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    jsonl.write_jsonl(str(tmp_path / "p.jsonl"), problems)
    out = tmp_path / "pred.jsonl"
    r = subprocess.run([sys.executable, "evaluate.py", "--model", str(tmp_path / "m"),
                        "--data", str(tmp_path / "p.jsonl"), "--max-new-tokens", "8", "--out", str(out)],
                       capture_output=True, text=True,
                       cwd=evaluate.os.path.dirname(evaluate.__file__), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert metrics["problems"] == len(predictions) == 6  # the printed score is the mean of the written verdicts
    assert metrics["accuracy"] == pytest.approx(sum(p["correct"][0] for p in predictions) / 6)
    r = subprocess.run([sys.executable, "evaluate.py", "--model", str(tmp_path / "nope")], capture_output=True,
                       text=True, cwd=evaluate.os.path.dirname(evaluate.__file__), timeout=300)
    assert r.returncode != 0 and "nope/config.json: not found" in r.stderr


def test_a_data_path_that_is_a_directory_is_named_so(tmp_path):
    """It was 'not found', and pointed at the toy's files."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"a directory \(--data takes a .jsonl, .json, .csv or .parquet file\)"):
        evaluate.main(evaluate.parse_args(["--model", str(tmp_path), "--data", str(tmp_path)]))


def test_a_stopped_evaluation_goes_on_where_it_stopped_and_samples_as_one_run(tok, tmp_path, monkeypatch):
    """evaluate.py grades the set in parts, saving each part's records as it goes: run again after a stop in its
    second part, it grades only the rest, and its predictions are those of one grade() call over the whole set
    at another batch size, or of a rank's share (each sample's stream is its place in the set, not in the part);
    a last line the stop cut short is graded again; a stopped run with other settings is refused by name."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=64,
                                    max_seq_len=128))
    model.init_weights()
    problems = [dict(question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(20)]
    kw = dict(samples=2, temperature=1.0, max_new_tokens=6)
    whole = evaluate.grade(model, tok, problems, batch=8, **kw)
    assert evaluate.grade(model, tok, problems[1::2], index=range(1, 20, 2), **kw) == whole[1::2]
    args = evaluate.parse_args(["--samples", "2", "--batch", "1", "--max-new-tokens", "6", "--workers", "1"])
    out, settings = str(tmp_path / "pred.jsonl"), dict(model="m", seed=0)
    grade, parts = evaluate.grade, []

    def stopped_in_part(k):
        def grade_part(*a, **kw):
            parts.append(kw["index"])
            assert (kw["top_k"], kw["min_p"]) == (args.top_k, args.min_p)  # the sampler's flags reach it
            if len(parts) == k:
                raise KeyboardInterrupt
            return grade(*a, **kw)
        return grade_part
    monkeypatch.setattr(evaluate, "grade", stopped_in_part(2))  # parts of 16 x 1 / 2 = 8 problems
    with pytest.raises(KeyboardInterrupt):
        evaluate.grade_in_parts(args, model, tok, problems, 1.0, settings, out)
    with open(out + ".partial", "a") as f:
        f.write('{"question": "What is 8 + 1?", "gold": "9", "compl')  # a line the stop cut short
    parts.clear()
    monkeypatch.setattr(evaluate, "grade", stopped_in_part(0))
    assert evaluate.grade_in_parts(args, model, tok, problems, 1.0, settings, out) == whole
    assert parts == [range(8, 16), range(16, 20)]
    assert [json.loads(line) for line in open(out)] == whole and not os.path.exists(out + ".partial")
    jsonl.write_jsonl(out + ".partial", [dict(settings=settings)] + whole[:3])
    with pytest.raises(SystemExit, match=r"pred.jsonl.partial: a stopped evaluation with other settings \(seed\)"):
        evaluate.grade_in_parts(args, model, tok, problems, 1.0, dict(settings, seed=1), out)
    with pytest.raises(SystemExit, match="its problem 1 is not problem 1 of the data"):
        evaluate.grade_in_parts(args, model, tok, problems[1:], 1.0, settings, out)
    mended = [dict(problems[0], answer="2.0")] + problems[1:]  # the same question with its answer written anew
    with pytest.raises(SystemExit, match="its problem 1 is not problem 1 of the data"):
        evaluate.grade_in_parts(args, model, tok, mended, 1.0, settings, out)


def test_the_cli_stopped_by_sigterm_goes_on_and_shows_progress_as_it_goes(tok, tmp_path):
    """The user's story end to end: each part's progress line reaches a pipe while the run goes on (flushed, not
    held in a buffer to the end), SIGTERM stops it, and the same command finishes the set, saying where it went
    on from, with the predictions of an uninterrupted run."""
    import signal
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=64,
                                    max_seq_len=128))
    model.init_weights()
    model.save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    problems = [dict(question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(128)]
    jsonl.write_jsonl(str(tmp_path / "p.jsonl"), problems)

    def cli(out):  # parts of 16 x 1 / 2 = 8 problems: 16 parts
        return [sys.executable, "evaluate.py", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "p.jsonl"),
                "--samples", "2", "--batch", "1", "--max-new-tokens", "12", "--workers", "1", "--out", str(out)]
    cwd = os.path.dirname(evaluate.__file__)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe buffers, as a log file does
    p = subprocess.Popen(cli(tmp_path / "stopped.jsonl"), cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()
    mid_run = (tmp_path / "stopped.jsonl.partial").exists() and not (tmp_path / "stopped.jsonl").exists()
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    assert first.startswith("evaluate: 8/128 problems") and mid_run, first  # not held back to the end
    again = subprocess.run(cli(tmp_path / "stopped.jsonl"), cwd=cwd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert re.search(r"stopped.jsonl.partial: going on after the \d+ problems", again.stdout), again.stdout[:500]
    whole = evaluate.grade(model, tok, problems, samples=2, temperature=0.7, max_new_tokens=12, batch=8)
    assert [json.loads(line) for line in open(tmp_path / "stopped.jsonl")] == whole
