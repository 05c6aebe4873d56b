"""The driver: seed the token inputs, apply each node's rule in program order."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from tbo_compiler.passes.token_axis.helpers import Ctx, fail, shape, tensor_args
from tbo_compiler.passes.token_axis.lattice import PER_UBATCH, SHARED, STATE, Axis, TokenAxes, TokenDim, is_token_dependent
from tbo_compiler.passes.token_axis.pointwise import rule_pointwise
from tbo_compiler.passes.token_axis.registry import lookup, register

aten = torch.ops.aten

#: ops with no tensor output that carry no data (asserts); they are kept shared
IGNORED = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
           aten.sym_constrain_range_for_size.default}


@register("tuple", operator.getitem, reads_state=True)
def rule_getitem(node, ctx):
    ax = ctx.axes[node.args[0].name]
    if isinstance(ax, tuple):
        return ax[node.args[1]]
    return ax


def infer_token_axes(gm: fx.GraphModule, token_inputs: tuple[str, ...], T: int) -> TokenAxes:
    axes: dict[str, Axis] = {}
    ctx = Ctx(axes, T)
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
            continue
        # Step 2: each op's rule over its inputs' axes
        elif node.op == "call_function":
            if node.target in IGNORED:  # asserts: run once per ubatch if they read tokens
                deps = [a for a in tensor_args(node) if is_token_dependent(ctx.ax(a))]
                axes[node.name] = PER_UBATCH if deps else SHARED
                continue
            if node.target == aten.copy_.default:  # mutation epilogue: copy_(input, new value)
                axes[node.name] = ctx.ax(node.args[1]) if ctx.ax(node.args[1]) is STATE else rule_pointwise(node, ctx)
                continue
            deps = [a for a in tensor_args(node) if is_token_dependent(ctx.ax(a))]
            reg = lookup(node.target)
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
            axes[node.name] = reg.rule(node, ctx)
        else:
            fail(node, f"unsupported node kind {node.op}")
    # Step 3: the record
    return TokenAxes(T, axes, tuple(token_inputs), dict(ctx.aligned))
