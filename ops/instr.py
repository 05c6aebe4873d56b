"""The instruction IR a schedule is made of, and the two stream names.

    Instr(Op.RUN, node, ubatch, stream)       issue a graph node's op on a stream
    Instr(Op.RECORD, stream=s, event=e)       record event e on stream s (after what s issued so far)
    Instr(Op.WAIT, stream=s, event=e)         stream s waits for event e
    Instr(Op.FREE, node, ubatch, stream, e)   drop the value of `node`; e orders its last reader on
                                              the other stream (None: no cross-stream reader)

`Op` is a str enum: an instruction's kind compares, hashes, prints and serialises as its name
("run"), so plans keep their bytes (`to_list` writes the plain string).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from tbo_compiler.ops.errors import ScheduleError

COMPUTE, COMM = "compute", "comm"
STREAMS = (COMPUTE, COMM)


class Op(str, Enum):
    RUN = "run"
    RECORD = "record"
    WAIT = "wait"
    FREE = "free"

    # the plain string's behaviour, not Enum's ("Op.RUN", <Op.RUN: 'run'>, hash of the member name)
    __repr__ = str.__repr__
    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__


@dataclass(frozen=True)
class Instr:
    op: Op
    node: str | None = None
    ubatch: int | None = None
    stream: str = COMPUTE
    event: int | None = None

    def __post_init__(self):
        try:
            object.__setattr__(self, "op", Op(self.op))
        except ValueError:
            raise ScheduleError(f"unknown instruction kind {self.op!r} (run, record, wait, free)") from None

    def to_list(self):
        return [self.op.value, self.node, self.ubatch, self.stream, self.event]

    @staticmethod
    def from_list(x):
        return Instr(*x)


def other_stream(s: str) -> str:
    return COMM if s == COMPUTE else COMPUTE


# Which functional state updates the runtime writes in place (runtime/program.py executes it,
# passes/memory.py counts memory by it: one rule for both) ----------------------------------------

#: functional update -> its in-place form
INPLACE_TARGETS = {torch.ops.aten.index_put.default: torch.ops.aten.index_put_.default}


def inplace_updates(gm, instrs) -> set[str]:
    """Functional state updates (`index_put` into a KV cache) that may write in place.

    The graph is functional, so each cache update makes a new cache: a copy of the whole cache per
    layer and ubatch. An update may instead write into its input when that input is a mutated
    graph input (the caller's cache, copied back at the end anyway) or an earlier in-place update,
    and every other reader of that input runs before it, on the same stream. The final
    `copy_(input, value)` then finds the same tensor and is skipped."""
    aten = torch.ops.aten
    nodes = {n.name: n for n in gm.graph.nodes}
    runs = [i for i in instrs if i.op == Op.RUN]
    pos = {i.node: k for k, i in enumerate(runs)}
    stream = {i.node: i.stream for i in runs}
    out = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = {a.name for a in out.all_input_nodes}
    mutated = {n.args[0].name for n in gm.graph.nodes
               if n.op == "call_function" and n.target == aten.copy_.default and n.args[0].op == "placeholder"}
    inplace: set[str] = set()
    for i in runs:
        n = nodes[i.node]
        if n.target not in INPLACE_TARGETS:
            continue
        base = n.args[0]
        if not (base.name in mutated or base.name in inplace) or base.name in outputs:
            continue
        readers = [u for u in base.users if u is not n and not (u.target == aten.copy_.default
                                                                and u.args[0] is base)]
        if all(pos.get(u.name, -1) < pos[n.name] and stream.get(u.name) == stream[n.name] for u in readers):
            inplace.add(n.name)
    return inplace
