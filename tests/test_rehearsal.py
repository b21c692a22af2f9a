"""The 8-GPU command, rehearsed on 4 gloo CPU ranks computing in bf16 as GPUs do (tests/in_bf16.py: FSDP2's bf16
parameters over fp32 master weights, π_ref stored in bf16), with a model shaped like DeepSeek-Math where it matters:
102,400 output rows for a tokenizer of far fewer ids laid out as DeepSeek's (bytes as added tokens), untied
head, multi-head attention, θ = 10000, ε = 1e-6, written by transformers' LlamaForCausalLM in bf16; GSM8K-format
questions. SFT, then GRPO with activation checkpointing, stopped by a signal and resumed; the exported model
loads in transformers with our logits."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from model import Transformer
from test_tokenizer import deepseek_layout
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
RANKS = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "tests/in_bf16.py"]


def run(argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def deepseek_shaped(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("deepseek")
    _, n = deepseek_layout(d)
    tok = Tokenizer.from_hf(d)
    cfg = transformers.LlamaConfig(vocab_size=102400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                   rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                   bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    assert tok.vocab_size == n + 15 < 102400
    rows = [json.dumps(dict(question=f"Ava has {i} apples and buys {i + 2} more. How many does she have?",
                            answer=f"She has {i} + {i + 2} = {2 * i + 2}.\n#### {2 * i + 2}")) + "\n"
            for i in range(28)]
    (d / "train.jsonl").write_text("".join(rows[:24]))
    (d / "test.jsonl").write_text("".join(rows[24:]))
    return d, d / "train.jsonl", d / "test.jsonl"


def test_the_8_gpu_path_on_4_cpu_ranks(deepseek_shaped, tmp_path):
    model_dir, problems, held_out = deepseek_shaped
    sft = tmp_path / "sft"
    r = run([*RANKS, "sft.py", "--init", str(model_dir), "--data", str(problems), "--eval-data", str(held_out),
             "--eval-problems", "4", "--max-steps", "2", "--batch", "8", "--micro-batch", "2", "--lr", "1e-3",
             "--activation-checkpointing", "--out", str(sft)])
    assert r.returncode == 0, _why(r.stdout, r.stderr)
    grpo = tmp_path / "grpo"
    argv = [*RANKS, "grpo.py", "--init", str(sft), "--data", str(problems), "--eval-data", str(held_out),
            "--eval-problems", "4", "--report-problems", "0", "--questions", "4", "--group-size", "4",
            "--max-new-tokens", "16", "--max-steps", "3", "--ckpt-every", "100", "--activation-checkpointing",
            "--temperature", "1.0", "--out", str(grpo)]
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and '"loss"' not in _read(grpo / "metrics.jsonl"):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGSTOP)  # all four ranks and torchrun frozen, then told to stop, then thawed
    os.killpg(proc.pid, signal.SIGTERM)
    os.killpg(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "stopped by signal at step" in out + err, _why(out, err)
    steps = [json.loads(line)["step"] for line in _read(grpo / "metrics.jsonl").splitlines() if '"loss"' in line]
    assert steps and steps[-1] < 3
    r = run([*argv, "--resume"])
    assert r.returncode == 0, _why(r.stdout, r.stderr)
    rows = [json.loads(line) for line in _read(grpo / "metrics.jsonl").splitlines() if '"loss"' in line]
    assert [row["step"] for row in rows] == list(range(1, 4))
    # the export opens in transformers, stops where we do, and gives our logits
    import transformers
    ours, theirs = Transformer.from_pretrained(grpo), transformers.AutoModelForCausalLM.from_pretrained(grpo)
    cfg = json.load(open(grpo / "config.json"))
    assert next(ours.parameters()).dtype == torch.bfloat16  # written in the compute dtype: the ranks' was bf16
    assert (cfg["vocab_size"], cfg["eos_token_id"]) == (102400, Tokenizer.load(grpo).eos_id)
    tokens = torch.randint(0, 700, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(theirs.float()(tokens).logits, ours.float()(tokens), atol=1e-4, rtol=0)


def _why(out, err):
    """The ranks' own last words: torchrun's report of a failed child (its tracebacks, 'Sending process ...
    SIGTERM') fills the tail of stderr and would push them out of the message."""
    cut = err.find("elastic/multiprocessing/api.py:")
    err = err[:err.rfind("\n", 0, cut) + 1] if cut >= 0 else err
    return f"stdout: {out[-1500:]}\nstderr: {err[-3000:]}"


def _read(path):
    return path.read_text() if path.exists() else ""
