"""Checkpoints as users bring them: a Qwen2.5-shaped directory written by transformers and tokenizers (no BOS,
ChatML specials, an instruct model's two stop ids), run through the scripts a user starts with."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    """A Qwen2.5-Instruct-shaped model directory: tokenizer_config.json with "bos_token": null and <|im_end|> as
    EOS, generation_config.json stopping on [<|im_end|>, <|endoftext|>], q/k/v biases, tied embeddings; and
    GSM8K-style problems."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("qwen25")
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    corpus = [f"User: What is {a} + {b}?\n\nAssistant: {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."
              for a in range(20) for b in range(5)]
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.add_special_tokens(SPECIALS)  # after the merges, as Qwen's 151,643 and on
    t.save(str(d / "tokenizer.json"))
    ids = {s: t.token_to_id(s) for s in SPECIALS}
    (d / "tokenizer_config.json").write_text(json.dumps(dict(
        bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML,
        tokenizer_class="Qwen2Tokenizer")))
    cfg = transformers.Qwen2Config(vocab_size=t.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, tie_word_embeddings=True,
                                   bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(d)
    # Qwen2.5's own: a bos_token_id here though the tokenizer has none, and two stop ids
    (d / "generation_config.json").write_text(json.dumps(dict(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"])))
    for name, add in (("train", 3), ("test", 4)):  # GSM8K's layout under other names, as users' files have it
        (d / f"{name}.jsonl").write_text("".join(  # no test question among the training ones
            json.dumps(dict(query=f"What is {a} + {add}?", response=f"{a} + {add} = {a + add}\n#### {a + add}")) + "\n"
            for a in range(8)))
    return d, ids, d / "train.jsonl"


def test_a_tokenizer_without_bos_prompts_from_the_first_text_token(qwen25):
    from tokenizer import Tokenizer
    d, ids, _ = qwen25
    tok = Tokenizer.from_hf(d)
    ref = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.bos_id is None and tok.eos_id == ids["<|im_end|>"]
    assert tok.stop_ids == (ids["<|im_end|>"], ids["<|endoftext|>"])  # the tokenizer's EOS, then the config's
    text = "User: What is 4 + 3?\n\nAssistant:"
    assert tok.chat("What is 4 + 3?") == ref.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert tok.encode("hi", bos=True, eos=True) == tok.encode("hi") + [ids["<|im_end|>"]]


LLAMA3 = ("{{- bos_token }}\n{% for m in messages %}\n"  # laid out as real ones are: lines, indents
          "    {{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
          "+ m['content'] | trim + '<|eot_id|>' }}\n{% endfor %}\n  {% if add_generation_prompt %}\n"
          "    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}\n{% endif %}\n")


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_chat_templates_render_as_transformers_does(qwen25, tmp_path, style):
    """--chat-template: the prompt's ids equal transformers' apply_chat_template(add_generation_prompt=True) for
    Qwen's ChatML and a Llama 3 style template (a BOS, header markers, a trim filter), with and without a system
    message (one of its block tags indented: lstrip_blocks); special-token strings in the question stay text."""
    from tokenizer import Tokenizer
    d, _, _ = qwen25
    if style == "llama3":  # the same vocabulary, with Llama 3's specials and a BOS
        t = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        t.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
        t.save(str(tmp_path / "tokenizer.json"))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(
            bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3,
            tokenizer_class="PreTrainedTokenizerFast")))
        d = tmp_path
    # the class that reads this tokenizer.json as it is (transformers 5's Qwen2Tokenizer brings Qwen's own regex)
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(d))
    tok = Tokenizer.from_hf(d)
    question = "What is 4 + 3?\nPut the answer in \\boxed{}."
    for system in (None, "You are a careful mathematician."):
        tok.use_chat_template(system)
        messages = ([dict(role="system", content=system)] if system else []) + [dict(role="user", content=question)]
        expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected  # transformers 5: a BatchEncoding
        assert tok.chat(question) == list(expected)
    assert tok.answer_prefix == ""
    # the EOS string in a question stays text (apply_chat_template would make it the token)
    plain, smuggled = tok.chat("Is it a word?"), tok.chat(f"Is {tok.eos_token} a word?")
    assert smuggled.count(tok.eos_id) == plain.count(tok.eos_id) and f"Is {tok.eos_token} a" in tok.decode(smuggled)


def test_stop_ids_and_a_named_template_from_the_config_files(qwen25, tmp_path):
    """generation_config.json's eos_token_id as one int joins the tokenizer's EOS (it does not replace it); a
    chat_template given as a list of named templates is the one named "default"."""
    import shutil

    from tokenizer import Tokenizer
    d, ids, _ = qwen25
    shutil.copy(d / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(eos_token="<|im_end|>", chat_template=[
        dict(name="tool_use", template="{{ 'tools' }}"), dict(name="default", template=CHATML)])))
    (tmp_path / "generation_config.json").write_text(json.dumps(dict(eos_token_id=ids["<|endoftext|>"])))
    tok = Tokenizer.from_hf(tmp_path)
    assert tok.stop_ids == (ids["<|im_end|>"], ids["<|endoftext|>"]) and tok.chat_template == CHATML


