"""Measure what each op of a program costs on this GPU: the cost model's input.

`measure_ops(gm, instrs, args)` runs the program once in profile mode (every op in schedule order
on one stream, a timing event after each) and returns {node: microseconds}. The GPU is first held
by a sleep kernel long enough for the host to issue the whole program, so the events time the GPU,
not the host's launch gaps. What an event pair still adds per op (the event itself, the gap between
two kernels) is measured the same way around an empty op and subtracted: a CUDA graph replay does
not pay it. The ops run one after another, so each time is the op alone: what the two-stream
simulation (passes/cost_model.py `simulate`) needs to predict the overlapped schedule.
"""
from __future__ import annotations

from typing import Sequence

import torch

from tbo_compiler.ops.instr import Instr
from tbo_compiler.runtime.program import Program

_HOLD_CYCLES_PER_MS = 2e6  # ~2 GHz: the sleep kernel holds the GPU while the host issues


def _held(fn, hold_ms: float):
    torch.cuda.synchronize()
    torch.cuda._sleep(int(hold_ms * _HOLD_CYCLES_PER_MS))
    fn()
    torch.cuda.synchronize()


def event_floor_us(device, n: int = 64) -> float:
    """GPU time between two timing events with one tiny kernel between them (median)."""
    x = torch.zeros(1, device=device)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]

    def run():
        ev[0].record()
        for i in range(n):
            x.add_(1)
            ev[i + 1].record()

    _held(run, 20.0)
    gaps = sorted(ev[i].elapsed_time(ev[i + 1]) * 1e3 for i in range(n))
    return gaps[n // 2]


def measure_ops(gm, instrs: Sequence[Instr], args: Sequence, device, hold_ms: float = 200.0,
                subtract_floor: bool = True) -> dict[str, float]:
    prog = Program(gm, instrs, device=device, mode="profile")
    prog(*args)  # first call: kernels resolved and compiled, outside the timed run
    _held(lambda: prog(*args), hold_ms)
    ev = prog.glob["P"]
    floor = event_floor_us(device) if subtract_floor else 0.0
    return {name: max(0.0, ev[k].elapsed_time(ev[k + 1]) * 1e3 - floor) for k, name in enumerate(prog.profiled)}


__all__ = ["measure_ops", "event_floor_us"]
