"""The driver: seed the token inputs, apply each node's rule in program order."""
from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.fx as fx

from tbo_compiler.passes.token_axis.helpers import Ctx, fail, shape, tensor_args
from tbo_compiler.passes.token_axis.lattice import (
    PER_UBATCH, SHARED, STATE, Axis, Groups, TokenAxes, TokenDim, is_order_local, is_reordered, is_token_dependent)
from tbo_compiler.passes.token_axis.pointwise import rule_pointwise
from tbo_compiler.passes.token_axis.registry import lookup, register

aten = torch.ops.aten

#: ops with no tensor output that carry no data (asserts); they are kept shared
IGNORED = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
           aten.sym_constrain_range_for_size.default}


@register("tuple", operator.getitem, reads_state=True, reads_order=True, keeps_keys=True)
def rule_getitem(node, ctx):
    ax = ctx.axes[node.args[0].name]
    if isinstance(ax, tuple):
        return ax[node.args[1]]
    return ax


def infer_token_axes(gm: fx.GraphModule, token_inputs: tuple[str, ...], T: int) -> TokenAxes:
    axes: dict[str, Axis] = {}
    ctx = Ctx(axes, T)
    nodes = {n.name: n for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        # Step 1: seed the placeholders
        if node.op == "placeholder":
            if node.name in token_inputs:
                s = shape(node)
                if not s or s[0] != T:
                    fail(node, f"token input has shape {list(s)}, expected [{T}, ...]")
                axes[node.name] = TokenDim(0)
            else:
                axes[node.name] = SHARED
        elif node.op == "get_attr":
            axes[node.name] = SHARED
        elif node.op == "output":
            _token_ordered(node, ctx, "returns", nodes)
            continue
        # Step 2: each op's rule over its inputs' axes
        elif node.op == "call_function":
            if node.target in IGNORED:  # asserts: run once per ubatch if they read tokens
                deps = [a for a in tensor_args(node) if is_token_dependent(ctx.ax(a))]
                axes[node.name] = PER_UBATCH if deps else SHARED
                continue
            if node.target == aten.copy_.default:  # mutation epilogue: copy_(input, new value)
                _token_ordered(node, ctx, "writes into an input", nodes)
                axes[node.name] = ctx.ax(node.args[1]) if ctx.ax(node.args[1]) is STATE else rule_pointwise(node, ctx)
                continue
            deps = [a for a in tensor_args(node) if is_token_dependent(ctx.ax(a))]
            reg = lookup(node.target)
            local = [a for a in deps if is_order_local(ctx.ax(a))]
            if local and not (reg and reg.reads_order):
                fail(node, f"reads {local[0].name}, {_what(ctx.ax(local[0]))}, which only indexing "
                           "and grouped matmuls may read (mixes tokens)")
            if deps and all(ctx.ax(a) is STATE for a in deps) and not (reg and reg.reads_state):
                axes[node.name] = STATE  # a view or copy of state is state
                continue
            if not deps and node.target is not operator.getitem:
                v = node.meta.get("val")
                axes[node.name] = tuple(SHARED for _ in v) if isinstance(v, (tuple, list)) else SHARED
                continue
            if reg is None:
                fail(node, f"no token-axis rule for {node.target}: cannot tell whether it mixes "
                           "tokens (teach it with tbo_compiler.passes.token_axis.register_rule)")
            out = reg.rule(node, ctx)
            axes[node.name] = out if reg.keeps_keys else _no_keys(out)
        else:
            fail(node, f"unsupported node kind {node.op}")
    # Step 3: the record
    return TokenAxes(T, axes, tuple(token_inputs), dict(ctx.aligned), dict(ctx.renumbered))


def _no_keys(ax):
    """Only a sort, a copy of its keys or a getitem of them holds a sort's keys (what histc may count)."""
    if isinstance(ax, tuple):
        return tuple(_no_keys(a) for a in ax)
    return replace(ax, keys_of=None) if isinstance(ax, TokenDim) and ax.keys_of else ax


def _what(ax) -> str:
    if isinstance(ax, tuple):
        return _what(next(a for a in ax if is_order_local(a)))
    if isinstance(ax, Groups):
        return f"per-ubatch {ax.kind} of sort '{ax.perm}'"
    return "positions of rows (a sort's indices, numbered by each ubatch from 0)"


def _token_ordered(node, ctx, what: str, nodes: dict) -> None:
    """The graph's results (and input mutations) are joined by token: anything a sort over the
    tokens left in its own order must have gone through the inverse permutation first. The error
    names the sort (and the user's line that sorts)."""
    for a in node.all_input_nodes:
        ax = ctx.ax(a)
        if is_reordered(ax):
            x = next(x for x in (ax if isinstance(ax, tuple) else (ax,)) if is_reordered(x))
            name = x.perm if isinstance(x, Groups) else x.order or x.points_to[0]
            fail(nodes.get(name, node), f"sorts the tokens, and the graph {what} {a.name} in that order "
                                        "(a permutation without its inverse): mixes tokens")
