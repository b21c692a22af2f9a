"""Bad input through the command line, as a user meets it: one line on stderr naming the file, a non-zero exit,
never a Python traceback. Each case runs the real script in a subprocess."""
import json
import subprocess
import sys

import pytest

from model import ModelConfig, Transformer
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tok = Tokenizer.train(["User: what is 1 + 1?\n\nAssistant: 2 \\boxed{2}"] * 5, 300)
    config = ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=64)
    Transformer(config).save_pretrained(d)
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "good.jsonl"
    p.write_text("".join(json.dumps(dict(question=f"What is {i} + 1?", answer=str(i + 1))) + "\n" for i in range(3)))
    return p


def run(*argv):
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr.strip()


def assert_one_clear_line(code, err, *words):
    assert code != 0 and "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, err)


def evaluate_cli(model_dir, data, *extra):
    return run("evaluate.py", "--model", str(model_dir), "--data", str(data), "--max-new-tokens", "4",
               "--workers", "1", "--out", str(data) + ".out.jsonl", *extra)


def test_a_truncated_jsonl_line(model_dir, problems, tmp_path):
    bad = tmp_path / "truncated.jsonl"
    bad.write_text(problems.read_text() + '{"question": "What is 9 + 1?", "answ')
    assert_one_clear_line(*evaluate_cli(model_dir, bad), "truncated.jsonl:4", "--skip-bad")
    assert_one_clear_line(*run("grpo.py", "--init", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "g")),
                          "truncated.jsonl:4")


@pytest.mark.parametrize("row,why", [({"question": 42, "answer": "1"}, "not text"),
                                     ({"question": "What is 1 + 1?", "answer": None}, "the answer is None"),
                                     ({"question": ["a", "list"], "answer": "1"}, "not text"),
                                     ({"question": "What?", "answer": {"a": 1}}, "expected text or a number")])
def test_a_problem_that_is_not_a_problem(model_dir, problems, tmp_path, row, why):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(problems.read_text() + json.dumps(row) + "\n")
    assert_one_clear_line(*evaluate_cli(model_dir, bad), "bad.jsonl: problem 4", why)
    code, err = evaluate_cli(model_dir, bad, "--skip-bad", "--limit", "1")  # or a counted skip
    assert code == 0 and "1 bad lines or problems skipped" in err, err


