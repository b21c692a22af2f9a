"""data.py, problem_sets.py and toyworld.py: each stage on small inputs, bad input, and the toy pipeline end to end."""
import argparse
import inspect
import json
import random
import re

import numpy as np
import pytest

import toyworld
from data import (DataError, MathClassifier, Mixture, build, classify_with_expansion, decontaminate, TokenSource,
                  math_paths, minhash_dedup, normalize_url, parse_args, quality_issue, read_jsonl, run_stage,
                  url_dedup, write_shards)
from dedup import drop_test_questions, lsh_params, minhash_signatures
from jsonl import write_jsonl
from problem_sets import benchmark_texts, load_problems, problems_and_held_out
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# jsonl and problem files


def test_malformed_jsonl_names_file_and_line_or_is_counted(tmp_path):
    f = tmp_path / "pages.jsonl"
    f.write_text('{"text": "a", "url": "u"}\n{"text": broken\n\n["not", "an object"]\n{"url": "no text"}\n')
    with pytest.raises(DataError, match=r"pages.jsonl:2: .*--skip-bad"):
        list(read_jsonl(str(f), ("text",)))
    counts = {"bad_lines": 0}
    rows = list(read_jsonl(str(f), ("text",), skip_bad=True, counts=counts))
    assert rows == [{"text": "a", "url": "u"}] and counts["bad_lines"] == 3
    with pytest.raises(DataError, match="no such file"):
        list(read_jsonl(str(tmp_path / "missing.jsonl")))


def test_problem_files_saved_with_a_byte_order_mark_read_as_without(tmp_path):
    """Windows editors start UTF-8 files with a byte-order mark, which json refuses: the first row was a bad line."""
    rows = [{"question": "Ünï 1+1?", "answer": "2"}, {"question": "2+2?", "answer": "4"}]
    for name, text in (("p.jsonl", "".join(json.dumps(r) + "\n" for r in rows)), ("p.json", json.dumps(rows))):
        plain, marked = tmp_path / name, tmp_path / f"bom-{name}"
        plain.write_text(text, encoding="utf-8")
        marked.write_text(text, encoding="utf-8-sig")
        assert marked.read_bytes()[:3] == b"\xef\xbb\xbf"
        assert load_problems(str(marked)) == load_problems(str(plain)) == rows


def test_a_csv_problem_set_is_read_by_its_header(tmp_path):
    """CSV, as spreadsheets and some datasets ship problems: the header names the fields, a quoted field may hold
    commas and line breaks, and a short row is a bad problem named by its place."""
    f = tmp_path / "p.csv"
    f.write_text('question,answer\n"What is 1,000 + 1?\nSay it.",1001\nWhat is 2 + 2?,4\n', encoding="utf-8-sig")
    assert load_problems(str(f)) == [{"question": "What is 1,000 + 1?\nSay it.", "answer": "1001"},
                                     {"question": "What is 2 + 2?", "answer": "4"}]
    f.write_text("problem,solution\nWhat is 3 + 3?,3 + 3 = 6. \\boxed{6}\nWhat is 4 + 4?\n")
    with pytest.raises(DataError, match="p.csv: problem 2: "):
        load_problems(str(f))
    assert [p["answer"] for p in load_problems(str(f), skip_bad=True)] == ["6"]


def test_problem_loaders_read_gsm8k_math_and_generic(tmp_path, capsys):
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text(json.dumps({"question": "Q?", "answer": "She has 48/2 = <<48/2=24>>24.\n#### 1,234"}) + "\n")
    p = load_problems(str(gsm))[0]
    assert p["answer"] == "1234" and "<<" not in p["cot"] and p["cot"].endswith("\\boxed{1234}.")
    math = tmp_path / "math.json"
    math.write_text(json.dumps([{"problem": "P", "solution": "so \\boxed{\\frac{1}{2}} and \\boxed{\\dfrac{a}{b^{2}}}",
                                 "level": "Level 5", "type": "Algebra"}]))
    p = load_problems(str(math))[0]
    assert p["answer"] == "\\dfrac{a}{b^{2}}" and p["level"] == "Level 5"
    gen = tmp_path / "mine.jsonl"
    gen.write_text(json.dumps({"q": "2+2?", "a": 4}) + "\n")
    assert load_problems(str(gen), question_field="q", answer_field="a") == [{"question": "2+2?", "answer": "4"}]
    with pytest.raises(DataError, match="unrecognised fields"):
        load_problems(str(gen))
    gen.write_text(json.dumps({"question": "Is it?", "answer": True}) + "\n")  # JSON's true is not the answer "True"
    with pytest.raises(DataError, match="problem 1: the answer is True: expected text or a number"):
        load_problems(str(gen))
    gen.write_text(json.dumps({"question": "Q?", "answer": " "}) + "\n" + json.dumps({"question": "\n", "answer": "1"})
                   + "\n" + json.dumps({"question": "R?", "answer": 2}) + "\n")
    with pytest.raises(DataError, match="problem 1: the answer is ' ': expected text or a number"):
        load_problems(str(gen))
    assert load_problems(str(gen), skip_bad=True) == [{"question": "R?", "answer": "2"}]  # problem 2: no question
    assert "mine.jsonl: 2 bad lines or problems skipped (--skip-bad)" in capsys.readouterr().err
    one = tmp_path / "one.json"  # a .json file may hold one object rather than a list of them
    one.write_text(json.dumps({"question": "Q?", "answer": "5"}))
    assert load_problems(str(one)) == [{"question": "Q?", "answer": "5"}]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no problems"):
        load_problems(str(empty))
    for missing in ("missing.json", "missing.csv", "missing.parquet"):
        with pytest.raises(DataError, match=f"{missing}: no such file"):
            load_problems(str(tmp_path / missing))
    one.write_text(json.dumps([{"question": "Q?", "answer": "5"}, 5]))
    with pytest.raises(DataError, match="problem 2: expected a JSON object, got int"):
        load_problems(str(one))


