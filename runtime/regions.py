"""Compute regions: the stretches of a schedule between two comm points, compiled by Inductor.

Contract
  requires   a scheduled graph (every node's `run` instruction in the order the program issues it).
  guarantees the program (runtime/program.py) groups the schedule's compute into regions: maximal runs of consecutive
             `run` instructions on the compute stream that hold no comm op, no in-place state update
             and no event record/wait between them (so an event recorded after a region covers
             exactly what the schedule said). `Region(...)` is a callable over the region's inputs
             (tensors defined before it) returning its outputs (the values read after it): on its
             first call it builds the region's own FX graph and compiles it with
             `torch._inductor.compile` (fused Triton on GPU, C++ on CPU; the project's kernel ops
             stay extern calls inside). A region holds one ubatch's nodes (or only nodes of neither):
             regions of the two ubatches that are the same computation on the same shapes (a
             layer's stage for ubatch 0 and ubatch 1) share one compiled module; the views that take
             a ubatch's rows of an input run ahead of the region, outside it, for that reason.
  must not   change values: a region computes what its nodes do.

Pseudo-code
  Step 1 (`fusible`, used by the program's emitter): walk the instructions; a fusible run joins the open region, anything
          else closes it. Frees inside a region are deferred to after its call.
  Step 2 (`Region.build`): inputs = nodes read by the region and defined outside it, in first-use
          order; outputs = region nodes read outside it (a tuple-valued node is returned element by
          element). Copy the nodes into a fresh graph.
  Step 3 (`Region.__call__`): on the first call, look up the region's canonical key (ops, argument
          structure, input shapes/strides/dtypes/devices) in the program's cache; compile on a
          miss. Later calls go straight to the compiled module.

Why compile at the first call: the compile then sees real tensors (their real strides, the real
device), outside the tracing context of the graph that holds the regions, and a program built for
a bucket that never runs costs nothing.
"""
from __future__ import annotations

import logging
import operator
import time
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.utils._python_dispatch import _disable_current_modes

from tbo_compiler.ops.comm import START_OPS, WAIT_OPS
from tbo_compiler.ops.instr import COMPUTE, Instr

log = logging.getLogger(__name__)
aten = torch.ops.aten


def is_comm_target(t) -> bool:
    """A tbo comm op or a native functional collective (they run where the schedule puts them)."""
    return t in START_OPS or t in WAIT_OPS or getattr(t, "namespace", None) == "_c10d_functional"


# Step 1 ----------------------------------------------------------------------------------------

#: views the split takes of a token input or an aligned shared value (a ubatch's rows, a mask's):
#: no kernel, and kept out of the regions so that the two ubatches' regions are the same
#: computation (only the offsets differ)
_INPUT_VIEWS = (aten.slice.Tensor, aten.select.int)


def runs_ahead(n: fx.Node, members: set[str], ubatch: int | None = None) -> bool:
    """A node with no GPU work that reads only values defined before the open region (a tuple's
    element, a constant, a slice of a value from before the region): it runs ahead of the
    region's call."""
    if n.op == "get_attr":
        return True
    if n.op != "call_function":
        return False
    if n.target is operator.getitem:
        return not (isinstance(n.args[0], fx.Node) and n.args[0].name in members)
    # a split program's ubatch views only (an unsplit program keeps its slices inside its region)
    return (ubatch is not None and n.target in _INPUT_VIEWS and isinstance(n.args[0], fx.Node)
            and n.args[0].name not in members)


def fusible(n: fx.Node, ins: Instr, eager: set[str], members: set[str]) -> bool:
    """May this run instruction join the open region (whose nodes are `members`)?"""
    if n.op != "call_function" or ins.stream != COMPUTE or n.name in eager:
        return False
    t = n.target
    if is_comm_target(t) or t == aten.copy_.default or runs_ahead(n, members, ins.ubatch):
        return False
    if t is operator.getitem:  # Inductor takes tensors: index a tuple inside the region only
        return isinstance(n.args[0], fx.Node) and n.args[0].name in members
    return True


# Step 2 + 3 ------------------------------------------------------------------------------------

def _is_tensor_record(v) -> bool:
    """A plan's record of one tensor value is [shape, dtype name]; of a tuple, a list of those."""
    return len(v) == 2 and isinstance(v[0], list) and isinstance(v[1], str)


