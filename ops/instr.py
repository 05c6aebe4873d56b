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
