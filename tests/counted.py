"""`torchrun ... tests/counted.py COUNTS.json SCRIPT ARGS...`: run SCRIPT counting the collectives FSDP2 issues,
its all-gathers and reduce-scatters; rank 0 writes the counts to COUNTS.json as the script finishes."""
import atexit
import json
import os
import runpy
import sys

import torch.distributed as dist

COUNTS = {"all_gather": 0, "reduce_scatter": 0}
# the names FSDP2 calls: all_gather_single / reduce_scatter_single in torch 2.13, the older pair before
NAMES = {"all_gather": ("all_gather_single", "all_gather_into_tensor"),
         "reduce_scatter": ("reduce_scatter_single", "reduce_scatter_tensor")}


def counting(kind, fn):
    def wrapped(*a, **k):
        COUNTS[kind] += 1
        return fn(*a, **k)
    return wrapped


for kind, names in NAMES.items():
    name = next(n for n in names if hasattr(dist, n))
    setattr(dist, name, counting(kind, getattr(dist, name)))


def write():
    if os.environ.get("RANK", "0") == "0":
        with open(out, "w") as f:
            json.dump(COUNTS, f)


if __name__ == "__main__":
    out, script = sys.argv[1], sys.argv[2]
    sys.argv = sys.argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    atexit.register(write)  # common.finish runs the atexit handlers before it leaves
    runpy.run_path(script, run_name="__main__")
