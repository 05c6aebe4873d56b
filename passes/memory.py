"""How much activation memory a scheduled program needs: its peak, by a static liveness walk.

Contract
  requires   a graph whose nodes carry their value's shape and dtype (meta["val"] from a capture,
             or meta["tbo_val"] from a plan) and a verified instruction list over it (a serial
             program's or a TBO program's: one walk serves both).
  guarantees `estimate_memory` returns the peak bytes of the values the program allocates
             (activations), the instruction at which the peak is reached and what is live there.
             Not activations, not counted: the inputs (weights, buffers, KV caches, token inputs)
             and what only aliases them (a weight's transpose, a cache updated in place, the copy
             back into a mutated input).
  must not   change the graph or the schedule.

What it models (what runtime/program.py does with the instructions):
  - a `run` binds the node's value to a variable; a `free` deletes it; a value never freed (the
    outputs, a value nobody reads) lives to the end of the program;
  - storage, not values, costs memory: a view (an op whose schema returns an alias of its input,
    `getitem` of a tuple, `_unsafe_view`) shares its base's storage, which stays allocated while
    any value over it is live;
  - a functional KV-cache update that the runtime performs in place (`inplace_updates` of
    ops/instr.py: the one rule the runtime executes and this estimate counts)
    allocates nothing;
  - a value freed with an event (read on the other stream) is handed to `record_stream` before
    its `del`; while a CUDA graph is being captured the caching allocator defers the reuse of
    such a block to the end of the capture, so with `graphs=True` (the runtime's default on CUDA)
    it stays allocated to the end of the program; with `graphs=False` it is counted free at its
    `free` (eager: a little optimistic, the allocator reuses it once the other stream passed it);
  - each allocation is rounded up to the CUDA caching allocator's block granularity (512 bytes).
Not modelled: workspaces a kernel allocates inside itself (a grouped GEMM's permuted copy of the
tokens, a comm backend's staging buffers) and the fragmentation of the allocator's blocks; the
load-time check keeps a margin for them (runtime/plan_module.py).

Pseudo-code
  Step 1: per node, the storages its value holds: fresh ones (sized from its shape and dtype),
          its input's (a view, an in-place update) or none (an input of the program).
  Step 2: walk the instructions in order: a run adds the storages nobody held yet, a free drops
          the variable and with it the storages no live variable holds any more; the peak is the
          largest sum right after a run (its inputs are still live while it writes its output).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from tbo_compiler.ops.instr import Instr, Op, inplace_updates

aten = torch.ops.aten
ALLOC_GRANULARITY = 512   # bytes: the CUDA caching allocator rounds every block up to this
_ALWAYS_VIEWS = {aten._unsafe_view.default}   # shares storage with its input, though its schema says not


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: int                        # activations live at the peak
    peak_index: int                        # the instruction at which it is reached (-1: none ran)
    peak_node: str | None                  # the node that instruction runs
    output_bytes: int                      # of which the outputs (they live to the end)
    live_at_peak: tuple[tuple[str, int], ...] = ()   # the largest storages then: (node, bytes)


def _tensor_bytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def _rounded(nbytes: int, granularity: int) -> int:
    return -(-nbytes // granularity) * granularity if granularity > 1 else nbytes


def value_bytes(n: fx.Node) -> list[int | None]:
    """Bytes of each tensor the node's value holds (one entry per tuple element; None: no tensor)."""
    v = n.meta.get("val")
    if v is not None:
        vals = list(v) if isinstance(v, (list, tuple)) else [v]
        return [_tensor_bytes(x.shape, x.dtype) if isinstance(x, torch.Tensor) else None for x in vals]
    tv = n.meta.get("tbo_val")

    def one(x):
        if isinstance(x, list) and len(x) == 2 and isinstance(x[1], str):
            return _tensor_bytes(x[0], getattr(torch, x[1]))
        return None

    if tv is None:
        return [None]
    if one(tv) is not None:
        return [one(tv)]
    return [one(x) for x in tv] if isinstance(tv, list) else [None]