class RegionCache:
    """Compiled regions of one program, by canonical key (the two ubatches' identical stages hit)."""

    def __init__(self, options: dict | None = None):
        self.compiled: dict[str, Any] = {}
        self.options = dict(options or {})
        self.compiles = 0
        self.hits = 0
        self.seconds = 0.0


class Region:
    """A compiled compute region, called as `outs = region(*inputs)` (outs: a tuple of tensors)."""

    def __init__(self, gm: fx.GraphModule, names: Sequence[str], cache: RegionCache, label: str):
        nodes = {n.name: n for n in gm.graph.nodes}
        members = [nodes[x] for x in names]
        inside = set(names)
        self.label = label
        # Step 2: inputs in first-use order, outputs = nodes read after the region
        self.inputs: list[fx.Node] = []
        for n in members:
            for a in n.all_input_nodes:
                if a.name not in inside and a not in self.inputs:
                    self.inputs.append(a)
        self.outputs: list[fx.Node] = [n for n in members if any(u.name not in inside for u in n.users)]
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for i, a in enumerate(self.inputs):
            env[a] = g.placeholder(f"in{i}")
        for n in members:
            env[n] = g.node_copy(n, lambda a: env[a])
        flat, self.unflatten = [], []
        for n in self.outputs:
            v = n.meta.get("val", n.meta.get("tbo_val"))   # a capture's fake value, a plan's record
            if isinstance(v, (tuple, list)) and not _is_tensor_record(v):
                idx = []
                for k in range(len(v)):
                    idx.append(len(flat))
                    flat.append(g.call_function(operator.getitem, (env[n], k)))
                self.unflatten.append(("seq", idx))
            else:
                self.unflatten.append(("one", len(flat)))
                flat.append(env[n])
        g.output(tuple(flat))
        self.gm = fx.GraphModule(torch.nn.Module(), g)
        self.cache, self.fn = cache, None
        self._structure = self._canonical(g)

    @staticmethod
    def _canonical(g: fx.Graph) -> str:
        """The graph with names replaced by positions: two ubatches' copies of a stage are equal."""
        pos: dict[fx.Node, int] = {}
        lines = []

        def norm(a):
            if isinstance(a, fx.Node):
                return f"%{pos[a]}"
            if isinstance(a, (list, tuple)):
                return "[" + ",".join(norm(x) for x in a) + ("]" if isinstance(a, list) else ",)")
            if isinstance(a, dict):
                return "{" + ",".join(f"{k}:{norm(v)}" for k, v in a.items()) + "}"
            return repr(a)

        for i, n in enumerate(g.nodes):
            pos[n] = i
            lines.append(f"{n.op} {n.target if n.op != 'placeholder' else ''} {norm(n.args)} {norm(n.kwargs)}")
        return "\n".join(lines)

    def _key(self, args) -> str:
        metas = ";".join(f"{tuple(a.shape)}/{a.stride()}/{a.dtype}/{a.device}" if isinstance(a, torch.Tensor)
                         else repr(a) for a in args)
        return self._structure + "\n" + metas

    def __call__(self, *args):
        if self.fn is None:
            key = self._key(args)
            fn = self.cache.compiled.get(key)
            if fn is None:
                import torch._inductor  # noqa: F401  (large: imported when a region first runs)
                t0 = time.perf_counter()
                # the compile traces the region afresh: outside any dispatch mode of the caller
                # (aot's first call of a compiled graph runs under one that inspects custom ops)
                with _disable_current_modes():
                    fn = torch._inductor.compile(self.gm, list(args), options=self.cache.options or None)
                self.cache.seconds += time.perf_counter() - t0
                self.cache.compiles += 1
                self.cache.compiled[key] = fn
                log.debug("region %s compiled (%d nodes)", self.label, len(self.gm.graph.nodes))
            else:
                self.cache.hits += 1
            self.fn = fn
        flat = self.fn(*args)
        return tuple(flat[i] if kind == "one" else [flat[j] for j in i] for kind, i in self.unflatten)


__all__ = ["Region", "RegionCache", "fusible", "is_comm_target", "runs_ahead"]
