"""Problem sets as public datasets ship them, read into one schema {question, answer, cot?, pot?, level?, type?}:
GSM8K, MATH and the sets that add a final-answer field (DeepScaleR, Open-R1), verl's RL rows (DAPO-Math-17k), chat
conversations (Mixture-of-Thoughts), fields a user names (MetaMathQA, OpenMathInstruct-2), and our own toy problems;
from .jsonl, .json, .csv or .parquet. Each row is recognised by its fields, and a row that is not a problem is an error
naming its file and place (or, with --skip-bad, a counted skip). Answers are read as the grader reads them
(reward.py). The trainers and evaluate.py read their problems here; data.py decontaminates the corpus against them.
"""

import csv
import json
import os
import re
import sys
from collections import Counter

from dedup import drop_test_questions
from jsonl import DataError, read_jsonl
from reward import extract_answer, last_boxed  # a leaf (stdlib + sympy): answers read as graded


def _answer(value):
    """A reference answer as text: numbers are spelled out; null, empty or structured values are errors."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise ValueError(f"the answer is {value!r:.60}: expected text or a number")
    return str(value)


def _gsm8k(row):
    reasoning, _, final = row["answer"].rpartition("####")
    answer = final.strip().replace(",", "")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()  # calculator annotations
    return dict(question=row["question"], answer=answer, cot=f"{reasoning}\nThe answer is \\boxed{{{answer}}}.")


def _math(row):
    """MATH's rows, and those that add a final answer field beside the solution (DeepScaleR, Open-R1's sets):
    the answer field when there is one, else the solution's last box (MATH's reading), else the answer it marks
    as the grader reads it (MetaMathQA's "The answer is: 42"). A solution that boxes none ends with it boxed, as
    the prompts ask."""
    solution, given = row["solution"], row.get("answer") not in (None, "")
    boxed = last_boxed(solution)
    answer = _answer(row["answer"]) if given else boxed or extract_answer(solution)
    if answer is None:
        raise ValueError("the solution marks no final answer (\\boxed{...}, 'The answer is ...') and the row has no "
                         "answer field")
    if boxed is None:
        solution = f"{solution.rstrip()}\nThe answer is \\boxed{{{answer}}}."
    out = dict(question=row["question"] if "question" in row else row["problem"], answer=answer, cot=solution)
    out.update({k: row[k] for k in ("level", "type") if k in row})
    return out


def _verl(row):
    """verl's RL rows (DAPO-Math-17k, verl's own GSM8K and MATH files): the prompt a list of chat messages, the
    answer reward_model.ground_truth. The question is the last user message as written, with any instruction
    the set put in it; a system message is not kept (--chat-template --system gives one)."""
    users = [m.get("content") for m in row["prompt"] if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError("the prompt has no user message")
    return dict(question=users[-1], answer=_answer(row["reward_model"].get("ground_truth")))


def _chat(row):
    """A conversation ({messages: [{role, content}, ...]}, Mixture-of-Thoughts' and most SFT sets' layout): the
    last assistant message is the solution, the user message before it the question, read as MATH's rows are
    (an answer field if the row has one, else the answer the solution marks)."""
    turns = [m for m in row["messages"] if isinstance(m, dict)]
    last = max((i for i, m in enumerate(turns) if m.get("role") == "assistant"), default=None)
    user = max((i for i, m in enumerate(turns[:last]) if m.get("role") == "user"), default=None) if last else None
    if user is None:
        raise ValueError("the messages hold no user message followed by an assistant's")
    question, solution = turns[user].get("content"), turns[last].get("content")
    if not isinstance(solution, str):
        raise ValueError(f"the assistant's message is {solution!r:.60}, not text")
    return _math({**row, "question": question, "solution": solution})


def read_rows(path, skip_bad=False, counts=None):
    """The rows of a .jsonl, .json (a list of objects), .csv (a header row names the fields) or .parquet file
    (with pyarrow installed)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 (pyarrow's errors have no common base but Exception)
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8-sig") as f:  # with or without a byte-order mark
                rows = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        return rows if isinstance(rows, list) else [rows]
    if path.endswith(".csv"):
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                return list(csv.DictReader(f))  # a short row's missing fields are None: a bad problem, named
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not a readable CSV file ({e})") from None
    return read_jsonl(path, skip_bad=skip_bad, counts=counts)


def add_problem_args(ap):
    """The flags of every script that reads problems."""
    ap.add_argument("--question-field", help="the rows' question field, where it is not named question or problem")
    ap.add_argument("--answer-field", help="the rows' final-answer field, where it is not named answer")
    ap.add_argument("--solution-field", help="the rows' worked-solution field (SFT's chain of thought; its final "
                    "answer, boxed or after 'The answer is', when there is no answer field), where it is not named "
                    "solution")
    ap.add_argument("--skip-bad", action="store_true", help="skip and count malformed lines and problems")


def problem_reader(args):
    """load_problems with the flags of add_problem_args."""
    return lambda path: load_problems(path, args.question_field, args.answer_field, args.solution_field,
                                      skip_bad=args.skip_bad)


def problems_and_held_out(args):
    """The training problems (args.data) and the held-out ones (args.eval_data; none where there is no such
    file), less the training problems whose question contains a held-out one, so that a benchmark stays unseen:
    (problems, held_out, a line for the log saying how many were dropped, or that there is no held-out file)."""
    read = problem_reader(args)
    problems = read(args.data)
    if not os.path.isfile(args.eval_data):  # the toy's default where a user's run names none; or a typo, shown
        return problems, [], f"{args.eval_data}: no such file, so no held-out evaluation (--eval-data)"
    held_out = read(args.eval_data)
    problems, leaked = drop_test_questions(problems, held_out)
    return problems, held_out, f"{args.data}: {len(leaked)} problems whose question contains a held-out one, dropped"


def load_problems(path, question_field=None, answer_field=None, solution_field=None, skip_bad=False):
    """Read a problem set (.jsonl, .json, .csv or .parquet): GSM8K ({question, answer: '... #### 42'}), MATH
    ({problem, solution, level, type}, with or without an answer field), verl's ({prompt: [messages],
    reward_model: {ground_truth}}), a conversation ({messages: [user, assistant]}), our own ({question, answer,
    cot, pot}), or rows whose fields are named (question_field, answer_field, solution_field: a row's fields of
    those names are read as question, answer and solution, then the row is recognised as the others are:
    MetaMathQA's query and response, OpenMathInstruct-2's generated_solution and expected_answer). Recognised
    per row."""
    counts = Counter()
    out = []
    for n, row in enumerate(read_rows(path, skip_bad, counts), 1):
        try:
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            row = _renamed(row, question_field, answer_field, solution_field)
            if "solution" in row and ("problem" in row or "question" in row):
                p = _math(row)
            elif "question" in row and isinstance(row.get("answer"), str) and "####" in row["answer"]:
                p = _gsm8k(row)
            elif "question" in row and "answer" in row:
                p = {**row, "answer": _answer(row["answer"])}
            elif isinstance(row.get("prompt"), list) and isinstance(row.get("reward_model"), dict):
                p = _verl(row)
            elif isinstance(row.get("messages"), list):
                p = _chat(row)
            else:
                raise ValueError(f"unrecognised fields {sorted(row)}: expected GSM8K (question, answer with ####), "
                                 "MATH (problem, solution), verl's (prompt messages, reward_model.ground_truth), "
                                 "messages (user, assistant), or name yours with "
                                 "--question-field/--answer-field/--solution-field")
            if not isinstance(p["question"], str) or not p["question"].strip():
                raise ValueError(f"the question is {p['question']!r:.60}, not text")
            out.append(p)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            if not skip_bad:
                raise DataError(f"{path}: problem {n}: {e} (pass --skip-bad to skip and count such problems)") from None
            counts["bad_lines"] += 1
    if not out:
        raise DataError(f"{path}: no problems read" + (f" ({counts['bad_lines']} bad lines skipped)" if counts else ""))
    if counts:
        print(f"{path}: {counts['bad_lines']} bad lines or problems skipped (--skip-bad)", file=sys.stderr)
    return out


def _renamed(row, question_field, answer_field, solution_field):
    """The row with its named question, answer and solution fields, where it has them, under the names
    load_problems recognises (a file without them, such as a held-out set in a known format, is read as it is)."""
    for field, name in ((question_field, "question"), (answer_field, "answer"), (solution_field, "solution")):
        if field and field != name and field in row:
            row = {**{k: v for k, v in row.items() if k != field}, name: row[field]}
    return row


def benchmark_texts(problems):
    """What decontamination matches against: each problem's question and its worked solution, never the bare
    final answer (see dedup.decontaminate)."""
    return [t for p in problems for t in (p["question"], p.get("cot", "")) if t]