def _is_view(n: fx.Node) -> bool:
    t = n.target
    if t in _ALWAYS_VIEWS:
        return True
    schema = getattr(t, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


# Step 1 ---------------------------------------------------------------------------------------

def storages_of(gm: fx.GraphModule, instrs: Sequence[Instr], granularity: int = ALLOC_GRANULARITY
                ) -> tuple[dict[str, list[frozenset]], dict[tuple[str, int], int]]:
    """Per node, per element of its value, the storages it holds; and each storage's bytes.
    A storage is named (node that allocated it, element index)."""
    inplace = inplace_updates(gm, instrs)
    elems: dict[str, list[frozenset]] = {}
    size: dict[tuple[str, int], int] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            elems[n.name] = [frozenset()]           # an input: not an activation
        elif n.op == "get_attr":
            elems[n.name] = [frozenset()]           # a constant the graph holds: allocated once
        elif n.op == "call_function":
            first = n.args[0] if n.args else None
            if n.target is operator.getitem and isinstance(first, fx.Node):
                src = elems[first.name]
                i = n.args[1]
                elems[n.name] = [src[i] if isinstance(i, int) and -len(src) <= i < len(src) else frozenset().union(*src)]
            elif isinstance(first, fx.Node) and (_is_view(n) or n.name in inplace):
                base = frozenset().union(*elems[first.name])
                elems[n.name] = [base] * len(value_bytes(n))
            else:
                out = []
                for k, b in enumerate(value_bytes(n)):
                    if b is None:
                        out.append(frozenset())
                    else:
                        size[(n.name, k)] = _rounded(b, granularity)
                        out.append(frozenset({(n.name, k)}))
                elems[n.name] = out
    return elems, size


# Step 2 ---------------------------------------------------------------------------------------

def estimate_memory(gm: fx.GraphModule, instrs: Sequence[Instr], *, graphs: bool = True,
                    granularity: int = ALLOC_GRANULARITY) -> MemoryEstimate:
    """The program's peak activation bytes (see the module docstring for what is counted)."""
    elems, size = storages_of(gm, instrs, granularity)
    holders: dict[tuple, int] = {}      # storage -> live variables over it
    live_vars: dict[str, frozenset] = {}
    pinned: set = set()                 # freed with record_stream under capture: kept to the end
    cur = peak = 0
    peak_index, peak_node, peak_live = -1, None, ()
    for idx, ins in enumerate(instrs):
        if ins.op == Op.RUN:
            keys = frozenset().union(*elems.get(ins.node, [frozenset()]))
            live_vars[ins.node] = keys
            for k in keys:
                if holders.get(k, 0) == 0 and k not in pinned:
                    cur += size[k]
                holders[k] = holders.get(k, 0) + 1
            if cur > peak:
                peak, peak_index, peak_node = cur, idx, ins.node
                peak_live = tuple(k for k, c in holders.items() if c > 0 or k in pinned)
        elif ins.op == Op.FREE and ins.node in live_vars:
            keys = live_vars.pop(ins.node)
            for k in keys:
                holders[k] -= 1
                if graphs and ins.event is not None:
                    pinned.add(k)
                if holders[k] == 0 and k not in pinned:
                    cur -= size[k]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out_keys = frozenset().union(*(frozenset().union(*elems.get(a.name, [frozenset()]))
                                   for a in out.all_input_nodes))
    largest = sorted(((k[0], size[k]) for k in peak_live), key=lambda x: (-x[1], x[0]))[:5]
    return MemoryEstimate(peak, peak_index, peak_node, sum(size[k] for k in out_keys), tuple(largest))


def peak_activation_bytes(gm: fx.GraphModule, instrs: Sequence[Instr], *, graphs: bool = True) -> int:
    return estimate_memory(gm, instrs, graphs=graphs).peak_bytes


def format_bytes(n: int | None) -> str:
    """1.5 GiB, 12.0 MiB, 3.2 KiB, 100 B: how the load check and the summary print a size."""
    if n is None:
        return "unknown"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


__all__ = ["MemoryEstimate", "estimate_memory", "peak_activation_bytes", "storages_of", "value_bytes",
           "format_bytes", "ALLOC_GRANULARITY"]
