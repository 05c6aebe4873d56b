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
        self.out = None
        self.captures = 0  # how many times this program was captured (1 unless inputs moved)
        self.run_args: list = []  # the arguments the graph was captured with (the static copies)
        # the static arguments as captured: tensors by address, anything else by value
        self.nargs = 0
        self.tensor_idx: list[int] = []
        self.ptrs: list[int] = []
        self.others: list[tuple[int, object]] = []
        self.copy_idx = sorted(self.copied)

    def _record(self, args) -> None:
        """Remember the static arguments of a capture (the addresses of its tensors)."""
        self.nargs = len(args)
        static = [i for i in range(len(args)) if i not in self.copied]
        self.tensor_idx = [i for i in static if isinstance(args[i], torch.Tensor)]
        self.ptrs = [args[i].data_ptr() for i in self.tensor_idx]
        self.others = [(i, args[i]) for i in static if not isinstance(args[i], torch.Tensor)]

    def _same_static(self, args) -> bool:
        """Whether args hold the captured static arguments: the same addresses, the same values."""
        if len(args) != self.nargs:
            return False
        for i, v in self.others:
            a = args[i]
            if type(a) is not type(v) or a != v:
                return False
        # each data_ptr() costs ~0.7 us on an H200's host (0.15-0.46 ms for 368-536 static tensors,
        # bench/results/roofline_h200/v7); torch's C++ check of the same addresses measured no faster
        try:
            return list(map(torch.Tensor.data_ptr, [args[i] for i in self.tensor_idx])) == self.ptrs
        except TypeError:  # a number where a tensor was captured
            return False

    def capture(self, args) -> None:
        if self.graph is not None:
            log.info("%s: static inputs moved (new KV caches?); capturing again", self.name)
        self.graph = self.out = None
        self.static = {i: args[i].clone() for i in self.copied}
        run_args = self.run_args = [self.static.get(i, a) for i, a in enumerate(args)]
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
        self.graph = g
        self._record(args)
        self.captures += 1

    def _copy_inputs(self, args) -> None:
        """The per-step inputs into the graph's buffers: one foreach copy (a launch for all of them
        where their dtypes allow, not one per input)."""
        if self.copy_idx:
            torch._foreach_copy_([self.static[i] for i in self.copy_idx], [args[i] for i in self.copy_idx])

    def __call__(self, *args):
        if self.graph is None or not self._same_static(args):
            self.capture(args)
        self._copy_inputs(args)
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
