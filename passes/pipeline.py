"""The pass pipeline, top to bottom. Both fronts (torch.compile backend, tbo-compile) call it.

    annotate_comm    find dispatch/combine and collectives (before the split: what the model has)
    token_axis       which axis of every value is the token axis; error where tokens mix
    split_ubatches   two ubatches along the token axis, state chained, shapes rewritten
    annotate_comm    again, on the split graph (each comm op now once per ubatch)
    assign_streams   comm on the comm stream, the rest on the compute stream
    schedule         interleave the two ubatch chains; events, frees; cost-model choice
    verify_schedule  dependencies, events, buffer lifetimes
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx

from tbo_compiler.passes.annotate_comm import CommPlan, annotate_comm
from tbo_compiler.passes.errors import TboCompileError
from tbo_compiler.passes.schedule import Schedule, assign_streams, schedule
from tbo_compiler.passes.split_ubatches import SplitPlan, split_point, split_ubatches
from tbo_compiler.passes.token_axis import TokenAxes, infer_token_axes
from tbo_compiler.passes.verify_schedule import verify_schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileOptions:
    mode: str = "prefill"            # prefill | decode (how the batch is cut)
    tokens_per_request: int = 1      # decode: tokens per request (MTP > 1), kept in one ubatch
    profile: str = "cpu"             # cost-model device profile
    order: str | None = None         # force "interleaved" or "sequential"
    split: bool = True               # False: one ubatch (the no-TBO baseline, same runtime)


@dataclass
class Compiled:
    gm: fx.GraphModule               # the program the runtime replays
    original: fx.GraphModule         # the captured graph before the split
    schedule: Schedule
    comm_before: CommPlan
    comm: CommPlan
    T: int
    cut: int
    options: CompileOptions
    axes: TokenAxes | None = None
    split: SplitPlan | None = None
    timings: dict = field(default_factory=dict)


def compile_graph(gm: fx.GraphModule, token_inputs: tuple[str, ...], T: int,
                  options: CompileOptions = CompileOptions(),
                  progress: Callable[[str], None] | None = None) -> Compiled:
    """Run the pipeline on a captured ATen graph traced at T tokens."""
    timings = {}

    def step(name, fn, *a, **k):
        if progress:
            progress(name)
        t0 = time.perf_counter()
        out = fn(*a, **k)
        timings[name] = time.perf_counter() - t0
        return out

    comm_before = step("annotate_comm", annotate_comm, gm)
    cut = split_point(T, options.mode, options.tokens_per_request) if options.split else 0
    axes = split = None
    if cut:
        axes = step("token_axis", infer_token_axes, gm, token_inputs, T)
        new = step("split_ubatches", split_ubatches, gm, axes, cut)
        split = new.meta["tbo_split"]
    else:
        log.info("no split: %d tokens (mode %s)", T, options.mode)
        new = fx.GraphModule(gm, gm.graph)  # shares the graph; every node is one ubatch
        for n in new.graph.nodes:
            n.meta["tbo_ubatch"] = None
    comm = step("annotate_comm_split", annotate_comm, new)
    step("assign_streams", assign_streams, new)
    sched = step("schedule", schedule, new, comm, profile=options.profile, prefer=options.order)
    step("verify_schedule", verify_schedule, new, sched.instrs)
    if cut and len(comm.ops) != 2 * len(comm_before.ops):
        raise TboCompileError(f"split graph has {len(comm.ops)} comm ops, expected 2 x {len(comm_before.ops)}")
    return Compiled(new, gm, sched, comm_before, comm, T, cut, options, axes, split, timings)
