"""tbo_compiler.runtime: what runs a compiled schedule.

    comm/         comm groups and backends (local, torch_dist, nccl, mori, null) + the eager comm ops
    kernels/      kernel backends (torch reference, grouped_mm, Triton, aiter) behind one selector
    program.py    a schedule as generated Python (two streams, events), one per bucket
    graphs.py     a program captured whole in a CUDA graph
    plan_module.py  a plan's buckets: padding, graphs, the TBO-or-serial choice by measurement
    launch.py     N processes joined by a process group (tests, demo)
Importing it binds the eager implementations of the `tbo` ops (ops/impl.py).
"""
from tbo_compiler.runtime import comm, kernels  # noqa: F401  (binds the tbo ops' implementations)
