"""Verify a schedule against its graph (can run on its own: validate-only mode).

Contract
  requires   a graph and an instruction list (a `Schedule` or one loaded from a plan).
  guarantees raises `ScheduleError` naming the instruction unless: every graph node runs exactly
             once and after all its inputs; every edge between streams has an event recorded on
             the producer's stream after the producer and waited on the consumer's stream before
             the consumer; every waited event was recorded before; every recorded event is used
             (waited, or ordering a free); nothing is freed before its last reader, and a value
             read on the other stream is freed only with an event recorded there after that read.
  must not   change anything.
"""
from __future__ import annotations

import torch.fx as fx

from tbo_compiler.ops.errors import ScheduleError
from tbo_compiler.ops.instr import Op


def verify_schedule(gm: fx.GraphModule, instrs) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    runnable = {n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")}
    ran: dict[str, int] = {}          # node -> instruction index
    stream_of: dict[str, str] = {}
    recorded: dict[int, tuple[str, int]] = {}   # event -> (stream, index)
    after_event: dict[int, set] = {}  # event -> nodes run on its stream before the record
    seen_on: dict[str, set] = {"compute": set(), "comm": set()}
    visible: dict[str, set] = {"compute": set(), "comm": set()}  # events waited per stream
    used_events: set[int] = set()
    freed: dict[str, int] = {}

    def bad(i, msg):
        raise ScheduleError(f"instruction {i} {instrs[i].to_list()}: {msg}")

    for i, ins in enumerate(instrs):
        if ins.op == Op.RUN:
            if ins.node not in runnable:
                bad(i, "runs a node that is not in the graph")
            if ins.node in ran:
                bad(i, "runs a node twice")
            for a in nodes[ins.node].all_input_nodes:
                if a.name not in runnable:
                    continue
                if a.name not in ran:
                    bad(i, f"runs before its input {a.name}")
                if a.name in freed:
                    bad(i, f"reads {a.name} after it was freed")
                if stream_of[a.name] != ins.stream:
                    ok = any(a.name in after_event[e] for e in visible[ins.stream])
                    if not ok:
                        bad(i, f"reads {a.name} from the {stream_of[a.name]} stream with no event waited")
            ran[ins.node] = i
            stream_of[ins.node] = ins.stream
            seen_on[ins.stream].add(ins.node)
        elif ins.op == Op.RECORD:
            if ins.event in recorded:
                bad(i, "records an event twice")
            recorded[ins.event] = (ins.stream, i)
            after_event[ins.event] = set(seen_on[ins.stream])
        elif ins.op == Op.WAIT:
            if ins.event not in recorded:
                bad(i, "waits for an event never recorded before")
            if recorded[ins.event][0] == ins.stream:
                bad(i, "waits on the stream that recorded the event")
            visible[ins.stream].add(ins.event)
            # what the recording stream saw becomes ordered before later work here
            seen_on[ins.stream] |= after_event[ins.event]
            used_events.add(ins.event)
        elif ins.op == Op.FREE:
            v = ins.node
            if v not in ran:
                bad(i, "frees a value never computed")
            readers = [u for u in nodes[v].users if u.name in runnable]
            for u in readers:
                if u.name not in ran:
                    bad(i, f"frees {v} before its reader {u.name}")
                if stream_of[u.name] != stream_of[v]:
                    if ins.event is None or ins.event not in recorded or u.name not in after_event[ins.event]:
                        bad(i, f"frees {v} with no event after its reader {u.name} on the {stream_of[u.name]} stream")
            if ins.event is not None:
                used_events.add(ins.event)
            freed[v] = i
        else:
            bad(i, f"unknown instruction {ins.op!r}")
    missing = runnable - set(ran)
    if missing:
        raise ScheduleError(f"{len(missing)} graph nodes never run, e.g. {sorted(missing)[:3]}")
    unused = set(recorded) - used_events
    if unused:
        raise ScheduleError(f"events recorded but never used: {sorted(unused)[:5]}")
