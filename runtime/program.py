"""A schedule becomes a program: straight-line Python generated once, no interpreter at run time.

Contract
  requires   a split (or unsplit) ATen graph with meta["tbo_stream"] on every node and a verified
             instruction list over it (passes/verify_schedule.py).
  guarantees `Program(*inputs)` returns the graph's outputs. On CUDA (a HIP stream on ROCm) it runs
             on the caller's current stream (the compute stream) and one side stream (comm): the
             side stream forks from the compute stream at entry and joins it at exit, so a call can
             be captured whole in a CUDA graph. No host synchronisation is added (no .item(), no
             event queries): the only syncs are those of the ops themselves, and the kernels and
             comm backends used on CUDA have none.
  must not   change values: the program computes what the graph does.

Pseudo-code
  Step 1: decide which functional KV-cache updates may write in place (`inplace_updates`).
  Step 2: bind each node's callable: ATen overloads as they are, kernel ops through the kernel
          selector (resolved on the first call, with real tensors), comm starts as the group's
          backend method (dispatch, combine, ...), comm waits as `pending.wait()`.
  Step 3: emit one line per instruction: run -> `v = f(args)` under the stream it names (a stream
          switch only where the stream changes); record -> `E[i].record(S)`; wait ->
          `S.wait_event(E[i])`; free -> `del v` (after `record_stream` on the other stream when a
          reader there is ordered by an event, so the allocator cannot hand the memory out early).
  Step 4: compile the source with `exec` and keep it (`Program.source`) for reading and dumps.

Inductor mode (`inductor=True`, what backend="tbo" uses by default): Step 3 groups the consecutive
compute `run`s of one ubatch between two comm points, events or in-place updates into one region
(runtime/regions.py), emitted as one call of its Inductor-compiled module instead of a line per op.

Modes for timing the parts alone (bench): "compute" runs everything with a comm backend that does
no communication (shapes right, values not); "comm" runs only the comm ops, on preallocated
payloads of the right shapes, one after the other on the current stream; "profile" runs every
instruction in order on the current stream with a timing event after each op (runtime/profile.py
turns that into each op's time: the measured costs the cost model replays).
"""
from __future__ import annotations

import math
import operator
from typing import Any, Sequence

import torch
import torch.fx as fx

from tbo_compiler.ops.comm import START_OPS, WAIT_OPS
from tbo_compiler.ops.instr import COMM, COMPUTE, INPLACE_TARGETS, Instr, Op, inplace_updates, other_stream
from tbo_compiler.ops.kernels import KERNEL_OPS
from tbo_compiler.runtime import kernels
from tbo_compiler.runtime.comm import backend_for
from tbo_compiler.runtime.env import flag
from tbo_compiler.runtime.regions import Region, RegionCache, fusible, runs_ahead

aten = torch.ops.aten
_KERNEL_NAMES = {v: k for k, v in KERNEL_OPS.items()}


# Step 1 --------------------------------------------------------------------------------------

# Step 2 helpers: what the generated code calls --------------------------------------------------

def _copy_back(dst, src):
    """The mutation epilogue: nothing to do when the update was made in place."""
    return dst if dst is src else dst.copy_(src)


def _index_put_rows_(base, indices, values, accumulate=False):
    """aten.index_put_ of whole rows (a KV-cache write: cache[slots] = entries) by the row-scatter
    kernel (triton_elementwise.scatter_rows_: each row as 8-byte words, no index arithmetic per
    element). ATen's kernel moves one element per index computation, 2 bytes for a 16-bit cache;
    its traced cost on an H200 was ~45 us a layer at 4096 tokens (Mixtral prefill,
    bench/results/roofline_h200/v6), the kernel's 7 us (v7). The same bytes land in the same places
    (a copy, no arithmetic); anything else (accumulate, several or 2-D indices, strided or converted
    values, CPU tensors: Triton's interpreter would only be slower there) takes ATen's own path.
    TBO_KV_WRITE_WIDE=0 turns it off."""
    idx = indices[0] if len(indices) == 1 else None
    if (accumulate or idx is None or idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32)
            or base.dim() < 2 or values.dtype != base.dtype or tuple(values.shape) != (idx.shape[0], *base.shape[1:])
            or not (base.is_contiguous() and values.is_contiguous()) or base.device != values.device
            or idx.device != base.device or not base.is_cuda):
        return base.index_put_(indices, values, accumulate)
    from tbo_compiler.runtime.kernels.triton_elementwise import scatter_rows_
    return scatter_rows_(base, idx, values)


