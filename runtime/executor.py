"""Replay a schedule: one thread, a compute and a comm stream, events between them.

On CPU the streams are no-ops and instructions run in order (comm started by a `*_start` op
still proceeds in the background, gloo's threads, until its wait). On CUDA (a HIP stream on ROCm)
`run` issues the op on its stream, `record`/`wait` are CUDA events, and `free` drops the last
reference after `record_stream` on the other stream, so the caching allocator cannot hand the
memory out while that stream may still read it.
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx as fx

from tbo_compiler.passes.schedule import COMM, COMPUTE, Instr


class _Streams:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.s = {COMPUTE: torch.cuda.current_stream(device), COMM: torch.cuda.Stream(device)}

    def ctx(self, name):
        return torch.cuda.stream(self.s[name]) if self.cuda else _NULL

    def record(self, name):
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.s[name])
        return ev

    def wait(self, name, ev):
        if self.cuda and ev is not None:
            self.s[name].wait_event(ev)

    def release(self, value, other):
        if self.cuda:
            for t in _tensors(value):
                if t.is_cuda:
                    t.record_stream(self.s[other])


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


_NULL = _Null()


def _copy_back(dst, src, *args, **kwargs):
    """The mutation epilogue: nothing to do when the update was made in place."""
    return dst if dst is src else dst.copy_(src, *args, **kwargs)


def _tensors(v):
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in _tensors(x)]
    return []


_INPLACE = {torch.ops.aten.index_put.default: torch.ops.aten.index_put_.default}


def plan_inplace(gm: fx.GraphModule, instrs: Sequence[Instr]) -> set[str]:
    """Functional state updates (`index_put` into a KV cache) that may write in place.

    The graph is functional, so each cache update makes a new cache: a copy of the whole cache per
    layer and ubatch. An update may instead write into its input when that input is a mutated
    graph input (the caller's cache, copied back at the end anyway) or an earlier in-place update,
    and every other reader of that input runs before it, on the same stream. The final
    `copy_(input, value)` then finds the same tensor and is skipped."""
    nodes = {n.name: n for n in gm.graph.nodes}
    runs = [i for i in instrs if i.op == "run"]
    pos = {i.node: k for k, i in enumerate(runs)}
    stream = {i.node: i.stream for i in runs}
    out = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = {a.name for a in out.all_input_nodes}
    mutated = {n.args[0].name for n in gm.graph.nodes
               if n.op == "call_function" and n.target == torch.ops.aten.copy_.default and n.args[0].op == "placeholder"}
    inplace: set[str] = set()
    for i in runs:
        n = nodes[i.node]
        if n.target not in _INPLACE:
            continue
        base = n.args[0]
        if not (base.name in mutated or base.name in inplace) or base.name in outputs:
            continue
        readers = [u for u in base.users if u is not n and not (u.target == torch.ops.aten.copy_.default
                                                                and u.args[0] is base)]
        if all(pos.get(u.name, -1) < pos[n.name] and stream.get(u.name) == stream[n.name] for u in readers):
            inplace.add(n.name)
    return inplace


class Executor:
    """Callable(*flat_inputs) -> outputs of the graph, running `instrs` in order."""

    def __init__(self, gm: fx.GraphModule, instrs: Sequence[Instr], device: torch.device | str = "cpu",
                 inplace: bool = True):
        self.gm = gm
        self.device = torch.device(device)
        self.placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        nodes = {n.name: n for n in gm.graph.nodes}
        self.output = next(n for n in gm.graph.nodes if n.op == "output")
        self.program = []
        self.inplace = plan_inplace(gm, instrs) if inplace else set()
        for ins in instrs:
            if ins.op == "run":
                n = nodes[ins.node]
                target = _INPLACE[n.target] if ins.node in self.inplace else n.target
                if target == torch.ops.aten.copy_.default:
                    target = _copy_back
                self.program.append(("run", ins.node, target, n.args, n.kwargs, ins.stream))
            elif ins.op == "free":
                self.program.append(("free", ins.node, ins.stream, ins.event))
            else:
                self.program.append((ins.op, ins.stream, ins.event))

    def __call__(self, *inputs) -> Any:
        if len(inputs) != len(self.placeholders):
            raise TypeError(f"program takes {len(self.placeholders)} inputs, got {len(inputs)}")
        env: dict[str, Any] = dict(zip(self.placeholders, inputs))
        streams = _Streams(self.device)
        events: dict[int, Any] = {}

        def load(n):
            return env[n.name]

        for step in self.program:
            kind = step[0]
            if kind == "run":
                _, name, target, args, kwargs, stream = step
                a = fx.node.map_arg(args, load)
                k = fx.node.map_arg(kwargs, load)
                with streams.ctx(stream):
                    env[name] = operator.getitem(*a) if target is operator.getitem else target(*a, **k)
            elif kind == "record":
                events[step[2]] = streams.record(step[1])
            elif kind == "wait":
                streams.wait(step[1], events[step[2]])
            else:  # free
                _, name, stream, ev = step
                v = env.pop(name)
                if ev is not None:
                    streams.release(v, COMM if stream == COMPUTE else COMPUTE)
        return fx.node.map_arg(self.output.args[0], load)
