"""The instruction IR a schedule is made of, and the two stream names.

    Instr("run", node, ubatch, stream)        issue a graph node's op on a stream
    Instr("record", stream=s, event=e)        record event e on stream s (after what s issued so far)
    Instr("wait", stream=s, event=e)          stream s waits for event e
    Instr("free", node, ubatch, stream, e)    drop the value of `node`; e orders its last reader on
                                              the other stream (None: no cross-stream reader)
"""
from __future__ import annotations

from dataclasses import dataclass

COMPUTE, COMM = "compute", "comm"
STREAMS = (COMPUTE, COMM)


@dataclass(frozen=True)
class Instr:
    op: str                     # run | record | wait | free
    node: str | None = None
    ubatch: int | None = None
    stream: str = COMPUTE
    event: int | None = None

    def to_list(self):
        return [self.op, self.node, self.ubatch, self.stream, self.event]

    @staticmethod
    def from_list(x):
        return Instr(*x)


def other_stream(s: str) -> str:
    return COMM if s == COMPUTE else COMPUTE
