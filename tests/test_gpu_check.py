"""gpu_check.py at toy sizes on the CPU: the check prepared for the day a GPU is lent runs end to end today."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_mode_prints_all_six_parts():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "gpu_check.py", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for title in ("1. LM head + GRPO loss", "2. decoding", "3. decoding at the toy shape", "4. training",
                  "5. the README's 8-GPU GRPO command", "6. one GRPO step"):
        assert title in out, out
    for method in ("naive PyTorch", "ours", "ours from hidden"):
        assert re.search(rf"^\s+4096\s+{method}\s+\d+\.\d+", out, re.M), method
    for way in ("eager", "captured", "transformers, static cache"):
        assert re.search(rf"batch\s+8\s+{way}\s+[\d,]+ tokens/s", out), way
    for B in (2, 4):  # the 7B shape's decoding (part 3): one Decoder, its buffers grown for the second batch
        assert re.search(rf"^\s+batch\s+{B}\s+[\d,]+ tokens/s$", out, re.M), B
    for blocks in ("eager", "compiled"):  # a configuration that fails prints "failed" in place of its rate
        assert re.search(rf"^\s+{blocks}\s+[\d,]+ tokens/s, MFU", out, re.M), blocks
    assert re.search(r"planned \d+\.\d+ GiB", out)
    # the GRPO part's model has more output rows (2,048) than its tokenizer has ids: the sampler and the training
    # forward must still give the same log-probs
    gaps = [float(g) for g in re.findall(r"logprob_gap_max (\S+)", out)]
    assert gaps and max(gaps) < 1e-4, gaps


def test_a_part_that_fails_is_a_line_and_the_next_part_runs(monkeypatch, capsys):
    """A GPU is lent for minutes: one part's failure (out of memory, a compiler error) must not cost the others;
    the check still ends with a non-zero status that names it."""
    import gpu_check

    def boom(*args):
        raise RuntimeError("boom")
    monkeypatch.setattr(gpu_check, "loss_table", boom)
    monkeypatch.setattr(gpu_check, "decode_1b", lambda *args: print("part 2 ran"))
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(gpu_check.parse_args(["--smoke", "--parts", "1,2"]))
    out = capsys.readouterr().out
    assert stop.value.code == 1 and "part 1 failed: RuntimeError: boom" in out and "part 2 ran" in out
    assert out.rstrip().endswith("part(s) 1 failed"), out


def test_past_the_deadline_the_part_running_stops_and_the_rest_are_named(monkeypatch, capsys):
    """--deadline (a GPU lent by the call, killed at its limit): the part running stops, even one whose rows catch
    their errors and whose cleanup replaced the first alarm by an error of its own; the parts after it do not
    run; the summary names both, and the status is non-zero."""
    import time

    import gpu_check
    tries = []

    def rows_that_catch_their_errors(*args):
        for row in range(4):
            tries.append(row)
            try:
                try:
                    time.sleep(1)
                finally:
                    if row == 0:  # a cleanup's own error replaces the first OutOfTime: the row fails, the part goes on
                        raise RuntimeError("cleanup failed")
            except Exception:
                continue
    monkeypatch.setattr(gpu_check, "loss_table", lambda *args: print("part 1 ran"))
    monkeypatch.setattr(gpu_check, "decode_1b", rows_that_catch_their_errors)
    monkeypatch.setattr(gpu_check, "decode_7b", lambda *args: print("part 3 ran"))
    monkeypatch.setattr(gpu_check.Clock, "AGAIN", 0.2)
    t0 = time.time()
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(gpu_check.parse_args(["--smoke", "--parts", "1,2,3,5", "--deadline", "0.5"]))
    out = capsys.readouterr().out
    assert time.time() - t0 < 3 and tries == [0, 1]  # the first alarm lost in the cleanup, the second stops it
    assert stop.value.code == 1 and "part 1 ran" in out and "part 3 ran" not in out
    assert "part 2 stopped: --deadline 0.5 s passed" in out
    assert out.rstrip().endswith("part(s) 2 failed; part(s) 3, 5 not run (--deadline)"), out


def test_between_parts_the_deadline_only_marks_the_time_as_passed(monkeypatch):
    """An alarm outside a part (cleaning up after one, between two) raises nothing there: it is counted when the
    next part would start, and the alarm that follows stops a part."""
    import time

    import gpu_check
    monkeypatch.setattr(gpu_check.Clock, "AGAIN", 0.1)
    clock = gpu_check.Clock(0.05)
    try:
        time.sleep(0.3)  # the alarm fires here, and again
        assert clock.passed
        with pytest.raises(gpu_check.OutOfTime):
            clock.run(lambda: time.sleep(2))
    finally:
        clock.stop()


def test_the_estimate_needs_parts_3_and_4(monkeypatch, capsys):
    import gpu_check
    with pytest.raises(SystemExit):
        gpu_check.main(gpu_check.parse_args(["--smoke", "--parts", "5"]))
    assert "part 5 failed: RuntimeError: needs a decode rate from part 3" in capsys.readouterr().out


def test_the_8_gpu_estimate_by_hand(capsys):
    """Part 5's arithmetic for the README's command (1,024 outputs of 64 x 16 a step over 8 GPUs: 128 a GPU;
    256 prompt tokens): at 5,000 tokens/s of decoding, 35% MFU of 989 TFLOP/s. A token's training FLOPs are
    6N + 12·L·d·T (N: 6,910,365,696 parameters less the 102,400 x 4,096 input embedding), times 8/6 for
    checkpointing's second forward and the reference's."""
    import gpu_check
    gpu_check.estimate(5000.0, 0.35, 989e12)
    lines = [line for line in capsys.readouterr().out.splitlines() if "step ≈" in line]
    for line, new in zip(lines, (1024, 512)):
        T = 256 + new
        flops = (6 * (6_910_365_696 - 102_400 * 4096) + 12 * 30 * 4096 * T) * 8 / 6
        gen, train = 128 * new / 5000, 128 * T * flops / (0.35 * 989e12)
        assert f"= {gen:.0f} s;" in line and f"x {flops / 1e9:.1f} GFLOP" in line, line
        assert f"= {train:.0f} s; step ≈ {gen + train:.0f} s" in line, line
    assert len(lines) == 2


@pytest.mark.parametrize("flags, words", [(["--parts", "7"], "--parts 7: parts 1 to 6"),
                                          (["--parts", "2,3,"], "--parts 2,3,: parts 1 to 6"),
                                          (["--deadline", "-5"], "argument --deadline: -5: expected a finite number")])
def test_a_mistyped_part_or_deadline_is_refused_before_a_gpu_minute_is_spent(flags, words, capsys):
    """`--parts 7` ran no part and exited 0 (on a GPU lent by the minute, a wasted call); a negative --deadline
    ended in setitimer's traceback."""
    import gpu_check
    with pytest.raises(SystemExit) as stop:
        gpu_check.parse_args(["--smoke", *flags])
    assert stop.value.code == 2 and words in capsys.readouterr().err
    assert gpu_check.parse_args(["--smoke", "--parts", "2,3", "--deadline", "0"]).parts == "2,3"