def _record_stream(v, stream) -> None:
    if isinstance(v, torch.Tensor):
        if v.is_cuda:
            v.record_stream(stream)
    elif isinstance(v, (tuple, list)):
        for t in v:
            _record_stream(t, stream)


class _Kernel:
    """A kernel op bound to its backend on the first call (with real tensors), then called directly."""

    def __init__(self, op: str):
        self.op, self.fn, self.backend = op, None, None

    def __call__(self, *args):
        if self.fn is None:
            self.backend, self.fn, out = kernels.call_checked(self.op, args)
            return out
        return self.fn(*args)


def _meta_of(n: fx.Node):
    """(shape, dtype) of a node's value: meta['val'] from a capture, meta['tbo_val'] from a plan."""
    v = n.meta.get("val")
    if isinstance(v, torch.Tensor):
        return tuple(v.shape), v.dtype
    tv = n.meta.get("tbo_val")
    if tv and isinstance(tv[0], list) and isinstance(tv[1], str):
        return tuple(tv[0]), getattr(torch, tv[1])
    raise ValueError(f"node {n.name} has no tensor shape recorded")


# Step 3 + 4 ------------------------------------------------------------------------------------

class Program:
    """Callable(*flat_inputs) -> outputs of the graph, the schedule compiled to Python."""

    def __init__(self, gm: fx.GraphModule, instrs: Sequence[Instr], device: torch.device | str = "cpu",
                 *, inplace: bool = True, mode: str = "full", comm_backend: str | None = None,
                 inductor: bool | dict = False):
        if mode not in ("full", "compute", "comm", "profile"):
            raise ValueError(f"unknown program mode {mode!r}")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.mode = mode
        self._comm_backend = "null" if mode == "compute" else comm_backend
        self.placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        # profile mode too: it times each op as the full program runs it (an out-of-place cache
        # update copies the whole cache, which a real step never does)
        self.inplace = inplace_updates(gm, instrs) if inplace and mode in ("full", "profile") else set()
        self.glob: dict[str, Any] = {"_copy_back": _copy_back, "_rs": _record_stream, "getitem": operator.getitem}
        self.kernels: dict[str, _Kernel] = {}   # node -> its kernel (backends chosen per shape)
        self._comm: dict[tuple, str] = {}       # (group, world) -> the bound backend's name
        self.events = 0
        self.profiled: list[str] = []   # profile mode: the node timed by each event
        # inductor: the compute between comm points runs as Inductor-compiled regions (a dict: its
        # config options); else one ATen op per line
        self.regions: list[Region] = []
        self.region_cache = RegionCache(inductor if isinstance(inductor, dict) else None) \
            if inductor is not False and mode == "full" else None
        lines = self._emit(gm, instrs)
        self.source = "\n".join(lines) + "\n"
        if mode == "profile":
            self.glob["P"] = [torch.cuda.Event(enable_timing=True) for _ in range(len(self.profiled) + 1)]
        elif self.cuda:
            self.glob["SM"] = torch.cuda.Stream(self.device)
            self.glob["E"] = [torch.cuda.Event() for _ in range(self.events + 1)]
            self.glob["_set"] = torch.cuda.set_stream
            self.glob["_current"] = torch.cuda.current_stream
        exec(compile(self.source, f"<tbo program {id(self)}>", "exec"), self.glob)
        self.fn = self.glob["program"]

    # -- naming
    def _bind(self, prefix: str, obj) -> str:
        name = f"{prefix}{len(self.glob)}"
        self.glob[name] = obj
        return name

    def _target(self, n: fx.Node) -> str:
        t = n.target
        if t in _KERNEL_NAMES:
            self.kernels[n.name] = _Kernel(_KERNEL_NAMES[t])
            return self._bind("k", self.kernels[n.name])
        if n.name in self.inplace:
            t = INPLACE_TARGETS[t]
            if t == aten.index_put_.default and flag("TBO_KV_WRITE_WIDE"):
                return self._bind("f", _index_put_rows_)
        if t == aten.copy_.default:
            return "_copy_back"
        return self._bind("f", t)

    def _arg(self, a) -> str:
        if isinstance(a, fx.Node):
            return f"v_{a.name}"
        if isinstance(a, (list, tuple)):
            inner = ", ".join(self._arg(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if isinstance(a, (int, bool, str)) or a is None:
            return repr(a)
        if isinstance(a, float) and math.isfinite(a):
            return repr(a)
        return self._bind("c", a)  # inf/nan, dtypes, devices, layouts, memory formats

    def _backend(self, n: fx.Node) -> str:
        """The global bound to the comm backend of a start node's group (one per group)."""
        key = (n.args[-2], n.args[-1])
        if key not in self._comm:
            self._comm[key] = self._bind("B", backend_for(*key, self._comm_backend))
        return self._comm[key]

    def _call(self, n: fx.Node) -> str:
        t = n.target
        if n.op == "get_attr":  # a constant the graph holds (a tensor made in forward)
            obj = self._gm
            for part in t.split("."):
                obj = getattr(obj, part)
            return self._bind("a", obj)
        if t is operator.getitem:
            return f"v_{n.args[0].name}[{n.args[1]!r}]"
        if t in START_OPS:
            payload = ", ".join(self._arg(a) for a in n.args[:-2])
            return f"{self._backend(n)}.{START_OPS[t][1]}({payload})"
        if t in WAIT_OPS:
            return f"v_{n.args[0].name}.wait()"
        args = [self._arg(a) for a in n.args] + [f"{k}={self._arg(v)}" for k, v in n.kwargs.items()]
        return f"{self._target(n)}({', '.join(args)})"

    # -- the body
    def _emit(self, gm: fx.GraphModule, instrs: Sequence[Instr]) -> list[str]:
        self._gm = gm
        nodes = {n.name: n for n in gm.graph.nodes}
        params = ", ".join(f"v_{p}" for p in self.placeholders)
        body: list[str] = []
        if self.mode == "comm":
            return self._emit_comm_only(nodes, instrs, params)
        if self.mode == "profile":
            return self._emit_profile(nodes, instrs, params)
        cur = COMPUTE
        streams = {COMPUTE: "SC", COMM: "SM"}
        region: list[str] = []      # the open region's nodes (Inductor mode)
        members: set[str] = set()
        deferred: list[Instr] = []  # frees met inside it
        hidden: set[str] = set()    # region-internal values (no variable in the program)
        eager = self.inplace | {n.name for n in gm.graph.nodes if n.op == "get_attr"}
        # a copy into rows of a buffer (the split's output writes): the buffer and its rows run as
        # plain ops, so the rows written are the buffer's, not a compiled region's alias of it
        for n in gm.graph.nodes:
            if n.target == aten.copy_.default and n.args[0].op != "placeholder":
                eager |= {n.args[0].name} | {a.name for a in n.args[0].all_input_nodes}

        def close():
            nonlocal cur
            if region:
                if self.cuda and cur != COMPUTE:
                    body.append(f"_set({streams[COMPUTE]})")
                    cur = COMPUTE
                body.extend(self._region_call(gm, region))
                # values that live and die inside the region have no variable to free (their free
                # may come after the region closed, e.g. behind an event record)
                hidden.update(members - {o.name for o in self.regions[-1].outputs})
            for f in deferred:
                if f.node not in hidden:
                    self._free(body, f, streams)
            region.clear()
            members.clear()
            deferred.clear()

        region_ubatch = None
        for ins in instrs:
            if ins.op == Op.RUN and self.region_cache is not None and fusible(
                    nodes[ins.node], ins, eager, members):
                if region and ins.ubatch != region_ubatch:
                    close()   # one ubatch per region: the other ubatch's copy can share its code
                region.append(ins.node)
                members.add(ins.node)
                region_ubatch = ins.ubatch
                continue
            if ins.op == Op.FREE and region:
                deferred.append(ins)
                continue
            if ins.op == Op.RUN and region and runs_ahead(nodes[ins.node], members, ins.ubatch):
                # reading a value defined before the region (a comm result's element, a constant):
                # no GPU work, so it runs ahead of the region's call, and the region stays open
                body.append(f"v_{ins.node} = {self._call(nodes[ins.node])}")
                continue
            close()
            if ins.op == Op.RUN:
                if self.cuda and ins.stream != cur:
                    body.append(f"_set({streams[ins.stream]})")
                    cur = ins.stream
                body.append(f"v_{ins.node} = {self._call(nodes[ins.node])}")
            elif ins.op == Op.RECORD and self.cuda:
                self.events = max(self.events, ins.event)
                body.append(f"E[{ins.event}].record({streams[ins.stream]})")
            elif ins.op == Op.WAIT and self.cuda:
                body.append(f"{streams[ins.stream]}.wait_event(E[{ins.event}])")
            elif ins.op == Op.FREE and ins.node not in hidden:
                self._free(body, ins, streams)
        close()
        out = next(n for n in gm.graph.nodes if n.op == "output")
        ret = f"return {self._arg(tuple(out.args[0]) if isinstance(out.args[0], (list, tuple)) else out.args[0])}"
        if self.cuda:
            head = ["SC = _current()", "SM.wait_stream(SC)"]  # fork: the side stream sees the inputs
            tail = ["_set(SC)", "SC.wait_stream(SM)"]         # join: the caller sees everything
        else:
            head, tail = [], []
        return [f"def program({params}):"] + ["    " + x for x in head + body + tail + [ret]]

    def _free(self, body: list[str], ins: Instr, streams: dict) -> None:
        if self.cuda and ins.event is not None:
            body.append(f"_rs(v_{ins.node}, {streams[other_stream(ins.stream)]})")
        body.append(f"del v_{ins.node}")

    def _region_call(self, gm: fx.GraphModule, names: list[str]) -> list[str]:
        """The line calling a compiled region: its outputs (a tuple-valued node's as a list) bound to
        the variables of the nodes they are."""
        r = Region(gm, names, self.region_cache, f"{names[0]}..{names[-1]}")
        self.regions.append(r)
        fn = self._bind("R", r)
        args = ", ".join(f"v_{a.name}" for a in r.inputs)
        outs = "".join(f"v_{o.name}, " for o in r.outputs)
        return [f"{outs}= {fn}({args})" if outs else f"{fn}({args})"]

    def _emit_profile(self, nodes, instrs, params) -> list[str]:
        body = ["P[0].record()"]
        for ins in instrs:
            if ins.op == Op.RUN:
                body.append(f"v_{ins.node} = {self._call(nodes[ins.node])}")
                self.profiled.append(ins.node)
                body.append(f"P[{len(self.profiled)}].record()")
            elif ins.op == Op.FREE:
                body.append(f"del v_{ins.node}")
        return [f"def program({params}):"] + ["    " + x for x in body + ["return None"]]

    def _emit_comm_only(self, nodes, instrs, params) -> list[str]:
        body = []
        for ins in instrs:
            if ins.op != Op.RUN:
                continue
            n = nodes[ins.node]
            if n.target in START_OPS:
                dummies = []
                for a in n.args[:-2]:
                    shape, dtype = _meta_of(a)
                    dummies.append(self._bind("D", torch.zeros(shape, dtype=dtype, device=self.device)))
                body.append(f"v_{n.name} = {self._backend(n)}.{START_OPS[n.target][1]}({', '.join(dummies)})")
            elif n.target in WAIT_OPS:
                body.append(f"v_{n.name} = v_{n.args[0].name}.wait()")
        return [f"def program({params}):"] + ["    " + x for x in body + ["return None"]]

    def __call__(self, *inputs) -> Any:
        if len(inputs) != len(self.placeholders):
            raise TypeError(f"program takes {len(self.placeholders)} inputs, got {len(inputs)}")
        return self.fn(*inputs)

    def backends(self) -> dict[str, set[str]]:
        """Kernel op -> the backends chosen for its nodes (after the first call)."""
        out: dict[str, set[str]] = {}
        for k in self.kernels.values():
            if k.backend:
                out.setdefault(k.op, set()).add(k.backend)
        return out


__all__ = ["Program", "inplace_updates"]
