"""Find the communication in a graph: tbo start/wait pairs and native functional collectives.

Contract
  requires   an ATen graph with meta["val"].
  guarantees a frozen `CommOps` record listing every comm op as (start node, wait node, kind, group,
             world, bytes, layer); sets meta["tbo_comm"] = {"kind", "role": start|wait, "pair"} on
             both halves. Raises if a start has no wait or more than one, or a wait reads a
             graph input (a graph break between the two halves shows up here).
  changes    only no-op waits: a native `wait_tensor` of a value this graph computed without a
             collective (most often a second wait on an already-waited result: torch's
             `all_to_all_single_autograd` waits while traced and transformers' EP waits again) has
             nothing pending, so torch returns its input; it is removed, its users read its input.
             Every start then has exactly one wait, and the runtime never waits twice.
  must not   change values.

Pseudo-code
  Step 0: drop no-op waits (a native wait whose input is neither a collective nor a graph input).
  Step 1: for each call_function node, classify: tbo start op, tbo wait op, native collective
          (`_c10d_functional.*`), native `wait_tensor`.
  Step 2: pair starts with waits through the data edge (wait consumes the start's output).
  Step 3: record bytes on the wire and the layer (from nn_module_stack) for the summary.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from tbo_compiler.ops.comm import START_OPS, WAIT_OPS, group_world
from tbo_compiler.ops.errors import TboCompileError, node_error
from tbo_compiler.passes.cost_model import nbytes

c10d = torch.ops._c10d_functional
NATIVE_COLLECTIVES = {
    c10d.all_reduce.default: "all_reduce",
    c10d.all_gather_into_tensor.default: "all_gather",
    c10d.reduce_scatter_tensor.default: "reduce_scatter",
    c10d.all_to_all_single.default: "all_to_all",
    c10d.broadcast.default: "broadcast",
}
NATIVE_WAIT = c10d.wait_tensor.default


@dataclass(frozen=True)
class CommOp:
    start: str
    wait: str
    kind: str
    group: str
    world: int
    bytes: int
    layer: int | None
    ubatch: int | None


@dataclass(frozen=True)
class CommOps:
    ops: tuple[CommOp, ...]

    def by_layer(self) -> dict:
        out: dict = {}
        for op in self.ops:
            out.setdefault(op.layer, []).append(op)
        return out


def is_comm(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in START_OPS or node.target in WAIT_OPS
                                           or node.target in NATIVE_COLLECTIVES or node.target == NATIVE_WAIT)


def is_wait(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in WAIT_OPS or node.target == NATIVE_WAIT)


_LAYER = re.compile(r"layers[._](\d+)")


def layer_of(node: fx.Node) -> int | None:
    stack = node.meta.get("nn_module_stack") or {}
    for key, val in reversed(list(stack.items())):
        path = val[0] if isinstance(val, tuple) else str(val)
        m = _LAYER.search(str(path)) or _LAYER.search(str(key))
        if m:
            return int(m.group(1))
    return None


def _group_world(node: fx.Node):
    if node.target in START_OPS:
        return group_world(node.args)
    # native: group name is the last positional arg; world where the op has it
    args = node.args
    world = {c10d.all_gather_into_tensor.default: 1, c10d.reduce_scatter_tensor.default: 2}.get(node.target)
    return str(args[-1]), (args[world] if world is not None else 0)


def drop_noop_waits(gm: fx.GraphModule) -> tuple[str, ...]:
    """Step 0: remove each native wait of a value computed in this graph by anything but a
    collective. The graph is functional, so the only collectives that can leave work pending on a
    tensor it made are its own; such a wait (a second one on a waited result) returns its input
    in torch. Returns the removed waits' names."""
    dropped = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != NATIVE_WAIT:
            continue
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "call_function" and src.target not in NATIVE_COLLECTIVES:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            dropped.append(node.name)
    if dropped:
        gm.graph.lint()
        gm.recompile()
    return tuple(dropped)


def annotate_comm(gm: fx.GraphModule) -> CommOps:
    drop_noop_waits(gm)
    ops = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        # Step 1
        if node.target in START_OPS:
            want, kind = START_OPS[node.target]
        elif node.target in NATIVE_COLLECTIVES:
            want, kind = NATIVE_WAIT, NATIVE_COLLECTIVES[node.target]
        else:
            continue
        # Step 2
        waits = [u for u in node.users if u.target == want]
        if len(waits) != 1:
            raise node_error(TboCompileError, node, f"{kind} start has {len(waits)} waits in this graph "
                                                    "(a graph break between its halves?)")
        wait = waits[0]
        # Step 3
        group, world = _group_world(node)
        payload = [a.meta.get("val") for a in node.args if isinstance(a, fx.Node)]
        size = sum(nbytes(v) for v in payload)  # what this rank sends
        if kind == "all_gather":
            size = size * max(1, world)
        info = {"kind": kind, "pair": wait.name}
        node.meta["tbo_comm"] = dict(info, role="start")
        wait.meta["tbo_comm"] = {"kind": kind, "pair": node.name, "role": "wait"}
        ops.append(CommOp(node.name, wait.name, kind, group, int(world), int(size), layer_of(node),
                          node.meta.get("tbo_ubatch")))
    for node in gm.graph.nodes:
        if is_wait(node) and "tbo_comm" not in node.meta:
            raise node_error(TboCompileError, node, "wait with no matching start in this graph")
    return CommOps(tuple(ops))
