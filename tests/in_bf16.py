"""`python|torchrun tests/in_bf16.py SCRIPT ARGS...`: run SCRIPT computing in bf16 on the CPU, as it computes on
GPUs (common.init_dist keeps a CPU in fp32): FSDP2's bf16 parameters over fp32 master weights, frozen models
stored in bf16, bf16 all-gathers over gloo; one process in a group of one. Its matrix products as a GPU's
(Fp32Products)."""
import dataclasses
import os
import runpy
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common

aten = torch.ops.aten
as_on_a_cpu = common.init_dist


class Fp32Products(TorchDispatchMode):
    """bf16 matrix products on the CPU computed in fp32 and rounded to bf16 once, as a GPU's bf16 GEMM accumulates
    in fp32: the CPU's own bf16 GEMM gives the same values to the rounding, many times slower on x86 CPUs without
    bf16 instructions (an AMD Zen 3: F.linear of 512 x 256 by 256 x 1024, forward and backward, 295 ms in bf16, 11
    ms so). Below autograd, so backward's products and the fused head's too."""
    PRODUCTS = {aten.mm.default, aten.addmm.default, aten.addmm.out, aten.bmm.default, aten.baddbmm.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func in self.PRODUCTS and all(
                type(a) is torch.Tensor and a.dtype == torch.bfloat16 and a.device.type == "cpu" for a in tensors):
            up = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            if func is aten.addmm.out:
                return kwargs["out"].copy_(aten.addmm.default(*up, **{k: v for k, v in kwargs.items() if k != "out"}))
            return func(*up, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def init_dist(dtype):
    d = as_on_a_cpu(dtype)  # under torchrun this joins the ranks' group
    return dataclasses.replace(d, dtype=torch.bfloat16) if d.world > 1 else common.one_process("cpu", torch.bfloat16)


if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    common.init_dist = init_dist
    with Fp32Products():
        runpy.run_path(script, run_name="__main__")