def test_problems_under_other_names_with_answer_fields_and_in_parquet(tmp_path, monkeypatch):
    """GSM8K rows under other field names are still GSM8K; a final-answer field beside a solution (DeepScaleR,
    Open-R1) is the answer, and a solution without a boxed one gets it appended; parquet reads as jsonl does."""
    rows = [{"query": "Q?", "response": "3 + 4 = <<3+4=7>>7\n#### 7"},
            {"problem": "P", "solution": "It is 1/2.", "answer": "\\frac{1}{2}"},
            {"problem": "R", "solution": "so \\boxed{2}", "answer": "2.0"},
            {"question": "S", "solution": "x = 3", "answer": 3}]
    f = tmp_path / "mixed.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_problems(str(f), question_field="query", answer_field="response")
    assert [(p["question"], p["answer"]) for p in got] == [("Q?", "7"), ("P", "\\frac{1}{2}"), ("R", "2.0"), ("S", "3")]
    assert got[0]["cot"] == "3 + 4 = 7\nThe answer is \\boxed{7}."
    assert got[1]["cot"] == "It is 1/2.\nThe answer is \\boxed{\\frac{1}{2}}."
    assert got[2]["cot"] == "so \\boxed{2}" and got[3]["cot"] == "x = 3\nThe answer is \\boxed{3}."
    with pytest.raises(DataError, match=r"problem 1: unrecognised fields \['query', 'response'\]"):
        load_problems(str(f))  # the names not given
    with pytest.raises(DataError, match="problem 2: the solution marks no final answer .*no answer field"):
        f.write_text(json.dumps(rows[1]) + "\n" + json.dumps({"problem": "P", "solution": "none"}) + "\n")
        load_problems(str(f))
    pq = pytest.importorskip("pyarrow.parquet")  # requirements-dev.txt has it; a user's install may not
    import pyarrow
    path = str(tmp_path / "train.parquet")
    pq.write_table(pyarrow.Table.from_pylist(rows[:1]), path)
    assert load_problems(path, "query", "response") == got[:1]
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)  # as if not installed
    with pytest.raises(DataError, match="train.parquet: reading parquet needs pyarrow: pip install pyarrow"):
        load_problems(path)



def test_a_named_solution_field_is_the_chain_of_thought(tmp_path):
    """--solution-field: MetaMathQA's response (no box: its "The answer is: 42" is the answer, and the chain of
    thought then ends with it boxed, as the prompts ask) and OpenMathInstruct-2's generated_solution beside its
    expected_answer field."""
    meta, omi = tmp_path / "metamath.jsonl", tmp_path / "omi.jsonl"
    meta.write_text(json.dumps({"query": "Q?", "response": "6 * 7 = 42.\nThe answer is: 42", "type": "GSM_SV"}) + "\n")
    omi.write_text(json.dumps({"problem": "P?", "generated_solution": "So $x = \\boxed{5}$.", "expected_answer": "5"})
                   + "\n")
    assert load_problems(str(meta), question_field="query", solution_field="response") == [
        {"question": "Q?", "answer": "42", "cot": "6 * 7 = 42.\nThe answer is: 42\nThe answer is \\boxed{42}.",
         "type": "GSM_SV"}]
    with pytest.raises(DataError, match=r"problem 1: unrecognised fields \['question', 'response', 'type'\].*"
                                        "--solution-field"):
        load_problems(str(meta), question_field="query")
    assert load_problems(str(omi), answer_field="expected_answer", solution_field="generated_solution") == [
        {"question": "P?", "answer": "5", "cot": "So $x = \\boxed{5}$."}]


