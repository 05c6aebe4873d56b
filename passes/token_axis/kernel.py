"""Kernel family: the project's tbo ops (row-wise kernels, dispatch_pack) and user ops declared
row-wise."""
from __future__ import annotations

import torch

from tbo_compiler.ops.kernels import FAN_OUT_OPS, ROWWISE_OPS
from tbo_compiler.passes.token_axis.comm import scaled
from tbo_compiler.passes.token_axis.helpers import fail, only_tokendims, shape, token_inputs
from tbo_compiler.passes.token_axis.lattice import PER_UBATCH, SHARED, STATE, TokenDim
from tbo_compiler.passes.token_axis.registry import register


@register("kernel", *ROWWISE_OPS, reads_state=True)
def rule_rowwise(node, ctx):
    ax = ctx.ax(node.args[0])
    if ax is SHARED:
        return SHARED if not token_inputs(node, ctx) else fail(node, "first argument is not token-major")
    if not isinstance(ax, TokenDim) or ax.axis != 0:
        fail(node, "row-wise kernel needs tokens on axis 0")
    for a, other in token_inputs(node, ctx):
        if other is not STATE and other != ax:
            fail(node, f"{a.name} has its tokens laid out differently ({other} vs {ax})")
    v = node.meta.get("val")  # route_topk returns (ids, weights): rows of both follow the input's
    return tuple(ax for _ in v) if isinstance(v, (tuple, list)) else ax


@register("kernel", *FAN_OUT_OPS)
def rule_fan_out(node, ctx):
    """dispatch_pack(x, ...): every output holds `world` blocks of x's tokens."""
    world = node.args[FAN_OUT_OPS[node.target]]
    x = scaled(ctx.ax(node.args[0]), node, mul=world)
    return (x, x)


def rule_rowwise_any(node, ctx):
    """A user op declared "rowwise": tokens on axis 0 of every token input and of every output
    with as many rows; shared inputs (weights) allowed."""
    ins = only_tokendims(node, ctx)
    ax = ins[0][1]
    if ax.axis != 0 or any(other != ax for _, other in ins):
        fail(node, "an op declared rowwise needs every token input with the same tokens on axis 0")
    rows = shape(ins[0][0])[0]

    def out(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows:
            return ax
        return PER_UBATCH

    v = node.meta.get("val")
    return tuple(out(x) for x in v) if isinstance(v, (tuple, list)) else out(v)