def test_a_damaged_checkpoint(model_dir, problems, tmp_path):
    import shutil
    for damage, words in [("truncate", ("model.safetensors", "truncated or damaged")),
                          ("config", ("config.json", "not valid JSON")),
                          ("tensor", ("missing tensors",)),
                          ("tokenizer", ("tokenizer.json", "damaged"))]:
        d = tmp_path / damage
        shutil.copytree(model_dir, d)
        if damage == "truncate":
            w = (d / "model.safetensors").read_bytes()
            (d / "model.safetensors").write_bytes(w[:len(w) // 3])
        elif damage == "config":
            (d / "config.json").write_text((d / "config.json").read_text()[:-30])
        elif damage == "tensor":
            from safetensors.torch import load_file, save_file
            state = load_file(d / "model.safetensors")
            save_file({k: v for k, v in state.items() if "layers.0.mlp.up_proj" not in k}, d / "model.safetensors")
        else:
            (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text()[:100])
        assert_one_clear_line(*evaluate_cli(d, problems), *words)


def test_grpo_questions_that_do_not_split_over_the_mini_batches(model_dir, problems, tmp_path):
    assert_one_clear_line(*run("grpo.py", "--init", str(model_dir), "--data", str(problems), "--questions", "3",
                               "--mini-batches", "2", "--out", str(tmp_path / "g")),
                          "--questions 3 is not a multiple of the 1 ranks x --mini-batches 2")


@pytest.mark.parametrize("flags, words", [
    (["--reward", "orm", "--supervision", "process"], "an outcome model scores whole outputs"),
    (["--rm-refresh", "5"], "give --reward orm|prm and one --reward-model"),
    (["--ref-reset", "-5"], "argument --ref-reset: -5: expected 0 or more"),
    (["--ref-mixup", "0.5"], "--ref-mixup 0.5: the share of the way to π_θ that each --ref-reset moves π_ref"),
    (["--ref-mixup", "0", "--ref-reset", "5"], "--ref-mixup 0.0: the share of the way to π_θ"),
    (["--ref-mixup", "1.5", "--ref-reset", "5"], "--ref-mixup 1.5: the share of the way to π_θ"),
    (["--rm-refresh", "5", "--reward", "orm", "--reward-model", "a", "b"], "one --reward-model"),
    (["--online-rft", "--reward", "prm"], "--online-rft keeps the outputs the rule grades right"),
    (["--advantage", "gae", "--beta", "0"], "--advantage gae is PPO"),
    (["--ratio", "sequence"], "--ratio sequence changes nothing with one update a batch"),
    (["--policy-loss", "cispo", "--mini-batches", "1"], "--policy-loss cispo changes nothing with one update a batch"),
    (["--dual-clip", "3"], "--dual-clip changes nothing with one update a batch"),
    (["--dual-clip", "1", "--mu", "2"], "--dual-clip 1.0: a cap C > 1 on the ratio of tokens of advantage < 0"),
    (["--dual-clip", "3", "--mu", "2", "--policy-loss", "cispo"], "(CISPO's weight is capped already)"),
    (["--mini-batches", "0"], "argument --mini-batches: 0: expected 1 or more"),
    (["--mu", "0"], "argument --mu: 0: expected 1 or more"),
    (["--group-size", "1"], "--group-size 1: GRPO's advantage compares a question's G outputs with each other"),
    (["--group-size", "1", "--std-scale", "batch"], "--group-size 1: GRPO's advantage compares"),
    (["--group-size", "0"], "argument --group-size: 0: expected 1 or more"),
    (["--questions", "0"], "argument --questions: 0: expected 1 or more"),
    (["--questions", "2.5"], "argument --questions: '2.5' is not a whole number"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: 0: expected 1 or more"),
    (["--max-steps", "-1"], "argument --max-steps: -1: expected 0 or more"),
    (["--ckpt-every", "0"], "argument --ckpt-every: 0: expected 1 or more"),
    (["--report-samples", "0"], "argument --report-samples: 0: expected 1 or more"),
    (["--kl-loss", "k2", "--beta", "0"], "--kl-loss k2 changes the KL term in the loss, which --beta 0"),
    (["--kl-loss", "k3-is", "--ratio", "sequence", "--mu", "2"], "--kl-loss k3-is weights each token's k3 by its own"),
    (["--overlong-buffer", "8", "--supervision", "process"], "--overlong-buffer shapes an outcome reward"),
    (["--overlong-buffer", "600"], "--overlong-buffer 600: tokens at the end of the budget, in [0, --max-new-tokens"),
    (["--off-policy-mask", "-0.1"], "--off-policy-mask -0.1: a mean log-ratio DELTA >= 0"),
    (["--off-policy-mask", "0.1", "--online-rft"], "--online-rft gives none"),
    (["--top-entropy", "0"], "--top-entropy 0.0: a share of the tokens, in (0, 1]"),
    (["--temperature", "0"], "--temperature 0.0: GRPO samples G different outputs a question, at T > 0"),
    (["--top-p", "0"], "top-k 0, top-p 0.0 and min-p 0.0: top-k is a number of tokens >= 0, top-p a probability"),
    (["--top-k", "-1"], "top-k -1, top-p 1.0 and min-p 0.0: top-k is a number of tokens >= 0"),
    (["--min-p", "1"], "top-k 0, top-p 1.0 and min-p 1.0: top-k is a number of tokens >= 0, top-p a probability in "
                       "(0, 1], min-p a ratio in [0, 1)"),
    (["--keep-sampling-mask", "--top-p", "0.9"], "--keep-sampling-mask stores the ids each token could have been"),
])
def test_grpo_refuses_flags_that_do_not_go_together(flags, words, capsys):
    import grpo
    with pytest.raises(SystemExit) as e:
        grpo.parse_args(flags)
    assert e.value.code == 2 and words in capsys.readouterr().err.splitlines()[-1]


def test_one_output_a_question_is_enough_where_the_advantage_needs_no_group():
    import grpo
    assert grpo.parse_args(["--group-size", "1", "--advantage", "gae"]).group_size == 1  # PPO: a value model's
    assert grpo.parse_args(["--group-size", "1", "--online-rft", "--beta", "0"]).group_size == 1  # right or not


@pytest.mark.parametrize("script, flag, value, least", [
    ("sft", "--batch", "0", "1"), ("sft", "--micro-batch", "0", "1"), ("sft", "--max-steps", "0", "1"),
    ("pretrain", "--seq-len", "0", "1"), ("pretrain", "--batch-tokens", "-8", "1"), ("pretrain", "--warmup", "-1", "0"),
    ("evaluate", "--samples", "0", "1"), ("evaluate", "--batch", "0", "1"), ("evaluate", "--workers", "0", "1"),
    ("reward_model", "--samples", "0", "1"), ("reward_model", "--shepherd-samples", "0", "1"),
    ("grpo", "--lr", "-1e-6", "0.0"), ("grpo", "--beta", "nan", "0.0"), ("grpo", "--tis", "-2", "0.0"),
    ("grpo", "--clip-eps", "inf", "0.0"), ("sft", "--lr", "-0.001", "0.0"), ("pretrain", "--grad-clip", "-1", "0.0"),
    ("reward_model", "--implicit-beta", "-0.05", "0.0"),
])
def test_every_script_refuses_a_number_below_its_least(script, flag, value, least, capsys):
    """A count of 0 went on into the run (a division by zero, an empty batch, a crash in the model); a negative
    LR, β or cap trained the other way (a TIS cap of -2 flips every weight's sign), a nan to a nan loss. argparse
    refuses each in one line naming the flag; the least itself is taken."""
    import importlib
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).parse_args([f"{flag}={value}"])
    want = f"expected {least} or more" if "." not in least else f"expected a finite number >= {least}"
    assert e.value.code == 2 and f"argument {flag}: {value}: {want}" in capsys.readouterr().err.splitlines()[-1]
    assert importlib.import_module(script).parse_args([flag, least]) is not None


def test_a_negative_temperature_is_refused_where_it_would_draw_the_least_likely_tokens(capsys):
    import engine
    import evaluate
    import reward_model
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--temperature", "-1", "--samples", "2"])
    assert e.value.code == 2 and "--temperature: -1: expected a finite number >= 0.0" in capsys.readouterr().err
    assert evaluate.parse_args(["--temperature", "0"]).temperature == 0
    with pytest.raises(SystemExit, match="--policy out/sft@-0.7: a sampling temperature > 0"):
        reward_model.policy_sources(["out/sft@-0.7"])
    model = Transformer(ModelConfig(vocab_size=16, dim=8, n_layers=1, n_heads=1, ffn_dim=8, max_seq_len=8))
    with pytest.raises(ValueError, match="generate: temperature -0.5, expected >= 0"):
        engine.generate(model, [[1, 2]], 2, temperature=-0.5)


def test_a_negative_lora_rank_is_refused():
    import lora
    import sft
    with pytest.raises(SystemExit, match=r"^error: --lora-rank -4: a rank R >= 1 \(0: no adapters\)$"):
        lora.of(sft.parse_args(["--lora-rank", "-4"]))
