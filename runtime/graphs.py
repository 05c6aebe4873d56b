"""Whole programs captured as CUDA graphs: both streams, fork and join inside one graph.

A `GraphedProgram` wraps a `Program` for one bucket. Its arguments are of two kinds:
  copied   per-step inputs (token ids, positions, ...): copied into static buffers before replay
  static   tensors that must be the same tensors every call (weights, KV caches): checked by
           address; a call with other tensors captures again (and logs it)
The first call warms the program up on a side stream (Triton compiles, NCCL and cuBLAS initialise
there, outside the capture), then captures it into a graph that draws on one memory pool shared by
every bucket of a plan (capture the largest bucket first so the smaller ones fit in its memory).
Replay issues no Python per op: this is what makes small decode steps and the two-stream
schedule cheap on the host.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

log = logging.getLogger(__name__)


class GraphedProgram:
    def __init__(self, program, copied: Sequence[int], pool=None, name: str = "program"):
        self.program, self.copied, self.pool, self.name = program, frozenset(copied), pool, name
        self.graph = None
        self.static: dict[int, torch.Tensor] = {}
        self.ptrs: tuple = ()
        self.out = None
        self.captures = 0  # how many times this program was captured (1 unless inputs moved)

    def _static_ptrs(self, args) -> tuple:
        return tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a
                     for i, a in enumerate(args) if i not in self.copied)

    def capture(self, args) -> None:
        if self.graph is not None:
            log.info("%s: static inputs moved (new KV caches?); capturing again", self.name)
        self.graph = self.out = None
        self.static = {i: args[i].clone() for i in self.copied}
        run_args = [self.static.get(i, a) for i, a in enumerate(args)]
        cur = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(cur)
        with torch.cuda.stream(side):  # warm-up: lazy initialisation must not land in the graph
            self.program(*run_args)
        cur.wait_stream(side)
        g = torch.cuda.CUDAGraph()
        # thread-local capture: the step watchdog (comm/faults.py) queries events from its own
        # thread, which a global-mode capture forbids (the query would invalidate the capture)
        with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
            self.out = self.program(*run_args)
        self.graph, self.ptrs = g, self._static_ptrs(args)
        self.captures += 1

    def __call__(self, *args):
        if self.graph is None or self._static_ptrs(args) != self.ptrs:
            self.capture(args)
        for i in self.copied:
            self.static[i].copy_(args[i])
        self.graph.replay()
        return self.out


def time_replays(fns: dict, block: int = 3, rounds: int = 2) -> dict[str, float]:
    """Mean ms of one call of each callable as a serving loop sees it: each timed over `block`
    calls back to back (after one untimed call, the switch from the other), in the order A B B A,
    so that a drift of the clocks during the measurement falls on both alike.

    Why blocks: under load the GPUs run at their power cap, and the SM clock follows the recent
    load. On 4 H200s, single replays alternated between TBO and serial (each after a host sync)
    found TBO 5 % faster than serial at prefill 4096 where back-to-back replays, and the bench,
    found it 1-2 % slower (bench/results/ep4_h200/auto_check_ep4.json)."""
    names = list(fns)
    order: list = []
    for r in range(rounds):
        order += names if r % 2 == 0 else names[::-1]
    times: dict[str, list] = {k: [] for k in names}
    for k in order:
        fns[k]()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(block):
            fns[k]()
        e.record()
        e.synchronize()
        times[k].append(s.elapsed_time(e) / block)
    return {k: sum(v) / len(v) for k, v in times.items()}


__all__ = ["GraphedProgram", "time_replays"]
