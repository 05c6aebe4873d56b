"""Measure what each op of a program costs on this GPU: the cost model's input.

`measure_ops(gm, instrs, args)` runs the program once in profile mode (every op in schedule order
on one stream, a timing event after each) and returns {node: microseconds}. The GPU is first held
by a sleep kernel long enough for the host to issue the whole program, so the events time the GPU,
not the host's launch gaps. The ops run one after another, so each time is the op alone: what the
two-stream simulation (passes/cost_model.py `simulate`) needs to predict the overlapped schedule.
"""
from __future__ import annotations

from typing import Sequence

import torch

from tbo_compiler.ops.instr import Instr
from tbo_compiler.runtime.program import Program


def measure_ops(gm, instrs: Sequence[Instr], args: Sequence, device, hold_ms: float = 200.0) -> dict[str, float]:
    prog = Program(gm, instrs, device=device, mode="profile")
    prog(*args)  # first call: kernels resolved and compiled, outside the timed run
    torch.cuda.synchronize()
    torch.cuda._sleep(int(hold_ms * 2e6))  # cycles at ~2 GHz: the host issues everything meanwhile
    prog(*args)
    torch.cuda.synchronize()
    ev = prog.glob["P"]
    return {name: ev[k].elapsed_time(ev[k + 1]) * 1e3 for k, name in enumerate(prog.profiled)}


__all__ = ["measure_ops"]