def test_our_own_tokenizers_template_is_the_papers_format(data_dir):
    from tokenizer import Tokenizer
    tok = Tokenizer.load(data_dir / "tokenizer")
    plain = tok.chat("What is 2 + 2?")
    tok.use_chat_template()
    assert tok.chat("What is 2 + 2?") == plain


def test_generation_stops_on_any_of_the_stop_ids(qwen25):
    """Sampling (seeded: the same tokens each time), told that a token it writes (the first new one after the
    start) ends a generation, stops
    there and drops it from the text; the same token not in stop_ids does not stop it."""
    import engine
    from model import Transformer
    from tokenizer import Tokenizer
    d, ids, _ = qwen25
    tok, model = Tokenizer.from_hf(d), Transformer.from_pretrained(d).eval()
    free = engine.complete(model, tok, ["What is 4 + 3?"], max_new_tokens=12, temperature=1.0)[0]
    k = next(k for k in range(1, 12) if free.ids[k] not in free.ids[:k] + list(tok.stop_ids))
    tok.stop_ids = (ids["<|im_end|>"], free.ids[k])
    cut = engine.complete(model, tok, ["What is 4 + 3?"], max_new_tokens=12, temperature=1.0)[0]
    assert cut.ids == free.ids[:k + 1] and cut.finished and cut.text == tok.decode(free.ids[:k])


def run(*argv):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return r


def test_evaluate_grpo_and_sft_run_on_a_qwen25_checkpoint(qwen25, tmp_path):
    """The scripts on a Qwen2.5-shaped checkpoint and GSM8K rows under other field names (GRPO's from parquet,
    the format of most Hugging Face datasets)."""
    pq = pytest.importorskip("pyarrow.parquet")  # requirements-dev.txt has it
    import pyarrow
    d, ids, problems = qwen25
    fields = ("--question-field", "query", "--answer-field", "response")
    run("evaluate.py", "--model", str(d), "--data", str(problems), "--max-new-tokens", "8", "--workers", "1",
        "--out", str(tmp_path / "eval.jsonl"), *fields)
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 8
    run("evaluate.py", "--model", str(d), "--data", str(problems), "--max-new-tokens", "4", "--workers", "1",
        "--limit", "2", "--chat-template", "--system", "Be brief.", "--out", str(tmp_path / "chat.jsonl"), *fields)
    parquet = tmp_path / "train.parquet"
    pq.write_table(pyarrow.Table.from_pylist([json.loads(line) for line in problems.read_text().splitlines()]),
                   str(parquet))
    out = tmp_path / "grpo"
    r = run("grpo.py", "--init", str(d), "--data", str(parquet), "--eval-data", str(d / "test.jsonl"),
            "--eval-problems", "2", "--report-problems", "0", "--max-steps", "1", "--questions", "2",
            "--group-size", "2", "--max-new-tokens", "8", "--out", str(out), *fields)
    assert "held-out (2 problems greedy):" in r.stdout  # no sampled columns with --report-problems 0
    # the export stops where the checkpoint it came from stops
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    r = run("sft.py", "--init", str(d), "--data", str(problems), "--eval-data", str(d / "test.jsonl"),
            "--eval-problems", "2", "--max-steps", "1", "--batch", "4", "--micro-batch", "4",
            "--out", str(tmp_path / "sft"), "--formats", "cot,pot", "--chat-template", *fields)
    assert "solutions by format: cot 8, pot 0" in r.stdout and "no problem has a 'pot' solution" in r.stdout