def test_a_conversation_is_the_last_assistant_message_and_the_user_one_before_it(tmp_path):
    """{messages: [...]} (Mixture-of-Thoughts, most SFT sets): the last assistant message is the solution, the user
    message before it the question, not a system message or an earlier turn; its answer is what it marks (a box
    after R1's thinking), or an answer field beside the messages; a conversation without an answer is named."""
    f = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "system", "content": "Think first."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2 + 3?"},
                          {"role": "assistant", "content": "<think>2 + 3 = 5</think>\nSo \\boxed{5}."}]},
            {"messages": [{"role": "user", "content": "6 * 7?"}, {"role": "assistant", "content": "It is 42."},
                          {"role": "user", "content": "Thanks!"}],  # a turn after the last answer: not the question
             "answer": "42", "source": "x"},
            {"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": "no idea"}]},
            {"messages": [{"role": "assistant", "content": "\\boxed{1}"}, {"role": "user", "content": "?"}]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_problems(str(f), skip_bad=True) == [
        {"question": "2 + 3?", "answer": "5", "cot": "<think>2 + 3 = 5</think>\nSo \\boxed{5}."},
        {"question": "6 * 7?", "answer": "42", "cot": "It is 42.\nThe answer is \\boxed{42}."}]
    with pytest.raises(DataError, match="problem 3: the solution marks no final answer"):
        load_problems(str(f))
    f.write_text(json.dumps(rows[3]) + "\n")
    with pytest.raises(DataError, match="problem 1: the messages hold no user message followed by an assistant's"):
        load_problems(str(f))
    parts = [{"type": "text", "text": "\\boxed{1}"}]  # a multimodal message's parts: not read as text
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": parts}]})
                 + "\n")
    with pytest.raises(DataError, match="problem 1: the assistant's message is \\[{'type': 'text'.*, not text"):
        load_problems(str(f))
    rows[0]["reward_model"] = {"style": "rule"}  # a field verl's rows have, without their prompt: still a conversation
    f.write_text(json.dumps(rows[0]) + "\n")
    assert load_problems(str(f))[0]["question"] == "2 + 3?"


