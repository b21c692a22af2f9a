"""Tests are CPU-only and hermetic: nothing is downloaded, every model and tokenizer is made here."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors (read when kernels are defined)


import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# pyproject.toml runs the tests in a worker per core (pytest-xdist): each worker's torch takes its share of the
# cores, not all of them, or two workers' thread pools fight over each core
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def seeded():
    """Each test draws from torch's generator seeded 0: torch seeds itself at random in each process, so a test
    drawing without a seed of its own saw another draw on every run, or after other tests."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tiny data.py output: tokenizer, three shard sources, problems."""
    import data
    import toyworld
    from tokenizer import Tokenizer
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    probs = toyworld.make_problems(80, seed=0)
    texts = {"math": [toyworld.lesson_page(rng, probs[i:i + 2]) for i in range(0, 60, 2)],
             "code": [toyworld.code_page(rng, probs[i:i + 2]) for i in range(0, 60, 2)],
             "general": [toyworld.general_page(rng, "news") for _ in range(30)]}
    Tokenizer.train([t for ts in texts.values() for t in ts], 400).save(d / "tokenizer")
    for name, ts in texts.items():
        data.write_shards(ts, str(d / "tokenizer"), str(d / "shards"), name, workers=1)
    data.write_jsonl(str(d / "train.jsonl"), probs[:64])
    data.write_jsonl(str(d / "test.jsonl"), probs[64:])
    return d


@pytest.fixture(scope="session")
def base(data_dir, tmp_path_factory):
    """A tiny base model, 2 pretraining steps on data_dir, exported with its tokenizer: what the GRPO, PPO and
    reward-model command lines start from."""
    out = tmp_path_factory.mktemp("grpo") / "base"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "pretrain.py", "--data", str(data_dir), "--max-steps", "2", "--seq-len", "32",
                        "--micro-batch", "4", "--batch-tokens", "256", "--eval-every", "0", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture
def group_of_one():
    """common.one_process in bf16 joins a process group of one; leave none behind for the next test, even where
    this one fails before its script's end destroys it. Its matrix products as in_bf16.Fp32Products computes
    them."""
    from in_bf16 import Fp32Products
    with Fp32Products():
        yield
    import common
    common.end_group_of_one()
