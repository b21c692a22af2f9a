"""The GPU check: one command that measures on one GPU what the 8-GPU user needs to know (aimed at six minutes;
not yet timed at full size), and prints it part by part, each beside a peer measured in the same run where one
exists.

A GPU is lent to this project rarely and briefly, so this is prepared in advance and its CPU smoke mode runs in
the tests (it cannot rot). Six parts:
1. the LM head and the GRPO loss, forward and backward, 16K tokens in bf16 at V = 32K, 102,400 and 152K: from
   logits (naive PyTorch, its torch.compile, ours, Liger-Kernel's triton_grpo_loss), with GB/s against the
   measured copy bandwidth; and from hidden states of width 4,096 with the LM head's GEMMs (ours, as training
   runs it; Liger-Kernel's fused linear GRPO loss); time and peak memory;
2. decoding at 1B, temperature 1, 128-token prompts + 512 new tokens, batch 64 and 256: engine.generate eager,
   captured (engine.Decoder(compile=True): one graph, CUDA graphs), and transformers' generate with a static
   cache (which it compiles on CUDA) on the same weights;
3. decoding at the 7B shape (random bf16 weights) at gen-batch 32 and 128, captured;
4. training at 1B, eager and compiled blocks: tokens/s and MFU (6N FLOPs per token without the input embedding,
   + attention);
5. the README's 8-GPU GRPO command's step time, estimated from parts 3 and 4, with the arithmetic printed;
6. one GRPO step at 1B (grpo.py itself, --compile), by phase, with the memory plan beside max_memory_allocated
   and the sampler-trainer log-prob gap.

    python gpu_check.py            # on a GPU
    python gpu_check.py --smoke    # the same code at toy sizes, on whatever device there is (CPU in the tests;
                                   # part 6 without --compile there, which tests/test_grpo.py runs)
    python gpu_check.py --parts 2,3
    python gpu_check.py --deadline 570   # a GPU lent for 10-minute calls: end cleanly, naming what did not run
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback

import torch

import common
import engine
import grpo
import memory
import pretrain
from bench import timed
from fused_kernels.bench import copy_bandwidth
from model import PRESETS, ModelConfig, Transformer, config_to_hf, hf_layout

# the README's 8-GPU GRPO command (part 5): outputs per step, new tokens, prompt tokens (the dry run's), gen-batch
README_GRPO = dict(outputs=16 * 64, new_tokens=1024, prompt_tokens=256, gen_batch=32, gpus=8)


def peak_gib(fn, cuda):
    """GiB allocated at the peak of one call beyond what was allocated before it (CUDA only; None elsewhere)."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 30


def failed(e):
    """A peer that fails at this size is a row, not the end of the check."""
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


# -----------------------------------------------------------------------------
# 1. the LM head and the GRPO loss


