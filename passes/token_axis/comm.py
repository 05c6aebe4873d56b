"""Comm family: the tbo comm ops (start -> a per-ubatch handle, wait -> the blocks it delivers)
and torch's functional collectives. An all_gather multiplies the token blocks by the world size,
a reduce-scatter divides them."""
from __future__ import annotations

import torch

from tbo_compiler.ops.comm import START_OPS, TOKEN_BLOCKS, WAIT_OPS, group_world
from tbo_compiler.passes.token_axis.helpers import fail, require_plain
from tbo_compiler.passes.token_axis.lattice import PER_UBATCH, SHARED, TokenDim
from tbo_compiler.passes.token_axis.registry import register

c10d = torch.ops._c10d_functional


def scaled(ax, node, mul=1, div=1):
    """`ax` (tokens on axis 0) with its outer blocks times `mul` over `div`."""
    if not isinstance(ax, TokenDim) or ax.axis != 0:
        return ax if ax is SHARED else fail(node, "tokens not on axis 0")
    require_plain(node, node.args[0], ax, "communicates")
    if (ax.outer * mul) % div:
        fail(node, f"reduce-scatter of {ax.outer * mul} token blocks over {div} ranks splits tokens")
    return TokenDim(0, ax.outer * mul // div, ax.inner)


@register("comm", *START_OPS)
def rule_comm_start(node, ctx):
    ax = ctx.ax(node.args[0])
    if ax is SHARED:
        return SHARED
    if not isinstance(ax, TokenDim) or ax.axis != 0:
        fail(node, "communicates a tensor whose tokens are not on axis 0")
    require_plain(node, node.args[0], ax, "communicates")
    return PER_UBATCH


@register("comm", *WAIT_OPS)
def rule_comm_wait(node, ctx):
    """wait(handle, payload..., group, world): each result holds the blocks TOKEN_BLOCKS says."""
    _, world = group_world(node.args)
    blocks = TOKEN_BLOCKS[WAIT_OPS[node.target]]
    mul, div = {"same": (1, 1), "gather": (world, 1), "scatter": (1, world)}[blocks]
    outs = tuple(scaled(ctx.ax(a), node, mul=mul, div=div) for a in node.args[1:-2])
    return outs if len(outs) > 1 else outs[0]


@register("comm", c10d.all_reduce.default, c10d.wait_tensor.default)
def rule_c10d_same(node, ctx):
    ax = ctx.ax(node.args[0])
    if node.target == c10d.all_reduce.default:
        require_plain(node, node.args[0], ax, "communicates")
    return ax


@register("comm", c10d.all_gather_into_tensor.default)
def rule_c10d_all_gather(node, ctx):  # all_gather_into_tensor(x, group_size, group_name)
    ax = ctx.ax(node.args[0])
    return scaled(ax, node, mul=node.args[1]) if isinstance(ax, TokenDim) and ax.axis == 0 else ax


@register("comm", c10d.reduce_scatter_tensor.default)
def rule_c10d_reduce_scatter(node, ctx):  # reduce_scatter_tensor(x, op, group_size, group_name)
    ax = ctx.ax(node.args[0])
    return scaled(ax, node, div=node.args[2]) if isinstance(ax, TokenDim) and ax.axis == 0 else ax


@register("comm", c10d.all_to_all_single.default)
def rule_c10d_a2a(node, ctx):  # all_to_all_single(x, out_splits, in_splits, group_name)
    ax = ctx.ax(node.args[0])
    if isinstance(ax, TokenDim):
        require_plain(node, node.args[0], ax, "communicates")
        if ax.axis != 0 or ax.outer == 1:
            fail(node, "all_to_all_single must exchange [ranks x tokens] blocks on axis 0 "
                       "(reshape to [W*T, ...] first)")
    return ax
