"""`python tests/for_sm90.py`: compile fused_kernels/' Triton kernels ahead of time for an H100/H200 (sm_90), on
a machine without a GPU, down to machine code (triton's own ptxas), with the launch settings the code uses, and
print per kernel, as JSON, the exps (ex2) in its PTX, its warps and a digest of its cubin. Run without
TRITON_INTERPRET, which replaces the kernels by Python."""
import hashlib
import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_kernels import grpo_loss, logprobs

ROW = {"x_ptr": "*bf16", "stride": "i64", "t_ptr": "*i64"}  # one row of bf16 logits and the targets
GRPO = {**{k: "*fp32" for k in grpo_loss._grpo_fwd.arg_names[:8]}, "N": "i32", "clip_low": "fp32", "clip_high": "fp32",
        "dual_clip": "fp32", "beta": "fp32", "CISPO": "constexpr", "KL": "constexpr", "BLOCK": "constexpr"}
KERNELS = {  # name: (kernel, argument types as triton writes them, launch settings: constants and options)
    "logprobs_fwd": (logprobs._logprobs_fwd, {**ROW, "out_ptr": "*fp32", "lse_ptr": "*fp32", "V": "i32",
                                              "BLOCK": "constexpr"}, logprobs.FORWARD),
    "logprobs_bwd": (logprobs._logprobs_bwd, {**ROW, "lse_ptr": "*fp32", "g_ptr": "*fp32", "dx_ptr": "*bf16",
                                              "dstride": "i64", "V": "i32", "BLOCK": "constexpr"}, logprobs.BACKWARD),
    **{name: (grpo_loss._grpo_fwd, GRPO, {"CISPO": cispo, "KL": grpo_loss.KL_TERMS.index(kl),
                                          "BLOCK": grpo_loss.TritonGRPOLoss.BLOCK})
       for name, cispo, kl in (("grpo_fwd", False, "k3"), ("grpo_fwd_cispo", True, "k3"),
                               ("grpo_fwd_k2", False, "k2"), ("grpo_fwd_k3is", False, "k3-is"))},
}


if __name__ == "__main__":
    out = {}
    for name, (fn, signature, launch) in KERNELS.items():
        options = {k: v for k, v in launch.items() if k.startswith("num_")}
        constants = {k: v for k, v in launch.items() if k not in options}
        k = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32), options=options)
        assert k.asm["cubin"], name
        out[name] = dict(ex2=k.asm["ptx"].count("ex2.approx"), warps=k.metadata.num_warps, block=constants["BLOCK"],
                         cubin=hashlib.sha256(k.asm["cubin"]).hexdigest()[:16])
    print(json.dumps(out))