def loss_methods(N, V, C, dtype, device):
    """(name -> a function computing a summed GRPO loss of N tokens from logits or from hidden states, all on the
    same random data; the tensors they differentiate; the names that start from hidden states)."""
    from fused_kernels import grpo_loss_torch, grpo_token_loss, hidden_token_loss, naive_logprobs, token_logprobs
    torch.manual_seed(0)
    logits = torch.randn(N, V, device=device, dtype=dtype, requires_grad=True)
    hidden = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, C, device=device, dtype=dtype) * C ** -0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device)
    old = ref = torch.full((N,), -math.log(V), device=device)  # about uniform
    adv = torch.randn(N, device=device)

    def naive():
        return grpo_loss_torch(naive_logprobs(logits, targets), old, ref, adv, 0.2, 0.2, 0.04)[0].sum()

    def token_loss(lp, rows):  # what grpo.policy_token_loss does for training
        with torch.enable_grad():
            x = lp.detach().requires_grad_()
            loss = grpo_token_loss(x, old[rows], ref[rows], adv[rows], 0.2, 0.04)[0]
            loss.sum().backward()
        return loss.detach(), x.grad

    methods = {"naive PyTorch": naive,
               "ours": lambda: grpo_token_loss(token_logprobs(logits, targets), old, ref, adv)[0].sum(),
               "ours from hidden": lambda: hidden_token_loss(hidden, weight, targets, token_loss)[0]}
    leaves, from_hidden = [logits, hidden, weight], ["ours from hidden"]
    if device != "cuda":
        return methods, leaves, from_hidden
    methods["naive, compiled"] = torch.compile(naive)
    B = 16  # Liger takes (B, L + 1, V) logits / (B, L, C) hidden states and (B,) advantages: N tokens as 16 rows
    ids, o = targets.view(B, -1), old.view(B, -1)
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
        lg = logits.detach().view(B, N // B, V)
        lg = torch.cat([lg, lg[:, :1]], 1).requires_grad_()
        methods["Liger-Kernel"] = lambda: triton_grpo_loss(lg, o, o, ids, adv[:B], temperature=1.0, beta=0.04,
                                                           eps_low=0.2, eps_high=0.2, inplace=False,
                                                           loss_type="grpo")[0].sum()
        leaves.append(lg)
    except ImportError:
        methods["Liger-Kernel"] = None  # a row says it is not installed
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        fused = LigerFusedLinearGRPOLoss(beta=0.04, epsilon_low=0.2, epsilon_high=0.2, temperature=1.0)
        hid = hidden.detach().view(B, N // B, C).requires_grad_()
        mask = torch.ones(B, N // B, device=device)
        methods["Liger fused linear"] = lambda: fused(hid, weight, ids, mask, adv[:B], None, o, o)[0]
        leaves.append(hid)
    except ImportError:
        methods["Liger fused linear"] = None
    from_hidden.append("Liger fused linear")
    return methods, leaves, from_hidden


def loss_table(args, dtype, device):
    cuda = device == "cuda"
    bandwidth = copy_bandwidth(device) if cuda else None
    print(f"\n1. LM head + GRPO loss, forward + backward, {args.tokens} tokens, {str(dtype)[6:]}"
          + (f"; copy bandwidth {bandwidth / 1e9:.0f} GB/s" if cuda else "")
          + f"; from hidden states of width {args.hidden}, the head's GEMMs included")
    print(f"{'vocab':>8}  {'method':<20}{'ms':>9}{'GB/s':>8}{'% copy':>8}{'peak GiB':>10}")
    for V in args.vocabs:
        methods, leaves, from_hidden = loss_methods(args.tokens, V, args.hidden, dtype, device)
        for name, fn in methods.items():
            if fn is None:
                print(f"{V:>8}  {name:<20}  not installed (pip install liger-kernel)")
                continue

            def step():
                fn().backward()
                for x in leaves:  # each call allocates its own gradient, as a training step does
                    x.grad = None
            try:
                sec = timed([step], args.repeats, device)[0]
                peak = peak_gib(step, cuda)
            except Exception as e:
                print(f"{V:>8}  {name:<20}  {failed(e)}")
                continue
            # from logits: read them forward, read them and write their gradient backward; from hidden states
            # the head's GEMMs bound the time, not the bytes
            gbs = None if name in from_hidden else 3 * args.tokens * V * dtype.itemsize / sec / 1e9
            cells = [f"{gbs:8.0f}" if gbs else f"{'-':>8}",
                     f"{100 * gbs * 1e9 / bandwidth:7.0f}%" if gbs and bandwidth else f"{'-':>8}",
                     f"{peak:10.2f}" if peak is not None else f"{'-':>10}"]
            print(f"{V:>8}  {name:<20}{sec * 1e3:9.2f}" + "".join(cells), flush=True)


# -----------------------------------------------------------------------------
# 2-3. decoding


def random_model(config, dtype, device):
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: a 1B model initialised on the CPU takes a while
        model = Transformer(config)
    model.init_weights()
    return model.to(dtype).eval()


def transformers_peer(model, dtype, device):
    """transformers' Llama with our model's weights (its q/k/v and gate/up apart, hf_layout)."""
    import transformers
    cfg = {k: v for k, v in config_to_hf(model.config, dtype).items()
           if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device(device):
        peer = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(dtype)
    state = {("" if k == "lm_head.weight" else "model.") + k: v for k, v in hf_layout(model.state_dict(),
                                                                                       model.config).items()}
    peer.load_state_dict(state, strict=False)  # its rotary tables are buffers of its own
    return peer.eval()


def decode_rows(model, batches, args, device, peer=True):
    """tokens/s of batches x (args.prompt_tokens + args.new_tokens), temperature 1, every row to its budget:
    engine eager, engine captured (one Decoder for all batch sizes: compiled once), transformers' generate with a
    static cache."""
    V, N = model.config.vocab_size, args.new_tokens
    captured = engine.Decoder(model, compile=True)
    hf = transformers_peer(model, model.embed_tokens.weight.dtype, device) if peer else None
    for B in batches:
        g = torch.Generator(device).manual_seed(B)
        ids = torch.randint(1, V, (B, args.prompt_tokens), generator=g, device=device)
        prompts = ids.tolist()
        ways = {"eager": lambda: engine.generate(model, prompts, N, temperature=1.0, slots=B),
                "captured": lambda: captured.generate(prompts, N, temperature=1.0, slots=B)}
        if hf is not None:
            ways["transformers, static cache"] = lambda: hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N, do_sample=True,
                temperature=1.0, top_k=0, top_p=1.0, cache_implementation="static", pad_token_id=0)
        for name, fn in ways.items():
            t0 = time.time()
            try:
                sec = timed([fn], 1, device)[0]  # a first, untimed call compiles and records
            except Exception as e:
                print(f"   batch {B:>4}  {name:<28} {failed(e)}", flush=True)
                continue
            print(f"   batch {B:>4}  {name:<28} {B * N / sec:>9,.0f} tokens/s  ({sec:.2f} s a call; "
                  f"{time.time() - t0:.0f} s with warm-up)", flush=True)


def decode_1b(args, dtype, device):
    model = random_model(ModelConfig(**PRESETS[args.size]), dtype, device)
    print(f"\n2. decoding at {args.size} ({model.num_params() / 1e9:.2f}B) in {str(dtype)[6:]}: prompts of "
          f"{args.prompt_tokens}, {args.new_tokens} new tokens, temperature 1")
    decode_rows(model, args.decode_batches, args, device)


def decode_7b(args, dtype, device):
    model = random_model(ModelConfig(**PRESETS[args.big]), dtype, device)
    print(f"\n3. decoding at the {args.big} shape ({model.num_params() / 1e9:.2f}B, random weights) in "
          f"{str(dtype)[6:]}: prompts of {args.prompt_tokens}, {args.new_tokens} new tokens, captured")
    rates, decoder = {}, engine.Decoder(model, compile=True)  # one: its buffers grow to the larger batch, in place
    for B in args.big_batches:  # of the smaller one's, as GRPO's do
        g = torch.Generator(device).manual_seed(B)
        prompts = torch.randint(1, model.config.vocab_size, (B, args.prompt_tokens), generator=g,
                                device=device).tolist()
        try:
            sec = timed([lambda: decoder.generate(prompts, args.new_tokens, temperature=1.0, slots=B)], 1, device)[0]
        except Exception as e:  # out of memory at the larger batch on an 80 GB GPU: the smaller one still counts
            print(f"   batch {B:>4}  {failed(e)}", flush=True)
            continue
        rates[B] = B * args.new_tokens / sec
        print(f"   batch {B:>4}  {rates[B]:>9,.0f} tokens/s", flush=True)
    return rates


# -----------------------------------------------------------------------------
# 4. training


def train_mfu(args, device):
    """Training throughput at 1B in one process (FSDP2 in a group of one, as grpo.py runs on one GPU), with eager
    blocks and compiled ones (--compile); returns the better MFU, what part 5 estimates from."""
    config = ModelConfig(**PRESETS[args.size])
    d = common.one_process(device, torch.bfloat16 if device == "cuda" else torch.float32)
    optim = common.Optim(lr=1e-4, max_steps=10, weight_decay=0.1)
    B, T = args.train_batch, args.train_tokens
    ac = common.checkpointed_blocks("auto", d, config.n_layers, lambda k: memory.train_peak(
        memory.train_plan(config, 1, B, T, k)))
    x = torch.randint(0, config.vocab_size, (B, T + 1))
    batch = [(x[:, :-1], x[:, 1:], torch.ones(B, T, dtype=torch.bool))]
    print(f"\n4. training, {args.size}, {ac} of {config.n_layers} blocks checkpointed (auto), micro-batch {B} x {T}, "
          f"AdamW step included; MFU: 6N FLOPs per token, N without the input embedding, + 12·L·d·T for attention")
    best = float("nan")
    for compiled in (False, True):
        name = "compiled" if compiled else "eager"
        try:
            model = common.build_model(config, d, seed=0, checkpointed=ac, compile=compiled, fixed_length=True)
            opt = common.make_optimizer(model, optim)
            sec = timed([lambda: common.train_step(model, opt, batch, d, optim, 0)], args.repeats, device)[0]
        except Exception as e:  # a configuration that fails is a row, not the end of the check
            print(f"   {name:<8}  {failed(e)}")
            continue
        finally:
            model = opt = None  # the next configuration's memory
        tokens_per_s = B * T / sec
        mfu = pretrain.flops_per_token(config, T) * tokens_per_s / pretrain.peak_flops(d.device)
        best = mfu if math.isnan(best) else max(best, mfu)
        print(f"   {name:<8}  {tokens_per_s:,.0f} tokens/s, MFU {100 * mfu:.1f}%", flush=True)
    return best


# -----------------------------------------------------------------------------
# 5. the 8-GPU command, estimated


def estimate(decode_rate, mfu, peak):
    """The README's GRPO command's step time per GPU: its rollouts at the measured 7B decode rate (at the
    command's gen-batch), its training at 1B's MFU (an assumption: 7B's GEMMs are larger and usually faster) of
    the GPU's peak FLOP/s."""
    c, cfg = README_GRPO, ModelConfig(**PRESETS["deepseek-math-7b"])
    per_gpu = c["outputs"] // c["gpus"]
    print(f"\n5. the README's 8-GPU GRPO command ({c['outputs']} outputs of up to {c['new_tokens']} tokens per step, "
          f"gen-batch {c['gen_batch']}), estimated per GPU from parts 3 and 4")
    for length in (c["new_tokens"], c["new_tokens"] // 2):
        gen = per_gpu * length / decode_rate
        T = c["prompt_tokens"] + length
        # policy forward + backward (6N + attention) + activation checkpointing's second forward (2N) + reference
        flops = per_gpu * T * (pretrain.flops_per_token(cfg, T) * 8 / 6)
        train = flops / (mfu * peak)
        print(f"   outputs of {length} tokens: generate {per_gpu} x {length} / {decode_rate:,.0f} tokens/s = "
              f"{gen:.0f} s; train + reference {per_gpu} x {T} tokens x {flops / per_gpu / T / 1e9:.1f} GFLOP / "
              f"({100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s) = {train:.0f} s; step ≈ {gen + train:.0f} s")


def estimate_from(results, device):
    """Part 5 from what parts 3 and 4 returned: the 7B decode rate at the batch nearest the command's gen-batch."""
    rates = results.get("3")
    if not rates or "4" not in results:
        raise RuntimeError("needs a decode rate from part 3 and an MFU from part 4, in the same run")
    estimate(rates[min(rates, key=lambda b: abs(b - README_GRPO["gen_batch"]))], results["4"],
             pretrain.peak_flops(torch.device(device)))


# -----------------------------------------------------------------------------
# 6. one GRPO step


def grpo_step(args, device):
    import data
    import toyworld
    from tokenizer import Tokenizer
    config = ModelConfig(**PRESETS[args.size])
    with tempfile.TemporaryDirectory() as tmp:
        problems = toyworld.make_problems(64, seed=0)
        tok = Tokenizer.train([p["question"] + " " + p["cot"] for p in problems], 600)
        torch.manual_seed(0)
        model = Transformer(dataclasses.replace(config, vocab_size=max(config.vocab_size, tok.vocab_size)))
        model.init_weights()
        model.save_pretrained(tmp, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                              bos_id=tok.bos_id, eos_id=tok.eos_id)
        tok.save(tmp)
        data.write_jsonl(os.path.join(tmp, "rl.jsonl"), problems)
        out = os.path.join(tmp, "out")
        gen_batch, micro = args.grpo_questions * args.grpo_group, args.train_batch
        grpo.main(grpo.parse_args([
            "--init", tmp, "--data", os.path.join(tmp, "rl.jsonl"), "--eval-data", "none", "--out", out,
            "--questions", str(args.grpo_questions), "--group-size", str(args.grpo_group),
            "--max-new-tokens", str(args.new_tokens), "--max-steps", "2", "--report-problems", "0",
            "--micro-batch", str(micro), "--gen-batch", str(gen_batch), "--ckpt-every", "100",
            *(["--compile"] if args.grpo_compile else [])]))
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
        prompt = max(len(engine.prompt_ids(tok, p["question"])) for p in problems)
    r = rows[-1]  # the second step: the first also pays for compiling and warm-up
    def peak_of(k):
        return memory.grpo_plan(config, 1, micro, gen_batch, prompt, args.new_tokens, k, kept_decoder=True)["peak"]
    auto = common.checkpointed_blocks("auto", common.Dist(0, 1, torch.device(device)), config.n_layers, peak_of)
    plan_peak = peak_of(auto)  # as grpo.main chose, for the plan beside the peak
    print(f"\n6. one GRPO step, {args.size}: {args.grpo_questions} questions x G = {args.grpo_group}, up to "
          f"{args.new_tokens} new tokens (random weights: outputs run to the budget), "
          + ("--compile" if args.grpo_compile else "eager (tests/test_grpo.py runs --compile on the CPU)"))
    print(f"   {r['seconds']:.2f} s: generate {r['time_generate']:.2f} ({r['rollout_tokens_per_s']:,.0f} tokens/s), "
          f"reward {r['time_reward']:.2f}, reference {r['time_ref']:.2f}, train {r['time_train']:.2f} "
          f"({r['train_tokens_per_s']:,.0f} tokens/s)")
    peak = max((row.get("peak_memory_gib", float("nan")) for row in rows), default=float("nan"))
    print(f"   memory: planned {plan_peak / 2 ** 30:.2f} GiB, max_memory_allocated {peak:.2f} GiB; "
          f"sampler vs trainer log-probs: mean {r['logprob_gap_mean']:.2g}, max {r['logprob_gap_max']:.2g} nats"
          + (f"; TIS weight {r['tis_weight']:.4f}, clipped {100 * r['tis_clip_rate']:.2f}%" if "tis_weight" in r
             else ""))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes (the CPU test of this script)")
    ap.add_argument("--parts", default="1,2,3,4,5,6", help="which of the six parts to run (5 needs 3 and 4)")
    ap.add_argument("--deadline", type=common.nonnegative, default=None, metavar="SECONDS",
                    help="stop the part still running so many seconds after the start and skip the rest, naming "
                         "them (for a GPU lent by the call: the table so far and the summary print before a kill)")
    args = ap.parse_args(argv)
    if not set(args.parts.split(",")) <= set("123456"):  # a typo ran nothing and passed, on a GPU lent by the minute
        ap.error(f"--parts {args.parts}: parts 1 to 6, separated by commas")
    gpu = dict(size="1b", big="deepseek-math-7b", tokens=16384, vocabs=[32768, 102400, 151936], hidden=4096,
               repeats=10, decode_batches=[64, 256], big_batches=[32, 128], prompt_tokens=128, new_tokens=512,
               train_batch=4, train_tokens=2048, grpo_questions=8, grpo_group=8, grpo_compile=True)
    smoke = dict(size="toy", big="toy", tokens=256, vocabs=[1000, 4096], hidden=64, repeats=2,
                 decode_batches=[4, 8], big_batches=[2, 4], prompt_tokens=8, new_tokens=8, train_batch=2,
                 train_tokens=64, grpo_questions=2, grpo_group=2,
                 grpo_compile=False)  # a CPU compile of the GRPO step (~25 s cold) is test_grpo's already
    vars(args).update(smoke if args.smoke else gpu)
    return args


class OutOfTime(BaseException):
    """--deadline passed. Not an Exception, so that a part's own `except Exception` (a row that failed) lets it
    through to main."""


class Clock:
    """--deadline: once it passes, SIGALRM raises OutOfTime inside the part running, and again every AGAIN seconds,
    should a cleanup that raised an error of its own swallow the first (a CUDA graph's capture cut short); between
    parts it only marks the time as passed."""
    AGAIN = 10

    def __init__(self, deadline):
        self.deadline, self.passed, self.in_part = deadline, False, False
        if deadline:
            self.previous = signal.signal(signal.SIGALRM, self._alarm)
            signal.setitimer(signal.ITIMER_REAL, deadline, self.AGAIN)

    def _alarm(self, signum, frame):
        self.passed = True
        if self.in_part:
            raise OutOfTime(f"--deadline {self.deadline} s passed")

    def run(self, fn):
        self.in_part = True
        try:
            return fn()
        finally:
            self.in_part = False

    def stop(self):
        if self.deadline:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)


def main(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("error: gpu_check.py: no GPU here (torch.cuda.is_available() is False); --smoke runs toy "
                         "sizes")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {'smoke sizes' if args.smoke else 'full sizes'}")
    parts, start, results, failures, skipped = args.parts.split(","), time.time(), {}, [], []
    runs = {"1": lambda: loss_table(args, dtype, device), "2": lambda: decode_1b(args, dtype, device),
            "3": lambda: decode_7b(args, dtype, device), "4": lambda: train_mfu(args, device),
            "5": lambda: estimate_from(results, device), "6": lambda: grpo_step(args, device)}
    clock = Clock(args.deadline)
    for part in (p for p in runs if p in parts):
        if clock.passed:
            skipped.append(part)
            continue
        t0 = time.time()
        try:
            results[part] = clock.run(runs[part])
        except OutOfTime as e:
            clock.stop()
            print(f"\n   part {part} stopped: {e}", flush=True)
            failures.append(part)
        except Exception as e:  # the GPU's minutes are few: a part that fails is reported, the next one runs
            traceback.print_exc()
            print(f"   part {part} {failed(e)} (traceback on stderr)", flush=True)
            failures.append(part)
        print(f"   (part {part}: {time.time() - t0:.0f} s)", flush=True)
        common.end_group_of_one()  # parts 4 and 6 join one; the next part starts from a clean slate
        if device == "cuda":
            torch.cuda.empty_cache()
    clock.stop()
    print(f"\n{time.time() - start:.0f} s in all" + (f"; part(s) {', '.join(failures)} failed" if failures else "")
          + (f"; part(s) {', '.join(skipped)} not run (--deadline)" if skipped else ""))
    sys.stdout.flush()
    if failures or skipped:
        sys.exit(1)


if __name__ == "__main__":
    with common.one_line_errors():
        main(parse_args())