def test_verl_rows_are_the_last_user_message_and_the_ground_truth(tmp_path):
    """verl's RL layout (DAPO-Math-17k, verl's GSM8K and MATH parquet files): the prompt a list of chat messages,
    the answer reward_model.ground_truth. The question is the last user message as written, not the system one;
    a ground truth that is not one answer, or a prompt without a user, is an error naming the problem."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow
    rows = [{"data_source": "math_dapo", "ability": "MATH", "extra_info": {"index": "a1"},
             "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Solve 1 + 1."},
                        {"role": "assistant", "content": "2"},
                        {"role": "user", "content": "Solve 2 + 3.\nAnswer: $Answer"}],
             "reward_model": {"ground_truth": "5", "style": "rule-lighteval/MATH_v2"}},
            {"data_source": "openai/gsm8k", "ability": "math", "extra_info": {"index": "b2"},
             "prompt": [{"role": "user", "content": "Q?"}], "reward_model": {"ground_truth": "72", "style": "rule"}}]
    path = str(tmp_path / "dapo.parquet")
    pq.write_table(pyarrow.Table.from_pylist(rows), path)
    assert load_problems(path) == [{"question": "Solve 2 + 3.\nAnswer: $Answer", "answer": "5"},
                                   {"question": "Q?", "answer": "72"}]
    f = tmp_path / "verl.jsonl"
    f.write_text(json.dumps(dict(rows[1], reward_model={"ground_truth": 7})) + "\n"
                 + json.dumps(dict(rows[1], reward_model={"ground_truth": ["1", "2"]})) + "\n")
    with pytest.raises(DataError, match=r"problem 2: the answer is \['1', '2'\]: expected text or a number"):
        load_problems(str(f))
    assert load_problems(str(f), skip_bad=True) == [{"question": "Q?", "answer": "7"}]
    f.write_text(json.dumps(dict(rows[1], prompt=[{"role": "system", "content": "Q?"}])) + "\n")
    with pytest.raises(DataError, match="problem 1: the prompt has no user message"):
        load_problems(str(f))

# -----------------------------------------------------------------------------
# URLs, near duplicates, decontamination, quality


def test_url_normalisation_merges_spellings_of_one_page():
    same = ["https://www.Example.com/a/b/", "http://example.com/a/b", "https://example.com/a/b?utm_source=x#top",
            "https://example.com:443/a/b"]
    assert len({normalize_url(u) for u in same}) == 1
    assert normalize_url("https://example.com/a?y=2&x=1") == normalize_url("https://example.com/a?x=1&y=2")
    assert normalize_url("https://example.com/a?page=2") != normalize_url("https://example.com/a?page=3")
    assert normalize_url("https://example.com/a?ref=feed&fbclid=1&gclid=2") == normalize_url("https://example.com/a")
    assert url_dedup(same + ["https://example.com/c"]) == [True, False, False, False, True]


def shingles(text):
    ws = re.findall(r"\w+", text.lower())
    return {tuple(ws[i:i + 5]) for i in range(len(ws) - 4)}


def test_minhash_estimates_jaccard_without_bias():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    errors = []
    for _ in range(100):
        a = [rng.choice(vocab) for _ in range(rng.randint(30, 200))]
        b = list(a)
        for _ in range(rng.randint(0, len(a))):
            b[rng.randrange(len(b))] = rng.choice(vocab)
        sa, sb = shingles(" ".join(a)), shingles(" ".join(b))
        sig = minhash_signatures([" ".join(a), " ".join(b)])
        errors.append(np.mean(sig[0] == sig[1]) - len(sa & sb) / len(sa | sb))
    errors = np.array(errors)
    assert abs(errors.mean()) < 0.02 and np.abs(errors).max() < 0.15  # std is sqrt(J(1-J)/128) <= 0.044


def test_minhash_dedup_drops_near_copies_and_keeps_merely_similar_pages():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(2000)]
    docs = [" ".join(rng.choice(vocab) for _ in range(150)) for _ in range(50)]
    near = []
    for d in docs[:20]:  # one changed word: Jaccard about 0.94
        ws = d.split()
        ws[75] = "changed"
        near.append(" ".join(ws))
    # pages built from the same few sentences in another order share their rarest shingles but few others:
    # a weak hash family once dropped these (its permutations all picked about the same minimum)
    sentences = [" ".join(rng.choice(vocab) for _ in range(7)) for _ in range(10)]
    similar = [" ".join(rng.sample(sentences, 6)) for _ in range(30)]
    texts = docs + near + similar
    keep = minhash_dedup(texts, threshold=0.8)
    assert keep[:50] == [True] * 50 and keep[50:70] == [False] * 20
    truly_dup = {i for i in range(70, 100) for j in range(70, i)
                 if len(shingles(texts[i]) & shingles(texts[j])) / len(shingles(texts[i]) | shingles(texts[j])) >= 0.8}
    assert sum(not k for k in keep[70:]) <= len(truly_dup) + 1


def test_pages_shorter_than_a_shingle_are_one_shingle_of_their_words():
    """Under 5 words a page is one shingle of all its words in order: the same words again are a duplicate (case
    and punctuation aside), other words or another order are not; a page of exactly 5 words is one shingle too."""
    texts = ["the cat sat", "a dog ran", "The cat sat!", "the cat", "cat the sat", "one two three four five",
             "one two three four five"]
    assert minhash_dedup(texts, threshold=0.8) == [True, True, False, True, True, True, False]
    # a whole batch of fewer words than a shingle (a crawl of a few short pages) crashed in the shingling
    long = "one two three four five six"
    for batch in (["a b c"], ["a b", "c"], ["x", "a b", "a b"]):
        alone, beside = minhash_signatures(batch), minhash_signatures(batch + [long])[:len(batch)]
        assert np.array_equal(alone, beside), batch
    assert minhash_dedup(["x", "a b", "a b"], threshold=0.8) == [True, True, False]


def test_a_near_copy_is_dropped_when_it_also_meets_a_page_it_is_not_a_copy_of():
    """Per triple: a page D, a page P that shares ~0.66 of D's shingles (kept: below 0.8), then Q, D with one word
    changed. Q meets both in the LSH bands (at J = 0.6 a band collides with probability 0.87, by (1 - (1 - J^5)^25)),
    so its candidates are D and P: one close enough drops it."""
    rng = random.Random(2)
    vocab = [f"w{i}" for i in range(3000)]
    texts, pairs = [], []
    for _ in range(20):
        d = [rng.choice(vocab) for _ in range(150)]
        p, q = list(d), list(d)
        for i in range(0, 150, 25):  # 6 words: about 30 of 146 shingles
            p[i] = rng.choice(vocab)
        q[75] = "changed"
        texts += [" ".join(d), " ".join(p), " ".join(q)]
        a, b = shingles(texts[-3]), shingles(texts[-2])
        pairs.append(len(a & b) / len(a | b))
    assert all(0.55 < j < 0.75 for j in pairs)
    assert minhash_dedup(texts, threshold=0.8) == [True, True, False] * 20


def test_lsh_bands_are_the_most_rows_that_still_keep_a_pair_at_the_threshold():
    """At Jaccard 0.8 with 128 permutations: 25 bands of 5 rows, by hand: a pair at 0.8 misses every band with
    chance (1 - 0.8^5)^25 = 4.9e-5, within the 1e-3 allowed; 6 rows (21 bands) would miss 1.7e-3."""
    assert lsh_params(0.8, 128) == (25, 5)
    assert (1 - 0.8 ** 5) ** 25 == pytest.approx(4.9e-5, rel=0.05) and (1 - 0.8 ** 6) ** 21 > 1e-3


def test_near_copies_are_missed_only_by_the_estimates_noise():
    """Copies at true Jaccard 0.85-0.95 (word 5-grams): the LSH bands must never be what misses one (datasketch's
    balanced 9 x 13 bands at 0.8 miss 9% of them); what is left is the MinHash estimate's own noise, whose standard
    deviation is 0.03 here (bench.py data: recall 0.997 at Jaccard >= 0.85 on real prose)."""
    rng = random.Random(2)
    vocab = [f"w{i}" for i in range(5000)]
    originals, copies = [], []
    while len(copies) < 400:
        a = [rng.choice(vocab) for _ in range(200)]
        b = list(a)
        for i in rng.sample(range(200), rng.choice([1, 2, 3])):
            b[i] = rng.choice(vocab)
        j = len(shingles(" ".join(a)) & shingles(" ".join(b))) / len(shingles(" ".join(a)) | shingles(" ".join(b)))
        if 0.85 <= j < 0.95:
            originals.append(" ".join(a))
            copies.append(" ".join(b))
    keep = minhash_dedup(originals + copies, threshold=0.8)
    sigs = minhash_signatures(originals + copies)
    estimate = (sigs[:400] == sigs[400:]).mean(axis=1)
    assert all(keep[:400])
    assert not any(kept and e >= 0.8 for kept, e in zip(keep[400:], estimate))  # the bands found every candidate
    assert sum(keep[400:]) <= 12  # recall >= 0.97 even with most copies near 0.86


def test_decontamination_matches_10_grams_and_short_texts_exactly():
    bench = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
             "What is the value of x?", "42", "seven purple giraffes", "purple cats"]
    pages = [
        "Blog: natalia SOLD clips to 48 of her friends in April -- great sales!",  # a 10-gram, other case/punct
        "Natalia sold clips to 48 of her friends in March.",  # 9 words in common only
        "Quiz: what is the value of x? Think.",  # the 6-word benchmark text, whole
        "What is the value of y?",  # not the short text
        "The answer was 42 apples.",  # a 1-word benchmark text is ignored
        "We saw seven purple giraffes today.",  # a 3-word benchmark text, the shortest matched
        "Two purple cats slept.",  # a 2-word one is ignored
    ]
    assert decontaminate(pages, bench) == [False, True, False, True, True, False, True]


def test_decontamination_matches_questions_and_solutions_not_bare_answers():
    """MATH's short answers (frac 1 2, 2 sqrt 3: three words each) occur on countless honest pages; matching them
    anywhere would throw away much of a real math corpus. Questions and worked solutions still catch leaks."""
    problems = [
        dict(question="A fair coin is tossed once. What is the probability that it lands heads?", answer="\\frac{1}{2}",
             cot="There are two equally likely outcomes and one of them is heads, so the answer is "
                 "$\\boxed{\\frac{1}{2}}$."),
        dict(question="An equilateral triangle has side 4. How long is its altitude?", answer="2\\sqrt{3}",
             cot="The altitude splits it into two 30-60-90 triangles with hypotenuse 4, so it is "
                 "$\\boxed{2\\sqrt{3}}$."),
    ]
    pages = ["Substituting u = x^2 the integral evaluates to \\frac{1}{2} and the proof is complete.",
             "The distance between the two foci is 2\\sqrt{3}, which we now use in the second part.",
             "Homework help: a fair coin is tossed once. What is the probability that it lands heads? Thanks!",
             "Solution: there are two equally likely outcomes and one of them is heads, so the answer is 1/2."]
    assert decontaminate(pages, benchmark_texts(problems)) == [True, True, False, False]


def test_training_problems_that_contain_a_test_question_are_dropped(tmp_path):
    test = [dict(question="Tom has 12 apples and gives away 5. How many apples does Tom have left?", answer="7")]
    train = [dict(question="Tom has 12 apples and gives away 5. How many apples does Tom have left?", answer="7"),
             dict(question="Warm-up. Tom has 12 apples and gives away 5. How many apples does tom have LEFT?",
                  answer="7"),
             dict(question="Tom has 13 apples and gives away 5. How many apples does Tom have left?", answer="8"),
             dict(question="Ann has 12 apples and gives away 5. How many apples does Ann have left?", answer="7")]
    kept, removed = drop_test_questions(train, test)
    assert [p["answer"] for p in kept] == ["8", "7"] and len(removed) == 2  # same template, other problem: kept
    # as the trainers read them: --data less what contains --eval-data's; no such held-out file, nothing dropped
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    write_jsonl(str(tmp_path / "test.jsonl"), test)
    args = argparse.Namespace(data=str(tmp_path / "train.jsonl"), eval_data=str(tmp_path / "test.jsonl"),
                              question_field=None, answer_field=None, solution_field=None, skip_bad=False)
    assert problems_and_held_out(args) == (kept, test, f"{args.data}: 2 problems whose question contains a held-out "
                                                        "one, dropped")
    args.eval_data = str(tmp_path / "missing.jsonl")  # the log says so: a typo must not pass unseen
    assert problems_and_held_out(args) == (train, [], f"{args.eval_data}: no such file, so no held-out evaluation "
                                                      "(--eval-data)")


@pytest.mark.parametrize("text,why", [
    ("404 Not Found", "too_short"),
    (" ".join("#$%&*@!" for _ in range(40)), "symbols"),
    ("\n".join(["BUY CHEAP WATCHES NOW click here"] * 20), "repetition"),
    (toyworld.code_page(random.Random(0), toyworld.make_problems(3, seed=1)), None),  # code fences repeat: fine
    (r"Let $f(x) = \frac{x^2+1}{x-1}$ for all real $x \neq 1$. Then $f(2) = 5$ and $f(3) = 5$, so $f$ is not "
     r"one-to-one; in fact $f(x) = f(y)$ whenever $xy = x + y + 1$.", None),
])
def test_quality_filters(text, why):
    assert quality_issue(text) == why


def test_quality_filters_at_their_thresholds():
    """20 words is enough, 19 is a stub; 30 of 100 non-space characters odd is not yet junk, 31 of 101 is; 30 of 100
    characters in repeated lines is not yet boilerplate, 31 of 100 is."""
    assert quality_issue(" ".join(["word"] * 19)) == "too_short" and quality_issue(" ".join(["word"] * 20)) is None
    symbols = " ".join(["abcde"] * 14 + ["#" * 5] * 6)  # 70 letters, 30 odd
    assert quality_issue(symbols) is None and quality_issue(symbols + "#") == "symbols"

    def repeated(r):  # a 40 - 2r character line, then one of 30 + r twice: 30 + r of 100 characters repeat
        line = " ".join(["rr"] * 10) + "r" * (1 + r)
        return "\n".join([" ".join(["uu"] * 13) + "u" * (2 - 2 * r), line, line])
    assert quality_issue(repeated(0)) is None and quality_issue(repeated(1)) == "repetition"


# -----------------------------------------------------------------------------
# classifier and domain expansion


def docstrings(modules):
    """Docstrings (20+ words) of the functions, classes and methods that the modules define."""
    out = []
    for m in modules:
        root = m.__name__.split(".")[0]
        for _, obj in inspect.getmembers(m):
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if not getattr(obj, "__module__", "").startswith(root):
                continue
            methods = [f for _, f in inspect.getmembers(obj, inspect.isfunction)] if inspect.isclass(obj) else []
            members = [obj] + methods
            out += [d for f in members if (d := inspect.getdoc(f)) and len(d.split()) >= 20]
    return list(dict.fromkeys(out))


def test_classifier_separates_real_math_documentation_from_other_documentation():
    """Real multi-line text from installed packages: sympy's docstrings (math) vs the standard library's
    networking, e-mail, archive, process and logging docstrings. Held-out AUC >= 0.95."""
    import argparse
    import email.message
    import ftplib
    import http.client
    import http.server
    import imaplib
    import logging
    import mailbox
    import shutil
    import smtplib
    import subprocess
    import tarfile
    import urllib.request
    import zipfile

    import sympy
    import sympy.calculus.util
    import sympy.polys.polytools
    import sympy.solvers.solvers
    import sympy.integrals.integrals
    math_docs = docstrings([sympy.polys.polytools, sympy.solvers.solvers, sympy.integrals.integrals,
                            sympy.calculus.util])
    other_docs = docstrings([argparse, email.message, ftplib, http.client, http.server, imaplib, logging, mailbox,
                             shutil, smtplib, subprocess, tarfile, urllib.request, zipfile])
    assert len(math_docs) > 300 and len(other_docs) > 200
    rng = random.Random(0)
    rng.shuffle(math_docs)
    rng.shuffle(other_docs)
    n, m = len(math_docs) // 2, len(other_docs) // 2
    clf = MathClassifier().train(math_docs[:n], other_docs[:m], threads=1)  # one thread: deterministic
    pos, neg = clf.predict_proba(math_docs[n:]), clf.predict_proba(other_docs[m:])
    auc = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    print(f"held-out AUC {auc:.4f} on {len(pos)} math and {len(neg)} other docstrings")
    assert auc >= 0.95, auc


def test_classifier_takes_any_page_and_round_trips(tmp_path):
    clf = MathClassifier().train(["x + 1 = 2 so x = 1"] * 20, ["the cat sat on the mat"] * 20, epoch=20, threads=1)
    odd = ["", "   \n\n  ", "line one\nline two\r\nline three", "a\ud800b" * 10, "math " * 300_000]
    p = clf.predict_proba(odd + ["x + 1 = 2"])
    assert p.shape == (6,) and ((p >= 0) & (p <= 1)).all() and p[-1] > 0.5
    clf.save(str(tmp_path / "clf.bin"))
    assert np.allclose(MathClassifier.load(str(tmp_path / "clf.bin")).predict_proba(odd), p[:-1])
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        MathClassifier().train(["a"], [])


def test_math_paths_finds_the_math_section_of_a_general_domain():
    urls = [f"https://forum.com/math/{i}" for i in range(30)] + [f"https://forum.com/sports/{i}" for i in range(70)]
    urls += [f"https://news.com/page/{i}" for i in range(100)]
    collected = urls[:11] + urls[150:155]  # 11% of forum.com, all in /math; 5% of news.com
    assert math_paths(collected, urls) == {("forum.com", "math")}
    assert math_paths(urls[:10], urls) == set()  # exactly 10% is not "more than 10%" (paper)


def test_expansion_collects_within_the_budget_and_adds_the_rest_of_a_math_path():
    """80 pages on m.com (40 math under /math, 40 not), 120 others elsewhere, 10 words each; a budget of 100
    words collects the 10 best, all math: m.com then has 10 of 80 pages collected (> 10%) and /math 10 of 40, so the
    30 math pages not collected join the positives for the next round."""
    rng = random.Random(0)
    math_words = "equation integral derivative sum prime divisor polynomial root matrix vector".split()
    other_words = "football recipe garden travel movie weather music holiday shopping car".split()
    page = lambda words: " ".join(rng.choice(words) for _ in range(10))  # noqa: E731
    pages = [dict(url=f"https://m.com/math/{i}", text=page(math_words)) for i in range(40)]
    pages += [dict(url=f"https://m.com/news/{i}", text=page(other_words)) for i in range(40)]
    pages += [dict(url=f"https://o.com/x/{i}", text=page(other_words)) for i in range(120)]
    keep, report, _ = classify_with_expansion(lambda: iter(pages), [page(math_words) for _ in range(30)],
                                              iterations=1, budget_tokens=100, epochs=20, log=lambda row: None)
    assert sum(keep) == 10 and all(keep[i] <= (i < 40) for i in range(len(pages)))
    assert report == [dict(iteration=1, collected=10, already_collected=0, math_domains=1, new_positives=30)]


def test_a_stage_runs_again_unless_all_its_outputs_exist(tmp_path):
    (tmp_path / "a").write_text("")
    report, ran = [], []
    run_stage(report, "two", [str(tmp_path / "a"), str(tmp_path / "b")], lambda: ran.append(1))
    run_stage(report, "one", [str(tmp_path / "a")], lambda: ran.append(1))
    assert ran == [1] and "skipped" not in report[0] and report[1] == dict(stage="one", skipped=True)


# -----------------------------------------------------------------------------
# shards and the mixture


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    Tokenizer.train([f"page {i}: {i} + {i} = {2 * i}" for i in range(200)], 300).save(path)
    return str(path)


def test_shards_pack_documents_between_bos_and_eos(tmp_path, tok_dir):
    texts = [f"page {i}: {i} + 1 = {i + 1}" for i in range(50)]
    idx = write_shards(texts, tok_dir, str(tmp_path), "math", shard_tokens=200, workers=2, chunk=7)
    tok = Tokenizer.load(tok_dir)
    assert idx["dtype"] == "uint16" and len(idx["shards"]) > 1
    ids = np.concatenate([np.fromfile(tmp_path / s["file"], dtype=np.uint16) for s in idx["shards"]]).tolist()
    assert len(ids) == idx["tokens"]
    expected = [i for t in texts for i in [tok.bos_id, *tok.encode(t), tok.eos_id]]
    assert ids == expected  # in order, nothing lost across worker processes and shard boundaries


def test_shards_of_a_vocabulary_past_65536_ids_are_uint32(tmp_path):
    """A tokenizer with ids past 65,535 (Qwen's 151,936): shards of uint32, so BOS at 70,000 is stored as itself
    (as uint16 it would wrap to 4,464). The tokenizer.json is written by hand: 256 bytes, BOS and EOS far above."""
    from tokenizer import BYTE_TO_CHAR
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text(json.dumps(dict(
        added_tokens=[dict(id=70_000 + k, content=c, special=True) for k, c in enumerate(("<s>", "</s>"))],
        pre_tokenizer=dict(type="ByteLevel", add_prefix_space=False),
        model=dict(type="BPE", vocab={BYTE_TO_CHAR[b]: b for b in range(256)}, merges=[]))))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(dict(bos_token="<s>", eos_token="</s>")))
    idx = write_shards(["ab", "c"], str(tok_dir), str(tmp_path / "shards"), "math", workers=1)
    ids = np.fromfile(tmp_path / "shards" / idx["shards"][0]["file"], dtype=np.uint32).tolist()
    assert idx["dtype"] == "uint32" and ids == [70_000, 97, 98, 70_001, 70_000, 99, 70_001]


def test_training_windows_never_read_the_held_out_tail(tmp_path):
    """The last shard's tail is the validation split: 1% of the source's tokens, but at least 8 windows (here 8 x
    17 = 136 of 5,000 tokens). Each token here is its own position, so a window shows where it was read: training
    windows end before the tail, validation windows cover all of it, its last token included."""
    shards, start = [], 0
    for k, n in enumerate((3000, 2000)):
        np.arange(start, start + n, dtype=np.uint16).tofile(tmp_path / f"s_{k:04d}.bin")
        shards.append(dict(file=f"s_{k:04d}.bin", tokens=n))
        start += n
    (tmp_path / "s.json").write_text(json.dumps(dict(source="s", dtype="uint16", tokens=start, vocab_size=65536,
                                                     shards=shards)))
    rng, tail = np.random.default_rng(0), 5000 - 8 * 17
    sources = [TokenSource(str(tmp_path / "s.json"), split, 17) for split in ("train", "val")]
    train, val = (np.stack([source.window(rng, 17) for _ in range(3000)]) for source in sources)
    assert train.min() == 0 and train.max() < tail
    assert (val.min(), val.max()) == (tail, 4999) and (np.diff(val, axis=1) == 1).all()


def test_mixture_is_deterministic_by_step_and_follows_weights(tmp_path, tok_dir):
    write_shards(["aaaa " * 400], tok_dir, str(tmp_path), "a", workers=1)
    write_shards(["1234 " * 400], tok_dir, str(tmp_path), "b", workers=1)
    mix = Mixture({"a": (str(tmp_path / "a.json"), 3.0), "b": (str(tmp_path / "b.json"), 1.0)}, seq_len=16, seed=0)
    x, y = mix.batch(step=5, rows=range(400))
    assert x.shape == (400, 16) and (x[:, 1:] == y[:, :-1]).all()
    assert (mix.batch(5, range(400))[0] == x).all() and not (mix.batch(6, range(400))[0] == x).all()
    assert (np.concatenate([mix.batch(5, range(0, 150))[0], mix.batch(5, range(150, 400))[0]]) == x).all()
    a_id = Tokenizer.load(tok_dir).encode("aaaa")[0]
    share_a = np.mean([(row == a_id).any() for row in x])
    assert 0.68 < share_a < 0.82  # weight 3:1
    with pytest.raises(FileNotFoundError, match="python data.py"):
        Mixture({"c": (str(tmp_path / "c.json"), 1.0)}, 16)


# -----------------------------------------------------------------------------
# the toy world and the whole pipeline


def test_toy_problems_are_correct_and_splits_are_disjoint():
    test = toyworld.make_problems(200, seed=1)
    train = toyworld.make_problems(500, seed=2, exclude={p["question"] for p in test})
    assert not {p["question"] for p in test} & {p["question"] for p in train}
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}
    for p in test:
        lines = p["cot"].split("\n")
        for line in lines[1:-1]:  # every step is right
            a, op, b, _, c = line.split()
            assert ops[op](int(a), int(b)) == int(c) and (op != "/" or int(a) % int(b) == 0)
        assert lines[-1] == f"The answer is \\boxed{{{p['answer']}}}."
        out = {}
        code = p["pot"].removeprefix("```python\n").removesuffix("\n```").replace("print(", "result = (")
        exec(code, {}, out)  # our own generated program, not model output
        assert str(out["result"]) == p["answer"]
        assert p["pot"] in p["tool"] and p["tool"].endswith(f"```output\n{p['answer']}\n```\nThe answer is "
                                                             f"\\boxed{{{p['answer']}}}.")


def test_a_crawl_of_a_few_short_pages_or_no_seed_pages_is_one_clear_error(tmp_path):
    """A user's crawl whose pages hold fewer words than a shingle between them crashed dedup's shingling; with no
    seed math pages, or no crawl page past the quality filter, the classifier had nothing to learn from and
    fastText's trainer raised. Each is a DataError naming the file."""
    crawl, seeds, empty = tmp_path / "crawl.jsonl", tmp_path / "seeds.jsonl", tmp_path / "empty.jsonl"
    crawl.write_text("".join(json.dumps(dict(text=t, url=f"http://s/{i}")) + "\n" for i, t in enumerate(["a b", "c"])))
    seeds.write_text(json.dumps(dict(text="the sum of two and two is four")) + "\n")
    empty.write_text("")
    for seed_pos, why in ((empty, "empty.jsonl: no seed math pages (--seed-pos)"),
                          (seeds, "pages_quality.jsonl: no crawl pages left after dedup and the quality filter")):
        args = parse_args(["--out", str(tmp_path / seed_pos.stem), "--crawl", str(crawl), "--seed-pos", str(seed_pos),
                           "--code", str(crawl)])
        with pytest.raises(DataError, match=re.escape(why)):
            build(args)
    with pytest.raises(SystemExit):
        parse_args(["--iterations", "0"])  # no classifier at all: refused at the command line


def test_toy_pipeline_end_to_end_and_rerun_skips(tmp_path):
    args = parse_args(["--out", str(tmp_path), "--pages", "6000", "--train-problems", "100", "--test-problems", "60",
                       "--rl-problems", "50", "--iterations", "2", "--vocab-size", "600", "--workers", "1",
                       "--classifier-epochs", "10"])
    # 600 seed pages, not the paper's 500K: more epochs. A smaller world trains too weak a first classifier, and
    # domain expansion then spreads its mistakes (see data.math_paths).
    report = {r["stage"]: r for r in build(args)}
    assert report["decontaminate"]["leak_recall"] == 1.0 and report["decontaminate"]["false_drops"] == 0
    assert report["classify"]["precision"] > 0.95 and report["classify"]["recall"] > 0.9
    found, planted = map(int, report["dedup"]["planted_found"].split("/"))
    assert found >= 0.9 * planted
    for s in ("math", "code", "general"):
        assert json.loads((tmp_path / "shards" / f"{s}.json").read_text())["tokens"] > 1000
    splits = {n: {p["question"] for p in load_problems(str(tmp_path / "problems" / f"{n}.jsonl"))}
              for n in ("train", "test", "rl")}
    assert [len(q) for q in splits.values()] == [100, 60, 50]
    assert not (splits["rl"] & splits["train"]) and not (splits["rl"] & splits["test"])  # GRPO asks new questions
    again = build(args)
    assert all(r.get("skipped") for r in again)
    # the paper's §2.2 control: the classifier's pool sampled at random, as many tokens as the math source
    args.unfiltered = True
    row = build(args)[-1]
    math_tokens = json.loads((tmp_path / "shards" / "math.json").read_text())["tokens"]
    assert row["stage"] == "unfiltered" and 0 <= row["unfiltered_tokens"] - math_tokens < 2000
    assert 0.1 < row["classifier_chosen"] < 0.9  # a mixture, not the math pages again
