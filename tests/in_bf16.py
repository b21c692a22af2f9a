"""`python|torchrun tests/in_bf16.py SCRIPT ARGS...`: run SCRIPT computing in bf16 on the CPU, as it computes on
GPUs (common.init_dist keeps a CPU in fp32): FSDP2's bf16 parameters over fp32 master weights, frozen models
stored in bf16, bf16 all-gathers over gloo; one process in a group of one."""
import dataclasses
import os
import runpy
import sys

import torch

import common

as_on_a_cpu = common.init_dist


def init_dist(dtype):
    d = as_on_a_cpu(dtype)  # under torchrun this joins the ranks' group
    return dataclasses.replace(d, dtype=torch.bfloat16) if d.world > 1 else common.one_process("cpu", torch.bfloat16)


if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    common.init_dist = init_dist
    runpy.run_path(script, run_name="__main__")
